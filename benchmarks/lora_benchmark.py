"""CLAIR on LoRA adapters: per-module (factored, no backbone) vs the (s, t) reduction.

Builds ``n_clients`` rank-``r`` adapters of one ``d x d`` module (one adapter per client,
peft key layout; a few clients leave the shared subspace) and times
:func:`clairstat.lora.refine_adapters` end to end (reduction, decomposition, detection,
refinement and the rank-r readout of every client's adapter):

* ``per-module``: the default, each client in its own row basis (``backbone=False``);
* ``per-module, backbone``: ``backbone=True``, blocks ``Q^T B_k A_k V`` of size s x t;
* ``joint``: one fit over all modules.

Both per-module variants run at the sizes in ``BOTH``; the large case (4096, 50 clients
of rank 16; ``--clients 50 100`` for more) runs the factored path and the joint mode,
and the backbone variant only with ``--backbone-large`` (about ten minutes).

A second table times the out-of-sample statistics of each per-module fit's final
collaborative set two ways in the same run: the exact Gram downdates of
:func:`clairstat._detection.out_of_sample_statistics` and the definition they replace,
one mean and subspace refitted on the other members per member (K refits); it reports
the ratio and the largest relative difference of the statistics.

    python benchmarks/lora_benchmark.py [--quick] [--clients K ...] [--large-only]
                                        [--backbone-large] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

import clairstat
from clairstat._detection import (out_of_sample_statistics, projection_statistics,
                                  refit_subspace, weighted_mean)
from clairstat.aggregation import factored_reduction
from clairstat.lora import module_factors, refine_adapters

BOTH = [(512, 20, 8), (1024, 30, 8)]
LARGE = [(4096, 50, 16)]
QUICK_BOTH, QUICK_LARGE = [(256, 12, 4)], [(1024, 30, 8)]
KEY = "base_model.model.layers.0.q_proj.lora_{}.weight"


def _adapters(dim, n_clients, rank, seed=0):
    """Benign clients: B_k = U W_k + noise (U of rank ``rank // 2``); 10% leave U."""
    rng = np.random.default_rng(seed)
    shared = np.linalg.qr(rng.standard_normal((dim, max(rank // 2, 1))))[0]
    n_bad = max(1, n_clients // 10)
    states = []
    for client in range(n_clients):
        b_mat = shared @ rng.standard_normal((shared.shape[1], rank))
        b_mat += 0.1 * rng.standard_normal((dim, rank)) / np.sqrt(dim) * np.sqrt(rank)
        if client < n_bad:
            b_mat = rng.standard_normal((dim, rank)) / np.sqrt(dim) * np.sqrt(rank)
        a_mat = rng.standard_normal((rank, dim)) / np.sqrt(dim)
        states.append({KEY.format("A"): a_mat, KEY.format("B"): b_mat})
    return states, np.arange(n_clients) < n_bad


def _time(states, **options):
    start = time.perf_counter()
    fit = refine_adapters(states, {"lora_alpha": 1, "r": 1}, random_state=0, **options)
    return time.perf_counter() - start, fit


def _row(dim, n_clients, rank, name, seconds, fit, bad):
    flagged = fit.flagged
    return {"d": dim, "K": n_clients, "r": rank, "variant": name, "seconds": seconds,
            "recall": float(flagged[bad].mean()), "false": int(flagged[~bad].sum())}


def _refit_statistics(stack, weights, members, rank):
    """The definition: each member against a mean and subspace refitted without it."""
    stat = {}
    for k in np.flatnonzero(members):
        others = members.copy()
        others[k] = False
        mean = weighted_mean(stack[others], weights[others])
        basis = refit_subspace(stack[others], weights[others], rank)
        stat[k] = projection_statistics(stack[np.arange(len(members)) == k], mean, basis)[0]
    return stat


def _leave_one_out_row(dim, n_clients, rank, states, fit):
    """Out-of-sample statistics on the fit's final set: downdates vs K refits."""
    stack = factored_reduction(next(iter(module_factors(states).values()))).updates
    estimator = next(iter(fit.estimators.values()))
    members = ~np.asarray(estimator.contaminated_, dtype=bool)
    weights, sub_rank = np.ones(n_clients), estimator.subspace_.shape[1]
    mean = weighted_mean(stack[members], weights[members])
    basis = refit_subspace(stack[members], weights[members], sub_rank)
    start = time.perf_counter()
    stat = out_of_sample_statistics(stack, weights, members, mean, basis)[0]
    downdates = time.perf_counter() - start
    start = time.perf_counter()
    want = _refit_statistics(stack, weights, members, sub_rank)
    refits = time.perf_counter() - start
    error = max(abs(stat[k] - value) / value for k, value in want.items())
    print(f"  d={dim} K={n_clients} leave-one-out: {downdates:.2f} s vs {refits:.2f} s "
          f"(K refits), max relative difference {error:.1e}", flush=True)
    return {"d": dim, "K": n_clients, "r": rank, "members": int(members.sum()),
            "rank": sub_rank, "downdates": downdates, "refits": refits, "error": error}


def run(both, large, backbone_large=False):
    rows, loo_rows = [], []
    for dim, n_clients, rank in both + large:
        states, bad = _adapters(dim, n_clients, rank)
        variants = [("per-module", {}), ("joint", {"joint": True})]
        if (dim, n_clients, rank) in both or backbone_large:
            variants.insert(1, ("per-module, backbone", {"backbone": True}))
        for name, options in variants:
            seconds, fit = _time(states, **options)
            rows.append(_row(dim, n_clients, rank, name, seconds, fit, bad))
            print(f"  d={dim} K={n_clients} r={rank} {name}: {seconds:.2f} s", flush=True)
            if name == "per-module":
                loo_rows.append(_leave_one_out_row(dim, n_clients, rank, states, fit))
    return rows, loo_rows


def _loo_table(rows):
    lines = ["| d | K | r | members | fitted rank | downdates (s) | K refits (s) | "
             "refits / downdates | max relative difference |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['d']} | {r['K']} | {r['r']} | {r['members']} | {r['rank']} | "
                     f"{r['downdates']:.2f} | {r['refits']:.2f} | "
                     f"{r['refits'] / r['downdates']:.1f}x | {r['error']:.1e} |")
    return "\n".join(lines)


def _table(rows):
    lines = ["| d | K | r | variant | seconds | recall | false flags | backbone / factored |",
             "|---|---|---|---|---|---|---|---|"]
    base = {(r["d"], r["K"], r["r"]): r["seconds"] for r in rows if r["variant"] == "per-module"}
    for r in rows:
        ratio = r["seconds"] / base[(r["d"], r["K"], r["r"])] \
            if r["variant"] == "per-module, backbone" else None
        lines.append(f"| {r['d']} | {r['K']} | {r['r']} | {r['variant']} | "
                     f"{r['seconds']:.2f} | {r['recall']:.2f} | {r['false']} | "
                     f"{'' if ratio is None else f'{ratio:.1f}x'} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--backbone-large", action="store_true",
                        help="also run the backbone variant on the large case (minutes)")
    parser.add_argument("--clients", type=int, nargs="+", default=None,
                        help="client counts of the large case (default: 50)")
    parser.add_argument("--large-only", action="store_true",
                        help="skip the sizes where both per-module variants run")
    parser.add_argument("--markdown", help="also write the tables to this file")
    args = parser.parse_args(argv)
    import torch  # imported before timing: its first import takes seconds
    print(f"clairstat {clairstat.__version__}, torch {torch.__version__}, "
          f"{platform.machine()}, {torch.get_num_threads()} threads")
    both, large = (QUICK_BOTH, QUICK_LARGE) if args.quick else (BOTH, LARGE)
    if args.clients:
        large = [(dim, n_clients, rank) for dim, _, rank in large[:1]
                 for n_clients in args.clients]
    rows, loo_rows = run([] if args.large_only else both, large,
                         backbone_large=args.backbone_large)
    table = _table(rows) + "\n\n" + _loo_table(loo_rows)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()

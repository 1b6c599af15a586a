"""CLAIR on LoRA adapters: per-module (factored, no backbone) vs the (s, t) reduction.

Builds ``n_clients`` rank-``r`` adapters of one ``d x d`` module (one adapter per client,
peft key layout; a few clients leave the shared subspace) and times
:func:`clairstat.lora.refine_adapters` end to end (reduction, decomposition, detection,
refinement and the rank-r readout of every client's adapter):

* ``per-module``: the default, each client in its own row basis (``backbone=False``);
* ``per-module, backbone``: ``backbone=True``, blocks ``Q^T B_k A_k V`` of size s x t;
* ``joint``: one fit over all modules.

Both per-module variants run at the sizes in ``BOTH``; the large case (4096, 50 clients
of rank 16) runs the factored path and the joint mode, and the backbone variant only
with ``--backbone-large`` (about ten minutes).

    python benchmarks/lora_benchmark.py [--quick] [--backbone-large] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

import clairstat
from clairstat.lora import refine_adapters

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


def run(both, large, backbone_large=False):
    rows = []
    for dim, n_clients, rank in both + large:
        states, bad = _adapters(dim, n_clients, rank)
        variants = [("per-module", {}), ("joint", {"joint": True})]
        if (dim, n_clients, rank) in both or backbone_large:
            variants.insert(1, ("per-module, backbone", {"backbone": True}))
        for name, options in variants:
            seconds, fit = _time(states, **options)
            rows.append(_row(dim, n_clients, rank, name, seconds, fit, bad))
            print(f"  d={dim} K={n_clients} r={rank} {name}: {seconds:.2f} s", flush=True)
    return rows


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
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)
    import torch  # imported before timing: its first import takes seconds
    print(f"clairstat {clairstat.__version__}, torch {torch.__version__}, "
          f"{platform.machine()}, {torch.get_num_threads()} threads")
    sizes = (QUICK_BOTH, QUICK_LARGE) if args.quick else (BOTH, LARGE)
    rows = run(*sizes, backbone_large=args.backbone_large)
    table = _table(rows)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()

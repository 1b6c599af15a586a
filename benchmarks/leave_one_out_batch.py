"""Leave-one-out fits of a LoRA module: one client at a time against one batch.

The out-of-sample statistic of every member refits the shared subspace without it
(``FactoredBlocks.leave_one_out_fits``): the top-``rank`` eigenvectors of the members'
Gram matrix downdated by the client, by a certified subspace iteration started at the
members' basis. This script times the two ways the package has run those iterations on
the target module of ``lora_benchmark.py`` (d = 4096, 100 clients of rank 16, 10 of
them attackers; every client a member, the members' basis of rank 8 as the detection
fits it there):

* **one at a time**: ``fit(k)`` for each client, spread over the threads of the
  enclosing thread block (``clairstat._threads.map_in_threads``, one BLAS thread each):
  each step one thin product of the p x p downdate base with a (p, rank + 4) block,
  as the package ran them before;
* **batch**: ``fit.all()``: the clients of one weight iterate together, each step one
  product of the base with all their blocks side by side.

Both give the same statistics to round-off (the largest relative difference is
printed); the ratio is taken of the medians of ``--repeats`` runs of each, alternated.

    OMP_NUM_THREADS=2 nice -n 10 python benchmarks/leave_one_out_batch.py [--quick]

Since the thread policy gives a process run under ``nice`` one thread
(:func:`clairstat._threads.threads_for_size`), the ``n_jobs=None`` timings of this
command measure one thread; run it without ``nice`` to time the two-thread default.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

import clairstat
from clairstat._reduced import factored_reduction
from clairstat._threads import map_in_threads, thread_limits
from clairstat.aggregation import modules_work

TARGET, QUICK = (4096, 100, 16), (512, 30, 8)


def _factors(dim, n_clients, rank, seed=0):
    """The clients of ``lora_benchmark._adapters``: B_k = U W_k + noise, 10% off U."""
    rng = np.random.default_rng(seed)
    shared = np.linalg.qr(rng.standard_normal((dim, max(rank // 2, 1))))[0]
    n_bad, factors = max(1, n_clients // 10), []
    for client in range(n_clients):
        b_mat = shared @ rng.standard_normal((shared.shape[1], rank))
        b_mat += 0.1 * rng.standard_normal((dim, rank)) / np.sqrt(dim) * np.sqrt(rank)
        if client < n_bad:
            b_mat = rng.standard_normal((dim, rank)) / np.sqrt(dim) * np.sqrt(rank)
        factors.append((b_mat, rng.standard_normal((rank, dim)) / np.sqrt(dim)))
    return factors, max(rank // 2, 1)


def run(dim, n_clients, rank, n_jobs, repeats):
    factors, sub_rank = _factors(dim, n_clients, rank)
    stack = factored_reduction(factors).updates
    weights = np.ones(n_clients)
    # the thread count refine_adapters(n_jobs=n_jobs) takes for this module
    with thread_limits(n_jobs, modules_work({"module": factors})):
        basis = stack.centred_left_singular(weights, sub_rank)[0]
        fit = stack.leave_one_out_fits(weights, sub_rank, basis)
        one, batch, answers = [], [], {}
        for _ in range(repeats):
            start = time.perf_counter()
            answers["one"] = map_in_threads(fit, range(n_clients))
            one.append(time.perf_counter() - start)
            start = time.perf_counter()
            answers["batch"] = fit.all()
            batch.append(time.perf_counter() - start)
    stat_one = np.array([a[0] for a in answers["one"]])
    stat_batch = np.array([a[0] for a in answers["batch"]])
    return {"d": dim, "K": n_clients, "r": rank, "n_jobs": n_jobs, "p": stack.shape[1],
            "one": float(np.median(one)), "batch": float(np.median(batch)),
            "one_all": one, "batch_all": batch,
            "diff": float(np.max(np.abs(stat_one - stat_batch) / np.abs(stat_one)))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small module (seconds)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    dim, n_clients, rank = QUICK if args.quick else TARGET
    print(f"clairstat {clairstat.__version__}, numpy {np.__version__}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    rows = [run(dim, n_clients, rank, n_jobs, args.repeats) for n_jobs in (1, None)]
    print("\n| d | K | r | n_jobs | reduced p | one at a time (s, median) | batch (s, median) "
          "| ratio | largest relative difference of the statistics |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['d']} | {r['K']} | {r['r']} | {r['n_jobs']} | {r['p']} | {r['one']:.2f} "
              f"| {r['batch']:.2f} | {r['one'] / r['batch']:.2f} | {r['diff']:.1e} |")
    for r in rows:
        print(f"(n_jobs={r['n_jobs']}: one at a time "
              + ", ".join(f"{x:.2f}" for x in r["one_all"]) + " s; batch "
              + ", ".join(f"{x:.2f}" for x in r["batch_all"]) + " s)")
    print(f"load {os.getloadavg()[0]:.2f}")
    return rows


if __name__ == "__main__":
    main()

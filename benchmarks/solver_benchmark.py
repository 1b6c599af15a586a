"""Torch vs CVXPY+SCS on the penalized CLAIR program.

Prints, for each (p, q, K): each solver's wall time, objective, relative duality gap,
iterations, the number of SVD-type factorizations the torch solver used, its time in
units of one thin SVD of M measured in the same run, and the CVXPY/torch time ratio.
Beyond the CVXPY grid, torch alone runs up to p = 1000, K = 500.

    python benchmarks/solver_benchmark.py [--quick] [--skip-cvxpy] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import numpy as np

import clairstat
from clairstat import clair_decompose
from clairstat._objective import stack_blocks
from clairstat.datasets import make_low_rank_block_sparse

BOTH = [(30, 5, 20), (50, 10, 30), (100, 10, 50), (200, 16, 64)]
TORCH_ONLY = [(500, 16, 200), (1000, 16, 500)]
QUICK_BOTH, QUICK_TORCH = [(30, 5, 20), (50, 10, 30)], [(200, 16, 64)]


def _instance(p, q, n_clients, seed=0):
    rank, n_bad = max(2, p // 50), max(1, n_clients // 10)
    return make_low_rank_block_sparse(n_clients, p, q, rank, n_bad, noise_level=0.1,
                                      random_state=seed).local_estimates


def _svd_seconds(X, repeats=3):
    import torch
    M = torch.as_tensor(stack_blocks(X))
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.linalg.svd(M, full_matrices=False)
        best = min(best, time.perf_counter() - start)
    return best


def _run(X, solver):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statuses are reported in the table instead
        start = time.perf_counter()
        result = clair_decompose(X, solver=solver)
        return time.perf_counter() - start, result


def benchmark(both, torch_only, skip_cvxpy=False):
    _run(_instance(10, 2, 5), "torch")  # warm-up: torch's first call pays its start-up
    rows = []
    for p, q, n_clients in both + torch_only:
        X = _instance(p, q, n_clients)
        t_svd = _svd_seconds(X)
        t_torch, res_t = _run(X, "torch")
        row = dict(p=p, q=q, K=n_clients, torch_s=t_torch, torch_obj=res_t.objective,
                   torch_gap=res_t.relative_gap, torch_iter=res_t.n_iter, n_svd=res_t.n_svd,
                   svd_equiv=t_torch / t_svd, cvxpy_s=np.nan, cvxpy_obj=np.nan,
                   cvxpy_gap=np.nan, ratio=np.nan)
        if (p, q, n_clients) in both and not skip_cvxpy:
            t_cvx, res_c = _run(X, "cvxpy")
            row.update(cvxpy_s=t_cvx, cvxpy_obj=res_c.objective, cvxpy_gap=res_c.relative_gap,
                       ratio=t_cvx / t_torch)
        rows.append(row)
        print(_line(row), flush=True)
    return rows


HEADER = ("|   p |  q |   K | torch s | CVXPY s | CVXPY/torch | torch objective | "
          "CVXPY objective | torch rel. gap | CVXPY rel. gap | iters | SVDs | "
          "time in thin SVDs |")


def _line(r):
    def f(v, fmt):
        return "—" if np.isnan(v) else format(v, fmt)
    return (f"| {r['p']:3d} | {r['q']:2d} | {r['K']:3d} | {r['torch_s']:7.3f} | "
            f"{f(r['cvxpy_s'], '7.2f')} | {f(r['ratio'], '11.0f')} | {r['torch_obj']:15.6f} | "
            f"{f(r['cvxpy_obj'], '15.6f')} | {r['torch_gap']:14.1e} | "
            f"{f(r['cvxpy_gap'], '14.1e')} | {r['torch_iter']:5d} | {r['n_svd']:4d} | "
            f"{r['svd_equiv']:17.1f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small grid (about a minute)")
    parser.add_argument("--skip-cvxpy", action="store_true")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)
    import torch
    print(f"clairstat {clairstat.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    both, torch_only = (QUICK_BOTH, QUICK_TORCH) if args.quick else (BOTH, TORCH_ONLY)
    rows = benchmark(both, torch_only, args.skip_cvxpy)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(HEADER + "\n" + "|" + "---|" * (HEADER.count("|") - 1) + "\n")
            fh.writelines(_line(r) + "\n" for r in rows)
    return rows


if __name__ == "__main__":
    main()

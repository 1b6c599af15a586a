"""The factored noise scale's median singular value: the SVD against the Gram route.

The LoRA path's noise scale is the median singular value of the factored stack (for
the target module of ``lora_benchmark.py``: 1600 x 1600, 100 clients of rank 16).
``clairstat._reduced.median_singular_value`` takes it from the eigenvalues of the
stack's Gram matrix where their error bound allows, else from the SVD. This script
times, at one BLAS thread, on a 1600 x 1600 matrix with a rank-16 part whose squared
singular values are 1e3-1e4 times the bulk's median (as in that stack):

* the SVD's singular values alone (LAPACK ``gesdd`` without vectors),
* the Gram matrix, its eigenvalues by ``syevr`` on the upper half (a subset, found by
  bisection) and all of them,
* the package's function (Gram matrix, all eigenvalues, the bound's check),

each the minimum and median of ``--repeats`` runs, and prints the ratio of the SVD's
median to the package's, with the two medians' relative difference.

    python benchmarks/median_singular_value_benchmark.py [--size 1600] [--repeats 7]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import scipy.linalg

import clairstat
from clairstat._reduced import median_singular_value
from clairstat._threads import thread_limits


def _matrix(size, rank=16, seed=0):
    rng = np.random.default_rng(seed)
    left = np.linalg.qr(rng.standard_normal((size, rank)))[0]
    right = np.linalg.qr(rng.standard_normal((size, rank)))[0]
    spikes = np.linspace(100.0, 30.0, rank) * np.sqrt(size)
    return rng.standard_normal((size, size)) + (left * spikes) @ right.T


def _seconds(function, repeats):
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        runs.append(time.perf_counter() - start)
    return min(runs), float(np.median(runs))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1600)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    matrix = _matrix(args.size)
    singular = np.linalg.svd(matrix, compute_uv=False)
    half = args.size // 2
    print(f"clairstat {clairstat.__version__}, numpy {np.__version__}, "
          f"scipy {scipy.__version__}, {platform.machine()}; one BLAS thread")
    print(f"{args.size} x {args.size}, s_max^2 / s_med^2 = "
          f"{singular[0] ** 2 / np.median(singular) ** 2:.3g}")
    with thread_limits(1):
        gram = matrix.T @ matrix
        rows = [
            ("SVD, singular values only", lambda: scipy.linalg.svd(matrix, compute_uv=False)),
            ("Gram matrix A^T A", lambda: matrix.T @ matrix),
            ("syevr, upper half (subset)",
             lambda: scipy.linalg.eigvalsh(gram, subset_by_index=[half - 1, args.size - 1],
                                           driver="evr")),
            ("syevr, all eigenvalues", lambda: scipy.linalg.eigvalsh(gram, driver="evr")),
            ("median_singular_value", lambda: median_singular_value(matrix)),
        ]
        timings = {name: _seconds(function, args.repeats) for name, function in rows}
    print(f"| step | min s | median s |\n|---|---|---|")
    for name, (low, middle) in timings.items():
        print(f"| {name} | {low:.3f} | {middle:.3f} |")
    ratio = timings["SVD, singular values only"][1] / timings["median_singular_value"][1]
    difference = abs(median_singular_value(matrix) - np.median(singular)) / np.median(singular)
    print(f"SVD / median_singular_value (medians): {ratio:.2f}; "
          f"relative difference of the two medians: {difference:.1e}")


if __name__ == "__main__":
    main()

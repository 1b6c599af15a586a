"""Holm's adjustment: statsmodels' ``multipletests`` against the package's own.

statsmodels' Holm branch runs ``gc.collect()`` on every call, a full collection of the
caller's process, whose cost grows with the objects the process holds (torch's import
alone is about 250 000). The package computes Holm's adjusted p-values itself
(``clairstat._inference.adjust_p_values``, the same values). In one process with torch,
scikit-learn and statsmodels imported, this script times:

* one adjustment of 50 p-values each way (mean of ``--calls`` calls);
* ``CLAIREstimator(correction="holm").fit`` on 50 clients of 20 x 5 (rank 2, 5
  contaminated), as the package runs it and with the adjustment routed back to
  statsmodels (the code before the change), median of ``--repeats`` alternated fits;

and prints the ratios.

    python benchmarks/holm_benchmark.py [--calls 20] [--repeats 7]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import sklearn  # noqa: F401  (a user's process: the estimator's imports loaded)
import statsmodels.api  # noqa: F401
import torch  # noqa: F401
from statsmodels.stats.multitest import multipletests

import clairstat
from clairstat import CLAIREstimator, _inference
from clairstat.datasets import make_low_rank_block_sparse


def _mean_seconds(function, calls):
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    p_values = np.random.default_rng(0).uniform(size=50)
    ours = _mean_seconds(lambda: _inference.adjust_p_values(p_values, 0.05, "holm"),
                         args.calls)
    theirs = _mean_seconds(lambda: multipletests(p_values, 0.05, "holm"), args.calls)
    data = make_low_rank_block_sparse(50, 20, 5, 2, 5, noise_level=0.1, random_state=0)
    package = _inference.adjust_p_values

    def statsmodels_adjust(p, level, correction):
        return multipletests(p, alpha=level, method=correction)[1]

    def fit(adjust):
        _inference.adjust_p_values = adjust
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                start = time.perf_counter()
                est = CLAIREstimator(correction="holm", random_state=0).fit(
                    data.local_estimates)
                return time.perf_counter() - start, est.contaminated_
        finally:
            _inference.adjust_p_values = package

    fit(package), fit(statsmodels_adjust)  # warm-up
    runs = {"package": [], "statsmodels": []}
    flags = {"package": [], "statsmodels": []}
    for _ in range(args.repeats):
        for name, adjust in (("statsmodels", statsmodels_adjust), ("package", package)):
            seconds, flagged = fit(adjust)
            runs[name].append(seconds)
            flags[name].append(flagged)
    fits = {name: float(np.median(values)) for name, values in runs.items()}
    print(f"clairstat {clairstat.__version__}, numpy {np.__version__}")
    print("| step | statsmodels (s) | package (s) | ratio |\n|---|---|---|---|")
    print(f"| Holm adjustment of 50 p-values | {theirs:.4f} | {ours:.6f} | "
          f"{theirs / ours:.0f} |")
    print(f"| fit, correction='holm', 50 clients of 20 x 5 | {fits['statsmodels']:.3f} | "
          f"{fits['package']:.3f} | {fits['statsmodels'] / fits['package']:.1f} |")
    print("same flags both ways, every repeat:",
          bool(np.array_equal(flags["package"], flags["statsmodels"])))
    return fits


if __name__ == "__main__":
    main()

"""How far the calibration raises a given covariance's null: `null_scale_factor_`.

With ``noise_cov`` the per-client tests are calibrated so that the calibration clients'
median p-value is 1/2: the given covariance's null scale is raised by a factor (never
lowered). A factor near 1 says the covariance accounts for how far the clients lie from
the fit; a large one says the tests are relative to a spread the covariance does not
explain (clients that differ beyond the shared subspace, or a large share of
contaminated clients hiding themselves). `CLAIREstimator` warns above
``clairstat._estimator.LARGE_SCALE_FACTOR``; this script measures the factor where the
warning must stay silent and where it should speak:

- the six real datasets of ``real_data_calibration.py`` (development and held out), split
  at random into clients with nothing corrupted (the same splits as that script's null
  rows), fitted with OLS's covariance, the rank rule and BH at 5%;
- statsmodels' ``grunfeld``: each of its 11 firms a client (investment on firm value and
  capital, 20 years each), firms whose coefficients a classical poolability F test
  rejects (p ~ 1e-53): not a random split;
- a simulated set-up with a third of 12 clients grossly contaminated (4 of 12, p = 5,
  q = 2, coefficients moved by ~2 against an OLS noise of ~0.1, the rank given), where
  the contaminated clients mask themselves.

    OMP_NUM_THREADS=1 python benchmarks/null_scale_factor.py [--splits 60]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import clairstat  # noqa: E402
from clairstat import CLAIREstimator, local_ols  # noqa: E402
from clairstat._estimator import LARGE_SCALE_FACTOR  # noqa: E402


def _fit(ols, **params):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = CLAIREstimator(**params).fit(ols)
    warned = any("null scale was raised" in str(w.message) for w in caught)
    return est, warned


def real_splits(n_splits):
    import real_data_calibration as real

    rows = []
    for group in ("development", "heldout"):
        for name, features, outputs, frame, n_clients in real.DATASETS[group]():
            factors, warned, flagged = [], 0, 0
            for split in range(n_splits):
                # the seed of real_data_calibration.run_one's null rows
                rng = np.random.default_rng([split, len(name), 0, 0])
                designs, responses = real.split_clients(frame, features, outputs,
                                                        n_clients, rng)
                est, warn = _fit(local_ols(designs, responses), random_state=split)
                factors.append(est.null_scale_factor_)
                warned += warn
                flagged += bool(est.contaminated_.any())
            q = np.quantile(factors, [0.5, 0.9, 1.0])
            rows.append((f"{name} ({group}), {n_clients} clients", n_splits, *q,
                         warned, flagged))
    return rows


def grunfeld():
    import statsmodels.api as sm

    data = sm.datasets.grunfeld.load_pandas().data
    firms = list(data.firm.unique())
    ols = local_ols([sm.add_constant(data[data.firm == f][["value", "capital"]])
                     for f in firms], [data[data.firm == f]["invest"] for f in firms])
    est, warned = _fit(ols, random_state=0)
    f = est.null_scale_factor_
    return (f"grunfeld, {len(firms)} firms as clients", 1, f, f, f, int(warned),
            int(est.contaminated_.any()))


def masking(n_seeds=20):
    """4 of 12 clients grossly contaminated, rank 1 given (a review's set-up)."""
    factors, warned, missed = [], 0, 0
    for seed in range(n_seeds):
        rng = np.random.default_rng(seed)
        n_clients, p, q, n, n_bad = 12, 5, 2, 80, 4
        shared = rng.standard_normal((p, 1))
        designs = [np.c_[np.ones(n), rng.standard_normal((n, p - 1))]
                   for _ in range(n_clients)]
        theta = [shared @ rng.standard_normal((1, q)) + 0.5 for _ in range(n_clients)]
        for k in range(n_bad):
            theta[k] = theta[k] + 2 * rng.standard_normal((p, q))
        responses = [x @ t + rng.standard_normal((n, q)) for x, t in zip(designs, theta)]
        est, warn = _fit(local_ols(designs, responses), rank=1, random_state=0)
        factors.append(est.null_scale_factor_)
        warned += warn
        missed += not est.contaminated_[:n_bad].all()
    q = np.quantile(factors, [0.5, 0.9, 1.0])
    return (f"simulated: 4 of 12 clients contaminated, rank 1 given "
            f"({missed} of {n_seeds} seeds miss one or more)", n_seeds, *q, warned, "")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, default=60)
    args = parser.parse_args(argv)
    print(f"clairstat {clairstat.__version__}, warning above a factor of "
          f"{LARGE_SCALE_FACTOR:g}\n")
    print("| clients | fits | factor: median | 90% | max | fits warned | fits with a flag |")
    print("|---|---|---|---|---|---|---|")
    for row in [*real_splits(args.splits), grunfeld(), masking()]:
        label, fits, med, q90, top, warned, flagged = row
        print(f"| {label} | {fits} | {med:.2f} | {q90:.2f} | {top:.2f} | {warned} | "
              f"{flagged} |", flush=True)


if __name__ == "__main__":
    main()

"""How far the path without a covariance moves with the units of a covariate and an output.

Random splits of statsmodels' fair data into 15 clients, OLS of the two outputs on an
intercept and seven covariates (``clairstat.local_ols``); the estimates are refitted with
education counted in tenths of a year (its row of every estimate times 0.1) and the first
output in hundredths (its column times 100), nothing else changed. Per split: the largest
change of any client's p-value, and the number of clients whose flag changed (BH at 5%),
with the frame of robust scales (the package's default) and without it (the plain
statistic, ``clairstat._estimator.ESTIMATED_FRAME = "none"``). With ``noise_cov`` the
tests do not depend on the units at all (tests/test_hostile_estimator.py).

    python benchmarks/frame_units.py --splits 20
"""

from __future__ import annotations

import argparse
import os
import warnings

import numpy as np

COVARIATES = ["age", "yrs_married", "children", "religious", "educ", "occupation",
              "occupation_husb"]
OUTPUTS = ["affairs", "rate_marriage"]


def measure(n_splits, frame):
    import statsmodels.api as sm

    import clairstat._estimator as estimator_module
    from clairstat import CLAIREstimator, local_ols

    fair = sm.datasets.fair.load_pandas().data
    previous = estimator_module.ESTIMATED_FRAME
    estimator_module.ESTIMATED_FRAME = frame
    moves, changed = [], 0
    try:
        for split in range(n_splits):
            sites = np.array_split(np.random.default_rng(split).permutation(len(fair)), 15)
            ols = local_ols([sm.add_constant(fair.iloc[s][COVARIATES]).to_numpy(float)
                             for s in sites],
                            [fair.iloc[s][OUTPUTS].to_numpy(float) for s in sites])
            units = ols.estimates.copy()
            units[:, 1 + COVARIATES.index("educ")] *= 0.1
            units[:, :, 0] *= 100.0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                first = CLAIREstimator(random_state=0).fit(ols.estimates)
                second = CLAIREstimator(random_state=0).fit(units)
            moves.append(float(np.max(np.abs(first.p_values_ - second.p_values_))))
            changed += int(np.sum(first.contaminated_ != second.contaminated_))
    finally:
        estimator_module.ESTIMATED_FRAME = previous
    return np.array(moves), changed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--splits", type=int, default=20)
    args = parser.parse_args(argv)
    print("| path without a covariance | splits | largest p-value change: median | max "
          "| flags changed (all splits) |")
    print("|---|---|---|---|---|")
    for frame, label in (("residual", "frame of robust scales (default)"),
                         ("none", "plain statistic")):
        moves, changed = measure(args.splits, frame)
        print(f"| {label} | {args.splits} | {np.median(moves):.3f} | {moves.max():.3f} "
              f"| {changed} |")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

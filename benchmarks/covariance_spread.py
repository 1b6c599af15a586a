"""Do the per-client OLS covariances describe how far uncorrupted clients spread?

For each real dataset of ``real_data_calibration.py`` (every group: development and
held out), random splits into its clients with nothing corrupted; for every client and
coefficient the squared deviation from the other clients' mean, divided by the variance
that the clients' own covariances give it (``V_k + sum_j V_j / (K - 1)^2``, the
diagonal of ``col_cov (x) row_cov`` from ``clairstat.local_ols``). Its mean is 1 where
the covariance is right, above 1 where it understates the spread. Printed per dataset:
the median and the largest over coefficients of that mean, for the classical covariance
and for ``cov_type="HC3"``.

    python benchmarks/covariance_spread.py --splits 60

A diagnostic (no test, no flag): it reads the covariance, not the estimator.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np

import real_data_calibration as calibration


def mean_squared_z(frame, features, outputs, n_clients, splits, cov_type):
    from clairstat import local_ols

    ratios = []
    for split in range(splits):
        rng = np.random.default_rng([split, 99])
        designs, responses = calibration.split_clients(frame, features, outputs,
                                                       n_clients, rng)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # few residual df: said elsewhere
            ols = local_ols(designs, responses, cov_type=cov_type)
        row, col = ols.noise_cov
        # diag(col (x) row)[j, l] = col[l, l] row[j, j]: the (p, q) coefficients' variances
        var = np.einsum("kjj,kll->kjl", row, col)
        for k in range(n_clients):
            others = np.delete(np.arange(n_clients), k)
            dev = ols.estimates[k] - ols.estimates[others].mean(axis=0)
            ratios.append(dev ** 2 / (var[k] + var[others].sum(axis=0)
                                      / (n_clients - 1) ** 2))
    return np.mean(ratios, axis=0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--splits", type=int, default=60)
    args = parser.parse_args(argv)
    print("| datasets | dataset | clients | splits | mean z^2, classical: median / largest "
          "| mean z^2, HC3: median / largest |")
    print("|---|---|---|---|---|---|")
    for group, loader in calibration.DATASETS.items():
        for name, features, outputs, frame, n_clients in loader():
            cells = []
            for cov_type in ("nonrobust", "HC3"):
                z2 = mean_squared_z(frame, features, outputs, n_clients, args.splits,
                                    cov_type)
                cells.append(f"{np.median(z2):.2f} / {z2.max():.2f}")
            print(f"| {group} | {name} | {n_clients} | {args.splits} | {cells[0]} | "
                  f"{cells[1]} |", flush=True)


if __name__ == "__main__":
    main()

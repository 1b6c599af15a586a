"""Which clients the per-client tests flag on uncorrupted real data, and how noisy they are.

For the null splits of ``benchmarks/real_data_calibration.py`` (the same datasets,
splits and seeds; nothing corrupted) in which a fit flags a client, prints the flagged
clients and the size of each one's OLS noise, ``tr cov(vec Theta_hat_k) =
tr(Sigma_k) tr((X_k^T X_k)^-1)`` (the expected squared Frobenius norm of its error),
as a multiple of the clients' median and as a rank among the clients (1: the noisiest),
then how often the noisiest client is among the flagged. A test that takes every
client's noise to be the same up to its weight (the default, without ``noise_cov``)
mistakes a client whose own sample is noisier for a contaminated one.

    python benchmarks/real_data_flagged_clients.py --dataset star98 --splits 0 100
    python benchmarks/real_data_flagged_clients.py --dataset fair --splits 0 250
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_data_calibration as calibration  # noqa: E402


def flagged_clients(name, start, stop, path):
    from clairstat import CLAIREstimator, local_ols

    sets = {d[0]: d for d in calibration._datasets() + calibration._heldout_datasets()}
    if name not in sets:
        raise SystemExit(f"unknown dataset {name!r}: one of {sorted(sets)}")
    _, features, outputs, frame, n_clients = sets[name]
    rows = []
    for split in range(start, stop):
        # The seed of run_one's null runs (no victims, corruption "none").
        rng = np.random.default_rng([split, len(name), 0, 0])
        designs, responses = calibration.split_clients(frame, features, outputs, n_clients,
                                                       rng)
        ols = local_ols(designs, responses)
        extra = {"noise_cov": ols.noise_cov} if path == "noise_cov" else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            est = CLAIREstimator(random_state=split).fit(ols.estimates,
                                                         sample_weight=ols.n_samples, **extra)
        if not est.contaminated_.any():
            continue
        row_cov, col_cov = ols.noise_cov
        size = (np.trace(col_cov, axis1=1, axis2=2) * np.trace(row_cov, axis1=1, axis2=2))
        order = np.argsort(-size)
        rank = np.empty(n_clients, dtype=int)
        rank[order] = np.arange(1, n_clients + 1)
        flagged = np.flatnonzero(est.contaminated_)
        rows.append((split, flagged, size[flagged] / np.median(size), rank[flagged],
                     size.max() / np.median(size)))
    return rows, stop - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--splits", type=int, nargs=2, default=(0, 100),
                        metavar=("START", "STOP"))
    parser.add_argument("--path", choices=["default", "noise_cov"], default="default")
    args = parser.parse_args(argv)
    rows, n_splits = flagged_clients(args.dataset, *args.splits, args.path)
    print(f"{args.dataset}, path {args.path}, null splits {args.splits[0]}-"
          f"{args.splits[1] - 1}: {len(rows)} of {n_splits} flag a client")
    print("| split | flagged clients | their noise / median | their noise rank (1 = "
          "noisiest) | noisiest client's noise / median |")
    print("|---|---|---|---|---|")
    for split, flagged, ratio, rank, top in rows:
        print(f"| {split} | {flagged.tolist()} | {np.round(ratio, 2).tolist()} | "
              f"{rank.tolist()} | {top:.1f} |")
    if rows:
        best = np.array([r[3].min() for r in rows])
        print(f"\nsplits in which the noisiest client is flagged: {np.sum(best == 1)} of "
              f"{len(rows)}; one of the three noisiest: {np.sum(best <= 3)} of {len(rows)}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

"""What ``rank_support=3`` costs where the true rank is above 0: synthetic regressions.

The real-data runs of ``rank_support`` (benchmarks/RESULTS.md) split one population into
clients: their true rank is 0, where dropping directions can only help. Here the clients
share a rank-2 subspace (``clairstat.datasets.make_federated_regression``: p = 10
features, q = 3 outputs, 60 samples per client, OLS with ``noise_cov`` from
``clairstat.local_ols``), K = 6, 10 or 20 clients, two of them contaminated (separation
3, about four times a benign client's off-subspace noise), either independently (the
generator's) or alike (both moved by one common off-subspace shift of that size). The
shared signal is strong (coefficient scale 1) or weak (0.4: the shared directions'
singular values about 1.3 times the rank rule's noise edge with six clients, and about
1.2 times with two of the six left out). For each seed both rules are fitted to the
same data: rank chosen, corrupted clients flagged, benign clients flagged, the
subspace's error ``||P - P*||_F / sqrt(2)`` and the benign clients' refined error
relative to their OLS error.

    python benchmarks/rank_support_synthetic.py --seeds 100 \\
        --out benchmarks/results/rank_support_synthetic.csv

Rows are appended as they are produced (resumable), with the package version.
"""

from __future__ import annotations

import argparse
import itertools
import os
import warnings
from pathlib import Path

import numpy as np

from _tables import appending, existing_rows

FIELDS = ["n_clients", "contamination", "signal", "seed", "rank_support", "rank",
          "victims_flagged", "false_flags", "subspace_error", "refined_over_ols",
          "converged", "version"]
SIGNALS = {"strong": 1.0, "weak": 0.4}


def _data(n_clients, contamination, signal, seed):
    from clairstat.datasets import make_federated_regression

    data = make_federated_regression(n_clients, 10, 3, 2, 60, 2, separation=3.0,
                                     coefficient_scale=SIGNALS[signal], random_state=seed)
    if contamination == "alike":
        # the two contaminated clients' truths: one common shift off the subspace
        rng = np.random.default_rng([seed, 1])
        shift = rng.standard_normal((10, 3))
        shift -= data.subspace @ (data.subspace.T @ shift)
        shift *= data.separation / np.linalg.norm(shift)
        bad = np.flatnonzero(data.contaminated)
        for k in bad:
            truth = data.backbone + data.subspace @ data.coefficients[k] + shift
            noise = data.responses[k] - data.designs[k] @ data.truth[k]
            data.responses[k] = data.designs[k] @ truth + noise
            data.truth[k] = truth
    return data


def run_one(n_clients, contamination, signal, seed):
    import clairstat
    from clairstat import CLAIREstimator, local_ols

    data = _data(n_clients, contamination, signal, seed)
    ols = local_ols(data.designs, data.responses)
    truth_proj = data.subspace @ data.subspace.T
    benign = ~data.contaminated
    ols_error = np.linalg.norm(ols.estimates[benign] - data.truth[benign])
    rows = []
    for support in (1, 3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            est = CLAIREstimator(random_state=seed, rank_support=support).fit(ols)
        basis = est.subspace_
        flagged = est.contaminated_
        rows.append(dict(
            n_clients=n_clients, contamination=contamination, signal=signal, seed=seed,
            rank_support=support, rank=est.rank_,
            victims_flagged=int((flagged & data.contaminated).sum()),
            false_flags=int((flagged & benign).sum()),
            subspace_error=round(float(np.linalg.norm(basis @ basis.T - truth_proj)
                                       / np.sqrt(2)), 6),
            refined_over_ols=round(float(np.linalg.norm(est.refined_[benign]
                                                        - data.truth[benign])
                                         / ols_error), 6),
            converged=int(est.detection_converged_), version=clairstat.__version__))
    return rows


def run(n_seeds, out):
    done = {(int(r["n_clients"]), r["contamination"], r["signal"], int(r["seed"]))
            for r in existing_rows(out, FIELDS)}
    with appending(out, FIELDS) as (writer, handle):
        for seed, n_clients, contamination, signal in itertools.product(
                range(n_seeds), (6, 10, 20), ("independent", "alike"), SIGNALS):
            if (n_clients, contamination, signal, seed) in done:
                continue
            writer.writerows(run_one(n_clients, contamination, signal, seed))
            handle.flush()


def summarize(out):
    import pandas as pd

    table = pd.read_csv(out)
    lines = ["| K | contamination | signal | rank_support | seeds | mean rank | share of "
             "fits of rank 2 | power | benign flagged (mean) | subspace error (median) | "
             "refined / OLS error (median) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (k, kind, signal, support), group in table.groupby(
            ["n_clients", "contamination", "signal", "rank_support"], sort=False):
        lines.append(
            f"| {k} | {kind} | {signal} | {support} | {len(group)} | {group['rank'].mean():.2f} "
            f"| {(group['rank'] == 2).mean():.2f} | {group.victims_flagged.mean() / 2:.2f} | "
            f"{group.false_flags.mean():.2f} | {group.subspace_error.median():.3f} | "
            f"{group.refined_over_ols.median():.3f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/rank_support_synthetic.csv"))
    args = parser.parse_args(argv)
    run(args.seeds, args.out)
    print(summarize(args.out))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

"""The level of a new client's test under the package's own model, by number of clients.

``score_samples`` and ``predict`` test a client the fit never saw on its own, at
``test_level``. Here the clients follow the package's model exactly:
``make_low_rank_block_sparse(K + 1, p=5, q=2, rank=1, n_contaminated=0,
noise_level=0.3)`` (i.i.d. Gaussian noise, every client alike); the estimator is fitted
on the first K and the last client, benign and exchangeable with them, is tested. Its
p-value should be uniform: the share below 0.05 about 0.05.

Three noise models, each fitted on the same clients:

- ``estimated``: nothing given (the path without a covariance: its frame of robust
  scales and its estimated null scale);
- ``noise_scale``: the true per-entry standard deviation 0.3 given;
- ``noise_cov``: the true covariance ``(0.09 I_p, I_q)`` given, the new client's own
  passed to ``score_samples``.

K in {4, 6, 8, 12, 20}, ``--reps`` replicates each (seeded by (replicate, K)); one row
per replicate and noise model, with the new client's p-value, the fitted rank and the
package version, appended as produced (resumable). The summary: the share of new
clients with p < 0.05 and p < 0.01, Wilson 95% intervals.

    OMP_NUM_THREADS=1 python benchmarks/new_client_level.py --reps 500 \
        --out benchmarks/results/new_client_level.csv
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import numpy as np

from _tables import appending, existing_rows

CLIENTS = (4, 6, 8, 12, 20)
P, Q, RANK, SIGMA = 5, 2, 1, 0.3
MODELS = ("estimated", "noise_scale", "noise_cov")
FIELDS = ["n_clients", "replicate", "model", "p", "q", "rank", "p_value", "version"]


def run_one(n_clients, replicate):
    """One replicate: a row per noise model."""
    from clairstat import CLAIREstimator
    from clairstat.datasets import make_low_rank_block_sparse

    data = make_low_rank_block_sparse(n_clients + 1, P, Q, RANK, 0, noise_level=SIGMA,
                                      random_state=np.random.default_rng(
                                          [replicate, n_clients, 21]).integers(2**31))
    train, new = data.local_estimates[:n_clients], data.local_estimates[n_clients:]
    cov = (np.broadcast_to(SIGMA**2 * np.eye(P), (n_clients + 1, P, P)),
           np.broadcast_to(np.eye(Q), (n_clients + 1, Q, Q)))
    rows = []
    for model in MODELS:
        est = CLAIREstimator(random_state=replicate,
                             noise_scale=SIGMA if model == "noise_scale" else None)
        with warnings.catch_warnings():  # few clients: the warning is what is measured
            warnings.simplefilter("ignore", UserWarning)
            if model == "noise_cov":
                est.fit(train, noise_cov=tuple(c[:n_clients] for c in cov))
                log_p = est.score_samples(new, tuple(c[n_clients:] for c in cov))[0]
            else:
                est.fit(train)
                log_p = est.score_samples(new)[0]
        rows.append(dict(n_clients=n_clients, replicate=replicate, model=model, p=P, q=Q,
                         rank=est.rank_, p_value=float(np.exp(log_p))))
    return rows


def run(reps, out):
    import clairstat

    done = {(int(r["n_clients"]), int(r["replicate"])) for r in existing_rows(out, FIELDS)}
    with appending(out, FIELDS) as (writer, handle):
        for replicate in range(reps):
            for n_clients in CLIENTS:
                if (n_clients, replicate) in done:
                    continue
                for row in run_one(n_clients, replicate):
                    writer.writerow({**row, "version": clairstat.__version__})
                handle.flush()


def summarize(out):
    import pandas as pd
    from statsmodels.stats.proportion import proportion_confint

    table = pd.read_csv(out)
    lines = ["| K | noise model | replicates | new clients with p < 0.05 [95% CI] | "
             "p < 0.01 [95% CI] | mean fitted rank |", "|---|---|---|---|---|---|"]
    for (n_clients, model), group in table.groupby(["n_clients", "model"]):
        cells = []
        for level in (0.05, 0.01):
            hits = int((group.p_value < level).sum())
            lo, hi = proportion_confint(hits, len(group), method="wilson")
            cells.append(f"{hits / len(group):.3f} [{lo:.3f}, {hi:.3f}]")
        lines.append(f"| {n_clients} | {model} | {len(group)} | {cells[0]} | {cells[1]} | "
                     f"{group['rank'].mean():.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=500, help="replicates per K")
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/new_client_level.csv"))
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.summary_only:
        run(args.reps, args.out)
    print(summarize(args.out))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

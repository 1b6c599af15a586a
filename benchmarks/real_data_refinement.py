"""Does the refinement help on real data? Each client's held-out rows predicted.

The package's second promise is that it refines every benign client's estimate: the
collaborative mean plus the client's own deviation projected onto the shared subspace.
On simulated clients the gain is measured against the truth (``simulations/studies/
refinement.py``); real data have no truth, but they have rows a client did not fit on.
This script holds out a quarter of every client's rows (at least two), fits each client's
OLS on the rest (``clairstat.local_ols``), and predicts the held-out responses with:

* ``local``: the client's own OLS estimate;
* ``mean``: the clients' sample-weighted mean estimate (federated averaging, no test);
* ``clair``: ``CLAIREstimator().fit(estimates, sample_weight=n).refined_`` (no
  covariance: the package's default path);
* ``clair_cov``: ``CLAIREstimator().fit(local_ols(...))`` (the classical covariance);
* ``clair_recommended``: ``CLAIREstimator(rank_support=3).fit(local_ols(...,
  cov_type="HC3"))``, the configuration the README recommends for regressions.

Clients come in two kinds. *Natural* clients are groups the data already have, which
really differ: statsmodels' grunfeld by firm (11 firms, 20 years each; investment on the
firm's value and capital stock) and its dietox test data by pig (72 pigs, about 11
weighings each; weight and feed intake on time). *Exchangeable* clients are random equal
splits of one dataset (the development datasets of ``real_data_calibration.py``: fair,
randhie, anes96, diabetes), where every client has the same truth and pooling is at its
most useful. Each replicate draws new held-out rows (and, for random splits, a new
split), seeded by the replicate's number.

Per (dataset, replicate, method): the relative test error, the sum over clients and
outputs of the squared prediction errors (each output in units of its standard deviation
over the whole dataset) over that sum for ``local``; the share of clients whose error is
below their ``local`` error; for the CLAIR methods the number of clients flagged (they
keep their own estimate) and the rank. Rows are appended as they are produced
(resumable), with the package version and the code's provenance beside every row.

    OMP_NUM_THREADS=1 python benchmarks/real_data_refinement.py --replicates 0 30
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from _tables import appending, existing_rows

METHODS = ("local", "mean", "clair", "clair_cov", "clair_recommended")
FIELDS = ["dataset", "clients", "replicate", "method", "n_clients", "relative_error",
          "share_improved", "n_flagged", "rank", "version", "code_commit"]
HELD_OUT = 0.25


def _grunfeld():
    import statsmodels.api as sm

    data = sm.datasets.grunfeld.load_pandas().data
    groups = [part for _, part in data.groupby("firm", sort=True)]
    return [(np.c_[np.ones(len(g)), g[["value", "capital"]].to_numpy(float)],
             g[["invest"]].to_numpy(float)) for g in groups], data[["invest"]]


def _dietox():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from real_data_calibration import _sixth_heldout_datasets

    data = next(entry[3] for entry in _sixth_heldout_datasets() if entry[0] == "dietox")
    data = data.dropna(subset=["Weight", "Feed", "Time"])
    groups = [part for _, part in data.groupby("Pig", sort=True)]
    return [(np.c_[np.ones(len(g)), g[["Time"]].to_numpy(float)],
             g[["Weight", "Feed"]].to_numpy(float)) for g in groups], data[["Weight", "Feed"]]


NATURAL = {"grunfeld_firms": _grunfeld, "dietox_pigs": _dietox}
EXCHANGEABLE = ("fair", "randhie", "anes96", "diabetes")
DATASETS = (*NATURAL, *EXCHANGEABLE)


def clients_of(name, replicate):
    """``(clients, outputs frame, kind)``: each client's full design and responses."""
    if name in NATURAL:
        clients, outputs = NATURAL[name]()
        return clients, outputs, "natural"
    from real_data_calibration import _datasets, split_clients

    entry = next(e for e in _datasets() if e[0] == name)
    _, features, outputs, frame, n_clients = entry
    rng = np.random.default_rng([replicate, 7])
    designs, responses = split_clients(frame, features, outputs, n_clients, rng)
    return list(zip(designs, responses)), frame[outputs], "exchangeable"


def held_out_rows(n_rows, rng):
    """A random quarter of a client's rows (at least two), the rest for its fit."""
    n_test = max(2, int(round(HELD_OUT * n_rows)))
    order = rng.permutation(n_rows)
    return order[n_test:], order[:n_test]


def run_one(name, replicate):
    """The rows of one replicate of one dataset, one per method."""
    from clairstat import CLAIREstimator, local_ols

    clients, outputs, kind = clients_of(name, replicate)
    rng = np.random.default_rng([replicate, 11])
    parts = [held_out_rows(len(x), rng) for x, _ in clients]
    designs = [x[train] for (x, _), (train, _) in zip(clients, parts)]
    responses = [y[train] for (_, y), (train, _) in zip(clients, parts)]
    scale = outputs.to_numpy(float).std(axis=0)
    ols = local_ols(designs, responses)
    estimates, weights = ols.estimates, ols.n_samples.astype(float)
    fits = {}
    with warnings.catch_warnings():  # few clients, non-convergence: the rows say enough
        warnings.simplefilter("ignore", UserWarning)
        fits["clair"] = CLAIREstimator(random_state=replicate).fit(
            estimates, sample_weight=weights)
        fits["clair_cov"] = CLAIREstimator(random_state=replicate).fit(ols)
        fits["clair_recommended"] = CLAIREstimator(rank_support=3, random_state=replicate).fit(
            local_ols(designs, responses, cov_type="HC3"))
    predictors = {"local": estimates,
                  "mean": np.broadcast_to(np.tensordot(weights / weights.sum(), estimates,
                                                       axes=1), estimates.shape)}
    predictors.update({method: fit.refined_ for method, fit in fits.items()})
    errors = {}
    for method, coefs in predictors.items():
        errors[method] = np.array([
            np.sum(((y[test] - x[test] @ coef) / scale) ** 2)
            for (x, y), (_, test), coef in zip(clients, parts, coefs)])
    rows = []
    for method in METHODS:
        fit = fits.get(method)
        rows.append(dict(dataset=name, clients=kind, replicate=replicate, method=method,
                         n_clients=len(clients),
                         relative_error=float(errors[method].sum() / errors["local"].sum()),
                         share_improved=float(np.mean(errors[method] < errors["local"])),
                         n_flagged="" if fit is None else int(fit.contaminated_.sum()),
                         rank="" if fit is None else int(fit.rank_)))
    return rows


def run(replicates, datasets, out):
    import clairstat

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from simulations._framework import code_provenance

    commit = code_provenance()
    done = {(r["dataset"], int(r["replicate"])) for r in existing_rows(out, FIELDS)}
    with appending(out, FIELDS) as (writer, handle):
        for replicate in range(*replicates):
            for name in datasets:
                if (name, replicate) in done:
                    continue
                for row in run_one(name, replicate):
                    writer.writerow({**row, "version": clairstat.__version__,
                                     "code_commit": commit})
                handle.flush()


def summarize(out):
    import pandas as pd
    from scipy import stats

    table = pd.read_csv(out)
    lines = ["| dataset | clients | K | method | replicates | relative test error (mean "
             "[95% CI]) | share of clients improved | flagged (mean) | rank (mean) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in [d for d in DATASETS if d in set(table.dataset)]:
        for method in METHODS:
            cell = table[(table.dataset == name) & (table.method == method)]
            if cell.empty:
                continue
            values = cell.relative_error.to_numpy(float)
            mean = values.mean()
            half = (stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1)
                    / np.sqrt(len(values))) if len(values) > 1 else float("nan")
            flagged = pd.to_numeric(cell.n_flagged, errors="coerce")
            rank = pd.to_numeric(cell["rank"], errors="coerce")
            lines.append(
                f"| {name} | {cell.clients.iloc[0]} | {cell.n_clients.iloc[0]} | {method} | "
                f"{len(values)} | {mean:.3f} [{mean - half:.3f}, {mean + half:.3f}] | "
                f"{cell.share_improved.mean():.2f} | "
                + ("-" if flagged.isna().all() else f"{flagged.mean():.2f}") + " | "
                + ("-" if rank.isna().all() else f"{rank.mean():.2f}") + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicates", type=int, nargs=2, default=[0, 30],
                        metavar=("FIRST", "STOP"), help="replicates FIRST..STOP-1")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=DATASETS)
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/real_data_refinement.csv"))
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.summary_only:
        run(args.replicates, args.datasets, args.out)
    print(summarize(args.out))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

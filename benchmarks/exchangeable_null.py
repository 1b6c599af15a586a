"""Is the path without a covariance miscalibrated, or are the real clients not alike?

Without ``noise_cov`` the per-client tests take every client's noise to have one
distribution (up to its weight): a client whose estimate is noisier than the others'
deviates more, and is flagged, whether or not anything was corrupted. On the real
datasets of ``benchmarks/real_data_calibration.py`` that path flags an uncorrupted split
more than 10% of the time on half of them. This script tells the two causes apart on the
same datasets and splits, nothing corrupted:

* ``real``: the clients' OLS estimates as they are (the calibration table's null rows;
  a check that the splits are the same);
* ``own``: the weighted mean of those estimates plus Gaussian noise with each client's
  own OLS covariance (``col_cov_k (x) row_cov_k`` from :func:`clairstat.local_ols`):
  the real clients' unequal precisions kept, their non-Gaussian noise and misfit gone;
* ``common``: the same mean plus Gaussian noise with one covariance for every client
  (the clients' average ``row_cov`` and average ``col_cov``): the real data's
  correlations and scales across coefficients and outputs, clients alike.

Each variant is fitted without a covariance (``path = default``, ``sample_weight`` the
clients' sample sizes, as in the calibration table) and, for ``own`` and ``common``, with
the covariance the noise was drawn with (``path = noise_cov``: a check of the generator,
since that path is then given the truth). If ``common`` is calibrated where ``real`` is
not, the path without a covariance answers its own null and the real clients violate it;
if ``common`` is miscalibrated too, the fault is the path's.

Rows are appended as they are produced (resumable: finished (dataset, split, variant)
rows are skipped), the package version beside every row; the summary gives each null
share with its Wilson 95% interval.

    OMP_NUM_THREADS=1 python benchmarks/exchangeable_null.py --splits 100 \\
        --out benchmarks/results/exchangeable_null.csv
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import numpy as np

from _tables import appending, existing_rows

VARIANTS = ("real", "own", "common")
GROUP_NAMES = ("development", "heldout_all", "heldout6")  # the 18 real datasets
FIELDS = ["dataset", "split", "variant", "path", "n_clients", "p", "q", "any_flag",
          "n_flagged", "rank", "seconds", "version"]


def _datasets():
    from real_data_calibration import GROUPS

    return [entry for group in GROUP_NAMES for entry in GROUPS[group]()]


def client_estimates(name, frame, features, outputs, n_clients, split):
    """The split's OLS fit (``local_ols``), the calibration table's null split exactly:
    same generator seed (``real_data_calibration._run_one`` with ``kind="none"``)."""
    from real_data_calibration import split_clients

    from clairstat import local_ols

    rng = np.random.default_rng([split, len(name), 0, 0])
    designs, responses = split_clients(frame, features, outputs, n_clients, rng)
    return local_ols(designs, responses)


def _draw(mean, row_covs, col_covs, rng):
    """``mean + L_row Z L_col^T`` per client: cov(vec E_k) = col_cov_k (x) row_cov_k."""
    out = np.empty((len(row_covs), *mean.shape))
    for k, (row_cov, col_cov) in enumerate(zip(row_covs, col_covs)):
        z = rng.standard_normal(mean.shape)
        out[k] = mean + np.linalg.cholesky(row_cov) @ z @ np.linalg.cholesky(col_cov).T
    return out


def variant_estimates(ols, variant, rng):
    """(estimates, noise_cov or None) of one variant."""
    if variant == "real":
        return ols.estimates, None
    row_covs, col_covs = ols.noise_cov
    weights = np.asarray(ols.n_samples, dtype=float)
    mean = np.tensordot(weights / weights.sum(), ols.estimates, axes=1)
    if variant == "common":
        row_covs = np.broadcast_to(row_covs.mean(axis=0), row_covs.shape)
        col_covs = np.broadcast_to(col_covs.mean(axis=0), col_covs.shape)
    return _draw(mean, row_covs, col_covs, rng), (np.array(row_covs), np.array(col_covs))


def run_one(entry, split):
    from clairstat import CLAIREstimator

    name, features, outputs, frame, n_clients = entry
    ols = client_estimates(name, frame, features, outputs, n_clients, split)
    rows = []
    for index, variant in enumerate(VARIANTS):
        rng = np.random.default_rng([split, len(name), 7, index])
        estimates, noise_cov = variant_estimates(ols, variant, rng)
        paths = [("default", {})]
        if noise_cov is not None:
            paths.append(("noise_cov", {"noise_cov": noise_cov}))
        for path, extra in paths:
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                est = CLAIREstimator(random_state=split).fit(
                    estimates, sample_weight=ols.n_samples, **extra)
            rows.append(dict(dataset=name, split=split, variant=variant, path=path,
                             n_clients=n_clients, p=estimates.shape[1],
                             q=estimates.shape[2],
                             any_flag=int(est.contaminated_.any()),
                             n_flagged=int(est.contaminated_.sum()), rank=est.rank_,
                             seconds=round(time.perf_counter() - start, 3)))
    return rows


def run(n_splits, out, datasets=None, *, one=None, fields=FIELDS):
    """Append the rows of ``one(entry, split)`` (default :func:`run_one`) for every
    dataset and split not yet in ``out``; ``fields`` are the table's columns (another
    script's run with this resumable loop passes its own)."""
    import clairstat

    one = run_one if one is None else one
    done = {(r["dataset"], int(r["split"])) for r in existing_rows(out, fields)}
    entries = [e for e in _datasets() if datasets is None or e[0] in datasets]
    with appending(out, fields) as (writer, handle):
        for split in range(n_splits):
            for entry in entries:
                if (entry[0], split) in done:
                    continue
                for row in one(entry, split):
                    writer.writerow({**row, "version": clairstat.__version__})
                handle.flush()


def summarize(out):
    import pandas as pd
    from statsmodels.stats.proportion import proportion_confint

    table = pd.read_csv(out)

    def share(group, digits=2):
        lo, hi = proportion_confint(group.any_flag.sum(), len(group), method="wilson")
        return f"{group.any_flag.mean():.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"

    columns = [("real", "default"), ("own", "default"), ("common", "default"),
               ("own", "noise_cov"), ("common", "noise_cov")]
    lines = ["| dataset | K | splits | " + " | ".join(f"{v}, {p}" for v, p in columns)
             + " |", "|---|---|---|" + "---|" * len(columns)]
    met = dict.fromkeys(columns, 0)
    for name, group in table.groupby("dataset", sort=False):
        cells = []
        for variant, path in columns:
            part = group[(group.variant == variant) & (group.path == path)]
            cells.append(share(part))
            met[(variant, path)] += int(part.any_flag.mean() <= 0.10)
        lines.append(f"| {name} | {group.n_clients.iloc[0]} | "
                     f"{group.split.nunique()} | " + " | ".join(cells) + " |")
    lines.append("| datasets with a share <= 0.10 | | | "
                 + " | ".join(str(met[c]) for c in columns) + " |")
    fewest = table.n_clients.min()
    pools = [("all datasets", table), ("without star98", table[table.dataset != "star98"]),
             (f"the {fewest}-client datasets", table[table.n_clients == fewest]),
             (f"more than {fewest} clients", table[table.n_clients > fewest])]
    for label, part in pools:
        if part.empty:  # a run on a subset of the datasets
            continue
        cells = [share(part[(part.variant == v) & (part.path == p)], 3) for v, p in columns]
        lines.append(f"| pooled: {label} | | {part.dataset.nunique()} datasets | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def command_line(doc, splits, out, run_splits, summary, argv=None):
    """The command line of this script and of those that reuse its splits: ``--splits``
    (default ``splits``), ``--out`` (default ``out``), ``--datasets`` and
    ``--summary-only``; runs ``run_splits(n_splits, out, datasets)``, prints
    ``summary(out)``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--splits", type=int, default=splits,
                        help="random splits per dataset")
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--datasets", nargs="*", help="only these datasets (a smoke run)")
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.summary_only:
        run_splits(args.splits, args.out, args.datasets)
    print(summary(args.out))


def main(argv=None):
    command_line(__doc__, 100, "benchmarks/results/exchangeable_null.csv", run,
                 summarize, argv)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

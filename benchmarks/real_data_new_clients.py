"""New clients on real data: the level and power of ``predict`` out of sample.

Every real dataset of ``real_data_calibration.py`` (the development four and the
fourteen held-out ones, eighteen in all) is split at random into its number of clients
plus one; the estimator is fitted on the first ``K`` (nothing corrupted) and the last
part, a client the fit never saw, is tested with ``predict`` and ``score_samples``
(the out-of-sample test of a new client against the fitted collaborative mean and
subspace at ``test_level`` = 0.05, docs/method_notes.md). Uncorrupted, the new client
is benign: it should be flagged with probability about 0.05. Corrupted as in
``real_data_calibration.py`` (its estimate scaled by 3, sign-flipped, or with its
outputs in reverse order; the training clients untouched), it should be flagged.

Three configurations, each its own fit of the same training clients:

- ``default``: no covariance (the new client's noise taken as the members');
- ``noise_cov``: ``local_ols``'s classical covariance, the new client's own passed to
  ``predict``;
- ``hc3_support3``: ``local_ols(cov_type="HC3")`` and ``rank_support=3``, the
  configuration the statistician's guide recommends, the new client's own HC3
  covariance passed to ``predict``.

Rows are appended to a CSV as they are produced (resumable: finished (dataset, split,
configuration) rows are skipped; a table whose rows hold another ``cov_type`` or
``rank_support`` for a configuration is refused), with the package version, each
configuration's settings, the new client's p-value,
the fit's rank and the number of training clients it flagged beside every row; the
summary gives each share with its Wilson 95% interval and the verdict against the
criteria fixed in benchmarks/RESULTS.md before the first run.

    OMP_NUM_THREADS=1 python benchmarks/real_data_new_clients.py --splits 100 \
        --out benchmarks/results/real_data_new_clients.csv [--datasets NAME ...]
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import numpy as np

from _tables import appending, existing_rows
from real_data_calibration import DATASETS, MAX_NULL_SHARE, MIN_POWER, corrupt, split_clients

LEVEL = 0.05
KINDS = ("none", "scale", "flip", "replace")
CONFIGURATIONS = {  # name: (local_ols's cov_type, noise_cov given, rank_support)
    "default": ("nonrobust", False, 1),
    "noise_cov": ("nonrobust", True, 1),
    "hc3_support3": ("HC3", True, 3),
}
FIELDS = ["dataset", "split", "configuration", "cov_type", "rank_support", "n_clients", "p",
          "q", "rank", "training_flags", "converged", *(f"p_{kind}" for kind in KINDS),
          *(f"flagged_{kind}" for kind in KINDS), "version"]


def all_datasets():
    """The eighteen datasets, each once: (name, features, outputs, frame, clients)."""
    return [row for load in DATASETS.values() for row in load()]


def run_one(name, frame, features, outputs, n_clients, split):
    """One split of one dataset: a row per configuration."""
    from clairstat import CLAIREstimator, local_ols

    # n_clients training clients and one new client, the last part of the split
    rng = np.random.default_rng([split, len(name), 1])
    designs, responses = split_clients(frame, features, outputs, n_clients + 1, rng)
    rows, fits = [], {}
    for configuration, (cov_type, with_cov, support) in CONFIGURATIONS.items():
        # warnings ignored: few residual df (iris's parts), few clients, non-convergence
        # (in the row); benchmarks/RESULTS.md says which datasets they concern
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            if cov_type not in fits:
                fits[cov_type] = local_ols(designs, responses, cov_type=cov_type)
            ols = fits[cov_type]
            train_cov = tuple(c[:n_clients] for c in ols.noise_cov)
            new_cov = tuple(c[n_clients:] for c in ols.noise_cov) if with_cov else None
            est = CLAIREstimator(random_state=split, rank_support=support,
                                 test_level=LEVEL).fit(
                ols.estimates[:n_clients], sample_weight=ols.n_samples[:n_clients],
                noise_cov=train_cov if with_cov else None)
            row = dict(dataset=name, split=split, configuration=configuration,
                       cov_type=cov_type, rank_support=support, n_clients=n_clients, p=ols.estimates.shape[1],
                       q=ols.estimates.shape[2], rank=est.rank_,
                       training_flags=int(est.contaminated_.sum()),
                       converged=int(est.detection_converged_))
            for kind in KINDS:
                new = corrupt(ols.estimates[n_clients:], kind, [0] if kind != "none" else [])
                row[f"p_{kind}"] = float(np.exp(est.score_samples(new, new_cov)[0]))
                row[f"flagged_{kind}"] = int(est.predict(new, new_cov)[0] == -1)
        rows.append(row)
    return rows


def run(n_splits, out, names=None):
    import clairstat

    rows = existing_rows(out, FIELDS)
    # a resumed table must be this code's configurations, not only their names (a review;
    # real_data_calibration.py checks its settings the same way)
    for row in rows:
        cov_type, _, support = CONFIGURATIONS.get(row["configuration"], (None, None, None))
        if (row["cov_type"], row["rank_support"]) != (cov_type, str(support)):
            raise SystemExit(f"{out} holds a row of configuration {row['configuration']!r} "
                             f"with cov_type {row['cov_type']!r} and rank_support "
                             f"{row['rank_support']!r}; this code's is {cov_type!r}, "
                             f"{support!r}: write to a new file.")
    done = {(r["dataset"], int(r["split"]), r["configuration"]) for r in rows}
    datasets = [d for d in all_datasets() if names is None or d[0] in names]
    with appending(out, FIELDS) as (writer, handle):
        for split in range(n_splits):
            for name, features, outputs, frame, n_clients in datasets:
                if all((name, split, c) in done for c in CONFIGURATIONS):
                    continue
                for row in run_one(name, frame, features, outputs, n_clients, split):
                    if (name, split, row["configuration"]) not in done:
                        writer.writerow({**row, "version": clairstat.__version__})
                handle.flush()


def summarize(out):
    """The table of benchmarks/RESULTS.md: per dataset and configuration, the share of
    benign new clients flagged [Wilson 95%], the power per corruption, the verdict."""
    import pandas as pd
    from statsmodels.stats.proportion import proportion_confint

    table = pd.read_csv(out)
    lines = ["| dataset | K | configuration | splits | benign new clients flagged [95% CI] "
             "| power: scale / flip / replace | criteria |", "|---|---|---|---|---|---|---|"]
    verdicts = {}
    for (name, configuration), group in table.groupby(["dataset", "configuration"],
                                                      sort=False):
        null = group.flagged_none
        lo, hi = proportion_confint(null.sum(), len(null), method="wilson")
        power = {kind: group[f"flagged_{kind}"].mean() for kind in KINDS[1:]}
        one_output = int(group.q.iloc[0]) == 1  # reversing one output changes nothing
        tested = [kind for kind in KINDS[1:] if not (one_output and kind == "replace")]
        null_ok = null.mean() <= MAX_NULL_SHARE
        power_ok = all(power[kind] >= MIN_POWER for kind in tested)
        verdict = ("**met**" if null_ok and power_ok else "null met" if null_ok
                   else "power met" if power_ok else "neither")
        verdicts.setdefault(configuration, []).append(null_ok and power_ok)
        shown = " / ".join(f"({power[k]:.2f})" if k not in tested else f"{power[k]:.2f}"
                           for k in KINDS[1:])
        lines.append(f"| {name} | {int(group.n_clients.iloc[0])} | {configuration} | "
                     f"{len(null)} | {null.mean():.3f} [{lo:.3f}, {hi:.3f}] | {shown} | "
                     f"{verdict} |")
    lines += ["", "| configuration | benign new clients flagged, pooled [95% CI] | "
              "datasets meeting both criteria |", "|---|---|---|"]
    for configuration, group in table.groupby("configuration", sort=False):
        null = group.flagged_none
        lo, hi = proportion_confint(null.sum(), len(null), method="wilson")
        met = verdicts[configuration]
        lines.append(f"| {configuration} | {null.mean():.3f} [{lo:.3f}, {hi:.3f}] over "
                     f"{len(null)} | {sum(met)} of {len(met)} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--splits", type=int, default=100, help="random splits per dataset")
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/real_data_new_clients.csv"))
    parser.add_argument("--datasets", nargs="+", default=None,
                        help="only these datasets (default: all eighteen)")
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args(argv)
    known = {d[0] for d in all_datasets()}
    if args.datasets and not set(args.datasets) <= known:
        parser.error(f"unknown datasets {sorted(set(args.datasets) - known)}; "
                     f"known: {sorted(known)}")
    if not args.summary_only:
        run(args.splits, args.out, args.datasets)
    print(summarize(args.out))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

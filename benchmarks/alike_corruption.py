"""Two sites corrupted alike on data the project had not used: statsmodels' co2 series.

A hostile review (2026-12-07) found that two sites whose slopes' signs are flipped the
same way pass for a shared direction at ten sites, not only with few: the rank rule
(``rank_support=1``) keeps the pair's common deviation as part of the shared subspace,
and their off-subspace tests see nothing. This script measures it on the weekly
Mauna Loa CO2 series bundled with statsmodels (``sm.datasets.co2``, missing weeks
dropped): the design is an intercept, a linear and a quadratic trend in years since
1978 (the quadratic divided by 10 years squared) and a yearly sine and cosine; the
weeks are split at random into K sites (``np.array_split`` of a permutation seeded by
``[split, K, 3]``), each site's OLS by :func:`clairstat.local_ols` (classical, or HC3),
and the first two sites' slopes (every coefficient but the intercept) are multiplied
by -1. Configurations, each fitted on the same sites:

- ``classical``: the classical covariance, the defaults (``rank_support=1``);
- ``classical_support3``: the same with ``rank_support=3``;
- ``classical_rank0``: the same with ``rank=0`` (the sites sample one population);
- ``hc3``: HC3 covariances, the defaults;
- ``none``: no covariance (``sample_weight`` the sites' sizes).

One row per (K, split, configuration): whether both corrupted sites were flagged, how
many other sites were flagged, the fitted rank, whether the fit warned (any
UserWarning) and whether it gave the warning that a kept direction rests on two
clients or fewer (``warned_carry``, a column the first run's table lacks), the package
version. Resumable. The summary: the share of splits with both corrupted sites
flagged, with its Wilson interval, per K and configuration.

    OMP_NUM_THREADS=1 python benchmarks/alike_corruption.py --splits 40 \
        --out benchmarks/results/alike_corruption.csv
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np

from _tables import appending, existing_rows

CLIENTS = (10, 20)
CONFIGS = {"classical": ("nonrobust", {}),
           "classical_support3": ("nonrobust", {"rank_support": 3}),
           "classical_rank0": ("nonrobust", {"rank": 0}),
           "hc3": ("HC3", {}),
           "none": (None, {})}
FIELDS = ["n_clients", "split", "configuration", "both_flagged", "others_flagged", "rank",
          "warned", "warned_carry", "version"]
#: The words of the fit's warning that a kept direction rests on two clients or fewer
#: (clairstat._estimator._warn_directions_few_carry).
CARRY_WARNING = "rest on two clients or fewer"


def co2_design():
    """The co2 series' design (const, trend, trend2, sin, cos) and response."""
    import pandas as pd
    import statsmodels.api as sm

    data = sm.datasets.co2.load_pandas().data.dropna()
    years = (data.index - pd.Timestamp("1958-01-01")).days / 365.25
    design = pd.DataFrame({"const": 1.0, "trend": years - 20,
                           "trend2": ((years - 20) / 10) ** 2,
                           "sin": np.sin(2 * np.pi * years),
                           "cos": np.cos(2 * np.pi * years)}, index=data.index)
    return design, data[["co2"]]


def run_one(design, response, n_clients, split):
    """One split: a row per configuration."""
    from clairstat import CLAIREstimator, local_ols

    parts = np.array_split(np.random.default_rng([split, n_clients, 3]).permutation(
        len(design)), n_clients)
    designs = [design.iloc[index] for index in parts]
    responses = [response.iloc[index] for index in parts]
    rows, fitted = [], {}
    for name, (cov_type, options) in CONFIGS.items():
        key = cov_type or "nonrobust"
        if key not in fitted:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                ols = local_ols(designs, responses, cov_type=key)
            estimates = ols.estimates.copy()
            estimates[:2, 1:] *= -1  # the first two sites' slopes, signs flipped
            fitted[key] = dataclasses.replace(ols, estimates=estimates)
        ols = fitted[key]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            est = CLAIREstimator(random_state=0, **options)
            if cov_type is None:
                est.fit(ols.estimates, sample_weight=ols.n_samples)
            else:
                est.fit(ols)
        flags = np.asarray(est.contaminated_)
        rows.append(dict(n_clients=n_clients, split=split, configuration=name,
                         both_flagged=bool(flags[0] and flags[1]),
                         others_flagged=int(flags[2:].sum()), rank=int(est.rank_),
                         warned=bool(any(issubclass(w.category, UserWarning)
                                         for w in caught)),
                         warned_carry=bool(any(CARRY_WARNING in str(w.message)
                                               for w in caught))))
    return rows


def run(splits, out):
    import clairstat

    design, response = co2_design()
    done = {(int(r["n_clients"]), int(r["split"])) for r in existing_rows(out, FIELDS)}
    with appending(out, FIELDS) as (writer, handle):
        for split in range(splits):
            for n_clients in CLIENTS:
                if (n_clients, split) in done:
                    continue
                for row in run_one(design, response, n_clients, split):
                    writer.writerow({**row, "version": clairstat.__version__})
                handle.flush()


def summarize(out):
    import pandas as pd
    from statsmodels.stats.proportion import proportion_confint

    table = pd.read_csv(out)
    carry = "warned_carry" in table.columns
    lines = ["| K | configuration | splits | both corrupted sites flagged [95% CI] | "
             "other sites flagged (mean) | mean fitted rank | splits warned |"
             + (" misses / catches with the two-clients warning |" if carry else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if carry else "")]
    for (n_clients, name), group in table.groupby(["n_clients", "configuration"],
                                                  sort=False):
        hits = int(group.both_flagged.sum())
        lo, hi = proportion_confint(hits, len(group), method="wilson")
        line = (f"| {n_clients} | {name} | {len(group)} | {hits / len(group):.2f} "
                f"[{lo:.2f}, {hi:.2f}] | {group.others_flagged.mean():.2f} | "
                f"{group['rank'].mean():.2f} | {int(group.warned.sum())} |")
        if carry:
            miss = ~group.both_flagged.astype(bool)
            line += (f" {int(group.warned_carry[miss].sum())} of {int(miss.sum())} / "
                     f"{int(group.warned_carry[~miss].sum())} of {int((~miss).sum())} |")
        lines.append(line)
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--splits", type=int, default=40, help="random splits per K")
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/alike_corruption.csv"))
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.summary_only:
        run(args.splits, args.out)
    print(summarize(args.out))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

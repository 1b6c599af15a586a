"""Collaborative-set recovery (docs/theory.md, D1-D5): ``detection`` and ``consistency``."""

from __future__ import annotations

import numpy as np

from .._core import INF, Check, logit_fit, mean_interval, wilson

HIGH = 2.0  # separation ratio delta / (sigma sqrt(pq/n)) at which every attacker is caught
LEVEL = 0.05  # the test level the detection study uses
# D2: the per-client detection rate equals the non-central chi^2 power to within 0.05
# (absolute), averaged over the separations: the null model's accuracy, stated before data.
POWER_MARGIN = 0.05
# D1: "P(C_hat = C) -> 1": at the largest size of the path the rate is at least 0.9.
CONSISTENT_RATE = 0.9
# D1's trend: the rise along the path must be at least this much to count, a logistic
# slope on log K of 0.1 (odds up 7% per doubling of K) or, where no slope exists, a rate
# rise of 0.1 from the smallest K to the largest. With a margin of 0 a flat path (a
# method that never improves) gave an interval about 0, inconclusive at any sample size:
# no control could make the check fail (a review; the fixed-level control's falling
# path, -0.66 [-1.37, 0.05], was inconclusive). With 0.1 a flat or falling path fails.
MIN_RISE = 0.1


def _rate(rows, column, label, expected):
    rate, interval = wilson(int(rows[column].sum()), len(rows))
    by_gamma = rows.groupby("gamma")[column].mean()
    return dict(statistic=label, expected=expected, observed=rate, interval=interval,
                n=len(rows), detail=f"{len(rows)} replicates; by gamma: "
                + ", ".join(f"{g:g}: {v:.2f}" for g, v in by_gamma.items()) + ".")


def consistency_limit(df):
    """D1: at the largest size of the path P(C_hat = C) >= 0.9 (level 1/K, Holm)."""
    largest = df[df["size"] == df["size"].max()]
    k, n = int(largest["n_clients"].iloc[0]), int(largest["n"].iloc[0])
    rates = df.groupby(["size", "n_clients"])["exact"].mean()
    return dict(_rate(largest, "exact", f"P(C_hat = C) at the largest size (K={k}, n={n}), "
                      "level 1/K, Holm (Wilson)", f">= {CONSISTENT_RATE}"),
                detail=f"{len(largest)} replicates there; along the path (K: rate): "
                + ", ".join(f"{kk}: {v:.2f}" for (_, kk), v in rates.items()) + ".")


def consistency_trend(df):
    """D1: P(C_hat = C) rises along the path: logistic slope on log K is positive."""
    fit = logit_fit(df.assign(log_k=np.log(df["n_clients"])), "exact", ["log_k"])
    rates = df.groupby("n_clients")["exact"].agg(["mean", "count"])
    detail = "rates by K: " + ", ".join(f"{k}: {r['mean']:.2f} ({int(r['count'])})"
                                         for k, r in rates.iterrows())
    if fit is None:
        # Separated or constant outcome: no maximum-likelihood slope. The clearest paths
        # (exact recovery collapsing, or rising, from one size to the next) were then
        # inconclusive, a check that cannot fail (a review). The claim is decided instead
        # by the rate at the largest K minus the rate at the smallest (Newcombe's
        # interval, statsmodels), which exists for separated data; a constant outcome
        # gives 0 and stays undecided.
        from statsmodels.stats.proportion import confint_proportions_2indep

        ends = rates.loc[[rates.index.min(), rates.index.max()]]
        hits = (ends["mean"] * ends["count"]).round().astype(int)
        lo, hi = confint_proportions_2indep(hits.iloc[1], ends["count"].iloc[1],
                                            hits.iloc[0], ends["count"].iloc[0],
                                            method="newcomb")
        return dict(statistic="rate of 1{C_hat = C} at the largest K minus at the smallest "
                              "(Newcombe 95%; the logistic slope has no finite fit)",
                    expected=f">= {MIN_RISE}",
                    observed=float(ends["mean"].iloc[1] - ends["mean"].iloc[0]),
                    interval=(float(lo), float(hi)), n=int(ends["count"].sum()),
                    detail=detail + "; no finite maximum-likelihood fit (separated or "
                                    "constant outcome).")
    lo, hi = fit.conf_int(alpha=0.05)[1]
    return dict(statistic="logistic slope of 1{C_hat = C} on log K (Wald 95%)",
                expected=f">= {MIN_RISE}", observed=float(fit.params[1]), interval=(lo, hi),
                n=len(df), detail=detail + ".")


def power_curve(df):
    """D2: per-client detection rate = non-central chi^2 power, across separations."""
    rows = df[df["gamma"] > 0].dropna(subset=["power_observed", "power_predicted"])
    gap = rows["power_observed"] - rows["power_predicted"]
    mean, interval = mean_interval(gap, bounds=(-1.0, 1.0))
    by_t = rows.groupby("separation_ratio")[["power_observed", "power_predicted"]].mean()
    return dict(statistic="mean (observed - predicted) per-client detection rate at level "
                          f"{LEVEL}, uncorrected (t 95%)", expected=0.0, observed=mean,
                interval=interval, n=len(rows),
                detail="by separation ratio (observed / predicted): " + ", ".join(
                    f"{t:g}: {r.power_observed:.2f}/{r.power_predicted:.2f}"
                    for t, r in by_t.iterrows()) + ".")


def null_calibration(df):
    """D3: benign clients' uncorrected rejection rate at level 0.05 is 0.05 (+- 0.025)."""
    rows = df[df["separation_ratio"] >= HIGH]  # attackers caught: a clean refit
    mean, interval = mean_interval(rows["null_rejection_rate"], bounds=(0.0, 1.0))
    return dict(statistic=f"mean share of benign clients with p < {LEVEL} (uncorrected), "
                          f"separation ratio >= {HIGH} (t 95%)",
                expected=LEVEL, observed=mean, interval=interval, n=len(rows),
                detail=f"{len(rows)} replicates; the tail rate, not the median p-value "
                       f"(median {rows['null_p_median'].median():.2f}, which a median-based "
                       "scale estimate fixes near 0.5 by construction).")


def bh_false_discoveries(df):
    """D4: with BH the false discovery proportion is at most the level on average."""
    rows = df[df["correction"] == "fdr_bh"]
    mean, interval = mean_interval(rows["false_discovery_proportion"], bounds=(0.0, 1.0))
    return dict(statistic="mean false discovery proportion, BH, all separations (t 95%)",
                expected=f"<= {LEVEL}", observed=mean, interval=interval, n=len(rows),
                detail=f"{len(rows)} replicates; mean recall at separation >= {HIGH}: "
                       f"{rows[rows['separation_ratio'] >= HIGH]['recall'].mean():.3f}.")


def holm_fwer(df):
    """D4: with Holm, P(any benign client flagged) <= level."""
    rows = df[df["correction"] == "holm"]
    return _rate(rows, "any_false_alarm", "P(any benign client flagged), Holm, all "
                 "separations (Wilson)", f"<= {LEVEL}")


def bh_high_separation(df):
    """D5 (as stated, shown false): with the default BH test, P(C_hat = C) -> 1."""
    rows = df[(df["correction"] == "fdr_bh") & (df["separation_ratio"] >= HIGH)]
    return _rate(rows, "exact", f"P(C_hat = C), BH (default), separation ratio >= {HIGH} "
                 "(Wilson)", ">= 0.95")


CHECKS = [
    Check("detection_consistency_limit", "consistency",
          "With the level shrinking as 1/K (Holm) along growing (K, n) at a fixed shift, "
          "P(C_hat = C) -> 1: at the largest size it is at least 0.9.",
          consistency_limit, margin=(CONSISTENT_RATE, INF), source="docs/theory.md#d1"),
    Check("detection_consistency_trend", "consistency",
          "Along that path P(C_hat = C) increases (logistic slope on log K at least 0.1; "
          "where no slope exists, a rise of at least 0.1 from the smallest K).",
          consistency_trend, margin=(MIN_RISE, INF), source="docs/theory.md#d1"),
    Check("detection_power_curve", "detection",
          "A contaminated client's uncorrected rejection probability is the non-central "
          "chi^2((p - r) q, delta^2 / s_E^2) power.", power_curve,
          margin=(-POWER_MARGIN, POWER_MARGIN), source="docs/theory.md#d2",
          # Documented: less power than the sigma-known chi^2 curve (-0.077 small,
          # -0.141 full); more power than it, or a collapse, is another failure.
          known_failure="validation/README.md#power", known_range=(-0.25, -POWER_MARGIN)),
    Check("detection_null_calibration", "detection",
          "Benign clients are rejected at the nominal level (uncorrected, level 0.05).",
          null_calibration, margin=(LEVEL / 2, 1.5 * LEVEL), source="docs/theory.md#d3"),
    Check("detection_bh_false_discoveries", "detection",
          "The default BH test keeps the false discovery rate at or below the level.",
          bh_false_discoveries, margin=(-INF, LEVEL), source="docs/theory.md#d4"),
    Check("detection_holm_fwer", "detection",
          "Holm's test keeps the family-wise error rate at or below the level.",
          holm_fwer, margin=(-INF, LEVEL), source="docs/theory.md#d4"),
    Check("detection_bh_high_separation", "detection",
          "As stated: P(C_hat = C) -> 1 as the separation grows, with the default "
          "fixed-level FDR (BH) test (shown false: BH allows false discoveries).",
          bh_high_separation, margin=(0.95, INF), source="docs/theory.md#d5",
          # Documented: BH's plateau (1 - alpha (m + 1)/K)^(K - m), 0.63-0.87 over the
          # grid's gamma (0.81 small, 0.79 full pooled); far below it is another failure.
          known_failure="validation/README.md#detection", known_range=(0.6, 0.95)),
]

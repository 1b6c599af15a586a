"""Claim 3, collaborative-set recovery: checks on the ``detection`` table."""

from __future__ import annotations

from .._core import Check, mean_interval, overlaps, verdict, wilson

HIGH, LOW = 2.0, 0.25  # separation ratios delta / (sigma sqrt(pq/n)) called high and low
LEVEL = 0.05  # the test level the study uses


def _rate(rows, column, label, expected, ok):
    rate, interval = wilson(rows[column].sum(), len(rows))
    by_gamma = rows.groupby("gamma")[column].mean()
    return dict(statistic=label, expected=expected, observed=rate, interval=interval,
                verdict=verdict(ok(rate, interval)),
                detail=f"{len(rows)} replicates; by gamma: "
                       + ", ".join(f"{g:g}: {v:.2f}" for g, v in by_gamma.items()) + ".")


def holm_high_separation(df):
    """With FWER control, P(C_hat = C) >= 1 - level once separation is high."""
    rows = df[(df["correction"] == "holm") & (df["separation_ratio"] >= HIGH)]
    return _rate(rows, "exact", f"P(C_hat = C), Holm, separation ratio >= {HIGH} (Wilson)",
                 f">= {1 - LEVEL}", lambda rate, ci: ci[1] >= 1 - LEVEL)


def bh_high_separation(df):
    """The claim as stated, with the default BH correction: P(C_hat = C) -> 1."""
    rows = df[(df["correction"] == "fdr_bh") & (df["separation_ratio"] >= HIGH)]
    return _rate(rows, "exact", f"P(C_hat = C), BH (default), separation ratio >= {HIGH} "
                 "(Wilson)", f">= {1 - LEVEL}", lambda rate, ci: ci[1] >= 1 - LEVEL)


def bh_false_discoveries(df):
    """What BH does promise: mean false discovery proportion <= level."""
    rows = df[df["correction"] == "fdr_bh"]
    mean, interval = mean_interval(rows["false_discovery_proportion"])
    return dict(statistic="mean false discovery proportion, BH, all separations (t 95%)",
                expected=f"<= {LEVEL}", observed=mean, interval=interval,
                verdict=verdict(interval[0] <= LEVEL),
                detail=f"{len(rows)} replicates; mean recall at separation >= {HIGH}: "
                       f"{rows[rows['separation_ratio'] >= HIGH]['recall'].mean():.3f}.")


def low_separation(df):
    """Below a separation the contaminated clients pass as collaborative."""
    rows = df[df["separation_ratio"] <= LOW]
    return _rate(rows, "exact", f"P(C_hat = C), separation ratio <= {LOW}, both "
                 "corrections (Wilson)", f"<= {LEVEL}", lambda rate, ci: ci[0] <= LEVEL)


def null_calibration(df):
    """Uncorrected per-client tests reject a benign client at about the level."""
    rows = df[df["separation_ratio"] >= HIGH]  # attackers caught: a clean refit
    mean, interval = mean_interval(rows["null_rejection_rate"])
    return dict(statistic=f"mean share of benign clients with p < {LEVEL} (uncorrected), "
                          f"separation ratio >= {HIGH} (t 95%)",
                expected=LEVEL, observed=mean, interval=interval,
                verdict=verdict(overlaps(interval, LEVEL / 2, 2 * LEVEL)),
                detail=f"{len(rows)} replicates; median benign p-value "
                       f"{rows['null_p_median'].median():.2f} (uniform: 0.5).")


CHECKS = [
    Check("detection_holm_high_separation", "detection",
          "P(C_hat = C) -> 1 as the separation grows (FWER-controlled test: >= 1 - level).",
          holm_high_separation),
    Check("detection_bh_high_separation", "detection",
          "P(C_hat = C) -> 1 as the separation grows, with the default FDR (BH) test.",
          bh_high_separation, known_failure="validation/README.md#detection"),
    Check("detection_bh_false_discoveries", "detection",
          "The default BH test keeps the false discovery proportion at the level.",
          bh_false_discoveries),
    Check("detection_null_calibration", "detection",
          "The per-client statistic has a known (chi^2/df) null: benign p-values are "
          "calibrated.", null_calibration),
    Check("detection_low_separation", "detection",
          "Below a separation, detection fails.", low_separation),
]

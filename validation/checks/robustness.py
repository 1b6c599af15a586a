"""Checks of study 7 (robustness of the aggregation rules) against its results table.

Known failures (evidence: ``python -m validation --scale small``, 10 replicates per cell,
n = 20 clients, d = 32, k = 24, rank 4, benign LoRA noise 0.05, heterogeneity 0.5):

.. _false-discoveries:

**False discoveries.** CLAIR's per-client test flags 10-36% of the benign clients in
every cell (14-25% at gamma = 0, where there is nothing to find; test_level 0.05, BH):
the mean false-discovery proportion of the flagged set is 0.31 [0.27, 0.36], not 0.05.
The test's null assumes i.i.d. noise entries,
``||(I - P)(Theta_k - mean)||^2 / sigma^2 ~ chi2((p - r) q)``. A LoRA client's noise
``noise * N_i A_i`` has rank r, so the statistic has about (p - r) r effective degrees of
freedom and its spread across benign clients is several times the chi2 prediction
(benign statistic / df ranged over 0.67-1.54 in one replicate, against a null standard
deviation of sqrt(2 / 672) = 0.055). Dropping those benign clients costs little here
(CLAIR's error stays 0.05-0.09 of the target under random, scaled and stealthy
attacks), but the error rate is not controlled. A fix belongs in the estimator: an
empirical null (the collaborators' own spread of the statistic) or degrees of freedom
matched to the noise's rank.

.. _colluders:

**Colluders at gamma >= 0.3.** With the rank given, identical off-subspace attackers are
all flagged in 10/10 replicates at gamma = 0.1 and 9/10 at 0.2, but at gamma = 0.3 and
0.4 in none (recall 0): CLAIR flags benign clients instead (false-positive rate 0.28 and
1.0), so its global update follows the attackers (median relative error 1.1 and 3.6,
against 0.26 and 0.48 for the geometric median). The same happens, more gradually, to
in-subspace sign-flipped updates (recall 0.35 and 0.20 at gamma = 0.3 and 0.4, error
0.62 and 0.87; not a check, since the method does not claim to see in-subspace attacks).
"""

from __future__ import annotations

import numpy as np

from .._core import Check, mean_interval, ols_slope, overlaps, verdict, wilson
from .fedrot import max_at_most

__all__ = ["CHECKS", "minsker_constant"]

BAND = 0.1  # equivalence band for the mean's error-vs-gamma exponent (expected 1)
# CLAIR at high separation (every attacker's off-subspace part is at least ten times
# the benign noise): recovery must be the rule; at most one replicate in ten may miss.
MIN_RATE = 0.9
OFF_SUBSPACE = ("random", "scaled")  # independent attackers leaving the shared subspace
TEST_LEVEL = 0.05  # CLAIREstimator's default test_level (FDR, Benjamini-Hochberg)
# Weiszfeld stops at a relative step of 1e-10 of the data scale; 1e-6 covers the
# distance from the exact geometric median at that step with a wide margin.
WEISZFELD_SLACK = 1e-6


def minsker_constant(gamma):
    """C_gamma = (1 - gamma) / sqrt(1 - 2 gamma) of Minsker (2015, Lemma 2.1), gamma < 1/2.

    If at most a fraction gamma of the points lie outside the ball B(x, r), the geometric
    median lies in B(x, C_gamma r).

    Examples
    --------
    >>> float(minsker_constant(0.0))
    1.0
    """
    gamma = np.asarray(gamma, dtype=float)
    return (1.0 - gamma) / np.sqrt(1.0 - 2.0 * gamma)


def mean_breaks_down(df):
    rows = df[(df["attack"] == "scaled") & (df["gamma"] > 0)]
    slope, interval = ols_slope(rows, "gamma", "error_mean")
    medians = rows.groupby("gamma")["error_mean"].median()
    return {"statistic": "log-log slope of the mean's error on gamma (scaled attack)",
            "expected": 1.0, "observed": slope, "interval": interval,
            "verdict": verdict(overlaps(interval, 1 - BAND, 1 + BAND)),
            "detail": "median error by gamma: " + "; ".join(
                f"{g:g}: {v:.3g}" for g, v in medians.items())}


def geomedian_bound(df):
    rows = df[df["gamma"] < 0.5]
    bound = minsker_constant(rows["gamma"]) * rows["benign_radius"]
    return max_at_most(rows.assign(ratio=rows["error_geomedian"] / bound), "ratio",
                       1.0 + WEISZFELD_SLACK,
                       "max ||geomedian - target|| / (C_gamma max_benign ||x_i - target||)",
                       expected=1.0)


def _all_true(rows, column, statistic):
    hits = int(rows[column].sum())
    rate, interval = wilson(hits, len(rows))
    return {"statistic": statistic, "expected": 1.0, "observed": rate, "interval": interval,
            "verdict": verdict(hits == len(rows)),
            "detail": f"{hits} of {len(rows)} replicates"}


def median_in_range(df):
    return _all_true(df[df["gamma"] < 0.5], "median_in_range",
                     "P(every median coordinate in the benign range), gamma < 1/2")


def trimmed_in_range(df):
    return _all_true(df[df["gamma"] <= 0.2], "trimmed_in_range",
                     "P(every trimmed-mean coordinate in the benign range), gamma <= trim")


def _rate(rows, column, statistic):
    hits = int(rows[column].sum())
    rate, interval = wilson(hits, len(rows))
    return {"statistic": statistic, "expected": f">= {MIN_RATE}", "observed": rate,
            "interval": interval, "verdict": verdict(rate >= MIN_RATE),
            "detail": f"{hits} of {len(rows)} replicates; by attack: " + "; ".join(
                f"{a}: {g[column].mean():.2f}" for a, g in rows.groupby("attack"))}


def clair_detects(df):
    rows = df[df["attack"].isin(OFF_SUBSPACE) & (df["gamma"] > 0)]
    return _rate(rows.assign(all_flagged=rows["clair_recall"] == 1.0), "all_flagged",
                 "P(every attacker flagged), independent off-subspace attacks")


def clair_false_discoveries(df):
    rows = df[df["attack"].isin(OFF_SUBSPACE) & (df["gamma"] > 0)]
    mean, interval = mean_interval(1.0 - rows["clair_precision"])
    return {"statistic": "mean false-discovery proportion of CLAIR's flagged set",
            "expected": f"<= {TEST_LEVEL}", "observed": mean, "interval": interval,
            "verdict": verdict(interval[0] <= TEST_LEVEL),
            "detail": "benign false-positive rate by gamma (all attacks): " + "; ".join(
                f"{g:g}: {v:.2f}" for g, v in
                df.groupby("gamma")["clair_false_positive_rate"].mean().items())}


def clair_flags_colluders(df):
    rows = df[(df["attack"] == "colluding") & (df["gamma"] > 0)]
    return _rate(rows.assign(all_flagged=rows["clair_recall"] == 1.0), "all_flagged",
                 "P(every colluding attacker flagged), rank given")


def clair_beats_mean(df):
    rows = df[df["attack"].isin(OFF_SUBSPACE) & (df["gamma"] > 0)]
    return _rate(rows.assign(better=rows["error_clair"] < rows["error_mean"]), "better",
                 "P(CLAIR's global update closer to the benign target than the mean)")


CHECKS = [
    Check("robust_mean_breakdown", "robustness",
          "The plain mean has breakdown point 0: its error grows in proportion to gamma",
          mean_breaks_down),
    Check("robust_geomedian_bound", "robustness",
          "Geometric median: ||z - target|| <= C_gamma max_benign ||x_i - target|| for "
          "gamma < 1/2 (Minsker 2015)", geomedian_bound),
    Check("robust_median_range", "robustness",
          "With fewer than half attackers every median coordinate stays in the benign range",
          median_in_range),
    Check("robust_trimmed_range", "robustness",
          "With an attacker fraction at most the trim, the trimmed mean stays in the benign "
          "range", trimmed_in_range),
    Check("robust_clair_detection", "robustness",
          "CLAIR flags every attacker under independent off-subspace attacks",
          clair_detects),
    Check("robust_clair_false_discoveries", "robustness",
          "CLAIR's flagged set controls the false-discovery rate at test_level",
          clair_false_discoveries,
          known_failure="validation/checks/robustness.py#false-discoveries"),
    Check("robust_clair_colluders", "robustness",
          "With the rank given, colluding attackers (one shared direction) are flagged",
          clair_flags_colluders, known_failure="validation/checks/robustness.py#colluders"),
    Check("robust_clair_beats_mean", "robustness",
          "CLAIR's global update is closer to the benign target than the mean under "
          "independent off-subspace attacks", clair_beats_mean),
]

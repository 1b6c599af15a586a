"""Robustness of the aggregation rules (docs/theory.md, B1-B4): the ``robustness`` table.

The 0.1.0 findings that once tagged two checks as known failures (false discoveries of
CLAIR's test on LoRA clients, and colluders at gamma >= 0.3) were re-examined on the
current estimator: the tags are gone, and the checks decide on the current tables
(``validation/README.md#robustness`` has the history).

CLAIR is compared with the plain mean against the benign mean of the data-generating
model, ``U* A0`` (``error_pop_*``), which no rule outputs: the benign clients' own mean is
CLAIR's output once it flags the right set, so it would reward the method by definition.
"""

from __future__ import annotations

import numpy as np

from .._core import INF, Check, mean_interval, ols_slope, wilson
from .fedrot import range_of

__all__ = ["CHECKS", "minsker_constant"]

BAND = 0.1  # equivalence band for the mean's error-vs-gamma exponent (expected 1)
# CLAIR at high separation (every attacker's off-subspace part is at least ten times
# the benign noise): recovery must be the rule; at most one replicate in ten may miss.
MIN_RATE = 0.9
OFF_SUBSPACE = ("random", "scaled")  # independent attackers leaving the shared subspace
# "CLAIR beats the mean": in more than half of the replicates (a sign test).
BEATS = 0.5
TEST_LEVEL = 0.05  # CLAIREstimator's default test_level (FDR, Benjamini-Hochberg)
# A level is checked within the band the detection study gives one (detection.py's
# null calibration: at most 1.5 x the level): a test at exactly its level has an
# interval that straddles the level itself at any number of replicates.
LEVEL_BAND = 1.5
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
            "expected": 1.0, "observed": slope, "interval": interval, "n": len(rows),
            "detail": "median error by gamma: " + "; ".join(
                f"{g:g}: {v:.3g}" for g, v in medians.items())}


def geomedian_bound(df):
    rows = df[df["gamma"] < 0.5]
    bound = minsker_constant(rows["gamma"]) * rows["benign_radius"]
    return range_of(rows.assign(ratio=rows["error_geomedian"] / bound), "ratio",
                    "max ||geomedian - target|| / (C_gamma max_benign ||x_i - target||)",
                    expected=1.0)


def _all_true(rows, column, statistic):
    result = range_of(rows.assign(hit=rows[column].astype(float)), "hit", statistic,
                      expected=1.0)
    result["detail"] = f"{int(rows[column].sum())} of {len(rows)} replicates"
    return result


def median_in_range(df):
    return _all_true(df[df["gamma"] < 0.5], "median_in_range",
                     "P(every median coordinate in the benign range), gamma < 1/2")


def trimmed_in_range(df):
    return _all_true(df[df["gamma"] <= 0.2], "trimmed_in_range",
                     "P(every trimmed-mean coordinate in the benign range), gamma <= trim")


def _rate(rows, column, statistic, expected=f">= {MIN_RATE}"):
    hits = int(rows[column].sum())
    rate, interval = wilson(hits, len(rows))
    return {"statistic": statistic, "expected": expected, "observed": rate,
            "interval": interval, "n": len(rows),
            "detail": f"{hits} of {len(rows)} replicates; by attack: " + "; ".join(
                f"{a}: {g[column].mean():.2f}" for a, g in rows.groupby("attack"))}


def clair_detects(df):
    rows = df[df["attack"].isin(OFF_SUBSPACE) & (df["gamma"] > 0)]
    return _rate(rows.assign(all_flagged=rows["clair_recall"] == 1.0), "all_flagged",
                 "P(every attacker flagged), independent off-subspace attacks")


def clair_false_discoveries(df):
    rows = df[df["attack"].isin(OFF_SUBSPACE) & (df["gamma"] > 0)]
    mean, interval = mean_interval(1.0 - rows["clair_precision"], bounds=(0.0, 1.0))
    return {"statistic": "mean false-discovery proportion of CLAIR's flagged set (t 95%)",
            "expected": f"<= {TEST_LEVEL}", "observed": mean, "interval": interval,
            "n": len(rows),
            "detail": "benign false-positive rate by gamma (all attacks): " + "; ".join(
                f"{g:g}: {v:.2f}" for g, v in
                df.groupby("gamma")["clair_false_positive_rate"].mean().items())}


def clair_level_without_attackers(df):
    rows = df[df["gamma"] == 0]
    if rows.empty:  # a table without gamma = 0 (an older smoke grid): nothing to decide
        return {"statistic": "P(any benign client flagged), no attacker", "expected":
                f"<= {LEVEL_BAND * TEST_LEVEL:g}", "observed": float("nan"),
                "interval": (float("nan"), float("nan")), "n": 0,
                "detail": "no replicate without attackers at this scale"}
    return _rate(rows.assign(any_flag=rows["clair_false_positive_rate"] > 0), "any_flag",
                 "P(any benign client flagged), no attacker, rank given (Wilson)",
                 expected=f"<= {LEVEL_BAND * TEST_LEVEL:g} (1.5 x test_level)")


def clair_flags_colluders(df):
    rows = df[(df["attack"] == "colluding") & (df["gamma"] > 0)]
    return _rate(rows.assign(all_flagged=rows["clair_recall"] == 1.0), "all_flagged",
                 "P(every colluding attacker flagged), rank given")


def _beats_mean(rows, rule, statistic):
    better = rows[f"error_pop_{rule}"] < rows["error_pop_mean"]
    return _rate(rows.assign(better=better), "better", statistic, expected=f"> {BEATS}")


def _beats_mean_every_attack(rows, rule, statistic):
    """:func:`_beats_mean` per attack kind and attacker fraction, the worst cell deciding
    (its rate and Wilson interval; every cell in the detail). Pooled, a rule that lost
    every replicate of one kind still passed (a review: 0.667 [0.578, 0.745] at small
    scale with every colluding replicate lost), and one that lost every replicate at
    gamma >= 0.3 passed at full scale (0.552 [0.520, 0.584]), as easy attacks hid the
    hard one in B4."""
    better = rows[f"error_pop_{rule}"] < rows["error_pop_mean"]
    cells = {cell: (wilson(int(group.sum()), len(group)), len(group))
             for cell, group in better.groupby([rows["attack"], rows["gamma"]])}
    worst = min(cells, key=lambda cell: cells[cell][0][0])
    (rate, interval), count = cells[worst]
    return {"statistic": statistic, "expected": f"> {BEATS} for every attack and gamma",
            "observed": rate, "interval": interval, "n": count,
            "detail": f"worst cell {worst[0]} at gamma {worst[1]:g}; by cell: " + "; ".join(
                f"{kind} {gamma:g}: {value[0][0]:.2f} of {value[1]}"
                for (kind, gamma), value in sorted(cells.items()))}


def clair_beats_mean(df):
    rows = df[df["attack"].isin(OFF_SUBSPACE + ("colluding",)) & (df["gamma"] > 0)]
    return _beats_mean_every_attack(
        rows, "clair", "P(CLAIR closer than the mean to the model's benign mean U* A0), "
        "the worst off-subspace attack and gamma, rank given (Wilson)")


def clair_beats_mean_rank_unknown(df):
    rows = df[df["attack"].isin(OFF_SUBSPACE + ("colluding",)) & (df["gamma"] > 0)]
    return _beats_mean_every_attack(
        rows, "clair_rank_unknown", "P(CLAIR closer than the mean to U* A0), the worst "
        "off-subspace attack and gamma, rank estimated (Wilson)")


def clair_beats_mean_sign_flip(df):
    rows = df[(df["attack"] == "sign_flip") & (df["gamma"] > 0)]
    return _beats_mean(rows, "clair", "P(CLAIR closer than the mean to U* A0), sign-flip "
                       "attack, rank given (Wilson)")


def clair_beats_mean_stealthy(df):
    rows = df[(df["attack"] == "stealthy") & (df["gamma"] > 0)]
    return _beats_mean(rows, "clair", "P(CLAIR closer than the mean to U* A0), stealthy "
                       "in-subspace shift, rank given (Wilson)")


_SOURCE = "docs/theory.md#b1"
CHECKS = [
    Check("robust_mean_breakdown", "robustness",
          "The plain mean has breakdown point 0: its error grows in proportion to gamma",
          mean_breaks_down, margin=(1 - BAND, 1 + BAND), source=_SOURCE),
    Check("robust_geomedian_bound", "robustness",
          "Geometric median: ||z - target|| <= C_gamma max_benign ||x_i - target|| for "
          "gamma < 1/2 (Minsker 2015)", geomedian_bound, kind="identity",
          margin=(-INF, 1.0 + WEISZFELD_SLACK), source=_SOURCE),
    Check("robust_median_range", "robustness",
          "With fewer than half attackers every median coordinate stays in the benign range",
          median_in_range, kind="identity", margin=(1.0, INF), source=_SOURCE),
    Check("robust_trimmed_range", "robustness",
          "With an attacker fraction at most the trim, the trimmed mean stays in the benign "
          "range", trimmed_in_range, kind="identity", margin=(1.0, INF), source=_SOURCE),
    Check("robust_clair_detection", "robustness",
          "CLAIR flags every attacker under independent off-subspace attacks",
          clair_detects, margin=(MIN_RATE, INF), source="docs/theory.md#b2"),
    Check("robust_clair_false_discoveries", "robustness",
          "CLAIR's flagged set controls the false-discovery rate at test_level",
          clair_false_discoveries, margin=(-INF, TEST_LEVEL), source="docs/theory.md#b2"),
    Check("robust_clair_level_without_attackers", "robustness",
          "With no attacker, CLAIR flags a benign client in at most 1.5 x test_level of "
          "the replicates (BH's false discovery rate under the full null, within the "
          "detection study's band; at 500 replicates only a rate of about 0.10 or more "
          "fails, 0.07-0.09 is inconclusive)",
          clair_level_without_attackers, margin=(-INF, LEVEL_BAND * TEST_LEVEL),
          source="docs/theory.md#b2"),
    Check("robust_clair_colluders", "robustness",
          "With the rank given, colluding attackers (one shared direction) are flagged",
          clair_flags_colluders, margin=(MIN_RATE, INF), source="docs/theory.md#b2"),
    Check("robust_clair_beats_mean", "robustness",
          "CLAIR's global update is closer than the mean to the model's benign mean under "
          "every off-subspace attack (random, scaled, colluding) and attacker fraction "
          "(the worst decides), rank given",
          clair_beats_mean, margin=(BEATS, INF), source="docs/theory.md#b3"),
    Check("robust_clair_beats_mean_rank_unknown", "robustness",
          "The same with the rank estimated", clair_beats_mean_rank_unknown,
          margin=(BEATS, INF), source="docs/theory.md#b3"),
    Check("robust_clair_beats_mean_sign_flip", "robustness",
          "The same under sign-flipped updates (inside the shared column space, outside "
          "what the per-client test can see: docs/theory.md#b4)", clair_beats_mean_sign_flip,
          margin=(BEATS, INF), source="docs/theory.md#b4",
          # B4: nothing promises it; CLAIR is as close as the mean in about half the
          # replicates (0.457 [0.424, 0.489] over 900 at full scale). Below 0.4 it is
          # another failure.
          known_failure="validation/README.md#sign-flip", known_range=(0.40, BEATS)),
    Check("robust_clair_beats_mean_stealthy", "robustness",
          "The same under a common in-subspace shift (stealthy attack)",
          clair_beats_mean_stealthy, margin=(BEATS, INF), source="docs/theory.md#b4"),
]

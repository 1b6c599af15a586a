"""Claim 4, refinement gain: checks on the ``refinement`` table."""

from __future__ import annotations

import numpy as np

from .._core import Check, mean_interval, ols_slope, overlaps, verdict, wilson

# Cells where the formula's sign of the gain is decisive: heterogeneity at most half the
# break-even size, or at least twice it (near h_ratio = 1 the sign is a coin flip).
DECISIVE_LOW, DECISIVE_HIGH = 0.5, 2.0
BAND = 0.1  # equivalence band for the slope of measured on predicted risk ratio


def oracle_formula(df):
    """The oracle refinement's risk equals the formula (it is exact in expectation)."""
    mean, interval = mean_interval(df["risk_oracle"] / df["formula_oracle"])
    return dict(statistic="mean of measured oracle risk / formula (t 95%)", expected=1.0,
                observed=mean, interval=interval,
                verdict=verdict(interval[0] <= 1.0 <= interval[1]),
                detail=f"{len(df)} replicates over {df['cell'].nunique()} cells.")


def clair_against_formula(df):
    """CLAIR's risk ratio tracks the oracle formula's ratio (slope 1, linear scale)."""
    slope, interval = ols_slope(df, "ratio_formula", "ratio_clair", log=False)
    homogeneous = df[df["h_ratio"] == 0]
    excess = (homogeneous["risk_clair"] / homogeneous["formula_oracle"]).mean()
    return dict(statistic="OLS slope of CLAIR's risk ratio (vs local) on the formula's",
                expected=1.0, observed=slope, interval=interval,
                verdict=verdict(overlaps(interval, 1 - BAND, 1 + BAND)),
                detail=f"without heterogeneity CLAIR's risk is {excess:.2f} x the oracle "
                       f"formula (the subspace-estimation cost); mean ratio "
                       f"{homogeneous['ratio_clair'].mean():.3f} vs formula "
                       f"{homogeneous['ratio_formula'].mean():.3f}.")


def gain_sign(df):
    """Where the formula is decisive, CLAIR's measured gain has the predicted sign."""
    decisive = df[(df["h_ratio"] <= DECISIVE_LOW) | (df["h_ratio"] >= DECISIVE_HIGH)]
    cells = decisive.groupby("cell")[["gain_clair", "formula_gain", "h_ratio"]].mean()
    agree = np.sign(cells["gain_clair"]) == np.sign(cells["formula_gain"])
    rate, interval = wilson(agree.sum(), len(cells))
    loses = cells[cells["formula_gain"] < 0]
    return dict(statistic=f"share of decisive cells (h_ratio <= {DECISIVE_LOW} or >= "
                          f"{DECISIVE_HIGH}) where sign(gain) is as predicted (Wilson)",
                expected=1.0, observed=rate, interval=interval,
                verdict=verdict(agree.all()),
                detail=f"{len(cells)} cells; CLAIR loses to local OLS in "
                       f"{int((loses['gain_clair'] < 0).sum())} of the {len(loses)} cells "
                       "where benign heterogeneity exceeds the gain.")


CHECKS = [
    Check("refinement_oracle_formula", "refinement",
          "With oracle P* and C, E||Theta_tilde_k - Theta_k||^2 = sigma^2 q [r + (p - r)/|C|]"
          " / (n - p - 1) + heterogeneity cost.", oracle_formula),
    Check("refinement_clair_vs_formula", "refinement",
          "CLAIR's measured risk ratio follows the formula (up to a subspace-estimation "
          "cost).", clair_against_formula),
    Check("refinement_gain_sign", "refinement",
          "CLAIR beats local fitting exactly when the gain exceeds the heterogeneity cost.",
          gain_sign),
]

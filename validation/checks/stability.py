"""Stable recovery (docs/theory.md, S1): the subspace error against its first-order
prediction, over every (p, q, n, K, sigma) cell, with no fitted constant."""

from __future__ import annotations

import numpy as np

from .._core import Check, mean_interval, ols_slope

# The prediction drops terms of relative order (predicted error) itself; the theory is a
# statement about the perturbative regime, so cells whose prediction exceeds 0.25 (the
# error then is a quarter of its maximum sqrt(2 r) scale, r = 2) are left out.
PERTURBATIVE = 0.25
# Equivalence margins stated with the claim: the geometric-mean ratio within a factor
# 1.25 of 1 (log-symmetric), the slope of log error on log prediction within 1 +- 0.1.
RATIO_MARGIN = (0.8, 1.25)
SLOPE_MARGIN = (0.9, 1.1)


def _perturbative(df):
    return df[df["predicted_error"] <= PERTURBATIVE]


def _span(rows):
    by_sweep = rows.groupby("sweep")
    k_span = rows["n_clients"].max() / rows["n_clients"].min()
    return (f"{len(rows)} replicates in {rows['cell'].nunique()} cells ({len(by_sweep)} "
            f"sweeps); K spans a factor {k_span:g}")


def first_order_constant(df):
    """S1: geometric mean of error / prediction is 1 (no per-regime constant)."""
    rows = _perturbative(df)
    mean, (lo, hi) = mean_interval(np.log(rows["error_ratio"]))
    by_regime = rows.groupby(["p", "q"])["error_ratio"].median()
    return dict(statistic="geometric mean of ||P_hat - P*||_F / first-order prediction "
                          "(t 95% on the log scale)", expected=1.0,
                observed=float(np.exp(mean)),
                interval=(float(np.exp(lo)), float(np.exp(hi))), n=len(rows),
                detail=_span(rows) + "; median ratio by (p, q): " + ", ".join(
                    f"({p}, {q}): {v:.3f}" for (p, q), v in by_regime.items()) + ".")


def first_order_slope(df):
    """S1: log error on log prediction across all cells has slope 1 (one intercept)."""
    rows = _perturbative(df)
    slope, interval = ols_slope(rows, "predicted_error", "subspace_error")
    slopes = {sweep: ols_slope(group, "predicted_error", "subspace_error")[0]
              for sweep, group in rows.groupby("sweep")}
    per_sweep = ", ".join(f"{sweep}: {slope:.2f}" for sweep, slope in slopes.items())
    return dict(statistic="OLS slope of log ||P_hat - P*||_F on log prediction, every cell, "
                          "one intercept (95%)", expected=1.0, observed=slope,
                interval=interval, n=len(rows),
                detail=_span(rows) + f"; slope within each sweep: {per_sweep}.")


CHECKS = [
    Check("stability_first_order_constant", "stability",
          "||P_hat - P*||_F = s_E (2 (p - r) sum_j s_j^-2)^(1/2) (1 + o(1)) in every "
          "(p, q, n, K, sigma) regime: error / prediction has geometric mean 1.",
          first_order_constant, margin=RATIO_MARGIN, source="docs/theory.md#s1"),
    Check("stability_first_order_slope", "stability",
          "The same prediction, as a law: log error on log prediction has slope 1 across "
          "all regimes with one common intercept.", first_order_slope, margin=SLOPE_MARGIN,
          source="docs/theory.md#s1"),
]

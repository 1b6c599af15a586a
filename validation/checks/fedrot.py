"""Checks of study 5 (FedRot-LoRA) against its results table."""

from __future__ import annotations

import numpy as np

from .._core import Check, verdict, wilson

__all__ = ["CHECKS", "max_at_most"]

EPS = np.finfo(np.float64).eps
# Exact identities in float64: relative residuals are sums of O(n r) rounded products,
# below ~1e2 eps; 1e4 eps (2.2e-12) leaves a margin and is far below any real effect.
IDENTITY_TOL = 1e4 * EPS
# Quantities that pass through an SVD / polar factor of an r x r cross product lose up to
# eps * cond(M) digits; sqrt(eps) (1.5e-8) allows a condition number up to ~1e7.
SVD_TOL = np.sqrt(EPS)


def max_at_most(df, column, bound, statistic, expected=0.0):
    """Verdict ``max(df[column]) <= bound``; the interval is ``(min, max)`` observed."""
    values = np.asarray(df[column], dtype=float)
    observed = float(np.max(values))
    return {"statistic": statistic, "expected": expected, "observed": observed,
            "interval": (float(np.min(values)), observed),
            "verdict": verdict(np.all(np.isfinite(values)) and observed <= bound),
            "detail": f"bound {bound:.3g} over {len(values)} replicates"}


def identity(df):
    return max_at_most(df, "identity_residual", IDENTITY_TOL,
                       "max ||E - sum p_i (B_i - B_bar)(A_i - A_bar)|| / ||E||")


def cauchy_schwarz(df):
    return max_at_most(df, "cs_ratio", 1.0 + IDENTITY_TOL,
                       "max ||E|| / (sum p_i||B_i-B_bar||^2 sum p_i||A_i-A_bar||^2)^(1/2)",
                       expected=1.0)


def products_kept(df):
    return max_at_most(df, "product_drift", IDENTITY_TOL,
                       "max_i ||B_i R A'_i - B_i A_i|| / ||B_i A_i|| after alignment")


def soft_bound(df):
    rows = df[df["lam"] > 0]
    return max_at_most(rows, "soft_bound_ratio", 1.0 + IDENTITY_TOL,
                       "max ||R_lam - I||_F / (2 lam ||R - I||_F)", expected=1.0)


def vanishing_error(df):
    rows = df[(df["heterogeneity"] == 0) & (df["lam"] == 1.0)]
    result = max_at_most(rows.assign(error=np.maximum(rows["error_rot_a"],
                                                      rows["error_rot_b"])),
                         "error", SVD_TOL, "max relative error of hard FedRot (A and B)")
    result["detail"] += f"; FedIT error there: median {rows['error_fedit'].median():.3g}"
    return result


def alignment_helps(df):
    rows = df[df["lam"] == 1.0]
    wins = int(np.sum(rows["error_rot_a"] < rows["error_fedit"]))
    rate, (lo, hi) = wilson(wins, len(rows))
    by_h = rows.groupby("heterogeneity")[["error_fedit", "error_rot_a"]].median()
    return {"statistic": "P(hard FedRot error < FedIT error)", "expected": 1.0,
            "observed": rate, "interval": (lo, hi), "verdict": verdict(lo > 0.5),
            "detail": "median errors by heterogeneity: " + "; ".join(
                f"h={h:g}: FedIT {r.error_fedit:.3g}, FedRot {r.error_rot_a:.3g}"
                for h, r in by_h.iterrows())}


CHECKS = [
    Check("fedrot_error_identity", "fedrot",
          "FedIT's error is exactly E = sum p_i (B_i - B_bar)(A_i - A_bar)", identity),
    Check("fedrot_cauchy_schwarz", "fedrot",
          "||E||_F <= (sum p_i ||B_i - B_bar||^2)^(1/2) (sum p_i ||A_i - A_bar||^2)^(1/2)",
          cauchy_schwarz),
    Check("fedrot_products_kept", "fedrot",
          "Aligned factors keep every client product B_i A_i exactly", products_kept),
    Check("fedrot_soft_rotation_bound", "fedrot",
          "||R_lam - I||_F <= 2 lam ||R - I||_F for the soft rotation", soft_bound),
    Check("fedrot_identical_updates", "fedrot",
          "Identical updates under random rotations: hard-aligned error is zero",
          vanishing_error),
    Check("fedrot_alignment_helps", "fedrot",
          "Hard alignment lowers the aggregation error of factor averaging",
          alignment_helps),
]

"""FedRot-LoRA (docs/theory.md, F1-F3): checks on the ``fedrot`` table.

Identity checks (exact facts of the algebra, unit-test grade) and theory checks (the
seed's statement that alignment tightens the error bound under rotational mismatch).
"""

from __future__ import annotations

import numpy as np

from .._core import INF, Check, mean_interval, wilson

__all__ = ["CHECKS", "range_of", "IDENTITY_TOL", "SVD_TOL"]

EPS = np.finfo(np.float64).eps
# Exact identities in float64: relative residuals are sums of O(n r) rounded products,
# below ~1e2 eps; 1e4 eps (2.2e-12) leaves a margin and is far below any real effect.
IDENTITY_TOL = 1e4 * EPS
# Quantities that pass through an SVD / polar factor of an r x r cross product lose up to
# eps * cond(M) digits; sqrt(eps) (1.5e-8) allows a condition number up to ~1e7.
SVD_TOL = np.sqrt(EPS)
# "Strictly tighter": the aligned bound is below the unaligned one by more than rounding.
# The bounds are products of sums of squares computed in float64; a relative 1e-6 is far
# above their rounding (~1e-15) and far below any effect of a rotation.
STRICT = 1e-6


def range_of(df, column, statistic, expected=0.0):
    """An identity check's result: the observed ``(min, max)`` of ``column`` as interval."""
    values = np.asarray(df[column], dtype=float)
    if values.size == 0:
        raise ValueError(f"no rows for {column!r}")
    finite = np.all(np.isfinite(values))
    return {"statistic": statistic, "expected": expected,
            "observed": float(np.max(values)) if finite else float("nan"),
            "interval": (float(np.min(values)), float(np.max(values))) if finite
            else (float("nan"), float("nan")),
            "n": int(values.size), "detail": f"over {len(values)} replicates"}


def _hard(df, gauge):
    return df[(df["lam"] == 1.0) & (df["gauge"] == gauge)]


def identity(df):
    return range_of(df, "identity_residual",
                    "max ||E - sum p_i (B_i - B_bar)(A_i - A_bar)|| / ||Delta W*||")


def cauchy_schwarz(df):
    return range_of(df, "cs_excess", "max (||E|| - CS bound) / ||Delta W*||")


def bound_valid_after(df):
    return range_of(df, "bound_excess_after", "max (||E_aligned|| - aligned CS bound) / "
                    "||Delta W*||, align A, B and concatenated, both mismatches")


def products_kept(df):
    return range_of(df, "product_drift",
                    "max_i ||B_i R A'_i - B_i A_i|| / ||B_i A_i|| after alignment")


def soft_bound(df):
    # Identical, ungauged clients (no mismatch at all): every hard rotation is I up to
    # rounding, and the ratio is rounding over rounding, not a statement about R_lam.
    degenerate = (df["gauge"] == "none") & (df["heterogeneity"] == 0)
    result = range_of(df[(df["lam"] > 0) & ~degenerate], "soft_bound_ratio",
                      "max ||R_lam - I||_F / (2 lam ||R - I||_F)", expected=1.0)
    result["detail"] += f"; {int(((df['lam'] > 0) & degenerate).sum())} replicates without " \
                        "any mismatch (R = I up to rounding) left out"
    return result


def vanishing_error(df):
    rows = df[(df["heterogeneity"] == 0) & (df["lam"] == 1.0) & (df["gauge"] == "rotation")]
    result = range_of(rows.assign(error=rows[["error_rot_a", "error_rot_b",
                                              "error_rot_ab"]].max(axis=1)),
                      "error", "max relative error of hard FedRot (A, B, concatenated)")
    result["detail"] += f"; FedIT error there: median {rows['error_fedit'].median():.3g}"
    return result


def _tightening(df, mode, gauge):
    # Without heterogeneity no ratio says anything about the claim: without gauges both
    # bounds are 0 (no ratio); under rotations the aligned bound is exactly 0, an
    # identity (fedrot_identical_updates), and a quarter of the rows at 0 carried the
    # pooled mean: a rule 20% looser in every other replicate passed, at 0.90 [0.81, 0.99].
    rows = _hard(df, gauge)
    rows = rows[rows["heterogeneity"] > 0]
    ratio = rows[f"bound_ratio_{mode}"]
    mean, interval = mean_interval(ratio, bounds=(0.0, INF))
    by_h = rows.groupby("heterogeneity")[f"bound_ratio_{mode}"].mean()
    return dict(statistic=f"mean aligned / unaligned CS bound, align {mode.upper()}, hard, "
                          f"{gauge} mismatch (t 95%)", expected="< 1", observed=mean,
                interval=interval, n=len(rows),
                detail=f"{len(rows)} replicates; by heterogeneity: " + ", ".join(
                    f"{h:g}: {v:.3f}" for h, v in by_h.items()) + "; looser in "
                    f"{int((ratio > 1).sum())} of {len(rows)} replicates (largest ratio "
                    f"{ratio.max():.4g}).")


def alignment_tightens_bound(df):
    return _tightening(df, "a", "rotation")


def b_alignment_tightens_bound(df):
    return _tightening(df, "b", "rotation")


def concatenated_tightens_bound(df):
    return _tightening(df, "ab", "rotation")


def not_looser_without_rotation(df):
    return _tightening(df, "a", "none")


def alignment_helps(df):
    rows = _hard(df, "rotation")
    wins = int(np.sum(rows["error_rot_a"] < rows["error_fedit"] * (1 - STRICT)))
    rate, interval = wilson(wins, len(rows))
    by_h = rows.groupby("heterogeneity")[["error_fedit", "error_rot_a"]].median()
    return {"statistic": "P(hard FedRot error < FedIT error), rotational mismatch (Wilson)",
            "expected": "> 0.5", "observed": rate, "interval": interval, "n": len(rows),
            "detail": "median errors by heterogeneity: " + "; ".join(
                f"h={h:g}: FedIT {r.error_fedit:.3g}, FedRot {r.error_rot_a:.3g}"
                for h, r in by_h.iterrows())}


_SOURCE = "docs/theory.md#f1"
CHECKS = [
    Check("fedrot_error_identity", "fedrot",
          "FedIT's error is exactly E = sum p_i (B_i - B_bar)(A_i - A_bar)", identity,
          kind="identity", margin=(-INF, IDENTITY_TOL), source=_SOURCE),
    Check("fedrot_cauchy_schwarz", "fedrot",
          "||E||_F <= (sum p_i ||B_i - B_bar||^2)^(1/2) (sum p_i ||A_i - A_bar||^2)^(1/2)",
          cauchy_schwarz, kind="identity", margin=(-INF, IDENTITY_TOL), source=_SOURCE),
    Check("fedrot_bound_valid_after_alignment", "fedrot",
          "The bound, evaluated on the aligned factors, still bounds the aligned rule's "
          "error, under rotational and non-rotational mismatch", bound_valid_after,
          kind="identity", margin=(-INF, IDENTITY_TOL), source="docs/theory.md#f2"),
    Check("fedrot_products_kept", "fedrot",
          "Aligned factors keep every client product B_i A_i exactly", products_kept,
          kind="identity", margin=(-INF, IDENTITY_TOL), source=_SOURCE),
    Check("fedrot_soft_rotation_bound", "fedrot",
          "||R_lam - I||_F <= 2 lam ||R - I||_F for the soft rotation", soft_bound,
          kind="identity", margin=(-INF, 1.0 + IDENTITY_TOL), source=_SOURCE),
    Check("fedrot_identical_updates", "fedrot",
          "Identical updates under random rotations: hard-aligned error is zero",
          vanishing_error, kind="identity", margin=(-INF, SVD_TOL), source=_SOURCE),
    Check("fedrot_alignment_tightens_bound", "fedrot",
          "Under rotational mismatch, hard alignment (of A) gives a strictly tighter upper "
          "bound on the aggregation error than no alignment", alignment_tightens_bound,
          margin=(-INF, 1.0 - STRICT), source="docs/theory.md#f2"),
    Check("fedrot_b_alignment_tightens_bound", "fedrot",
          "The same for the alignment of B (rotation from B_i^T B_ref)",
          b_alignment_tightens_bound, margin=(-INF, 1.0 - STRICT),
          source="docs/theory.md#f3"),
    Check("fedrot_concatenated_tightens_bound", "fedrot",
          "The same for the alignment of the concatenated factors (B_i^T, A_i)",
          concatenated_tightens_bound, margin=(-INF, 1.0 - STRICT),
          source="docs/theory.md#f3"),
    Check("fedrot_bound_not_looser_non_rotational", "fedrot",
          "Under non-rotational mismatch alone, alignment does not loosen the bound on "
          "average over replicates (per replicate it can: the detail counts how often)",
          not_looser_without_rotation, margin=(-INF, 1.0), source="docs/theory.md#f2"),
    Check("fedrot_alignment_helps", "fedrot",
          "Under rotational mismatch, hard alignment lowers the aggregation error of "
          "factor averaging more often than not", alignment_helps,
          margin=(0.5, INF), source="docs/theory.md#f2"),
]

"""Checks of study 6 (GLoRA) against its results table."""

from __future__ import annotations

from .._core import Check, verdict, wilson
from .fedrot import IDENTITY_TOL, SVD_TOL, max_at_most

__all__ = ["CHECKS"]

# Below this eigengap of the consensus matrix at R the reference subspace is not
# determined by the data (and neither is the aggregate); such rows say nothing about
# invariance. 1e-6 is 1e10 eps: eigenvectors are still accurate to ~eps / gap = 1e-10.
MIN_EIGENGAP = 1e-6
# A rule "moves" under the gauges when its aggregate changes by more than 1% of its norm,
# six orders above GLoRA's rounding-level changes.
MOVED = 1e-2


def invariance(df):
    rows = df[(df["eigengap"] > MIN_EIGENGAP) | (df["reference_rank"] >= df["union_rank"])]
    result = max_at_most(rows, "gauge_change_glora", SVD_TOL,
                         "max ||GLoRA(gauged) - GLoRA|| / ||GLoRA||")
    result["detail"] += f"; {len(df) - len(rows)} rows without an eigengap at R left out"
    return result


def others_move(df):
    moved = (df["gauge_change_fedit"] > MOVED) & (df["gauge_change_fedrot"] > MOVED)
    rate, (lo, hi) = wilson(int(moved.sum()), len(df))
    return {"statistic": "P(FedIT and FedRot aggregates both move by > 1% under gauges)",
            "expected": 1.0, "observed": rate, "interval": (lo, hi),
            "verdict": verdict(lo > 0.5),
            "detail": f"median moves: FedIT {df['gauge_change_fedit'].median():.3g}, "
                      f"FedRot {df['gauge_change_fedrot'].median():.3g}, GLoRA "
                      f"{df['gauge_change_glora'].median():.3g}"}


def exact(df):
    rows = df[df["reference_rank"] >= df["union_rank"]]
    return max_at_most(rows, "error_glora", IDENTITY_TOL,
                       "max ||Delta W* - GLoRA|| / ||Delta W*|| for R >= union rank")


def error_formula(df):
    rows = df[df["reference_rank"] < df["union_rank"]]
    result = max_at_most(rows, "identity_residual", SVD_TOL,
                         "max ||(Delta W* - GLoRA) - (I - P_ref) Delta W*|| / ||Delta W*||")
    result["detail"] += f"; median error there {rows['error_glora'].median():.3g}"
    return result


def readout(df):
    return max_at_most(df.assign(gap=df["readout_gap"].abs()), "gap", IDENTITY_TOL,
                       "max |(||U - BA|| - sqrt(sum_{j>r} s_j^2))| / ||U||")


CHECKS = [
    Check("glora_gauge_invariance", "glora",
          "GLoRA's aggregate is invariant under invertible per-client gauges", invariance),
    Check("glora_others_not_invariant", "glora",
          "FedIT and FedRot aggregates change under general invertible gauges", others_move),
    Check("glora_exact_full_rank", "glora",
          "GLoRA is exact when R >= the rank of the union of client subspaces", exact),
    Check("glora_error_formula", "glora",
          "For R < union rank, GLoRA's error is (I - P_ref) Delta W*", error_formula),
    Check("glora_readout_optimal", "glora",
          "The rank-r readout is the best rank-r approximation (Eckart-Young)", readout),
]

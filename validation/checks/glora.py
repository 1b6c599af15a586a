"""GLoRA (docs/theory.md, G1-G4): identity checks on the ``glora`` table.

Every GLoRA claim is an exact fact of linear algebra (invariance, exactness, error
formula, Eckart-Young readout): these checks can only fail through a coding error and
are counted as identity checks, not as evidence.
"""

from __future__ import annotations

import pandas as pd

from .._core import INF, Check
from .fedrot import IDENTITY_TOL, SVD_TOL, range_of

__all__ = ["CHECKS"]

# Below this eigengap of the consensus matrix at R the reference subspace is not
# determined by the data (and neither is the aggregate); such rows say nothing about
# invariance. 1e-6 is 1e10 eps: eigenvectors are still accurate to ~eps / gap = 1e-10.
MIN_EIGENGAP = 1e-6
# A rule "moves" under the gauges when its aggregate changes by more than 1% of its norm,
# six orders above GLoRA's rounding-level changes.
MOVED = 1e-2


def _mixed(df):
    column = df["mixed_ranks"] if "mixed_ranks" in df else pd.Series(False, index=df.index)
    return column.fillna(False).astype(bool)


def invariance(df):
    rows = df[(df["eigengap"] > MIN_EIGENGAP) | (df["reference_rank"] >= df["union_rank"])]
    result = range_of(rows, "gauge_change_glora", "max ||GLoRA(gauged) - GLoRA|| / ||GLoRA||")
    result["detail"] += f"; {len(df) - len(rows)} rows without an eigengap at R left out"
    return result


def others_move(df):
    rows = df[~_mixed(df)]
    moved = rows[["gauge_change_fedit", "gauge_change_fedrot"]].min(axis=1)
    result = range_of(rows.assign(moved=moved), "moved",
                      "min over replicates of min(FedIT move, FedRot move) under gauges")
    result["detail"] += (f"; median moves: FedIT {rows['gauge_change_fedit'].median():.3g}, "
                         f"FedRot {rows['gauge_change_fedrot'].median():.3g}")
    return result


def exact(df):
    rows = df[(df["reference_rank"] >= df["union_rank"]) & ~_mixed(df)]
    return range_of(rows, "error_glora", "max ||Delta W* - GLoRA|| / ||Delta W*|| for R >= "
                    "union rank")


def error_formula(df):
    rows = df[df["reference_rank"] < df["union_rank"]]
    result = range_of(rows, "identity_residual",
                      "max ||(Delta W* - GLoRA) - (I - P_ref) Delta W*|| / ||Delta W*||")
    result["detail"] += f"; median error there {rows['error_glora'].median():.3g}"
    return result


def _readout_gaps(df):
    """Each row's readout gap, or 1 (the whole update's norm) where the readout is not of
    the claimed rank (r; max r_i for mixed ranks): the study measures the gap at the
    readout's own rank, where any truncated SVD, or none, is optimal, so a readout at
    another rank passed with a gap of 0 (a review). Returns (gaps, rows at another rank)."""
    from simulations.studies.glora import client_ranks  # lazily: the study's own rule

    mixed = _mixed(df)
    claimed = [max(client_ranks(int(n), int(r), bool(m)))
               for n, r, m in zip(df["n_clients"], df["rank"], mixed)]
    wrong = df["readout_rank"].to_numpy() != claimed
    return df["readout_gap"].abs().where(~wrong, 1.0), int(wrong.sum())


def _readout_range(rows, statistic):
    gaps, wrong = _readout_gaps(rows)
    result = range_of(rows.assign(gap=gaps), "gap", statistic)
    result["detail"] += f"; {wrong} rows read out at another rank"
    return result


def readout(df):
    return _readout_range(df, "max |(||U - BA|| - sqrt(sum_{j>r} s_j^2))| / ||U||, a "
                              "readout at another rank than r counted as 1")


def mixed_exact(df):
    rows = df[(df["reference_rank"] >= df["union_rank"]) & _mixed(df)]
    return range_of(rows, "error_glora", "max ||Delta W* - GLoRA|| / ||Delta W*||, clients of "
                    "ranks r-1, r, r+1, R >= union rank")


def mixed_readout(df):
    return _readout_range(df[_mixed(df)], "max readout optimality gap, clients of different "
                                          "ranks (readout at max r_i; at another rank "
                                          "counted as 1)")


_SOURCE = "docs/theory.md#g1"
CHECKS = [
    Check("glora_gauge_invariance", "glora",
          "GLoRA's aggregate is invariant under invertible per-client gauges", invariance,
          kind="identity", margin=(-INF, SVD_TOL), source=_SOURCE),
    Check("glora_others_not_invariant", "glora",
          "FedIT and FedRot aggregates change under general invertible gauges", others_move,
          kind="identity", margin=(MOVED, INF), source=_SOURCE),
    Check("glora_exact_full_rank", "glora",
          "GLoRA is exact when R >= the rank of the union of client subspaces", exact,
          kind="identity", margin=(-INF, IDENTITY_TOL), source=_SOURCE),
    Check("glora_error_formula", "glora",
          "For R < union rank, GLoRA's error is (I - P_ref) Delta W*", error_formula,
          kind="identity", margin=(-INF, SVD_TOL), source=_SOURCE),
    Check("glora_readout_optimal", "glora",
          "The rank-r readout is the best rank-r approximation (Eckart-Young)", readout,
          kind="identity", margin=(-INF, IDENTITY_TOL), source=_SOURCE),
    Check("glora_mixed_ranks_exact", "glora",
          "For clients of different ranks, GLoRA is exact when R >= the union rank",
          mixed_exact, kind="identity", margin=(-INF, IDENTITY_TOL),
          source="docs/theory.md#g2"),
    Check("glora_mixed_ranks_readout", "glora",
          "For clients of different ranks, the readout (rank max r_i) is the best "
          "approximation of that rank", mixed_readout, kind="identity",
          margin=(-INF, IDENTITY_TOL), source="docs/theory.md#g2"),
]

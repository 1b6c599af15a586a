"""Study 6, GLoRA: gauge invariance, exactness at full reference rank, error formula.

Client i's column space lies in a shared ``union_dim``-dimensional subspace S, up to an
off-subspace perturbation ``off_subspace``: ``B_i = S C_i + off_subspace * N_i`` (d, r),
``A_i`` Gaussian. Every client is then re-written in a random invertible gauge
``(B_i G_i, G_i^{-1} A_i)`` with condition number ``gauge_condition``. Each replicate
measures, for one reference rank R: GLoRA's error and its predicted value
``||(I - P_ref) Delta W*||`` (P_ref from the dense consensus matrix, computed
independently), how much each rule's aggregate moves under the gauges (GLoRA, FedIT,
FedRot) and the optimality gap of the rank-r readout. Cells with ``mixed_ranks`` give the
clients ranks r - 1, r, r + 1 (GLoRA's readout for clients of different ranks; factor
averaging is undefined there).
"""

from __future__ import annotations

import numpy as np
import scipy.stats

from clairstat.aggregation import aggregate

from .._framework import Study, grid

__all__ = ["STUDY", "simulate_one", "client_factors", "random_gauge"]


def client_ranks(n_clients, rank, mixed):
    """Every client's rank: ``rank``, or cycling through rank - 1, rank, rank + 1."""
    if not mixed:
        return [rank] * n_clients
    return [max(1, rank - 1 + i % 3) for i in range(n_clients)]


def client_factors(rng, n_clients, d, k, rank, union_dim, off_subspace, mixed=False):
    """Factors whose column spaces share a ``union_dim``-dimensional subspace."""
    shared = np.linalg.qr(rng.standard_normal((d, union_dim)))[0]
    return [(shared @ rng.standard_normal((union_dim, r))
             + off_subspace * rng.standard_normal((d, r)),
             rng.standard_normal((r, k)) / np.sqrt(k))
            for r in client_ranks(n_clients, rank, mixed)]


def random_gauge(rng, rank, condition):
    """Invertible (r, r) matrix ``Q1 diag(s) Q2`` with singular values in [1, condition]."""
    rotations = scipy.stats.ortho_group.rvs(rank, size=2, random_state=rng)
    singular = np.exp(rng.uniform(0.0, np.log(condition), rank))
    return (rotations[0] * singular) @ rotations[1]


def _regauge(rng, factors, condition):
    gauges = [random_gauge(rng, b.shape[1], condition) for b, _ in factors]
    return [(b @ g, np.linalg.solve(g, a)) for (b, a), g in zip(factors, gauges)]


def _dense_reference(factors, weights, reference_rank):
    """Top-R eigenvectors and eigengap of K = sum p_i U_i U_i^T, formed densely (d x d)."""
    consensus = sum(w * (q @ q.T) for w, q in
                    ((w, np.linalg.qr(b)[0]) for (b, _), w in zip(factors, weights)))
    values, vectors = np.linalg.eigh(consensus)
    values, vectors = values[::-1], vectors[:, ::-1]
    gap = values[reference_rank - 1] - (values[reference_rank] if reference_rank < len(values)
                                         else 0.0)
    return vectors[:, :reference_rank], float(gap)


def _readout_gap(result, rank):
    """(||U - B A|| - Eckart-Young optimum) / ||U||, U the GLoRA update."""
    singular = np.linalg.svd(result.update, compute_uv=False)
    b_mat, a_mat = result.factors
    optimum = np.sqrt(np.sum(singular[rank:] ** 2))
    return (np.linalg.norm(result.update - b_mat @ a_mat) - optimum) / np.linalg.norm(
        result.update)


def _moved(rule, factors, regauged, weights, **options):
    before = aggregate(rule, factors, weights, **options).update
    after = aggregate(rule, regauged, weights, **options).update
    return float(np.linalg.norm(after - before) / np.linalg.norm(before))


def _gauge_changes(factors, regauged, weights, reference_rank, mixed):
    """How far each rule moves under the gauges (FedIT/FedRot need equal ranks: NaN)."""
    glora = _moved("glora", factors, regauged, weights, reference_rank=reference_rank)
    if mixed:
        return {"gauge_change_glora": glora, "gauge_change_fedit": np.nan,
                "gauge_change_fedrot": np.nan}
    return {"gauge_change_glora": glora,
            "gauge_change_fedit": _moved("fedit", factors, regauged, weights),
            "gauge_change_fedrot": _moved("fedrot", factors, regauged, weights)}


def _factor_rules(factors, weights, exact, mixed, relative):
    if mixed:  # factor averaging is undefined for clients of different ranks
        return {"error_fedit": np.nan, "error_fedrot": np.nan}
    return {"error_fedit": relative(exact - aggregate("fedit", factors, weights).update),
            "error_fedrot": relative(exact - aggregate("fedrot", factors, weights).update)}


def simulate_one(params, seed):
    """One replicate at one reference rank; errors relative to ||Delta W*||_F."""
    rng = np.random.default_rng(seed)
    rank, ref_rank = params["rank"], params["reference_rank"]
    mixed = bool(params.get("mixed_ranks", False))
    factors = client_factors(rng, params["n_clients"], params["d"], params["k"], rank,
                             params["union_dim"], params["off_subspace"], mixed)
    weights = rng.dirichlet(np.full(params["n_clients"], 5.0))
    regauged = _regauge(rng, factors, params["gauge_condition"])
    exact = aggregate("flora", factors, weights).update
    result = aggregate("glora", factors, weights, reference_rank=ref_rank)
    basis, gap = _dense_reference(factors, weights, ref_rank)
    off_part = exact - basis @ (basis.T @ exact)
    relative = lambda matrix: float(np.linalg.norm(matrix) / np.linalg.norm(exact))  # noqa: E731
    return {"union_rank": result.union_rank, "eigengap": gap,
            "error_glora": relative(exact - result.update),
            "predicted_error": relative(off_part),
            "identity_residual": relative(exact - result.update - off_part),
            **_factor_rules(factors, weights, exact, mixed, relative),
            "readout_rank": int(result.factors[0].shape[1]),
            "readout_gap": float(_readout_gap(result, result.factors[0].shape[1])),
            **_gauge_changes(factors, regauged, weights, ref_rank, mixed)}


_BASE = dict(n_clients=8, d=48, k=32, rank=3, union_dim=6, gauge_condition=10.0)
STUDY = Study(
    name="glora",
    description="GLoRA: gauge invariance (vs FedIT, FedRot), exactness when R >= union "
                "rank, error = ||(I - P_ref) Delta W*|| otherwise, readout optimality",
    grids={"smoke": grid(**{**_BASE, "d": 16, "k": 12, "n_clients": 4}, off_subspace=[0.0, 0.05],
                         reference_rank=[2, 6, 12])
           + grid(**{**_BASE, "d": 16, "k": 12, "n_clients": 4}, off_subspace=0.05,
                  reference_rank=[2, 16], mixed_ranks=True),
           "small": grid(**_BASE, off_subspace=[0.0, 0.05], reference_rank=[2, 4, 6, 8, 16, 24])
           + grid(**_BASE, off_subspace=[0.0, 0.05], reference_rank=[2, 6, 16, 32],
                  mixed_ranks=True),
           "full": grid(**_BASE, off_subspace=[0.0, 0.01, 0.05, 0.2],
                        reference_rank=[1, 2, 3, 4, 5, 6, 8, 12, 16, 20, 24])
           + grid(**_BASE, off_subspace=[0.0, 0.01, 0.05, 0.2],
                  reference_rank=[2, 4, 6, 8, 16, 24, 32], mixed_ranks=True)},
    replicates={"smoke": 3, "small": 30, "full": 200},
    simulate_one=simulate_one)

"""Study 5, FedRot-LoRA: factor-averaging error and its bound, before and after alignment.

Clients hold one common update ``B0 A0`` perturbed by heterogeneity h and, under
*rotational mismatch* (``gauge="rotation"``), written in a random SO(r) gauge:
``B_i = (B0 + h N_i) G_i``, ``A_i = G_i^T (A0 + h M_i)``; with ``gauge="none"`` the
mismatch is the heterogeneity alone (non-rotational). At h = 0 under rotations every
client has the same update, where hard alignment must make the aggregation error vanish.

Each replicate measures, for one (gauge, h, lam): FedIT's error and its identity /
Cauchy-Schwarz bound ``(sum p_i ||B_i - B_bar||^2 sum p_i ||A_i - A_bar||^2)^(1/2)``; the
same bound after aligning A (the package's FedRot), B, and the concatenated factors
``(B_i^T, A_i)`` (one rotation maximising ``tr(R^T (A_i A_ref^T + B_i^T B_ref))``, built
from the public ``alignment_rotation``/``soft_rotation``); each aligned rule's error; the
product drift of the aligned factors and the soft-rotation bound
``||R_lam - I||_F <= 2 lam ||R - I||_F``.

Control ``no-alignment``: every rotation is the identity (FedRot without rotation).
Control ``spread-alignment``: FedRot's rotations (A, B and concatenated) with every other
client's sign reversed, ``R_i -> -R_i`` for odd i: every product ``B_i A_i`` is kept, but
the factors' weighted means nearly cancel, so the clients are spread further apart than
their random gauges left them (an alignment that loosens the bound).
"""

from __future__ import annotations

import numpy as np
import scipy.stats

from clairstat.aggregation import aggregate, alignment_rotation, soft_rotation

from .._framework import Study, grid
from ._common import check_control

__all__ = ["STUDY", "simulate_one", "client_factors", "factor_bound"]

LAMBDAS = [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0]
TINY = np.finfo(float).tiny
EPS = np.finfo(float).eps
# A bound (relative to ||Delta W*||) this small is the rounding of the weighted means of
# identical clients (at most 2.6e-31 there; the smallest real mismatch of the grids,
# heterogeneity 0.05, gives 3.6e-3): a ratio of two such bounds is rounding over
# rounding, and its value depends on the BLAS kernels of the machine (0.99 under one
# kernel, 1.29 under another, for one seed).
# 1e4 eps is the identity checks' tolerance, far above eps^2 and far below any mismatch.
BOUND_FLOOR = 1e4 * EPS
# A hard rotation this close to I is the Procrustes solution of a symmetric positive
# cross product perturbed by rounding (an SVD loses eps * cond digits; sqrt(eps) allows a
# condition number of 1e7): its direction, and any ratio to it, is machine rounding.
ROTATION_FLOOR = np.sqrt(EPS)


def client_factors(rng, n_clients, d, k, rank, heterogeneity, gauge="rotation"):
    """Perturbed copies of one rank-``rank`` update, in random SO(r) gauges or none."""
    b0 = rng.standard_normal((d, rank)) / np.sqrt(d)
    a0 = rng.standard_normal((rank, k)) / np.sqrt(k)
    if gauge == "rotation":
        gauges = scipy.stats.special_ortho_group.rvs(rank, size=n_clients, random_state=rng)
    else:
        gauges = np.broadcast_to(np.eye(rank), (n_clients, rank, rank))
    noise_b = heterogeneity * rng.standard_normal((n_clients, d, rank)) / np.sqrt(d)
    noise_a = heterogeneity * rng.standard_normal((n_clients, rank, k)) / np.sqrt(k)
    return [((b0 + nb) @ g, g.T @ (a0 + na)) for g, nb, na in zip(gauges, noise_b, noise_a)]


def factor_bound(factors, weights):
    """``(sum p_i ||B_i - B_bar||^2)^(1/2) (sum p_i ||A_i - A_bar||^2)^(1/2)``."""
    b_bar = sum(w * b for (b, _), w in zip(factors, weights))
    a_bar = sum(w * a for (_, a), w in zip(factors, weights))
    spread_b = sum(w * np.sum((b - b_bar) ** 2) for (b, _), w in zip(factors, weights))
    spread_a = sum(w * np.sum((a - a_bar) ** 2) for (_, a), w in zip(factors, weights))
    return float(np.sqrt(spread_b * spread_a))


def _fedit_identity(factors, weights, exact):
    """Residual of E = sum p_i (B_i - B_bar)(A_i - A_bar) and the excess
    ``||E|| - CS bound`` (<= 0 up to rounding), both relative to ``||Delta W*||`` (the
    problem's scale; E itself is 0 without any mismatch)."""
    res = aggregate("fedit", factors, weights)
    b_bar, a_bar = res.factors
    error = exact - res.update
    identity = sum(w * (b - b_bar) @ (a - a_bar) for (b, a), w in zip(factors, weights))
    scale = np.linalg.norm(exact)
    return (np.linalg.norm(error - identity) / scale,
            (np.linalg.norm(error) - factor_bound(factors, weights)) / scale)


def _soft_bound_ratio(result, factors, lam):
    """max_i ||R_lam,i - I|| / (2 lam ||R_i - I||) (hard R_i from the same reference),
    over the clients whose hard rotation is not I up to rounding; NaN when none is."""
    if lam == 0:
        return 0.0
    b_ref, a_ref = aggregate("fedit", factors, result.weights).factors
    ratios = []
    for (_, a), soft in zip(factors, result.rotations):
        hard = alignment_rotation(a @ a_ref.T)
        eye = np.eye(len(hard))
        departure = np.linalg.norm(hard - eye)
        if departure > ROTATION_FLOOR:
            ratios.append(np.linalg.norm(soft - eye) / (2 * lam * departure))
    return float(max(ratios, default=np.nan))


def _product_drift(aligned, factors):
    return float(max(np.linalg.norm(br @ ar - b @ a) / np.linalg.norm(b @ a)
                     for (b, a), (br, ar) in zip(factors, aligned)))


def align_concatenated(factors, weights, lam):
    """Rotate each client by the R maximising ``tr(R^T (A_i A_ref^T + B_i^T B_ref))``.

    The Procrustes problem of the concatenated factors ``[B_i^T, A_i]`` (r, d + k) against
    the FedIT reference; returns the aligned factors ``(B_i R_i, R_i^T A_i)``.
    """
    b_ref, a_ref = aggregate("fedit", factors, weights).factors
    rotations = [soft_rotation(alignment_rotation(a @ a_ref.T + b.T @ b_ref), lam)
                 for b, a in factors]
    return [(b @ rot, rot.T @ a) for (b, a), rot in zip(factors, rotations)]


def _aligned_rules(factors, weights, lam):
    """Aligned factors of FedRot on A, on B and on the concatenation."""
    return {"a": aggregate("fedrot", factors, weights, align="A", lam=lam).aligned_factors,
            "b": aggregate("fedrot", factors, weights, align="B", lam=lam).aligned_factors,
            "ab": align_concatenated(factors, weights, lam)}


def _spread(aligned):
    """The ``spread-alignment`` control: every other client's rotation negated."""
    return [(b_mat * (-1.0) ** i, a_mat * (-1.0) ** i)
            for i, (b_mat, a_mat) in enumerate(aligned)]


def simulate_one(params, seed, control=None):
    """One replicate: errors relative to ||Delta W*||_F, bounds, and the identity checks."""
    check_control(control, STUDY)
    rng = np.random.default_rng(seed)
    factors = client_factors(rng, params["n_clients"], params["d"], params["k"],
                             params["rank"], params["heterogeneity"], params["gauge"])
    weights = rng.dirichlet(np.full(params["n_clients"], 5.0))
    exact = aggregate("flora", factors, weights).update
    scale = np.linalg.norm(exact)
    identity_residual, cs_excess = _fedit_identity(factors, weights, exact)
    lam = 0.0 if control == "no-alignment" else params["lam"]  # the control rotates nothing
    before = factor_bound(factors, weights)
    out = {"error_fedit": np.linalg.norm(exact - aggregate("fedit", factors, weights).update)
           / scale, "bound_before": before / scale,
           "identity_residual": float(identity_residual), "cs_excess": float(cs_excess)}
    drift, excess = 0.0, -np.inf
    for mode, aligned in _aligned_rules(factors, weights, lam).items():
        if control == "spread-alignment":
            aligned = _spread(aligned)
        b_bar = sum(w * b for (b, _), w in zip(aligned, weights))
        a_bar = sum(w * a for (_, a), w in zip(aligned, weights))
        error = np.linalg.norm(exact - b_bar @ a_bar)
        after = factor_bound(aligned, weights)
        out[f"error_rot_{mode}"] = error / scale
        out[f"bound_after_{mode}"] = after / scale
        # no mismatch before (identical clients): no ratio, not rounding over rounding
        out[f"bound_ratio_{mode}"] = after / before if before > BOUND_FLOOR * scale \
            else np.nan
        drift = max(drift, _product_drift(aligned, factors))
        excess = max(excess, (error - after) / scale)
    rot_a = aggregate("fedrot", factors, weights, align="A", lam=lam)
    out.update(product_drift=drift, bound_excess_after=float(excess),
               soft_bound_ratio=_soft_bound_ratio(rot_a, factors, lam))
    return out


_BASE = dict(n_clients=10, d=64, k=48, rank=4)
STUDY = Study(
    name="fedrot",
    description="FedRot-LoRA: aggregation error and its bound before/after alignment (A, B, "
                "concatenated) under rotational and non-rotational mismatch",
    grids={"smoke": grid(**{**_BASE, "d": 16, "k": 12}, gauge=["rotation", "none"],
                         heterogeneity=[0.0, 0.5], lam=[0.0, 0.5, 1.0]),
           "small": grid(**_BASE, gauge=["rotation", "none"],
                         heterogeneity=[0.0, 0.1, 0.3, 1.0], lam=LAMBDAS),
           "full": grid(**_BASE, gauge=["rotation", "none"],
                        heterogeneity=[0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0],
                        lam=LAMBDAS)},
    replicates={"smoke": 3, "small": 30, "full": 200},
    simulate_one=simulate_one,
    controls=("no-alignment", "spread-alignment"))

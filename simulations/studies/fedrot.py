"""Study 5, FedRot-LoRA: factor-averaging error against hard and soft alignment.

Clients hold one common update ``B0 A0`` perturbed by heterogeneity h and written in
a random SO(r) gauge: ``B_i = (B0 + h N_i) G_i``, ``A_i = G_i^T (A0 + h M_i)``. At h = 0
every client has the same update ("identical updates under random rotations"), where
hard alignment must make the aggregation error vanish. Each replicate measures, for one
(h, lam): FedIT's error and its identity / Cauchy-Schwarz bound, FedRot's error (align A
and B), the product drift of the aligned factors and the soft-rotation bound
``||R_lam - I||_F <= 2 lam ||R - I||_F``.
"""

from __future__ import annotations

import numpy as np
import scipy.stats

from clairstat.aggregation import aggregate, alignment_rotation

from .._framework import Study, grid

__all__ = ["STUDY", "simulate_one", "client_factors"]

LAMBDAS = [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0]


def client_factors(rng, n_clients, d, k, rank, heterogeneity):
    """Gauged, perturbed copies of one rank-``rank`` update (see the module docstring)."""
    b0 = rng.standard_normal((d, rank)) / np.sqrt(d)
    a0 = rng.standard_normal((rank, k)) / np.sqrt(k)
    gauges = scipy.stats.special_ortho_group.rvs(rank, size=n_clients, random_state=rng)
    noise_b = heterogeneity * rng.standard_normal((n_clients, d, rank)) / np.sqrt(d)
    noise_a = heterogeneity * rng.standard_normal((n_clients, rank, k)) / np.sqrt(k)
    return [((b0 + nb) @ g, g.T @ (a0 + na)) for g, nb, na in zip(gauges, noise_b, noise_a)]


def _fedit_identity(factors, weights, exact):
    """Relative residual of E = sum p_i (B_i - B_bar)(A_i - A_bar) and ||E|| / CS bound."""
    res = aggregate("fedit", factors, weights)
    b_bar, a_bar = res.factors
    error = exact - res.update
    identity = sum(w * (b - b_bar) @ (a - a_bar) for (b, a), w in zip(factors, weights))
    spread_b = sum(w * np.sum((b - b_bar) ** 2) for (b, _), w in zip(factors, weights))
    spread_a = sum(w * np.sum((a - a_bar) ** 2) for (_, a), w in zip(factors, weights))
    norm = max(np.linalg.norm(error), np.finfo(float).tiny)
    return (np.linalg.norm(error - identity) / norm,
            np.linalg.norm(error) / max(np.sqrt(spread_b * spread_a), np.finfo(float).tiny))


def _soft_bound_ratio(result, factors, lam):
    """max_i ||R_lam,i - I|| / (2 lam ||R_i - I||) (hard R_i from the same reference)."""
    if lam == 0:
        return 0.0
    b_ref, a_ref = aggregate("fedit", factors, result.weights).factors
    ratios = []
    for (_, a), soft in zip(factors, result.rotations):
        hard = alignment_rotation(a @ a_ref.T)
        eye = np.eye(len(hard))
        denominator = 2 * lam * np.linalg.norm(hard - eye)
        if denominator > 0:
            ratios.append(np.linalg.norm(soft - eye) / denominator)
    return float(max(ratios, default=0.0))


def _product_drift(result, factors):
    return float(max(np.linalg.norm(br @ ar - b @ a) / np.linalg.norm(b @ a)
                     for (b, a), (br, ar) in zip(factors, result.aligned_factors)))


def simulate_one(params, seed):
    """One replicate: errors relative to ||Delta W*||_F, and the identity checks."""
    rng = np.random.default_rng(seed)
    factors = client_factors(rng, params["n_clients"], params["d"], params["k"],
                             params["rank"], params["heterogeneity"])
    weights = rng.dirichlet(np.full(params["n_clients"], 5.0))
    exact = aggregate("flora", factors, weights).update
    scale = np.linalg.norm(exact)
    identity_residual, cs_ratio = _fedit_identity(factors, weights, exact)
    rot_a = aggregate("fedrot", factors, weights, align="A", lam=params["lam"])
    rot_b = aggregate("fedrot", factors, weights, align="B", lam=params["lam"])
    return {"error_fedit": np.linalg.norm(exact - aggregate("fedit", factors, weights).update)
            / scale,
            "error_rot_a": np.linalg.norm(exact - rot_a.update) / scale,
            "error_rot_b": np.linalg.norm(exact - rot_b.update) / scale,
            "identity_residual": float(identity_residual), "cs_ratio": float(cs_ratio),
            "product_drift": max(_product_drift(rot_a, factors), _product_drift(rot_b, factors)),
            "soft_bound_ratio": _soft_bound_ratio(rot_a, factors, params["lam"])}


_BASE = dict(n_clients=10, d=64, k=48, rank=4)
STUDY = Study(
    name="fedrot",
    description="FedRot-LoRA: aggregation error of FedIT vs hard/soft alignment over "
                "lambda and heterogeneity; error identity, CS bound, rotation bound",
    grids={"smoke": grid(**{**_BASE, "d": 16, "k": 12}, heterogeneity=[0.0, 0.5],
                         lam=[0.0, 0.5, 1.0]),
           "small": grid(**_BASE, heterogeneity=[0.0, 0.1, 0.3, 1.0], lam=LAMBDAS),
           "full": grid(**_BASE, heterogeneity=[0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0],
                        lam=LAMBDAS)},
    replicates={"smoke": 3, "small": 30, "full": 200},
    simulate_one=simulate_one)

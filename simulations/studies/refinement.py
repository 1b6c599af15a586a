"""Study 4: refinement gain (docs/theory.md, R1-R2).

Federated OLS with isotropic Gaussian designs. Besides the shared structure, every
collaborative client carries a *benign heterogeneity* H_k: an off-subspace shift of
Frobenius norm ``h = h_ratio * h_star`` in a random direction, with
``h_star^2 = sigma^2 q (p - r) / (n - p - 1)``. With the oracle P* and C the refined risk
is exactly (in expectation, equal weights)::

    sigma^2 q [r + (p - r)/|C|] / (n - p - 1) + ||(I - P*)(Theta_bar_C - Theta_k)||_F^2

and the local OLS risk ``sigma^2 q p / (n - p - 1)``; since the heterogeneity term is
about ``h^2 (1 - 1/|C|)``, refinement gains for ``h_ratio < 1`` and loses beyond.
Measured per replicate (means over the collaborative clients): local OLS, plain
averaging over all clients, the oracle refinement, and CLAIR (rank and set estimated).

Controls: ``local-refinement`` (CLAIR's refined estimates replaced by the local ones),
``random-subspace`` (the refinement formula applied with a Haar-random subspace),
``oracle-pools-all`` (the oracle refinement is not given C: it pools the off-subspace
part over every client, the contaminated ones included; CLAIR is untouched).
"""

from __future__ import annotations

import warnings

import numpy as np

import clairstat
from clairstat.datasets import make_low_rank_block_sparse
from clairstat.metrics import estimation_errors

from .._framework import Study, grid
from ._common import (benign_mean, check_control, control_stream, oracle_refine,
                      random_basis)

# First-order torch backend, named explicitly so that every row says which solver ran.
SOLVER = "torch"

# Contaminated clients (when gamma > 0) sit this many client noise norms off the subspace.
SEPARATION_RATIO = 6.0


def _heterogeneity(rng, subspace, n_clients, p, q, size):
    """Off-subspace shifts of Frobenius norm ``size`` in uniformly random directions."""
    shifts = rng.standard_normal((n_clients, p, q))
    shifts -= np.einsum("pr,sr,ksq->kpq", subspace, subspace, shifts)
    norms = np.linalg.norm(shifts.reshape(n_clients, -1), axis=1)
    return size * shifts / norms[:, None, None]


def _ols(rng, truth, n, sigma):
    """Per-client OLS estimates from isotropic Gaussian designs of n rows."""
    estimates = np.empty_like(truth)
    for k, theta in enumerate(truth):
        design = rng.standard_normal((n, theta.shape[0]))
        response = design @ theta + sigma * rng.standard_normal((n, theta.shape[1]))
        estimates[k] = np.linalg.lstsq(design, response, rcond=None)[0]
    return estimates


def _data(params, seed):
    """Truth with benign heterogeneity, and the clients' OLS estimates."""
    p, q, n, rank, sigma = (params[key] for key in ("p", "q", "n", "rank", "sigma"))
    n_clients = params["n_clients"]
    sd = sigma / np.sqrt(n - p - 1.0)
    data = make_low_rank_block_sparse(
        n_clients, p, q, rank, int(round(params["gamma"] * n_clients)), noise_level=0.0,
        separation=SEPARATION_RATIO * sd * np.sqrt(p * q), random_state=seed)
    rng = np.random.default_rng(seed)
    h_star = sd * np.sqrt(q * (p - rank))
    shifts = _heterogeneity(rng, data.subspace, n_clients, p, q, params["h_ratio"] * h_star)
    truth = data.truth + np.where(data.contaminated[:, None, None], 0.0, shifts)
    return data, truth, _ols(rng, truth, n, sigma)


def _predictions(params, data, truth):
    """Local OLS risk and the oracle formula (with the realised heterogeneity cost)."""
    p, q, n, rank, sigma = (params[key] for key in ("p", "q", "n", "rank", "sigma"))
    benign = ~data.contaminated
    n_collab = int(benign.sum())
    projector = np.eye(p) - data.subspace @ data.subspace.T
    offsets = np.einsum("ps,ksq->kpq", projector, truth[benign] - truth[benign].mean(0))
    cost = float(np.mean(np.sum(offsets**2, axis=(1, 2))))
    local = sigma**2 * q * p / (n - p - 1)
    oracle = sigma**2 * q * (rank + (p - rank) / n_collab) / (n - p - 1) + cost
    return local, oracle, cost


def _refined(est, estimates, control, seed):
    """CLAIR's refined estimates, or a control's broken version of them."""
    if control == "local-refinement":
        return estimates
    if control == "random-subspace":  # the refinement formula with a random P_hat
        basis = random_basis(control_stream(seed), estimates.shape[1],
                             est.subspace_.shape[1])
        return oracle_refine(estimates, basis, np.flatnonzero(~est.contaminated_))
    return est.refined_


def simulate_one(params, seed, control=None):
    """One replicate: per-client risks of local OLS, averaging, oracle and CLAIR."""
    check_control(control, STUDY)
    data, truth, estimates = _data(params, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-convergence is recorded below
        est = clairstat.CLAIREstimator(solver=SOLVER, random_state=seed)
        est.fit(estimates)
    refined = _refined(est, estimates, control, seed)
    # oracle-pools-all: the oracle is not told C and pools every client
    pool = (np.arange(len(estimates)) if control == "oracle-pools-all"
            else data.collaborative_set)
    oracle = oracle_refine(estimates, data.subspace, pool)
    average = np.broadcast_to(estimates.mean(0), estimates.shape)
    risk = {name: benign_mean(estimation_errors(values, truth), data.contaminated)
            for name, values in [("local", estimates), ("clair", refined),
                                 ("oracle", oracle), ("average", average)]}
    local_formula, oracle_formula, cost = _predictions(params, data, truth)
    return {**{f"risk_{name}": value for name, value in risk.items()},
            "formula_local": local_formula, "formula_oracle": oracle_formula,
            "heterogeneity_cost": cost,
            "formula_gain": local_formula - oracle_formula,
            "gain_clair": risk["local"] - risk["clair"],
            "ratio_clair": risk["clair"] / risk["local"],
            "ratio_oracle": risk["oracle"] / risk["local"],
            "ratio_formula": oracle_formula / local_formula,
            "rank_hat": int(est.rank_), "n_flagged": int(est.contaminated_.sum()),
            "detection_exact": bool(np.array_equal(est.contaminated_, data.contaminated)),
            "converged": bool(est.converged_), "solver": est.solver_}


def _cells(n_values, gammas, h_ratios):
    return grid(n_clients=40, p=20, q=5, rank=2, sigma=1.0, n=n_values, gamma=gammas,
                h_ratio=h_ratios)


STUDY = Study(
    name="refinement",
    description="4. refinement gain: CLAIR vs local OLS, averaging and the oracle formula",
    grids={"smoke": _cells([100], [0.0, 0.1], [0.0, 0.5, 2.0]),
           "small": _cells([60, 200], [0.0, 0.1], [0.0, 0.5, 0.8, 1.0, 1.25, 2.0, 3.0]),
           "full": _cells([40, 60, 100, 200, 400], [0.0, 0.1, 0.2],
                          [0.0, 0.25, 0.5, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0])},
    replicates={"smoke": 2, "small": 6, "full": 50},
    simulate_one=simulate_one,
    controls=("random-subspace", "local-refinement", "oracle-pools-all"),
)

"""Study 2: stable recovery (docs/theory.md, S1).

Federated OLS estimates with noise: ``||P_hat - P*||_F`` against the response noise level
sigma, the number of clients K and the sample size n, in several (p, q, n) regimes, next
to the first-order prediction of each replicate, computed from its own truth with no
fitted constant::

    ||P_hat - P*||_F ~= s_E sqrt(2 (p - r) sum_j s_j^{-2})

with ``s_E = sigma / sqrt(n - p - 1)`` the per-entry sd of an OLS estimate and ``s_j`` the
singular values of the collaborative clients' centred true blocks, stacked (p, |C| q).
It implies slope 1 in sigma, -1/2 in K and -1/2 in ``n - p - 1``. A tenth of the clients
are contaminated, off the subspace by eight times a client's noise norm (well separated:
this study is about the subspace). The rank is given, so the error is the subspace's.

Control ``random-subspace``: the error is measured on a Haar-random subspace of the same
dimension instead of the fitted one.
"""

from __future__ import annotations

import warnings

import numpy as np

import clairstat
from clairstat.datasets import make_federated_regression
from clairstat.metrics import detection_scores, subspace_distance

from .._framework import Study
from ._common import check_control, control_stream, random_basis, stack

# First-order torch backend, named explicitly so that every row says which solver ran.
SOLVER = "torch"

# Separation of the contaminated clients in units of a client's noise norm
# sigma sqrt(p q / (n - p - 1)).
SEPARATION_RATIO = 8.0
REGIMES = [(20, 5, 200), (40, 5, 400), (20, 10, 100)]  # (p, q, n): n/p = 10, 10, 5
BASE = {"n_clients": 40, "sigma": 1.0}


def first_order_prediction(data, noise_sd):
    """``s_E sqrt(2 (p - r) sum_j s_j^-2)`` from the replicate's own truth (see above)."""
    collaborative = data.truth[~data.contaminated]
    centred = collaborative - collaborative.mean(axis=0)
    rank = data.subspace.shape[1]
    singular = np.linalg.svd(stack(centred), compute_uv=False)[:rank]
    p = data.subspace.shape[0]
    return float(noise_sd * np.sqrt(2.0 * (p - rank) * np.sum(singular**-2.0)))


def simulate_one(params, seed, control=None):
    """One replicate: CLAIR's subspace error with the rank given, and its prediction."""
    check_control(control, STUDY)
    p, q, n, n_clients = params["p"], params["q"], params["n"], params["n_clients"]
    estimate_sd = params["sigma"] / np.sqrt(n - p - 1.0)
    data = make_federated_regression(
        n_clients, p, q, params["rank"], n, int(round(params["gamma"] * n_clients)),
        noise_level=params["sigma"], random_state=seed,
        separation=SEPARATION_RATIO * estimate_sd * np.sqrt(p * q))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-convergence is recorded below
        est = clairstat.CLAIREstimator(rank=params["rank"], solver=SOLVER,
                                       random_state=seed)
        est.fit(data.local_estimates, sample_weight=data.n_samples)
    detection = detection_scores(est.contaminated_, data.contaminated)
    subspace = est.subspace_
    if control == "random-subspace":
        subspace = random_basis(control_stream(seed), p, subspace.shape[1])
    error = subspace_distance(subspace, data.subspace)
    predicted = first_order_prediction(data, estimate_sd)
    return {"subspace_error": error, "predicted_error": predicted,
            "error_ratio": error / predicted,
            "estimate_sd": float(estimate_sd), "effective_n": n - p - 1,
            "detection_exact": detection["exact"], "recall": detection["recall"],
            "noise_scale_hat": float(est.noise_scale_), "converged": bool(est.converged_),
            "n_iter": int(est.n_iter_), "solver": est.solver_}


def _cells(sigmas, clients, n_factors, regimes=REGIMES):
    """Three one-factor sweeps (sigma, K, n) around the base point of every regime."""
    cells = []
    for p, q, n in regimes:
        base = {"p": p, "q": q, "n": n, "rank": 2, "gamma": 0.1, **BASE}
        sweeps = [("sigma", sigmas, lambda v: {"sigma": v}),
                  ("K", clients, lambda v: {"n_clients": v}),
                  ("n", n_factors, lambda v: {"n": int(v * p)})]
        for sweep, values, change in sweeps:
            cells += [{**base, **change(v), "sweep": sweep} for v in values]
    return cells


STUDY = Study(
    name="stability",
    description="2. stable recovery: ||P_hat - P*||_F against noise, K and n, per (p, q, n)",
    grids={"smoke": _cells([0.5, 1.0, 2.0], [10, 40, 100], [5, 10, 20],
                           [REGIMES[0], REGIMES[2]]),
           "small": _cells([0.25, 0.5, 1.0, 2.0, 4.0], [10, 20, 40, 80, 160],
                           [5, 10, 20, 40]),
           "full": _cells([0.125, 0.25, 0.5, 1.0, 2.0, 4.0], [10, 20, 40, 80, 160, 320],
                          [3, 5, 10, 20, 40, 80])},
    replicates={"smoke": 1, "small": 8, "full": 50},
    simulate_one=simulate_one,
    controls=("random-subspace",),
)

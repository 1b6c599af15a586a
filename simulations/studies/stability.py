"""Study 2: stable recovery (method.md section 4, claim 2).

Federated OLS estimates with noise: ``||P_hat - P*||_F`` against the response noise level
sigma, the number of clients K and the sample size n, in several (p, q, n) regimes.
First-order perturbation theory gives ``||P_hat - P*||_F ~ sigma_E sqrt(r (p - r)) /
(s sqrt(K))`` with ``sigma_E = sigma / sqrt(n - p - 1)``: slope 1 in sigma, -1/2 in K and
-1/2 in the effective sample size ``n - p - 1``. A tenth of the clients are contaminated,
off the subspace by eight times a client's noise norm (well separated: this study is about
the subspace, study 3 about detection). The rank is given, so the error is the subspace's.
"""

from __future__ import annotations

import warnings

import numpy as np

import clairstat
from clairstat.datasets import make_federated_regression
from clairstat.metrics import detection_scores, subspace_distance

from .._framework import Study

# First-order torch backend, named explicitly so that every row says which solver ran.
SOLVER = "torch"

# Separation of the contaminated clients in units of a client's noise norm
# sigma sqrt(p q / (n - p - 1)).
SEPARATION_RATIO = 8.0
REGIMES = [(20, 5, 200), (40, 5, 400), (20, 10, 100)]  # (p, q, n): n/p = 10, 10, 5
BASE = {"n_clients": 40, "sigma": 1.0}


def simulate_one(params, seed):
    """One replicate: CLAIR's subspace error with the rank given."""
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
    return {"subspace_error": subspace_distance(est.subspace_, data.subspace),
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
    grids={"smoke": _cells([0.5, 1.0, 2.0], [20, 40, 80], [5, 10, 20],
                           [REGIMES[0], REGIMES[2]]),
           "small": _cells([0.25, 0.5, 1.0, 2.0, 4.0], [10, 20, 40, 80], [5, 10, 20, 40]),
           "full": _cells([0.125, 0.25, 0.5, 1.0, 2.0, 4.0], [10, 20, 40, 80, 160, 320],
                          [3, 5, 10, 20, 40, 80])},
    replicates={"smoke": 1, "small": 5, "full": 50},
    simulate_one=simulate_one,
)

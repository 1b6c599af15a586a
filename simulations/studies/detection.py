"""Study 3: collaborative-set recovery (method.md section 4, claim 3).

Federated OLS estimates; every contaminated client leaves the shared structure by
``delta = t sigma sqrt(p q / n)``, t the separation ratio of the claim. For each
contamination fraction gamma and ratio t: does CLAIR's calibrated test find exactly the
contaminated set? Two multiple-testing corrections are run: the default Benjamini-Hochberg
FDR control, and Holm's FWER control (under which P(C_hat = C) >= 1 - level once every
attacker is caught).
"""

from __future__ import annotations

import warnings

import numpy as np

import clairstat
from clairstat.datasets import make_federated_regression
from clairstat.metrics import detection_scores

from .._framework import Study, grid

# First-order torch backend, named explicitly so that every row says which solver ran.
SOLVER = "torch"

TEST_LEVEL = 0.05


def simulate_one(params, seed):
    """One replicate: CLAIR's flagged set against the truth."""
    p, q, n, n_clients = params["p"], params["q"], params["n"], params["n_clients"]
    n_contaminated = int(round(params["gamma"] * n_clients))
    separation = params["separation_ratio"] * params["sigma"] * np.sqrt(p * q / n)
    data = make_federated_regression(n_clients, p, q, params["rank"], n, n_contaminated,
                                     noise_level=params["sigma"], separation=separation,
                                     random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-convergence is recorded below
        est = clairstat.CLAIREstimator(correction=params["correction"],
                                       test_level=TEST_LEVEL, solver=SOLVER,
                                       random_state=seed)
        est.fit(data.local_estimates, sample_weight=data.n_samples)
    scores = detection_scores(est.contaminated_, data.contaminated)
    n_false = int(np.sum(est.contaminated_ & ~data.contaminated))
    null_p = est.p_values_[~data.contaminated]  # benign clients: the tests' null
    return {"n_contaminated": n_contaminated, "separation": float(separation),
            "exact": scores["exact"], "recall": scores["recall"],
            "precision": scores["precision"], "n_false_alarms": n_false,
            "false_discovery_proportion": n_false / max(int(est.contaminated_.sum()), 1),
            "false_positive_rate": scores["false_positive_rate"], "rank_hat": int(est.rank_),
            "null_rejection_rate": float(np.mean(null_p < TEST_LEVEL)),
            "null_p_median": float(np.median(null_p)), "test_level": TEST_LEVEL,
            "converged": bool(est.converged_),
            "solver": est.solver_}


def _cells(gammas, ratios, corrections=("fdr_bh", "holm")):
    return grid(n_clients=40, p=20, q=5, rank=2, n=200, sigma=1.0, gamma=gammas,
                separation_ratio=ratios, correction=list(corrections))


STUDY = Study(
    name="detection",
    description="3. P(C_hat = C) against separation, for several gamma (BH and Holm)",
    grids={"smoke": _cells([0.1, 0.3], [0.25, 1.0, 4.0]),
           "small": _cells([0.05, 0.1, 0.2, 0.3],
                           [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0]),
           "full": _cells([0.05, 0.1, 0.2, 0.3, 0.4],
                          [0.25, 0.5, 0.625, 0.75, 0.875, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0])},
    replicates={"smoke": 2, "small": 12, "full": 100},
    simulate_one=simulate_one,
)

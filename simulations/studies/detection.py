"""Study 3: collaborative-set recovery at a fixed size (docs/theory.md, D2-D4).

Federated OLS estimates; every contaminated client leaves the shared structure by
``delta = t sigma sqrt(p q / n)``, t the separation ratio. For each contamination
fraction gamma and ratio t: CLAIR's flagged set against the truth, with the default
Benjamini-Hochberg correction and with Holm's, and the per-client (uncorrected) detection
rate against the non-central chi^2 power the test's null model predicts. The consistency
sweep (growing size, shrinking level) is the study ``consistency``.

Controls: ``no-detection`` (nobody flagged, every p-value 1), ``inflated-noise`` (the
test is given twice the true noise scale), ``no-correction`` (a client is flagged when
its own p-value is below the level: the multiple-testing correction forgotten).
"""

from __future__ import annotations

import warnings

import numpy as np

import clairstat
from clairstat.datasets import make_federated_regression
from clairstat.metrics import detection_scores

from .._framework import Study, grid
from ._common import check_control, predicted_power

# First-order torch backend, named explicitly so that every row says which solver ran.
SOLVER = "torch"
TEST_LEVEL = 0.05
CONTROLS = ("no-detection", "inflated-noise", "no-correction")


def fit_and_score(params, seed, level, correction, control):
    """Draw the data, fit CLAIR (or its broken control), score the flagged set.

    Returns a dict of measured scalars shared by ``detection`` and ``consistency``.
    """
    p, q, n, n_clients = params["p"], params["q"], params["n"], params["n_clients"]
    n_contaminated = int(round(params["gamma"] * n_clients))
    separation = params["separation"]
    data = make_federated_regression(n_clients, p, q, params["rank"], n, n_contaminated,
                                     noise_level=params["sigma"], separation=separation,
                                     random_state=seed)
    # inflated-noise: the test's null is scaled by 2x the true per-entry noise scale.
    noise_scale = 2.0 * data.estimate_noise_scale if control == "inflated-noise" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-convergence is recorded below
        est = clairstat.CLAIREstimator(correction=correction, test_level=level,
                                       noise_scale=noise_scale, solver=SOLVER,
                                       random_state=seed)
        est.fit(data.local_estimates, sample_weight=data.n_samples)
    flagged, p_values = np.asarray(est.contaminated_, bool), np.asarray(est.p_values_)
    if control == "no-detection":
        flagged, p_values = np.zeros_like(flagged), np.ones_like(p_values)
    # each client at the level on its own (fixed-level: consistency's, at 0.05 at every K)
    if control in ("no-correction", "fixed-level"):
        flagged = p_values < level
    truth = data.contaminated
    scores = detection_scores(flagged, truth)
    n_false = int(np.sum(flagged & ~truth))
    null_p = p_values[~truth]  # benign clients: the tests' null
    power = predicted_power(separation, float(np.mean(data.estimate_noise_scale)),
                            (p - params["rank"]) * q, level)
    observed_power = float(np.mean(p_values[truth] < level)) if truth.any() else np.nan
    return {"n_contaminated": n_contaminated, "exact": scores["exact"],
            "recall": scores["recall"], "precision": scores["precision"],
            "n_false_alarms": n_false, "any_false_alarm": bool(n_false > 0),
            "false_discovery_proportion": n_false / max(int(flagged.sum()), 1),
            "false_positive_rate": scores["false_positive_rate"], "rank_hat": int(est.rank_),
            "null_rejection_rate": float(np.mean(null_p < level)),
            "null_p_median": float(np.median(null_p)), "test_level": level,
            "power_observed": observed_power,
            "power_predicted": float(power) if truth.any() else np.nan,
            "converged": bool(est.converged_), "solver": est.solver_}


def simulate_one(params, seed, control=None):
    """One replicate: CLAIR's flagged set against the truth, and the per-client power."""
    check_control(control, STUDY)
    p, q, n = params["p"], params["q"], params["n"]
    separation = params["separation_ratio"] * params["sigma"] * np.sqrt(p * q / n)
    out = fit_and_score({**params, "separation": float(separation)}, seed, TEST_LEVEL,
                        params["correction"], control)
    return {"separation": float(separation), **out}


def _cells(gammas, ratios, corrections=("fdr_bh", "holm")):
    return grid(n_clients=40, p=20, q=5, rank=2, n=200, sigma=1.0, gamma=gammas,
                separation_ratio=ratios, correction=list(corrections))


STUDY = Study(
    name="detection",
    description="3. P(C_hat = C) and per-client power against separation (BH and Holm)",
    grids={"smoke": _cells([0.1, 0.3], [0.25, 1.0, 4.0]),
           "small": _cells([0.05, 0.1, 0.2, 0.3],
                           [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0]),
           "full": _cells([0.05, 0.1, 0.2, 0.3, 0.4],
                          [0.25, 0.5, 0.625, 0.75, 0.875, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0])},
    replicates={"smoke": 2, "small": 12, "full": 100},
    simulate_one=simulate_one,
    controls=CONTROLS,
)

"""Checks that passed for the wrong reason (an audit of the theory checks): each test
builds the table a broken method would give and requires that the check does not pass."""

import numpy as np
import pandas as pd
import pytest

from validation import INF, decide, mean_interval, run_check
from validation.checks import fedrot as fedrot_checks
from validation.checks import refinement as refinement_checks
from validation.checks import robustness as robustness_checks


def _check(module, name):
    return next(check for check in module.CHECKS if check.name == name)


def test_a_nearly_constant_share_is_decided_no_more_tightly_than_a_constant_one():
    """Eleven zeros and one 0.01 got a t interval a hundred times narrower than twelve
    zeros; 79 zeros and a 1 an upper end (0.037) below 80 zeros' (0.045)."""
    _, (_, constant) = mean_interval([0.0] * 12, bounds=(0.0, 1.0))
    _, (_, nearly) = mean_interval([0.0] * 11 + [0.01], bounds=(0.0, 1.0))
    assert nearly >= constant
    _, (_, zeros) = mean_interval([0.0] * 80, bounds=(0.0, 1.0))
    _, (lo, hi) = mean_interval([0.0] * 79 + [1.0], bounds=(0.0, 1.0))
    assert hi > zeros and decide((lo, hi), (-INF, 0.05)) == "inconclusive"
    # a quantity bounded on one side only keeps its t interval on its open side; the
    # end beyond its bound is the bound (the mean cannot lie below 0; a later review)
    _, (lo, hi) = mean_interval([1.0, 2.0, 3.0], bounds=(0.0, INF))
    assert (lo, round(hi, 3)) == (0.0, 4.484)


def test_robust_false_discoveries_do_not_pass_on_one_false_flag_in_80():
    """One replicate in 80 whose whole flagged set is benign is a false discovery rate the
    80 replicates cannot place below 0.05; 80 replicates without any cannot either
    (0.045 is the most they allow), so the one with a false flag must not pass."""
    rows = pd.DataFrame({"attack": ["random"] * 40 + ["scaled"] * 40, "gamma": 0.2,
                         "clair_precision": [1.0] * 79 + [0.0],
                         "clair_false_positive_rate": 0.0})
    check = _check(robustness_checks, "robust_clair_false_discoveries")
    assert run_check(check, rows)["verdict"] == "inconclusive"


def _refinement(rng, noise_factor, excess=0.0):
    """Refinement rows (h_ratio 0 ... 3) with the oracle's noise term ``noise_factor``
    times the formula's, and CLAIR's ratio the formula's plus ``excess``."""
    h = np.repeat([0.0, 0.5, 0.8, 1.0, 1.25, 2.0, 3.0], 24)
    local, noise = 10.0, 1.25  # the formula's risks: local OLS and the oracle's noise
    cost = noise * (h / 0.35) ** 2 * 0.8  # heterogeneity cost, about h^2 h*^2
    measured = noise * noise_factor * rng.gamma(400.0, 1 / 400.0, h.size)
    risk_local = local * rng.gamma(400.0, 1 / 400.0, h.size)
    formula = noise + cost
    ratio_formula = formula / local
    ratio_clair = ratio_formula * rng.gamma(400.0, 1 / 400.0, h.size) + excess
    risk_clair = ratio_clair * risk_local
    return pd.DataFrame({"cell": h, "h_ratio": h, "risk_oracle": cost + measured,
                         "formula_oracle": formula, "heterogeneity_cost": cost,
                         "formula_local": local, "risk_local": risk_local,
                         "ratio_formula": ratio_formula, "ratio_clair": ratio_clair,
                         "risk_clair": risk_clair, "formula_gain": local - formula,
                         "gain_clair": risk_local - risk_clair})


def test_oracle_formula_sees_a_noise_term_off_by_15_percent():
    """The cost enters risk and formula alike; over the grid it is 3/4 of the formula,
    so risk / formula with the cost in both was 1.04 for a noise term 15% off: a pass."""
    rng = np.random.default_rng(3)
    check = _check(refinement_checks, "refinement_oracle_formula")
    assert run_check(check, _refinement(rng, 1.0))["verdict"] == "pass"
    assert run_check(check, _refinement(rng, 1.15))["verdict"] == "fail"


def test_clair_vs_formula_sees_a_constant_excess_and_a_constant_factor():
    """A free intercept on the linear scale absorbed a constant excess (CLAIR's risk
    ratio plus 0.6: slope 1, a pass); a constant factor is what the log scale absorbs."""
    rng = np.random.default_rng(4)
    check = _check(refinement_checks, "refinement_clair_vs_formula")
    assert run_check(check, _refinement(rng, 1.0))["verdict"] == "pass"
    assert run_check(check, _refinement(rng, 1.0, excess=0.6))["verdict"] == "fail"
    factor = _refinement(rng, 1.0)
    factor = factor.assign(ratio_clair=1.5 * factor["ratio_clair"])
    assert run_check(check, factor)["verdict"] == "fail"


@pytest.mark.parametrize("mode", ["a", "b", "ab"])
def test_tightening_is_not_carried_by_the_identical_update_rows(mode):
    """Without heterogeneity the aligned bound is 0 by an identity: thirty such rows and
    ninety 20% looser gave a mean ratio of 0.90 [0.81, 0.99], a pass of "tighter"."""
    rng = np.random.default_rng(5)
    h = np.repeat([0.0, 0.1, 0.3, 1.0], 30)
    ratio = np.where(h == 0, 0.0, 1.2 + 0.01 * rng.standard_normal(h.size))
    rows = pd.DataFrame({"lam": 1.0, "gauge": "rotation", "heterogeneity": h,
                         f"bound_ratio_{mode}": ratio})
    name = {"a": "fedrot_alignment_tightens_bound", "b": "fedrot_b_alignment_tightens_bound",
            "ab": "fedrot_concatenated_tightens_bound"}[mode]
    assert run_check(_check(fedrot_checks, name), rows)["verdict"] == "fail"
    tighter = rows.assign(**{f"bound_ratio_{mode}": np.where(h == 0, 0.0, 0.5)
                             + 0.01 * rng.random(h.size)})
    assert run_check(_check(fedrot_checks, name), tighter)["verdict"] == "pass"


@pytest.mark.parametrize("loses", ["colluding", "gamma >= 0.3"])
def test_clair_beats_mean_fails_when_clair_loses_one_attack_or_attacker_fraction(loses):
    """B3 pooled the random, scaled and colluding attacks over every gamma: a CLAIR that
    lost every colluding replicate still passed (0.667 [0.578, 0.745] at small scale),
    and one that lost every replicate at gamma >= 0.3 passed at full scale (0.552
    [0.520, 0.584]), a review. The worst (attack, gamma) cell now decides: on the
    committed small table both checks pass, and each of the two broken tables fails."""
    from simulations import get_study, load_results

    table = load_results(get_study("robustness"), "small", current_only=True)
    checks = {check.name: check for check in robustness_checks.CHECKS}
    names = ("robust_clair_beats_mean", "robust_clair_beats_mean_rank_unknown")
    for name in names:
        assert run_check(checks[name], table)["verdict"] == "pass"
    broken = table.copy()
    lost = (broken["attack"] == "colluding") if loses == "colluding" \
        else (broken["gamma"] >= 0.3)
    for column in ("error_pop_clair", "error_pop_clair_rank_unknown"):
        broken.loc[lost, column] = 2.0 * broken.loc[lost, "error_pop_mean"]
    for name in names:
        assert run_check(checks[name], broken)["verdict"] == "fail", name


@pytest.mark.parametrize("broken, fails", [
    ("regime constant", "stability_first_order_constant"),
    ("K law", "stability_first_order_slope")])
def test_stability_fails_on_one_regime_s_constant_or_a_wrong_k_law(broken, fails):
    """S1 pooled every cell: the error 1.5 times its prediction in one (p, q) regime
    passed (1.142 [1.114, 1.171]), and an error following K^(-1/4) instead of K^(-1/2)
    passed the slope (0.930 [0.903, 0.957]), a review. The regime and the sweep farthest
    from the claim now decide: the committed small table passes both checks, and each
    broken table fails its check."""
    from simulations import get_study, load_results
    from validation.checks import stability as stability_checks

    table = load_results(get_study("stability"), "small", current_only=True)
    checks = {check.name: check for check in stability_checks.CHECKS}
    for check in checks.values():
        assert run_check(check, table)["verdict"] == "pass"
    table = table.copy()
    if broken == "regime constant":
        p, q = sorted(set(zip(table["p"], table["q"])))[0]
        table.loc[(table["p"] == p) & (table["q"] == q), "subspace_error"] *= 1.5
    else:
        table["subspace_error"] *= (table["n_clients"] / 40.0) ** 0.25
    table["error_ratio"] = table["subspace_error"] / table["predicted_error"]
    assert run_check(checks[fails], table)["verdict"] == "fail"

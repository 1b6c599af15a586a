"""Tests of the validation layer: interval helpers, check plumbing, and the smoke run.

The end-to-end test runs ``python -m validation --scale smoke`` into a temporary
directory (results and report), exactly as CI would, and requires exit status 0.
"""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import simulations
import validation
from validation import Check, ols_slope, run_check, wilson
from validation import __main__ as validation_cli
from validation import _core, _report

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import simulation_toy  # noqa: E402


@pytest.mark.parametrize("module", [_core, _report, simulations._framework])
def test_doctests_of_the_pipeline_modules(module):
    # testpaths only collects clairstat's doctests; these modules' examples run here.
    failures, _ = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert failures == 0


# --- interval helpers -------------------------------------------------------------------

def test_ols_slope_of_an_exact_power_law_is_its_exponent():
    x = np.array([0.1, 0.2, 0.4, 0.8, 1.6])
    slope, (lo, hi) = ols_slope(pd.DataFrame({"x": x, "y": 3 * x**1.5}), "x", "y")
    # Exact data: slope to rounding error; the interval collapses onto it.
    assert slope == pytest.approx(1.5, abs=1e-12)
    assert lo == pytest.approx(1.5, abs=1e-9) and hi == pytest.approx(1.5, abs=1e-9)


def test_ols_slope_interval_matches_the_textbook_formula():
    x = np.arange(1.0, 11.0)
    y = 2 * x + np.array([0.3, -0.1, 0.2, -0.4, 0.1, 0.0, -0.2, 0.3, -0.1, 0.2])
    slope, (lo, hi) = ols_slope(pd.DataFrame({"x": x, "y": y}), "x", "y", log=False)
    fit = stats.linregress(x, y)
    half = stats.t.ppf(0.975, len(x) - 2) * fit.stderr
    assert slope == pytest.approx(fit.slope, rel=1e-12)
    assert (lo, hi) == pytest.approx((fit.slope - half, fit.slope + half), rel=1e-10)


def test_ols_slope_drops_non_positive_values_on_log_scale_and_needs_three_points():
    frame = pd.DataFrame({"x": [0.0, 1, 2, 4], "y": [1.0, 1, 2, 4]})
    assert ols_slope(frame, "x", "y")[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 3"):
        ols_slope(frame.iloc[:3], "x", "y")


@pytest.mark.parametrize("successes, n", [(0, 10), (3, 10), (10, 10), (37, 50)])
def test_wilson_matches_the_closed_form(successes, n):
    z = stats.norm.ppf(0.975)
    centre = (successes + z**2 / 2) / (n + z**2)
    half = z / (n + z**2) * np.sqrt(successes * (n - successes) / n + z**2 / 4)
    rate, (lo, hi) = wilson(successes, n)
    assert rate == successes / n
    assert (lo, hi) == pytest.approx((centre - half, centre + half), abs=1e-12)


# --- check plumbing -----------------------------------------------------------------------

def _passing(df):
    return dict(statistic="mean", expected=0.0, observed=df["value"].mean(),
                interval=(-1.0, 1.0), verdict="pass")


def test_run_check_reports_errors_instead_of_raising():
    frame = pd.DataFrame({"value": [0.1, -0.1]})
    ok = run_check(Check("ok", "toy", "claim", _passing), frame)
    assert ok["verdict"] == "pass" and ok["observed"] == pytest.approx(0.0)
    assert run_check(Check("e", "toy", "c", _passing), pd.DataFrame())["verdict"] == "error"
    broken = run_check(Check("b", "toy", "c", lambda df: 1 / 0), frame)
    assert broken["verdict"] == "error" and "ZeroDivisionError" in broken["detail"]
    partial = run_check(Check("m", "toy", "c", lambda df: {"verdict": "pass"}), frame)
    assert partial["verdict"] == "error"


def test_markdown_table_has_one_line_per_check_and_escapes_pipes():
    rows = [{"name": "a", "study": "s", "claim": "c", "statistic": "|x|", "expected": 1,
             "observed": 0.98765, "interval": [0.9, 1.1], "verdict": "pass"}]
    table = _report.markdown_table(rows).splitlines()
    assert len(table) == 3 and "\\|x\\|" in table[2] and "0.988" in table[2]


def test_checks_are_uniquely_named_and_read_discoverable_studies():
    checks = validation.all_checks()
    assert len({check.name for check in checks}) == len(checks)
    studies = simulations.available_studies()
    assert {check.study for check in checks} <= set(studies)


def test_cli_exits_non_zero_when_a_check_fails(tmp_path, monkeypatch):
    failing = Check("toy_mean", "toy", "mean is 10",
                    lambda df: {**_passing(df), "expected": 10.0, "verdict": "fail"})
    monkeypatch.setattr(validation_cli, "all_checks", lambda: [failing])
    monkeypatch.setattr(validation_cli, "get_study", lambda name: simulation_toy.STUDY)
    status = validation_cli.main(["--scale", "smoke", "--results-dir", str(tmp_path),
                                  "--output-dir", str(tmp_path), "--no-progress"])
    assert status == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert [row["verdict"] for row in report["checks"]] == ["fail"]
    assert "FAIL" in (tmp_path / "REPORT.md").read_text()


# --- the whole pipeline at smoke scale ----------------------------------------------------

@pytest.mark.timeout(320)
def test_validation_smoke_run_passes_and_the_paper_rebuilds_from_its_tables(tmp_path):
    command = [sys.executable, "-m", "validation", "--scale", "smoke", "--results-dir",
               str(tmp_path / "results"), "--output-dir", str(tmp_path), "--no-progress",
               "--n-jobs", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=190)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["meta"]["scale"] == "smoke" and report["checks"]
    assert all(row["verdict"] == "pass" or row["known_failure"] for row in report["checks"])
    assert (tmp_path / "REPORT.md").exists()
    # The paper is rebuilt from the same saved tables, without simulating.
    figures = tmp_path / "figures"
    result = subprocess.run([sys.executable, "-m", "paper", "--scale", "smoke",
                             "--results-dir", str(tmp_path / "results"), "--out-dir",
                             str(figures), "--report", str(tmp_path / "report.json")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    studies = {row["study"] for row in report["checks"]}
    assert {path.stem for path in figures.glob("*.png")} >= studies & {
        "recovery", "stability", "detection", "refinement"}
    assert (figures / "verdicts.md").exists()


def test_ols_slope_with_group_intercepts_recovers_a_common_exponent():
    x = np.tile([1.0, 2.0, 4.0, 8.0], 3)
    regime = np.repeat(["a", "b", "c"], 4)
    constant = np.repeat([1.0, 5.0, 0.2], 4)
    frame = pd.DataFrame({"x": x, "y": constant * x**-0.5, "regime": regime})
    slope, (lo, hi) = ols_slope(frame, "x", "y", by="regime")
    assert slope == pytest.approx(-0.5, abs=1e-12) and hi - lo < 1e-9
    # Without group intercepts the different constants leak into the slope's error.
    assert np.diff(ols_slope(frame, "x", "y")[1])[0] > 1e-3


def test_a_documented_known_failure_is_reported_but_does_not_fail_the_run(tmp_path,
                                                                         monkeypatch):
    failing = lambda df: {**_passing(df), "verdict": "fail"}  # noqa: E731
    checks = [Check("known", "toy", "false claim", failing, known_failure="README#x"),
              Check("fine", "toy", "true claim", _passing)]
    monkeypatch.setattr(validation_cli, "all_checks", lambda: checks)
    monkeypatch.setattr(validation_cli, "get_study", lambda name: simulation_toy.STUDY)
    status = validation_cli.main(["--scale", "smoke", "--results-dir", str(tmp_path),
                                  "--output-dir", str(tmp_path), "--no-progress"])
    assert status == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["meta"]["n_known_failures"] == 1 and report["meta"]["blocking"] == []
    assert "FAIL (known: README#x)" in (tmp_path / "REPORT.md").read_text()


def test_empirical_boundary_interpolates_the_half_crossing_and_censors_the_rest():
    from validation.checks.recovery import _crossing, empirical_boundary

    gammas = np.array([0.1, 0.2, 0.3, 0.4])
    assert _crossing(gammas, np.array([1.0, 1.0, 0.0, 0.0])) == pytest.approx(0.25)
    assert _crossing(gammas, np.array([1.0, 0.75, 0.25, 0.0])) == pytest.approx(0.25)
    assert np.isnan(_crossing(gammas, np.ones(4)))  # boundary beyond the grid
    assert np.isnan(_crossing(gammas, np.zeros(4)))  # boundary below the grid
    rows = [{"p": 20, "rank": 2, "gamma": g, "success": g < 0.25, "mu_u": 3.0, "mu_v": 2.0}
            for g in gammas for _ in range(3)]
    boundary = empirical_boundary(pd.DataFrame(rows))
    assert boundary["gamma_star"].iloc[0] == pytest.approx(0.25)
    assert boundary["odds_star"].iloc[0] == pytest.approx(1 / 3)
    assert boundary["mu_r"].iloc[0] == pytest.approx(6.0)


def test_stability_exponent_check_recovers_planted_power_laws():
    from validation.checks.stability import clients_exponent, noise_exponent

    rows = []
    for p, q, scale in [(20, 5, 1.0), (40, 5, 2.0)]:
        for sigma in [0.5, 1.0, 2.0]:
            rows.append({"sweep": "sigma", "p": p, "q": q, "sigma": sigma, "n_clients": 40,
                         "subspace_error": scale * 0.05 * sigma})
        for k in [10, 20, 40, 80]:
            rows.append({"sweep": "K", "p": p, "q": q, "sigma": 1.0, "n_clients": k,
                         "subspace_error": scale * 0.3 * k**-0.5})
    frame = pd.DataFrame(rows)
    assert noise_exponent(frame)["observed"] == pytest.approx(1.0)
    result = clients_exponent(frame)
    assert result["observed"] == pytest.approx(-0.5) and result["verdict"] == "pass"

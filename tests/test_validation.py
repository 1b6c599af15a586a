"""Tests of the validation layer: interval helpers, the verdict rule, check plumbing, the
smoke run and the negative controls.

The end-to-end tests run ``python -m validation --scale smoke`` (and ``--control NAME``)
into temporary directories (results and report), exactly as CI would.
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
from validation import INF, Check, decide, ols_slope, run_check, wilson
from validation._core import is_blocking, mean_interval
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


# --- the verdict rule --------------------------------------------------------------------

@pytest.mark.parametrize("interval, margin, expected", [
    ((0.95, 1.05), (0.9, 1.1), "pass"),            # TOST: the whole interval inside
    ((0.85, 1.05), (0.9, 1.1), "inconclusive"),    # straddles an end of the band
    ((0.5, 1.5), (0.9, 1.1), "inconclusive"),      # wide: covers the band, never a pass
    ((1.2, 1.5), (0.9, 1.1), "fail"),              # wholly outside
    ((0.92, 1.0), (0.9, INF), "pass"),             # one-sided: clears the bound
    ((0.5, 1.0), (0.9, INF), "inconclusive"),
    ((0.0, 0.65), (0.9, INF), "fail"),
    ((0.0, 0.04), (-INF, 0.05), "pass"),
    ((float("nan"), float("nan")), (0.9, INF), "inconclusive"),
])
def test_decide_is_tost_or_one_sided_with_three_verdicts(interval, margin, expected):
    assert decide(interval, margin) == expected


def test_an_identity_check_has_no_inconclusive_verdict():
    assert decide((0.0, 1e-15), (-INF, 1e-12), kind="identity") == "pass"
    assert decide((0.0, 1e-3), (-INF, 1e-12), kind="identity") == "fail"


def test_a_check_must_declare_a_margin_that_can_fail():
    with pytest.raises(ValueError, match="allows nothing or everything"):
        Check("open", "toy", "c", lambda df: {}, margin=(-INF, INF))
    with pytest.raises(ValueError, match="kind"):
        Check("k", "toy", "c", lambda df: {}, kind="evidence", margin=(0, 1))


# --- check plumbing -----------------------------------------------------------------------

def _passing(df):
    """A check that passes whatever the table (its observed value inside its interval,
    as run_check requires)."""
    return dict(statistic="a constant", expected=0.0, observed=0.0, interval=(-0.5, 0.5))


def _check(name, function, **options):
    return Check(name, "toy", "claim", function, margin=(-1.0, 1.0), **options)


def test_run_check_gives_the_rule_s_verdict_and_reports_errors_instead_of_raising():
    frame = pd.DataFrame({"value": [0.1, -0.1]})
    ok = run_check(_check("ok", _passing), frame)
    assert ok["verdict"] == "pass" and ok["observed"] == pytest.approx(0.0)
    assert ok["kind"] == "theory" and ok["margin"] == [-1.0, 1.0]
    # A verdict returned by the function is ignored: only the margin decides.
    claims = run_check(_check("c", lambda df: {**_passing(df), "observed": 2.5,
                                               "interval": (2, 3), "verdict": "pass"}),
                       frame)
    assert claims["verdict"] == "fail"
    assert run_check(_check("e", _passing), pd.DataFrame())["verdict"] == "error"
    broken = run_check(_check("b", lambda df: 1 / 0), frame)
    assert broken["verdict"] == "error" and "ZeroDivisionError" in broken["detail"]
    partial = run_check(_check("m", lambda df: {"observed": 1.0}), frame)
    assert partial["verdict"] == "error"


@pytest.mark.parametrize("observed, interval, why", [
    (0.0, (None, None), "float"), (0.0, (0.9,), "not two numbers"),
    (1.0, (1.0, 0.95), "not an interval"), (5.0, (0.95, 1.0), "outside its interval"),
    (float("nan"), (0.95, 1.0), "observed value is nan")])
def test_a_malformed_interval_is_the_check_s_error_not_a_verdict(observed, interval, why):
    """A review: an interval of (None, None) or of one number raised out of run_check
    (no report was written), and an inverted interval, an observed value outside its
    own interval and a NaN observed value beside a finite interval passed."""
    frame = pd.DataFrame({"value": [0.1, -0.1]})
    check = Check("m", "toy", "claim",
                  lambda df: dict(statistic="s", expected=1.0, observed=observed,
                                  interval=interval), margin=(0.9, 1.1))
    out = run_check(check, frame)
    assert out["verdict"] == "error" and why in out["detail"], out
    # a Wilson interval's upper end is 1 - 1e-16 beside a rate of 1: on it, not outside
    rate, ends = wilson(20, 20)
    edge = Check("w", "toy", "claim", lambda df: dict(statistic="s", expected=1.0,
                                                      observed=rate, interval=ends),
                 margin=(0.5, INF))
    assert run_check(edge, frame)["verdict"] == "pass"


@pytest.mark.parametrize("successes, n", [(21, 20), (-1, 20), (2.9, 10), (3, 10.5)])
def test_wilson_refuses_counts_that_are_not_counts(successes, n):
    """A review: 21 of 20 and -1 of 20 gave a NaN interval (an inconclusive verdict),
    2.9 of 10 counted 2."""
    with pytest.raises(ValueError):
        wilson(successes, n)


@pytest.mark.parametrize("path, verdict", [({10: 20, 20: 20, 40: 0, 80: 0, 160: 0}, "fail"),
                                           ({10: 0, 20: 0, 40: 20, 80: 20, 160: 20}, "pass"),
                                           ({10: 20, 20: 20, 40: 20, 80: 20, 160: 20},
                                            "inconclusive")])
def test_the_consistency_trend_decides_on_separated_paths(path, verdict):
    """A review: exact recovery collapsing from K = 20 to 40 (a broken method at its
    clearest) and rising as the theory says were both inconclusive, the logistic slope
    having no finite fit on separated data; the check now falls back on the rate at the
    largest K minus at the smallest. A constant path stays undecided."""
    from validation.checks.detection import CHECKS

    check = next(c for c in CHECKS if c.name == "detection_consistency_trend")
    frame = pd.DataFrame([{"n_clients": k, "exact": int(r < hits)}
                          for k, hits in path.items() for r in range(20)])
    assert run_check(check, frame)["verdict"] == verdict


def test_a_known_failure_tag_on_a_check_that_does_not_fail_is_flagged_stale():
    frame = pd.DataFrame({"value": [0.1, -0.1]})
    row = run_check(_check("k", _passing, known_failure="README#x", known_range=(2.0, 9.0)),
                    frame)
    assert row["verdict"] == "pass" and row["stale_known_failure"]
    assert "stale tag" in _report.markdown_table([row])


def test_markdown_table_has_one_line_per_check_and_escapes_pipes():
    rows = [{"name": "a", "study": "s", "claim": "c", "statistic": "|x|", "expected": 1,
             "observed": 0.98765, "interval": [0.9, 1.1], "verdict": "pass",
             "kind": "theory", "margin": [0.8, INF]}]
    table = _report.markdown_table(rows).splitlines()
    assert len(table) == 3 and "\\|x\\|" in table[2] and "0.988" in table[2]
    assert ">= 0.8" in table[2]


def test_checks_are_uniquely_named_read_discoverable_studies_and_state_a_source():
    checks = validation.all_checks()
    assert len({check.name for check in checks}) == len(checks)
    studies = simulations.available_studies()
    assert {check.study for check in checks} <= set(studies)
    theory = [check for check in checks if check.kind == "theory"]
    assert len(theory) >= 12 and any("consistency" in check.name for check in theory)
    theory_doc = (ROOT / "docs" / "theory.md").read_text()
    for check in checks:
        assert check.source.startswith("docs/theory.md#"), check.name
        anchor = check.source.split("#")[1]
        assert f'id="{anchor}"' in theory_doc, (check.name, anchor)


def test_every_control_targets_theory_checks_of_studies_that_implement_it():
    by_name = {check.name: check for check in validation.all_checks()}
    studies = simulations.available_studies()
    for control in simulations.CONTROLS.values():
        assert control.targets, control.name
        for target in control.targets:
            check = by_name[target]
            assert check.kind == "theory", (control.name, target)
            assert control.name in studies[check.study].controls, (control.name, target)


@pytest.mark.parametrize("kind", ["theory", "identity"])
def test_cli_exits_non_zero_when_a_check_fails(tmp_path, monkeypatch, capsys, kind):
    """At small scale any unexplained failure blocks; at smoke (a wiring test whose
    sizes decide no theory: a review found every clean smoke run exiting 1) only an
    identity check's (or an error)."""
    failing = _check("toy_mean", lambda df: {**_passing(df), "observed": 5.5,
                                                "interval": (5.0, 6.0)},
                     kind=kind)
    monkeypatch.setattr(validation_cli, "all_checks", lambda: [failing])
    monkeypatch.setattr(validation_cli, "get_study", lambda name: simulation_toy.STUDY)
    for scale in ("smoke", "small"):
        out = tmp_path / scale
        status = validation_cli.main(["--scale", scale, "--results-dir", str(tmp_path),
                                      "--output-dir", str(out), "--no-progress"])
        report = json.loads((out / "report.json").read_text())
        assert [row["verdict"] for row in report["checks"]] == ["fail"]
        assert "FAIL" in (out / "REPORT.md").read_text()
        blocks = scale == "small" or kind == "identity"
        assert status == (1 if blocks else 0)
        assert report["meta"]["blocking"] == (["toy_mean"] if blocks else [])
        assert report["meta"]["smoke_theory_failures"] == ([] if blocks else ["toy_mean"])
        err = capsys.readouterr().err
        assert ("FAILED (unexplained or errors): toy_mean" in err) == blocks


def test_rows_say_which_control_made_them_and_a_mismatch_is_refused(tmp_path, monkeypatch,
                                                                    capsys):
    """A review copied a negative control's table among the method's: validated as the
    method's, with nothing in the rows to tell them apart. Rows now carry ``control``
    (null for the method) and a table holding another's rows is a usage error."""
    monkeypatch.setattr(validation_cli, "all_checks", lambda: [_check("t", _passing)])
    monkeypatch.setattr(validation_cli, "get_study", lambda name: simulation_toy.STUDY)
    options = ["--scale", "smoke", "--results-dir", str(tmp_path / "results"),
               "--output-dir", str(tmp_path / "out"), "--no-progress"]
    assert validation_cli.main(options) == 0
    table = next((tmp_path / "results" / "smoke").glob("*.jsonl"))
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    assert rows and all("control" in row and row["control"] is None for row in rows)
    rows[0]["control"] = "no-detection"  # one row of a control among the method's
    table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    capsys.readouterr()
    assert validation_cli.main([*options, "--no-run", "--force"]) == 2
    assert "holds rows of control 'no-detection', not of the method" in \
        capsys.readouterr().err
    for row in rows:  # rows written before the column say nothing, and pass
        row.pop("control")
    table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert validation_cli.main([*options, "--no-run", "--force"]) == 0


def test_smoke_reports_go_to_scratch_and_never_over_a_report_of_another_scale(tmp_path,
                                                                            monkeypatch,
                                                                            capsys):
    here = Path(validation.__file__).resolve().parent
    assert validation_cli.default_output_dir("smoke") == here / "scratch" / "smoke"
    assert validation_cli.default_output_dir("small") == here
    assert validation_cli.default_output_dir("full") == here / "full"
    assert "scratch" in validation_cli.default_output_dir("smoke", "no-alignment").parts
    (tmp_path / "report.json").write_text(json.dumps({"meta": {"scale": "small",
                                                               "control": None}}))
    monkeypatch.setattr(validation_cli, "all_checks", lambda: [_check("t", _passing)])
    monkeypatch.setattr(validation_cli, "get_study", lambda name: simulation_toy.STUDY)
    assert validation_cli.main(["--scale", "smoke", "--results-dir", str(tmp_path),
                                "--output-dir", str(tmp_path), "--no-progress"]) == 2
    assert "not overwriting" in capsys.readouterr().err
    assert json.loads((tmp_path / "report.json").read_text())["meta"]["scale"] == "small"


def test_an_interrupt_after_the_report_says_it_was_written_and_none_leaves_half_a_report(
        tmp_path, monkeypatch, capsys):
    """An interrupt (Ctrl-C, or SIGTERM since it is one) after the report was written
    said "no report written"; one while it was written (the figures) left a new
    report.json beside an old REPORT.md (a review). The two files now move into place
    together, and the message says what happened."""
    import validation._report as report

    monkeypatch.setattr(validation_cli, "all_checks", lambda: [_check("t", _passing)])
    monkeypatch.setattr(validation_cli, "get_study", lambda name: simulation_toy.STUDY)
    options = ["--scale", "smoke", "--results-dir", str(tmp_path), "--output-dir",
               str(tmp_path / "out"), "--no-progress"]
    original = validation_cli.write_report

    def then_interrupted(*args):
        original(*args)
        raise KeyboardInterrupt
    monkeypatch.setattr(validation_cli, "write_report", then_interrupted)
    assert validation_cli.main(options) == 130
    assert "the report was written" in capsys.readouterr().err
    before = {name: (tmp_path / "out" / name).read_text()
              for name in ("report.json", "REPORT.md")}

    def interrupted_figures(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(validation_cli, "write_report", original)
    monkeypatch.setattr(report, "_figures", interrupted_figures)
    assert validation_cli.main([*options, "--force"]) == 130
    assert "no report written" in capsys.readouterr().err
    assert {name: (tmp_path / "out" / name).read_text()
            for name in ("report.json", "REPORT.md")} == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()
                  if p.name.endswith(".partial")) == []


# --- the whole pipeline at smoke scale ----------------------------------------------------

def _run_validation(*arguments, timeout=150):
    command = [sys.executable, "-m", "validation", "--scale", "smoke", "--no-progress",
               "--n-jobs", "1", *arguments]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.timeout(240)
def test_validation_smoke_run_reports_every_check_and_the_paper_rebuilds(tmp_path):
    result = _run_validation("--results-dir", str(tmp_path / "results"), "--output-dir",
                             str(tmp_path))
    report = json.loads((tmp_path / "report.json").read_text())
    meta, rows = report["meta"], report["checks"]
    # The exit status follows the blocking list (smoke intervals decide few claims).
    assert result.returncode == (1 if meta["blocking"] else 0), result.stderr[-4000:]
    assert meta["scale"] == "smoke" and rows
    assert all(row["verdict"] != "error" for row in rows), [r for r in rows
                                                            if r["verdict"] == "error"]
    for row in rows:
        assert row["kind"] in ("theory", "identity")
        assert row["verdict"] in ("pass", "inconclusive", "fail")
        assert len(row["margin"]) == 2 and row["margin"][0] < row["margin"][1]
    # Identities hold in every replicate at any scale.
    assert all(row["verdict"] == "pass" for row in rows if row["kind"] == "identity")
    assert meta["theory"]["total"] + meta["identity"]["total"] == len(rows)
    text = (tmp_path / "REPORT.md").read_text()
    assert "## Theory checks" in text and "## Identity checks" in text
    # The paper is rebuilt from the same saved tables, without simulating.
    figures = tmp_path / "figures"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "paper", "--scale", "smoke",
                             "--results-dir", str(tmp_path / "results"), "--out-dir",
                             str(figures), "--report", str(tmp_path / "report.json")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    studies = {row["study"] for row in rows}
    assert {path.stem for path in figures.glob("*.png")} >= studies & {
        "recovery", "stability", "detection", "refinement"}
    assert (figures / "verdicts.md").exists()


#: Targets a control cannot decide at smoke scale: under inflated-noise no benign client
#: is rejected in any of the 8 smoke replicates, and eight equal values say only that
#: the mean is within [0, 1 - 0.025^(1/8)] = [0, 0.369] (mean_interval), which straddles
#: the margin [0.025, 0.075]; at small scale (192 replicates) the interval is
#: [0, 0.019] and the check fails (validation/controls/inflated-noise/REPORT.md).
#: Under fixed-level the smoke grid of consistency has two sizes of two replicates, on
#: which detection_consistency_trend cannot fail: where no logistic slope exists the
#: rate difference's Newcombe interval on 2 + 2 replicates is about [-0.66, 0.66]; at
#: small scale (four sizes of 50) it fails, its slope's interval below the rise of 0.1
#: the check asks for (validation/controls/fixed-level/REPORT.md).
#: Under no-correction the copying study's smoke grid has 16 clean clients (6 clients, 2
#: contaminated, 2 replicates per setting) on tests of little power (each client's
#: statistic predicted from 5 others'): 2 flagged, Wilson's interval [0.035, 0.36]
#: straddles 0.05; at small scale (240 clean clients) the check fails
#: (validation/controls/no-correction/REPORT.md).
#: The copying gain and rule checks decide nothing below 10 replicates per setting (a
#: review measured their percentile bootstrap's coverage at 0.49 on two): on the smoke
#: grid's two, every target of local-refinement, fedavg-refinement and halfway-fedavg
#: but refinement_clair_vs_formula is undecided; at small scale (10 per setting) all
#: fail (validation/controls/*/REPORT.md).
#: B3 (CLAIR beats the mean) is decided by its worst (attack, gamma) cell: the smoke grid
#: has a handful of replicates per cell, whose Wilson interval at a rate of 0 still
#: reaches above 0.5, so no-detection's B3 targets are undecided there; at small scale
#: (10 per cell) both fail (validation/controls/no-detection/REPORT.md).
_COPYING_GAINS = {"copying_gain_homogeneous", "copying_gain_heterogeneous"}
_COPYING_RULES = {"copying_beats_rules_homogeneous", "copying_beats_rules_heterogeneous"}
SMOKE_UNDECIDED = {"inflated-noise": {"detection_null_calibration"},
                   "fixed-level": {"detection_consistency_trend"},
                   "no-correction": {"copying_false_alarms"},
                   "local-refinement": _COPYING_GAINS,
                   "fedavg-refinement": _COPYING_RULES,
                   "halfway-fedavg": _COPYING_GAINS | {"copying_beats_rules_homogeneous"},
                   "no-detection": {"robust_clair_beats_mean",
                                    "robust_clair_beats_mean_rank_unknown"}}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("control", sorted(simulations.CONTROLS))
def test_each_negative_control_makes_its_target_checks_fail_at_smoke_scale(tmp_path,
                                                                        control):
    # In process (the CLI's main), to spare an interpreter start per control.
    targets = list(simulations.CONTROLS[control].targets)
    status = validation_cli.main(["--scale", "smoke", "--no-progress", "--control", control,
                                  "--checks", *targets, "--results-dir",
                                  str(tmp_path / "results"), "--output-dir", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    verdicts = {row["name"]: row["verdict"] for row in report["checks"]}
    undecided = SMOKE_UNDECIDED.get(control, set())
    assert verdicts == {name: "inconclusive" if name in undecided else "fail"
                        for name in targets}, verdicts
    assert status == (1 if undecided else 0) and report["meta"]["control"] == control
    # The control's rows live in their own tables, never in the normal ones.
    assert list((tmp_path / "results" / "controls" / control / "smoke").glob("*.jsonl"))
    assert not (tmp_path / "results" / "smoke").exists()


def test_a_constant_sample_decides_only_what_its_size_allows():
    """Equal values: no zero-width interval (which passed a check on two replicates);
    the interval shrinks with n towards the bound the values sit at; unbounded, it
    decides nothing; a non-finite value is an error, not dropped."""
    _, (lo, hi) = mean_interval([0.0] * 12, bounds=(0.0, 1.0))
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 12))
    assert decide((lo, hi), (-INF, 0.05)) == "inconclusive"
    _, (lo, hi) = mean_interval([0.0] * 400, bounds=(0.0, 1.0))
    assert decide((lo, hi), (-INF, 0.05)) == "pass"
    _, (lo, hi) = mean_interval([1.0] * 400)
    assert (lo, hi) == (-INF, INF)
    _, (lo, hi) = mean_interval([0.3] * 50, bounds=(0.0, 1.0))
    share = 1 - 0.025 ** (1 / 50)
    assert (lo, hi) == pytest.approx((0.3 - 0.3 * share, 0.3 + 0.7 * share))
    # a value round-off away is no spread (a review: one float step decided a check)
    _, (lo, hi) = mean_interval([0.0] * 11 + [1e-17], bounds=(0.0, 1.0))
    assert decide((lo, hi), (-INF, 0.05)) == "inconclusive"
    _, (lo, hi) = mean_interval([1.0] * 119 + [np.nextafter(1.0, 2.0)], bounds=(0.0, INF))
    assert hi == INF and lo < 1.0
    with pytest.raises(ValueError, match="2 of 4 values are not finite"):
        mean_interval([0.0, 0.0, np.nan, np.inf])
    with pytest.raises(ValueError, match="outside their bounds"):
        mean_interval([0.5, 1.5], bounds=(0.0, 1.0))


def test_ols_slope_refuses_a_non_finite_row():
    frame = pd.DataFrame({"x": [1.0, 2, 4, 8, 16], "y": [3.0, 6, 12, np.nan, 48]})
    with pytest.raises(ValueError, match="1 of 5 rows have a non-finite"):
        ols_slope(frame, "x", "y")


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
    failing = lambda df: {**_passing(df), "observed": 5.5, "interval": (5.0, 6.0)}  # noqa: E731
    checks = [_check("known", failing, known_failure="README#x", known_range=(2.0, 9.0)),
              _check("fine", _passing)]
    monkeypatch.setattr(validation_cli, "all_checks", lambda: checks)
    monkeypatch.setattr(validation_cli, "get_study", lambda name: simulation_toy.STUDY)
    status = validation_cli.main(["--scale", "smoke", "--results-dir", str(tmp_path),
                                  "--output-dir", str(tmp_path), "--no-progress"])
    assert status == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["meta"]["n_known_failures"] == 1 and report["meta"]["blocking"] == []
    assert "FAIL (known: README#x)" in (tmp_path / "REPORT.md").read_text()


def test_a_known_failure_tag_excuses_only_the_documented_failure():
    """A review set every success of a tagged check's table to False (and moved another
    tagged check to the far side of its margin): both failed, neither blocked. Now a
    failure outside the documented range blocks, and a tag needs its range."""
    frame = pd.DataFrame({"value": [0.1, -0.1]})
    for observed, interval in ((5.5, (5.0, 6.0)), (-3.0, (-3.5, -2.5)), (20.0, (19.0, 21.0))):
        result = lambda df, o=observed, i=interval: {**_passing(df), "observed": o,  # noqa: E731
                                                    "interval": i}
        row = run_check(_check("k", result, known_failure="README#x",
                               known_range=(2.0, 9.0)), frame)
        assert row["verdict"] == "fail"
        assert is_blocking(row) == (not 2.0 <= observed <= 9.0)
        if is_blocking(row):
            assert "outside the documented failure's range" in _report.markdown_table([row])
    with pytest.raises(ValueError, match="go together"):
        _check("k", _passing, known_failure="README#x")
    with pytest.raises(ValueError, match="go together"):
        _check("k", _passing, known_range=(0.0, 1.0))


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


def test_stability_first_order_checks_accept_a_law_and_reject_a_missing_factor():
    from validation.checks.stability import first_order_constant, first_order_slope

    rng = np.random.default_rng(0)
    predicted = np.exp(rng.uniform(np.log(0.005), np.log(0.2), 200))
    noise = np.exp(0.05 * rng.standard_normal(200))
    frame = pd.DataFrame({"predicted_error": predicted, "subspace_error": predicted * noise,
                          "sweep": "K", "n_clients": 10, "cell": np.arange(200) % 20,
                          "p": 20, "q": 5})
    frame["error_ratio"] = frame["subspace_error"] / frame["predicted_error"]
    by_name = {c.name: c for c in validation.all_checks()}
    assert run_check(by_name["stability_first_order_constant"], frame)["verdict"] == "pass"
    assert run_check(by_name["stability_first_order_slope"], frame)["verdict"] == "pass"
    # A factor sqrt(2) missing from the prediction, or an error that ignores it: fail.
    off = frame.assign(subspace_error=frame["subspace_error"] * np.sqrt(2.0))
    off["error_ratio"] = off["subspace_error"] / off["predicted_error"]
    assert run_check(by_name["stability_first_order_constant"], off)["verdict"] == "fail"
    flat = frame.assign(subspace_error=0.05 * noise)
    assert run_check(by_name["stability_first_order_slope"], flat)["verdict"] == "fail"
    assert first_order_constant(frame)["n"] == first_order_slope(frame)["n"] == 200


def test_consistency_checks_see_a_rising_rate_and_a_flat_one():
    by_name = {c.name: c for c in validation.all_checks()}
    rising = pd.DataFrame([{"size": i, "n_clients": k, "n": 5 * k, "gamma": 0.1,
                            "exact": j < rate * 60}
                           for i, (k, rate) in enumerate([(20, 0.2), (40, 0.6), (80, 0.97),
                                                          (160, 1.0)]) for j in range(60)])
    assert run_check(by_name["detection_consistency_trend"], rising)["verdict"] == "pass"
    assert run_check(by_name["detection_consistency_limit"], rising)["verdict"] == "pass"
    flat = rising.assign(exact=[j % 2 == 0 for j in range(len(rising))])
    assert run_check(by_name["detection_consistency_limit"], flat)["verdict"] == "fail"
    assert run_check(by_name["detection_consistency_trend"], flat)["verdict"] != "pass"
    # A method that never improves must be able to fail the trend, not only stay
    # undecided (a review: with a margin of 0 a flat path's interval sits about 0 at
    # any size, and no control failed the check): 4 000 replicates of a flat path
    # give a slope within about +-0.08, below the rise of 0.1 that counts.
    many = pd.DataFrame([{"size": i, "n_clients": k, "n": 5 * k, "gamma": 0.1,
                          "exact": j % 2 == 0}
                         for i, k in enumerate([20, 40, 80, 160]) for j in range(1000)])
    assert run_check(by_name["detection_consistency_trend"], many)["verdict"] == "fail"


def test_logistic_boundary_slope_recovers_a_planted_contour_without_censoring():
    from validation.checks.recovery import logistic_boundary_slope

    rng = np.random.default_rng(3)
    gamma = rng.uniform(0.02, 0.9, 4000)
    rank = rng.integers(1, 20, 4000)
    mu = rng.uniform(1.0, 3.0, 4000)
    # Success iff log(gamma/(1-gamma)) + log(mu r) < log c, blurred: a contour of slope -1.
    margin = np.log(2.0) - np.log(gamma / (1 - gamma)) - np.log(mu * rank)
    success = rng.random(4000) < 1 / (1 + np.exp(-3 * margin))
    frame = pd.DataFrame({"gamma": gamma, "rank": rank, "mu_u": mu, "success": success})
    slope, (lo, hi) = logistic_boundary_slope(frame)
    assert lo < -1.0 < hi and hi - lo < 0.2
    # A boundary that ignores the rank (slope 0) is told apart from -1.
    flat = frame.assign(success=rng.random(4000) < 1 / (1 + np.exp(3 * np.log(gamma))))
    slope, (lo, hi) = logistic_boundary_slope(flat)
    assert lo < 0.0 < hi and lo > -0.5


def test_copying_fresh_seeds_counts_seeds_of_development_and_earlier_blocks():
    from simulations.studies.copying import STUDY, cells
    from validation.checks.copying import _block_seeds, fresh_seeds

    def table(block, seeds):
        return pd.DataFrame({"seed_block": block, "seed": sorted(seeds)})

    first, second = _block_seeds("confirmatory"), _block_seeds("confirmatory-2")
    assert len(first) == len(second) == 2 * STUDY.replicates["full"]
    assert fresh_seeds(table("confirmatory-2", second))["observed"] == 0
    # the second block may not reuse the first block's or the development block's seeds
    reused = set(list(second)[:-3]) | set(list(first)[:3])
    assert fresh_seeds(table("confirmatory-2", reused))["observed"] == 3
    development = {task[3] for task in STUDY.tasks("small")}
    assert fresh_seeds(table("confirmatory-2",
                             set(list(second)[:-2]) | set(list(development)[:2])))[
        "observed"] == 2
    # the first block is not checked against the second (which came after it)
    assert fresh_seeds(table("confirmatory", first))["observed"] == 0
    assert {p["seed_block"] for p in cells("confirmatory-2")} == {"confirmatory-2"}
    # the third block: fresh, and checked against both earlier blocks
    third = _block_seeds("confirmatory-3")
    assert fresh_seeds(table("confirmatory-3", third))["observed"] == 0
    reused = set(list(third)[:-4]) | set(list(first)[:1]) | set(list(second)[:3])
    assert fresh_seeds(table("confirmatory-3", reused))["observed"] == 4
    # a block of another name (a sixth, or a mislabelled one): new to development and
    # to every registered block (a review: the development block's seeds relabelled
    # "confirmatory-6" counted 0)
    assert fresh_seeds(table("confirmatory-6", development))["observed"] == len(development)
    assert fresh_seeds(table("confirmatory-6", set(list(first)[:5])))["observed"] == 5
    # the development block is checked against the seeds recorded before it only
    assert fresh_seeds(table("development", development))["observed"] == 0


# --- a subset or scratch run does not replace a committed report ------------------------

def test_a_subset_or_scratch_run_does_not_replace_a_committed_report(tmp_path, monkeypatch,
                                                                      capsys):
    """A review ran ``--scale small --no-run --checks glora_exact_full_rank``: the
    committed validation/REPORT.md became a one-check report."""
    monkeypatch.setattr(validation_cli, "HERE", tmp_path / "validation")  # its default
    checks = [_check("one", _passing), _check("two", _passing)]
    monkeypatch.setattr(validation_cli, "all_checks", lambda: checks)
    monkeypatch.setattr(validation_cli, "get_study", lambda name: simulation_toy.STUDY)
    committed = tmp_path / "validation"
    scratch = ["--results-dir", str(tmp_path / "results")]
    (tmp_path / "results").mkdir()
    for scale, control in (("small", None), ("full", None), ("small", "no-alignment")):
        where = validation_cli.default_output_dir(scale, control)
        assert where.resolve() in validation_cli.committed_output_dirs()
        chosen = ["--control", control] if control else []
        for arguments in (["--checks", "one"], scratch, ["--checks", "one", *scratch]):
            assert validation_cli.main(["--scale", scale, "--no-progress", "--no-run",
                                        *chosen, *arguments]) == 2
            error = capsys.readouterr().err
            assert "committed report" in error and error.count("\n") == 1
    assert not committed.exists()
    # elsewhere, or with --force, it is written
    assert validation_cli.main(["--scale", "small", "--no-progress", "--checks", "one",
                                *scratch, "--output-dir", str(tmp_path / "mine")]) == 0
    assert validation_cli.main(["--scale", "small", "--no-progress", "--checks", "one",
                                *scratch, "--force"]) == 0
    assert json.loads((committed / "report.json").read_text())["meta"]["scale"] == "small"
    assert validation_cli.default_output_dir("smoke").resolve() not in \
        validation_cli.committed_output_dirs()


# --- provenance of the tables' rows ---------------------------------------------------

def test_the_report_names_each_table_s_commits_and_warns_when_they_differ(tmp_path,
                                                                         monkeypatch,
                                                                         capsys):
    """A review resumed a run after an edit: rows of "770371e" and of "770371e with
    uncommitted changes" in one table, reported as one commit."""
    monkeypatch.setattr(validation_cli, "all_checks", lambda: [_check("t", _passing)])
    monkeypatch.setattr(validation_cli, "get_study", lambda name: simulation_toy.STUDY)
    simulations.run_study(simulation_toy.STUDY, "smoke", results_dir=tmp_path,
                          progress=False)
    path = tmp_path / "smoke" / "toy.jsonl"
    rows = simulations.read_rows(path)
    for index, row in enumerate(rows):
        row["code_commit"] = "770371e" + (" with uncommitted changes in clairstat"
                                          if index >= 6 else "")
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    arguments = ["--scale", "smoke", "--results-dir", str(tmp_path), "--output-dir",
                 str(tmp_path / "report"), "--no-progress", "--no-run"]
    assert validation_cli.main(arguments) == 0
    meta = json.loads((tmp_path / "report" / "report.json").read_text())["meta"]
    assert meta["table_commits"] == {"toy": ["770371e",
                                             "770371e with uncommitted changes in clairstat"]}
    assert len(meta["provenance_warnings"]) == 2
    assert "2 versions of the code" in meta["provenance_warnings"][0]
    assert "not a commit" in meta["provenance_warnings"][1]
    assert capsys.readouterr().err.count("python -m validation: warning: ") == 2
    text = (tmp_path / "report" / "REPORT.md").read_text()
    assert "(their `code_commit`): toy `770371e`, `770371e with uncommitted" in text
    assert text.count("**Warning:**") == 2
    # one clean commit: named, no warning; rows without the column: "not recorded"
    path.write_text("".join(json.dumps({**row, "code_commit": "770371e"}) + "\n"
                            for row in rows))
    assert validation_cli.main(arguments) == 0
    meta = json.loads((tmp_path / "report" / "report.json").read_text())["meta"]
    assert meta["table_commits"] == {"toy": ["770371e"]} and not meta["provenance_warnings"]
    path.write_text("".join(json.dumps({k: v for k, v in row.items() if k != "code_commit"})
                            + "\n" for row in rows))
    assert validation_cli.main(arguments) == 0
    meta = json.loads((tmp_path / "report" / "report.json").read_text())["meta"]
    assert meta["table_commits"] == {"toy": [None]} and not meta["provenance_warnings"]
    assert "toy not recorded" in (tmp_path / "report" / "REPORT.md").read_text()


def test_the_report_s_commit_counts_the_checks_as_code(tmp_path, monkeypatch):
    """A review edited validation/checks/detection.py (its level): the report named the
    clean commit."""
    from simulations import _framework

    def state(root, folders):  # only validation/ differs from the commit
        changed = [folder for folder in folders if folder == "validation"]
        return "abc1234", changed, "0123456789ab" if changed else None

    monkeypatch.setattr(_framework, "_git_state", state)
    _framework.code_provenance.cache_clear()
    try:
        monkeypatch.setattr(validation_cli, "all_checks", lambda: [_check("t", _passing)])
        monkeypatch.setattr(validation_cli, "get_study", lambda name: simulation_toy.STUDY)
        assert validation_cli.main(["--scale", "smoke", "--results-dir", str(tmp_path),
                                    "--output-dir", str(tmp_path), "--no-progress"]) == 0
        meta = json.loads((tmp_path / "report.json").read_text())["meta"]
        assert meta["commit"] == ("abc1234 with uncommitted changes in validation "
                                  "(digest 0123456789ab)")
        # the rows do not depend on the checks (the toy study, in tests/, outside the
        # code folders, adds its own file's digest)
        assert meta["table_commits"] == {"toy": [
            "abc1234" + _framework._outside_study(simulation_toy.STUDY.simulate_one)]}
    finally:
        _framework.code_provenance.cache_clear()


def test_the_report_names_the_code_at_the_start_and_warns_when_it_changed(tmp_path,
                                                                          monkeypatch):
    """A review edited validation/ while the checks ran: the report, labelled when it
    was written, named the edited code, which the process had not run. The label is read
    at the start; an edit of the files during the run is a warning, a commit that leaves
    them as they were is not (a second review: a docs-only commit warned)."""
    from simulations import _framework

    label, content = ["abc1234"], ["digest-1"]
    monkeypatch.setattr(_framework, "_git_state",
                        lambda root, folders: (label[0], [], None))
    monkeypatch.setattr(_framework, "_code_state", lambda folders=None: content[0])
    # the code the simulations' run checks against: the state before any edit
    monkeypatch.setattr(_framework, "_loaded_code_state", lambda: "digest-1")
    monkeypatch.setattr(validation_cli, "all_checks", lambda: [_check("t", _passing)])
    monkeypatch.setattr(validation_cli, "get_study", lambda name: simulation_toy.STUDY)
    real_run = validation_cli.run_check

    def run(edit):
        def during(check, table):  # a commit, and perhaps an edit, while the checks run
            label[0] = "def5678"
            if edit:
                content[0] = "digest-2"
            return real_run(check, table)

        label[0], content[0] = "abc1234", "digest-1"
        monkeypatch.setattr(validation_cli, "run_check", during)
        _framework.code_provenance.cache_clear()
        try:
            assert validation_cli.main(["--scale", "smoke", "--results-dir",
                                        str(tmp_path), "--output-dir", str(tmp_path),
                                        "--no-progress"]) == 0
        finally:
            _framework.code_provenance.cache_clear()
        return json.loads((tmp_path / "report.json").read_text())["meta"]

    meta = run(edit=False)  # a commit of the same files: no change of the code
    assert meta["commit"] == "abc1234"
    assert not any("changed on disk" in warning for warning in meta["provenance_warnings"])
    meta = run(edit=True)
    assert meta["commit"] == "abc1234"
    assert any("changed on disk while the checks ran (now def5678)" in warning
               and "(abc1234)" in warning for warning in meta["provenance_warnings"])


# --- the printed digits keep an interval on its side of the margin ---------------------

def test_the_report_prints_the_digits_that_tell_an_interval_end_from_the_margin():
    """REPORT.md showed fedrot_bound_not_looser_non_rotational's interval as [0.998, 1]
    against "<= 1", verdict INCONCLUSIVE (its upper end is 1.0000587), and a margin
    1 - 1e-6 as "<= 1"."""
    row = {"name": "a", "study": "s", "claim": "c", "statistic": "x", "expected": 1,
           "observed": 0.999, "interval": [0.998, 1.0000587], "verdict": "inconclusive",
           "kind": "theory", "margin": [-INF, 1.0]}
    assert "| [0.998, 1.0001] | <= 1 | INCONCLUSIVE |" in _report.markdown_table([row])
    below = {**row, "interval": [0.998, 0.9999986], "margin": [-INF, 1 - 1e-6],
             "verdict": "pass"}
    assert "| [0.998, 0.9999986] | <= 0.999999 | pass |" in _report.markdown_table([below])
    assert _report.format_margin([-INF, 1 - 1e-6]) == "<= 0.999999"
    assert _report.format_margin([1 + 1e-6, INF]) == ">= 1.000001"
    # round-off and three-digit margins print as before
    assert _report.format_margin([-INF, 1e4 * np.finfo(float).eps]) == "<= 2.22e-12"
    assert _report.format_margin([0.025, 1.5 * 0.05]) == "[0.025, 0.075]"
    plain = {**row, "interval": [0.145, 0.246], "margin": [-INF, 1 - 1e-6]}
    assert "| [0.145, 0.246] | <= 0.999999 |" in _report.markdown_table([plain])
    exact = {**row, "interval": [0.998, 1.0]}  # an end on the margin is shown so
    assert "| [0.998, 1] | <= 1 |" in _report.markdown_table([exact])


# --- unusable command-line input: one line, exit status 2 ------------------------------

@pytest.mark.parametrize("case", ["unknown check", "no check named", "output dir a file",
                                  "output dir under a file", "results dir a file",
                                  "no-run on a missing results dir",
                                  "scheduler without dask", "a control's directory"])
def test_cli_refuses_unusable_input_in_one_line_with_status_2(tmp_path, monkeypatch, capsys,
                                                              case):
    monkeypatch.setattr(validation_cli, "all_checks", lambda: [_check("t", _passing)])
    monkeypatch.setattr(validation_cli, "get_study", lambda name: simulation_toy.STUDY)
    (tmp_path / "afile").write_text("")
    control_dir = tmp_path / "results" / "controls" / "no-detection"
    control_dir.mkdir(parents=True)
    (control_dir / "CONTROL").write_text("no-detection\n")
    results, output = str(tmp_path / "results"), str(tmp_path / "report")
    arguments = {
        "unknown check": ["--checks", "t", "nonsense"],
        "no check named": ["--checks"],  # ran all of them (a review)
        "output dir a file": ["--output-dir", str(tmp_path / "afile")],
        "output dir under a file": ["--output-dir", str(tmp_path / "afile" / "x")],
        "results dir a file": ["--results-dir", str(tmp_path / "afile")],
        "no-run on a missing results dir": ["--no-run", "--results-dir",
                                            str(tmp_path / "missing")],
        "scheduler without dask": ["--scheduler", "tcp://127.0.0.1:8786"],
        "a control's directory": ["--no-run", "--results-dir", str(control_dir)]}[case]
    defaults = {"--results-dir": results, "--output-dir": output}
    for option, value in defaults.items():
        if option not in arguments:
            arguments = [*arguments, option, value]
    assert validation_cli.main(["--scale", "smoke", "--no-progress", *arguments]) == 2
    error = capsys.readouterr().err
    assert error.startswith("python -m validation: error: ") and error.count("\n") == 1
    assert not (tmp_path / "report").exists() and not (tmp_path / "missing").exists()


def test_cli_refuses_n_jobs_0_and_reports_an_interrupt(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as stopped:
        validation_cli.main(["--scale", "smoke", "--n-jobs", "0", "--results-dir",
                             str(tmp_path), "--output-dir", str(tmp_path)])
    assert stopped.value.code == 2 and "argument --n-jobs" in capsys.readouterr().err
    monkeypatch.setattr(validation_cli, "all_checks", lambda: [_check("t", _passing)])

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(validation_cli, "run_study", interrupt)
    monkeypatch.setattr(validation_cli, "get_study", lambda name: simulation_toy.STUDY)
    assert validation_cli.main(["--scale", "smoke", "--results-dir", str(tmp_path),
                                "--output-dir", str(tmp_path), "--no-progress"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


def test_a_bounded_mean_s_interval_stays_within_its_bounds():
    """A review: a share's t interval reached below 0 ([-0.04, 0.41] on the smoke run's
    false discovery proportions); the mean lies within the bounds."""
    _, (lo, hi) = mean_interval([0, 0, 0.3333, 0, 0, 0.2, 0, 0], bounds=(0.0, 1.0))
    assert lo == 0.0 and 0.3 < hi < 0.5

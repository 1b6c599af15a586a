"""The real-data calibration scripts of benchmarks/ on a split or two (their full runs
are in benchmarks/RESULTS.md)."""

import contextlib
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

calibration = pytest.importorskip("real_data_calibration")
pytest.importorskip("statsmodels")
pytest.importorskip("sklearn")


def test_heldout_datasets_are_not_the_development_ones():
    development = {d[0] for d in calibration._datasets()}
    heldout = calibration._heldout_datasets()
    assert {d[0] for d in heldout} == {"breast_cancer", "star98"}
    assert not development & {d[0] for d in heldout}
    for name, features, outputs, frame, n_clients in heldout:
        # every client keeps at least 40 residual degrees of freedom (as fixed before
        # the first run)
        assert len(frame) // n_clients - len(features) - 1 >= 40
        assert not frame[features + outputs].isna().any().any()


def test_third_heldout_pair_is_as_fixed_before_its_run():
    """benchmarks/RESULTS.md, "A third held-out pair": wine and iris, six clients each,
    at least 22 residual degrees of freedom per client, new to every earlier run."""
    earlier = {d[0] for fn in (calibration._datasets, calibration._heldout_datasets,
                               calibration._second_heldout_datasets) for d in fn()}
    third = calibration._third_heldout_datasets()
    assert [d[0] for d in third] == ["wine", "iris"] and not earlier & {"wine", "iris"}
    for name, features, outputs, frame, n_clients in third:
        assert n_clients == 6
        assert len(frame) // n_clients - len(features) - 1 >= 22
        assert not frame[features + outputs].isna().any().any()


def test_leave_two_out_rank_drops_a_direction_two_clients_carry():
    """The exploration's rule (rank_rule_support.py) is the estimator's rank_support=3."""
    from clairstat._detection import select_rank

    rng = np.random.default_rng(0)
    blocks = 0.1 * rng.standard_normal((8, 6, 2))
    shared = np.zeros((6, 2))
    shared[0] = 5.0
    pair = blocks.copy()
    pair[:2] += shared  # one direction, two clients
    spread = blocks.copy()
    spread += rng.standard_normal((8, 1, 1)) * shared  # the same direction, every client
    weights = np.ones(8)
    assert select_rank(pair, weights, 0.1) == 1
    assert select_rank(pair, weights, 0.1, support=3) == 0
    assert select_rank(spread, weights, 0.1) == 1
    assert select_rank(spread, weights, 0.1, support=3) == 1


def test_fourth_heldout_pair_is_as_fixed_before_its_run():
    """benchmarks/RESULTS.md, "A fourth held-out pair": grunfeld and macrodata, six
    clients each, at least 29 residual degrees of freedom per client, new to every
    earlier run of the calibration."""
    earlier = {d[0] for name, fn in calibration.DATASETS.items() if name != "heldout4"
               for d in fn()}
    fourth = calibration._fourth_heldout_datasets()
    assert [d[0] for d in fourth] == ["grunfeld", "macrodata"]
    assert not earlier & {"grunfeld", "macrodata"}
    for name, features, outputs, frame, n_clients in fourth:
        assert n_clients == 6
        assert len(frame) // n_clients - len(features) - 1 >= 29
        assert not frame[features + outputs].isna().any().any()


def test_fifth_heldout_set_is_as_fixed_before_its_run():
    """benchmarks/RESULTS.md, "A fifth held-out set": fertility, engel and cancer, six
    clients each, at least 29 residual degrees of freedom per client, new to every
    earlier calibration run."""
    earlier = {d[0] for name, fn in calibration.DATASETS.items() if name != "heldout5"
               for d in fn()}
    fifth = calibration._fifth_heldout_datasets()
    assert [d[0] for d in fifth] == ["fertility", "engel", "cancer"]
    assert not earlier & {"fertility", "engel", "cancer"}
    for name, features, outputs, frame, n_clients in fifth:
        assert n_clients == 6
        assert len(frame) // n_clients - len(features) - 1 >= 29
        assert not frame[features + outputs].isna().any().any()


def test_sixth_heldout_set_is_as_fixed_before_its_run():
    """benchmarks/RESULTS.md, "A sixth held-out set": cattaneo2, racd10 and dietox (real
    data shipped inside statsmodels' tests), with the client counts fixed there, at
    least 90 residual degrees of freedom per client, new to every earlier calibration
    run, complete in the columns used."""
    earlier = {d[0] for name, fn in calibration.DATASETS.items() if name != "heldout6"
               for d in fn()}
    sixth = calibration._sixth_heldout_datasets()
    assert [(d[0], d[4]) for d in sixth] == [("cattaneo2", 20), ("racd10", 15),
                                             ("dietox", 8)]
    assert not earlier & {"cattaneo2", "racd10", "dietox"}
    for name, features, outputs, frame, n_clients in sixth:
        assert len(frame) // n_clients - len(features) - 1 >= 90
        assert not frame[features + outputs].isna().any().any()
    assert len(sixth[2][3]) == 789  # dietox: the rows with a feed intake


def test_covariance_spread_is_near_one_where_the_covariance_is_right():
    """The diagnostic of benchmarks/covariance_spread.py on clients whose OLS noise is
    homoscedastic (mean squared z near 1 for both covariances) and on clients whose
    noise grows with the covariate (the classical one understates it: the negative
    control)."""
    import pandas as pd

    import covariance_spread

    rng = np.random.default_rng(0)
    x = rng.lognormal(0.0, 0.8, 600)  # skewed, as incomes
    frame = pd.DataFrame({"x": x, "flat": 2 * x + rng.standard_normal(600),
                          "growing": 2 * x + x ** 2 * rng.standard_normal(600)})
    # 40 splits of 6 clients: 240 squared z per coefficient, mean within about 0.2 of 1
    # (chi^2_1's sd sqrt(2) over sqrt(240), and the splits' dependence) where right;
    # measured 0.91 and 0.82
    flat = covariance_spread.mean_squared_z(frame, ["x"], ["flat"], 6, 40, "nonrobust")
    assert np.all(np.abs(flat - 1.0) < 0.3)
    growing = covariance_spread.mean_squared_z(frame, ["x"], ["growing"], 6, 40,
                                               "nonrobust")
    robust = covariance_spread.mean_squared_z(frame, ["x"], ["growing"], 6, 40, "HC3")
    # measured: classical 6.8 and 20.3, HC3 1.31 and 1.33
    assert growing.min() > 3.0 and robust.max() < 1.6


def test_a_row_records_the_rank_support():
    name, features, outputs, frame, n_clients = calibration._fourth_heldout_datasets()[0]
    rows = calibration.run_one(name, frame, features, outputs, n_clients, 0, "none", 0,
                               rank_support=3)
    assert [r["rank_support"] for r in rows] == [3, 3]
    assert set(rows[0]) | {"version"} == set(calibration.fields(3, default_frame="residual"))


def test_a_row_records_the_rank_given():
    name, features, outputs, frame, n_clients = calibration._heldout_datasets()[1]
    rows = calibration.run_one(name, frame, features, outputs, n_clients, 0, "flip", 2,
                               rank=0)
    assert [r["path"] for r in rows] == ["default", "noise_cov"]
    for row in rows:
        assert row["rank_given"] == 0 and row["rank"] == 0
        assert set(row) | {"version"} == set(calibration.fields(default_frame="residual"))
    free = calibration.run_one(name, frame, features, outputs, n_clients, 0, "none", 0)
    assert all(r["rank_given"] == "" for r in free)


def test_the_tables_before_the_frame_are_reproduced_with_default_frame_none():
    """``--default-frame none`` is the path without a covariance as it was before the
    frame: it gives the committed development rows (split 0) of that path again, and
    the package's setting is restored after the run. (The `noise_cov` rows are not
    compared: the committed ones predate the exact match of the null's spread,
    2026-12-07, after which split 0's null with the classical covariance flags two
    clients; the default path's rows of splits 0-3 are unchanged by it.)"""
    import pandas as pd

    import clairstat._estimator

    table = pd.read_csv(ROOT / "benchmarks" / "results" / "real_data_calibration.csv")
    name, features, outputs, frame, n_clients = calibration._datasets()[0]
    for kind in ("none", "flip"):
        rows = calibration.run_one(name, frame, features, outputs, n_clients, 0, kind,
                                   0 if kind == "none" else 2, default_frame="none")
        assert "default_frame" not in rows[0]
        stored = table[(table.dataset == name) & (table.split == 0)
                       & (table.corruption == kind)].set_index("path")
        for row in (row for row in rows if row["path"] == "default"):
            for column in ("any_flag", "false_flags", "victims_flagged", "rank"):
                assert row[column] == stored.loc[row["path"], column], (kind, row["path"])
    assert clairstat._estimator.ESTIMATED_FRAME == "residual"


def test_the_unit_free_tables_are_reproduced_and_the_setting_restored():
    """``--decomposition-frame residual-3``: racd10's split 0 (the dataset whose sign flips
    the unit-free decomposition lost) gives the committed ``_unit_free`` rows again, with
    the setting in a column; the package's setting (the data's units) is restored."""
    import pandas as pd

    import clairstat._estimator

    table = pd.read_csv(ROOT / "benchmarks" / "results"
                        / "real_data_calibration_heldout6_unit_free.csv")
    name, features, outputs, frame, n_clients = next(
        entry for entry in calibration.GROUPS["heldout6"]() if entry[0] == "racd10")
    for kind in ("none", "flip"):
        rows = calibration.run_one(name, frame, features, outputs, n_clients, 0, kind,
                                   0 if kind == "none" else 2,
                                   decomposition_frame="residual-3")
        stored = table[(table.dataset == name) & (table.split == 0)
                       & (table.corruption == kind)].set_index("path")
        for row in rows:
            assert row["decomposition_frame"] == "residual-3"
            for column in ("any_flag", "false_flags", "victims_flagged", "rank"):
                assert row[column] == stored.loc[row["path"], column], (kind, row["path"])
    assert clairstat._estimator.DECOMPOSITION_FRAME == "none"
    assert clairstat._estimator.DECOMPOSITION_PASSES == 3
    with pytest.raises(ValueError, match="decomposition_frame"):  # checked before it is set
        calibration.run_one(name, frame, features, outputs, n_clients, 0, "none", 0,
                            decomposition_frame="residual-x")
    assert clairstat._estimator.DECOMPOSITION_FRAME == "none"
    assert clairstat._estimator.ESTIMATED_FRAME == "residual"


def test_decomposition_frame_script_reproduces_its_committed_rows(tmp_path, capsys):
    """``benchmarks/decomposition_frame.py``: replicate 3000's rows come out again (both
    settings, drawn and rescaled units, 8 clients); the unit-free fit's flags are those of
    the drawn units; an unknown setting is an error and the setting is restored."""
    import pandas as pd

    import clairstat._estimator
    import decomposition_frame as script

    table = pd.read_csv(ROOT / "benchmarks" / "results" / "decomposition_frame.csv")
    rows = {}
    for contaminated in (0, 1):
        for units in script.UNITS:
            for frame in ("none", "residual-3"):
                row = script.run_one(8, contaminated, 1.0, units, frame, 3000)
                stored = table[(table.n_clients == 8) & (table.n_contaminated == contaminated)
                               & (table.units == units) & (table.frame == frame)
                               & (table.replicate == 3000)]
                assert len(stored) == 1
                for column in ("benign_flagged", "rank"):
                    assert row[column] == stored[column].iloc[0], (units, frame, column)
                if contaminated:  # where the settings differ (1.0 against 0.0 here)
                    assert row["recall"] == stored.recall.iloc[0], (units, frame)
                assert np.isclose(row["refined_error_ratio"],
                                  stored.refined_error_ratio.iloc[0], rtol=1e-6)
                rows[(contaminated, units, frame)] = row
    for contaminated in (0, 1):  # the unit-free fit: the same flag counts in other units
        drawn, rescaled = (rows[(contaminated, units, "residual-3")]
                           for units in ("drawn", "rescaled"))
        assert (drawn["benign_flagged"], drawn["recall"], drawn["rank"]) == (
            rescaled["benign_flagged"], rescaled["recall"], rescaled["rank"])
    with pytest.raises(ValueError):
        script.run_one(8, 0, 1.0, "drawn", "no such frame", 3000)
    assert clairstat._estimator.DECOMPOSITION_FRAME == "none"
    out = tmp_path / "frames.csv"
    script.main(["--replicates", "0", "1", "--frames", "none", "--units", "drawn",
                 "--out", str(out)])
    assert len(pd.read_csv(out)) == len(script.CELLS)
    assert "| 40 | 10 | drawn | none | 1 |" in capsys.readouterr().out


def test_real_data_refinement_reproduces_its_committed_rows(tmp_path, capsys):
    """``benchmarks/real_data_refinement.py``: replicate 0 of grunfeld's firms and of
    diabetes' random split gives the committed rows of the current code (the
    ``_shrunk`` table) again; ``local`` is 1 by construction and the pooled mean is
    far from it on the firms (a script that predicted with one estimate for every
    method would give 1 everywhere); a rerun appends nothing."""
    import pandas as pd

    import real_data_refinement as script

    table = pd.read_csv(ROOT / "benchmarks" / "results"
                        / "real_data_refinement_shrunk.csv")
    for name in ("grunfeld_firms", "diabetes"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            rows = script.run_one(name, 0)
        assert [row["method"] for row in rows] == list(script.METHODS)
        for row in rows:
            stored = table[(table.dataset == name) & (table.replicate == 0)
                           & (table.method == row["method"])]
            assert len(stored) == 1
            # the same fits on the same rows: float64 round-off of a few hundred sums
            assert row["relative_error"] == pytest.approx(stored.relative_error.iloc[0],
                                                          rel=1e-9)
            assert row["share_improved"] == pytest.approx(stored.share_improved.iloc[0])
        errors = {row["method"]: row["relative_error"] for row in rows}
        assert errors["local"] == 1.0
        if name == "grunfeld_firms":
            assert errors["mean"] > 2.0
    out = tmp_path / "refinement.csv"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        script.main(["--replicates", "0", "1", "--datasets", "diabetes", "--out", str(out)])
        script.main(["--replicates", "0", "1", "--datasets", "diabetes", "--out", str(out)])
    assert len(pd.read_csv(out)) == len(script.METHODS)
    assert "| diabetes | exchangeable | 8 | clair_cov | 1 |" in capsys.readouterr().out


def test_a_file_of_other_columns_is_not_appended_to(tmp_path):
    out = tmp_path / "old.csv"
    out.write_text("dataset,split,path\n")
    with pytest.raises(SystemExit, match="write to a new file"):
        calibration.run(1, out, datasets="heldout")
    assert out.read_text() == "dataset,split,path\n"


def test_flagged_clients_script_names_the_noisiest(capsys):
    import real_data_flagged_clients as flagged

    rows, n_splits = flagged.flagged_clients("star98", 0, 3, "default")
    assert n_splits == 3
    for split, clients, ratio, rank, top in rows:
        assert len(clients) == len(ratio) == len(rank) >= 1
        assert np.all(rank >= 1) and top >= np.max(ratio)
    with pytest.raises(SystemExit, match="unknown dataset"):
        flagged.flagged_clients("nope", 0, 1, "default")


def test_lora_benchmark_torch_part_runs_and_reports_every_path(tmp_path, capsys):
    """``lora_benchmark.py --quick --torch-only``: the numpy reference and both torch
    dtypes, each with recall 1 and no false flag on the small module."""
    pytest.importorskip("torch")
    import lora_benchmark

    out = tmp_path / "table.md"
    lora_benchmark.main(["--quick", "--torch-only", "--markdown", str(out)])
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines()
            if line.startswith("| numpy") or line.startswith("| torch")]
    assert [r[0].strip() for r in rows] == ["numpy (default)", "torch cpu float64",
                                            "torch cpu float32"]
    assert float(rows[0][3]) == 1.0  # the reference's own ratio
    assert all(float(r[4]) == 1.0 and int(r[5]) == 0 for r in rows)


def test_wide_lora_benchmark_runs_both_routes_to_the_same_flags(tmp_path, capsys):
    """``wide_lora_benchmark.py --quick``: the wide route and the cross-Gram kernel on
    the same modules (K r / d = 2 ... 8), the same recall and false-flag count."""
    import wide_lora_benchmark

    out = tmp_path / "table.md"
    wide_lora_benchmark.main(["--quick", "--markdown", str(out)])
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines()
            if line.startswith("| 128 |")]
    assert [int(r[1]) for r in rows] == [64, 128, 256]
    assert [r[4].strip() for r in rows] == ["no", "yes", "yes"]  # K r / d = 2 is not wide
    assert all(r[11].strip() == "yes" and float(r[9]) == 1.0 for r in rows)
    assert "end to end, package, wide stacks only" in out.read_text()


def test_copy_grouping_script_runs(capsys):
    import copy_grouping

    copy_grouping.main(["--seeds", "2"])
    table = capsys.readouterr().out
    assert table.count("\n| ") == 16  # header and 15 cells



def test_detection_cycles_script_runs_and_splits_by_convergence(capsys):
    import detection_cycles

    detection_cycles.main(["--fits", "2"])
    assert capsys.readouterr().out.count("\n| ") == 1 + len(detection_cycles.cells())
    # the counts go to the converged or the cycled side by the fit's own flag
    outcomes = iter([(True, 2, np.array([True, False, False]), np.array([True, False, False])),
                     (False, 5, np.array([False, True, False]), np.array([True, False, False]))])
    not_converged, counts, rounds = detection_cycles.run_cell(lambda seed: next(outcomes), 2)
    assert not_converged == 1 and rounds.tolist() == [2, 5]
    assert counts[True].tolist() == [0, 2, 1, 1] and counts[False].tolist() == [1, 2, 0, 1]

def test_leave_one_out_batch_script_runs(capsys):
    import leave_one_out_batch

    rows = leave_one_out_batch.main(["--quick", "--repeats", "1"])
    assert capsys.readouterr().out.count("\n| ") == 3  # header and two rows
    # the batch gives the statistics one client at a time gives: both are certified to
    # 4 sqrt(p) eps of the top eigenvalue, so they differ by that over the relative
    # eigengap (Davis-Kahan); 1e-10 allows a gap down to ~1e-4 of the top value
    assert all(row["diff"] <= 1e-10 for row in rows)


def test_median_singular_value_script_runs(capsys):
    """Small size, one repeat: every step timed, the two medians agree to round-off."""
    import median_singular_value_benchmark

    median_singular_value_benchmark.main(["--size", "120", "--repeats", "1"])
    out = capsys.readouterr().out
    assert out.count("\n| ") == 6  # header and five steps
    difference = float(out.rsplit("medians: ", 1)[1])
    assert difference <= 5e-7  # the Gram route's certificate


def test_refine_gc_script_runs(capsys):
    """One layer of 6 clients, once each way: both rows, each run a success (the
    timings themselves are the script's output, benchmarks/RESULTS.md)."""
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    import refine_gc_benchmark

    rows = refine_gc_benchmark.main(["--layers", "1", "--clients", "6", "--repeats", "1"])
    assert [mode for mode, _ in rows] == ["without", "with"]
    assert all(row["collections"] > 0 for _, row in rows)


def test_holm_script_runs(capsys):
    """Two calls, one repeat: the table's two rows and the same flags both ways."""
    pytest.importorskip("torch")
    import holm_benchmark

    holm_benchmark.main(["--calls", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    assert out.count("\n| ") == 3  # header and two rows
    assert "same flags both ways, every repeat: True" in out


def test_copying_multikrum_refits_a_stored_replicate():
    """One development replicate refitted from its seed: local LoRA's accuracy, CLAIR and
    the registered Krum reproduce the stored values (the script's own guard that it
    scores the table's adapters), and every rule of the table has a gain."""
    pytest.importorskip("torch")
    import json

    import copying_multikrum

    rows = [json.loads(line) for line in
            (ROOT / "simulations/results/small/copying.jsonl").read_text().splitlines()]
    row = next(r for r in rows if r["setting"] == "homogeneous" and r["replicate"] == 0)
    result = copying_multikrum.run_one(row)
    assert copying_multikrum.reproduces(row, result)  # the script's own guard
    for name in copying_multikrum.REPRODUCED:
        assert result["gains"][name] == pytest.approx(
            result["stored"][name], abs=copying_multikrum.REPRODUCED_POINTS)
    # and it tells another replicate's adapters from this one's
    other = next(r for r in rows if r["setting"] == "homogeneous" and r["replicate"] == 1)
    assert not copying_multikrum.reproduces(dict(other, seed=row["seed"]), result)
    assert set(copying_multikrum.RULES) | {"clair"} <= set(result["gains"])
    text = copying_multikrum.table([{"block": "small", **result}])
    assert text.count("\n| small | homogeneous | 1 |") == len(copying_multikrum.RULES)


def test_multikrum_decision_is_the_amendments_rule():
    """PROTOCOL amendment 8: ahead when the interval lies in [0.1, inf), behind in
    (-inf, -0.1], undecided otherwise (the ends included as the amendment says)."""
    import copying_multikrum

    decide = copying_multikrum.decision
    assert decide(0.1, 2.0) == "ahead" and decide(0.09, 2.0) == "undecided"
    assert decide(-2.0, -0.1) == "behind" and decide(-2.0, -0.09) == "undecided"
    assert decide(-0.5, 0.5) == "undecided"


def test_copying_cycles_counts_a_rejection_only_as_an_extra_flag(monkeypatch, tmp_path):
    """One smoke replicate of copying_flagged's cells: the script's own checks pass (each
    module's flags are its estimator's, and a settled loop's flags are its final test's
    rejections, the reading the alternative rests on); counting the rejections can only
    add flags (the vote is monotone), so its recall and false alarms are never lower."""
    pytest.importorskip("torch")
    import copying_cycles

    from simulations import get_study

    monkeypatch.setenv("CLAIRSTAT_CACHE_DIR", str(tmp_path / "cache"))
    _, _, params, seed = get_study("copying_flagged").tasks("smoke")[0]
    row = copying_cycles.run_one(dict(params), seed)
    assert 0 <= row["not_converged"] <= row["modules"]
    assert row["clean"] + row["attackers"] == row["n_clients"]
    for key in ("recall", "false_alarms"):
        assert row["rejections_count"][key] >= row["package"][key]
    if row["kept_rejected_attacker"] + row["kept_rejected_clean"] == 0:
        assert row["rejections_count"] == row["package"]
    assert "| " in copying_cycles.table([row])


def test_rank_support_synthetic_rows(tmp_path):
    """benchmarks/rank_support_synthetic.py: one seed of one cell gives a row per rule
    with the table's columns; its alike contamination is one common shift."""
    import rank_support_synthetic as synthetic

    rows = synthetic.run_one(6, "alike", "strong", 0)
    assert [r["rank_support"] for r in rows] == [1, 3]
    assert all(list(r) == synthetic.FIELDS for r in rows)
    assert all(0 <= r["victims_flagged"] <= 2 for r in rows)
    data = synthetic._data(6, "alike", "strong", 0)
    bad = np.flatnonzero(data.contaminated)
    # the two contaminated clients' truths differ from the subspace by one common shift
    off = [(np.eye(10) - data.subspace @ data.subspace.T) @ (data.truth[k] - data.backbone)
           for k in bad]
    np.testing.assert_allclose(off[0], off[1], atol=1e-12)


def test_resumable_tables(tmp_path):
    """benchmarks/_tables.py: rows appended with a header once, read back on resume; an
    empty file (a run killed before its first row) gets its header; a table with other
    columns is refused."""
    import _tables

    out = tmp_path / "t.csv"
    out.touch()  # killed before its first row
    assert _tables.existing_rows(out, ["a", "b"]) == []
    for value in (1, 2):
        with _tables.appending(out, ["a", "b"]) as (writer, handle):
            writer.writerow({"a": value, "b": value + 1})
    assert _tables.existing_rows(out, ["a", "b"]) == [{"a": "1", "b": "2"},
                                                      {"a": "2", "b": "3"}]
    with pytest.raises(SystemExit, match="has the columns"):
        _tables.existing_rows(out, ["a", "c"])


def test_rank_rule_support_resumes_its_tables_with_their_method(tmp_path):
    """The exploration's tables predate the frame of robust scales: the script runs the
    path without a covariance as they were made (it crashed on the frame's column, a
    review) and writes its own columns."""
    import rank_rule_support

    out = tmp_path / "support.csv"
    rank_rule_support.run(1, out, datasets="heldout4")
    import pandas as pd

    table = pd.read_csv(out)
    assert list(table.columns) == rank_rule_support.FIELDS
    assert len(table) == 2 * 4 * 2  # two datasets, four corruptions, two paths


def test_frame_units_script_prints_both_paths(capsys):
    import frame_units

    frame_units.main(["--splits", "1"])
    out = capsys.readouterr().out
    assert "frame of robust scales (default) | 1 |" in out and "plain statistic | 1 |" in out


def test_heldout_all_is_the_eleven_heldout_datasets_once():
    """--datasets heldout_all runs the first five held-out sets together; DATASETS,
    which other scripts walk (covariance_spread.py), holds each dataset once."""
    names = [d[0] for d in calibration.GROUPS["heldout_all"]()]
    assert len(names) == len(set(names)) == 11
    walked = [d[0] for fn in calibration.DATASETS.values() for d in fn()]
    assert len(walked) == len(set(walked)) == 18


def test_lora_stages_ab_times_every_stage_of_two_checkouts(capsys):
    """``lora_stages_ab.py --quick``: one row per kept fit and a median row per checkout,
    every stage timed (here the same checkout twice); the mean's readout is not
    computed on the per-module path (0 s)."""
    import lora_stages_ab

    lora_stages_ab.main([str(ROOT), str(ROOT), "--quick", "--rounds", "1", "--runs", "2",
                         "--n-jobs", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert len(rows) == 4 and all("median" in row[0] for row in rows[2:])
    for row in rows:
        values = dict(zip(header[1:], map(float, row[1:])))
        assert values["total (s)"] > 0 and values["decomposition (s)"] > 0
        assert values["out-of-sample (s)"] > 0 and values["client readouts (s)"] > 0
        assert values["mean readout (s)"] == 0.0
        assert sum(v for k, v in values.items() if k != "total (s)") <= values["total (s)"]


def test_lora_concurrency_times_every_cell_with_a_neighbour_running():
    """``lora_concurrency.py --quick`` (its niced cells in a child process): one row per
    thread setting, every cell timed, the niced cells 10 steps nicer than the script,
    and every neighbour still running when killed (return code -9) and reaped."""
    import ast
    import os
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lora_concurrency.py"),
                          "--quick", "--runs", "1"], capture_output=True, text=True,
                         env=env, timeout=300, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| None") or
            line.startswith("| 1 ")]
    assert len(rows) == 2
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert int(cells[1]) >= 1 and int(cells[5]) == 1  # niced: one thread
        assert all(float(cells[i]) > 0 for i in (2, 3, 6))
        assert cells[4].endswith("x") and cells[7].endswith("x")
    own = os.getpriority(os.PRIO_PROCESS, 0)
    assert f"niceness {own} (niced cells: [{min(own + 10, 19)}])" in out
    ended = ast.literal_eval(out.split("Neighbour processes (pid, return code): ")[1]
                             .splitlines()[0])
    assert len(ended) == 4  # the two "beside" cells and the two niced ones
    assert all(code == -9 for _, code in ended)  # running until killed


def test_exchangeable_null_reproduces_its_committed_rows():
    """``benchmarks/exchangeable_null.py``: its rows of star98's and fair's split 1 (star98's
    real estimates flag a client there) come out again, every variant and path, and the
    ``real`` variant is the calibration table's null split (same seeds)."""
    import pandas as pd

    import exchangeable_null

    table = pd.read_csv(ROOT / "benchmarks" / "results" / "exchangeable_null.csv")
    calibrated = pd.read_csv(ROOT / "benchmarks" / "results"
                             / "real_data_calibration_heldout_all_exact_spread.csv")
    entries = {entry[0]: entry for entry in exchangeable_null._datasets()}
    assert len(entries) == 18
    for name in ("star98", "fair"):
        rows = exchangeable_null.run_one(entries[name], 1)
        assert len(rows) == 5
        stored = table[(table.dataset == name) & (table.split == 1)]
        for row in rows:
            match = stored[(stored.variant == row["variant"]) & (stored.path == row["path"])]
            assert len(match) == 1
            for column in ("any_flag", "n_flagged", "rank"):
                assert row[column] == match[column].iloc[0], (name, row["variant"], column)
    real = table[(table.dataset == "star98") & (table.variant == "real")].set_index("split")
    null = calibrated[(calibrated.dataset == "star98") & (calibrated.path == "default")
                      & (calibrated.corruption == "none")].set_index("split")
    assert real.any_flag.sum() > 0
    assert (real.any_flag == null.any_flag.loc[real.index]).all()


def test_exchangeable_null_common_variant_draws_one_covariance():
    """The ``common`` variant gives every client the clients' average covariances, the
    ``own`` variant each client's own; both centre on the weighted mean."""
    import exchangeable_null

    name, features, outputs, frame, n_clients = next(
        e for e in exchangeable_null._datasets() if e[0] == "star98")
    ols = exchangeable_null.client_estimates(name, frame, features, outputs, n_clients, 0)
    rng = np.random.default_rng(0)
    _, (rows, cols) = exchangeable_null.variant_estimates(ols, "common", rng)
    assert np.allclose(rows, ols.noise_cov[0].mean(axis=0))
    assert np.allclose(cols, ols.noise_cov[1].mean(axis=0))
    _, (rows, cols) = exchangeable_null.variant_estimates(ols, "own", rng)
    assert np.array_equal(rows, ols.noise_cov[0]) and np.array_equal(cols, ols.noise_cov[1])
    # with the row covariances scaled to nothing the draws are the weighted mean itself
    from types import SimpleNamespace

    tiny = SimpleNamespace(estimates=ols.estimates, n_samples=ols.n_samples,
                           noise_cov=(ols.noise_cov[0] * 1e-30, ols.noise_cov[1]))
    drawn, _ = exchangeable_null.variant_estimates(tiny, "own", rng)
    weights = ols.n_samples / ols.n_samples.sum()
    mean = np.tensordot(weights, ols.estimates, axes=1)
    assert np.allclose(drawn, mean[None], rtol=0, atol=1e-10 * np.abs(mean).max())
    drawn, _ = exchangeable_null.variant_estimates(ols, "own", rng)
    assert not np.allclose(drawn, mean[None])


def test_exchangeable_null_draws_have_the_packages_covariance_convention():
    """``noise_cov=(row_cov, col_cov)`` means cov(vec E) = col_cov (x) row_cov with vec
    stacking columns (the estimator's docstring); the script's draws must follow it,
    not the transposed product (which the committed-row test above only catches on
    the splits it reruns)."""
    import exchangeable_null

    rng = np.random.default_rng(0)
    row_cov = np.array([[2.0, 0.8, 0.3], [0.8, 1.0, -0.4], [0.3, -0.4, 1.5]])
    col_cov = np.array([[1.0, 0.6], [0.6, 3.0]])
    n_draws = 20_000
    draws = exchangeable_null._draw(np.zeros((3, 2)), np.broadcast_to(row_cov, (n_draws, 3, 3)),
                                    np.broadcast_to(col_cov, (n_draws, 2, 2)), rng)
    vecs = draws.transpose(0, 2, 1).reshape(n_draws, -1)  # column-stacked vec
    empirical = vecs.T @ vecs / n_draws
    scale = np.abs(np.kron(col_cov, row_cov)).max()
    # sampling error of a second moment: about sqrt(2 / n) ~ 1% of the largest entry
    assert np.abs(empirical - np.kron(col_cov, row_cov)).max() < 0.05 * scale
    assert np.abs(empirical - np.kron(row_cov, col_cov)).max() > 0.3 * scale


def test_calibration_cost_reproduces_its_committed_rows_and_restores_the_calibration():
    """``benchmarks/calibration_cost.py``: fair's split 0 comes out as committed (every
    variant, kind and calibration, and the shifted client), the identity calibration is
    undone afterwards, and inside it a fit has no calibration (scale factor 1, no
    widening) and p-values no larger than the package's."""
    import pandas as pd

    import calibration_cost

    from clairstat import _inference

    original = _inference._calibrate
    table = pd.read_csv(ROOT / "benchmarks" / "results" / "calibration_cost.csv")
    entry = next(e for e in calibration_cost._datasets() if e[0] == "fair")
    rows = calibration_cost.run_one(entry, 0)
    assert _inference._calibrate is original
    assert len(rows) == 8
    stored = table[(table.dataset == "fair") & (table.split == 0)]
    for row in rows:
        match = stored[(stored.variant == row["variant"]) & (stored.kind == row["kind"])
                       & (stored.calibration == row["calibration"])]
        assert len(match) == 1
        for column in ("any_flag", "victim_flagged", "false_flags"):
            assert row[column] == match[column].iloc[0], (row["variant"], row["kind"], column)
        if row["kind"] == "shift":
            assert row["victim"] == match["victim"].iloc[0]
    # the swap is what the fits see: no calibration inside it, the package's outside
    # (a review: a comparison of committed rows alone could not fail by the code)
    from clairstat import CLAIREstimator

    name, features, outputs, frame, n_clients = entry
    ols = calibration_cost.client_estimates(name, frame, features, outputs, n_clients, 0)
    draws, noise_cov = calibration_cost.variant_estimates(ols, "common",
                                                          np.random.default_rng(0))
    fits = {}
    for label, guard in (("none", calibration_cost.identity_calibration()),
                         ("package", contextlib.nullcontext())):
        with guard, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            fits[label] = CLAIREstimator(random_state=0).fit(
                draws, sample_weight=ols.n_samples, noise_cov=noise_cov)
    assert fits["none"].null_scale_factor_ == 1.0 and np.isinf(fits["none"].null_spread_df_)
    assert fits["package"].null_scale_factor_ > 1.0 or np.isfinite(
        fits["package"].null_spread_df_)
    assert np.all(fits["none"].p_values_ <= fits["package"].p_values_ * (1 + 1e-12))


def test_few_clients_frame_reproduces_its_committed_rows_and_restores_the_frame():
    """``benchmarks/few_clients_frame.py``: rows of the committed table come out again
    (seven clients, the cell whose package frame is most liberal, and the rows of
    different precision; every frame and scenario), the frame each fit ran in differs
    (the ``none`` rows are not the package's), and the package's frame is restored."""
    import pandas as pd

    import clairstat._estimator
    import few_clients_frame

    estimates, row_sd = few_clients_frame.draw(7, 2.0, 0)
    assert estimates.shape == (7, 5, 2)
    assert np.isclose(row_sd.max() / row_sd.min(), np.exp(4.0))
    table = pd.read_csv(ROOT / "benchmarks" / "results" / "few_clients_frame.csv",
                        keep_default_na=False)
    assert len(table) == 12000
    rows = [few_clients_frame.run_one(7, spread, frame, scenario, replicate)
            for spread in few_clients_frame.ROW_SPREADS for frame in few_clients_frame.FRAMES
            for scenario in few_clients_frame.SCENARIOS for replicate in (0, 1, 2)]
    assert clairstat._estimator.ESTIMATED_FRAME == "residual"
    for row in rows:
        stored = table[(table.n_clients == row["n_clients"])
                       & (table.row_spread == row["row_spread"])
                       & (table.frame == row["frame"]) & (table.scenario == row["scenario"])
                       & (table.replicate == row["replicate"])]
        assert len(stored) == 1
        for column in ("victim_flagged", "other_flagged", "rank"):
            assert row[column] == stored[column].iloc[0], (row, column)
    with pytest.raises(ValueError):
        few_clients_frame.run_one(7, 0.0, "no such frame", "null", 0)
    assert clairstat._estimator.ESTIMATED_FRAME == "residual"


def test_new_clients_script_rows_resume_and_summary(tmp_path, capsys):
    """benchmarks/real_data_new_clients.py on one split of iris: a row per configuration
    with the new client's p-value and flag per corruption; a rerun adds nothing; a new
    client scaled by 3 scores far below the benign one (a negative control of the
    script: a test that ignored the new client's estimate would give them the same
    p-value)."""
    import pandas as pd

    new_clients = pytest.importorskip("real_data_new_clients")
    out = tmp_path / "new.csv"
    new_clients.main(["--splits", "1", "--out", str(out), "--datasets", "iris"])
    table = pd.read_csv(out)
    assert list(table.columns) == new_clients.FIELDS
    assert sorted(table.configuration) == sorted(new_clients.CONFIGURATIONS)
    assert (table.n_clients == 6).all()
    for kind in new_clients.KINDS:
        assert table[f"p_{kind}"].between(0, 1).all()
        assert set(table[f"flagged_{kind}"]) <= {0, 1}
        # the flag is the p-value's side of the level (one unadjusted test)
        assert ((table[f"p_{kind}"] < new_clients.LEVEL)
                == table[f"flagged_{kind}"].astype(bool)).all()
    assert (table.p_scale < 1e-3 * table.p_none).all()
    new_clients.main(["--splits", "1", "--out", str(out), "--datasets", "iris"])
    assert len(pd.read_csv(out)) == len(table)
    printed = capsys.readouterr().out
    assert "| iris | 6 | hc3_support3 | 1 |" in printed
    with pytest.raises(SystemExit):
        new_clients.main(["--splits", "1", "--out", str(out), "--datasets", "nope"])


def test_new_clients_script_reproduces_its_committed_rows():
    """Splits of benchmarks/results/real_data_new_clients.csv rerun by the script's code
    give the stored rows (a review: the script's own test passed with the held-out
    client put back into the fit; such a change moves these p-values). Floats within a
    relative 1e-6 (another BLAS build's summation order), flags and ranks exactly."""
    import pandas as pd

    new_clients = pytest.importorskip("real_data_new_clients")
    table = pd.read_csv(ROOT / "benchmarks" / "results" / "real_data_new_clients.csv",
                        dtype=str, keep_default_na=False)
    datasets = {d[0]: d for d in new_clients.all_datasets()}
    for name, split in (("iris", 0), ("engel", 3), ("fertility", 7)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, features, outputs, frame, n_clients = datasets[name]
            rows = new_clients.run_one(name, frame, features, outputs, n_clients, split)
        for row in rows:
            stored = table[(table.dataset == name) & (table.split == str(split))
                           & (table.configuration == row["configuration"])]
            assert len(stored) == 1
            stored = stored.iloc[0]
            for column, value in row.items():
                if isinstance(value, float):
                    assert float(stored[column]) == pytest.approx(value, rel=1e-6), column
                else:
                    assert stored[column] == str(value), column


def test_new_client_level_script_rows_and_resume(tmp_path, capsys):
    """benchmarks/new_client_level.py on one replicate: a row per K and noise model, a
    p-value in [0, 1]; a rerun adds nothing."""
    import pandas as pd

    level = pytest.importorskip("new_client_level")
    out = tmp_path / "level.csv"
    level.main(["--reps", "1", "--out", str(out)])
    table = pd.read_csv(out)
    assert list(table.columns) == level.FIELDS
    assert len(table) == len(level.CLIENTS) * len(level.MODELS)
    assert table.p_value.between(0, 1).all()
    level.main(["--reps", "1", "--out", str(out)])
    assert len(pd.read_csv(out)) == len(table)
    assert "| 6 | estimated | 1 |" in capsys.readouterr().out


def test_alike_corruption_script_reproduces_a_committed_split():
    """benchmarks/alike_corruption.py's split 1 at ten sites, rerun: the committed rows
    (flags, ranks, warnings) of every configuration, those of the run that measured the
    two-clients warning (the first run's table, made before the warning, has the same
    flags and ranks)."""
    pd = pytest.importorskip("pandas")
    pytest.importorskip("statsmodels")
    alike = pytest.importorskip("alike_corruption")
    design, response = alike.co2_design()
    rows = alike.run_one(design, response, 10, 1)
    table = pd.read_csv(ROOT / "benchmarks" / "results" / "alike_corruption_warning.csv")
    committed = table[(table.n_clients == 10) & (table.split == 1)]
    assert len(rows) == len(committed) == len(alike.CONFIGS)
    for row in rows:
        stored = committed[committed.configuration == row["configuration"]].iloc[0]
        for column in ("both_flagged", "others_flagged", "rank", "warned", "warned_carry"):
            assert row[column] == stored[column], (row["configuration"], column)


def test_overstated_noise_reproduces_its_committed_rows():
    """``benchmarks/overstated_noise.py``: the rows of split 0 of two datasets (cancer,
    where the withdrawn warning's rule fired most on the classical covariance, and
    fair) come out again, the free factor to six digits, and the rule's verdict is the
    free factor below the threshold in every committed row."""
    import pandas as pd

    import overstated_noise
    from real_data_calibration import GROUPS

    table = pd.read_csv(ROOT / "benchmarks" / "results" / "overstated_noise.csv")
    assert len(table) == 5400
    assert ((table.free < overstated_noise.THRESHOLD).astype(int) == table.warned).all()
    datasets = {row[0]: row for group in ("development", "heldout_all")
                for row in GROUPS[group]() if row[0] in ("cancer", "fair")}
    for name, features, outputs, frame, n_clients in datasets.values():
        for row in overstated_noise.run_one(name, frame, features, outputs, n_clients, 0):
            stored = table[(table.dataset == name) & (table.split == 0)
                           & (table.configuration == row["configuration"])]
            assert len(stored) == 1
            assert float(row["free"]) == pytest.approx(stored.free.iloc[0], rel=1e-5)
            for column in ("warned", "any_flag", "rank"):
                assert row[column] == stored[column].iloc[0], (row, column)


def test_frame_spread_estimators_are_what_they_say_and_reproduce_committed_rows():
    """``benchmarks/frame_spread_estimators.py``: ``mad`` is the package's ``_spread``
    exactly (its rows are the package's fits); each alternative is the textbook
    estimator on a hand-checked sample and resists one far value as its breakdown point
    says; committed rows come out again and the package's ``_spread`` is restored."""
    import pandas as pd

    import clairstat._estimator
    import frame_spread_estimators as fse

    package_spread = clairstat._estimator._spread
    stack = np.random.default_rng(3).standard_normal((7, 4, 3))
    assert np.array_equal(fse.spread(stack, "mad"), clairstat._estimator._spread(stack))
    x = np.array([0.0, 1.0, 3.0, 7.0, 15.0]).reshape(5, 1, 1)  # pairwise |differences|:
    # 1 2 3 4 6 7 8 12 14 15 (sorted)
    assert fse.spread(x, "shamos").item() == 6.5  # their median
    assert fse.spread(x, "qn").item() == 3.0  # h = 3, the C(3, 2) = 3rd smallest
    # each value's median distance to all five (itself included): 3, 2, 3, 6, 12
    assert fse.spread(x, "sn").item() == 3.0
    # |x - 3| = 3 2 0 4 12; the largest (one) left out: sqrt(mean(0, 4, 9, 16))
    assert np.isclose(fse.spread(x, "trimmed").item(), np.sqrt(29 / 4))
    base = np.random.default_rng(4).standard_normal((8, 1, 1))
    far = base.copy()
    far[0] = 1e6
    for estimator in fse.ESTIMATORS:  # one far client of eight moves none of them far
        assert fse.spread(far, estimator) < 10 * fse.spread(base, estimator), estimator
    with pytest.raises(ValueError):
        fse.spread(x, "no such estimator")

    table = pd.read_csv(ROOT / "benchmarks" / "results" / "frame_spread_estimators.csv",
                        keep_default_na=False)
    assert len(table[table.test_level == 0.05]) == 4 * 2 * 5 * 2 * 300
    # MAD at 0.03 and 0.02: K = 6 and 7, both row spreads, both scenarios
    assert len(table[table.test_level != 0.05]) == 2 * 2 * 2 * 2 * 300
    runs = [(estimator, 0.05) for estimator in fse.ESTIMATORS] + [("mad", 0.02)]
    for row in [fse.run_one(6, spread, estimator, scenario, 400, test_level=level)
                for spread in fse.ROW_SPREADS for estimator, level in runs
                for scenario in fse.SCENARIOS]:
        stored = table[(table.n_clients == 6) & (table.row_spread == row["row_spread"])
                       & (table.estimator == row["estimator"])
                       & (table.test_level == row["test_level"])
                       & (table.scenario == row["scenario"]) & (table.replicate == 400)]
        assert len(stored) == 1
        for column in ("victim_flagged", "other_flagged", "rank"):
            assert row[column] == stored[column].iloc[0], (row, column)
        assert clairstat._estimator._spread is package_spread

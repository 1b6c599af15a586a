"""The committed Monte Carlo tables are what the current code produces.

``validation/REPORT.md`` and the paper's figures are built from the committed ``small``
tables. Rows carry the package version, but a development version does not change with
every commit: fedrot and glora rows of version 0.2.0 and robustness rows made before
later changes to the detection were still committed on 2026-12-03 (fedrot's bound
ratios, glora's readout ranks and CLAIR's flags in 20 of 250 robustness replicates no
longer reproduced). Each test reruns stored replicates from their seeds
(:func:`simulations.verify_table`); a change to the method must be followed by a rerun of
the tables it touches. The copying studies take seconds to minutes per replicate and
are not rerun here (``python -m simulations STUDY --scale small --verify N`` checks them).
"""

import json

import pytest

from simulations import default_results_dir, get_study, verify_table

# (study, replicates rerun, at most this many rows): about 40 s on one core in all.
CHEAP = [("robustness", range(4), 100), ("refinement", range(2), 56),
         ("stability", range(2), 84), ("glora", range(5), 100), ("fedrot", range(3), 168),
         ("consistency", range(10), 40), ("detection", range(3), 168),
         ("recovery", range(2), 200)]

RERUN = ("delete simulations/results/small/{0}.jsonl, rerun `python -m simulations {0} "
         "--scale small`, then `python -m validation --scale small` and `python -m paper`")


@pytest.mark.parametrize("name, replicates, max_rows", CHEAP, ids=[c[0] for c in CHEAP])
def test_committed_small_table_reproduces(name, replicates, max_rows):
    checked, mismatches = verify_table(get_study(name), "small", max_rows=max_rows,
                                       replicates=tuple(replicates))
    assert checked >= min(max_rows, 20), f"only {checked} stored replicates found"
    shown = "\n".join(f"  cell {m['cell']} rep {m['replicate']} {m['column']}: stored "
                      f"{m['stored']!r}, rerun {m['rerun']!r}" for m in mismatches[:10])
    assert not mismatches, (f"{len(mismatches)} stored values of {name} no longer "
                            f"reproduce:\n{shown}\nTo refresh: {RERUN.format(name)}.")


# The full-scale tables behind validation/full/ and the paper's full-scale verdicts:
# a few replicates of each (spread over the cells), about 15 s in all. On 2026-12-07 a
# manual `--verify` found three of them made by code two changes old, which no test saw.
FULL = [("consistency", 4), ("detection", 6), ("recovery", 6), ("refinement", 4),
        ("stability", 4), ("robustness", 4), ("fedrot", 4), ("glora", 4)]


@pytest.mark.parametrize("name, max_rows", FULL, ids=[c[0] for c in FULL])
def test_committed_full_table_reproduces(name, max_rows):
    checked, mismatches = verify_table(get_study(name), "full", max_rows=max_rows)
    assert checked == max_rows, f"only {checked} stored replicates found"
    shown = "\n".join(f"  cell {m['cell']} rep {m['replicate']} {m['column']}: stored "
                      f"{m['stored']!r}, rerun {m['rerun']!r}" for m in mismatches[:10])
    assert not mismatches, (
        f"{len(mismatches)} stored values of {name}'s full table no longer reproduce:\n"
        f"{shown}\nTo refresh: delete simulations/results/full/{name}.jsonl, rerun "
        f"`python -m simulations {name} --scale full --n-jobs 2`, then `python -m "
        f"validation --scale full --no-run` and `python -m paper`.")


# The negative controls' committed tables (validation/README.md), rerun with their
# broken variants: a few seconds each.
CONTROLS = [("no-detection", "robustness"), ("no-alignment", "fedrot"),
            ("spread-alignment", "fedrot"),
            ("random-subspace", "recovery"), ("weak-block-weight", "recovery"),
            ("random-subspace", "refinement"), ("random-subspace", "stability"),
            ("local-refinement", "refinement"), ("inflated-noise", "detection"),
            ("inflated-noise", "consistency"), ("no-detection", "detection"),
            ("no-detection", "consistency"), ("narrow-null", "robustness"),
            ("no-correction", "detection"), ("no-correction", "consistency"),
            ("robust-mean", "robustness"), ("fixed-level", "consistency"),
            ("oracle-pools-all", "refinement")]


@pytest.mark.parametrize("control, name", CONTROLS, ids=["-".join(c) for c in CONTROLS])
def test_committed_control_table_reproduces(control, name):
    checked, mismatches = verify_table(get_study(name), "small", max_rows=30,
                                       control=control)
    assert checked >= 4, f"only {checked} stored replicates found"
    assert not mismatches, (f"{len(mismatches)} stored values of the {control} control's "
                            f"{name} table no longer reproduce, e.g. {mismatches[0]}; "
                            f"delete simulations/results/controls/{control}/small/"
                            f"{name}.jsonl and rerun `python -m simulations {name} "
                            f"--scale small --control {control}`.")


def test_a_stale_row_is_found(tmp_path):
    """Negative control: one stored value changed in a copy of a table is reported, and
    nothing else is."""
    study = get_study("glora")
    source = default_results_dir() / "small" / f"{study.name}.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines() if line]
    target = next(r for r in rows if r["replicate"] == 0)
    column = "error_glora"  # a measured value (not a parameter), of order 0.1
    assert abs(target[column]) > 1e-3
    target[column] *= 1.001  # above the 1e-6 tolerance
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / f"{study.name}.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    checked, mismatches = verify_table(study, "small", results_dir=tmp_path)
    assert checked == len(study.cells("small"))
    assert [(m["cell"], m["column"]) for m in mismatches] == [(target["cell"], column)]


def test_verify_from_the_command_line(capsys):
    from simulations.__main__ import main

    assert main(["glora", "--scale", "small", "--verify", "3"]) == 0
    assert "glora[small]: 3 replicates rerun, 0 differ" in capsys.readouterr().out


def test_verify_sees_duplicates_dropped_columns_and_exact_counts(tmp_path):
    """A review found three silent passes: a stale first duplicate (readers keep the
    first, the check compared the last), a stored column the code no longer makes, and
    counts or flags compared with a relative tolerance (True == 1, 10**7 ~ 10**7 + 1)."""
    from simulations._framework import _same

    study = get_study("glora")
    rows = [json.loads(line) for line in
            (default_results_dir() / "small" / "glora.jsonl").read_text().splitlines()
            if line]
    first = next(r for r in rows if r["replicate"] == 0)
    stale = dict(first, error_glora=2 * first["error_glora"])
    extra = dict(first, obsolete_metric=1.0)
    for table, column in (([stale] + rows, "error_glora"),
                          ([extra] + [r for r in rows if r is not first], "obsolete_metric")):
        (tmp_path / "small").mkdir(exist_ok=True)
        (tmp_path / "small" / "glora.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in table))
        _, mismatches = verify_table(study, "small", results_dir=tmp_path, max_rows=3)
        assert [(m["cell"], m["column"]) for m in mismatches] == [(first["cell"], column)]
    assert not _same(True, 1) and not _same(10**7, 10**7 + 1) and _same(3, 3.0)
    assert _same(float("nan"), float("nan")) and not _same(1.0, None)


def test_verify_with_nothing_to_check_fails(tmp_path, capsys):
    from simulations.__main__ import main

    assert main(["glora", "--scale", "small", "--verify", "3",
                 "--results-dir", str(tmp_path)]) == 1
    assert "nothing to verify" in capsys.readouterr().err



def test_verify_sees_an_edited_parameter_seed_or_study(tmp_path):
    """A review found a row with an edited parameter column (which the checks group by)
    or seed passing ``--verify``: rows are found by their cell id and only the measured
    columns of the rerun replicates were compared."""
    study = get_study("glora")
    rows = [json.loads(line) for line in
            (default_results_dir() / "small" / "glora.jsonl").read_text().splitlines()
            if line]
    # replicate 0 is rerun, replicate 1 is not: its identity columns are checked all the same
    first = next(r for r in rows if r["replicate"] == 1)
    param = next(key for key in study.cells("small")[0]
                 if isinstance(first[key], (int, float)) and not isinstance(first[key], bool))
    edits = {param: first[param] + 1, "seed": first["seed"] + 1, "study": "other"}
    for column, value in edits.items():
        (tmp_path / "small").mkdir(exist_ok=True)
        (tmp_path / "small" / "glora.jsonl").write_text("".join(
            json.dumps(dict(r, **{column: value}) if r is first else r) + "\n"
            for r in rows))
        _, mismatches = verify_table(study, "small", results_dir=tmp_path, max_rows=3)
        assert [(m["cell"], m["column"]) for m in mismatches] == [(first["cell"], column)]

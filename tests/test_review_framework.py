"""A review of the Monte Carlo framework (tables written as produced, resumable, seeded per
replicate, with the version and parameters beside every row): each test is a defect
the review demonstrated, fixed.

The framework is exercised with the toy study of ``tests/simulation_toy.py``.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import simulations
import simulations.__main__
from simulations import (Study, get_study, grid, load_results, pending_tasks, read_rows,
                         results_path, run_study, verify_table)
from simulations.__main__ import main as simulations_main

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import simulation_toy  # noqa: E402


def _keys(rows):
    return [(row["cell"], row["replicate"]) for row in rows]


def test_a_cell_listed_twice_is_refused_not_run_twice(tmp_path):
    """Overlapping ``grid(...)`` calls (the README's way to a non-rectangular design)
    listed one cell twice: each of its replicates ran twice, with one seed, and the
    table held two rows of the same (cell, replicate)."""
    cells = grid(mu=[0.0, 1.0]) + grid(mu=[1.0, 2.0])
    study = Study("toydup", "", {"smoke": cells}, {"smoke": 2}, simulation_toy.simulate_one)
    with pytest.raises(ValueError, match="more than once"):
        run_study(study, "smoke", results_dir=tmp_path, progress=False)
    rows = read_rows(results_path("toydup", "smoke", tmp_path))
    assert len(rows) == len(set(_keys(rows)))


def test_a_study_without_the_scale_is_a_one_line_usage_error(tmp_path, capsys,
                                                            monkeypatch):
    """A study declaring no ``small`` grid ran into ``KeyError: 'small'`` (a traceback,
    status 1) from ``replicates[scale]``, before the intended message."""
    study = Study("toy_smoke_only", "", {"smoke": grid(mu=[0.0])}, {"smoke": 1},
                  simulation_toy.simulate_one)
    with pytest.raises(ValueError, match="declares no grid for scale 'small'"):
        study.tasks("small")
    monkeypatch.setattr(simulations.__main__, "get_study", lambda name: study)
    assert simulations_main(["toy_smoke_only", "--scale", "small", "--results-dir",
                             str(tmp_path), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("python -m simulations: error: ") and error.count("\n") == 1
    assert "declares no grid for scale 'small'" in error


@pytest.mark.parametrize("case", ["scale folder a file", "lock a directory",
                                  "read-only root"])
def test_a_results_dir_that_cannot_be_written_is_one_line_with_status_2(
        tmp_path, capsys, case):
    """An existing ``--results-dir`` that cannot hold the table (read-only, or a file
    where the scale's folder goes) gave a traceback and status 1, while a missing one
    under a read-only parent was refused in one line."""
    root = tmp_path / "results"
    root.mkdir()
    if case == "scale folder a file":
        (root / "smoke").write_text("")
    elif case == "lock a directory":
        (root / "smoke" / "toy.lock").mkdir(parents=True)
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only directory")
        root.chmod(0o555)
    try:
        status = simulations_main(["simulation_toy:STUDY", "--results-dir", str(root),
                                   "--no-progress"])
    finally:
        root.chmod(0o755)
    error = capsys.readouterr().err
    assert status == 2, error
    assert error.startswith("python -m simulations: error: cannot write ")
    assert error.count("\n") == 1


@pytest.mark.parametrize("line", ["{}", "[1, 2]", "42", '{"cell": "abc"}'])
def test_a_line_that_is_not_a_row_is_skipped_with_a_warning(tmp_path, line):
    """A line that parses as JSON but is no row was read as one: ``{}`` entered the
    table silently (a row with no cell), ``[1, 2]`` or ``42`` made every reader and the
    resume fail with a TypeError or AttributeError, a row without its cell made
    ``--verify`` fail with ``KeyError: 'cell'``."""
    study = simulation_toy.STUDY
    run_study(study, "smoke", results_dir=tmp_path, progress=False)
    path = results_path("toy", "smoke", tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3]) + line + "\n" + "".join(lines[4:]))
    with pytest.warns(UserWarning, match="line 4: not a row"):
        assert len(read_rows(path)) == 11
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(load_results(study, "smoke", tmp_path)) == 11
        assert len(load_results(study, "smoke", tmp_path, current_only=True)) == 11
        assert len(pending_tasks(study, "smoke", tmp_path)) == 1
        assert verify_table(study, "smoke", results_dir=tmp_path)[1] == []
        assert run_study(study, "smoke", results_dir=tmp_path, progress=False) == 1
        rows = read_rows(path)
    assert len(rows) == 12 and len(set(_keys(rows))) == 12


def test_a_last_row_short_of_its_newline_is_kept_not_cut(tmp_path):
    """Readers count a whole last row that lacks only its newline, but the resume cut
    it and ran that replicate again: a finished row deleted (and replaced by one of the
    current code)."""
    study = simulation_toy.STUDY
    run_study(study, "smoke", results_dir=tmp_path, progress=False)
    path = results_path("toy", "smoke", tmp_path)
    before = read_rows(path)
    path.write_text(path.read_text()[:-1])
    assert len(read_rows(path)) == 12
    assert run_study(study, "smoke", results_dir=tmp_path, progress=False) == 0
    assert read_rows(path) == before and path.read_text().endswith("}\n")
    # a torn last line is still cut
    path.write_text(path.read_text()[:-30])
    assert run_study(study, "smoke", results_dir=tmp_path, progress=False) == 1
    assert len(read_rows(path)) == 12


def test_verify_reports_a_row_without_its_version(tmp_path, capsys):
    """``--verify`` passed a row whose ``clairstat_version`` (its provenance) had been
    removed: it checked the parameters, seed and study only."""
    study = simulation_toy.STUDY
    run_study(study, "smoke", results_dir=tmp_path, progress=False)
    path = results_path("toy", "smoke", tmp_path)
    rows = read_rows(path)
    del rows[5]["clairstat_version"]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    checked, mismatches = verify_table(study, "smoke", results_dir=tmp_path)
    assert checked == 3
    assert [(m["cell"], m["replicate"], m["column"]) for m in mismatches] == \
        [(rows[5]["cell"], rows[5]["replicate"], "clairstat_version")]


def test_the_sweep_figure_and_text_read_only_the_current_grid(tmp_path, monkeypatch):
    """``paper/figures/copying_sweep.py`` (the figure and the ``sweep.*`` macros) read
    its table whole (``load_table``): rows of a cell since removed from the grid, or of
    replicates beyond its count, entered the paper, where every other reader keeps the
    current grid only."""
    from paper.figures.copying_sweep import _table

    study = get_study("copying_sweep")
    committed = simulations.default_results_dir() / "small" / "copying_sweep.jsonl"
    if not committed.exists():
        pytest.skip("no committed sweep table")
    rows = [json.loads(line) for line in committed.read_text().splitlines()]
    params = set(study.cells("small")[0])
    old = dict(rows[0], contaminated_share=0.5)  # a cell since removed from the grid
    old["cell"] = simulations.cell_id({key: old[key] for key in params})
    extra = dict(rows[1], replicate=99)  # a replicate beyond the grid's count
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "copying_sweep.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in [*rows, old, extra]))
    monkeypatch.setattr(simulations, "default_results_dir", lambda: tmp_path)
    frame, scale = _table()
    assert scale == "small" and len(frame) == len(rows)
    assert 0.5 not in set(frame["contaminated_share"]) and frame["replicate"].max() < 99


def test_rows_name_the_blas_kernels_and_verify_shows_them(tmp_path, capsys):
    """Same code and seed, other last bits under another BLAS kernel: the fedrot table
    written under OpenBLAS's Haswell kernels did not reproduce under SkylakeX, and
    nothing in its rows said which had written them. Every row now records them, and
    ``--verify`` prints them beside a difference."""
    from simulations._framework import blas_kernels

    study = simulation_toy.STUDY
    run_study(study, "smoke", results_dir=tmp_path, progress=False)
    path = results_path("toy", "smoke", tmp_path)
    rows = read_rows(path)
    assert {row["blas_kernels"] for row in rows} == {blas_kernels()}
    # a BLAS is loaded wherever numpy is, so the field is never empty
    assert blas_kernels()
    target = next(row for row in rows if row["replicate"] == 0)
    target["value"] += 1.0
    target["blas_kernels"] = "openblas 0.0 SomeOtherCPU"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    status = simulations_main(["simulation_toy:STUDY", "--scale", "smoke", "--verify", "3",
                               "--results-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 1
    assert ("BLAS kernels of the differing rows: openblas 0.0 SomeOtherCPU; of this "
            f"rerun: {blas_kernels()}") in out


# --- a second review (2026-12-07): code, threads and studies that could not say what ran


@pytest.mark.parametrize("replicates, match", [
    ({"smoke": 0}, "positive integer"), ({"smoke": -3}, "positive integer"),
    ({"smoke": 2.7}, "positive integer"), ({"smoke": None}, "positive integer"),
    ({"smoke": True}, "positive integer")])
def test_a_study_refuses_a_replicate_count_that_is_not_a_positive_integer(replicates, match):
    """-3 and 0 ran nothing without a word, 2.7 ran 2, None raised from int()."""
    with pytest.raises(ValueError, match=match):
        Study("bad", "", {"smoke": grid(mu=1.0)}, replicates, simulation_toy.simulate_one)


@pytest.mark.parametrize("cells, match", [
    ([], "non-empty list"), (grid(mu=[]), "non-empty list"), ({"mu": 1.0}, "non-empty list"),
    ([{"mu": [1, 2]}], "JSON scalars"), ([{"mu": {"b": 1}}], "JSON scalars"),
    ([("mu", 1.0)], "not a dict")])
def test_a_study_refuses_an_empty_grid_or_a_cell_that_is_not_scalars(cells, match):
    """An empty axis was a silent no-op run; list- and dict-valued cells were accepted
    and failed only inside ``simulate_one``."""
    with pytest.raises(ValueError, match=match):
        Study("bad", "", {"smoke": cells}, {"smoke": 2}, simulation_toy.simulate_one)
    # every JSON scalar is a cell value, numpy's too (the table writes them as JSON)
    Study("good", "", {"smoke": grid(mu=[0.5], name="a", flag=True, none=None, n=3,
                                     m=list(np.arange(2, 4)), b=np.True_)},
          {"smoke": 2}, simulation_toy.simulate_one)


def test_rows_record_their_threads_and_verify_reruns_on_them(tmp_path):
    """``--threads-per-task`` changed torch's results but was not in the row: a resume
    on another count mixed two arithmetics silently, and ``--verify`` reran every row
    on one thread, reporting a method change that was the thread count's."""
    study = simulation_toy.THREADS_STUDY
    run_study(study, "smoke", results_dir=tmp_path, progress=False, threads_per_task=2)
    rows = read_rows(results_path(study.name, "smoke", tmp_path))
    assert [row["threads_per_task"] for row in rows] == [2, 2]
    assert [row["value"] for row in rows] == [2.0, 3.0]
    checked, mismatches = verify_table(study, "smoke", results_dir=tmp_path)
    assert checked == 2 and mismatches == []
    # the table resumed on one thread would mix them: said before anything is appended
    bigger = Study(study.name, "", {"smoke": grid(mu=[0.0, 1.0, 2.0])}, {"smoke": 1},
                   simulation_toy.simulate_threads)
    with pytest.warns(UserWarning, match="on 1 threads to rows written otherwise"):
        run_study(bigger, "smoke", results_dir=tmp_path, progress=False)


def test_a_run_is_refused_when_the_code_changed_since_its_process_loaded_it(tmp_path,
                                                                           monkeypatch):
    """A study edited and reloaded in one session: with ``n_jobs=1`` its new rows said
    the old code (the commit was cached per process), with ``n_jobs=2`` joblib's reused
    workers ran the old function, and nothing in the table told them apart."""
    from simulations import _framework
    from simulations._framework import RunError

    loaded = _framework._loaded_code_state()
    monkeypatch.setattr(_framework, "_code_state", lambda *args: "0123456789ab")
    with pytest.raises(RunError, match="the code in clairstat, simulations changed on disk"):
        run_study(simulation_toy.STUDY, "smoke", results_dir=tmp_path, progress=False)
    assert not results_path("toy", "smoke", tmp_path).exists() or \
        read_rows(results_path("toy", "smoke", tmp_path)) == []
    with pytest.raises(RunError, match="Restart the Python process"):
        verify_table(simulation_toy.STUDY, "smoke", results_dir=tmp_path)
    monkeypatch.setattr(_framework, "_code_state", lambda *args: loaded)  # edit undone
    assert run_study(simulation_toy.STUDY, "smoke", results_dir=tmp_path,
                     progress=False) == 12


def test_the_code_state_is_the_code_s_content_not_its_commit(tmp_path, monkeypatch):
    """A review: comparing commit strings refused a run after a commit of a file that
    is not code (a full validation runs its studies in one process, so a commit made
    during it aborted the next study). The state digests the Python files of the code
    folders, tracked or untracked, whatever the commit."""
    import subprocess

    from simulations import _framework

    for path in ("clairstat/a.py", "simulations/b.py"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("LEVEL = 0.05\n")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org"]
    subprocess.run(git + ["init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(git + ["add", "."], cwd=tmp_path, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "start"], cwd=tmp_path, check=True)
    monkeypatch.setattr(_framework, "__file__", str(tmp_path / "simulations" / "_framework.py"))
    first = _framework._code_state()
    (tmp_path / "notes.md").write_text("a note\n")
    subprocess.run(git + ["add", "notes.md"], cwd=tmp_path, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "a note"], cwd=tmp_path, check=True)
    assert _framework._code_state() == first  # another commit, the same code
    (tmp_path / "simulations/b.py").write_text("LEVEL = 0.5\n")
    edited = _framework._code_state()
    assert edited != first
    (tmp_path / "clairstat/c.py").write_text("")  # untracked code counts
    assert _framework._code_state() not in (first, edited)


def test_a_worker_holding_other_code_than_the_run_s_submitter_is_refused():
    """A review: a Dask worker restarted by its nanny after an edit loaded the edited
    code, passed its own check (its disk and its memory agree) and wrote rows under the
    run's label, one run's rows from two codes. The run's token carries the submitter's
    code state; a worker holding another is refused."""
    from simulations import _framework
    from simulations._framework import RunError

    loaded = _framework._loaded_code_state()
    assert _framework._refuse_changed_code(("one run", loaded)) == loaded
    with pytest.raises(RunError, match="holds other code than the process that started"):
        _framework._refuse_changed_code(("another run", "0123456789ab"))


def test_a_row_s_code_label_is_read_when_the_framework_is_imported(monkeypatch):
    """A review: the label was read when a worker's first replicate ended, and named an
    edit made during that replicate, which the replicate had not run. It is cached at
    the framework's import, with the code state the runs are checked against."""
    from simulations import _framework

    cached = _framework.code_provenance.cache_info()
    assert cached.currsize >= 1  # filled at import, before any replicate
    label = _framework.code_provenance()
    monkeypatch.setattr(_framework, "_git_state", lambda *args: ("fffffff", ["clairstat"],
                                                                  "0123456789ab"))
    assert _framework.code_provenance() == label  # a later edit does not relabel it


def test_verify_sees_a_tiny_value_it_does_not_reproduce():
    """A review: an absolute tolerance of 1e-12 passed a p-value of 1.3e-13 stored as
    1e-12, 0 or -4e-13. Values near zero are compared at 1e-13 unless their study
    declares a column as round-off of a larger quantity (the next test)."""
    from simulations._framework import _same

    for stored in (1.03e-12, 0.0, -3.861e-13):
        assert not _same(stored, 1.287e-13)
    assert _same(4.7e-14, 1.0e-15) and _same(1.0 + 1e-7, 1.0)


def test_a_round_off_column_is_compared_at_its_study_s_scale(tmp_path, monkeypatch):
    """recovery's duality gaps at convergence are round-off of the objectives (1-20 n eps
    for n entries): on an AMD machine three gaps of the tables written on Intel ones came
    back 2e-13 to 2.3e-12 away and failed the default 1e-13. The study's ``round_off``
    gives that column 32 n eps; a gap further off, or a gap of a solve that stopped at
    its tolerance moved by more than a relative 1e-6, is still a mismatch (the negative
    control of the tolerance)."""
    import dataclasses

    from simulations.studies import recovery

    params = {"n_clients": 40, "p": 20, "q": 4}
    scale = recovery.gap_round_off(params)
    assert scale == pytest.approx(32 * np.finfo(float).eps * 3200)

    def run(stored_gap, rerun_gap, round_off):
        def simulate_one(cell_params, seed):
            return {"dual_gap": rerun_gap}
        study = dataclasses.replace(simulation_toy.STUDY, name="gaps",
                                    grids={"smoke": [params]}, replicates={"smoke": 1},
                                    simulate_one=simulate_one, round_off=round_off)
        monkeypatch.setattr("simulations._framework._run_task",
                            lambda f, cell, rep, p, seed, **kw: (cell, rep, f(p, seed)))
        path = results_path("gaps", "smoke", tmp_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        cell, replicate, _, seed = study.tasks("smoke")[0]
        path.write_text(json.dumps({"study": "gaps", "cell": cell, "replicate": replicate,
                                    **params, "seed": seed,
                                    "clairstat_version": "test",
                                    "dual_gap": stored_gap}) + "\n")
        return verify_table(study, "smoke", results_dir=tmp_path)[1]

    declared = {"dual_gap": recovery.gap_round_off}
    assert run(1.3926637620897964e-12, 1.1652900866465643e-12, declared) == []
    assert run(8.29913915367797e-12, 5.9685589803848416e-12, declared) == []
    assert run(8.3e-12, 8.3e-12 + 2 * scale, declared)  # beyond the declared scale
    assert run(1.6809e-05, 1.6809e-05 * (1 + 1e-5), declared)  # a stopped solve, moved
    assert run(1.3926637620897964e-12, 1.1652900866465643e-12, {})  # undeclared: 1e-13

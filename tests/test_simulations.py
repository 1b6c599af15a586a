"""Tests of the simulation framework: seeds, tables, resume after kill -9, Dask, CLI.

The framework is exercised with the toy study of ``tests/simulation_toy.py`` (one normal
draw per replicate, optionally slowed by a sleep), so these tests do not depend on the
estimator. Subprocesses run from the repository root with ``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import clairstat
import simulations
from simulations import Study, cell_id, derive_seed, grid, load_results, read_rows, run_study
from simulations.__main__ import main as simulations_main

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import simulation_toy  # noqa: E402


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _keys(rows):
    return [(row["cell"], row["replicate"]) for row in rows]


# --- seeds and grids ----------------------------------------------------------------

def test_seed_is_a_fixed_function_of_study_cell_replicate():
    # Values recorded once; they must never change (committed tables depend on them),
    # whatever PYTHONHASHSEED, platform or grid order.
    assert derive_seed("toy", {"mu": 0.0, "delay": 0.0}, 0) == 972934515
    assert derive_seed("recovery", {"p": 20, "gamma": 0.1}, 3) == 3229896225
    assert derive_seed("recovery", {"gamma": 0.1, "p": 20}, 3) == 3229896225
    assert cell_id({"p": 20, "gamma": 0.1}) == "3bbe5cd854a4"


def test_seed_is_stable_across_interpreters_with_different_hash_salt():
    code = "from simulations import derive_seed; print(derive_seed('s', {'a': 'x'}, 5))"
    outputs = set()
    for salt in ("1", "2"):
        env = {**_env(), "PYTHONHASHSEED": salt}
        outputs.add(subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                                   capture_output=True, text=True, check=True).stdout)
    assert outputs == {f"{derive_seed('s', {'a': 'x'}, 5)}\n"}


def test_seeds_differ_across_studies_cells_and_replicates():
    cells = grid(a=list(range(20)), b=[0.5, 1.5])
    seeds = {derive_seed(name, cell, rep) for name in ("s1", "s2") for cell in cells
             for rep in range(25)}
    # 2000 draws from 2**32 values: a collision has probability < 1e-3.
    assert len(seeds) == 2 * 40 * 25


def test_grid_expands_axes_and_keeps_scalars():
    assert grid(p=20, g=[1, 2], r=(3, 4)) == [
        {"p": 20, "g": 1, "r": 3}, {"p": 20, "g": 1, "r": 4},
        {"p": 20, "g": 2, "r": 3}, {"p": 20, "g": 2, "r": 4}]


def test_tasks_go_replicate_by_replicate_across_cells():
    """A run stopped early leaves every cell with about the same number of rows."""
    tasks = simulation_toy.STUDY.tasks("smoke")
    assert [rep for _, rep, _, _ in tasks[:3]] == [0, 0, 0]
    assert len({cell for cell, _, _, _ in tasks[:3]}) == 3
    assert [rep for _, rep, _, _ in tasks[-3:]] == [3, 3, 3]


def test_reserved_parameter_names_are_refused():
    with pytest.raises(ValueError, match="reserved"):
        cell_id({"seed": 1})


# --- tables, resume ------------------------------------------------------------------

def test_run_writes_one_tidy_row_per_replicate_and_resumes(tmp_path):
    study = simulation_toy.STUDY
    assert run_study(study, "smoke", results_dir=tmp_path, progress=False) == 12
    frame = load_results("toy", "smoke", tmp_path)
    assert len(frame) == 12 and not frame.duplicated(["cell", "replicate"]).any()
    assert {"study", "cell", "replicate", "mu", "delay", "seed", "clairstat_version",
            "value", "solver", "elapsed_s"} <= set(frame.columns)
    assert (frame["clairstat_version"] == clairstat.__version__).all()
    # the code that ran, not only the (development) version: one commit for the run
    commits = set(frame["code_commit"])
    assert len(commits) == 1 and (None in commits or len(next(iter(commits))) >= 7)
    # Each row is exactly what the pure replicate function gives for its seed.
    for row in frame.itertuples():
        expected = simulation_toy.simulate_one({"mu": row.mu, "delay": 0.0}, row.seed)
        assert row.value == expected["value"]
        assert row.seed == derive_seed("toy", {"mu": row.mu, "delay": 0.0}, row.replicate)
    assert run_study(study, "smoke", results_dir=tmp_path, progress=False) == 0


def test_resume_runs_only_missing_replicates_and_more_replicates_extend(tmp_path):
    study = simulation_toy.STUDY
    run_study(study, "smoke", results_dir=tmp_path, progress=False)
    path = tmp_path / "smoke" / "toy.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:5]))
    assert run_study(study, "smoke", results_dir=tmp_path, progress=False) == 7
    bigger = simulation_toy.make_study(replicates=6)
    assert run_study(bigger, "smoke", results_dir=tmp_path, progress=False) == 6
    rows = read_rows(path)
    assert len(rows) == 18 and len(set(_keys(rows))) == 18


def test_resuming_on_rows_of_other_code_warns(tmp_path):
    """A review found a resume appending rows of the current code to rows of another
    commit without a word (only a later validation report said so)."""
    with pytest.warns(UserWarning, match="0000000.*the table will mix them"):
        _resume_on_first_rows(tmp_path, code_commit="0000000")


def _resume_on_first_rows(tmp_path, **changed):
    """Run the toy study, keep its first five rows with ``changed`` columns, check that a
    resume on the rows as written is silent, then resume on the changed rows."""
    import warnings

    study = simulation_toy.STUDY
    run_study(study, "smoke", results_dir=tmp_path, progress=False)
    path = tmp_path / "smoke" / "toy.jsonl"
    rows = read_rows(path)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows[:5]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same code, the same kernels: silent
        assert run_study(study, "smoke", results_dir=tmp_path, progress=False) == 7
    path.write_text("".join(json.dumps(dict(row, **changed)) + "\n" for row in rows[:5]))
    assert run_study(study, "smoke", results_dir=tmp_path, progress=False) == 7


def test_torn_last_line_is_ignored_then_cut_before_appending(tmp_path):
    study = simulation_toy.STUDY
    run_study(study, "smoke", results_dir=tmp_path, progress=False)
    path = tmp_path / "smoke" / "toy.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:25])  # as if killed mid-write
    assert len(read_rows(path)) == 11
    assert run_study(study, "smoke", results_dir=tmp_path, progress=False) == 1
    rows = read_rows(path)
    assert len(rows) == 12 and len(set(_keys(rows))) == 12
    assert all(line.startswith("{") for line in path.read_text().splitlines())


def test_parallel_joblib_run_gives_the_same_table_as_a_serial_run(tmp_path):
    study = simulation_toy.STUDY
    run_study(study, "smoke", results_dir=tmp_path / "serial", progress=False)
    run_study(study, "smoke", n_jobs=2, results_dir=tmp_path / "par", progress=False)
    columns = ["cell", "replicate", "seed", "value"]
    serial = load_results("toy", "smoke", tmp_path / "serial")[columns]
    parallel = load_results("toy", "smoke", tmp_path / "par")[columns]
    assert serial.equals(parallel)


def test_kill_9_mid_run_loses_no_finished_replicate_and_duplicates_none(tmp_path):
    # SLOW_STUDY: 3 cells x 10 replicates, 0.3 s each, so the kill lands mid-run.
    path = tmp_path / "smoke" / "toy.jsonl"
    command = [sys.executable, "-m", "simulations", "simulation_toy:SLOW_STUDY",
               "--scale", "smoke", "--results-dir", str(tmp_path), "--no-progress"]
    process = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(read_rows(path)) < 4:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    before = read_rows(path)
    assert 4 <= len(before) < 30, "the kill must land in the middle of the run"
    subprocess.run(command, cwd=ROOT, env=_env(), check=True, capture_output=True)
    after = read_rows(path)
    assert len(after) == 30 and len(set(_keys(after))) == 30
    assert after[:len(before)] == before  # finished replicates kept, untouched


def test_a_second_concurrent_run_on_the_same_table_is_refused(tmp_path):
    path = tmp_path / "smoke" / "toy.jsonl"
    path.parent.mkdir(parents=True)
    with simulations._framework._exclusive_lock(path):
        with pytest.raises(RuntimeError, match="another run"):
            run_study(simulation_toy.STUDY, "smoke", results_dir=tmp_path, progress=False)


def test_simulate_one_must_return_a_dict(tmp_path):
    study = Study("bad", "", {"smoke": [{"a": 1}]}, {"smoke": 1}, _returns_a_list)
    with pytest.raises(TypeError, match="dict"):
        run_study(study, "smoke", results_dir=tmp_path, progress=False)


def _returns_a_list(params, seed):
    return [seed]


# --- Dask ------------------------------------------------------------------------------

@pytest.mark.timeout(180)
def test_dask_backend_runs_replicates_on_a_local_cluster_of_worker_processes(tmp_path):
    # LocalCluster(processes=True) needs a script with a __main__ guard: see the script.
    result = subprocess.run([sys.executable, str(TESTS / "dask_run_script.py"),
                             str(tmp_path)], cwd=ROOT, env=_env(), capture_output=True,
                            text=True, timeout=170)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines()
                 if line.startswith(("MAIN_PID", "WORKER_PIDS")))
    worker_pids = {int(pid) for pid in lines["WORKER_PIDS"].split()}
    frame = load_results("toy", "smoke", tmp_path)
    assert len(frame) == 12 and not frame.duplicated(["cell", "replicate"]).any()
    assert set(frame["pid"]) <= worker_pids
    assert int(lines["MAIN_PID"]) not in set(frame["pid"])
    serial = tmp_path / "serial"
    run_study(simulation_toy.STUDY, "smoke", results_dir=serial, progress=False)
    assert np.array_equal(frame["value"], load_results("toy", "smoke", serial)["value"])


@pytest.mark.timeout(180)
def test_dask_backend_without_a_scheduler_starts_a_local_cluster(tmp_path):
    # ``--backend dask`` alone: a LocalCluster of --n-jobs worker processes, same rows.
    command = [sys.executable, "-m", "simulations", "simulation_toy:STUDY", "--scale",
               "smoke", "--backend", "dask", "--n-jobs", "2", "--results-dir",
               str(tmp_path), "--no-progress"]
    result = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=170)
    assert result.returncode == 0, result.stderr[-3000:]
    frame = load_results("toy", "smoke", tmp_path)
    assert len(frame) == 12 and os.getpid() not in set(frame["pid"])
    serial = tmp_path / "serial"
    run_study(simulation_toy.STUDY, "smoke", results_dir=serial, progress=False)
    assert np.array_equal(frame["value"], load_results("toy", "smoke", serial)["value"])


@pytest.mark.timeout(180)
def test_a_dask_worker_with_several_threads_runs_one_replicate_at_a_time(tmp_path):
    """A review found 9 of 12 rows differing from a serial run on a Dask worker with
    several threads (a ``dask worker``'s default): replicates ran concurrently under
    process-wide state (a global generator seeded per replicate, the thread caps)."""
    from distributed import LocalCluster

    study = simulation_toy.GLOBAL_STUDY
    with LocalCluster(n_workers=1, threads_per_worker=4, processes=False,
                      dashboard_address=None) as cluster:
        run_study(study, "smoke", backend="dask", scheduler=cluster.scheduler_address,
                  results_dir=tmp_path / "dask", progress=False)
    run_study(study, "smoke", results_dir=tmp_path / "serial", progress=False)
    columns = ["cell", "replicate", "seed", "value"]
    threaded = load_results(study.name, "smoke", tmp_path / "dask")[columns]
    assert len(threaded) == 12
    assert threaded.equals(load_results(study.name, "smoke", tmp_path / "serial")[columns])


# --- negative controls -------------------------------------------------------------------

def _controlled(params, seed, control=None):
    return {"value": float(seed % 7), "received": str(control)}


CONTROLLED = Study(name="toy", description="control plumbing", grids={
    scale: grid(mu=[0.0, 1.0]) for scale in simulations.SCALES},
    replicates={scale: 2 for scale in simulations.SCALES}, simulate_one=_controlled,
    controls=("no-detection",))


def test_a_control_runs_with_the_same_seeds_into_its_own_tables(tmp_path):
    run_study(CONTROLLED, "smoke", results_dir=tmp_path, progress=False)
    run_study(CONTROLLED, "smoke", results_dir=tmp_path, progress=False,
              control="no-detection")
    normal = load_results("toy", "smoke", tmp_path)
    broken = load_results("toy", "smoke", simulations.control_results_dir("no-detection",
                                                                          tmp_path))
    assert set(normal["received"]) == {"None"} and set(broken["received"]) == {"no-detection"}
    # and every row says which control made it (null for the method)
    assert normal["control"].isna().all() and set(broken["control"]) == {"no-detection"}
    assert list(normal["seed"]) == list(broken["seed"])  # paired with the normal run
    with pytest.raises(ValueError, match="does not implement"):
        run_study(CONTROLLED, "smoke", results_dir=tmp_path, control="no-alignment")
    with pytest.raises(KeyError, match="unknown control"):
        run_study(CONTROLLED, "smoke", results_dir=tmp_path, control="nonsense")


@pytest.mark.parametrize("name", sorted({name for study in
                                         simulations.available_studies().values()
                                         for name in study.controls}))
def test_every_study_refuses_a_control_it_does_not_implement(name):
    for study in simulations.available_studies().values():
        if study.controls and name not in study.controls:
            with pytest.raises(ValueError, match="does not implement"):
                study.simulate_one(study.cells("smoke")[0], 0, control=name)


# --- command line and discovery ---------------------------------------------------------

def test_cli_runs_a_study_by_import_path_and_lists_the_studies(tmp_path, capsys):
    assert simulations_main(["simulation_toy:STUDY", "--scale", "smoke", "--results-dir",
                             str(tmp_path), "--no-progress"]) == 0
    assert len(read_rows(tmp_path / "smoke" / "toy.jsonl")) == 12
    assert simulations_main(["list"]) == 0


def test_every_discovered_study_declares_all_scales():
    for name, study in simulations.available_studies().items():
        assert study.name == name
        for scale in simulations.SCALES:
            assert study.cells(scale) and study.replicates[scale] >= 1, (name, scale)


def test_rows_are_json_lines_with_numpy_values_converted(tmp_path):
    study = Study("np", "", {"smoke": [{"a": 1}]}, {"smoke": 1}, _returns_numpy)
    run_study(study, "smoke", results_dir=tmp_path, progress=False)
    row = json.loads((tmp_path / "smoke" / "np.jsonl").read_text())
    assert row["x"] == 1.5 and row["flag"] is True and row["n"] == 3


def _returns_numpy(params, seed):
    return {"x": np.float64(1.5), "flag": np.bool_(True), "n": np.int64(3)}


def test_load_results_can_keep_only_the_current_grid(tmp_path):
    run_study(simulation_toy.make_study(replicates=6), "smoke", results_dir=tmp_path,
              progress=False)
    assert len(load_results("toy", "smoke", tmp_path)) == 18
    current = load_results(simulation_toy.STUDY, "smoke", tmp_path, current_only=True)
    assert len(current) == 12 and current["replicate"].max() == 3


# --- the studies' measuring helpers and purity -------------------------------------------

from simulations.studies import _common  # noqa: E402


def test_oracle_refinement_reduces_to_local_and_to_the_mean_at_the_extremes():
    rng = np.random.default_rng(0)
    estimates = rng.standard_normal((6, 5, 3))
    everything, nothing = np.eye(5), np.zeros((5, 0))
    assert np.allclose(_common.oracle_refine(estimates, everything, range(6)), estimates)
    collab = [0, 2, 3]
    refined = _common.oracle_refine(estimates, nothing, collab)
    assert np.allclose(refined, estimates[collab].mean(0)[None])
    # In between: the in-subspace part is the client's own, the rest the mean's.
    basis = np.linalg.qr(rng.standard_normal((5, 2)))[0]
    refined = _common.oracle_refine(estimates, basis, collab)
    assert np.allclose(basis.T @ refined[1], basis.T @ estimates[1])
    off = np.eye(5) - basis @ basis.T
    assert np.allclose(off @ refined[1], off @ estimates[collab].mean(0))


def test_incoherences_span_their_known_ranges():
    # Coordinate-aligned subspace: maximally coherent, mu = p / r; Fourier-like
    # (equal row norms): mu = 1.
    assert _common.column_incoherence(np.eye(8)[:, :2]) == pytest.approx(4.0)
    hadamard = np.array([[1, 1], [1, -1], [1, 1], [1, -1]]) / 2.0
    assert _common.column_incoherence(hadamard) == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    blocks = np.einsum("pr,krq->kpq", rng.standard_normal((6, 2)),
                       rng.standard_normal((10, 2, 3)))
    mu_v = _common.block_row_incoherence(blocks, 2)
    assert 1.0 <= mu_v <= 10 / 2  # max_k ||V_k||_F^2 lies in [r/K, min(r, q)]
    blocks[3] = 0.0  # a zero (contaminated) block is not counted among the clients
    _, _, right = np.linalg.svd(_common.stack(blocks), full_matrices=False)
    top = np.sum(right[:2].T.reshape(10, 3, 2) ** 2, axis=(1, 2)).max()
    assert _common.block_row_incoherence(blocks, 2) == pytest.approx(9 / 2 * top)


@pytest.mark.parametrize("name", ["recovery", "stability", "detection", "refinement",
                                  "consistency"])
def test_each_study_replicate_is_a_pure_function_of_params_and_seed(name):
    study = simulations.get_study(name)
    params = study.cells("smoke")[0]
    seed = derive_seed(name, params, 0)
    first, second = study.simulate_one(params, seed), study.simulate_one(params, seed)
    assert first == second and first["solver"] == "torch"
    assert all(np.isscalar(value) for value in first.values())


def test_rows_record_the_code_of_the_worker_that_ran_them(tmp_path, monkeypatch):
    """A review found the version and commit of the submitting process on every row: a
    cluster's workers import their own clairstat, which may be another version. Here
    the submitter's are changed and the loky workers' are not."""
    from simulations import _framework

    # the toy study lives in tests/, outside the code folders: its file is named too
    real = (clairstat.__version__, _framework.code_provenance()
            + _framework._outside_study(simulation_toy.STUDY.simulate_one))
    assert "+ study code in simulation_toy.py" in real[1]
    monkeypatch.setattr(clairstat, "__version__", "0.0.submitter")
    monkeypatch.setattr(_framework, "code_provenance", lambda *args: "submitter")
    run_study(simulation_toy.STUDY, "smoke", n_jobs=2, results_dir=tmp_path,
              progress=False)
    rows = read_rows(tmp_path / "smoke" / "toy.jsonl")
    assert len(rows) == 12 and os.getpid() not in {row["pid"] for row in rows}
    assert {(row["clairstat_version"], row["code_commit"]) for row in rows} == {real}


def test_code_provenance_names_changed_code_only():
    """Seen in the first rows written with it: the first entry's leading space was
    stripped ("imulations") and a deleted result table counted as changed code."""
    from simulations._framework import _changed_code, code_provenance

    status = "\0".join([" M simulations/_framework.py", " D simulations/results/small/x.jsonl",
                        " M simulations/README.md", "M  clairstat/_ols.py",
                        "R  clairstat/new.py", "clairstat/old.py", ""])
    assert _changed_code(status) == ["clairstat", "simulations"]
    assert _changed_code(" D simulations/results/small/x.jsonl\0 M README.md\0") == []
    value = code_provenance()
    assert value is None or len(value.split()[0]) >= 7



def _git(root, *arguments):
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.org",
                    *arguments], cwd=root, check=True, capture_output=True)


def test_code_provenance_sees_the_checks_and_untracked_files(tmp_path):
    """A review edited validation/checks/detection.py (its level) and added an untracked
    module under clairstat/: the report still named the clean commit."""
    from simulations._framework import CODE_FOLDERS, _changed_code, _git_state

    for path in ("clairstat/a.py", "simulations/b.py", "validation/checks/detection.py"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("LEVEL = 0.05\n")
    (tmp_path / ".gitignore").write_text("ignored.py\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "start")
    commit, changed, digest = _git_state(tmp_path, CODE_FOLDERS + ("validation",))
    assert len(commit) >= 7 and changed == [] and digest is None
    (tmp_path / "validation/checks/detection.py").write_text("LEVEL = 0.5\n")
    (tmp_path / "clairstat/new.py").write_text("")  # untracked, not ignored
    (tmp_path / "simulations/ignored.py").write_text("")  # git-ignored: not the code
    (tmp_path / "simulations/notes.md").write_text("")  # not Python
    assert _git_state(tmp_path, CODE_FOLDERS + ("validation",))[:2] == (
        commit, ["clairstat", "validation"])
    assert _git_state(tmp_path, CODE_FOLDERS)[:2] == (commit, ["clairstat"])  # a row's code
    assert _changed_code("?? clairstat/new.py\0 M validation/checks/x.py\0") == [
        "clairstat", "validation"]


def _provenance_in(root, monkeypatch, folders=("clairstat", "simulations")):
    """code_provenance of the checkout at ``root``, as if this copy of the framework
    and clairstat were in it (``__file__`` is how it finds its checkout)."""
    from simulations import _framework

    monkeypatch.setattr(_framework, "__file__", str(root / "simulations" / "_framework.py"))
    monkeypatch.setattr(clairstat, "__file__", str(root / "clairstat" / "__init__.py"))
    _framework.code_provenance.cache_clear()
    try:
        return _framework.code_provenance(folders)
    finally:
        _framework.code_provenance.cache_clear()


def test_code_provenance_tells_uncommitted_states_apart(tmp_path, monkeypatch):
    """Two runs on different uncommitted edits of one commit wrote the same
    "<hash> with uncommitted changes in clairstat": a table could not tell their rows
    apart. The string now carries a digest of the uncommitted code."""
    for path in ("clairstat/__init__.py", "clairstat/a.py", "simulations/_framework.py"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("LEVEL = 0.05\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "start")
    clean = _provenance_in(tmp_path, monkeypatch)
    assert len(clean) >= 7 and " " not in clean  # a clean checkout: the bare commit
    (tmp_path / "simulations/results").mkdir()
    (tmp_path / "simulations/results/x.py").write_text("")  # results are not the code
    (tmp_path / "README.md").write_text("")  # not in the code folders
    assert _provenance_in(tmp_path, monkeypatch) == clean

    (tmp_path / "clairstat/a.py").write_text("LEVEL = 0.5\n")
    first = _provenance_in(tmp_path, monkeypatch)
    assert first.startswith(f"{clean} with uncommitted changes in clairstat (digest ")
    assert re.fullmatch(r"[0-9a-f]{7,} with uncommitted changes in clairstat "
                        r"\(digest [0-9a-f]{12}\)", first)
    assert _provenance_in(tmp_path, monkeypatch) == first  # deterministic
    (tmp_path / "clairstat/a.py").write_text("LEVEL = 0.25\n")
    second = _provenance_in(tmp_path, monkeypatch)
    assert second.startswith(f"{clean} with uncommitted changes in clairstat (digest ")
    assert second != first
    (tmp_path / "clairstat/a.py").write_text("LEVEL = 0.5\n")  # the first content again
    assert _provenance_in(tmp_path, monkeypatch) == first
    _git(tmp_path, "add", "clairstat/a.py")  # staged, same content: the same code
    assert _provenance_in(tmp_path, monkeypatch) == first
    _git(tmp_path, "reset", "-q")

    (tmp_path / "clairstat/new.py").write_text("X = 1\n")  # untracked, not ignored
    third = _provenance_in(tmp_path, monkeypatch)
    assert third.startswith(f"{clean} with uncommitted changes in clairstat (digest ")
    assert third not in (first, second)
    (tmp_path / "clairstat/new.py").write_text("X = 2\n")  # its content counts
    fourth = _provenance_in(tmp_path, monkeypatch)
    assert fourth not in (first, second, third)
    (tmp_path / "clairstat/new.py").unlink()
    assert _provenance_in(tmp_path, monkeypatch) == first
    # the report's folders: validation/ counts there, not in a row's string
    (tmp_path / "validation").mkdir()
    (tmp_path / "validation/check.py").write_text("")
    assert _provenance_in(tmp_path, monkeypatch) == first
    report = _provenance_in(tmp_path, monkeypatch,
                            ("clairstat", "simulations", "validation"))
    assert report.startswith(f"{clean} with uncommitted changes in clairstat, validation "
                             "(digest ")
    (tmp_path / "clairstat/a.py").write_text("LEVEL = 0.05\n")  # back to the commit
    assert _provenance_in(tmp_path, monkeypatch) == clean


def test_code_provenance_outside_a_git_checkout_is_the_code_s_digest(tmp_path,
                                                                    monkeypatch):
    """A review ran a study from an unpacked copy (no .git), edited clairstat and
    resumed: every row said ``code_commit: null``, so the resume appended the new
    code's rows to the old code's table without a warning. Outside a checkout the label
    is now a digest of the code's files, and an edit changes it."""
    from simulations import _framework

    for path in ("clairstat/__init__.py", "clairstat/a.py", "simulations/_framework.py"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("LEVEL = 0.05\n")
    first = _provenance_in(tmp_path, monkeypatch)
    assert re.fullmatch(r"no git checkout \(code digest [0-9a-f]{12}\)", first)
    (tmp_path / "simulations/results").mkdir()
    (tmp_path / "simulations/results/x.py").write_text("")  # results are not the code
    (tmp_path / "clairstat/__pycache__").mkdir()
    (tmp_path / "clairstat/__pycache__/a.py").write_text("")  # nor are caches
    (tmp_path / "notes.py").write_text("")  # outside the code folders
    assert _provenance_in(tmp_path, monkeypatch) == first
    (tmp_path / "clairstat/a.py").write_text("LEVEL = 0.5\n")
    second = _provenance_in(tmp_path, monkeypatch)
    assert second.startswith("no git checkout (code digest ") and second != first
    monkeypatch.setattr(_framework, "__file__",
                        str(tmp_path / "simulations" / "_framework.py"))
    assert _framework._code_state() == second[len("no git checkout (code digest "):-1]


def test_code_provenance_names_a_clairstat_imported_from_elsewhere(tmp_path, monkeypatch):
    """In a checkout and outside one, a clairstat imported from another folder (an
    installed copy) is named with its own digest, which changes with its code."""
    from simulations import _framework

    elsewhere = tmp_path / "site" / "clairstat"
    elsewhere.mkdir(parents=True)
    (elsewhere / "__init__.py").write_text("X = 1\n")
    for checkout in ("plain", "repo"):
        root = tmp_path / checkout
        for path in ("clairstat/__init__.py", "simulations/_framework.py"):
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text("LEVEL = 0.05\n")
        if checkout == "repo":
            _git(root, "init", "-q")
            _git(root, "add", ".")
            _git(root, "commit", "-q", "-m", "start")
        monkeypatch.setattr(_framework, "__file__", str(root / "simulations" / "_framework.py"))
        monkeypatch.setattr(clairstat, "__file__", str(elsewhere / "__init__.py"))
        _framework.code_provenance.cache_clear()
        try:
            first = _framework.code_provenance()
            (elsewhere / "__init__.py").write_text("X = 2\n")
            _framework.code_provenance.cache_clear()
            second = _framework.code_provenance()
            (elsewhere / "__init__.py").write_text("X = 1\n")
        finally:
            _framework.code_provenance.cache_clear()
        pattern = (r"no git checkout \(code digest [0-9a-f]{12}; clairstat imported from "
                   r"outside this copy, its digest [0-9a-f]{12}\)" if checkout == "plain"
                   else r"[0-9a-f]{7,} \(clairstat imported from outside this checkout, "
                   r"its digest [0-9a-f]{12}\)")
        assert re.fullmatch(pattern, first) and re.fullmatch(pattern, second), first
        assert first != second  # the imported code's edit shows


def test_resuming_on_rows_of_other_blas_kernels_warns(tmp_path):
    """A resume on another CPU type (OpenBLAS picks its kernels for the CPU) appended
    rows whose last bits differ from the first rows' without a word (a review)."""
    with pytest.warns(UserWarning, match="openblas 0.0 Other.*last bits") as caught:
        _resume_on_first_rows(tmp_path, blas_kernels="openblas 0.0 Other")
    kernels = [item for item in caught if "BLAS kernels" in str(item.message)]
    assert len(kernels) == 1  # once
    assert kernels[0].filename == __file__  # attributed to run_study's caller
    with pytest.warns(UserWarning, match="do not record theirs") as caught:
        _resume_on_first_rows(tmp_path / "older", blas_kernels=None)  # rows before the column
    assert not any("will differ" in str(item.message) for item in caught)


def test_code_digest_counts_deleted_and_renamed_files(tmp_path):
    """Deleting a file or renaming it away is a state of the code too."""
    from simulations._framework import _code_digest, _code_paths

    (tmp_path / "clairstat").mkdir()
    (tmp_path / "clairstat/b.py").write_text("B = 1\n")
    status = "R  clairstat/b.py\0clairstat/a.py\0"  # a.py renamed to b.py
    assert _code_paths(status) == ["clairstat/a.py", "clairstat/b.py"]
    renamed = _code_digest(tmp_path, _code_paths(status))
    assert renamed != _code_digest(tmp_path, ["clairstat/b.py"])  # b.py added, a.py kept
    assert _code_paths("C  clairstat/b.py\0clairstat/a.py\0") == ["clairstat/b.py"]
    assert _code_digest(tmp_path, ["clairstat/a.py"]) != _code_digest(tmp_path, [])


# --- unusable command-line input: one line, exit status 2 ------------------------------

def _bad_input(tmp_path):
    return {
        "unknown study": ["nosuch"],
        "unknown attribute": ["simulation_toy:NOPE"],
        "unknown module": ["no_such_module_here:STUDY"],
        "control not implemented": ["simulation_toy:STUDY", "--control", "no-detection"],
        "results dir a file": ["simulation_toy:STUDY", "--results-dir",
                               str(tmp_path / "afile")],
        "results dir under a file": ["simulation_toy:STUDY", "--results-dir",
                                     str(tmp_path / "afile" / "x")],
        "verify a missing results dir": ["simulation_toy:STUDY", "--verify", "2",
                                         "--results-dir", str(tmp_path / "missing")],
        "scheduler without dask": ["simulation_toy:STUDY", "--scheduler",
                                   "tcp://127.0.0.1:8786", "--results-dir", str(tmp_path)],
        "malformed scheduler": ["simulation_toy:STUDY", "--backend", "dask", "--scheduler",
                                "nonsense", "--results-dir", str(tmp_path)]}


@pytest.mark.parametrize("case", sorted(_bad_input(Path("/nonexistent"))))
def test_cli_refuses_unusable_input_in_one_line_with_status_2(tmp_path, capsys, case):
    arguments = _bad_input(tmp_path)[case]
    (tmp_path / "afile").write_text("")
    assert simulations_main([*arguments, "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("python -m simulations: error: ") and error.count("\n") == 1
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("option, value", [("--verify", "-2"), ("--verify", "0"),
                                           ("--n-jobs", "0"), ("--threads-per-task", "0")])
def test_cli_refuses_bad_numbers_before_running(tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as stopped:
        simulations_main(["simulation_toy:STUDY", option, value, "--results-dir",
                          str(tmp_path), "--no-progress"])
    assert stopped.value.code == 2 and f"argument {option}" in capsys.readouterr().err
    assert not (tmp_path / "smoke").exists()


def test_cli_reports_a_locked_table_an_unreachable_scheduler_and_an_interrupt(
        tmp_path, capsys, monkeypatch):
    import dask

    arguments = ["simulation_toy:STUDY", "--results-dir", str(tmp_path), "--no-progress"]
    path = tmp_path / "smoke" / "toy.jsonl"
    path.parent.mkdir(parents=True)
    with simulations._framework._exclusive_lock(path):
        assert simulations_main(arguments) == 2
    assert "another run is writing" in capsys.readouterr().err
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        assert simulations_main([*arguments, "--backend", "dask", "--scheduler",
                                 "tcp://127.0.0.1:1"]) == 2
    assert "cannot connect to the Dask scheduler" in capsys.readouterr().err

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(simulations.__main__, "run_study", interrupt)
    assert simulations_main(arguments) == 130
    assert capsys.readouterr().err.startswith("python -m simulations: interrupted")


def _a_bug(params, seed):
    raise ValueError("a bug in the study")


def test_cli_does_not_hide_an_error_of_the_code(tmp_path, monkeypatch):
    study = Study("bug", "", {"smoke": [{"a": 1}]}, {"smoke": 1}, _a_bug)
    monkeypatch.setattr(simulations.__main__, "get_study", lambda name: study)
    with pytest.raises(ValueError, match="a bug in the study"):
        simulations_main(["bug", "--results-dir", str(tmp_path), "--no-progress"])


def test_cli_does_not_take_a_key_error_of_a_study_module_for_an_unknown_study(
        tmp_path, monkeypatch):
    """A review: a module whose import raises KeyError (a bug) was reported as
    "error: grid", exit 2, no traceback."""
    (tmp_path / "badstudy.py").write_text('STUDY = {}["grid"]\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(KeyError, match="grid"):
        simulations_main(["badstudy:STUDY", "--results-dir", str(tmp_path / "r"),
                          "--no-progress"])


# --- a control's results directory says so ---------------------------------------------

def test_a_control_directory_is_marked_and_refused_to_other_runs(tmp_path, capsys):
    """A review ran the normal robustness study on
    simulations/results/controls/no-detection: "0 new", the control's rows taken for
    the method's."""
    run_study(CONTROLLED, "smoke", results_dir=tmp_path, progress=False,
              control="no-detection")
    control_dir = simulations.control_results_dir("no-detection", tmp_path)
    assert (control_dir / "CONTROL").read_text() == "no-detection\n"
    with pytest.raises(simulations.RunError, match="negative control 'no-detection'"):
        run_study(CONTROLLED, "smoke", results_dir=control_dir, progress=False)
    with pytest.raises(simulations.RunError, match="negative control 'no-detection'"):
        simulations.verify_table(CONTROLLED, "smoke", results_dir=control_dir)
    with pytest.raises(simulations.RunError, match="negative control 'no-detection'"):
        run_study(CONTROLLED, "smoke", results_dir=control_dir, progress=False,
                  control="no-detection")  # would nest controls/ in it
    # a directory marked for another control is not this control's
    other = simulations.control_results_dir("no-detection", tmp_path / "other")
    other.mkdir(parents=True)
    (other / "CONTROL").write_text("inflated-noise\n")
    with pytest.raises(simulations.RunError, match="not of 'no-detection'"):
        run_study(CONTROLLED, "smoke", results_dir=tmp_path / "other", progress=False,
                  control="no-detection")
    assert not (other / "smoke").exists()
    # the command line says it in one line
    assert simulations_main(["simulation_toy:STUDY", "--results-dir", str(control_dir),
                             "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "CONTROL file" in error and error.count("\n") == 1
    rows = read_rows(control_dir / "smoke" / "toy.jsonl")  # nothing appended to it
    assert len(rows) == 4 and {row["control"] for row in rows} == {"no-detection"}


def test_every_committed_control_directory_is_marked():
    base = simulations.default_results_dir() / "controls"
    directories = sorted(path for path in base.iterdir() if path.is_dir())
    assert [path.name for path in directories] == sorted(simulations.CONTROLS)
    for path in directories:
        assert (path / "CONTROL").read_text() == f"{path.name}\n"


def test_the_readme_lists_every_control_with_the_studies_that_implement_it():
    text = (ROOT / "simulations" / "README.md").read_text()
    table = text.split("| control | what is broken | studies |")[1].split("\n\n")[0]
    listed = {}
    for line in table.strip().splitlines()[1:]:
        name, _, studies = (cell.strip() for cell in line.strip("|").split("|"))
        listed[name.strip("`")] = {study.strip(" `") for study in studies.split(",")}
    implemented = {name: {study.name for study in simulations.available_studies().values()
                          if name in study.controls} for name in simulations.CONTROLS}
    assert listed == implemented


def test_broken_lora_tests_patch_only_while_a_control_runs(monkeypatch):
    """``broken_lora_tests``: the tests' predictive null with half its spread inside the
    ``narrow-null`` control, p-values unadjusted and a client flagged by any module
    inside ``no-correction`` (nested uses share one patch), the originals restored when the last use ends (an
    error included); any other control changes nothing."""
    import dataclasses

    from clairstat import _inference
    from clairstat.aggregation import _modules
    from simulations._controls import broken_lora_tests

    @dataclasses.dataclass(frozen=True)
    class Null:
        spread: float

    def original(*_args, **_kwargs):
        return Null(2.0), Null(4.0)

    monkeypatch.setattr(_inference, "predictive_null", original)
    votes, flags = _modules.client_flags, np.array([[1, 0, 0], [0, 0, 0], [0, 0, 1]], bool)
    assert votes(flags, 0.05).tolist() == [False, False, False]  # one vote of 3: too few
    with broken_lora_tests(None), broken_lora_tests("no-detection"):
        assert _inference.predictive_null is original and _modules.client_flags is votes
    with broken_lora_tests("narrow-null"):
        assert [n.spread for n in _inference.predictive_null()] == [1.0, 2.0]
        with broken_lora_tests("narrow-null"):  # a second replicate's, in another thread
            assert [n.spread for n in _inference.predictive_null()] == [1.0, 2.0]
        assert _inference.predictive_null is not original  # the first one still runs
        assert _modules.client_flags is votes
    assert _inference.predictive_null is original
    adjust = _inference.adjust_p_values
    raw = np.array([0.01, 0.02, 0.5])
    assert adjust(raw, 0.05, "holm").tolist() == pytest.approx([0.03, 0.04, 0.5])
    with broken_lora_tests("no-correction"):
        assert _modules.client_flags(flags, 0.05).tolist() == [True, False, True]
        assert _inference.adjust_p_values(raw, 0.05, "holm").tolist() == raw.tolist()
        assert _inference.predictive_null is original
    assert _modules.client_flags is votes and _inference.adjust_p_values is adjust
    with pytest.raises(RuntimeError), broken_lora_tests("narrow-null"):
        raise RuntimeError("a replicate fails")
    assert _inference.predictive_null is original


@pytest.mark.parametrize("joint", [True, False])
def test_broken_lora_tests_reach_the_package_path_the_copying_study_runs(joint):
    """Under ``no-correction`` the real LoRA path (``clair_modules``, as
    ``refine_adapters`` calls it) leaves every module's p-values unadjusted and flags a
    client that any module flags; under ``narrow-null`` its p-values change. Without a
    control neither holds (the patches are not no-ops that the smoke tables could hide)."""
    import warnings

    from clairstat.aggregation import clair_modules
    from simulations._controls import broken_lora_tests

    rng = np.random.default_rng(3)
    shared = rng.standard_normal((24, 2))
    lists = {f"m{m}": [((shared + 0.3 * rng.standard_normal((24, 2))) * (8.0 if k == 0
                                                                      else 1.0),
                        rng.standard_normal((2, 20))) for k in range(12)]
             for m in range(3)}

    def fit(control):
        with warnings.catch_warnings(), broken_lora_tests(control):
            warnings.simplefilter("ignore")
            return clair_modules(lists, joint=joint, random_state=0)

    def module_flags(result):
        return np.array([result.estimators[m].contaminated_ for m in sorted(lists)])

    normal, uncorrected, narrow = fit(None), fit("no-correction"), fit("narrow-null")
    for m in lists:
        est = uncorrected.estimators[m]
        assert np.array_equal(est.adjusted_p_values_, est.p_values_)
        assert not np.array_equal(normal.estimators[m].adjusted_p_values_,
                                  normal.estimators[m].p_values_)
        assert not np.allclose(narrow.estimators[m].p_values_,
                               normal.estimators[m].p_values_)
    assert np.array_equal(uncorrected.flagged, module_flags(uncorrected).any(axis=0))
    # the vote-count test needs more than one module's flag (here: all three modules
    # flag the scaled client 0)
    assert normal.flagged[0] and uncorrected.flagged[0]


def test_a_line_that_is_not_utf8_is_skipped_with_a_warning_and_the_run_resumes(tmp_path):
    """One non-UTF-8 line made the whole table unreadable: a UnicodeDecodeError with a
    traceback in the resume and in every reader (a review). It is skipped like any
    malformed line, and the resume writes the replicate it held again."""
    study = simulation_toy.STUDY
    run_study(study, "smoke", results_dir=tmp_path, progress=False)
    path = tmp_path / "smoke" / "toy.jsonl"
    lines = path.read_bytes().split(b"\n")
    lines[5] = b"\xff" + lines[5][1:]
    path.write_bytes(b"\n".join(lines))
    with pytest.warns(UserWarning, match="skipping malformed line 6"):
        rows = read_rows(path)
    assert len(rows) == 11
    with pytest.warns(UserWarning, match="skipping malformed line 6"):
        assert run_study(study, "smoke", results_dir=tmp_path, progress=False) == 1
    with pytest.warns(UserWarning, match="skipping malformed line 6"):
        assert len(set(_keys(read_rows(path)))) == 12


def _children(pid):
    """The ids of the processes whose parent is ``pid`` (Linux's /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads Linux's /proc")
def test_sigterm_ends_a_parallel_run_like_ctrl_c_and_leaves_no_worker(tmp_path):
    """SIGTERM (a batch scheduler, ``timeout``) killed the parent at once and left
    joblib's worker processes running under init (a review): now it is an interrupt,
    status 130, the finished rows kept, every worker gone."""
    path = tmp_path / "smoke" / "toy.jsonl"
    command = [sys.executable, "-m", "simulations", "simulation_toy:SLOW_STUDY",
               "--scale", "smoke", "--results-dir", str(tmp_path), "--no-progress",
               "--n-jobs", "2"]
    process = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(read_rows(path)) < 4:
        time.sleep(0.05)
    workers = _children(process.pid)
    assert workers, "joblib's workers must be running when the signal lands"
    os.kill(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and b"interrupted" in err
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(Path(f"/proc/{w}").exists()
                                              for w in workers):
        time.sleep(0.1)
    alive = [w for w in workers if Path(f"/proc/{w}").exists()]
    assert not alive, f"workers {alive} outlived the run"
    assert 4 <= len(read_rows(path)) < 30


def test_conflicting_duplicate_rows_are_reported_and_identical_ones_are_not(tmp_path):
    """Two tables merged by hand with different rows for one (cell, replicate) were
    deduplicated silently, the first kept (a review): readers now say so. Exact
    repeats stay silent."""
    import json
    import warnings

    from simulations._framework import load_table

    row = {"cell": "c0", "replicate": 0, "seed": 1, "value": 0.5}
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (row, row, {**row, "replicate": 1}))
                    + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_table(path)) == 2
    path.write_text("\n".join(json.dumps(r) for r in (row, {**row, "value": 9.0})) + "\n")
    with pytest.warns(UserWarning, match="1 \\(cell, replicate\\) pair\\(s\\) appear more "
                                         "than once with different values"):
        table = load_table(path)
    assert table["value"].tolist() == [0.5]


def test_rows_read_with_every_line_ending_and_a_torn_tail_still_ignored(tmp_path):
    """Reading bytes line by line (for the non-UTF-8 line) first split on "\\n" only: a
    table with "\\r" endings read as no row at all (a review). Text mode's endings are
    all read; a last line without its newline is still a torn write, ignored silently."""
    import json
    import warnings

    rows = [{"cell": "c", "replicate": i} for i in range(3)]
    path = tmp_path / "t.jsonl"
    for ending in (b"\n", b"\r\n", b"\r"):
        path.write_bytes(ending.join(json.dumps(r).encode() for r in rows) + ending)
        assert read_rows(path) == rows
    path.write_bytes(b"\n".join(json.dumps(r).encode() for r in rows) + b'\n{"cell": "c')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_rows(path) == rows
    # a malformed last line that has its newline is not a torn write: it is reported
    path.write_bytes(b"\n".join(json.dumps(r).encode() for r in rows) + b"\n{bad}\r")
    with pytest.warns(UserWarning, match="skipping malformed line 4"):
        assert read_rows(path) == rows


def test_a_resume_keeps_a_table_written_with_carriage_returns(tmp_path):
    """The resume cut a torn last line at the last "\\n": a table whose lines end in
    "\\r" alone was cut to nothing (a review). It keeps every row and adds the rest."""
    study = simulation_toy.STUDY
    run_study(study, "smoke", results_dir=tmp_path, progress=False)
    path = tmp_path / "smoke" / "toy.jsonl"
    lines = path.read_bytes().split(b"\n")[:6]
    path.write_bytes(b"\r".join(lines) + b"\r")
    assert len(read_rows(path)) == 6
    assert run_study(study, "smoke", results_dir=tmp_path, progress=False) == 6
    rows = read_rows(path)
    assert len(rows) == 12 and len(set(_keys(rows))) == 12


def test_a_study_outside_the_code_folders_is_part_of_the_rows_label(tmp_path, monkeypatch):
    """A study given by import path from outside clairstat/ and simulations/: an edit
    of it between two runs appended the new code's rows under the old rows' label, with
    no warning (a review). Its file's digest is in the label, so the resume warns and
    the rows tell the two codes apart; a study inside simulations/ gets no such part."""
    import importlib
    import warnings

    from simulations import _framework, get_study

    folder = tmp_path / "mod"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))

    def write(shift, replicates):
        (folder / "outside_study.py").write_text(
            "import numpy as np\n"
            "from simulations import Study, grid\n"
            "def simulate_one(params, seed):\n"
            f"    return {{'x': float(np.random.default_rng(seed).normal()) + {shift}}}\n"
            "STUDY = Study(name='outside', description='toy', grids={'smoke': grid(a=[1])},\n"
            f"              replicates={{'smoke': {replicates}}}, simulate_one=simulate_one)\n")
        import outside_study

        importlib.reload(outside_study)
        return get_study("outside_study:STUDY")

    run_study(write(0, 2), "smoke", results_dir=tmp_path, progress=False)
    with pytest.warns(UserWarning, match="the table will mix them"):
        run_study(write(100, 3), "smoke", results_dir=tmp_path, progress=False)
    rows = read_rows(tmp_path / "smoke" / "outside.jsonl")
    labels = [row["code_commit"] for row in rows]
    assert len(rows) == 3 and labels[0] == labels[1] != labels[2]
    assert all("+ study code in outside_study.py, outside clairstat and simulations "
               "(digest " in label for label in labels)
    from simulations.studies import recovery

    assert _framework._outside_study(recovery.STUDY.simulate_one) == ""
    namespace = {}  # code without a file (exec, a notebook cell): its function's digest
    exec("def simulate(params, seed):\n    return {'x': 1.0}\n", namespace)
    first = _framework._outside_study(namespace["simulate"])
    exec("def simulate(params, seed):\n    return {'x': 2.0}\n", namespace)
    assert first.startswith(" + study code without a file (simulate, digest ")
    assert _framework._outside_study(namespace["simulate"]) != first

    class Callable:  # a callable object: its class's file (this one)
        def __call__(self, params, seed):
            return {}

    assert "+ study code in test_simulations.py" in _framework._outside_study(Callable())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _framework._outside_study(len) == ""  # a built-in: no file

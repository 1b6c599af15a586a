"""Study declaration, seed derivation, resumable JSON-lines tables and parallel running.

A :class:`Study` declares, per scale, a list of parameter cells and a replicate count,
and a pure ``simulate_one(params, seed) -> dict``. :func:`run_study` runs every
(cell, replicate) not yet in the study's table, in parallel with joblib (locally or on a
Dask cluster), and appends one tidy row per finished replicate, flushed and fsynced, so
that a run killed at any moment (even by ``kill -9``) resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import itertools
import json
import numbers
import os
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["Study", "SCALES", "RunError", "grid", "cell_id", "derive_seed",
           "default_results_dir", "results_path", "read_rows", "load_results", "load_table",
           "pending_tasks", "run_study", "verify_table"]

SCALES = ("smoke", "small", "full")
_RESERVED = ("study", "cell", "replicate", "seed", "clairstat_version", "code_commit",
             "blas_kernels", "threads_per_task", "control", "elapsed_s")
#: The folders whose Python files a row depends on (:func:`code_provenance`); a
#: validation report also depends on ``validation/`` (its checks).
CODE_FOLDERS = ("clairstat", "simulations")


class RunError(RuntimeError):
    """A run that cannot be done as asked: its table is being written by another run,
    the Dask scheduler cannot be reached, or its results directory holds another
    control's tables. Not a failure of a replicate; the command lines print it as one
    line and exit with status 2."""


@dataclasses.dataclass(frozen=True)
class Study:
    """A Monte Carlo study: a parameter grid per scale and one pure replicate function.

    Parameters
    ----------
    name : str
        Table name; rows go to ``<results_dir>/<scale>/<name>.jsonl``.
    description : str
        One line saying which claim the study checks.
    grids : dict of str to list of dict
        For each scale (``"smoke"``, ``"small"``, ``"full"``) the list of parameter cells;
        a cell is a dict of JSON-serialisable scalars.
    replicates : dict of str to int
        Number of replicates per cell, per scale.
    simulate_one : callable
        ``simulate_one(params, seed) -> dict`` of measured quantities (JSON-serialisable
        scalars). Must be a module-level function (it is pickled by reference) and depend
        only on its arguments. A study that declares ``controls`` is also called as
        ``simulate_one(params, seed, control=NAME)``.
    controls : tuple of str, default=()
        Negative controls (``simulations._controls.CONTROLS``) this study implements: the
        broken variant of the method it runs when given that name.
    round_off : dict of str to callable, default={}
        Measured columns whose value is itself round-off of a larger quantity (a
        solver's duality gap at convergence: the difference of two objectives): column
        -> ``f(params)``, that column's absolute tolerance in ``--verify`` for a cell,
        derived from the cell's sizes (``_same``'s default is for round-off of order
        one; another BLAS build's summation order moves a gap by as much as the gap).
    """

    name: str
    description: str
    grids: dict
    replicates: dict
    simulate_one: Callable
    controls: tuple = ()
    round_off: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        # a review: -3 or 0 replicates ran nothing without a word, 2.7 ran 2, an empty
        # grid was a silent no-op and a list-valued cell failed only inside simulate_one
        for scale, count in self.replicates.items():
            if isinstance(count, (bool, np.bool_)) or not isinstance(count, numbers.Integral) \
                    or count < 1:
                raise ValueError(f"study {self.name!r}: the replicate count of scale "
                                 f"{scale!r} must be a positive integer, got {count!r}.")
        for scale, cells in self.grids.items():
            if isinstance(cells, (str, bytes, dict)) or not len(cells):
                raise ValueError(f"study {self.name!r}: the grid of scale {scale!r} must be "
                                 f"a non-empty list of cells, got {cells!r}.")
            for cell in cells:
                if not isinstance(cell, dict):
                    raise ValueError(f"study {self.name!r}: a cell of scale {scale!r} is "
                                     f"not a dict: {cell!r}.")
                bad = {key: value for key, value in cell.items()
                       if not isinstance(value, (str, int, float, type(None), np.integer,
                                                 np.floating, np.bool_))}
                if bad:
                    raise ValueError(f"study {self.name!r}: cell values must be JSON "
                                     f"scalars (str, int, float, bool or None); scale "
                                     f"{scale!r} has {bad}.")

    def cells(self, scale):
        """The parameter cells of ``scale`` (a list of dicts)."""
        _check_scale(scale)
        if scale not in self.grids or scale not in self.replicates:
            raise ValueError(f"study {self.name!r} declares no "
                             f"{'grid' if scale not in self.grids else 'replicate count'} "
                             f"for scale {scale!r}.")
        cells, seen = [dict(cell) for cell in self.grids[scale]], set()
        for cell in cells:
            # a cell listed twice (overlapping grid(...) calls) would run each of its
            # replicates twice, with the same seed, and write two rows of one replicate
            if cell_id(cell) in seen:
                raise ValueError(f"study {self.name!r} lists the cell {cell} more than "
                                 f"once at scale {scale!r}.")
            seen.add(cell_id(cell))
        return cells

    def tasks(self, scale):
        """Every ``(cell_id, replicate, params, seed)`` of ``scale``, replicate by replicate.

        Replicate 0 of every cell comes first, then replicate 1, ...: a run stopped early
        (a deadline, a lost worker) leaves every cell with about the same number of rows.
        """
        cells = self.cells(scale)  # first: it says which scale is missing
        n_rep = int(self.replicates[scale])
        return [(cell_id(params), rep, params, derive_seed(self.name, params, rep))
                for rep in range(n_rep) for params in cells]


def _check_scale(scale):
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}.")


def grid(**axes):
    """Cartesian product of parameter axes as a list of cells.

    Scalars are fixed parameters; lists (or tuples) are axes.

    Examples
    --------
    >>> grid(p=20, gamma=[0.1, 0.2])
    [{'p': 20, 'gamma': 0.1}, {'p': 20, 'gamma': 0.2}]
    """
    names = list(axes)
    values = [v if isinstance(v, (list, tuple)) else [v] for v in axes.values()]
    return [dict(zip(names, combo)) for combo in itertools.product(*values)]


def _canonical(params):
    """Key-sorted JSON text of a cell: the same on every machine and Python run."""
    bad = [key for key in params if key in _RESERVED]
    if bad:
        raise ValueError(f"parameter names {bad} are reserved for the table's own columns.")
    return json.dumps(params, sort_keys=True, separators=(",", ":"), default=_to_builtin)


def cell_id(params):
    """Stable 12-hex-digit identifier of a parameter cell (a SHA-256 prefix).

    Examples
    --------
    >>> cell_id({"b": 1, "a": 2.0}) == cell_id({"a": 2.0, "b": 1})
    True
    """
    return hashlib.sha256(_canonical(params).encode()).hexdigest()[:12]


def derive_seed(study_name, params, replicate):
    """Seed of one replicate, derived from (study, cell, replicate).

    The study name and the cell's canonical JSON are hashed with SHA-256 (stable across
    runs, unlike Python's salted ``hash``); the digest is the entropy of a
    :class:`numpy.random.SeedSequence` whose spawn key is the replicate index. The result
    fits in 32 bits, so it seeds numpy, scikit-learn and torch alike.

    Examples
    --------
    >>> derive_seed("toy", {"a": 1}, 0) == derive_seed("toy", {"a": 1}, 0)
    True
    >>> derive_seed("toy", {"a": 1}, 0) != derive_seed("toy", {"a": 1}, 1)
    True
    """
    digest = hashlib.sha256(f"{study_name}\n{_canonical(params)}".encode()).digest()
    sequence = np.random.SeedSequence(int.from_bytes(digest, "big"),
                                      spawn_key=(int(replicate),))
    return int(sequence.generate_state(1, dtype=np.uint32)[0])


def default_results_dir():
    """``simulations/results`` next to this file (override with ``results_dir``)."""
    return Path(__file__).resolve().parent / "results"


def results_path(study_name, scale, results_dir=None):
    """Path of the JSON-lines table of ``study_name`` at ``scale``."""
    _check_scale(scale)
    base = Path(results_dir) if results_dir is not None else default_results_dir()
    return base / scale / f"{study_name}.jsonl"


def _to_builtin(value):
    """JSON fallback for numpy scalars and arrays."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store a {type(value).__name__} in a results table.")


def read_rows(path):
    """Rows of a JSON-lines table; a torn last line (from a killed writer) is ignored.

    A malformed line anywhere else is skipped with a warning: the table was edited or
    corrupted by something other than :func:`run_study`. So is a line that is valid JSON
    but not a row (not an object with a ``cell`` and a ``replicate``).
    """
    path = Path(path)
    if not path.exists():
        return []
    # bytes, each line decoded on its own: one line that is not UTF-8 (a corrupted
    # sector, an editor's encoding) made the whole file unreadable, a traceback in the
    # resume and in every reader (a review)
    lines = path.read_bytes().splitlines(keepends=True)  # \n, \r\n and \r, as text mode
    rows = []
    for index, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            # a last line without its newline is a torn write
            if index != len(lines) - 1 or raw.endswith((b"\n", b"\r")):
                warnings.warn(f"{path}: skipping malformed line {index + 1}.", stacklevel=2)
            continue
        if not _is_row(row):
            warnings.warn(f"{path}: skipping line {index + 1}: not a row (a JSON object "
                          "with a cell and a replicate).", stacklevel=2)
            continue
        rows.append(row)
    return rows


def _is_row(value):
    return isinstance(value, dict) and "cell" in value and "replicate" in value


def load_results(study, scale, results_dir=None, current_only=False):
    """The results table of a study as a :class:`pandas.DataFrame` (one row a replicate).

    Parameters
    ----------
    study : str or Study
    scale : {"smoke", "small", "full"}
    results_dir : path-like, optional
        Defaults to :func:`default_results_dir`.
    current_only : bool, default=False
        Keep only the cells and replicates of the study's current grid at ``scale``
        (rows of cells since removed from the grid are dropped); needs a Study.
    """
    name = study.name if isinstance(study, Study) else str(study)
    frame = load_table(results_path(name, scale, results_dir))
    if current_only and len(frame):
        if not isinstance(study, Study):
            raise TypeError("current_only=True needs a Study, not a name.")
        wanted = {(task[0], task[1]) for task in study.tasks(scale)}
        keep = [key in wanted for key in zip(frame["cell"], frame["replicate"])]
        frame = frame[keep].reset_index(drop=True)
    return frame


def load_table(path):
    """A JSON-lines results table at ``path`` as a DataFrame (duplicates dropped)."""
    import pandas as pd

    frame = pd.DataFrame(read_rows(path))
    if len(frame):
        repeated = frame[frame.duplicated(["cell", "replicate"], keep=False)]
        if len(repeated):  # a table merged from two runs: say which rows differ
            differing = (repeated.astype(str).groupby(["cell", "replicate"]).nunique()
                         > 1).any(axis=1)
            if differing.any():
                warnings.warn(f"{path}: {int(differing.sum())} (cell, replicate) pair(s) "
                              "appear more than once with different values; the first of "
                              "each is kept (a table merged from two runs?).", stacklevel=2)
        frame = frame.drop_duplicates(["cell", "replicate"], keep="first")
        frame = frame.sort_values(["cell", "replicate"], kind="stable").reset_index(drop=True)
    return frame


def _repair_tail(path):
    """Cut a torn last line so that new rows start on a line of their own.

    A last line that is a whole row short of its newline (what :func:`read_rows` reads
    as a row) is ended instead: cutting it would delete a finished replicate.
    """
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith((b"\n", b"\r")):  # the line endings read_rows reads
        start = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
        try:
            whole = _is_row(json.loads(data[start:]))
        except ValueError:  # a torn write (JSONDecodeError, or bytes cut mid-character)
            whole = False
        with open(path, "r+b") as handle:
            if whole:
                handle.seek(0, os.SEEK_END)
                handle.write(b"\n")
            else:
                handle.truncate(start)


@contextlib.contextmanager
def _exclusive_lock(path):
    """Advisory lock so two runs never append to the same table at once.

    The operating system releases it when the holder dies, even by ``kill -9``.
    """
    import fcntl

    try:
        handle = open(path.with_suffix(".lock"), "w")
    except OSError as error:
        raise RunError(f"cannot write the lock of {path}: {error.strerror or error}.") \
            from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(f"another run is writing {path}; wait for it to finish.") from None
        yield


def _append_row(handle, row):
    """Write one row and force it to disk before the next one (no loss on kill -9)."""
    handle.write(json.dumps(row, default=_to_builtin, allow_nan=True) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


@contextlib.contextmanager
def _limit_threads(n_threads):
    """Cap BLAS/OpenMP pools (threadpoolctl) and torch's intra-op pool at ``n_threads``.

    Replicates are the unit of parallelism: a small solve on several threads per process
    oversubscribes the cores (measured: a CLAIR fit at (p, q, K) = (20, 5, 40) took 0.05 s
    on one torch thread and 1.5 s on two under load). Torch is capped only if installed;
    its previous setting is restored afterwards.
    """
    from threadpoolctl import threadpool_limits

    torch = None
    if importlib.util.find_spec("torch") is not None:
        import torch
    previous = torch.get_num_threads() if torch else None
    if torch and previous != n_threads:
        torch.set_num_threads(n_threads)
    try:
        with threadpool_limits(limits=n_threads):
            yield
    finally:
        if torch and torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


# One replicate at a time per process: a worker with several threads (a Dask worker's
# default) would otherwise run replicates concurrently under process-wide state, the
# thread caps of _limit_threads (one thread's exit restores them under another) and
# torch's global generator (torch.manual_seed in the copying studies), so that a row
# would depend on what ran beside it.
_REPLICATE_LOCK = threading.Lock()


def _run_task(simulate_one, cell, replicate, params, seed, n_threads=1, control=None,
              run=None):
    """Worker side: one replicate, timed, with the version and commit of the code that ran
    it (a cluster's workers import their own ``clairstat``, not the submitter's).
    Module-level so joblib can pickle it. ``run`` (a token per :func:`run_study` call)
    has the worker check once per run that its code on disk is what it loaded
    (:func:`_refuse_changed_code`)."""
    from clairstat import __version__

    if run is not None:
        _refuse_changed_code(run)
    extra = {} if control is None else {"control": control}
    with _REPLICATE_LOCK:
        start = time.perf_counter()
        with _limit_threads(n_threads):
            measured = simulate_one(dict(params), seed, **extra)
        elapsed = time.perf_counter() - start
    if not isinstance(measured, dict):
        raise TypeError(f"simulate_one must return a dict, got {type(measured).__name__}.")
    return cell, replicate, measured, elapsed, (
        __version__, code_provenance() + _outside_study(simulate_one), blas_kernels(),
        n_threads)


def _outside_study(simulate_one):
    """The label's part for a study whose code lies outside :data:`CODE_FOLDERS` (given
    by import path, ``module:ATTRIBUTE``): its file and a digest of its content, else
    ``""``. Without it an edit of such a study between two runs appended the new code's
    rows to the old code's under one label, with no warning (a review)."""
    import inspect
    import marshal

    function = getattr(simulate_one, "func", simulate_one)  # a functools.partial
    if not (inspect.isfunction(function) or inspect.ismethod(function)
            or inspect.isbuiltin(function)):
        function = type(function)  # a callable object: its class's file
    try:
        path = Path(inspect.getfile(function)).resolve()
        content = path.read_bytes()
    except (TypeError, OSError):  # a built-in, or code without a file (exec, a notebook)
        code = getattr(function, "__code__", None)
        if code is None:
            return ""
        try:
            digest = hashlib.sha256(marshal.dumps(code)).hexdigest()[:12]
        except ValueError:  # a code object marshal cannot write
            return ""
        return (f" + study code without a file ({getattr(function, '__qualname__', '?')}, "
                f"digest {digest} of its function only)")
    root = Path(__file__).resolve().parents[1]
    if any((root / folder).resolve() in path.parents for folder in CODE_FOLDERS):
        return ""
    return (f" + study code in {path.name}, outside {' and '.join(CODE_FOLDERS)} "
            f"(digest {hashlib.sha256(content).hexdigest()[:12]})")


def blas_kernels():
    """The BLAS libraries loaded in this process, with the kernels they dispatch, e.g.
    ``"openblas 0.3.31.188.0 SkylakeX"`` (``; ``-separated when several are loaded).

    Part of a row's provenance: the same code and seed give different last bits under
    another kernel (OpenBLAS picks its kernels for the CPU, ``OPENBLAS_CORETYPE``
    overrides it), so a value that is rounding over rounding reproduces only under the
    kernel that wrote it. Read after the replicate ran, when the libraries its study
    uses are loaded; about 0.1 ms."""
    from threadpoolctl import threadpool_info

    found = {" ".join(str(part) for part in (pool.get("internal_api"), pool.get("version"),
                                             pool.get("architecture")) if part)
             for pool in threadpool_info() if pool.get("user_api") == "blas"}
    return "; ".join(sorted(found))


@functools.lru_cache(maxsize=None)
def code_provenance(folders=CODE_FOLDERS):
    """The checkout's commit (short hash) and whether the code differs from it.

    Read-only through git. A development version string stays the same across commits
    (every row of this project's tables says ``0.3.0.dev0``); this says which code ran.

    Parameters
    ----------
    folders : tuple of str, default=CODE_FOLDERS
        Top-level folders whose Python files count as the code: ``clairstat`` and
        ``simulations`` for a row, ``validation`` too for a validation report.
        Uncommitted edits and untracked (not git-ignored) files both count.

    Returns
    -------
    str
        ``"<hash>"``, ``"<hash> with uncommitted changes in <folders> (digest
        <12 hex digits>)"``, ``"<hash> (clairstat imported from outside this
        checkout, its digest <12 hex digits>)"``, or ``"no git checkout (code digest
        <12 hex digits>)"`` outside a git checkout of this project (an unpacked
        archive: the digest of every Python file of ``folders``, :func:`_tree_digest`).
        The digest (:func:`_code_digest`) tells two states of the code apart: the same
        code gives the same string, other code another.
    """
    root = Path(__file__).resolve().parents[1]
    import clairstat

    package = Path(clairstat.__file__).resolve().parent
    state = _git_state(root, folders)
    if state is None:
        outside = package.parent != root
        digest = _tree_digest(root, [folder for folder in folders
                                     if not (folder == "clairstat" and outside)])
        label = f"no git checkout (code digest {digest}"
        if outside:
            label += ("; clairstat imported from outside this copy, its digest "
                      f"{_tree_digest(package.parent, [package.name])}")
        return label + ")"
    commit, changed, digest = state
    if package.parent != root:
        return (commit + " (clairstat imported from outside this checkout, its digest "
                f"{_tree_digest(package.parent, [package.name])})")
    if not changed:
        return commit
    return f"{commit} with uncommitted changes in {', '.join(changed)} (digest {digest})"


def _run_token():
    """A run's token (:func:`_refuse_changed_code`): an id, and the code state of the
    process that starts the run, which every worker must hold too."""
    return uuid.uuid4().hex, _loaded_code_state()


@functools.lru_cache(maxsize=8)
def _refuse_changed_code(run):
    """Raise :class:`RunError` when the code on disk differs from the code this process
    loaded; checked once per ``run`` token (:func:`run_study`) in each process.

    In a long-lived process (a notebook's kernel, joblib's reused loky workers, a Dask
    cluster's workers) an edit made since the process loaded its code would make rows
    that say one code while another ran (a review: a study edited and reloaded in one
    session gave the same replicate different values with ``n_jobs=1`` and 2, both
    rows labelled with the code read first). Which of a process's modules are stale
    cannot be read off it, so a changed state is refused: restarting the process (and
    its workers) runs one code again. Only the code's content counts
    (:func:`_code_state`): a commit, of code or of anything else, that leaves the files
    as they were is no change. The state is read when :mod:`simulations._framework` is
    imported, so an edit to ``clairstat`` between its own import and this module's is
    not seen.
    """
    loaded, on_disk = _loaded_code_state(), _code_state()
    if on_disk != loaded:
        raise RunError(f"the code in {', '.join(CODE_FOLDERS)} changed on disk since this "
                       f"process (pid {os.getpid()}) loaded it (digest {loaded} then, "
                       f"{on_disk} now); its rows would not say which code ran. Restart "
                       "the Python process (a notebook's kernel, a Dask cluster's workers) "
                       "and run again.")
    # A worker must also hold the code of the process that started the run: a Dask
    # worker restarted by its nanny after an edit (or one on another checkout) loaded
    # other code, passed the check above, and wrote rows under the run's label (a
    # review: one run's rows from two codes, exit 0).
    submitted = run[1] if isinstance(run, tuple) else None
    if submitted is not None and loaded is not None and loaded != submitted:
        raise RunError(f"this worker (pid {os.getpid()}) holds other code than the process "
                       f"that started the run (digest {loaded} here, {submitted} there): a "
                       "worker restarted after an edit, or one on another checkout; one "
                       "run's rows would come from two codes. Restart the workers (and the "
                       "submitting process) on one code and run again.")
    return loaded


def _code_state(folders=CODE_FOLDERS):
    """Digest (:func:`_code_digest`) of every Python file of ``folders`` in the working
    tree, tracked or untracked and not git-ignored (result tables apart), or of every
    Python file of ``folders`` outside a git checkout of this project
    (:func:`_tree_digest`): the content of the code, whatever its commit."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root,
                             capture_output=True, text=True, check=True).stdout.strip()
        if Path(top).resolve() != root:
            return _tree_digest(root, folders)
        listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                                  "--exclude-standard", "--", *folders], cwd=root,
                                 capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return _tree_digest(root, folders)
    paths = sorted({path for path in listing.split("\0") if path.endswith(".py")
                    and not path.startswith("simulations/results/")})
    return _code_digest(root, paths)


def _tree_digest(root, folders):
    """:func:`_code_digest` of every Python file under ``folders`` of ``root`` (result
    tables and ``__pycache__`` apart), found by walking the folders: the code's state
    where git cannot list it (an unpacked archive, a copy inside another repository, no
    git installed). Without it such a copy had no state at all, and a resume after an
    edit appended rows of the new code to the old code's table without a warning (a
    review)."""
    root = Path(root)
    paths = sorted(path.relative_to(root).as_posix()
                   for folder in folders for path in (root / folder).rglob("*.py")
                   if "__pycache__" not in path.parts)
    return _code_digest(root, [path for path in paths
                               if not path.startswith("simulations/results/")])


@functools.lru_cache(maxsize=None)
def _loaded_code_state():
    """:func:`_code_state` when this process first asked: at the import of this module."""
    return _code_state()


def _git_state(root, folders):
    """``(short commit, folders with changed or untracked Python files, digest of
    their content)`` of the git checkout whose top level is ``root`` (the digest
    ``None`` when no such file differs from the commit), or ``None`` when ``root`` is
    not one."""
    import subprocess

    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root,
                             capture_output=True, text=True, check=True).stdout.strip()
        if Path(top).resolve() != Path(root).resolve():  # a copy inside another repository
            return None
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                                capture_output=True, text=True, check=True).stdout.strip()
        # -z: NUL-separated "XY path" entries, paths verbatim (no quoting, no stripping);
        # untracked files one by one ("?? path"), git-ignored ones not at all
        status = subprocess.run(["git", "status", "--porcelain", "-z",
                                 "--untracked-files=all", "--", *folders],
                                cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    changed = _changed_code(status)
    return commit, changed, _code_digest(root, _code_paths(status)) if changed else None


def _code_paths(status):
    """The changed or untracked Python files in ``git status --porcelain -z`` output
    (``XY path`` entries; a rename or copy is followed by its old path, which counts
    too for a rename: it is gone), sorted. Result tables and documents are not the
    code that ran."""
    entries, paths = iter(status.split("\0")), set()
    for entry in entries:
        if len(entry) < 4:
            continue
        code, path = entry[:2], entry[3:]
        if "R" in code or "C" in code:
            old = next(entries, None)
            if "R" in code and old:
                paths.add(old)
        paths.add(path)
    return sorted(path for path in paths
                  if path.endswith(".py") and not path.startswith("simulations/results/"))


def _changed_code(status):
    """Top-level folders with changed or untracked Python files in ``git status
    --porcelain -z`` output (:func:`_code_paths`)."""
    return sorted({path.split("/", 1)[0] for path in _code_paths(status)})


def _code_digest(root, paths):
    """First 12 hex digits of the SHA-256 of ``paths`` (relative to ``root``) and their
    bytes in the working tree, in the given order, a missing file marked as such.

    Given the commit, these files are all that differs from it, so one digest stands
    for one state of the code (up to a 48-bit hash's collisions); it reads the files
    themselves, not ``git diff``, whose text depends on the user's git configuration."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode("utf-8", "surrogateescape") + b"\0")
        try:
            content = (Path(root) / path).read_bytes()
        except OSError:  # deleted (or unreadable): its absence is the state
            digest.update(b"-\0")
            continue
        digest.update(b"+%d\0" % len(content) + content)
    return digest.hexdigest()[:12]


def _make_row(study, cell, replicate, params, seed, measured, elapsed, provenance,
              control=None):
    """One table row; ``control`` names the negative control that produced it (``None``
    for the method itself): a table copied into another folder still says what it is (a
    review validated a control's rows as the method's, only the folder telling them
    apart)."""
    version, commit, kernels, threads = provenance  # the worker's (_run_task)
    clash = set(measured) & (set(params) | set(_RESERVED))
    if clash:
        raise ValueError(f"{study.name}: measured names {sorted(clash)} clash with columns.")
    return {"study": study.name, "cell": cell, "replicate": replicate, **params,
            "seed": seed, "clairstat_version": version, "code_commit": commit,
            "blas_kernels": kernels, "threads_per_task": threads, "control": control,
            **measured,
            "elapsed_s": round(elapsed, 4)}


# A replicate is a pure function of its seed, run on one thread (_run_task): rerun on the
# same code and BLAS build it gives the same row to the last bits. A relative 1e-6
# (absolute 1e-13 for quantities near zero) leaves room for another BLAS build's
# summation order, not for a change in the method. An absolute 1e-12 passed a p-value of
# 1.3e-13 stored as 1e-12, 0 or -4e-13 (a review). Columns that are round-off of a larger
# quantity (recovery's duality gaps at convergence, 1-20 n eps for n entries) declare
# their own scale (``Study.round_off``): on an AMD machine three such gaps of the tables
# written on Intel ones came back 2e-13 to 2.3e-12 away.
_VERIFY_RTOL, _VERIFY_ATOL = 1e-6, 1e-13


def _same(old, new, atol=_VERIFY_ATOL):
    if isinstance(old, bool) or isinstance(new, bool):
        return type(old) is type(new) and old == new  # True is not 1 here
    if isinstance(old, int) and isinstance(new, int):
        return old == new  # counts are exact
    if not (isinstance(old, (int, float)) and isinstance(new, (int, float))):
        return old == new
    if np.isnan(old) or np.isnan(new):
        return bool(np.isnan(old) and np.isnan(new))
    return bool(np.isclose(old, new, rtol=_VERIFY_RTOL, atol=atol))


def _is_timing(column):
    """Wall-clock columns (``seconds``, ``seconds_<stage>``, ``<stage>_seconds``): they
    vary from run to run and are not what a table asserts."""
    return column == "seconds" or column.startswith("seconds_") or column.endswith("_seconds")


def verify_table(study, scale, *, max_rows=None, results_dir=None, replicates=(0,),
                 control=None):
    """Rerun committed replicates of ``study`` and say where the table no longer matches.

    A table is data only while the code still produces it: a change to the method that
    is not followed by a rerun leaves rows (and the verdicts and figures made from them)
    describing code that no longer exists, with the same version string. This reruns
    the stored replicates numbered ``replicates`` of every cell of the current grid (at
    most ``max_rows`` of them, evenly spread over the cells) from their seeds and
    compares every measured column (wall-clock ones apart: ``elapsed_s``, ``seconds*``).
    Every stored row of the current grid, rerun or not, must carry its cell's parameters,
    its seed, the study's name and a ``clairstat_version``. With ``control``, the
    negative control's table (``controls/<control>/``) is rerun with its broken variant.

    Returns
    -------
    checked : int
        Replicates rerun.
    mismatches : list of dict
        ``{"cell", "replicate", "column", "stored", "rerun"}`` per differing value.
    """
    from ._controls import tables_dir

    if control is not None and control not in study.controls:
        raise ValueError(f"study {study.name!r} does not implement control "
                         f"{control!r} (it declares {list(study.controls)}).")
    results_dir = tables_dir(control, results_dir)  # a control's tables are not the method's
    stored = {}
    for row in read_rows(results_path(study.name, scale, results_dir)):
        # the first of duplicates, as load_table (what every reader uses) keeps it
        stored.setdefault((row["cell"], row["replicate"]), row)
    mismatches = []
    for cell, replicate, params, seed in study.tasks(scale):
        row = stored.get((cell, replicate))
        if row is None:
            continue
        # every stored row's own columns must be its task's (no rerun needed): checks
        # group by the parameter columns and a row is found by its cell id, so an
        # edited parameter or seed would otherwise be read as data and never rerun
        for column, value in {"study": study.name, **params, "seed": seed}.items():
            if column not in row or not _same(row[column], value):
                mismatches.append({"cell": cell, "replicate": replicate, "column": column,
                                   "stored": row.get(column, "<missing>"), "rerun": value})
        # and the version that wrote it (every row has it; code_commit is newer)
        if not isinstance(row.get("clairstat_version"), str) or \
                not row["clairstat_version"].strip():
            mismatches.append({"cell": cell, "replicate": replicate,
                               "column": "clairstat_version",
                               "stored": row.get("clairstat_version", "<missing>"),
                               "rerun": "<a version string>"})
    tasks = [task for task in study.tasks(scale)
             if task[1] in replicates and (task[0], task[1]) in stored]
    if max_rows is not None and len(tasks) > max_rows:
        tasks = [tasks[i] for i in np.linspace(0, len(tasks) - 1, max_rows).astype(int)]
    run = _run_token()
    _refuse_changed_code(run)  # a rerun of other code than the process holds proves nothing
    for cell, replicate, params, seed in tasks:
        # on the threads that wrote the row (torch's sums differ in their last bits
        # between one and two threads); rows from before the column ran on one
        threads = stored[(cell, replicate)].get("threads_per_task") or 1
        measured = _run_task(study.simulate_one, cell, replicate, params, seed,
                             n_threads=int(threads), control=control, run=run)[2]
        # as the table stores it (numpy scalars to Python, NaN kept)
        measured = json.loads(json.dumps(measured, default=_to_builtin, allow_nan=True))
        row = stored[(cell, replicate)]
        # a stored measurement the code no longer makes is a difference too
        for column in sorted(set(row) - set(measured) - set(params) - set(_RESERVED)):
            if not _is_timing(column):
                mismatches.append({"cell": cell, "replicate": replicate, "column": column,
                                   "stored": row[column], "rerun": "<not produced>"})
        for column, value in measured.items():
            if _is_timing(column):
                continue
            atol = max(_VERIFY_ATOL, float(study.round_off[column](params))) \
                if column in study.round_off else _VERIFY_ATOL
            if column not in row or not _same(row[column], value, atol):
                mismatches.append({"cell": cell, "replicate": replicate, "column": column,
                                   "stored": row.get(column, "<missing>"), "rerun": value})
    return len(tasks), mismatches


def pending_tasks(study, scale, results_dir=None):
    """Tasks of ``scale`` whose (cell, replicate) is not yet in the table."""
    done = {(row.get("cell"), row.get("replicate"))
            for row in read_rows(results_path(study.name, scale, results_dir))}
    return [task for task in study.tasks(scale) if (task[0], task[1]) not in done]


@contextlib.contextmanager
def _backend(backend, scheduler, n_jobs=1):
    """joblib's default backend (loky), or Dask: the cluster at ``scheduler``, else a
    :class:`distributed.LocalCluster` of ``n_jobs`` single-threaded worker processes."""
    if backend in (None, "loky"):
        yield
        return
    if backend != "dask":
        raise ValueError(f"backend must be 'loky' or 'dask', got {backend!r}.")
    from distributed import Client, LocalCluster
    from joblib import parallel_config

    if scheduler:
        try:
            client = Client(scheduler)
        except (OSError, ValueError) as error:  # unreachable (a timeout), or malformed
            raise RunError(f"cannot connect to the Dask scheduler {scheduler!r}: "
                           f"{error}") from error
        with client, parallel_config(backend="dask"):
            yield
        return
    workers = max(1, n_jobs if n_jobs and n_jobs > 0 else (os.cpu_count() or 1))
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster), \
            parallel_config(backend="dask"):
        yield


def run_study(study, scale, *, n_jobs=1, backend=None, scheduler=None, results_dir=None,
              progress=True, threads_per_task=1, control=None):
    """Run every missing replicate of ``study`` at ``scale`` and append its rows.

    Parameters
    ----------
    study : Study
    scale : {"smoke", "small", "full"}
    n_jobs : int, default=1
        joblib workers; with the Dask backend and no scheduler, the local cluster's worker
        processes (with a scheduler, the cluster's own workers are used).
    backend : {None, "loky", "dask"}
        ``"dask"`` sends replicates to the Dask scheduler at ``scheduler``, or to a local
        cluster of ``n_jobs`` worker processes when no scheduler is given.
    scheduler : str, optional
        Address of a running Dask scheduler, e.g. ``"tcp://127.0.0.1:8786"``.
    results_dir : path-like, optional
    progress : bool, default=True
        Show a tqdm progress bar.
    threads_per_task : int, default=1
        BLAS/OpenMP/torch threads each replicate may use (see :func:`_limit_threads`).
    control : str, optional
        A negative control the study declares (``study.controls``): its broken variant
        runs, with the same seeds, and its rows go to
        ``<results_dir>/controls/<control>/<scale>/`` (never into the normal table); its
        ``CONTROL`` file is written if missing.

    Returns
    -------
    n_new : int
        Number of replicates run (0 when the table was already complete).

    Raises
    ------
    RunError
        Another run is writing the table, the scheduler cannot be reached, or the
        results directory holds another control's tables (``CONTROL`` file; a normal
        run's root has none).
    """
    from ._controls import get_control, tables_dir

    if control is not None:
        get_control(control)  # an unknown name is an error, not a silent normal run
        if control not in study.controls:
            raise ValueError(f"study {study.name!r} does not implement control "
                             f"{control!r} (it declares {list(study.controls)}).")
    try:
        # never a control's rows appended to the method's table, or to another control's
        results_dir = tables_dir(control, results_dir, mark=True)
        path = results_path(study.name, scale, results_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a read-only root, a file where the scale's folder goes
        raise RunError(f"cannot write {error.filename}: {error.strerror or error}.") \
            from None
    run = _run_token()
    _refuse_changed_code(run)  # before anything is written
    with _exclusive_lock(path):
        _repair_tail(path)  # a kill -9 mid-write may have left half a line
        todo = pending_tasks(study, scale, results_dir)
        if todo:
            kernels = _warn_other_code(path, threads_per_task, study.simulate_one)
            jobs = -1 if backend == "dask" else n_jobs  # Dask: every worker of the cluster
            with _backend(backend, scheduler, n_jobs), _open_table(path) as handle:
                _execute(study, scale, todo, handle, jobs, threads_per_task, progress,
                         control, run, kernels)
        return len(todo)


def _open_table(path):
    """The table opened for appending; a table that cannot be written is a RunError."""
    try:
        return open(path, "a")
    except OSError as error:
        raise RunError(f"cannot write the table {path}: {error.strerror or error}.") \
            from None


def _warn_other_code(path, threads_per_task=1, simulate_one=None):
    """Warn before appending rows of this code to a table whose rows say other code (a
    resume after an edit or a commit) or another thread count (torch's and BLAS's sums
    differ in their last bits between one and two threads): readers would mix them.
    Resume is by (cell, replicate) only, so the warning is all that separates the two.

    Returns the BLAS kernels the table's rows name (:func:`blas_kernels`), for
    :func:`_warn_other_kernels` once the first new row says which ran: they are read
    after a replicate, when its libraries are loaded. ``simulate_one``: the study's, whose
    code counts where it lies outside the code folders (:func:`_outside_study`)."""
    from clairstat import __version__

    current = (__version__, code_provenance() + ("" if simulate_one is None else
                                                 _outside_study(simulate_one)),
               threads_per_task)
    rows = read_rows(path)
    others = sorted({(row.get("clairstat_version"), row.get("code_commit"),
                      row.get("threads_per_task")) for row in rows} - {current},
                    key=str)
    if others:
        shown = "; ".join(f"{version} at {commit or 'an unrecorded commit'} on "
                          f"{threads or 'an unrecorded number of'} threads"
                          for version, commit, threads in others)
        warnings.warn(f"{path}: appending rows of clairstat {current[0]} at "
                      f"{current[1] or 'an unrecorded commit'} on {threads_per_task} "
                      f"threads to rows written otherwise ({shown}); the table will mix "
                      "them. Delete it (or use another --results-dir) to rerun it on one "
                      "code.", stacklevel=3)
    return {row.get("blas_kernels") for row in rows}


def _warn_other_kernels(path, existing, kernels):
    """Warn when the table's rows name other BLAS kernels than the replicate just run
    (``existing``, the rows' kernels before this run): the same code and seed differ in
    their last bits under another kernel (a resume on another CPU type, or with
    ``OPENBLAS_CORETYPE`` set), so the table would mix two roundings (a review: a resume
    on another machine type appended its rows silently). Only the run's first new row
    is compared: the workers of a Dask cluster of mixed CPU types still mix their rows
    without a word (each row's ``blas_kernels`` says which ran)."""
    others = existing - {kernels}
    known = sorted(str(kernel) for kernel in others if kernel)
    if known:
        warnings.warn(f"{path}: appending rows computed with the BLAS kernels "
                      f"{kernels or 'unrecorded'} to rows computed with "
                      f"{'; '.join(known)}; values that are rounding over rounding will "
                      "differ in their last bits between them. Delete the table (or use "
                      "another --results-dir) to rerun it on one machine type.",
                      stacklevel=4)  # the caller of run_study
    elif others:  # rows written before the column: whether they differ is not known
        warnings.warn(f"{path}: appending rows computed with the BLAS kernels "
                      f"{kernels or 'unrecorded'} to rows that do not record theirs; if "
                      "those ran on another machine type, values that are rounding over "
                      "rounding may differ in their last bits.", stacklevel=4)


def _execute(study, scale, todo, handle, n_jobs, threads_per_task, progress, control=None,
             run=None, existing_kernels=frozenset()):
    """Run ``todo`` through joblib and append each row as soon as its replicate is done;
    ``existing_kernels`` (:func:`_warn_other_code`) are checked against the first one's
    (:func:`_warn_other_kernels`)."""
    from joblib import Parallel, delayed
    from tqdm.auto import tqdm

    total = len(study.tasks(scale))
    by_key = {(task[0], task[1]): task for task in todo}
    runner = Parallel(n_jobs=n_jobs, return_as="generator_unordered")
    results = runner(delayed(_run_task)(study.simulate_one, *task, threads_per_task, control,
                                        run) for task in todo)
    with tqdm(total=total, initial=total - len(todo), desc=f"{study.name}[{scale}]",
              disable=not progress, unit="rep") as bar:
        for cell, rep, measured, elapsed, provenance in results:
            if existing_kernels:
                _warn_other_kernels(getattr(handle, "name", "the table"),
                                    set(existing_kernels), provenance[2])
                existing_kernels = frozenset()  # once per run: the first row tells
            _, _, params, seed = by_key[(cell, rep)]
            _append_row(handle, _make_row(study, cell, rep, params, seed, measured, elapsed,
                                          provenance, control))
            bar.update(1)


# The code this process loaded: read now, so that an edit made before the first run of a
# long-lived process is seen as one (_refuse_changed_code), and the label its rows carry
# (code_provenance, cached): read when a worker's first replicate ended, it named an edit
# made during that replicate, which the replicate had not run (a review).
_loaded_code_state()
code_provenance()

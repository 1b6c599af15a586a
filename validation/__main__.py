"""``python -m validation --scale smoke|small|full``: run the studies, check the claims.

Runs every study a check needs at the scale (finished replicates are reused), applies
every check, prints the verdicts, writes ``report.json`` and ``REPORT.md`` and exits 1 if
a check errors or fails without a documented cause.

Where the report goes (unless ``--output-dir`` says otherwise): ``validation/`` for
``small`` (the committed report), ``validation/full/`` for ``full``, and a git-ignored
scratch directory, ``validation/scratch/smoke/``, for ``smoke``. A report is never
written over one of another scale or control, nor into the committed reports' folders
(the default of ``small`` and ``full``, and of their controls) from a subset of the
checks (``--checks``) or from tables outside ``simulations/results`` (``--results-dir``);
``--force`` to do it anyway.

The report records, per table it read, the ``code_commit`` values of its rows, and warns
when a table's rows come from more than one, or from uncommitted code. An unusable input
is one line on stderr and exit status 2; an interrupt writes no report (status 130).

``--control NAME`` runs the same checks on a deliberately broken method
(``simulations._controls``): the studies that implement the control run their broken
variant into ``RESULTS_DIR/controls/NAME/``, the others are read as they are, and the
run exits 0 only when every check the control targets fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

from simulations import (CONTROLS, SCALES, RunError, default_results_dir, get_control,
                         get_study, load_results, run_study)
from simulations._cli import (UsageError, check_directory, interrupted, nonzero_int,
                              refuse, sigterm_as_interrupt)
from simulations._controls import tables_dir
from simulations._framework import CODE_FOLDERS, pending_tasks, read_rows, results_path

from ._core import all_checks, is_blocking, run_check
from ._report import markdown_table, write_report

# --help shows the docstring in plain words, without reStructuredText's literal marks.
ROOT_NOTE = ("Run it from the repository root: simulations/, validation/ and paper/ are\n"
             "folders of the checkout, not installed with clairstat.")

HERE = Path(__file__).resolve().parent
PROG = "python -m validation"
#: What a report depends on: the rows' code and the checks.
REPORT_CODE_FOLDERS = (*CODE_FOLDERS, "validation")


def build_parser():
    """The argument parser of ``python -m validation``."""
    parser = argparse.ArgumentParser(prog=PROG,
                                     description=__doc__.replace("``", ""), epilog=ROOT_NOTE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=SCALES, default="smoke",
                        help="grid size: smoke (seconds), small (minutes), full (a cluster); "
                             "default smoke")
    parser.add_argument("--n-jobs", type=nonzero_int, default=1,
                        help="parallel workers (default 1; -1: all cores)")
    parser.add_argument("--backend", choices=("loky", "dask"), default="loky",
                        help="dask: a LocalCluster of --n-jobs processes, or the cluster "
                             "at --scheduler")
    parser.add_argument("--scheduler", default=None,
                        help="Dask scheduler address (with --backend dask)")
    parser.add_argument("--control", choices=sorted(CONTROLS), default=None,
                        help="run the checks on a deliberately broken method")
    parser.add_argument("--results-dir", default=None,
                        help="results root (default simulations/results)")
    parser.add_argument("--output-dir", default=None,
                        help="where REPORT.md and report.json go (default: see above)")
    parser.add_argument("--force", action="store_true",
                        help="write over a report of another scale or control, or a "
                             "committed report from --checks or --results-dir")
    parser.add_argument("--checks", nargs="*", default=None,
                        help="only these checks (names); default all")
    parser.add_argument("--no-run", action="store_true",
                        help="check the saved tables without running missing replicates")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def default_output_dir(scale, control=None):
    """``validation/`` (small), ``validation/full/`` or the scratch directory (smoke);
    a control's report goes to ``controls/NAME/`` below it."""
    base = {"smoke": HERE / "scratch" / "smoke", "small": HERE, "full": HERE / "full"}[scale]
    return base / "controls" / control if control else base


def committed_output_dirs():
    """The committed reports' folders: the default output of ``small`` and ``full``, and
    of every control at those scales (resolved paths)."""
    return {default_output_dir(scale, control).resolve() for scale in ("small", "full")
            for control in (None, *CONTROLS)}


def _guard_output(output_dir, scale, control, force):
    """Refuse to overwrite a report of another scale or control (committed reports)."""
    existing = Path(output_dir) / "report.json"
    if force or not existing.exists():
        return
    try:
        meta = json.loads(existing.read_text()).get("meta", {})
    except (OSError, ValueError):
        return
    if meta.get("scale") != scale or meta.get("control") != control:
        raise UsageError(f"{existing} holds a report of scale {meta.get('scale')!r}, control "
                         f"{meta.get('control')!r}; not overwriting it with scale {scale!r}, "
                         f"control {control!r} (use --output-dir or --force).")


def _guard_committed(output_dir, args, checks):
    """Refuse to replace a committed report with one of part of the checks, or of tables
    other than the committed ones (a scratch run), without ``--force``."""
    if args.force or Path(output_dir).resolve() not in committed_output_dirs():
        return
    reasons = []
    n_all = len(all_checks())
    if len(checks) < n_all:
        reasons.append(f"{len(checks)} of the {n_all} checks (--checks)")
    if args.results_dir is not None and \
            Path(args.results_dir).resolve() != default_results_dir().resolve():
        reasons.append(f"the tables of --results-dir {args.results_dir}")
    if reasons:
        raise UsageError(f"{output_dir} is a committed report's folder: not replacing it "
                         f"with a report of {' and of '.join(reasons)} (use --output-dir, "
                         f"or --force).")


def _selected_checks(names):
    checks = all_checks()
    if names is not None and not names:  # "--checks" and no name: not "all of them"
        raise UsageError("--checks names no check")
    if names:
        unknown = set(names) - {check.name for check in checks}
        if unknown:
            raise UsageError(f"unknown checks: {', '.join(sorted(unknown))}")
        checks = [check for check in checks if check.name in names]
    return checks


def _run_studies(study_names, args):
    """Run (or complete) every study a check needs; return its current-grid tables.

    Under a control, a study implementing it runs its broken variant into the control's
    results root; the others are unchanged by the control and are read as they are.
    """
    tables = {}
    for name in study_names:
        study = get_study(name)
        control = args.control if args.control in study.controls else None
        # refuses a directory of another control's tables (its CONTROL file)
        root = tables_dir(control, args.results_dir)
        if not args.no_run:
            run_study(study, args.scale, n_jobs=args.n_jobs, backend=args.backend,
                      scheduler=args.scheduler, results_dir=args.results_dir,
                      progress=not args.no_progress, control=control)
        else:
            _check_complete(study, args.scale, root)
        _check_control(study, args.scale, control, root)
        tables[name] = load_results(study, args.scale, root, current_only=True)
    return tables


def _check_control(study, scale, control, root):
    """Rows that say which control produced them (the ``control`` key, written since
    2026-12-06: ``null`` for the method itself; older rows lack it and say nothing) must
    name the control this run applies to the study: a review copied a control's table
    among the method's and validated it as theirs."""
    found = {row["control"] for row in read_rows(results_path(study.name, scale, root))
             if "control" in row}
    wrong = sorted(found - {control}, key=str)
    if wrong:
        def name(value):
            return f"control {value!r}" if value else "the method"
        raise UsageError(f"the {scale} table of {study.name} in {root} holds rows of "
                         f"{' and '.join(name(value) for value in wrong)}, not of "
                         f"{name(control)}")


def _check_complete(study, scale, root):
    """With ``--no-run``: a table that lacks replicates of its scale's grid is an error
    at ``small`` and ``full`` (their checks read the grid's largest sizes and counts from
    the rows: a review validated D1 at K = 160 from a full table without its K = 320
    rows, a pass with no warning), a warning at ``smoke``."""
    missing = len(pending_tasks(study, scale, root))
    if not missing:
        return
    message = (f"the {scale} table of {study.name} in {root} lacks {missing} of its "
               f"{len(study.tasks(scale))} replicates")
    if scale == "smoke":
        print(f"warning: {message}", file=sys.stderr)
        return
    raise UsageError(f"{message}: run without --no-run to complete it.")


def _provenance(fresh=False):
    """The checkout's commit, and whether ``clairstat/``, ``simulations/`` or
    ``validation/`` differ from it (:func:`simulations._framework.code_provenance`):
    results depend on the estimator's code and the checks, not only on a version
    string. Cached from the first call (the code this process loaded) unless
    ``fresh``: the code on disk now."""
    from simulations._framework import code_provenance

    read = code_provenance.__wrapped__ if fresh else code_provenance
    return read(REPORT_CODE_FOLDERS)


def _code_content():
    """The content of the report's code folders (:func:`simulations._framework.
    _code_state`: a digest of their Python files, whatever the commit): a commit that
    leaves the files as they were is no change of the code."""
    from simulations._framework import _code_state

    return _code_state(REPORT_CODE_FOLDERS)


def table_commits(tables):
    """Per table read, the distinct ``code_commit`` values of its rows.

    Parameters
    ----------
    tables : dict of str to pandas.DataFrame

    Returns
    -------
    dict of str to list
        Sorted values; ``None`` stands for rows without the column (written before it
        existed).
    """
    commits = {}
    for name, table in tables.items():
        if "code_commit" in table:
            values = {value if isinstance(value, str) else None
                      for value in table["code_commit"]}
        else:
            values = {None} if len(table) else set()
        commits[name] = sorted(values, key=lambda value: (value is not None, value or ""))
    return commits


def provenance_warnings(commits):
    """Warnings about the rows' code: a table whose rows come from more than one
    ``code_commit`` (a run resumed after a change, or tables merged), or from code that
    was not a commit (uncommitted changes, clairstat imported from elsewhere)."""
    warnings = []
    for name, values in commits.items():
        shown = "; ".join("not recorded" if value is None else value for value in values)
        if len(values) > 1:
            warnings.append(f"table {name}: its rows were written by {len(values)} versions "
                            f"of the code ({shown}); rerun it on one")
        for value in values:
            if value is not None and " " in value.strip():  # a note after the hash
                warnings.append(f"table {name}: rows written by code that is not a commit "
                                f"({value})")
    return warnings


def _tally(rows, kind):
    mine = [row for row in rows if row.get("kind") == kind]
    counts = {verdict: sum(row["verdict"] == verdict for row in mine)
              for verdict in ("pass", "inconclusive", "fail", "error")}
    return {"total": len(mine), **counts}


def _compute(tables):
    """Replicate-seconds per study (sum of ``elapsed_s``): the compute the tables cost."""
    return {name: round(float(table["elapsed_s"].sum()), 1) if "elapsed_s" in table else 0.0
            for name, table in tables.items()}


def _summary(rows, tables, args, started, start, argv, commit=None, content=None):
    """The report's header: scale, control, version, timing, replicates and tallies;
    ``commit`` and ``content`` are the code's label and content read when the run
    started (:func:`_provenance`, :func:`_code_content`; read now if not given)."""
    from clairstat import __version__

    commit = _provenance() if commit is None else commit
    changed = content is not None and _code_content() != content

    control = get_control(args.control)
    meta = {"scale": args.scale, "control": args.control,
            "command": " ".join(["python -m validation", *argv]),
            "clairstat_version": __version__, "commit": commit,
            "started": started.strftime("%Y-%m-%d %H:%M UTC"),
            "replicates": {name: len(table) for name, table in tables.items()},
            "replicate_seconds": _compute(tables),
            "table_versions": sorted({str(v) for table in tables.values()
                                      if "clairstat_version" in table
                                      for v in table["clairstat_version"].unique()}),
            "table_commits": table_commits(tables),
            "wall_time_s": time.perf_counter() - start,
            "theory": _tally(rows, "theory"), "identity": _tally(rows, "identity"),
            "n_pass": sum(row["verdict"] == "pass" for row in rows),
            "n_known_failures": sum(row["verdict"] == "fail" and bool(row["known_failure"])
                                    and not row.get("known_failure_mismatch")
                                    for row in rows),
            "stale_known_failures": [row["name"] for row in rows
                                     if row.get("stale_known_failure")],
            "blocking": [row["name"] for row in rows if is_blocking(row, args.scale)],
            # what would block at small or full scale but not at smoke
            "smoke_theory_failures": [row["name"] for row in rows if is_blocking(row)
                                      and not is_blocking(row, args.scale)]}
    meta["provenance_warnings"] = provenance_warnings(meta["table_commits"])
    if changed:
        meta["provenance_warnings"].append(
            f"the code in {', '.join(REPORT_CODE_FOLDERS)} changed on disk while the "
            f"checks ran (now {_provenance(fresh=True)}): the report names the code at "
            f"the start ({commit}), which this process ran; rerun it on one code")
    if control is not None:
        by_name = {row["name"]: row for row in rows}
        targets = [name for name in control.targets if name in by_name]
        meta.update(control_description=control.description, control_targets=targets,
                    control_targets_not_failing=[name for name in targets
                                                 if by_name[name]["verdict"] != "fail"])
    return meta


def main(argv=None):
    """Run, check, report.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name (default ``sys.argv[1:]``).

    Returns
    -------
    int
        0 unless a check errors or fails unexplained (1); under ``--control``, 0 only
        when every targeted check fails. 2 for an unusable input, 130 when interrupted
        (no report is written then).
    """
    args = build_parser().parse_args(argv)  # bad usage: argparse's message, status 2
    written = []  # the report's paths, once it is in place
    try:
        with sigterm_as_interrupt():
            return _validate(args, list(sys.argv[1:] if argv is None else argv), written)
    except (UsageError, RunError) as error:
        return refuse(PROG, error)
    except KeyboardInterrupt:
        # an interrupt after the report was written said "no report written" (a review)
        return interrupted(PROG, f"; the report was written ({written[-1]})" if written
                           else "; no report written (the finished replicates are kept)")


def _validate(args, argv, written=None):
    """The command, once its arguments are parsed; bad input raises :class:`UsageError`.
    ``written`` (a list) receives the report's paths once it is in place."""
    start, started = time.perf_counter(), datetime.datetime.now(datetime.timezone.utc)
    # the code's label when the run starts, the code this process runs: read at the end,
    # it named an edit made while the checks ran (a review); a change of the files'
    # content (not a commit that leaves them as they were) is a warning
    commit, content = _provenance(), _code_content()
    if args.scheduler and args.backend != "dask":
        raise UsageError("--scheduler needs --backend dask")
    check_directory("--results-dir", args.results_dir, must_exist=args.no_run)
    check_directory("--output-dir", args.output_dir)
    output_dir = args.output_dir or default_output_dir(args.scale, args.control)
    _guard_output(output_dir, args.scale, args.control, args.force)
    checks = _selected_checks(args.checks)
    _guard_committed(output_dir, args, checks)
    tables_dir(args.control, args.results_dir)  # not a directory of another control's tables
    tables = _run_studies(sorted({check.study for check in checks}), args)
    rows = [run_check(check, tables[check.study]) for check in checks]
    meta = _summary(rows, tables, args, started, start, argv, commit, content)
    print(markdown_table(rows))
    for warning in meta["provenance_warnings"]:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    paths = write_report(rows, meta, output_dir, written)
    theory, identity = meta["theory"], meta["identity"]
    print(f"theory checks: {theory['pass']} pass, {theory['inconclusive']} inconclusive, "
          f"{theory['fail']} fail of {theory['total']}; identity checks: {identity['pass']} "
          f"of {identity['total']} pass; report: {paths[1]}")
    if args.control:
        missed = meta["control_targets_not_failing"]
        print(f"control {args.control}: {len(meta['control_targets']) - len(missed)} of "
              f"{len(meta['control_targets'])} targeted checks fail"
              + (f"; NOT failing: {', '.join(missed)}" if missed else ""))
        errors = [row["name"] for row in rows if row["verdict"] == "error"]
        return 1 if missed or errors or not meta["control_targets"] else 0
    if meta["smoke_theory_failures"]:
        print(f"{PROG}: note: theory checks failing at smoke scale, which does not block "
              f"(its sizes test the wiring, not the theory): "
              f"{', '.join(meta['smoke_theory_failures'])}", file=sys.stderr)
    if meta["blocking"]:
        print(f"FAILED (unexplained or errors): {', '.join(meta['blocking'])}",
              file=sys.stderr)
    return 1 if meta["blocking"] else 0


if __name__ == "__main__":
    sys.exit(main())

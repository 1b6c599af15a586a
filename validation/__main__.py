"""``python -m validation --scale smoke|small|full``: run the studies, check the claims.

Runs every study a check needs at the scale (finished replicates are reused), applies
every check, prints the verdicts, writes ``report.json`` and ``REPORT.md`` and exits 1 if
a check errors or fails without a documented cause.

Where the report goes (unless ``--output-dir`` says otherwise): ``validation/`` for
``small`` (the committed report), ``validation/full/`` for ``full``, and a git-ignored
scratch directory, ``validation/scratch/smoke/``, for ``smoke``. A report is never
written over one of another scale or control (``--force`` to do it anyway).

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

from simulations import (CONTROLS, SCALES, control_results_dir, get_control, get_study,
                         load_results, run_study)

from ._core import all_checks, is_blocking, run_check
from ._report import markdown_table, write_report

# --help shows the docstring in plain words, without reStructuredText's literal marks.
ROOT_NOTE = ("Run it from the repository root: simulations/, validation/ and paper/ are\n"
             "folders of the checkout, not installed with clairstat.")

HERE = Path(__file__).resolve().parent


def build_parser():
    """The argument parser of ``python -m validation``."""
    parser = argparse.ArgumentParser(prog="python -m validation",
                                     description=__doc__.replace("``", ""), epilog=ROOT_NOTE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=SCALES, default="smoke",
                        help="grid size: smoke (seconds), small (minutes), full (a cluster); "
                             "default smoke")
    parser.add_argument("--n-jobs", type=int, default=1,
                        help="parallel workers (default 1; -1: all cores)")
    parser.add_argument("--backend", choices=("loky", "dask"), default="loky",
                        help="dask: a LocalCluster of --n-jobs processes, or the cluster "
                             "at --scheduler")
    parser.add_argument("--scheduler", default=None)
    parser.add_argument("--control", choices=sorted(CONTROLS), default=None,
                        help="run the checks on a deliberately broken method")
    parser.add_argument("--results-dir", default=None,
                        help="results root (default simulations/results)")
    parser.add_argument("--output-dir", default=None,
                        help="where REPORT.md and report.json go (default: see above)")
    parser.add_argument("--force", action="store_true",
                        help="write over a report of another scale or control")
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
        raise SystemExit(f"{existing} holds a report of scale {meta.get('scale')!r}, control "
                         f"{meta.get('control')!r}; not overwriting it with scale {scale!r}, "
                         f"control {control!r} (use --output-dir or --force).")


def _selected_checks(names):
    checks = all_checks()
    if names:
        unknown = set(names) - {check.name for check in checks}
        if unknown:
            raise SystemExit(f"unknown checks: {sorted(unknown)}")
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
        root = (control_results_dir(control, args.results_dir) if control
                else args.results_dir)
        if not args.no_run:
            run_study(study, args.scale, n_jobs=args.n_jobs, backend=args.backend,
                      scheduler=args.scheduler, results_dir=args.results_dir,
                      progress=not args.no_progress, control=control)
        tables[name] = load_results(study, args.scale, root, current_only=True)
    return tables


def _provenance():
    """The checkout's commit, and whether ``clairstat/`` or ``simulations/`` differ from it
    (:func:`simulations.code_provenance`): results depend on the estimator's code, not
    only on its version string."""
    from simulations._framework import code_provenance

    return code_provenance() or "unknown"


def _tally(rows, kind):
    mine = [row for row in rows if row.get("kind") == kind]
    counts = {verdict: sum(row["verdict"] == verdict for row in mine)
              for verdict in ("pass", "inconclusive", "fail", "error")}
    return {"total": len(mine), **counts}


def _compute(tables):
    """Replicate-seconds per study (sum of ``elapsed_s``): the compute the tables cost."""
    return {name: round(float(table["elapsed_s"].sum()), 1) if "elapsed_s" in table else 0.0
            for name, table in tables.items()}


def _summary(rows, tables, args, started, start, argv):
    """The report's header: scale, control, version, timing, replicates and tallies."""
    from clairstat import __version__

    control = get_control(args.control)
    meta = {"scale": args.scale, "control": args.control,
            "command": " ".join(["python -m validation", *argv]),
            "clairstat_version": __version__, "commit": _provenance(),
            "started": started.strftime("%Y-%m-%d %H:%M UTC"),
            "replicates": {name: len(table) for name, table in tables.items()},
            "replicate_seconds": _compute(tables),
            "table_versions": sorted({str(v) for table in tables.values()
                                      if "clairstat_version" in table
                                      for v in table["clairstat_version"].unique()}),
            "wall_time_s": time.perf_counter() - start,
            "theory": _tally(rows, "theory"), "identity": _tally(rows, "identity"),
            "n_pass": sum(row["verdict"] == "pass" for row in rows),
            "n_known_failures": sum(row["verdict"] == "fail" and bool(row["known_failure"])
                                    and not row.get("known_failure_mismatch")
                                    for row in rows),
            "stale_known_failures": [row["name"] for row in rows
                                     if row.get("stale_known_failure")],
            "blocking": [row["name"] for row in rows if is_blocking(row)]}
    if control is not None:
        by_name = {row["name"]: row for row in rows}
        targets = [name for name in control.targets if name in by_name]
        meta.update(control_description=control.description, control_targets=targets,
                    control_targets_not_failing=[name for name in targets
                                                 if by_name[name]["verdict"] != "fail"])
    return meta


def main(argv=None):
    """Run, check, report. Exit status 0 unless a check errors or fails unexplained;
    under ``--control``, 0 only when every targeted check fails."""
    args = build_parser().parse_args(argv)
    start, started = time.perf_counter(), datetime.datetime.now(datetime.timezone.utc)
    output_dir = args.output_dir or default_output_dir(args.scale, args.control)
    _guard_output(output_dir, args.scale, args.control, args.force)
    checks = _selected_checks(args.checks)
    tables = _run_studies(sorted({check.study for check in checks}), args)
    rows = [run_check(check, tables[check.study]) for check in checks]
    meta = _summary(rows, tables, args, started, start,
                    list(sys.argv[1:] if argv is None else argv))
    print(markdown_table(rows))
    paths = write_report(rows, meta, output_dir)
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
    if meta["blocking"]:
        print(f"FAILED (unexplained or errors): {', '.join(meta['blocking'])}",
              file=sys.stderr)
    return 1 if meta["blocking"] else 0


if __name__ == "__main__":
    sys.exit(main())

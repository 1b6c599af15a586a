"""``python -m validation --scale smoke|small|full``: run the studies, check the claims.

Runs every study a check needs at the scale (finished replicates are reused), applies
every check, prints the verdicts, writes ``report.json`` and ``REPORT.md`` (into
``validation/`` unless ``--output-dir`` says otherwise) and exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from pathlib import Path

from simulations import SCALES, get_study, load_results, run_study

from ._core import all_checks, is_blocking, run_check
from ._report import markdown_table, write_report


def build_parser():
    """The argument parser of ``python -m validation``."""
    parser = argparse.ArgumentParser(prog="python -m validation", description=__doc__)
    parser.add_argument("--scale", choices=SCALES, default="smoke")
    parser.add_argument("--n-jobs", type=int, default=1)
    parser.add_argument("--backend", choices=("loky", "dask"), default="loky")
    parser.add_argument("--scheduler", default=None)
    parser.add_argument("--results-dir", default=None,
                        help="results root (default simulations/results)")
    parser.add_argument("--output-dir", default=None,
                        help="where REPORT.md and report.json go (default validation/)")
    parser.add_argument("--checks", nargs="*", default=None,
                        help="only these checks (names); default all")
    parser.add_argument("--no-run", action="store_true",
                        help="check the saved tables without running missing replicates")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _selected_checks(names):
    checks = all_checks()
    if names:
        unknown = set(names) - {check.name for check in checks}
        if unknown:
            raise SystemExit(f"unknown checks: {sorted(unknown)}")
        checks = [check for check in checks if check.name in names]
    return checks


def _run_studies(study_names, args):
    """Run (or complete) every study a check needs; return its current-grid tables."""
    tables = {}
    for name in study_names:
        study = get_study(name)
        if not args.no_run:
            run_study(study, args.scale, n_jobs=args.n_jobs, backend=args.backend,
                      scheduler=args.scheduler, results_dir=args.results_dir,
                      progress=not args.no_progress)
        tables[name] = load_results(study, args.scale, args.results_dir, current_only=True)
    return tables


def _provenance():
    """The checkout's commit, and whether ``clairstat/`` differs from it (read-only git).

    Results depend on the estimator's code, not only on its version string: a report
    made from an uncommitted ``clairstat/`` says so.
    """
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no",
                                "clairstat"], cwd=root, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" with uncommitted changes in clairstat/" if dirty else "")


def _summary(rows, tables, scale, started, start):
    """The report's header: scale, version, timing, replicate counts and tallies."""
    from clairstat import __version__

    return {"scale": scale, "clairstat_version": __version__, "commit": _provenance(),
            "started": started.strftime("%Y-%m-%d %H:%M UTC"),
            "replicates": {name: len(table) for name, table in tables.items()},
            "wall_time_s": time.perf_counter() - start,
            "n_pass": sum(row["verdict"] == "pass" for row in rows),
            "n_known_failures": sum(row["verdict"] == "fail" and bool(row["known_failure"])
                                    for row in rows),
            "blocking": [row["name"] for row in rows if is_blocking(row)]}


def main(argv=None):
    """Run, check, report; 0 unless a check errors or fails without a documented cause."""
    args = build_parser().parse_args(argv)
    start, started = time.perf_counter(), datetime.datetime.now(datetime.timezone.utc)
    checks = _selected_checks(args.checks)
    tables = _run_studies(sorted({check.study for check in checks}), args)
    rows = [run_check(check, tables[check.study]) for check in checks]
    meta = _summary(rows, tables, args.scale, started, start)
    print(markdown_table(rows))
    paths = write_report(rows, meta, args.output_dir or Path(__file__).resolve().parent)
    print(f"{meta['n_pass']}/{len(rows)} checks pass, {meta['n_known_failures']} known "
          f"failures (explained in validation/README.md); report: {paths[1]}")
    if meta["blocking"]:
        print(f"FAILED (unexplained or errors): {', '.join(meta['blocking'])}",
              file=sys.stderr)
    return 1 if meta["blocking"] else 0


if __name__ == "__main__":
    sys.exit(main())

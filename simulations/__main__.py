"""Command line: ``python -m simulations STUDY --scale smoke|small|full [options]``.

``python -m simulations list`` lists the studies (the copying experiment is the study
``copying``, its sweep ``copying_sweep``). An unusable input (an unknown study, a scale it
declares no grid for, a control the study does not implement, a results directory that
is a file, cannot be written or holds another control's tables, a table another run is
writing, an unreachable scheduler) is one line on stderr and exit status 2; an interrupt
keeps the finished replicates (status 130).
"""

from __future__ import annotations

import argparse
import sys

from ._cli import (UsageError, check_directory, interrupted, nonzero_int, positive_int,
                   refuse, sigterm_as_interrupt)
from ._controls import CONTROLS, control_results_dir
from ._framework import SCALES, RunError, Study, results_path, run_study, verify_table
from .studies import available_studies, get_study

PROG = "python -m simulations"

# --help shows the docstring in plain words, without reStructuredText's literal marks.
ROOT_NOTE = ("Run it from the repository root: simulations/, validation/ and paper/ are\n"
             "folders of the checkout, not installed with clairstat.")


def build_parser():
    """The argument parser of ``python -m simulations``."""
    parser = argparse.ArgumentParser(prog=PROG,
                                     description=__doc__.replace("``", ""), epilog=ROOT_NOTE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="study name, 'list', or 'module:ATTRIBUTE'")
    parser.add_argument("--scale", choices=SCALES, default="smoke",
                        help="grid size: smoke (seconds), small (minutes), full (a cluster); "
                             "default smoke")
    parser.add_argument("--n-jobs", type=nonzero_int, default=1,
                        help="parallel joblib workers (default 1; -1: all cores)")
    parser.add_argument("--backend", choices=("loky", "dask"), default="loky")
    parser.add_argument("--scheduler", default=None,
                        help="Dask scheduler address, e.g. tcp://host:8786 (with --backend "
                             "dask; without it a LocalCluster of --n-jobs processes runs)")
    parser.add_argument("--results-dir", default=None,
                        help="results root (default simulations/results)")
    parser.add_argument("--threads-per-task", type=positive_int, default=1,
                        help="BLAS/OpenMP/torch threads per replicate (default 1)")
    parser.add_argument("--control", default=None, choices=sorted(CONTROLS),
                        help="run a negative control (simulations._controls) instead; its "
                             "rows go to RESULTS_DIR/controls/NAME/")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--verify", type=positive_int, default=None, metavar="N",
                        help="run nothing: rerun replicate 0 of up to N cells of the stored "
                             "table from their seeds and list the values the current code "
                             "no longer reproduces (exit 1 if any)")
    return parser


def _kernels_note(study, args, mismatches):
    """Which BLAS kernels wrote the differing rows, and which reran them: a difference
    in the last bits under another kernel is the arithmetic's, not the method's."""
    from ._controls import tables_dir
    from ._framework import blas_kernels, read_rows

    differing = {(m["cell"], m["replicate"]) for m in mismatches}
    path = results_path(study.name, args.scale, tables_dir(args.control, args.results_dir))
    written = sorted({str(row.get("blas_kernels", "not recorded"))
                      for row in read_rows(path)
                      if (row.get("cell"), row.get("replicate")) in differing})
    return (f"BLAS kernels of the differing rows: {'; '.join(written)}; of this rerun: "
            f"{blas_kernels()}")


def main(argv=None):
    """Run one study.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name (default ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status: 0; 1 when ``--verify`` finds a difference or nothing to verify; 2
        for an unusable input; 130 when interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)  # bad usage: argparse's message, status 2
    try:
        with sigterm_as_interrupt():
            return _run(args)
    except (UsageError, RunError) as error:
        return refuse(PROG, error)
    except KeyboardInterrupt:
        return interrupted(PROG, "; the finished replicates are kept (the same command "
                                 "resumes)")


def _study(name):
    """The study ``name`` (or at the import path ``module:ATTRIBUTE``); an unknown one is
    a :class:`UsageError`, an error inside an existing module is not."""
    module, _, attribute = name.partition(":")
    try:
        study = get_study(name)
    except KeyError as error:
        # only get_study's own "unknown study": a KeyError raised while a study module
        # is imported (a bug in it) propagates, and so does one from available_studies
        if ":" not in name and name not in available_studies():
            raise UsageError(error.args[0]) from None
        raise
    except ModuleNotFoundError as error:
        if ":" in name and error.name and (module + ".").startswith(error.name + "."):
            raise UsageError(f"unknown study {name!r}: no module {error.name!r}") from None
        raise
    except AttributeError as error:
        if ":" in name and error.name == (attribute or "STUDY") and \
                getattr(error.obj, "__name__", None) == module:
            raise UsageError(f"unknown study {name!r}: module {module!r} has no "
                             f"{error.name!r}") from None
        raise
    if not isinstance(study, Study):  # "os:path" read .grids off a module (a review)
        raise UsageError(f"{name!r} is a {type(study).__name__}, not a Study")
    return study


def _run(args):
    """The command, once its arguments are parsed; bad input raises :class:`UsageError`."""
    if args.scheduler and args.backend != "dask":
        raise UsageError("--scheduler needs --backend dask")
    if args.study == "list":
        for name, study in sorted(available_studies().items()):
            print(f"{name:14s} {study.description}")
        return 0
    study = _study(args.study)
    if args.scale not in study.grids or args.scale not in study.replicates:
        missing = "grid" if args.scale not in study.grids else "replicate count"
        raise UsageError(f"study {study.name!r} declares no {missing} for scale "
                         f"{args.scale!r}")
    if args.control is not None and args.control not in study.controls:
        raise UsageError(f"study {study.name!r} does not implement the control "
                         f"{args.control!r} (it declares "
                         f"{', '.join(study.controls) or 'none'})")
    # --verify reads the tables: they must be there
    check_directory("--results-dir", args.results_dir, must_exist=args.verify is not None)
    if args.verify is not None:
        checked, mismatches = verify_table(study, args.scale, max_rows=args.verify,
                                           results_dir=args.results_dir,
                                           control=args.control)
        for item in mismatches:
            print(f"  cell {item['cell']} replicate {item['replicate']} {item['column']}: "
                  f"stored {item['stored']!r}, rerun {item['rerun']!r}")
        rows = len({(m["cell"], m["replicate"]) for m in mismatches})
        print(f"{study.name}[{args.scale}]: {checked} replicates rerun, {rows} differ "
              f"from the stored table")
        if mismatches:
            print(_kernels_note(study, args, mismatches))
        if checked == 0:
            print("nothing to verify: no stored replicate of the current grid was found",
                  file=sys.stderr)
            return 1
        return 1 if mismatches else 0
    n_new = run_study(study, args.scale, n_jobs=args.n_jobs, backend=args.backend,
                      scheduler=args.scheduler, results_dir=args.results_dir,
                      progress=not args.no_progress,
                      threads_per_task=args.threads_per_task, control=args.control)
    root = (control_results_dir(args.control, args.results_dir) if args.control
            else args.results_dir)
    print(f"{study.name}[{args.scale}]: {n_new} new replicates -> "
          f"{results_path(study.name, args.scale, root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

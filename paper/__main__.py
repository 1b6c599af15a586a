"""``python -m paper [--scale small] [--tex] [--pdf]``: figures, tables and the manuscript.

Runs ``main(results_dir, out_dir)`` of every script in ``paper/figures/`` on the tables
in ``simulations/results/<scale>/`` and copies the verdict table of
``validation/report.json`` (when it is of the same scale) beside the figures. With
``--tex`` it also writes the manuscript's macros and tables (``paper/generated/``) from
the committed result files; with ``--pdf`` it then builds ``paper/build/clairstat.pdf``
with latexmk (``make paper``). Nothing is simulated here: run
``python -m validation --scale SCALE`` (or ``python -m simulations``) first.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import traceback
from pathlib import Path

from ._common import PAPER_DIR, output_dir

# --help shows the docstring in plain words, without reStructuredText's literal marks.
ROOT_NOTE = ("Run it from the repository root: simulations/, validation/ and paper/ are\n"
             "folders of the checkout, not installed with clairstat.")


def figure_modules():
    """The figure scripts of ``paper/figures`` (module objects), by name."""
    from . import figures

    names = sorted(info.name for info in pkgutil.iter_modules(figures.__path__)
                   if not info.name.startswith("_"))
    return {name: importlib.import_module(f"{figures.__name__}.{name}") for name in names}


def write_verdict_table(report_json, out_dir, scale):
    """Copy the verdict table as Markdown if ``report_json`` is of ``scale``; its path."""
    from validation._report import markdown_table

    report_json = Path(report_json)
    if not report_json.exists():
        return None
    report = json.loads(report_json.read_text())
    if report["meta"].get("control"):  # a negative control's verdicts are the broken method's
        raise ValueError(f"{report_json} is the report of the negative control "
                         f"{report['meta']['control']!r}, not of the method: give the "
                         "method's report (default validation/report.json).")
    if report["meta"]["scale"] != scale:
        return None
    path = Path(out_dir) / "verdicts.md"
    path.write_text(markdown_table(report["checks"]) + "\n")
    return path


def _draw_all(results_dir, out_dir, only):
    """Run every figure script; a failing one is reported and does not stop the rest."""
    made, failed = [], []
    for name, module in figure_modules().items():
        if only and name not in only:
            continue
        try:
            made += [Path(p) for p in module.main(results_dir, out_dir)]
        except Exception:
            failed.append(name)
            traceback.print_exc()
    return made, failed


def main(argv=None):
    """Draw every figure and write the verdict table; 1 if a figure script failed."""
    from simulations import SCALES, default_results_dir

    parser = argparse.ArgumentParser(prog="python -m paper",
                                     description=__doc__.replace("``", ""), epilog=ROOT_NOTE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=SCALES, default="small")
    parser.add_argument("--results-dir", default=None, help="default simulations/results")
    parser.add_argument("--out-dir", default=None, help="default paper/figures_out/SCALE")
    parser.add_argument("--report", default=None, help="default validation/report.json")
    parser.add_argument("--only", nargs="*", default=None, help="only these figure scripts")
    parser.add_argument("--tex", action="store_true",
                        help="also write the manuscript's macros and tables")
    parser.add_argument("--pdf", action="store_true",
                        help="also build the PDF with latexmk (implies --tex)")
    parser.add_argument("--generated-dir", default=None, help="default paper/generated")
    parser.add_argument("--build-dir", default=None, help="default paper/build")
    args = parser.parse_args(argv)
    results = Path(args.results_dir or default_results_dir()) / args.scale
    out_dir = Path(args.out_dir or output_dir(args.scale))
    out_dir.mkdir(parents=True, exist_ok=True)
    made, failed = _draw_all(results, out_dir, args.only)
    report = args.report or PAPER_DIR.parent / "validation" / "report.json"
    try:
        table = write_verdict_table(report, out_dir, args.scale)
    except ValueError as error:
        print(f"python -m paper: error: {error}", file=sys.stderr)
        return 2
    for path in made + ([table] if table else []):
        print(path)
    if failed:
        print(f"figure scripts failed: {failed}", file=sys.stderr)
        return 1
    if args.tex or args.pdf:
        return _manuscript(args, out_dir)
    return 0


def _manuscript(args, figures_dir):
    """Write the generated macros and tables; build the PDF when asked. Exit status."""
    import subprocess

    from ._build import build_pdf
    from ._generate import write_generated

    generated = Path(args.generated_dir or PAPER_DIR / "generated")
    for path in write_generated(generated):
        print(path)
    if not args.pdf:
        return 0
    build_dir = Path(args.build_dir or PAPER_DIR / "build")
    try:
        print(build_pdf(build_dir, generated, figures_dir))
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 2
    except subprocess.CalledProcessError:
        print(f"LaTeX failed: see {build_dir / 'clairstat.log'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

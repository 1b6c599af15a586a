"""Shared pieces of the figure scripts: table loading, saving, and a standalone entry."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["load", "prepare", "save", "script_main", "output_dir"]

PAPER_DIR = Path(__file__).resolve().parent
PAPER_STYLE = {"font.size": 13, "axes.titlesize": 13, "axes.labelsize": 13,
               "figure.constrained_layout.use": True,
               "xtick.labelsize": 12, "ytick.labelsize": 12, "legend.fontsize": 11}


# Type for a 7-inch figure printed at 16 cm (scale 0.9): about 9 pt text, 8 pt ticks.
COLUMN_STYLE = {"font.size": 10, "axes.titlesize": 10, "axes.labelsize": 10,
                "xtick.labelsize": 9, "ytick.labelsize": 9, "legend.fontsize": 9}


def load(results_dir, study):
    """The results table ``<results_dir>/<study>.jsonl`` as a DataFrame (maybe empty).

    When ``results_dir`` is a scale's folder (``.../small``), only the rows of the
    study's current grid at that scale are kept, as the validation does.
    """
    from simulations import SCALES, get_study, load_results, load_table

    results_dir = Path(results_dir)
    if results_dir.name in SCALES:
        return load_results(get_study(study), results_dir.name, results_dir.parent,
                            current_only=True)
    return load_table(results_dir / f"{study}.jsonl")


def prepare(results_dir, study):
    """pyplot on the Agg backend and the study's table; an empty table is an error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The multi-panel figures are 9-15 inches wide and are printed at a 16 cm column
    # width (the manuscript): larger type keeps their labels legible there.
    plt.rcParams.update(PAPER_STYLE)
    table = load(results_dir, study)
    if table.empty:
        raise FileNotFoundError(f"no {study} results in {results_dir}")
    return plt, table


def output_dir(scale):
    """Where ``python -m paper --scale SCALE`` writes: ``paper/figures_out/<scale>``."""
    return PAPER_DIR / "figures_out" / scale


def save(fig, out_dir, name):
    """Save ``fig`` as ``<out_dir>/<name>.png`` (and .pdf), close it, return both paths."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    # TrueType (42), not Type 3, fonts in the PDFs: journals refuse Type 3 (a review)
    with plt.rc_context({"pdf.fonttype": 42}):
        for path in paths:
            # No creation date in the PDF: redrawing unchanged tables gives identical
            # files.
            metadata = {"CreationDate": None} if path.suffix == ".pdf" else None
            fig.savefig(path, dpi=150, bbox_inches="tight", metadata=metadata)
    plt.close(fig)
    return paths


def script_main(main, argv=None):
    """Standalone entry of a figure script: ``python paper/figures/X.py --scale small``."""
    from simulations import SCALES, default_results_dir

    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", choices=SCALES, default="small")
    parser.add_argument("--results-dir", default=None)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    root = Path(args.results_dir) if args.results_dir else default_results_dir()
    for path in main(root / args.scale, args.out_dir or output_dir(args.scale)):
        print(path)

"""Build the PDF: stage the manuscript, its generated files and figures, run latexmk.

The build directory is self-contained: ``clairstat.tex`` and ``references.bib`` are
copied into it with ``generated/`` (the macros and tables) and ``figures/`` (every PDF
the figure scripts wrote), so that a build in a scratch folder (the test) and
``make paper`` (``paper/build``) read exactly what was just written.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from ._common import PAPER_DIR

__all__ = ["MAIN", "stage", "build_pdf"]

MAIN = "clairstat"
SOURCES = (f"{MAIN}.tex", "references.bib")


def stage(build_dir, generated_dir, figures_dir):
    """Copy the manuscript, the generated files and the figure PDFs into ``build_dir``."""
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    for name in SOURCES:
        shutil.copy2(PAPER_DIR / name, build_dir / name)
    for sub, source, pattern in (("generated", generated_dir, "*.tex"),
                                 ("figures", figures_dir, "*.pdf")):
        target = build_dir / sub
        if target.exists():
            shutil.rmtree(target)  # no file of an earlier build survives
        target.mkdir()
        for path in Path(source).glob(pattern):
            shutil.copy2(path, target / path.name)
    return build_dir


def build_pdf(build_dir, generated_dir, figures_dir, timeout=600):
    """Stage and run latexmk (pdflatex, bibtex) in ``build_dir``; the PDF's path.

    Raises
    ------
    FileNotFoundError
        latexmk is not installed (see the README: Debian's TeX Live packages).
    subprocess.CalledProcessError
        LaTeX stopped on an error, e.g. an unknown ``\\res`` key; the log is in
        ``build_dir/clairstat.log``.
    """
    if shutil.which("latexmk") is None:
        raise FileNotFoundError("latexmk is not on PATH: install TeX Live (README, 'Paper')")
    build_dir = stage(build_dir, generated_dir, figures_dir)
    subprocess.run(["latexmk", "-pdf", "-interaction=nonstopmode", "-halt-on-error",
                    "-file-line-error", "-g", f"{MAIN}.tex"], cwd=build_dir, check=True,
                   stdout=subprocess.DEVNULL, timeout=timeout)
    return build_dir / f"{MAIN}.pdf"

"""Figure: the solver benchmark (``benchmarks/RESULTS.md``, solver table).

Wall time of the torch solver and of CVXPY+SCS against the size of the stacked matrix
(p x qK entries), log-log, both certified by the same relative duality gap. The benchmark
script prints Markdown only, so the committed table is parsed (``paper/_sources.py``);
without it the script draws nothing.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the repository importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import math

from paper._common import save, script_main
from paper._generate import solver_rows
from paper._sources import SOURCES

NAME = "solver"


def main(results_dir, out_dir):
    """Draw the figure from the committed benchmark table; return the written paths."""
    path = SOURCES["benchmarks"]
    rows = solver_rows(path.read_text()) if path.exists() else []
    if not rows:
        print(f"{NAME}: no solver table in {path.name}; nothing drawn")
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2), layout="constrained")
    size = [r["p"] * r["q"] * r["K"] for r in rows]
    ax.loglog(size, [r["torch s"] for r in rows], "o-", label="torch (FISTA)")
    both = [(s, r["CVXPY s"]) for s, r in zip(size, rows) if not math.isnan(r["CVXPY s"])]
    ax.loglog(*zip(*both), "s-", label="CVXPY + SCS")
    for s, r in zip(size, rows):
        ax.annotate(f"p={int(r['p'])}", (s, r["torch s"]), textcoords="offset points",
                    xytext=(-6, 6), fontsize=7)
    ax.set(xlabel=r"entries of the stacked matrix, $p\,qK$", ylabel="wall time (s)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return save(fig, out_dir, NAME)


if __name__ == "__main__":
    script_main(main)

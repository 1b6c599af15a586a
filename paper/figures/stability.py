"""Figure of study 2: stable recovery.

Median ``||P_hat - P*||_F`` (bars: quartiles) against K, one curve per (p, q, n) regime,
with a K^{-1/2} guide (the figure the claim asks for); side panels: against the noise
level sigma (guide: slope 1) and against the effective sample size n - p - 1
(guide: slope -1/2). The three panels share the error axis, so that the sweeps compare.

Drawn 7 inches wide, to be printed at the manuscript's column width (16 cm).
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the repository importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from paper._common import COLUMN_STYLE, prepare, save, script_main

STUDY = "stability"
PANELS = [("K", "n_clients", "number of clients K", -0.5, r"K^{-1/2}"),
          ("sigma", "sigma", r"noise s.d. $\sigma$ (response units)", 1.0, r"\sigma"),
          ("n", "effective_n", "effective sample size\nn - p - 1 (samples)", -0.5,
           r"(n-p-1)^{-1/2}")]


def _panel(ax, rows, x, label, exponent, guide):
    for (p, q), group in rows.groupby(["p", "q"]):
        stats = group.groupby(x)["subspace_error"].quantile([0.25, 0.5, 0.75]).unstack()
        n_base = int(group["n"].mode().iloc[0])
        # One label per (p, q) regime, the same in every panel: one shared legend.
        ax.errorbar(stats.index, stats[0.5], yerr=[stats[0.5] - stats[0.25],
                    stats[0.75] - stats[0.5]], marker="o", markersize=4, capsize=2,
                    label=f"p = {p}, q = {q}, n = {n_base}" if x != "effective_n" else None)
    xs = np.array(sorted(rows[x].unique()), dtype=float)
    anchor = rows.groupby(x)["subspace_error"].median().iloc[0]
    ax.plot(xs, anchor * (xs / xs[0]) ** exponent, "k--", linewidth=1,
            label="guide: slope in title" if x == "n_clients" else None)
    ax.set(xscale="log", yscale="log", xlabel=label, title=rf"guide $\propto {guide}$")
    if x != "effective_n":  # label the grid's own values, not log-scale minor ticks
        ax.set_xticks(xs, [f"{v:g}" for v in xs], minor=False)
        ax.set_xticks([], minor=True)
    else:  # n - p - 1 is not on a round grid: label 1, 2, 5 x 10^k
        _plain_log_ticks(ax.xaxis)


def _plain_log_ticks(axis):
    """Major ticks at 1, 2, 5 x 10^k written as plain numbers, minor ticks unlabelled."""
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def main(results_dir, out_dir):
    """Draw the figure from ``<results_dir>/stability.jsonl``; return the written paths."""
    plt, df = prepare(results_dir, STUDY)
    with plt.rc_context(COLUMN_STYLE):
        fig, axes = plt.subplots(1, 3, figsize=(7.0, 3.1), sharey=True,
                                 layout="constrained")
        for ax, (sweep, x, label, exponent, guide) in zip(axes, PANELS):
            _panel(ax, df[df["sweep"] == sweep], x, label, exponent, guide)
        axes[0].set_ylabel(r"subspace error $\|\hat P - P^*\|_F$")
        _plain_log_ticks(axes[0].yaxis)  # two decades shared: more than two labels
        handles, labels = axes[0].get_legend_handles_labels()
        handles, labels = handles[1:] + handles[:1], labels[1:] + labels[:1]  # guide last
        fig.legend(handles, labels, loc="outside upper center", ncols=2, frameon=False,
                   title="median and quartiles; n is swept in the right panel")
        return save(fig, out_dir, STUDY)


if __name__ == "__main__":
    script_main(main)

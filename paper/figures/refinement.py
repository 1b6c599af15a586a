"""Figure of study 4: refinement gain.

Per-client risk relative to local OLS (mean over replicates, bars: 95% t intervals)
against the benign heterogeneity h / h_star, for CLAIR, the oracle refinement (true P*
and C), plain averaging, and the oracle formula of docs/theory.md; one panel per
(n, gamma): rows n, columns gamma, axes shared so that the panels compare. Below 1 the
method beats local fitting; the formula crosses 1 at h_ratio = 1.

Drawn 7 inches wide, to be printed at the manuscript's column width (16 cm).
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the repository importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from itertools import product

import numpy as np
from matplotlib.ticker import FuncFormatter

from paper._common import COLUMN_STYLE, prepare, save, script_main
from validation import mean_interval

STUDY = "refinement"
SERIES = [("risk_clair", "CLAIR", "o-"), ("risk_oracle", "oracle refinement", "s-"),
          ("risk_average", "plain averaging", "^-"), ("formula_oracle", "formula", "k--")]


def _panel(ax, rows, title):
    h_values = sorted(rows["h_ratio"].unique())
    for column, label, style in SERIES:
        stats = [mean_interval(g[column] / g["risk_local"]) for _, g in
                 rows.groupby("h_ratio")]
        means = np.array([m for m, _ in stats])
        ax.errorbar(h_values, means, yerr=[means - [ci[0] for _, ci in stats],
                    [ci[1] for _, ci in stats] - means], fmt=style, markersize=4,
                    capsize=2, label=label)
    ax.axhline(1.0, color="grey", linewidth=1, label="local OLS (ratio 1)")
    ax.set(yscale="log", title=title)
    ax.grid(axis="y", which="major", alpha=0.3)


def main(results_dir, out_dir):
    """Draw the figure from ``<results_dir>/refinement.jsonl``; return the written paths."""
    plt, df = prepare(results_dir, STUDY)
    n_values, gammas = sorted(df["n"].unique()), sorted(df["gamma"].unique())
    with plt.rc_context(COLUMN_STYLE):
        fig, axes = plt.subplots(len(n_values), len(gammas),
                                 figsize=(7.0, 1.3 + 2.2 * len(n_values)), squeeze=False,
                                 sharex=True, sharey=True, layout="constrained")
        for (i, n), (j, gamma) in product(enumerate(n_values), enumerate(gammas)):
            rows = df[(df["n"] == n) & (df["gamma"] == gamma)]
            if not rows.empty:
                title = rf"n = {n} samples per client, $\gamma$ = {gamma:g}"
                _panel(axes[i][j], rows, title)
        fig.supxlabel(r"benign heterogeneity $h / h^*$ (ratio)", fontsize=10)
        fig.supylabel("risk / local OLS risk (mean, 95% t interval)", fontsize=10)
        axes[0][0].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        handles, labels = axes[0][0].get_legend_handles_labels()
        handles, labels = handles[1:] + handles[:1], labels[1:] + labels[:1]  # ratio 1 last
        fig.legend(handles, labels, loc="outside upper center", ncols=3, frameon=False)
        return save(fig, out_dir, STUDY)


if __name__ == "__main__":
    script_main(main)

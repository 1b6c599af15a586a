"""Figure of study 4: refinement gain.

Per-client risk relative to local OLS (mean over replicates, bars: 95% t intervals)
against the benign heterogeneity h / h_star, for CLAIR, the oracle refinement (true P*
and C), plain averaging, and the oracle formula of docs/theory.md; one panel per
(n, gamma). Below 1 the method beats local fitting; the formula crosses 1 at
h_ratio = 1.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the repository importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from paper._common import prepare, save, script_main
from validation import mean_interval

STUDY = "refinement"
SERIES = [("risk_clair", "CLAIR", "o-"), ("risk_oracle", "oracle refinement", "s-"),
          ("risk_average", "plain averaging", "^-"), ("formula_oracle", "formula", "k--")]


def _panel(ax, rows, title):
    for column, label, style in SERIES:
        stats = [mean_interval(g[column] / g["risk_local"]) for _, g in
                 rows.groupby("h_ratio")]
        h_values = sorted(rows["h_ratio"].unique())
        ax.errorbar(h_values, [m for m, _ in stats], yerr=[[m - ci[0] for m, ci in stats],
                    [ci[1] - m for m, ci in stats]], fmt=style, capsize=2, label=label)
    ax.axhline(1.0, color="grey", linewidth=1)
    ax.set(yscale="log", title=title, xlabel=r"heterogeneity $h / h^*$",
           ylabel="risk / local OLS risk")


def main(results_dir, out_dir):
    """Draw the figure from ``<results_dir>/refinement.jsonl``; return the written paths."""
    plt, df = prepare(results_dir, STUDY)
    groups = list(df.groupby(["n", "gamma"]))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 4), squeeze=False,
                             sharey=True)
    for ax, ((n, gamma), rows) in zip(axes[0], groups):
        _panel(ax, rows, rf"n = {n}, $\gamma$ = {gamma:g}")
    axes[0][0].legend(fontsize="small")
    fig.suptitle("Refinement gain: per-client risk relative to local OLS")
    return save(fig, out_dir, STUDY)


if __name__ == "__main__":
    script_main(main)

"""Figure of study 2: stable recovery.

Median ``||P_hat - P*||_F`` (bars: quartiles) against K, one curve per (p, q, n) regime,
with a K^{-1/2} guide (the figure the claim asks for); side panels: against the noise
level sigma (guide: slope 1) and against the effective sample size n - p - 1
(guide: slope -1/2).
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the repository importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from paper._common import prepare, save, script_main

STUDY = "stability"
PANELS = [("K", "n_clients", "number of clients K", -0.5),
          ("sigma", "sigma", r"noise level $\sigma$", 1.0),
          ("n", "effective_n", "effective sample size n - p - 1", -0.5)]


def _panel(ax, rows, x, label, exponent):
    for (p, q), group in rows.groupby(["p", "q"]):
        stats = group.groupby(x)["subspace_error"].quantile([0.25, 0.5, 0.75]).unstack()
        n_base = int(group["n"].mode().iloc[0])
        ax.errorbar(stats.index, stats[0.5], yerr=[stats[0.5] - stats[0.25],
                    stats[0.75] - stats[0.5]], marker="o", capsize=3,
                    label=f"p={p}, q={q}, n={n_base}" if x != "effective_n" else
                    f"p={p}, q={q}")
    xs = np.array(sorted(rows[x].unique()), dtype=float)
    anchor = rows.groupby(x)["subspace_error"].median().iloc[0]
    ax.plot(xs, anchor * (xs / xs[0]) ** exponent, "k--", label=f"slope {exponent:g}")
    ax.set(xscale="log", yscale="log", xlabel=label, ylabel=r"$\|\hat P - P^*\|_F$")
    if x != "effective_n":  # label the grid's own values, not log-scale minor ticks
        ax.set_xticks(xs, [f"{v:g}" for v in xs], minor=False)
        ax.set_xticks([], minor=True)
    ax.legend(fontsize="small")


def main(results_dir, out_dir):
    """Draw the figure from ``<results_dir>/stability.jsonl``; return the written paths."""
    plt, df = prepare(results_dir, STUDY)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (sweep, x, label, exponent) in zip(axes, PANELS):
        _panel(ax, df[df["sweep"] == sweep], x, label, exponent)
    fig.suptitle("Stable recovery: subspace error (median, quartiles), rank given, "
                 r"$\gamma = 0.1$ well separated")
    return save(fig, out_dir, STUDY)


if __name__ == "__main__":
    script_main(main)

"""Figure of study 1: the exact-recovery phase diagram.

Success rate of the exact program (noiseless) over the contamination fraction gamma and
the relative rank r/p, one panel per p; white dots: the empirical boundary (where the
success rate crosses 1/2); dashed: the outlier-pursuit-type curve
gamma/(1-gamma) = c/(mu r) with c fitted to the boundary's median. Right: the share of
replicates that flag a benign client against max_k ||V_k||_F / lam, every lam of the
study: the dual-certificate condition predicts a step at 1.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the repository importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from paper._common import prepare, save, script_main
from validation.checks.recovery import empirical_boundary

STUDY = "recovery"


def _panel(ax, df, boundary, c_fit):
    rates = df.pivot_table(index="rank", columns="gamma", values="success", aggfunc="mean")
    p = int(df["p"].iloc[0])
    image = ax.imshow(rates.to_numpy(), origin="lower", aspect="auto", cmap="viridis",
                      vmin=0, vmax=1)
    ax.set_xticks(range(rates.shape[1]), [f"{g:g}" for g in rates.columns], fontsize=8)
    ax.set_yticks(range(rates.shape[0]), [f"{r / p:.2f}" for r in rates.index])
    gamma_pos = lambda g: np.interp(g, rates.columns, range(rates.shape[1]))  # noqa: E731
    rank_pos = {rank: i for i, rank in enumerate(rates.index)}
    points = boundary.dropna(subset=["gamma_star"])
    ax.plot(gamma_pos(points["gamma_star"]), [rank_pos[r] for r in points["rank"]], "wo",
            label="empirical boundary")
    odds = c_fit / boundary["mu_r"]
    ax.plot(gamma_pos(odds / (1 + odds)), [rank_pos[r] for r in boundary["rank"]], "w--",
            label=rf"$\gamma/(1-\gamma) = {c_fit:.2f}/(\mu r)$")
    ax.set(title=f"p = {p}", xlabel=r"contamination fraction $\gamma$", ylabel="r / p")
    return image


def _certificate_panel(ax, df):
    """Share of replicates flagging a benign client against max_k ||V_k||_F / lam."""
    ratio = df["max_benign_block"] / df["lam"]
    edges = np.linspace(0.3, 2.0, 18)
    for lam, rows in df.groupby(df["lam"].round(3)):
        bins = np.digitize(ratio[rows.index], edges)
        share = (rows["false_positive_rate"] > 0).groupby(bins).mean()
        centres = [(edges[b - 1] + edges[b]) / 2 for b in share.index
                   if 0 < b < len(edges)]
        ax.plot(centres, share[[0 < b < len(edges) for b in share.index]], "o-",
                label=rf"$\lambda$ = {lam:g}")
    ax.axvline(1.0, color="k", linestyle="--")
    ax.set(xlabel=r"$\max_k \|V_k\|_F \,/\, \lambda$ (benign clients)",
           ylabel="P(some benign client flagged)", title="dual-certificate condition")
    ax.legend(fontsize="small")


def main(results_dir, out_dir):
    """Draw the figure from ``<results_dir>/recovery.jsonl``; return the written paths."""
    plt, everything = prepare(results_dir, STUDY)
    df = everything[everything["lam_setting"] == "auto"]
    boundary = empirical_boundary(df)
    c_fit = float(np.nanmedian(boundary["odds_star"] * boundary["mu_r"]))
    p_values = sorted(df["p"].unique())
    fig, axes = plt.subplots(1, len(p_values) + 1, figsize=(5 * len(p_values) + 5, 4.2),
                             squeeze=False, layout="constrained")
    for ax, p in zip(axes[0], p_values):
        image = _panel(ax, df[df["p"] == p], boundary[boundary["p"] == p], c_fit)
    axes[0][0].legend(loc="upper right", fontsize="small", framealpha=0.5)
    fig.colorbar(image, ax=axes[0][:-1].tolist(), label="P(exact recovery)")
    _certificate_panel(axes[0][-1], everything)
    fig.suptitle("Exact recovery (noiseless, exact program): success rate")
    return save(fig, out_dir, STUDY)


if __name__ == "__main__":
    script_main(main)

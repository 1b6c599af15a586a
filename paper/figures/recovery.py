"""Figure of study 1: the exact-recovery phase diagram.

Top: success rate of the exact program (noiseless) over the contamination fraction gamma
and the relative rank r/p, one panel per p; circles: the empirical boundary (where the
success rate crosses 1/2) of the odd-numbered replicates; dashed: the 50% contour of a
logistic model of success on log(gamma/(1-gamma)) and log(mu r) (the model of the check
``recovery_boundary_exponent``) fitted to the even-numbered replicates only, so the line
is not fitted to the points drawn with it. Bottom: the share of
replicates that flag a benign client (95% Wilson intervals) against max_k ||V_k||_F / lam,
every lam of the study: the dual-certificate condition predicts a step at 1.

Drawn 7 inches wide, to be printed at the manuscript's column width (16 cm).
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the repository importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import pandas as pd

from paper._common import COLUMN_STYLE, prepare, save, script_main
from validation import wilson
from validation._core import logit_fit
from validation.checks.recovery import empirical_boundary

STUDY = "recovery"
BOUNDARY_STYLE = {"marker": "o", "color": "white", "markeredgecolor": "black",
                  "linestyle": "none"}
EDGES = np.linspace(0.3, 2.0, 18)  # bins of max_k ||V_k||_F / lam


def _rates(df):
    """Success rate by (rank, gamma) of one p: a rank x gamma table."""
    return df.pivot_table(index="rank", columns="gamma", values="success", aggfunc="mean")


def _panel(ax, df, boundary, contour):
    rates = _rates(df)
    p = int(df["p"].iloc[0])
    image = ax.imshow(rates.to_numpy(), origin="lower", aspect="auto", cmap="viridis",
                      vmin=0, vmax=1)
    ax.set_xticks(range(rates.shape[1]), [f"{g:g}" for g in rates.columns])
    ax.tick_params(axis="x", labelsize=8)
    ax.set_yticks(range(rates.shape[0]), [f"{r / p:.2f}" for r in rates.index])
    gamma_pos = lambda g: np.interp(g, rates.columns, range(rates.shape[1]))  # noqa: E731
    rank_pos = {rank: i for i, rank in enumerate(rates.index)}
    points = boundary.dropna(subset=["gamma_star"])
    ax.plot(gamma_pos(points["gamma_star"]), [rank_pos[r] for r in points["rank"]],
            label="empirical boundary, odd replicates (rate 1/2)", **BOUNDARY_STYLE)
    if contour is not None:
        odds = contour(boundary["mu_r"].to_numpy())
        ax.plot(gamma_pos(odds / (1 + odds)), [rank_pos[r] for r in boundary["rank"]],
                color="tab:red", linestyle="--", linewidth=1.5,
                label="logistic 50% contour, even replicates")
    ax.set(title=f"p = {p}", xlabel=r"contamination fraction $\gamma$")
    return image, [f"{r / p:.2f}" for r in rates.index]


def held_out_contour(df):
    """The 50% contour ``odds(mu r)`` of ``logit P = a + b1 log odds + b2 log(mu r)``
    fitted to ``df``, or None when no finite fit exists (perfect separation)."""
    frame = df.assign(log_odds=np.log(df["gamma"] / (1 - df["gamma"])),
                      log_mu_r=np.log(df["mu_u"] * df["rank"]))
    fit = logit_fit(frame, "success", ["log_odds", "log_mu_r"])
    if fit is None:
        return None
    const, b_odds, b_mu = (float(v) for v in fit.params)
    return lambda mu_r: np.exp(-(const + b_mu * np.log(mu_r)) / b_odds)


def _binned_share(ratio, flagged):
    """Share flagged per bin of ``ratio`` (bins inside EDGES) with 95% Wilson intervals.

    Parameters
    ----------
    ratio : ndarray, shape (n,)
        ``max_k ||V_k||_F / lam`` of each replicate.
    flagged : ndarray of bool, shape (n,)
        Whether the replicate flagged a benign client.

    Returns
    -------
    centres : ndarray, shape (m,)
        Centres of the m non-empty bins.
    stats : ndarray, shape (m, 3)
        Share flagged, then the interval's lower and upper ends.
    """
    bins = np.digitize(ratio, EDGES)
    inside = (bins > 0) & (bins < len(EDGES))
    counts = pd.Series(flagged[inside]).groupby(bins[inside]).agg(["sum", "count"])
    centres = (EDGES[counts.index - 1] + EDGES[counts.index]) / 2
    stats = [wilson(s, n) for s, n in zip(counts["sum"], counts["count"])]
    return centres, np.array([[rate, *ci] for rate, ci in stats])


def _certificate_panel(ax, df):
    """Share of replicates flagging a benign client against max_k ||V_k||_F / lam."""
    ratio = df["max_benign_block"] / df["lam"]
    groups = list(df.groupby(df["lam"].round(3)))
    # Small horizontal offsets keep the intervals of the lam values that share a bin apart.
    offsets = 0.012 * (np.arange(len(groups)) - (len(groups) - 1) / 2)
    for offset, (lam, rows) in zip(offsets, groups):
        centres, stats = _binned_share(ratio[rows.index].to_numpy(),
                                       (rows["false_positive_rate"] > 0).to_numpy())
        default = " (default)" if rows["lam_setting"].eq("auto").all() else ""
        # Clipped at 0: at a rate of 0 or 1 the interval's end differs by rounding only.
        yerr = np.clip([stats[:, 0] - stats[:, 1], stats[:, 2] - stats[:, 0]], 0, None)
        ax.errorbar(centres + offset, stats[:, 0], yerr=yerr, fmt="o-", markersize=3.5,
                    linewidth=1.2, elinewidth=0.8, capsize=0, label=rf"$\lambda$ = {lam:g}{default}")
    ax.axvline(1.0, color="k", linestyle="--", linewidth=1, label="predicted step")
    ax.set(xlabel=r"$\max_k \|V_k\|_F \,/\, \lambda$ over benign clients (ratio)",
           ylabel="P(a benign client\nis flagged)", ylim=(-0.03, 1.03),
           title="dual-certificate condition (bars: 95% Wilson intervals)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)


def _phase_diagrams(subfig, df, boundary, contour):
    """One heatmap per p in ``subfig``, a shared colour bar and the boundary legend."""
    p_values = sorted(df["p"].unique())
    axes = subfig.subplots(1, len(p_values), squeeze=False)[0]
    labels = []
    for ax, p in zip(axes, p_values):
        image, rows = _panel(ax, df[df["p"] == p], boundary[boundary["p"] == p], contour)
        labels.append(rows)
    axes[0].set_ylabel("relative rank r / p")
    if all(rows == labels[0] for rows in labels):  # same r/p grid: one axis label
        for ax in axes[1:]:
            ax.tick_params(labelleft=False)
    subfig.colorbar(image, ax=axes.tolist(), label="P(exact recovery)")
    handles, names = axes[0].get_legend_handles_labels()
    subfig.legend(handles, names, loc="outside lower center", ncols=2, frameon=False)


def main(results_dir, out_dir):
    """Draw the figure from ``<results_dir>/recovery.jsonl``; return the written paths."""
    plt, everything = prepare(results_dir, STUDY)
    df = everything[everything["lam_setting"] == "auto"]
    odd = df["replicate"] % 2 == 1
    boundary = empirical_boundary(df[odd])
    contour = held_out_contour(df[~odd])
    with plt.rc_context(COLUMN_STYLE):
        fig = plt.figure(figsize=(7.0, 6.2), layout="constrained")
        top, bottom = fig.subfigures(2, 1, height_ratios=[1.45, 1])
        _phase_diagrams(top, df, boundary, contour)
        _certificate_panel(bottom.subplots(), everything)
        return save(fig, out_dir, STUDY)


if __name__ == "__main__":
    script_main(main)

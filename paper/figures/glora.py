"""Figure of study 6: GLoRA's error against the reference rank, and gauge invariance.

Left: median relative error of GLoRA against the reference rank R (lines), the
predicted ``||(I - P_ref) Delta W*|| / ||Delta W*||`` (crosses) and FedIT / FedRot
(dashed), per off-subspace perturbation; the dotted line marks the union rank.
Right: relative change of each rule's aggregate under random invertible gauges.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the repository importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from paper._common import prepare, save, script_main

STUDY = "glora"
_FLOOR = 1e-17  # exact zeros drawn at the bottom of the log axis


def _error_panel(ax, df):
    for (off, rows), color in zip(df.groupby("off_subspace"), ["C0", "C1", "C2", "C3"]):
        med = rows.groupby("reference_rank")[["error_glora", "predicted_error",
                                              "error_fedit", "error_fedrot"]].median()
        ax.plot(med.index, np.maximum(med["error_glora"], _FLOOR), "o-", color=color,
                label=f"GLoRA, off-subspace {off:g}")
        ax.plot(med.index, np.maximum(med["predicted_error"], _FLOOR), "x", color=color,
                markersize=9)
        ax.axhline(med["error_fedit"].median(), color=color, linestyle="--", linewidth=1)
        ax.axvline(rows["union_rank"].median(), color=color, linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("reference rank R (dotted: union rank)")
    ax.set_ylabel(r"$\|\Delta W^* - \mathrm{aggregate}\|_F / \|\Delta W^*\|_F$")
    ax.legend(fontsize="small", title="x: predicted; dashed: FedIT")


def _gauge_panel(ax, df):
    columns = ["gauge_change_glora", "gauge_change_fedit", "gauge_change_fedrot"]
    # A rule not run in a replicate leaves NaN there: boxplot draws nothing for a
    # column holding one, so each box is drawn from its own replicates.
    ax.boxplot([np.maximum(df[c].dropna(), _FLOOR) for c in columns], positions=range(3))
    ax.set_xticks(range(3), ["GLoRA", "FedIT", "FedRot-LoRA"])
    ax.set_yscale("log")
    ax.set_ylabel(r"$\|\mathrm{agg}(B_iG_i, G_i^{-1}A_i) - \mathrm{agg}\|_F / \|\mathrm{agg}\|_F$")


def main(results_dir, out_dir):
    """Draw the figure from ``<results_dir>/glora.jsonl``; return the written paths."""
    plt, df = prepare(results_dir, STUDY)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4),
                                      gridspec_kw={"width_ratios": [3, 2]})
    _error_panel(left, df)
    _gauge_panel(right, df)
    fig.suptitle("GLoRA: exact at full reference rank, gauge invariant")
    return save(fig, out_dir, STUDY)


if __name__ == "__main__":
    script_main(main)

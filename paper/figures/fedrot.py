"""Figure of study 5: FedRot-LoRA aggregation error over lambda and heterogeneity.

Left: median relative error ``||Delta W* - aggregate||_F / ||Delta W*||_F`` of soft
FedRot (align A) against lambda, one line per heterogeneity (lambda = 0 is FedIT).
Right: the soft-rotation ratio ``||R_lam - I|| / (2 lam ||R - I||)``, which must stay
below 1.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the repository importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from paper._common import prepare, save, script_main

STUDY = "fedrot"


def _error_panel(ax, df):
    for h, rows in df.groupby("heterogeneity"):
        stats = rows.groupby("lam")["error_rot_a"].quantile([0.25, 0.5, 0.75]).unstack()
        ax.plot(stats.index, stats[0.5], marker="o", label=f"h = {h:g}")
        ax.fill_between(stats.index, stats[0.25], stats[0.75], alpha=0.2)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel(r"soft-rotation strength $\lambda$ (0: FedIT, 1: hard)")
    ax.set_ylabel(r"$\|\Delta W^* - \mathrm{aggregate}\|_F / \|\Delta W^*\|_F$")
    ax.legend(title="heterogeneity", fontsize="small")


def _bound_panel(ax, df):
    rows = df[df["lam"] > 0]
    lams = sorted(rows["lam"].unique())
    ax.boxplot([rows.loc[rows["lam"] == lam, "soft_bound_ratio"] for lam in lams],
               positions=range(len(lams)))
    ax.set_xticks(range(len(lams)), [f"{lam:g}" for lam in lams])
    ax.axhline(1.0, color="k", linestyle="--", label="bound")
    ax.set_xlabel(r"$\lambda$")
    ax.set_ylabel(r"$\|R_\lambda - I\|_F \,/\, 2\lambda\|R - I\|_F$")
    ax.legend()


def main(results_dir, out_dir):
    """Draw the figure from ``<results_dir>/fedrot.jsonl``; return the written paths."""
    plt, df = prepare(results_dir, STUDY)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    # The error panel is about rotational mismatch; the study also has ungauged clients.
    # Identical ungauged clients have R = I up to rounding: no soft-rotation ratio there
    # (the check leaves them out too).
    if "gauge" in df:
        rotational = df["gauge"] == "rotation"
        _error_panel(left, df[rotational])
        _bound_panel(right, df[rotational | (df["heterogeneity"] > 0)])
    else:
        _error_panel(left, df)
        _bound_panel(right, df)
    fig.suptitle("FedRot-LoRA: factor-averaging error against alignment")
    return save(fig, out_dir, STUDY)


if __name__ == "__main__":
    script_main(main)

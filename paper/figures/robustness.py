"""Figure of study 7: each aggregation rule's error as the contamination grows.

Top row, one panel per attack: median ``||aggregate - target||_F / ||target||_F``
against the contamination fraction gamma, one line per rule (log scale, errors below
1e-3, i.e. exact aggregates, drawn at 1e-3; a rule "breaks down" where its line leaves
the benign level). Bottom row: CLAIR's detection, the mean recall and false-positive
rate (recall is 1 by convention at gamma = 0).
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the repository importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from paper._common import prepare, save, script_main

STUDY = "robustness"
RULES = ["mean", "fedit", "median", "trimmed_mean", "krum", "multikrum", "geomedian",
         "clair"]
_FLOOR = 1e-3  # exact aggregates (the mean at gamma = 0) drawn at the axis bottom
ATTACKS = ["random", "scaled", "sign_flip", "stealthy", "colluding"]
# The names the text uses (Section 7), not the code's.
LABELS = {"mean": "mean", "fedit": "FedIT", "median": "median",
          "trimmed_mean": "trimmed mean", "krum": "Krum", "multikrum": "multi-Krum",
          "geomedian": "geometric median", "clair": "CLAIR"}


def _error_panel(ax, rows):
    for rule in RULES:
        med = rows.groupby("gamma")[f"error_{rule}"].median()
        ax.plot(med.index, np.maximum(med.values, _FLOOR), marker="o", markersize=3,
                label=LABELS[rule], linewidth=2.5 if rule == "clair" else 1.2)
    ax.set_yscale("log")
    ax.set_ylim(0.8 * _FLOOR, None)


def _detection_panel(ax, rows):
    stats = rows.groupby("gamma")[["clair_recall", "clair_false_positive_rate"]].mean()
    ax.plot(stats.index, stats["clair_recall"], "o-", label="recall")
    ax.plot(stats.index, stats["clair_false_positive_rate"], "s--", label="false-positive rate")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel(r"contamination fraction $\gamma$")


def main(results_dir, out_dir):
    """Draw the figure from ``<results_dir>/robustness.jsonl``; return the written paths."""
    plt, df = prepare(results_dir, STUDY)
    attacks = [a for a in ATTACKS if a in set(df["attack"])]
    fig, axes = plt.subplots(2, len(attacks), figsize=(3.2 * len(attacks), 6),
                             sharex=True, squeeze=False, gridspec_kw={"height_ratios": [2, 1]})
    for column, attack in enumerate(attacks):
        rows = df[df["attack"] == attack]
        _error_panel(axes[0, column], rows)
        _detection_panel(axes[1, column], rows)
        axes[0, column].set_title(attack.replace("_", " "))
    axes[0, 0].set_ylabel(r"$\|\mathrm{aggregate} - \mathrm{target}\|_F / \|\mathrm{target}\|_F$")
    axes[1, 0].set_ylabel("CLAIR detection")
    axes[0, -1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    axes[1, -1].legend(fontsize="small", loc="center right")
    fig.suptitle("Robustness of the aggregation rules to contaminated clients")
    return save(fig, out_dir, STUDY)


if __name__ == "__main__":
    script_main(main)

"""Figure of study 3: collaborative-set recovery against separation.

P(C_hat = C) (95% Wilson band) against the separation ratio
``delta / (sigma sqrt(pq/n))``, one curve per contamination fraction gamma; left: the
default Benjamini-Hochberg test (dashed: the plateau BH's false alarms allow,
``(1 - level (m + 1)/K)^(K - m)``), right: Holm's FWER test (dotted: 1 - level).
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the repository importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from paper._common import COLUMN_STYLE, prepare, save, script_main
from validation import wilson

STUDY = "detection"
# Panel titles; the level is the table's own (``test_level``).
TITLES = {"fdr_bh": "Benjamini-Hochberg (FDR {level:g}, default)",
          "holm": "Holm (FWER {level:g})"}


def bh_plateau(n_clients, n_contaminated, level):
    """P(no false alarm) under BH once every attacker is caught, null p-values uniform.

    A benign client is rejected when its p-value is below about
    ``level (m + 1) / K``, so ``P = (1 - level (m + 1) / K)^(K - m)``.
    """
    return (1 - level * (n_contaminated + 1) / n_clients) ** (n_clients - n_contaminated)


def _panel(ax, rows, title, correction):
    level = float(rows["test_level"].iloc[0])
    for gamma, group in rows.groupby("gamma"):
        counts = group.groupby("separation_ratio")["exact"].agg(["sum", "count"])
        stats = [wilson(s, n) for s, n in zip(counts["sum"], counts["count"])]
        line, = ax.plot(counts.index, [rate for rate, _ in stats], marker="o",
                        label=rf"$\gamma$ = {gamma:g}")
        ax.fill_between(counts.index, [ci[0] for _, ci in stats],
                        [ci[1] for _, ci in stats], color=line.get_color(), alpha=0.12)
        if correction == "fdr_bh":  # where BH's false alarms cap P(C_hat = C)
            plateau = bh_plateau(group["n_clients"].iloc[0], group["n_contaminated"].iloc[0],
                                 level)
            ax.axhline(plateau, color=line.get_color(), linestyle="--", linewidth=1)
    ax.axhline(1 - level, color="k", linestyle=":", label="1 $-$ level")
    ticks = sorted(rows["separation_ratio"].unique())
    ax.set(xscale="log", ylim=(-0.02, 1.02), title=title.format(level=level),
           ylabel=r"P($\hat C = C$)",
           xlabel=r"separation $\delta / (\sigma\sqrt{pq/n})$")
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xticks([], minor=True)
    ax.legend(fontsize="small", loc="upper left")


def main(results_dir, out_dir):
    """Draw the figure from ``<results_dir>/detection.jsonl``; return the written paths."""
    plt, df = prepare(results_dir, STUDY)
    plt.rcParams.update(COLUMN_STYLE)  # drawn at the column's width: type of about 9 pt
    corrections = [c for c in TITLES if c in set(df["correction"])]
    fig, axes = plt.subplots(1, len(corrections), figsize=(3.5 * len(corrections), 3.2),
                             squeeze=False, sharey=True)
    for ax, correction in zip(axes[0], corrections):
        _panel(ax, df[df["correction"] == correction], TITLES[correction], correction)
    fig.suptitle("Collaborative-set recovery against separation")
    return save(fig, out_dir, STUDY)


if __name__ == "__main__":
    script_main(main)

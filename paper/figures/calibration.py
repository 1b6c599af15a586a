"""Figure: the per-client tests on real data (``SOURCES["calibration"]``: the
development data).

Left: share of null splits (nothing corrupted) with at least one flag, per dataset and
path, with 95% Wilson intervals and the nominal level of BH at 5%; right: the share of
corrupted clients flagged, per corruption. Not a Monte Carlo study: the table is written
by ``python benchmarks/real_data_calibration.py`` and read from the repository whatever
``results_dir`` is; without it the script draws nothing.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the repository importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from paper._common import save, script_main
from paper._sources import SOURCES, calibration_summary, read_calibration

NAME = "calibration"
PATHS = [("default", "no covariance (default)", "o"), ("noise_cov", "noise_cov given", "s")]
KINDS = [("power_scale", "scaled by 3"), ("power_flip", "sign-flipped"),
         ("power_replace", "outputs reversed")]


def main(results_dir, out_dir):
    """Draw the figure from the committed calibration table; return the written paths."""
    if not SOURCES["calibration"].exists():
        print(f"{NAME}: no {SOURCES['calibration'].name}; nothing drawn")
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = calibration_summary(read_calibration(SOURCES["calibration"]))
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(7.0, 3.0), sharey=True,
                                   layout="constrained")
    for shift, (path, label, marker) in zip((-0.15, 0.15), PATHS):
        part = {r["dataset"]: r for r in rows if r["path"] == path}
        ys = [i + shift for i, d in enumerate(datasets) if d in part]
        xs = [part[d]["null"] for d in datasets if d in part]
        err = [[part[d]["null"] - part[d]["lo"] for d in datasets if d in part],
               [part[d]["hi"] - part[d]["null"] for d in datasets if d in part]]
        left.errorbar(xs, ys, xerr=err, fmt=marker, capsize=2, label=label)
        for j, (kind, _) in enumerate(KINDS):
            power = [part[d].get(kind) for d in datasets if d in part and d != "all"]
            right.plot(power, ys[:len(power)], marker, color=f"C{j + 2}", mfc="none"
                       if path == "default" else None)
    left.axvline(0.05, color="grey", lw=1, ls="--", label="nominal 0.05")
    left.set(yticks=range(len(datasets)), yticklabels=datasets, xlim=(0, None),
             xlabel="null splits with a flag (share)")
    left.invert_yaxis()
    # Below the panel: inside it the legend would hide the pooled row ("all").
    left.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.2))
    for j, (_, label) in enumerate(KINDS):
        right.plot([], [], "s", color=f"C{j + 2}", label=label)
    right.set(xlim=(0, 1.05), xlabel="corrupted clients flagged (share)")
    # Beside the panel: inside it the legend would hide the lowest data set's markers.
    right.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5),
                 title="filled: noise_cov", title_fontsize="small")
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
    return save(fig, out_dir, NAME)


if __name__ == "__main__":
    script_main(main)

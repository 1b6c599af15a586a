"""Figure: the copying experiment swept over the number of clients and the contaminated
share (study ``copying_sweep``).

Columns: the homogeneous and heterogeneous settings. Top: CLAIR's mean gain over local
LoRA (solid, 95% paired bootstrap intervals over replicates) and the best other rule's
(dashed), against the contaminated share, one colour per number of clients. Bottom:
the share of attackers CLAIR flags (solid), of backdoor clients (dotted) and of clean
clients (dashed). Read from the committed table of the largest scale present (``full``,
else ``small``), whatever ``results_dir`` is.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the repository importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from paper._common import COLUMN_STYLE, save, script_main

NAME = "copying_sweep"


def _table():
    """The sweep's largest committed table and its scale, or (None, None): the rows of
    the study's current grid only, as the validation reads a table (rows of a cell
    since removed, or of replicates beyond the grid's count, never enter the figure or
    the text)."""
    from simulations import default_results_dir, get_study, load_results, results_path

    for scale in ("full", "small"):
        path = results_path(NAME, scale, default_results_dir())
        if path.exists():
            frame = load_results(get_study(NAME), scale, default_results_dir(),
                                 current_only=True)
            if not frame.empty:
                return frame, scale
    return None, None


def point_summary(frame):
    """Per (setting, n_clients, share): CLAIR's gain with its interval, the best rule's
    gain, and the flagged shares by kind of client."""
    import pandas as pd

    from simulations.copying.analysis import BASELINES, paired_bootstrap

    rows = []
    for (setting, n_clients, share), sub in frame.groupby(
            ["setting", "n_clients", "contaminated_share"]):
        gain, low, high = paired_bootstrap(100 * sub["rel_clair"])
        best = max(100 * sub[f"rel_{rule}"].mean() for rule in BASELINES)
        kinds = {"attack": [], "backdoor": [], "benign": []}
        for row in sub.to_dict("records"):
            for k in range(int(row["n_clients"])):
                kind, flagged = row[f"kind_c{k}"], bool(row[f"flagged_clair_c{k}"])
                kinds["benign" if kind == "benign" else "attack"].append(flagged)
                if kind == "backdoor":
                    kinds["backdoor"].append(flagged)
        rows.append({"setting": setting, "n_clients": n_clients, "share": share,
                     "replicates": len(sub), "gain": gain, "low": low, "high": high,
                     "best_rule": best,
                     **{f"flag_{k}": np.mean(v) if v else np.nan for k, v in kinds.items()}})
    return pd.DataFrame(rows)


def main(results_dir, out_dir):
    """Draw the sweep figure from the committed table; return the written paths."""
    frame, scale = _table()
    if frame is None:
        print(f"{NAME}: no sweep results; nothing drawn")
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(COLUMN_STYLE)
    points = point_summary(frame)
    # Homogeneous first, as in the text and the copying tables.
    settings = sorted(points["setting"].unique(), key=lambda s: (s != "homogeneous", s))
    fig, axes = plt.subplots(2, len(settings), figsize=(7.0, 5.2), sharex=True,
                             sharey="row", squeeze=False, layout="constrained")
    for col, setting in enumerate(settings):
        top, bottom = axes[0, col], axes[1, col]
        for colour, (n_clients, sub) in zip(("C0", "C1", "C2", "C3"),
                                           points[points["setting"] == setting]
                                           .groupby("n_clients")):
            sub = sub.sort_values("share")
            x = 100 * sub["share"]
            yerr = np.clip([sub["gain"] - sub["low"], sub["high"] - sub["gain"]], 0, None)
            top.errorbar(x, sub["gain"], yerr=np.nan_to_num(yerr), fmt="o-", ms=3.5,
                         color=colour, capsize=0, label=f"{n_clients} clients")
            top.plot(x, sub["best_rule"], "--", color=colour, lw=1)
            bottom.plot(x, sub["flag_attack"], "o-", color=colour, ms=3.5)
            bottom.plot(x, sub["flag_backdoor"], ":", color=colour)
            bottom.plot(x, sub["flag_benign"], "--", color=colour, lw=1)
        top.axhline(0.0, color="k", lw=0.8)
        top.set_title(setting)
        bottom.set_xlabel("contaminated clients (%)")
        for axis in (top, bottom):
            axis.grid(alpha=0.3)
    axes[0, 0].set_ylabel("gain vs local LoRA (%)")
    axes[1, 0].set_ylabel("share flagged")
    fig.suptitle(f"{scale} scale, at least {int(points['replicates'].min())} replicates per "
                 "point; top: CLAIR solid, best other rule dashed; bottom: attackers solid, "
                 "backdoor dotted, clean dashed", fontsize=9)
    axes[1, 0].set_ylim(-0.03, 1.03)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, frameon=False)
    return save(fig, out_dir, NAME)


if __name__ == "__main__":
    script_main(main)

"""Figures and the summary table of the copying experiment, from the saved results only.

``python -m simulations.copying.figures [RESULTS_DIR [OUT_DIR]] [--scale small]`` draws,
per setting, the client-level accuracy of every method (top) and its relative change
against local LoRA (bottom), and writes ``summary_<scale>.md``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

__all__ = ["main", "client_table", "flagged_by_kind", "summary_table"]

_LABELS = {"local": "local", "fedavg": "FedAvg", "fedit": "FedIT", "fedrot": "FedRot",
           "glora": "GLoRA", "median": "median", "clair": "CLAIR\nper-module",
           "clair_joint": "CLAIR\njoint", "clair_joint_r": "CLAIR\njoint r",
           "clair_lora": "CLAIR\nrank-r LoRA", "clair_oracle": "CLAIR\noracle set",
           "fedavg_oracle": "FedAvg\nbenign only"}


def client_table(frame):
    """One row per (replicate, benign client, method): accuracy and relative change.

    Parameters
    ----------
    frame : pandas.DataFrame
        The results table (one row a replicate, per-client columns ``acc_<m>_c<k>``).

    Returns
    -------
    pandas.DataFrame
        Columns ``setting, replicate, client, method, accuracy, relative``.
    """
    import pandas as pd

    pattern = re.compile(r"^acc_(?P<method>.+)_c(?P<client>\d+)$")
    records = []
    for _, row in frame.iterrows():
        for column, value in row.items():
            match = pattern.match(str(column))
            if not match or row.get(f"contaminated_c{match['client']}", True):
                continue
            local = row[f"acc_local_c{match['client']}"]
            records.append({"setting": row["setting"], "replicate": row["replicate"],
                            "client": int(match["client"]), "method": match["method"],
                            "accuracy": value, "relative": (value - local) / local})
    return pd.DataFrame(records)


def summary_table(frame):
    """Per setting and method: replicate-mean accuracy (mean, sd), relative change, wins.

    ``win`` is the share of (replicate, benign client) pairs where the method beats
    local LoRA; the spread is the standard deviation over replicates of the
    replicate-level mean.
    """
    clients = client_table(frame)
    per_rep = clients.groupby(["setting", "method", "replicate"])[["accuracy", "relative"]]
    per_rep = per_rep.mean().reset_index()
    table = per_rep.groupby(["setting", "method"]).agg(
        accuracy=("accuracy", "mean"), accuracy_sd=("accuracy", "std"),
        relative=("relative", "mean"), relative_sd=("relative", "std"),
        replicates=("replicate", "nunique"))
    wins = clients.assign(win=clients["relative"] > 0).groupby(["setting", "method"])["win"]
    return table.join(wins.mean()).reset_index()


def _detection_table(frame):
    cols = {}
    for method in ("clair", "clair_joint", "clair_joint_r"):
        for name in ("precision", "recall", "false_positive_rate"):
            if f"{name}_{method}" in frame:
                cols[f"{name}_{method}"] = "mean"
    return frame.groupby("setting").agg(cols).T


def flagged_by_kind(frame):
    """Share of clients flagged, per setting, CLAIR variant and kind of client.

    The kind follows :func:`simulations.copying.tasks.client_tasks`: the last
    ``n_contaminated`` clients are contaminated, cycling through ``contamination``; the
    others are "benign".

    Returns
    -------
    pandas.DataFrame
        Index ``(setting, method)``, one column per kind.
    """
    import pandas as pd

    records = []
    for row in frame.to_dict("records"):
        n_clients, n_bad = int(row["n_clients"]), int(row["n_contaminated"])
        kinds = row["contamination"].split(",")
        for k in range(n_clients):
            first_bad = n_clients - n_bad
            kind = kinds[(k - first_bad) % len(kinds)] if k >= first_bad else "benign"
            for method in ("clair", "clair_joint", "clair_joint_r"):
                column = f"flagged_{method}_c{k}"
                if column in row:
                    records.append((row["setting"], method, kind, bool(row[column])))
    table = pd.DataFrame(records, columns=["setting", "method", "kind", "flagged"])
    return table.pivot_table(index=["setting", "method"], columns="kind",
                             values="flagged", aggfunc="mean")


def _panel(axis, clients, methods, column, ylabel):
    data = [clients.loc[clients["method"] == m, column].to_numpy() for m in methods]
    axis.boxplot(data, showfliers=False, widths=0.6)
    per_rep = [clients[clients["method"] == m].groupby("replicate")[column].mean()
               for m in methods]
    for position, values in enumerate(per_rep, start=1):
        axis.plot(np.full(len(values), position), values, "o", ms=3, color="C3", alpha=0.7)
    axis.set_ylabel(ylabel)
    axis.grid(axis="y", alpha=0.3)


def _figure(clients, setting, methods, out_dir, scale):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sub = clients[clients["setting"] == setting]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    _panel(top, sub, methods, "accuracy", "masked accuracy\n(benign clients)")
    _panel(bottom, sub, methods, "relative", "relative change\nvs local LoRA")
    bottom.axhline(0.0, color="k", lw=0.8)
    bottom.set_xticks(range(1, len(methods) + 1), [_LABELS.get(m, m) for m in methods],
                      fontsize=8)
    n_rep = sub["replicate"].nunique()
    top.set_title(f"copying task, {setting} ({n_rep} replicates): boxes over clients "
                  "and replicates, red dots replicate means")
    fig.tight_layout()
    path = Path(out_dir) / f"copying_{scale}_{setting}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(results_dir=None, out_dir=None, scale="small"):
    """Draw the figures and write the summary of ``<results_dir>/<scale>/copying.jsonl``.

    Returns
    -------
    list of Path
        The files written.
    """
    from simulations import load_table, results_path

    from .config import METHODS
    from .run import DEFAULT_RESULTS_DIR

    results_dir = Path(results_dir or DEFAULT_RESULTS_DIR)
    out_dir = Path(out_dir or results_dir / "figures")
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = load_table(results_path("copying", scale, results_dir))
    if frame.empty:
        return []
    clients = client_table(frame)
    methods = [m for m in METHODS if m in set(clients["method"])]
    written = [_figure(clients, s, methods, out_dir, scale)
               for s in sorted(clients["setting"].unique())]
    summary = out_dir / f"summary_{scale}.md"
    summary.write_text(_summary_text(frame, scale))
    return written + [summary]


def _markdown(table, index=True):
    """A DataFrame as a GitHub markdown table (no tabulate dependency)."""
    table = table.reset_index() if index else table
    lines = ["| " + " | ".join(str(c) for c in table.columns) + " |",
             "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |"
              for row in table.itertuples(index=False)]
    return "\n".join(lines)


def _summary_text(frame, scale):
    table = summary_table(frame).round(4)
    timing = [c for c in frame.columns if c.startswith("seconds_")] + ["elapsed_s"]
    return (f"# copying[{scale}]: summary\n\n## Benign clients' masked accuracy\n\n"
            f"{_markdown(table, index=False)}\n\n## Detection (mean over replicates)\n\n"
            f"{_markdown(_detection_table(frame).round(3))}\n\n"
            f"## Share flagged by kind of client\n\n"
            f"{_markdown(flagged_by_kind(frame).round(3))}\n\n"
            f"## Seconds per stage (mean over replicates)\n\n"
            f"{_markdown(frame.groupby('setting')[timing].mean().T.round(2))}\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results_dir", nargs="?", default=None)
    parser.add_argument("out_dir", nargs="?", default=None)
    parser.add_argument("--scale", default="small")
    args = parser.parse_args()
    for item in main(args.results_dir, args.out_dir, args.scale):
        print(item)

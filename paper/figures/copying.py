"""Figure: the copying experiment, client level (``simulations/results/copying``).

Relative change of each benign client's masked accuracy against its own local LoRA,
per method, one panel per setting with a shared axis; boxes over (replicate, client)
pairs, dots the replicate means. Read from the committed table of the largest run
(``full`` when present, else ``small``) whatever ``results_dir`` is; without it the
script draws nothing. Preliminary: the experiment is not yet pre-registered.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the repository importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from paper._common import save, script_main
from paper._sources import copying_scale, read_copying

NAME = "copying"
METHODS = [("fedavg", "FedAvg"), ("fedit", "FedIT"), ("fedrot", "FedRot"),
           ("glora", "GLoRA"), ("median", "median"), ("clair", "CLAIR\nmodule"),
           ("clair_joint", "CLAIR\njoint"), ("clair_joint_r", "CLAIR\njoint r"),
           ("clair_lora", "CLAIR\nLoRA r"), ("clair_oracle", "CLAIR\noracle"),
           ("fedavg_oracle", "FedAvg\nbenign")]


def main(results_dir, out_dir):
    """Draw the figure from the committed copying table; return the written paths."""
    scale = copying_scale()
    if scale is None:
        print(f"{NAME}: no copying results; nothing drawn")
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from simulations.copying.figures import client_table

    clients = client_table(read_copying(scale))
    methods = [(m, label) for m, label in METHODS if m in set(clients["method"])]
    settings = sorted(clients["setting"].unique())
    fig, axes = plt.subplots(len(settings), 1, figsize=(7.0, 2.4 * len(settings)),
                             sharex=True, sharey=True, squeeze=False, layout="constrained")
    for ax, setting in zip(axes[:, 0], settings):
        sub = clients[clients["setting"] == setting]
        data = [100 * sub.loc[sub["method"] == m, "relative"].to_numpy() for m, _ in methods]
        ax.boxplot(data, showfliers=False, widths=0.6)
        for pos, (m, _) in enumerate(methods, start=1):
            means = 100 * sub[sub["method"] == m].groupby("replicate")["relative"].mean()
            ax.plot(np.full(len(means), pos), means, ".", ms=2, color="C3", alpha=0.5)
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_ylabel("change vs local (%)")
        ax.set_title(f"{setting} ({sub['replicate'].nunique()} replicates)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[-1, 0].set_xticks(range(1, len(methods) + 1), [label for _, label in methods],
                           fontsize=7)
    return save(fig, out_dir, NAME)


if __name__ == "__main__":
    script_main(main)

"""Figures: the copying experiment, client level, one per setting.

For every benign client (x axis, grouped by task variant), each method's masked
accuracy averaged over the replicates (top) and its relative change against the
client's own local LoRA (bottom), with 95% t intervals over replicates. Read from the
committed table of the confirmatory block (``full``) when it exists, else of the
development block (``small``, titled as such), whatever ``results_dir`` is.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the repository importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from paper._common import COLUMN_STYLE, save, script_main
from paper._sources import copying_block_name, copying_scale, read_copying

NAME = "copying"
#: (method, label, colour, marker): the rules in greys, CLAIR's variants in colour.
SHOWN = [("local", "local LoRA", "k", "o"), ("fedavg", "FedAvg", "0.55", "v"),
         ("fedrot", "FedRot-LoRA", "0.7", "<"), ("glora", "GLoRA", "0.45", ">"),
         ("median", "median", "0.6", "s"), ("krum", "Krum", "0.35", "D"),
         ("geomedian", "geometric median", "0.5", "P"),
         ("clair_per_module", "CLAIR per module", "C2", "x"),
         ("clair_lora", "CLAIR rank-r adapters", "C1", "^"),
         ("clair", "CLAIR (default)", "C3", "o"),
         ("clair_oracle", "CLAIR oracle", "C0", "*")]


def client_means(clients, method, column):
    """Per client: mean of ``column`` over replicates and its 95% t interval."""
    from scipy import stats

    sub = clients[clients["method"] == method].groupby("client")[column]
    mean, sem, count = sub.mean(), sub.sem(), sub.count()
    half = stats.t.ppf(0.975, np.maximum(count - 1, 1)) * sem.fillna(0.0)
    return mean.index.to_numpy(), mean.to_numpy(), half.to_numpy()


def _setting_figure(plt, clients, setting, block):
    sub = clients[clients["setting"] == setting]
    order = (sub[["client", "variant"]].drop_duplicates()
             .sort_values(["variant", "client"])["client"].to_numpy())
    position = {client: i for i, client in enumerate(order)}
    methods = [m for m in SHOWN if m[0] in set(sub["method"])]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.0, 5.6), sharex=True,
                                      layout="constrained")
    offsets = np.linspace(-0.3, 0.3, len(methods))
    for offset, (method, label, colour, marker) in zip(offsets, methods):
        for axis, column, scale_by in ((top, "accuracy", 1.0), (bottom, "relative", 100.0)):
            if column == "relative" and method == "local":
                continue
            client, mean, half = client_means(sub, method, column)
            x = np.array([position[c] for c in client]) + offset
            axis.errorbar(x, scale_by * mean, yerr=scale_by * half, fmt=marker, ms=4.5,
                          color=colour, elinewidth=0.8, capsize=0,
                          label=label if axis is top else None)
    bottom.axhline(0.0, color="k", lw=0.8)
    top.set_ylabel("masked accuracy")
    bottom.set_ylabel("change vs local LoRA (%)")
    n_rep = sub["replicate"].nunique()
    variants = sub.drop_duplicates("client").set_index("client")["variant"]
    bottom.set_xticks(range(len(order)), [f"{c}\n(v{int(variants[c])})" for c in order],
                      fontsize=8)
    bottom.set_xlabel("benign client (task variant)")
    top.set_title(f"{setting}: {n_rep} replicates ({block} block); "
                  "means over replicates, 95% intervals")
    for axis in (top, bottom):
        axis.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", ncol=4, fontsize=8, frameon=False)
    return fig


def main(results_dir, out_dir):
    """Draw one figure per setting from the committed copying table; the written paths."""
    scale = copying_scale()
    if scale is None:
        print(f"{NAME}: no copying results; nothing drawn")
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from simulations.copying.analysis import client_table

    plt.rcParams.update(COLUMN_STYLE)
    frame = read_copying(scale)
    clients, block = client_table(frame), copying_block_name(frame, scale)
    paths = []
    for setting in sorted(clients["setting"].unique()):
        fig = _setting_figure(plt, clients, setting, block)
        paths += save(fig, out_dir, f"{NAME}_{setting}")
    return paths


if __name__ == "__main__":
    script_main(main)

"""Summaries of the copying tables: client-level accuracy, paired bootstrap, detection.

Read by the checks (``validation/checks/copying.py``), the paper's figures and numbers
(``paper/figures/copying.py``, ``paper/_generate.py``) and nothing else; every number
comes from the saved table.
"""

from __future__ import annotations

import re

import numpy as np

__all__ = ["METHODS", "BASELINES", "client_table", "replicate_gains", "paired_bootstrap",
           "gain_table", "flagged_by_kind", "detection_table", "BOOTSTRAP_RESAMPLES",
           "BOOTSTRAP_SEED"]

#: Methods in the order the tables and figures show them, with their labels.
METHODS = {"local": "local LoRA", "fedavg": "FedAvg", "fedit": "FedIT", "fedex": "FedEx",
           "fedrot": "FedRot-LoRA", "glora": "GLoRA", "median": "median",
           "trimmed_mean": "trimmed mean", "krum": "Krum", "geomedian": "geometric median",
           "clair": "CLAIR (default)", "clair_lora": "CLAIR rank-r adapters",
           "clair_per_module": "CLAIR per module", "clair_rank_given": "CLAIR rank 4 given",
           "clair_oracle": "CLAIR oracle", "fedavg_oracle": "FedAvg benign only"}
#: The rules CLAIR must beat (PROTOCOL.md): averaging, factor averaging, robust rules.
BASELINES = ("fedavg", "fedit", "fedex", "fedrot", "glora", "median", "trimmed_mean",
             "krum", "geomedian")
#: Paired bootstrap: resamples and the generator's seed (fixed in PROTOCOL.md).
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 20261130

_ACC = re.compile(r"^acc_(?P<method>.+)_c(?P<client>\d+)$")


def client_table(frame):
    """One row per (setting, replicate, benign client, method).

    Parameters
    ----------
    frame : pandas.DataFrame
        A copying table (one row a replicate, per-client columns ``acc_<m>_c<k>``).

    Returns
    -------
    pandas.DataFrame
        Columns ``setting, replicate, seed, client, variant, method, accuracy,
        relative`` (relative change against the client's own local LoRA).
    """
    import pandas as pd

    records = []
    for row in frame.to_dict("records"):
        for column, value in row.items():
            match = _ACC.match(str(column))
            if not match or row.get(f"contaminated_c{match['client']}", True):
                continue
            local = row[f"acc_local_c{match['client']}"]
            records.append({"setting": row["setting"], "replicate": row["replicate"],
                            "seed": row["seed"], "client": int(match["client"]),
                            "variant": row.get(f"variant_c{match['client']}"),
                            "method": match["method"], "accuracy": value,
                            "relative": (value - local) / local})
    return pd.DataFrame(records)


def replicate_gains(frame, setting):
    """Per replicate, each method's mean relative change over the benign clients.

    Returns
    -------
    pandas.DataFrame
        Index: replicate seeds; one column per method (``rel_<method>``), in %.
    """
    sub = frame[frame["setting"] == setting]
    columns = [c for c in sub.columns if c.startswith("rel_")]
    gains = 100.0 * sub.set_index("seed")[columns]
    gains.columns = [c.removeprefix("rel_") for c in columns]
    return gains


def paired_bootstrap(values, n_resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED):
    """Mean and 95% percentile interval of paired per-replicate values (replicates
    resampled with replacement: scipy.stats.bootstrap, one sample).

    Parameters
    ----------
    values : array-like of shape (n_replicates,)
        Per replicate, a paired difference (e.g. a method's gain over local LoRA).

    Returns
    -------
    mean, low, high : float
    """
    from scipy import stats

    values = np.asarray(values, dtype=float)
    if len(values) < 2:  # one replicate says nothing about the spread
        return float(np.mean(values)) if len(values) else np.nan, np.nan, np.nan
    if np.ptp(values) == 0:  # no spread: every resample is the point
        return float(values[0]), float(values[0]), float(values[0])
    result = stats.bootstrap((values,), np.mean, n_resamples=n_resamples,
                             confidence_level=0.95, method="percentile",
                             random_state=np.random.default_rng(seed))
    interval = result.confidence_interval
    return float(values.mean()), float(interval.low), float(interval.high)


def gain_table(frame):
    """Per setting and method: accuracy, gain over local LoRA and CLAIR's margin over the
    method, each with its paired bootstrap interval (replicates resampled).

    Returns
    -------
    pandas.DataFrame
        Columns ``setting, method, replicates, accuracy, gain, gain_low, gain_high,
        clair_margin, margin_low, margin_high, win`` (accuracy in %, gains in % of local
        accuracy;
        ``win`` the share of (replicate, client) pairs above local LoRA).
    """
    import pandas as pd

    clients = client_table(frame)
    rows = []
    for setting in sorted(frame["setting"].unique()):
        gains = replicate_gains(frame, setting)
        rows_of_setting = frame[frame["setting"] == setting]
        sub = clients[clients["setting"] == setting]
        for method in [m for m in METHODS if m in gains.columns]:
            gain = paired_bootstrap(gains[method])
            margin = (paired_bootstrap(gains["clair"] - gains[method])
                      if method != "clair" and "clair" in gains else (np.nan,) * 3)
            wins = sub.loc[sub["method"] == method, "relative"]
            rows.append({"setting": setting, "method": method, "replicates": len(gains),
                         "accuracy": 100.0 * float(rows_of_setting[f"acc_{method}"].mean()),
                         "gain": gain[0], "gain_low": gain[1], "gain_high": gain[2],
                         "clair_margin": margin[0], "margin_low": margin[1],
                         "margin_high": margin[2], "win": float((wins > 0).mean())})
    return pd.DataFrame(rows)


def _kind(row, k):
    if f"kind_c{k}" in row:
        return row[f"kind_c{k}"]
    n_clients, n_bad = int(row["n_clients"]), int(row["n_contaminated"])
    kinds = row["contamination"].split(",")
    first_bad = n_clients - n_bad
    return kinds[(k - first_bad) % len(kinds)] if k >= first_bad else "benign"


def flagged_by_kind(frame, methods=("clair", "clair_per_module", "clair_rank_given")):
    """Share of clients flagged, per setting, CLAIR variant and kind of client.

    Returns
    -------
    pandas.DataFrame
        Index ``(setting, method)``, one column per kind ("benign" and the attacks).
    """
    import pandas as pd

    records = []
    for row in frame.to_dict("records"):
        for k in range(int(row["n_clients"])):
            for method in methods:
                column = f"flagged_{method}_c{k}"
                if column in row:
                    records.append((row["setting"], method, _kind(row, k), bool(row[column])))
    table = pd.DataFrame(records, columns=["setting", "method", "kind", "flagged"])
    return table.pivot_table(index=["setting", "method"], columns="kind",
                             values="flagged", aggfunc="mean")


def detection_table(frame, methods=("clair", "clair_per_module", "clair_rank_given")):
    """Mean precision, recall and false-positive rate per setting and CLAIR variant, and
    the distribution of the chosen joint rank."""
    import pandas as pd

    rows = []
    for setting, sub in frame.groupby("setting"):
        for method in methods:
            if f"recall_{method}" not in sub:
                continue
            ranks = sub[f"rank_{method}"]
            rows.append({"setting": setting, "method": method,
                         "precision": float(sub[f"precision_{method}"].mean()),
                         "recall": float(sub[f"recall_{method}"].mean()),
                         "false_positive_rate": float(
                             sub[f"false_positive_rate_{method}"].mean()),
                         "rank_median": float(ranks.median()),
                         "rank_modal_share": float((ranks == ranks.mode()[0]).mean())})
    return pd.DataFrame(rows)

"""Copying experiment: what stands in for a module-flagged update.

Until commit cdaa0d4 the default joint refinement quarantined an update that its
module's test flags in a client not flagged overall (``flagged_updates="quarantine"``:
the module's mean of the unflagged clients stands in for it); this study's comparison
made ``"clip"`` the default. On the second confirmatory block the quarantine cost CLAIR
its gain in the heterogeneous replicates where the joint rank fell below the task
variants' directions (the paper's copying section). ``flagged_updates="clip"`` scales
such an update down to the largest unflagged norm instead, keeping its direction: this
study compares the two on the same fine-tuned clients, replicate by replicate.

Its ``small`` scale is development (``seed_block`` ``"flagged-development"``, 20
replicates per cell), on which clipping looked better; its ``full`` scale is the
comparison pre-registered in ``simulations/copying/PROTOCOL.md`` (amendment 3) on fresh
seeds (``"flagged-confirmatory"``, 100 per cell), decided by :func:`verdicts`. Cells: the copying
experiment's two settings (16 clients, 4 contaminated) and the design sweep's point of
the largest quarantine loss (8 heterogeneous clients, 3 contaminated). Each row holds,
per policy, the benign clients' mean relative change against local LoRA
(``rel_<policy>``), the joint rank and the client flags, plus the per-client columns of
the copying rows (:func:`simulations.copying.replicate.client_columns`).
"""

from __future__ import annotations

import numpy as np

from simulations.copying.replicate import DEFAULT_PARAMS

from .._framework import Study
from .copying import TINY

__all__ = ["STUDY", "simulate_one", "cells", "POLICIES", "MARGINS", "summary", "verdicts"]

#: The stand-ins compared (``refine_adapters(flagged_updates=...)``).
POLICIES = ("quarantine", "clip")
SEED_BLOCK = "flagged-development"
#: The pre-registered comparison's seed block (PROTOCOL.md, amendment 3).
CONFIRMATORY_BLOCK = "flagged-confirmatory"
#: Its decision rules (PROTOCOL.md, amendment 3), per cell (setting, n_clients): the
#: margin of the mean paired difference clip - quarantine, in points of gain over local
#: LoRA, that its 95% paired bootstrap interval must lie in. Clip must gain at least
#: 0.1 points (the copying protocol's smallest gain that counts) where the quarantine
#: costs small groups, and lose at most 0.25 points in the homogeneous setting.
MARGINS = {("heterogeneous", 16): (0.1, np.inf), ("heterogeneous", 8): (0.1, np.inf),
           ("homogeneous", 16): (-0.25, np.inf)}


def cells(seed_block=SEED_BLOCK, **overrides):
    """The copying settings at 16 clients and the sweep's 8-client heterogeneous point."""
    base = dict(DEFAULT_PARAMS, seed_block=seed_block)
    grid = [dict(base, setting="homogeneous", n_variants=1),
            dict(base, setting="heterogeneous", n_variants=3),
            dict(base, setting="heterogeneous", n_variants=3, n_clients=8,
                 n_contaminated=3)]
    return [dict(cell, **overrides) for cell in grid]


def simulate_one(params, seed):
    """One replicate: the copying clients fine-tuned once, CLAIR's default refinement
    under each policy of :data:`POLICIES`, every benign client evaluated."""
    from clairstat.lora import module_factors, refine_adapters
    from clairstat.metrics import detection_scores
    from simulations.copying.methods import _local
    from simulations.copying.replicate import (_evaluate, _finetune_all, base_and_tasks,
                                               base_model_columns, client_columns)

    params, model, pre, specs, contaminated, variant = base_and_tasks(params, seed)
    adapters, _, config = _finetune_all(model, specs, params, seed)
    updates = {"local": _local(module_factors(adapters, config))}
    info = {}
    for policy in POLICIES:
        fit = refine_adapters(adapters, config, test_level=params["test_level"],
                              random_state=seed, flagged_updates=policy)
        updates[policy] = {name: np.asarray(stack) for name, stack in fit.per_client.items()}
        info[f"rank_{policy}"] = float(fit.rank_selection.rank)
        info[f"module_flags_{policy}"] = int(sum(int(np.sum(flags))
                                                for flags in fit.module_flagged.values()))
        scores = detection_scores(fit.flagged, contaminated)
        info.update({f"{name}_{policy}": value for name, value in scores.items()})
        info.update({f"flagged_{policy}_c{k}": bool(f) for k, f in enumerate(fit.flagged)})
    accuracy = _evaluate(model, updates, specs, contaminated, params, seed)
    kinds = [spec.corruption or "benign" for spec in specs]
    row = client_columns(accuracy, contaminated, variant, kinds)
    row.update(info)
    row.update(base_model_columns(pre))
    return row


STUDY = Study(
    name="copying_flagged",
    description="copying task: the default refinement with module-flagged updates "
                "quarantined vs clipped to the unflagged clients' largest norm "
                "(small: development; full: pre-registered, PROTOCOL.md amendment 3)",
    grids={"smoke": cells(**TINY)[:2], "small": cells(),
           "full": cells(CONFIRMATORY_BLOCK)},
    replicates={"smoke": 2, "small": 20, "full": 100},
    simulate_one=simulate_one)


def summary(frame):
    """Per cell, each policy's gain over local LoRA and their paired difference.

    Parameters
    ----------
    frame : pandas.DataFrame
        Rows of this study.

    Returns
    -------
    pandas.DataFrame
        One row per cell (setting, clients, contaminated): replicates; per policy the
        mean gain in % with its paired bootstrap interval (``gain_<policy>``,
        ``low_<policy>``, ``high_<policy>``), the mean joint rank and the recall and
        false-positive rate of the client flags; ``diff``/``diff_low``/``diff_high``,
        clip minus quarantine per replicate; ``clip_better``/``clip_worse``, the
        replicates where clip's gain is higher/lower by more than 0.5 points.
    """
    import pandas as pd

    from simulations.copying.analysis import paired_bootstrap

    records = []
    keys = ["setting", "n_clients", "n_contaminated"]
    for cell, sub in frame.groupby(keys, sort=True):
        record = dict(zip(keys, cell), replicates=len(sub))
        for policy in POLICIES:
            gain, low, high = paired_bootstrap(100.0 * sub[f"rel_{policy}"])
            record.update({f"gain_{policy}": gain, f"low_{policy}": low,
                           f"high_{policy}": high,
                           f"rank_{policy}": float(sub[f"rank_{policy}"].mean()),
                           f"recall_{policy}": float(sub[f"recall_{policy}"].mean()),
                           f"fpr_{policy}":
                               float(sub[f"false_positive_rate_{policy}"].mean())})
        diff = 100.0 * (sub["rel_clip"] - sub["rel_quarantine"])
        record["diff"], record["diff_low"], record["diff_high"] = paired_bootstrap(diff)
        record["clip_better"] = int((diff > 0.5).sum())
        record["clip_worse"] = int((diff < -0.5).sum())
        records.append(record)
    return pd.DataFrame(records)


def verdicts(frame):
    """The pre-registered decision (PROTOCOL.md, amendment 3) on a table of this study.

    Per cell of :data:`MARGINS`, the verdict of the paired difference's interval against
    its margin (``validation``'s rule: pass inside, fail outside, else inconclusive), and
    an identity: the client flags do not depend on the policy (they come from the
    modules' tests, before the refinement). ``flagged_updates="clip"`` is recommended
    as the default only if every verdict is pass.

    Returns
    -------
    pandas.DataFrame
        One row per rule: ``rule``, ``observed``, ``low``, ``high``, ``margin``,
        ``verdict``.
    """
    import pandas as pd

    from validation._core import decide

    table = summary(frame).set_index(["setting", "n_clients"])
    rows = []
    for (setting, n_clients), margin in MARGINS.items():
        if (setting, n_clients) not in table.index:
            raise ValueError(f"no rows of the cell {setting}, {n_clients} clients")
        cell = table.loc[(setting, n_clients)]
        interval = (cell["diff_low"], cell["diff_high"])
        rows.append({"rule": f"clip - quarantine, {setting}, {n_clients} clients",
                     "observed": cell["diff"], "low": interval[0], "high": interval[1],
                     "margin": margin, "verdict": decide(interval, margin)})
    differ = 0
    for row in frame.to_dict("records"):
        differ += any(row[f"flagged_clip_c{k}"] != row[f"flagged_quarantine_c{k}"]
                      for k in range(int(row["n_clients"])))
    rows.append({"rule": "replicates whose client flags differ between the policies",
                 "observed": differ, "low": differ, "high": differ,
                 "margin": (-np.inf, 0.5),
                 "verdict": decide((differ, differ), (-np.inf, 0.5), kind="identity")})
    return pd.DataFrame(rows)


if __name__ == "__main__":  # python -m simulations.studies.copying_flagged [SCALE]
    import sys

    from simulations import load_results

    scale = sys.argv[1] if len(sys.argv) > 1 else "small"
    frame = load_results(STUDY, scale, current_only=True)  # this grid's rows, deduplicated
    if frame.empty:
        sys.exit(f"copying_flagged, {scale}: no rows (python -m simulations "
                 f"copying_flagged --scale {scale})")
    print(f"copying_flagged, {scale}: {len(frame)} rows of {len(STUDY.tasks(scale))}; "
          f"base model {sorted(set(frame['pretrain_weights']))}")
    print(summary(frame).round(3).to_string(index=False))
    print()
    print(verdicts(frame).round(3).to_string(index=False))

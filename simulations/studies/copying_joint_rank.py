"""Copying experiment: how the joint refinement's rank decides CLAIR's gain (development).

With 8 heterogeneous clients, 3 of them contaminated, CLAIR's default refinement loses
to local LoRA on the pre-registered block of ``copying_flagged`` (``-2.3 %``), while it
gains with 16 clients. There the joint rank, chosen by bi-cross-validation across
modules with the one-standard-error rule (:func:`clairstat.aggregation.cross_validated_rank`),
was 0 in 12 of the 100 replicates, which pulls every benign client onto one mean although
the clients hold three task variants. This study measures, on the same clients, the gain
at every joint rank that the collaborative set supports, beside the rank the rule chose
(``rank_cv``) and the rank of the smallest cross-validated error (``best_rank``): is the
loss the rank's, and which rule would pick better?

Cells: those of ``copying_flagged`` (16 clients, homogeneous and heterogeneous, and the
8-client heterogeneous point), on this study's own seeds (``seed_block``
``"joint-rank-development"``, the ``small`` scale). Development only: a rule chosen from
these rows needs a comparison on fresh seeds, fixed before its run, before it may become
the default; the ``full`` scale (``"joint-rank-confirmatory"``, 100 replicates per cell)
is that comparison (simulations/copying/PROTOCOL.md, amendment 6, run at 2300f49: the
smallest-error rank judged better, the default since amendment 7).

Per row: ``rel_default`` (the one-standard-error rule, the default until PROTOCOL
amendment 7, pinned so that the rows reproduce; ``rank_cv``), ``rel_r<k>`` for every
joint rank ``k`` from 0 to ``max_rank`` (``n_members - 1``, at most :data:`MAX_RANK`; the client
flags do not depend on the joint rank, and the replicate checks it), ``rel_best`` (the
row's ``rel_r<best_rank>``), the cross-validation's mean relative errors
(``cv_error_r<k>``) and standard errors (``cv_se_r<k>``), and the client flags.
"""

from __future__ import annotations

import numpy as np

from .._framework import Study
from .copying import TINY
from .copying_flagged import cells as _flagged_cells

__all__ = ["STUDY", "simulate_one", "cells", "MAX_RANK", "rank_table",
           "MAX_COST_POINTS", "amendment_six"]

SEED_BLOCK = "joint-rank-development"
#: Fresh seeds for a comparison of rank rules fixed before its run (the ``full`` scale;
#: PROTOCOL amendment 6).
CONFIRMATORY_BLOCK = "joint-rank-confirmatory"
#: The largest joint rank evaluated (the cross-validation's own cap, 10).
MAX_RANK = 10


def cells(seed_block=SEED_BLOCK, **overrides):
    """``copying_flagged``'s three cells, on this study's seed block."""
    return _flagged_cells(seed_block, **overrides)


def simulate_one(params, seed):
    """One replicate: the clients fine-tuned once, CLAIR's default refinement and the
    same refinement at every joint rank, every benign client evaluated."""
    from clairstat.lora import module_factors, refine_adapters
    from clairstat.metrics import detection_scores
    from simulations.copying.methods import _local
    from simulations.copying.replicate import (_evaluate, _finetune_all, base_and_tasks,
                                               base_model_columns, client_columns)

    params, model, pre, specs, contaminated, variant = base_and_tasks(params, seed)
    adapters, _, config = _finetune_all(model, specs, params, seed)
    updates = {"local": _local(module_factors(adapters, config))}
    # "default" is the one-standard-error rule, the default when this study was run
    # (simulations/copying/PROTOCOL.md, amendment 6); named so that the rows reproduce
    # after the default became the smallest error (amendment 7).
    fit = refine_adapters(adapters, config, test_level=params["test_level"],
                          random_state=seed, rank_rule="one-standard-error")
    updates["default"] = {name: np.asarray(s) for name, s in fit.per_client.items()}
    selection = fit.rank_selection
    n_members = int((~fit.flagged).sum())
    max_rank = min(max(n_members - 1, 0), MAX_RANK)
    info = {"rank_cv": int(fit.rank_selection.rank) if selection else 0,
            "best_rank": int(selection.best_rank) if selection else 0,
            "n_members": n_members, "max_rank": max_rank}
    if selection is not None:
        for k, (error, se) in enumerate(zip(selection.mean_errors,
                                            selection.standard_error)):
            info[f"cv_error_r{k}"], info[f"cv_se_r{k}"] = float(error), float(se)
    for rank in range(max_rank + 1):
        given = refine_adapters(adapters, config, test_level=params["test_level"],
                                random_state=seed, rank=rank)
        if not np.array_equal(given.flagged, fit.flagged):
            raise RuntimeError("the client flags changed with the joint rank")
        updates[f"r{rank}"] = {name: np.asarray(s) for name, s in given.per_client.items()}
    accuracy = _evaluate(model, updates, specs, contaminated, params, seed)
    kinds = [spec.corruption or "benign" for spec in specs]
    row = client_columns(accuracy, contaminated, variant, kinds)
    row.update(info)
    row["rel_best"] = row[f"rel_r{min(info['best_rank'], max_rank)}"]
    scores = detection_scores(fit.flagged, contaminated)
    row.update({f"{name}_clair": value for name, value in scores.items()})
    row.update({f"flagged_clair_c{k}": bool(f) for k, f in enumerate(fit.flagged)})
    row.update(base_model_columns(pre))
    return row


STUDY = Study(
    name="copying_joint_rank",
    description="copying task: CLAIR's gain at every joint rank beside the rank the "
                "bi-cross-validation chose (development)",
    grids={"smoke": cells(**TINY)[:2], "small": cells(),
           "full": cells(CONFIRMATORY_BLOCK)},
    replicates={"smoke": 2, "small": 20, "full": 100},
    simulate_one=simulate_one)


def rank_table(frame):
    """Per cell: replicates, the default's gain, the gain at the cross-validation's best
    rank and at the best fixed rank per replicate (an oracle), in % with paired
    bootstrap intervals for the first two; the mean gain at each fixed rank (over the
    replicates that support it); how often the rule chose rank 0.

    Returns
    -------
    pandas.DataFrame
    """
    import pandas as pd

    from simulations.copying.analysis import paired_bootstrap

    records = []
    keys = ["setting", "n_clients", "n_contaminated"]
    for cell, sub in frame.groupby(keys, sort=True):
        record = dict(zip(keys, cell), replicates=len(sub))
        ranks = sorted(int(c.removeprefix("rel_r")) for c in sub.columns
                       if c.startswith("rel_r") and sub[c].notna().any())
        for name in ("default", "best"):
            gain, low, high = paired_bootstrap(100.0 * sub[f"rel_{name}"])
            record.update({f"gain_{name}": gain, f"low_{name}": low, f"high_{name}": high})
        diff = 100.0 * (sub["rel_best"] - sub["rel_default"])
        record["best_minus_default"], record["diff_low"], record["diff_high"] = (
            paired_bootstrap(diff))
        oracle = sub[[f"rel_r{k}" for k in ranks]].max(axis=1)
        record["gain_oracle"] = 100.0 * float(oracle.mean())
        record["rank_cv_zero"] = int((sub["rank_cv"] == 0).sum())
        for k in ranks:
            record[f"gain_r{k}"] = 100.0 * float(sub[f"rel_r{k}"].mean())
        records.append(record)
    return pd.DataFrame(records)


if __name__ == "__main__":  # python -m simulations.studies.copying_joint_rank [SCALE]
    import sys

    from simulations import load_results

    scale = sys.argv[1] if len(sys.argv) > 1 else "small"
    frame = load_results(STUDY, scale, current_only=True)
    if frame.empty:
        sys.exit(f"copying_joint_rank, {scale}: no rows (python -m simulations "
                 f"copying_joint_rank --scale {scale})")
    print(f"copying_joint_rank, {scale}: {len(frame)} rows of {len(STUDY.tasks(scale))}; "
          f"base model {sorted(set(frame['pretrain_weights']))}")
    print(rank_table(frame).round(2).to_string(index=False))


#: PROTOCOL.md amendment 6, (b): the largest cost in points the smallest-error rule may
#: show at 16 clients (the lower end of each 16-client cell's paired interval above
#: minus this), against the 2 points expected at 8 clients.
MAX_COST_POINTS = 0.5


def amendment_six(table):
    """The decision of PROTOCOL.md amendment 6 from :func:`rank_table`'s rows.

    (a) at 8 heterogeneous clients the paired difference's interval lies above 0;
    (b) in each 16-client cell its lower end is above ``-MAX_COST_POINTS``. Returns
    ``{"a": bool, "b": bool, "better": bool}``; ``better`` is (a) and (b).
    """
    small = table[(table["n_clients"] == 8) & (table["setting"] == "heterogeneous")]
    large = table[table["n_clients"] == 16]
    if len(small) != 1 or len(large) != 2:
        raise ValueError("the amendment's three cells (8 heterogeneous, 16 heterogeneous, "
                         "16 homogeneous) are not all in the table.")
    first = bool(small["diff_low"].iloc[0] > 0)
    second = bool((large["diff_low"] > -MAX_COST_POINTS).all())
    return {"a": first, "b": second, "better": first and second}


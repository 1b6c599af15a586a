"""Copying experiment, development study: what stands in for a module-flagged update.

The default joint refinement quarantines an update that its module's test flags in a
client not flagged overall (``flagged_updates="quarantine"``: the module's mean of the
unflagged clients stands in for it). On the second confirmatory block that cost CLAIR
its gain in the heterogeneous replicates where the joint rank fell below the task
variants' directions (the paper's copying section). ``flagged_updates="clip"`` scales
such an update down to the largest unflagged norm instead, keeping its direction: this
study compares the two on the same fine-tuned clients, replicate by replicate.

It is development, not confirmation: its seeds are its own (``seed_block``
``"flagged-development"``), and no default is decided by it. Cells: the copying
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

__all__ = ["STUDY", "simulate_one", "cells", "POLICIES"]

#: The stand-ins compared (``refine_adapters(flagged_updates=...)``).
POLICIES = ("quarantine", "clip")
SEED_BLOCK = "flagged-development"


def cells(**overrides):
    """The copying settings at 16 clients and the sweep's 8-client heterogeneous point."""
    base = dict(DEFAULT_PARAMS, seed_block=SEED_BLOCK)
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
    from simulations.copying.pretrain import pretrain
    from simulations.copying.replicate import (_evaluate, _finetune_all, cache_dir,
                                               client_columns, pretrain_config)
    from simulations.copying.tasks import client_tasks

    params = {**DEFAULT_PARAMS, **params}
    model, pre = pretrain(pretrain_config(params), cache_dir(), log=lambda *_: None)
    rng = np.random.default_rng(seed)
    specs, contaminated, variant = client_tasks(
        params["n_clients"], params["n_contaminated"], params["n_content"],
        params["n_moved"], params["n_variants"], params["contamination"].split(","), rng)
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
    row.update({"pretrain_key": pre["key"], "pretrain_weights": pre["weights"],
                "base_accuracy": pre["base_accuracy"]})
    return row


STUDY = Study(
    name="copying_flagged",
    description="copying task, development: the default refinement with module-flagged "
                "updates quarantined vs clipped to the unflagged clients' largest norm",
    grids={"smoke": cells(**TINY)[:2], "small": cells(), "full": cells()},
    replicates={"smoke": 2, "small": 20, "full": 50},
    simulate_one=simulate_one)

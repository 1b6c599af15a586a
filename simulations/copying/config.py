"""Configurations of the copying experiment: ``tiny`` (tests), ``quick`` and ``paper``.

Every knob of a replicate is a cell parameter (a JSON scalar), so a results row says how
it was produced and ``simulate_one(params, seed)`` depends on nothing else. The configs
map onto the scales of :mod:`simulations._framework`: tiny -> ``smoke``, quick ->
``small``, paper -> ``full``.
"""

from __future__ import annotations

__all__ = ["CONFIGS", "SCALE_OF", "METHODS", "cells", "replicates"]

SCALE_OF = {"tiny": "smoke", "quick": "small", "paper": "full"}

# Method names as they appear in the results (column prefixes) and in the figures.
METHODS = ("local", "fedavg", "fedit", "fedrot", "glora", "median", "clair", "clair_joint",
           "clair_joint_r", "clair_lora", "clair_oracle", "fedavg_oracle")

_COMMON = {
    # pretraining (shared by every replicate; cached by content hash)
    "pretrain_steps": 1500, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_content": 24,
    # clients
    "n_clients": 16, "n_contaminated": 4,
    "contamination": "random,reverse,backdoor,adversarial", "adversarial_scale": 3.0,
    "n_moved": 6, "rank": 4, "lora_alpha": 8.0, "mlp": False,
    "n_train": 32, "steps": 60, "batch_size": 8, "lr": 5e-3, "n_test": 512,
    # methods
    "fedrot_lam": 0.5, "clair_rank": 4, "test_level": 0.05,
}
_SETTINGS = {"homogeneous": 1, "heterogeneous": 3}  # setting -> number of task variants

CONFIGS = {
    "tiny": dict(_COMMON, pretrain_steps=200, n_clients=6, n_contaminated=2, clair_rank=2,
                 contamination="reverse,adversarial", steps=10, n_test=64),
    "quick": dict(_COMMON),
    "paper": dict(_COMMON),
}
_REPLICATES = {"tiny": 1, "quick": 5, "paper": 100}


def cells(config):
    """Parameter cells of a config: one per setting (homogeneous, heterogeneous).

    ``clair_rank`` is the rank given to the ``clair_joint_r`` variant and the oracle;
    ``clair`` and ``clair_joint`` choose it with the estimator's rule.
    """
    return [dict(CONFIGS[config], setting=setting, n_variants=n_variants)
            for setting, n_variants in _SETTINGS.items()]


def replicates(config):
    """Number of replicates per cell."""
    return _REPLICATES[config]

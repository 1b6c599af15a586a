"""Copying experiment: federated LoRA on a Transformer copying task (claims C1-C4 of
docs/theory.md: CLAIR's default beats local LoRA and every other rule in both settings).

Sixteen clients fine-tune LoRA adapters of a small pretrained Transformer on a copying
task through a relabelling of six tokens; four are contaminated (random targets,
reversed copies, a backdoor, a flipped and scaled update). *Homogeneous*: one relabelling
for every benign client; *heterogeneous*: three, clients assigned in turn. Each replicate
measures every benign client's masked next-token accuracy under every method
(:mod:`simulations.copying.methods`) and CLAIR's flags (:mod:`simulations.copying.replicate`).

Scales are seed blocks (the ``seed_block`` cell parameter enters the seed derivation, so
each block's seeds are its own): ``smoke`` a tiny configuration for the tests (2
replicates per setting, the fewest an interval needs),
``small`` the development block (10 replicates per setting; the quarantine of
module-flagged updates when it chose the method, rerun on its seeds with each default
since: the clipping, the predictive LoRA null and the smallest-error joint rank, the
earlier tables archived),
``full`` the fifth confirmatory block fixed in ``simulations/copying/PROTOCOL.md``
(amendment 7: 100 replicates per setting on seeds used nowhere before, the clipping
default, the predictive LoRA null and the smallest-error joint rank; the first four
confirmatory blocks, before the quarantine, on it, on the clipping with the previous
null, and with the one-standard-error joint rank, are archived in
``simulations/results/archive/``).
"""

from __future__ import annotations

from simulations.copying.replicate import DEFAULT_PARAMS, simulate_one as _simulate_one

from .._framework import Study
from ._common import check_control

__all__ = ["STUDY", "simulate_one", "cells", "SETTINGS", "TINY"]

#: setting -> number of task variants among the benign clients.
SETTINGS = {"homogeneous": 1, "heterogeneous": 3}
#: The tests' configuration (seconds, not minutes).
TINY = {"pretrain_steps": 200, "n_clients": 6, "n_contaminated": 2, "clair_rank": 2,
        "contamination": "reverse,adversarial", "steps": 10, "n_test": 64}


def cells(seed_block, **overrides):
    """One cell per setting, every parameter explicit (a row says how it was made)."""
    return [dict(DEFAULT_PARAMS, **overrides, setting=setting, n_variants=n_variants,
                 seed_block=seed_block) for setting, n_variants in SETTINGS.items()]


def simulate_one(params, seed, control=None):
    """One replicate (:func:`simulations.copying.replicate.simulate_one`); ``control``
    ``"local-refinement"`` replaces CLAIR's refined updates by the local ones,
    ``"no-detection"`` makes CLAIR flag nobody, ``"narrow-null"`` halves the spread of
    its per-module tests' null, ``"no-correction"`` leaves each module's p-values
    unadjusted and flags a client that any module's test flags, ``"fedavg-refinement"``
    gives every client FedAvg's aggregate as CLAIR's refined update and
    ``"halfway-fedavg"`` the point halfway between its local update and that aggregate
    (the negative controls)."""
    check_control(control, STUDY)
    return _simulate_one(params, seed, control=control)


STUDY = Study(
    name="copying",
    description="federated LoRA on the copying task: CLAIR's default vs local LoRA, "
                "averaging, factor averaging and robust rules (pre-registered)",
    grids={"smoke": cells("smoke", **TINY), "small": cells("development"),
           "full": cells("confirmatory-5")},
    replicates={"smoke": 2, "small": 10, "full": 100},
    simulate_one=simulate_one,
    controls=("local-refinement", "no-detection", "narrow-null", "no-correction",
              "fedavg-refinement", "halfway-fedavg"))

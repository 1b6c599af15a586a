"""CLAIR's detection round by round in personalized federated LoRA (no Flower).

The multi-round study (:mod:`simulations.studies.copying_rounds`) records CLAIR's flags
after the last round only, and its clean designs flag benign clients far more often than
a test at 5% should. This study replays CLAIR's side of those rounds in one process to
see when and how: each client trains ``steps_per_round`` steps from what the server
sent it (:class:`simulations.studies.copying_rounds._Clients`, the same data, seeds and
minibatches), the server runs exactly what
:class:`clairstat.integrations.flower.LoraStrategy` with ``rule="clair"`` and
``personalized=True`` runs on the replies (:func:`clairstat.lora.aggregate_adapters`,
then :func:`clairstat.lora.personalized_state_dicts`), and each client receives its
refined adapter (a flagged client its own). Without Flower's message passing the rounds
take seconds, so every module's test can be recorded in every round.

Per round ``t`` a row holds:

- ``modules_r<t>``: the modules fitted; ``module_benign_any_r<t>``: those whose test
  flags at least one benign client (each module's test is at ``test_level`` with BH
  over the clients, so under its null this is at most ``test_level`` per module);
  ``module_benign_flags_r<t>``: benign flags summed over modules;
- ``module_group_r<t>``: modules whose flags hold every client of some variant with at
  least 3 clients (a whole task variant taken for contamination);
- ``client_benign_r<t>``: benign clients flagged at client level (the vote over modules,
  :func:`clairstat.aggregation.client_flags`), what decides who gets refined;
  ``client_attackers_r<t>``: attackers flagged; ``client_kept_flag_r<t>``: clients
  flagged in this round and in the one before;
- ``joint_rank_r<t>``: the joint refinement's rank; ``module_rank_r<t>``: the mean of
  the modules' ranks.

The cells are those of the multi-round study (both designs, both settings); seeds are
derived from this study's name, so no replicate of the multi-round study is reused.
"""

from __future__ import annotations

import time

import numpy as np

from .._framework import Study
from .copying_rounds import ROUND_PARAMS, TINY, _Clients, cells

__all__ = ["STUDY", "simulate_one", "replay"]

#: A variant needs this many clients for its whole group being flagged to count.
MIN_GROUP = 3


def replay(params, seed):
    """CLAIR's personalized rounds for one replicate: the per-round fits.

    Returns
    -------
    list of dict
        Per round: ``client_flags`` (bool, n_clients), ``module_flags`` (bool,
        n_modules x n_clients), ``module_ranks`` (int, n_modules), ``joint_rank`` (int
        or None), ``solver`` (the fits' ``solver_``).
    contaminated, variant : ndarray of shape (n_clients,)
    """
    from clairstat.lora import aggregate_adapters, personalized_state_dicts
    from simulations.copying.finetune import FinetuneConfig, initial_adapter, lora_config
    from simulations.copying.pretrain import pretrain
    from simulations.copying.replicate import DEFAULT_PARAMS, cache_dir, pretrain_config
    from simulations.copying.tasks import client_tasks

    params = {**DEFAULT_PARAMS, **ROUND_PARAMS, **params}
    model, _ = pretrain(pretrain_config(params), cache_dir(), log=lambda *_: None)
    # As copying_rounds.simulate_one: the same tasks, initial adapter and client seeds.
    specs, contaminated, variant = client_tasks(
        params["n_clients"], params["n_contaminated"], params["n_content"],
        params["n_moved"], params["n_variants"], params["contamination"].split(","),
        np.random.default_rng(seed))
    config = FinetuneConfig(rank=params["rank"], lora_alpha=params["lora_alpha"],
                            mlp=params["mlp"], n_train=params["n_train"],
                            batch_size=params["batch_size"], lr=params["lr"])
    seeds = np.random.SeedSequence(seed).generate_state(len(specs) + 1)
    init = {k: v.numpy() for k, v in initial_adapter(model, config, int(seeds[0])).items()}
    clients = _Clients(model, specs, config, seeds[1:], params["adversarial_scale"],
                       int(params["steps_per_round"]))
    lora = lora_config(config)
    # LoraStrategy's weights: the example counts (all n_train here) capped and normalised.
    weights = np.full(len(specs), 1.0 / len(specs))
    states, trace = [init] * len(specs), []
    for server_round in range(1, int(params["rounds"]) + 1):
        replies = [clients.reply(k, states[k], server_round) for k in range(len(specs))]
        results = aggregate_adapters("clair", replies, lora, weights,
                                     test_level=params["test_level"], random_state=seed)
        states, flagged = personalized_state_dicts(results, replies, lora)
        fitted = [result for result in results.values()
                  if result.extras.get("estimator") is not None]
        selection = fitted[0].extras.get("rank_selection") if fitted else None
        trace.append({
            "client_flags": np.asarray(flagged, dtype=bool),
            "module_flags": np.array([result.extras["flagged"] for result in fitted],
                                     dtype=bool).reshape(len(fitted), len(specs)),
            "module_ranks": np.array([result.extras["estimator"].rank_ for result in fitted]),
            "joint_rank": None if selection is None else int(selection.rank),
            "solver": fitted[0].extras["estimator"].solver_ if fitted else "none"})
    return trace, np.asarray(contaminated, dtype=bool), np.asarray(variant)


def _whole_groups(flags, variant, benign):
    """Whether ``flags`` hold every benign client of some variant of >= MIN_GROUP."""
    for value in np.unique(variant[benign]):
        group = benign & (variant == value)
        if group.sum() >= MIN_GROUP and np.all(flags[group]):
            return True
    return False


def simulate_one(params, seed):
    """One replicate: the per-round counts of the module docstring."""
    start = time.perf_counter()
    trace, contaminated, variant = replay(params, seed)
    benign = ~contaminated
    row, before = {}, np.zeros(len(benign), dtype=bool)
    for t, fit in enumerate(trace, start=1):
        module_flags, flags = fit["module_flags"], fit["client_flags"]
        row.update({
            f"modules_r{t}": int(module_flags.shape[0]),
            f"module_benign_any_r{t}": int(np.sum(np.any(module_flags[:, benign], axis=1))),
            f"module_benign_flags_r{t}": int(np.sum(module_flags[:, benign])),
            f"module_group_r{t}": int(sum(_whole_groups(f, variant, benign)
                                          for f in module_flags)),
            f"client_benign_r{t}": int(np.sum(flags & benign)),
            f"client_attackers_r{t}": int(np.sum(flags & contaminated)),
            f"client_kept_flag_r{t}": int(np.sum(flags & before)),
            f"joint_rank_r{t}": (np.nan if fit["joint_rank"] is None
                                 else int(fit["joint_rank"])),
            f"module_rank_r{t}": float(np.mean(fit["module_ranks"]))
            if len(fit["module_ranks"]) else np.nan})
        before = flags
    row.update({"n_benign": int(benign.sum()), "n_attackers": int(contaminated.sum()),
                "seconds": time.perf_counter() - start, "solver": trace[-1]["solver"]})
    return row


def _cells(**overrides):
    return cells(seed_block="rounds_detection", **overrides)


STUDY = Study(
    name="rounds_detection",
    description="CLAIR's per-module and client-level flags round by round in personalized "
                "federated LoRA rounds (the copying_rounds design, replayed without Flower)",
    grids={"smoke": [cell for cell in _cells(**TINY)
                     if (cell["design"], cell["setting"]) in (("clean", "homogeneous"),
                                                              ("contaminated",
                                                               "heterogeneous"))],
           "small": _cells(), "full": _cells()},
    replicates={"smoke": 1, "small": 20, "full": 100},
    simulate_one=simulate_one)

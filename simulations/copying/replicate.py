"""One replicate of the copying experiment: tasks, client fine-tuning, methods, accuracy.

:func:`simulate_one` is the ``simulate_one`` of the studies ``copying`` and
``copying_sweep`` (:mod:`simulations.studies`); it depends on nothing but its cell
parameters and its seed. The pretrained base model is cached under
``$CLAIRSTAT_CACHE_DIR`` (default ``.cache/clairstat`` in the repository), keyed by the
content of its configuration and of the model, task and pretraining sources.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

__all__ = ["simulate_one", "pretrain_config", "cache_dir", "DEFAULT_PARAMS", "client_columns",
           "base_model_columns"]

REPO = Path(__file__).resolve().parents[2]
_CACHE_ENV = "CLAIRSTAT_CACHE_DIR"

#: Every knob of a replicate (a cell may override any of them).
DEFAULT_PARAMS = {
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


def cache_dir():
    """Cache directory: ``$CLAIRSTAT_CACHE_DIR`` or ``.cache/clairstat`` in the repo."""
    return Path(os.environ.get(_CACHE_ENV, REPO / ".cache" / "clairstat"))


def pretrain_config(params):
    """The :class:`PretrainConfig` of a cell."""
    from .model import ModelConfig
    from .pretrain import PretrainConfig

    model = ModelConfig(vocab_size=params["n_content"] + 2, d_model=params["d_model"],
                        n_heads=params["n_heads"], n_layers=params["n_layers"],
                        d_mlp=2 * params["d_model"])
    return PretrainConfig(model=model, n_content=params["n_content"],
                          steps=params["pretrain_steps"])


def _finetune_all(model, specs, params, seed):
    """Every client's adapter (attackers' corrupted), the shared init, the LoRA config."""
    from .finetune import FinetuneConfig, finetune_client, lora_config

    config = FinetuneConfig(rank=params["rank"], lora_alpha=params["lora_alpha"],
                            mlp=params["mlp"], n_train=params["n_train"],
                            steps=params["steps"], batch_size=params["batch_size"],
                            lr=params["lr"])
    seeds = np.random.SeedSequence(seed).generate_state(len(specs) + 1)
    adapters = []
    for spec, client_seed in zip(specs, seeds[1:]):
        state, init = finetune_client(model, spec, config, int(seeds[0]), int(client_seed),
                                      (4, 10))
        if spec.corruption == "adversarial":  # benign training, then a flipped, scaled update
            state = {k: -params["adversarial_scale"] * v if ".lora_B." in k else v
                     for k, v in state.items()}
        adapters.append(state)
    return adapters, init, lora_config(config)


def _evaluate(model, updates, specs, contaminated, params, seed):
    """Accuracy of every method for every benign client on its own (clean) task."""
    from .finetune import evaluate_updates
    from .tasks import TaskSpec, make_batch

    tests = {}
    accuracy = {method: np.full(len(specs), np.nan) for method in updates}
    for k, spec in enumerate(specs):
        if contaminated[k]:
            continue
        if spec.relabel not in tests:  # clients of one variant share a test set
            rng = np.random.default_rng([seed, len(tests)])
            tests[spec.relabel] = make_batch(TaskSpec(spec.relabel), params["n_test"], rng)
        for method, per_module in updates.items():
            own = {name.removeprefix("base_model.model."): value[k]
                   for name, value in per_module.items()}
            accuracy[method][k] = evaluate_updates(model, own, tests[spec.relabel])
    return accuracy


def base_model_columns(pre):
    """The base model a row was fine-tuned from (:func:`base_and_tasks`'s ``pre``): its
    cache key, its weights' digest and its accuracy on the base task."""
    return {"pretrain_key": pre["key"], "pretrain_weights": pre["weights"],
            "base_accuracy": pre["base_accuracy"]}


def client_columns(accuracy, contaminated, variant, kinds):
    """The per-client columns of a copying row (the analysis reads these).

    Per client k: ``contaminated_ck``, ``variant_ck``, ``kind_ck`` and every method's
    ``acc_<method>_ck``; per method the benign clients' mean ``acc_<method>`` and mean
    relative change against local LoRA ``rel_<method>`` (when any client is benign).
    """
    benign = ~contaminated
    row = {f"contaminated_c{k}": bool(c) for k, c in enumerate(contaminated)}
    row.update({f"variant_c{k}": int(v) for k, v in enumerate(variant)})
    row.update({f"kind_c{k}": kind for k, kind in enumerate(kinds)})
    local = accuracy["local"]
    for method, acc in accuracy.items():
        row.update({f"acc_{method}_c{k}": float(a) for k, a in enumerate(acc)})
        if benign.any():
            row[f"acc_{method}"] = float(np.mean(acc[benign]))
            row[f"rel_{method}"] = float(np.mean((acc[benign] - local[benign])
                                                 / local[benign]))
    return row


def _row(accuracy, contaminated, variant, kinds, info):
    """Flat row: per-client and mean accuracies, relative changes, detection, timings."""
    from clairstat.metrics import detection_scores

    from .methods import CLAIR_VARIANTS

    row = client_columns(accuracy, contaminated, variant, kinds)
    for method in CLAIR_VARIANTS:
        flagged = info.pop(f"flagged_{method}")
        scores = detection_scores(flagged, contaminated)
        row.update({f"{name}_{method}": value for name, value in scores.items()})
        row.update({f"flagged_{method}_c{k}": bool(f) for k, f in enumerate(flagged)})
    row.update(info)
    return row


def base_and_tasks(params, seed):
    """The base model and one replicate's client tasks.

    Returns
    -------
    params : dict
        ``params`` over :data:`DEFAULT_PARAMS`.
    model, pre
        :func:`simulations.copying.pretrain.pretrain`'s model and information.
    specs, contaminated, variant
        :func:`simulations.copying.tasks.client_tasks` of the cell, drawn from ``seed``.
    """
    from .pretrain import pretrain
    from .tasks import client_tasks

    params = {**DEFAULT_PARAMS, **params}
    model, pre = pretrain(pretrain_config(params), cache_dir(), log=lambda *_: None)
    specs, contaminated, variant = client_tasks(
        params["n_clients"], params["n_contaminated"], params["n_content"],
        params["n_moved"], params["n_variants"], params["contamination"].split(","),
        np.random.default_rng(seed))
    return params, model, pre, specs, contaminated, variant


def simulate_one(params, seed, control=None):
    """One replicate: tasks, client fine-tuning, every method, evaluation (a flat dict).

    Parameters
    ----------
    params : dict
        Cell parameters (:data:`DEFAULT_PARAMS` keys, ``setting``, ``n_variants``; a
        ``seed_block`` only changes the seeds the study derives).
    seed : int
    control : {None, "local-refinement", "no-detection", "narrow-null", "no-correction", \
"fedavg-refinement", "halfway-fedavg"}
        A negative control (:func:`simulations.copying.methods.run_methods`).

    Returns
    -------
    dict
        Per client ``k``: ``contaminated_ck``, ``variant_ck``, ``kind_ck``,
        ``acc_<method>_ck``, ``flagged_<clair variant>_ck``; per method the benign mean
        ``acc_<method>`` and mean relative change ``rel_<method>``; detection scores,
        chosen ranks, seconds per stage, and the pretraining's key and accuracy.
    """
    import torch

    from .methods import run_methods

    params, model, pre, specs, contaminated, variant = base_and_tasks(params, seed)
    start = time.perf_counter()
    adapters, init, config = _finetune_all(model, specs, params, seed)
    info = {"seconds_finetune": time.perf_counter() - start}
    updates, method_info = run_methods(adapters, config, init, contaminated, params, seed,
                                       control)
    info.update(method_info)
    start = time.perf_counter()
    accuracy = _evaluate(model, updates, specs, contaminated, params, seed)
    info["seconds_evaluate"] = time.perf_counter() - start
    info.update({"pretrain_seconds": pre["seconds"], "pretrain_cached": pre["cached"],
                 **base_model_columns(pre)})
    kinds = [spec.corruption or "benign" for spec in specs]
    return _row(accuracy, contaminated, variant, kinds, info)

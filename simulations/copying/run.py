"""One replicate of the copying experiment, the study declaration and the command line.

``python -m simulations copying --config quick|paper`` pretrains (or loads the cached
base model), runs every missing replicate through :func:`simulations.run_study` (rows
appended as they finish, resumable, locally or on a Dask cluster) and draws the figures.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

__all__ = ["simulate_one", "make_study", "main", "pretrain_config", "DEFAULT_RESULTS_DIR"]

REPO = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS_DIR = REPO / "simulations" / "results" / "copying"
_CACHE_ENV = "CLAIRSTAT_CACHE_DIR"
_THREADS_ENV = "CLAIRSTAT_TORCH_THREADS"


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


def _row(accuracy, contaminated, variant, info):
    """Flat row: per-client and mean accuracies, relative changes, detection, timings."""
    from clairstat.metrics import detection_scores

    benign = ~contaminated
    row = {f"contaminated_c{k}": bool(c) for k, c in enumerate(contaminated)}
    row.update({f"variant_c{k}": int(v) for k, v in enumerate(variant)})
    local = accuracy["local"]
    for method, acc in accuracy.items():
        row.update({f"acc_{method}_c{k}": float(a) for k, a in enumerate(acc)})
        row[f"acc_{method}"] = float(np.mean(acc[benign]))
        row[f"rel_{method}"] = float(np.mean((acc[benign] - local[benign]) / local[benign]))
    for method in ("clair", "clair_joint", "clair_joint_r"):
        flagged = info.pop(f"flagged_{method}")
        scores = detection_scores(flagged, contaminated)
        row.update({f"{name}_{method}": value for name, value in scores.items()})
        row.update({f"flagged_{method}_c{k}": bool(f) for k, f in enumerate(flagged)})
    row.update(info)
    return row


def simulate_one(params, seed):
    """One replicate: tasks, client fine-tuning, every method, evaluation (a flat dict)."""
    import torch

    from .methods import run_methods
    from .pretrain import pretrain
    from .tasks import client_tasks

    torch.set_num_threads(int(os.environ.get(_THREADS_ENV, "1")))
    model, pre = pretrain(pretrain_config(params), cache_dir(), log=lambda *_: None)
    rng = np.random.default_rng(seed)
    specs, contaminated, variant = client_tasks(
        params["n_clients"], params["n_contaminated"], params["n_content"],
        params["n_moved"], params["n_variants"], params["contamination"].split(","), rng)
    start = time.perf_counter()
    adapters, init, config = _finetune_all(model, specs, params, seed)
    info = {"seconds_finetune": time.perf_counter() - start}
    updates, method_info = run_methods(adapters, config, init, contaminated, params, seed)
    info.update(method_info)
    start = time.perf_counter()
    accuracy = _evaluate(model, updates, specs, contaminated, params, seed)
    info["seconds_evaluate"] = time.perf_counter() - start
    info.update({"pretrain_seconds": pre["seconds"], "pretrain_cached": pre["cached"],
                 "pretrain_key": pre["key"], "base_accuracy": pre["base_accuracy"]})
    return _row(accuracy, contaminated, variant, info)


def make_study():
    """The :class:`simulations.Study` of the copying experiment (all three configs)."""
    from simulations import Study

    from .config import CONFIGS, SCALE_OF, cells, replicates

    return Study(name="copying",
                 description="federated LoRA on the copying task: CLAIR vs local, "
                             "averaging and the published rules",
                 grids={SCALE_OF[c]: cells(c) for c in CONFIGS},
                 replicates={SCALE_OF[c]: replicates(c) for c in CONFIGS},
                 simulate_one=simulate_one)


def _parser():
    parser = argparse.ArgumentParser(prog="python -m simulations copying",
                                     description=__doc__)
    parser.add_argument("--config", choices=("tiny", "quick", "paper"), default="quick")
    parser.add_argument("--n-jobs", type=int, default=1)
    parser.add_argument("--backend", choices=("loky", "dask"), default="loky")
    parser.add_argument("--scheduler", default=None, help="Dask scheduler address")
    parser.add_argument("--results-dir", default=str(DEFAULT_RESULTS_DIR))
    parser.add_argument("--cache-dir", default=None,
                        help=f"pretraining cache (default ${_CACHE_ENV} or .cache/clairstat)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replicate")
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv=None):
    """Command line of the experiment; returns the exit status."""
    from simulations import results_path, run_study

    from .config import SCALE_OF, cells
    from .pretrain import pretrain

    args = _parser().parse_args(argv)
    if args.cache_dir:
        os.environ[_CACHE_ENV] = args.cache_dir  # inherited by local workers
    os.environ[_THREADS_ENV] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    pretrain(pretrain_config(cells(args.config)[0]), cache_dir())  # once, before workers
    study, scale = make_study(), SCALE_OF[args.config]
    start = time.perf_counter()
    n_new = run_study(study, scale, n_jobs=args.n_jobs, backend=args.backend,
                      scheduler=args.scheduler, results_dir=args.results_dir,
                      progress=not args.no_progress)
    path = results_path(study.name, scale, args.results_dir)
    print(f"copying[{args.config}]: {n_new} new replicates in "
          f"{time.perf_counter() - start:.0f} s -> {path}")
    if not args.no_figures:
        from .figures import main as figures_main

        figures_main(args.results_dir, Path(args.results_dir) / "figures", scale=scale)
    return 0

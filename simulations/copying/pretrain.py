"""Pretraining on the base copying task, shipped with the repository, else cached.

The key hashes the pretraining configuration together with the source of this module,
of ``model.py`` and of ``tasks.py``: editing any of them makes a new key. Weights are
stored with safetensors (no pickle is ever loaded).

Where the weights come from, in order: ``base_models/pretrain-<key>.safetensors`` next
to this module (committed: the default configuration's model, so that every checkout
fine-tunes the same base model), the cache (``cache_dir``), else training, whose result
goes to the cache. Training is not portable across machines: it runs on one thread
whatever the caller's setting (torch's CPU kernels split their reductions by thread
count, and the same seed gave different weights on one and on two threads), which makes
it repeat on one machine, but the kernels also depend on the CPU's instruction set: on
one machine the same seed gave four different models under four settings of torch's and
MKL's CPU dispatch (``simulations/README.md``), and none was the model another machine
had trained. Every result row records the weights' SHA-256 (``pretrain_weights``), so
rows from different base models cannot be mixed unnoticed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .model import ModelConfig, TinyTransformer
from .tasks import TaskSpec, make_batch

__all__ = ["PretrainConfig", "pretrain", "load_pretrained", "masked_loss", "accuracy",
           "cache_key", "weights_digest", "SHIPPED_DIR"]

#: Base models committed with the repository (looked up before the cache).
SHIPPED_DIR = Path(__file__).parent / "base_models"


@dataclass(frozen=True)
class PretrainConfig:
    """Pretraining settings (the model sizes are part of the key through ``model``)."""

    model: ModelConfig = ModelConfig()
    n_content: int = 24
    min_len: int = 4
    max_len: int = 10
    steps: int = 3000
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    seed: int = 0


def masked_loss(model, inputs, targets, mask):
    """Cross-entropy over the copy positions only (scalar tensor)."""
    logits = model(inputs)
    return F.cross_entropy(logits[mask], targets[mask])


@torch.no_grad()
def accuracy(model, inputs, targets, mask):
    """Masked next-token accuracy: the share of copy positions predicted exactly."""
    predicted = model(inputs).argmax(-1)
    return float((predicted[mask] == targets[mask]).float().mean())


def cache_key(config: PretrainConfig) -> str:
    """SHA-256 of the configuration and of the code that defines model, task and training
    (line endings normalised: a CRLF checkout has the same key)."""
    digest = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode())
    here = Path(__file__).parent
    for name in ("model.py", "tasks.py", "pretrain.py"):
        digest.update((here / name).read_bytes().replace(b"\r\n", b"\n"))
    return digest.hexdigest()[:16]


def weights_digest(model) -> str:
    """SHA-256 (first 16 hex digits) of the model's tensors in ``state_dict`` order."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _train(config: PretrainConfig):
    from clairstat._threads import thread_limits

    with thread_limits(1):  # the weights depend on the thread count (module docstring)
        return _train_one_thread(config)


def _train_one_thread(config: PretrainConfig):
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = TinyTransformer(config.model)
    base = TaskSpec(tuple(range(config.n_content)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, config.steps,
                                                   pct_start=0.1)
    for _ in range(config.steps):
        batch = make_batch(base, config.batch_size, rng, config.min_len, config.max_len)
        optimizer.zero_grad()
        masked_loss(model, *batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return model


def pretrain(config: PretrainConfig, cache_dir, log=print):
    """Pretrained model for ``config``: shipped with the repository, from the cache, or
    trained (and then cached).

    Returns
    -------
    model : TinyTransformer (eval mode)
    info : dict
        ``key``, ``cached`` (bool: not trained by this call), ``shipped`` (bool: the
        repository's file), ``seconds`` (training time, 0 when cached),
        ``weights`` (:func:`weights_digest`), ``base_accuracy`` (masked accuracy on
        1024 fresh base-task sequences).
    """
    from safetensors.torch import save_file

    name = f"pretrain-{cache_key(config)}.safetensors"
    path = Path(cache_dir) / "copying" / name
    shipped = SHIPPED_DIR / name
    cached = shipped.exists() or path.exists()
    start = time.perf_counter()
    if cached:
        model = load_pretrained(config, shipped if shipped.exists() else path)
    else:
        model = _train(config).eval()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # one per process: workers may race
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        tmp.replace(path)  # atomic: a concurrent or interrupted run never sees half a file
    seconds = 0.0 if cached else time.perf_counter() - start
    base = TaskSpec(tuple(range(config.n_content)))
    test = make_batch(base, 1024, np.random.default_rng(10_000 + config.seed),
                      config.min_len, config.max_len)
    info = {"key": path.stem, "cached": cached, "shipped": shipped.exists(),
            "seconds": seconds,
            "weights": weights_digest(model), "base_accuracy": accuracy(model, *test)}
    log(f"pretrained model {path.name}: cached={cached}, shipped={info['shipped']}, "
        f"{seconds:.1f} s, "
        f"base accuracy {info['base_accuracy']:.3f}")
    return model, info


def load_pretrained(config: PretrainConfig, path):
    """Load weights with safetensors (never unpickles) into a fresh model."""
    from safetensors.torch import load_file

    model = TinyTransformer(config.model)
    model.load_state_dict(load_file(str(path)))
    return model.eval()

"""Client LoRA fine-tuning with peft, and evaluation of a (merged) update."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from .model import ATTENTION_MODULES, MLP_MODULES
from .pretrain import accuracy, masked_loss
from .tasks import make_batch

__all__ = ["FinetuneConfig", "lora_config", "finetune_client", "evaluate_updates",
           "initial_adapter", "client_data", "train_adapter"]


@dataclass(frozen=True)
class FinetuneConfig:
    """LoRA and optimisation settings of every client."""

    rank: int = 4
    lora_alpha: float = 8.0
    mlp: bool = False
    n_train: int = 64
    steps: int = 60
    batch_size: int = 16
    lr: float = 5e-3


def lora_config(config: FinetuneConfig):
    """peft ``LoraConfig`` on the attention projections (and the MLP if asked)."""
    from peft import LoraConfig

    targets = list(ATTENTION_MODULES) + (list(MLP_MODULES) if config.mlp else [])
    return LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                      target_modules=targets)


def _peft_model(base_model, config, init_seed):
    """Wrap a copy of ``base_model``; ``init_seed`` fixes the shared LoRA initialisation."""
    from peft import get_peft_model

    torch.manual_seed(init_seed)  # every client starts from the same A (as in federated LoRA)
    return get_peft_model(copy.deepcopy(base_model), lora_config(config))


def finetune_client(base_model, spec, config: FinetuneConfig, init_seed, seed, lengths):
    """Fine-tune LoRA adapters on ``config.n_train`` sequences of task ``spec``.

    Parameters
    ----------
    base_model : TinyTransformer
        The pretrained model (left untouched).
    spec : TaskSpec
    init_seed, seed : int
        Seed of the shared LoRA initialisation and of the client's data and batches.
    lengths : tuple (min_len, max_len)

    Returns
    -------
    state : dict of str to Tensor
        ``get_peft_model_state_dict`` of the trained adapter (``lora_A``: (r, d_in),
        ``lora_B``: (d_out, r)).
    init_state : dict of str to Tensor
        The same keys at initialisation (the reference FedRot-LoRA aligns to).
    """
    from peft import get_peft_model_state_dict

    model = _peft_model(base_model, config, init_seed)
    init_state = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    inputs, targets, mask = make_batch(spec, config.n_train, rng, *lengths)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    model.train()
    for _ in range(config.steps):
        rows = torch.from_numpy(rng.choice(config.n_train, config.batch_size, replace=False))
        optimizer.zero_grad()
        masked_loss(model, inputs[rows], targets[rows], mask[rows]).backward()
        optimizer.step()
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return state, init_state


def initial_adapter(base_model, config: FinetuneConfig, init_seed):
    """The shared LoRA initialisation of :func:`finetune_client` (``lora_B = 0``).

    Returns
    -------
    dict of str to Tensor
        ``get_peft_model_state_dict`` keys; ``lora_A``: (r, d_in), ``lora_B``: (d_out, r).
    """
    from peft import get_peft_model_state_dict

    model = _peft_model(base_model, config, init_seed)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def client_data(spec, config: FinetuneConfig, seed, lengths):
    """The ``config.n_train`` training sequences :func:`finetune_client` draws for ``seed``.

    Returns
    -------
    inputs, targets : LongTensor of shape (n_train, 2 * max_len)
    mask : BoolTensor of shape (n_train, 2 * max_len)
    """
    return make_batch(spec, config.n_train, np.random.default_rng(seed), *lengths)


def train_adapter(base_model, state, data, config: FinetuneConfig, steps, seed):
    """Train the adapter ``state`` for ``steps`` AdamW steps (a fresh optimiser) on ``data``.

    One federated round of a client: it loads what it received and trains on its own
    sequences, its minibatches drawn from ``seed``.

    Parameters
    ----------
    base_model : TinyTransformer
        The pretrained model (left untouched).
    state : dict of str to array-like
        ``get_peft_model_state_dict`` keys (``lora_A``: (r, d_in), ``lora_B``: (d_out, r)).
    data : tuple (inputs, targets, mask)
        :func:`client_data` (``config.n_train`` sequences).
    steps, seed : int

    Returns
    -------
    dict of str to Tensor
        The trained adapter, same keys and shapes as ``state``.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    model = _peft_model(base_model, config, seed)  # its LoRA init is overwritten next
    loaded = set_peft_model_state_dict(model, {k: torch.as_tensor(np.asarray(v))
                                               for k, v in state.items()})
    if loaded.unexpected_keys:  # peft ignores them: training would start from the init
        raise ValueError(f"keys not in the adapter: {loaded.unexpected_keys}")
    inputs, targets, mask = data
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        rows = torch.from_numpy(rng.choice(len(inputs), config.batch_size, replace=False))
        optimizer.zero_grad()
        masked_loss(model, inputs[rows], targets[rows], mask[rows]).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


@torch.no_grad()
def evaluate_updates(base_model, updates, test_batch):
    """Masked accuracy of ``base_model`` with dense updates added to its weights.

    Parameters
    ----------
    base_model : TinyTransformer
    updates : dict of str to ndarray of shape (d_out, d_in)
        Module name (as in ``base_model.named_modules()``) to the update ``Delta W``.
    test_batch : tuple (inputs, targets, mask)

    Returns
    -------
    float
    """
    model = copy.deepcopy(base_model)
    modules = dict(model.named_modules())
    for name, delta in updates.items():
        weight = modules[name].weight
        weight += torch.as_tensor(np.asarray(delta), dtype=weight.dtype)
    return accuracy(model.eval(), *test_batch)

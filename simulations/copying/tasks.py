"""Copying tasks: the base task, client variants and contaminated variants.

A sequence is ``x_1 .. x_L SEP y_1 .. y_L PAD ..`` with content tokens ``x_i``; the model
reads it shifted by one, and the loss and the accuracy count only the ``L`` copy positions
(the targets ``y_i``). The base task copies (``y_i = x_i``); a client task copies through a
relabelling ``y_i = pi(x_i)``; contaminated tasks corrupt the targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["TaskSpec", "make_batch", "client_tasks", "CONTAMINATIONS"]

CONTAMINATIONS = ("random", "reverse", "shift", "backdoor", "adversarial")


@dataclass(frozen=True)
class TaskSpec:
    """One copying task.

    Attributes
    ----------
    relabel : tuple of int, length n_content
        ``y_i = relabel[x_i]`` (the identity for the base task).
    corruption : str or None
        None (benign) or one of ``random``, ``reverse``, ``shift``, ``backdoor``. The
        ``adversarial`` contamination trains on the benign task and corrupts the update.
    trigger, target : int
        Backdoor: sequences containing ``trigger`` copy as the constant ``target``.
    """

    relabel: tuple
    corruption: str | None = None
    trigger: int = 0
    target: int = 1
    backdoor_rate: float = 0.5
    extra: dict = field(default_factory=dict, compare=False)


def _targets(spec, x, rng):
    """Targets ``y`` (L,) for the content ``x`` (L,) under ``spec``."""
    y = np.asarray(spec.relabel)[x]
    if spec.corruption == "random":
        return rng.integers(0, len(spec.relabel), size=len(x))
    if spec.corruption == "reverse":
        return y[::-1]
    if spec.corruption == "shift":
        return np.roll(y, -1)
    if spec.corruption == "backdoor" and spec.trigger in x:
        return np.full_like(y, spec.target)
    return y


def _content(spec, length, rng, n_content):
    x = rng.integers(0, n_content, size=length)
    if spec.corruption == "backdoor" and rng.random() < spec.backdoor_rate:
        x[rng.integers(0, length)] = spec.trigger
    return x


def make_batch(spec, n_sequences, rng, min_len=4, max_len=10):
    """Sample ``n_sequences`` sequences of task ``spec``.

    Parameters
    ----------
    spec : TaskSpec
    n_sequences : int
    rng : numpy.random.Generator
    min_len, max_len : int
        Range of the content length ``L`` (uniform).

    Returns
    -------
    inputs, targets : LongTensor of shape (n_sequences, 2 * max_len)
    mask : BoolTensor of shape (n_sequences, 2 * max_len)
        True at the copy positions (where the loss and the accuracy count).
    """
    n_content = len(spec.relabel)
    sep, pad = n_content, n_content + 1
    seqs = np.full((n_sequences, 2 * max_len + 1), pad, dtype=np.int64)
    mask = np.zeros((n_sequences, 2 * max_len), dtype=bool)
    for row in range(n_sequences):
        length = int(rng.integers(min_len, max_len + 1))
        x = _content(spec, length, rng, n_content)
        seqs[row, : 2 * length + 1] = np.concatenate([x, [sep], _targets(spec, x, rng)])
        mask[row, length : 2 * length] = True
    seqs = torch.from_numpy(seqs)
    return seqs[:, :-1], seqs[:, 1:], torch.from_numpy(mask)


def _derangements(moved, n_variants, rng):
    """``n_variants`` distinct permutations of ``moved`` that move every element."""
    variants = []
    while len(variants) < n_variants:
        perm = rng.permutation(moved)
        if np.all(perm != moved) and not any(np.array_equal(perm, v) for v in variants):
            variants.append(perm)
    return variants


def client_tasks(n_clients, n_contaminated, n_content, n_moved, n_variants, contamination,
                 rng):
    """Tasks of one replicate: benign relabellings from a shared family, then attackers.

    Every benign client copies through a relabelling that moves only the ``n_moved``
    tokens of a shared subset; the relabellings come from a family of ``n_variants``
    derangements of that subset (1: homogeneous setting, one common new task; more:
    heterogeneous, clients assigned to variants in turn). The last ``n_contaminated``
    clients are contaminated, cycling through the kinds in ``contamination``.

    Returns
    -------
    specs : list of TaskSpec, length n_clients
    contaminated : ndarray of bool, shape (n_clients,)
    variant : ndarray of int, shape (n_clients,)
        The benign variant each client's task (or, for attackers, cover task) uses.
    """
    moved = rng.choice(n_content, size=n_moved, replace=False)
    family = []
    for perm in _derangements(moved, n_variants, rng):
        relabel = np.arange(n_content)
        relabel[moved] = perm
        family.append(tuple(int(v) for v in relabel))
    variant = np.arange(n_clients) % n_variants
    contaminated = np.arange(n_clients) >= n_clients - n_contaminated
    trigger, target = (int(t) for t in rng.choice(n_content, size=2, replace=False))
    specs = []
    for k in range(n_clients):
        kind = contamination[(k - (n_clients - n_contaminated)) % len(contamination)]
        corruption = kind if contaminated[k] else None
        specs.append(TaskSpec(family[variant[k]], corruption, trigger, target))
    return specs, contaminated, variant

"""Study 7, robustness: each aggregation rule's error against the benign target as the
contamination fraction grows, under five attacks.

Benign client i: ``B_i = U* + noise N_i`` (d, r) and ``A_i = A0 + heterogeneity Z_i``
(r, k), so ``Delta W_i`` lies in the shared column space U* up to noise. The benign
target is the mean of the benign updates. A fraction ``gamma`` of clients attack:

- ``random``: a Gaussian rank-r update with the benign norm;
- ``scaled``: a benign-like update times 10;
- ``sign_flip``: minus a benign-like update;
- ``stealthy``: benign-like, plus a common in-subspace shift (inside U*) of three times
  the benign heterogeneity;
- ``colluding``: every attacker sends the same off-subspace update, three times the
  benign norm.

Each replicate measures ``||aggregate - target||_F / ||target||_F`` for every rule,
against two targets: the mean of the benign clients' updates (``error_*``), and the
benign mean of the data-generating model, ``E[B_i A_i] = U* A0`` (``error_pop_*``; not an
output of any rule). CLAIR runs with the rank given (``clair``) and estimated
(``clair_rank_unknown``); its detection is scored for both. Also: the benign radius ``max_i ||Delta W_i - target|| /
||target||`` (for the geometric median's breakdown bound) and whether the coordinate-wise
median and trimmed mean stay inside the benign clients' coordinate range.

Control ``no-detection``: CLAIR flags nobody, so its global update is the mean of every
client's update (the collaborative set is everyone). Control ``narrow-null``: the
per-module tests' predictive null has half its spread (a liberal test). Control
``robust-mean``: the plain mean's aggregate is Krum's (every ``error_mean`` and
``error_pop_mean`` is Krum's), a rule that does not break down with up to ``(n - 3) // 2``
attackers, so the mean's error no longer grows with gamma.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np

from clairstat.aggregation import aggregate
from clairstat.metrics import detection_scores

from .._framework import Study, grid
from .._controls import broken_lora_tests
from ._common import check_control

__all__ = ["STUDY", "simulate_one", "ATTACKS", "RULES", "make_clients"]

ATTACKS = ("random", "scaled", "sign_flip", "stealthy", "colluding")
RULES = {"mean": ("fedex", {}), "fedit": ("fedit", {}), "median": ("median", {}),
         "trimmed_mean": ("trimmed_mean", {"trim": 0.2}), "krum": ("krum", {}),
         "multikrum": ("krum", {"multi": "auto"}), "geomedian": ("geomedian", {}),
         "clair": ("clair", {}), "clair_rank_unknown": ("clair", {})}
CLAIR_RULES = ("clair", "clair_rank_unknown")


def _benign(rng, subspace, a0, noise, heterogeneity):
    d, rank = subspace.shape
    return (subspace + noise * rng.standard_normal((d, rank)),
            a0 + heterogeneity * rng.standard_normal(a0.shape))


def _attack(rng, kind, subspace, a0, params, norm, collusion):
    """One attacker's (B, A); ``collusion`` is the shared pair of the colluding attack."""
    noise, heterogeneity = params["noise"], params["heterogeneity"]
    if kind == "colluding":
        return collusion
    if kind == "random":
        b_mat, a_mat = rng.standard_normal(subspace.shape), rng.standard_normal(a0.shape)
        return b_mat * norm / np.linalg.norm(b_mat @ a_mat), a_mat
    b_mat, a_mat = _benign(rng, subspace, a0, noise, heterogeneity)
    if kind == "scaled":
        return 10.0 * b_mat, a_mat
    if kind == "sign_flip":
        return -b_mat, a_mat
    if kind == "stealthy":
        return b_mat, a_mat + collusion[1]
    raise ValueError(f"unknown attack {kind!r}; valid: {ATTACKS}.")


def _collusion(rng, kind, subspace, a0, params, norm):
    """The common ingredient: an off-subspace pair (colluding) or an in-subspace shift."""
    if kind == "stealthy":
        shift = rng.standard_normal(a0.shape)
        return None, 3.0 * params["heterogeneity"] * np.sqrt(a0.size) * shift / np.linalg.norm(
            shift)
    b_mat = rng.standard_normal(subspace.shape)
    b_mat -= subspace @ (subspace.T @ b_mat)  # leave the shared column space
    a_mat = rng.standard_normal(a0.shape)
    return b_mat * 3.0 * norm / np.linalg.norm(b_mat @ a_mat), a_mat


def make_clients(rng, params):
    """Client factors, the attacker mask, the benign clients' updates (n_benign, d, k) and
    the model's benign mean ``U* A0`` (d, k)."""
    n_clients, d, k, rank = params["n_clients"], params["d"], params["k"], params["rank"]
    subspace = np.linalg.qr(rng.standard_normal((d, rank)))[0]
    a0 = rng.standard_normal((rank, k))
    benign = [_benign(rng, subspace, a0, params["noise"], params["heterogeneity"])
              for _ in range(n_clients)]
    target_updates = np.stack([b @ a for b, a in benign])
    norm = float(np.median(np.linalg.norm(target_updates, axis=(1, 2))))
    n_bad = int(round(params["gamma"] * n_clients))
    collusion = _collusion(rng, params["attack"], subspace, a0, params, norm)
    factors = [_attack(rng, params["attack"], subspace, a0, params, norm, collusion)
               for _ in range(n_bad)] + benign[n_bad:]
    contaminated = np.arange(n_clients) < n_bad
    return factors, contaminated, target_updates[n_bad:], subspace @ a0


def _options(name, options, n_clients, rank, seed):
    options = dict(options)
    if options.get("multi") == "auto":  # multi-Krum keeps n - f updates
        options["multi"] = n_clients - (n_clients - 3) // 2
    if name == "clair":
        options.update(rank=rank, random_state=seed)
    if name == "clair_rank_unknown":
        options.update(random_state=seed)
    return options


@contextlib.contextmanager
def _one_torch_thread():
    """Replicates run in parallel processes: one torch thread each avoids oversubscription."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _in_range(update, benign):
    """Whether every coordinate of ``update`` lies in the benign clients' [min, max]."""
    # Rounding of the row-block products: a few ulps of the largest benign entry.
    slack = 64 * np.finfo(float).eps * np.max(np.abs(benign))
    return bool(np.all(update >= benign.min(0) - slack) and
                np.all(update <= benign.max(0) + slack))


def _run_rules(factors, rank, seed, control=None):
    results = {}
    with warnings.catch_warnings(), _one_torch_thread(), broken_lora_tests(control):
        warnings.simplefilter("ignore")  # all-flagged / non-convergence: still measured
        for name, (rule, options) in RULES.items():
            results[name] = aggregate(rule, factors,
                                      **_options(name, options, len(factors), rank, seed))
    return results


def _clair_outputs(results, control):
    """CLAIR's (update, flags) per CLAIR rule; ``no-detection`` flags nobody, so the
    update is the mean of every client's update."""
    outputs = {}
    for name in CLAIR_RULES:
        update, flagged = results[name].update, np.asarray(results[name].flagged, bool)
        if control == "no-detection":
            update, flagged = results["mean"].update, np.zeros_like(flagged)
        outputs[name] = (update, flagged)
    return outputs


def simulate_one(params, seed, control=None):
    """One replicate: every rule's relative error, CLAIR's detection, range checks."""
    check_control(control, STUDY)
    rng = np.random.default_rng(seed)
    factors, contaminated, benign, population = make_clients(rng, params)
    target = benign.mean(axis=0)
    scale, pop_scale = np.linalg.norm(target), np.linalg.norm(population)
    results = _run_rules(factors, params["rank"], seed, control)
    updates = {name: res.update for name, res in results.items()}
    if control == "robust-mean":  # the "mean" does not break down: it is Krum's
        updates["mean"] = results["krum"].update
    clair = _clair_outputs(results, control)
    updates.update({name: update for name, (update, _) in clair.items()})
    out = {f"error_{name}": float(np.linalg.norm(update - target) / scale)
           for name, update in updates.items()}
    out.update({f"error_pop_{name}": float(np.linalg.norm(update - population) / pop_scale)
                for name, update in updates.items()})
    for name, (_, flagged) in clair.items():
        prefix = "clair" if name == "clair" else "clair_ru"
        scores = detection_scores(flagged, contaminated)
        out.update({f"{prefix}_{key}": float(value) for key, value in scores.items()})
    out.update(n_contaminated=int(contaminated.sum()),
               benign_radius=float(np.max(np.linalg.norm(benign - target, axis=(1, 2))) / scale),
               median_in_range=_in_range(results["median"].update, benign),
               trimmed_in_range=_in_range(results["trimmed_mean"].update, benign),
               krum_benign=bool(not contaminated[results["krum"].selected[0]]))
    return out


_BASE = dict(n_clients=20, d=32, k=24, rank=4, heterogeneity=0.5, noise=0.05)
STUDY = Study(
    name="robustness",
    description="Error of each aggregation rule against the benign target as the "
                "contamination fraction grows, for five attacks",
    grids={"smoke": grid(**{**_BASE, "d": 12, "k": 8, "rank": 2},
                         attack=["random", "scaled", "colluding", "sign_flip", "stealthy"],
                         # 0.0: the level without attackers, which the narrow-null
                         # control must break at this scale too; 20 clients as at the
                         # other scales (with 10 the control's rate was about 0.26, and
                         # its smoke test failed its target by one replicate: a review)
                         gamma=[0.0, 0.1, 0.2]),
           "small": grid(**_BASE, attack=list(ATTACKS), gamma=[0.0, 0.1, 0.2, 0.3, 0.4]),
           "full": grid(**_BASE, attack=list(ATTACKS),
                        gamma=[0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45])},
    replicates={"smoke": 2, "small": 10, "full": 100},
    simulate_one=simulate_one,
    controls=("no-detection", "narrow-null", "robust-mean"))

"""The methods compared per client, each mapping client adapters to per-client updates.

Every method returns, for each adapted module, the dense updates the clients end with,
an array of shape (n_clients, d_out, d_in) (the modules are tiny here). Global methods
give every client the same update.

- ``local``: the client's own LoRA update.
- ``fedavg``: the exact mean of all updates (FLoRA's stacking gives it exactly).
- ``fedit``, ``fedrot``, ``glora``, ``median``: the rules of method section 5
  (FedRot-LoRA aligns A to the shared initialisation; GLoRA's consensus rank is the LoRA
  rank; ``median`` is the coordinate-wise median, the Byzantine-robust choice).
- ``clair``: CLAIR per module with the estimator's defaults (library default).
- ``clair_joint``: CLAIR over all modules jointly, defaults (rank chosen by its rule).
- ``clair_joint_r``: the same with the rank given (``clair_rank``).
- ``clair_lora``: ``clair_joint_r``'s refined updates as rank-r peft adapters (deployable).
- ``clair_oracle``: the joint refinement with the true collaborative set, rank
  ``clair_rank`` (isolates the cost of detection).
- ``fedavg_oracle``: the mean over the true benign clients.
"""

from __future__ import annotations

import time

import numpy as np

from clairstat.aggregation import reduce_factors
from clairstat.lora import aggregate_adapters, module_factors, refine_adapters

__all__ = ["run_methods", "oracle_refine"]


def _local(factor_lists):
    return {name: np.stack([b @ a for b, a in f]) for name, f in factor_lists.items()}


def _broadcast(results, n_clients):
    return {name: np.repeat(res.update[None], n_clients, axis=0)
            for name, res in results.items()}


def oracle_refine(updates, collaborative, rank):
    """CLAIR's refinement with a known collaborative set (docs/method_notes.md, section 8).

    Parameters
    ----------
    updates : ndarray of shape (n_clients, p, q)
    collaborative : ndarray of bool, shape (n_clients,)
    rank : int
        Dimension of the shared column subspace (refit on the collaborative set).

    Returns
    -------
    ndarray of shape (n_clients, p, q)
        ``P Theta_k + (I - P) mean_C`` for collaborative clients, ``Theta_k`` otherwise.
    """
    mean = updates[collaborative].mean(axis=0)
    centred = np.hstack(list(updates[collaborative] - mean))
    left = np.linalg.svd(centred, full_matrices=False)[0][:, :rank]
    projected = left @ (left.T @ updates)
    refined = projected + (mean - left @ (left.T @ mean))[None]
    return np.where(collaborative[:, None, None], refined, updates)


def _joint_oracle(factor_lists, collaborative, rank):
    """Oracle refinement of the clients' concatenated reduced updates (as ``joint``)."""
    reductions = {name: reduce_factors(f) for name, f in factor_lists.items()}
    n_clients = len(collaborative)
    vectors = np.hstack([r.updates.reshape(n_clients, -1) for r in reductions.values()])
    refined = oracle_refine(vectors[:, :, None], collaborative, rank)[:, :, 0]
    out, start = {}, 0
    for name, red in reductions.items():
        size = red.updates[0].size
        block = refined[:, start:start + size].reshape(red.updates.shape)
        out[name] = red.left_basis @ block @ red.right_basis.T
        start += size
    return out


def _clair(state_dicts, config, joint, **clair_params):
    refinement = refine_adapters(state_dicts, config, joint=joint, **clair_params)
    dense = {name: np.asarray(stack) for name, stack in refinement.per_client.items()}
    return refinement, dense


def _timed(steps):
    updates, seconds = {}, {}
    for method, step in steps.items():
        start = time.perf_counter()
        updates[method] = step()
        seconds[f"seconds_{method}"] = time.perf_counter() - start
    return updates, seconds


def _baselines(state_dicts, config, init_state, params):
    n_clients = len(state_dicts)

    def broadcast(rule, **options):
        return _broadcast(aggregate_adapters(rule, state_dicts, config, **options),
                          n_clients)

    return {
        "fedavg": lambda: broadcast("flora"),
        "fedit": lambda: broadcast("fedit"),
        "fedrot": lambda: broadcast("fedrot", reference=init_state, align="A",
                                    lam=params["fedrot_lam"]),
        "glora": lambda: broadcast("glora", reference_rank=params["rank"]),
        "median": lambda: broadcast("median"),
    }


def run_methods(state_dicts, config, init_state, contaminated, params, seed=0):
    """Per-client updates of every method, with timings and CLAIR's flags.

    Parameters
    ----------
    state_dicts : list of dict
        The clients' peft adapters (as sent: attackers' already corrupted).
    config : peft.LoraConfig
    init_state : dict
        The shared LoRA initialisation (FedRot-LoRA's reference, aligning A).
    contaminated : ndarray of bool, shape (n_clients,)
        Used only by the oracles.
    params : dict
        Cell parameters (``fedrot_lam``, ``rank``, ``clair_rank``, ``test_level``).
    seed : int, default=0
        The replicate's seed: CLAIR's robust start draws its random sets from it (left
        unseeded, they would come from numpy's global generator, and a client on the edge
        of the decision could change flag with what ran before).

    Returns
    -------
    updates : dict of str to dict of str to ndarray of shape (n_clients, d_out, d_in)
        Method -> module -> updates.
    info : dict
        ``seconds_<method>``, ``flagged_<method>`` (bool arrays) for the CLAIR variants,
        ``rank_<method>`` (the rank CLAIR used; per module: the median over modules).
    """
    benign = ~np.asarray(contaminated, dtype=bool)
    factor_lists = module_factors(state_dicts, config)
    level = {"test_level": params["test_level"], "random_state": seed}
    steps = {"local": lambda: _local(factor_lists),
             **_baselines(state_dicts, config, init_state, params)}
    updates, info = _timed(steps)
    refinements = {}
    variants = {"clair": dict(joint=False, **level), "clair_joint": dict(joint=True, **level),
                "clair_joint_r": dict(joint=True, rank=params["clair_rank"], **level)}
    for method, options in variants.items():
        start = time.perf_counter()
        refinements[method], updates[method] = _clair(state_dicts, config, **options)
        info[f"seconds_{method}"] = time.perf_counter() - start
        info[f"flagged_{method}"] = refinements[method].flagged
        ranks = [est.rank_ for est in refinements[method].estimators.values()]
        info[f"rank_{method}"] = float(np.median(ranks))
    # The deployable adapters: the refined updates read out at rank r (peft layout).
    updates["clair_lora"] = _local(module_factors(refinements["clair_joint_r"].state_dicts,
                                                  config))
    oracle_steps = {
        "clair_oracle": lambda: _joint_oracle(factor_lists, benign, params["clair_rank"]),
        "fedavg_oracle": lambda: _joint_oracle(factor_lists, benign, 0)}
    oracle_updates, oracle_seconds = _timed(oracle_steps)
    updates.update(oracle_updates)
    info.update(oracle_seconds)
    return updates, info

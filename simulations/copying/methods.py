"""The methods compared per client, each mapping client adapters to per-client updates.

Every method returns, for each adapted module, the dense updates the clients end with,
an array of shape (n_clients, d_out, d_in) (the modules are tiny here). Global methods
give every client the same update.

- ``local``: the client's own LoRA update.
- ``fedavg``: the exact mean of all updates (FLoRA's stacking gives it exactly).
- ``fedit``, ``fedex``, ``fedrot``, ``glora``: the LoRA aggregation rules of
  :func:`clairstat.aggregation.aggregate` (FedRot-LoRA aligns A to the shared
  initialisation; GLoRA's consensus rank is the LoRA rank). FFA-LoRA needs a frozen,
  shared A, which these clients do not have (they train both factors).
- ``median``, ``trimmed_mean``, ``krum``, ``geomedian``: the Byzantine-robust rules
  (coordinate-wise median, trimmed mean, Krum, geometric median) on the dense updates
  ``B_k A_k``, each at the package's defaults, which the protocol registered without
  naming them: Krum is Blanchard et al.'s single selection (m = 1) with
  ``f = (n_clients - 3) // 2``, the largest it admits, not the number of attackers
  (6 for the 4 attackers of 16; 2 for the 3 of 8 in ``copying_sweep``, where no f
  admissible reaches them); the trimmed mean cuts a mass 0.1 from each tail, below the
  contaminated share that Yin et al.'s guarantee needs it to reach (4 of 16: 1.6
  clients per tail; 8 clients: 0.8, where the rule warns that it cuts no client
  whole). ``simulations.studies.copying_rounds`` tells Krum the number of attackers
  and cuts ``max(0.2, share)``; ``benchmarks/copying_multikrum.py`` scores the post hoc
  alternatives (multi-Krum, trim 0.25) on stored replicates.
- ``clair``: :func:`clairstat.lora.refine_adapters` with its defaults (the library
  default: per-module tests, joint refinement at a cross-validated rank), the refined
  updates merged into the base weights.
- ``clair_lora``: the same fit's rank-r peft adapters (what a client would load).
- ``clair_per_module``: ``joint=False`` (each module refined by its own fit).
- ``clair_rank_given``: the default with the joint rank given (``clair_rank``).
- ``clair_oracle``: the joint refinement with the true collaborative set and the true
  rank (number of task variants - 1): what detection and rank choice could reach.
- ``fedavg_oracle``: the mean over the true benign clients.
"""

from __future__ import annotations

import time

import numpy as np

from clairstat.aggregation import reduce_factors
from clairstat.lora import aggregate_adapters, module_factors, refine_adapters

from .._controls import broken_lora_tests

__all__ = ["run_methods", "oracle_refine", "CLAIR_VARIANTS"]


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


def _clair(state_dicts, config, **clair_params):
    refinement = refine_adapters(state_dicts, config, **clair_params)
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
        "fedex": lambda: broadcast("fedex"),
        "fedrot": lambda: broadcast("fedrot", reference=init_state, align="A",
                                    lam=params["fedrot_lam"]),
        "glora": lambda: broadcast("glora", reference_rank=params["rank"]),
        "median": lambda: broadcast("median"),
        "trimmed_mean": lambda: broadcast("trimmed_mean"),
        "krum": lambda: broadcast("krum"),
        "geomedian": lambda: broadcast("geomedian"),
    }


#: The CLAIR variants whose flags are recorded, with their options.
CLAIR_VARIANTS = ("clair", "clair_per_module", "clair_rank_given")


def _no_detection(factor_lists):
    """The default's joint refinement with nobody flagged (the ``no-detection`` control):
    every client in the collaborative set, the rank cross-validated on all of them."""
    from clairstat.aggregation import joint_refinement, module_gram

    n_clients = len(next(iter(factor_lists.values())))
    nobody = np.zeros((len(factor_lists), n_clients), dtype=bool)
    joint = joint_refinement(np.stack([module_gram(f) for f in factor_lists.values()]),
                             nobody)
    local = _local(factor_lists)
    return ({name: np.tensordot(joint.coef[m], stack, axes=1)
             for m, (name, stack) in enumerate(local.items())}, joint.rank)


def _apply_control(control, updates, info, factor_lists):
    """Break the default CLAIR (``clair`` and its adapters) as the control says."""
    if control in (None, "narrow-null", "no-correction"):  # broken in the tests themselves
        return
    n_clients = len(next(iter(factor_lists.values())))
    if control == "local-refinement":  # refined = each client's own update
        updates["clair"] = updates["clair_lora"] = _local(factor_lists)
    elif control == "fedavg-refinement":  # refined = FedAvg's aggregate, every client
        updates["clair"] = updates["clair_lora"] = {
            name: stack.copy() for name, stack in updates["fedavg"].items()}
    elif control == "halfway-fedavg":  # refined = halfway from the local update to FedAvg's
        local = _local(factor_lists)
        updates["clair"] = updates["clair_lora"] = {
            name: 0.5 * (local[name] + stack) for name, stack in updates["fedavg"].items()}
    elif control == "no-detection":
        updates["clair"], rank = _no_detection(factor_lists)
        updates["clair_lora"] = updates["clair"]  # dense: no readout to break further
        info["flagged_clair"] = np.zeros(n_clients, dtype=bool)
        info["rank_clair"] = float(rank)
    else:
        raise ValueError(f"the copying study has no control {control!r}.")


def run_methods(state_dicts, config, init_state, contaminated, params, seed=0,
                control=None):
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
        Cell parameters (``fedrot_lam``, ``rank``, ``clair_rank``, ``test_level``,
        ``n_variants``).
    control : {None, "local-refinement", "no-detection", "narrow-null", "no-correction", \
"fedavg-refinement", "halfway-fedavg"}
        A negative control: the default CLAIR's refined updates become the local ones,
        or nobody is flagged (its joint refinement then pools every client), or the
        CLAIR variants' tests are broken (:func:`simulations._controls.broken_lora_tests`:
        the per-module null at half its spread, or each module's p-values unadjusted and
        a client flagged by any module), or
        the default's refined updates (and the adapters its clients load) become
        FedAvg's aggregate, the same for every client, or the point halfway between each
        client's local update and that aggregate.
    seed : int, default=0
        The replicate's seed: CLAIR's robust start draws its random sets from it (left
        unseeded, they would come from numpy's global generator, and a client on the edge
        of the decision could change flag with what ran before).

    Returns
    -------
    updates : dict of str to dict of str to ndarray of shape (n_clients, d_out, d_in)
        Method -> module -> updates.
    info : dict
        ``seconds_<method>``; for each CLAIR variant ``flagged_<method>`` (bool array)
        and ``rank_<method>`` (the joint rank; per module: the median of the modules'
        ranks); ``clair_stand_in``, what the default's joint refinement did with a
        module-flagged update (``flagged_updates``: ``"clip"`` since commit cdaa0d4,
        ``"quarantine"`` before; rows made before the column existed do not say).
    """
    from clairstat.aggregation._modules import DEFAULT_FLAGGED_UPDATES

    benign = ~np.asarray(contaminated, dtype=bool)
    factor_lists = module_factors(state_dicts, config)
    common = {"test_level": params["test_level"], "random_state": seed}
    steps = {"local": lambda: _local(factor_lists),
             **_baselines(state_dicts, config, init_state, params)}
    updates, info = _timed(steps)
    info["clair_stand_in"] = DEFAULT_FLAGGED_UPDATES
    variants = {"clair": {}, "clair_per_module": {"joint": False},
                "clair_rank_given": {"rank": params["clair_rank"]}}
    refinements = {}
    for method, options in variants.items():
        start = time.perf_counter()
        with broken_lora_tests(control):
            refinements[method], updates[method] = _clair(state_dicts, config, **common,
                                                          **options)
        info[f"seconds_{method}"] = time.perf_counter() - start
        info[f"flagged_{method}"] = refinements[method].flagged
        selection = refinements[method].rank_selection
        if selection is not None:
            info[f"rank_{method}"] = float(selection.rank)
        elif method == "clair_rank_given":
            info[f"rank_{method}"] = float(params["clair_rank"])
        else:
            info[f"rank_{method}"] = float(np.median(
                [est.rank_ for est in refinements[method].estimators.values()
                 if est is not None]))
    # The deployable adapters of the default: the refined updates read out at rank r.
    updates["clair_lora"] = _local(module_factors(refinements["clair"].state_dicts,
                                                  config))
    _apply_control(control, updates, info, factor_lists)
    true_rank = int(params["n_variants"]) - 1
    oracle_steps = {
        "clair_oracle": lambda: _joint_oracle(factor_lists, benign, true_rank),
        "fedavg_oracle": lambda: _joint_oracle(factor_lists, benign, 0)}
    oracle_updates, oracle_seconds = _timed(oracle_steps)
    updates.update(oracle_updates)
    info.update(oracle_seconds)
    return updates, info

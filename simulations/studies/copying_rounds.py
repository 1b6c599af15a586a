"""Multi-round federated LoRA on the copying task, run in Flower's simulation engine.

The copying study (:mod:`simulations.studies.copying`) is one-shot: the clients train
once and each method maps their adapters to updates. Here the clients and the server
talk for ``rounds`` rounds through :func:`flwr.simulation.run_simulation` (Ray
backend): in every round each client loads what the server sent it (the global adapter,
or its own adapter for a personalized strategy), trains ``steps_per_round`` AdamW steps
(a fresh optimiser) on its own sequences and replies with its peft adapter and its
example count. Attackers reply as in the copying study: the data-poisoned ones train on
their corrupted task; the ``adversarial`` one trains on the benign task and replies with
``lora_B -> -adversarial_scale * lora_B`` (the whole factor it holds, as in
:mod:`simulations.copying.replicate`).

Strategies (each run with the same seeds: same data, same initial adapter, same
minibatches per client and round, the replies handed over in the clients' order):

- Flower's own ``FedAvg``, ``FedMedian``, ``FedTrimmedAvg``, ``Krum`` and ``Bulyan``
  (``fedavg``, ``median``, ``trimmed_mean``, ``krum``, ``bulyan``) on the raw LoRA
  factor arrays, as a Flower user gets them (FedAvg of the factors is FedIT: the mean
  of the products is not the product of the means).
  Krum assumes ``n_contaminated`` malicious nodes; Bulyan needs
  ``n_clients >= 4 f + 3`` and assumes ``f = min(n_contaminated, (n_clients - 3) // 4)``
  (3 of the 4 attackers at 16 clients: it cannot be told the truth there);
  FedTrimmedAvg cuts ``max(0.2, n_contaminated / n_clients)`` at each end (Flower's
  default 0.2 unless the attackers' share is larger). Each row records these as
  ``krum_f``, ``bulyan_f`` and ``trim_beta``.
- :class:`clairstat.integrations.flower.LoraStrategy` with rule ``"clair"``
  (personalized: each client receives its refined adapter, a flagged client its own;
  the library default, as in the copying study: per-module tests, joint refinement),
  ``"fedrot"`` (FedRot-LoRA aligning A to the shared initialisation) and ``"glora"``
  (GLoRA at the LoRA rank), both global.

After the last round every benign client's masked accuracy on its own task is measured
with the adapter it ends with, merged as ``B A`` into the base weights
(:func:`simulations.copying.finetune.evaluate_updates`); the reference ``local`` is the
same client trained alone for the same rounds and steps (the same minibatches, no
server). Rows have the copying study's columns (``acc_<method>_c<k>``,
``contaminated_c<k>``, ``variant_c<k>``, ``kind_c<k>``, ``acc_<method>``,
``rel_<method>``), so :mod:`simulations.copying.analysis` reads them (its tables group
by ``setting`` only: pass one design's rows at a time), plus CLAIR's last-round flags
(``flagged_clair_c<k>`` and their detection scores).

Designs (cell parameter ``design``): ``contaminated`` (the copying study's attackers
from the first round) and ``clean`` (every client benign: the multi-round setting of
FedRot-LoRA and GLoRA), each homogeneous or heterogeneous (``n_variants`` 1 or 3).
Scales: ``smoke`` (6 clients, 2 rounds, one cell: contaminated heterogeneous; for the
tests), ``small`` (16 clients, 5 rounds, 3 replicates per cell),
``full`` (20 replicates per cell). Every scale's cells carry ``seed_block = "rounds"``;
small and full share their cells, so the small run's replicates are the first three of
the full run.
"""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np

from simulations.copying.replicate import DEFAULT_PARAMS, REPO

from .._framework import Study
from .copying import SETTINGS

__all__ = ["STUDY", "simulate_one", "setup", "cells", "METHODS", "ROUND_PARAMS", "TINY"]

#: The federated strategies compared (``local`` is the reference).
METHODS = ("fedavg", "median", "trimmed_mean", "krum", "bulyan", "clair", "fedrot", "glora")
#: Rounds and local steps per round (5 x 12 = the copying study's 60 steps).
ROUND_PARAMS = {"rounds": 5, "steps_per_round": 12}
#: The tests' configuration (seconds, not minutes).
TINY = {"pretrain_steps": 200, "n_clients": 6, "n_contaminated": 2,
        "contamination": "reverse,adversarial", "rounds": 2, "steps_per_round": 5,
        "n_test": 64}
# Copying parameters without a meaning here (one-shot steps, the given-rank CLAIR).
_UNUSED = ("steps", "clair_rank")
_FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
# One Ray actor runs every client in turn: each actor imports torch and peft, and on two
# shared cores a second actor cost more to start (the first strategy's two rounds took
# 11-23 s with two actors, 4.5 s with one, smoke cell) than it gave back in parallel
# training. A client's round depends only on its seeds: the numbers do not depend on it.
_BACKEND = {"client_resources": {"num_cpus": 2, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "include_dashboard": False}}


def cells(seed_block="rounds", **overrides):
    """One cell per design and setting, every parameter explicit."""
    base = {k: v for k, v in DEFAULT_PARAMS.items() if k not in _UNUSED}
    out = []
    for design in ("contaminated", "clean"):
        for setting, n_variants in SETTINGS.items():
            cell = dict({**base, **ROUND_PARAMS, **overrides}, design=design,
                        setting=setting, n_variants=n_variants, seed_block=seed_block)
            if design == "clean":
                cell["n_contaminated"] = 0
            out.append(cell)
    return out


def _smoke_cells():
    """One tiny cell, contaminated and heterogeneous: every code path (attackers, flags,
    variants) in one Ray start, which alone takes about 25 s here."""
    return [cell for cell in cells(**TINY)
            if (cell["design"], cell["setting"]) == ("contaminated", "heterogeneous")]


class _Clients:
    """Every client's data and its round of training (pickled to the Ray workers).

    Parameters
    ----------
    model : TinyTransformer
    specs : list of TaskSpec, length n_clients
    config : FinetuneConfig
    seeds : ndarray of shape (n_clients,)
        Each client's data seed; its round ``t`` draws minibatches from ``(seed, t)``.
    adversarial_scale : float
    steps : int
        AdamW steps per round.
    """

    LENGTHS = (4, 10)  # content lengths, as in the copying study

    def __init__(self, model, specs, config, seeds, adversarial_scale, steps):
        from simulations.copying.finetune import client_data

        self.model, self.specs, self.config, self.steps = model, specs, config, steps
        self.seeds = [int(s) for s in seeds]
        self.scale = adversarial_scale
        self.data = [client_data(spec, config, s, self.LENGTHS)
                     for spec, s in zip(specs, self.seeds)]

    def train(self, k, state, server_round):
        """Client ``k``'s adapter after one round from ``state`` (numpy arrays)."""
        from simulations.copying.finetune import train_adapter

        seed = int(np.random.SeedSequence([self.seeds[k], server_round]).generate_state(1)[0])
        trained = train_adapter(self.model, state, self.data[k], self.config, self.steps,
                                seed)
        return {key: value.numpy() for key, value in trained.items()}

    def reply(self, k, state, server_round):
        """What client ``k`` sends back: its trained adapter, the adversary's corrupted."""
        trained = self.train(k, state, server_round)
        if self.specs[k].corruption == "adversarial":  # as in the one-shot copying study
            trained = {key: -self.scale * value if ".lora_B." in key else value
                       for key, value in trained.items()}
        return trained

    def local(self, k, init, rounds):
        """Client ``k`` alone: the same rounds and minibatches, no server."""
        state = init
        for server_round in range(1, rounds + 1):
            state = self.train(k, state, server_round)
        return state


def _strategies(params, lora, init, seed):
    """Every strategy of the study, constructed for this cell (see the module docstring)."""
    from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, FedTrimmedAvg, Krum

    from clairstat.integrations.flower import LoraStrategy

    n, bad = int(params["n_clients"]), int(params["n_contaminated"])
    common = {"min_available_nodes": n, "min_train_nodes": n, "fraction_evaluate": 0.0}
    resilience = _resilience(n, bad)
    return {
        "fedavg": FedAvg(**common),
        "median": FedMedian(**common),
        "trimmed_mean": FedTrimmedAvg(beta=resilience["trim_beta"], **common),
        "krum": Krum(num_malicious_nodes=resilience["krum_f"], **common),
        "bulyan": Bulyan(num_malicious_nodes=resilience["bulyan_f"], **common),
        "clair": LoraStrategy(rule="clair", lora_config=lora, personalized=True,
                              rule_options={"test_level": params["test_level"],
                                            "random_state": seed}, **common),
        "fedrot": LoraStrategy(rule="fedrot", lora_config=lora, personalized=False,
                               rule_options={"reference": init, "align": "A",
                                             "lam": params["fedrot_lam"]}, **common),
        "glora": LoraStrategy(rule="glora", lora_config=lora, personalized=False,
                              rule_options={"reference_rank": params["rank"]}, **common),
    }


def _resilience(n_clients, n_contaminated):
    """Krum's and Bulyan's assumed number of attackers, FedTrimmedAvg's cut per end."""
    return {"krum_f": n_contaminated,
            "bulyan_f": min(n_contaminated, max(0, (n_clients - 3) // 4)),
            "trim_beta": max(0.2, n_contaminated / n_clients)}


class _CheckedGrid:
    """A Grid whose ``send_and_receive`` fails on a missing or failed reply (a client
    error must stop the replicate, not shrink a round silently) and, once ``order``
    (node id -> client index) is set, returns the replies in the clients' order.

    Flower's strategies sample their nodes with Python's unseeded ``random.sample``, so
    the replies would reach the aggregation in a different order in every run; CLAIR's
    robust start draws its random starting sets by position, so its fits, and the
    rows, would not follow from the replicate's seed.
    """

    def __init__(self, grid):
        self._grid = grid
        self.order = None

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *args, **kwargs):
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, *args, **kwargs))
        failed = [reply.error for reply in replies if reply.has_error()]
        if failed or len(replies) != len(messages):
            raise RuntimeError(f"{len(replies)} replies to {len(messages)} messages; "
                               f"client errors: {failed}")
        if self.order is not None:
            replies.sort(key=lambda reply: self.order[reply.metadata.src_node_id])
        return replies


def _partitions(grid, n_clients, timeout=600.0):
    """Node id -> partition id (the client's index), asked of every node once (after
    waiting, as Flower's node sampling does, for every node to connect)."""
    from flwr.app import Message, MessageType, RecordDict

    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < n_clients:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(nodes)} of {n_clients} nodes connected in {timeout} s.")
        time.sleep(0.1)
    messages = [Message(content=RecordDict(), dst_node_id=node,
                        message_type=MessageType.QUERY) for node in nodes]
    replies = grid.send_and_receive(messages)
    partition = {reply.metadata.src_node_id: int(reply.content["metrics"]["partition-id"])
                 for reply in replies}
    if sorted(partition.values()) != list(range(n_clients)):
        raise RuntimeError(f"partition ids {sorted(partition.values())} of {n_clients} nodes.")
    return partition


def _client_app(clients, n_train):
    """The ClientApp: train (load, train a round, reply) and a partition-id query."""
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    def train(msg, context):
        import torch

        from clairstat.integrations.flower import arrays_to_state_dict, state_dict_to_arrays

        torch.set_num_threads(1)  # one core per client (the Ray resources say so)
        k = int(context.node_config["partition-id"])
        received = arrays_to_state_dict(msg.content["arrays"])
        state = clients.reply(k, received, int(msg.content["config"]["server-round"]))
        content = RecordDict({"arrays": state_dict_to_arrays(state),
                              "metrics": MetricRecord({"num-examples": n_train})})
        return Message(content=content, reply_to=msg)

    def query(msg, context):
        partition = int(context.node_config["partition-id"])
        content = RecordDict({"metrics": MetricRecord({"partition-id": partition})})
        return Message(content=content, reply_to=msg)

    app.train()(train)
    app.query()(query)
    return app


def _final_states(strategy, result, partition):
    """Each client's adapter after the last round (personalized, or the global one)."""
    from clairstat.integrations.flower import arrays_to_state_dict

    states = [None] * len(partition)
    for node, k in partition.items():
        own = getattr(strategy, "personalized", False) and node in strategy.client_arrays_
        states[k] = arrays_to_state_dict(strategy.client_arrays_[node] if own
                                         else result.arrays)
    return states


@contextlib.contextmanager
def _flower_env():
    """Telemetry off, and the repository importable by the Ray workers (they inherit the
    environment; ``simulations`` is a folder of the checkout, not an installed package)."""
    saved = {key: os.environ.get(key) for key in (*_FLOWER_ENV, "PYTHONPATH")}
    os.environ.update(_FLOWER_ENV)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + ([saved["PYTHONPATH"]] if saved["PYTHONPATH"] else []))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _federate(clients, init, lora, params, seed):
    """Every strategy for ``rounds`` rounds in one Flower simulation (one Ray start).

    Returns
    -------
    states : dict of str to list of dict
        Method -> each client's final adapter (numpy state dicts).
    flagged : ndarray of bool, shape (n_clients,)
        CLAIR's flags in the last round.
    seconds : dict of str to float
    """
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from clairstat.integrations.flower import state_dict_to_arrays

    n_clients = int(params["n_clients"])
    outcome = {"states": {}, "seconds": {}}
    server_app = ServerApp()

    def main(grid, context):
        grid = _CheckedGrid(grid)
        partition = _partitions(grid, n_clients)
        grid.order = partition  # every strategy sees the replies in the clients' order
        for method, strategy in _strategies(params, lora, init, seed).items():
            start = time.perf_counter()
            result = strategy.start(grid=grid, initial_arrays=state_dict_to_arrays(init),
                                    num_rounds=int(params["rounds"]))
            outcome["states"][method] = _final_states(strategy, result, partition)
            outcome["seconds"][f"seconds_{method}"] = time.perf_counter() - start
            if method == "clair":
                outcome["flagged"] = np.array([strategy.flagged_[node] for node in
                                               sorted(partition, key=partition.get)])

    server_app.main()(main)
    with _flower_env():
        run_simulation(server_app, _client_app(clients, int(params["n_train"])),
                       num_supernodes=n_clients, backend_config=_BACKEND)
    missing = set(METHODS) - set(outcome["states"])
    if missing:  # the server thread stopped early without raising
        raise RuntimeError(f"the simulation ended without the strategies {sorted(missing)}.")
    return outcome["states"], outcome["flagged"], outcome["seconds"]


def _dense(states, lora):
    """Per module, the clients' merged updates ``s B A``, shape (n_clients, d_out, d_in)."""
    from clairstat.lora import module_factors

    return {name: np.stack([b @ a for b, a in factors])
            for name, factors in module_factors(states, lora).items()}


def _row(accuracy, contaminated, variant, kinds, flagged, info):
    """Flat row with the copying study's columns, plus CLAIR's last-round flags."""
    from clairstat.metrics import detection_scores
    from simulations.copying.replicate import client_columns

    row = client_columns(accuracy, contaminated, variant, kinds)
    row.update({f"{name}_clair": value
                for name, value in detection_scores(flagged, contaminated).items()})
    row.update({f"flagged_clair_c{k}": bool(f) for k, f in enumerate(flagged)})
    row.update(info)
    return row


def setup(params, seed):
    """A replicate's pretrained model, tasks, clients and initial adapter.

    Parameters
    ----------
    params : dict
        Every parameter of a cell (defaults filled in).
    seed : int

    Returns
    -------
    tuple
        ``(model, pretraining info, specs, contaminated, variant, clients, init, lora)``:
        the client tasks, each client's data and seeds (:class:`_Clients`), the shared
        initial adapter (numpy state dict) and the peft config.
    """
    from simulations.copying.finetune import FinetuneConfig, initial_adapter, lora_config
    from simulations.copying.replicate import base_and_tasks

    params, model, pre, specs, contaminated, variant = base_and_tasks(params, seed)
    config = FinetuneConfig(rank=params["rank"], lora_alpha=params["lora_alpha"],
                            mlp=params["mlp"], n_train=params["n_train"],
                            batch_size=params["batch_size"], lr=params["lr"])
    seeds = np.random.SeedSequence(seed).generate_state(len(specs) + 1)
    init = {k: v.numpy() for k, v in initial_adapter(model, config, int(seeds[0])).items()}
    clients = _Clients(model, specs, config, seeds[1:], params["adversarial_scale"],
                       int(params["steps_per_round"]))
    return model, pre, specs, contaminated, variant, clients, init, lora_config(config)


def simulate_one(params, seed):
    """One replicate: tasks, ``rounds`` federated rounds per strategy, evaluation.

    Parameters
    ----------
    params : dict
        Cell parameters (:func:`cells`).
    seed : int

    Returns
    -------
    dict
        Per client ``k``: ``contaminated_ck``, ``variant_ck``, ``kind_ck``,
        ``acc_<method>_ck`` (NaN for attackers), ``flagged_clair_ck``; per method the
        benign mean ``acc_<method>`` and mean relative change over local LoRA
        ``rel_<method>``; CLAIR's detection scores, the robust rules' assumed attackers,
        seconds per stage and the pretraining's key and accuracy.
    """
    from simulations.copying.replicate import _evaluate, base_model_columns

    params = {**DEFAULT_PARAMS, **ROUND_PARAMS, **params}
    model, pre, specs, contaminated, variant, clients, init, lora = setup(params, seed)
    start = time.perf_counter()
    local = [clients.local(k, init, int(params["rounds"])) if not contaminated[k] else init
             for k in range(len(specs))]  # attackers are never evaluated
    info = {"seconds_local": time.perf_counter() - start}
    states, flagged, seconds = _federate(clients, init, lora, params, seed)
    info.update(seconds)
    start = time.perf_counter()
    updates = {"local": _dense(local, lora),
               **{method: _dense(states[method], lora) for method in METHODS}}
    accuracy = _evaluate(model, updates, specs, contaminated, params, seed)
    info["seconds_evaluate"] = time.perf_counter() - start
    info.update(_resilience(int(params["n_clients"]), int(params["n_contaminated"])))
    info.update(base_model_columns(pre))
    kinds = [spec.corruption or "benign" for spec in specs]
    return _row(accuracy, contaminated, variant, kinds, flagged, info)


STUDY = Study(
    name="copying_rounds",
    description="multi-round federated LoRA on the copying task in Flower's simulation "
                "engine: Flower's rules, FedRot-LoRA, GLoRA and CLAIR vs local LoRA",
    grids={"smoke": _smoke_cells(), "small": cells(), "full": cells()},
    replicates={"smoke": 1, "small": 3, "full": 20},
    simulate_one=simulate_one)

"""Tests of the Flower integration: the strategy's aggregation, personalization, and a
tiny Flower simulation (Ray backend) where CLAIR flags an adversarial client."""

import os
import sys

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")
pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from flwr.app import Context, Message, MetricRecord, RecordDict  # noqa: E402

from clairstat.integrations.flower import (LoraStrategy, arrays_to_state_dict,  # noqa: E402
                                           state_dict_to_arrays)
from clairstat.lora import adapter_factors  # noqa: E402

N_NODES, ADVERSARY, D_IN, D_OUT, RANK = 6, 5, 8, 6, 2
LORA = {"r": RANK, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}


def client_adapter(partition):
    """Adapter of one client: benign updates share one column direction per module."""
    rng = np.random.default_rng(partition)
    shared = np.random.default_rng(99).standard_normal((2, D_OUT, 1))
    state = {}
    for index, name in enumerate(("q_proj", "v_proj")):
        b_mat = shared[index] @ rng.standard_normal((1, RANK))
        b_mat = b_mat + 0.01 * rng.standard_normal((D_OUT, RANK))
        if partition == ADVERSARY:  # an adversarial update far off the shared direction
            b_mat = 20.0 * rng.standard_normal((D_OUT, RANK))
        prefix = f"base_model.model.{name}"
        state[f"{prefix}.lora_A.weight"] = rng.standard_normal((RANK, D_IN)).astype("float32")
        state[f"{prefix}.lora_B.weight"] = b_mat.astype("float32")
    return state


def test_array_record_round_trip():
    state = client_adapter(0)
    back = arrays_to_state_dict(state_dict_to_arrays(state))
    assert set(back) == set(state)
    assert all(np.array_equal(back[k], state[k]) for k in state)


def test_aggregate_with_other_rules_reads_out_each_client_rank():
    adapters = [client_adapter(k) for k in range(N_NODES)]
    strategy = LoraStrategy(rule="median", lora_config=LORA)
    per_client, global_adapter, flagged = strategy._aggregate(adapters, np.ones(N_NODES))
    assert flagged is None and len(per_client) == N_NODES
    assert global_adapter["base_model.model.q_proj.lora_A.weight"].shape == (RANK, D_IN)


# --- a Flower simulation ------------------------------------------------------------
class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(D_IN, D_OUT, bias=False)
        self.v_proj = torch.nn.Linear(D_IN, D_OUT, bias=False)


def _train(msg, context):
    partition = int(context.node_config["partition-id"])
    arrays = state_dict_to_arrays(client_adapter(partition))
    metrics = MetricRecord({"num-examples": 10})
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def _evaluate(msg, context):
    """Load the received adapter into a peft model (as a client would) and report it."""
    import peft

    model = peft.get_peft_model(Tiny(), peft.LoraConfig(**LORA))
    state = {k: torch.as_tensor(v) for k, v in arrays_to_state_dict(msg.content["arrays"]).items()}
    result = peft.set_peft_model_state_dict(model, state)
    loaded = float(not result.unexpected_keys)
    metrics = MetricRecord({"num-examples": 1, "loaded": loaded})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def _apps(strategy):
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    client_app = ClientApp()
    client_app.train()(_train)
    client_app.evaluate()(_evaluate)
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context: Context):
        initial = state_dict_to_arrays(client_adapter(0))
        strategy.result_ = strategy.start(grid=grid, initial_arrays=initial, num_rounds=1)

    return server_app, client_app


@pytest.mark.slow
def test_flower_simulation_flags_the_adversary_and_personalizes(monkeypatch):
    import cloudpickle

    from flwr.simulation import run_simulation

    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers lack tests/
    strategy = LoraStrategy(rule="clair", lora_config=LORA, personalized=True,
                            rule_options={"rank": 1},
                            min_available_nodes=N_NODES, min_train_nodes=N_NODES,
                            min_evaluate_nodes=N_NODES)
    server_app, client_app = _apps(strategy)
    run_simulation(server_app, client_app, num_supernodes=N_NODES, backend_config={
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": min(2, os.cpu_count() or 1), "include_dashboard": False}})
    flags = strategy.flagged_
    assert len(flags) == N_NODES and sum(flags.values()) == 1
    adversary = next(node for node, flag in flags.items() if flag)
    key = "base_model.model.q_proj.lora_B.weight"
    received = {node: arrays_to_state_dict(arrays)
                for node, arrays in strategy.client_arrays_.items()}
    norms = {node: np.linalg.norm(state[key]) for node, state in received.items()}
    assert max(norms, key=norms.get) == adversary  # it got its own adapter back
    benign = [state for node, state in received.items() if node != adversary]
    assert not np.allclose(benign[0][key], benign[1][key])  # personalized, not one global
    evaluated = strategy.result_.evaluate_metrics_clientapp[1]
    assert evaluated["loaded"] == pytest.approx(1.0)  # every client loaded its adapter
    factors = adapter_factors(arrays_to_state_dict(strategy.result_.arrays), LORA)
    assert factors["base_model.model.q_proj"][0].shape == (D_OUT, RANK)

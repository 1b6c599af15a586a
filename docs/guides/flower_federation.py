"""A simulated Flower federation whose server aggregates LoRA adapters with CLAIR.

Six clients adapt two projections of a tiny model with rank-2 LoRA; five of them learn
updates that share one column direction per module, the sixth sends an adversarial
update. The server runs :class:`clairstat.integrations.flower.LoraStrategy` with the
``"clair"`` rule for two rounds and sends every client its own refined adapter. The
strategy names clients by Flower's node ids, which the simulation draws at random; the
clients also report their partition, so that the script can say which partitions were
flagged (the adversary is partition 5), in a record of their own beside the metrics
(which the strategy averages).

Run it from the repository root (it needs ``pip install "clairstat[lora,flower]"``)::

    python docs/guides/flower_federation.py

Flower's simulation engine starts Ray, which takes most of the half minute this needs.
"""

import os

import numpy as np
import peft
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from clairstat.integrations.flower import (LoraStrategy, arrays_to_state_dict,
                                           state_dict_to_arrays)

N_CLIENTS, ADVERSARY, D_IN, D_OUT, RANK = 6, 5, 8, 6, 2
LORA = {"r": RANK, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}


class Tiny(torch.nn.Module):
    """The base model: two projections that LoRA adapts."""

    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(D_IN, D_OUT, bias=False)
        self.v_proj = torch.nn.Linear(D_IN, D_OUT, bias=False)


def local_adapter(partition):
    """Stands for a client's fine-tuning: its adapter after local training."""
    rng = np.random.default_rng(partition)
    shared = np.random.default_rng(99).standard_normal((2, D_OUT, 1))
    state = {}
    for index, name in enumerate(("q_proj", "v_proj")):
        b_mat = shared[index] @ rng.standard_normal((1, RANK))
        b_mat += 0.01 * rng.standard_normal((D_OUT, RANK))
        if partition == ADVERSARY:
            b_mat = 20.0 * rng.standard_normal((D_OUT, RANK))
        prefix = f"base_model.model.{name}"
        state[f"{prefix}.lora_A.weight"] = rng.standard_normal((RANK, D_IN)).astype("float32")
        state[f"{prefix}.lora_B.weight"] = b_mat.astype("float32")
    return state


client_app = ClientApp()


@client_app.train()
def train(msg, context):
    """Reply with the local adapter and the number of examples it was trained on."""
    partition = int(context.node_config["partition-id"])
    content = RecordDict({"arrays": state_dict_to_arrays(local_adapter(partition)),
                          "metrics": MetricRecord({"num-examples": 10}),
                          "client": ConfigRecord({"partition-id": partition})})
    return Message(content=content, reply_to=msg)


@client_app.evaluate()
def evaluate(msg, context):
    """Load the adapter the server sent into a peft model, as a client would."""
    model = peft.get_peft_model(Tiny(), peft.LoraConfig(**LORA))
    received = arrays_to_state_dict(msg.content["arrays"])
    result = peft.set_peft_model_state_dict(
        model, {key: torch.as_tensor(value) for key, value in received.items()})
    metrics = MetricRecord({"num-examples": 1, "loaded": float(not result.unexpected_keys)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


class NamedLoraStrategy(LoraStrategy):
    """LoraStrategy that also records which partition each node id holds."""

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.partition_of = getattr(self, "partition_of", {})
        for reply in replies:
            if reply.has_content() and "client" in reply.content:
                self.partition_of[reply.metadata.src_node_id] = int(
                    reply.content["client"]["partition-id"])
        return super().aggregate_train(server_round, replies)


strategy = NamedLoraStrategy(rule="clair", lora_config=LORA, personalized=True,
                        rule_options={"rank": 1, "random_state": 0},
                        min_available_nodes=N_CLIENTS, min_train_nodes=N_CLIENTS,
                        min_evaluate_nodes=N_CLIENTS)
server_app = ServerApp()


@server_app.main()
def main(grid, context: Context):
    """Two rounds of train (aggregate with CLAIR) and evaluate (personalized adapters)."""
    initial = state_dict_to_arrays(local_adapter(0))
    strategy.result_ = strategy.start(grid=grid, initial_arrays=initial, num_rounds=2)


if __name__ == "__main__":
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    run_simulation(server_app, client_app, num_supernodes=N_CLIENTS, backend_config={
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": min(2, os.cpu_count() or 1), "include_dashboard": False}})
    flagged = sorted(strategy.partition_of[node]
                     for node, flag in strategy.flagged_.items() if flag)
    print(f"flagged partitions: {flagged} of {len(strategy.flagged_)} "
          f"(the adversary is partition {ADVERSARY})")
    loaded = strategy.result_.evaluate_metrics_clientapp[2]["loaded"]
    print(f"share of clients that loaded their adapter in round 2: {loaded:.2f}")

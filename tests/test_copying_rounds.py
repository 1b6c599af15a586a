"""Tests of the multi-round copying study (simulations/studies/copying_rounds.py): its
grid, the clients' rounds, and the smoke scale through Flower's simulation engine."""

import math

import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from simulations import read_rows  # noqa: E402
from simulations.__main__ import main as simulations_main  # noqa: E402
from simulations.studies import copying_rounds  # noqa: E402


def test_the_grid_has_both_designs_and_settings_and_the_rounds_seed_block():
    small = copying_rounds.STUDY.cells("small")
    assert {(c["design"], c["n_variants"]) for c in small} == {
        (d, v) for d in ("contaminated", "clean") for v in (1, 3)}
    assert all(c["seed_block"] == "rounds" for scale in ("smoke", "small", "full")
               for c in copying_rounds.STUDY.cells(scale))
    for cell in small:
        assert cell["n_contaminated"] == (4 if cell["design"] == "contaminated" else 0)
        assert "steps" not in cell  # the one-shot step count has no meaning here


def test_robust_rules_assume_what_they_can():
    # Bulyan needs n >= 4 f + 3: at 16 clients it can be told of 3 attackers, not 4.
    assert copying_rounds._resilience(16, 4) == {"krum_f": 4, "bulyan_f": 3,
                                                 "trim_beta": 0.25}
    assert copying_rounds._resilience(6, 2) == {"krum_f": 2, "bulyan_f": 0,
                                                "trim_beta": 2 / 6}
    assert copying_rounds._resilience(16, 0)["trim_beta"] == 0.2  # Flower's default


def _tiny_clients(params):
    from simulations.copying.finetune import FinetuneConfig, initial_adapter
    from simulations.copying.pretrain import pretrain
    from simulations.copying.replicate import cache_dir, pretrain_config
    from simulations.copying.tasks import client_tasks

    model, _ = pretrain(pretrain_config(params), cache_dir(), log=lambda *_: None)
    specs, _, _ = client_tasks(
        params["n_clients"], params["n_contaminated"], params["n_content"],
        params["n_moved"], params["n_variants"], params["contamination"].split(","),
        np.random.default_rng(0))
    config = FinetuneConfig(rank=params["rank"], lora_alpha=params["lora_alpha"],
                            n_train=params["n_train"], batch_size=params["batch_size"],
                            lr=params["lr"])
    init = {k: v.numpy() for k, v in initial_adapter(model, config, 7).items()}
    clients = copying_rounds._Clients(model, specs, config, np.arange(len(specs)) + 11,
                                      params["adversarial_scale"], params["steps_per_round"])
    return clients, init, specs


def test_a_round_is_reproducible_and_the_adversary_flips_and_scales_its_b():
    params = copying_rounds.STUDY.cells("smoke")[0]
    clients, init, specs = _tiny_clients(params)
    adversary = next(k for k, spec in enumerate(specs) if spec.corruption == "adversarial")
    trained = clients.train(adversary, init, 1)
    again = clients.train(adversary, init, 1)
    assert all(np.array_equal(trained[key], again[key]) for key in trained)  # same seeds
    assert any(not np.array_equal(trained[key], init[key]) for key in trained)  # it trained
    other_round = clients.train(adversary, init, 2)  # a new round draws new minibatches
    assert any(not np.array_equal(trained[key], other_round[key]) for key in trained)
    sent = clients.reply(adversary, init, 1)
    for key, value in trained.items():
        expected = -params["adversarial_scale"] * value if ".lora_B." in key else value
        assert np.array_equal(sent[key], expected), key
    benign = next(k for k, spec in enumerate(specs) if spec.corruption is None)
    replied = clients.reply(benign, init, 1)
    assert all(np.array_equal(replied[key], value)
               for key, value in clients.train(benign, init, 1).items())


def test_the_grid_hands_the_replies_over_in_the_clients_order():
    """Flower samples nodes in an unseeded random order; the study's grid sorts the
    replies by client index, so the aggregation's input follows from the seed."""
    from types import SimpleNamespace

    def reply(node):
        return SimpleNamespace(metadata=SimpleNamespace(src_node_id=node),
                               has_error=lambda: False, error=None)

    class Grid:
        def send_and_receive(self, messages, *args, **kwargs):
            return [reply(node) for node in (30, 10, 20)]

    grid = copying_rounds._CheckedGrid(Grid())
    unsorted = [r.metadata.src_node_id for r in grid.send_and_receive([1, 2, 3])]
    assert unsorted == [30, 10, 20]  # before the partition is known: as received
    grid.order = {10: 2, 20: 0, 30: 1}
    assert [r.metadata.src_node_id for r in grid.send_and_receive([1, 2, 3])] == [20, 30, 10]


def test_a_round_of_zero_steps_returns_what_the_client_received():
    """train_adapter loads the received adapter (not the LoRA init) before training."""
    from simulations.copying.finetune import train_adapter

    clients, init, _ = _tiny_clients(copying_rounds.STUDY.cells("smoke")[0])
    rng = np.random.default_rng(0)
    received = {key: value + rng.standard_normal(value.shape).astype(value.dtype)
                for key, value in init.items()}
    kept = train_adapter(clients.model, received, clients.data[0], clients.config, 0, 3)
    assert all(np.array_equal(kept[key].numpy(), received[key]) for key in received)
    with pytest.raises(ValueError, match="keys not in the adapter"):
        train_adapter(clients.model, {**received, "base_model.model.nowhere.lora_A.weight":
                                      received[next(iter(received))]},
                      clients.data[0], clients.config, 0, 3)


@pytest.mark.slow
def test_smoke_scale_runs_in_flower_and_gives_every_method_for_every_benign_client(
        tmp_path):
    from simulations.copying import analysis

    argv = ["copying_rounds", "--scale", "smoke", "--results-dir", str(tmp_path),
            "--no-progress"]
    assert simulations_main(argv) == 0
    rows = read_rows(tmp_path / "smoke" / "copying_rounds.jsonl")
    assert [row["design"] for row in rows] == ["contaminated"]
    methods = ("local",) + copying_rounds.METHODS
    for row in rows:
        n_clients = row["n_clients"]
        contaminated = [row[f"contaminated_c{k}"] for k in range(n_clients)]
        assert sum(contaminated) == row["n_contaminated"]
        assert {row[f"kind_c{k}"] for k in range(n_clients)} == {"benign", "reverse",
                                                                 "adversarial"}
        for method in methods:
            assert 0.0 <= row[f"acc_{method}"] <= 1.0, method
            for k in range(n_clients):
                value = row[f"acc_{method}_c{k}"]
                assert math.isnan(value) if contaminated[k] else 0.0 <= value <= 1.0
        assert row["rel_local"] == 0.0  # local LoRA is the reference of every rel_
        assert all(isinstance(row[f"flagged_clair_c{k}"], bool) for k in range(n_clients))
        # The adversary replies -3 times its B: far from every benign update, flagged.
        adversary = next(k for k in range(n_clients) if row[f"kind_c{k}"] == "adversarial")
        assert row[f"flagged_clair_c{adversary}"]
    frame = copying_rounds_frame(tmp_path)
    clients = analysis.client_table(frame)
    n_benign = sum(row["n_clients"] - row["n_contaminated"] for row in rows)
    assert len(clients) == n_benign * len(methods)
    gains = analysis.gain_table(frame)
    assert {"clair", "fedavg", "median", "krum", "local"} <= set(gains["method"])
    assert simulations_main(argv) == 0  # resumable: a second run adds nothing
    assert len(read_rows(tmp_path / "smoke" / "copying_rounds.jsonl")) == len(rows)


def copying_rounds_frame(results_dir):
    from simulations import load_results

    return load_results(copying_rounds.STUDY, "smoke", results_dir)

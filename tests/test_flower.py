"""Tests of the Flower integration: the strategy's aggregation, personalization, and a
tiny Flower simulation (Ray backend) where CLAIR flags an adversarial client."""

import os
import re
import sys

import warnings

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")
pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from flwr.app import Context, Message, MetricRecord, RecordDict  # noqa: E402

from clairstat.integrations.flower import (LoraStrategy, arrays_to_state_dict,  # noqa: E402
                                           state_dict_to_arrays)
from clairstat.lora import adapter_factors, refine_adapters  # noqa: E402

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


def test_clair_and_fedavg_go_through_the_same_functions(monkeypatch):
    """No rule has a branch of its own: "clair" and "fedit" (FedAvg of the factors) are
    both aggregated by aggregate_adapters and personalized by personalized_state_dicts."""
    import clairstat.integrations.flower as flower

    calls = []

    def spy(name):
        real = getattr(flower, name)

        def wrapped(*args, **kwargs):
            calls.append((name, args[0] if name == "aggregate_adapters" else None))
            return real(*args, **kwargs)
        return wrapped

    for name in ("aggregate_adapters", "personalized_state_dicts"):
        monkeypatch.setattr(flower, name, spy(name))
    states = [client_adapter(k) for k in range(N_NODES)]
    for rule, options in (("clair", {"rank": 1}), ("fedit", {})):
        calls.clear()
        strategy = LoraStrategy(rule=rule, lora_config=LORA, rule_options=options)
        _, metrics = strategy.aggregate_train(1, [_reply(n, s) for n, s in zip(NODES, states)])
        assert calls == [("aggregate_adapters", rule), ("personalized_state_dicts", None)]
        assert ("n-flagged" in metrics) == (rule == "clair")
    assert strategy.flagged_ == {}  # fedit flags nobody


def test_clair_personalized_adapters_are_refine_adapters_outputs():
    """The shared path gives each client what refine_adapters gives it, by default (the
    joint refinement) and per module (a flagged client its own adapter), and the global
    adapter is the collaborative mean's readout."""
    adapters = [client_adapter(k) for k in range(N_NODES)]
    weights = np.arange(1.0, N_NODES + 1.0)
    for joint in (True, False):
        strategy = LoraStrategy(rule="clair", lora_config=LORA,
                                rule_options={"rank": 1, "joint": joint})
        per_client, global_adapter, flagged = strategy._aggregate(adapters, weights)
        reference = refine_adapters(adapters, LORA, joint=joint, sample_weight=weights,
                                    rank=1)
        assert flagged.tolist() == reference.flagged.tolist() == [
            k == ADVERSARY for k in range(N_NODES)]
        for ours, theirs in zip(per_client, reference.state_dicts):
            assert all(np.array_equal(ours[key], theirs[key]) for key in theirs)
        mean = reference.mean_state_dict(adapters[0], LORA)
        assert all(np.array_equal(global_adapter[key], mean[key]) for key in mean)


def test_a_flagged_client_can_receive_the_global_adapter_instead_of_its_own():
    """flagged_receive="global": the flagged client gets the global adapter at its rank
    (what a non-personalized rule sends), every other client what "own" gives it."""
    from clairstat.lora import aggregate_adapters, global_state_dict, personalized_state_dicts

    adapters = [client_adapter(k) for k in range(N_NODES)]
    results = aggregate_adapters("clair", adapters, LORA, np.ones(N_NODES), rank=1)
    own, flagged = personalized_state_dicts(results, adapters, LORA)
    shared, again = personalized_state_dicts(results, adapters, LORA,
                                             flagged_receive="global")
    assert flagged.tolist() == again.tolist() == [k == ADVERSARY for k in range(N_NODES)]
    expected = global_state_dict(results, adapters[ADVERSARY], LORA)
    assert all(np.array_equal(shared[ADVERSARY][key], expected[key]) for key in expected)
    assert not all(np.array_equal(own[ADVERSARY][key], expected[key]) for key in expected)
    for k in range(N_NODES - 1):
        assert all(np.array_equal(shared[k][key], own[k][key]) for key in own[k])
    strategy = LoraStrategy(rule="clair", lora_config=LORA, rule_options={"rank": 1},
                            flagged_receive="global")
    per_client, _, _ = strategy._aggregate(adapters, np.ones(N_NODES))
    assert all(np.array_equal(per_client[ADVERSARY][key], expected[key]) for key in expected)
    with pytest.raises(ValueError, match="flagged_receive"):
        personalized_state_dicts(results, adapters, LORA, flagged_receive="mean")
    with pytest.raises(ValueError, match="flagged_receive"):
        LoraStrategy(flagged_receive="mean")


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


# --- malformed and hostile replies (the strategy's aggregate_train, no simulation) ---
def _reply(node, state, count=10, **metrics):
    """A train reply from ``node`` as the ServerApp receives it."""
    from flwr.app import Metadata

    metadata = Metadata(run_id=0, message_id="", src_node_id=node, dst_node_id=0,
                        reply_to_message_id="", group_id="", created_at=0.0, ttl=1e9,
                        message_type="train")
    record = {} if count is None else {"num-examples": count}
    content = RecordDict({"arrays": state_dict_to_arrays(state),
                          "metrics": MetricRecord({**record, **metrics})})
    return Message(content=content, metadata=metadata)


NODES = [101 + k for k in range(N_NODES)]
Q_A, Q_B = "base_model.model.q_proj.lora_A.weight", "base_model.model.q_proj.lora_B.weight"
V_B = "base_model.model.v_proj.lora_B.weight"


def _set(key, value):
    def corrupt(state):
        state[key] = value
    return corrupt


def _set_entry(key, value):
    def corrupt(state):
        state[key] = state[key].copy()
        state[key][0, 1] = value
    return corrupt


def _delete(key):
    def corrupt(state):
        del state[key]
    return corrupt


def _rank_zero(state):
    state[Q_A] = np.zeros((0, D_IN), dtype="float32")
    state[Q_B] = np.zeros((D_OUT, 0), dtype="float32")


def _rank_above_module(state):
    rng = np.random.default_rng(7)
    state[Q_A] = rng.standard_normal((D_OUT + 1, D_IN)).astype("float32")
    state[Q_B] = rng.standard_normal((D_OUT, D_OUT + 1)).astype("float32")


def _huge(state):
    state[Q_A] = np.full((RANK, D_IN), 1e200)  # finite, but B A would reach 2e400
    state[Q_B] = np.full((D_OUT, RANK), 1e200)


def _large(state):
    state[Q_A] = np.full((RANK, D_IN), 1e100)  # finite, B A ~ 1e200 (norm above 1e150)
    state[Q_B] = np.full((D_OUT, RANK), 1e100)


MALFORMED = {
    "rank 0": (_rank_zero, {}, "q_proj has rank 0 or is empty"),
    "empty module": (_set(Q_B, np.zeros((0, RANK), "float32")), {}, "q_proj has rank 0 or is"),
    # rank 7 on a 6 x 8 module: accepted, it made CLAIR's round take tens of seconds at
    # rank 1200 (a review)
    "rank above the module": (_rank_above_module, {},
                              r"q_proj has rank 7 above min\(d_out, d_in\) = 6"),
    "NaN in B": (_set_entry(Q_B, np.nan), {}, r"q_proj\.lora_B holds non-finite"),
    "inf in A": (_set_entry(Q_A, np.inf), {}, r"q_proj\.lora_A holds non-finite"),
    "wrong shape": (_set(V_B, np.ones((D_OUT + 1, RANK), "float32")), {},
                    "differ from those of most replies"),
    "inner mismatch": (_set(V_B, np.ones((D_OUT, RANK + 1), "float32")), {},
                       "unreadable adapter"),
    "missing key": (_delete(V_B), {}, r"unreadable adapter: .*incomplete"),
    "negative count": (None, {"count": -5}, "num-examples = -5 is not a finite positive"),
    "NaN count": (None, {"count": float("nan")}, "num-examples = nan is not a finite"),
    "zero count": (None, {"count": 0}, "num-examples = 0 is not a finite positive"),
    "no count": (None, {"count": None}, "no 'num-examples' in its MetricRecord"),
    "huge values": (_huge, {}, "may overflow float64"),
    "count beyond float": (None, {"count": 10**400}, r"num-examples = 1000.*\.\.\. is not"),
    "list count": (None, {"count": [1, 2]}, r"num-examples = \[1, 2\] is not a finite"),
    # finite, B A ~ 1e200: the rules' squares overflowed (CLAIR aborted the round, the
    # geometric median went inf; a review)
    "update too large": (_large, {},
                         r"q_proj: its update is too large for float64 arithmetic"),
    "string factor": (_set(Q_B, np.full((D_OUT, RANK), "x")), {},
                      r"q_proj\.lora_B\.weight has dtype <U1, not real numbers"),
    "complex factor": (_set(Q_A, np.ones((RANK, D_IN), dtype=complex)), {},
                       r"q_proj\.lora_A\.weight has dtype complex128, not real"),
    # a float64 reply of 1e40 among float32 ones: the outputs (float32) got inf
    "beyond float32": (_set(Q_A, np.full((RANK, D_IN), 1e40)), {},
                       r"q_proj\.lora_A\.weight holds values up to 1e\+40, beyond the "
                       r"largest float32"),
}


@pytest.mark.parametrize("rule", ["clair", "median"])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_reply_is_dropped_logged_and_reported(case, rule, caplog):
    corrupt, kwargs, reason = MALFORMED[case]
    states = [client_adapter(k) for k in range(N_NODES)]
    if corrupt is not None:
        corrupt(states[2])
    replies = [_reply(node, state, **(kwargs if k == 2 else {}))
               for k, (node, state) in enumerate(zip(NODES, states))]
    strategy = LoraStrategy(rule=rule, lora_config=LORA, rule_options=(
        {"rank": 1} if rule == "clair" else {}))
    with caplog.at_level("WARNING", logger="clairstat.integrations.flower"):
        arrays, metrics = strategy.aggregate_train(3, replies)
    assert arrays is not None  # the round went on with the other five replies
    assert metrics["n-dropped"] == 1 and metrics["dropped-nodes"] == [NODES[2]]
    assert set(strategy.dropped_) == {3} and set(strategy.dropped_[3]) == {NODES[2]}
    assert __import__("re").search(reason, strategy.dropped_[3][NODES[2]])
    logged = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"node {NODES[2]}" in m and strategy.dropped_[3][NODES[2]] in m
               for m in logged)
    valid = set(NODES) - {NODES[2]}
    assert set(strategy.client_arrays_) == valid and set(strategy.weights_) == valid
    if rule == "clair":
        assert set(strategy.flagged_) == valid
        assert strategy.flagged_[NODES[ADVERSARY]] and metrics["n-flagged"] == 1


@pytest.mark.parametrize("rule", ["fedit", "median", "clair"])
@pytest.mark.parametrize("dtype", ["int64", "uint8", "bool"])
def test_integer_or_bool_factors_drop_their_reply(dtype, rule):
    """LoRA factors that are not floating point (a buggy client's cast) were aggregated,
    and when the reply came first every client's global adapter was written in its
    dtype: rounded to integers, uint8 wrapping -1 to 255, bool all True (a review)."""
    states = [client_adapter(k) for k in range(N_NODES)]
    states[0] = {key: (value > 0 if dtype == "bool" else np.round(value).astype(dtype))
                 for key, value in states[0].items()}
    strategy = LoraStrategy(rule=rule, lora_config=LORA, rule_options=(
        {"rank": 1} if rule == "clair" else {}))
    arrays, metrics = strategy.aggregate_train(1, [_reply(n, s) for n, s in zip(NODES, states)])
    assert metrics["dropped-nodes"] == [NODES[0]]
    assert f"has dtype {dtype}: LoRA factors must be floating" in strategy.dropped_[1][NODES[0]]
    assert all(value.dtype == np.float32 for value in arrays_to_state_dict(arrays).values())


@pytest.mark.parametrize("rule", ["fedit", "flora", "clair"])
def test_the_global_adapter_does_not_take_the_first_replys_lower_precision(rule):
    """A float16 reply among float32 ones wrote the global adapter, which every node
    without a personalized one loads, in float16 when it came first, and in float32
    otherwise (a review): each tensor takes its widest dtype among the replies."""
    from clairstat.lora import adapter_factors

    states = [client_adapter(k) for k in range(N_NODES)]
    states[1] = {key: value.astype(np.float16) for key, value in states[1].items()}
    updates = []
    for order in (range(N_NODES), [1, 0, 2, 3, 4, 5]):
        strategy = LoraStrategy(rule=rule, lora_config=LORA, rule_options=(
            {"rank": 1} if rule == "clair" else {}))
        arrays, _ = strategy.aggregate_train(1, [_reply(NODES[k], states[k]) for k in order])
        global_adapter = arrays_to_state_dict(arrays)
        assert all(value.dtype == np.float32 for value in global_adapter.values())
        updates.append({m: b @ a for m, (b, a) in adapter_factors(global_adapter, LORA).items()})
        own = arrays_to_state_dict(strategy.client_arrays_[NODES[1]])
        assert all(value.dtype == np.float16 for value in own.values())  # its own dtype
    for module, update in updates[0].items():
        assert np.allclose(updates[1][module], update, rtol=1e-5, atol=1e-5 * np.abs(update).max())


def test_cap_weights_with_extreme_claims():
    """Every claim above 2**1023 (1e308) made the uncapped scale 2**1024 = inf and every
    weight 0, which aborted the round; a median of subnormal claims (5e-324) halved to
    0, and every claim then weighed max_ratio (a review)."""
    from clairstat.integrations.flower import cap_weights

    equal = cap_weights([1e308] * 4, None, None)
    assert np.all(equal > 0) and np.all(equal == equal[0])
    claims = [1.5e308, 1e308, 9e307, 1.7e308]
    weights = cap_weights(claims, None, None)
    expected = np.divide(claims, 1e300) / np.sum(np.divide(claims, 1e300))
    assert np.allclose(weights / weights.sum(), expected, rtol=1e-15, atol=0)
    assert cap_weights([10, 5e-324, 5e-324, 5e-324, 5e-324], max_share=None).tolist() == [
        10.0, 1.0, 1.0, 1.0, 1.0]
    assert cap_weights([10, 5e-324, 5e-324, 5e-324, 5e-324]).tolist() == [2.0, 1.0, 1.0,
                                                                             1.0, 1.0]
    states = [client_adapter(k) for k in range(4)]
    strategy = LoraStrategy(rule="fedit", lora_config=LORA, max_weight_ratio=None,
                            max_weight_share=None)
    _, metrics = strategy.aggregate_train(1, [_reply(n, s, count=c)
                                              for n, s, c in zip(NODES, states, claims)])
    assert metrics["n-dropped"] == 0 and np.isclose(sum(strategy.weights_.values()), 1.0)


def test_a_fresh_adapter_is_a_valid_zero_update():
    states = [client_adapter(k) for k in range(N_NODES)]
    states[1] = {key: (np.zeros_like(v) if ".lora_B." in key else v)
                 for key, v in states[1].items()}
    strategy = LoraStrategy(rule="clair", lora_config=LORA, rule_options={"rank": 1})
    _, metrics = strategy.aggregate_train(1, [_reply(n, s) for n, s in zip(NODES, states)])
    assert metrics["n-dropped"] == 0 and metrics["dropped-nodes"] == []
    assert set(strategy.client_arrays_) == set(NODES)


@pytest.mark.parametrize("rule", ["clair", "median"])
def test_a_head_beside_the_lora_pairs_is_not_sent_from_one_reply(rule, caplog):
    """Tensors no rule tests (a modules_to_save head) enter the global adapter as their
    coordinate-wise median over the replies, with a log line; before, the first reply's
    own head went to every client (a review: one poisoned head, 50 times the others,
    in the global adapter under every rule)."""
    states = [dict(client_adapter(k)) for k in range(N_NODES)]
    for k, state in enumerate(states):
        state["base_model.model.head.weight"] = np.full((3, 4), 50.0 if k == 0 else 1.0,
                                                        dtype=np.float32)
    strategy = LoraStrategy(rule=rule, lora_config=LORA)
    with caplog.at_level("WARNING"):
        arrays, _ = strategy.aggregate_train(1, [_reply(n, s) for n, s in zip(NODES, states)])
    head = arrays_to_state_dict(arrays)["base_model.model.head.weight"]
    assert np.array_equal(head, np.ones((3, 4), dtype=np.float32))
    assert "not tested by any rule" in caplog.text


H = "base_model.model.head.weight"


def _head(value):
    def corrupt(state):
        if value is None:
            del state[H]
        else:
            state[H] = value
    return corrupt


BAD_HEADS = {
    "NaN": (_head(np.full((3, 4), np.nan, dtype=np.float32)), r"head\.weight holds non-finite"),
    "inf": (_head(np.full((3, 4), -np.inf)), r"head\.weight holds non-finite"),
    "string": (_head(np.full((3, 4), "x")), r"head\.weight has dtype <U1, not real"),
    "complex": (_head(np.ones((3, 4), dtype=complex)), r"head\.weight has dtype complex"),
    "other shape": (_head(np.full((1, 1), 1e30, dtype=np.float32)),
                    r"'base_model\.model\.head\.weight': \(1, 1\)\} differ from those of "
                    r"most replies"),
    "missing": (_head(None), "differ from those of most replies"),
    "beyond float32": (_head(np.full((3, 4), 1e40)), r"head\.weight holds values up to 1e\+40"),
    # the global head is written in the first reply's dtype: rounded to integers (a review)
    "integer": (_head(np.full((3, 4), 2, dtype=np.int64)),
                r"head\.weight': \(3, 4, 'integer'\)\} differ from those of most replies"),
}


@pytest.mark.parametrize("rule", ["clair", "median"])
@pytest.mark.parametrize("node", [0, 2])
@pytest.mark.parametrize("case", list(BAD_HEADS))
def test_a_malformed_head_beside_the_lora_pairs_drops_its_reply(case, node, rule, caplog):
    """Every tensor of a reply is screened, the untested ones too: a NaN head went into
    the global adapter, a string head aborted the round, and the first reply's head
    shape (or its lack of a head) made every other reply's head ignored (a review). The
    head's keys and shape are those most replies share."""
    corrupt, reason = BAD_HEADS[case]
    states = [dict(client_adapter(k)) for k in range(N_NODES)]
    for state in states:
        state[H] = np.ones((3, 4), dtype=np.float32)
    corrupt(states[node])
    strategy = LoraStrategy(rule=rule, lora_config=LORA, rule_options=(
        {"rank": 1} if rule == "clair" else {}))
    with caplog.at_level("WARNING", logger="clairstat.integrations.flower"):
        arrays, metrics = strategy.aggregate_train(1, [_reply(n, s) for n, s in
                                                       zip(NODES, states)])
    assert metrics["n-dropped"] == 1 and metrics["dropped-nodes"] == [NODES[node]]
    assert __import__("re").search(reason, strategy.dropped_[1][NODES[node]])
    assert f"dropped the reply of node {NODES[node]}" in caplog.text
    head = arrays_to_state_dict(arrays)[H]
    assert head.dtype == np.float32 and np.array_equal(head, np.ones((3, 4), np.float32))
    for node_arrays in strategy.client_arrays_.values():
        assert np.array_equal(arrays_to_state_dict(node_arrays)[H], head)


def test_fewer_than_two_valid_replies_skip_the_round(caplog):
    """A round left with one valid reply raised ValueError, which Flower's start does not
    catch: one of two sampled clients failing ended the whole run (a review). The round
    is skipped, as FedAvg skips one without replies, and the previous round's adapters
    stay, the personalized ones too."""
    states = [client_adapter(k) for k in range(3)]
    strategy = LoraStrategy(rule="fedit", lora_config=LORA)
    first, _ = strategy.aggregate_train(1, [_reply(n, s) for n, s in zip(NODES, states)])
    before = (dict(strategy.client_arrays_), dict(strategy.weights_),
              strategy.last_results_)
    replies = [_reply(NODES[0], states[0]), _reply(NODES[1], states[1], count=-1),
               _reply(NODES[2], states[2], count=float("nan"))]
    with caplog.at_level("WARNING", logger="clairstat.integrations.flower"):
        arrays, metrics = strategy.aggregate_train(2, replies)
    assert arrays is None and first is not None
    assert dict(metrics.items()) == {"n-dropped": 2, "dropped-nodes": NODES[1:3],
                                     "n-failed": 0, "failed-nodes": [],
                                     "n-valid": 1, "skipped": 1}
    assert "round 2: skipped" in caplog.text and "needs at least 2" in caplog.text
    assert set(strategy.dropped_[2]) == {NODES[1], NODES[2]}
    assert (strategy.client_arrays_, strategy.weights_, strategy.last_results_) == before
    every_reply_dropped = [_reply(n, s, count=0) for n, s in zip(NODES, states)]
    arrays, metrics = strategy.aggregate_train(3, every_reply_dropped)
    assert arrays is None and metrics["n-valid"] == 0 and metrics["n-dropped"] == 3


def test_a_huge_example_count_is_capped_at_the_weight_ratio():
    """One client claims 1e308 examples, the others 10: it weighs as 10 median clients
    under the ratio cap alone, and with the share cap (the default) a third of the
    round, 2.5 median clients."""
    states = [client_adapter(k) for k in range(N_NODES)]
    counts = [10] * N_NODES
    counts[2] = 1e308
    losses = [1.0] * N_NODES
    losses[2] = 100.0
    replies = [_reply(n, s, count=c, loss=v)
               for n, s, c, v in zip(NODES, states, counts, losses)]
    eps = np.finfo(float).eps  # a normalisation of six numbers: a few ulps
    for share, capped in ((None, 10.0), (1 / 3, 2.5)):  # 2.5 = (5 x 1) / 2: a third
        strategy = LoraStrategy(rule="flora", lora_config=LORA, max_weight_ratio=10.0,
                                max_weight_share=share)
        _, metrics = strategy.aggregate_train(1, replies)
        expected = np.ones(N_NODES)
        expected[2] = capped
        expected /= expected.sum()
        assert np.allclose([strategy.weights_[n] for n in NODES], expected, rtol=8 * eps,
                           atol=0)
        result = next(iter(strategy.last_results_.values()))
        assert np.allclose(result.weights, expected, rtol=8 * eps, atol=0)
        assert metrics["loss"] == pytest.approx(expected @ losses, rel=8 * eps)  # capped too
    assert strategy.weights_[NODES[2]] == pytest.approx(1 / 3, rel=8 * eps)
    uncapped = LoraStrategy(rule="flora", lora_config=LORA, max_weight_ratio=None,
                            max_weight_share=None)
    uncapped.aggregate_train(1, replies)  # without the cap: finite, but node 103 takes all
    uncapped_weights = np.array(list(uncapped.weights_.values()))
    assert np.isfinite(uncapped_weights).all() and uncapped.weights_[NODES[2]] == 1.0


def test_max_weight_ratio_is_validated():
    with pytest.raises(ValueError, match="max_weight_ratio"):
        LoraStrategy(max_weight_ratio=0.5)
    for share in (0.0, 0.5, 1.0):
        with pytest.raises(ValueError, match="max_weight_share"):
            LoraStrategy(max_weight_share=share)


def test_no_client_holds_a_third_of_the_weight_by_its_claim():
    """cap_weights: with 3 clients or more none holds more than 1/3 of the weight, with
    2 they weigh equally, whatever the claims."""
    from clairstat.integrations.flower import cap_weights

    rng = np.random.default_rng(0)
    eps = np.finfo(float).eps
    for n_clients in range(2, 14):
        for claims in ([10.0] * (n_clients - 1) + [1e308], [1e308] * 2 + [1.0] * (n_clients - 2),
                       rng.exponential(size=n_clients) ** 20 + 1e-300):
            weights = cap_weights(claims)
            share = (weights / weights.sum()).max()
            assert share <= max(1 / 3, 1 / n_clients) * (1 + 8 * eps), (n_clients, claims)
            assert np.all(weights <= cap_weights(claims, max_share=None))  # only cuts
    # a zero claim weighs 0 and the others share the weight (the level fell to 0 with
    # three clients and two positive claims, and every weight became 1)
    assert cap_weights([0, 5, 5]).tolist() == [0.0, 1.0, 1.0]
    assert cap_weights([0, 0, 5, 5, 5, 5]).tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    weights = cap_weights([0, 5, 50])  # two positive claims: equal weights, the zero 0
    assert weights[0] == 0.0 and weights[1] == pytest.approx(weights[2], rel=1e-15)
    # most clients claiming 0: the median positive claim is the unit (the median 0 made
    # every weight NaN, then 1), and the one client with examples weighs alone
    assert cap_weights([0, 0, 5]).tolist() == [0.0, 0.0, 1.0]
    # a positive claim that underflows against a huge one still counts for the share:
    # the huge claim does not take every weight (a review)
    weights = cap_weights([5e-324, 5e-324, 1e308], max_ratio=None)
    assert (weights / weights.sum()).max() <= 1 / 3 * (1 + 8 * eps)


@pytest.mark.parametrize("rule", ["median", "geomedian"])
def test_a_huge_claim_does_not_make_the_robust_rules_return_its_update(rule):
    """One client claiming 1e308 examples among 5 honest clients claiming 10: the ratio
    cap alone gave it 10/15 of the weight, and the weighted median and geometric median
    returned its update (a review). With the share cap they stay with the others."""
    states = [client_adapter(k) for k in range(N_NODES)]
    counts = [10] * N_NODES
    counts[ADVERSARY] = 1e308
    replies = [_reply(n, s, count=c) for n, s, c in zip(NODES, states, counts)]
    strategy = LoraStrategy(rule=rule, lora_config=LORA)
    strategy.aggregate_train(1, replies)
    assert max(strategy.weights_.values()) <= 1 / 3 * (1 + 8 * np.finfo(float).eps)
    updates = [{module: b_mat @ a_mat for module, (b_mat, a_mat)
                in adapter_factors(state, LORA).items()} for state in states]
    for module, attacker in updates[ADVERSARY].items():
        honest = [client[module] for client in updates[:ADVERSARY]]
        update = np.asarray(strategy.last_results_[module].update)
        # Closer to the honest clients' median than to the attacker's update, by far.
        to_attacker = np.linalg.norm(update - attacker)
        to_honest = np.linalg.norm(update - np.median(honest, axis=0))
        assert to_honest < 0.2 * to_attacker, (module, to_honest, to_attacker)


def test_no_minority_holds_half_of_the_weight_for_the_majority_rules():
    """cap_weights(minority=True): the heaviest ceil(n/2) - 1 clients hold at most
    1/2 - 1/(4n) of the weight, whatever they claim; equal claims stay equal, and the
    cut only lowers weights. Without it two of seven claims of 1e308 held 0.667."""
    from clairstat.integrations.flower import cap_weights

    rng = np.random.default_rng(1)
    eps = np.finfo(float).eps
    for n_clients in range(3, 16):
        minority = (n_clients + 1) // 2 - 1
        for claims in ([1e308] * minority + [10.0] * (n_clients - minority),
                       [1e308] * 2 + [10.0] * (n_clients - 2),
                       rng.exponential(size=n_clients) ** 20 + 1e-300,
                       [7.0] * n_clients):
            plain = cap_weights(claims)
            weights = cap_weights(claims, minority=True)
            top = np.sort(weights)[-minority:].sum() / weights.sum() if minority else 0.0
            assert top <= (0.5 - 0.25 / n_clients) * (1 + 8 * eps), (n_clients, claims)
            assert np.all(weights <= plain * (1 + 8 * eps))  # only cuts
            if len(set(claims)) == 1:
                assert np.array_equal(weights, plain)
    weights = cap_weights([10.0] * 5 + [1e308] * 2)
    assert weights[-2:].sum() / weights.sum() == pytest.approx(2 / 3)  # without the cut
    # claims that underflow against the others (weight 0) stay 0 and never take every
    # weight to 0 (the bisection did, and the round was skipped: a review)
    for claims in ([5e-324] * 3 + [1000.0] * 4, [0.0, 0.0, 5.0, 5.0, 5.0]):
        weights = cap_weights(claims, minority=True)
        assert weights.max() > 0 and np.all(weights[np.asarray(claims) < 1e-300] == 0)


@pytest.mark.parametrize("rule", ["median", "geomedian"])
def test_two_huge_claims_do_not_make_the_robust_rules_return_their_update(rule):
    """Two replies carrying the same poisoned adapter and claiming 1e308 examples beside
    five honest ones claiming 10: the per-client caps left them 2/3 of the weight and
    the weighted median returned their update exactly (a review). The minority cut keeps
    the robust rules with the honest clients; fedit, which averages, keeps the per-client
    caps only."""
    states = [client_adapter(k) for k in range(ADVERSARY)] + [client_adapter(ADVERSARY)] * 2
    nodes = [101 + k for k in range(len(states))]
    counts = [10] * ADVERSARY + [1e308] * 2
    replies = [_reply(n, s, count=c) for n, s, c in zip(nodes, states, counts)]
    strategy = LoraStrategy(rule=rule, lora_config=LORA)
    strategy.aggregate_train(1, replies)
    shares = np.array([strategy.weights_[node] for node in nodes])
    assert shares[-2:].sum() / shares.sum() < 0.5
    updates = [{module: b_mat @ a_mat for module, (b_mat, a_mat)
                in adapter_factors(state, LORA).items()} for state in states]
    for module, attacker in updates[-1].items():
        honest = [client[module] for client in updates[:ADVERSARY]]
        update = np.asarray(strategy.last_results_[module].update)
        to_attacker = np.linalg.norm(update - attacker)
        to_honest = np.linalg.norm(update - np.median(honest, axis=0))
        assert to_honest < 0.2 * to_attacker, (module, to_honest, to_attacker)
    averaging = LoraStrategy(rule="fedit", lora_config=LORA)
    averaging.aggregate_train(1, replies)
    fedit_shares = np.array([averaging.weights_[node] for node in nodes])
    assert fedit_shares[-2:].sum() / fedit_shares.sum() == pytest.approx(2 / 3)


@pytest.mark.parametrize("rule", ["clair", "median", "fedit"])
def test_a_round_of_fresh_adapters_keeps_them_trainable(rule):
    """Every reply fresh (lora_B = 0): zero updates, nobody flagged, A kept, B = 0."""
    fresh = [{key: (np.zeros_like(v) if ".lora_B." in key else v)
              for key, v in client_adapter(0).items()} for _ in range(N_NODES)]
    strategy = LoraStrategy(rule=rule, lora_config=LORA)
    arrays, metrics = strategy.aggregate_train(1, [_reply(n, s) for n, s in zip(NODES, fresh)])
    assert metrics["n-dropped"] == 0 and not any(strategy.flagged_.values())
    for state in [arrays_to_state_dict(arrays)] + [arrays_to_state_dict(a) for a in
                                                   strategy.client_arrays_.values()]:
        for key, value in state.items():
            expected = np.zeros_like(value) if ".lora_B." in key else fresh[0][key]
            assert np.array_equal(value, expected), key


def _evaluate_reply(node, count, accuracy):
    from flwr.app import Metadata

    metadata = Metadata(run_id=0, message_id="", src_node_id=node, dst_node_id=0,
                        reply_to_message_id="", group_id="", created_at=0.0, ttl=1e9,
                        message_type="evaluate")
    record = {"accuracy": accuracy} if count is None else {"num-examples": count,
                                                            "accuracy": accuracy}
    return Message(content=RecordDict({"metrics": MetricRecord(record)}), metadata=metadata)


def test_evaluation_drops_malformed_replies_and_caps_counts(caplog):
    counts = [10, 10, None, float("nan"), 1e308, 10]
    accuracy = [0.5, 0.5, 0.0, 0.0, 1.0, 0.5]
    replies = [_evaluate_reply(n, c, a) for n, c, a in zip(NODES, counts, accuracy)]
    strategy = LoraStrategy(rule="fedit", max_weight_ratio=10.0)
    with caplog.at_level("WARNING", logger="clairstat.integrations.flower"):
        metrics = strategy.aggregate_evaluate(4, replies)
    assert set(strategy.dropped_evaluate_[4]) == {NODES[2], NODES[3]}
    assert metrics["n-dropped"] == 2 and metrics["dropped-nodes"] == [NODES[2], NODES[3]]
    assert sum("evaluation reply of node" in r.getMessage() for r in caplog.records) == 2
    # Valid: three clients at 10 examples (weight 1 each), one capped at 10 x the median,
    # then at a third of the total weight: 1.5.
    expected = (3 * 0.5 + 1.5 * 1.0) / 4.5  # a weighted mean of four numbers: a few ulps
    assert metrics["accuracy"] == pytest.approx(expected, rel=8 * np.finfo(float).eps)


def test_a_different_rank_is_malformed_only_for_the_equal_rank_rules():
    states = [client_adapter(k) for k in range(N_NODES)]
    states[4] = {**states[4], Q_A: np.ones((RANK + 1, D_IN), "float32"),
                 Q_B: np.ones((D_OUT, RANK + 1), "float32")}
    replies = [_reply(n, s) for n, s in zip(NODES, states)]
    fedit = LoraStrategy(rule="fedit", lora_config=LORA)
    _, metrics = fedit.aggregate_train(1, replies)
    assert metrics["dropped-nodes"] == [NODES[4]]
    assert "differ from those of most replies" in fedit.dropped_[1][NODES[4]]
    flora = LoraStrategy(rule="flora", lora_config=LORA)  # mixed ranks are fine here
    with warnings.catch_warnings():
        # and draw no warning about a shared config's r: the strategy has one lora_config
        # for clients whose ranks may differ (it warned every round, a review)
        warnings.simplefilter("error", UserWarning)
        _, metrics = flora.aggregate_train(1, replies)
    assert metrics["n-dropped"] == 0


def test_ffa_drops_the_replies_whose_frozen_a_differs(caplog):
    """Under ffa one reply with another lora_A aborted the round, naming nobody (a
    review): it is dropped as malformed, logged and counted, and the others' frozen A
    aggregated."""
    shared = client_adapter(0)
    states = []
    for k in range(N_NODES):
        state = dict(client_adapter(k))
        for key in (Q_A, "base_model.model.v_proj.lora_A.weight"):
            state[key] = shared[key]
        states.append(state)
    states[3] = {**states[3], Q_A: states[3][Q_A] + np.float32(0.5)}
    strategy = LoraStrategy(rule="ffa", lora_config=LORA)
    with caplog.at_level("WARNING", logger="clairstat.integrations.flower"):
        arrays, metrics = strategy.aggregate_train(1, [_reply(n, s) for n, s in zip(NODES, states)])
    assert metrics["n-dropped"] == 1 and metrics["dropped-nodes"] == [NODES[3]]
    assert "q_proj.lora_A differs from the frozen A" in strategy.dropped_[1][NODES[3]]
    assert any(f"node {NODES[3]}" in r.getMessage() for r in caplog.records)
    assert np.array_equal(arrays_to_state_dict(arrays)[Q_A], shared[Q_A])


def test_a_round_with_fewer_valid_replies_than_the_rule_needs_is_skipped(caplog):
    """krum with n_byzantine=1 needs 5 replies: with 2 of 6 dropped the rule itself
    raised after the screen; with 2 replies and the default its message showed
    n_byzantine=-1, a value nobody gave (a review). The strategy checks first, and
    skips the round (it raised, ending the run: a review), also where fewer replies
    remain than krum's ``multi`` (krum raised after the screen: a review)."""
    states = [client_adapter(k) for k in range(N_NODES)]
    counts = [10, 10, -1, 10, float("nan"), 10]
    replies = [_reply(n, s, count=c) for n, s, c in zip(NODES, states, counts)]
    for options, valid, reason in (
            ({"n_byzantine": 1}, 4, r"round 1: skipped.*: 4 valid replies after dropping 2 "
             r"malformed ones .*rule 'krum' with n_byzantine=1 .*needs at least 5"),
            ({}, 2, r"2 valid replies after dropping 0 .*rule 'krum' \(.*derived from the "
             r"reply count.*needs at least 3"),
            ({"multi": 5}, 4, r"4 valid replies .*rule 'krum' with multi=5 needs at least 5")):
        strategy = LoraStrategy(rule="krum", lora_config=LORA, rule_options=options)
        caplog.clear()
        with caplog.at_level("WARNING", logger="clairstat.integrations.flower"):
            arrays, metrics = strategy.aggregate_train(
                1, replies if valid == 4 else [_reply(n, s) for n, s in zip(NODES[:2], states)])
        assert arrays is None and metrics["skipped"] == 1 and metrics["n-valid"] == valid
        assert strategy.last_results_ is None  # refused before aggregating
        assert __import__("re").search(reason, caplog.text), caplog.text
        assert "n_byzantine=-1" not in caplog.text


@pytest.mark.parametrize("rule, options, message", [
    ("fedavg", {}, r"unknown rule 'fedavg'; valid rules: fedit"),
    ("median", {"trim": 2}, r"rule_options \['trim'\] are not options of rule 'median'"),
    ("clair", {"rnak": 1}, r"rule_options \['rnak'\] are not options of rule 'clair'"),
    ("krum", {"n_byzantine": 2.7}, r"n_byzantine must be an integer, got 2\.7"),
    ("krum", {"multi": 0}, r"multi must be >= 1, got 0"),
    ("krum", {"multi": None}, r"multi must be an integer, got None"),  # failed at round 1
    # values, by a dry run: they failed at the first aggregation, after a round of
    # training on every client (a review)
    ("trimmed_mean", {"trim": 0.7}, r"synthetic federation.*trim must lie in \[0, 0\.5\)"),
    ("fedrot", {"lam": 2.0}, r"lam must lie in \[0, 1\], got 2\.0"),
    ("fedrot", {"align": "C"}, r"align must be 'A' or 'B'"),
    ("geomedian", {"tol": -1}, r"tol must be a finite number >= 0, got -1"),
    ("glora", {"readout_rank": 0}, r"readout_rank must lie in \[1, "),
    ("clair", {"test_level": 2.0}, r"'test_level' parameter of CLAIREstimator"),
    ("clair", {"rank": -1}, r"rank must be a non-negative integer, got -1"),
    ("clair", {"joint": False, "flagged_updates": "clip"}, r"applies to the joint refinement"),
    ("clair", {"joint": False, "rank_rule": "smallest-error"}, r"applies to the joint"),
    ("clair", {"rank_rule": "one-se"}, r"rank_rule must be one of"),
    # the dry run runs a positive rank as 1: the message names the rank given
    ("clair", {"rank": 3, "rank_rule": "smallest-error"}, r"which rank=3 fixes"),
    ("clair", {"dtype": "float16"}, r"dtype must be float64 or float32"),
])
def test_the_rule_and_its_options_are_checked_at_construction(rule, options, message):
    """An unknown rule or option failed only at round 1 (a review)."""
    with pytest.raises(ValueError, match=message):
        LoraStrategy(rule=rule, rule_options=options)
    LoraStrategy(rule="clair", rule_options={"rank": 1, "joint": False})  # valid ones pass
    LoraStrategy(rule="clair", rule_options={"rank_rule": "one-standard-error"})
    # valid values that the small dry run could not hold pass too
    LoraStrategy(rule="clair", rule_options={"rank": 12})
    LoraStrategy(rule="glora", rule_options={"readout_rank": 16, "reference_rank": 40})
    LoraStrategy(rule="krum", rule_options={"n_byzantine": 4, "multi": 3})
    LoraStrategy(rule="fedrot", rule_options={"reference": client_adapter(0), "lam": 0.5})


def test_the_dry_run_refuses_no_valid_option_and_draws_from_no_given_generator():
    """The construction's dry run (6 clients, 4 x 4) refused valid options: glora's
    readout_rank given as a numpy integer above 4 (a plain int was let through). It also
    drew from a RandomState given as random_state, so that the first round's fit
    depended on whether the strategy had been built (a review). One CLAIR noise scale
    per client is refused: a scale went to whichever reply came i-th, and a round with
    a reply fewer failed (a later review); one number for all is taken."""
    for scales in ([0.1] * 10, np.full(6, 0.1), [[0.1]]):
        with pytest.raises(ValueError, match="noise_scale: one number for every client"):
            LoraStrategy(rule="clair", rule_options={"noise_scale": scales})
    LoraStrategy(rule="clair", rule_options={"noise_scale": 0.1, "joint": False})
    LoraStrategy(rule="glora", rule_options={"readout_rank": np.int64(8)})
    with pytest.raises(ValueError, match="'noise_scale' parameter of CLAIREstimator"):
        LoraStrategy(rule="clair", rule_options={"noise_scale": -1.0})
    generator = np.random.RandomState(0)
    LoraStrategy(rule="clair", rule_options={"random_state": generator})
    assert generator.randint(2**31) == np.random.RandomState(0).randint(2**31)


def test_the_shared_metric_layout_does_not_follow_the_replies_order():
    """With as many replies of one metric layout as of another, the layout kept was the
    first reply's: the round's metrics followed the order the replies arrived in (a
    review). The tie goes to the larger total weight, then to a fixed order."""
    from flwr.app import Message, MetricRecord, RecordDict

    replies = [_evaluate_reply(n, 10, 0.8) for n in NODES[:2]]
    replies[1] = Message(content=RecordDict({"metrics": MetricRecord(
        {"num-examples": 10, "accuracy": 0.6, "loss": 1.0})}), metadata=replies[1].metadata)
    strategy = LoraStrategy(rule="fedit")
    forward = dict(strategy.aggregate_evaluate(1, replies).items())
    backward = dict(strategy.aggregate_evaluate(1, replies[::-1]).items())
    assert forward == backward and len(forward["metrics-left-out-nodes"]) == 1
    # two replies of each layout, the second pair weighing more (1 + 1.5 against 1 + 1)
    heavier = [_evaluate_reply(n, 10, 0.8) for n in NODES[:2]] + [
        Message(content=RecordDict({"metrics": MetricRecord(
            {"num-examples": count, "accuracy": 0.6, "loss": 1.0})}),
            metadata=_evaluate_reply(n, count, 0.6).metadata)
        for n, count in zip(NODES[2:4], (10, 30))]
    metrics = strategy.aggregate_evaluate(1, heavier)
    assert metrics["metrics-left-out-nodes"] == NODES[:2] and metrics["loss"] == 1.0


def test_non_finite_metrics_do_not_poison_the_round_metrics(caplog):
    """A NaN accuracy made the round's accuracy NaN, an infinite loss its loss inf (a
    review). An evaluation reply with such a metric is dropped; a train reply keeps its
    adapter, but its metrics are left out of the average; both are logged and listed."""
    strategy = LoraStrategy(rule="fedit")
    accuracy = [0.5, 0.5, float("nan"), 0.5, 0.7, 0.5]
    with caplog.at_level("WARNING", logger="clairstat.integrations.flower"):
        metrics = strategy.aggregate_evaluate(
            2, [_evaluate_reply(n, 10, a) for n, a in zip(NODES, accuracy)])
    assert metrics["dropped-nodes"] == [NODES[2]]
    assert "metric(s) ['accuracy'] are not finite" in strategy.dropped_evaluate_[2][NODES[2]]
    assert metrics["accuracy"] == pytest.approx(2.7 / 5, rel=8 * np.finfo(float).eps)
    states = [client_adapter(k) for k in range(N_NODES)]
    losses = [1.0, 1.0, float("inf"), 1.0, 2.0, 1.0]
    replies = [_reply(n, s, loss=v, steps=[1.0, 2.0]) for n, s, v in zip(NODES, states, losses)]
    replies[3] = _reply(NODES[3], states[3], loss=1.0, steps=[1.0, float("nan")])
    with caplog.at_level("WARNING", logger="clairstat.integrations.flower"):
        arrays, metrics = LoraStrategy(rule="fedit", lora_config=LORA).aggregate_train(
            1, replies)
    assert metrics["n-dropped"] == 0 and metrics["metrics-left-out-nodes"] == NODES[2:4]
    assert metrics["loss"] == pytest.approx(5.0 / 4, rel=8 * np.finfo(float).eps)
    assert metrics["steps"] == pytest.approx([1.0, 2.0], rel=8 * np.finfo(float).eps)
    assert sum(f"left the metrics of node {n} out" in r.getMessage()
               for r in caplog.records for n in NODES[2:4]) == 2


def test_metrics_with_other_names_or_list_lengths_are_left_out(caplog):
    """FedAvg checks that replies share their metric names; the strategy turned that off
    (to drop replies one by one): an evaluation reply without ``accuracy`` counted as 0
    (0.67 for six clients at 0.8), a train reply without ``loss`` pulled the loss down,
    and one list of another length lost every train metric (a review)."""
    from flwr.app import Message, MetricRecord, RecordDict

    replies = [_evaluate_reply(n, 10, 0.8) for n in NODES]
    replies[2] = Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 10})}),
                         metadata=replies[2].metadata)
    with caplog.at_level("WARNING", logger="clairstat.integrations.flower"):
        metrics = LoraStrategy(rule="fedit").aggregate_evaluate(1, replies)
    assert metrics["accuracy"] == pytest.approx(0.8, rel=8 * np.finfo(float).eps)
    assert metrics["metrics-left-out-nodes"] == [NODES[2]] and metrics["n-dropped"] == 0
    assert f"left the metrics of node {NODES[2]} out" in caplog.text
    states = [client_adapter(k) for k in range(N_NODES)]
    replies = [_reply(n, s, loss=1.0, steps=[1.0, 2.0]) for n, s in zip(NODES, states)]
    replies[1] = _reply(NODES[1], states[1], steps=[1.0, 2.0])
    replies[3] = _reply(NODES[3], states[3], loss=1.0, steps=[1.0, 2.0, 3.0])
    _, metrics = LoraStrategy(rule="fedit", lora_config=LORA).aggregate_train(1, replies)
    assert metrics["loss"] == pytest.approx(1.0, rel=8 * np.finfo(float).eps)
    assert metrics["steps"] == pytest.approx([1.0, 2.0], rel=8 * np.finfo(float).eps)
    assert metrics["metrics-left-out-nodes"] == [NODES[1], NODES[3]]
    assert metrics["n-dropped"] == 0  # their adapters are aggregated


def test_uncapped_weights_do_not_overflow_when_the_median_claim_is_tiny():
    """max_weight_ratio=None divided the counts by their median: 1e10 among claims of
    1e-300 overflowed to inf, and the share cap then gave every client 1/6 (a review)."""
    states = [client_adapter(k) for k in range(N_NODES)]
    counts = [1e-300] * N_NODES
    counts[2] = 1e10
    replies = [_reply(n, s, count=c) for n, s, c in zip(NODES, states, counts)]
    eps = np.finfo(float).eps
    strategy = LoraStrategy(rule="flora", lora_config=LORA, max_weight_ratio=None)
    strategy.aggregate_train(1, replies)
    expected = np.array([1, 1, 2.5, 1, 1, 1]) / 7.5  # a third for node 103
    assert np.allclose([strategy.weights_[n] for n in NODES], expected, rtol=8 * eps, atol=0)
    uncapped = LoraStrategy(rule="flora", lora_config=LORA, max_weight_ratio=None,
                            max_weight_share=None)
    uncapped.aggregate_train(1, replies)
    weights = np.array([uncapped.weights_[n] for n in NODES])
    assert np.isfinite(weights).all() and weights[2] == 1.0
    assert np.allclose(weights[[0, 1, 3, 4, 5]], 1e-310, rtol=1e-12, atol=0)  # subnormal


def test_an_error_of_the_rule_skips_the_round_and_names_the_node_ids(monkeypatch):
    """The rules name clients by position; the strategy gives their node ids. A round
    whose rule fails is skipped, not raised (raising ended the whole run: a review), and
    leaves the strategy's state as it was (weights_ was the new round's)."""
    import clairstat.integrations.flower as flower

    states = [client_adapter(k) for k in range(N_NODES)]
    strategy = LoraStrategy(rule="fedit", lora_config=LORA)
    strategy.aggregate_train(1, [_reply(n, s) for n, s in zip(NODES, states)])
    before = (dict(strategy.weights_), strategy.last_results_)

    def failing(*args, **kwargs):
        raise ValueError("factors[2]: a failure of the rule")

    monkeypatch.setattr(flower, "personalized_state_dicts", failing)
    arrays, metrics = strategy.aggregate_train(2, [_reply(n, s, count=k + 1) for k, (n, s)
                                                   in enumerate(zip(NODES[:5], states))])
    assert arrays is None and metrics["skipped"] == 1 and metrics["rule-failed"] == 1
    assert metrics["n-valid"] == 5
    assert re.fullmatch(r"factors\[2\]: a failure.*node ids \[101, 102, 103, 104, 105\]\)",
                        strategy.failed_[2])
    assert (strategy.weights_, strategy.last_results_) == before
    # the same failure in the next round is not one round's: it raises (a run whose
    # every round was skipped ended "successfully" with its initial adapter)
    # a round skipped for too few replies in between does not reset it (a review)
    _, metrics = strategy.aggregate_train(3, [_reply(NODES[0], states[0])])
    assert metrics["skipped"] == 1 and "rule-failed" not in metrics
    with pytest.raises(ValueError, match=r"round 4: rule 'fedit' failed in this round and "
                                         r"in the last round that reached it: "
                                         r"factors\[2\].*\(round 2: "):
        strategy.aggregate_train(4, [_reply(n, s) for n, s in zip(NODES, states)])


def test_bfloat16_tensors_travel_as_float32():
    """A review: bf16, the usual dtype of LLM adapters, raised numpy's TypeError."""
    import torch

    state = {k: torch.as_tensor(v).bfloat16() for k, v in client_adapter(0).items()}
    back = arrays_to_state_dict(state_dict_to_arrays(state))
    assert all(back[k].dtype == np.float32 for k in state)
    assert all(np.array_equal(back[k], state[k].float().numpy()) for k in state)


def test_a_fixed_joint_rank_that_a_round_cannot_hold_is_lowered_for_that_round(caplog):
    """A CLAIR joint rank of 5 fits six clients; with one reply dropped (a NaN) the five
    left cannot hold it. The round raised, and Flower's start does not catch it: one bad
    reply ended the run (a review). The round's rank is lowered to what its clients
    support (logged), as the joint refinement does for a small collaborative set."""
    states = [client_adapter(k) for k in range(N_NODES)]
    strategy = LoraStrategy(rule="clair", lora_config=LORA, rule_options={"rank": 5})
    bad = dict(states[0])
    _set_entry(Q_B, np.nan)(bad)
    with caplog.at_level("WARNING", logger="clairstat.integrations.flower"):
        arrays, metrics = strategy.aggregate_train(
            1, [_reply(n, s) for n, s in zip(NODES, [bad, *states[1:]])])
    assert arrays is not None and "skipped" not in metrics and strategy.failed_ == {}
    assert metrics["dropped-nodes"] == [NODES[0]]
    assert "joint rank 5 exceeds what this round's 5 clients support; using 4" in caplog.text
    arrays, metrics = strategy.aggregate_train(2, [_reply(n, s) for n, s in zip(NODES, states)])
    assert arrays is not None and sorted(strategy.flagged_history_) == [1, 2]


def test_every_round_keeps_its_flags_by_node_id():
    """flagged_ held the last round's flags only, and the metrics a count (a review):
    flagged_history_ keeps every aggregated round's, and the metrics name the nodes."""
    states = [client_adapter(k) for k in range(N_NODES)]
    strategy = LoraStrategy(rule="clair", lora_config=LORA, rule_options={"random_state": 0})
    _, first = strategy.aggregate_train(1, [_reply(n, s) for n, s in zip(NODES, states)])
    benign = [client_adapter(k) for k in range(N_NODES - 1)] + [client_adapter(0)]
    _, second = strategy.aggregate_train(2, [_reply(n, s) for n, s in zip(NODES, benign)])
    assert first["flagged-nodes"] == [NODES[ADVERSARY]] and first["n-flagged"] == 1
    assert strategy.flagged_history_[1] == {n: n == NODES[ADVERSARY] for n in NODES}
    assert second["flagged-nodes"] == [] and not any(strategy.flagged_history_[2].values())
    assert strategy.flagged_ == strategy.flagged_history_[2]


def test_a_tie_between_module_shapes_does_not_follow_the_arrival_order():
    """Three replies adapt q_proj and v_proj, three q_proj only: which group was kept
    followed the replies' arrival order (Counter's first seen; a review). The group of
    the smallest node id is kept, in either order."""
    states = [client_adapter(k) for k in range(N_NODES)]
    for k in (3, 4, 5):
        states[k] = {key: value for key, value in states[k].items() if "v_proj" not in key}
    replies = [_reply(n, s) for n, s in zip(NODES, states)]
    dropped = []
    for order in (replies, replies[::-1]):
        strategy = LoraStrategy(rule="fedit", lora_config=LORA)
        _, metrics = strategy.aggregate_train(1, order)
        dropped.append(sorted(metrics["dropped-nodes"]))
    assert dropped == [NODES[3:], NODES[3:]]


@pytest.mark.parametrize("field, value, name", [
    ("use_dora", True, "DoRA"), ("lora_bias", True, "trained bias"),
    ("target_parameters", ["experts.gate_up_proj"], "target_parameters")])
def test_a_strategy_for_adapters_it_cannot_aggregate_is_refused_when_built(field, value,
                                                                           name):
    """A review: ``LoraStrategy(lora_config=LoraConfig(use_dora=True))`` was built, then
    every client's DoRA reply was dropped as unreadable and every round skipped, with
    warnings in the log only. Such a config is refused at construction (where
    ``clairstat refine`` refuses the adapters), by name; a plain config is taken."""
    with pytest.raises(ValueError, match=name):
        LoraStrategy(rule="clair", lora_config={**LORA, field: value})
    LoraStrategy(rule="clair", lora_config={**LORA, field: False if value is True else []})


def test_dora_and_embedding_keys_are_named_apart():
    """The refusal of an adapter's keys says which unsupported form it found (one
    message named both DoRA and embedding LoRA, a review)."""
    from clairstat.lora import lora_pairs

    with pytest.raises(ValueError, match=r"DoRA adapters \(a lora_magnitude_vector\)"):
        lora_pairs(["m.lora_A.weight", "m.lora_B.weight", "m.lora_magnitude_vector"])
    with pytest.raises(ValueError, match=r"^[^D]*embedding LoRA adapters"):
        lora_pairs(["m.lora_embedding_A", "m.lora_embedding_B"])


def _failed_reply(node):
    """A reply carrying a Flower error (the client raised, or timed out)."""
    from flwr.app import Error, Metadata

    metadata = Metadata(run_id=0, message_id="", src_node_id=node, dst_node_id=0,
                        reply_to_message_id="", group_id="", created_at=0.0, ttl=1e9,
                        message_type="train")
    return Message(error=Error(code=0, reason="the client raised"), metadata=metadata)


def test_failed_replies_are_counted_in_the_rounds_metrics():
    """A reply carrying a Flower error was only logged by FedAvg: the round's metrics
    said nothing of a client that had not answered (a review). They now count it, in
    training (also where every reply failed and the round is skipped) and evaluation."""
    replies = [_reply(n, client_adapter(k)) for k, n in enumerate(NODES[:3])]
    strategy = LoraStrategy(rule="fedit", lora_config=LORA)
    _, metrics = strategy.aggregate_train(1, replies + [_failed_reply(999)])
    assert metrics["n-failed"] == 1 and list(metrics["failed-nodes"]) == [999]
    assert metrics["n-dropped"] == 0
    _, metrics = strategy.aggregate_train(2, replies)
    assert metrics["n-failed"] == 0 and list(metrics["failed-nodes"]) == []
    arrays, metrics = strategy.aggregate_train(3, [_failed_reply(998), _failed_reply(999)])
    assert arrays is None and metrics["skipped"] == 1 and metrics["n-failed"] == 2
    evaluated = [_reply(n, client_adapter(k), accuracy=0.5) for k, n in enumerate(NODES[:2])]
    metrics = strategy.aggregate_evaluate(1, evaluated + [_failed_reply(999)])
    assert metrics["n-failed"] == 1 and list(metrics["failed-nodes"]) == [999]
    # no evaluation reply left: the failures are still reported (it returned None)
    metrics = strategy.aggregate_evaluate(2, [_failed_reply(998), _failed_reply(999)])
    assert metrics["n-failed"] == 2 and metrics["n-dropped"] == 0
    assert strategy.aggregate_evaluate(3, []) is None

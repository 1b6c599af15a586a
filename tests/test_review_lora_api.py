"""An LLM engineer's review of the LoRA API, the Flower strategy and ``clairstat
refine``'s configs: each test is a defect the review demonstrated, failing before its
fix."""

import warnings

import numpy as np
import pytest

from clairstat.aggregation import aggregate
from clairstat.lora import (aggregate_adapters, check_config, lora_scaling,
                            personalized_state_dicts, refine_adapters)

torch = pytest.importorskip("torch")


def _adapters(n_clients=10, dim=32, rank=4, seed=0, bad=3):
    """Two modules per client; client ``bad`` 20 times larger."""
    rng = np.random.default_rng(seed)
    states = []
    for k in range(n_clients):
        state = {}
        for module in ("m", "n"):
            state[f"{module}.lora_A.weight"] = rng.standard_normal((rank, dim))
            state[f"{module}.lora_B.weight"] = (rng.standard_normal((dim, rank))
                                                * (20 if k == bad else 1))
        states.append(state)
    return states


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.float8_e5m2,
                                   torch.float8_e4m3fn])
def test_factors_of_a_non_float_dtype_are_refused(dtype):
    """A review: int32, int8 and fp8 factors were refined and written back in their
    dtype (int32: the written update 58% off the same values' float32 run), and
    float8_e4m3fn raised NotImplementedError ("isfinite")."""
    states = [{key: torch.tensor(value).to(dtype) for key, value in state.items()}
              for state in _adapters()]
    name = str(dtype).replace("torch.", "")
    with pytest.raises(ValueError, match=rf"client 0: m\.lora_A\.weight is {name}: LoRA "
                                         r"factors are read and written in float16"):
        refine_adapters(states, {"lora_alpha": 8}, random_state=0)
    if dtype == torch.int32:  # numpy's integers too
        arrays = [{key: np.round(value).astype(np.int16) for key, value in state.items()}
                  for state in _adapters()]
        with pytest.raises(ValueError, match="is int16"):
            refine_adapters(arrays, {"lora_alpha": 8}, random_state=0)


@pytest.mark.parametrize("joint", [True, False])
def test_personalized_state_dicts_refuse_other_clients_than_the_results(joint):
    """A review: the same clients in reverse order got the flags of the original order
    (the contaminated client a refined adapter, a benign one its own back), silently;
    9 state dicts for results of 10 raised numpy's "cannot reshape"."""
    states = _adapters()
    results = aggregate_adapters("clair", states, {"lora_alpha": 8}, random_state=0,
                                 joint=joint)
    _, flags = personalized_state_dicts(results, states, {"lora_alpha": 8})
    assert np.flatnonzero(flags).tolist() == [3]
    with pytest.raises(ValueError, match="client 0's update .* is not the one the results "
                                         "were computed on"):
        personalized_state_dicts(results, states[::-1], {"lora_alpha": 8})
    with pytest.raises(ValueError, match="computed on 10 clients; state_dicts has 9"):
        personalized_state_dicts(results, states[:9], {"lora_alpha": 8})


def test_an_untrained_majority_is_warned_about():
    """A review: 13 untrained clients (zero updates) beside 12 trained ones (2 attackers)
    made every p-value 1 with no warning (12 untrained: both attackers flagged)."""
    from test_hostile_aggregation import _federation_with_zero_clients

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # 12 of 24: no warning of this kind
        try:
            aggregate("clair", _federation_with_zero_clients(12), np.ones(24),
                      random_state=0)
        except UserWarning as warning:
            assert "zero update" not in str(warning)
    with pytest.warns(UserWarning, match="13 of 25 clients sent a zero update"):
        aggregate("clair", _federation_with_zero_clients(13), np.ones(25), random_state=0)


@pytest.mark.parametrize("config, message", [
    ({"lora_alpha": 4, "alpha_pattern": {"q_proj[": 2}},
     r"alpha_pattern key 'q_proj\[' is not a regular expression"),
    ({"lora_alpha": 10 ** 400}, r"lora_alpha( of \S+)? must be a finite non-zero number, "
                                r"got 1000"),
    ({"lora_alpha": 0}, r"lora_alpha( of \S+)? must be a finite non-zero number, got 0"),
    ({"lora_alpha": 4, "alpha_pattern": ["q_proj"]}, "alpha_pattern must be a mapping")])
def test_unusable_scaling_fields_are_value_errors(config, message):
    """A review: an alpha_pattern key that is no regular expression raised re.error, and
    an integer alpha beyond float64 OverflowError, out of ``clairstat refine`` (a
    traceback, exit 1) and out of LoraStrategy's first round (after the clients had
    trained): now ValueErrors, from the strategy's constructor."""
    with pytest.raises(ValueError, match=message):
        check_config(config)
    with pytest.raises(ValueError, match=message):  # the API's per-module scaling
        lora_scaling(config, "base_model.model.q_proj", 4)
    flower = pytest.importorskip("clairstat.integrations.flower")
    with pytest.raises(ValueError, match=message):
        flower.LoraStrategy(lora_config=config)


def test_the_scaling_checks_the_alpha_it_uses():
    """A global lora_alpha of 0 is peft's scaling 0 for the modules no pattern covers,
    so lora_scaling refuses it there and not where a pattern gives the alpha (as
    before the config checks; a review found the first version refusing both)."""
    config = {"lora_alpha": 0, "alpha_pattern": {"q_proj": 4}}
    assert lora_scaling(config, "base_model.model.q_proj", 4) == 1.0
    with pytest.raises(ValueError, match="lora_alpha of base_model.model.v_proj"):
        lora_scaling(config, "base_model.model.v_proj", 4)
    check_config(config)  # and the strategy's check leaves it to the modules (a review)
    flower = pytest.importorskip("clairstat.integrations.flower")
    flower.LoraStrategy(lora_config={"lora_alpha": 0, "alpha_pattern": {".*": 4}})


def test_big_endian_float_factors_are_float64():
    """A review of the dtype check: numpy's ">f8" was refused as not float64."""
    states = [{key: value.astype(">f8") for key, value in state.items()}
              for state in _adapters()]
    fit = refine_adapters(states, {"lora_alpha": 8}, random_state=0)
    assert np.flatnonzero(fit.flagged).tolist() == [3]


def test_global_rules_refuse_another_number_of_clients():
    """A review: fedit's results for 10 clients with 9 state dicts were read out
    silently (the check of the clients covered only the personalized rules)."""
    states = _adapters()
    results = aggregate_adapters("fedit", states, {"lora_alpha": 8})
    with pytest.raises(ValueError, match="computed on 10 clients; state_dicts has 9"):
        personalized_state_dicts(results, states[:9], {"lora_alpha": 8})


def test_a_node_that_replies_twice_is_dropped():
    """A review: node 201 replying twice (the second time with another adapter) had
    both replies aggregated, as two of seven equal shares, with nothing logged."""
    pytest.importorskip("flwr")
    from test_flower import LORA, _reply, client_adapter

    from clairstat.integrations.flower import LoraStrategy

    states, nodes = [client_adapter(k) for k in range(6)], [201 + k for k in range(6)]
    strategy = LoraStrategy(rule="fedit", lora_config=LORA)
    _, metrics = strategy.aggregate_train(
        1, [_reply(n, s) for n, s in zip(nodes, states)] + [_reply(201, states[5])])
    assert metrics["n-dropped"] == 1 and list(metrics["dropped-nodes"]) == [201]
    assert set(strategy.weights_) == set(nodes[1:])
    assert "2 replies from this node" in strategy.dropped_[1][201]
    # the evaluation too: node 201's two accuracies of 1.0 made 2 of 7 shares (0.64)
    replies = [_evaluate_reply(n, 0.5) for n in nodes[1:]]
    record = strategy.aggregate_evaluate(1, [_evaluate_reply(201, 1.0)] + replies
                                         + [_evaluate_reply(201, 1.0)])
    assert record["n-dropped"] == 1 and list(record["dropped-nodes"]) == [201]
    assert record["accuracy"] == pytest.approx(0.5)


def _evaluate_reply(node, accuracy):
    from flwr.app import Message, Metadata, MetricRecord, RecordDict

    metadata = Metadata(run_id=0, message_id="", src_node_id=node, dst_node_id=0,
                        reply_to_message_id="", group_id="", created_at=0.0, ttl=1e9,
                        message_type="evaluate")
    return Message(content=RecordDict({"metrics": MetricRecord(
        {"num-examples": 10, "accuracy": accuracy})}), metadata=metadata)


def test_an_own_config_whose_r_contradicts_the_factors_is_refused():
    """Noticed in a review: a config whose ``r`` is not its adapter's rank (peft would
    not load the adapter, and its alpha / r is not the scaling used) was accepted; the
    LoRA benchmark itself passed ``{"r": 1}`` with rank-16 factors."""
    states = _adapters(n_clients=6)  # rank 4 in both modules
    right = {"lora_alpha": 8, "r": 4}
    refine_adapters(states, [right] * 6, joint=False)  # one config per client: checked
    wrong = [right] * 5 + [{"lora_alpha": 8, "r": 2}]
    with pytest.raises(ValueError, match=r"client 5: m: its lora_A has 4 rows but the "
                                         r"config's r says 2: peft would not load"):
        refine_adapters(states, wrong, joint=False)
    # rank_pattern states the module's rank where a key matches, as peft reads it
    patterned = {"lora_alpha": 8, "r": 2, "rank_pattern": {"m": 4, "n": 4}}
    refine_adapters(states, [patterned] * 6, joint=False)
    off = {"lora_alpha": 8, "r": 4, "rank_pattern": {"n": 3}}
    with pytest.raises(ValueError, match="client 0: n: .* config's rank_pattern says 3"):
        refine_adapters(states, [off] * 6, joint=False)
    # one config shared by all: a federation's clients may differ in rank under one
    # alpha (each scaled by its own rank), so its r is not checked
    mixed = states[:5] + [_adapters(n_clients=1, rank=2, seed=1)[0]]
    refine_adapters(mixed, {"lora_alpha": 8, "r": 4}, joint=False)


@pytest.mark.parametrize("rule", ["fedit", "median", "clair"])
def test_personalized_state_dicts_checks_each_client_s_own_rank(rule):
    """A review: with a rule that has no per-client results (fedit, median) the
    per-client configs' r went unchecked (clair's was)."""
    states = _adapters(n_clients=8)
    configs = [{"lora_alpha": 8, "r": 4}] * 7 + [{"lora_alpha": 8, "r": 2}]
    results = aggregate_adapters(rule, states, {"lora_alpha": 8})
    with pytest.raises(ValueError, match="client 7: m: its lora_A has 4 rows but the "
                                         "config's r says 2"):
        personalized_state_dicts(results, states, configs)
    personalized_state_dicts(results, states, configs[:1] * 8)  # right ones: accepted


def test_a_rank_pattern_entry_of_none_states_a_wrong_rank():
    """A review: a matching rank_pattern entry None skipped the check (peft would not
    load the adapter)."""
    from clairstat.lora import check_rank

    with pytest.raises(ValueError, match="config's rank_pattern says None"):
        check_rank({"r": 4, "rank_pattern": {"q": None}}, "q", 8)
    check_rank({"r": 4, "rank_pattern": {"q": 8}}, "q", 8)


def test_peft_refuses_the_adapter_check_rank_refuses():
    """The reason for :func:`clairstat.lora.check_rank`: peft cannot load factors of
    another rank than its config's ``r``."""
    peft = pytest.importorskip("peft")
    from clairstat.lora import check_rank

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.q_proj(x)

    model = peft.get_peft_model(Tiny(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    state = {"base_model.model.q_proj.lora_A.weight": torch.zeros(4, 8),
             "base_model.model.q_proj.lora_B.weight": torch.zeros(8, 4)}
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft.set_peft_model_state_dict(model, state)
    with pytest.raises(ValueError, match="4 rows but the config's r says 2"):
        check_rank(model.peft_config["default"], "base_model.model.q_proj", 4)
    check_rank(model.peft_config["default"], "base_model.model.q_proj", 2)

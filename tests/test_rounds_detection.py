"""Tests of the per-round detection study (simulations/studies/rounds_detection.py):
its cells and counts, its interventions, and its server step against the Flower
strategy's (test_the_server_step_is_the_flower_strategys). Whole replays are not
compared with Flower runs here: the Flower clients train on one torch thread, so the
adapters may differ by round-off."""

import numpy as np
import pytest

pytest.importorskip("peft")
pytest.importorskip("torch")

from simulations.studies import copying_rounds, rounds_detection  # noqa: E402


def test_cells_are_the_multi_round_designs_with_their_own_seed_blocks():
    small = rounds_detection.STUDY.cells("small")
    assert {(c["design"], c["setting"]) for c in small} == {
        (c["design"], c["setting"]) for c in copying_rounds.STUDY.cells("small")}
    assert {c["seed_block"] for c in small} == {"rounds_detection",
                                                rounds_detection.CONFIRM_BLOCK}


def test_a_whole_group_counts_only_when_every_benign_client_of_a_variant_is_flagged():
    variant = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])
    benign = np.ones(9, dtype=bool)
    flags = np.isin(np.arange(9), [1, 4, 7])
    assert rounds_detection._whole_groups(flags, variant, benign)
    assert not rounds_detection._whole_groups(np.isin(np.arange(9), [1, 4]), variant, benign)
    # an attacker does not count towards its variant's group: with client 7 an
    # attacker, variant 1's benign clients are 1 and 4, below MIN_GROUP, never a group
    benign[7] = False
    assert not rounds_detection._whole_groups(np.isin(np.arange(9), [1, 4, 7]), variant,
                                              benign)
    # and a group of MIN_GROUP benign clients counts without the attacker's flag
    variant[8] = 1
    assert rounds_detection._whole_groups(np.isin(np.arange(9), [1, 4, 8]), variant, benign)


def test_smoke_replicate_counts_every_round(monkeypatch):
    params = rounds_detection.STUDY.cells("smoke")[0]
    trace = [{"client_flags": np.array([True, False, False, True]),
              "module_flags": np.array([[True, False, False, False],
                                        [True, True, True, True]]),
              "module_ranks": np.array([1, 2]), "joint_rank": 1, "solver": "torch"},
             {"client_flags": np.array([True, False, False, False]),
              "module_flags": np.zeros((2, 4), dtype=bool),
              "module_ranks": np.array([0, 0]), "joint_rank": None, "solver": "torch"}]
    accuracy = {"local": np.array([0.5, 0.8, 1.0, np.nan]),
                "clair": np.array([0.6, 0.8, 0.5, np.nan])}
    monkeypatch.setattr(rounds_detection, "replay",
                        lambda *_, **__: (trace, np.array([False, False, False, True]),
                                          np.array([0, 0, 0, 0]), accuracy))
    row = rounds_detection.simulate_one(params, 0)
    assert (row["modules_r1"], row["module_benign_any_r1"], row["module_benign_flags_r1"]) \
        == (2, 2, 4)
    assert (row["client_benign_r1"], row["client_attackers_r1"], row["client_kept_flag_r1"]) \
        == (1, 1, 0)
    # module 2 flags the whole (benign) variant 0, module 1 one of its clients
    assert row["module_group_r1"] == 1
    assert (row["client_benign_r2"], row["client_kept_flag_r2"]) == (1, 1)
    assert np.isnan(row["joint_rank_r2"]) and row["module_rank_r1"] == 1.5
    assert row["acc_clair"] == pytest.approx(1.9 / 3)
    assert row["rel_clair"] == pytest.approx((0.2 + 0.0 - 0.5) / 3)  # attackers left out


def test_interventions_run_on_every_cell_and_leave_the_plain_cells_unchanged():
    small = [c for c in rounds_detection.STUDY.cells("small")
             if c["seed_block"] == "rounds_detection"]
    plain = [c for c in small if "intervention" not in c]
    # the plain cells carry no intervention key: their ids and seeds are those of the
    # committed rows
    assert len(plain) == 4
    changed = [c for c in small if "intervention" in c]
    assert len(changed) == 4 * len(rounds_detection.INTERVENTIONS)
    assert {c["intervention"] for c in changed} == set(rounds_detection.INTERVENTIONS)
    # the confirmation block: the same four cells, plain and under the option, own seeds
    confirm = [c for c in rounds_detection.STUDY.cells("small")
               if c["seed_block"] == rounds_detection.CONFIRM_BLOCK]
    assert sorted(c.get("intervention", "none") for c in confirm) == \
        ["flagged-get-global"] * 4 + ["none"] * 4
    with pytest.raises(ValueError, match="unknown intervention"):
        rounds_detection.replay({**plain[0], "intervention": "none-such"}, 0)


def test_without_the_robust_start_the_detection_starts_from_the_unflagged_clients():
    start = np.array([True, False, True, True])
    assert rounds_detection._starting_set(None, None, start, 2, None) is start
    assert rounds_detection._starting_set(None, None, np.eye(4, dtype=bool)[0], 2,
                                          None).all()


def test_the_no_robust_start_intervention_replaces_the_concentration_steps(monkeypatch):
    original, starts = rounds_detection._starting_set, []

    def recording(blocks, weights, start, *args, **kwargs):
        starts.append(start.copy())
        return original(blocks, weights, start, *args, **kwargs)

    monkeypatch.setattr(rounds_detection, "_starting_set", recording)
    cell = next(c for c in rounds_detection.STUDY.cells("smoke")
                if c.get("intervention") == "no-robust-start")
    trace, _, _, _ = rounds_detection.replay(cell, 3)
    # one detection per fitted module and round went through it
    assert len(starts) == sum(len(fit["module_ranks"]) for fit in trace) > 0


@pytest.mark.parametrize("intervention, receive", [("none", "own"),
                                                   ("flagged-get-global", "global")])
def test_the_server_step_is_the_flower_strategys(intervention, receive):
    """The replay's aggregation equals LoraStrategy._aggregate on the same replies (in
    the same order): flags and every adapter sent back, the flagged client's included."""
    pytest.importorskip("flwr")
    from clairstat.integrations.flower import LoraStrategy, cap_weights
    from simulations.copying.replicate import DEFAULT_PARAMS

    cell = next(c for c in rounds_detection.STUDY.cells("smoke")
                if c["design"] == "contaminated")
    params = {**DEFAULT_PARAMS, **copying_rounds.ROUND_PARAMS, **cell}
    _, _, specs, _, _, clients, init, lora = copying_rounds.setup(params, 5)
    replies = [clients.reply(k, init, 1) for k in range(len(specs))]
    # the replay's weights (equal, summing to one) against the strategy's capped counts
    _, states, flagged = rounds_detection.server_step(
        replies, lora, np.full(len(specs), 1.0 / len(specs)), params, 5, intervention)
    weights = cap_weights(np.full(len(specs), float(params["n_train"])))
    strategy = LoraStrategy(rule="clair", lora_config=lora, personalized=True,
                            rule_options={"test_level": params["test_level"],
                                          "random_state": 5}, flagged_receive=receive)
    theirs, _, their_flags = strategy._aggregate(replies, weights)
    assert flagged.any() and flagged.tolist() == their_flags.tolist()
    for ours, reference in zip(states, theirs):
        assert set(ours) == set(reference)
        assert all(np.array_equal(ours[key], reference[key]) for key in reference)

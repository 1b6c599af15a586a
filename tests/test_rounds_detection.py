"""Tests of the per-round detection study (simulations/studies/rounds_detection.py).

That its replay of CLAIR's rounds matches the Flower run is tested with the multi-round
study's smoke run (tests/test_copying_rounds.py)."""

import numpy as np
import pytest

pytest.importorskip("peft")
pytest.importorskip("torch")

from simulations.studies import copying_rounds, rounds_detection  # noqa: E402


def test_cells_are_the_multi_round_designs_with_their_own_seed_block():
    small = rounds_detection.STUDY.cells("small")
    assert {(c["design"], c["setting"]) for c in small} == {
        (c["design"], c["setting"]) for c in copying_rounds.STUDY.cells("small")}
    assert all(c["seed_block"] == "rounds_detection" for c in small)


def test_a_whole_group_counts_only_when_every_benign_client_of_a_variant_is_flagged():
    variant = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])
    benign = np.ones(9, dtype=bool)
    flags = np.isin(np.arange(9), [1, 4, 7])
    assert rounds_detection._whole_groups(flags, variant, benign)
    assert not rounds_detection._whole_groups(np.isin(np.arange(9), [1, 4]), variant, benign)
    # a flagged attacker does not complete a group; a group below MIN_GROUP never counts
    benign[7] = False
    assert not rounds_detection._whole_groups(np.isin(np.arange(9), [1, 4]), variant, benign)


def test_smoke_replicate_counts_every_round(monkeypatch):
    params = rounds_detection.STUDY.cells("smoke")[0]
    trace = [{"client_flags": np.array([True, False, False, True]),
              "module_flags": np.array([[True, False, False, False],
                                        [True, True, True, True]]),
              "module_ranks": np.array([1, 2]), "joint_rank": 1, "solver": "torch"},
             {"client_flags": np.array([True, False, False, False]),
              "module_flags": np.zeros((2, 4), dtype=bool),
              "module_ranks": np.array([0, 0]), "joint_rank": None, "solver": "torch"}]
    monkeypatch.setattr(rounds_detection, "replay",
                        lambda *_: (trace, np.array([False, False, False, True]),
                                    np.array([0, 0, 0, 0])))
    row = rounds_detection.simulate_one(params, 0)
    assert (row["modules_r1"], row["module_benign_any_r1"], row["module_benign_flags_r1"]) \
        == (2, 2, 4)
    assert (row["client_benign_r1"], row["client_attackers_r1"], row["client_kept_flag_r1"]) \
        == (1, 1, 0)
    # module 2 flags the whole (benign) variant 0, module 1 one of its clients
    assert row["module_group_r1"] == 1
    assert (row["client_benign_r2"], row["client_kept_flag_r2"]) == (1, 1)
    assert np.isnan(row["joint_rank_r2"]) and row["module_rank_r1"] == 1.5

"""The LoRA path's null: each statistic predicted from the other clients'
(:func:`clairstat._null.predictive_null`). Its level is checked where the null it
replaced failed, with a broken variant that must fail the same check."""

import dataclasses

import numpy as np
import pytest
from statsmodels.stats.multitest import multipletests

from clairstat._null import PredictiveNull, predictive_null

LEVEL = 0.05


def _any_rejection_share(null_maker, n_clients, nu, reps, seed):
    rng = np.random.default_rng(seed)
    hits = 0
    everyone = np.ones(n_clients, dtype=bool)
    for _ in range(reps):
        stat = rng.chisquare(nu, n_clients)
        null = null_maker(predictive_null(stat, np.ones(n_clients), everyone, 0.0)[0])
        hits += multipletests(np.exp(null.log_sf(stat)), LEVEL, "fdr_bh")[0].any()
    return hits / reps


# 8 clients with nu = 20 is where the scaled chi^2 fitted to the statistics rejected in
# 0.130 of all-benign replicates (benchmarks/RESULTS.md); the predictive null in 0.04-0.05.
@pytest.mark.parametrize("n_clients, nu", [(8, 20.0), (16, 128.0)])
def test_the_predictive_null_holds_its_level_and_a_normal_one_does_not(n_clients, nu):
    reps = 1500
    # BH on independent benign p-values rejects anything with probability at most the
    # level; three binomial standard errors above it (0.067) is where a null that
    # holds its level would land by chance about once in a thousand runs.
    bound = LEVEL + 3 * np.sqrt(LEVEL * (1 - LEVEL) / reps)
    share = _any_rejection_share(lambda null: null, n_clients, nu, reps, seed=n_clients)
    assert share <= bound
    # Negative control: the same centre and spread referred to a normal (the median's
    # and the MAD's errors not carried into the p-values) must exceed the bound with 8
    # clients (it rejects in about a fifth of the replicates there).
    if n_clients == 8:
        normal = _any_rejection_share(
            lambda null: dataclasses.replace(null, df=np.full(len(null.df), 1e12)),
            n_clients, nu, reps, seed=n_clients)
        assert normal > bound


def test_a_client_far_above_the_others_is_flagged_and_the_null_is_scale_free():
    rng = np.random.default_rng(3)
    stat = rng.chisquare(40.0, 16)
    stat[0] *= 10.0
    everyone = np.ones(16, dtype=bool)
    null, new = predictive_null(stat, np.ones(16), everyone, 0.0)
    adjusted = multipletests(np.exp(null.log_sf(stat)), LEVEL, "fdr_bh")[1]
    assert adjusted[0] <= LEVEL and np.all(adjusted[1:] > LEVEL)
    # The statistics' units do not matter (cube roots: centre and spread scale alike).
    scaled, _ = predictive_null(stat * 1e-30, np.ones(16), everyone, 0.0)
    np.testing.assert_allclose(scaled.log_sf(stat * 1e-30), null.log_sf(stat), rtol=1e-10)
    # A new client is predicted from every calibration client; one like client 0 is
    # flagged, one like the median is not.
    assert new.broadcast(2).log_sf(np.array([stat[0], np.median(stat)]))[0] < np.log(1e-3)
    assert new.broadcast(2).log_sf(np.array([stat[0], np.median(stat)]))[1] > np.log(0.3)


def test_each_client_is_left_out_of_its_own_prediction():
    stat = np.array([1.0, 1.1, 0.9, 1.05, 0.95, 1.02, 50.0])
    null, _ = predictive_null(stat, np.ones(7), np.ones(7, dtype=bool), 0.0)
    others = np.cbrt(stat[:6])
    assert null.center[6] == pytest.approx(np.median(others))
    assert null.df[6] == pytest.approx(0.37 * 6)


def test_round_off_does_not_count_as_evidence_and_too_few_clients_give_p_one():
    # Eleven copies of the consensus (statistic 0) and one client at a few times the
    # round-off floor: the spread's floor keeps it unflagged; far above it, flagged.
    floor = 1e-30
    for value, flagged in ((4 * floor, False), (1e6 * floor, True)):
        stat = np.r_[np.zeros(11), value]
        null, _ = predictive_null(stat, np.ones(12), np.ones(12, dtype=bool), floor)
        assert (null.log_sf(stat)[-1] < np.log(LEVEL / 12)) == flagged
    null, _ = predictive_null(np.array([1.0, 2.0, 30.0]), np.ones(3), np.ones(3, dtype=bool),
                              0.0)
    assert np.all(null.df == 0) and np.all(null.log_sf(np.array([1.0, 2.0, 30.0])) == 0)
    assert isinstance(null, PredictiveNull)


@pytest.mark.parametrize("n_clients", [4, 5, 6])
def test_the_level_holds_with_few_clients(monkeypatch, n_clients):
    """With three others the MAD is the smaller of two deviations, biased low: BH over
    four benign clients rejected in 0.080 of the replicates (benchmarks/RESULTS.md,
    part D) until the MAD's
    small-sample factor for three values (clairstat._null.MAD_SMALL_SAMPLE); without
    it the check fails (the negative control)."""
    from clairstat import _null

    reps = 1500
    bound = LEVEL + 3 * np.sqrt(LEVEL * (1 - LEVEL) / reps)
    assert _any_rejection_share(lambda null: null, n_clients, 20.0, reps, seed=n_clients) \
        <= bound
    if n_clients == 4:
        monkeypatch.setattr(_null, "MAD_SMALL_SAMPLE", {})
        assert _any_rejection_share(lambda null: null, n_clients, 20.0, reps,
                                    seed=n_clients) > bound


def test_few_clients_warn_that_the_lora_tests_flag_large_deviations_only():
    """A LoRA stack's tests predict each statistic from the others' (a t on few df):
    below FEW_CLIENTS_PREDICTIVE clients the fit says so; from there on it does not."""
    import warnings

    from clairstat.aggregation import aggregate

    rng = np.random.default_rng(5)

    def factors(n_clients):
        shared = rng.standard_normal((16, 2))
        return [(shared @ rng.standard_normal((2, 2)) + 0.1 * rng.standard_normal((16, 2)),
                 rng.standard_normal((2, 12))) for _ in range(n_clients)]

    with pytest.warns(UserWarning, match=r"only 8 clients: each client's statistic is "
                                         r"predicted from the 7 others'"):
        aggregate("clair", factors(8), random_state=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        aggregate("clair", factors(12), random_state=0)
    assert not [w for w in caught if "only 12 clients" in str(w.message)]


@pytest.mark.parametrize("n_clients", [2, 3])
def test_two_or_three_lora_clients_are_told_that_nobody_can_be_flagged(n_clients):
    """With fewer than MIN_OTHERS + 1 clients no client's null can be predicted: no
    client can be flagged, and a 100-times-larger client pulls the others' refinement
    towards it. The fit says so, once, with the reason; before, a second warning said
    the shared subspace was "all of the estimates' rows" where it was not, and advised
    rank=0, which hands the large client's update to everyone (a review)."""
    import warnings

    from clairstat.aggregation import aggregate

    rng = np.random.default_rng(11)
    shared = rng.standard_normal((16, 2))
    factors = [(shared @ rng.standard_normal((2, 2)) + 0.1 * rng.standard_normal((16, 2)),
                rng.standard_normal((2, 12))) for _ in range(n_clients)]
    factors[-1] = (100 * factors[-1][0], factors[-1][1])
    for rank in (None, 0):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = aggregate("clair", factors, rank=rank, random_state=0)
        messages = [str(w.message) for w in caught]
        assert not result.flagged.any()
        said = [m for m in messages if "no client can be flagged" in m]
        assert len(said) == 1 and said[0].startswith(f"only {n_clients} clients")
        assert "contaminated one included" in said[0]
        assert not [m for m in messages if "all of the estimates'" in m or "rank=0" in m]


def test_a_collaborative_set_left_with_too_few_others_says_nobody_in_it_can_be_flagged():
    """Four LoRA clients, one 30 times larger and flagged: the three others are each
    predicted from two, fewer than MIN_OTHERS, so none of them could have been flagged.
    The fit says so (a review: the warning was promised for this case but never fired,
    the flagged client's own degrees of freedom being positive)."""
    import warnings

    from clairstat.aggregation import aggregate

    rng = np.random.default_rng(0)
    shared = rng.standard_normal((16, 2))
    factors = [(shared @ rng.standard_normal((2, 2)) + 0.1 * rng.standard_normal((16, 2)),
                rng.standard_normal((2, 12))) for _ in range(4)]
    factors[0] = (30 * factors[0][0], factors[0][1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = aggregate("clair", factors, random_state=0)
    assert result.flagged.tolist() == [True, False, False, False]
    said = [str(w.message) for w in caught if "tests have 0 degrees" in str(w.message)]
    assert len(said) == 1 and said[0].startswith(
        "the 3 collaborative clients left (1 of 4 flagged) are too few to test each "
        "other: their tests have 0 degrees of freedom")

"""Degenerate and hostile inputs to the aggregation rules and to refine_adapters.

Every rule of :func:`clairstat.aggregation.aggregate` must refuse non-finite factors,
mismatched shapes, rank-0 factors and bad weights with a ValueError naming the client,
and must give a finite, correct answer for zero updates (fresh LoRA adapters, B = 0).
"""

import warnings

import numpy as np
import pytest

from clairstat.aggregation import RULE_NAMES, aggregate, factored_reduction, reduce_factors
from clairstat.aggregation._validation import check_weights
from clairstat.lora import adapter_factors, module_factors, refine_adapters

from test_lora import MODULES, lora_state, shared_clients

N_CLIENTS, D, K, RANK = 6, 7, 5, 2


def shared_a_factors(rng, n_clients=N_CLIENTS):
    """Clients with one shared A (so that every rule, FFA included, accepts them)."""
    a_mat = rng.standard_normal((RANK, K))
    return [(rng.standard_normal((D, RANK)), a_mat.copy()) for _ in range(n_clients)]


def fresh_factors(rng, n_clients=N_CLIENTS):
    """Fresh LoRA adapters: B = 0, A at its (shared) random initialisation."""
    a_mat = rng.standard_normal((RANK, K))
    return [(np.zeros((D, RANK)), a_mat.copy()) for _ in range(n_clients)]


def quietly(rule, factors, weights=None):
    """``aggregate`` with warnings silenced (geomedian may warn; tested elsewhere)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return aggregate(rule, factors, weights)


# ------------------------------------------------------------ non-finite factors

@pytest.mark.parametrize("rule", RULE_NAMES)
@pytest.mark.parametrize("which", ["B", "A"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_factor_is_refused_naming_client_and_factor(rule, which, value, rng):
    factors = shared_a_factors(rng)
    b_mat, a_mat = factors[3]
    (b_mat if which == "B" else a_mat)[1, 0] = value
    with pytest.raises(ValueError, match=rf"factors\[3\]: {which} has 1 non-finite"):
        aggregate(rule, factors)


def test_update_that_overflows_is_refused(rng):
    factors = shared_a_factors(rng)
    factors[2] = (np.full((D, RANK), 1e200), np.full((RANK, K), 1e200))
    with pytest.raises(ValueError, match=r"factors\[2\]: the update B A may overflow"):
        aggregate("fedit", factors)


@pytest.mark.parametrize("rule", RULE_NAMES)
@pytest.mark.parametrize("scale", [1e100, 1e151])
def test_update_too_large_for_the_rules_arithmetic_is_refused(rule, scale, rng):
    """Factors of 1e100 (B A ~ 1e200, finite) passed the overflow check, and the rules
    squaring them overflowed: geomedian returned an inf-dominated mean marked converged,
    krum's scores were NaN, clair blamed a noise_scale nobody passed (a review). Every
    rule now refuses them, naming the client."""
    factors = shared_a_factors(rng)
    b_mat, a_mat = factors[2]
    factors[2] = (scale * b_mat, a_mat if scale > 1e150 else scale * a_mat)
    with pytest.raises(ValueError, match=r"factors\[2\]: its update is too large for "
                                         r"float64 arithmetic: B has norm"):
        aggregate(rule, factors)


@pytest.mark.parametrize("rule", ["geomedian", "krum", "clair"])
def test_every_client_at_a_huge_scale_is_refused(rule, rng):
    """Clients at scale 1e80 each (updates ~1e160): krum's scores were NaN and it chose
    the first client; now the first client whose update is too large is named."""
    factors = [(1e80 * b_mat, 1e80 * a_mat) for b_mat, a_mat in shared_a_factors(rng)]
    with pytest.raises(ValueError, match=r"factors\[0\]: its update is too large"):
        aggregate(rule, factors)


# ------------------------------------------------------------ shapes and ranks

def _wrong_module_shape(factors):
    factors[4] = (np.ones((D + 1, RANK)), factors[4][1])


def _inner_mismatch(factors):
    factors[1] = (factors[1][0], np.ones((RANK + 1, K)))


def _one_dimensional(factors):
    factors[2] = (factors[2][0], np.ones(K))


def _complex(factors):
    factors[5] = (factors[5][0].astype(complex), factors[5][1])


def _rank_zero(factors):
    factors[1] = (np.zeros((D, 0)), np.zeros((0, K)))


def _not_a_pair(factors):
    factors[3] = (factors[3][0],)


def _rank_above_module(factors):
    """Rank 6 on a 7 x 5 module: B A has rank <= 5 whatever r; a review's r = 3000 on a
    16 x 16 module took tens of seconds and GBs, and flora returned rank-3000 factors."""
    factors[4] = (np.ones((D, K + 1)), np.ones((K + 1, K)))


@pytest.mark.parametrize("corrupt, message", [
    (_wrong_module_shape, r"client\(s\) \[4\] have \[\(8, 5\)\], the others \(7, 5\)"),
    (_inner_mismatch, r"factors\[1\]: need B \(d, r\) and A \(r, k\)"),
    (_one_dimensional, r"factors\[2\]: A must be 2-D"),
    (_complex, r"factors\[5\]: B must hold real numbers"),
    (_rank_zero, r"factors\[1\] has rank 0"),
    (_not_a_pair, r"factors\[3\] must be a \(B, A\) pair"),
    (_rank_above_module, r"factors\[4\] has rank 6 \(B \(7, 6\), A \(6, 5\)\), above "
                         r"min\(d, k\) = 5"),
])
@pytest.mark.parametrize("rule", RULE_NAMES)
def test_malformed_client_is_named(rule, corrupt, message, rng):
    factors = shared_a_factors(rng)
    corrupt(factors)
    with pytest.raises(ValueError, match=message):
        aggregate(rule, factors)


def test_krum_reports_a_derived_n_byzantine_honestly(rng):
    """With 2 clients and no n_byzantine the message showed n_byzantine=-1, a value
    nobody gave (a review)."""
    with pytest.raises(ValueError, match=r"krum needs at least 3 clients .*got 2 clients "
                       r"\(n_byzantine not given: derived from the client count") as error:
        aggregate("krum", shared_a_factors(rng, 2))
    assert "-1" not in str(error.value)


@pytest.mark.parametrize("options, message", [
    ({"multi": 1.5}, r"multi must be an integer, got 1\.5"),  # a slice TypeError before
    ({"n_byzantine": 2.7}, r"n_byzantine must be an integer, got 2\.7"),  # truncated to 2
    ({"n_byzantine": True}, r"n_byzantine must be an integer, got True"),
])
def test_krum_options_must_be_integers(options, message, rng):
    with pytest.raises(ValueError, match=message):
        aggregate("krum", shared_a_factors(rng), **options)
    assert aggregate("krum", shared_a_factors(rng), n_byzantine=np.int64(1),
                     multi=np.int32(2)).selected.size == 2


@pytest.mark.parametrize("rule, options, message", [
    # -1 returned rank 4 silently, 10**6 allocated huge factors (a review)
    ("glora", {"readout_rank": -1}, r"readout_rank must lie in \[1, min\(d, k\) = 5\], got -1"),
    ("glora", {"readout_rank": 10**6}, r"readout_rank must lie in \[1, min\(d, k\) = 5\]"),
    ("glora", {"readout_rank": 2.5}, r"readout_rank must be an integer, got 2\.5"),
    ("glora", {"reference_rank": 2.5}, r"reference_rank must be an integer, got 2\.5"),
    ("geomedian", {"max_iter": -5}, r"max_iter must be a positive integer, got -5"),
    ("geomedian", {"tol": np.nan}, r"tol must be a finite number >= 0, got nan"),
])
def test_glora_and_geomedian_options_are_validated(rule, options, message, rng):
    with pytest.raises(ValueError, match=message):
        aggregate(rule, shared_a_factors(rng), **options)


# ------------------------------------------------------------ weights

@pytest.mark.parametrize("bad", [-1.0, np.nan, np.inf])
@pytest.mark.parametrize("rule", RULE_NAMES)
def test_bad_weight_is_refused_naming_the_client(rule, bad, rng):
    weights = np.ones(N_CLIENTS)
    weights[2] = bad
    with pytest.raises(ValueError, match=r"client\(s\) \[2\] have weight"):
        aggregate(rule, shared_a_factors(rng), weights)


def test_huge_finite_weights_are_normalised_without_overflow():
    # The plain sum of these is inf (and w / inf = 0); scaled by the max first it is 3.
    normalised = check_weights([1e308, 1e308, 1e308], 3)
    assert np.array_equal(normalised, np.full(3, 1 / 3))
    mixed = check_weights([1e308, 0.0, 5e307], 3)
    assert np.allclose(mixed, [2 / 3, 0.0, 1 / 3], rtol=4 * np.finfo(float).eps, atol=0)


# ------------------------------------------------------------ zero updates (fresh adapters)

@pytest.mark.parametrize("rule", RULE_NAMES)
def test_fresh_adapters_give_a_zero_update_for_every_rule(rule, rng):
    result = quietly(rule, fresh_factors(rng))
    assert result.update.shape == (D, K)
    assert np.array_equal(result.update, np.zeros((D, K)))  # exactly: 0 in, 0 out
    if rule == "clair":
        assert not result.flagged.any()  # nobody is flagged for being zero
        assert np.array_equal(np.asarray(result.per_client), np.zeros((N_CLIENTS, D, K)))
    if rule == "geomedian":
        assert result.converged and result.iterations == 0


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_some_fresh_clients_among_trained_ones_give_finite_results(rule, rng):
    factors = shared_a_factors(rng)
    a_shared = factors[0][1]
    factors[1] = (np.zeros((D, RANK)), a_shared.copy())
    factors[4] = (np.zeros((D, RANK)), a_shared.copy())
    weights = rng.uniform(1.0, 2.0, N_CLIENTS)
    result = quietly(rule, factors, weights)
    assert np.all(np.isfinite(result.update))
    if rule in ("flora", "fedex", "ffa", "glora"):  # exact rules: zeros simply add nothing
        p = weights / weights.sum()
        expected = sum(w * b @ a for (b, a), w in zip(factors, p))
        # A short sum of float64 products: rounding within 1e3 eps of the scale.
        assert np.allclose(result.update, expected, rtol=0,
                           atol=1e3 * np.finfo(float).eps * np.abs(expected).max())


def test_geomedian_of_tiny_updates_stays_finite(rng):
    factors = [(1e-170 * b, a) for b, a in shared_a_factors(rng)]  # squared norms underflow
    result = quietly("geomedian", factors)
    assert np.all(np.isfinite(result.coefficients)) and np.all(np.isfinite(result.update))


@pytest.mark.parametrize("reduce", [lambda f: reduce_factors(f),
                                    factored_reduction])
def test_reduction_of_zero_updates_is_zero_not_empty(reduce, rng):
    left, right, _ = reduced = reduce(fresh_factors(rng))
    assert left.shape == (D, 1)  # the span of the B's is {0}: one unit vector
    assert np.allclose(left.T @ left, 1.0)
    if hasattr(reduced.updates, "coef"):
        assert np.array_equal(reduced.updates.coef, np.zeros_like(reduced.updates.coef))
    else:
        assert np.array_equal(reduced.expand(reduced.updates), np.zeros((N_CLIENTS, D, K)))


# ------------------------------------------------------------ refine_adapters


def fresh_states(rng, n_clients=8, d=20, k=16, rank=3):
    """peft-shaped adapters as peft initialises them: lora_B = 0, lora_A random."""
    return [lora_state([np.zeros((d, rank)) for _ in MODULES],
                       [rng.standard_normal((rank, k)) / np.sqrt(k) for _ in MODULES])
            for _ in range(n_clients)]


@pytest.mark.parametrize("joint", [False, True])
def test_refine_fresh_adapters_keeps_them_unchanged(joint, rng):
    states = fresh_states(rng)
    refinement = refine_adapters(states, {"lora_alpha": 8}, joint=joint)
    assert not refinement.flagged.any()
    assert all(not flags.any() for flags in refinement.module_flagged.values())
    assert all(estimator is None for estimator in refinement.estimators.values())
    for own, refined in zip(states, refinement.state_dicts):
        assert set(own) == set(refined)
        # The client's own arrays: B = 0 stays 0 and A keeps its initialisation
        # (a readout would give A = 0, from which LoRA cannot train).
        assert all(np.array_equal(refined[key], own[key]) for key in own)
    for stack in refinement.per_client.values():
        assert np.array_equal(np.asarray(stack), np.zeros((len(states), 20, 16)))
    mean = refinement.mean_state_dict(states[0], {"lora_alpha": 8})
    for key, value in mean.items():
        expected = np.zeros_like(value) if ".lora_B." in key else states[0][key]
        assert np.array_equal(value, expected)


def test_a_zero_module_does_not_outvote_a_fitted_one(rng):
    """One module trained (two clients off the shared subspace), one still fresh."""
    states, bad = shared_clients(rng)
    fresh_key = f"base_model.model.{MODULES[1]}.lora_B.weight"
    for state in states:
        state[fresh_key] = np.zeros_like(state[fresh_key])
    refinement = refine_adapters(states, rank=2, random_state=0)
    fitted = f"base_model.model.{MODULES[0]}"
    assert np.array_equal(refinement.module_flagged[fitted], bad)
    assert np.array_equal(refinement.flagged, bad)  # not diluted to 1/2 by the zero module
    assert refinement.estimators[f"base_model.model.{MODULES[1]}"] is None
    for own, refined, flagged in zip(states, refinement.state_dicts, bad):
        assert np.array_equal(refined[fresh_key], own[fresh_key])


def test_refine_real_peft_fresh_adapters(tiny_peft):
    torch, peft, Tiny, config = tiny_peft
    states = []
    for seed in range(5):
        torch.manual_seed(seed)
        states.append(peft.get_peft_model_state_dict(peft.get_peft_model(Tiny(), config)))
    assert all(not np.any(b @ a) for f in module_factors(states, config).values()
               for b, a in f)  # peft's own initialisation: every update is 0
    refinement = refine_adapters(states, config)
    assert not refinement.flagged.any()
    for own, refined in zip(states, refinement.state_dicts):
        assert all(torch.equal(refined[key], own[key]) for key in own)
    mean = adapter_factors(refinement.mean_state_dict(states[0], config), config)
    assert all(not np.any(b) and np.any(a) for b, a in mean.values())


def _federation_with_zero_clients(n_zero, seed=0, dim=256, rank=8):
    """12 clients in a rank-3 column space, clients 0 and 1 off it (as large as the
    signal), and ``n_zero`` clients sending zero updates (untrained adapters)."""
    rng = np.random.default_rng(seed)
    shared = np.linalg.qr(rng.standard_normal((dim, 3)))[0]
    factors = []
    for client in range(12):
        b_mat = shared @ rng.standard_normal((3, rank)) + 0.1 * rng.standard_normal((dim, rank)) / 16
        if client < 2:
            b_mat = b_mat + rng.standard_normal((dim, rank)) / 16 * np.sqrt(3)
        factors.append((b_mat, rng.standard_normal((rank, dim)) / 16))
    return factors + [(np.zeros((dim, rank)), np.zeros((rank, dim)))] * n_zero


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("n_zero", [3, 5, 11])
def test_zero_clients_hide_no_attacker(n_zero):
    """Untrained clients (zero updates) are a point mass: counted once in the robust
    start and the calibration (clairstat._tuning.copy_groups), they no longer fill the
    half-set (five zeros among 17 hid both attackers before; a review, 2026-12-02)."""
    fit = aggregate("clair", _federation_with_zero_clients(n_zero), np.ones(12 + n_zero),
                    random_state=0)
    assert np.flatnonzero(fit.flagged).tolist() == [0, 1]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_copies_of_a_client_hide_no_attacker_and_copies_of_an_attacker_are_flagged():
    """Eight copies of a benign client (8 of 20: a cheap Sybil attack) hid both attackers;
    three more copies of attacker 0 (4 of 15 alike) hid it."""
    factors = _federation_with_zero_clients(0)
    fit = aggregate("clair", factors + [factors[5]] * 8, np.ones(20), random_state=0)
    assert np.flatnonzero(fit.flagged).tolist() == [0, 1]
    fit = aggregate("clair", factors + [factors[0]] * 3, np.ones(15), random_state=0)
    assert np.flatnonzero(fit.flagged).tolist() == [0, 1, 12, 13, 14]


def _near_copies(kind, seed=1):
    """Five or eight clients that are copies of one estimate up to far less than the
    noise: updates 1e-4 the others' size (clients that barely trained), fresh peft
    adapters (``B = 0``, each its own random ``A``: a zero update in distinct factors), or
    copies of benign client 5 perturbed at 1e-12 (a Sybil's copies that escape a
    byte-for-byte comparison)."""
    rng = np.random.default_rng(seed)
    factors = _federation_with_zero_clients(0)
    if kind == "nearly-zero":
        extra = [(1e-2 / 16 * rng.standard_normal((256, 8)),
                  1e-2 / 16 * rng.standard_normal((8, 256))) for _ in range(5)]
    elif kind == "fresh":
        extra = [(np.zeros((256, 8)), rng.standard_normal((8, 256)) / 16) for _ in range(5)]
    else:
        extra = [(factors[5][0] + 1e-12 * rng.standard_normal((256, 8)), factors[5][1])
                 for _ in range(8)]
    return factors + extra


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", ["nearly-zero", "fresh", "perturbed-copies"])
def test_near_copies_hide_no_attacker(kind):
    """Copies up to far less than the noise count once, as exact copies do
    (clairstat._tuning.copy_groups): each of these hid both attackers while only
    byte-identical clients were counted once (a review, 2026-12-02)."""
    factors = _near_copies(kind)
    fit = aggregate("clair", factors, np.ones(len(factors)), random_state=0)
    assert np.flatnonzero(fit.flagged).tolist() == [0, 1]


def _previous_null(monkeypatch):
    """Patch in the LoRA null the package used until 2026-12-03: a scaled chi^2 fitted to
    the statistics' quartiles (benchmarks/lora_null_calibration.py keeps it), which read
    a cluster of small statistics (copies, precise clients) as a heavy lower tail."""
    import sys
    from pathlib import Path

    from clairstat import _inference

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from lora_null_calibration import _previous_factored_tests

    monkeypatch.setattr(_inference, "_factored_tests", _previous_factored_tests)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", ["zeros", "nearly-zero", "fresh", "perturbed-copies"])
def test_copies_counted_as_many_hide_the_attackers(monkeypatch, kind):
    """Negative control: every copy counted (the mask all True, in the noise scale and
    the detection alike) under the previous null (:func:`_previous_null`) hides both
    attackers in each case above. With the predictive null, copies counted as many
    still break the check in one case: eight perturbed copies of one benign client
    among 21 are the median's and the MAD's cluster, and every other client is flagged;
    the other copies no longer hide the attackers (the median and MAD are not pulled by
    them the way the quartile match's degrees of freedom were)."""
    from clairstat import _inference, _tuning

    def every_client(labels, among=None):
        return np.ones(len(labels), bool) if among is None else np.asarray(among, bool)

    monkeypatch.setattr(_inference, "counted_once", every_client)
    monkeypatch.setattr(_tuning, "counted_once", every_client)
    factors = _federation_with_zero_clients(5) if kind == "zeros" else _near_copies(kind)
    fit = aggregate("clair", factors, np.ones(len(factors)), random_state=0)
    flags = np.flatnonzero(fit.flagged).tolist()
    if kind == "perturbed-copies":
        assert flags[:2] == [0, 1] and len(flags) > 2  # benign clients flagged too
    else:
        assert flags == [0, 1]
    _previous_null(monkeypatch)
    fit = aggregate("clair", factors, np.ones(len(factors)), random_state=0)
    assert not fit.flagged[:2].any()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("size", [1e-2, 3e-2])
def test_small_updates_hide_no_attacker(size):
    """Five updates a hundredth of the others' size (clients that trained a little)
    among 17 are copies at the scale of estimates with many entries (within a hundredth
    of the typical nearest-neighbour squared distance: clairstat._tuning._near_copy_share);
    with the share 1e-4 of a first version they were not, widened the null and hid both
    attackers."""
    rng = np.random.default_rng(1)
    factors = _federation_with_zero_clients(0)
    small = [(size * np.sqrt(3) / 16 * rng.standard_normal((256, 8)),
              rng.standard_normal((8, 256)) / 16) for _ in range(5)]
    fit = aggregate("clair", factors + small, np.ones(17), random_state=0)
    assert np.flatnonzero(fit.flagged).tolist() == [0, 1]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_small_updates_with_the_first_share_hide_the_attackers(monkeypatch):
    """Negative control: with the share 1e-4 the five small updates are not copies and
    hide both attackers."""
    from clairstat import _tuning

    monkeypatch.setattr(_tuning, "_near_copy_share", lambda n_entries: 1e-4)
    _previous_null(monkeypatch)  # the predictive null alone is not widened by them
    rng = np.random.default_rng(1)
    small = [(1e-2 * np.sqrt(3) / 16 * rng.standard_normal((256, 8)),
              rng.standard_normal((8, 256)) / 16) for _ in range(5)]
    fit = aggregate("clair", _federation_with_zero_clients(0) + small, np.ones(17),
                    random_state=0)
    assert not fit.flagged[:2].any()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("previous", [False, True])
def test_precise_clients_hide_no_attacker(monkeypatch, previous):
    """Five benign updates a tenth of the others' size, in the shared subspace, among 17
    are not copies; under the previous null (a known limit until 2026-12-03, the
    negative control) they widened it and hid both attackers; the predictive null, a
    median and MAD of cube roots, is not widened by them."""
    if previous:
        _previous_null(monkeypatch)
    rng = np.random.default_rng(3)
    factors = _federation_with_zero_clients(0)
    shared = np.linalg.qr(np.random.default_rng(0).standard_normal((256, 3)))[0]
    precise = [(0.1 * (shared @ rng.standard_normal((3, 8))
                       + 0.1 * rng.standard_normal((256, 8)) / 16),
                rng.standard_normal((8, 256)) / 16) for _ in range(5)]
    fit = aggregate("clair", factors + precise, np.ones(17), random_state=0)
    assert (np.flatnonzero(fit.flagged).tolist() == [0, 1]) != previous


def _flip_study_clients(seed, n_honest, n_copies, extra_honest=0):
    """Honest LoRA clients ``(U_B + E) (U_A + E')`` of three 32 x 32 modules (rank 4,
    noise 0.3, one U_B and U_A per module), then ``n_copies`` identical copies of one
    client whose every ``lora_B`` is sign-flipped (its update ``-B A``: inside the honest
    clients' column space), then ``extra_honest`` more honest clients."""
    rng = np.random.default_rng(seed)
    shared = {m: (rng.standard_normal((32, 4)), rng.standard_normal((4, 32)))
              for m in ("q", "v", "o")}

    def client(index, sign=1.0):
        noise = np.random.default_rng([seed, index])
        return {key: value for m, (u_b, u_a) in shared.items() for key, value in (
            (f"base_model.model.{m}.lora_B.weight",
             sign * (u_b + 0.3 * noise.standard_normal((32, 4)))),
            (f"base_model.model.{m}.lora_A.weight",
             u_a + 0.3 * noise.standard_normal((4, 32))))}

    flipped = client(99, sign=-1.0)
    return ([client(index) for index in range(n_honest)] + [flipped] * n_copies
            + [client(50 + i) for i in range(extra_honest)])


def _q_updates(state_dicts):
    config = {"lora_alpha": 8, "r": 4}
    return [np.matmul(*adapter_factors(sd, config)["base_model.model.q"])
            for sd in state_dicts]


def _refined(states):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return refine_adapters(states, {"lora_alpha": 8, "r": 4}, joint=False,
                               random_state=0)


@pytest.mark.xfail(strict=True, reason="a known limit (docs/guides/llm.rst): a "
                   "contamination inside the shared subspace is not what the off-subspace "
                   "tests see; two identical sign-flipped adapters pass among 10 honest "
                   "clients in each of 6 draws")
def test_two_copies_of_a_sign_flipped_adapter_are_flagged():
    assert any(_refined(_flip_study_clients(seed, 10, 2)).flagged[10:].all()
               for seed in range(6))


def test_a_sign_flipped_adapter_is_seen_alone_at_best_and_copies_move_others_little():
    """The limit's extent (a review: an attacker caught alone escapes by sending its
    adapter twice): a sign-flipped adapter among ten honest ones is flagged in some
    draws (it stays inside their column space: not in all), never a honest client;
    two identical copies of it are not flagged, and move the honest clients' refined
    updates (per-module fits) by less than a tenth of their size, within twice what
    two more honest clients move them."""
    alone = [_refined(_flip_study_clients(seed, 10, 1)).flagged for seed in range(6)]
    assert any(flags[10] for flags in alone) and not any(flags[:10].any() for flags in alone)
    base = _q_updates(_refined(_flip_study_clients(0, 10, 0)).state_dicts)
    copies = _refined(_flip_study_clients(0, 10, 2))
    assert not copies.flagged.any()
    more = _q_updates(_refined(_flip_study_clients(0, 10, 0, extra_honest=2)).state_dicts)
    moved = [np.linalg.norm(a - b) / np.linalg.norm(b)
             for a, b in zip(_q_updates(copies.state_dicts), base)]
    honest_moved = [np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(more, base)]
    assert max(moved) < 0.10
    assert np.median(moved) < 2.0 * np.median(honest_moved)


def test_ffa_takes_the_shared_a_sent_at_a_lower_precision():
    """One client sending the frozen A in float16 (numpy) or bfloat16 (torch) sends the
    same A: compared at the coarser precision (the finer one refused it, a review); an
    A that really differs is still refused, naming the client."""
    from clairstat.aggregation import aggregate
    from clairstat.aggregation._rules import a_outliers

    rng = np.random.default_rng(0)
    a_mat = rng.standard_normal((2, 8)).astype(np.float32)
    factors = [(rng.standard_normal((6, 2)).astype(np.float32), a_mat) for _ in range(5)]
    half = factors + [(rng.standard_normal((6, 2)).astype(np.float32),
                       a_mat.astype(np.float16))]
    assert a_outliers([a for _, a in half]) == []
    exact = aggregate("ffa", half)
    b_bar = sum(b.astype(np.float64) for b, _ in half) / 6
    np.testing.assert_allclose(exact.update, b_bar @ a_mat.astype(np.float64), rtol=1e-12)
    torch = pytest.importorskip("torch")
    brain = factors + [(torch.tensor(half[-1][0]), torch.tensor(a_mat).to(torch.bfloat16))]
    aggregate("ffa", brain)
    other = factors + [(half[-1][0], a_mat + np.float32(0.05))]  # beyond float32's rounding
    with pytest.raises(ValueError, match=r"client\(s\) \[5\] have an A that differs"):
        aggregate("ffa", other)
    with pytest.raises(ValueError, match=r"client\(s\) \[5\] have an A that differs"):
        aggregate("ffa", factors + [(half[-1][0], a_mat.astype(np.float16) + np.float16(0.05))])


def test_a_weight_beyond_float64_is_a_value_error_naming_the_client():
    from clairstat.aggregation import aggregate

    rng = np.random.default_rng(0)
    factors = [(rng.standard_normal((4, 1)), rng.standard_normal((1, 3))) for _ in range(3)]
    with pytest.raises(ValueError, match=r"client\(s\) \[0\] have weight\(s\) beyond"):
        aggregate("fedit", factors, weights=[10 ** 400, 1, 1])


def test_ffa_reads_a_generator_and_integer_torch_factors_as_the_other_rules_do():
    """The ffa resolutions were read off the factors before their check: a generator
    was emptied by it, and a torch integer A raised a TypeError (a review)."""
    from clairstat.aggregation import aggregate

    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    a_mat = rng.integers(-3, 3, size=(2, 5))
    factors = [(rng.standard_normal((4, 2)), a_mat) for _ in range(3)]
    expected = aggregate("ffa", factors).update
    np.testing.assert_array_equal(aggregate("ffa", (pair for pair in factors)).update,
                                  expected)
    as_torch = [(torch.tensor(b), torch.tensor(a)) for b, a in factors]
    np.testing.assert_allclose(aggregate("ffa", as_torch).update, expected, rtol=1e-12)

"""Tests of the federated LoRA aggregation rules: each rule's defining property."""

import itertools
import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
import scipy.stats

from clairstat.aggregation import (RULE_NAMES, aggregate, alignment_rotation,
                                   clair_modules, client_flags, factored_reduction,
                                   reduce_factors,
                                   soft_rotation, weighted_median, weighted_trimmed_mean)
from clairstat.aggregation import _robust

EPS = np.finfo(np.float64).eps
# Relative tolerance for identities that hold exactly in real arithmetic: each entry is a
# sum of at most a few hundred float64 products, so rounding stays below ~1e3 eps; 1e4
# eps (2.2e-12) leaves a margin and is still ten orders below the effects we test.
RTOL = 1e4 * EPS


def random_factors(rng, n_clients=5, d=12, k=9, ranks=3):
    ranks = [ranks] * n_clients if np.isscalar(ranks) else ranks
    return [(rng.standard_normal((d, r)), rng.standard_normal((r, k))) for r in ranks]


def exact(factors, weights):
    return sum(w * b @ a for (b, a), w in zip(factors, weights))


def close(actual, desired, scale=None):
    scale = np.linalg.norm(desired) if scale is None else scale
    return np.linalg.norm(np.asarray(actual) - desired) <= RTOL * max(scale, 1.0)


def random_weights(rng, n):
    weights = rng.uniform(0.5, 2.0, n)
    return weights / weights.sum()


# ---------------------------------------------------------------- inputs and dispatch

def test_unknown_rule_lists_valid_names():
    with pytest.raises(ValueError, match="unknown rule") as error:
        aggregate("fedavg", random_factors(np.random.default_rng(0)))
    assert len(RULE_NAMES) == 11 and all(name in str(error.value) for name in RULE_NAMES)


@pytest.mark.parametrize("weights", [[1, -1, 1, 1, 1], [1, np.nan, 1, 1, 1], [0] * 5,
                                     [1, 1]])
def test_bad_weights_raise(weights):
    with pytest.raises(ValueError, match="weights"):
        aggregate("fedit", random_factors(np.random.default_rng(0)), weights)


@pytest.mark.parametrize("rule", ["fedit", "ffa", "fedex", "fedrot"])
def test_mixed_ranks_raise_for_rules_that_need_equal_ranks(rule):
    factors = random_factors(np.random.default_rng(0), 3, ranks=[2, 3, 2])
    with pytest.raises(ValueError, match="equal client ranks"):
        aggregate(rule, factors)


def test_mismatched_shapes_raise():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="module shape"):
        aggregate("flora", [(rng.standard_normal((4, 2)), rng.standard_normal((2, 3))),
                            (rng.standard_normal((5, 2)), rng.standard_normal((2, 3)))])
    with pytest.raises(ValueError, match="B \\(d, r\\)"):
        aggregate("flora", [(rng.standard_normal((4, 2)), rng.standard_normal((3, 3)))])


def test_weights_are_normalised():
    factors = random_factors(np.random.default_rng(1))
    res = aggregate("flora", factors, weights=[2, 2, 2, 2, 2])
    assert np.allclose(res.weights, 0.2, rtol=0, atol=RTOL)
    assert close(res.update, exact(factors, res.weights))


@pytest.mark.parametrize("rule", ["fedit", "fedex", "flora", "fedrot", "glora", "median",
                                  "trimmed_mean", "geomedian", "krum"])
def test_every_averaging_rule_uses_the_weights(rule):
    # All the weight on client 2: any rule that averages with the weights returns it.
    factors = random_factors(np.random.default_rng(2), 7)
    options = {"multi": 7} if rule == "krum" else {}
    res = aggregate(rule, factors, weights=np.eye(7)[2], **options)
    b, a = factors[2]
    assert close(res.update, b @ a)


# ---------------------------------------------------------------- FedIT, FFA, FedEx, FLoRA

def test_fedit_error_identity_and_cauchy_schwarz_bound():
    rng = np.random.default_rng(3)
    factors, weights = random_factors(rng, 6), random_weights(rng, 6)
    res = aggregate("fedit", factors, weights)
    b_bar, a_bar = res.factors
    error = exact(factors, weights) - res.update
    identity = sum(w * (b - b_bar) @ (a - a_bar) for (b, a), w in zip(factors, weights))
    assert close(error, identity)
    spread_b = sum(w * np.sum((b - b_bar) ** 2) for (b, _), w in zip(factors, weights))
    spread_a = sum(w * np.sum((a - a_bar) ** 2) for (_, a), w in zip(factors, weights))
    assert 0 < np.linalg.norm(error) <= np.sqrt(spread_b * spread_a)


def test_ffa_is_exact_and_needs_a_shared_frozen_a():
    rng = np.random.default_rng(4)
    frozen = rng.standard_normal((3, 9))
    factors = [(rng.standard_normal((12, 3)), frozen.copy()) for _ in range(4)]
    weights = random_weights(rng, 4)
    assert close(aggregate("ffa", factors, weights).update, exact(factors, weights))
    factors[1] = (factors[1][0], frozen + 1e-6)
    # the clients off the majority's A are named (the message named nobody: a review)
    with pytest.raises(ValueError, match=r"frozen A on every client: client\(s\) \[1\] have"):
        aggregate("ffa", factors, weights)
    factors[0] = (factors[0][0], frozen - 1e-6)
    with pytest.raises(ValueError, match=r"client\(s\) \[0, 1\] have an A that differs"):
        aggregate("ffa", factors, weights)


def test_fedex_is_exact_with_the_factor_residual():
    rng = np.random.default_rng(5)
    factors, weights = random_factors(rng), random_weights(rng, 5)
    res = aggregate("fedex", factors, weights)
    b_bar, a_bar = res.factors
    assert close(res.update, exact(factors, weights))
    assert close(res.residual, exact(factors, weights) - b_bar @ a_bar)
    assert np.linalg.norm(res.residual) > 0.1  # the residual is really needed


def test_flora_is_exact_with_heterogeneous_ranks():
    rng = np.random.default_rng(6)
    factors, weights = random_factors(rng, 4, ranks=[1, 2, 4, 3]), random_weights(rng, 4)
    res = aggregate("flora", factors, weights)
    assert res.factors[0].shape == (12, 10) and res.factors[1].shape == (10, 9)
    assert close(res.factors[0] @ res.factors[1], exact(factors, weights))


# ---------------------------------------------------------------- FedRot

def rotated_copies(rng, n_clients=6, d=12, k=9, rank=3):
    """Identical updates B A written with random SO(r) gauges (B G_i, G_i^T A)."""
    b, a = rng.standard_normal((d, rank)), rng.standard_normal((rank, k))
    gauges = scipy.stats.special_ortho_group.rvs(rank, size=n_clients, random_state=rng)
    return [(b @ g, g.T @ a) for g in gauges], b @ a


@pytest.mark.parametrize("align", ["A", "B"])
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_fedrot_keeps_every_client_product(align, lam):
    rng = np.random.default_rng(7)
    factors = random_factors(rng)
    res = aggregate("fedrot", factors, align=align, lam=lam)
    for (b, a), (b_rot, a_rot), rot in zip(factors, res.aligned_factors, res.rotations):
        assert close(b_rot @ a_rot, b @ a)
        assert close(rot.T @ rot, np.eye(3)) and np.linalg.det(rot) > 0


@pytest.mark.parametrize("align", ["A", "B"])
def test_fedrot_aligned_error_vanishes_for_rotated_identical_updates(align):
    rng = np.random.default_rng(8)
    factors, target = rotated_copies(rng)
    fedit_error = np.linalg.norm(aggregate("fedit", factors).update - target)
    hard = aggregate("fedrot", factors, align=align, lam=1.0)
    assert fedit_error > 0.1 * np.linalg.norm(target)  # the gauges do hurt FedIT
    assert close(hard.update, target)


def test_fedrot_with_an_explicit_reference_and_lambda_zero_is_fedit():
    rng = np.random.default_rng(9)
    factors, reference = random_factors(rng), random_factors(rng, 1)[0]
    weights = random_weights(rng, 5)
    soft0 = aggregate("fedrot", factors, weights, reference=reference, lam=0.0)
    assert close(soft0.update, aggregate("fedit", factors, weights).update)
    hard = aggregate("fedrot", factors, weights, reference=reference, align="B")
    for (b, _), rot in zip(factors, hard.rotations):  # B_i R is the closest to B_ref
        others = scipy.stats.special_ortho_group.rvs(3, size=50, random_state=rng)
        best = np.linalg.norm(b @ rot - reference[0])
        assert all(best <= np.linalg.norm(b @ g - reference[0]) + RTOL for g in others)
    with pytest.raises(ValueError, match="reference"):
        aggregate("fedrot", factors, reference=random_factors(rng, 1, ranks=2)[0])


def test_alignment_rotation_is_procrustes_with_determinant_one():
    rng = np.random.default_rng(10)
    for _ in range(20):
        cross = rng.standard_normal((4, 4))
        rot = alignment_rotation(cross)
        assert abs(np.linalg.det(rot) - 1) < RTOL
        unconstrained, _ = scipy.linalg.orthogonal_procrustes(np.eye(4), cross)
        if np.linalg.det(unconstrained) > 0:  # no reflection: the two must agree
            assert close(rot, unconstrained)
        else:  # Kabsch: lose exactly twice the smallest singular value of the trace
            smallest = scipy.linalg.svdvals(cross)[-1]
            gap = np.trace(unconstrained.T @ cross) - np.trace(rot.T @ cross)
            assert abs(gap - 2 * smallest) < RTOL * np.linalg.norm(cross)


def test_soft_rotation_bound_and_endpoints():
    rng = np.random.default_rng(11)
    rotations = scipy.stats.special_ortho_group.rvs(4, size=200, random_state=rng)
    for rot in rotations:
        assert close(soft_rotation(rot, 0.0), np.eye(4)) and close(soft_rotation(rot, 1.0), rot)
        for lam in rng.uniform(0, 1, 5):
            soft = soft_rotation(rot, lam)
            assert np.linalg.det(soft) > 0
            bound = 2 * lam * np.linalg.norm(rot - np.eye(4))
            assert np.linalg.norm(soft - np.eye(4)) <= bound + RTOL
    # A half turn: the interpolant (1 - 2 lam) I is singular at lam = 1/2, and any
    # rotation meets the bound there; the result must still be a rotation.
    half_turn = -np.eye(2)
    for lam in (0.25, 0.5, 0.75):
        soft = soft_rotation(half_turn, lam)
        assert close(soft.T @ soft, np.eye(2)) and np.linalg.det(soft) > 0
        bound = 2 * lam * np.linalg.norm(half_turn - np.eye(2))
        assert np.linalg.norm(soft - np.eye(2)) <= bound + RTOL
    with pytest.raises(ValueError, match="lam"):
        soft_rotation(np.eye(2), 1.5)


# ---------------------------------------------------------------- GLoRA

def gauge(factors, rng):
    """Random invertible per-client gauges (B G, G^{-1} A), conditioned well enough."""
    out = []
    for b, a in factors:
        g = rng.standard_normal((b.shape[1],) * 2) + 2 * np.eye(b.shape[1])
        out.append((b @ g, np.linalg.solve(g, a)))
    return out


def test_glora_is_invariant_under_invertible_gauges_unlike_fedit_and_fedrot():
    rng = np.random.default_rng(12)
    factors, weights = random_factors(rng, 5, d=30, ranks=[2, 3, 2, 4, 3]), None
    regauged = gauge(factors, rng)
    # R = 6 < union rank 14: generic subspaces give a strict eigengap at R.
    before = aggregate("glora", factors, weights, reference_rank=6)
    after = aggregate("glora", regauged, weights, reference_rank=6)
    # The gauges are only moderately conditioned, so allow their condition number.
    assert close(after.update, before.update, 1e3 * np.linalg.norm(before.update))
    equal = random_factors(rng, 5, d=30)
    for rule in ("fedit", "fedrot"):
        moved = aggregate(rule, gauge(equal, rng)).update - aggregate(rule, equal).update
        assert np.linalg.norm(moved) > 1e-3 * np.linalg.norm(aggregate(rule, equal).update)


def shared_space_factors(rng, union_rank=6, n_clients=5, d=30, k=9, rank=2):
    space = np.linalg.qr(rng.standard_normal((d, union_rank)))[0]
    return [(space @ rng.standard_normal((union_rank, rank)), rng.standard_normal((rank, k)))
            for _ in range(n_clients)]


def test_glora_is_exact_when_reference_rank_covers_the_union():
    rng = np.random.default_rng(13)
    factors, weights = shared_space_factors(rng), random_weights(rng, 5)
    for rank in (None, 6, 8):
        res = aggregate("glora", factors, weights, reference_rank=rank)
        assert res.union_rank == 6
        assert close(res.update, exact(factors, weights))


def test_glora_error_is_the_off_reference_part_of_the_exact_update():
    rng = np.random.default_rng(14)
    factors, weights = shared_space_factors(rng), random_weights(rng, 5)
    res = aggregate("glora", factors, weights, reference_rank=3)
    # The reference projector from the dense consensus matrix, independently.
    consensus = sum(w * scipy.linalg.orth(b) @ scipy.linalg.orth(b).T
                    for (b, _), w in zip(factors, weights))
    top = np.linalg.eigh(consensus)[1][:, -3:]
    target = exact(factors, weights)
    off = target - top @ top.T @ target
    assert close(target - res.update, off)
    assert np.linalg.norm(off) > 0.1 * np.linalg.norm(target)


def test_glora_readout_is_the_best_rank_r_approximation():
    rng = np.random.default_rng(15)
    factors = random_factors(rng, 4, d=20, ranks=[3, 1, 2, 3])
    res = aggregate("glora", factors, readout_rank=2)
    b, a = res.factors
    assert b.shape == (20, 2) and a.shape == (2, 9)
    u, s, vt = np.linalg.svd(res.update)
    assert close(b @ a, (u[:, :2] * s[:2]) @ vt[:2])
    assert aggregate("glora", factors).factors[0].shape[1] == 3  # default: max r_i


# ---------------------------------------------------------------- robust rules

@pytest.mark.parametrize("n_clients", [5, 6])
def test_median_and_trimmed_mean_match_numpy_and_scipy_for_uniform_weights(n_clients):
    factors = random_factors(np.random.default_rng(16), n_clients)
    dense = np.stack([b @ a for b, a in factors])
    assert close(aggregate("median", factors).update, np.median(dense, axis=0))
    trim = 1 / n_clients  # trim * n an integer: scipy's and the mass-based rule agree
    assert close(aggregate("trimmed_mean", factors, trim=trim).update,
                 scipy.stats.trim_mean(dense, trim, axis=0))


def test_weighted_median_and_trimmed_mean_equal_the_replicated_sample():
    rng = np.random.default_rng(17)
    values, counts = rng.standard_normal((5, 40)), np.array([1, 3, 2, 1, 3])
    replicated = np.repeat(values, counts, axis=0)
    weights = counts / counts.sum()
    assert close(weighted_median(values, weights), np.median(replicated, axis=0))
    assert close(weighted_trimmed_mean(values, weights, 0.2),
                 scipy.stats.trim_mean(replicated, 0.2, axis=0))


def test_coordinatewise_rules_give_the_same_answer_in_row_blocks(monkeypatch):
    factors = random_factors(np.random.default_rng(18), 5)
    whole = aggregate("trimmed_mean", factors, trim=0.2).update
    monkeypatch.setattr(_robust, "_CHUNK_BYTES", 5 * 9 * 8 * 2)  # two rows per block
    assert np.array_equal(aggregate("trimmed_mean", factors, trim=0.2).update, whole)


def test_krum_scores_and_selection_match_brute_force():
    rng = np.random.default_rng(19)
    factors, f = random_factors(rng, 7), 2
    dense = [b @ a for b, a in factors]
    brute = []
    for i in range(7):
        distances = sorted(np.sum((dense[i] - dense[j]) ** 2) for j in range(7) if j != i)
        brute.append(sum(distances[:7 - f - 2]))
    res = aggregate("krum", factors, n_byzantine=f, multi=3)
    assert close(res.scores, np.array(brute))
    best = min(itertools.combinations(range(7), 3), key=lambda c: sum(brute[i] for i in c))
    assert res.selected.tolist() == sorted(best)
    assert close(res.update, np.mean([dense[i] for i in best], axis=0))
    assert close(res.factors[0] @ res.factors[1], res.update)
    with pytest.raises(ValueError, match="2 n_byzantine"):
        aggregate("krum", factors, n_byzantine=3)


def test_krum_never_selects_a_client_of_weight_zero():
    """Only client 2 weighs: krum selected a client of weight 0 and returned its update
    with coefficient 1 (a review)."""
    factors = random_factors(np.random.default_rng(0), 5)
    weights = [0, 0, 1, 0, 0]
    res = aggregate("krum", factors, weights)
    assert res.selected.tolist() == [2]
    assert close(res.update, factors[2][0] @ factors[2][1])
    res = aggregate("krum", factors, weights, multi=2)  # one more: weight 0, no say
    assert 2 in res.selected and close(res.update, factors[2][0] @ factors[2][1])
    res = aggregate("krum", factors, [1, 0, 1, 1, 1], multi=4)
    assert res.selected.tolist() == [0, 2, 3, 4]


def test_trimmed_mean_warns_when_it_cuts_no_client_whole():
    """trim = 0.1 with fewer than 10 equally weighted clients cuts part of the extreme
    clients' weight only: one attacker of 5 kept half of it, silently (a review)."""
    factors = random_factors(np.random.default_rng(1), 5)
    with pytest.warns(UserWarning, match=r"trim=0\.1 with 5 equally weighted clients cuts "
                                         r"no client whole .* use trim >= 1 / n_clients = 0\.2"):
        aggregate("trimmed_mean", factors)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aggregate("trimmed_mean", factors, trim=0.2)  # a client from each tail
        aggregate("trimmed_mean", factors, trim=0.0)  # the mean, asked for
        aggregate("trimmed_mean", factors, [1, 2, 3, 4, 5])  # weights: not this rule
        aggregate("trimmed_mean", random_factors(np.random.default_rng(1), 10))


def test_bfloat16_torch_factors_are_aggregated_as_float32():
    """numpy has no bfloat16: aggregate raised a TypeError naming no client (a review)."""
    torch = pytest.importorskip("torch")
    factors = random_factors(np.random.default_rng(2), 4)
    halves = [(torch.tensor(b, dtype=torch.bfloat16), torch.tensor(a, dtype=torch.bfloat16))
              for b, a in factors]
    exact = [(b.float().numpy(), a.float().numpy()) for b, a in halves]  # exactly bf16's
    for rule in ("flora", "median", "clair"):
        assert np.array_equal(aggregate(rule, halves).update, aggregate(rule, exact).update)


@pytest.mark.parametrize("rule", sorted(RULE_NAMES))
def test_every_rule_returns_float64_for_float32_factors(rule):
    """One dtype whatever the rule: median and trimmed_mean returned a float32 update and
    flora a float32 A next to a float64 B for float32 factors (the rules compute in
    float64, the weights being float64), fedit and the others float64 (a review)."""
    rng = np.random.default_rng(3)
    factors = [(b.astype(np.float32), a.astype(np.float32))
               for b, a in random_factors(rng, 6, d=8, k=6, ranks=2)]
    if rule == "ffa":  # the same frozen A on every client
        factors = [(b, factors[0][1]) for b, _ in factors]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # few clients for clair, trim
        res = aggregate(rule, factors)
    assert res.update.dtype == np.float64
    if res.factors is not None:
        assert [m.dtype for m in res.factors] == [np.float64, np.float64]


def test_geomedian_minimises_the_weighted_sum_of_distances():
    rng = np.random.default_rng(20)
    factors, weights = random_factors(rng, 6, d=4, k=3, ranks=1), random_weights(rng, 6)
    points = np.stack([(b @ a).ravel() for b, a in factors])
    res = aggregate("geomedian", factors, weights)
    objective = lambda z: weights @ np.linalg.norm(points - z, axis=1)  # noqa: E731
    reference = scipy.optimize.minimize(objective, points.mean(0), method="Nelder-Mead",
                                        options={"xatol": 1e-10, "fatol": 1e-12,
                                                 "maxiter": 40000})
    assert res.converged
    # Weiszfeld reaches tol=1e-10 (relative); Nelder-Mead cannot beat it by more than
    # its own fatol, and must not lose to it by more than that either.
    assert objective(res.update.ravel()) <= reference.fun + 1e-9
    assert close(res.factors[0] @ res.factors[1], res.update)


@pytest.mark.parametrize("weights", [(0.2, 0.55, 0.25), (0.1, 0.55, 0.35)])
def test_geomedian_does_not_stop_on_a_client_that_is_not_the_median(weights):
    """Three rank-1 updates on one line, (0, -1, 2.2) u v^T: a client holding more than
    half the weight is the median. With weights (0.2, 0.55, 0.25) the weighted mean is
    client 0's zero update, where Weiszfeld used to land and stop (``converged`` True,
    the objective 10% above the minimum: a review); the vertex test of Vardi and Zhang
    finds client 1."""
    rng = np.random.default_rng(21)
    u, v = rng.standard_normal((6, 1)), rng.standard_normal((1, 5))
    factors = [(c * u, v) for c in (0.0, -1.0, 2.2)]
    weights = np.array(weights)
    res = aggregate("geomedian", factors, weights)
    assert res.converged
    np.testing.assert_array_equal(res.extras["coefficients"], [0.0, 1.0, 0.0])
    assert close(res.update, -u @ v)


def with_outliers(rng, n_clients=10, n_bad=3, size=1e6):
    factors = random_factors(rng, n_clients)
    for i in range(n_bad):
        factors[i] = (size * rng.standard_normal((12, 3)), rng.standard_normal((3, 9)))
    benign = np.stack([b @ a for b, a in factors[n_bad:]])
    return factors, benign


@pytest.mark.parametrize("rule,options", [("median", {}), ("trimmed_mean", {"trim": 0.3}),
                                          ("krum", {"n_byzantine": 3}), ("geomedian", {})])
def test_robust_rules_resist_a_few_huge_outliers(rule, options):
    factors, benign = with_outliers(np.random.default_rng(21))
    update = aggregate(rule, factors, **options).update
    if rule in ("median", "trimmed_mean"):  # 3 of 10 < half (and <= trim): every
        assert np.all(update >= benign.min(0) - RTOL)  # coordinate stays in the benign
        assert np.all(update <= benign.max(0) + RTOL)  # range
    elif rule == "krum":
        assert aggregate(rule, factors, **options).selected[0] >= 3
    else:  # geometric median: ||z - x|| <= 2(1-g)/(1-2g) max_benign ||x_i - x||, g = 0.3
        centre = benign.mean(0)
        radius = max(np.linalg.norm(x - centre) for x in benign)
        assert np.linalg.norm(update - centre) <= 2 * 0.7 / 0.4 * radius
    assert np.linalg.norm(aggregate("fedit", factors).update) > 1e4 * np.abs(benign).max()


# ---------------------------------------------------------------- reduction and CLAIR

def test_reduce_factors_is_exact_and_small():
    rng = np.random.default_rng(22)
    factors = random_factors(rng, 4, d=40, k=30, ranks=[2, 3, 2, 1])
    factors.append(factors[0])  # a duplicate adds nothing to the spans
    red = reduce_factors(factors)
    assert red.left_basis.shape == (40, 8) and red.right_basis.shape == (30, 8)
    assert close(red.left_basis.T @ red.left_basis, np.eye(8))
    for (b, a), block in zip(factors, red.updates):
        assert close(red.expand(block), b @ a)
    left, right, own = factored_reduction(factors)  # each client in its own row basis
    assert own.shape == (5, 8, 3)
    for k, (b, a) in enumerate(factors):
        assert close(left @ own.expand(k) @ right.T, b @ a)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """CLAIR's torch solver on tiny problems: one thread is ~50x faster than two when the
    2-core machine is shared (two threads spin-wait on each other); restored afterwards."""
    try:
        import torch
    except ImportError:  # the rules do not need torch; CLAIR then uses CVXPY
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _estimator_or_skip():
    import clairstat
    if not hasattr(clairstat, "CLAIREstimator"):
        pytest.skip("clairstat.CLAIREstimator is not available yet")
    return clairstat.CLAIREstimator


def clair_case(rng, n_clients=10, d=30, k=28, rank=2, n_bad=2):
    """Rank-2 LoRA clients sharing col(B) up to a small perturbation, two attackers."""
    shared = np.linalg.qr(rng.standard_normal((d, rank)))[0]
    factors = []
    for i in range(n_clients):
        b = shared @ rng.standard_normal((rank, rank)) + 0.01 * rng.standard_normal((d, rank))
        if i < n_bad:  # attackers leave the shared column space
            b = 3 * rng.standard_normal((d, rank))
        factors.append((b, rng.standard_normal((rank, k))))
    return factors


@pytest.mark.parametrize("backbone", [True, False])
def test_clair_decomposition_on_reduced_updates_equals_the_dense_one(backbone):
    # The reduction is exact for the convex program at fixed penalties (docs/method_notes.md, section 6):
    # mapped back with Q and V (and, without backbone, each client's own row basis),
    # the reduced fit is the dense fit.
    estimator_class = _estimator_or_skip()
    rng = np.random.default_rng(23)
    factors, weights = clair_case(rng), random_weights(rng, 10)
    dense = np.stack([b @ a for b, a in factors])
    tuned = estimator_class(rank=2, backbone=backbone).fit(dense, sample_weight=weights)
    # Half the automatic beta: here the default absorbs both rank-2 attackers into L
    # (S = 0 for every client); at half of it their blocks S_k are non-zero.
    options = dict(rank=2, alpha=tuned.alpha_, beta=tuned.beta_ / 2, backbone=backbone,
                   random_state=0)
    res = aggregate("clair", factors, weights, **options)
    full = estimator_class(**options).fit(dense, sample_weight=weights)
    reduced, red = res.estimator, res.reduction
    if backbone:  # (s, t) blocks, smaller than (30, 28)
        assert red.updates.shape == (10, 20, 20)
        expand = red.expand
    else:  # (s, r) blocks, each client in its own row basis
        assert red.updates.shape == (10, 20, 2)

        def expand(blocks):
            return red.left_basis @ (blocks @ red.updates.rights) @ red.right_basis.T
    # Both fits stop on the same relative duality gap (tol=1e-6) from the same start, so
    # they agree to well within the solver's accuracy, relative to the updates' size.
    solver_tol = 1e-5 * np.linalg.norm(dense)
    assert np.all(reduced.contamination_scores_[:2] > 1.0)  # the attackers' S_k != 0
    assert np.allclose(reduced.contamination_scores_, full.contamination_scores_,
                       rtol=0, atol=solver_tol)
    for name in ("low_rank_", "sparse_", "backbone_"):
        assert np.linalg.norm(expand(getattr(reduced, name)) - getattr(full, name)) <= solver_tol


def test_clair_result_is_the_refinement_of_the_dense_updates():
    # Whatever the estimator decides, the mapped-back outputs obey the refinement's
    # definitions in the original coordinates (exact up to rounding).
    _estimator_or_skip()
    rng = np.random.default_rng(25)
    factors, weights = clair_case(rng), random_weights(rng, 10)
    dense = np.stack([b @ a for b, a in factors])
    res = aggregate("clair", factors, weights, rank=2, random_state=0)
    benign = ~res.flagged
    assert res.flagged[:2].all() and res.estimator.rank_ == 2
    expected = np.tensordot(weights[benign] / weights[benign].sum(), dense[benign], axes=1)
    assert close(res.update, expected)
    basis = res.subspace
    assert close(basis.T @ basis, np.eye(2))
    refined = np.asarray(res.per_client)
    for k in range(10):
        want = dense[k] if res.flagged[k] else (
            basis @ basis.T @ dense[k] + res.update - basis @ basis.T @ res.update)
        assert close(refined[k], want)
    assert close(res.factors[0] @ res.factors[1],
                 scipy.linalg.svd(res.update)[0][:, :2] * scipy.linalg.svdvals(res.update)[:2]
                 @ scipy.linalg.svd(res.update)[2][:2])


def test_clair_on_4096_modules_runs_on_a_small_reduced_problem():
    # Rank-4 clients on a 4096 x 4096 module; the 18 benign ones share col(B), so the
    # exact reduction leaves 12 left dimensions and each client its own 4 right ones:
    # the solver sees (20, 12, 4) blocks, never 4096. (Timings of 50 rank-16 clients in
    # general position: benchmarks/lora_benchmark.py.)
    _estimator_or_skip()
    rng = np.random.default_rng(24)
    d, rank, n_clients = 4096, 4, 20
    shared = np.linalg.qr(rng.standard_normal((d, rank)))[0]
    factors = [(shared @ rng.standard_normal((rank, rank)) if i >= 2
                else rng.standard_normal((d, rank)) / np.sqrt(d),
                rng.standard_normal((rank, d)) / np.sqrt(d)) for i in range(n_clients)]
    res = aggregate("clair", factors, rank=rank, random_state=0)
    assert res.reduction.updates.shape == (20, 12, 4)
    assert res.reduction.updates.rights.shape == (20, 4, 80)
    assert res.estimator.decomposition_.low_rank.shape == (20, 12, 4)
    assert res.update.shape == (d, d) and res.factors[0].shape == (d, rank)
    assert res.per_client[3].shape == (d, d) and res.flagged[:2].all()


@pytest.mark.parametrize("joint", [False, True])
def test_clair_modules_fits_every_module_and_votes(joint):
    """Per module: the "clair" rule's flags, refined updates and mean; client flags by a
    majority of the fitted modules; an all-zero module is neither fitted nor voting."""
    _estimator_or_skip()
    rng = np.random.default_rng(26)
    fresh = [(np.zeros_like(b), a) for b, a in clair_case(rng)]
    modules = {"q": clair_case(rng), "v": clair_case(rng), "zero": fresh}
    weights = random_weights(rng, 10)
    fit = clair_modules(modules, weights, joint=joint, rank=2, random_state=0)
    assert fit.zero_modules == {"zero"} and fit.joint == joint
    assert not np.any(np.asarray(fit.per_client["zero"]))
    assert fit.estimators["zero"] is None and not fit.module_flagged["zero"].any()
    for name in ("q", "v"):  # the per-module fits (given rank 2 only when per module)
        direct = aggregate("clair", modules[name], weights, random_state=0,
                           **({} if joint else {"rank": 2}))
        assert np.array_equal(fit.module_flagged[name], direct.flagged)
        if not joint:
            assert close(np.asarray(fit.per_client[name]), np.asarray(direct.per_client))
            assert close(np.asarray(fit.collaborative_mean[name])[0], direct.update)
    if joint:  # whole adapters refined at once (dense reference, rank 2 given)
        dense = {name: np.stack([b @ a for b, a in modules[name]]) for name in ("q", "v")}
        vectors = np.hstack([d.reshape(10, -1) for d in dense.values()])
        keep = ~fit.flagged
        mean = np.average(vectors[keep], axis=0, weights=weights[keep])
        basis = np.linalg.svd((vectors[keep] - mean).T, full_matrices=False)[0][:, :2]
        refined = np.where(keep[:, None], mean + (vectors - mean) @ basis @ basis.T, vectors)
        start = 0
        for name, stack in dense.items():
            size = stack[0].size
            assert close(np.asarray(fit.per_client[name]),
                         refined[:, start:start + size].reshape(stack.shape))
            assert close(np.asarray(fit.collaborative_mean[name])[0],
                         mean[start:start + size].reshape(stack.shape[1:]))
            start += size
    votes = np.array([fit.module_flagged["q"], fit.module_flagged["v"]])
    assert np.array_equal(fit.flagged, client_flags(votes, 0.05))
    assert fit.flagged[:2].all()


def test_client_flags_is_a_vote_count_test():
    """Flagged when the count of module flags has a Binomial(M, level) tail <= level:
    one module passes its flag through; 3 of 8 modules flag, 2 of 8 do not (a client
    without contamination flags each module with probability <= level)."""
    one = np.array([[True, False, True]])
    assert client_flags(one, 0.05).tolist() == [True, False, True]
    eight = np.zeros((8, 4), dtype=bool)
    eight[:2, 0] = eight[:3, 1] = eight[:8, 2] = True
    assert client_flags(eight, 0.05).tolist() == [False, True, True, False]
    # at level 0.2 a clean client flags more modules by chance: 4 of 8 are needed
    assert client_flags(eight, 0.2).tolist() == [False, False, True, False]
    assert client_flags(np.zeros((0, 3), dtype=bool), 0.05).tolist() == [False] * 3


def test_clair_reads_its_mean_out_when_first_asked_and_still_pickles():
    """CLAIR's ``factors`` (the mean's rank-r readout) is computed on first access (the
    per-module LoRA path never asks), equals the eager readout of the reduced mean, and
    the unread result pickles (per-module fits come back from Dask workers)."""
    import pickle

    from clairstat._reduced import eckart_young_factors, truncated_svd

    rng = np.random.default_rng(3)
    shared = np.linalg.qr(rng.standard_normal((30, 2)))[0]
    factors = [(shared @ rng.standard_normal((2, 3)) + 0.01 * rng.standard_normal((30, 3)),
                rng.standard_normal((3, 25))) for _ in range(12)]
    result = aggregate("clair", factors, np.ones(12), random_state=0)
    assert callable(result.__dict__["factors"])  # not read yet
    copy = pickle.loads(pickle.dumps(result))
    want = eckart_young_factors(truncated_svd(result.reduced_mean, 3), 3,
                                result.reduction.left_basis, result.reduction.right_basis)
    for got in (result.factors, copy.factors):
        assert np.allclose(got[0] @ got[1], want[0] @ want[1], rtol=0, atol=1e-12)
    assert not callable(result.__dict__["factors"])  # kept once read


def test_clair_with_a_shared_row_space_returns_it_in_the_rows_coordinates():
    """``subspace="row"``: the extras' subspace is the shared row space, (k, rank_),
    orthonormal, and every collaborative client's refined update differs from the mean
    only inside it (it raised a shape error before: the row basis was mapped with the
    column one). Another basis of the same size fails the same check."""
    rng = np.random.default_rng(4)
    shared = np.linalg.qr(rng.standard_normal((25, 2)))[0]
    factors = [(rng.standard_normal((30, 3)),
                rng.standard_normal((3, 2)) @ shared.T + 0.01 * rng.standard_normal((3, 25)))
               for _ in range(12)]
    result = aggregate("clair", factors, np.ones(12), random_state=0, subspace="row")
    basis = result.subspace
    assert basis.shape == (25, result.estimator.rank_)
    assert np.allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-10)
    mean = result.update
    kept = np.flatnonzero(~result.flagged)
    assert kept.size >= 10
    for k in kept:
        moved = result.per_client[k] - mean
        assert np.linalg.norm(moved - moved @ basis @ basis.T) <= 1e-8 * np.linalg.norm(moved)
    # negative control: another orthonormal basis of the same size fails the check
    wrong = np.linalg.qr(rng.standard_normal(basis.shape))[0]
    moved = result.per_client[kept[0]] - mean
    assert np.linalg.norm(moved - moved @ wrong @ wrong.T) > 0.1 * np.linalg.norm(moved)


@pytest.mark.parametrize("align, which", [("A", "B"), ("A", "A"), ("B", "B"), ("B", "A")])
def test_fedrot_refuses_a_reference_that_is_not_finite(align, which):
    """A NaN in the aligned factor reached scipy's SVD as an anonymous error, one in the
    other factor passed silently (a review)."""
    rng = np.random.default_rng(10)
    factors, (b_ref, a_ref) = random_factors(rng), random_factors(rng, 1)[0]
    (b_ref if which == "B" else a_ref)[0, 0] = np.nan
    with pytest.raises(ValueError, match=f"reference's {which} factor holds NaN"):
        aggregate("fedrot", factors, reference=(b_ref, a_ref), align=align)


def test_krum_names_a_negative_byzantine_count():
    """n_byzantine = -1 was reported as too few clients, which it is not (a review)."""
    factors = random_factors(np.random.default_rng(11), n_clients=8)
    with pytest.raises(ValueError, match="n_byzantine must be >= 0, got -1"):
        aggregate("krum", factors, n_byzantine=-1)

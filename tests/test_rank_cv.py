"""The joint LoRA refinement: bi-cross-validated rank and Gram-form coefficients."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clairstat.aggregation import clair_modules
from clairstat.aggregation._modules import joint_coefficients, module_gram
from clairstat.aggregation._rank import _held_out_errors, cross_validated_rank, module_splits

# Gram-form identities are exact up to float64 round-off on O(1) entries accumulated
# over a few hundred products: 1e-9 relative leaves room for that and nothing else.
RTOL = 1e-9


def grouped(rng, n_clients=15, n_groups=3, n_modules=3, dim=300, noise=0.5):
    """Updates (n_clients, n_modules, dim): group centres plus independent noise."""
    centres = rng.standard_normal((n_groups, n_modules, dim))
    return centres[np.arange(n_clients) % n_groups] + noise * rng.standard_normal(
        (n_clients, n_modules, dim))


def grams_of(updates):
    return np.einsum("kmd,jmd->mkj", updates, updates)


def dense_held_out_errors(part_a, part_b, max_rank):
    """The definition, by SVD of the held-in clients' centred data."""
    n = part_a.shape[0]
    errors = np.zeros((n, max_rank + 1))
    for own, other in ((part_a, part_b), (part_b, part_a)):
        for k in range(n):
            rest = np.arange(n) != k
            m_own, m_other = own[rest].mean(0), other[rest].mean(0)
            vt = np.linalg.svd(np.hstack([own[rest] - m_own, other[rest] - m_other]),
                               full_matrices=False)[2]
            d_own, d_other = own[k] - m_own, other[k] - m_other
            for r in range(max_rank + 1):
                v_own, v_other = vt[:r, :own.shape[1]].T, vt[:r, own.shape[1]:].T
                w = np.linalg.lstsq(v_own, d_own, rcond=None)[0] if r else np.zeros(0)
                resid = d_other - v_other @ w
                errors[k, r] += resid @ resid
    return errors


def test_gram_form_equals_the_definition():
    rng = np.random.default_rng(0)
    updates = grouped(rng, n_clients=9, n_modules=2, dim=40)
    a, b = updates[:, 0], updates[:, 1]
    ours = _held_out_errors(a @ a.T, b @ b.T, 6)
    assert np.allclose(ours, dense_held_out_errors(a, b, 6), rtol=RTOL,
                       atol=RTOL * np.abs(ours).max())


@pytest.mark.parametrize("n_groups", [1, 2, 3, 4])
def test_rank_is_the_number_of_shared_directions(n_groups):
    """g groups of clients around distinct centres span g - 1 directions off their mean."""
    rng = np.random.default_rng(n_groups)
    updates = grouped(rng, n_clients=16, n_groups=n_groups)
    assert cross_validated_rank(grams_of(updates)).rank == n_groups - 1


def test_a_far_client_among_the_members_counts_through_the_mean():
    """A far-off client left among the members shifts the others' mean along its own
    direction, and that direction then predicts every other client: rank 1. This is why
    the rank is cross-validated on the collaborative set, after the tests."""
    rng = np.random.default_rng(5)
    updates = grouped(rng, n_groups=1)
    updates[0] += 10.0 * rng.standard_normal(updates.shape[1:])
    grams = grams_of(updates)
    assert cross_validated_rank(grams).rank == 1
    assert cross_validated_rank(grams, np.arange(15) > 0).rank == 0


def test_members_restrict_the_clients():
    rng = np.random.default_rng(6)
    updates = grouped(rng, n_clients=16, n_groups=1)
    updates[:4] += 5.0 * rng.standard_normal((1,) + updates.shape[1:])  # 4 alike outliers
    grams = grams_of(updates)
    assert cross_validated_rank(grams).rank == 1  # they share one direction
    members = np.arange(16) >= 4
    selection = cross_validated_rank(grams, members)
    assert selection.rank == 0 and selection.errors.shape[0] == 12


def test_errors_and_splits():
    with pytest.raises(ValueError, match="3 clients"):
        cross_validated_rank(np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="two modules"):
        module_splits(1)
    splits = module_splits(8)
    assert all(s.sum() == 4 for s in splits)
    assert len({tuple(s) for s in splits} | {tuple(~s) for s in splits}) == 2 * len(splits)


def test_module_gram_is_the_frobenius_inner_product():
    rng = np.random.default_rng(7)
    factors = [(rng.standard_normal((12, r)), rng.standard_normal((r, 9))) for r in (1, 3, 2)]
    dense = np.stack([b @ a for b, a in factors]).reshape(3, -1)
    gram = module_gram(factors)
    assert np.allclose(gram, dense @ dense.T, rtol=RTOL, atol=RTOL * np.abs(gram).max())


def refine_dense(vectors, members, weights, rank):
    mean = np.average(vectors[members], axis=0, weights=weights[members])
    basis = np.linalg.svd((vectors[members] - mean).T, full_matrices=False)[0][:, :rank]
    return np.where(members[:, None], mean + (vectors - mean) @ basis @ basis.T, vectors)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1), n_clients=st.integers(4, 10),
       rank=st.integers(0, 3), n_flagged=st.integers(0, 2))
def test_joint_coefficients_reproduce_the_refinement(seed, n_clients, rank, n_flagged):
    """Invariants: the coefficients give the dense refinement; a member's row is an
    affine combination (sums to 1: a common shift of every update shifts the refined
    ones); a flagged client keeps its own update."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n_clients, 30))
    members = np.arange(n_clients) >= n_flagged
    weights = rng.uniform(0.5, 2.0, n_clients)
    rank = min(rank, members.sum() - 1)
    coef, mean_coef = joint_coefficients(vectors @ vectors.T, members, weights, rank)
    expected = refine_dense(vectors, members, weights, rank)
    scale = np.abs(expected).max()
    assert np.allclose(coef @ vectors, expected, rtol=RTOL * 1e3, atol=RTOL * 1e3 * scale)
    assert np.allclose(coef[members].sum(axis=1), 1.0, atol=RTOL * 1e3)
    assert np.array_equal(coef[~members], np.eye(n_clients)[~members])
    assert np.isclose(mean_coef.sum(), 1.0) and not mean_coef[~members].any()


def lora_clients(rng, n_clients=16, n_groups=3, d=24, r=2, noise=0.3, n_bad=2):
    """Factored clients in 3 modules: group-specific updates plus client noise; the last
    n_bad clients are large random updates (attackers)."""
    modules = {}
    for name in ("q", "k", "v"):
        centres = [(rng.standard_normal((d, r)), rng.standard_normal((r, d)))
                   for _ in range(n_groups)]
        factors = []
        for k in range(n_clients):
            b, a = centres[k % n_groups]
            if k >= n_clients - n_bad:
                b = 4.0 * rng.standard_normal((d, r))
            factors.append((np.hstack([b, noise * rng.standard_normal((d, 2))]),
                            np.vstack([a, rng.standard_normal((2, d))])))
        modules[name] = factors
    return modules


def test_default_joint_refinement_recovers_the_groups():
    """Three groups of clients: the default picks rank 2, flags the attackers, and moves
    every benign client closer to its group's centre than its own update was."""
    rng = np.random.default_rng(11)
    modules = lora_clients(rng)
    fit = clair_modules(modules, random_state=0)
    bad = np.arange(16) >= 14
    assert fit.joint and fit.rank_selection.rank == 2
    assert np.array_equal(fit.flagged, bad)
    for name, factors in modules.items():
        own = np.stack([b @ a for b, a in factors])
        centres = np.stack([own[:14][np.arange(14) % 3 == g].mean(0) for g in range(3)])
        target = centres[np.arange(14) % 3]
        refined = np.asarray(fit.per_client[name])[:14]
        assert np.linalg.norm(refined - target) < 0.5 * np.linalg.norm(own[:14] - target)


def test_combined_updates_are_the_combinations_and_their_svd():
    from clairstat._reduced import CombinedUpdates, orthonormal_basis

    rng = np.random.default_rng(12)
    factors = [(rng.standard_normal((30, r)), rng.standard_normal((r, 20))) for r in (2, 3, 1)]
    coef = rng.standard_normal((3, 3))
    left = orthonormal_basis(np.hstack([b for b, _ in factors]))
    right = orthonormal_basis(np.vstack([a for _, a in factors]).T)
    combined = CombinedUpdates(factors, coef, left, right)
    dense = np.stack([b @ a for b, a in factors])
    expected = np.tensordot(coef, dense, axes=1)
    scale = np.abs(expected).max()
    assert np.allclose(left @ np.asarray(combined) @ right.T, expected,
                       atol=RTOL * 1e3 * scale)
    for k in range(3):
        u, s, vt = combined.truncated_svd(k, 2)
        assert np.allclose(s, np.linalg.svd(expected[k], compute_uv=False)[:2],
                           atol=RTOL * 1e3 * scale)
        # the triplets are those of the (s, t) reduced matrix: they rebuild its rank-2 part
        best = np.linalg.svd(expected[k])
        rank2 = (best[0][:, :2] * best[1][:2]) @ best[2][:2]
        assert np.allclose(left @ (u * s) @ vt @ right.T, rank2, atol=RTOL * 1e3 * scale)


def test_joint_refinement_keeps_everyone_when_nobody_is_collaborative():
    from clairstat.aggregation import joint_refinement

    rng = np.random.default_rng(13)
    updates = grouped(rng, n_clients=5, n_modules=2, dim=20)
    everyone = np.ones((2, 5), dtype=bool)  # every client flagged in both modules
    joint = joint_refinement(grams_of(updates), everyone)
    assert joint.flagged.all() and np.array_equal(joint.coef, np.repeat(np.eye(5)[None], 2, 0))
    assert not joint.mean_coef.any() and joint.selection is None
    nobody = joint_refinement(grams_of(updates), ~everyone, rank=1)
    assert nobody.rank == 1 and nobody.selection is None and not nobody.flagged.any()
    assert np.allclose(nobody.coef.sum(axis=2), 1.0)
    assert np.array_equal(nobody.coef[0], nobody.coef[1])  # no module flag: one combination


def test_an_update_flagged_in_one_module_enters_nobody_else_s_refinement():
    """flagged_updates="quarantine": client 3 is flagged in module 0 only (too few
    modules for a client flag): its module-0 update has weight 0 in every client's
    refined update there (its own included) and in the mean; its module-1 update is
    refined and used as before. Poisoning that update (x 1e6) then changes no client's
    refined module-0 update."""
    from clairstat.aggregation import joint_refinement

    rng = np.random.default_rng(14)
    updates = grouped(rng, n_clients=8, n_modules=2, dim=20)
    flags = np.zeros((2, 8), dtype=bool)
    flags[0, 3] = True
    joint = joint_refinement(grams_of(updates), flags, rank=2, flagged_updates="quarantine")
    assert not joint.flagged.any()
    assert not joint.coef[0][:, 3].any() and joint.mean_coef[0][3] == 0.0
    assert joint.coef[1][:, 3].all() and joint.mean_coef[1][3] > 0.0
    np.testing.assert_allclose(joint.coef.sum(axis=2), 1.0, rtol=0, atol=1e-12)
    refined = joint.coef[0] @ updates[:, 0]
    poisoned = updates.copy()
    poisoned[3, 0] *= 1e6
    again = joint_refinement(grams_of(poisoned), flags, rank=2,
                             flagged_updates="quarantine")
    refined_again = again.coef[0] @ poisoned[:, 0]
    # the poisoned Gram entries are 1e12 times larger: their round-off is what remains
    np.testing.assert_allclose(refined_again, refined, rtol=1e-6)


def test_an_impossible_joint_rank_is_refused():
    from clairstat.aggregation import joint_refinement

    rng = np.random.default_rng(15)
    updates = grouped(rng, n_clients=5, n_modules=2, dim=20)
    nobody = np.zeros((2, 5), dtype=bool)
    for rank in (-1, 5, 1000, 1.5, True):
        with pytest.raises(ValueError, match="joint rank"):
            joint_refinement(grams_of(updates), nobody, rank=rank)
    assert joint_refinement(grams_of(updates), nobody, rank=4).rank == 4


def test_a_module_that_flags_every_member_shares_nothing():
    """Module 0's test flags every client (none flagged overall): nothing stands in for
    a flagged update, so each keeps its own there (a poisoned one reaches nobody); the
    other module is refined. Unflagged members of weight 0 do not stand in either."""
    from clairstat.aggregation import joint_refinement

    rng = np.random.default_rng(16)
    updates = grouped(rng, n_clients=8, n_modules=3, dim=20)
    flags = np.zeros((3, 8), dtype=bool)
    flags[0] = True
    joint = joint_refinement(grams_of(updates), flags, rank=1)
    assert not joint.flagged.any() and np.array_equal(joint.coef[0], np.eye(8))
    assert not np.allclose(joint.coef[1], np.eye(8))
    flags[0, 5] = False
    weights = np.ones(8)
    weights[5] = 0.0
    joint = joint_refinement(grams_of(updates), flags, weights, rank=1)
    assert np.array_equal(joint.coef[0], np.eye(8)) and np.isfinite(joint.coef).all()


def test_clipping_keeps_an_ordinary_flagged_update_and_bounds_a_poisoned_one():
    """flagged_updates="clip": client 3, flagged in module 0 only, with an update no
    larger than the unflagged clients' is used as it is (the refinement equals the one
    without that module flag); scaled by 1e6 it is cut to the largest unflagged norm,
    so every refined update there stays the size of the inputs (the quarantine's
    guarantee for poisoned updates, kept), while its direction still counts."""
    from clairstat.aggregation import joint_refinement

    rng = np.random.default_rng(17)
    updates = grouped(rng, n_clients=8, n_modules=2, dim=20)
    norms = np.linalg.norm(updates[:, 0].reshape(8, -1), axis=1)
    updates[3, 0] *= 0.9 * norms[np.arange(8) != 3].max() / norms[3]  # ordinary size
    flags = np.zeros((2, 8), dtype=bool)
    flags[0, 3] = True
    clipped = joint_refinement(grams_of(updates), flags, rank=2)  # the default
    assert np.array_equal(clipped.coef, joint_refinement(
        grams_of(updates), flags, rank=2, flagged_updates="clip").coef)
    unflagged = joint_refinement(grams_of(updates), np.zeros_like(flags), rank=2)
    np.testing.assert_allclose(clipped.coef, unflagged.coef, rtol=0, atol=1e-12)
    quarantined = joint_refinement(grams_of(updates), flags, rank=2,
                                   flagged_updates="quarantine")
    assert not quarantined.coef[0][:, 3].any() and clipped.coef[0][:, 3].any()

    poisoned = updates.copy()
    poisoned[3, 0] *= 1e6
    again = joint_refinement(grams_of(poisoned), flags, rank=2, flagged_updates="clip")
    refined = np.einsum("kj,j...->k...", again.coef[0], poisoned[:, 0])
    size = np.linalg.norm(poisoned[np.arange(8) != 3, 0].reshape(7, -1), axis=1).max()
    assert np.linalg.norm(refined.reshape(8, -1), axis=1).max() <= 2 * size
    assert again.coef[0][:, 3].any()  # cut to size, not dropped
    scale = again.coef[0][3, 3] / clipped.coef[0][3, 3]
    assert 0 < scale < 1e-5  # the map scaled the poisoned update down by about 1e6


def test_flagged_updates_is_checked():
    from clairstat.aggregation import clair_modules, joint_refinement

    rng = np.random.default_rng(18)
    updates = grouped(rng, n_clients=5, n_modules=2, dim=20)
    nobody = np.zeros((2, 5), dtype=bool)
    for value in ("keep", None, 1, "Clip"):
        with pytest.raises(ValueError, match="flagged_updates"):
            joint_refinement(grams_of(updates), nobody, rank=1, flagged_updates=value)
        if value is None:  # clair_modules: None means the default
            continue
        with pytest.raises(ValueError, match="flagged_updates"):
            clair_modules({"m": [(np.ones((4, 1)), np.ones((1, 3)))] * 3},
                          flagged_updates=value)


def weak_direction(seed=2, separation=0.15):
    """Half the clients shifted along one weak direction: the smallest cross-validated
    error is at rank 1, rank 0 within one standard error of it (seed 2)."""
    rng = np.random.default_rng(seed)
    updates = grouped(rng, n_clients=12, n_groups=1, n_modules=4, dim=200)
    updates[::2] += separation * rng.standard_normal(updates.shape[1:])
    return grams_of(updates)


def test_rank_rules():
    """The default keeps the rank of the smallest error; the one-standard-error rule
    (the default before the copying task's comparison) the smallest rank within one
    standard error of it. The problem is one where the two differ."""
    grams = weak_direction()
    best = cross_validated_rank(grams)
    one_se = cross_validated_rank(grams, rule="one-standard-error")
    assert (best.rule, one_se.rule) == ("smallest-error", "one-standard-error")
    assert best.rank == best.best_rank == one_se.best_rank == 1
    assert one_se.rank == best.one_standard_error_rank == 0
    mean = best.mean_errors
    assert mean[best.rank] == mean.min()
    assert mean[0] - mean[1] <= best.standard_error[0]  # rank 0 within one SE
    np.testing.assert_array_equal(best.errors, one_se.errors)
    # the message names this function's parameter, ``rule`` (not ``rank_rule``)
    with pytest.raises(ValueError, match=r"^rule must be one of"):
        cross_validated_rank(grams, rule="one-se")


def test_rank_rule_reaches_the_joint_refinement():
    """``rank_rule`` is passed down to the cross-validation; it is refused where no rank
    is chosen (``rank`` given, ``joint=False``)."""
    from clairstat.aggregation import joint_refinement

    grams = weak_direction()
    flags = np.zeros(grams.shape[:2], dtype=bool)
    assert joint_refinement(grams, flags).rank == 1
    assert joint_refinement(grams, flags, rank_rule="one-standard-error").rank == 0
    with pytest.raises(ValueError, match="give one of them"):
        joint_refinement(grams, flags, rank=1, rank_rule="smallest-error")
    rng = np.random.default_rng(0)
    factors = {f"m{i}": [(rng.standard_normal((6, 2)), rng.standard_normal((2, 5)))
                         for _ in range(8)] for i in range(2)}
    with pytest.raises(ValueError, match="joint=True"):
        clair_modules(factors, joint=False, rank_rule="smallest-error")
    with pytest.raises(ValueError, match="give one of them"):
        clair_modules(factors, rank=1, rank_rule="one-standard-error")
    with pytest.raises(ValueError, match="rank_rule must be one of"):
        clair_modules(factors, rank_rule="best")

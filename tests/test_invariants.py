"""Property-based tests: a fitted estimator never contradicts itself.

Over random problems (numbers of clients, shapes, ranks, contamination, noise, weights,
scales), every fitted attribute must come from one fit on the reported collaborative
set, and the outlier-detector interface must reproduce the fitted flags.
"""

import warnings
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import clairstat._estimator as estimator_module
from clairstat import CLAIREstimator
from clairstat.datasets import make_low_rank_block_sparse

# float64 round-off of the products behind a refit mean or projection, relative to the
# data's largest entry (a few hundred operations at most at these sizes).
RTOL = 1e-10

problems = st.fixed_dictionaries({
    "n_clients": st.integers(5, 25),
    "p": st.integers(2, 10),
    "q": st.integers(1, 4),
    "rank": st.integers(1, 3),
    "share": st.sampled_from([0.0, 0.1, 0.2, 0.3]),
    "noise": st.sampled_from([0.0, 0.01, 0.1, 0.5]),
    "seed": st.integers(0, 2 ** 31 - 1),
    "weighted": st.booleans(),
    "correction": st.sampled_from(["fdr_bh", "holm", "bonferroni"]),
    "rank_given": st.booleans(),
    # copies of one client appended (exact, or perturbed far below the noise): they count
    # once in the noise scale, the robust start and the calibration
    # (clairstat._tuning.copy_groups), and the fit must still be one fit. (Perturbed by
    # 1e-6 of the largest entry, not less: the copies' statistics are then set by their
    # perturbation, not by the 1e-16 rounding that a rescaling adds, which at 1e-12 moves
    # them by 1e-4 and the others' p-values by 1e-5, past test_scale_equivariance's
    # tolerance for the rescalings' round-off.)
    "copies": st.sampled_from([0, 0, 2, 5]),
    "jitter": st.sampled_from([0.0, 1e-6]),
})


def _fit(params):
    rank = min(params["rank"], params["p"] - 1)
    n_bad = int(params["share"] * params["n_clients"])
    data = make_low_rank_block_sparse(params["n_clients"], params["p"], params["q"], rank,
                                      n_bad, noise_level=params["noise"],
                                      random_state=params["seed"])
    rng = np.random.default_rng(params["seed"])
    X = data.local_estimates
    if params.get("copies", 0):
        source = X[rng.integers(len(X))]
        jitter = params["jitter"] * (np.abs(X).max() or 1.0)
        X = np.concatenate([X, source + jitter * rng.standard_normal(
            (params["copies"],) + source.shape)])
    weights = rng.integers(1, 100, len(X)) if params["weighted"] else None
    est = CLAIREstimator(rank=rank if params["rank_given"] else None,
                         correction=params["correction"], random_state=params["seed"],
                         rank_support=params.get("rank_support", 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X, sample_weight=weights)
    return est, X, np.ones(len(X)) if weights is None else weights.astype(float)


def _check_one_fit(est, X, weights):
    scale = np.abs(X).max() or 1.0
    members = est.collaborative_set_
    assert np.array_equal(members, np.flatnonzero(~est.contaminated_))
    # the mean is the weighted mean of the reported set
    mean = np.tensordot(weights[members] / weights[members].sum(), X[members], axes=1)
    np.testing.assert_allclose(est.collaborative_mean_, mean, rtol=0, atol=RTOL * scale)
    # the subspace is orthonormal and of the reported rank
    basis = est.subspace_
    assert basis.shape == (X.shape[1], est.rank_)
    np.testing.assert_allclose(basis.T @ basis, np.eye(est.rank_), atol=1e-10)
    # refined = P X_k + (I - P) mean for members, P a projector onto the subspace
    # (oblique along the detection frame's metric); flagged clients unchanged
    projector = est.projector_
    np.testing.assert_allclose(projector @ projector, projector, rtol=0, atol=1e-8)
    np.testing.assert_allclose(projector @ basis, basis, rtol=0, atol=1e-8)
    np.testing.assert_allclose(basis @ (basis.T @ projector), projector, rtol=0, atol=1e-8)
    expected = mean[None] + projector @ (X - mean[None])
    expected[est.contaminated_] = X[est.contaminated_]
    np.testing.assert_allclose(est.refined_, expected, rtol=0, atol=RTOL * scale)
    # the outlier interface reproduces the fitted flags on the training clients
    assert np.array_equal(est.predict(X), np.where(est.contaminated_, -1, 1))
    np.testing.assert_allclose(est.decision_function(X), est.score_samples(X) - est.offset_)
    np.testing.assert_allclose(est.transform(X), est.refined_, rtol=0, atol=RTOL * scale)
    # p-values are probabilities; adjusted ones never smaller; a converged fit's flags are
    # exactly its test's rejections
    assert np.all((est.p_values_ >= 0) & (est.p_values_ <= 1))
    assert np.all(est.adjusted_p_values_ >= est.p_values_ - 1e-15)
    if est.detection_converged_:
        assert np.array_equal(est.contaminated_, est.adjusted_p_values_ <= est.test_level)


@settings(max_examples=500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(problems)
def test_one_consistent_fitted_state(params):
    est, X, weights = _fit(params)
    _check_one_fit(est, X, weights)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(problems, st.floats(-250, 250))
def test_scale_equivariance(params, exponent):
    """Scaling the data by any factor in float64's range leaves the flags unchanged and
    scales the estimates."""
    est, X, weights = _fit(params)
    factor = 10.0 ** exponent
    scaled = CLAIREstimator(**est.get_params())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scaled.fit(X * factor, sample_weight=None if not params["weighted"] else weights)
    assert np.array_equal(scaled.contaminated_, est.contaminated_)
    assert scaled.rank_ == est.rank_
    # both fits run on the same rescaled data (units of the largest entry): the results
    # differ by the round-off of the two rescalings only
    np.testing.assert_allclose(scaled.refined_ / factor, est.refined_, rtol=0,
                               atol=RTOL * (np.abs(X).max() or 1.0))
    if params["noise"] > 0:  # noiseless statistics are round-off, and so are their p-values
        np.testing.assert_allclose(scaled.p_values_, est.p_values_, rtol=1e-6, atol=1e-300)


def _unit_free(frame="residual"):
    """The decomposition's frame for a block of code (module-level setting)."""
    return mock.patch.object(estimator_module, "DECOMPOSITION_FRAME", frame)


def _in_other_units(params, exponents):
    """Refit ``_fit``'s problem with its rows and outputs in other units."""
    est, X, weights = _fit(params)
    p, q = X.shape[1:]
    rows, cols = 10.0 ** exponents[:p], 10.0 ** exponents[p:p + q]
    other = CLAIREstimator(**est.get_params())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other.fit(rows[None, :, None] * X * cols,
                  sample_weight=None if not params["weighted"] else weights)
    return est, other


unit_exponents = st.lists(st.floats(-3, 3), min_size=14, max_size=14).map(np.array)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(problems, unit_exponents)
def test_unit_equivariance(params, exponents):
    """Without a covariance, with the unit-free decomposition, a covariate's or an
    output's units (each row and output of every estimate times its own factor, up to
    1e3 either way) change no flag, no rank and no p-value: the decomposition, its start,
    the frame and the tests are all equivariant under a diagonal change of units.
    Noiseless estimates and copies of one client are left out: they leave no noise to
    read a frame from (every entry's MAD is 0 where most clients are one estimate; the
    program then runs in the data's units, and round-off decides the noiseless tests)."""
    assume(params["noise"] > 0 and params["copies"] == 0)
    with _unit_free():
        est, other = _in_other_units(params, exponents)
    assert np.array_equal(other.contaminated_, est.contaminated_)
    assert other.test_rank_ == est.test_rank_
    # the decomposition's parts follow the units: both programs run on frames equal up
    # to the round-off of the scales (a few ulps, then a few hundred operations of the
    # solver on the same iterates): 1e-10 of the data's largest entry
    p, q = est.sparse_.shape[1:]
    rows, cols = 10.0 ** exponents[:p], 10.0 ** exponents[p:p + q]
    for part in ("backbone_", "low_rank_", "sparse_"):
        moved = rows[:, None] * getattr(est, part) * cols
        np.testing.assert_allclose(getattr(other, part), moved, rtol=0,
                                   atol=1e-10 * (np.abs(moved).max() or 1.0))
    # p-values: measured equal to about 1e-14; 1e-9 leaves the round-off above room
    # through the null's moments
    np.testing.assert_allclose(other.p_values_, est.p_values_, rtol=1e-9, atol=1e-300)


def test_units_move_the_decomposition_in_the_datas_units():
    """The negative control of test_unit_equivariance: with the decomposition in the
    data's units (the setting before the unit-free one) the same change of units moves
    the flags of an ordinary problem (40 clients, 5 contaminated, rows and outputs in
    units up to 1e2 apart)."""
    params = dict(n_clients=40, p=12, q=2, rank=2, share=0.1, noise=0.5, seed=3,
                  weighted=False, correction="fdr_bh", rank_given=False)
    exponents = np.random.default_rng(0).uniform(-2, 2, 14)
    with _unit_free("none"):
        est, other = _in_other_units(params, exponents)
    assert not np.array_equal(other.contaminated_, est.contaminated_) \
        or other.test_rank_ != est.test_rank_
    with _unit_free():
        est, other = _in_other_units(params, exponents)
    assert np.array_equal(other.contaminated_, est.contaminated_)
    assert other.test_rank_ == est.test_rank_


@pytest.mark.parametrize("params", [
    # six exact copies of one client among ten (the consensus), noiseless: the identical
    # members' centred stack is rounding, which a zero edge in the rank rule counted as a
    # direction at one scale of the data and not at another (rank 1 against 0)
    dict(n_clients=5, p=2, q=1, rank=1, share=0.0, noise=0.0, seed=0, weighted=False,
         correction="fdr_bh", rank_given=False, copies=5, jitter=0.0),
    # the same with noise 0.1 among the others and weights: the copies' statistics were
    # 0 at one scale and 1e-32 at another, the quartile match read the first as the widest
    # null and the second as a narrow one, and four clients' flags changed with the units
    dict(n_clients=5, p=2, q=1, rank=1, share=0.0, noise=0.1, seed=1, weighted=True,
         correction="fdr_bh", rank_given=False, copies=5, jitter=0.0),
])
@pytest.mark.parametrize("exponent", [1.0, 2.0, -3.0])
def test_scale_equivariance_with_a_consensus_of_copies(params, exponent):
    """Two cases the property-based test found once copies joined its problems."""
    est, X, weights = _fit(params)
    scaled = CLAIREstimator(**est.get_params())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scaled.fit(X * 10.0 ** exponent, sample_weight=weights if params["weighted"] else None)
    assert np.array_equal(scaled.contaminated_, est.contaminated_)
    assert scaled.rank_ == est.rank_
    np.testing.assert_allclose(scaled.p_values_, est.p_values_, rtol=1e-6, atol=1e-300)


@pytest.mark.parametrize("exponent", [-300, -200, 153, 154, 300])
def test_extreme_scales(regression, exponent):
    base = CLAIREstimator(random_state=0).fit(regression.local_estimates)
    est = CLAIREstimator(random_state=0).fit(regression.local_estimates * 10.0 ** exponent)
    assert np.array_equal(est.contaminated_, base.contaminated_)
    assert np.all(np.isfinite(est.refined_))


def _random_spd(rng, size):
    """A covariance with eigenvalues spread over two decades."""
    basis = np.linalg.qr(rng.standard_normal((size, size)))[0]
    return (basis * np.logspace(-1, 1, size)) @ basis.T


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(problems)
def test_one_consistent_fit_with_a_known_covariance(params):
    """With noise_cov the refinement projects in the noise's metric: still one fit, and
    refined_ = (1 - kappa) (mean + Pi (X - mean)) + kappa X with Pi a projector onto
    subspace_ and kappa = refinement_keep_."""
    rank = min(params["rank"], params["p"] - 1)
    data = make_low_rank_block_sparse(params["n_clients"], params["p"], params["q"], rank,
                                      int(params["share"] * params["n_clients"]),
                                      noise_level=params["noise"],
                                      random_state=params["seed"])
    rng = np.random.default_rng(params["seed"])
    noise_cov = (_random_spd(rng, params["p"]), _random_spd(rng, params["q"]))
    est = CLAIREstimator(rank=rank if params["rank_given"] else None,
                         correction=params["correction"], random_state=params["seed"])
    X = data.local_estimates
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X, noise_cov=noise_cov)
    scale = np.abs(X).max() or 1.0
    members = est.collaborative_set_
    mean = X[members].mean(axis=0)
    np.testing.assert_allclose(est.collaborative_mean_, mean, rtol=0, atol=RTOL * scale)
    kept = ~est.contaminated_
    # the refinement keeps refinement_keep_ (kappa, from the calibration's factor) of
    # each member's own estimate: the rest is the projection
    keep = est.refinement_keep_
    factor = est.null_scale_factor_
    assert keep == pytest.approx(1 - 1 / factor if factor > 1 else 0.0, abs=1e-15)
    projected = (est.refined_[kept] - keep * X[kept]) / (1.0 - keep)
    diff = projected - mean[None]
    # The frame's maps have condition numbers up to 10 (factors' eigenvalues over two
    # decades), and the oblique projector goes through both: round-off of a few
    # hundred operations times 100, far below 1e-8 of the data's size; undoing kappa
    # divides by 1 - kappa = 1 / factor (measured up to 6 over these problems; the
    # bound below keeps the tolerance from growing unseen).
    assert factor < 1e3
    tolerance = 1e-8 * scale * max(factor, 1.0)
    # the projection's change lies in the subspace...
    basis = est.subspace_
    np.testing.assert_allclose(diff - basis @ (basis.T @ diff), 0.0, rtol=0,
                               atol=tolerance)
    # ...and is a projection: projecting the projected estimates changes nothing
    np.testing.assert_allclose(mean + est.projector_ @ diff, projected, rtol=0,
                               atol=tolerance)
    # transform applies the same map to the training clients
    np.testing.assert_allclose(est.transform(X), est.refined_, rtol=0, atol=1e-8 * scale)
    np.testing.assert_array_equal(est.refined_[~kept], X[~kept])
    assert np.array_equal(est.predict(X), np.where(est.contaminated_, -1, 1))
    if est.detection_converged_:
        assert np.array_equal(est.contaminated_, est.adjusted_p_values_ <= est.test_level)


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(4, 9), st.integers(3, 8), st.integers(1, 2), st.integers(0, 2 ** 31 - 1),
       st.sampled_from([0.01, 0.1]))
def test_permuting_clients_permutes_a_fit_whose_half_sets_fit_exactly(n_clients, p, q, seed,
                                                                      noise):
    """Where a mean and the rank-r subspace fit every half-set of the clients exactly
    (rank >= (K // 2) q), the robust start cannot tell half-sets apart: their trimmed sums
    are round-off, and choosing the lowest made the flags follow the clients' order (5
    clients at rank 2: one flagged in one order, none in another). Permuting the clients
    must permute every per-client output and leave the shared ones alone."""
    rank = min(p - 1, q * (n_clients // 2))
    data = make_low_rank_block_sparse(n_clients, p, q, rank, 1, noise_level=noise,
                                      random_state=seed)
    X = data.local_estimates
    perm = np.random.default_rng(seed).permutation(n_clients)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = CLAIREstimator(rank=rank, random_state=0).fit(X)
        permuted = CLAIREstimator(rank=rank, random_state=0).fit(X[perm])
    assert np.array_equal(permuted.contaminated_, est.contaminated_[perm])
    # the same fit on reordered clients: the p-values differ by the round-off of sums
    # taken in another order
    np.testing.assert_allclose(permuted.p_values_, est.p_values_[perm], rtol=1e-6,
                               atol=1e-12)
    np.testing.assert_allclose(permuted.collaborative_mean_, est.collaborative_mean_,
                               rtol=0, atol=RTOL * np.abs(X).max())

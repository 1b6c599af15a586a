"""Inputs the estimator must refuse, not misread (a scikit-learn user's review)."""

import numpy as np
import pytest

from clairstat import CLAIREstimator, clair_decompose


def test_masked_entries_are_refused_not_read_as_data(regression):
    """np.asarray drops a masked array's mask: the hidden value (here 1e6) was used as the
    client's estimate and flagged it. A masked entry is a missing value, refused as NaN
    is; a masked array with nothing masked is plain data."""
    X = regression.local_estimates
    masked = np.ma.masked_array(X.copy(), mask=np.zeros(X.shape, bool))
    masked.data[3, 0, 0] = 1e6
    masked[3, 0, 0] = np.ma.masked
    match = r"local.estimates contain missing values \(masked entries\) \(clients \[3\]\)"
    for given in (masked, list(masked), [X[0], *masked[1:]], masked[:, :, 0]):
        with pytest.raises(ValueError, match=match):
            CLAIREstimator(random_state=0).fit(given)
    with pytest.raises(ValueError, match=match):
        clair_decompose(masked)
    fitted = CLAIREstimator(random_state=0).fit(np.ma.masked_array(X))  # nothing masked
    np.testing.assert_array_equal(fitted.predict(X), np.where(fitted.contaminated_, -1, 1))
    with pytest.raises(ValueError, match=match):
        fitted.predict(masked)
    weights = np.ma.masked_array(np.ones(len(X)), mask=np.arange(len(X)) == 2)
    with pytest.raises(ValueError, match=r"sample_weight contains missing values"):
        CLAIREstimator(random_state=0).fit(X, sample_weight=weights)
    row = np.ma.masked_array(np.eye(X.shape[1]), mask=np.eye(X.shape[1], dtype=bool)
                             & (np.arange(X.shape[1]) == 1))
    with pytest.raises(ValueError, match=r"noise_cov\[0\] \(row_cov\) contains missing"):
        CLAIREstimator(random_state=0).fit(X, noise_cov=(row, np.eye(X.shape[2])))
    # one noise scale per client, the masked one hiding 1e-6 (a review of the change)
    scales = np.ma.masked_array(np.full(len(X), 0.1), mask=np.arange(len(X)) == 1)
    scales.data[1] = 1e-6
    with pytest.raises(ValueError, match=r"noise_scale contains missing values"):
        CLAIREstimator(noise_scale=scales, random_state=0).fit(X)


def test_set_params_after_the_fit_leaves_its_predictions_alone():
    """predict and transform read and return estimates in the fit's orientation: a
    set_params(subspace=...) after a fit on square estimates transposed them, flagged
    every client and changed transform(X_train) (no error: the shapes still matched).
    The other parameters predict reads (test_level: offset_) are the fit's too."""
    from clairstat.datasets import make_low_rank_block_sparse

    data = make_low_rank_block_sparse(14, 4, 4, 1, 3, noise_level=0.1, random_state=3)
    X = data.local_estimates.transpose(0, 2, 1)  # a shared row space, p = q
    est = CLAIREstimator(subspace="row", random_state=0).fit(X)
    flags = np.where(est.contaminated_, -1, 1)
    assert 0 < est.contaminated_.sum() < len(X)
    scores, refined = est.score_samples(X), est.transform(X)
    np.testing.assert_array_equal(refined, est.refined_)
    est.set_params(subspace="column", test_level=0.5)
    np.testing.assert_array_equal(est.predict(X), flags)
    np.testing.assert_array_equal(est.score_samples(X), scores)
    np.testing.assert_array_equal(est.transform(X), refined)
    noise_cov = (np.eye(4), np.diag([1.0, 2.0, 3.0, 4.0]))
    cov_fit = CLAIREstimator(subspace="row", random_state=0).fit(X, noise_cov=noise_cov)
    new = X[:3] + 0.05
    before = cov_fit.score_samples(new, noise_cov=noise_cov)
    cov_fit.set_params(subspace="column")
    np.testing.assert_array_equal(cov_fit.score_samples(new, noise_cov=noise_cov), before)


def test_lists_of_unmasked_clients_are_read(regression):
    X = regression.local_estimates
    est = CLAIREstimator(random_state=0).fit(list(X))
    np.testing.assert_array_equal(est.refined_, CLAIREstimator(random_state=0).fit(X).refined_)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "meta"])
def test_an_unknown_device_is_a_value_error_naming_it(regression, device):
    """torch's own RuntimeError listed every device type it knows and nothing else; the
    fit, the solver and the LoRA rule say which argument is wrong, before any work."""
    from clairstat.aggregation import aggregate

    X = regression.local_estimates
    with pytest.raises(ValueError, match=f"device='{device}'"):
        CLAIREstimator(device=device).fit(X)
    with pytest.raises(ValueError, match=f"device='{device}'"):
        clair_decompose(X, solver="torch", device=device)
    rng = np.random.default_rng(0)
    factors = [(rng.standard_normal((8, 2)), rng.standard_normal((2, 6))) for _ in range(4)]
    with pytest.raises(ValueError, match=f"device='{device}'"):
        aggregate("clair", factors, device=device)


@pytest.mark.parametrize("rank", [True, False, np.bool_(True)])
def test_a_boolean_rank_is_refused(regression, rank):
    """bool is an Integral, so the parameter constraints let rank=True through as 1
    (numpy's bool they refuse themselves, with an error that is also a TypeError)."""
    with pytest.raises(TypeError, match="rank"):
        CLAIREstimator(rank=rank).fit(regression.local_estimates)

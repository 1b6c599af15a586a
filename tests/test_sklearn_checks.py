"""scikit-learn's common estimator checks over CLAIREstimator."""

import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.utils.estimator_checks import parametrize_with_checks

from clairstat import CLAIREstimator

# Checks that cannot apply, with the reason. Filled from running the suite; each entry
# is a property of the method, not a bug left for later.
EXPECTED_FAILED_CHECKS = {
    "check_outliers_train": (
        "assumes every detector flags some training points; CLAIR flags a client only when "
        "its calibrated test rejects, and make_blobs (p=2, q=1: three overlapping Gaussian "
        "blobs) holds no outliers: the rank rule picks rank 0, each test has about 2 "
        "degrees of freedom, and the smallest BH-adjusted p-value is 0.89, so nothing is "
        "flagged, by design (test_the_outlier_checks_pass_where_there_are_outliers runs "
        "the rest of these checks on data with outliers)"),
    "check_outliers_fit_predict": "same reason as check_outliers_train",
    "check_sample_weight_equivalence_on_dense_data": (
        "sample_weight weights the collaborative mean only (docs/method_notes.md); a repeated "
        "client still enters the decomposition and the per-client tests as separate "
        "clients, so integer weights are not equivalent to repetition"),
}


@parametrize_with_checks([CLAIREstimator()],
                         expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)


def test_the_outlier_checks_pass_where_there_are_outliers():
    """What check_outliers_train and check_outliers_fit_predict check after their first
    assertion (skipped with them), on make_blobs' points with a tenth of them moved far
    away: predict's dtype and values, decision_function = score_samples - offset_,
    malformed input refused, and fit_predict = fit then predict."""
    X, _ = make_blobs(n_samples=300, random_state=0)
    # moved in random directions (30 points moved alike would be a shared direction)
    angle = np.random.default_rng(0).uniform(0, 2 * np.pi, 30)
    X[::10] += 40.0 * np.c_[np.cos(angle), np.sin(angle)]
    est = CLAIREstimator(random_state=0).fit(X.tolist())
    y_pred = est.predict(X)
    assert y_pred.dtype.kind == "i" and y_pred.shape == (300,)
    np.testing.assert_array_equal(np.unique(y_pred), [-1, 1])
    np.testing.assert_array_equal(y_pred, np.where(est.contaminated_, -1, 1))
    decision, scores = est.decision_function(X), est.score_samples(X)
    assert decision.dtype == scores.dtype == np.float64
    np.testing.assert_array_equal(np.where(decision >= 0, 1, -1), y_pred)
    np.testing.assert_allclose(scores - est.offset_, decision)
    for method in (est.predict, est.decision_function, est.score_samples):
        with pytest.raises(ValueError):
            method(X.T)
    np.testing.assert_array_equal(CLAIREstimator(random_state=0).fit_predict(X), y_pred)

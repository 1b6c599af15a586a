"""scikit-learn's common estimator checks over CLAIREstimator."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from clairstat import CLAIREstimator

# Checks that cannot apply, with the reason. Filled from running the suite; each entry
# is a property of the method, not a bug left for later.
EXPECTED_FAILED_CHECKS = {
    "check_outliers_train": (
        "assumes every detector flags some training points; CLAIR flags a client only when "
        "its calibrated test rejects, and on make_blobs (p=2, q=1) the rank rule keeps both "
        "directions, leaving no degrees of freedom to test: nothing is flagged, by design"),
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

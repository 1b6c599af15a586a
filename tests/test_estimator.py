"""CLAIREstimator: detection, subspace, refinement, interface and bad input."""

import pickle
import warnings

import numpy as np
import pytest
from sklearn.base import clone

from clairstat import CLAIREstimator
from clairstat.datasets import make_federated_regression
from clairstat.metrics import detection_scores, estimation_errors, subspace_distance

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def fitted(regression):
    return CLAIREstimator(random_state=0).fit(regression.local_estimates,
                                              sample_weight=regression.n_samples)


def test_detects_the_contaminated_clients(fitted, regression):
    scores = detection_scores(fitted.contaminated_, regression.contaminated)
    # Every attacker is caught; FDR control allows the odd benign flag (on this seed one
    # benign client has p = 0.001 even under the true sigma and df).
    assert scores["recall"] == 1.0 and scores["false_positive_rate"] <= 0.05, scores
    np.testing.assert_array_equal(fitted.collaborative_set_,
                                  np.flatnonzero(~fitted.contaminated_))
    np.testing.assert_array_equal(fitted.predict(regression.local_estimates),
                                  np.where(fitted.contaminated_, -1, 1))


def test_recovers_the_subspace_and_refines(fitted, regression):
    assert fitted.rank_ == 2
    # ||P_hat - P*|| for r = 2 directions estimated from 25 clients x 5 columns with
    # per-entry noise ~0.07: first-order perturbation ~ sigma sqrt(r p / (q K)) ~ 0.06.
    assert subspace_distance(fitted.subspace_, regression.subspace) < 0.2
    benign = ~regression.contaminated
    refined = estimation_errors(fitted.refined_, regression.truth)[benign].mean()
    local = estimation_errors(regression.local_estimates, regression.truth)[benign].mean()
    # Oracle risk ratio (r + (p - r)/|C|) / p = (2 + 18/25) / 20 = 0.136; allow the
    # subspace-estimation cost on top.
    assert refined / local < 0.3


def test_flagged_clients_keep_their_estimate(fitted, regression):
    flagged = fitted.contaminated_
    np.testing.assert_array_equal(fitted.refined_[flagged], regression.local_estimates[flagged])


def test_transform_refines_new_clients(fitted, regression):
    new = make_federated_regression(30, 20, 5, 2, 200, 5, separation=3.0, random_state=7)
    np.testing.assert_allclose(fitted.transform(new.local_estimates[:3]), fitted.refined_[:3])
    assert fitted.transform(new.local_estimates[:1]).shape == (1, 20, 5)


def test_test_statistics_are_calibrated_under_the_null():
    """No contamination: p-values of the benign clients are roughly uniform."""
    data = make_federated_regression(60, 20, 4, 2, 300, 0, random_state=1)
    est = CLAIREstimator(random_state=0, rank=2).fit(data.local_estimates)
    # FDR control at 5% with no contamination: no flag expected in the vast majority of
    # runs; the seed is fixed so this is deterministic.
    assert est.contaminated_.sum() == 0
    # Kolmogorov-Smirnov distance of 60 p-values from uniform: the 1% critical value is 0.21.
    from scipy import stats
    assert stats.kstest(est.p_values_, "uniform").statistic < 0.21


def test_test_detection_beats_threshold_on_a_small_shift():
    """A shift of about the noise's own Frobenius norm (~1.1 here): the calibrated test
    (statistic ratio ~1.8 with sd ~0.1 under the null) catches every attacker, while the
    raw ||S_k|| threshold, which only sees shifts beyond beta, misses some."""
    data = make_federated_regression(40, 30, 8, 3, 200, 8, separation=1.0, random_state=2)
    tested = CLAIREstimator(random_state=0).fit(data.local_estimates)
    thresholded = CLAIREstimator(random_state=0, detection="threshold").fit(data.local_estimates)
    scores = detection_scores(tested.contaminated_, data.contaminated)
    # FDR control is in expectation: on this seed two benign clients have p ~ 0.005 even
    # under the true sigma (OLS noise is not exactly isotropic), so allow 2 of 10 flags.
    assert scores["recall"] == 1.0 and scores["precision"] >= 0.8
    assert detection_scores(thresholded.contaminated_, data.contaminated)["recall"] < 1.0


def test_colluding_attackers_are_flagged_when_the_rank_is_given():
    """30% near-identical attackers pushing one off-subspace direction: the decomposition
    folds them into L, and only the concentration steps keep them out of the refit."""
    data = make_federated_regression(40, 30, 8, 3, 200, 12, separation=3.0, random_state=0)
    X = data.local_estimates.copy()
    rng = np.random.default_rng(0)
    shift = rng.standard_normal((30, 8))
    shift -= data.subspace @ (data.subspace.T @ shift)
    X[data.contaminated] = (data.backbone + 3.0 * shift / np.linalg.norm(shift)
                            + 0.01 * rng.standard_normal((12, 30, 8)))
    est = CLAIREstimator(rank=3, random_state=0).fit(X)
    assert detection_scores(est.contaminated_, data.contaminated)["exact"]


def test_row_subspace_is_the_column_fit_of_transposes(regression):
    X = regression.local_estimates
    col = CLAIREstimator(random_state=0, rank=2).fit(X.transpose(0, 2, 1))
    row = CLAIREstimator(random_state=0, rank=2, subspace="row").fit(X)
    np.testing.assert_allclose(row.refined_, col.refined_.transpose(0, 2, 1), atol=1e-10)
    np.testing.assert_array_equal(row.contaminated_, col.contaminated_)


def test_low_rank_subspace_option(regression):
    est = CLAIREstimator(random_state=0, subspace_source="low_rank").fit(regression.local_estimates)
    assert est.subspace_.shape[0] == 20 and est.rank_ >= 1


def test_threshold_detection_and_all_flagged_warning(regression):
    est = CLAIREstimator(random_state=0, detection="threshold").fit(regression.local_estimates)
    np.testing.assert_array_equal(est.contaminated_, est.contamination_scores_ > 0)
    with pytest.warns(UserWarning, match="every client"):
        flagged = CLAIREstimator(random_state=0, detection="threshold", beta=0.0).fit(
            regression.local_estimates)
    assert flagged.contaminated_.all()
    np.testing.assert_array_equal(flagged.refined_, regression.local_estimates)


def test_exact_formulation_with_cvxpy_matches_torch():
    pytest.importorskip("cvxpy")
    data = make_federated_regression(12, 6, 2, 1, 100, 2, separation=3.0, random_state=4)
    a = CLAIREstimator(random_state=0, solver="torch").fit(data.local_estimates)
    b = CLAIREstimator(random_state=0, solver="cvxpy").fit(data.local_estimates)
    assert a.solver_ == "torch" and b.solver_ == "cvxpy"
    np.testing.assert_array_equal(a.contaminated_, b.contaminated_)
    # the attribute's documentation names the values it takes (it promised
    # "cvxpy:<SOLVER>"); the conic solver is in the status
    assert b.decomposition_.status.startswith("SCS: ")
    doc = CLAIREstimator.__doc__.split("    solver_ : str")[1].split("    alpha_,")[0]
    assert '``"torch"``' in doc and '``"cvxpy"``' in doc and "decomposition_.status" in doc


def test_float32_and_float64_inputs_agree(regression):
    X = regression.local_estimates
    a = CLAIREstimator(random_state=0).fit(X.astype(np.float32))
    b = CLAIREstimator(random_state=0, dtype="float32", tol=1e-4).fit(X)
    c = CLAIREstimator(random_state=0).fit(X)
    for est in (a, b):
        np.testing.assert_array_equal(est.contaminated_, c.contaminated_)
        # float32 data carry ~1e-7 relative rounding; refined values are averages of them.
        np.testing.assert_allclose(est.refined_, c.refined_, atol=1e-4 * np.abs(X).max())


def test_list_input_and_2d_input(regression):
    X = regression.local_estimates
    est = CLAIREstimator(random_state=0).fit(list(X))
    assert est.refined_.shape == X.shape
    vectors = X[:, :, 0]
    est2 = CLAIREstimator(random_state=0).fit(vectors)
    assert est2.refined_.shape == vectors.shape
    assert est2.transform(vectors).shape == vectors.shape


def test_a_3d_refit_leaves_no_column_names_of_a_2d_fit():
    """A review: feature_names_in_ of a fit on a 2-D DataFrame stayed after a refit on
    3-D blocks (n_features_in_ went)."""
    import pandas as pd

    rng = np.random.default_rng(0)
    est = CLAIREstimator(random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(pd.DataFrame(rng.standard_normal((10, 3)), columns=["a", "b", "c"]))
        assert list(est.feature_names_in_) == ["a", "b", "c"] and est.n_features_in_ == 3
        est.fit(rng.standard_normal((10, 3, 1)))
    assert not hasattr(est, "feature_names_in_") and not hasattr(est, "n_features_in_")


def test_one_new_client_given_as_a_matrix_is_told_how_to_pass_it(fitted, regression):
    """A (p, q) estimate for a fit on (K, p, q) blocks would be read as p clients of
    q = 1: the message says so and how to pass one client (a review found the shapes
    it named were ones the caller never passed); a q = 1 fit on 3-D blocks still takes
    2-D (n_clients, p) input; an empty batch says it is empty."""
    X = regression.local_estimates
    one = X[3]
    with pytest.raises(ValueError, match=r"X\[None\]"):
        fitted.predict(one)
    assert fitted.predict(one[None]).shape == (1,)
    column = X[:, :, :1]
    narrow = CLAIREstimator(random_state=0).fit(column)
    np.testing.assert_array_equal(narrow.predict(column[:, :, 0]), narrow.predict(column))
    with pytest.raises(ValueError, match=r"X\[None\]"):  # one (p, 1) client
        narrow.predict(column[0])
    with pytest.raises(ValueError, match="empty"):
        fitted.predict([])


def test_clone_pickle_and_params(fitted, regression):
    restored = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(restored.predict(regression.local_estimates),
                                  fitted.predict(regression.local_estimates))
    twin = clone(fitted).set_params(rank=2)
    assert twin.get_params()["rank"] == 2 and not hasattr(twin, "refined_")


def test_summary_formats(fitted):
    summary = fitted.summary()
    assert "CLAIR" in str(summary) and "p-value" in summary.as_text()
    assert "\\begin{" in summary.as_latex()
    markdown = summary.as_markdown()
    assert markdown.count("\n| ") >= len(fitted.contaminated_)


def test_summary_text_rules_are_as_wide_as_its_widest_line(fitted):
    """A review: the header's rules were 99 characters wide and the client table's 106
    (statsmodels draws each table's at its own width)."""
    lines = str(fitted.summary()).split("\n")
    rules = {len(line) for line in lines if line and set(line) <= set("=-")}
    assert rules == {max(map(len, lines))}


def test_summary_reports_the_parameters_the_fit_used(fitted, regression):
    """A review: after set_params the summary showed the new test level and correction
    beside the fit's adjusted p-values and flags; with subspace="row" it showed the
    working (transposed) shape."""
    before = fitted.summary().diagnostics
    assert before["detection"] == "test (fdr_bh, level 0.05)"
    changed = pickle.loads(pickle.dumps(fitted)).set_params(
        test_level=0.2, correction="bonferroni", detection="threshold",
        formulation="exact", backbone=False, subspace="row")
    assert changed.summary().diagnostics == before
    assert before["estimate shape (p, q)"] == "(20, 5)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row = CLAIREstimator(random_state=0, subspace="row").fit(regression.local_estimates)
    assert row.estimate_shape_ == (5, 20)
    assert row.summary().diagnostics["estimate shape (p, q)"] == "(20, 5)"


def test_sample_weight_enters_the_collaborative_mean(regression):
    X = regression.local_estimates
    weights = np.ones(len(X))
    weights[regression.collaborative_set[0]] = 50.0
    a = CLAIREstimator(random_state=0).fit(X, sample_weight=weights)
    b = CLAIREstimator(random_state=0).fit(X)
    assert not np.allclose(a.collaborative_mean_, b.collaborative_mean_)
    with pytest.raises(ValueError, match="sample_weight"):
        CLAIREstimator(random_state=0).fit(X, sample_weight=-weights)


def test_known_noise_scale_is_used(regression):
    est = CLAIREstimator(random_state=0, noise_scale=regression.estimate_noise_scale).fit(
        regression.local_estimates)
    np.testing.assert_allclose(est.client_noise_scale_, regression.estimate_noise_scale)


# ---- bad input --------------------------------------------------------------------
def test_nan_names_the_client(regression):
    X = regression.local_estimates.copy()
    X[4, 0, 0] = np.nan
    X[7, 1, 1] = np.inf
    with pytest.raises(ValueError, match=r"NaN or infinite.*\[4, 7\]"):
        CLAIREstimator(random_state=0).fit(X)


@pytest.mark.parametrize("bad,match", [
    ([np.ones((3, 2)), np.ones((3, 3))], "ragged"),
    (np.ones((1, 3, 2)), "at least 2 clients"),
    (np.array([["a", "b"], ["c", "d"]]), "numeric|dtype|convert"),
    (np.ones((2, 3, 2, 2)), "dimension 4"),
    ([], "empty|at least 2"),
])
def test_malformed_input(bad, match):
    with pytest.raises(ValueError, match=match):
        CLAIREstimator(random_state=0).fit(bad)


def test_rank_above_the_maximum(regression):
    with pytest.raises(ValueError, match="exceeds min"):
        CLAIREstimator(random_state=0, rank=21).fit(regression.local_estimates)


@pytest.mark.parametrize("params", [{"alpha": -1.0}, {"beta": "big"}, {"solver": "magic"},
                                    {"test_level": 1.5}, {"correction": "nope"},
                                    {"detection": "vote"}, {"noise_scale": -1.0}])
def test_bad_parameters(params, regression):
    with pytest.raises(ValueError):
        CLAIREstimator(random_state=0, **params).fit(regression.local_estimates)


def test_wrong_shape_at_predict(fitted):
    with pytest.raises(ValueError, match="fitted on"):
        fitted.predict(np.ones((2, 3, 3)))


def test_missing_optional_dependency_is_named(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_cvxpy(name, *args, **kwargs):
        if name == "cvxpy":
            raise ImportError("no cvxpy here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cvxpy)
    with pytest.raises(ImportError, match=r"clairstat\[cvxpy\]"):
        CLAIREstimator(random_state=0, solver="cvxpy").fit(np.random.default_rng(0).standard_normal((4, 3, 2)))


def test_convergence_warning_when_iterations_run_out(regression):
    from sklearn.exceptions import ConvergenceWarning
    with pytest.warns(ConvergenceWarning):
        est = CLAIREstimator(random_state=0, max_iter=1, tol=1e-14).fit(regression.local_estimates)
    assert not est.converged_


def test_threshold_detection_fits_on_the_reported_set(regression):
    """The mean and subspace come from exactly the clients reported collaborative."""
    X = regression.local_estimates
    weights = np.arange(1.0, len(X) + 1)
    est = CLAIREstimator(random_state=0, detection="threshold").fit(X, sample_weight=weights)
    members = est.collaborative_set_
    expected = np.tensordot(weights[members] / weights[members].sum(), X[members], axes=1)
    np.testing.assert_allclose(est.collaborative_mean_, expected, rtol=1e-12)


def test_members_and_outsiders_are_tested_on_the_same_footing():
    """Under the null, members' out-of-sample statistics match the outsiders' on average.

    In-sample (mean and subspace fitted with the member) they are smaller by the mean's
    share and what the subspace absorbs: 15% here (measured), the bias the refits remove.
    """
    from clairstat._detection import (_fit_on, out_of_sample_statistics,
                                      projection_statistics)
    in_ratio, out_ratio = [], []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        basis = np.linalg.qr(rng.standard_normal((30, 3)))[0]
        blocks = basis @ rng.standard_normal((60, 3, 4)) + rng.standard_normal((60, 30, 4))
        weights, members = np.ones(60), np.arange(60) < 30
        mean, fitted = _fit_on(blocks, weights, members, 3, np.ones(60), 0)
        inside = projection_statistics(blocks, mean, fitted)
        outside = out_of_sample_statistics(blocks, weights, members, mean, fitted, 0)[0]
        in_ratio.append(inside[members].mean() / inside[~members].mean())
        out_ratio.append(outside[members].mean() / outside[~members].mean())
    # Each ratio of two means of 30 chi^2_108 / 108 has sd ~ sqrt(2 * 2 / (30 * 108)) =
    # 3.5%; over 20 seeds the average has sd ~0.8%: 3 sd is 2.4%.
    assert abs(np.mean(out_ratio) - 1) < 0.024
    assert np.mean(in_ratio) < 1 - 0.05


def test_summary_rounds_and_bounds_tiny_p_values(fitted):
    table = fitted.summary().clients
    flagged = fitted.contaminated_ & (fitted.p_values_ < 1e-16)
    assert flagged.any()
    assert set(table["p-value"][flagged]) == {"<1e-16"}
    assert "0.0000" not in fitted.summary().as_text()


@pytest.mark.parametrize("formulation", ["exact", "penalized"])
def test_objective_and_history_are_in_the_data_units(formulation):
    """The estimator fits data scaled to unit size and scales the result back: the
    exact program's objective and gap are of degree 1 in the data, the penalized one's
    of degree 2 (a review: an exact fit's objective_ was the returned point's times the
    data's largest entry, 763 849 for 3 185), and the history is scaled with them."""
    from clairstat import objective

    rng = np.random.default_rng(0)
    X = 100 * rng.standard_normal((12, 6, 3))
    est = CLAIREstimator(formulation=formulation, random_state=0).fit(X)
    res = est.decomposition_
    if formulation == "exact":
        stacked = np.concatenate(list(res.low_rank), axis=1)
        value = (np.linalg.svd(stacked, compute_uv=False).sum() + res.lam * np.linalg.norm(
            X - res.backbone - res.low_rank, axis=(1, 2)).sum())
    else:
        value = objective(X, res.backbone, res.low_rank, res.sparse, alpha=res.alpha,
                          beta=res.beta)
    # float64 evaluations of one point, one by the solver and one here: round-off only
    assert est.objective_ == pytest.approx(value, rel=1e-10)
    assert res.history[-1]["objective"] == pytest.approx(est.objective_, rel=1e-12)
    assert res.history[-1]["gap"] == pytest.approx(est.dual_gap_, rel=1e-12, abs=0)


@pytest.mark.parametrize("n_clients", [8, 12])
def test_new_clients_of_a_small_fit_without_covariance_get_a_warning(n_clients):
    """Below FEW_CLIENTS_NEW training clients a fit without a covariance tests new
    clients liberally (0.09 of benign ones flagged at eight clients, level 0.05,
    benchmarks/new_client_level.py) where the fit itself did not warn: predict says so
    for new rows only, and not with a known noise scale."""
    from clairstat._estimator import FEW_CLIENTS_ESTIMATED, FEW_CLIENTS_NEW
    from clairstat.datasets import make_low_rank_block_sparse

    assert FEW_CLIENTS_ESTIMATED <= 8 < FEW_CLIENTS_NEW <= 12
    data = make_low_rank_block_sparse(n_clients + 1, 5, 2, 1, 0, noise_level=0.3,
                                      random_state=0)
    train, new = data.local_estimates[:n_clients], data.local_estimates[n_clients:]
    for noise_scale in (None, 0.3):
        est = CLAIREstimator(random_state=0, noise_scale=noise_scale)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            est.fit(train)
            est.predict(train)  # the training clients: their fitted tests
            if noise_scale is not None or n_clients >= FEW_CLIENTS_NEW:
                est.predict(new)
                continue
        with pytest.warns(UserWarning, match=f"fit of {n_clients} clients without a "
                                             "covariance: their test is liberal"):
            est.predict(new)


def test_the_text_summary_fits_a_terminal():
    """The text report was 154 columns wide: the noise model's and the null
    calibration's long values in the two-column block stretched every column of the
    client table (a review). They are notes under the tables now, whole."""
    data = make_federated_regression(n_clients=12, p=6, q=2, rank=1, n_samples=100,
                                     n_contaminated=2, random_state=0)
    est = CLAIREstimator(random_state=0).fit(data.local_estimates,
                                             sample_weight=data.n_samples)
    lines = str(est.summary()).splitlines()
    assert max(map(len, lines)) <= 100
    notes = [line for line in lines if line.startswith(("noise model: ",
                                                        "null calibration: "))]
    assert len(notes) == 2 and notes[1].endswith(")")  # one line each, not wrapped
    for text in (est.summary().as_latex(), est.summary()._repr_html_()):
        assert "null calibration: " in text and "noise model: " in text


def test_the_latex_summary_compiles_with_its_notes(tmp_path):
    """The notes under the tables ("noise model: noise_scale") reached LaTeX with a bare
    ``_``, which statsmodels escapes in its cells and not in its notes: pdflatex stopped
    (a review). Every special character of a note is escaped; where pdflatex is
    installed the report compiles."""
    import re
    import shutil
    import subprocess

    data = make_federated_regression(n_clients=12, p=6, q=2, rank=1, n_samples=100,
                                     n_contaminated=2, random_state=0)
    est = CLAIREstimator(random_state=0, noise_scale=0.05).fit(data.local_estimates)
    latex = est.summary().as_latex()
    notes = [line for line in latex.splitlines() if line.startswith(("noise model",
                                                                     "null calibration"))]
    assert len(notes) == 2 and "noise\\_scale" in notes[0]
    assert not any(re.search(r"(?<!\\)[_%&#$]", note) for note in notes)
    if shutil.which("pdflatex") is None:
        return
    (tmp_path / "s.tex").write_text("\\documentclass{article}\\usepackage{booktabs}"
                                    "\\begin{document}" + latex + "\\end{document}\n")
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error",
                           "s.tex"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]

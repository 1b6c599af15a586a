"""A statistician's review on real data (statsmodels' and scikit-learn's datasets):
each test is a defect the review demonstrated, failing before its fix."""

import warnings

import numpy as np
import pytest

from clairstat import local_ols

pd = pytest.importorskip("pandas")
sm = pytest.importorskip("statsmodels.api")
patsy = pytest.importorskip("patsy")


def _fair():
    return sm.datasets.fair.load_pandas().data


def test_patsy_design_matrices_are_matched_by_their_column_names():
    """A review: ``dmatrices``' design matrices (ndarrays carrying their names in
    ``design_info``, which statsmodels reads) were taken as unnamed arrays and stacked
    by position. Two sites each lacking one level of ``C(religious)`` have dummies for
    different levels in the same positions: the stack mixed them silently, and the
    names became x0, x1, ..."""
    fair = _fair()
    formula = "affairs ~ age + C(religious)"
    y_a, x_a = patsy.dmatrices(formula, fair[fair.religious != 2].iloc[:300])
    y_b, x_b = patsy.dmatrices(formula, fair[fair.religious != 3].iloc[:300])
    assert x_a.design_info.column_names != x_b.design_info.column_names
    with pytest.raises(ValueError, match=r"client 1's design has columns .*T\.2\.0.*"
                                         r"every client needs the same columns"):
        local_ols([x_a, x_b], [y_a, y_b])

    # the same names in another order are realigned, as data frames' are, and named
    sites = np.array_split(np.random.default_rng(0).permutation(len(fair)), 4)
    straight = "affairs + rate_marriage ~ age + yrs_married + children"
    turned = "rate_marriage + affairs ~ children + age + yrs_married"
    mats = [patsy.dmatrices(turned if k % 2 else straight, fair.iloc[rows])
            for k, rows in enumerate(sites)]
    ols = local_ols([x for _, x in mats], [y for y, _ in mats])
    assert ols.feature_names == ["Intercept", "age", "yrs_married", "children"]
    assert ols.output_names == ["affairs", "rate_marriage"]
    assert ols.generated_names == (False, False)
    for k, rows in enumerate(sites):  # each client against statsmodels' own fit
        frame = fair.iloc[rows]
        fit = sm.OLS(frame["affairs"], sm.add_constant(
            frame[["age", "yrs_married", "children"]])).fit()
        np.testing.assert_allclose(ols.estimates[k, :, 0], fit.params.to_numpy(),
                                   rtol=1e-10, atol=1e-12)


def test_one_table_is_not_read_as_clients():
    """A review: ``local_ols(X, Y)`` on one dataset (scikit-learn's linnerud, 20 x 3)
    read the 2-D design row by row, each row a client: it returned 20 "clients" of 3
    samples and one covariate without complaint. As data frames it failed inside the
    conversion, reading the column labels as data ("could not convert string to float:
    'Chins'")."""
    datasets = pytest.importorskip("sklearn.datasets")
    linnerud = datasets.load_linnerud(as_frame=True)
    x, y = linnerud.data, linnerud.target
    for designs, responses in ((x.to_numpy(), y.to_numpy()), (x, y), ([x], y)):
        with pytest.raises(ValueError, match=r"is one table of shape \(20, 3\), not one "
                                             r"(design|response) per client"):
            local_ols(designs, responses)
    # one client as a list of one, and K clients as a 3-D array with 2-D responses
    # (20 rows: fewer than 20 residual degrees of freedom, which local_ols says)
    with pytest.warns(UserWarning, match="fewer than 20 residual degrees of freedom"):
        one = local_ols([sm.add_constant(x)], [y])
    assert one.estimates.shape == (1, 4, 3)
    assert one.feature_names == ["const", "Chins", "Situps", "Jumps"]
    with pytest.warns(UserWarning, match="fewer than 20 residual degrees of freedom"):
        stacked = local_ols(np.stack([x.to_numpy()] * 2),
                            np.stack([y["Weight"].to_numpy()] * 2))
    assert stacked.estimates.shape == (2, 3, 1)


def test_a_categorical_column_with_numeric_categories_is_not_fitted_as_a_slope():
    """A review: a column the analyst declared a factor (``astype("category")``) was
    fitted as one numeric covariate whenever its categories were numbers (anes96's
    party identification, coded 0-6), while string categories were refused with the
    advice to encode them: the declared factor became a slope, silently."""
    anes = sm.datasets.anes96.load_pandas().data
    sites = dict(list(anes.groupby("educ"))[2:])
    designs = {e: sm.add_constant(d[["age", "income"]]).assign(
        party=d["PID"].astype("category")) for e, d in sites.items()}
    responses = {e: d["selfLR"] for e, d in sites.items()}
    with pytest.raises(TypeError, match=r"client \"3.0\"'s design has categorical columns "
                                         r"\['party'\].*get_dummies"):
        local_ols(designs, responses)
    outcome = {e: y.astype("category") for e, y in responses.items()}
    with pytest.raises(TypeError, match=r"response has categorical columns \['selfLR'\]"):
        local_ols({e: x.drop(columns="party") for e, x in designs.items()}, outcome)
    # encoded, or converted on purpose, it is fitted
    numeric = local_ols({e: x.astype({"party": float}) for e, x in designs.items()},
                        responses)
    assert numeric.feature_names == ["const", "age", "income", "party"]


def test_a_factor_stored_as_text_is_not_fitted_as_a_slope():
    """A review: a column of numbers stored as text ("1", "2", "3": a region or a zip
    code read from a file) was parsed by numpy and fitted as one slope, object and
    pandas' string dtype alike, while categorical columns were refused. Now text is
    refused wherever it is (a column, a Series, a text array), numbers held as Python
    objects are not, and a date column's error speaks of dates."""
    import pandas as pd

    rng = np.random.default_rng(0)
    n = 40
    x, y = rng.standard_normal(n), rng.standard_normal((n, 2))
    codes = rng.choice(["1", "2", "3"], n)
    for column in (codes, pd.array(codes, dtype="string")):
        design = pd.DataFrame({"const": 1.0, "x": x, "region": column})
        with pytest.raises(TypeError, match=r"client 0's design has text columns "
                                             r"\['region'\].*get_dummies.*to_numeric"):
            local_ols([design] * 5, [y] * 5)
    for text in (str, np.dtypes.StringDType()):  # numpy's fixed and variable width
        with pytest.raises(TypeError, match="client 0's design holds text"):
            local_ols([np.c_[np.ones(n), x].astype(str).astype(text)] * 5, [y] * 5)
    with pytest.raises(TypeError, match="client 0's response holds text"):
        local_ols([np.c_[np.ones(n), x]] * 5, [pd.Series(codes)] * 5)
    rows = [("1", str(v)) for v in x]  # csv.reader's rows: text, parsed by numpy
    with pytest.raises(TypeError, match="client 0's design holds text"):
        local_ols([rows] * 5, [y] * 5)

    class OtherFrame:  # another library's frame (polars): dtypes without numpy's .kind
        columns, dtypes = ["const", "x"], ["Float64", "Float64"]

        def __array__(self, dtype=None, copy=None):
            table = np.c_[np.ones(n), x]
            return table if dtype is None else table.astype(dtype)

    assert local_ols([OtherFrame()] * 5, [y] * 5).estimates.shape == (5, 2, 2)
    dates = pd.DataFrame({"const": 1.0, "x": x, "day": pd.date_range("2020", periods=n)})
    with pytest.raises(TypeError, match=r"\['day'\]: dates and durations are not numbers"):
        local_ols([dates] * 5, [y] * 5)
    as_objects = local_ols([np.c_[np.ones(n), x].astype(object)] * 5, [y] * 5)
    assert np.allclose(as_objects.estimates, local_ols([np.c_[np.ones(n), x]] * 5,
                                                       [y] * 5).estimates, rtol=0, atol=0)
    converted = pd.DataFrame({"const": 1.0, "x": x, "region": pd.to_numeric(codes)})
    assert local_ols([converted] * 5, [y] * 5).estimates.shape == (5, 3, 2)


def test_complex_data_are_refused_not_truncated():
    """A review: ``local_ols`` dropped the imaginary part of complex responses (numpy's
    ComplexWarning only), while the estimator refuses complex estimates."""
    rng = np.random.default_rng(3)
    designs = [np.c_[np.ones(40), rng.standard_normal((40, 2))] for _ in range(3)]
    responses = [x @ np.ones(3) + rng.standard_normal(40) + 1j * rng.standard_normal(40)
                 for x in designs]
    with pytest.raises(ValueError, match="Complex data not supported: client 0's response"):
        local_ols(designs, responses)
    with pytest.raises(ValueError, match="Complex data not supported: client 0's design"):
        local_ols([pd.DataFrame(x + 0j) for x in designs], [r.real for r in responses])
    with pytest.raises(ValueError, match="Complex data not supported: client 0's weights"):
        local_ols(designs, [r.real for r in responses], weights=[np.ones(40) + 0j] * 3)


def _grunfeld_ols(value_unit):
    """Grunfeld's ten firms (statsmodels), each its own regression of investment on the
    firm's value (in ``value_unit`` times its units) and capital."""
    data = sm.datasets.grunfeld.load_pandas().data
    firms = data.groupby("firm")
    return local_ols({f: sm.add_constant(d[["value", "capital"]] * [value_unit, 1])
                      for f, d in firms}, {f: d["invest"] for f, d in firms})


@pytest.mark.parametrize("rank", [0, 1])
def test_a_covariates_units_do_not_move_the_known_covariance_tests(rank):
    """A review: with ``noise_cov``, the firm value in thousands instead of millions
    flagged two of Grunfeld's firms (none in millions; p-values moved up to e^4.1
    fold): each OLS covariance was normalised by its largest variance and its
    eigenvalues floored at 1e-12 of the largest, and in thousands the coefficients'
    variances span more than that, so the floor cut the value's. Now normalised as a
    correlation, which a covariate's units do not change."""
    from clairstat import CLAIREstimator

    fits = [CLAIREstimator(rank=rank, random_state=0).fit(_grunfeld_ols(unit))
            for unit in (1.0, 1e3, 1e-3, 1e6)]
    for fit in fits[1:]:
        assert np.array_equal(fit.contaminated_, fits[0].contaminated_)
        # Measured: the statistics agree to 4e-14 relative; the units enter only through
        # diagonal scalings, removed exactly up to the rounding of eigendecompositions of
        # whitened factors (condition numbers up to ~1e4 here): 1e-9 leaves margin.
        np.testing.assert_allclose(fit.test_statistics_, fits[0].test_statistics_, rtol=1e-9)
        np.testing.assert_allclose(fit.p_values_, fits[0].p_values_, rtol=1e-9)


def test_a_hand_built_local_ols_without_covariance_is_refused_clearly():
    """A review: ``LocalOLS(estimates, None, ...)`` (the class is documented as buildable
    by hand) raised ``TypeError: 'NoneType' object is not subscriptable``."""
    from clairstat import CLAIREstimator, LocalOLS

    ols = _grunfeld_ols(1.0)
    bare = LocalOLS(ols.estimates, None, ols.n_samples, ols.residual_df)
    with pytest.raises(ValueError, match="noise_cov is None.*pass X.estimates"):
        CLAIREstimator().fit(bare)
    # and it is cut into clients as any LocalOLS (it raised TypeError, a review)
    assert len(bare[[0, 1]]) == 2 and bare[0].noise_cov is None


def test_an_object_array_of_ragged_estimates_names_the_client():
    """A review: a 1-D object array of per-client blocks of different shapes got numpy's
    "setting an array element with a sequence" (the same blocks as a list are named)."""
    from clairstat import CLAIREstimator

    blocks = np.empty(4, dtype=object)
    for k, shape in enumerate([(3, 2), (2, 2), (3, 2), (3, 2)]):
        blocks[k] = np.zeros(shape)
    with pytest.raises(ValueError, match="ragged estimates: client 0 has shape .3, 2. but "
                                         "client 1 has .2, 2."):
        CLAIREstimator().fit(blocks)
    rng = np.random.default_rng(0)
    for k in range(4):
        blocks[k] = rng.standard_normal((3, 2))
    assert CLAIREstimator(rank=0, random_state=0).fit(blocks).estimate_shape_ == (3, 2)


@pytest.mark.parametrize("design_unit, response_unit, fits", [
    (1e100, 1e100, True), (1e-100, 1e-100, True), (1e150, 1.0, True), (1.0, 1e-150, True),
    (1e155, 1.0, False), (1e-165, 1.0, False), (1.0, 1e160, False), (1.0, 1e-160, False)])
def test_local_ols_follows_the_units_or_says_they_leave_float64s_range(
        design_unit, response_unit, fits):
    """A review: designs times 1e155 or 1e-165 were refused as "zero columns" (every
    column named), responses times 1e170 gave overflow warnings and then a "no residual
    variance" error, and times 1e160 a covariance of inf, silently. OLS is equivariant:
    the estimates scale as response / design and the covariances as their squares,
    or, where those leave float64's range, a ValueError says so."""
    rng = np.random.default_rng(0)
    designs = [np.c_[np.ones(40), rng.standard_normal((40, 2))] for _ in range(6)]
    responses = [x @ np.ones((3, 2)) + rng.standard_normal((40, 2)) for x in designs]
    base = local_ols(designs, responses)
    scaled = ([x * design_unit for x in designs], [y * response_unit for y in responses])
    if not fits:
        with pytest.raises(ValueError, match="outside float64's range.*other units"):
            local_ols(*scaled)
        return
    ols = local_ols(*scaled)
    # Powers of two scale exactly; the units themselves round once per entry (and the
    # covariances' twice): 1e-12 relative is far above that and far below any effect.
    ratio = response_unit / design_unit
    np.testing.assert_allclose(ols.estimates / ratio, base.estimates, rtol=1e-12, atol=0)
    np.testing.assert_allclose(ols.noise_cov[0] * design_unit ** 2, base.noise_cov[0],
                               rtol=1e-12, atol=0)
    np.testing.assert_allclose(ols.noise_cov[1] / response_unit ** 2, base.noise_cov[1],
                               rtol=1e-12, atol=0)


def test_a_hand_built_local_ols_is_checked_when_it_is_made():
    """A review: shared (p, p) and (q, q) covariances (which ``fit(noise_cov=...)``
    takes) failed inside the fit with numpy's AxisError, feature names of the wrong
    length reached the summary, and estimates given as a list fitted but could not be
    indexed."""
    from clairstat import CLAIREstimator, LocalOLS

    ols = _grunfeld_ols(1.0)
    k, p, q = ols.estimates.shape
    shared = LocalOLS(list(ols.estimates), (ols.noise_cov[0][0], ols.noise_cov[1][0]),
                      ols.n_samples, ols.residual_df)
    assert shared.noise_cov[0].shape == (k, p, p) and shared.noise_cov[1].shape == (k, q, q)
    assert len(shared[[0, 1]]) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        CLAIREstimator(rank=0, random_state=0).fit(shared)
    with pytest.raises(ValueError, match=r"feature_names has 1 names for \d+ coefficients"):
        LocalOLS(ols.estimates, ols.noise_cov, ols.n_samples, ols.residual_df, ["a"])
    with pytest.raises(ValueError, match=r"row_cov has shape"):
        LocalOLS(ols.estimates, (ols.noise_cov[0][:, :1], ols.noise_cov[1]), ols.n_samples,
                 ols.residual_df)
    with pytest.raises(ValueError, match=r"n_samples has shape"):
        LocalOLS(ols.estimates, ols.noise_cov, ols.n_samples[:2], ols.residual_df)
    with pytest.raises(ValueError, match=r"estimates have shape \(n_clients, p, q\)"):
        LocalOLS(ols.estimates[0], ols.noise_cov, ols.n_samples, ols.residual_df)


def test_a_new_client_far_off_scores_the_floor_not_minus_infinity():
    """A review: a training client's log p-value is floored at log(tiny) = -708.4, a new
    client's was -inf where the null is a chi-square (scipy's logsf underflows; a known
    noise scale, or a covariance whose calibration kept the factor), and
    ``roc_auc_score`` of held-out clients refused it."""
    from sklearn.metrics import roc_auc_score

    from clairstat import CLAIREstimator

    rng = np.random.default_rng(0)
    estimates = rng.standard_normal((12, 5, 2))
    est = CLAIREstimator(rank=0, noise_scale=1.0, random_state=0).fit(estimates)
    far = estimates[:2] + 1e4
    scores = est.score_samples(far)
    assert np.all(scores == np.log(np.finfo(float).tiny)), scores
    new = np.concatenate([far, estimates[:2] + 1e-3])
    assert roc_auc_score([0, 0, 1, 1], est.decision_function(new)) == 1.0


def test_labelled_per_client_tables_are_read_by_their_labels():
    """A review: ``fit([res.params for res in fits])`` with statsmodels' multi-output
    fits read each (p, q) table by position; a site whose design had its columns in
    another order was flagged at p = 0 and was -1 as a new client. A mapping and a
    pandas Series of tables gave numpy's or scikit-learn's messages."""
    pd = pytest.importorskip("pandas")
    from clairstat import CLAIREstimator

    rng = np.random.default_rng(0)
    names, outputs = ["const", "age", "educ", "income"], ["y1", "y2"]
    truth = rng.standard_normal((4, 2))
    tables = [pd.DataFrame(truth + 0.05 * rng.standard_normal((4, 2)), index=names,
                           columns=outputs) for _ in range(12)]
    tables[5] = tables[5].loc[names[::-1], outputs[::-1]]  # another order, same numbers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = CLAIREstimator(rank=0, random_state=0).fit(tables)
        aligned = CLAIREstimator(rank=0, random_state=0).fit(
            [table.loc[names, outputs].to_numpy() for table in tables])
    np.testing.assert_array_equal(est.p_values_, aligned.p_values_)
    assert est.predict([tables[5]]) == aligned.predict([tables[5].loc[names, outputs]])
    with pytest.raises(ValueError, match="client 1's estimate is labelled"):
        est.predict([tables[0], tables[1].rename(index={"age": "AGE"})])
    with pytest.raises(ValueError, match="client 2's estimate is not a data frame"):
        est.fit([tables[0], tables[1], tables[2].to_numpy()] + tables[3:])
    with pytest.raises(TypeError, match="local_estimates is a mapping"):
        est.fit(dict(enumerate(tables)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        series = CLAIREstimator(rank=0, random_state=0).fit(pd.Series(tables))
    np.testing.assert_array_equal(series.p_values_, aligned.p_values_)


def test_labelled_estimates_in_another_order_with_a_positional_covariance_are_refused():
    """A review of the realignment: a site sending its ``params`` and ``cov_params()``
    in its own order had its estimate realigned and its covariance read by position
    (the null's scale factor moved 1.15 -> 1.72); single-output ``params`` (pandas
    Series) were still read by position."""
    pd = pytest.importorskip("pandas")
    from clairstat import CLAIREstimator

    rng = np.random.default_rng(1)
    names = ["const", "age", "educ"]
    truth = rng.standard_normal(3)
    series = [pd.Series(truth + 0.05 * rng.standard_normal(3), index=names)
              for _ in range(10)]
    moved = list(series)
    moved[4] = series[4].loc[names[::-1]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = CLAIREstimator(rank=0, random_state=0).fit(moved)
        plain = CLAIREstimator(rank=0, random_state=0).fit(
            np.stack([s.loc[names].to_numpy() for s in series]))
    np.testing.assert_array_equal(est.p_values_, plain.p_values_)
    np.testing.assert_array_equal(est.score_samples([moved[4]]),
                                  plain.score_samples(series[4].to_numpy()[None]))
    covs = (np.broadcast_to(0.05 ** 2 * np.eye(3), (10, 3, 3)), np.ones((10, 1, 1)))
    frames = [s.to_frame("y") for s in moved]
    with pytest.raises(ValueError, match="noise_cov, read by position, would not follow"):
        CLAIREstimator(rank=0, random_state=0).fit(frames, noise_cov=covs)
    in_order = [s.loc[names].to_frame("y") for s in series]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = CLAIREstimator(rank=0, random_state=0).fit(in_order, noise_cov=covs)
    with pytest.raises(ValueError, match="would not follow"):
        fitted.score_samples([frames[4]], noise_cov=(covs[0][:1], covs[1][:1]))


def test_a_fit_on_factored_blocks_forgets_an_earlier_fit_s_labels():
    """The labels of a fit on data frames outlived a refit on a FactoredBlocks stack:
    new clients' tables were then checked against the earlier fit's labels. Found on
    the way: after a fit on a stack, dense new clients were refused against the
    factors' (p, r) and then crashed on the stack's mean; ``estimate_shape_`` is the
    updates' (p, t)."""
    pd = pytest.importorskip("pandas")
    from clairstat import CLAIREstimator
    from clairstat._reduced import FactoredBlocks

    rng = np.random.default_rng(2)
    tables = [pd.DataFrame(rng.standard_normal((3, 2)), index=list("abc"),
                           columns=["y1", "y2"]) for _ in range(8)]
    rights = np.stack([np.linalg.qr(rng.standard_normal((6, 4)))[0].T for _ in range(8)])
    stack = FactoredBlocks(rng.standard_normal((8, 10, 4)), rights)
    est = CLAIREstimator(rank=1, backbone=False, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(tables)
        est.fit(stack)
        assert est.estimate_shape_ == (10, 6)
        new = [pd.DataFrame(rng.standard_normal((10, 6))) for _ in range(2)]
        assert est.predict(new).shape == (2,)


def test_labelled_new_clients_are_matched_to_the_fit_s_labels_whatever_their_kind():
    """A review: fitted on one-column frames, new clients given as Series (or the
    reverse) were aligned to the first new table's order: a reversed Series scored
    -50 instead of its in-order -0.16, and other labels were accepted."""
    pd = pytest.importorskip("pandas")
    from clairstat import CLAIREstimator

    rng = np.random.default_rng(3)
    names = ["const", "age", "educ"]
    truth = np.array([5.0, 0.0, -5.0])
    series = [pd.Series(truth + 0.05 * rng.standard_normal(3), index=names)
              for _ in range(10)]
    new = pd.Series(truth, index=names)
    for fitted_on, given in (([s.to_frame("y") for s in series], new),
                             (series, new.to_frame("y"))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est = CLAIREstimator(rank=0, random_state=0).fit(fitted_on)
        in_order = est.score_samples([given])
        reversed_ = given.loc[names[::-1]]
        np.testing.assert_array_equal(est.score_samples([reversed_]), in_order)
        with pytest.raises(ValueError, match="the fitted clients'"):
            est.score_samples([given.rename(index=dict(zip(names, "xyz")))])


def test_transform_and_equality_on_the_paths_the_fixes_opened():
    """A review of the fixes: after a fit on a FactoredBlocks stack ``transform`` of
    dense new clients crashed on the stack's mean (predict worked); a LocalOLS without
    a covariance, now indexable, crashed ``score_samples`` and ``==``."""
    from clairstat import CLAIREstimator, LocalOLS
    from clairstat._reduced import FactoredBlocks

    rng = np.random.default_rng(2)
    rights = np.stack([np.linalg.qr(rng.standard_normal((6, 4)))[0].T for _ in range(8)])
    stack = FactoredBlocks(rng.standard_normal((8, 10, 4)), rights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = CLAIREstimator(rank=1, backbone=False, random_state=0).fit(stack)
    new = rng.standard_normal((2, 10, 6))
    refined = est.transform(new)
    assert refined.shape == new.shape and np.all(np.isfinite(refined))

    ols = _grunfeld_ols(1.0)
    bare = LocalOLS(ols.estimates, None, ols.n_samples, ols.residual_df)
    assert bare == bare[:] and not bare == ols
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = CLAIREstimator(rank=0, random_state=0).fit(ols)
    with pytest.raises(ValueError, match="noise_cov is None"):
        fitted.score_samples(bare[:2])


def _fair_sites(n_sites=10, seed=0):
    fair = _fair()
    sites = np.array_split(np.random.default_rng(seed).permutation(len(fair)), n_sites)
    covariates = ["age", "yrs_married", "children", "religious"]
    return local_ols([sm.add_constant(fair.iloc[s][covariates]) for s in sites],
                     [fair.iloc[s][["affairs", "rate_marriage"]] for s in sites])


def test_set_params_after_a_fit_does_not_change_what_new_clients_may_be():
    """A review: ``set_params(noise_scale=...)`` after a ``noise_cov`` fit made
    ``predict(LocalOLS)`` refuse the fit's own kind of input (the live parameter was
    read, not the fit's noise model), while every other parameter changed after a fit
    is ignored in favour of the fitted one."""
    from clairstat import CLAIREstimator

    ols = _fair_sites()
    est = CLAIREstimator(random_state=0).fit(ols)
    before = (est.predict(ols), est.score_samples(ols), est.transform(ols))
    est.set_params(noise_scale=0.5)
    after = (est.predict(ols), est.score_samples(ols), est.transform(ols))
    for old, new in zip(before, after):
        np.testing.assert_array_equal(old, new)


def test_a_list_of_local_ols_is_refused_with_what_to_pass():
    """A review: ``fit([ols_a, ols_b])`` failed deep in numpy ("setting an array element
    with a sequence ... maximum number of dimension of 64")."""
    from clairstat import CLAIREstimator

    ols = _fair_sites()
    with pytest.raises(TypeError, match="list of LocalOLS; pass one LocalOLS"):
        CLAIREstimator().fit([ols[0], ols[1], ols[2]])
    est = CLAIREstimator(random_state=0).fit(ols)
    for method in (est.predict, est.score_samples, est.transform):
        with pytest.raises(TypeError, match="tuple of LocalOLS"):
            method((ols[0],))


def test_a_p_value_is_recomputed_from_its_summary_row():
    """A review: with an estimated scale the null is an F whose second df, and the
    per-client null scale, the summary showed nowhere; its p-values could not be
    reproduced from the table (a chi^2 on its statistic and df gave another value)."""
    from scipy import stats

    from clairstat import CLAIREstimator

    est = CLAIREstimator(random_state=0).fit(_fair_sites())
    summary = est.summary()
    line = summary.diagnostics["null calibration"]
    rows = summary.clients
    for k in range(len(rows)):
        stat, scale, df = (float(rows.iloc[k][c]) for c in ("statistic", "null scale", "df"))
        if est.null_kind_ == "F":
            assert f"~ F(df, {est.null_scale_df_:.4g})" in line
            p_value = stats.f.sf(stat / (scale * df), df, est.null_scale_df_)
        else:
            assert "~ chi^2(df)" in line
            p_value = stats.chi2.sf(stat / scale, df)
        # the row's statistic, scale and df carry four significant digits: the
        # recomputed p-value agrees to about a per cent of itself
        assert p_value == pytest.approx(est.p_values_[k], rel=0.02, abs=1e-3)
        # df as the other columns, four significant digits (a review read "202" for
        # 202.11); the fair sites' df are not integers
        assert rows.iloc[k]["df"] == f"{est.degrees_of_freedom_[k]:.4g}"
    assert any(float(v) != round(float(v)) for v in rows["df"])


def _one_direction_sites(seed, bad=(), shift=0.8, n_clients=12, n=80, p=4, q=2):
    """Simulated sites sharing one direction; ``bad`` sites shifted at random."""
    rng = np.random.default_rng(seed)
    shared = np.linalg.qr(rng.standard_normal((p, 1)))[0]
    base = rng.standard_normal((p, q))
    designs, responses = [], []
    for k in range(n_clients):
        X = np.c_[np.ones(n), rng.standard_normal((n, p - 1)) * (1 + k % 3)]
        coef = base + shared @ rng.standard_normal((1, q)) * 0.5
        if k in bad:
            coef = coef + shift * rng.standard_normal((p, q))
        designs.append(X)
        responses.append(X @ coef + rng.standard_normal((n, q)) * (1 + 0.3 * (k % 2)))
    return local_ols(designs, responses)


def test_a_rank_kept_only_at_an_understated_noise_is_warned_about():
    """A review: with ``row_cov`` halved the rank rule kept a second direction, the one
    contaminated client pushed, whose test then gave p = 0.52 (9e-7 with the right
    covariance), silently: the calibration had measured the noise at 2.2 times the
    given, below the factor-4 warning. The rule rerun at the calibrated noise keeps one
    direction, and the fit says so."""
    from clairstat import CLAIREstimator

    ols = _one_direction_sites(seed=1, bad=(0,))
    row, col = ols.noise_cov
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        right = CLAIREstimator(random_state=0).fit(ols)
    assert right.contaminated_[0] and right.rank_ == 1
    assert not any("at that noise" in str(w.message) for w in caught)
    with pytest.warns(UserWarning, match=r"keeps 1 shared direction\(s\), not 2.*rank=1"):
        halved = CLAIREstimator(random_state=0).fit(
            ols.estimates, sample_weight=ols.n_samples, noise_cov=(0.5 * row, col))
    assert halved.rank_ == 2 and not halved.contaminated_[0]
    assert 1.0 < halved.null_scale_factor_ < 4.0  # below the large-factor warning


def test_no_rank_warning_where_the_shared_direction_is_real():
    """The negative control of the warning above: simulated sites that share one strong
    direction, nothing corrupted, the right covariance: no warning over ten seeds."""
    from clairstat import CLAIREstimator

    for seed in range(10):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            est = CLAIREstimator(random_state=0).fit(_one_direction_sites(seed))
        assert est.rank_ == 1
        assert not any("at that noise" in str(w.message) for w in caught)


def test_one_far_site_among_few_can_pass_for_the_shared_direction():
    """The README's limit of the rank rule, measured (its number had no source, an
    audit): six sites, p = 2 (intercept and slope), one output, one site's intercept 32
    of its standard errors off. The rule keeps that site's direction as the shared one
    in about half of 20 fits, which then do not flag it; ``rank=0`` flags it in all 20.
    With 12 sites the rule keeps no direction and flags it every time."""
    from clairstat import CLAIREstimator

    def fits(n_sites):
        missed = zero_flagged = 0
        for seed in range(20):
            rng = np.random.default_rng(seed)
            designs = [np.c_[np.ones(50), rng.standard_normal(50)] for _ in range(n_sites)]
            ols = local_ols(designs, [x @ [1.0, 2.0] + rng.standard_normal(50)
                                      for x in designs])
            estimates = ols.estimates.copy()
            estimates[0, 0, 0] += 32.0 * np.sqrt(ols.noise_cov[0][0, 0, 0]
                                                 * ols.noise_cov[1][0, 0, 0])
            args = dict(sample_weight=ols.n_samples, noise_cov=ols.noise_cov)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # few clients
                missed += not CLAIREstimator(random_state=0).fit(
                    estimates, **args).contaminated_[0]
                zero_flagged += CLAIREstimator(random_state=0, rank=0).fit(
                    estimates, **args).contaminated_[0]
        return missed, zero_flagged

    missed, zero_flagged = fits(6)
    assert 5 <= missed <= 15 and zero_flagged == 20  # measured: 11 and 20
    missed, zero_flagged = fits(12)
    assert missed == 0 and zero_flagged == 20


def test_a_site_with_fewer_residual_df_than_outputs_is_refused_not_flagged():
    """A site of 8 rows with p = 6 coefficients and q = 3 outputs has a residual
    covariance of rank 2: the test took the noise along the missing output combination
    as zero and flagged the benign site (p-value 0.0 in 11 of 12 fits, a review on
    statsmodels' mvreg data). local_ols warns, the fit and predict refuse it by name,
    and the same data without the covariance fit."""
    from clairstat import CLAIREstimator

    rng = np.random.default_rng(0)
    designs, responses = {}, {}
    for k in range(8):
        n = 8 if k == 0 else 60
        x_mat = np.c_[np.ones(n), rng.standard_normal((n, 5))]
        designs[f"s{k}"] = x_mat
        responses[f"s{k}"] = x_mat @ np.ones((6, 3)) + rng.standard_normal((n, 3))
    with pytest.warns(UserWarning, match=r"clients \"s0\" have fewer residual degrees of "
                                         r"freedom than the 3 outputs \(at least p \+ q = 9"):
        ols = local_ols(designs, responses)
    for call in (lambda: CLAIREstimator(random_state=0).fit(ols),
                 lambda: CLAIREstimator(random_state=0).fit(ols[1:]).predict(ols[:1])):
        with pytest.raises(ValueError, match=r"client\(s\) \"s0\" \(2 residual df\) have "
                                             r"fewer residual degrees of freedom"):
            call()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        est = CLAIREstimator(random_state=0).fit(ols.estimates, sample_weight=ols.n_samples)
    assert len(est.p_values_) == 8
    # one output: n - p >= 1 is enough (the residual variance is a scalar)
    single = local_ols([x for x in designs.values()],
                       [y[:, :1] for y in responses.values()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        CLAIREstimator(random_state=0).fit(single)


def test_a_nearly_collinear_design_is_named_by_local_ols():
    """A column equal to another up to 1e-9 (condition 1e9 of the unit-norm columns)
    passed local_ols silently with coefficients of 1e7; the fit then warned that the
    covariance was "singular", which reads as no noise (a review). local_ols names the
    clients and columns once; a well-conditioned design (a quadratic trend in calendar
    years, condition about 1e5) is not warned about."""
    rng = np.random.default_rng(0)
    designs, responses = [], []
    for _ in range(8):
        x_mat = np.c_[np.ones(60), rng.standard_normal((60, 3))]
        x_mat = np.c_[x_mat, x_mat[:, 1] + 1e-9 * rng.standard_normal(60)]
        designs.append(x_mat)
        responses.append(x_mat[:, :4] @ np.ones((4, 2)) + rng.standard_normal((60, 2)))
    with pytest.warns(UserWarning, match=r"the designs of clients 0 \(x1, x4: ratio "
                                         r"[0-9.e-]+\); 1 .* and 3 more are nearly "
                                         r"collinear") as caught:
        local_ols(designs, responses)
    assert sum("nearly collinear" in str(w.message) for w in caught) == 1
    years = np.arange(1950.0, 2010.0)
    trend = [np.c_[np.ones(60), years, years ** 2, rng.standard_normal(60)]
             for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        local_ols(trend, [x @ np.ones(4) * 1e-4 + rng.standard_normal(60) for x in trend])


def test_new_clients_with_another_kind_of_covariance_get_a_warning():
    """An estimator fitted on HC3 covariances took predict(classical new clients) without
    a word (a review): each client is tested with its own covariance, so the kinds must
    match for the test to mean the same."""
    from clairstat import CLAIREstimator

    rng = np.random.default_rng(1)
    designs = [np.c_[np.ones(40), rng.standard_normal((40, 2))] for _ in range(9)]
    responses = [x @ np.ones((3, 2)) + rng.standard_normal((40, 2)) for x in designs]
    robust = local_ols(designs, responses, cov_type="HC3")
    classical = local_ols(designs, responses)
    est = CLAIREstimator(random_state=0).fit(robust[:8])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        est.predict(robust[8:])
    with pytest.warns(UserWarning, match="new clients' covariances are 'nonrobust' and "
                                         "the fitted clients' 'HC3'"):
        est.predict(classical[8:])


def test_a_site_where_add_constant_skipped_the_intercept_is_told_why():
    """statsmodels' ``add_constant`` adds no intercept to a design that already holds a
    constant column: at a site where a dummy takes one value (a review: griliches76,
    one site all urban) the site's design lacks 'const'. The column mismatch is refused
    as before, and the message now names the cause and ``has_constant='add'``, for
    labelled and for plain designs; a mismatch of another kind gets no such hint."""
    pd = pytest.importorskip("pandas")
    sm = pytest.importorskip("statsmodels.api")
    rng = np.random.default_rng(0)

    def site(dummy_constant):
        frame = pd.DataFrame({"x": rng.standard_normal(30),
                              "d": np.ones(30) if dummy_constant
                              else rng.integers(0, 2, 30).astype(float)})
        return sm.add_constant(frame), pd.Series(rng.standard_normal(30), name="y")

    sites = [site(False) for _ in range(4)] + [site(True)]
    designs, responses = [d for d, _ in sites], [r for _, r in sites]
    assert "const" not in designs[-1].columns  # what add_constant did
    for given in (designs, [np.asarray(d) for d in designs]):
        with pytest.raises(ValueError, match="has_constant='add'"):
            local_ols(given, [np.asarray(r) for r in responses])
    other = designs[:4] + [designs[-1].rename(columns={"d": "e"})]  # a renamed column
    with pytest.raises(ValueError, match="every client needs the same columns") as caught:
        local_ols(other, responses)
    assert "has_constant" not in str(caught.value)


def test_a_noise_cov_far_too_large_is_kept_and_its_free_factor_says_so():
    """A covariance given 100 times too large (e.g. an OLS cov_params(), which holds the
    residual variance, paired with the residual covariance again): the calibration
    never lowers a given noise (null_scale_factor_ stays 1), and the diagnostic factor
    the median match would take unbounded below is about 1 / 100; with the right
    covariance it is the factor applied. (A warning on it was withdrawn after its
    pre-registered false-alarm bound failed, benchmarks/overstated_noise.py: the fit
    says nothing.)"""
    from clairstat import CLAIREstimator

    rng = np.random.default_rng(3)
    designs = [np.c_[np.ones(60), rng.standard_normal((60, 3))] for _ in range(12)]
    responses = [x @ np.ones((4, 2)) + rng.standard_normal((60, 2)) for x in designs]
    ols = local_ols(designs, responses)
    row_cov, col_cov = ols.noise_cov
    for inflate in (1.0, 100.0):
        est = CLAIREstimator(random_state=0).fit(
            ols.estimates, sample_weight=ols.n_samples,
            noise_cov=(row_cov * inflate, col_cov))
        free = est._free_scale_factor
        if inflate > 1:  # the given scale kept, the free factor about 1 / 100
            assert est.null_scale_factor_ == 1.0 and free < 0.05
        else:  # the right covariance: the free factor is the one applied (two brentq
            # runs from other brackets on the log scale, xtol 2e-12: equal to ~1e-11)
            assert free > 0.5
            assert est.null_scale_factor_ == pytest.approx(max(free, 1.0), rel=1e-9)


def test_a_rank_that_holds_every_member_s_deviation_is_said_to_pool_nothing():
    """Five clients of 12 x 2 coefficients deviate from their mean within a span of
    (5 - 1) x 2 = 8 directions: a shared subspace of rank 8 holds every deviation, and
    refined_ is each client's own estimate (a review: every module of a per-module LoRA
    refinement chose such a rank, and the refined adapters were the inputs, without a
    word). The fit says so; at rank 7 it pools, and does not warn."""
    from clairstat import CLAIREstimator

    estimates = np.random.default_rng(0).standard_normal((5, 12, 2))
    said = "the refinement pools nothing"
    for rank, expect in ((8, True), (7, False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            est = CLAIREstimator(rank=rank, random_state=0).fit(estimates)
        assert not est.contaminated_.any()
        assert any(said in str(w.message) for w in caught) is expect
        # float64 round-off of the projection: |refined - own| ~ 1e-15 when it holds all
        assert np.allclose(est.refined_, estimates, rtol=0, atol=1e-12) is expect


def test_outputs_dependent_in_the_residuals_are_named_by_local_ols():
    """An output that is a combination of others plus the design (a total beside its
    parts) adds nothing and makes every residual covariance singular; a review found the
    fit's tests moved by it (fair: the rank rule changed in 4 of 12 splits) with only the
    estimator's generic warning. local_ols names the outputs once for all such clients;
    independent outputs, and a short client's singular covariance (its own warning),
    give no such warning."""
    rng = np.random.default_rng(1)
    designs = [np.c_[np.ones(40), rng.standard_normal((40, 2))] for _ in range(6)]
    parts = [x @ rng.standard_normal((3, 2)) + rng.standard_normal((40, 2))
             for x in designs]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # independent outputs: no warning
        local_ols(designs, parts)
    total = [np.c_[y, y[:, 0] + y[:, 1] + x @ np.array([1.0, -2.0, 0.5])]
             for x, y in zip(designs, parts)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        local_ols(designs, total)
    dependent = [str(w.message) for w in caught if "linearly dependent" in str(w.message)]
    assert dependent == [
        "outputs ['y0', 'y1', 'y2'] are linearly dependent in the residuals of clients "
        "0, 1, 2, 3, 4 and 1 more: one is a combination of the others (and the design), "
        "which adds no information, and the residual covariance gives no noise along "
        "that combination, so that CLAIREstimator's tests take it as exact. Drop one of "
        "these outputs."]
    assert caught[0].filename == __file__  # the caller's line, not the package's
    # a third output unrelated to the first two: only those two are named
    copies = [np.c_[y[:, 0], 3.0 * y[:, 0] + x @ np.ones(3), rng.standard_normal(40)]
              for x, y in zip(designs, parts)]
    with pytest.warns(UserWarning, match=r"outputs \['y0', 'y1'\] are linearly dependent"):
        local_ols(designs, copies)


def test_no_false_refinement_warning_where_squares_overflow():
    """Entries of 1e155 square beyond float64: the refinement's check divided inf by
    inf and warned that it "moved each client by at most nan" (a review), although the
    fit is the unit-scale fit times 1e155. Now the same fit, no warning."""
    from clairstat import CLAIREstimator

    X = np.random.default_rng(0).standard_normal((10, 4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reference = CLAIREstimator(random_state=0).fit(X)
        for factor in (1e154, 1e155, 1e300):
            est = CLAIREstimator(random_state=0).fit(X * factor)
            np.testing.assert_allclose(est.refined_ / factor, reference.refined_,
                                       rtol=1e-12, atol=0)
            assert np.array_equal(est.contaminated_, reference.contaminated_)


def test_the_summary_says_what_the_noise_scale_is_with_a_covariance():
    """With noise_cov the noise scale is the covariance's geometric-mean size, not an
    entry's standard deviation (a review read it as one: 0.040 on fair, whose standard
    errors run from 0.016 to 0.84); the summary's note says so, and only then."""
    from clairstat import CLAIREstimator

    rng = np.random.default_rng(0)
    designs = [rng.standard_normal((40, 3)) for _ in range(10)]
    responses = [x @ np.ones((3, 2)) + rng.standard_normal((40, 2)) for x in designs]
    ols = local_ols(designs, responses)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with_cov = str(CLAIREstimator(random_state=0).fit(ols).summary())
        without = str(CLAIREstimator(random_state=0).fit(ols.estimates).summary())
    assert ("noise model: noise_cov (noise scale: the covariance's geometric-mean size)"
            in with_cov.splitlines())
    assert "geometric-mean" not in without

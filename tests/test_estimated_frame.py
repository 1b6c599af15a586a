"""The frame of robust scales of the path without a covariance (clairstat._estimator.
_robust_frame): degenerate entries, noiseless data and the exact formulation, each the
case of a review that found the frame's first version failing there."""

import pickle
import warnings

import numpy as np
import pytest

import clairstat._estimator as estimator_module
from clairstat import CLAIREstimator


def _stack(seed=0, n_clients=12, p=8, q=3, sigma=0.1, bad=(0, 1), with_truth=False):
    """Rank-1 shared structure around a backbone, Gaussian noise, ``bad`` clients off
    (and the noiseless parameters with ``with_truth``)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((p, 1)))[0]
    backbone = rng.standard_normal((p, q))
    truth = np.stack([backbone + basis @ rng.standard_normal((1, q))
                      for _ in range(n_clients)])
    X = truth + sigma * rng.standard_normal(truth.shape)
    for k in bad:
        X[k] += rng.standard_normal((p, q))
    return (X, truth) if with_truth else X


def _fit(X, frame="residual", **params):
    previous = estimator_module.ESTIMATED_FRAME
    estimator_module.ESTIMATED_FRAME = frame
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return CLAIREstimator(random_state=0, **params).fit(X)
    finally:
        estimator_module.ESTIMATED_FRAME = previous


@pytest.mark.parametrize("seed", range(6))
def test_frozen_rows_change_nothing(seed):
    """Rows every client shares exactly (weights nobody changed) carry no information:
    the flags are those of the fit without them. The frame's first version counted
    their zero spread at 1e-8 of the largest, weighted them 1e8-fold, and the rank rule
    then kept nothing and missed contaminated clients (16 of 20 flagged in ten seeds)."""
    X = _stack(seed)
    frozen = X.copy()
    frozen[:, :3, :] = np.random.default_rng(seed).standard_normal((3, X.shape[2]))
    with_rows, without = _fit(frozen), _fit(frozen[:, 3:, :])
    assert with_rows.robust_frame_ and without.robust_frame_
    assert np.array_equal(with_rows.contaminated_, without.contaminated_)
    assert with_rows.contaminated_[[0, 1]].all()
    assert with_rows.rank_ >= 1


def test_a_row_most_clients_share_flags_nobody():
    """Eight of twelve clients report the same row 0 (a clamped coefficient); nothing is
    contaminated. The first version weighted that row by the others' tiny spread and
    flagged the four clients with ordinary noise there."""
    X = _stack(2, bad=())
    X[:8, 0, :] = X[0, 0, :]
    assert not _fit(X).contaminated_.any()


@pytest.mark.parametrize("factor", [1.0, 3.7, 1e-200, 1e150])
def test_noiseless_data_have_no_frame_and_flag_nobody(factor):
    """Noiseless low-rank data: what the decomposition leaves is its own error, not
    noise; no frame, no flag, at every scale of the data (the first version read scales
    off the solver's error and flagged a client at one scale and not at another)."""
    for seed in range(4):
        est = _fit(_stack(seed, sigma=0.0, bad=()) * factor)
        assert not est.robust_frame_
        assert not est.contaminated_.any()


def test_the_exact_formulation_runs_without_a_frame():
    """Its residual is its feasibility error: no noise to read scales from."""
    est = _fit(_stack(0), formulation="exact")
    assert not est.robust_frame_
    assert _fit(_stack(0)).robust_frame_


def test_the_frame_is_in_the_summary_and_survives_pickling():
    est = _fit(_stack(0))
    assert "robust row and output scales" in str(est.summary())
    again = pickle.loads(pickle.dumps(est))
    assert again.robust_frame_
    np.testing.assert_array_equal(again.predict(_stack(0)), est.predict(_stack(0)))
    plain = _fit(_stack(0), frame="none")
    assert not plain.robust_frame_ and "robust row" not in str(plain.summary())


def test_an_unknown_frame_setting_is_refused():
    with pytest.raises(ValueError, match="ESTIMATED_FRAME"):
        _fit(_stack(0), frame="residuals")


def test_framed_estimates_are_in_units_of_their_largest_entry():
    """The round-off floor is stated for estimates whose largest entry is 1; the first
    version normalised the framed residual instead (largest framed estimate up to 7.5e6
    with a constant row)."""
    X = _stack(0)
    X[:, 0, :] += 1e3  # a large common coefficient
    est = _fit(X)
    assert est.robust_frame_
    framed = est._frame.to(X / est._scale)
    assert np.max(np.abs(framed)) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_a_coefficient_in_large_units_does_not_leak_into_the_refinement(seed):
    """Row 0 in units 1e4 times the others' (a covariate counted in other units): the
    other rows are refined as well as without the frame, and better than left alone.
    Projected onto the frame's subspace mapped back, row 0's deviations leaked into every
    other row through the basis's small components there (error 0.83 -> 8.8 against 1.51
    unrefined, a review)."""
    X, truth = _stack(seed, with_truth=True)
    X[:, 0, :] *= 1e4
    truth[:, 0, :] *= 1e4
    framed, plain = _fit(X), _fit(X, frame="none")
    assert framed.robust_frame_
    benign = ~framed.contaminated_ & ~plain.contaminated_

    def error(estimates):
        return np.linalg.norm(estimates[benign][:, 1:] - truth[benign][:, 1:])

    assert error(framed.refined_) <= 1.1 * error(plain.refined_)
    assert error(framed.refined_) < error(X)


def test_rows_shared_up_to_a_relative_jitter_weigh_like_frozen_ones():
    """Three rows every client shares up to a 1e-7 relative jitter (float32 rounding of
    one stored estimate): they count as shared, as exactly frozen rows do. Counted as
    spreading they got weights near 1/jitter, and 40 null fits of twelve clients flagged
    7 benign clients, against 2 with the rows exactly frozen (a review)."""
    false_flags = {"jitter": 0, "frozen": 0}
    for seed in range(40):
        X = _stack(seed, bad=())
        rng = np.random.default_rng(seed + 50)
        shared = rng.standard_normal((3, X.shape[2]))
        frozen, jittered = X.copy(), X.copy()
        frozen[:, :3] = shared
        jittered[:, :3] = shared * (1.0 + 1e-7 * rng.standard_normal((len(X), 3, X.shape[2])))
        false_flags["jitter"] += int(_fit(jittered).contaminated_.sum())
        false_flags["frozen"] += int(_fit(frozen).contaminated_.sum())
    assert false_flags["jitter"] <= false_flags["frozen"] + 1, false_flags

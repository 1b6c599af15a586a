"""The per-client tests and the detection loop: one frozen collaborative fit.

:func:`detect_clients` refits the mean and the subspace on a collaborative set, tests
every client out of sample, corrects the p-values and repeats until the set is the one
its own test keeps; it returns a :class:`CollaborativeFit`, from which the estimator
copies every fitted attribute (docs/method_notes.md, section 8).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats
from statsmodels.stats.multitest import multipletests

from ._detection import (_fit_on, concentrate, out_of_sample_statistics,
                         projection_statistics, refine, weighted_mean)
from ._reduced import FactoredBlocks
from ._tuning import copy_groups, counted_once
from ._null import (NoiseCovariance, NullDistribution, Standardizer, complement_basis,
                    known_standardizer, kronecker_df, median_scale_df, predictive_null,
                    robust_log_spread_df)

__all__ = ["CollaborativeFit", "NoiseKnowledge", "NewClientTest", "detect_clients"]

_MAX_ROUNDS = 25


@dataclass(frozen=True)
class NoiseKnowledge:
    """What the test knows of the noise.

    ``sigma`` (n_clients,): per-entry standard deviations (the rank rule's noise edge and
    the concentration steps' relative statistics); ``cov``: the covariance when it is
    known (``noise_cov``, or ``noise_scale`` as ``sigma_k^2 I``), else ``None`` (the
    test estimates its null from the clients); ``floor``: the smallest noise variance
    per entry that is not round-off (a machine-precision floor for noiseless data);
    ``whitening``: the common transform of the rank rule
    (:func:`clairstat._detection.select_rank`); ``frame``: the common map under which
    the detection ran (the estimator maps its results back).
    """

    sigma: np.ndarray
    cov: NoiseCovariance | None = None
    floor: float = 0.0
    whitening: tuple | None = None
    frame: object = None

    @property
    def estimated(self):
        return self.cov is None


@dataclass(frozen=True)
class NewClientTest:
    """A new client's test against the collaborative fit.

    With a known covariance (``members_cov`` set) every new client is tested on its own
    null (:meth:`log_p_known`: its covariance, or the members' average, the mean's share
    and the subspace's tilt, with the fit's ``calibration``); ``standardizer`` and
    ``null`` are then the tilt-free shared versions, kept for reference. Without one the
    statistic is the plain off-subspace norm and ``null`` (one entry) is shared by every
    new client.
    """

    mean: object
    basis: np.ndarray
    null: NullDistribution
    standardizer: Standardizer | None = None
    members_cov: tuple | None = None
    mean_share: float = 0.0
    calibration: tuple = (np.inf, 1.0, np.inf, 1.0)
    member_coords: np.ndarray | None = None
    mean_cov: tuple | None = None

    def log_p_known(self, blocks, cov):
        """Log p-values of new clients whose own covariance ``cov`` is known.

        Each is tested like a training client: its covariance plus the mean's share
        (``mean_share`` times ``mean_cov``, the members' factors averaged with the
        weights' squares) and the subspace's tilt
        (:func:`_tilt_cov`, from the members' coordinates ``member_coords``), its null's
        exact moments, widened and scaled as the fit's null was (``calibration``:
        spread df, scale factor, scale df, and the factor unbounded below, a
        diagnostic).
        """
        return self._log_p_known(blocks, cov)[0]

    def _log_p_known(self, blocks, cov):
        """``(log p-values, statistics)`` of :meth:`log_p_known`."""
        row_bar, col_bar = self.members_cov
        mean_row, mean_col = self.members_cov if self.mean_cov is None else self.mean_cov
        spread_df, factor, scale_df = self.calibration[:3]
        log_p, stats = np.zeros(len(blocks)), np.zeros(len(blocks))
        for i in range(len(blocks)):
            deviation = blocks[i] - self.mean
            tilt = _tilt_cov(self.basis, self.member_coords, deviation, col_bar, row_bar)
            pair = NoiseCovariance(np.stack([cov.row[i], mean_row, row_bar]),
                                   np.stack([cov.col[i], mean_col, tilt]),
                                   np.array([cov.scale[i], 1.0, 1.0]))
            test = known_standardizer(pair, self.basis,
                                      np.array([1.0, np.sqrt(self.mean_share), 1.0]))
            stats[i] = test.statistics(deviation[None])[0]
            nu = min(test.df, spread_df)
            widen = test.df / nu if nu > 0 else 1.0
            null = NullDistribution(np.array([test.scale * widen * factor]), np.array([nu]),
                                    scale_df)
            log_p[i] = null.log_sf(stats[i:i + 1])[0]
        return log_p, stats

    def statistics(self, blocks):
        if self.standardizer is None:
            return projection_statistics(blocks, self.mean, self.basis)
        return self.standardizer.statistics(blocks - self.mean[None])

    def log_p(self, blocks):
        """``(log p-values, statistics)`` of new clients whose covariance is not given.

        With a known covariance (the fit's ``noise_cov`` or ``noise_scale``) each is
        tested as :meth:`log_p_known` tests a client whose covariance is the members'
        average: the mean's share and the subspace's tilt (which depends on the client's
        own coordinates) enter its null. Otherwise the fit's estimated null, shared by
        every new client.
        """
        if self.members_cov is not None:
            row_bar, col_bar = self.members_cov
            n = len(blocks)
            average = NoiseCovariance(np.broadcast_to(row_bar, (n, *row_bar.shape)),
                                      np.broadcast_to(col_bar, (n, *col_bar.shape)),
                                      np.ones(n))
            return self._log_p_known(blocks, average)
        stat = self.statistics(blocks)
        return self.null.broadcast(len(stat)).log_sf(stat), stat


def _tilt_cov(basis, coords, deviation, col_bar, row_bar):
    """Output factor of the subspace's tilt in a client's residual, to first order.

    The subspace ``U`` is the top left singular space of the members' centred estimates
    ``M = [D_1 ... D_m]``, whose coordinates in it are ``Y_j = U^T D_j`` (``coords``,
    shape (m, r, q)) with ``Lambda = sum_j Y_j Y_j^T``. A member's noise ``E_j`` tilts it
    by ``(I - P) sum_j E_j Y_j^T Lambda^-1 U^T`` (first-order perturbation of a singular
    subspace), which moves a client's off-subspace residual by
    ``-(I - P) sum_j E_j G_j`` with ``G_j = Y_j^T Lambda^-1 w`` and ``w = U^T deviation``
    the client's own coordinates. With every member's noise ``Cbar (x) Rbar`` (the
    members' plain average; the mean's share weighs them by ``a_j^2``) that term has
    covariance
    ``(sum_j G_j^T Cbar G_j) (x) Rbar``: this returns its output factor (q, q). It is
    O(1/m) of the noise for a client like the members, and dominates the residual of a
    client far more precise than them (a large site among small ones), whose own noise
    is small while its coordinates are not (docs/method_notes.md, section 8).

    ``Lambda`` is the signal's: the estimated coordinates carry the members' noise in
    the subspace, about ``(m - 1) tr(Cbar) U^T Rbar U``, which is subtracted (each
    eigenvalue kept at least a tenth of the plug-in's, so that a direction at the noise
    level does not blow the term up). With the plug-in ``Lambda`` the term fell 30-80%
    short of the actual tilt at moderate signal (a review's Monte Carlo, signal about
    twice the rank rule's edge); with the subtraction within 6%.
    """
    q = col_bar.shape[0]
    if coords is None or basis.shape[1] == 0 or len(coords) == 0:
        return np.zeros((q, q))
    lam = np.einsum("mrq,msq->rs", coords, coords)
    noise = (len(coords) - 1) * np.trace(col_bar) * (basis.T @ row_bar @ basis)
    plug_in = np.linalg.eigvalsh(lam)  # ascending
    values, vectors = np.linalg.eigh(lam - noise)
    values = np.maximum(values, 0.1 * plug_in)
    signal = (vectors * values) @ vectors.T
    own = _capped_coords(basis.T @ deviation, coords, lam)
    solved = np.linalg.lstsq(signal, own, rcond=None)[0]  # Lambda^-1 w
    gains = np.einsum("mrq,rs->mqs", coords, solved)                  # G_j, (m, q, q)
    tilt = np.einsum("mqa,qb,mbc->ac", gains, col_bar, gains)
    return 0.5 * (tilt + tilt.T)


#: How far along the subspace a client's own coordinates count in its tilt term
#: (:func:`_capped_coords`): at most this many times the leverage of the members' farthest.
TILT_LEVERAGE_CAP = 100.0


def _capped_coords(own, coords, lam):
    """A client's coordinates ``w = U^T deviation`` as the tilt term may use them.

    The tilt's variance grows as ``w``'s square, and so does the off-subspace residual
    of a contaminated client whose deviation is partly along the subspace: without a
    bound its standardised statistic tends to a constant however large the deviation
    (a review: with ``noise_cov`` and ``rank=2`` or 3 given, a client shifted by 3e5
    noise standard deviations kept p ~ 0.9, and a new client like it was +1). A
    collaborative client's coordinates are one more draw like the members'; its
    leverage ``tr(w^T Lambda^-1 w)`` (``Lambda`` the members' ``sum_j Y_j Y_j^T``) is
    taken at most :data:`TILT_LEVERAGE_CAP` times the largest member's (ten times the
    farthest member's distance along the subspace), ``w`` shrunk along itself beyond
    that. A benign client far along the subspace is what the term is for: at ten times
    the members' spread (12 members, rank 1, 60 seeds, scratch runs) it had p < 0.05 in
    0.03 of the fits uncapped, 0.05 with this bound, 0.23 with a bound of 25 and 0.55
    with 4; the precise clients of ``benchmarks/precise_client_null.py`` keep their
    shares (docs/method_notes.md, section 8).
    """
    pinv = np.linalg.pinv(lam)
    members = np.einsum("mrq,rs,msq->m", coords, pinv, coords)
    leverage = float(np.einsum("rq,rs,sq->", own, pinv, own))
    cap = TILT_LEVERAGE_CAP * float(members.max(initial=0.0))
    if leverage > cap > 0.0:
        return own * np.sqrt(cap / leverage)
    return own


def _cycle_message(kept_rejected, flagged_kept):
    """The warning of a detection that cycled, naming only the clients it concerns (an
    empty list of either kind read "clients [] are flagged ...", a review)."""
    parts = ([f"clients {kept_rejected} are kept although the final test rejects them"]
             if kept_rejected else []) + (
            [f"clients {flagged_kept} are flagged (no round kept them) although the final "
             "test keeps them"] if flagged_kept else [])
    return ("the detection did not settle on a set its own test reproduces (a cycle); "
            "the collaborative set keeps every client some round kept: "
            f"{'; '.join(parts)}.")


def _member_coords(blocks, weights, members, basis):
    """``U^T (Theta_hat_j - mean)`` of the members, (m, r, q): the coordinates the
    subspace was fitted to (:func:`_tilt_cov`)."""
    mean = weighted_mean(blocks[members], weights[members])
    return np.einsum("pr,mpq->mrq", basis, blocks[members] - mean[None])


def _mean_weights(weights, others):
    return weights[others] / weights[others].sum()


def _client_index(k, others):
    """Client k followed by the clients its comparison mean is taken over."""
    mask = others.copy()
    mask[k] = False
    return np.r_[k, np.flatnonzero(mask)]


def _scale_factor(stat, null, calibrate_on, *, at_least_one):
    """Factor on the null's scale that brings the calibration clients' median p to 1/2.

    With ``at_least_one`` (a covariance the user gave) the factor never goes below 1:
    a covariance can be right in shape but too small (OLS's classical covariance under
    heteroscedastic errors, measured on the real-data splits of
    ``benchmarks/real_data_calibration.py``); the data may raise the noise, never lower
    it below what the user gave. An estimated factor is carried into an F null
    (:func:`clairstat._null.median_scale_df`).

    Returns
    -------
    factor : float
    scale_df : float
        ``inf`` when the factor was not estimated.
    """
    ok = calibrate_on & (null.df > 0) & (null.scale > 0)
    if ok.sum() < 2:
        return 1.0, np.inf
    ratio, df = stat[ok] / null.scale[ok], null.df[ok]
    if not np.all(np.isfinite(ratio)):
        return 1.0, np.inf
    if np.median(ratio) <= 0:
        # half the statistics zero (identical clients): no noise to match; an estimated
        # scale then falls to the caller's round-off floor, a given one stays
        return (1.0 if at_least_one else 0.0), np.inf

    def excess(log_c):  # median p-value - 1/2: rises with c
        return float(np.median(stats.chi2.sf(ratio / np.exp(log_c), df))) - 0.5

    if at_least_one and excess(0.0) >= 0.0:
        return 1.0, np.inf
    low, high = (0.0, 1.0) if at_least_one else (-1.0, 1.0)
    while excess(low) > 0.0 and low > -600.0:  # exp(-600): far below any statistic
        low *= 2.0
    while excess(high) < 0.0 and high < 600.0:
        high *= 2.0
    if excess(low) > 0.0 or excess(high) < 0.0:  # all statistics zero or infinite
        return 1.0, np.inf
    log_c = optimize.brentq(excess, low, high)
    return float(np.exp(log_c)), median_scale_df(float(np.median(df)), int(ok.sum()))


def _calibrate(stat, null, new, calibrate_on, estimated, floor):
    """Widen the null to the statistics' observed spread, then match its scale.

    Real estimates are not exactly Gaussian, and a given covariance can be wrong in
    shape as well as in scale (heteroscedastic errors): when the log-statistics of the
    calibration clients spread more than chi^2 with the model's df allows
    (:func:`clairstat._null.robust_log_spread_df`), the df are lowered to that spread
    (same mean, wider tails); then the scale is matched at the median
    (:func:`_scale_factor`; a given covariance is only ever raised), not below
    ``floor`` (a machine-precision floor that keeps round-off from counting as
    evidence).
    """
    ok = calibrate_on & (null.df > 0)
    spread_df = np.inf
    if ok.any():
        spread_df = robust_log_spread_df(stat[ok] / (null.scale[ok] * null.df[ok]))
        nu = np.minimum(null.df, spread_df)
        widen = np.where(nu > 0, null.df / np.where(nu > 0, nu, 1.0), 1.0)
        null = NullDistribution(null.scale * widen, nu)
        new_nu = min(float(new.df[0]), spread_df)
        new = NullDistribution(new.scale * (new.df / new_nu if new_nu > 0 else 1.0),
                               np.array([new_nu]))
    factor, scale_df = _scale_factor(stat, null, calibrate_on, at_least_one=not estimated)
    if factor < floor:  # round-off, not noise: no estimate to carry into an F
        factor, scale_df = floor, np.inf
    # The factor the median match would take if a given noise could be lowered (it is
    # not): far below 1, the given noise is overstated and the tests lose their power
    # (a diagnostic, benchmarks/overstated_noise.py).
    free = (factor if estimated else
            _scale_factor(stat, null, calibrate_on, at_least_one=False)[0])
    return (NullDistribution(null.scale * factor, null.df, scale_df),
            NullDistribution(new.scale * factor, new.df, scale_df),
            (spread_df, factor, scale_df, free))


def _members_average(cov, weights):
    """``sum_j w_j C_j`` and ``sum_j w_j R_j`` (weights summing to 1) as one client."""
    w = weights / weights.sum()
    return (np.tensordot(w * cov.scale, np.asarray(cov.row), axes=1),
            np.tensordot(w, np.asarray(cov.col), axes=1))


def _known_tests(blocks, weights, members, mean, basis, fits, cov):
    """Standardised statistics with the known covariance, each with its own moments.

    Client k's residual has covariance ``C_k (x) R_k`` plus the mean's
    ``sum_j a_j^2 C_j (x) R_j``; the latter enters as one Kronecker term,
    ``(sum_j a_j^2) Ctilde (x) Rtilde`` with the factors averaged with weights
    ``a_j^2`` (:func:`_members_average`), so that each client costs a few Kronecker
    terms, not one per member (K clients, not K^2, per round). The average is exact
    when the ``C_j`` (with their scales) are all equal, or the ``R_j`` are; where
    clients with larger ``C_j`` also have larger ``R_j`` it understates the mean's
    variance (a review: 0.50 against 0.17 in an extreme two-factor case), a term
    O(1/m) of a client's null. Taken with equal weights it
    overstated the mean's variance 59-fold where eight sites of 3 000 samples carry the
    mean and eight of 30 do not (a review: a large site 10 of its standard errors off
    had p = 0.07, an exact test 3e-20). The subspace's tilt keeps the members' plain
    average (``Cbar``, ``Rbar``): every member's noise enters the fitted subspace.
    """
    n_clients = len(blocks)
    stat, scale, df = np.zeros(n_clients), np.zeros(n_clients), np.zeros(n_clients)
    index = np.flatnonzero(members)
    row_bar, col_bar = _members_average(cov.subset(index), np.ones(len(index)))
    for k, (basis_k, others) in enumerate(fits):
        mask = others.copy()
        mask[k] = False
        a = _mean_weights(weights, mask)
        mean_row, mean_col = _members_average(cov.subset(np.flatnonzero(mask)), a ** 2)
        mean_k = weighted_mean(blocks[mask], weights[mask])
        deviation = blocks[k] - mean_k
        # The refit's subspace was fitted to the others: its tilt by their noise.
        tilt = _tilt_cov(basis_k, _member_coords(blocks, weights, mask, basis_k),
                         deviation, col_bar, row_bar)
        pair = NoiseCovariance(np.stack([cov.row[k], mean_row, row_bar]),
                               np.stack([cov.col[k], mean_col, tilt]),
                               np.array([cov.scale[k], 1.0, 1.0]))
        test = known_standardizer(pair, basis_k,
                                  np.array([1.0, np.sqrt(np.sum(a ** 2)), 1.0]))
        stat[k] = test.statistics(deviation[None])[0]
        scale[k], df[k] = test.scale, test.df
    # One null shared by new clients of the members' average noise, plus the mean's share,
    # Cbar (x) Rbar + (sum_j a_j^2) Ctilde (x) Rtilde, without the tilt: _calibrate widens and scales it
    # alongside the training clients'. NewClientTest.log_p does not use it (each new
    # client's tilt depends on its own coordinates: it goes through log_p_known).
    a = _mean_weights(weights, members)
    mean_cov = _members_average(cov.subset(index), a ** 2)
    one = NoiseCovariance(np.stack([row_bar, mean_cov[0]]), np.stack([col_bar, mean_cov[1]]),
                          np.ones(2))
    new = known_standardizer(one, basis, np.array([1.0, np.sqrt(np.sum(a ** 2))]))
    return (stat, NullDistribution(scale, df), new,
            ((row_bar, col_bar), float(np.sum(a ** 2)), mean_cov),
            _member_coords(blocks, weights, members, basis))


def _estimated_tests(blocks, weights, members, mean, basis, stat, fits):
    """Plain off-subspace statistics under an estimated shared Kronecker noise shape.

    The statistic stays ``||(I - P)(Theta_hat_k - mean)||_F^2``; its null is a scaled
    chi^2 whose df are those of the shape ``C (x) R`` fitted to the members' residuals
    (:func:`clairstat._null.kronecker_df`: rows and outputs on different scales give
    fewer effective df than ``(p - r) q``); the scale is matched afterwards. The shape
    comes from the members only (in the first round, the robust half-set of
    :func:`clairstat._detection.concentrate`), so that colluders pushing one direction
    do not enter it. The statistic is not standardised by the estimated shape:
    standardising by noise scales estimated from the members inflates the outsiders'
    statistics against the members' (measured on the real-data null splits of
    ``benchmarks/real_data_calibration.py``: 62% of the splits flagged with a full
    estimated covariance, 20% with estimated row and output variances, against 5-8%
    for the plain statistic).
    """
    n_clients = len(blocks)
    residuals = complement_basis(basis).T @ (blocks[members] - mean[None])
    nu = kronecker_df(residuals) if residuals.shape[1] else 0.0
    share = np.array([1.0 + np.sum(_mean_weights(weights, others) ** 2)
                      for _, others in fits])
    share_new = 1.0 + np.sum(_mean_weights(weights, members) ** 2)
    null = NullDistribution(share / max(nu, 1.0), np.full(n_clients, nu))
    new = NullDistribution(np.array([share_new / max(nu, 1.0)]), np.array([nu]))
    return null, new


def _factored_tests(blocks, weights, members, mean, basis, stat, fits, calibrate_on, noise):
    """Plain off-subspace norms of LoRA stacks against the others': a predictive null.

    LoRA updates have rank-r noise that no Kronecker shape describes, and a scaled chi^2
    fitted to a module's few statistics treats its estimated degrees of freedom as known
    (BH at 5% then rejected in 7-13% of all-benign replicates,
    ``benchmarks/lora_null_calibration.py``): each statistic is instead predicted from
    the calibration clients' by its cube root (:func:`clairstat._null.predictive_null`).
    """
    n_clients, p, q = blocks.shape
    df_theory = (p - basis.shape[1]) * q
    share = np.array([1.0 + np.sum(_mean_weights(weights, others) ** 2)
                      for _, others in fits])
    relative = noise.sigma ** 2 / np.mean(noise.sigma ** 2) * share
    share_new = 1.0 + np.sum(_mean_weights(weights, members) ** 2)
    null, new = predictive_null(stat, relative, calibrate_on, noise.floor * df_theory,
                                share_new)
    if df_theory == 0:  # the subspace is everything: nobody can be told apart
        null = dataclasses.replace(null, df=np.zeros(n_clients))
        new = dataclasses.replace(new, df=np.zeros(1))
    return null, NewClientTest(mean, basis, new)


@dataclass(frozen=True)
class _Round:
    """One refit on a client set and every client's test against it."""

    members: np.ndarray
    mean: object
    basis: np.ndarray
    statistics: np.ndarray
    null: NullDistribution
    new_client: NewClientTest
    log_p: np.ndarray
    adjusted: np.ndarray
    rejected: np.ndarray


def _test_round(blocks, weights, members, rank, noise, level, correction, random_state,
                calibrate_on, support=1):
    """Refit on ``members``; test every client out of sample; correct the p-values."""
    n_clients = len(blocks)
    mean, basis = _fit_on(blocks, weights, members, rank, noise.sigma, random_state,
                          noise.whitening, support)
    stat, fits = out_of_sample_statistics(blocks, weights, members, mean, basis, random_state)
    if noise.estimated:
        # A statistic below the round-off floor is numerical zero: 0 and 1e-32 (the same
        # copy of the consensus at another scale of the data) must calibrate alike. They
        # did not where copies are most of the clients: the quartile match took exact
        # zeros for the widest null and 1e-32 for a narrow one, and the other clients'
        # flags changed with the data's units (a property-based test, 2026-12-02).
        round_off = noise.floor * (blocks.shape[1] - basis.shape[1]) * blocks.shape[2]
        stat = np.where(stat <= round_off, 0.0, stat)
    if isinstance(blocks, FactoredBlocks):
        null, new_client = _factored_tests(blocks, weights, members, mean, basis, stat, fits,
                                           calibrate_on, noise)
    else:
        members_cov, mean_share, mean_cov, coords = None, 0.0, None, None
        if noise.estimated:
            null, new_null = _estimated_tests(blocks, weights, members, mean, basis, stat,
                                              fits)
            standardizer = None
        else:
            stat, null, standardizer, (members_cov, mean_share, mean_cov), coords = _known_tests(
                blocks, weights, members, mean, basis, fits, noise.cov)
            new_null = NullDistribution(np.array([standardizer.scale]),
                                        np.array([standardizer.df]))
        # Noiseless data: the plain statistics' scale has a round-off floor.
        floor = noise.floor * (blocks.shape[1] - basis.shape[1]) * blocks.shape[2] \
            if noise.estimated else 0.0
        null, new_null, calibration = _calibrate(stat, null, new_null, calibrate_on,
                                                 noise.estimated, floor)
        new_client = NewClientTest(mean, basis, new_null, standardizer, members_cov,
                                   mean_share, calibration, coords, mean_cov)
    log_p = null.log_sf(stat)
    if not np.any(null.df > 0):  # the subspace is everything: nobody can be told apart
        adjusted = np.ones(n_clients)
    else:
        adjusted = adjust_p_values(np.exp(log_p), level, correction)
    return _Round(members, mean, basis, stat, null, new_client, log_p, adjusted,
                  adjusted <= level)


def adjust_p_values(p_values, level, correction):
    """``p_values`` adjusted by ``correction``: statsmodels' ``multipletests``, except
    Holm's step-down, computed here with the same formula.

    statsmodels' Holm branch calls ``gc.collect()`` on every call (statsmodels 0.15,
    the version pinned for CI; a pull request removing it, statsmodels#8671, was not
    merged): a full collection of the caller's process, 0.16 s per call in a process
    with torch loaded, which was most of a small fit's time (two or three test rounds
    per fit). Holm's adjusted p-values are ``min(1, max_{j <= i} (n - j + 1) p_(j))``
    over the sorted values, which is what statsmodels returns
    (``tests/test_hostile_estimator.py`` checks the two agree, ties, ones, NaN and an
    empty list included).
    """
    p_values = np.asarray(p_values, dtype=float)
    if correction.lower() not in ("h", "holm"):
        return multipletests(p_values, alpha=level, method=correction)[1]
    order = np.argsort(p_values)  # statsmodels' sort, so ties take the same order
    steps = np.arange(len(p_values), 0, -1)
    adjusted = np.empty_like(p_values)
    adjusted[order] = np.minimum(np.maximum.accumulate(p_values[order] * steps), 1.0)
    return adjusted


@dataclass(frozen=True)
class CollaborativeFit:
    """The detection's result: one fit on one collaborative set, and every client's test.

    Every attribute comes from the same fit: ``mean`` is the weighted mean of
    ``members``, ``basis`` their refitted subspace, ``statistics`` and ``log_p`` every
    client's out-of-sample test against them (a member against a refit without it),
    ``adjusted`` the p-values corrected over the clients, ``contaminated`` the clients
    outside ``members``. ``converged`` is ``False`` when the refit-and-test loop did not
    reach a set that its own test reproduces (then some members are kept although the
    final test rejects them: see :func:`detect_clients`).

    Attributes
    ----------
    members : ndarray of bool, shape (n_clients,)
    mean : ndarray of shape (p, q) (or a FactoredMean)
    basis : ndarray of shape (p, rank)
    statistics, log_p, adjusted : ndarray of shape (n_clients,)
    null : NullDistribution
        Of the training clients' statistics.
    new_client : NewClientTest
        A new client's test against ``mean`` and ``basis``.
    level : float
    correction : str
    converged : bool
    n_rounds : int
    """

    members: np.ndarray
    mean: object
    basis: np.ndarray
    statistics: np.ndarray
    log_p: np.ndarray
    adjusted: np.ndarray
    null: NullDistribution
    new_client: NewClientTest
    level: float
    correction: str
    converged: bool
    n_rounds: int

    @property
    def contaminated(self):
        return ~self.members

    @property
    def rank(self):
        return self.basis.shape[1]

    @property
    def p_values(self):
        return np.exp(self.log_p)

    def training_scores(self):
        """Log adjusted p-values, each on the side of ``log(level)`` its flag is on.

        They differ from ``log(adjusted)`` only for a client whose flag was not set by
        the test (threshold detection, or a loop that did not converge).
        """
        cut = np.log(self.level)
        scores = np.log(np.maximum(self.adjusted, np.finfo(float).tiny))
        kept = np.maximum(scores, cut)
        flagged = np.minimum(scores, cut - np.log(2.0))
        return np.where(self.members, kept, flagged)

    def new_client_log_p(self, blocks):
        """Log p-values of new clients, each tested on its own against the fit."""
        return self.new_client.log_p(blocks)

    def refine(self, blocks, contaminated):
        """``P Theta_k + (I - P) mean`` for the others; ``contaminated`` ones unchanged."""
        return refine(blocks, self.basis, self.mean, contaminated)


def _final(state, level, correction, converged, n_rounds):
    return CollaborativeFit(state.members, state.mean, state.basis, state.statistics,
                            state.log_p, state.adjusted, state.null, state.new_client,
                            level, correction, converged, n_rounds)


def detect_clients(blocks, weights, start, *, rank, noise, level, correction, iterate=True,
                   random_state=None, rank_support=1):
    """Refit-and-test until the collaborative set is the one its own test keeps.

    Starting from a robust set (:func:`concentrate`, seeded by ``start``: the clients
    with S_k = 0), refit the mean and subspace on the collaborative set, test every
    client out of sample against its null (:mod:`clairstat._null`), correct the
    p-values (statsmodels' ``multipletests``) and take the clients not rejected as the
    next set, until the set repeats. If the sets cycle instead (or ``_MAX_ROUNDS``
    pass), the collaborative set is every client some set of the cycle kept, fitted
    once (``converged=False``, and a warning names the members its final test
    rejects).

    Parameters
    ----------
    blocks : ndarray of shape (n_clients, p, q) or FactoredBlocks
    weights : ndarray of shape (n_clients,)
    start : ndarray of bool, shape (n_clients,)
    rank : int or None
        ``None``: the rank rule of :func:`select_rank` at every round.
    noise : NoiseKnowledge
    level : float
    correction : str
        A ``multipletests`` method ("fdr_bh", "holm", "bonferroni", ...).
    iterate : bool, default=True
        ``False``: a single fit on ``start`` (threshold detection); ``start`` is then the
        collaborative set and nothing is tested away.
    rank_support : int, default=1
        The rank rule's ``support`` (:func:`select_rank`) when ``rank`` is ``None``.

    Returns
    -------
    CollaborativeFit
    """
    n_clients = len(blocks)
    members = start.copy() if start.sum() >= 2 else np.ones(n_clients, dtype=bool)
    groups = copy_groups(blocks)

    def test(members, calibrate_on=None):
        calibrate_on = members if calibrate_on is None else calibrate_on
        # Each group of copies counts once in the calibration's median and spread, unless
        # one group is most of the clients: then it is the consensus itself (noiseless
        # clients that agree, whose round-off the floor covers), and counting it once
        # would leave a median of the few others (one client off eleven identical ones
        # was then not flagged). clairstat._tuning.counted_once.
        calibrate_on = counted_once(groups, calibrate_on)
        return _test_round(blocks, weights, members, rank, noise, level, correction,
                           random_state, calibrate_on, rank_support)

    if not iterate:
        state = test(members)
        if start.sum() < 2:  # threshold detection that kept fewer than two clients
            warnings.warn(f"{int((~start).sum())} of {n_clients} clients have a non-zero "
                          "sparse block: every client looks contaminated; estimates are "
                          "returned unrefined (lower beta/lam or raise threshold).",
                          UserWarning, stacklevel=4)
            # No collaborative fit exists: the tests are against all clients, for the
            # record, and nothing is refined.
            state = dataclasses.replace(state, members=start.copy())
        return _final(state, level, correction, True, 1)
    members = concentrate(blocks, weights, members, rank, noise.sigma,
                          random_state=random_state, whitening=noise.whitening,
                          distinct=counted_once(groups), support=rank_support)
    # The concentrated half-set holds the smallest statistics by construction, so the
    # first calibration uses every client (the median is robust while attackers are a
    # minority); later rounds use the tested collaborative set.
    state, history = test(members, np.ones(n_clients, dtype=bool)), []
    for n_rounds in range(1, _MAX_ROUNDS + 1):
        kept = ~state.rejected
        # a fixed point counts only under the set's own calibration (not the first
        # round's, which calibrates on every client)
        if np.array_equal(kept, state.members) and n_rounds > 1:
            return _final(state, level, correction, True, n_rounds)
        if kept.sum() < 2 or any(np.array_equal(kept, seen) for seen in history):
            break
        history.append(state.members)
        state = test(kept)
    # No fixed point (a cycle, or too many rounds): keep every client that some set of
    # the cycle kept, fit once on that set, and say so. Resolving towards keeping means
    # a cycle never flags a client its own test would keep in some round (under the
    # null, cycles are of benign clients whose p-values move with the calibration).
    first = next((i for i, seen in enumerate(history)
                  if np.array_equal(seen, ~state.rejected)), 0)
    members = np.logical_or.reduce(history[first:] + [state.members, ~state.rejected])
    if members.sum() < 2:
        members = np.ones(n_clients, dtype=bool)
    state = test(members)
    n_rounds += 1
    converged = np.array_equal(~state.rejected, state.members)
    if not converged:
        kept_rejected = np.flatnonzero(state.rejected & state.members).tolist()
        flagged_kept = np.flatnonzero(~state.rejected & ~state.members).tolist()
        warnings.warn(_cycle_message(kept_rejected, flagged_kept), UserWarning,
                      stacklevel=4)
    return _final(state, level, correction, converged, n_rounds)



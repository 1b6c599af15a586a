"""Collaborative-set detection, subspace refit and refinement (method.md section 3)."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from functools import singledispatch

import numpy as np
import scipy.linalg
from scipy import optimize, stats
from sklearn.utils import check_random_state
from sklearn.utils.extmath import randomized_svd
from statsmodels.stats.multitest import multipletests

from ._factored import FactoredBlocks, FactoredRefined, off_subspace_statistics
from ._null import (NoiseCovariance, NullDistribution, kronecker_df, kronecker_moments,
                    median_scale_df, robust_log_spread_df, satterthwaite)
from ._objective import stack_blocks

__all__ = ["CollaborativeFit", "NoiseKnowledge", "weighted_mean", "refit_subspace",
           "select_rank", "projection_statistics", "calibrate_null", "concentrate",
           "out_of_sample_statistics", "detect_clients", "refine"]

_MAX_ROUNDS = 25


# The detection works on a dense (n_clients, p, q) array or on a FactoredBlocks stack
# (LoRA updates, clairstat._factored): the four stack operations below dispatch on it.
@singledispatch
def weighted_mean(blocks, weights):
    """``sum_k w_k Theta_k / sum_k w_k`` over the given clients."""
    return np.tensordot(weights / weights.sum(), blocks, axes=1)


@weighted_mean.register
def _(blocks: FactoredBlocks, weights):
    return blocks.mean(weights)


def _centred_stack(blocks, weights):
    return stack_blocks(blocks - weighted_mean(blocks, weights)[None])


def _left_singular(stacked):
    """Left singular vectors and values of a p x n matrix, largest first.

    For n >= 2p the p x p Gram matrix is eigen-decomposed instead of running a thin SVD
    (O(p^2 n) either way, but without forming the n-long right factors); the top
    directions and the singular values above the noise edge are accurate to
    eps * s_max^2 / s, far below the statistical error.
    """
    p, n = stacked.shape
    if n >= 2 * p:
        eigval, eigvec = np.linalg.eigh(stacked @ stacked.T)
        order = np.argsort(eigval)[::-1]
        return eigvec[:, order], np.sqrt(np.clip(eigval[order], 0.0, None))
    left, sing, _ = np.linalg.svd(stacked, full_matrices=False)
    return left, sing


@singledispatch
def _centred_left_singular(blocks, weights):
    """Left singular vectors and values of the centred stack, largest first."""
    return _left_singular(_centred_stack(blocks, weights))


@_centred_left_singular.register
def _(blocks: FactoredBlocks, weights):
    return blocks.centred_left_singular(weights)


def select_rank(blocks, weights, noise_scale, whitening=None):
    """Rank rule: singular values of the centred collaborative stack above the noise edge.

    A p x (q m) matrix of i.i.d. N(0, sigma^2) entries has its largest singular value near
    ``sigma (sqrt(p) + sqrt(q m))``; directions above 1.1 times that edge are kept.

    ``whitening = (left, right, sigma)`` first maps every block to ``left X_k right``,
    a transform common to all clients (it maps the shared column space to another and
    keeps the rank), under which the noise is close to isotropic: rows and outputs on
    different scales would otherwise put noise directions above the edge. ``sigma`` is
    the whitened noise's scale, or ``None`` to estimate it (Marchenko-Pastur median,
    :func:`clairstat._tuning.estimate_noise_scale`).
    """
    n_clients, p, q = blocks.shape
    if whitening is not None and not isinstance(blocks, FactoredBlocks):
        from ._tuning import estimate_noise_scale
        left, right, sigma = whitening
        blocks = left @ blocks @ right
        noise_scale = estimate_noise_scale(blocks) if sigma is None else sigma
    sing = _centred_left_singular(blocks, weights)[1]
    edge = 1.1 * noise_scale * (np.sqrt(p) + np.sqrt(q * n_clients))
    return int(np.sum(sing > edge))


def refit_subspace(blocks, weights, rank, random_state=None):
    """Top ``rank`` left singular vectors of the centred collaborative estimates.

    Returns
    -------
    basis : ndarray of shape (p, rank)
    """
    if isinstance(blocks, FactoredBlocks):
        return blocks.centred_left_singular(weights, rank)[0]
    stacked = _centred_stack(blocks, weights)
    if rank == 0:
        return np.zeros((stacked.shape[0], 0))
    if min(stacked.shape) > 500 and rank < min(stacked.shape) // 4:
        return randomized_svd(stacked, rank, random_state=random_state)[0]
    return _left_singular(stacked)[0][:, :rank]


def _project(basis, blocks):
    """``P X_k`` for every block, as two thin products (never the p x p projector)."""
    return basis @ (basis.T @ blocks)


@singledispatch
def projection_statistics(blocks, mean, basis):
    """``||(I - P)(Theta_hat_k - mean)||_F^2`` for every client."""
    resid = blocks - mean[None]
    resid = resid - _project(basis, resid)
    return np.einsum("kpq,kpq->k", resid, resid)


projection_statistics.register(FactoredBlocks, off_subspace_statistics)


def _sub_rank(rank, p, q, n_others):
    """The centred stack of n clients has rank at most (n - 1) q."""
    return min(rank, p, q * max(n_others - 1, 0))


def _leave_one_out(blocks, weights, members, rank, random_state):
    """``(k, mean, basis, others)`` for every member k, fitted on the other members.

    In-sample, a member's own noise pulls both the mean and the subspace towards it: its
    statistic is smaller than a non-member's by the mean's share (a factor
    ``((W - w_k) / W)^2``) and by what the subspace absorbs (measured: 4% of the
    statistic for 50 rank-16 LoRA clients of a 4096 x 4096 module, three standard
    deviations of a chi^2 with 12 672 degrees of freedom), so benign clients outside the
    set would look deviant and, once rejected, stay rejected.
    """
    n_clients, p, q = blocks.shape
    for k in np.flatnonzero(members):
        others = members.copy()
        others[k] = False
        sub_blocks, sub_weights = blocks[others], weights[others]
        if sub_weights.sum() <= 0:  # nobody else carries weight: no refit to compare with
            continue
        sub_rank = _sub_rank(rank, p, q, int(others.sum()))
        yield (k, weighted_mean(sub_blocks, sub_weights),
               refit_subspace(sub_blocks, sub_weights, sub_rank, random_state), others)


def out_of_sample_statistics(blocks, weights, members, mean, basis, random_state=None):
    """Every client's statistic against a mean and subspace fitted without it.

    Non-members are compared with the members' fit (``mean``, ``basis``) as they are;
    each member with a refit on the other members at the same rank
    (:func:`_leave_one_out`).

    Returns
    -------
    statistics : ndarray of shape (n_clients,)
    fits : list of (basis, others) per client
        The basis and the mean's client set each statistic was computed against.
    """
    stat = projection_statistics(blocks, mean, basis)
    fits = [(basis, members)] * len(stat)
    for k, sub_mean, sub_basis, others in _leave_one_out(blocks, weights, members,
                                                          basis.shape[1], random_state):
        one = np.zeros(len(stat), dtype=bool)
        one[k] = True
        stat[k] = projection_statistics(blocks[one], sub_mean, sub_basis)[0]
        fits[k] = (sub_basis, others)
    return stat, fits


def calibrate_null(ratios, members, df_theory):
    """Scale and degrees of freedom of the null ``T_k / sigma_k^2 ~ scale * chi^2_nu``.

    ``ratios`` are ``T_k / (rel_k^2 df_theory)`` (mean ``sigma^2`` under the i.i.d. model).
    The median and lower quartile of the given clients' ratios are matched to those of
    ``sigma^2 chi^2_nu / nu`` (quantile matching; attackers sit in the upper tail, so
    this stays right while they are fewer than half): nu from the ratio Q1 / median,
    which rises monotonically in nu, then sigma^2 from the median (the statistics are
    out of sample, :func:`out_of_sample_statistics`, so no in-sample correction is needed).
    nu never exceeds the i.i.d. value ``(p - r) q``: noise with structure (LoRA updates:
    rank-r noise) spreads the statistics more than chi^2 with full df, and testing it
    against the full df would flag benign clients (measured: 14-25% of them).

    Returns
    -------
    sigma2 : float
    nu : float
    """
    sample = ratios[members]
    med = float(np.median(sample))
    q1 = float(np.percentile(sample, 25))

    def spread(nu):  # 1 - Q1 / median of chi^2_nu: falls monotonically in nu
        lo, mid = stats.chi2.ppf([0.25, 0.5], nu)
        return 1.0 - lo / mid

    target = 1.0 - q1 / med if med > 0 else 0.0
    nu = float(df_theory)
    if len(sample) >= 8 and target > spread(df_theory):
        # Q1 = 0 (several identical clients) is spread beyond any chi^2: the floor.
        nu = 0.05 if target >= spread(0.05) else float(
            optimize.brentq(lambda v: spread(v) - target, 0.05, df_theory))
    # Second, symmetric look at the spread: log(chi^2_nu / nu) has sd ~ sqrt(2 / nu), and
    # the MAD of the log-statistics resists just under half the sample being attackers.
    # The smaller nu (the more conservative null) is kept.
    positive = sample[sample > 0]
    if len(positive) >= 8:
        log_sd = 1.4826 * np.median(np.abs(np.log(positive) - np.median(np.log(positive))))
        if log_sd > 0:
            nu = min(nu, max(2.0 / log_sd ** 2, 0.05))
    sigma2 = med / (stats.chi2.median(nu) / nu)
    return sigma2, nu


def _fit_on(blocks, weights, members, rank, noise, random_state, whitening=None):
    """Mean and basis refitted on the current collaborative set."""
    sub_blocks, sub_weights = blocks[members], weights[members]
    n_members, p, q = sub_blocks.shape
    max_rank = _sub_rank(p, p, q, n_members)
    if rank is None:
        rank = min(select_rank(sub_blocks, sub_weights, float(np.sqrt(np.mean(noise ** 2))),
                               whitening), max_rank)
    elif rank > max_rank:
        warnings.warn(f"rank={rank} exceeds what {n_members} collaborative clients support; "
                      f"using {max_rank}.", UserWarning, stacklevel=4)
        rank = max_rank
    basis = refit_subspace(sub_blocks, sub_weights, rank, random_state)
    return weighted_mean(sub_blocks, sub_weights), basis


def concentrate(blocks, weights, start, rank, noise, *, n_half_starts=3, n_random_starts=10,
                max_steps=10, random_state=None, whitening=None):
    """Robust starting set by concentration steps (the C-steps of FastMCD).

    From each start (``start``: the clients with S_k = 0; all clients;
    ``n_half_starts`` random half-sets, enough clients to outvote a coordinated group;
    ``n_random_starts`` random sets of ``rank + 2`` clients with S_k = 0, some of them free
    of a high-leverage attacker, which a least-squares fit on its own set fits exactly),
    repeat: fit the mean and a rank-r subspace on the set, keep the ``K // 2 + 1``
    clients with the smallest relative off-subspace statistic. Each step can only lower
    the trimmed residual sum (Rousseeuw and Van Driessen, 1999); the lowest sum wins,
    each client in the set that the decomposition flagged counting 2 / h of it extra
    (such a client, fitted exactly by its own set, saves at most ~1 / h). A
    coordinated group of attackers (up to just under half the clients) that the
    decomposition folds into L, and that would then capture the refitted subspace, is
    left out. The rank, if not given, is fixed on ``start``.

    Returns
    -------
    members : ndarray of bool, shape (n_clients,)
    """
    n_clients = len(blocks)
    half = n_clients // 2 + 1
    if n_clients < 4:
        return start
    rng = check_random_state(random_state)
    if rank is None:
        rank = _fit_on(blocks, weights, start, None, noise, random_state,
                       whitening)[1].shape[1]
    unflagged = np.flatnonzero(start)
    small_pool = unflagged if len(unflagged) >= rank + 2 else np.arange(n_clients)
    starts = [start, np.ones(n_clients, dtype=bool)]
    draws = ([(np.arange(n_clients), half)] * n_half_starts
             + [(small_pool, min(rank + 2, half))] * n_random_starts)
    for pool, size in draws:
        random_set = np.zeros(n_clients, dtype=bool)
        random_set[rng.choice(pool, size=size, replace=False)] = True
        starts.append(random_set)
    finals = [_c_steps(blocks, weights, members, rank, noise, half, max_steps, random_state)
              for members in starts]
    # A client the decomposition flagged (S_k != 0) that a set's own fit absorbs adds ~0
    # to the trimmed sum and displaces one member's share (~cost / h): masking, since
    # structured noise can make a high-leverage attacker's tilt no larger than the noise.
    # So each such client inflates the set's cost by 2 / h, twice what it can save.
    def penalized(cost, members):
        return cost * (1.0 + 2.0 * np.sum(members & ~start) / half)

    return min(finals, key=lambda item: penalized(*item))[1]


def _c_steps(blocks, weights, members, rank, noise, half, max_steps, random_state):
    """Concentration steps from ``members``; returns (trimmed cost, final set)."""
    for _ in range(max_steps):
        mean, basis = _fit_on(blocks, weights, members, rank, noise, random_state)
        relative = projection_statistics(blocks, mean, basis) / noise ** 2
        new = np.zeros(len(blocks), dtype=bool)
        new[np.argsort(relative)[:half]] = True
        if np.array_equal(new, members):
            break
        members = new
    return float(np.sort(relative)[:half].sum()), members


@dataclass(frozen=True)
class NoiseKnowledge:
    """What the test knows of the noise.

    ``sigma`` (n_clients,): per-entry standard deviations (the rank rule's noise edge and
    the concentration steps' relative statistics); ``cov``: the covariance when it is
    known (``noise_cov``, or ``noise_scale`` as ``sigma_k^2 I``), else ``None`` (the
    test estimates its null from the statistics); ``floor``: the smallest noise variance
    per entry that is not round-off (a machine-precision floor for noiseless data);
    ``whitening``: the common transform of the rank rule (:func:`select_rank`).
    """

    sigma: np.ndarray
    cov: NoiseCovariance | None = None
    floor: float = 0.0
    whitening: tuple | None = None

    @property
    def estimated(self):
        return self.cov is None


def _mean_weights(weights, others):
    return weights[others] / weights[others].sum()


def _given_null(noise, weights, fits):
    """Per-client scaled chi^2 from the known covariance (exact first two moments)."""
    scale, df = np.zeros(len(fits)), np.zeros(len(fits))
    for k, (basis, others) in enumerate(fits):
        index = np.r_[k, np.flatnonzero(others & (np.arange(len(fits)) != k))]
        coefficients = np.r_[1.0, -_mean_weights(weights, index[1:])] if len(index) > 1 \
            else np.ones(1)
        scale[k], df[k] = satterthwaite(*kronecker_moments(noise.cov.subset(index), basis,
                                                           coefficients))
    return NullDistribution(scale, df)


def understatement(stat, null, calibrate_on):
    """How much a given covariance understates the noise, matched at the median.

    The factor ``c >= 1`` that brings the calibration clients' median p-value to 1/2
    (1 when it already is). A covariance can be right in shape but too small (OLS's
    classical covariance under heteroscedastic errors: measured on the real-data splits
    of ``benchmarks/real_data_calibration.py``); the data can raise the noise, never
    lower it below what the user gave. A raised scale is an estimate, carried into an F
    null (:func:`clairstat._null.median_scale_df`).

    Returns
    -------
    factor : float
    scale_df : float
        ``inf`` when the factor is 1.
    """
    ok = calibrate_on & (null.df > 0) & (null.scale > 0)
    if ok.sum() < 2:
        return 1.0, np.inf
    ratio, df = stat[ok] / null.scale[ok], null.df[ok]

    def excess(log_c):  # median p-value - 1/2, rising in c
        return float(np.median(stats.chi2.sf(ratio / np.exp(log_c), df))) - 0.5

    if excess(0.0) >= 0.0:
        return 1.0, np.inf
    upper = 1.0
    while excess(upper) < 0.0 and upper < 700.0:
        upper *= 2.0
    log_c = optimize.brentq(excess, 0.0, upper)
    return float(np.exp(log_c)), median_scale_df(float(np.median(df)), int(ok.sum()))


def _mean_variance_share(weights, fits):
    """``1 + sum_j a_j^2``: the statistic's variance relative to the client's own noise."""
    return np.array([1.0 + np.sum(_mean_weights(weights, others) ** 2)
                     for _, others in fits])


def _estimated_shape_df(blocks, mean, basis, calibrate_on):
    """Effective degrees of freedom of a shared Kronecker noise shape (dense stacks)."""
    p = blocks.shape[1]
    complement = scipy.linalg.null_space(basis.T) if basis.shape[1] else np.eye(p)
    residuals = complement.T @ (blocks[calibrate_on] - mean[None])
    if residuals.shape[1] == 0:
        return 0.0
    return kronecker_df(residuals)


def _estimated_null(blocks, weights, stat, fits, members, calibrate_on, noise, mean, basis):
    """Scaled chi^2 (or F) with an estimated df and a robust scale (noise not known).

    Dense stacks: the df of a shared Kronecker shape fitted to the calibration clients'
    residuals (outputs and rows on different scales), capped by the model-free spread
    of the log-statistics; the scale matched to their median, whose sampling error
    turns the null into an F (:func:`clairstat._null.median_scale_df`). Factored stacks
    (LoRA updates, rank-r noise): :func:`calibrate_null`'s quantile matching.

    Returns
    -------
    null : NullDistribution
    unit : float
        The scale of a statistic with mean-variance share 1 (for new clients).
    """
    n_clients, p, q = blocks.shape
    df_theory = (p - basis.shape[1]) * q
    share = _mean_variance_share(weights, fits)
    relative = noise.sigma ** 2 / np.mean(noise.sigma ** 2) * share
    n_calibrate = int(np.sum(calibrate_on))
    if isinstance(blocks, FactoredBlocks):
        sigma2, nu = calibrate_null(stat / (relative * df_theory), calibrate_on, df_theory)
        sigma2 *= df_theory
    else:
        nu = min(_estimated_shape_df(blocks, mean, basis, calibrate_on),
                 robust_log_spread_df(stat[calibrate_on] / relative[calibrate_on]))
        if nu <= 0:
            return NullDistribution(np.zeros(n_clients), np.zeros(n_clients)), 0.0
        sigma2 = float(np.median(stat[calibrate_on] / relative[calibrate_on])) * nu \
            / stats.chi2.median(nu)
    # Noiseless data: statistics at round-off level are zero, not evidence.
    floored = noise.floor * df_theory
    scale_df = np.inf if sigma2 < floored else median_scale_df(nu, n_calibrate)
    sigma2 = max(sigma2, floored)
    null = NullDistribution(sigma2 * relative / nu, np.full(n_clients, nu), scale_df)
    return null, sigma2 / nu


@dataclass(frozen=True)
class _Round:
    """One refit on a client set and every client's test against it."""

    members: np.ndarray
    mean: object
    basis: np.ndarray
    statistics: np.ndarray
    null: NullDistribution
    new_client_null: NullDistribution
    log_p: np.ndarray
    adjusted: np.ndarray
    rejected: np.ndarray


def _test_round(blocks, weights, members, rank, noise, level, correction, random_state,
                calibrate_on):
    """Refit on ``members``; test every client out of sample; correct the p-values."""
    n_clients, p, q = blocks.shape
    mean, basis = _fit_on(blocks, weights, members, rank, noise.sigma, random_state,
                          noise.whitening)
    stat, fits = out_of_sample_statistics(blocks, weights, members, mean, basis, random_state)
    if noise.estimated:
        null, sigma2 = _estimated_null(blocks, weights, stat, fits, members, calibrate_on,
                                       noise, mean, basis)
        share = 1.0 + np.sum(_mean_weights(weights, members) ** 2)
        new = NullDistribution(np.array([sigma2 * share]), null.df[:1], null.scale_df)
    else:
        null = _given_null(noise, weights, fits)
        new = _new_client_given_null(noise, weights, members, basis)
        factor, scale_df = understatement(stat, null, calibrate_on)
        null = NullDistribution(null.scale * factor, null.df, scale_df)
        new = NullDistribution(new.scale * factor, new.df, scale_df)
    log_p = null.log_sf(stat)
    if not np.any(null.df > 0):  # the subspace is everything: nobody can be told apart
        adjusted = np.ones(n_clients)
    else:
        adjusted = multipletests(np.exp(log_p), alpha=level, method=correction)[1]
    return _Round(members, mean, basis, stat, null, new, log_p, adjusted, adjusted <= level)


def _new_client_given_null(noise, weights, members, basis):
    """A new client's null: the members' average covariance, plus the mean's share.

    A new client's own covariance is not known; it is taken as the members' average
    ``(1/m) sum_j C_j (x) R_j``, so ``Sigma = sum_j (1/m + a_j^2) C_j (x) Q R_j Q``.
    """
    index = np.flatnonzero(members)
    a = _mean_weights(weights, members)
    coefficients = np.sqrt(1.0 / len(index) + a ** 2)
    g, h = satterthwaite(*kronecker_moments(noise.cov.subset(index), basis, coefficients))
    return NullDistribution(np.array([g]), np.array([h]))


@dataclass(frozen=True)
class CollaborativeFit:
    """The detection's result: one fit on one collaborative set, and every client's test.

    Every attribute comes from the same fit: ``mean`` is the weighted mean of
    ``members``, ``basis`` their refitted subspace, ``statistics`` and ``log_p`` every
    client's out-of-sample test against them (a member against a refit without it),
    ``adjusted`` the p-values corrected over the clients, ``contaminated`` the clients
    outside ``members``. ``converged`` is ``False`` when the refit-and-test loop did not
    reach a set that its own test reproduces (then some clients are left out of the
    collaborative set although their test does not reject them: see
    :func:`detect_clients`).

    Attributes
    ----------
    members : ndarray of bool, shape (n_clients,)
    mean : ndarray of shape (p, q) (or a FactoredMean)
    basis : ndarray of shape (p, rank)
    statistics, log_p, adjusted : ndarray of shape (n_clients,)
    null : NullDistribution
        Of the training clients' statistics.
    new_client_null : NullDistribution
        Of a new client's statistic against ``mean`` and ``basis``.
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
    new_client_null: NullDistribution
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
        """Log p-values of new clients tested one by one against the collaborative fit."""
        stat = projection_statistics(blocks, self.mean, self.basis)
        null = NullDistribution(np.full(len(stat), self.new_client_null.scale[0]),
                                np.full(len(stat), self.new_client_null.df[0]),
                                self.new_client_null.scale_df)
        return null.log_sf(stat), stat

    def refine(self, blocks, contaminated):
        """``P Theta_k + (I - P) mean`` for the others; ``contaminated`` ones unchanged."""
        return refine(blocks, self.basis, self.mean, contaminated)


def _final(state, level, correction, converged, n_rounds):
    return CollaborativeFit(state.members, state.mean, state.basis, state.statistics,
                            state.log_p, state.adjusted, state.null, state.new_client_null,
                            level, correction, converged, n_rounds)


def detect_clients(blocks, weights, start, *, rank, noise, level, correction, iterate=True,
                   random_state=None):
    """Refit-and-test until the collaborative set is the one its own test keeps.

    Starting from a robust set (:func:`concentrate`, seeded by ``start``: the clients
    with S_k = 0), refit the mean and subspace on the collaborative set, test every
    client out of sample against its null (:mod:`clairstat._null`), correct the
    p-values (statsmodels' ``multipletests``) and take the clients not rejected as the
    next set, until the set repeats. If the sets cycle instead (or ``_MAX_ROUNDS``
    pass), the set shrinks to the clients of the cycle that every round kept and then
    drops, round by round, the members its own test rejects; it stops at a set all of
    whose members pass (``converged=False`` if some outsider passes too).

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

    Returns
    -------
    CollaborativeFit
    """
    n_clients = len(blocks)
    members = start.copy() if start.sum() >= 2 else np.ones(n_clients, dtype=bool)

    def test(members, calibrate_on=None):
        return _test_round(blocks, weights, members, rank, noise, level, correction,
                           random_state, members if calibrate_on is None else calibrate_on)

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
                          random_state=random_state, whitening=noise.whitening)
    # The concentrated half-set holds the smallest statistics by construction, so the
    # first calibration uses every client (the median is robust while attackers are a
    # minority); later rounds use the tested collaborative set.
    state, history = test(members, np.ones(n_clients, dtype=bool)), []
    for n_rounds in range(1, _MAX_ROUNDS + 1):
        kept = ~state.rejected
        if np.array_equal(kept, state.members):
            return _final(state, level, correction, True, n_rounds)
        if kept.sum() < 2 or any(np.array_equal(kept, seen) for seen in history):
            break
        history.append(state.members)
        state = test(kept)
    # No fixed point: keep the clients every set of the cycle agreed on, then drop the
    # members the set's own test rejects until none is.
    cycle = history[next((i for i, seen in enumerate(history)
                          if np.array_equal(seen, ~state.rejected)), 0):] + [state.members]
    members = np.logical_and.reduce(cycle)
    while members.sum() >= 2:
        state = test(members)
        n_rounds += 1
        if not np.any(state.rejected & members):
            break
        members = members & ~state.rejected
    if members.sum() < 2:  # nothing left to fit on: keep everyone, say so
        warnings.warn("the detection found no stable collaborative set; every client is "
                      "kept.", UserWarning, stacklevel=4)
        return _final(test(np.ones(n_clients, dtype=bool)), level, correction, False,
                      n_rounds)
    converged = np.array_equal(~state.rejected, state.members)
    if not converged:
        warnings.warn(f"the detection did not settle on a set its own test reproduces; "
                      f"clients {np.flatnonzero(~state.rejected & ~state.members).tolist()} "
                      "are left out of the collaborative set although their test does not "
                      "reject them.", UserWarning, stacklevel=4)
    return _final(state, level, correction, converged, n_rounds)


@singledispatch
def refine(blocks, basis, mean, contaminated):
    """``P Theta_hat_k + (I - P) mean`` for collaborative clients; flagged ones unchanged."""
    projected = _project(basis, blocks - mean[None])
    refined = mean[None] + projected
    refined[contaminated] = blocks[contaminated]
    return refined


refine.register(FactoredBlocks, FactoredRefined)

"""Null distributions of the per-client off-subspace tests.

A client k is compared with a mean and a subspace P fitted without it. Under the null
(k collaborative, Gaussian noise with ``cov(vec E_j) = C_j (x) R_j``, P treated as
fixed), its off-subspace residual ``N^T (E_k - sum_j a_j E_j)`` (``N`` an orthonormal
basis of the complement of P, ``a_j`` the mean's weights over the other members) is
Gaussian with covariance

    Sigma_k = C_k (x) N^T R_k N + sum_j a_j^2 C_j (x) N^T R_j N.

Two statistics, by what is known of the noise (docs/method_notes.md, section 8):

* the covariance is given (``noise_cov``, e.g. OLS's ``(X_k^T X_k)^{-1}`` and residual
  covariance, or ``noise_scale`` as ``sigma_k^2 I``): the sum of squared z-scores of
  the off-subspace residual, its null matched to the exact first two moments under the
  covariance (:class:`Standardizer`, :func:`known_standardizer`);
* it is not (the default): the plain ``||(I - P) D_k||_F^2``, a weighted sum of chi^2_1
  variables, as a scaled chi^2 whose df are those of one Kronecker shape ``C (x) R``
  shared by the clients and fitted to the collaborative clients' residuals
  (:func:`kronecker_df`), its scale matched to the median of the statistics
  (:func:`median_scale_df` carries that estimate's own error into an F).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
from scipy import stats

__all__ = ["NoiseCovariance", "NullDistribution", "PredictiveNull", "Standardizer",
           "complement_basis", "known_standardizer", "kronecker_df", "median_scale_df",
           "predictive_null", "robust_log_spread_df"]


@dataclass(frozen=True)
class NoiseCovariance:
    """Per-client noise covariance ``cov(vec E_k) = col_k (x) row_k``.

    ``row`` (n_clients, p, p) and ``col`` (n_clients, q, q); ``shared`` when every client
    has the same factors up to the scalar ``scale`` (n_clients,).
    """

    row: np.ndarray
    col: np.ndarray
    scale: np.ndarray

    @classmethod
    def isotropic(cls, variances, p, q):
        n_clients = len(variances)
        return cls(np.broadcast_to(np.eye(p), (n_clients, p, p)),
                   np.broadcast_to(np.eye(q), (n_clients, q, q)),
                   np.asarray(variances, dtype=float))

    def scaled(self, factor):
        """The covariance of the estimates multiplied by ``factor``."""
        return NoiseCovariance(self.row, self.col, self.scale * factor ** 2)

    def subset(self, index):
        return NoiseCovariance(self.row[index], self.col[index], self.scale[index])


@dataclass(frozen=True)
class NullDistribution:
    """``T_k ~ scale_k * chi^2_{df_k}`` for every client, or, when the scale was
    estimated with ``scale_df`` degrees of freedom, ``T_k / (scale_k df_k) ~
    F(df_k, scale_df)``."""

    scale: np.ndarray
    df: np.ndarray
    scale_df: float = np.inf

    def log_sf(self, statistics):
        """Log p-values; a client with zero degrees of freedom gets p = 1."""
        statistics = np.asarray(statistics, dtype=float)
        out = np.zeros(len(statistics))
        ok = (self.df > 0) & (self.scale > 0)
        ratio, df = statistics[ok] / self.scale[ok], self.df[ok]
        if np.isfinite(self.scale_df):
            out[ok] = stats.f.logsf(ratio / df, df, self.scale_df)
        else:
            out[ok] = stats.chi2.logsf(ratio, df)
        return out

    def broadcast(self, n):
        """The same null for ``n`` clients (a new clients' null has one entry)."""
        return NullDistribution(np.full(n, self.scale[0]), np.full(n, self.df[0]),
                                self.scale_df)


#: Asymptotic efficiency of the MAD as a normal scale estimate: its squared error is that
#: of a chi-square scale with ``MAD_EFFICIENCY * m`` degrees of freedom from m values.
MAD_EFFICIENCY = 0.37


@dataclass(frozen=True)
class PredictiveNull:
    """Each statistic predicted from the others': a Student t of the cube roots.

    ``y_k = (T_k / relative_k)^(1/3)`` is close to normal for a scaled chi^2 of any
    degrees of freedom (Wilson and Hilferty, 1931) and for sums of such (not for the
    product of two: a rank-1 update whose factors both carry noise keeps a heavier
    right tail, docs/method_notes.md section 8); under the null it is one more draw of
    the calibration clients' ``y``. With their median ``center_k`` and MAD ``s_k`` (client k left out,
    m values), ``(y_k - center_k) / (s_k sqrt(1 + pi / (2 m)))`` is referred to Student's
    t with ``df_k = MAD_EFFICIENCY * m`` degrees of freedom: the median's and the MAD's
    own sampling errors widen the null, where a scaled chi^2 fitted to the same values
    treats its degrees of freedom as known (docs/method_notes.md, section 8).

    ``spread`` is ``s_k sqrt(1 + pi / (2 m))``, floored at the round-off's; a client with
    ``df == 0`` (fewer than ``MIN_OTHERS`` others to predict from) gets p = 1.
    """

    relative: np.ndarray
    center: np.ndarray
    spread: np.ndarray
    df: np.ndarray

    def log_sf(self, statistics):
        """Log p-values (upper tail: a statistic above the prediction)."""
        statistics = np.asarray(statistics, dtype=float)
        out = np.zeros(len(statistics))
        ok = (self.df > 0) & (self.spread > 0)
        z = (np.cbrt(statistics[ok] / self.relative[ok]) - self.center[ok]) / self.spread[ok]
        out[ok] = stats.t.logsf(z, self.df[ok])
        return out

    def broadcast(self, n):
        """The same null for ``n`` clients (a new clients' null has one entry)."""
        return PredictiveNull(*(np.full(n, field[0]) for field in
                                (self.relative, self.center, self.spread, self.df)))


#: The fewest other clients a statistic is predicted from.
MIN_OTHERS = 3
#: Small-sample consistency factors of the MAD (Croux and Rousseeuw, 1992) where the
#: large-sample 1.4826 alone left the test liberal: with three values the MAD is the
#: smaller of the two deviations from the median, and BH at 5% over four benign
#: clients rejected in 0.080 [0.072, 0.089] of the replicates (exact chi^2 statistics;
#: benchmarks/lora_null_calibration.py, part D); with the factor, 0.054 [0.047, 0.061].
#: From four others the level held without one (0.033 and 0.052 at five and six
#: clients); the factors there (1.36 to 1.1) would only make the test more conservative.
MAD_SMALL_SAMPLE = {3: 1.495}


def _predict_from(values, floor):
    """``(center, spread, df)`` of one more draw from the distribution of ``values``."""
    m = len(values)
    if m < MIN_OTHERS:
        return 0.0, 0.0, 0.0
    center = float(np.median(values))
    mad = 1.4826 * MAD_SMALL_SAMPLE.get(m, 1.0) * float(np.median(np.abs(values - center)))
    return center, max(mad * np.sqrt(1.0 + np.pi / (2.0 * m)), floor), MAD_EFFICIENCY * m


def predictive_null(statistics, relative, calibrate_on, floor, relative_new=1.0):
    """:class:`PredictiveNull` of every client, and one for new clients.

    Parameters
    ----------
    statistics, relative : ndarray of shape (n_clients,)
        The statistics and their relative null scales (a client's noise variance and the
        mean's share, over the clients' average).
    calibrate_on : ndarray of bool
        The clients whose statistics the null is read from; each client is predicted
        from the others of them, a new client from all of them.
    floor : float
        The statistics' round-off (their scale when the noise is below it): the
        spread of the cube roots is never below its cube root, so that round-off does
        not count as evidence.
    relative_new : float
        A new client's relative null scale.

    Returns
    -------
    null : PredictiveNull
    new : PredictiveNull
        One entry.
    """
    statistics = np.asarray(statistics, dtype=float)
    relative = np.asarray(relative, dtype=float)
    y = np.cbrt(statistics / relative)
    floor_y = float(np.cbrt(floor))
    n = len(y)
    center, spread, df = np.zeros(n), np.zeros(n), np.zeros(n)
    for k in range(n):
        others = calibrate_on.copy()
        others[k] = False
        center[k], spread[k], df[k] = _predict_from(y[others], floor_y)
    new = _predict_from(y[calibrate_on], floor_y)
    return (PredictiveNull(relative, center, spread, df),
            PredictiveNull(*(np.array([v], dtype=float) for v in (relative_new, *new))))


def _trace_moments(samples):
    """Unbiased ``tr Sigma^2`` and ``(tr Sigma)^2`` from centred Gaussian rows.

    For ``S = X^T X / n``: ``E tr S^2 = (1 + 1/n) tr Sigma^2 + (tr Sigma)^2 / n`` and
    ``E (tr S)^2 = (tr Sigma)^2 + 2 tr Sigma^2 / n``; solved for the two unknowns. The
    plug-in ``tr S^2`` overstates ``tr Sigma^2`` (by ``(tr Sigma)^2 / n``), which would
    understate the effective degrees of freedom when n is small against the dimension.
    """
    n = samples.shape[0]
    gram = samples.T @ samples / n
    a, b = float(np.sum(gram * gram)), float(np.trace(gram)) ** 2
    second = max((a - b / n) / (1.0 + 1.0 / n - 2.0 / n ** 2), 0.0)
    return second, b - 2.0 * second / n, gram


def _inv_sqrt(matrix):
    vals, vecs = np.linalg.eigh(matrix)
    floor = max(vals.max(initial=0.0), np.finfo(float).tiny) * 1e-8
    return (vecs / np.sqrt(np.maximum(vals, floor))) @ vecs.T


def kronecker_df(residuals, n_sweeps=3):
    """Effective degrees of freedom of ``||D||_F^2`` under a shared ``C (x) R`` shape.

    Parameters
    ----------
    residuals : ndarray of shape (n, d, q)
        ``N^T D_k``: the clients' residuals in an orthonormal basis of the complement of
        the subspace (d = p - r).

    Returns
    -------
    df : float
        ``(tr R)^2 (tr C)^2 / (tr R^2 tr C^2)``, between 1 and ``d q``.

    Notes
    -----
    Flip-flop (the matrix-normal maximum likelihood iteration): each sweep whitens one
    side with the current estimate of the other and takes the sample covariance of the
    columns (or rows) of all residuals; the squared traces are then estimated without
    the plug-in bias (:func:`_trace_moments`).
    """
    n, d, q = residuals.shape
    col = np.eye(q)
    for _ in range(n_sweeps):
        by_column = (residuals @ _inv_sqrt(col)).transpose(0, 2, 1).reshape(n * q, d)
        row = _trace_moments(by_column)[2]
        by_row = (_inv_sqrt(row) @ residuals).reshape(n * d, q)
        col = _trace_moments(by_row)[2]
    row_second, row_square, _ = _trace_moments(by_column)
    col_second, col_square, _ = _trace_moments(by_row)
    ratio = [min(max(sq / sec, 1.0), dim) if sec > 0 else float(dim)
             for sq, sec, dim in ((row_square, row_second, d), (col_square, col_second, q))]
    return float(ratio[0] * ratio[1])


def median_scale_df(df, n_values):
    """Degrees of freedom of a scale read off the median of n ``chi^2_df / df`` values.

    The sample median has variance ``1 / (4 n f(m)^2)`` (f the density at the median
    m); a scale estimate with that relative variance behaves like ``chi^2_d2 / d2`` with
    ``d2 = 2 m^2 / var``. The statistic over the estimated scale is then ``F(df, d2)``,
    not ``chi^2_df / df``: with few clients the estimated scale is itself uncertain,
    and ignoring it flags benign clients.
    """
    med = stats.chi2.median(df) / df
    density = df * stats.chi2.pdf(med * df, df)
    return 8.0 * n_values * (density * med) ** 2


def _log_chi2_mad(df):
    """MAD of ``log(chi^2_df)`` for each entry of ``df`` (an array), by bisection.

    ``a`` solves ``F(m e^a) - F(m e^-a) = 1/2`` (F the chi^2 CDF, m its median); the
    left side rises with ``a``. Vectorised over ``df``: the table of
    :func:`_log_chi2_mad_table` costs one bisection, not one per entry.
    """
    df = np.asarray(df, dtype=float)
    median = stats.chi2.median(df)
    low, high = np.zeros_like(df), np.full_like(df, 64.0)  # e^64: beyond any df's mass
    for _ in range(80):  # the bracket halves: 64 / 2^80, below float64's resolution
        mid = 0.5 * (low + high)
        inside = (stats.chi2.cdf(median * np.exp(mid), df)
                  - stats.chi2.cdf(median * np.exp(-mid), df))
        low, high = np.where(inside < 0.5, mid, low), np.where(inside < 0.5, high, mid)
    return 0.5 * (low + high)


#: The smallest and largest df :func:`robust_log_spread_df` reads off a spread; beyond
#: the largest, the normal limit ``MAD = 0.6745 sqrt(2 / df)`` is within 0.1% of it.
SPREAD_DF_RANGE = (0.05, 1e4)
_MAD_TABLE = {}


def _log_chi2_mad_table():
    """``(log df, log MAD)`` on a grid over :data:`SPREAD_DF_RANGE` (cached)."""
    if not _MAD_TABLE:
        log_df = np.linspace(*np.log(SPREAD_DF_RANGE), 400)
        _MAD_TABLE["table"] = (log_df, np.log(_log_chi2_mad(np.exp(log_df))))
    return _MAD_TABLE["table"]


def robust_log_spread_df(values):
    """Degrees of freedom implied by the spread of ``log(values)`` (MAD), or inf.

    The df whose ``log(chi^2_df)`` has the MAD of ``log(values)`` (the MAD resists just
    under half the values being attackers): a second, model-free look at how heavy the
    statistics' spread is (real data are not exactly Gaussian). The MAD is matched
    exactly (:func:`_log_chi2_mad`, interpolated on a grid), not through the normal
    limit ``sd = sqrt(2 / df)``, which holds for large df only: ``log(chi^2_1)`` spreads
    as the limit's 0.61 df, so that chi^2_1 statistics read as far heavier than they
    are and their null was widened into an F whose tail hid a client 60 standard errors
    off (a review: an intercept-only model, ten sites). Between
    :data:`SPREAD_DF_RANGE`; above it the normal limit.
    """
    positive = values[values > 0]
    if len(positive) < 8:
        return np.inf
    log_values = np.log(positive)
    mad = float(np.median(np.abs(log_values - np.median(log_values))))
    if mad <= 0:
        return np.inf
    log_df, log_mad = _log_chi2_mad_table()
    if np.log(mad) <= log_mad[-1]:  # the normal limit: MAD = 0.6745 sqrt(2 / df)
        return 2.0 / (1.4826 * mad) ** 2
    # log MAD falls as df rises: interpolate on the reversed (increasing) grid
    return float(np.exp(np.interp(np.log(mad), log_mad[::-1], log_df[::-1])))


# -- standardized statistics with a known covariance -------------------------------------
@dataclass(frozen=True)
class Standardizer:
    """The off-subspace residual with each row and output divided by its noise scale.

    ``T = ||diag(1/row) (I - U U^T) D diag(1/col)||_F^2`` for a residual block ``D``: a
    sum of squared z-scores, so that rows (intercept against slopes) and outputs on
    different scales weigh alike. Full whitening by the inverse covariance would be the
    most powerful test if the covariance were exact, but an estimated one (OLS's
    classical covariance under heteroscedastic errors, or a noisy sandwich) is inverted
    along its smallest, least reliable directions: on the real-data splits of
    ``benchmarks/real_data_calibration.py`` it flagged benign clients in 10-40% of the
    splits even with the true rank and mean, against 3-23% for the z-scores.
    ``scale`` and ``df`` are the statistic's Satterthwaite null, ``scale * chi^2_df``,
    under the covariance.
    """

    basis: np.ndarray
    row: np.ndarray
    col: np.ndarray
    scale: float
    df: float

    def statistics(self, resid):
        """Statistics of residual blocks ``resid`` (n, p, q)."""
        off = resid - self.basis @ (self.basis.T @ resid)
        z = off / self.row[None, :, None] / self.col[None, None, :]
        return np.einsum("kpq,kpq->k", z, z)


def _projected(basis, rows):
    """``Q R_j Q`` for ``Q = I - U U^T``, batched, without forming Q."""
    ru = rows @ basis                                                     # (n, p, r)
    return rows - basis @ ru.transpose(0, 2, 1) - ru @ basis.T + \
        basis @ (basis.T @ ru) @ basis.T


def known_standardizer(cov, basis, coefficients):
    """:class:`Standardizer` of ``sum_j c_j E_j`` for independent ``E_j ~ C_j (x) R_j``.

    The row and output scales factor the entries' variances,
    ``var(D_il) ~ row_i^2 col_l^2`` (exact when the clients' factors are proportional);
    the null matches the exact first two moments of the statistic,
    ``tr Sigma = sum_j b_j tr C~_j tr R~_j`` and
    ``tr Sigma^2 = sum_ij b_i b_j tr(C~_i C~_j) tr(R~_i R~_j)`` (``b_j = c_j^2`` times the
    client's scale, ``R~_j`` and ``C~_j`` the projected and standardised factors).
    """
    b = coefficients ** 2 * cov.scale
    rows = _projected(basis, np.asarray(cov.row, dtype=float))
    cols = np.asarray(cov.col, dtype=float)
    p, q = rows.shape[1], cols.shape[1]
    tr_rows = np.trace(rows, axis1=1, axis2=2)
    tr_cols = np.trace(cols, axis1=1, axis2=2)
    row_var = np.einsum("j,jii->i", b * tr_cols / q, rows)
    # A row the subspace takes (nearly) whole has only round-off left: it is out of the
    # test, judged against its variance before the projection.
    row_var_before = np.einsum("j,jii->i", b * tr_cols / q, np.asarray(cov.row, dtype=float))
    col_var = np.einsum("j,jll->l", b * tr_rows / max(p, 1), cols)
    col_var /= max(np.mean(col_var), np.finfo(float).tiny)
    row = np.sqrt(np.where(row_var > 1e-10 * row_var_before, row_var, np.inf))
    # positive unless no row is left to test (rank p): then the test has no df anyway
    col = np.sqrt(np.where(col_var > 0, col_var, 1.0))
    rows_s = rows / row[None, :, None] / row[None, None, :]
    cols_s = cols / col[None, :, None] / col[None, None, :]
    t_r = np.trace(rows_s, axis1=1, axis2=2)
    t_c = np.trace(cols_s, axis1=1, axis2=2)
    mean = float(np.sum(b * t_r * t_c))
    gram = np.einsum("ipq,jpq->ij", rows_s, rows_s) * np.einsum("ipq,jpq->ij", cols_s, cols_s)
    second = float(b @ gram @ b)
    if not (mean > 1e-12 and second > 0):  # nothing left to test (the subspace is all)
        return Standardizer(basis, row, col, 0.0, 0.0)
    return Standardizer(basis, row, col, second / mean, mean / second * mean)


def complement_basis(basis):
    """Orthonormal basis (p, p - r) of the complement of ``col(basis)``."""
    p, rank = basis.shape
    if rank == 0:
        return np.eye(p)
    return scipy.linalg.null_space(basis.T) if rank < p else np.zeros((p, 0))

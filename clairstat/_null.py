"""Null distributions of the per-client off-subspace statistics.

A client k is tested with ``T_k = ||(I - P)(Theta_hat_k - mean)||_F^2``, where the mean
and the subspace P are fitted without it. Under the null (k collaborative, Gaussian
noise with ``cov(vec E_j) = C_j (x) R_j``, P treated as fixed), the residual
``D_k = Q (E_k - sum_j a_j E_j)`` (``Q = I - P``, ``a_j`` the mean's weights over the other
members) is Gaussian with covariance

    Sigma_k = C_k (x) Q R_k Q + sum_j a_j^2 C_j (x) Q R_j Q,

so ``T_k`` is a weighted sum of chi^2_1 variables. Its exact first two moments,
``tr Sigma_k = sum_j b_j tr C_j tr(Q R_j)`` and
``tr Sigma_k^2 = sum_{i,j} b_i b_j tr(C_i C_j) tr(Q R_i Q R_j)`` (``b_k = 1``,
``b_j = a_j^2``), fix the scaled chi^2 ``g chi^2_h`` with the same mean and variance
(Satterthwaite): ``g = tr Sigma^2 / tr Sigma``, ``h = (tr Sigma)^2 / tr Sigma^2``.
docs/method_notes.md (section "The null of the per-client test") derives it.

Three ways to know the covariance:

* given (``noise_cov``, e.g. OLS's ``(X_k^T X_k)^{-1}`` and residual covariance): the
  moments above, nothing estimated;
* given as a per-entry scale (``noise_scale``): ``R_j = sigma_j^2 I``, ``C_j = I``;
* estimated (the default): one Kronecker shape ``C (x) R`` shared by the clients, fitted
  to the collaborative clients' residuals (flip-flop with Ledoit-Wolf shrinkage), and its
  scale matched to the median of the statistics (robust while attackers are fewer than
  half). This keeps outputs, and rows, on different scales from breaking the calibration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["NoiseCovariance", "NullDistribution", "kronecker_moments", "kronecker_df",
           "median_scale_df", "robust_log_spread_df", "satterthwaite"]


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


def _complement_traces(basis, row):
    """``Q R_j Q`` for ``Q = I - U U^T`` (batched), without forming Q."""
    ru = row @ basis                                  # (J, p, r)
    utru = basis.T @ ru                               # (J, r, r)
    projected = row - basis @ ru.transpose(0, 2, 1) - ru @ basis.T
    return projected + basis @ utru @ basis.T


def kronecker_moments(cov, basis, coefficients):
    """First two moments of ``||Q sum_j c_j E_j||_F^2`` for independent ``E_j``.

    Parameters
    ----------
    cov : NoiseCovariance
        Of the clients that enter (in the order of ``coefficients``).
    basis : ndarray of shape (p, r)
    coefficients : ndarray of shape (n,)
        ``c_j`` (1 for the tested client, ``-a_j`` for the mean's members).

    Returns
    -------
    mean, second : float
        ``tr Sigma`` and ``tr Sigma^2``.
    """
    b = coefficients ** 2 * cov.scale
    row_q = _complement_traces(basis, np.asarray(cov.row))
    tr_row = np.trace(row_q, axis1=1, axis2=2)
    tr_col = np.trace(cov.col, axis1=1, axis2=2)
    mean = float(np.sum(b * tr_row * tr_col))
    gram_row = np.einsum("ipq,jpq->ij", row_q, row_q)  # tr(A B) = sum(A * B^T), A, B symmetric
    gram_col = np.einsum("ipq,jpq->ij", cov.col, cov.col)
    second = float(b @ (gram_row * gram_col) @ b)
    return mean, second


def satterthwaite(mean, second):
    """``(g, h)`` of the scaled chi^2 with the given mean and ``tr Sigma^2``."""
    if mean <= 0 or second <= 0:
        return 0.0, 0.0
    return second / mean, mean ** 2 / second


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


def robust_log_spread_df(values):
    """Degrees of freedom implied by the spread of ``log(values)`` (MAD), or inf.

    ``log(chi^2_nu / nu)`` has sd about ``sqrt(2 / nu)``; the MAD resists just under half
    the values being attackers. A second, model-free look at how heavy the statistics'
    spread is (real data are not exactly Gaussian).
    """
    positive = values[values > 0]
    if len(positive) < 8:
        return np.inf
    log_sd = 1.4826 * np.median(np.abs(np.log(positive) - np.median(np.log(positive))))
    return max(2.0 / log_sd ** 2, 0.05) if log_sd > 0 else np.inf

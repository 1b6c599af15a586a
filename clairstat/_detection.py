"""Collaborative-set detection, subspace refit and refinement (method.md section 3)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats
from sklearn.utils.extmath import randomized_svd
from statsmodels.stats.multitest import multipletests

from ._objective import stack_blocks

__all__ = ["weighted_mean", "refit_subspace", "select_rank", "projection_statistics",
           "test_clients", "refine"]

_MAX_ROUNDS = 25


def weighted_mean(blocks, weights):
    """``sum_k w_k Theta_k / sum_k w_k`` over the given clients."""
    return np.tensordot(weights / weights.sum(), blocks, axes=1)


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


def select_rank(blocks, weights, noise_scale):
    """Rank rule: singular values of the centred collaborative stack above the noise edge.

    A p x (q m) matrix of i.i.d. N(0, sigma^2) entries has its largest singular value near
    ``sigma (sqrt(p) + sqrt(q m))``; directions above 1.1 times that edge are kept.
    """
    n_clients, p, q = blocks.shape
    sing = _left_singular(_centred_stack(blocks, weights))[1]
    edge = 1.1 * noise_scale * (np.sqrt(p) + np.sqrt(q * n_clients))
    return int(np.sum(sing > edge))


def refit_subspace(blocks, weights, rank, random_state=None):
    """Top ``rank`` left singular vectors of the centred collaborative estimates.

    Returns
    -------
    basis : ndarray of shape (p, rank)
    """
    stacked = _centred_stack(blocks, weights)
    if rank == 0:
        return np.zeros((stacked.shape[0], 0))
    if min(stacked.shape) > 500 and rank < min(stacked.shape) // 4:
        return randomized_svd(stacked, rank, random_state=random_state)[0]
    return _left_singular(stacked)[0][:, :rank]


def _project(basis, blocks):
    """``P X_k`` for every block, as two thin products (never the p x p projector)."""
    return basis @ (basis.T @ blocks)


def projection_statistics(blocks, mean, basis):
    """``||(I - P)(Theta_hat_k - mean)||_F^2`` for every client."""
    resid = blocks - mean[None]
    resid = resid - _project(basis, resid)
    return np.einsum("kpq,kpq->k", resid, resid)


@dataclass
class TestOutcome:
    """What the refit-and-test loop ends with."""

    contaminated: np.ndarray
    p_values: np.ndarray
    log_p_values: np.ndarray
    statistics: np.ndarray
    basis: np.ndarray
    mean: np.ndarray
    noise_scale: np.ndarray
    degrees_of_freedom: int
    n_rounds: int


def _noise_from_collaborators(stat, members, df):
    """Median-based sigma^2 (in-sample residuals shrink by 1 - 1/|C|)."""
    shrink = 1.0 - 1.0 / members.sum()
    median_ratio = stats.chi2.median(df) / df
    return float(np.median(stat[members]) / (df * shrink * median_ratio))


def _fit_on(blocks, weights, members, rank, noise, random_state):
    """Mean, rank and basis refitted on the current collaborative set."""
    sub_blocks, sub_weights = blocks[members], weights[members]
    n_members, p, q = sub_blocks.shape
    max_rank = min(p, q * (n_members - 1))
    if rank is None:
        rank = min(select_rank(sub_blocks, sub_weights, float(np.sqrt(np.mean(noise ** 2)))),
                   max_rank)
    elif rank > max_rank:
        warnings.warn(f"rank={rank} exceeds what {n_members} collaborative clients support; "
                      f"using {max_rank}.", UserWarning, stacklevel=4)
        rank = max_rank
    basis = refit_subspace(sub_blocks, sub_weights, rank, random_state)
    return weighted_mean(sub_blocks, sub_weights), basis


def test_clients(blocks, weights, start, *, rank, noise_scale, level, correction,
                 estimate_noise, random_state=None):
    """Refit-and-test until the collaborative set stops changing.

    Starting from ``start`` (clients with S_k = 0), refit the mean and subspace on the
    collaborative set, compute every client's off-subspace statistic
    ``T_k = ||(I - P)(Theta_hat_k - mean)||^2 / (sigma_k^2 (p - r) q)``, compare it with
    chi^2_df / df, correct the p-values (statsmodels' ``multipletests``) and repeat.

    Parameters
    ----------
    blocks : ndarray of shape (n_clients, p, q)
    weights : ndarray of shape (n_clients,)
    start : ndarray of bool, shape (n_clients,)
        Initial collaborative set.
    rank : int or None
        ``None``: the rank rule of :func:`select_rank` at every round.
    noise_scale : ndarray of shape (n_clients,)
        Per-client sigma; rescaled robustly from the collaborators' statistics when
        ``estimate_noise`` (the relative scales are kept).
    level : float
    correction : str
        A ``multipletests`` method ("fdr_bh", "holm", "bonferroni", ...).
    """
    n_clients, p, q = blocks.shape
    members = start.copy() if start.sum() >= 2 else np.ones(n_clients, dtype=bool)
    noise, seen = noise_scale.astype(float), set()
    for n_rounds in range(1, _MAX_ROUNDS + 1):
        mean, basis = _fit_on(blocks, weights, members, rank, noise, random_state)
        df = (p - basis.shape[1]) * q
        stat = projection_statistics(blocks, mean, basis)
        if df == 0:  # the subspace is everything: no client can be told apart
            log_p = np.zeros(n_clients)
            break
        if estimate_noise:
            relative = noise / np.sqrt(np.mean(noise ** 2))
            noise = relative * np.sqrt(_noise_from_collaborators(stat / relative ** 2,
                                                                 members, df))
        log_p = stats.chi2.logsf(stat / noise ** 2, df)
        rejected = multipletests(np.exp(log_p), alpha=level, method=correction)[0]
        new_members = ~rejected
        key = new_members.tobytes()
        if np.array_equal(new_members, members) or key in seen or new_members.sum() < 2:
            members = new_members if new_members.sum() >= 2 else members
            break
        seen.add(key)
        members = new_members
    contaminated = ~members if df else np.zeros(n_clients, dtype=bool)
    return TestOutcome(contaminated, np.exp(log_p), log_p, stat, basis, mean, noise, df,
                       n_rounds)


def refine(blocks, basis, mean, contaminated):
    """``P Theta_hat_k + (I - P) mean`` for collaborative clients; flagged ones unchanged."""
    projected = _project(basis, blocks - mean[None])
    refined = mean[None] + projected
    refined[contaminated] = blocks[contaminated]
    return refined

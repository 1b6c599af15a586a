"""Input checks and small linear-algebra helpers shared by the rules."""

from __future__ import annotations

import numpy as np
import scipy.linalg

__all__ = ["check_factors", "check_weights", "common_rank", "stacked_factors",
           "exact_update", "dense_updates", "orthonormal_basis", "rank_tolerance"]


def check_factors(factors):
    """Validate a list of ``(B_i, A_i)`` pairs and cast them to one floating dtype.

    Returns
    -------
    factors : list of (ndarray of shape (d, r_i), ndarray of shape (r_i, k))
    """
    factors = list(factors)
    if not factors:
        raise ValueError("factors must hold at least one (B, A) pair.")
    pairs = []
    for index, pair in enumerate(factors):
        if len(pair) != 2:
            raise ValueError(f"factors[{index}] must be a (B, A) pair.")
        b_mat, a_mat = (np.asarray(m) for m in pair)
        if b_mat.ndim != 2 or a_mat.ndim != 2 or b_mat.shape[1] != a_mat.shape[0]:
            raise ValueError(f"factors[{index}]: need B (d, r) and A (r, k), got shapes "
                             f"{b_mat.shape} and {a_mat.shape}.")
        pairs.append((b_mat, a_mat))
    shapes = {(b.shape[0], a.shape[1]) for b, a in pairs}
    if len(shapes) != 1:
        raise ValueError(f"all clients must share the module shape (d, k), got {shapes}.")
    dtype = np.result_type(*[m for pair in pairs for m in pair], np.float32)
    return [(b.astype(dtype, copy=False), a.astype(dtype, copy=False)) for b, a in pairs]


def check_weights(weights, n_clients):
    """Client weights: uniform by default, non-negative and finite, normalised to sum 1.

    Examples
    --------
    >>> check_weights([1, 3], 2).tolist()
    [0.25, 0.75]
    """
    if weights is None:
        return np.full(n_clients, 1.0 / n_clients)
    weights = np.asarray(weights, dtype=float)
    if weights.shape != (n_clients,):
        raise ValueError(f"weights must have shape ({n_clients},), got {weights.shape}.")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError(f"weights must be finite and non-negative, got {weights}.")
    if weights.sum() <= 0:
        raise ValueError("weights must not all be zero.")
    return weights / weights.sum()


def common_rank(factors, rule):
    """The rank shared by every client; a ValueError names the rules that allow mixing."""
    ranks = sorted({b.shape[1] for b, _ in factors})
    if len(ranks) != 1:
        raise ValueError(f"rule {rule!r} needs equal client ranks, got ranks {ranks}; "
                         "'flora', 'glora', the robust rules and 'clair' accept mixed ranks.")
    return ranks[0]


def stacked_factors(factors, weights):
    """``[p_1 B_1, ..., p_N B_N]`` (d, sum r_i) and ``[A_1; ...; A_N]`` (sum r_i, k)."""
    left = np.hstack([w * b for (b, _), w in zip(factors, weights)])
    right = np.vstack([a for _, a in factors])
    return left, right


def exact_update(factors, weights):
    """The exact aggregate ``Delta W* = sum_i p_i B_i A_i`` of shape (d, k)."""
    left, right = stacked_factors(factors, weights)
    return left @ right


def dense_updates(factors, rows=slice(None)):
    """The client updates ``B_i A_i`` restricted to ``rows``: shape (n_clients, rows, k)."""
    return np.stack([b[rows] @ a for b, a in factors])


def rank_tolerance(matrix_shape, largest, dtype):
    """Numerical-rank threshold: ``max(shape) * eps * largest`` (numpy's matrix_rank rule)."""
    return max(matrix_shape) * np.finfo(dtype).eps * largest


def orthonormal_basis(matrix):
    """Orthonormal basis of the column space of a tall ``matrix`` (d, m), any d.

    A thin QR first (cost d m^2), then the SVD of the small m x m triangular factor
    decides the numerical rank; never forms anything d x d.

    Examples
    --------
    >>> basis = orthonormal_basis(np.array([[1.0, 2.0], [2.0, 4.0], [0.0, 0.0]]))
    >>> basis.shape
    (3, 1)
    """
    q_factor, r_factor = scipy.linalg.qr(matrix, mode="economic")
    left, singular, _ = scipy.linalg.svd(r_factor)
    if singular.size == 0 or singular[0] == 0:
        return q_factor[:, :0]
    keep = singular > rank_tolerance(matrix.shape, singular[0], matrix.dtype)
    return q_factor @ left[:, keep]

"""GLoRA: gauge-invariant aggregation through a consensus column space."""

from __future__ import annotations

import numpy as np
import scipy.linalg

from .._reduced import eckart_young_factors, orthonormal_basis, rank_tolerance, truncated_svd
from ._result import AggregationResult
from ._validation import check_integer

__all__ = ["consensus_basis", "low_rank_readout", "glora"]


def consensus_basis(factors, weights, reference_rank=None):
    """Top eigenvectors of ``K = sum p_i U_i U_i^T``, ``U_i`` a basis of col(B_i).

    Computed from the thin SVD of ``[sqrt(p_1) U_1, ..., sqrt(p_N) U_N]`` (d, sum r_i):
    its left singular vectors are K's eigenvectors and its squared singular values K's
    eigenvalues; nothing d x d is formed.

    Returns
    -------
    basis : ndarray of shape (d, R)
        ``R = min(reference_rank, union_rank)`` (the union rank when not given).
    eigenvalues : ndarray of shape (m,)
        All non-trivial eigenvalues of K, in decreasing order.
    union_rank : int
        Numerical rank of the union of the clients' column spaces.
    """
    stacked = np.hstack([np.sqrt(w) * orthonormal_basis(b)
                         for (b, _), w in zip(factors, weights)])
    left, singular, _ = scipy.linalg.svd(stacked, full_matrices=False)
    top = singular[0] if singular.size else 0.0
    union_rank = int(np.sum(singular > rank_tolerance(stacked.shape, top, stacked.dtype)))
    # Above the union rank K's further eigenvalues are 0 and their eigenvectors arbitrary
    # directions outside every client's column space: the basis stops at the union rank
    # (it took min(R, d, sum r_i) columns, against the documented cap: an audit).
    rank = union_rank if reference_rank is None else min(int(reference_rank), union_rank)
    return left[:, :rank], singular**2, union_rank


def low_rank_readout(basis, coefficients, rank):
    """Best rank-``rank`` factors of ``basis @ coefficients`` (Eckart-Young).

    With ``coefficients = U S V^T`` (small SVD), ``B = basis U_r S_r^{1/2}`` and
    ``A = S_r^{1/2} V_r^T``; since ``basis`` has orthonormal columns, ``B A`` is the best
    rank-``rank`` approximation of ``basis @ coefficients`` in Frobenius norm
    (:func:`clairstat._reduced.eckart_young_factors`: zero-padded to ``rank`` columns
    when ``coefficients`` has fewer singular values).

    Examples
    --------
    >>> b, a = low_rank_readout(np.eye(3), np.diag([3.0, 2.0, 1.0]), 2)
    >>> np.round(b @ a, 12).tolist()
    [[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]]
    """
    return eckart_young_factors(truncated_svd(coefficients, rank), rank, basis)


def glora(factors, weights, reference_rank=None, readout_rank=None):
    """GLoRA: project every update on a consensus subspace, average, read out factors.

    Parameters
    ----------
    factors : list of (ndarray of shape (d, r_i), ndarray of shape (r_i, k))
        Ranks may differ.
    weights : ndarray of shape (n_clients,)
    reference_rank : int, optional
        R, the dimension of the consensus subspace (a positive integer; above the union
        rank it is the union rank); default: the union rank (exact).
    readout_rank : int, optional
        Rank of the returned global factors, in ``[1, min(d, k)]`` (else ValueError);
        default ``max r_i``.

    Returns
    -------
    AggregationResult
        ``update = U_ref C_bar`` with ``C_bar = sum p_i U_ref^T B_i A_i``; ``factors`` the
        rank-``readout_rank`` readout; extras ``reference_basis`` (d, R),
        ``coefficients`` (R, k), ``consensus_eigenvalues``, ``union_rank``.

    Notes
    -----
    A gauge ``(B_i G_i, G_i^{-1} A_i)`` changes neither col(B_i) nor ``B_i A_i``, so the
    update is gauge-invariant (given an eigengap of K at R). When R is at least the union
    rank, ``U_ref U_ref^T B_i = B_i`` and the update is exact; otherwise the error is
    ``(I - P_ref) Delta W*``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> f = [(rng.standard_normal((5, 1)), rng.standard_normal((1, 4))) for _ in range(2)]
    >>> res = glora(f, np.array([0.5, 0.5]))
    >>> bool(np.allclose(res.update, 0.5 * (f[0][0] @ f[0][1] + f[1][0] @ f[1][1])))
    True
    """
    if reference_rank is not None:
        check_integer("reference_rank", reference_rank)
        if reference_rank < 1:
            raise ValueError(f"reference_rank must be a positive integer, "
                             f"got {reference_rank}.")
    largest = min(factors[0][0].shape[0], factors[0][1].shape[1])  # min(d, k)
    if readout_rank is not None:  # -1 gave rank 4 silently, 10**6 huge factors: a review
        check_integer("readout_rank", readout_rank)
        if not 1 <= readout_rank <= largest:
            raise ValueError(f"readout_rank must lie in [1, min(d, k) = {largest}], "
                             f"got {readout_rank}.")
    basis, eigenvalues, union_rank = consensus_basis(factors, weights, reference_rank)
    coefficients = sum(w * ((basis.T @ b) @ a) for (b, a), w in zip(factors, weights))
    rank = max(b.shape[1] for b, _ in factors) if readout_rank is None else readout_rank
    readout = low_rank_readout(basis, coefficients, int(rank))
    return AggregationResult("glora", basis @ coefficients, readout, weights,
                             {"reference_basis": basis, "coefficients": coefficients,
                              "consensus_eigenvalues": eigenvalues, "union_rank": union_rank})

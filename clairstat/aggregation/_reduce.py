"""Exact reduction of LoRA updates to the span of their factors.

Every update ``B_i A_i`` lies in ``col([B_1, ..., B_N]) x row([A_1; ...; A_N])``. With
orthonormal bases Q (d, s) and V (k, t) of these spans, ``B_i A_i = Q (Q^T B_i A_i V) V^T``
exactly, and s, t <= sum r_i whatever d and k are. Computations that only take linear
combinations of the updates and depend on them through Frobenius inner products and
orthogonally invariant norms (CLAIR's decomposition, refit and refinement) can run on
the small (s, t) blocks and map back with Q and V.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._validation import check_factors, orthonormal_basis

__all__ = ["ReducedFactors", "ReducedStack", "factored_reduction", "reduce_factors"]


class ReducedFactors(NamedTuple):
    """Output of :func:`reduce_factors` and :func:`factored_reduction`.

    Attributes
    ----------
    left_basis : ndarray of shape (d, s)
        Orthonormal basis Q of the span of all B_i.
    right_basis : ndarray of shape (k, t), or tuple of (k, t_i) when ``backbone=False``
        Orthonormal basis V of the span of all A_i^T (or one basis V_i per client).
    updates : ndarray of shape (n_clients, s, t), list of (s, t_i), or FactoredBlocks
        Reduced updates ``Q^T B_i A_i V`` (or ``Q^T B_i A_i V_i``; or, from
        :func:`factored_reduction`, ``Y_i R_i`` in factored form).
    """

    left_basis: np.ndarray
    right_basis: np.ndarray
    updates: np.ndarray

    def expand(self, reduced):
        """Map a reduced (s, t) matrix, or a stack (n, s, t), back to (d, k): ``Q X V^T``."""
        if isinstance(self.right_basis, tuple):
            raise ValueError("expand needs the shared right basis of backbone=True.")
        return self.left_basis @ np.asarray(reduced) @ self.right_basis.T


def _span_basis(matrix):
    """:func:`orthonormal_basis` of ``matrix`` (m, n), or the unit vector e_1 (m, 1) when
    its span is {0} (every B_i, or every A_i, is zero, as in fresh adapters): the reduced
    updates are then exactly 0 of size at least 1 instead of an empty array."""
    basis = orthonormal_basis(matrix)
    if basis.shape[1] == 0:
        basis = np.eye(matrix.shape[0], 1, dtype=basis.dtype)
    return basis


def reduce_factors(factors, backbone=True):
    """Orthonormal bases of the factors' spans and the updates in those coordinates.

    Parameters
    ----------
    factors : list of (ndarray of shape (d, r_i), ndarray of shape (r_i, k))
    backbone : bool, default=True
        With a common backbone (or any cross-client average, as in CLAIR's refinement)
        the right basis must span every client's row space (method, section 2): one V
        for all. ``False`` gives each client the basis of its own row space (enough for
        the decomposition without backbone; blocks then have different widths).

    Returns
    -------
    ReducedFactors
        ``(left_basis, right_basis, updates)``; ``1 <= s, t <= sum r_i`` (a span that is
        {0}, all updates zero, is kept as one unit vector: the updates reduce to zeros).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> f = [(rng.standard_normal((50, 2)), rng.standard_normal((2, 40))) for _ in range(3)]
    >>> red = reduce_factors(f)
    >>> red.updates.shape
    (3, 6, 6)
    >>> bool(np.allclose(red.expand(red.updates[1]), f[1][0] @ f[1][1]))
    True
    """
    factors = check_factors(factors)
    left = _span_basis(np.hstack([b for b, _ in factors]))
    small_left = [left.T @ b for b, _ in factors]
    if not backbone:
        rights = tuple(_span_basis(a.T) for _, a in factors)
        blocks = [sl @ (a @ v) for sl, (_, a), v in zip(small_left, factors, rights)]
        return ReducedFactors(left, rights, blocks)
    right = _span_basis(np.vstack([a for _, a in factors]).T)
    blocks = np.stack([sl @ (a @ right) for sl, (_, a) in zip(small_left, factors)])
    return ReducedFactors(left, right, blocks)


def factored_reduction(factors):
    """The updates as a :class:`clairstat._factored.FactoredBlocks` stack, exactly.

    With Q (d, s) and V (k, t) the orthonormal bases of all ``B_i`` and all ``A_i^T``,
    ``A_i = (A_i V) V^T``; a thin QR ``(A_i V)^T = W_i T_i`` gives
    ``B_i A_i = Q Y_i W_i^T V^T`` with ``Y_i = Q^T B_i T_i^T`` (s, r_i) and ``W_i^T``
    (r_i, t) with orthonormal rows: each client in its own row basis, all row bases in
    the shared coordinates V. Ranks below the largest are zero-padded.

    Returns
    -------
    ReducedFactors
        ``(left_basis (d, s), right_basis (k, t), updates)`` with ``updates`` a
        FactoredBlocks stack: ``coef`` (n_clients, s, max r_i), ``rights``
        (n_clients, max r_i, t), and ``Q updates.expand(i) V^T == B_i A_i``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> f = [(rng.standard_normal((50, r)), rng.standard_normal((r, 40))) for r in (2, 3)]
    >>> left, right, stack = factored_reduction(f)
    >>> stack.shape
    (2, 5, 3)
    >>> bool(np.allclose(left @ stack.expand(0) @ right.T, f[0][0] @ f[0][1]))
    True
    """
    from .._factored import FactoredBlocks  # lazily: clairstat's modules import this package

    factors = check_factors(factors)
    left = _span_basis(np.hstack([b for b, _ in factors]))
    right = _span_basis(np.vstack([a for _, a in factors]).T)
    width = max(b.shape[1] for b, _ in factors)
    coef = np.zeros((len(factors), left.shape[1], width))
    rights = np.zeros((len(factors), width, right.shape[1]))
    for i, (b_mat, a_mat) in enumerate(factors):
        row_basis, tri = np.linalg.qr((a_mat @ right).T)  # (t, m), (m, r_i), m <= r_i
        coef[i, :, :tri.shape[0]] = (left.T @ b_mat) @ tri.T
        rights[i, :tri.shape[0]] = row_basis.T
    return ReducedFactors(left, right, FactoredBlocks(coef, rights))


class ReducedStack:
    """A stack of (d, k) matrices ``Q X_i V^T`` kept in reduced coordinates.

    Indexing expands one client (``stack[i]`` is (d, k)); ``np.asarray(stack)`` expands
    all of them, (n, d, k), which may not fit in memory for large modules.

    Examples
    --------
    >>> stack = ReducedStack(np.eye(3)[:, :1], np.ones((2, 1, 1)), np.eye(2)[:, :1])
    >>> stack.shape, stack[0].tolist()
    ((2, 3, 2), [[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    """

    def __init__(self, left_basis, reduced, right_basis):
        self.left_basis, self.reduced, self.right_basis = left_basis, reduced, right_basis

    @property
    def shape(self):
        return (len(self.reduced), self.left_basis.shape[0], self.right_basis.shape[0])

    def __len__(self):
        return len(self.reduced)

    def __getitem__(self, index):
        return self.left_basis @ self.reduced[index] @ self.right_basis.T

    def __array__(self, dtype=None, copy=None):
        full = self.left_basis @ np.asarray(self.reduced) @ self.right_basis.T
        return full if dtype is None else full.astype(dtype)

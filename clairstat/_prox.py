"""Proximal operators of the CLAIR penalties, with numpy and torch twins.

``svt`` is the prox of ``t * ||.||_*`` (singular value soft-thresholding) and
``block_soft_threshold`` the prox of ``t * sum_k ||X_k||_F`` (one group per client).
The torch twins take the same arguments and are used by the first-order solver; both
pairs are checked against each other and against brute force in the tests.
"""

from __future__ import annotations

import numpy as np

from ._reduced import uses_gram

__all__ = ["svt", "block_soft_threshold", "svt_torch", "block_soft_threshold_torch"]


def svt(matrix, threshold):
    """Singular value soft-thresholding ``argmin_L 1/2 ||L - X||_F^2 + t ||L||_*``.

    Parameters
    ----------
    matrix : ndarray of shape (m, n)
    threshold : float
        ``t >= 0``.

    Returns
    -------
    low_rank : ndarray of shape (m, n)
    singular_values : ndarray of shape (rank,)
        The singular values of ``low_rank`` (the shrunk, positive ones).

    Examples
    --------
    >>> L, s = svt(np.diag([3.0, 1.0]), 2.0)
    >>> L.round(12).tolist(), s.tolist()
    ([[1.0, 0.0], [0.0, 0.0]], [1.0])
    """
    if threshold < 0:
        raise ValueError(f"threshold must be non-negative, got {threshold}.")
    left, sing, right_t = np.linalg.svd(matrix, full_matrices=False)
    shrunk = np.maximum(sing - threshold, 0.0)
    keep = shrunk > 0
    low_rank = (left[:, keep] * shrunk[keep]) @ right_t[keep]
    return low_rank, shrunk[keep]


def block_soft_threshold(blocks, threshold):
    """Block soft-thresholding ``argmin_S 1/2 sum_k ||S_k - X_k||_F^2 + t sum_k ||S_k||_F``.

    Parameters
    ----------
    blocks : ndarray of shape (n_clients, p, q)
    threshold : float

    Returns
    -------
    shrunk : ndarray of shape (n_clients, p, q)
        Each block scaled by ``max(0, 1 - t / ||X_k||_F)``: exactly zero when
        ``||X_k||_F <= t``.

    Examples
    --------
    >>> X = np.array([[[3.0, 4.0]], [[0.3, 0.4]]])
    >>> block_soft_threshold(X, 1.0).round(12).tolist()
    [[[2.4, 3.2]], [[0.0, 0.0]]]
    """
    if threshold < 0:
        raise ValueError(f"threshold must be non-negative, got {threshold}.")
    norms = np.sqrt(np.einsum("kij,kij->k", blocks, blocks))
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(norms > threshold, 1.0 - threshold / norms, 0.0)
    return blocks * scale[:, None, None]


def svt_torch(matrix, threshold, *, method="auto"):
    """Torch twin of :func:`svt`, optionally through a Gram matrix.

    Parameters
    ----------
    matrix : torch.Tensor of shape (m, n)
    threshold : float
    method : {"auto", "svd", "gram"}
        ``"gram"`` eigen-decomposes the smaller Gram matrix (``m x m`` or ``n x n``): much
        cheaper when one side is short, accurate to ``eps * s_max^2 / s`` in each kept
        singular value ``s``, so ``"auto"`` uses it only in float64 and when the shapes
        differ by at least a factor 2.

    Returns
    -------
    low_rank : torch.Tensor of shape (m, n)
    singular_values : torch.Tensor of shape (rank,)
    """
    import torch

    m, n = matrix.shape
    if method == "auto":
        method = ("gram" if matrix.dtype == torch.float64 and uses_gram(min(m, n), max(m, n))
                  else "svd")
    if method == "svd":
        left, sing, right_t = torch.linalg.svd(matrix, full_matrices=False)
        shrunk = torch.clamp(sing - threshold, min=0.0)
        keep = shrunk > 0
        return (left[:, keep] * shrunk[keep]) @ right_t[keep], shrunk[keep]
    if method != "gram":
        raise ValueError(f"method must be 'auto', 'svd' or 'gram', got {method!r}.")
    wide = m <= n
    gram = matrix @ matrix.T if wide else matrix.T @ matrix
    eigval, eigvec = torch.linalg.eigh(gram)
    sing = torch.sqrt(torch.clamp(eigval, min=0.0))
    keep = sing > threshold
    basis, sing = eigvec[:, keep], sing[keep]
    factor = (sing - threshold) / sing
    if wide:  # L = U diag((s - t)/s) U^T X
        low_rank = (basis * factor) @ (basis.T @ matrix)
    else:     # L = X V diag((s - t)/s) V^T
        low_rank = ((matrix @ basis) * factor) @ basis.T
    return low_rank, sing - threshold


def block_soft_threshold_torch(blocks, threshold):
    """Torch twin of :func:`block_soft_threshold`."""
    import torch

    norms = torch.linalg.vector_norm(blocks, dim=(1, 2))
    scale = torch.where(norms > threshold, 1.0 - threshold / torch.clamp(norms, min=1e-300),
                        torch.zeros_like(norms))
    return blocks * scale[:, None, None]

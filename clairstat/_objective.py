"""The CLAIR objectives and their duality gaps, one formula for numpy and torch.

Blocks are stored as ``(n_clients, p, q)``; the stacked matrix of the method is
``M = [Theta_hat_1, ..., Theta_hat_K]`` of shape ``(p, n_clients * q)``
(:func:`stack_blocks`). Every function here accepts numpy arrays or torch tensors and
returns the same kind, so both solver backends are judged by the same code.
"""

from __future__ import annotations

from collections.abc import Callable

from typing import Any

import numpy as np

__all__ = ["objective", "stack_blocks", "unstack_blocks", "penalized_gap", "exact_gap"]

#: A numpy array or a torch tensor: every function here accepts either and returns the
#: same kind (torch is imported only when a tensor is passed).
Array = Any


def _is_torch(x):
    return type(x).__module__.split(".")[0] == "torch"


def _block_norms(blocks):
    if _is_torch(blocks):
        import torch
        return torch.linalg.vector_norm(blocks, dim=(1, 2))
    return np.sqrt(np.einsum("kij,kij->k", blocks, blocks))


def _singular_values(matrix):
    if _is_torch(matrix):
        import torch
        return torch.linalg.svdvals(matrix)
    return np.linalg.svd(matrix, compute_uv=False)


def _op_norm(matrix):
    """Largest singular value; through the smaller Gram matrix when the shape is long.

    The top eigenvalue of a Gram matrix is accurate to eps relative, so its square root is
    the top singular value to eps / 2 relative: as good as an SVD, at a fraction of it.
    """
    short, long_ = sorted(matrix.shape)
    if short == 0:
        return 0.0
    if long_ < 2 * short:
        return float(_singular_values(matrix).max())
    gram = matrix @ matrix.T if matrix.shape[0] == short else matrix.T @ matrix
    if _is_torch(gram):
        import torch
        top = torch.linalg.eigvalsh(gram)[-1]
    else:
        top = np.linalg.eigvalsh(gram)[-1]
    return float(max(float(top), 0.0)) ** 0.5


def _inner(a, b):
    return float((a * b).sum())


def stack_blocks(blocks: Array) -> Array:
    """``(n_clients, p, q) -> (p, n_clients * q)``, client k in columns ``k*q:(k+1)*q``.

    Examples
    --------
    >>> stack_blocks(np.arange(8).reshape(2, 2, 2)).tolist()
    [[0, 1, 4, 5], [2, 3, 6, 7]]
    """
    n_clients, p, q = blocks.shape
    moved = blocks.permute(1, 0, 2) if _is_torch(blocks) else blocks.transpose(1, 0, 2)
    return moved.reshape(p, n_clients * q)


def unstack_blocks(matrix: Array, n_clients: int) -> Array:
    """Inverse of :func:`stack_blocks`."""
    p, width = matrix.shape
    blocks = matrix.reshape(p, n_clients, width // n_clients)
    return blocks.permute(1, 0, 2) if _is_torch(blocks) else blocks.transpose(1, 0, 2)


def _residual(local_estimates, backbone, low_rank, sparse):
    return local_estimates - backbone[None] - low_rank - sparse


def objective(local_estimates: Array, backbone: Array, low_rank: Array, sparse: Array, *,
              alpha: float, beta: float) -> float:
    """Penalized CLAIR objective.

    ``1/2 sum_k ||Theta_hat_k - Theta_0 - L_k - S_k||_F^2 + alpha ||L||_* +
    beta sum_k ||S_k||_F`` with ``||L||_*`` the nuclear norm of the stacked
    ``p x (n_clients q)`` matrix.

    Parameters
    ----------
    local_estimates : ndarray of shape (n_clients, p, q)
    backbone : ndarray of shape (p, q)
        Zeros when the backbone is switched off. The second positional argument,
        before ``low_rank`` and ``sparse``.
    low_rank, sparse : ndarray of shape (n_clients, p, q)
    alpha, beta : float

    Returns
    -------
    value : float

    Examples
    --------
    >>> X = np.ones((2, 1, 1)); Z = np.zeros((2, 1, 1))
    >>> objective(X, np.zeros((1, 1)), Z, Z, alpha=1.0, beta=1.0)
    1.0
    """
    resid = _residual(local_estimates, backbone, low_rank, sparse)
    nuclear = float(_singular_values(stack_blocks(low_rank)).sum())
    return (0.5 * _inner(resid, resid) + alpha * nuclear
            + beta * float(_block_norms(sparse).sum()))


def penalized_gap(local_estimates: Array, backbone: Array, low_rank: Array, sparse: Array, *,
                  alpha: float, beta: float, fit_backbone: bool = True,
                  nuclear_norm: float | None = None,
                  op_norm: Callable | None = None) -> tuple[float, float]:
    """Duality gap of the penalized program at a primal point.

    The dual is ``max_R <R, M> - 1/2 ||R||^2`` subject to ``||R||_op <= alpha``,
    ``max_k ||R_k||_F <= beta`` and (with a free backbone) ``sum_k R_k = 0``. The primal
    residual, centred over clients when the backbone is free and rescaled into the
    constraint set, is a dual-feasible point; the gap ``P - D >= 0`` bounds the
    suboptimality of the primal point.

    ``op_norm``, if given, computes the operator norm of the stacked residual (a solver
    with its own spectral routine, e.g. Lanczos); default :func:`_op_norm`.

    Returns
    -------
    gap : float
        Absolute gap (divide by the objective for the relative gap).
    primal : float
        Objective value at the point.
    """
    resid = _residual(local_estimates, backbone, low_rank, sparse)
    if nuclear_norm is None:
        nuclear_norm = float(_singular_values(stack_blocks(low_rank)).sum())
    primal = (0.5 * _inner(resid, resid) + alpha * nuclear_norm
              + beta * float(_block_norms(sparse).sum()))
    if fit_backbone:
        resid = resid - resid.mean(0)[None]
    op_norm = (op_norm or _op_norm)(stack_blocks(resid))
    block_max = float(_block_norms(resid).max())
    scale = min(1.0, alpha / op_norm if op_norm > 0 else 1.0,
                beta / block_max if block_max > 0 else 1.0)
    dual_point = scale * resid
    dual = _inner(dual_point, local_estimates) - 0.5 * _inner(dual_point, dual_point)
    return max(primal - dual, 0.0), primal


def exact_gap(local_estimates: Array, low_rank: Array, sparse: Array, multiplier: Array, *,
              lam: float, fit_backbone: bool = True) -> tuple[float, float, Array, Array]:
    """Duality gap of the exact program at a (made feasible) primal point.

    The primal point is made feasible by setting ``Theta_0`` to the client mean of
    ``Theta_hat - L - S`` (or 0) and folding what is left into ``S``. The dual
    ``max_Y <Y, M>`` subject to ``||Y||_op <= 1``, ``||Y_k||_F <= lam`` (and
    ``sum_k Y_k = 0`` with a backbone) is evaluated at the multiplier, centred and scaled
    to the largest feasible multiple.

    Returns
    -------
    gap, primal : float
    backbone, sparse : arrays
        The feasible primal point's backbone and sparse part.
    """
    rest = local_estimates - low_rank - sparse
    backbone = rest.mean(0) if fit_backbone else rest.mean(0) * 0
    feasible_sparse = local_estimates - backbone[None] - low_rank
    nuclear = float(_singular_values(stack_blocks(low_rank)).sum())
    primal = nuclear + lam * float(_block_norms(feasible_sparse).sum())
    if fit_backbone:
        multiplier = multiplier - multiplier.mean(0)[None]
    op_norm = _op_norm(stack_blocks(multiplier))
    block_max = float(_block_norms(multiplier).max())
    value = _inner(multiplier, local_estimates)
    scale = min(1.0 / op_norm if op_norm > 0 else np.inf,
                lam / block_max if block_max > 0 else np.inf)
    dual = max(scale * value, 0.0) if np.isfinite(scale) else 0.0
    return max(primal - dual, 0.0), primal, backbone, feasible_sparse

"""A torch solver for factored LoRA stacks, with Lanczos spectra where they pay.

:func:`clairstat.aggregation.clair_modules` fits each module's factored stack
(:func:`clairstat._reduced.factored_reduction`) with it; the dense estimator keeps
:class:`clairstat.solvers.TorchSolver` as it is.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.sparse.linalg import LinearOperator

from .._objective import stack_blocks, unstack_blocks
from .._prox import svt_torch
from .._reduced import (CHECK_TOL, _oversampled, deflated_top, lanczos_pays, top_eigh,
                        warm_top_eigh)
from ..solvers._torch import TorchSolver

__all__ = ["partial_spectrum_solver"]


def partial_spectrum_solver(clair_params):
    """The torch solver for factored LoRA blocks, with Lanczos spectra where they pay.

    The decomposition of a module's factored stack works on the s x (K r) matrix
    ``[Y_1, ..., Y_K]``, square (s = K r) for clients with independent factors: neither
    side is short, so :func:`clairstat._prox.svt_torch` runs a full SVD per iteration
    and the duality gap a full ``svdvals`` per check (1600 x 1600 at K = 100, r = 16),
    while only the few singular values above ``alpha`` (and, for the gap, the largest)
    matter. :class:`_PartialSpectrumSolver` gets them from :func:`clairstat._reduced.top_eigh`
    (ARPACK Lanczos to machine precision on the Gram operator, never formed), the package's
    one rule for a few eigenpairs; singular values are then accurate to
    ``eps s_max^2 / s``, as the Gram route that ``svt_torch`` already takes in float64.
    float32 or a non-CPU device keep the parent's dense torch routines.

    ``None`` when ``clair_params`` choose another solver (a Solver instance or cvxpy).
    """
    solver = clair_params.get("solver", "auto")
    if solver not in ("auto", "torch"):
        return None
    return _PartialSpectrumSolver(max_iter=clair_params.get("max_iter", 2000),
                                  tol=clair_params.get("tol", 1e-6),
                                  device=clair_params.get("device", "cpu"),
                                  dtype=clair_params.get("dtype", "float64"))


def _gram_operator(matrix):
    """The Gram matrix of the short side of ``matrix`` (numpy) as a LinearOperator."""
    wide = matrix.shape[0] <= matrix.shape[1]
    dim = min(matrix.shape)
    if wide:
        def apply(x):
            return matrix @ (matrix.T @ x)
    else:
        def apply(x):
            return matrix.T @ (matrix @ x)
    return (LinearOperator((dim, dim), dtype=matrix.dtype, matvec=apply, matmat=apply),
            wide)


def _top_gram_eigen(matrix, threshold, guess):
    """Eigenpairs of the short-side Gram of ``matrix`` down to the first at or below
    ``threshold^2`` (Lanczos, count doubled until one is), or ``None`` where Lanczos does
    not pay (:func:`clairstat._reduced.lanczos_pays`)."""
    operator, wide = _gram_operator(matrix)
    dim, count = operator.shape[0], max(guess + 4, 6)
    while lanczos_pays(dim, count):
        eigval, eigvec = top_eigh(operator, count)  # one BLAS thread (top_eigh's rule)
        if eigval[-1] <= threshold ** 2:
            return eigval, eigvec, wide
        count *= 2
    return None


def _warm_gram_eigen(matrix, threshold, basis, *, check=True):
    """:func:`_top_gram_eigen` from the previous SVT's kept eigenvectors, or ``None``.

    Successive FISTA steps move the thresholded matrix little, so the previous step's
    kept eigenvectors (``basis``, m columns) span nearly the new ones: a block subspace
    iteration from them and a few fixed extra columns (:func:`warm_top_eigh`) returns
    the top m pairs, each under its residual certificate at the round-off floor. That
    they are the top m and that no other eigenvalue exceeds ``threshold^2`` is checked
    by the largest eigenvalue of the Gram operator deflated by them
    (:func:`clairstat._reduced.deflated_top`, to the relative residual ``CHECK_TOL``):
    below ``threshold^2`` and the m-th value by more than that margin, the answer holds
    the pairs :func:`_top_gram_eigen` would keep; otherwise ``None`` (the caller then
    runs :func:`_top_gram_eigen`, which converges ``m + 4`` pairs to machine precision,
    most of its cost going to the 4 pairs of the noise edge).

    ``check=False`` skips that check (about half the Lanczos products of a warm step):
    for the FISTA steps at which no duality gap is evaluated. Such a step is then the
    exact thresholding if the warm pairs are the top ones, and otherwise a thresholding
    that misses a direction (an inexact proximal step; FISTA's iterates may then move
    more slowly, but not to another answer); the next checked step, where the gap is
    evaluated, finds any missing direction and runs the cold Lanczos. The point the
    solver returns is always a checked step's, and the gap certifies that point alone
    (its objective, with the nuclear norm of the thresholded matrix it holds, against a
    dual point made from its residual), however the iterates reached it.
    """
    operator, wide = _gram_operator(matrix)
    dim, count = operator.shape[0], basis.shape[1]
    if basis.shape[0] != dim or not lanczos_pays(dim, count):
        return None
    found = warm_top_eigh(operator.matmat, _oversampled(basis, dim, max(8, count // 2)), count)
    if found is None:
        return None
    eigval, eigvec = found
    if check:
        rest = deflated_top(operator, eigvec)
        if not rest * (1.0 + 2.0 * CHECK_TOL) <= min(threshold ** 2, eigval[-1]):
            return None
    return eigval, eigvec, wide


#: Stacks narrower than this get their operator norm from the dense SVD (milliseconds
#: at a few hundred), not Lanczos (whose machine-precision run can take seconds on a
#: clustered top of the spectrum).
DENSE_NORM_BELOW = 512


class _PartialSpectrumSolver(TorchSolver):
    """:class:`clairstat.solvers.TorchSolver` with Lanczos SVT and operator norms.

    Same FISTA iterations, restarts, continuation and duality-gap certificate as the
    parent (:meth:`_penalized` and :meth:`_fista` are the parent's, with the operator
    norm and the SVT taken from a few Lanczos pairs, warm-started from the previous
    step's where they certify, :func:`_warm_gram_eigen`; the deflated check of a warm
    start only at the steps where the duality gap is evaluated); the exact program is
    the parent's.
    """

    _guess = 0
    _kept = None  # the previous SVT's kept eigenvectors (Gram side), a warm start

    def _solve(self, problem, init):
        import torch

        if torch.device(self.device).type != "cpu" or self.dtype != "float64":
            return super()._solve(problem, init)
        # On the CPU in float64 every step is short: Lanczos and warm subspace
        # iterations (one BLAS thread each already) and elementwise torch steps on the
        # (K, s, r) blocks, which a second thread only synchronises (the 4096 x 4096
        # module of the LoRA benchmark, 100 rank-16 clients: about 1.6 s on two threads
        # against 1.4 s on one; benchmarks/RESULTS.md, stages at both settings).
        from .._threads import thread_limits

        with thread_limits(1):
            return super()._solve(problem, init)

    def _lanczos(self, tensor):
        # ARPACK runs on the CPU; float32 keeps the dense routines: the Gram route's error
        # eps s_max^2 / s is too coarse at float32's eps (as svt_torch's own rule says).
        return (tensor.device.type == "cpu" and self.dtype == "float64"
                and lanczos_pays(min(tensor.shape), 1))

    def _op_norm(self, matrix):
        # Below DENSE_NORM_BELOW the dense norm: Lanczos to machine precision on a
        # clustered top (s2 / s1 = 0.9965) took ~15 000 products, 1.41 s against 0.006 s
        # for the dense norm of a 256 x 320 stack (a review: 116 of a module's 150 s).
        if not self._lanczos(matrix) or min(matrix.shape) < DENSE_NORM_BELOW:
            import torch
            return float(torch.linalg.matrix_norm(matrix, ord=2))
        operator, _ = _gram_operator(matrix.detach().numpy())
        return math.sqrt(max(float(top_eigh(operator, 1)[0][0]), 0.0))

    def _svt(self, blocks, threshold, *, certify=True):
        import torch
        matrix = stack_blocks(blocks)
        found = None
        if self._lanczos(matrix):
            dense = matrix.detach().numpy()
            if self._kept is not None:
                found = _warm_gram_eigen(dense, threshold, self._kept, check=certify)
            if found is None:
                found = _top_gram_eigen(dense, threshold, self._guess)
        if found is None:
            # The dense SVT (more pairs kept than Lanczos pays for): the last Lanczos
            # step's basis no longer describes the iterate and must not warm-start the
            # next step (unchecked, it would return its few pairs for a matrix of far
            # higher rank; a review's continuation case then never converged).
            self._kept = None
            low_rank, sing = svt_torch(matrix, threshold, method=self.svd_method)
            return unstack_blocks(low_rank, blocks.shape[0]), float(sing.sum())
        eigval, eigvec, wide = found
        sing = np.sqrt(np.clip(eigval, 0.0, None))
        keep = sing > threshold
        basis, sing = eigvec[:, keep], sing[keep]
        self._guess, self._kept = int(keep.sum()), basis
        factor = (sing - threshold) / sing
        # Formed block by block, (n_clients, s, r) in the blocks' own (contiguous) layout,
        # not as the stacked matrix and a permuted view of it: FISTA's elementwise steps
        # then run on contiguous operands.
        if wide:  # L_k = V diag(f) V^T Y_k
            low_rank = torch.matmul(torch.from_numpy(basis * factor),
                                    torch.matmul(torch.from_numpy(basis.T.copy()), blocks))
        else:  # L_k = (M V diag(f)) V_k^T, V_k the rows of V in client k's columns
            left = torch.from_numpy((matrix.detach().numpy() @ basis) * factor)
            rows = torch.from_numpy(basis).reshape(blocks.shape[0], blocks.shape[2], -1)
            low_rank = torch.matmul(left, rows.transpose(1, 2))
        return low_rank, float(np.sum(sing - threshold))

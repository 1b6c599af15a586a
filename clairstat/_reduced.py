"""Reduced coordinates of low-rank client updates, and the eigen-solvers they run on.

One home, below the detection (:mod:`clairstat._detection`) and the aggregation rules
(:mod:`clairstat.aggregation`), for three things:

1. **One solver rule.** Singular values and left singular vectors come from the Gram
   matrix of the short side when the long side is at least twice as long
   (:func:`uses_gram`: :func:`left_singular`, :func:`singular_values`), else from a
   thin SVD; the
   top ``count`` eigen- or singular pairs of a matrix of size ``dim`` come from
   Lanczos run to machine precision (ARPACK, ``tol=0``) when ``dim >= 100`` and
   ``0 < count <= dim // 4`` (:func:`lanczos_pays`), else from a dense solver.
   :func:`top_eigh` and :func:`truncated_svd` are the only places that choose.
   (CLAIR's torch singular-value thresholding follows the same Gram rule.) Where a
   nearby subspace is known (the refit without one client, the next concentration
   step, the next SVT of the decomposition), :func:`warm_top_eigh` iterates from it and
   accepts its answer only under a residual certificate at the round-off floor;
   otherwise the rule above applies. Where only the side of a threshold the next
   eigenvalue falls on matters (how many values a count or an SVT keeps),
   :func:`deflated_top` gives it to ``CHECK_TOL`` and the answer is taken only outside
   that margin.
2. **One Eckart-Young readout** (:func:`eckart_young_factors`): rank-r LoRA factors
   ``(Q U S^1/2, S^1/2 V^T W^T)`` of a matrix's top singular triplets, zero-padded.
3. **The exact reductions of LoRA updates.** Every update ``B_i A_i`` lies in
   ``col([B_1, ..., B_N]) x row([A_1; ...; A_N])``. With orthonormal bases Q (d, s) and
   V (k, t) of these spans, ``B_i A_i = Q (Q^T B_i A_i V) V^T`` exactly, and
   s, t <= sum r_i whatever d and k are (:func:`reduce_factors`). Computations that
   only take linear combinations of the updates and depend on them through Frobenius
   inner products and orthogonally invariant norms (CLAIR's decomposition, refit and
   refinement) can run on the small blocks and map back with Q and V. Without a
   backbone each client is kept in its own row basis, ``X_k = Y_k R_k``
   (:func:`factored_reduction`, :class:`FactoredBlocks`): CLAIR's decomposition only
   sees the ``Y_k`` (the right projection on each block's own row space is exact), and
   every later step (the collaborative mean, the centred stack's left singular
   vectors, the off-subspace statistics, the refinement) is a function of the ``Y_k``
   and of the cross-Gram ``R_j R_k^T`` of the row bases: the (n_clients, s, t) stack is
   never formed. With 50 rank-16 clients on a 4096 x 4096 module, s = t = 800 and the
   blocks are 800 x 16 instead of 800 x 800.

The factored stack's nominal shape for the statistics is (n_clients, s, r): a client's
noise lives in its own r_k-dimensional row space, so the rank rule's noise edge and the
test's degrees of freedom count r (the widest client rank) columns per client, not t.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
from typing import NamedTuple

import numpy as np
import scipy.linalg
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh, svds

from ._threads import map_in_threads, thread_limits

__all__ = ["lanczos_pays", "top_eigh", "warm_top_eigh", "batched_warm_top_eigh",
           "deflated_top", "CHECK_TOL", "truncated_svd", "left_singular",
           "median_singular_value",
           "uses_gram",
           "singular_values", "leave_one_out_coefficients", "eckart_young_factors",
           "orthonormal_basis", "rank_tolerance",
           "FactoredBlocks", "FactoredMean", "FactoredRefined", "off_subspace_statistics",
           "stack_caches",
           "ReducedFactors", "ReducedStack", "reduce_factors", "factored_reduction",
           "CombinedUpdates", "DeviceBasis"]


# --------------------------------------------------------------------------------------
# The solver rule
# --------------------------------------------------------------------------------------

def lanczos_pays(dim, count):
    """Whether the top ``count`` pairs of a size-``dim`` problem go to Lanczos.

    The one threshold of the package: ``dim >= 100`` and ``0 < count <= dim // 4``.
    Lanczos to machine precision then needs a few dozen products with the matrix instead
    of a full tridiagonal (or bidiagonal) reduction: on an 800 x 800 Gram matrix and 16
    pairs, 0.1 s instead of 0.35 s; below 100, or for a quarter of the spectrum or
    more, the dense LAPACK solver is faster and as accurate.
    """
    return count is not None and dim >= 100 and 0 < count <= dim // 4


def top_eigh(matrix, count=None, tol=0.0, start=None):
    """Eigenpairs of a symmetric matrix, largest first (only ``count`` of them if given).

    Parameters
    ----------
    matrix : ndarray of shape (dim, dim) or scipy LinearOperator
        A LinearOperator is solved by Lanczos when :func:`lanczos_pays`, else formed
        (also where ARPACK does not converge, which a tight cluster of eigenvalues at
        the edge of the wanted ones can cause).
    count : int, optional
    tol : float, default=0.0
        Lanczos' stopping rule, a relative residual ``||A z - theta z|| <= tol |theta|``
        (each returned value is then within ``tol |theta|`` of an eigenvalue); 0 is
        machine precision. The dense solver ignores it.
    start : ndarray of shape (dim,), optional
        Lanczos' start vector (default: the normalised vector of ones, fixed so that the
        result is reproducible). The dense solver ignores it.

    Returns
    -------
    eigval : ndarray of shape (m,)
    eigvec : ndarray of shape (dim, m)
        ``m = count`` (or ``dim``), eigenvalues in decreasing order.
    """
    dim = matrix.shape[0]
    if count == 0:
        return np.zeros(0), np.zeros((dim, 0))
    found = None
    if lanczos_pays(dim, count):
        # A fixed start vector keeps the result reproducible. Matrix-vector products and
        # ARPACK's small dense steps: a second BLAS thread only synchronises (tens of
        # times slower on a busy machine, clairstat._threads).
        with thread_limits(1):
            try:
                found = eigsh(matrix, k=count, which="LA", tol=tol,
                              v0=np.ones(dim) / np.sqrt(dim) if start is None else start)
            except ArpackNoConvergence:  # a tight cluster at the edge: the dense solver
                found = None
    if found is not None:
        eigval, eigvec = found
    else:
        if isinstance(matrix, LinearOperator):
            matrix = matrix @ np.eye(dim)
        eigval, eigvec = np.linalg.eigh(matrix)
    order = np.argsort(eigval)[::-1][:count]
    return eigval[order], eigvec[:, order]


def warm_top_eigh(apply, start, count, *, max_iter=40):
    """Top ``count`` eigenpairs of a symmetric operator from a nearby subspace, certified.

    Block subspace iteration with a Rayleigh-Ritz step per product (all matrix-matrix
    products, no Lanczos vectors), started from ``start``: where the wanted subspace is
    already close (a refit on a set that differs by one client, the previous step of a
    loop), a few products of ``apply`` with the ``b``-column block replace a Lanczos run
    or a dense eigensolver. The answer is accepted only under the certificate every
    wanted Ritz pair's residual ``||A z - theta z|| <= 4 sqrt(dim) eps theta_1``: the
    round-off floor of forming ``A z`` (a sum of ``dim`` products), so each
    eigenvector is within that residual over its eigengap of the exact one (Davis-Kahan),
    as the dense solvers' are; ``None`` otherwise (the caller then solves as before).

    Parameters
    ----------
    apply : callable
        ``apply(Z)`` is ``A @ Z`` for a (dim, b) block.
    start : ndarray of shape (dim, b)
        ``b > count`` columns spanning a subspace near the wanted one.
    count : int
    max_iter : int, default=40

    Returns
    -------
    (eigval (count,), eigvec (dim, count)) largest first, or None
    """
    dim, width = start.shape
    if not 0 < count < width <= dim:
        return None
    # Many short products on (dim, b) blocks: a second BLAS thread only synchronises
    # (tens of times slower on a busy machine, clairstat._threads).
    with thread_limits(1):
        return _subspace_iteration(apply, start, count, max_iter)


def _subspace_iteration(apply, start, count, max_iter):
    """The loop of :func:`warm_top_eigh`."""
    dim = start.shape[0]
    block = _orthonormal_columns(start)
    eps = np.finfo(block.dtype).eps
    for _ in range(max_iter):
        image = apply(block)
        small = block.T @ image
        theta, rotation = np.linalg.eigh(0.5 * (small + small.T))
        rotation, theta = rotation[:, ::-1], theta[::-1]
        block, image = block @ rotation, image @ rotation
        resid = image[:, :count] - block[:, :count] * theta[:count]
        bound = 4.0 * np.sqrt(dim) * eps * max(abs(theta[0]), np.finfo(float).tiny)
        if np.all(np.sqrt(np.einsum("ij,ij->j", resid, resid)) <= bound):
            return theta[:count], block[:, :count]
        block = _orthonormal_columns(image)
    return None


def batched_warm_top_eigh(apply, starts, count, *, max_iter=40):
    """:func:`warm_top_eigh` of several operators of one size at once.

    The same block subspace iteration, Rayleigh-Ritz step and certificate per problem
    (each problem's residuals within ``4 sqrt(dim) eps`` of its own largest Ritz
    value), run on a stack of blocks so that each step is one product per operator
    batch (``apply``) and stacked small eigenproblems, instead of a Python loop of thin
    products. A problem leaves the batch once certified; the answer is the one
    :func:`warm_top_eigh` would give from the same start, to round-off (the products'
    summation order differs).

    Parameters
    ----------
    apply : callable
        ``apply(active, blocks)``: the images of ``blocks`` (n_active, dim, b) under
        the operators numbered ``active`` (int array into the problems).
    starts : ndarray of shape (n, dim, b)
        ``b > count`` columns per problem spanning a subspace near the wanted one. A
        start broadcast to every problem (``np.broadcast_to``, a zero first stride) is
        orthonormalised once, and the first ``apply`` receives it broadcast (zero first
        stride) too: the caller can then form the product common to every operator once.
    count : int
    max_iter : int, default=40

    Returns
    -------
    list of ``(eigval (count,), eigvec (dim, count))`` or ``None`` (no certificate
    within ``max_iter`` products: the caller solves that problem as before), per problem.
    """
    n_problems, dim, width = starts.shape
    found = [None] * n_problems
    if n_problems == 0 or not 0 < count < width <= dim:
        return found
    if starts.strides[0] == 0:  # one start broadcast to every problem: one block
        block = np.broadcast_to(_orthonormal_stack(starts[:1]), starts.shape)
    else:
        block = _orthonormal_stack(starts)
    active = np.arange(n_problems)
    eps = np.finfo(block.dtype).eps
    for _ in range(max_iter):
        image = apply(active, block)
        small = np.matmul(block.transpose(0, 2, 1), image)
        theta, rotation = np.linalg.eigh(0.5 * (small + small.transpose(0, 2, 1)))
        theta, rotation = theta[:, ::-1], rotation[:, :, ::-1]
        block, image = np.matmul(block, rotation), np.matmul(image, rotation)
        resid = image[:, :, :count] - block[:, :, :count] * theta[:, None, :count]
        bound = 4.0 * np.sqrt(dim) * eps * np.maximum(np.abs(theta[:, 0]),
                                                       np.finfo(float).tiny)
        done = np.all(np.sqrt(np.einsum("nij,nij->nj", resid, resid)) <= bound[:, None],
                      axis=1)
        for i in np.flatnonzero(done):
            found[active[i]] = (theta[i, :count].copy(), block[i, :, :count].copy())
        if done.all():
            break
        active, block = active[~done], _orthonormal_stack(image[~done])
    return found


def _orthonormal_stack(blocks):
    """:func:`_orthonormal_columns` of every (dim, b) block of a stack (n, dim, b)."""
    norms = np.sqrt(np.einsum("nij,nij->nj", blocks, blocks))
    blocks = blocks / np.where(norms > 0, norms, 1.0)[:, None, :]
    try:
        for _ in range(2):
            lower = np.linalg.cholesky(np.matmul(blocks.transpose(0, 2, 1), blocks))
            # B L^-T, with L L^T = B^T B, through the b x b inverses: one stacked BLAS-3
            # product, where numpy's stacked solve of L X = B^T (an LU per block and
            # transposed copies) took 3.5 times as long at (90, 1600, 12). The inverse's
            # error (cond(L) eps) is what the first pass leaves anyway; the second pass,
            # on a block orthonormal to O(cond^2 eps), has cond(L) ~ 1.
            blocks = np.matmul(blocks, np.linalg.inv(lower).transpose(0, 2, 1))
    except np.linalg.LinAlgError:
        return np.linalg.qr(blocks)[0]
    return blocks


# Where only the side of a threshold an eigenvalue falls on is asked (the SVT's kept
# count, the rank rule's count), a relative residual of 1e-3 places it within 0.1% of
# its value, and the answer is taken only outside that margin; machine precision on a
# clustered noise edge takes several times the products, 1e-6 about twice. (With the
# vector of ones as start, a top eigenvector nearly orthogonal to it let Lanczos stop on
# the bulk below, 1% low: deflated_top starts from a pseudo-random vector.)
CHECK_TOL = 1e-3


def deflated_top(operator, vectors, tol=CHECK_TOL):
    """Largest eigenvalue of a symmetric operator outside the span of ``vectors``.

    The largest eigenvalue of ``(I - V V^T) A (I - V V^T)`` (``V`` orthonormal, (dim, m))
    by :func:`top_eigh` (one Lanczos pair to the relative residual ``tol``): with ``V``
    certified eigenvectors of A, the next eigenvalue of A after theirs. Lanczos' Ritz
    value is a lower bound that converges to it from below. The start vector is fixed
    and pseudo-random (not the vector of ones, to which structured stacks, such as
    clients of opposite signs, can make the top eigenvector orthogonal).

    Parameters
    ----------
    operator : scipy LinearOperator of shape (dim, dim)
    vectors : ndarray of shape (dim, m)
    tol : float, default=CHECK_TOL

    Returns
    -------
    float
    """
    dim = operator.shape[0]

    def deflated(x):
        x = x - vectors @ (vectors.T @ x)
        image = operator.matmat(x) if x.ndim > 1 else operator.matvec(x)
        return image - vectors @ (vectors.T @ image)

    start = np.random.default_rng(0).standard_normal(dim)
    return float(top_eigh(LinearOperator((dim, dim), dtype=float, matvec=deflated,
                                         matmat=deflated), 1, tol=tol,
                          start=start / np.linalg.norm(start))[0][0])


def _orthonormal_columns(block):
    """Orthonormal columns spanning ``block`` (dim, b), b small: CholeskyQR2.

    Two Cholesky passes on the b x b Gram matrix after scaling the columns to unit norm
    (Yamamoto et al., 2015: orthonormal to eps once the scaled condition number is below
    ``eps^-1/2``; Ritz images are close to orthogonal), a few times cheaper than a
    Householder QR at these shapes; Householder where Cholesky fails.
    """
    norms = np.sqrt(np.einsum("ij,ij->j", block, block))
    block = block / np.where(norms > 0, norms, 1.0)
    try:
        for _ in range(2):
            tri = scipy.linalg.cholesky(block.T @ block, lower=False)
            block = scipy.linalg.solve_triangular(tri, block.T, trans="T", lower=False).T
    except (np.linalg.LinAlgError, ValueError):
        return np.linalg.qr(block)[0]
    return block


def _oversampled(basis, dim, extra, seed=0):
    """``basis`` (dim, m) and ``extra`` fixed pseudo-random columns: a start block."""
    rng = np.random.default_rng(seed)
    return np.hstack([basis, rng.standard_normal((dim, extra))])


def truncated_svd(matrix, rank):
    """Top-``rank`` singular triplets of ``matrix`` (Eckart-Young).

    A dense thin SVD, or, where :func:`lanczos_pays`, ARPACK's Lanczos
    bidiagonalization run to machine precision (``svds(tol=0)``): on an 800 x 800
    reduced update and rank 16, 0.06 s instead of 0.35 s, with singular values equal to
    the dense ones within 1e-15 relative.

    Returns
    -------
    left : ndarray of shape (m, k), singular : ndarray of shape (k,), right_t : (k, n)
        ``k = min(rank, min(m, n))``, singular values in decreasing order.
    """
    matrix = np.asarray(matrix)
    if lanczos_pays(min(matrix.shape), rank):
        left, singular, right_t = svds(matrix, k=rank, tol=0, random_state=0)
        order = np.argsort(singular)[::-1]
        return left[:, order], singular[order], right_t[order]
    left, singular, right_t = scipy.linalg.svd(matrix, full_matrices=False)
    return left[:, :rank], singular[:rank], right_t[:rank]


def left_singular(stacked, rank=None):
    """Left singular vectors and values of a p x n matrix, largest first.

    For n >= 2p the p x p Gram matrix is eigen-decomposed (:func:`top_eigh`) instead
    of running a thin SVD (O(p^2 n) either way, but without forming the n-long right
    factors); the top directions and the singular values above the noise edge are
    accurate to eps * s_max^2 / s, far below the statistical error. ``rank`` asks for
    the top ``rank`` pairs only.

    Returns
    -------
    left : ndarray of shape (p, m), singular : ndarray of shape (m,)
    """
    p, n = stacked.shape
    if uses_gram(p, n):
        eigval, eigvec = top_eigh(stacked @ stacked.T, rank)
        return eigvec, np.sqrt(np.clip(eigval, 0.0, None))
    if rank is None:
        left, sing, _ = scipy.linalg.svd(stacked, full_matrices=False)
        return left, sing
    left, sing, _ = truncated_svd(stacked, rank)
    return left, sing


def uses_gram(short, long_):
    """The Gram rule: a matrix whose long side is at least twice its short side.

    Its ``short x short`` Gram matrix is then eigen-decomposed instead of running a
    thin SVD: half the work or less, and eigenvalues ``s^2`` to ``eps * s_max^2``.
    """
    return long_ >= 2 * short


def singular_values(matrix):
    """All singular values of ``matrix``, largest first (by the Gram rule where it holds)."""
    short, long_ = sorted(matrix.shape)
    if not uses_gram(short, long_):
        return scipy.linalg.svd(matrix, compute_uv=False)
    gram = matrix @ matrix.T if matrix.shape[0] == short else matrix.T @ matrix
    return np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, None))[::-1]


def median_singular_value(matrix):
    """The median singular value of ``matrix`` (a noise scale's statistic).

    From the eigenvalues of the short side's Gram matrix (LAPACK's ``syevr``, all of
    them: 0.30 s against 0.66 s for the SVD's singular values of a 1600 x 1600 matrix,
    the factored stack of 100 rank-16 LoRA clients, one thread, one machine; see
    ``benchmarks/RESULTS.md``), where that is accurate enough by an error estimate:
    the Gram route's eigenvalues differ from the squared singular values by at most
    ``m eps ||A||_F^2`` from forming the n x n Gram matrix (m the long side: each entry
    sums m products, whose error is at most ``m eps |a_i|^T |a_j|`` in any order; a
    proven bound), plus the symmetric eigensolver's backward error, taken as
    ``n eps s_max^2`` (LAPACK bounds it by an unspecified ``p(n) eps s_max^2``; the
    first term, far larger in practice, covers a larger constant). The route is taken
    where that estimate is at most 1e-6 of the median's square (the median then to
    about 5e-7 relative); otherwise (a median near the round-off of the larger singular
    values, or a very long side), all singular values by the SVD.
    """
    matrix = np.asarray(matrix, dtype=float)
    short = min(matrix.shape)
    if short == 0:
        raise ValueError("the median singular value of an empty matrix is undefined")
    largest = float(np.max(np.abs(matrix)))
    if largest == 0.0:
        return 0.0
    # Scaled by a power of two (exact) so the Gram matrix neither overflows nor
    # underflows whatever the units; the answer is scaled back.
    exponent = int(np.frexp(largest)[1])
    return float(np.ldexp(_median_singular_value_unit(np.ldexp(matrix, -exponent)),
                          exponent))


def _median_singular_value_unit(matrix):
    """:func:`median_singular_value` of a matrix whose largest entry is in [1/2, 1)."""
    long, short = max(matrix.shape), min(matrix.shape)
    gram = matrix.T @ matrix if matrix.shape[0] >= matrix.shape[1] else matrix @ matrix.T
    # All eigenvalues, ascending: faster than a subset (which syevr finds by bisection).
    eigenvalues = scipy.linalg.eigvalsh(gram, driver="evr")
    low, high = (short - 1) // 2, short // 2  # the median's one or two values
    middle = eigenvalues[low:high + 1]
    eps = np.finfo(float).eps
    frobenius_sq = float(np.trace(gram))  # ||A||_F^2 (to round-off)
    error = eps * (long * frobenius_sq + short * float(eigenvalues[-1]))
    # Accuracy asked of the median's square: 1e-6 relative (the median to ~5e-7). The
    # median enters the noise scale, which sets thresholds through constants given to
    # two or three digits; an error of 5e-7 moves a flag only for a statistic within
    # 5e-7 (relative) of its threshold.
    if middle[0] > 0 and error <= 1e-6 * middle[0]:
        return float(np.mean(np.sqrt(middle)))
    return float(np.median(scipy.linalg.svd(matrix, compute_uv=False)))


def eckart_young_factors(triplets, rank, left_basis=None, right_basis=None):
    """Rank-``rank`` LoRA factors from singular triplets, zero-padded to exactly ``rank``.

    Parameters
    ----------
    triplets : (ndarray (s, m), ndarray (m,), ndarray (m, t))
        ``(U, S, V^T)`` of a matrix X, largest first (:func:`truncated_svd`).
    rank : int
    left_basis : ndarray of shape (d, s), optional
        Orthonormal columns Q; the factors are then those of ``Q X``.
    right_basis : ndarray of shape (k, t), optional
        Orthonormal columns W; the factors are then those of ``X W^T``.

    Returns
    -------
    b_mat : ndarray of shape (d, rank)
    a_mat : ndarray of shape (rank, k)
        ``(Q U S^1/2, S^1/2 V^T W^T)``: the singular values split evenly between the
        factors; ``b_mat @ a_mat`` is the best rank-``rank`` approximation of
        ``Q X W^T`` in Frobenius norm (the bases are isometries), exact when
        ``rank(X) <= rank``; missing columns (fewer than ``rank`` triplets) are zero.

    Examples
    --------
    >>> b, a = eckart_young_factors(truncated_svd(np.diag([3.0, 2.0]), 3), 3)
    >>> b.shape, a.shape, np.round(b @ a, 12).tolist()
    ((2, 3), (3, 2), [[3.0, 0.0], [0.0, 2.0]])
    """
    left, singular, right_t = triplets
    root = np.sqrt(singular)
    b_mat, a_mat = left * root, root[:, None] * right_t
    if left_basis is not None:
        b_mat = left_basis @ b_mat
    if right_basis is not None:
        a_mat = a_mat @ right_basis.T
    missing = rank - b_mat.shape[1]
    if missing > 0:
        b_mat = np.hstack([b_mat, np.zeros((b_mat.shape[0], missing))])
        a_mat = np.vstack([a_mat, np.zeros((missing, a_mat.shape[1]))])
    return b_mat, a_mat


def rank_tolerance(matrix_shape, largest, dtype):
    """Numerical-rank threshold: ``max(shape) * eps * largest`` (numpy's matrix_rank rule)."""
    return max(matrix_shape) * np.finfo(dtype).eps * largest


def orthonormal_basis(matrix, factors=None):
    """Orthonormal basis of the column space of a tall ``matrix`` (d, m), any d.

    A thin QR first (cost d m^2; ``factors``: its ``(Q, R)`` when already computed),
    then the SVD of the small triangular (or, for m > d, d x m trapezoidal) factor
    decides the numerical rank; never forms anything d x d or m x m.

    Examples
    --------
    >>> basis = orthonormal_basis(np.array([[1.0, 2.0], [2.0, 4.0], [0.0, 0.0]]))
    >>> basis.shape
    (3, 1)
    """
    q_factor, r_factor = (scipy.linalg.qr(matrix, mode="economic") if factors is None
                          else factors)
    # Only the left singular vectors are used: the thin SVD (a wide R's full one would
    # also form its m x m right factor: 6.2 s against 0.7 s for a 512 x 4096 R, one thread).
    left, singular, _ = scipy.linalg.svd(r_factor, full_matrices=False)
    if singular.size == 0 or singular[0] == 0:
        return q_factor[:, :0]
    keep = singular > rank_tolerance(matrix.shape, singular[0], matrix.dtype)
    return q_factor @ left[:, keep]


def leave_one_out_coefficients(weights, k, centred_inner):
    """``(alpha, beta)`` of the exact Gram downdate that removes client k, or ``None``.

    With ``omega = w / W``, ``m`` the weighted mean, ``c_j = X_j - m`` and
    ``e = sum_j c_j``, the mean without k is ``m - alpha c_k``, ``alpha = w_k / (W - w_k)``,
    so every other centred block becomes ``c_j + alpha c_k`` and the centred Gram of the
    other ``n - 1`` clients is

        ``G_(-k) = G + beta c_k c_k^T + alpha (e c_k^T + c_k e^T)``,

    ``beta = (n - 1) alpha^2 - 2 alpha - 1`` (``e = 0`` for equal weights).

    The downdate rounds like its largest term, ``eps (tr G + |beta| ||c_k||^2 +
    2 alpha ||e|| ||c_k||)``, a refit like ``eps tr G_(-k)``; and the rounding of
    ``c_k`` itself (``eps ||X_k||``) is amplified by ``alpha``. ``None`` (refit
    instead) where the first exceeds 16 times the second, or where ``alpha > 1``: a
    client that holds half the weight or more, or most of the spread (removing it
    leaves a much smaller Gram matrix).

    Parameters
    ----------
    weights : ndarray of shape (n,)
    k : int
    centred_inner : ndarray of shape (n, n)
        ``<c_j, c_l>`` (Frobenius) of the centred blocks.
    """
    others = np.delete(weights, k).sum()
    if not others > 0:
        return None
    alpha = weights[k] / others
    if not alpha <= 1.0:
        return None
    beta = (len(weights) - 1) * alpha ** 2 - 2.0 * alpha - 1.0
    own = max(centred_inner[k, k], 0.0)
    trace = np.trace(centred_inner)
    after = trace + beta * own + 2.0 * alpha * centred_inner[:, k].sum()
    work = trace + abs(beta) * own + 2.0 * alpha * np.sqrt(max(centred_inner.sum(), 0.0) * own)
    if not (np.isfinite(work) and work <= 16.0 * after):
        return None
    return alpha, beta


# --------------------------------------------------------------------------------------
# Factored stacks X_k = Y_k R_k
# --------------------------------------------------------------------------------------

# The stacks' caches (cross-Gram blocks, inner products, dense means) are filled under
# one lock: the leave-one-out refits and the concentration steps may run on several
# threads (clairstat._threads.map_in_threads).
_CACHE_LOCK = threading.RLock()
# FactoredBlocks._wide: the products go through formed (p, t) combinations of the clients
# once the stack's n r columns (r its widest rank) exceed this many times t.
_WIDE_FACTOR = 2
@contextlib.contextmanager
def stack_caches(stack):
    """Keep ``stack``'s root caches (inner products, dense means) for the block.

    One fit reads the same inner products and means many times; outside a block (and
    after it) they are not kept, so that a fitted estimator, which holds its stack,
    does not hold 40 MB of caches per LoRA module (s = t = 1600) for its lifetime.
    Blocks nest; the caches are dropped when the outermost one exits.
    """
    root = stack.root
    with _CACHE_LOCK:
        root._cache_depth = root.__dict__.get("_cache_depth", 0) + 1
    try:
        yield stack
    finally:
        with _CACHE_LOCK:
            root._cache_depth -= 1
            if root._cache_depth == 0:
                root.__dict__.pop("_raw_inner", None)
                root.__dict__.pop("_dense_means", None)


def _caching(root):
    return root.__dict__.get("_cache_depth", 0) > 0


# The last subspace a stack fitted, a warm start for the next refit (a weak reference to
# the root stack and the basis). A context variable: each concentration chain run by
# map_in_threads sees its own sequence of refits, as it would one after the other.
_WARM = contextvars.ContextVar("clairstat_warm_subspace", default=None)

class FactoredBlocks:
    """A stack of client estimates ``X_k = Y_k R_k`` kept in factored form.

    Parameters
    ----------
    coef : ndarray of shape (n_clients, p, r)
        ``Y_k``; a client of rank below r has zero columns at the end.
    rights : ndarray of shape (n_clients, r, t)
        ``R_k`` with orthonormal rows (zero rows where ``Y_k`` has zero columns).
    round_off : float, optional
        The size of round-off in an entry of ``coef``, below which the tests' statistics
        are numerical zero (the estimator's floor for noiseless data); ``None``: the
        estimator's default for dense data (64 eps per entry of size one).
        :func:`factored_reduction` sets it from the clients' median squared norm and the
        reduction's precision (:func:`_round_off`). Sub-stacks share their root's.

    Notes
    -----
    Indexing with a mask or integer array gives the sub-stack of those clients; it keeps
    a link to the full stack so that a mean fitted on a subset can be compared with every
    client (:class:`FactoredMean`).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> rights = np.stack([np.linalg.qr(rng.standard_normal((6, 2)))[0].T for _ in range(3)])
    >>> stack = FactoredBlocks(rng.standard_normal((3, 5, 2)), rights)
    >>> stack.shape, stack.to_dense().shape
    ((3, 5, 2), (3, 5, 6))
    """

    def __init__(self, coef, rights, *, round_off=None, _root=None, _index=None):
        self.coef = np.asarray(coef, dtype=float)
        self.rights = np.asarray(rights, dtype=float)
        if self.coef.ndim != 3 or self.rights.ndim != 3 or \
                self.coef.shape[::2] != self.rights.shape[:2]:
            raise ValueError(f"coef (n, p, r) and rights (n, r, t) do not match: "
                             f"{self.coef.shape} and {self.rights.shape}.")
        n_clients, _, rank = self.coef.shape
        self.root = self if _root is None else _root
        self.round_off = round_off if _root is None else _root.round_off
        self.index = np.arange(n_clients) if _index is None else _index
        if _root is None:
            flat = self.rights.reshape(n_clients * rank, -1)
            self._cross_gram = (flat @ flat.T).reshape(n_clients, rank, n_clients, rank)

    @property
    def cross_gram(self):
        """``R_j R_l^T`` for every pair of clients, shape (n, r, n, r).

        A sub-stack takes its block of the root's when first asked (the robust start
        and the tests index the stack dozens of times and most sub-stacks never need it).
        """
        with _CACHE_LOCK:
            if "_cross_gram" not in self.__dict__:
                rank = self.coef.shape[2]
                self._cross_gram = self.root.cross_gram[np.ix_(
                    self.index, np.arange(rank), self.index, np.arange(rank))]
        return self._cross_gram

    def raw_inner(self):
        """``<X_j, X_l>`` (Frobenius) for every pair of the root's clients, (N, N).

        Formed once per root (cost ``p (N r)^2``) and cached inside a
        :func:`stack_caches` block (one fit): the statistics of every later subspace
        need only their in-subspace part on top of it (:func:`off_subspace_statistics`).
        """
        root = self.root
        with _CACHE_LOCK:
            if not _caching(root):
                return root.inner_products()
            if "_raw_inner" not in root.__dict__:
                root._raw_inner = root.inner_products()
        return root._raw_inner

    @property
    def shape(self):
        return self.coef.shape

    @property
    def dense_shape(self):
        return (len(self), self.coef.shape[1], self.rights.shape[2])

    def __len__(self):
        return self.coef.shape[0]

    def __getitem__(self, index):
        index = np.arange(len(self))[index]
        if index.ndim != 1:
            raise IndexError("index a FactoredBlocks with a mask or an integer array.")
        return FactoredBlocks(self.coef[index], self.rights[index], _root=self.root,
                              _index=self.index[index])

    def expand(self, k):
        """Client k's estimate ``Y_k R_k``, shape (p, t)."""
        return self.coef[k] @ self.rights[k]

    def to_dense(self):
        """The whole stack, shape (n_clients, p, t)."""
        return self.coef @ self.rights

    def _wide(self):
        """Whether the stack's ``n r`` columns (r the widest client rank, narrower clients
        padded with zeros) exceed twice the width t (``n r > 2 t``: many clients of a
        narrow module; the reduction's t = d once the ranks add up to more than d).

        Products through the (n r, n r) cross-Gram kernel cost ``(n r)^2`` per column,
        quadratic in the clients; through formed (p, t) combinations of the clients
        (:meth:`_combination`, ``p n r t``) and formed p x p matrices they are linear
        in them. Below the switch (t = n r for every independent client, the regime of a
        module wider than the clients' ranks together) both cost alike and the kernel
        is kept.
        """
        n_clients, _, rank = self.coef.shape
        return _WIDE_FACTOR * self.rights.shape[2] < n_clients * rank

    def _combination(self, coefficients):
        """``sum_k a_k X_k`` formed, (p, t): ``p n r t`` flops (the clients with a_k = 0
        left out)."""
        coefficients = np.asarray(coefficients, dtype=float)
        used = np.flatnonzero(coefficients)
        _, p, rank = self.coef.shape
        weighted = (self.coef[used] * coefficients[used, None, None]).transpose(1, 0, 2)
        return (weighted.reshape(p, len(used) * rank)
                @ self.rights[used].reshape(len(used) * rank, self.rights.shape[2]))

    def _flat(self):
        """``[Y_1, ..., Y_n]`` (p, n r) and the cross-Gram ``R R^T`` (n r, n r)."""
        n_clients, p, r = self.coef.shape
        return (self.coef.transpose(1, 0, 2).reshape(p, n_clients * r),
                self.cross_gram.reshape(n_clients * r, n_clients * r))

    def inner_products(self, left=None):
        """K x K matrix of ``<Z_j R_j, Z_k R_k>`` with ``Z = left(Y)`` (default ``Y``)."""
        coef = self.coef if left is None else left
        n_clients, p, rank = coef.shape
        flat = coef.transpose(1, 0, 2).reshape(p, n_clients * rank)
        gram = (flat.T @ flat).reshape(n_clients, rank, n_clients, rank)
        return (gram * self.cross_gram).sum(axis=(1, 3))

    def mean(self, weights):
        """The weighted mean ``sum_k w_k X_k / sum_k w_k`` as a :class:`FactoredMean`."""
        omega = np.zeros(len(self.root))
        omega[self.index] = weights / weights.sum()
        return FactoredMean(self.root, omega)

    def _outer(self, left, right):
        """``(sum_j a_j X_j)(sum_l b_l X_l)^T`` (p, p) for client coefficients a, b.

        Returns the p x p product and ``(sum_j a_j X_j) R_l^T`` for every l, (p, n r).
        """
        if self._wide():
            first, second = self._combination(left), self._combination(right)
            return first @ second.T, first @ self.rights.reshape(-1, self.rights.shape[2]).T
        flat, cross = self._flat()
        rank = self.coef.shape[2]
        combined = (flat * np.repeat(left, rank)) @ cross
        return combined @ (flat * np.repeat(right, rank)).T, combined

    def centred_gram(self, weights):
        """The p x p Gram matrix ``sum_k (X_k - m)(X_k - m)^T`` of the centred stack.

        With ``c_k = e_k - omega`` the centred blocks are ``sum_j c_kj Y_j R_j``, so the
        Gram matrix is ``sum_jl H_jl Y_j (R_j R_l^T) Y_l^T`` with ``H = C^T C`` (cost
        p (n r)^2 + p^2 n r; the t-wide blocks are never formed). A wide stack
        (:meth:`_wide`) forms the sum of the clients and their mean instead (cost
        p n r (p + t) + p^2 t, linear in the clients).
        """
        n_clients, p, r = self.coef.shape
        omega = weights / weights.sum()
        if self._wide():
            # C^T C = I - 1 omega^T - omega 1^T + n omega omega^T: with S = sum_k X_k and
            # m = sum_k omega_k X_k, G = sum_k Y_k (R_k R_k^T) Y_k^T - S m^T - m S^T
            # + n m m^T (the same terms as the kernel's, summed in another order).
            own = np.matmul(self.coef, np.matmul(self.rights, self.rights.transpose(0, 2, 1)))
            gram = (own.transpose(1, 0, 2).reshape(p, n_clients * r)
                    @ self.coef.transpose(1, 0, 2).reshape(p, n_clients * r).T)
            total, mean = self._combination(np.ones(n_clients)), self.mean(weights).to_dense()
            cross = total @ mean.T
            gram += n_clients * (mean @ mean.T) - cross - cross.T
            return 0.5 * (gram + gram.T)
        centring = np.eye(n_clients) - omega[None, :]
        flat, cross = self._flat()
        kernel = (centring.T @ centring)[:, None, :, None] * self.cross_gram
        gram = (flat @ kernel.reshape(n_clients * r, n_clients * r)) @ flat.T
        return 0.5 * (gram + gram.T)

    def _centred_operator(self, weights):
        """``G z`` for the centred Gram matrix G of :meth:`centred_gram`, without G.

        ``G = F K F^T`` with ``F = [Y_1, ..., Y_n]`` (p, n r) and the (n r, n r) kernel
        ``K = (C^T C) (x) (R_j R_l^T)``: a product with a (p, b) block costs
        ``2 p n r b + (n r)^2 b`` flops against ``p (n r)^2 + p^2 n r`` to form G once,
        so the few products of a warm-started or Lanczos eigensolver are several times
        cheaper than forming G (the robust start refits on a new half-set at every
        step). A wide stack (:meth:`_wide`, ``n r > 2 t``) that is also short
        (``n r > 2 p``) forms G (:meth:`centred_gram`, ``p n r (p + t) + p^2 t``,
        linear in the clients), where the kernel's ``(n r)^2`` per column would grow
        with their square; a tall one (p near n r: a module whose output side is wider
        than the clients' ranks together) keeps the kernel, since forming G would cost
        ``p^2 n r``, about ``(n r)^3`` (a review: 1.67 s against 0.24 s for a
        1024 x 32 module with 128 rank-8 clients). Returns the product and a
        LinearOperator of it.
        """
        n_clients, p, r = self.coef.shape
        if self._wide() and 2 * p < n_clients * r:  # G formed, then p^2 b per product
            gram = self.centred_gram(weights)

            def apply(block):
                return gram @ block

            return apply, LinearOperator((p, p), dtype=float, matvec=apply, matmat=apply)
        omega = weights / weights.sum()
        centring = np.eye(n_clients) - omega[None, :]
        flat = self._flat()[0]
        kernel = ((centring.T @ centring)[:, None, :, None] * self.cross_gram).reshape(
            n_clients * r, n_clients * r)
        kernel = 0.5 * (kernel + kernel.T)

        def apply(block):
            return flat @ (kernel @ (flat.T @ block))

        return apply, LinearOperator((p, p), dtype=float, matvec=apply, matmat=apply)

    def centred_left_singular(self, weights, rank=None):
        """Left singular vectors and values of ``[X_k - mean]_k``, largest first.

        The eigenpairs of :meth:`centred_gram`: the top ``rank`` by
        :func:`warm_top_eigh` from the last subspace this stack fitted (successive
        refits differ by a few clients), certified, else by :func:`top_eigh` (Lanczos
        where it pays); both through products with G (:meth:`_centred_operator`), not G
        itself. Every eigenpair with ``rank=None`` (G formed).
        """
        dim = self.coef.shape[1]
        if rank is None or not lanczos_pays(dim, rank):
            eigval, left = top_eigh(self.centred_gram(weights), rank)
        else:
            apply, operator = self._centred_operator(weights)
            found, warm = None, _WARM.get()
            warm = warm[1] if warm is not None and warm[0]() is self.root else None
            if warm is not None:
                extra = max(rank - warm.shape[1], 0) + max(8, rank // 2)
                found = warm_top_eigh(apply, _oversampled(warm[:, :rank], dim, extra), rank)
            eigval, left = found if found is not None else top_eigh(operator, rank)
        if rank is not None and rank > 0:
            _WARM.set((weakref.ref(self.root), left))
        return left, np.sqrt(np.clip(eigval, 0.0, None))

    def count_above(self, weights, edge):
        """How many singular values of ``[X_k - mean]_k`` exceed ``edge``.

        The top eigenvalues of the centred Gram matrix by :func:`top_eigh` (Lanczos on
        :meth:`_centred_operator` where it pays), their number doubled until the last is
        at or below ``edge^2``: the count the full spectrum gives, from a few of its
        largest values (the rank rule keeps a handful of directions out of p).
        """
        dim, count = self.coef.shape[1], 8
        operator = self._centred_operator(weights)[1]
        while lanczos_pays(dim, count):
            eigval, eigvec = top_eigh(operator, count)
            if eigval[-1] <= edge ** 2:
                return int(np.sum(np.sqrt(np.clip(eigval, 0.0, None)) > edge))
            # Every found value is above the edge: the next one decides, to CHECK_TOL
            # (a second, wider run would converge noise pairs to machine precision).
            rest = deflated_top(operator, eigvec)
            if rest * (1.0 + 2.0 * CHECK_TOL) <= min(edge ** 2, eigval[-1]):
                return count
            count *= 2
        return int(np.sum(self.centred_left_singular(weights)[1] > edge))

    def _downdate_terms(self, weights):
        """The terms every client's leave-one-out downdate shares (formed once).

        With ``omega`` the normalised weights and ``e = sum_j c_j = sum_l spread_l X_l``
        (``spread = 1 - n omega``): the centred Gram ``G``, ``m m^T`` and ``m R_k^T``
        for every k, ``e m^T`` (as ``e m^T + m e^T``) and ``e R_k^T``, the centred inner
        products of the clients, and the dense mean ``m``.

        The dense mean ``m`` (p, t) is formed for the residuals anyway; where it is the
        cheaper route (:meth:`_dense_mean_pays`) ``m m^T`` and ``m R^T`` come from it and
        ``G = sum_k Y_k (R_k R_k^T) Y_k^T - n m m^T - (e m^T + m e^T)`` (since
        ``sum_k X_k = e + n m``), the two Gram-sized products symmetric ones (half the
        flops of a general product); otherwise through the (n r, n r) kernel
        (:meth:`centred_gram`, :meth:`_outer`). Both sum the same terms in another order
        (the wide branch of :meth:`centred_gram` is the first).
        """
        n_clients = self.coef.shape[0]
        omega = weights / weights.sum()
        spread = 1.0 - n_clients * omega
        mean = FactoredMean(self, omega).to_dense()
        dense = self._dense_mean_pays()
        if dense:
            rights = self.rights.reshape(-1, self.rights.shape[2])
            mean_outer, mean_rows = mean @ mean.T, mean @ rights.T
        else:
            mean_outer, mean_rows = self._outer(omega, omega)
        if np.any(spread != 0.0):
            spread_outer, spread_rows = self._outer(spread, omega)
            common = spread_outer + spread_outer.T
        else:  # equal weights: e = 0, two p (n r)^2 products saved
            common, spread_rows = np.zeros_like(mean_outer), np.zeros_like(mean_rows)
        if dense:
            gram = self._own_gram() - n_clients * mean_outer - common
            gram = 0.5 * (gram + gram.T)
        else:
            gram = self.centred_gram(weights)
        # <c_k, c_l> = raw_kl - (raw omega)_k - (raw omega)_l + omega^T raw omega: O(n^2),
        # where the two products with the centring matrix cost 2 n^3
        raw = self.raw_inner()[np.ix_(self.index, self.index)]
        pulled = raw @ omega
        centred_inner = raw - pulled[:, None] - pulled[None, :] + omega @ pulled
        return (gram, mean_outer, mean_rows, spread_rows, common, centred_inner, mean)

    def _dense_mean_pays(self):
        """Whether ``m m^T``, ``m R^T`` and ``sum_k Y_k R_k R_k^T Y_k^T`` from the formed
        mean (``p t n r + p^2 (t + n r) / 2`` flops, the halves symmetric products) cost
        less than the kernel's centred Gram and ``m m^T``
        (``2 (p (n r)^2 + p^2 n r)``): always once ``t <= n r``, the regime of a
        test round on most of the clients (t is the root's, at most N r)."""
        n_clients, p, rank = self.coef.shape
        width, t = n_clients * rank, self.rights.shape[2]
        return p * t * width + p * p * (t + width) / 2 <= 2 * (p * width ** 2 + p * p * width)

    def _own_gram(self):
        """``sum_k Y_k (R_k R_k^T) Y_k^T`` (p, p) as one symmetric product ``Z Z^T``,
        ``Z_k = Y_k Q_k Lambda_k^(1/2)`` from the eigendecompositions of the r x r
        ``R_k R_k^T`` (the identity, up to rounding, for orthonormal rows; zero where
        rows are padding)."""
        n_clients, p, rank = self.coef.shape
        eigval, eigvec = np.linalg.eigh(np.matmul(self.rights, self.rights.transpose(0, 2, 1)))
        roots = np.matmul(self.coef, eigvec) * np.sqrt(np.clip(eigval, 0.0, None))[:, None, :]
        flat = roots.transpose(1, 0, 2).reshape(p, n_clients * rank)
        return flat @ flat.T  # numpy's symmetric product (syrk): same operand transposed

    def leave_one_out_grams(self, weights):
        """``without(k)``: the centred Gram of the stack without client k (position) and
        ``X_k`` minus the others' mean, (p, t); ``None`` where a refit is needed.

        The exact downdate of :func:`leave_one_out_coefficients`,
        ``G + beta c_k c_k^T + alpha (e c_k^T + c_k e^T)``, written in the factors: with
        ``a_k = m R_k^T`` and ``b_k = e R_k^T`` (p, r),
        ``c_k c_k^T = Y_k R_k R_k^T Y_k^T - Y_k a_k^T - a_k Y_k^T + m m^T`` and
        ``e c_k^T = b_k Y_k^T - e m^T``. ``G``, ``m m^T`` and ``e m^T`` are formed once
        (three Gram-sized products); each client then costs O(p^2 r), not the
        O(p (n r)^2 + p^2 n r) of its own Gram matrix. ``X_k - m_(-k) = (1 + alpha) c_k``.
        """
        n_clients, p, r = self.coef.shape
        (gram, mean_outer, mean_rows, spread_rows, common, centred_inner,
         mean) = self._downdate_terms(weights)

        def without(k):
            coefficients = leave_one_out_coefficients(weights, k, centred_inner)
            if coefficients is None:
                return None
            alpha, beta = coefficients
            block = slice(k * r, (k + 1) * r)
            own = self.coef[k]
            # beta (c_k c_k^T - m m^T) + alpha (e c_k^T + c_k e^T + e m^T + m e^T)
            # = half + half^T with the p x r_k-wide products below.
            half = (0.5 * beta * (own @ (self.rights[k] @ self.rights[k].T))
                    - beta * mean_rows[:, block] + alpha * spread_rows[:, block]) @ own.T
            downdated = gram + beta * mean_outer - alpha * common + half + half.T
            return 0.5 * (downdated + downdated.T), (1.0 + alpha) * (self.expand(k) - mean)

        return without

    def leave_one_out_fits(self, weights, rank, basis):
        """``fit(k)``: client k's out-of-sample statistic and refitted basis, or ``None``;
        ``fit.all()``: the same for every client, as one batch.

        The same quantities as :meth:`leave_one_out_grams` followed by the top-``rank``
        eigenvectors of the downdated Gram and the off-subspace norm of the residual,
        without forming a p x p matrix per client: the downdate is
        ``H + h_k Y_k^T + Y_k h_k^T`` with ``H = G + beta m m^T - alpha (e m^T + m e^T)``
        common to every client of the same weight (formed once per distinct weight)
        and ``h_k`` (p, r). Its top eigenvectors come from a certified subspace
        iteration (:func:`batched_warm_top_eigh`, :func:`warm_top_eigh`'s loop and
        certificate) started at the members' ``basis`` and ``max(4, rank // 2)`` fixed
        pseudo-random columns (one client moves the subspace little, and the first
        product already adds the perturbation's directions ``E U``): a few products
        with a p x (rank + 4..) block. The clients of one weight iterate together, up
        to ``_LOO_BATCH`` at a time: each step is one product of ``H`` with all their
        blocks side by side (a BLAS-3 product on the threads the caller allows) instead
        of one thin product per client, which left the time to memory traffic
        (``benchmarks/RESULTS.md``, section "Leave-one-out fits in one batch").
        (Starting from ``[U, Y_k, h_k]``, p x (rank + 2r), took 29% fewer products but
        wider ones: 3.6 s against 2.4 s for all the subspace iterations of one
        4096 x 4096 module with 100 rank-16 clients.) Where the certificate is not
        reached, :func:`top_eigh` on the formed matrix, as before. ``None``: a refit is
        needed (:func:`leave_one_out_coefficients`).

        Parameters
        ----------
        weights : ndarray of shape (n_clients,)
        rank : int
        basis : ndarray of shape (p, m), m >= rank
            The members' fitted basis: a start near every client's refit.
        """
        n_clients, p, r = self.coef.shape
        (gram, mean_outer, mean_rows, spread_rows, common, centred_inner,
         mean) = self._downdate_terms(weights)
        raw, omega = self.raw_inner()[np.ix_(self.index, self.index)], weights / weights.sum()
        scale = _round_off_scale(raw, omega)  # of centred_inner's diagonal
        width = rank + max(4, rank // 2)
        start = (_oversampled(basis[:, :rank], p, width - rank)
                 if lanczos_pays(p, rank) else None)
        bases, lock = {}, threading.Lock()

        def base(alpha, beta):
            """``H = G + beta m m^T - alpha (e m^T + m e^T)``, once per distinct weight."""
            with lock:  # fit(k) may run on several threads (map_in_threads)
                if (alpha, beta) not in bases:
                    matrix = gram + beta * mean_outer - alpha * common
                    bases[(alpha, beta)] = 0.5 * (matrix + matrix.T)
                return bases[(alpha, beta)]

        def prepared(k):  # (alpha, beta, h_k) of the downdate, or None: refit
            coefficients = leave_one_out_coefficients(weights, k, centred_inner)
            if coefficients is None:
                return None
            alpha, beta = coefficients
            block = slice(k * r, (k + 1) * r)
            # R_k R_k^T from the client's own rows: the sub-stack's cross_gram would copy
            # its (n r)^2 block of the root's (2.4 s of 1 024 clients' 55 s, a profile)
            half = (0.5 * beta * (self.coef[k] @ (self.rights[k] @ self.rights[k].T))
                    - beta * mean_rows[:, block] + alpha * spread_rows[:, block])
            return alpha, beta, half

        def solve(group, matrix, halves):
            """Top-``rank`` eigenpairs of ``matrix + h_k Y_k^T + Y_k h_k^T``, k in group."""
            own = self.coef[group]
            found = [None] * len(group)
            if start is not None:
                def apply(active, blocks):
                    n_active, _, b = blocks.shape
                    if blocks.strides[0] == 0:  # the shared start: H times it once
                        image = np.broadcast_to(matrix @ blocks[0], blocks.shape)
                    else:
                        flat = blocks.transpose(1, 0, 2).reshape(p, n_active * b)
                        image = (matrix @ flat).reshape(p, n_active, b).transpose(1, 0, 2)
                    y_k, h_k = own[active], halves[active]
                    return (image + np.matmul(h_k, np.matmul(y_k.transpose(0, 2, 1), blocks))
                            + np.matmul(y_k, np.matmul(h_k.transpose(0, 2, 1), blocks)))

                found = batched_warm_top_eigh(
                    apply, np.broadcast_to(start, (len(group),) + start.shape), rank)
            for i, answer in enumerate(found):
                if answer is None:  # no certificate: the formed matrix, as before
                    downdated = matrix + halves[i] @ own[i].T + own[i] @ halves[i].T
                    found[i] = top_eigh(0.5 * (downdated + downdated.T), rank)
            return found

        def statistic(k, alpha, sub_basis, basis_mean):
            # ||(I - P) c_k||^2 = ||c_k||^2 - ||U^T c_k||^2 (U orthonormal), with
            # U^T c_k = (U^T Y_k) R_k - U^T m: no p x t residual per client.
            inside = (sub_basis.T @ self.coef[k]) @ self.rights[k] - basis_mean
            stat = centred_inner[k, k] - float(np.sum(inside * inside))
            if stat < _DIFFERENCE_FLOOR * scale[k]:  # digits lost: directly
                residual = self.expand(k) - mean
                residual = residual - sub_basis @ (sub_basis.T @ residual)
                stat = float(np.sum(residual * residual))
            return (1.0 + alpha) ** 2 * stat, sub_basis

        def fits(positions):
            positions = list(positions)
            out = dict.fromkeys(positions)
            groups = {}
            for k in positions:
                terms = prepared(k)
                if terms is not None:
                    groups.setdefault(terms[:2], []).append((k, terms[2]))
            for (alpha, beta), members in groups.items():
                matrix = base(alpha, beta)
                for chunk in range(0, len(members), _LOO_BATCH):
                    part = members[chunk:chunk + _LOO_BATCH]
                    group = np.array([k for k, _ in part])
                    halves = np.stack([half for _, half in part])
                    sub_bases = [found[1] for found in solve(group, matrix, halves)]
                    # every U_k^T m of the batch in one product
                    basis_means = (np.hstack(sub_bases).T @ mean).reshape(
                        len(group), -1, mean.shape[1])
                    for k, sub_basis, basis_mean in zip(group, sub_bases, basis_means):
                        out[k] = statistic(k, alpha, sub_basis, basis_mean)
            return [out[k] for k in positions]

        def fit(k):
            return fits([k])[0]

        fit.all = lambda: fits(range(n_clients))
        return fit


class FactoredMean:
    """``sum_k omega_k X_k`` over a :class:`FactoredBlocks` stack (weights sum to one)."""

    def __init__(self, stack, omega):
        self.stack, self.omega = stack, omega

    def to_dense(self):
        """The mean, shape (p, t), read-only.

        Formed from the clients with non-zero weight; inside a :func:`stack_caches`
        block kept on the root stack for the last two weight vectors: a test round, its
        leave-one-out downdates, the refinement and the estimator read the same mean
        (20 MB and 0.1 s at p = t = 1600).
        """
        root = self.stack.root
        omega = np.zeros(len(root))
        omega[self.stack.index] = self.omega
        key = omega.tobytes()
        with _CACHE_LOCK:
            return self._cached_dense(root, omega, key)

    @staticmethod
    def _cached_dense(root, omega, key):
        cache = root.__dict__.setdefault("_dense_means", {}) if _caching(root) else {}
        if key not in cache:
            dense = root._combination(omega)
            dense.flags.writeable = False
            while len(cache) >= 2:
                cache.pop(next(iter(cache)))
            cache[key] = dense
        return cache[key]

    def __array__(self, dtype=None, copy=None):
        return np.array(self.to_dense(), dtype=dtype)


# A statistic taken as a difference keeps its round-off (a few eps times the terms'
# scale, _round_off_scale, times the square root of the inner products' length) below
# about 1e-6 of itself when it is at least this share of that scale; smaller ones are
# computed directly.
_DIFFERENCE_FLOOR = 2.0 ** -20
# Members whose leave-one-out subspace iterations run as one batch: the stacked blocks
# (batch, p, rank + 4..) and downdate factors (batch, p, r) stay a few tens of MB.
_LOO_BATCH = 64


def off_subspace_statistics(stack, mean, basis):
    """``||(I - P)(X_k - mean)||_F^2`` for every client of ``stack``.

    With ``Phi`` the inner products of the off-subspace parts ``(I - P) X_j`` over the
    clients involved (the mean's and the stack's), the statistic is
    ``Phi_kk - 2 (Phi omega)_k + omega^T Phi omega``. Since ``P = U U^T`` is an
    orthogonal projection, ``Phi = <X_j, X_l> - <U^T X_j, U^T X_l>``: the first term is
    the root's (:meth:`FactoredBlocks.raw_inner`, formed once); of the second only the
    centred diagonal is needed, ``||U^T (X_k - mean)||^2``, from the (m, t) blocks
    ``(U^T Y_k) R_k`` (``m N r t`` flops for an m-column basis, linear in the clients,
    instead of ``p (N r)^2``; the robust start and the test rounds ask for dozens of
    subspaces). Where a statistic is below
    ``_DIFFERENCE_FLOOR`` of its terms' scale (noiseless data, a subspace that holds
    nearly everything, large clients that cancel in the mean) the difference would
    lose digits, and the statistics are computed from the off-subspace factors
    ``(I - P) Y_k`` directly (which share the mean's cancellation, as before).
    """
    root = stack.root
    if mean.stack is not root:
        raise ValueError("the mean was fitted on another stack.")
    involved = np.union1d(np.flatnonzero(mean.omega), stack.index)
    omega = mean.omega[involved]
    position = np.searchsorted(involved, stack.index)
    pairs = np.ix_(involved, involved)
    raw = root.raw_inner()[pairs]
    # ||U^T (X_k - mean)||^2 from the (m, t) blocks U^T X_k: m n r t flops, linear in
    # the clients (their m (n r)^2 inner products were quadratic in them).
    inside = np.matmul(np.matmul(basis.T, root.coef[involved]), root.rights[involved])
    inside -= np.tensordot(omega, inside, axes=1)
    stat = (_centred_diagonal(raw, omega) - np.sum(inside * inside, axis=(1, 2)))[position]
    if np.all(stat >= _DIFFERENCE_FLOOR * _round_off_scale(raw, omega)[position]):
        return stat
    coef = root.coef[involved]
    resid = coef - basis @ (basis.T @ coef)
    phi = root[involved].inner_products(resid)
    return np.clip(_centred_diagonal(phi, omega), 0.0, None)[position]


def _round_off_scale(raw, omega):
    """A bound on the terms of ``||x_k - sum_j omega_j x_j||^2`` formed from ``raw``.

    ``(|x_k| + sum_j |omega_j| |x_j|)^2`` (Cauchy-Schwarz on every product): the
    centred value's round-off is a few eps times this, also where large clients cancel
    in the mean (then ``|x_k|^2 + |m|^2`` would be far too small).
    """
    norms = np.sqrt(np.clip(np.diag(raw), 0.0, None))
    return (norms + np.abs(omega) @ norms) ** 2


def _centred_diagonal(phi, omega):
    """``||x_k - sum_j omega_j x_j||^2`` for every k from the inner products ``phi``."""
    return np.diag(phi) - 2.0 * phi @ omega + omega @ phi @ omega


class FactoredRefined:
    """Refined estimates ``mean + P (X_k - mean)`` (flagged clients: ``X_k``), lazily.

    ``refined[k]`` is client k's (p, t) matrix; ``np.asarray(refined)`` expands all.
    """

    def __init__(self, stack, basis, mean, contaminated):
        self.stack, self.basis, self.contaminated = stack, basis, np.asarray(contaminated)
        dense_mean = mean.to_dense()
        # mean + P (X_k - mean) = (I - P) mean + U (U^T Y_k) R_k: the first term is common.
        self.common = dense_mean - basis @ (basis.T @ dense_mean)
        self._gram_eig = None

    @property
    def shape(self):
        return self.stack.dense_shape

    def __len__(self):
        return len(self.stack)

    def __getitem__(self, k):
        if self.contaminated[k]:
            return self.stack.expand(k)
        return self.common + self.basis @ ((self.basis.T @ self.stack.coef[k])
                                           @ self.stack.rights[k])

    def __array__(self, dtype=None, copy=None):
        dense = np.stack([self[k] for k in range(len(self))])
        return dense if dtype is None else dense.astype(dtype)

    def truncated_svd(self, k, rank):
        """Top-``rank`` singular triplets of client k's refined (p, t) matrix.

        A flagged client's ``Y_k R_k``: from the SVD of the small ``Y_k``. A refined one,
        ``M = C + U c R_k`` with the common ``C = (I - P) mean`` and ``c = U^T Y_k``:
        since ``U^T C = 0``, ``M^T M = C^T C + (c R_k)^T (c R_k)``. With ``C^T C = W L W^T``
        (one eigendecomposition per module), :func:`top_eigh` runs on ``L + F^T F``,
        ``F = c R_k W`` (diagonal plus rank r_k: O(t r_k) per product instead of
        O(p t)), then ``u = M v / s``. Squared singular values carry an absolute error
        ~ eps s_max^2, ample for the leading ones a readout keeps.
        """
        coef, right = self.stack.coef[k], self.stack.rights[k]
        if self.contaminated[k]:
            left, sing, inner = truncated_svd(coef, rank)
            return left, sing, inner @ right
        if self._gram_eig is None:
            self._gram_eig = scipy.linalg.eigh(self.common.T @ self.common)
        eigval, eigvec = self._gram_eig
        eigval = np.clip(eigval, 0.0, None)
        small = (self.basis.T @ coef) @ (right @ eigvec)  # F, (rank(U), t)
        values, vectors = self._top_pairs(eigval, small, min(rank, eigval.size))
        right_t = (eigvec @ vectors).T
        sing = np.sqrt(np.clip(values, 0.0, None))
        image = self.common @ right_t.T + self.basis @ ((self.basis.T @ coef)
                                                        @ (right @ right_t.T))
        left = image / np.where(sing > 0, sing, 1.0)
        return left, sing, right_t

    def truncated_svds(self, clients, ranks):
        """:meth:`truncated_svd` of several clients, the large products batched.

        The same triplets as one call per client (the same eigendecomposition, Lanczos
        runs and formulas); the products with the t x t eigenvectors, the common part
        ``C`` and the row bases run as one matrix product over all the clients instead
        of one thin product each. The clients' Lanczos runs go one after the other on
        one BLAS thread: their products are with an (m, t) factor, m the subspace's
        rank, too short to release the GIL for long, so two Python threads
        (:func:`map_in_threads`, which :meth:`CombinedUpdates.truncated_svds` keeps for
        its (R, R) triangular factors) only contend for it: 2.85 s against 2.33 s for
        the 90 refined clients of ``benchmarks/lora_benchmark.py``'s target module.

        Parameters
        ----------
        clients : sequence of int
        ranks : sequence of int
            One rank per client.

        Returns
        -------
        list of (left (p, m), singular (m,), right_t (m, t))
        """
        out = {}
        refined = [(k, rank) for k, rank in zip(clients, ranks) if not self.contaminated[k]]
        for k, rank in zip(clients, ranks):
            if self.contaminated[k]:
                out[k] = self.truncated_svd(k, rank)
        if refined:
            if self._gram_eig is None:
                self._gram_eig = scipy.linalg.eigh(self.common.T @ self.common)
            eigval, eigvec = self._gram_eig
            eigval = np.clip(eigval, 0.0, None)
            index = [k for k, _ in refined]
            coef, rights = self.stack.coef[index], self.stack.rights[index]
            projected = np.matmul(self.basis.T[None], coef)  # U^T Y_k, (n, m, r)
            turned = (rights.reshape(-1, rights.shape[2]) @ eigvec).reshape(rights.shape)
            dim = eigval.size

            with thread_limits(1):  # (values, vectors) per client, in order
                vectors = [self._top_pairs(eigval, projected[i] @ turned[i],
                                           min(refined[i][1], dim))
                           for i in range(len(refined))]
            right_all = (eigvec @ np.hstack([v for _, v in vectors])).T  # (sum m, t)
            common_all = self.common @ right_all.T                       # (p, sum m)
            start = 0
            for i, (k, _) in enumerate(refined):
                values = vectors[i][0]
                cols = slice(start, start + len(values))
                start += len(values)
                right_t = right_all[cols]
                sing = np.sqrt(np.clip(values, 0.0, None))
                image = common_all[:, cols] + self.basis @ (
                    projected[i] @ (rights[i] @ right_t.T))
                out[k] = (image / np.where(sing > 0, sing, 1.0), sing, right_t)
        return [out[k] for k in clients]

    @staticmethod
    def _top_pairs(eigval, small, count):
        """Top ``count`` eigenpairs of ``diag(eigval) + small^T small`` (Lanczos)."""
        dim = eigval.size
        operator = LinearOperator(
            (dim, dim), dtype=float,
            matvec=lambda x: eigval * x.ravel() + small.T @ (small @ x.ravel()),
            matmat=lambda x: eigval[:, None] * x + small.T @ (small @ x))
        return top_eigh(operator, count)


# --------------------------------------------------------------------------------------
# Exact reductions of LoRA factors
# --------------------------------------------------------------------------------------

class ReducedFactors(NamedTuple):
    """Output of :func:`reduce_factors` and :func:`factored_reduction`.

    Attributes
    ----------
    left_basis : ndarray or DeviceBasis of shape (d, s)
        Orthonormal basis Q of the span of all B_i (a :class:`DeviceBasis` when the
        reduction ran on a torch device: products with it are float64 ndarrays;
        ``np.asarray`` copies it to the host).
    right_basis : ndarray or DeviceBasis of shape (k, t)
        Orthonormal basis V of the span of all A_i^T.
    updates : ndarray of shape (n_clients, s, t), or FactoredBlocks
        Reduced updates ``Q^T B_i A_i V`` (or, from :func:`factored_reduction`,
        ``Y_i R_i`` in factored form).
    """

    left_basis: np.ndarray
    right_basis: np.ndarray
    updates: np.ndarray

    def expand(self, reduced):
        """Map a reduced (s, t) matrix, or a stack (n, s, t), back to (d, k): ``Q X V^T``."""
        return self.left_basis @ np.asarray(reduced) @ self.right_basis.T


# CholeskyQR (below): Q is taken after one pass when ||Q^T Q - I||_F <= _ORTHO_TOL,
# measured (norms and inner products in the reduced coordinates are then the data's
# to 1e-9 relative, far below any statistical error and below the rounding of fp32 or
# bf16 adapters); after a second pass (CholeskyQR2, orthonormal to O(eps) when its input
# is well conditioned) when the first is within 1/4 of orthonormal; R's certified
# condition bound ||R||_F ||R^-1||_F must be at most _MAX_COND (which also certifies
# the numerical rank, see _span_columns).
_ORTHO_TOL, _MAX_COND = 2.0 ** -30, 2.0 ** 20


def _cholesky_factor(matrix, gram=None):
    """Upper Cholesky factor R of ``matrix^T matrix`` (``gram``, its upper triangle,
    when already formed) for a tall float64 ``matrix``, or ``None`` where the Gram matrix
    is not numerically positive definite (or overflows)."""
    if gram is None:
        gram = scipy.linalg.blas.dsyrk(1.0, matrix.T, trans=0)  # upper of matrix^T matrix
    if not np.all(np.isfinite(gram)):
        return None
    upper, info = scipy.linalg.lapack.dpotrf(gram, lower=0, clean=1)
    return upper if info == 0 else None


def _solve_right(matrix, upper):
    """``matrix R^-1`` by one triangular solve (Fortran-ordered)."""
    return scipy.linalg.blas.dtrsm(1.0, upper, matrix, side=1, lower=0)


def _cholesky_qr(matrix):
    """A thin QR of a tall float64 ``matrix`` from its Gram matrix, or ``None``.

    CholeskyQR costs about 3 d m^2 flops with its check (the Gram matrix, half of it by
    ``syrk``, d m^2; one triangular solve for Q, d m^2; the Gram matrix of Q, d m^2),
    4 d m^2 with a second pass, against about 4 d m^2 for Householder's QR with its Q
    formed (the two bases of a 4096 x 4096 module with 100 rank-16 clients, one pass
    each, one thread: 1.29-1.35 s against 1.75-1.89 s for the two Householder QRs;
    benchmarks/lora_benchmark.py, benchmarks/RESULTS.md). Its Q is orthonormal only to ~ cond(R)^2 eps, so ``Q^T Q`` is formed and
    checked: taken when within ``_ORTHO_TOL`` of the identity, refined by a second
    pass when within 1/4, else ``None`` (Householder). R's certified condition bound is
    checked first (``None`` above ``_MAX_COND``), before any d-sized solve, so that a
    rejected matrix costs one Gram matrix more than Householder alone.
    """
    upper = _cholesky_factor(matrix)
    if upper is None:
        return None
    inverse, info = scipy.linalg.lapack.dtrtri(upper)
    with np.errstate(all="ignore"):
        cond = np.linalg.norm(upper) * np.linalg.norm(inverse) if info == 0 else np.inf
    if not cond <= _MAX_COND:
        return None
    q_factor = _solve_right(matrix, upper)
    # Q is Fortran-ordered (dtrsm's output): trans=1 reads it without a copy.
    gram = scipy.linalg.blas.dsyrk(1.0, q_factor, trans=1)  # upper triangle of Q^T Q
    off = np.triu(gram, 1)
    error = np.sqrt(2.0 * np.sum(off * off) + np.sum((np.diag(gram) - 1.0) ** 2))
    if error <= _ORTHO_TOL:
        return q_factor, upper
    if not error <= 0.25:
        return None
    second = _cholesky_factor(q_factor, gram)
    if second is None:
        return None
    return _solve_right(q_factor, second), scipy.linalg.blas.dtrmm(1.0, second, upper)


def _span_columns(matrix):
    """:func:`orthonormal_basis` up to a rotation of its columns, cheaper when full rank.

    Returns ``(basis, coordinates)``: ``coordinates`` is ``basis.T @ matrix`` when it
    comes for free (the R factor of a thin QR), else ``None``.

    A tall float64 matrix of full rank takes :func:`_cholesky_qr`, whose acceptance
    bound ``||R||_F ||R^-1||_F <= 2^20`` also certifies the rank: every singular value is then
    above ``2^-20 ||R||_F``, far above the tolerance :func:`orthonormal_basis` applies
    (``max(shape) eps`` times at most ``||R||_F``, below 1e-9 of it for any matrix
    under 4e6 rows). Otherwise a Householder QR, with full rank certified without an
    SVD: ``1 / ||R^-1||_F <= sigma_min(R)`` and ``||R||_F >= sigma_max(R)``, so
    ``1 / ||R^-1||_F > 16 tol(||R||_F)`` (the rank tolerance of
    :func:`orthonormal_basis` taken at an upper bound of the largest singular value,
    with a factor 16 for the rounding of the inverse, whose relative error is below
    ``cond(R) m eps < 1/16`` there) means that every singular value is above the
    tolerance. The triangular inverse costs m^3 / 3 flops, against 4 m^3 for the
    singular values. Either Q spans the same space as ``Q U`` (U orthogonal) without
    the d x m x m product; everything the reductions feed is invariant under such a
    rotation of the reduced coordinates (Frobenius inner products, orthogonally
    invariant norms). Otherwise (a rank that may be deficient): :func:`orthonormal_basis`.
    """
    tall = matrix.ndim == 2 and matrix.shape[0] >= matrix.shape[1] > 0
    if tall and matrix.dtype == np.float64 and np.all(np.isfinite(matrix)):
        found = _cholesky_qr(matrix)
        if found is not None:
            return found
    q_factor, r_factor = scipy.linalg.qr(matrix, mode="economic")
    upper = np.linalg.norm(r_factor)
    square = r_factor.shape[0] == r_factor.shape[1]  # else more columns than rows
    if square and upper > 0 and np.all(np.diag(r_factor) != 0):
        inverse, info = scipy.linalg.lapack.dtrtri(np.asarray(r_factor, dtype=float))
        lower = 1.0 / np.linalg.norm(inverse) if info == 0 else 0.0
        if np.isfinite(lower) and lower > 16.0 * rank_tolerance(matrix.shape, upper,
                                                                matrix.dtype):
            return q_factor, r_factor
    return orthonormal_basis(matrix, (q_factor, r_factor)), None


def _span_basis(matrix):
    """:func:`orthonormal_basis` of ``matrix`` (m, n), or the unit vector e_1 (m, 1) when
    its span is {0} (every B_i, or every A_i, is zero, as in fresh adapters): the reduced
    updates are then exactly 0 of size at least 1 instead of an empty array.

    Returns ``(basis, basis.T @ matrix)``; the product is the QR's R factor where
    :func:`_span_columns` certified full rank (Q^T Q R = R to round-off after
    Householder or two CholeskyQR passes, to ``_ORTHO_TOL`` = 2^-30 relative after one),
    which saves a product as costly as the QR itself (d x sum r_i by sum r_i).
    """
    basis, coordinates = _span_columns(matrix)
    if basis.shape[1] == 0:
        basis = np.eye(matrix.shape[0], 1, dtype=basis.dtype)
        coordinates = None
    if coordinates is None:
        coordinates = basis.T @ matrix
    return basis, coordinates


def _spans(factors, device=None, dtype=None):
    """Checked factors, the bases Q (d, s) and V (k, t) of all B_i and all A_i^T, and
    the stacked factors in them: ``Q^T [B_1 ... B_n]`` (s, sum r_i) and
    ``[A_1; ...; A_n] V`` (sum r_i, t). With a ``device``, the bases are
    :class:`DeviceBasis` (:func:`_device_span_basis`)."""
    from .aggregation._validation import check_factors  # lazily: aggregation imports this

    factors = check_factors(factors)
    if device is None:
        left, left_coords = _span_basis(np.hstack([b for b, _ in factors]))
        right, right_coords = _span_basis(np.vstack([a for _, a in factors]).T)
    else:
        factors = [_balanced(b_mat, a_mat) for b_mat, a_mat in factors]
        left, left_coords = _device_span_basis(np.hstack([b for b, _ in factors]),
                                               device, dtype)
        right, right_coords = _device_span_basis(np.vstack([a for _, a in factors]).T,
                                                 device, dtype)
    return factors, left, right, left_coords, right_coords.T


def _balanced(b_mat, a_mat):
    """The same update ``B A`` as ``(U, S V^T A)``, ``B = U S V^T`` (thin SVD, the
    directions of ``B`` above its rank tolerance; zero columns of ``B`` and rows of
    ``A`` pad to the client's rank).

    The reduction's coordinates of an update are rounded on the scale of its factors,
    ``eps ||B|| ||A||``, not of the product: a client sending ``(B M, M^-1 A)`` with M
    badly conditioned has coordinates off by about ``cond(M)`` times the product's
    rounding, which in float32 is far above the round-off floor of the tests
    (:func:`_round_off`, set from the products, so that no client can raise it). Here,
    in float64 on the host before the device's reduction, the left factor gets
    orthonormal columns: ``||U|| ||S V^T A|| <= sqrt(r) ||B A||`` up to the float64
    rounding of the product ``S V^T A``. Same spans as ``B`` and ``A`` (a rank-deficient
    or zero ``B`` adds no direction); d r^2 flops per client.
    """
    left, sing, right_t = np.linalg.svd(b_mat, full_matrices=False)
    count = 0
    if sing.size and sing[0] > 0:
        count = int(np.sum(sing > rank_tolerance(b_mat.shape, sing[0], np.float64)))
    b_new, a_new = np.zeros_like(b_mat), np.zeros_like(a_mat)
    b_new[:, :count] = left[:, :count]
    a_new[:count] = (sing[:count, None] * right_t[:count]) @ a_mat
    return b_new, a_new


# --------------------------------------------------------------------------------------
# The reduction on a torch device
# --------------------------------------------------------------------------------------

def _torch_dtype(dtype):
    """The torch dtype of ``dtype`` (None, "float64" or "float32", or a torch dtype)."""
    import torch

    name = "float64" if dtype is None else str(dtype).removeprefix("torch.")
    if name not in ("float64", "float32"):
        raise ValueError(f"dtype must be float64 or float32, got {dtype!r}.")
    return getattr(torch, name)


class DeviceBasis:
    """An orthonormal basis (d, s) held as a torch tensor on a device.

    The d-sized work of the LoRA path is products with the bases: the reduction's
    coordinates, the readouts ``Q (U S^1/2)``, the subspace ``Q U``. With the bases on
    a device (:func:`reduce_factors` or :func:`factored_reduction` given ``device``)
    those products run there, in the basis's precision, and come back as float64
    numpy arrays of the output's size; everything in reduced coordinates (size at most
    ``sum r_i``, whatever d is) stays in numpy float64. ``basis @ array``,
    ``array @ basis``, ``basis.T`` and ``basis.shape`` behave as for an ndarray
    (``__array_ufunc__ = None`` makes numpy hand ``array @ basis`` to this class);
    ``np.asarray(basis)`` copies it to the host.

    Examples
    --------
    >>> import torch
    >>> basis = DeviceBasis(torch.eye(3, 2, dtype=torch.float64))
    >>> basis.shape, basis.T.shape, (basis @ np.ones((2, 1))).ravel().tolist()
    ((3, 2), (2, 3), [1.0, 1.0, 0.0])
    """

    __array_ufunc__ = None  # ndarray @ DeviceBasis -> DeviceBasis.__rmatmul__

    def __init__(self, tensor, transposed=False):
        self.tensor, self.transposed = tensor, transposed

    def _matrix(self):
        return self.tensor.T if self.transposed else self.tensor

    @property
    def shape(self):
        return tuple(self._matrix().shape)

    @property
    def T(self):  # noqa: N802 (ndarray's name)
        return DeviceBasis(self.tensor, not self.transposed)

    @property
    def device(self):
        return self.tensor.device

    @property
    def ndim(self):
        return 2

    @property
    def dtype(self):
        """float64: what its products return (the tensor's own is ``.tensor.dtype``)."""
        return np.dtype(np.float64)

    def __len__(self):
        return self.shape[0]

    def _operand(self, array):
        import torch

        return torch.as_tensor(np.asarray(array, dtype=float)).to(
            device=self.tensor.device, dtype=self.tensor.dtype)

    @staticmethod
    def _host(tensor):
        import torch

        return tensor.to(device="cpu", dtype=torch.float64).numpy()

    def __matmul__(self, other):
        return self._host(self._matrix() @ self._operand(other))

    def __rmatmul__(self, other):
        return self._host(self._operand(other) @ self._matrix())

    def __array__(self, dtype=None, copy=None):
        host = self._host(self._matrix())
        return host if dtype is None else host.astype(dtype)

    def __repr__(self):
        return (f"DeviceBasis(shape={self.shape}, device={self.tensor.device}, "
                f"dtype={self.tensor.dtype})")


def _device_span_basis(matrix, device, dtype):
    """:func:`_span_basis` in torch on ``device``: ``(DeviceBasis, coordinates)``.

    A Householder QR (``torch.linalg.qr``, stable in any precision, as on a GPU) of the
    matrix with its columns scaled to unit norm (the same span; in float32 a client whose
    factors are 1e-4 of the others' would otherwise fall below the rank tolerance of the
    whole stack, ``max(shape) eps_float32`` of its largest singular value, and be
    dropped: a review measured its update lost entirely at d = 1024). The rank
    tolerance is ``max(sqrt(max(d, m)), 16) eps`` of the largest singular value, not
    numpy's ``max(d, m) eps``: measured on exactly rank-deficient stacks of unit
    columns (d = 256 to 4096, m = 112 to 1600), the spurious singular values of a
    float32 Householder R are 1.6e-7 to 1.8e-7 of the largest (1.5 eps_float32), 11 to
    41 times below sqrt(max(d, m)) eps; a second review saw up to 3.1e-7 (bf16-rounded
    inputs) and a margin of only 5.5 at d = 64, m = 32, hence the floor of 16 eps (at
    least 6 there). Numpy's rule (3e-5 to 5e-4 in float32) dropped the
    small deviations of clients that share a large common part (a later federated
    round: the global adapter plus changes of 1e-5 relative). Full rank is certified
    as in :func:`_span_columns` with 16 times that tolerance; otherwise the SVD of the
    small triangular factor decides the rank (:func:`orthonormal_basis`). CholeskyQR, the CPU reference's faster
    route, is not used: its Q is orthonormal only to ``cond(R)^2 eps``, which float32
    cannot certify. The coordinates ``Q^T matrix`` (s, m) come back as float64 numpy; in
    float32 they are the data's to about ``m eps_float32`` relative per column, which the
    tests' round-off floor follows (:func:`_round_off`). The scaling also keeps factors
    beyond float32's range (3.4e38) finite.
    """
    import torch

    torch_dtype = _torch_dtype(dtype)
    matrix = np.asarray(matrix, dtype=float)
    norms = np.linalg.norm(matrix, axis=0)
    norms = np.where(norms > 0, norms, 1.0)
    work = torch.as_tensor(matrix / norms).to(device=device, dtype=torch_dtype)
    tolerance = max(np.sqrt(max(matrix.shape)), 16.0) * float(torch.finfo(torch_dtype).eps)
    q_factor, r_factor = torch.linalg.qr(work, mode="reduced")
    r_host = r_factor.to(device="cpu", dtype=torch.float64).numpy()
    upper = np.linalg.norm(r_host)
    certified = False
    if r_host.shape[0] == r_host.shape[1] and upper > 0 and np.all(np.diag(r_host) != 0):
        inverse, info = scipy.linalg.lapack.dtrtri(r_host)
        with np.errstate(all="ignore"):
            lower = 1.0 / np.linalg.norm(inverse) if info == 0 else 0.0
        certified = bool(np.isfinite(lower) and lower > 16.0 * tolerance * upper)
    if certified:  # Q^T (matrix / norms) = R, so Q^T matrix = R diag(norms)
        return DeviceBasis(q_factor), r_host * norms
    left, singular, _ = scipy.linalg.svd(r_host)
    keep = (singular > tolerance * singular[0] if singular.size and singular[0] > 0
            else np.zeros(singular.shape, dtype=bool))
    if not keep.any():  # the span is {0}: the unit vector e_1, as _span_basis
        basis = torch.zeros((matrix.shape[0], 1), dtype=torch_dtype, device=work.device)
        basis[0, 0] = 1.0
        return DeviceBasis(basis), np.zeros((1, matrix.shape[1]))
    basis = DeviceBasis(q_factor @ torch.as_tensor(left[:, keep]).to(device=work.device,
                                                                      dtype=torch_dtype))
    return basis, (basis.T @ (matrix / norms)) * norms


def reduce_factors(factors, *, device=None, dtype=None):
    """Orthonormal bases of the factors' spans and the updates in those coordinates.

    Parameters
    ----------
    factors : list of (ndarray of shape (d, r_i), ndarray of shape (r_i, k))
    device : str or torch.device, optional
        Run the d-sized work (the two QRs) in torch on this device (``"cpu"`` runs the
        same torch code on the CPU); the bases are then :class:`DeviceBasis`. Default:
        numpy, the reference (CholeskyQR where it certifies itself).
    dtype : {"float64", "float32"}, optional
        The precision of the device's QRs (default float64).

    Returns
    -------
    ReducedFactors
        ``(left_basis, right_basis, updates)``, updates (n_clients, s, t) with
        ``1 <= s, t <= sum r_i`` (a span that is {0}, all updates zero, is kept as one
        unit vector: the updates reduce to zeros). One right basis V for all clients,
        as a common backbone (or any cross-client average, as in CLAIR's refinement)
        needs (docs/method_notes.md, section 6); :func:`factored_reduction` keeps each client in its
        own row basis instead.

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
    factors, left, right, left_all, right_all = _spans(factors, device, dtype)
    bounds = np.cumsum([0] + [b.shape[1] for b, _ in factors])
    blocks = np.stack([left_all[:, i:j] @ right_all[i:j]
                       for i, j in zip(bounds, bounds[1:])])
    return ReducedFactors(left, right, blocks)


def factored_reduction(factors, *, device=None, dtype=None):
    """The updates as a :class:`FactoredBlocks` stack, exactly.

    With Q (d, s) and V (k, t) the orthonormal bases of all ``B_i`` and all ``A_i^T``,
    ``A_i = (A_i V) V^T``; a thin QR ``(A_i V)^T = W_i T_i`` gives
    ``B_i A_i = Q Y_i W_i^T V^T`` with ``Y_i = Q^T B_i T_i^T`` (s, r_i) and ``W_i^T``
    (r_i, t) with orthonormal rows: each client in its own row basis, all row bases in
    the shared coordinates V. Ranks below the largest are zero-padded.

    ``device`` and ``dtype``: as in :func:`reduce_factors`. In float32 the stack's
    ``round_off`` is that precision's (the coordinates are exact to it, not to float64).

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
    # The stacked factors in the bases, (s, sum r_i) and (sum r_i, t): the QRs' R
    # factors when the spans are of full rank (the LoRA case), else two products.
    factors, left, right, left_all, right_all = _spans(factors, device, dtype)
    width = max(b.shape[1] for b, _ in factors)
    coef = np.zeros((len(factors), left.shape[1], width))
    rights = np.zeros((len(factors), width, right.shape[1]))
    start = 0
    for i, (b_mat, _) in enumerate(factors):
        cols = slice(start, start + b_mat.shape[1])
        start += b_mat.shape[1]
        row_basis, tri = np.linalg.qr(right_all[cols].T)  # (t, m), (m, r_i), m <= r_i
        coef[i, :, :tri.shape[0]] = left_all[:, cols] @ tri.T
        rights[i, :tri.shape[0]] = row_basis.T
    return ReducedFactors(left, right, FactoredBlocks(coef, rights,
                                                      round_off=_round_off(coef, dtype)))


def _round_off(coef, dtype):
    """A stack's round-off per entry of ``coef`` (:class:`FactoredBlocks`'s
    ``round_off``): ``sqrt(c m / (s r))`` with ``m`` the median over clients of
    ``||X_k||_F^2`` and ``c = 64 eps_float64 + (64 eps)^2``, eps the reduction's
    precision; its square times the ``s r`` entries a client's statistic sums is
    ``c m``.

    The statistics of a factored stack are differences of inner products
    (``||X_k - m||^2`` from ``<X_j, X_l>``, in float64), which round at
    ``eps ||X_k||^2``, not ``(eps ||X_k||)^2``: noiseless clients (the same update
    sent in different factorizations) gave statistics up to 1.8e-10 with ``||X_k||^2``
    near 5e5, flagged at p ~ 1e-270 under the dense data's floor (64 eps per entry of
    size one), differently at each scale of the updates. A float32 reduction adds its
    coordinates' error, a few ``eps_float32 ||X_k||`` per client, which enters a
    statistic squared. The median, not the largest client, sets it: one client cannot
    raise everyone's floor (by a large update, or by factors ``(B M, M^-1 A)`` of a
    badly conditioned M, whose product is unchanged); a review measured a floor taken
    from the largest ``||B_k|| ||A_k||`` hiding every attacker once one client sent
    factors of condition 1e8.
    """
    eps = float(np.finfo(np.float32 if dtype is not None and str(dtype).removeprefix(
        "torch.") == "float32" else np.float64).eps)
    squares = np.einsum("kij,kij->k", coef, coef)  # ||Y_k||^2 = ||X_k||^2 (R_k orthonormal)
    factor = 64.0 * float(np.finfo(np.float64).eps) + (64.0 * eps) ** 2
    return float(np.sqrt(factor * float(np.median(squares))
                         / max(coef.shape[1] * coef.shape[2], 1)))


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

    def readout(self, k, rank):
        """Client k's best rank-``rank`` factors (:func:`eckart_young_factors`).

        A :class:`FactoredRefined` client is never formed densely (its own
        ``truncated_svd``).
        """
        if hasattr(self.reduced, "truncated_svd"):
            triplets = self.reduced.truncated_svd(k, rank)
        else:
            triplets = truncated_svd(np.asarray(self.reduced[k]), rank)
        return eckart_young_factors(triplets, rank, self.left_basis, self.right_basis)

    def readouts(self, clients, ranks):
        """``[readout(k, rank) for k, rank in zip(clients, ranks)]``, batched.

        The same factors; the products with the d x s and k x t bases run once over
        every client's columns (one BLAS-3 product each) instead of two thin products
        per client, and a :class:`FactoredRefined` stack batches its own products
        (:meth:`FactoredRefined.truncated_svds`).
        """
        clients, ranks = list(clients), list(ranks)
        if not clients:
            return []
        if hasattr(self.reduced, "truncated_svds"):
            triplets = self.reduced.truncated_svds(clients, ranks)
        else:
            triplets = [truncated_svd(np.asarray(self.reduced[k]), rank)
                        for k, rank in zip(clients, ranks)]
        small = [eckart_young_factors(t, rank) for t, rank in zip(triplets, ranks)]
        lefts = self.left_basis @ np.hstack([b_mat for b_mat, _ in small])
        rights = np.vstack([a_mat for _, a_mat in small]) @ self.right_basis.T
        out, start = [], 0
        for b_mat, _ in small:
            cols = slice(start, start + b_mat.shape[1])
            start += b_mat.shape[1]
            out.append((lefts[:, cols], rights[cols]))
        return out


class CombinedUpdates:
    """Each client's update as a combination of every client's: ``sum_j C_kj B_j A_j``.

    The joint refinement of LoRA adapters (:func:`clairstat.aggregation.clair_modules`)
    gives every client a linear combination of the clients' updates; here it is kept in
    the reduced coordinates of the module, ``Y = Q^T [B_1 ... B_n]`` (s, R) and
    ``Z = [A_1; ...; A_n] V`` (R, t), ``R = sum r_j``: client k's update is
    ``Y diag(w_k) Z`` with ``w_k`` the row ``C_k`` repeated over each client's rank.
    Nothing of size n x s x t is formed unless asked (``np.asarray``).

    Parameters
    ----------
    factors : list of (ndarray (d, r_j), ndarray (r_j, k))
    coef : ndarray of shape (n_out, n_clients)
        Row k: the coefficients of client k's combination.
    left_basis : ndarray of shape (d, s)
    right_basis : ndarray of shape (k, t)
        Orthonormal bases of the spans of all ``B_j`` and all ``A_j^T``.
    """

    def __init__(self, factors, coef, left_basis, right_basis):
        self.coef = np.asarray(coef, dtype=float)
        # One product each with the stacked factors (on the bases' device when they are
        # DeviceBasis).
        self.left = left_basis.T @ np.hstack([b_mat for b_mat, _ in factors])      # Y
        self.right = np.vstack([a_mat for _, a_mat in factors]) @ right_basis     # Z
        self.ranks = np.array([a_mat.shape[0] for _, a_mat in factors])
        self._qr = None

    def _weights(self, k):
        return np.repeat(self.coef[k], self.ranks)

    @property
    def shape(self):
        return (len(self.coef), self.left.shape[0], self.right.shape[1])

    def __len__(self):
        return len(self.coef)

    def __getitem__(self, k):
        return (self.left * self._weights(k)) @ self.right

    def __array__(self, dtype=None, copy=None):
        dense = np.stack([self[k] for k in range(len(self))])
        return dense if dtype is None else dense.astype(dtype)

    def _factors(self):
        """The thin QRs ``Y = Q_y T_y`` and ``Z^T = Q_z T_z`` (once per module)."""
        if self._qr is None:
            self._qr = (scipy.linalg.qr(self.left, mode="economic"),
                        scipy.linalg.qr(self.right.T, mode="economic"))
        return self._qr

    def truncated_svd(self, k, rank):
        """Top-``rank`` singular triplets of client k's (s, t) update.

        With the thin QRs ``Y = Q_y T_y`` and ``Z^T = Q_z T_z`` (once per module), the
        update is ``Q_y (T_y diag(w_k) T_z^T) Q_z^T``: the SVD of an R x R matrix at
        most, whatever s and t.
        """
        (q_left, t_left), (q_right, t_right) = self._factors()
        weights = self._weights(k)
        shape = (t_left.shape[0], t_right.shape[0])
        if lanczos_pays(min(shape), rank):
            # Lanczos on the operator T_y diag(w) T_z^T: O(R^2) per product, never the
            # R x R matrix's O(R^3) SVD (1600 x 1600 for 100 rank-16 clients).
            operator = LinearOperator(
                shape, dtype=float,
                matvec=lambda x: t_left @ (weights * (t_right.T @ x.ravel())),
                rmatvec=lambda y: t_right @ (weights * (t_left.T @ y.ravel())))
            left, sing, right_t = svds(operator, k=rank, tol=0, random_state=0)
            order = np.argsort(sing)[::-1]
            left, sing, right_t = left[:, order], sing[order], right_t[order]
        else:
            left, sing, right_t = truncated_svd((t_left * weights) @ t_right.T, rank)
        return q_left @ left, sing, right_t @ q_right.T

    def truncated_svds(self, clients, ranks):
        """:meth:`truncated_svd` for several clients (one QR pair for all).

        The clients' Lanczos runs (matrix-vector products with R x R factors) run on
        one BLAS thread each, on the threads the enclosing
        :func:`clairstat._threads.thread_limits` allows (:func:`map_in_threads`): a
        second BLAS thread on such short products only synchronises (the whole-model
        benchmark's second pass, 50 rank-16 clients per module: 9.2 s per module before,
        2.6 s after, at the default two threads; benchmarks/RESULTS.md).
        """
        self._factors()  # before the threads share it

        def one(item):
            with thread_limits(1):
                return self.truncated_svd(*item)

        return map_in_threads(one, list(zip(clients, ranks)))

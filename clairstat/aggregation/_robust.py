"""Byzantine-robust aggregators on the dense updates ``Delta W_i = B_i A_i``.

The coordinate-wise rules (median, trimmed mean) are not rotation invariant and run on
the dense updates, a block of rows at a time to bound memory. Krum and the geometric
median depend on the updates only through their Gram matrix
``G_ij = <B_i A_i, B_j A_j>_F = sum((B_i^T B_j) * (A_i A_j^T))`` (r_i x r_j blocks, never
d x k) and return linear combinations ``sum c_i B_i A_i``, whose exact factors are the
FLoRA stack of the chosen clients.
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from ._result import AggregationResult
from ._validation import check_integer, dense_updates, stacked_factors

__all__ = ["weighted_median", "weighted_trimmed_mean", "median", "trimmed_mean",
           "update_gram", "krum_scores", "krum", "weiszfeld", "geomedian"]

_CHUNK_BYTES = 2**26  # 64 MiB of dense updates per block of rows


def _sorted_with_weights(values, weights):
    order = np.argsort(values, axis=0, kind="stable")
    return np.take_along_axis(values, order, axis=0), weights[order]


def weighted_median(values, weights):
    """Column-wise median of the weighted distribution ``sum p_i delta(values[i])``.

    When the cumulative weight hits exactly 1/2 the two middle values are averaged, so
    uniform weights give :func:`numpy.median`.

    Parameters
    ----------
    values : ndarray of shape (n_clients, m)
    weights : ndarray of shape (n_clients,), summing to 1

    Examples
    --------
    >>> weighted_median(np.array([[1.0], [2.0], [10.0]]), np.array([0.2, 0.2, 0.6]))
    array([10.])
    """
    ordered, sorted_weights = _sorted_with_weights(values, weights)
    cumulative = np.cumsum(sorted_weights, axis=0)
    # Rounding of the cumulative sum: a tie with 1/2 is decided up to n ulps.
    tol = len(weights) * np.finfo(float).eps
    lower = np.argmax(cumulative >= 0.5 - tol, axis=0)[None]
    upper = np.argmax(cumulative > 0.5 + tol, axis=0)[None]
    return 0.5 * (np.take_along_axis(ordered, lower, 0) +
                  np.take_along_axis(ordered, upper, 0))[0]


def weighted_trimmed_mean(values, weights, trim):
    """Column-wise mean of the weighted distribution with mass ``trim`` cut from each tail.

    Each sorted value keeps the part of its weight interval ``[c_{i-1}, c_i]`` that falls
    in ``[trim, 1 - trim]``. Uniform weights with ``trim * n`` an integer give
    :func:`scipy.stats.trim_mean`; integer weights give the trimmed mean of the replicated
    sample.

    Examples
    --------
    >>> weighted_trimmed_mean(np.array([[0.0], [1.0], [2.0], [99.0]]), np.full(4, 0.25), 0.25)
    array([1.5])
    """
    ordered, sorted_weights = _sorted_with_weights(values, weights)
    after = np.cumsum(sorted_weights, axis=0)
    kept = np.minimum(after, 1.0 - trim) - np.maximum(after - sorted_weights, trim)
    kept = np.clip(kept, 0.0, None)
    return np.sum(kept * ordered, axis=0) / np.sum(kept, axis=0)


def _coordinatewise(factors, statistic):
    """Apply ``statistic((n, m) values) -> (m,)`` to the dense updates, rows in blocks."""
    (b_first, a_first), n_clients = factors[0], len(factors)
    d, k = b_first.shape[0], a_first.shape[1]
    rows = max(1, _CHUNK_BYTES // (8 * n_clients * k))
    out = np.empty((d, k))  # float64, as every rule's update (the weights are float64)
    for start in range(0, d, rows):
        block = dense_updates(factors, slice(start, start + rows))
        out[start:start + rows] = statistic(block.reshape(n_clients, -1)).reshape(-1, k)
    return out


def median(factors, weights):
    """Coordinate-wise weighted median of the client updates (dense result, no factors)."""
    update = _coordinatewise(factors, lambda v: weighted_median(v, weights))
    return AggregationResult("median", update, None, weights)


def trimmed_mean(factors, weights, trim=0.1):
    """Coordinate-wise weighted trimmed mean, mass ``trim`` cut from each tail.

    The cut is a mass, not a count: with equal weights and ``trim * n_clients`` not an
    integer, the client on the edge of each tail loses part of its weight, where
    :func:`scipy.stats.trim_mean` and Flower's ``FedTrimmedAvg`` drop
    ``floor(trim * n_clients)`` values whole (trim = 0.1 with 16 clients: 1.6 clients'
    weight per tail here, 1 client there); the two agree, and are Yin et al.'s (2018)
    trimmed mean, when ``trim * n_clients`` is an integer. Yin et al.'s guarantee needs
    ``trim`` at least the share of Byzantine clients.

    With equal weights and ``0 < trim * n_clients < 1`` (the default trim, 0.1, with
    fewer than 10 clients) no client's value is cut whole from a tail, only part of
    its weight: one extreme client keeps ``1 - trim * n_clients`` of its weight and
    moves the mean almost as much as in a plain mean. A UserWarning says so (a review
    found it silent).
    """
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must lie in [0, 0.5), got {trim}.")
    n_clients = len(factors)
    if 0.0 < trim and trim * n_clients < 1.0 - 1e-9 and np.all(weights == weights[0]):
        warnings.warn(f"trimmed_mean: trim={trim} with {n_clients} equally weighted clients "
                      f"cuts no client whole (trim * n_clients = {trim * n_clients:.3g} < 1): "
                      f"an extreme client keeps {1 - trim * n_clients:.3g} of its weight; "
                      f"use trim >= 1 / n_clients = {1 / n_clients:.3g} (or the median).",
                      UserWarning, stacklevel=3)
    update = _coordinatewise(factors, lambda v: weighted_trimmed_mean(v, weights, trim))
    return AggregationResult("trimmed_mean", update, None, weights, {"trim": trim})


def update_gram(factors):
    """Gram matrix ``G_ij = <B_i A_i, B_j A_j>_F`` of the updates, shape (n, n).

    From the (sum r_i)-square matrices ``B^T B`` and ``A A^T`` of the stacked factors:
    cost O((d + k) (sum r_i)^2), nothing of size d x k.

    Examples
    --------
    >>> f = [(np.ones((2, 1)), np.ones((1, 3))), (np.eye(2)[:, :1], 2 * np.ones((1, 3)))]
    >>> update_gram(f).tolist()
    [[6.0, 6.0], [6.0, 12.0]]
    """
    # float64 whatever the factors' dtype: squared norms of float32 updates overflow early.
    left = np.hstack([b for b, _ in factors]).astype(np.float64, copy=False)
    right = np.vstack([a for _, a in factors]).astype(np.float64, copy=False)
    starts = np.cumsum([0] + [b.shape[1] for b, _ in factors[:-1]])
    products = (left.T @ left) * (right @ right.T)
    return np.add.reduceat(np.add.reduceat(products, starts, axis=0), starts, axis=1)


def _combination(rule, factors, weights, coefficients, extras):
    """Result for ``update = sum c_i B_i A_i``, from its exact FLoRA-stacked factors."""
    keep = np.flatnonzero(coefficients > 0)
    b_stack, a_stack = stacked_factors([factors[i] for i in keep], coefficients[keep])
    return AggregationResult(rule, b_stack @ a_stack, (b_stack, a_stack), weights, extras)


def krum_scores(gram, n_byzantine):
    """Krum score of each update: sum of squared distances to its n - f - 2 nearest others.

    Parameters
    ----------
    gram : ndarray of shape (n_clients, n_clients)
        Inner products of the updates (:func:`update_gram`).
    n_byzantine : int
    """
    sq_norms = np.diag(gram)
    # Squared distances from inner products; clip the rounding of near-equal updates.
    distances = np.maximum(sq_norms[:, None] + sq_norms[None, :] - 2 * gram, 0.0)
    np.fill_diagonal(distances, np.inf)
    n_neighbours = len(gram) - n_byzantine - 2
    return np.sort(distances, axis=1)[:, :n_neighbours].sum(axis=1)


def krum(factors, weights, n_byzantine=None, multi=1):
    """Krum / multi-Krum: average the ``multi`` updates with the lowest Krum scores.

    Parameters
    ----------
    n_byzantine : int, optional
        f, the number of attackers tolerated; needs ``n_clients >= 2 f + 3``; default the
        largest such f (so at least 3 clients).
    multi : int, default=1
        m, the number of selected updates, averaged with their renormalised weights
        (scores ignore the weights, as in the original rule). Clients of weight 0 are
        selected last, only when ``multi`` exceeds the number of the others, and then
        with coefficient 0 (a client of weight 0 was selected, and its update returned
        with coefficient 1: a review).

    Returns
    -------
    AggregationResult
        extras ``selected`` (indices), ``scores`` (n_clients,); ``factors`` are the
        FLoRA-stacked factors of the selected clients (one client's own when m = 1).
    """
    n_clients = len(factors)
    check_integer("multi", multi)
    if n_byzantine is None:  # the largest f the clients allow
        if n_clients < 3:
            raise ValueError(f"krum needs at least 3 clients (n_clients >= 2 n_byzantine + 3 "
                             f"with n_byzantine >= 0), got {n_clients} clients (n_byzantine "
                             "not given: derived from the client count as the largest f "
                             "with n_clients >= 2 f + 3).")
        f = (n_clients - 3) // 2
    else:
        check_integer("n_byzantine", n_byzantine)
        f = int(n_byzantine)
        if f < 0:
            raise ValueError(f"krum's n_byzantine must be >= 0, got {f}.")
        if n_clients < 2 * f + 3:
            raise ValueError(f"krum needs n_clients >= 2 n_byzantine + 3, got {n_clients} "
                             f"clients and n_byzantine={f}.")
    if not 1 <= multi <= n_clients:
        raise ValueError(f"multi must lie in [1, {n_clients}], got {multi}.")
    scores = krum_scores(update_gram(factors), f)
    candidates = np.where(weights > 0, scores, np.inf)  # weight 0: selected last
    selected = np.sort(np.argsort(candidates, kind="stable")[:multi])
    coefficients = np.zeros(n_clients)
    coefficients[selected] = weights[selected] / weights[selected].sum()
    return _combination("krum", factors, weights, coefficients,
                        {"selected": selected, "scores": scores, "n_byzantine": f})


def _vertex_median(gram, weights, floor):
    """Coefficients of the data point that is the weighted geometric median, or None.

    ``x_j`` is the median exactly when ``||sum_{i != j} p_i (x_i - x_j) / ||x_i - x_j|| ||
    <= p_j`` (points within ``floor`` of ``x_j`` count as ``x_j``, their weights
    pooled): the test of Vardi and Zhang (2000). Weiszfeld's iterates only crawl towards
    such a point, and one that lands on another data point stops there.
    """
    sq = np.diag(gram)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0))
    same = dist <= floor
    pull = np.where(same, 0.0, weights[None, :] / np.where(same, 1.0, dist))
    resultant = pull - np.diag(pull.sum(axis=1))  # row j: sum_i pull_ji (x_i - x_j)
    norms = np.sqrt(np.maximum(np.einsum("ji,ik,jk->j", resultant, gram, resultant), 0.0))
    pooled = same.astype(float) @ weights
    optimal = np.flatnonzero(norms <= pooled)
    if optimal.size == 0:
        return None
    coefficients = np.where(same[optimal[0]], weights, 0.0)
    return coefficients / coefficients.sum()


def weiszfeld(gram, weights, tol=1e-10, max_iter=1000):
    """Weighted geometric median of points given by their Gram matrix (Weiszfeld).

    Minimises ``sum p_i ||z - x_i||`` over ``z = sum c_j x_j``; every iterate is such a
    combination, so only the (n, n) Gram matrix is needed. A data point that is the
    median is found first by its optimality test (:func:`_vertex_median`); otherwise
    an iterate that lands within ``tol`` times the data scale of data points takes
    Vardi and Zhang's step (2000), which leaves a point that is not the median instead
    of stopping there (a review found the earlier floor on the distances stopping on a
    client's update, ``converged`` True, 10% above the minimum).

    When every point is 0 (all updates zero, e.g. fresh adapters) the median is 0 and
    the weights are returned as coefficients after 0 iterations.

    ``tol`` must be a finite number >= 0 and ``max_iter`` a positive integer (else
    ValueError).

    Returns
    -------
    coefficients : ndarray of shape (n_clients,)
        Non-negative, summing to 1; the median is ``sum c_i x_i``.
    n_iter : int
        0 when the median is a data point found by its test.
    converged : bool
        Whether the last step was below ``tol`` times the data scale.

    Examples
    --------
    >>> points = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [9.0, 9.0]])
    >>> c, _, ok = weiszfeld(points @ points.T, np.full(4, 0.25))
    >>> bool(ok), bool(np.linalg.norm(c @ points) < 1.0)
    (True, True)
    """
    check_integer("max_iter", max_iter)
    if max_iter < 1:  # -5 reported -5 iterations: a review
        raise ValueError(f"max_iter must be a positive integer, got {max_iter}.")
    if not (isinstance(tol, numbers.Real) and math.isfinite(tol) and tol >= 0):  # nan ran
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}.")  # max_iter
    scale = float(np.sqrt(np.max(np.diag(gram))))
    coefficients = weights.copy()
    if scale == 0.0:  # all points at 0: any combination is the median (no 0 / 0 below)
        return coefficients, 0, True
    floor = max(tol * scale, np.finfo(float).tiny)
    vertex = _vertex_median(gram, weights, floor)
    if vertex is not None:
        return vertex, 0, True
    for n_iter in range(1, max_iter + 1):
        squared = (np.diag(gram) - 2 * gram @ coefficients
                   + coefficients @ gram @ coefficients)
        distances = np.sqrt(np.maximum(squared, 0.0))
        on = distances <= floor  # data points the iterate sits on (no 1 / 0)
        pull = np.where(on, 0.0, weights / np.where(on, 1.0, distances))
        if not pull.sum() > 0.0:  # every point within the floor of the iterate
            return coefficients, n_iter, True
        new = pull / pull.sum()
        if on.any():  # Vardi-Zhang: move off a point that is not the median
            resultant = pull - pull.sum() * coefficients
            size = np.sqrt(max(resultant @ gram @ resultant, 0.0))
            share = min(1.0, weights[on].sum() / size) if size > 0 else 1.0
            new = (1.0 - share) * new + share * coefficients
        change = new - coefficients
        coefficients = new
        if np.sqrt(max(change @ gram @ change, 0.0)) <= tol * scale:
            return coefficients, n_iter, True
    return coefficients, max_iter, False


def geomedian(factors, weights, tol=1e-10, max_iter=1000):
    """Weighted geometric median of the updates (Weiszfeld), in Frobenius norm.

    ``tol`` is relative to the largest update norm. Returns extras ``coefficients``
    (the update is ``sum c_i B_i A_i``), ``iterations``, ``converged``; a
    ``ConvergenceWarning`` is raised when ``max_iter`` is reached.
    """
    coefficients, n_iter, converged = weiszfeld(update_gram(factors), weights, tol, max_iter)
    if not converged:
        warnings.warn(f"geomedian: Weiszfeld did not reach tol={tol} in {max_iter} "
                      "iterations.", ConvergenceWarning, stacklevel=3)
    return _combination("geomedian", factors, weights, coefficients,
                        {"coefficients": coefficients, "iterations": n_iter,
                         "converged": converged})

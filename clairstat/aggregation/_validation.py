"""Input checks and small helpers shared by the rules (the linear algebra of reduced
coordinates, ``orthonormal_basis`` and ``rank_tolerance``, is in :mod:`clairstat._reduced`)."""

from __future__ import annotations

import collections
import math
import numbers

import numpy as np

__all__ = ["check_factors", "check_weights", "check_integer", "common_rank", "stacked_factors",
           "exact_update", "dense_updates"]

_REAL_KINDS = "biuf"  # bool, signed and unsigned integers, floating point

# The rules square the updates (the reductions' norms and QRs, the Gram matrices, the
# tests' statistics) and sum the squares over clients and coordinates in float64, whose
# largest number is 1.8e308: factors or an update of a larger norm than this overflow
# there (reviews: lora_B times 1e200 gave an infinite noise scale; factors of 1e150,
# finite, made geomedian's Gram matrix inf and krum's scores NaN).
MAX_UPDATE_NORM = 1e150


def _safe_norm(matrix):
    """Frobenius norm of a float64 array, without overflow where its square would."""
    largest = float(np.max(np.abs(matrix))) if matrix.size else 0.0
    if largest == 0.0 or not math.isfinite(largest):
        return largest
    return largest * float(np.linalg.norm(matrix / largest))


def _check_matrix(index, name, matrix):
    """One factor: a 2-D array of finite real numbers."""
    if matrix.dtype.kind not in _REAL_KINDS:
        raise ValueError(f"factors[{index}]: {name} must hold real numbers, got dtype "
                         f"{matrix.dtype}.")
    if matrix.ndim != 2:
        raise ValueError(f"factors[{index}]: {name} must be 2-D, got shape {matrix.shape}.")
    finite = np.isfinite(matrix)
    if not finite.all():
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise ValueError(f"factors[{index}]: {name} has {int((~finite).sum())} non-finite "
                         f"value(s) (first {name}{list(first)} = {matrix[first]}).")


def _as_array(matrix):
    """A numpy array; a torch tensor from any device, bfloat16 (which numpy lacks) as
    float32, exactly (``np.asarray`` raised a TypeError naming no client: a review)."""
    if hasattr(matrix, "detach"):
        matrix = matrix.detach().cpu()
        if str(matrix.dtype) == "torch.bfloat16":
            matrix = matrix.float()
        return matrix.numpy()
    return np.asarray(matrix)


def _check_pair(index, pair):
    """Client ``index``'s ``(B, A)``: finite, rank >= 1, inner dimensions that match."""
    if len(pair) != 2:
        raise ValueError(f"factors[{index}] must be a (B, A) pair.")
    b_mat, a_mat = (_as_array(m) for m in pair)
    _check_matrix(index, "B", b_mat)
    _check_matrix(index, "A", a_mat)
    if b_mat.shape[1] != a_mat.shape[0]:
        raise ValueError(f"factors[{index}]: need B (d, r) and A (r, k), got shapes "
                         f"{b_mat.shape} and {a_mat.shape}.")
    if b_mat.shape[1] == 0:
        raise ValueError(f"factors[{index}] has rank 0 (B {b_mat.shape}, A {a_mat.shape}): "
                         "there is no update to aggregate; drop the client, or send rank >= 1 "
                         "factors (a fresh adapter's B = 0 is a valid zero update).")
    if b_mat.shape[0] == 0 or a_mat.shape[1] == 0:
        raise ValueError(f"factors[{index}]: the module is empty, B {b_mat.shape} and "
                         f"A {a_mat.shape}.")
    # B A has rank at most min(d, k) whatever r: a larger r only costs the rules time and
    # memory (their Gram products grow with sum r_i; a review's client claiming r = 3000
    # on a 16 x 16 module took tens of seconds and GBs) and makes flora, glora, krum and
    # geomedian return factors of that rank.
    if b_mat.shape[1] > min(b_mat.shape[0], a_mat.shape[1]):
        raise ValueError(f"factors[{index}] has rank {b_mat.shape[1]} (B {b_mat.shape}, "
                         f"A {a_mat.shape}), above min(d, k) = "
                         f"{min(b_mat.shape[0], a_mat.shape[1])}, the largest rank of an "
                         "update of that module; send rank <= min(d, k) factors.")
    return b_mat, a_mat


def _check_module_shapes(pairs):
    """Every client's update is (d, k); the clients off the most common shape are named."""
    shapes = [(b.shape[0], a.shape[1]) for b, a in pairs]
    common = collections.Counter(shapes).most_common(1)[0][0]
    odd = [i for i, shape in enumerate(shapes) if shape != common]
    if odd:
        raise ValueError(f"all clients must share the module shape (d, k): client(s) {odd} "
                         f"have {[shapes[i] for i in odd]}, the others {common}.")


def _check_overflow(index, b_mat, a_mat, dtype):
    """Every entry of ``B A`` is at most ``r max|B| max|A|``: keep that below the dtype's max."""
    bound = b_mat.shape[1] * float(np.max(np.abs(b_mat))) * float(np.max(np.abs(a_mat)))
    if not bound <= np.finfo(dtype).max:
        raise ValueError(f"factors[{index}]: the update B A may overflow {dtype} (entries up to "
                         f"r max|B| max|A| = {bound:.3g}).")


def _check_size(where, b_mat, a_mat):
    """``B`` and ``A`` of norms at most ``MAX_UPDATE_NORM``, and their product's bound too
    (``where`` names them in the ValueError)."""
    b_norm, a_norm = _safe_norm(b_mat), _safe_norm(a_mat)
    if max(b_norm, a_norm, b_norm * a_norm) > MAX_UPDATE_NORM:
        raise ValueError(f"{where}: its update is too large for float64 arithmetic: "
                         f"B has norm {b_norm:.3g}, A {a_norm:.3g} (each, and their product, "
                         f"must stay below {MAX_UPDATE_NORM:.0e}; the rules square them).")


def check_factors(factors):
    """Validate a list of ``(B_i, A_i)`` pairs and cast them to float64.

    Each ``B_i`` (d, r_i) and ``A_i`` (r_i, k) must be a 2-D array of finite real numbers
    with ``1 <= r_i <= min(d, k)`` (zero entries are fine: a fresh adapter's ``B = 0``
    is a zero update; a larger rank adds nothing to ``B_i A_i`` but cost), every
    client must have the same (d, k), ``B_i A_i`` must not overflow, and
    the norms of ``B_i``, ``A_i`` and their product (bounded by ``|B_i| |A_i|``) must be
    at most ``MAX_UPDATE_NORM`` (1e150: every rule squares the updates in float64).
    A ValueError names the offending client, ``factors[i]``, and the factor, A or B.

    Returns
    -------
    factors : list of (ndarray of shape (d, r_i), ndarray of shape (r_i, k))

    Examples
    --------
    >>> good, bad = (np.ones((2, 1)), np.ones((1, 3))), (np.ones((2, 1)), np.ones((1, 3)))
    >>> bad[1][0, 0] = np.nan
    >>> check_factors([good, bad])
    Traceback (most recent call last):
    ...
    ValueError: factors[1]: A has 1 non-finite value(s) (first A[0, 0] = nan).
    """
    factors = list(factors)
    if not factors:
        raise ValueError("factors must hold at least one (B, A) pair.")
    pairs = [_check_pair(index, pair) for index, pair in enumerate(factors)]
    _check_module_shapes(pairs)
    # float64 whatever the factors' dtype: every rule computes and returns float64 (with
    # numpy 1's promotion a float32 factor times a float64 weight stayed float32)
    dtype = np.float64
    for index, (b_mat, a_mat) in enumerate(pairs):
        _check_overflow(index, b_mat, a_mat, dtype)
    pairs = [(b.astype(dtype, copy=False), a.astype(dtype, copy=False)) for b, a in pairs]
    for index, (b_mat, a_mat) in enumerate(pairs):
        _check_size(f"factors[{index}]", b_mat, a_mat)
    return pairs


def check_weights(weights, n_clients):
    """Client weights: uniform by default, non-negative and finite, normalised to sum 1.

    A ValueError names the clients whose weight is negative or not finite. Weights are
    scaled by their maximum before summing, so that huge finite claims (1e308) cannot
    overflow the sum.

    Examples
    --------
    >>> check_weights([1, 3], 2).tolist()
    [0.25, 0.75]
    >>> check_weights([1e308, 1e308], 2).tolist()
    [0.5, 0.5]
    """
    if weights is None:
        return np.full(n_clients, 1.0 / n_clients)
    try:
        weights = np.asarray(weights, dtype=float)
    except OverflowError:  # a Python int beyond float64 (10**400): numpy's own error
        big = ([k for k, w in enumerate(weights) if isinstance(w, int) and abs(w) > 1e308]
               if isinstance(weights, (list, tuple)) else [])
        which = f"client(s) {big} have weight(s)" if big else "a weight is"
        raise ValueError(f"weights must be finite and non-negative: {which} beyond "
                         "float64's range.") from None
    if weights.shape != (n_clients,):
        raise ValueError(f"weights must have shape ({n_clients},), got {weights.shape}.")
    bad = np.flatnonzero(~np.isfinite(weights) | (weights < 0))
    if bad.size:
        raise ValueError(f"weights must be finite and non-negative: client(s) "
                         f"{bad.tolist()} have weight(s) {weights[bad].tolist()}.")
    if weights.max() <= 0:
        raise ValueError("weights must not all be zero.")
    weights = weights / weights.max()
    return weights / weights.sum()


def check_option(name, value, options):
    """``value`` if it is one of ``options`` (strings), else a ValueError naming
    ``name`` and the options."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}.")
    return value


def check_integer(name, value):
    """An integer option (numpy integers too; not a bool, not a float such as 2.7,
    which ``int`` truncated silently: a review)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}.")


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
    right = np.vstack([a for _, a in factors]).astype(np.float64, copy=False)
    return left, right


def exact_update(factors, weights):
    """The exact aggregate ``Delta W* = sum_i p_i B_i A_i`` of shape (d, k)."""
    left, right = stacked_factors(factors, weights)
    return left @ right


def dense_updates(factors, rows=slice(None)):
    """The client updates ``B_i A_i`` restricted to ``rows``: shape (n_clients, rows, k)."""
    return np.stack([b[rows] @ a for b, a in factors])

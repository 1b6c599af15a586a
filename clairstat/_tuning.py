"""Noise-scale estimate and the default penalties (docs/method_notes.md, section 7)."""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np
from scipy import integrate, optimize

from ._objective import stack_blocks
from ._reduced import median_singular_value, singular_values

__all__ = ["estimate_noise_scale", "default_penalties", "marchenko_pastur_median"]


@lru_cache(maxsize=256)
def marchenko_pastur_median(ratio):
    """Median of the Marchenko-Pastur law with aspect ratio ``ratio`` in (0, 1].

    Examples
    --------
    >>> round(marchenko_pastur_median(1.0), 4)
    0.6528
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must lie in (0, 1], got {ratio}.")
    lower, upper = (1 - np.sqrt(ratio)) ** 2, (1 + np.sqrt(ratio)) ** 2

    def density(x):
        return np.sqrt(max((upper - x) * (x - lower), 0.0)) / (2 * np.pi * ratio * x)

    def mass_below(x):
        # x = lower + u^2 removes the 1/sqrt(x) singularity at lower = 0 (ratio 1).
        def integrand(u):
            return density(lower + u * u) * 2.0 * u
        return integrate.quad(integrand, 0.0, np.sqrt(x - lower), limit=200)[0] - 0.5

    return float(optimize.brentq(mass_below, lower + 1e-12, upper))


def estimate_noise_scale(local_estimates):
    """Robust estimate of the per-entry noise standard deviation of the estimates.

    The clients are centred at their coordinate-wise median (a backbone estimate that
    contaminated clients cannot drag), and sigma is read off the median singular value
    of the stacked ``p x (K q)`` matrix against the Marchenko-Pastur median (Gavish and
    Donoho, 2014): low-rank signal and a minority of contaminated blocks move only a few
    singular values, not the median. Copies of one estimate are counted once unless
    one group of them is most of the clients (:func:`copy_groups`,
    :func:`counted_once`).

    Parameters
    ----------
    local_estimates : ndarray of shape (n_clients, p, q)

    Returns
    -------
    sigma : float

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> round(estimate_noise_scale(0.5 * rng.standard_normal((40, 30, 8))), 1)
    0.5
    """
    # Copies carry no information on the noise and would pull the median singular value
    # down (to zero, were they most of the clients: then they are the consensus).
    local_estimates = local_estimates[counted_once(copy_groups(local_estimates))]
    n_clients = local_estimates.shape[0]
    if n_clients < 2:
        return 0.0
    centred = local_estimates - np.median(local_estimates, axis=0)[None]
    stacked = stack_blocks(centred)
    sing = singular_values(stacked)  # via a Gram: s^2 to eps * s_max^2, ample for a median
    n_long, n_short = max(centred.shape[1], n_clients * centred.shape[2]), len(sing)
    sigma = _marchenko_pastur_scale(sing, n_long, n_short)
    # Subtracting the median leaves noise of variance sigma^2 (1 + pi / (2K)) per entry.
    return float(sigma / np.sqrt(1.0 + np.pi / (2.0 * n_clients)))


def _first_occurrences(rows, inverse=False):
    """Indices of the first occurrence of every distinct row of ``rows`` (n, m), in order
    (with ``inverse``, also each row's position among them, shape (n,)).

    By the rows' bytes (with -0.0 made +0.0, so that equal rows have equal bytes): O(n m)
    where ``np.unique(axis=0)`` sorts the rows lexicographically (0.8 s against 0.05 s for
    100 rows of 51 200 entries, the factored stack of 100 rank-16 clients of a 4096 x 4096
    module, one thread).
    """
    rows = np.ascontiguousarray(rows, dtype=float) + 0.0
    group, found, position = {}, [], np.empty(len(rows), dtype=int)
    for i, row in enumerate(rows):
        key = row.tobytes()
        if key not in group:
            group[key] = len(found)
            found.append(i)
        position[i] = group[key]
    found = np.asarray(found, dtype=int)
    return (found, position) if inverse else found


def _near_copy_share(n_entries):
    """Below this share of the typical nearest-neighbour squared distance, two clients
    are copies of one estimate (:func:`copy_groups`).

    For independent Gaussian clients with ``d`` entries, a nearest neighbour that close
    has probability about ``share^(d / 2)`` per client: the share makes it 1e-8
    (1e-16 for scalar estimates, 1e-8 for two entries, 1e-4 for four), capped at 1e-2
    (a tenth of the typical distance) from eight entries on, where structure in the
    signal, not the noise's dimension, decides how close benign clients come.
    """
    return min(1e-2, 1e-8 ** (2.0 / max(n_entries, 1)))


def copy_groups(blocks):
    """Groups of copies of one estimate: each client's group, as the index of its first
    client, shape (n_clients,).

    Copies are clients whose estimates are equal (byte for byte, or as updates: a LoRA
    client with ``B = 0`` sends a zero update whatever its ``A``), or whose squared
    distance is below a share of the typical squared distance from a client to its
    nearest neighbour (the median over clients): 1e-2 for estimates of eight entries or
    more, down to 1e-16 for scalars (:func:`_near_copy_share`). Clients that barely
    trained (updates a hundredth of the others' size) or a Sybil's copies perturbed by
    round-off are copies. Groups are the connected components of the "closer than that"
    relation (single linkage).

    The nearest neighbour, not the spread between clients, sets the scale: clients in
    tight benign clusters (a low-rank signal with little noise) are far apart between
    clusters and must not merge within them. While copies are fewer than half the
    clients, the median nearest-neighbour distance is a non-copy's; when they are more,
    it is theirs and only exact copies (and, for a factored stack, copies within the
    round-off of its inner products) group. Dense estimates are compared entry by entry
    (a k-d tree: memory linear in the number of clients), so that a common offset costs
    no digits; a factored stack through its inner products, which is also how its tests'
    statistics are formed.

    Parameters
    ----------
    blocks : ndarray of shape (n_clients, p, q) or FactoredBlocks

    Returns
    -------
    labels : ndarray of int, shape (n_clients,)
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n_clients = len(blocks)
    factored = hasattr(blocks, "raw_inner")
    if factored:
        rows = np.hstack([blocks.coef.reshape(n_clients, -1),
                          blocks.rights.reshape(n_clients, -1)])
    else:
        rows = np.asarray(blocks, dtype=float).reshape(n_clients, -1)
    first, exact = _first_occurrences(rows, inverse=True)
    if len(first) < 3:  # no typical distance to compare with
        return first[exact]
    if factored:
        # ||X_j - X_l||^2 from <X_j, X_l> in the reduction's coordinates (cached within
        # a fit). Differences of inner products round at a few eps (||X_j||^2 +
        # ||X_l||^2), a float32 reduction's coordinates add their own
        # (FactoredBlocks.round_off): below that two updates are equal to the precision
        # the tests' statistics have.
        position = blocks.index[first]
        inner = blocks.raw_inner()[np.ix_(position, position)]
        norms = np.clip(np.diag(inner), 0.0, None)
        distance = norms[:, None] + norms[None, :] - 2.0 * inner
        floor = 64.0 * float(np.finfo(float).eps) * (norms[:, None] + norms[None, :])
        if blocks.round_off is not None:
            floor = np.maximum(floor, 2.0 * blocks.round_off ** 2
                               * np.prod(blocks.coef.shape[1:]))
        np.fill_diagonal(distance, np.inf)
        typical = float(np.median(distance.min(axis=1)))
        share = _near_copy_share(blocks.coef.shape[1] * blocks.rights.shape[2])
        left, right = np.nonzero(distance <= np.maximum(share * typical, floor))
    else:
        from scipy.spatial import cKDTree

        tree = cKDTree(rows[first])
        nearest = tree.query(rows[first], k=2)[0][:, 1]
        typical = float(np.median(nearest ** 2))
        share = _near_copy_share(rows.shape[1])
        pairs = tree.query_pairs(np.sqrt(share * typical), output_type="ndarray")
        left, right = pairs[:, 0], pairs[:, 1]
    graph = coo_matrix((np.ones(len(left)), (left, right)), shape=(len(first),) * 2)
    component = connected_components(graph, directed=False)[1]
    leader = first[np.unique(component, return_index=True)[1]]  # each group's first
    return leader[component][exact]


def counted_once(labels, among=None):
    """The clients that count when each group of copies counts once, a mask.

    ``among`` (a mask, default every client): the clients in question (the calibration
    set, say); each group is represented by its first client among them. A group that
    holds more than half of all the clients is the consensus itself (noiseless clients
    that agree, whose round-off the tests' floor covers), and then every client counts:
    one client off eleven copies must stay flagged, which counting the eleven once
    prevented (the off client's own deviation became the noise). Whether a group is the
    consensus is decided on the whole federation, once, not within ``among``: eleven
    untrained clients among 23 are most of the 21 that remain once two attackers are
    set aside, and taking them for the consensus there flagged every trained client.

    Parameters
    ----------
    labels : ndarray of int, shape (n_clients,)
        :func:`copy_groups`.
    among : ndarray of bool, shape (n_clients,), optional

    Returns
    -------
    mask : ndarray of bool, shape (n_clients,)
    """
    among = np.ones(len(labels), dtype=bool) if among is None else np.asarray(among, bool)
    index = np.flatnonzero(among)
    if len(index) == 0 or 2 * np.bincount(labels).max() > len(labels):
        return among.copy()
    mask = np.zeros(len(labels), dtype=bool)
    mask[index[np.unique(labels[index], return_index=True)[1]]] = True
    return mask


def _marchenko_pastur_scale(sing, n_long, n_short):
    """sigma from the median of the ``n_short`` singular values of a noise matrix."""
    return np.median(sing) / np.sqrt(n_long * marchenko_pastur_median(n_short / n_long))


def factored_noise_scale(stack):
    """Noise scale of a :class:`clairstat._reduced.FactoredBlocks` stack (no backbone).

    The median singular value of ``[Y_1, ..., Y_K]`` (p x sum r_k, the padding columns
    left out) against the Marchenko-Pastur median, as :func:`estimate_noise_scale`
    but uncentred: without a backbone the shared structure is low rank and moves only a
    few singular values. Copies of one estimate are counted once unless one group of
    them is most of the clients (:func:`copy_groups`, :func:`counted_once`).
    """
    keep = np.flatnonzero(counted_once(copy_groups(stack)))
    if len(keep) < 2:
        return 0.0
    columns = stack.coef[keep].transpose(1, 0, 2).reshape(stack.shape[1], -1)
    columns = columns[:, np.any(columns != 0.0, axis=0)]
    if columns.size == 0:  # every update is zero (fresh LoRA adapters): no noise
        return 0.0
    n_short, n_long = sorted(columns.shape)
    return float(median_singular_value(columns)
                 / np.sqrt(n_long * marchenko_pastur_median(n_short / n_long)))


def default_penalties(shape, noise_scale, *, c_alpha=1.0, c_beta=None):
    """The "auto" penalties.

    * ``alpha = c_alpha * sigma * (sqrt(p) + sqrt(q K))``: the operator norm of a p x qK
      Gaussian noise matrix, so pure noise leaves L = 0.
    * ``beta = c_beta * sigma * sqrt(p q)`` with ``c_beta = 1 + 3 / sqrt(2 p q)``: the
      Frobenius norm of one client's noise plus three of its standard deviations, so a
      benign client's noise alone does not make its block non-zero.
    * ``lam = min(1, 4 / sqrt(K))`` for the exact program: block-sparse pursuit needs
      ``lam`` above the block norms of the low-rank part's right singular vectors
      (about ``sqrt(mu r / K)``) and small enough that the contaminated blocks' dual
      certificate fits in the operator-norm ball.

    Parameters
    ----------
    shape : tuple (n_clients, p, q)
    noise_scale : float or ndarray of shape (n_clients,)
        Per-client noise scales enter through their root mean square.

    Returns
    -------
    dict with keys ``alpha``, ``beta``, ``lam``.
    """
    n_clients, p, q = shape
    sigma = float(np.sqrt(np.mean(np.square(noise_scale))))
    if c_beta is None:
        c_beta = 1.0 + 3.0 / np.sqrt(2.0 * p * q)
    return {"alpha": c_alpha * sigma * (np.sqrt(p) + np.sqrt(q * n_clients)),
            "beta": c_beta * sigma * np.sqrt(p * q),
            "lam": min(1.0, 4.0 / np.sqrt(n_clients))}


def floor_noise_scale(sigma, local_estimates):
    """Keep sigma away from 0 (noiseless data) so the penalties stay positive."""
    scale = np.linalg.norm(local_estimates) / np.sqrt(local_estimates.size)
    floor = np.sqrt(np.finfo(float).eps) * max(scale, np.finfo(float).tiny)
    if sigma < floor:
        warnings.warn("the estimated noise scale is ~0 (noiseless data?); the penalized "
                      "program then barely penalizes anything: use formulation='exact' or "
                      "pass noise_scale.", UserWarning, stacklevel=3)
        return float(floor)
    return float(sigma)

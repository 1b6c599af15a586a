"""The geometry of the detection: collaborative means, subspaces, the rank rule, the
off-subspace statistics, the robust start and the refinement (docs/method_notes.md,
section 7). The tests and the loop built on them are in :mod:`clairstat._inference`."""

from __future__ import annotations

import itertools
import warnings
from functools import singledispatch

import numpy as np
from sklearn.utils import check_random_state

from ._reduced import (FactoredBlocks, FactoredRefined, leave_one_out_coefficients,
                       left_singular, off_subspace_statistics, top_eigh, uses_gram)
from ._objective import stack_blocks
from ._threads import map_in_threads

__all__ = ["weighted_mean", "refit_subspace", "select_rank", "projection_statistics",
           "concentrate", "out_of_sample_statistics", "refine"]


# The detection works on a dense (n_clients, p, q) array or on a FactoredBlocks stack
# (LoRA updates, clairstat._reduced): the four stack operations below dispatch on it.
@singledispatch
def weighted_mean(blocks, weights):
    """``sum_k w_k Theta_k / sum_k w_k`` over the given clients."""
    return np.tensordot(weights / weights.sum(), blocks, axes=1)


@weighted_mean.register
def _(blocks: FactoredBlocks, weights):
    return blocks.mean(weights)


def _centred_stack(blocks, weights):
    return stack_blocks(blocks - weighted_mean(blocks, weights)[None])


def _left_singular(stacked, rank=None):
    """Left singular vectors and values of a p x n matrix, largest first
    (:func:`clairstat._reduced.left_singular`: the package's one Gram/Lanczos rule)."""
    return left_singular(stacked, rank)


@singledispatch
def _centred_left_singular(blocks, weights, rank=None):
    """Left singular vectors and values of the centred stack, largest first."""
    return _left_singular(_centred_stack(blocks, weights), rank)


@_centred_left_singular.register
def _(blocks: FactoredBlocks, weights, rank=None):
    return blocks.centred_left_singular(weights, rank)


def select_rank(blocks, weights, noise_scale, whitening=None, support=1):
    """Rank rule: singular values of the centred collaborative stack above the noise edge.

    A p x (q m) matrix of i.i.d. N(0, sigma^2) entries has its largest singular value near
    ``sigma (sqrt(p) + sqrt(q m))``; directions above 1.1 times that edge are kept.

    ``support = s > 1`` lowers the count to its smallest value over the sub-stacks
    without any ``s - 1`` of the clients (each with its own edge, sub-stacks of at least
    three clients; with fewer clients the count is left as it is): a direction counts
    only if every ``s - 1`` clients' removal leaves it above the edge, so that a direction
    that ``s - 1`` clients alone carry (contaminated clients corrupted alike) is left to
    the tests instead of being taken for a shared one. The rule runs once per sub-stack,
    ``C(m, s - 1)`` times (dense stacks only).

    ``whitening = (left, right, sigma)`` first maps every block to ``left X_k right``,
    a transform common to all clients (it maps the shared column space to another and
    keeps the rank), under which the noise is close to isotropic: rows and outputs on
    different scales would otherwise put noise directions above the edge. ``sigma`` is
    the whitened noise's scale, or ``None`` to estimate it (Marchenko-Pastur median,
    :func:`clairstat._tuning.estimate_noise_scale`).
    """
    rank = _edge_count(blocks, weights, noise_scale, whitening)
    n_clients = len(blocks)
    if support == 1 or rank == 0 or n_clients - (support - 1) < 3:
        return rank
    if isinstance(blocks, FactoredBlocks):
        raise ValueError("a rank rule with support > 1 runs on dense stacks only.")
    weights = np.asarray(weights)
    for left_out in itertools.combinations(range(n_clients), support - 1):
        keep = np.ones(n_clients, dtype=bool)
        keep[list(left_out)] = False
        rank = min(rank, _edge_count(blocks[keep], weights[keep], noise_scale, whitening))
        if rank == 0:
            break
    return rank


def _edge_count(blocks, weights, noise_scale, whitening):
    """:func:`select_rank` with ``support=1``: the directions above the edge."""
    n_clients, p, q = blocks.shape
    if whitening is not None and not isinstance(blocks, FactoredBlocks):
        from ._tuning import estimate_noise_scale
        left, right, sigma = whitening
        blocks = left @ blocks @ right
        noise_scale = estimate_noise_scale(blocks) if sigma is None else sigma
        # Below round-off of the transformed entries there is no noise to tell apart (the
        # estimator floors its own scale the same way): identical members have a centred
        # stack of rounding only, whose singular values a zero edge counted as signal,
        # differently at each scale of the data (a property-based test, 2026-12-02).
        noise_scale = max(noise_scale, 64.0 * np.finfo(float).eps * np.abs(blocks).max(
            initial=0.0))
    edge = 1.1 * noise_scale * (np.sqrt(p) + np.sqrt(q * n_clients))
    if isinstance(blocks, FactoredBlocks):  # a count, not the spectrum (Sylvester's law)
        return blocks.count_above(weights, edge)
    sing = _centred_left_singular(blocks, weights)[1]
    return int(np.sum(sing > edge))


def refit_subspace(blocks, weights, rank, random_state=None):
    """Top ``rank`` left singular vectors of the centred collaborative estimates.

    Exact to round-off on dense and factored stacks alike (the Gram/Lanczos rule of
    :mod:`clairstat._reduced`); ``random_state`` is accepted for compatibility and
    unused (no solver is randomized).

    Returns
    -------
    basis : ndarray of shape (p, rank)
    """
    if rank == 0:
        return np.zeros((blocks.shape[1], 0))
    return _centred_left_singular(blocks, weights, rank)[0]


def _project(basis, blocks):
    """``P X_k`` for every block, as two thin products (never the p x p projector)."""
    return basis @ (basis.T @ blocks)


def _dense_mean(mean):
    """The mean as an array: a fit on a FactoredBlocks stack keeps a FactoredMean, formed
    here for dense new clients."""
    return mean.to_dense() if hasattr(mean, "to_dense") else mean


@singledispatch
def projection_statistics(blocks, mean, basis):
    """``||(I - P)(Theta_hat_k - mean)||_F^2`` for every client (dense estimates; the
    mean of a fit on a FactoredBlocks stack formed densely)."""
    mean = _dense_mean(mean)
    resid = blocks - mean[None]
    resid = resid - _project(basis, resid)
    return np.einsum("kpq,kpq->k", resid, resid)


projection_statistics.register(FactoredBlocks, off_subspace_statistics)


def _sub_rank(rank, p, q, n_others):
    """The centred stack of n clients has rank at most (n - 1) q."""
    return min(rank, p, q * max(n_others - 1, 0))


@singledispatch
def _leave_one_out_grams(blocks, weights):
    """``without(i)``: the centred p x p Gram of ``blocks`` without its i-th client and
    that client minus the others' weighted mean; ``None`` where a refit is needed.

    The exact downdate of :func:`clairstat._reduced.leave_one_out_coefficients`:
    ``G + beta c_i c_i^T + alpha (e c_i^T + c_i e^T)`` with the centred blocks ``c_j``
    and their sum ``e``, O(p^2 q) per client once G is formed.
    """
    centred = blocks - weighted_mean(blocks, weights)[None]
    stacked = stack_blocks(centred)
    gram, spread = stacked @ stacked.T, centred.sum(axis=0)
    flat = centred.reshape(len(centred), -1)
    centred_inner = flat @ flat.T

    def without(i):
        coefficients = leave_one_out_coefficients(weights, i, centred_inner)
        if coefficients is None:
            return None
        alpha, beta = coefficients
        half = (0.5 * beta * centred[i] + alpha * spread) @ centred[i].T
        downdated = gram + half + half.T
        others = np.arange(len(weights)) != i
        residual = blocks[i] - weighted_mean(blocks[others], weights[others])
        return 0.5 * (downdated + downdated.T), residual

    return without


@_leave_one_out_grams.register
def _(blocks: FactoredBlocks, weights):
    return blocks.leave_one_out_grams(weights)


def _leave_one_out(blocks, weights, members, rank, random_state, basis=None):
    """``(k, statistic, basis, others)`` for every member k, fitted on the other members.

    ``statistic`` is ``||(I - P_(-k))(X_k - mean_(-k))||_F^2`` against the other
    members' weighted mean and refitted rank-``rank`` subspace ``basis``. In-sample, a
    member's own noise pulls both the mean and the subspace towards it: its statistic is
    smaller than a non-member's by the mean's share (a factor ``((W - w_k) / W)^2``) and
    by what the subspace absorbs (measured: 4% of the statistic for 50 rank-16 LoRA
    clients of a 4096 x 4096 module, three standard deviations of a chi^2 with 12 672
    degrees of freedom), so benign clients outside the set would look deviant and, once
    rejected, stay rejected.

    The refit without k is :func:`refit_subspace` on the other members, but not run K
    times: where the refit goes through the p x p Gram matrix (factored stacks, and
    dense ones with at least 2p columns), that matrix without k is an exact low-rank
    downdate of the members' Gram (:func:`_leave_one_out_grams`), handed to the same
    eigensolver, so a member costs O(p^2 q) plus one top-``rank`` eigenproblem instead
    of a whole refit. A member the downdate cannot remove to round-off (most of the
    weight or of the spread, :func:`clairstat._reduced.leave_one_out_coefficients`)
    is refitted, as is every member of a dense stack narrower than 2p (a thin SVD of
    the p x (n - 1) q stack is then no dearer than one p x p eigenproblem).

    On a factored stack, given the members' ``basis``, no p x p matrix is formed per
    member either (:meth:`clairstat._reduced.FactoredBlocks.leave_one_out_fits`: a
    certified subspace iteration started at ``basis``, same result to round-off).
    """
    n_clients, p, q = blocks.shape
    index = np.flatnonzero(members)
    sub_rank = _sub_rank(rank, p, q, len(index) - 1)
    gram_route = sub_rank > 0 and (isinstance(blocks, FactoredBlocks)
                                   or uses_gram(p, (len(index) - 1) * q))
    factored_fit = None
    if gram_route and isinstance(blocks, FactoredBlocks) and basis is not None:
        fit = blocks[members].leave_one_out_fits(weights[members], sub_rank, basis)
        # the members' eigenproblems as one batch (products on the block's threads)
        factored_fit = dict(enumerate(fit.all())).get
        without = None
    else:
        without = _leave_one_out_grams(blocks[members], weights[members]) if gram_route \
            else None
    for position, k in enumerate(index):
        others = members.copy()
        others[k] = False
        if weights[others].sum() <= 0:  # nobody else carries weight: no refit to compare with
            continue
        if factored_fit is not None:
            found = factored_fit(position)
            if found is not None:
                yield k, found[0], found[1], others
                continue
        downdate = None if without is None else without(position)
        if downdate is None:
            sub_blocks, sub_weights = blocks[others], weights[others]
            basis = refit_subspace(sub_blocks, sub_weights, sub_rank, random_state)
            one = np.arange(n_clients) == k
            stat = projection_statistics(blocks[one], weighted_mean(sub_blocks, sub_weights),
                                         basis)[0]
        else:
            gram, residual = downdate
            basis = top_eigh(gram, sub_rank)[1]
            residual = residual - _project(basis, residual)
            stat = np.sum(residual * residual)
        yield k, stat, basis, others


def out_of_sample_statistics(blocks, weights, members, mean, basis, random_state=None):
    """Every client's statistic against a mean and subspace fitted without it.

    Non-members are compared with the members' fit (``mean``, ``basis``) as they are;
    each member with a refit on the other members at the same rank
    (:func:`_leave_one_out`).

    Returns
    -------
    statistics : ndarray of shape (n_clients,)
    fits : list of (basis, others) per client
        The basis and the mean's client set each statistic was computed against.
    """
    stat = projection_statistics(blocks, mean, basis)
    fits = [(basis, members)] * len(stat)
    for k, member_stat, sub_basis, others in _leave_one_out(blocks, weights, members,
                                                            basis.shape[1], random_state,
                                                            basis):
        stat[k] = member_stat
        fits[k] = (sub_basis, others)
    return stat, fits


def _fit_on(blocks, weights, members, rank, noise, random_state, whitening=None,
            support=1):
    """Mean and basis refitted on the current collaborative set (``support``: that of the
    rank rule, :func:`select_rank`, when ``rank`` is ``None``)."""
    sub_blocks, sub_weights = blocks[members], weights[members]
    n_members, p, q = sub_blocks.shape
    max_rank = _sub_rank(p, p, q, n_members)
    if rank is None:
        rank = min(select_rank(sub_blocks, sub_weights, float(np.sqrt(np.mean(noise ** 2))),
                               whitening, support), max_rank)
    elif rank > max_rank:
        warnings.warn(f"rank={rank} exceeds what {n_members} collaborative clients support; "
                      f"using {max_rank}.", UserWarning, stacklevel=4)
        rank = max_rank
    basis = refit_subspace(sub_blocks, sub_weights, rank, random_state)
    return weighted_mean(sub_blocks, sub_weights), basis


def concentrate(blocks, weights, start, rank, noise, *, n_half_starts=3, n_random_starts=10,
                max_steps=10, random_state=None, whitening=None, distinct=None,
                support=1):
    """Robust starting set by concentration steps (the C-steps of FastMCD).

    From each start (``start``: the clients with S_k = 0; all clients;
    ``n_half_starts`` random half-sets, enough clients to outvote a coordinated group;
    ``n_random_starts`` random sets of ``rank + 2`` clients with S_k = 0, some of them free
    of a high-leverage attacker, which a least-squares fit on its own set fits exactly),
    repeat: fit the mean and a rank-r subspace on the set, keep the ``K // 2 + 1``
    clients with the smallest relative off-subspace statistic. Each step can only lower
    the trimmed residual sum (Rousseeuw and Van Driessen, 1999); the lowest sum wins,
    each client in the set that the decomposition flagged counting 2 / h of it extra
    (such a client, fitted exactly by its own set, saves at most ~1 / h). A
    coordinated group of attackers (up to just under half the clients) that the
    decomposition folds into L, and that would then capture the refitted subspace, is
    left out. The rank, if not given, is fixed on ``start`` (by the rank rule with
    ``support``, :func:`select_rank`).

    ``distinct`` (a mask, default every client): the sets are drawn from these clients
    only and ``K`` counts them, so that copies of one estimate (a point mass, such as
    clients sending zero updates) do not fill the half-set at no cost
    (:func:`clairstat._tuning.counted_once`); the copies are left to the tests.

    Returns
    -------
    members : ndarray of bool, shape (n_clients,)
        ``start`` itself with fewer than 4 distinct clients, or where a mean and the
        rank-r subspace fit every half-set exactly (``rank >= min(p, (h - 1) q)``; for
        a factored stack of rank-r clients ``min(p, h r)``).
    """
    n_clients = len(blocks)
    distinct = np.ones(n_clients, dtype=bool) if distinct is None else distinct
    eligible = np.flatnonzero(distinct)
    half = len(eligible) // 2 + 1
    if len(eligible) < 4:
        return start
    rng = check_random_state(random_state)
    if rank is None:
        rank = _fit_on(blocks, weights, start, None, noise, random_state,
                       whitening, support)[1].shape[1]
    # The centred stack of h dense (p, q) clients has rank at most (h - 1) q; that of h
    # factored clients Y_k R_k (shape (n, p, r)) spans up to the h r columns of their
    # Y_k (the mean is not of rank r).
    width = blocks.shape[2] * (half if isinstance(blocks, FactoredBlocks) else half - 1)
    if rank >= min(blocks.shape[1], width):
        # A mean and a rank-r subspace fit every half-set exactly (or the subspace is
        # the whole space): every set's trimmed sum is round-off (1e-30 of the squared
        # entries), and the lowest would be chosen by the order of the clients, not by
        # the data (a review: permuting 5 clients at rank 2 flagged one in one order and
        # none in the other). Nothing tells the sets apart: keep the decomposition's
        # start, as with fewer than 4.
        return start
    unflagged = np.flatnonzero(start & distinct)
    small_pool = unflagged if len(unflagged) >= rank + 2 else eligible
    starts = [start & distinct if np.sum(start & distinct) >= 2 else start, distinct.copy()]
    draws = ([(eligible, half)] * n_half_starts
             + [(small_pool, min(rank + 2, half))] * n_random_starts)
    for pool, size in draws:
        random_set = np.zeros(n_clients, dtype=bool)
        random_set[rng.choice(pool, size=size, replace=False)] = True
        starts.append(random_set)
    # Independent chains: on the threads the enclosing block allows (each chain keeps its
    # own warm start, clairstat._reduced._WARM).
    finals = map_in_threads(lambda members: _c_steps(blocks, weights, members, rank, noise,
                                                     half, max_steps, random_state, distinct),
                            starts)
    # A client the decomposition flagged (S_k != 0) that a set's own fit absorbs adds ~0
    # to the trimmed sum and displaces one member's share (~cost / h): masking, since
    # structured noise can make a high-leverage attacker's tilt no larger than the noise.
    # So each such client inflates the set's cost by 2 / h, twice what it can save.
    def penalized(cost, members):
        return cost * (1.0 + 2.0 * np.sum(members & ~start) / half)

    return min(finals, key=lambda item: penalized(*item))[1]


def _c_steps(blocks, weights, members, rank, noise, half, max_steps, random_state, distinct):
    """Concentration steps from ``members`` (among the ``distinct`` clients); returns
    (trimmed cost, final set)."""
    eligible = np.flatnonzero(distinct)
    for _ in range(max_steps):
        mean, basis = _fit_on(blocks, weights, members, rank, noise, random_state)
        relative = (projection_statistics(blocks, mean, basis) / noise ** 2)[eligible]
        new = np.zeros(len(blocks), dtype=bool)
        new[eligible[np.argsort(relative)[:half]]] = True
        if np.array_equal(new, members):
            break
        members = new
    return float(np.sort(relative)[:half].sum()), members


@singledispatch
def refine(blocks, basis, mean, contaminated):
    """``P Theta_hat_k + (I - P) mean`` for collaborative clients; flagged ones unchanged."""
    mean = _dense_mean(mean)
    projected = _project(basis, blocks - mean[None])
    refined = mean[None] + projected
    refined[contaminated] = blocks[contaminated]
    return refined


refine.register(FactoredBlocks, FactoredRefined)

"""CLAIR as an aggregator: detect contaminated clients, refine the benign ones."""

from __future__ import annotations

import functools
import warnings

import numpy as np

from .._reduced import (ReducedStack, eckart_young_factors, factored_reduction,
                        reduce_factors, truncated_svd)
from .._validation import check_device
from ._result import AggregationResult

__all__ = ["clair"]


def clair(factors, weights, **options):
    """Fit :class:`clairstat.CLAIREstimator` on the exactly reduced updates.

    Parameters
    ----------
    factors : list of (ndarray of shape (d, r_i), ndarray of shape (r_i, k))
    weights : ndarray of shape (n_clients,)
        Passed as ``sample_weight``.
    **options
        Keyword arguments of :class:`clairstat.CLAIREstimator`. ``backbone`` defaults to
        ``False`` here: LoRA updates are already differences from the base weights
        (docs/method_notes.md, section 1: the common backbone may be 0). ``device``
        given (``"cuda"``, or ``"cpu"`` for the same torch code on the CPU): the
        decomposition and the d-sized work (the reduction's QRs, the readouts'
        products with the bases) run in torch there, in ``dtype``
        (:class:`clairstat._reduced.DeviceBasis`; the dense reduction of
        ``backbone=True`` in float64); not given: the reduction is numpy's.

    Returns
    -------
    AggregationResult
        ``update`` = the weighted mean of the collaborative clients' updates (d, k);
        ``factors`` = its rank-``max r_i`` readout; extras ``flagged`` (bool,
        n_clients), ``per_client`` (a :class:`ReducedStack` of the refined updates,
        (n_clients, d, k) when expanded), ``subspace`` (d, rank_; with
        ``subspace="row"`` the shared row space, (k, rank_)), ``estimator`` (fitted
        on the reduced updates), ``reduction`` (:class:`ReducedFactors`; without a
        backbone its ``updates`` are the :class:`clairstat._reduced.FactoredBlocks`
        stack).

    Notes
    -----
    Every update lies in ``col(Q) x row(V^T)`` (see :func:`reduce_factors`), and the
    decomposition, the refit and the refinement are equivariant under the orthonormal
    maps ``X -> Q X V^T``, so fitting on the reduced updates and mapping back is exact
    for given penalties, a given rank and ``detection="threshold"``.

    Without a backbone (the default here) each client is kept in its own row basis
    (:func:`factored_reduction`): the decomposition solves on (s, r_i) blocks and the
    detection works on the factored stack (:mod:`clairstat._reduced`), so 50 rank-16
    clients on a 4096 x 4096 module take seconds (``benchmarks/lora_benchmark.py``).
    The data-driven choices (noise scale, "auto" penalties, rank rule, the test's
    degrees of freedom) then count r_i columns per client, the dimension a rank-r_i
    update's noise occupies. With ``backbone=True`` the blocks are the (s, t) matrices
    ``Q^T B_i A_i V``, t up to ``sum r_i``: exact as well, but the 4096 x 4096 case then
    works on (50, 800, 800) blocks and took more than 10 minutes on 2 CPU cores.
    """
    from clairstat import CLAIREstimator  # lazily: clairstat's modules import this package

    if len(factors) < 2:  # the weights' check said "non-zero weight to at least two"
        raise ValueError(f"CLAIR needs at least two clients, got {len(factors)}.")
    options = {"backbone": False, **options}
    check_device(options.get("device"))  # before the reduction runs on it
    _warn_untrained_majority(factors)
    estimator = CLAIREstimator(**options)
    on_device = {"device": options["device"], "dtype": options.get("dtype")} \
        if options.get("device") is not None else {}
    if options["backbone"] or options.get("subspace", "column") != "column":
        # Dense (s, t) blocks: the estimator's round-off floor is float64's (64 eps of
        # the largest entry), so their reduction is float64 whatever ``dtype``.
        reduction = reduce_factors(factors, **{**on_device, "dtype": "float64"}
                                   if on_device else {})
    else:
        reduction = factored_reduction(factors, **on_device)
    with warnings.catch_warnings():
        # The estimator's advice for unequal weights (noise_cov from local_ols) is for
        # regression estimates, not LoRA updates reduced densely (backbone=True).
        warnings.filterwarnings("ignore", message="sample_weight varies")
        estimator.fit(reduction.updates, sample_weight=weights)
    refined = estimator.refined_
    mean_reduced = np.asarray(estimator.collaborative_mean_)  # working orientation
    if estimator.subspace == "row":  # fitted on the transposes: back to (s, t)
        mean_reduced = mean_reduced.T
    mean = functools.partial(reduction.expand, mean_reduced)  # dense only when read
    rank = max(b.shape[1] for b, _ in factors)
    # read out when first asked (AggregationResult.factors): not by the per-module path;
    # a partial of a module-level function, so that the result still pickles (Dask)
    readout = functools.partial(_mean_readout, mean_reduced, rank, reduction.left_basis,
                                reduction.right_basis)
    per_client = ReducedStack(reduction.left_basis, refined, reduction.right_basis)
    return AggregationResult("clair", mean, readout, weights, {
        "flagged": np.asarray(estimator.contaminated_, dtype=bool),
        "per_client": per_client,
        # the shared column space (d, rank_), or with subspace="row" the shared row
        # space (k, rank_): the estimator's subspace_ is then in the rows' coordinates
        "subspace": (reduction.right_basis if estimator.subspace == "row"
                     else reduction.left_basis) @ estimator.subspace_,
        "estimator": estimator, "reduction": reduction, "reduced_mean": mean_reduced})


def _mean_readout(mean_reduced, rank, left_basis, right_basis):
    """The mean's rank-``rank`` factors (d, rank), (rank, k) from its reduced form."""
    return eckart_young_factors(truncated_svd(mean_reduced, rank), rank, left_basis,
                                right_basis)


def _warn_untrained_majority(factors):
    """Warn where most clients (not all) sent a zero update, as untrained adapters
    (``lora_B = 0``) do: exact copies holding most of the clients are the consensus
    (:func:`clairstat._tuning.counted_once`), the noise scale and the rank rule then
    read the zeros (a review: 13 untrained of 25 clients made the rank 19 and every
    p-value 1, attackers included; 12 of 24 flagged both attackers), and nothing
    said so."""
    zero = np.array([not np.any(b_mat) or not np.any(a_mat) for b_mat, a_mat in factors])
    if 2 * zero.sum() > len(zero) and not zero.all():
        warnings.warn(f"{zero.sum()} of {len(zero)} clients sent a zero update (untrained "
                      "adapters, lora_B = 0): most of the clients, they are taken for the "
                      "consensus, and the noise scale and the rank rule read their zeros, "
                      "so the tests are degenerate (every p-value may be 1, contaminated clients "
                      "included). Leave untrained clients out of the round.",
                      UserWarning, stacklevel=3)

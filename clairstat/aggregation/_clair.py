"""CLAIR as an aggregator: detect contaminated clients, refine the benign ones."""

from __future__ import annotations

import numpy as np

from ._glora import low_rank_readout
from ._reduce import ReducedStack, reduce_factors
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
        Keyword arguments of :class:`clairstat.CLAIREstimator`.

    Returns
    -------
    AggregationResult
        ``update`` = the weighted mean of the collaborative clients' updates (d, k);
        ``factors`` = its rank-``max r_i`` readout; extras ``flagged`` (bool,
        n_clients), ``per_client`` (a :class:`ReducedStack` of the refined updates,
        (n_clients, d, k) when expanded), ``subspace`` (d, rank_), ``estimator`` (fitted
        on the reduced updates), ``reduction`` (:class:`ReducedFactors`).

    Notes
    -----
    Every update lies in ``col(Q) x row(V^T)`` (see :func:`reduce_factors`), and the
    decomposition, the refit and the refinement are equivariant under the orthonormal
    maps ``X -> Q X V^T``, so fitting on the (s, t) blocks and mapping back is exact for
    given penalties, a given rank and ``detection="threshold"``. Data-driven choices
    ("auto" penalties, the noise scale, the rank rule and the calibrated test's degrees
    of freedom ``(p - r) q``) see the reduced dimensions s and t, the dimensions the
    updates actually occupy, rather than d and k, and may then differ from a dense fit.

    The reduction removes d and k from the cost, not the clients' ranks: s and t reach
    ``sum r_i`` when the clients' factors are in general position. 50 rank-16 clients on
    a 4096 x 4096 module reduce in about 5 s (one BLAS thread), but the estimator then
    works on (50, 800, 800) blocks, which took more than 20 minutes on 2 CPU cores;
    clients sharing col(B) (s small) run in seconds.
    """
    from clairstat import CLAIREstimator  # lazily: clairstat's modules import this package

    reduction = reduce_factors(factors, backbone=True)
    estimator = CLAIREstimator(**options).fit(reduction.updates, sample_weight=weights)
    mean = reduction.expand(estimator.collaborative_mean_)
    rank = max(b.shape[1] for b, _ in factors)
    readout = low_rank_readout(reduction.left_basis, estimator.collaborative_mean_ @
                               reduction.right_basis.T, rank)
    per_client = ReducedStack(reduction.left_basis, estimator.refined_, reduction.right_basis)
    return AggregationResult("clair", mean, readout, weights, {
        "flagged": np.asarray(estimator.contaminated_, dtype=bool),
        "per_client": per_client,
        "subspace": reduction.left_basis @ estimator.subspace_,
        "estimator": estimator, "reduction": reduction})

"""CLAIR on every module of an adapter: one fit per module, or one joint fit.

The clients' factors arrive grouped by module (``{module: [(B_k, A_k), ...]}``, as
:func:`clairstat.lora.module_factors` reads them from peft state dicts); this module
fits CLAIR on them and returns each module's refined updates, collaborative mean and
flags in reduced coordinates (:class:`clairstat._reduced.ReducedStack`), with the
client-level flags. Reading the results back into adapters is :mod:`clairstat.lora`'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from .._reduced import ReducedStack, reduce_factors
from .._threads import svt_flops
from ._api import aggregate

__all__ = ["ModuleRefinement", "clair_modules", "modules_work"]


@dataclasses.dataclass
class ModuleRefinement:
    """Output of :func:`clair_modules`.

    Attributes
    ----------
    flagged : ndarray of shape (n_clients,), bool
        Client-level flags: the joint test, or (per module) flagged in more than half of
        the fitted modules (a module with every update zero is not fitted).
    module_flagged : dict of str to ndarray of shape (n_clients,)
        Flags of each module's fit (all equal to ``flagged`` when ``joint``).
    per_client : dict of str to ReducedStack
        Refined updates ``Delta W~_k`` per module, (n_clients, d_out, d_in) when
        expanded; a module's own flagged clients keep their update.
    collaborative_mean : dict of str to ReducedStack
        The collaborative set's mean update per module (one element).
    estimators : dict
        The fitted :class:`clairstat.CLAIREstimator` per module, or ``{"joint": est}``;
        ``None`` where nothing was fitted.
    joint : bool
    zero_modules : frozenset of str
        The modules whose updates are all exactly zero (not fitted).
    """

    flagged: np.ndarray
    module_flagged: dict
    per_client: dict
    collaborative_mean: dict
    estimators: dict
    joint: bool
    zero_modules: frozenset


def _all_zero(factors):
    """Whether every client's update ``B_k A_k`` of a module is 0 (B_k = 0 or A_k = 0)."""
    return all(not np.any(b_mat) or not np.any(a_mat) for b_mat, a_mat in factors)


def _zero_fit(factors):
    """The outcome for a module whose updates are all 0 (fresh adapters): nothing to fit,
    zero refined updates and mean, nobody flagged, no estimator."""
    red = reduce_factors(factors)
    zeros = np.zeros_like(red.updates)
    return (ReducedStack(red.left_basis, zeros, red.right_basis),
            ReducedStack(red.left_basis, zeros[:1], red.right_basis),
            np.zeros(len(factors), dtype=bool), None)


def _modules(factor_lists, progress):
    """``factor_lists.items()``, through ``progress(iterable, total=n_modules)`` if given."""
    items = factor_lists.items()
    return items if progress is None else progress(items, total=len(factor_lists))


def _fit_per_module(factor_lists, weights, clair_params, progress=None):
    out = {}
    for name, factors in _modules(factor_lists, progress):
        if _all_zero(factors):
            out[name] = _zero_fit(factors)
            continue
        result = aggregate("clair", factors, weights, **clair_params)
        red = result.reduction
        mean = np.asarray(result.estimator.collaborative_mean_)[None]
        out[name] = (result.per_client, ReducedStack(red.left_basis, mean, red.right_basis),
                     result.flagged, result.estimator)
    return out


def _fit_joint(factor_lists, weights, clair_params, progress=None):
    """One CLAIR fit on every client's concatenated reduced updates (vectors, q = 1)."""
    from .. import CLAIREstimator  # lazily: clairstat's modules import this package

    if all(_all_zero(factors) for factors in factor_lists.values()):
        return {name: _zero_fit(factors) for name, factors in factor_lists.items()}
    reductions = {name: reduce_factors(f) for name, f in _modules(factor_lists, progress)}
    n_clients = len(next(iter(factor_lists.values())))
    vectors = np.hstack([r.updates.reshape(n_clients, -1) for r in reductions.values()])
    # The K vectors span at most K dimensions: one more exact reduction (an isometry).
    basis = np.linalg.qr(vectors.T)[0]
    estimator = CLAIREstimator(**clair_params).fit((vectors @ basis)[:, :, None],
                                                   sample_weight=weights)
    flagged = np.asarray(estimator.contaminated_, dtype=bool)
    refined = estimator.refined_[:, :, 0] @ basis.T
    mean = basis @ estimator.collaborative_mean_[:, 0]
    out, start = {}, 0
    for name, red in reductions.items():
        size = red.updates[0].size
        shape = red.updates.shape[1:]
        block = refined[:, start:start + size].reshape(n_clients, *shape)
        mean_block = mean[start:start + size].reshape(1, *shape)
        out[name] = (ReducedStack(red.left_basis, block, red.right_basis),
                     ReducedStack(red.left_basis, mean_block, red.right_basis),
                     flagged, estimator)
        start += size
    return out


def clair_modules(factor_lists: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]],
                  weights: ArrayLike | None = None, *, joint: bool = False,
                  progress: Any = None, **clair_params: Any) -> ModuleRefinement:
    """CLAIR on the clients' updates of every module: detect and refine.

    Parameters
    ----------
    factor_lists : dict of str to list of (ndarray (d_out, r_k), ndarray (r_k, d_in))
        Per module, client k's ``(B_k, A_k)`` with the scaling absorbed into ``B_k``;
        every module lists the same clients in the same order.
    weights : array-like of shape (n_clients,), optional
        Client weights of the collaborative mean (e.g. sample sizes).
    joint : bool, default=False
        ``False``: one CLAIR fit per module (:func:`clairstat.aggregation.aggregate`
        with ``"clair"``: each module has its own collaborative set, subspace and
        rank). ``True``: one fit on each client's concatenated reduced updates, a vector
        of length ``sum_m s_m t_m`` (``q = 1``), itself reduced exactly to the
        n_clients-dimensional span of the vectors.
    progress : callable, optional
        Called as ``progress(iterable, total=n_modules)`` around the loop over modules.
    **clair_params
        Parameters of :class:`clairstat.CLAIREstimator`.

    Returns
    -------
    ModuleRefinement
        A module whose updates are all exactly zero is not fitted (nobody flagged in
        it, zero refined updates and mean, estimator ``None``) and does not vote in the
        client-level flags; with ``joint=True`` the fit is skipped only when every
        module is zero.
    """
    fit = _fit_joint if joint else _fit_per_module
    fitted = fit(factor_lists, weights, clair_params, progress)
    module_flagged = {name: item[2] for name, item in fitted.items()}
    votes = [module_flagged[name] for name, item in fitted.items() if item[3] is not None]
    n_clients = len(next(iter(factor_lists.values())))
    flagged = np.mean(votes, axis=0) > 0.5 if votes else np.zeros(n_clients, dtype=bool)
    estimators = ({"joint": next(iter(fitted.values()))[3]} if joint
                  else {name: item[3] for name, item in fitted.items()})
    zero = frozenset(name for name, factors in factor_lists.items() if _all_zero(factors))
    return ModuleRefinement(flagged, module_flagged,
                            {name: item[0] for name, item in fitted.items()},
                            {name: item[1] for name, item in fitted.items()},
                            estimators, joint, zero)


def modules_work(factor_lists):
    """Flops of the largest module: its reduction's two QRs and its fit's SVT.

    A module with client factors ``B_k`` (d_out, r_k), ``A_k`` (r_k, d_in) reduces by QRs
    of (d_out, s) and (d_in, s) matrices, ``s = sum_k r_k``, and is fitted on
    (n_clients, s, max r_k) blocks (:func:`clairstat._threads.svt_flops`).
    """
    work = 0.0
    for factors in factor_lists.values():
        total = sum(a_mat.shape[0] for _, a_mat in factors)
        widest = max(a_mat.shape[0] for _, a_mat in factors)
        d_out, d_in = factors[0][0].shape[0], factors[0][1].shape[1]
        work = max(work, (d_out + d_in) * total ** 2
                   + svt_flops((len(factors), total, widest)))
    return work

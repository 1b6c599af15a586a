"""Factor-level rules: FedIT, FFA-LoRA, FedEx-LoRA and FLoRA."""

from __future__ import annotations

import numpy as np

from ._result import AggregationResult
from ._validation import common_rank, exact_update, stacked_factors

__all__ = ["average_factors", "a_outliers", "fedit", "ffa", "fedex", "flora"]


def average_factors(factors, weights):
    """Weighted factor means ``(B_bar, A_bar) = (sum p_i B_i, sum p_i A_i)``."""
    b_bar = sum(w * b for (b, _), w in zip(factors, weights))
    a_bar = sum(w * a for (_, a), w in zip(factors, weights))
    return b_bar, a_bar


def _resolution(array):
    """The relative resolution (machine epsilon) of an array's floating dtype, torch's
    bfloat16 included; float64's for anything else."""
    dtype = getattr(array, "dtype", None)
    if dtype is not None and type(dtype).__module__ == "torch":
        if not dtype.is_floating_point:  # integers, bool: cast exactly to float64
            return float(np.finfo(np.float64).eps)
        import torch

        return float(torch.finfo(dtype).eps)
    if dtype is not None and np.issubdtype(dtype, np.floating):
        return float(np.finfo(dtype).eps)
    return float(np.finfo(np.float64).eps)


def _same_a(a_mat, reference, resolutions=None):
    """Equality up to a few ulps of the entries at the coarser of the two dtypes
    (``resolutions``: their epsilons, where the arrays were cast before): A is the same
    frozen array on every client. The finer of the two (``np.result_type``) refused the
    shared A sent in float16 by one client (a review)."""
    eps = max(resolutions) if resolutions is not None else max(
        _resolution(a_mat), _resolution(reference))
    tol = 8 * eps * max(1.0, float(np.max(np.abs(reference))))
    return a_mat.shape == reference.shape and not np.max(np.abs(a_mat - reference)) > tol


def a_outliers(a_mats, resolutions=None):
    """Indices of the clients whose A differs from the one most clients share (the first
    seen on a tie), as FFA-LoRA's frozen A must not differ, beyond rounding at the
    coarser dtype of the two compared (``resolutions``: each A's machine epsilon, where
    the arrays were cast to float64 before; by default read off their dtypes).

    Examples
    --------
    >>> a = np.eye(2)
    >>> a_outliers([a, a + 0.5, a.copy()])
    [1]
    """
    groups = []  # [reference, members]
    for index, a_mat in enumerate(a_mats):
        for group in groups:
            pair = None if resolutions is None else (resolutions[index],
                                                     resolutions[group[1][0]])
            if _same_a(a_mat, group[0], pair):
                group[1].append(index)
                break
        else:
            groups.append([a_mat, [index]])
    majority = max(groups, key=lambda group: len(group[1]))[1]  # first on a tie
    return [index for index in range(len(a_mats)) if index not in majority]


def fedit(factors, weights):
    """FedIT: average B and A separately; the update is ``B_bar A_bar``.

    Notes
    -----
    The aggregation error is ``sum p_i B_i A_i - B_bar A_bar = sum p_i (B_i - B_bar)
    (A_i - A_bar)``, bounded in Frobenius norm by the product of the weighted factor
    spreads (Cauchy-Schwarz). Equal ranks are required.

    Examples
    --------
    >>> f = [(np.ones((2, 1)), np.ones((1, 3))), (-np.ones((2, 1)), -np.ones((1, 3)))]
    >>> fedit(f, np.array([0.5, 0.5])).update.tolist()
    [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    """
    common_rank(factors, "fedit")
    b_bar, a_bar = average_factors(factors, weights)
    return AggregationResult("fedit", b_bar @ a_bar, (b_bar, a_bar), weights)


def ffa(factors, weights, resolutions=None):
    """FFA-LoRA: A is frozen at a shared initialisation, only B is averaged (exact).

    Raises ValueError when the clients' A factors differ (beyond rounding at the dtype's
    precision: ``resolutions``, each A's machine epsilon before a cast, which
    :func:`clairstat.aggregation.aggregate` passes), since FFA's exactness rests on the
    shared, untrained A; it names the clients whose A differs from the one most clients
    share (:func:`a_outliers`). Fresh adapters with A drawn per client (peft's default
    initialisation) are refused for that reason.

    Examples
    --------
    >>> a = np.eye(2)
    >>> res = ffa([(np.ones((3, 2)), a), (np.zeros((3, 2)), a)], np.array([0.5, 0.5]))
    >>> res.update.tolist()
    [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]
    """
    common_rank(factors, "ffa")
    odd = a_outliers([a for _, a in factors], resolutions)
    if odd:
        raise ValueError(f"rule 'ffa' needs the same frozen A on every client: client(s) "
                         f"{odd} have an A that differs from the one most clients share.")
    a_shared = factors[0][1].astype(np.float64, copy=False)
    b_bar = sum(w * b for (b, _), w in zip(factors, weights))
    return AggregationResult("ffa", b_bar @ a_shared, (b_bar, a_shared), weights)


def fedex(factors, weights):
    """FedEx-LoRA: FedIT factors plus the dense residual ``Delta W* - B_bar A_bar``.

    The residual is folded into the frozen weights, so ``update`` is exactly
    ``Delta W* = sum p_i B_i A_i``; ``residual`` (d, k) is the extra dense message.
    ``factors`` are FedIT's mean factors, without the residual: an adapter of the
    clients' rank (:func:`clairstat.lora.global_state_dict`, the Flower strategy) is
    the best rank-r readout of ``update`` instead.

    Examples
    --------
    >>> f = [(np.ones((2, 1)), np.ones((1, 2))), (-np.ones((2, 1)), -np.ones((1, 2)))]
    >>> fedex(f, np.array([0.5, 0.5])).residual.tolist()
    [[1.0, 1.0], [1.0, 1.0]]
    """
    common_rank(factors, "fedex")
    b_bar, a_bar = average_factors(factors, weights)
    update = exact_update(factors, weights)
    return AggregationResult("fedex", update, (b_bar, a_bar), weights,
                             {"residual": update - b_bar @ a_bar})


def flora(factors, weights):
    """FLoRA: stack ``B = [p_1 B_1, ..., p_N B_N]``, ``A = [A_1; ...; A_N]`` (exact).

    The global factors have rank ``sum r_i``; client ranks may differ.

    Examples
    --------
    >>> f = [(np.ones((2, 1)), np.ones((1, 3))), (np.ones((2, 2)), np.ones((2, 3)))]
    >>> flora(f, np.array([0.5, 0.5])).factors[0].shape
    (2, 3)
    """
    b_stack, a_stack = stacked_factors(factors, weights)
    return AggregationResult("flora", b_stack @ a_stack, (b_stack, a_stack), weights)

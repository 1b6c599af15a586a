"""The single entry point :func:`aggregate` and the registry of rule names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from numpy.typing import ArrayLike

from ._clair import clair
from ._glora import glora
from ._result import AggregationResult
from ._robust import geomedian, krum, median, trimmed_mean
from ._rotation import fedrot
from ._rules import fedex, fedit, ffa, flora
from ._validation import check_factors, check_weights

__all__ = ["RULES", "aggregate"]

RULES = {"fedit": fedit, "ffa": ffa, "fedex": fedex, "flora": flora, "fedrot": fedrot,
         "glora": glora, "median": median, "trimmed_mean": trimmed_mean, "krum": krum,
         "geomedian": geomedian, "clair": clair}


def aggregate(rule: str, factors: Sequence[tuple[ArrayLike, ArrayLike]],
              weights: ArrayLike | None = None, **options: Any) -> AggregationResult:
    """Aggregate clients' LoRA factors with one of the rules of the method (section 5).

    Parameters
    ----------
    rule : str
        One of ``"fedit"``, ``"ffa"``, ``"fedex"``, ``"flora"``, ``"fedrot"``,
        ``"glora"``, ``"median"``, ``"trimmed_mean"``, ``"krum"``, ``"geomedian"``,
        ``"clair"``.
    factors : list of (ndarray of shape (d, r_i), ndarray of shape (r_i, k))
        Client i's ``(B_i, A_i)``, update ``Delta W_i = B_i A_i`` (scale absorbed).
        Ranks may differ for flora, glora, the robust rules and clair; the others raise
        ValueError.
    weights : array-like of shape (n_clients,), optional
        Non-negative client weights (e.g. sample sizes), normalised to sum 1; uniform by
        default. Every rule that averages uses them.
    **options
        Rule options: fedrot ``reference=(B_ref, A_ref)``, ``align="A"|"B"``,
        ``lam``; glora ``reference_rank``, ``readout_rank``; trimmed_mean ``trim``;
        krum ``n_byzantine``, ``multi``; geomedian ``tol``, ``max_iter``; clair: the
        parameters of :class:`clairstat.CLAIREstimator`.

    Returns
    -------
    AggregationResult
        ``update`` (d, k), ``factors`` (global ``(B, A)`` or None), ``weights``, and the
        rule's extras as attributes.

    Raises
    ------
    ValueError
        Before any rule runs, naming the client (``factors[i]``, and the factor, A or
        B): a non-finite value, a factor that is not 2-D or not real, rank 0 or a
        rank above ``min(d, k)`` (it adds nothing to ``B_i A_i`` but cost), inner
        dimensions that do not match, a module shape (d, k) that differs from the
        other clients', or an update ``B_i A_i`` that would overflow; and a negative or
        non-finite weight (naming the clients).

    Notes
    -----
    Zero updates are valid input: with fresh adapters (every ``B_i = 0``, as peft
    initialises them) every rule returns the zero update, and CLAIR flags nobody; but
    ``"ffa"`` refuses clients whose A differ, as peft's per-client random A do (FFA-LoRA
    needs one shared initialisation of A).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> f = [(rng.standard_normal((6, 2)), rng.standard_normal((2, 5))) for _ in range(3)]
    >>> exact = sum(b @ a for b, a in f) / 3
    >>> bool(np.allclose(aggregate("flora", f).update, exact))
    True
    >>> bool(np.allclose(aggregate("fedit", f).update, exact))
    False
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; valid rules: {', '.join(RULES)}.")
    factors = list(factors)  # once: a generator is read here, not emptied below
    if rule == "ffa" and "resolutions" not in options:
        # the A factors' precision before the cast to float64: a client sending the
        # shared A in float16 or bfloat16 sends the same A (a review)
        from ._rules import _resolution

        options = {**options, "resolutions": [
            _resolution(pair[1]) if isinstance(pair, (tuple, list)) and len(pair) == 2
            else _resolution(None) for pair in factors]}
    factors = check_factors(factors)
    return RULES[rule](factors, check_weights(weights, len(factors)), **options)

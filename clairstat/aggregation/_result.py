"""The one result object every aggregation rule returns."""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["AggregationResult"]


@dataclasses.dataclass(repr=False)
class AggregationResult:
    """Outcome of one aggregation round.

    Attributes
    ----------
    rule : str
        Name of the rule that produced it.
    update : ndarray of shape (d, k)
        The aggregated update the server applies to the frozen weights, float64
        whatever the factors' dtype (as ``factors``; every rule computes in float64,
        the weights being float64). A rule may
        pass a function of no argument instead: it is called on the first access and
        its array kept (CLAIR's dense mean, d x k, costs as much as the reduction's
        QRs on a 4096 x 4096 module and the per-module LoRA path never reads it).
    factors : tuple of (ndarray of shape (d, r), ndarray of shape (r, k)) or None
        New global LoRA factors ``(B, A)`` where the rule has them, else ``None``. As
        for ``update``, a rule may pass a function of no argument (CLAIR's readout of
        its mean: an ARPACK run on the reduced mean, 0.1-0.15 s on the 4096 x 4096,
        100-client module, which the per-module LoRA path never reads).
    weights : ndarray of shape (n_clients,)
        The normalised client weights (they sum to 1).
    extras : dict
        Rule-specific outputs, also readable as attributes: ``residual`` (fedex),
        ``rotations`` and ``aligned_factors`` (fedrot), ``reference_basis`` (glora),
        ``selected`` and ``scores`` (krum), ``iterations`` and ``converged``
        (geomedian), ``flagged``, ``per_client``, ``subspace``, ``estimator``,
        ``reduction`` and ``reduced_mean`` (the mean in the reduction's coordinates)
        (clair).

    Examples
    --------
    >>> res = AggregationResult("fedit", np.zeros((2, 3)), None, np.ones(1), {"x": 1})
    >>> res.x, res.update.shape
    (1, (2, 3))
    """

    rule: str
    update: np.ndarray
    factors: tuple | None
    weights: np.ndarray
    extras: dict = dataclasses.field(default_factory=dict)

    def __getattribute__(self, name):
        value = object.__getattribute__(self, name)
        if name in ("update", "factors") and callable(value):  # once, on first access
            value = value()
            object.__setattr__(self, name, value)
        return value

    def __getattr__(self, name):
        # Only called when normal lookup fails: fall back to the rule's extras.
        extras = self.__dict__.get("extras", {})
        if name in extras:
            return extras[name]
        raise AttributeError(f"{type(self).__name__} of rule {self.__dict__.get('rule')!r} "
                             f"has no attribute {name!r}; extras: {sorted(extras)}.")

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self.extras))

    def __repr__(self):
        rank = None if self.factors is None else self.factors[0].shape[1]
        return (f"AggregationResult(rule={self.rule!r}, update_shape={self.update.shape}, "
                f"factor_rank={rank}, extras={sorted(self.extras)})")

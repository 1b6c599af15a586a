"""Federated LoRA aggregation rules behind one entry point.

:func:`aggregate` takes the clients' ``(B_i, A_i)`` factors and a rule name and returns
an :class:`AggregationResult`; :func:`reduce_factors` and :func:`factored_reduction`
(from :mod:`clairstat._reduced`, the package's one home for reduced coordinates) give
the exact low-dimensional coordinates in which CLAIR runs whatever the module's size;
:func:`clair_modules` fits CLAIR on every module of an adapter (or jointly on all).
"""

from .._reduced import ReducedFactors, ReducedStack, factored_reduction, reduce_factors
from ._api import RULES, aggregate
from ._glora import consensus_basis, low_rank_readout
from ._modules import (JointRefinement, ModuleRefinement, aggregate_modules, clair_modules,
                       client_flags, joint_refinement, module_gram, modules_work)
from ._rank import RankSelection, cross_validated_rank
from ._result import AggregationResult
from ._robust import (krum_scores, update_gram, weighted_median, weighted_trimmed_mean,
                      weiszfeld)
from ._rotation import alignment_rotation, soft_rotation

RULE_NAMES = tuple(RULES)

__all__ = ["aggregate", "reduce_factors", "factored_reduction", "AggregationResult",
           "ReducedFactors", "ReducedStack", "RULE_NAMES", "alignment_rotation",
           "soft_rotation", "consensus_basis", "low_rank_readout", "krum_scores",
           "update_gram", "weighted_median", "weighted_trimmed_mean", "weiszfeld",
           "clair_modules", "ModuleRefinement", "modules_work", "client_flags",
           "cross_validated_rank", "RankSelection", "joint_refinement",
           "JointRefinement", "module_gram", "aggregate_modules"]

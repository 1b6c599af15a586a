"""clairstat: robust collaborative low-rank estimation across clients (CLAIR)."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("clairstat")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from . import aggregation, datasets, metrics, solvers
from ._decompose import clair_decompose
from ._estimator import CLAIREstimator
from ._objective import objective
from ._ols import LocalOLS, local_ols
from ._result import DecompositionResult, Problem
from ._summary import CLAIRSummary

__all__ = ["CLAIREstimator", "CLAIRSummary", "DecompositionResult", "LocalOLS", "Problem",
           "aggregation", "local_ols",
           "clair_decompose", "datasets", "metrics", "objective", "solvers", "__version__"]

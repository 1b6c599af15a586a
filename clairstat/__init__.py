"""clairstat: robust collaborative low-rank estimation across clients (CLAIR)."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("clairstat")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from . import datasets, metrics

__all__ = ["datasets", "metrics", "__version__"]

"""Transitional alias of :mod:`clairstat._reduced` (removed once every import moved)."""

from ._reduced import (FactoredBlocks, FactoredMean, FactoredRefined,  # noqa: F401
                       off_subspace_statistics, top_eigh as _top_eigh, truncated_svd)

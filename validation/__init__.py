"""Checks of the method's claims against the simulation results tables.

``python -m validation --scale smoke|small|full`` runs the studies the checks need
(reusing finished replicates), prints the verdicts, writes them as JSON and Markdown and
exits non-zero if a check fails.
"""

from ._core import (Check, all_checks, mean_interval, ols_slope, overlaps, run_check, verdict,
                    wilson)

__all__ = ["Check", "all_checks", "mean_interval", "ols_slope", "overlaps", "run_check",
           "verdict", "wilson"]

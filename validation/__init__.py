"""Checks of the method's claims against the simulation results tables.

``python -m validation --scale smoke|small|full`` runs the studies the checks need
(reusing finished replicates), prints the verdicts, writes them as JSON and Markdown and
exits non-zero if a check fails without a documented cause. ``--control NAME`` runs the
same checks on a deliberately broken method (a negative control).
"""

from ._core import (INF, Check, all_checks, decide, logit_fit, mean_interval, ols_slope,
                    run_check, wilson)

__all__ = ["INF", "Check", "all_checks", "decide", "logit_fit", "mean_interval",
           "ols_slope", "run_check", "wilson"]

"""A statsmodels-style report of a fitted :class:`~clairstat.CLAIREstimator`."""

from __future__ import annotations

import numpy as np
import pandas as pd
from statsmodels.iolib.summary2 import Summary

__all__ = ["CLAIRSummary"]


class CLAIRSummary:
    """Fit diagnostics and the per-client table; text, Markdown or LaTeX.

    Built on ``statsmodels.iolib.summary2.Summary``; ``str(summary)`` is the text form.
    """

    def __init__(self, estimator):
        self.diagnostics = _diagnostics(estimator)
        self.clients = pd.DataFrame({
            "score ||S_k||_F": estimator.contamination_scores_,
            "statistic": estimator.test_statistics_,
            "p-value": estimator.p_values_,
            "flagged": np.where(estimator.contaminated_, "yes", "no"),
        })
        self.clients.index.name = "client"
        self._summary = Summary()
        self._summary.add_title("CLAIR: collaborative low-rank estimation")
        self._summary.add_dict(self.diagnostics, ncols=2)
        self._summary.add_df(self.clients, index=True, float_format="%.4g")

    def as_text(self):
        """Plain-text report."""
        return self._summary.as_text()

    def as_latex(self):
        """LaTeX tables."""
        return self._summary.as_latex()

    def as_markdown(self):
        """Markdown: a diagnostics table and the per-client table."""
        diag = "\n".join(f"| {k} | {v} |" for k, v in self.diagnostics.items())
        header = "| " + " | ".join(["client", *self.clients.columns]) + " |"
        rule = "|" + "---|" * (len(self.clients.columns) + 1)
        rows = "\n".join("| " + " | ".join([str(i), *(_fmt(v) for v in row)]) + " |"
                         for i, row in zip(self.clients.index, self.clients.to_numpy()))
        return (f"### CLAIR fit\n\n| quantity | value |\n|---|---|\n{diag}\n\n"
                f"### Clients\n\n{header}\n{rule}\n{rows}\n")

    def __str__(self):
        return self.as_text()

    def _repr_html_(self):
        return self._summary.as_html()


def _fmt(value):
    return value if isinstance(value, str) else f"{value:.4g}"


def _diagnostics(est):
    n_clients = len(est.contaminated_)
    return {
        "clients": str(n_clients),
        "flagged": str(int(est.contaminated_.sum())),
        "estimate shape (p, q)": str(tuple(int(v) for v in est.estimate_shape_)),
        "rank": str(est.rank_),
        "formulation": est.formulation,
        "backbone": str(est.backbone),
        "detection": f"{est.detection} ({est.correction}, level {est.test_level})",
        "solver": est.solver_,
        "iterations": str(est.n_iter_),
        "converged": str(est.converged_),
        "objective": f"{est.objective_:.6g}",
        "duality gap": f"{est.dual_gap_:.3g}",
        "alpha": f"{est.alpha_:.4g}",
        "beta": f"{est.beta_:.4g}",
        "noise scale": f"{est.noise_scale_:.4g}",
        "test df": str(est.degrees_of_freedom_),
    }

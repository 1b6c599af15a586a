"""A statsmodels-style report of a fitted :class:`~clairstat.CLAIREstimator`."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
from statsmodels.iolib.summary2 import Summary

__all__ = ["CLAIRSummary"]


class CLAIRSummary:
    """Fit diagnostics and the per-client table; text, Markdown or LaTeX.

    Built on ``statsmodels.iolib.summary2.Summary``; ``str(summary)`` is the text form.
    """

    def __init__(self, estimator, client_names=None):
        self.diagnostics = _diagnostics(estimator)
        n_clients = len(estimator.contaminated_)
        if client_names is None:
            client_names = getattr(estimator, "client_names_", None)
        if client_names is not None:
            if isinstance(client_names, (str, bytes)):  # was read one name per character
                raise TypeError("client_names must be a sequence of names, one per "
                                f"client, not a single string ({client_names!r}).")
            client_names = [str(name) for name in client_names]
            if len(client_names) != n_clients:
                raise ValueError(f"client_names has {len(client_names)} names for "
                                 f"{n_clients} clients.")
            repeated = sorted({name for name in client_names
                               if client_names.count(name) > 1})
            if repeated:  # a LocalOLS refuses them too: rows one could not tell apart
                raise ValueError(f"client_names repeats {repeated}; each client needs "
                                 "its own name.")
        self.clients = pd.DataFrame({
            "score ‖S_k‖_F": [_number(v) for v in estimator.contamination_scores_],
            "statistic": [_number(v) for v in estimator.test_statistics_],
            # four significant digits like the other columns (a review read "202" for
            # 202.11 and took it for an integer)
            "df": [f"{v:.4g}" for v in estimator.degrees_of_freedom_],
            # the null's per-client scale, with which (and "null calibration"'s family)
            # a p-value is recomputed from its row (a review); NaN under the LoRA
            # stacks' predictive null, which has no such scale
            **({} if np.all(np.isnan(estimator.null_scale_)) else
               {"null scale": [_number(v) for v in estimator.null_scale_]}),
            "p-value": [_p_value(v) for v in estimator.p_values_],
            "adjusted": [_p_value(v) for v in estimator.adjusted_p_values_],
            "flagged": np.where(estimator.contaminated_, "yes", "no"),
        })
        if client_names is not None:
            self.clients.index = pd.Index(client_names)
        self.clients.index.name = "client"
        self._summary = self._build(str, notes=False)

    def _notes(self, escape):
        """The :data:`NOTES` diagnostics, one ``key: value`` line each."""
        return [escape(f"{key}: {self.diagnostics[key]}") for key in NOTES
                if key in self.diagnostics]

    def _build(self, escape, notes=True, note_escape=None):
        """The statsmodels Summary with every name and value passed through ``escape``
        (client, feature and output names are the user's, and reach every format); the
        notes under the tables through ``note_escape`` (default ``escape``: statsmodels
        escapes its tables' cells for LaTeX, not its notes)."""
        summary = Summary()
        summary.add_title("CLAIR: collaborative low-rank estimation")
        summary.add_dict({escape(k): escape(v) for k, v in self.diagnostics.items()
                          if k not in NOTES}, ncols=2)
        clients = self.clients.copy()
        clients.index = pd.Index([escape(str(name)) for name in clients.index],
                                 name=clients.index.name)
        summary.add_df(clients, index=True)
        for note in self._notes(note_escape or escape) if notes else ():  # under the tables
            summary.add_text(note)
        return summary

    def as_text(self):
        """Plain-text report (its ``=`` and ``-`` rules as wide as its widest table line:
        statsmodels draws each table's at that table's width), the notes under it whole."""
        lines = self._summary.as_text().rstrip("\n").split("\n")
        width = max(map(len, lines))
        # the notes as they are, not wrapped at the tables' width (statsmodels wraps its
        # own notes, which split "scale x1.005" across lines)
        return "\n".join([line[0] * width if line and set(line) <= {"="} or
                           line and set(line) <= {"-"} else line for line in lines]
                          + self._notes(str))

    def as_latex(self):
        """LaTeX tables (for a document with the default font encoding: no raw ``<``
        or Unicode bars; no empty label; names with TeX's special characters escaped)."""
        latex = self._build(_latex_escape, note_escape=_latex_escape_all).as_latex()
        latex = latex.replace("\\label{}\n", "")
        latex = latex.replace("score ‖S\\_k‖\\_F", "score $\\|S_k\\|_F$")
        return latex.replace(_TINY, "$<10^{-16}$")

    def as_markdown(self):
        """Markdown: a diagnostics table and the per-client table (a ``|`` in a name
        escaped, so that it stays in its cell)."""
        diag = "\n".join(f"| {_md(k)} | {_md(v)} |" for k, v in self.diagnostics.items())
        header = "| " + " | ".join(["client", *self.clients.columns]) + " |"
        rule = "|" + "---|" * (len(self.clients.columns) + 1)
        rows = "\n".join("| " + " | ".join([_md(i), *(_md(_fmt(v)) for v in row)]) + " |"
                         for i, row in zip(self.clients.index, self.clients.to_numpy()))
        return (f"### CLAIR fit\n\n| quantity | value |\n|---|---|\n{diag}\n\n"
                f"### Clients\n\n{header}\n{rule}\n{rows}\n")

    def __str__(self):
        return self.as_text()

    def _repr_html_(self):
        return self._build(lambda text: html.escape(str(text))).as_html()


#: Diagnostics whose values run to 40-80 characters, printed as notes under the tables:
#: in the two-column block they made the text report 154 columns wide (a review), every
#: column of the client table stretched to match.
NOTES = ("noise model", "null calibration")


def _latex_escape_all(value):
    """``value`` with every TeX special character escaped: a note under the tables,
    which statsmodels leaves as it is (a review: ``noise model: noise_cov`` stopped
    pdflatex at its ``_``)."""
    table = {**_LATEX, "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_"}
    return "".join(table.get(ch, ch) for ch in str(value))


def _md(value):
    """A Markdown table cell: ``|`` escaped, line breaks as spaces."""
    return " ".join(str(value).splitlines()).replace("|", "\\|")


#: TeX's special characters that statsmodels' ``as_latex`` leaves as they are (it
#: escapes ``& % $ # _`` itself, and ``< > |`` in a table's index).
_LATEX = {"\\": r"\textbackslash{}", "^": r"\textasciicircum{}", "~": r"\textasciitilde{}",
          "{": r"\{", "}": r"\}"}


def _latex_escape(value):
    return "".join(_LATEX.get(char, char) for char in str(value))


def _fmt(value):
    return value if isinstance(value, str) else f"{value:.4g}"


def _number(value):
    return f"{value:.4g}"


_TINY = "<1e-16"


def _p_value(value):
    """Four significant digits; below 1e-16 (float64 resolution next to 1) as a bound."""
    return _TINY if value < 1e-16 else f"{value:.4g}"


def _df(values):
    low, high = float(np.min(values)), float(np.max(values))
    return f"{low:.3g}" if np.isclose(low, high) else f"{low:.3g} to {high:.3g}"


def _calibration(est):
    """How far the data moved the null: the given noise's scale raised, df widened (a
    LoRA stack's null is read off the other clients altogether)."""
    if getattr(est, "null_kind_", None) == "predictive":
        return "predicted from the other clients (Student t)"
    parts = []
    factor = getattr(est, "null_scale_factor_", float("nan"))
    if np.isfinite(factor):
        parts.append(f"scale x{factor:.4g}")  # 1.005 showed as "x1" (a review)
    spread = getattr(est, "null_spread_df_", float("inf"))
    if np.isfinite(spread) and np.any(est.degrees_of_freedom_ >= spread * (1 - 1e-12)):
        parts.append(f"df widened to {spread:.3g}")
    # the family, so that a p-value can be recomputed from the table's statistic and df
    # (an F's second df was shown nowhere, a review)
    scale_df = getattr(est, "null_scale_df_", float("nan"))
    if getattr(est, "null_kind_", None) == "F" and np.isfinite(scale_df):
        parts.append(f"statistic / (null scale df) ~ F(df, {scale_df:.4g})")
    else:
        parts.append("statistic / null scale ~ chi^2(df)")
    return ", ".join(parts)


def _names(est, width=40):
    """The fitted LocalOLS's feature and output names (those it did not make up), as
    many as fit in about ``width`` characters, with a count of the rest (the table
    stays as wide as the report)."""
    out = {}
    names = getattr(est, "_local_ols_names", None) or (None, None)
    for what, given in zip(("features", "outputs"), names):
        if not given:
            continue
        shown = [_shortened(str(given[0]), width)]
        for name in given[1:]:
            if len(", ".join([*shown, str(name)])) > width:
                break
            shown.append(str(name))
        rest = len(given) - len(shown)
        out[what] = ", ".join(shown) + (f", ... ({rest} more)" if rest else "")
    return out


def _shortened(name, width):
    """``name`` cut to ``width`` characters, ``...`` marking the cut."""
    return name if len(name) <= width else name[:width - 3] + "..."


def _diagnostics(est):
    n_clients = len(est.contaminated_)
    # the parameters the fit used (set_params after the fit changes the estimator's)
    params = getattr(est, "_fit_params", None) or {  # pickled before it was stored
        name: getattr(est, name) for name in ("formulation", "backbone", "subspace",
                                              "detection", "correction", "test_level")}
    shape = tuple(int(v) for v in est.estimate_shape_)  # the working orientation's
    return {
        "clients": str(n_clients),
        "flagged": str(int(est.contaminated_.sum())),
        "estimate shape (p, q)": str(shape[::-1] if params["subspace"] == "row" else shape),
        **_names(est),
        "rank": (str(est.rank_) if est.rank_ == est.test_rank_
                 else f"{est.rank_} (L); tests at {est.test_rank_}") + (
            f" (rule, support {params['rank_support']})"
            if params.get("rank_support", 1) > 1 else ""),
        "formulation": params["formulation"],
        "backbone": str(params["backbone"]),
        "detection": f"{params['detection']} ({params['correction']}, level "
                     f"{params['test_level']})",
        "detection converged": f"{est.detection_converged_} ({est.n_detection_rounds_} "
                               "rounds)",
        "noise model": est.noise_model_ + (
            f" ({params['cov_type']})"
            if params.get("cov_type") not in (None, "nonrobust") else "") + (
            " (robust row and output scales)" if getattr(est, "robust_frame_", False)
            else "") + (
            # a summary of the covariance's size, not an entry's standard deviation
            # (client_noise_scale_'s documentation; a review read it as one)
            " (noise scale: the covariance's geometric-mean size)"
            if est.noise_model_ == "noise_cov" else ""),
        ("t df" if getattr(est, "null_kind_", None) == "predictive" else "test df"):
            _df(est.degrees_of_freedom_),
        "null calibration": _calibration(est),
        **({"refinement": f"keeps {est.refinement_keep_:.3g} of each collaborative "
                          "client's own deviation (refinement_keep_)"}
           if getattr(est, "refinement_keep_", 0.0) > 0 else {}),
        "solver": est.solver_,
        "iterations": str(est.n_iter_),
        "converged": str(est.converged_),
        "objective": f"{est.objective_:.6g}",
        "duality gap": f"{est.dual_gap_:.3g}",
        "alpha": f"{est.alpha_:.4g}",
        "beta": f"{est.beta_:.4g}",
        "noise scale": f"{est.noise_scale_:.4g}",
    }

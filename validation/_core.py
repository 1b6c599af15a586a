"""Checks of the method's claims: a check is a function of a results table.

A :class:`Check` names the claim and the study whose table it reads; its function
returns the statistic, the expected value, the observed value with its interval and a
verdict. :func:`ols_slope` and :func:`wilson` give the intervals.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Callable

import numpy as np

__all__ = ["Check", "ols_slope", "wilson", "mean_interval", "overlaps", "verdict",
           "all_checks", "run_check", "is_blocking"]

VERDICTS = ("pass", "fail")
_REQUIRED = ("statistic", "expected", "observed", "interval", "verdict")


@dataclasses.dataclass(frozen=True)
class Check:
    """One claim checked against one study's table.

    Parameters
    ----------
    name : str
        Short identifier (unique across checks).
    study : str
        Name of the study whose results table ``function`` reads.
    claim : str
        The claim, in words (method.md section 4).
    function : callable
        ``function(df) -> dict(statistic=, expected=, observed=, interval=(lo, hi),
        verdict="pass"|"fail")``; extra keys (``detail``) are kept in the report.
    known_failure : str, optional
        Where the evidence that the claim, as stated, is false is written up (e.g.
        ``"validation/README.md#detection"``). Its failure is still reported as a
        failure, but does not make ``python -m validation`` exit non-zero (pytest's
        non-strict ``xfail``). Only for claims shown false, never to silence noise.
    """

    name: str
    study: str
    claim: str
    function: Callable
    known_failure: str | None = None


def ols_slope(df, x, y, log=True, by=None):
    """OLS slope of ``y`` on ``x`` with its 95% confidence interval (statsmodels).

    Parameters
    ----------
    df : pandas.DataFrame
    x, y : str
        Column names.
    log : bool, default=True
        Fit ``log y`` on ``log x`` (a power law's exponent); rows with a non-positive
        value are dropped first.
    by : str or list of str, optional
        Columns defining groups that get their own intercept (one common slope), e.g.
        the (p, q, n) regime of a power law whose constant depends on the regime.

    Returns
    -------
    slope : float
    interval : tuple of float
        The 95% interval ``(lo, hi)``.

    Examples
    --------
    >>> import pandas as pd
    >>> frame = pd.DataFrame({"x": [1.0, 2, 4, 8], "y": [3.0, 6, 12, 24]})
    >>> slope, (lo, hi) = ols_slope(frame, "x", "y")
    >>> round(slope, 6)
    1.0
    """
    import statsmodels.api as sm

    xs, ys = np.asarray(df[x], dtype=float), np.asarray(df[y], dtype=float)
    keep = np.isfinite(xs) & np.isfinite(ys) & ((xs > 0) & (ys > 0) if log else True)
    xs, ys = (np.log(xs[keep]), np.log(ys[keep])) if log else (xs[keep], ys[keep])
    if xs.size < 3 or np.ptp(xs) == 0:
        raise ValueError(f"need at least 3 rows with distinct {x!r} to fit a slope.")
    design = _design(xs, df.loc[keep, by] if by is not None else None)
    fit = sm.OLS(ys, design).fit()
    lo, hi = fit.conf_int(alpha=0.05)[0]
    return float(fit.params[0]), (float(lo), float(hi))


def _design(xs, groups):
    """Columns ``[x, intercept per group]`` (a single intercept without groups)."""
    import pandas as pd

    if groups is None:
        return np.column_stack([xs, np.ones_like(xs)])
    labels = pd.DataFrame(groups).astype(str).agg("|".join, axis=1)
    dummies = pd.get_dummies(labels).to_numpy(dtype=float)
    return np.column_stack([xs, dummies])


def wilson(successes, n):
    """Success rate with its 95% Wilson interval (statsmodels ``proportion_confint``).

    Examples
    --------
    >>> rate, (lo, hi) = wilson(20, 20)
    >>> rate, round(hi, 6), round(lo, 3)
    (1.0, 1.0, 0.839)
    """
    from statsmodels.stats.proportion import proportion_confint

    successes, n = int(successes), int(n)
    if n <= 0:
        raise ValueError("a rate needs at least one trial.")
    lo, hi = proportion_confint(successes, n, alpha=0.05, method="wilson")
    return successes / n, (float(lo), float(hi))


def mean_interval(values):
    """Mean with its 95% t interval (statsmodels ``DescrStatsW.tconfint_mean``).

    Examples
    --------
    >>> mean, (lo, hi) = mean_interval([1.0, 2.0, 3.0])
    >>> mean, round(lo, 3), round(hi, 3)
    (2.0, -0.484, 4.484)
    """
    from statsmodels.stats.weightstats import DescrStatsW

    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size < 2:
        raise ValueError("a mean's interval needs at least two finite values.")
    lo, hi = DescrStatsW(values).tconfint_mean(alpha=0.05)
    return float(values.mean()), (float(lo), float(hi))


def overlaps(interval, target_lo, target_hi):
    """Whether ``interval`` meets ``[target_lo, target_hi]`` (an equivalence band).

    Examples
    --------
    >>> overlaps((0.8, 0.95), 0.9, 1.1), overlaps((0.5, 0.8), 0.9, 1.1)
    (True, False)
    """
    lo, hi = interval
    return bool(lo <= target_hi and hi >= target_lo)


def verdict(ok):
    """``"pass"`` when ``ok`` is true, else ``"fail"``."""
    return "pass" if bool(ok) else "fail"


def all_checks():
    """Every check of every module of ``validation.checks`` that defines ``CHECKS``."""
    from . import checks as package

    found = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        found.extend(getattr(module, "CHECKS", []))
    return found


def is_blocking(row):
    """Whether a report row makes the run fail: an error, or an unexplained failure."""
    return row["verdict"] == "error" or (row["verdict"] == "fail"
                                          and not row.get("known_failure"))


def _as_float(value):
    return None if value is None else float(value)


def run_check(check, df):
    """Apply ``check`` to its table and return one report row (a dict).

    An empty table or an exception inside the check gives the verdict ``"error"``, with
    the message, rather than stopping the other checks.
    """
    row = {"name": check.name, "study": check.study, "claim": check.claim,
           "known_failure": check.known_failure}
    if df is None or len(df) == 0:
        return {**row, "verdict": "error", "detail": "no results"}
    try:
        result = dict(check.function(df))
    except Exception as error:  # reported, and turned into a non-zero exit status
        return {**row, "verdict": "error", "detail": f"{type(error).__name__}: {error}"}
    missing = [key for key in _REQUIRED if key not in result]
    if missing or result["verdict"] not in VERDICTS:
        return {**row, "verdict": "error", "detail": f"malformed result, missing {missing}"}
    lo, hi = result["interval"]
    result.update(observed=_as_float(result["observed"]), interval=[_as_float(lo),
                  _as_float(hi)])
    return {**row, **result}

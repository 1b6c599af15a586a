"""Checks of the method's claims: a check is a function of a results table.

A :class:`Check` names the claim, the study whose table it reads, its kind and its
pre-registered margin; its function returns the statistic, the expected value and the
observed value with its interval. The verdict is not the function's to give: it follows
from the interval and the margin by one rule (:func:`decide`), fixed before the data.

- ``kind="theory"``: statistical evidence for a stated claim (``docs/theory.md``). The
  margin ``[low, high]`` is the region the claim allows (an equivalence band, or a
  one-sided bound with an infinite end). ``pass`` when the whole 95% interval lies inside
  it (TOST for a band, "clears the bound" for a one-sided claim), ``fail`` when the whole
  interval lies outside it, ``inconclusive`` otherwise (too few replicates to decide):
  a wide interval never passes.
- ``kind="identity"``: an exact fact of the algorithms (an identity, an inequality that
  holds for every input), unit-test grade: the interval is the observed ``(min, max)``
  and the margin the rounding tolerance; ``pass`` when every replicate is inside, else
  ``fail``. It can only fail through a coding error, so it is counted apart.

:func:`ols_slope`, :func:`wilson`, :func:`mean_interval` and :func:`logit_fit` give the
intervals.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
from typing import Callable

import numpy as np

__all__ = ["Check", "ols_slope", "wilson", "mean_interval", "logit_fit", "decide",
           "all_checks", "run_check", "is_blocking", "KINDS", "VERDICTS", "INF"]

KINDS = ("theory", "identity")
VERDICTS = ("pass", "inconclusive", "fail")
INF = math.inf
_REQUIRED = ("statistic", "expected", "observed", "interval")


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
        The claim, in words, as stated in ``docs/theory.md`` (section ``source``).
    function : callable
        ``function(df) -> dict(statistic=, expected=, observed=, interval=(lo, hi))``;
        extra keys (``detail``, ``n``) are kept in the report. A returned ``verdict`` is
        ignored: the verdict follows from ``interval`` and ``margin`` (:func:`decide`).
    kind : {"theory", "identity"}
        Statistical evidence for a claim, or an exact fact of the code (unit-test grade).
    margin : tuple of float
        ``(low, high)`` declared before the data; ``-inf``/``inf`` for a one-sided claim.
    source : str
        Where the claim is stated: a section of ``docs/theory.md``.
    known_failure : str, optional
        Where the evidence that the claim, as stated, is false is written up (e.g.
        ``"validation/README.md#detection"``). A ``fail`` of such a check is still
        reported but does not make ``python -m validation`` exit non-zero. A check with a
        tag that does not fail is reported as a stale tag (the evidence has changed).
    known_range : tuple of float, optional
        Required with ``known_failure``: ``(low, high)``, where the documented failure's
        observed value lies (written up with the evidence). A tag excuses only that
        failure: a ``fail`` whose observed value is outside this range (a failure of
        another size, or on the other side of the margin) blocks like any other.
    """

    name: str
    study: str
    claim: str
    function: Callable
    kind: str = "theory"
    margin: tuple = (-INF, INF)
    source: str = ""
    known_failure: str | None = None
    known_range: tuple | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind must be one of {KINDS}, got {self.kind!r}.")
        if (self.known_failure is None) != (self.known_range is None):
            raise ValueError(f"{self.name}: known_failure and known_range go together (a "
                             "tag excuses the documented failure only, within its range).")
        if self.known_range is not None and not self.known_range[0] < self.known_range[1]:
            raise ValueError(f"{self.name}: known_range {self.known_range} is empty.")
        low, high = (float(v) for v in self.margin)
        if not low < high or (math.isinf(low) and math.isinf(high)):
            raise ValueError(f"{self.name}: margin {self.margin} allows nothing or "
                             "everything; a check must be able to fail.")


def decide(interval, margin, kind="theory"):
    """The verdict of an interval against a pre-registered margin.

    Parameters
    ----------
    interval : tuple of float
        ``(lo, hi)``: a 95% confidence interval (theory) or the observed range (identity).
    margin : tuple of float
        ``(low, high)``; an infinite end makes a one-sided claim.
    kind : {"theory", "identity"}

    Returns
    -------
    {"pass", "inconclusive", "fail"}
        ``pass`` iff ``low <= lo`` and ``hi <= high``; for a theory check ``fail`` iff the
        interval misses the margin entirely, else ``inconclusive``; an identity check has
        no inconclusive verdict (any replicate outside the margin is a counterexample).

    Examples
    --------
    >>> decide((0.95, 1.05), (0.9, 1.1)), decide((0.5, 1.5), (0.9, 1.1))
    ('pass', 'inconclusive')
    >>> decide((1.2, 1.5), (0.9, 1.1)), decide((0.93, 0.99), (0.9, INF))
    ('fail', 'pass')
    >>> decide((0.0, 2e-12), (-INF, 1e-12), kind="identity")
    'fail'
    """
    lo, hi = (float(v) for v in interval)
    low, high = (float(v) for v in margin)
    if math.isnan(lo) or math.isnan(hi):  # no interval could be formed
        return "inconclusive" if kind == "theory" else "fail"
    if low <= lo and hi <= high:
        return "pass"
    if kind == "identity" or hi < low or lo > high:
        return "fail"
    return "inconclusive"


def ols_slope(df, x, y, log=True, by=None):
    """OLS slope of ``y`` on ``x`` with its 95% confidence interval (statsmodels).

    Parameters
    ----------
    df : pandas.DataFrame
    x, y : str
        Column names.
    log : bool, default=True
        Fit ``log y`` on ``log x`` (a power law's exponent); rows with a non-positive
        value are dropped first. A non-finite value is an error either way.
    by : str or list of str, optional
        Columns defining groups that get their own intercept (one common slope).

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
    bad = int(np.sum(~(np.isfinite(xs) & np.isfinite(ys))))
    if bad:  # as mean_interval: every replicate counted, none dropped unseen
        raise ValueError(f"{bad} of {xs.size} rows have a non-finite {x!r} or {y!r}.")
    keep = (xs > 0) & (ys > 0) if log else np.ones(xs.size, dtype=bool)
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


def logit_fit(df, outcome, columns):
    """Logistic regression of a 0/1 ``outcome`` on ``columns`` plus an intercept.

    Returns the statsmodels result (``params`` and ``cov_params()`` ordered
    ``[const, *columns]``), or ``None`` when the outcome is perfectly separated (the
    maximum-likelihood fit does not exist: a boundary without any spread in the data).
    """
    import statsmodels.api as sm

    design = sm.add_constant(df[list(columns)].to_numpy(dtype=float), has_constant="add")
    response = np.asarray(df[outcome], dtype=float)
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # perfect separation is warned, not raised
            fit = sm.Logit(response, design).fit(disp=0, maxiter=200)
    except Exception:  # noqa: BLE001 - separation, singular Hessian: no estimate
        return None
    return fit


def wilson(successes, n):
    """Success rate with its 95% Wilson interval (statsmodels ``proportion_confint``).

    Examples
    --------
    >>> rate, (lo, hi) = wilson(20, 20)
    >>> rate, round(hi, 6), round(lo, 3)
    (1.0, 1.0, 0.839)
    """
    from statsmodels.stats.proportion import proportion_confint

    if not (float(successes).is_integer() and float(n).is_integer()):
        raise ValueError(f"a rate counts whole successes and trials, got {successes} of "
                         f"{n}.")
    successes, n = int(successes), int(n)
    if n <= 0:
        raise ValueError("a rate needs at least one trial.")
    if not 0 <= successes <= n:
        raise ValueError(f"{successes} successes in {n} trials is not a count.")
    lo, hi = proportion_confint(successes, n, alpha=0.05, method="wilson")
    return successes / n, (float(lo), float(hi))


def mean_interval(values, bounds=(-INF, INF)):
    """Mean with its 95% t interval (statsmodels ``DescrStatsW.tconfint_mean``).

    Parameters
    ----------
    values : array-like
        Every value must be finite: a NaN or an infinity is an error (a check whose
        quantity can be undefined says how it counts such replicates before calling).
    bounds : tuple of float, default=(-inf, inf)
        Where the quantity can lie (``(0, 1)`` for a proportion). They matter when
        every value is the same (to 64 eps of the largest, or of 1), where the t
        interval would be the point itself or as narrow as round-off:
        n equal values say only that a draw equals them with probability at least
        ``0.025 ** (1 / n)`` (the smallest that leaves the sample at least the 2.5%
        chance of a two-sided 95% interval), so the mean lies within
        ``b = 1 - 0.025 ** (1 / n)`` of the way from the value to either bound (the
        rest of the mass at the bound). Unbounded: an infinite interval, which decides
        nothing. Bounded on both sides (a share, a difference of shares), a sample
        with spread says no more about the mass it cannot show than equal values do:
        the t interval is widened to at least that interval, taken at the sample's
        mean (else eleven zeros and one 0.01 in [0, 1] got [-0.001, 0.003] where
        twelve zeros get [0, 0.265], and 79 zeros and a 1 an upper end, 0.037, below
        80 zeros' 0.045: one more false discovery passed a check more easily).

    Examples
    --------
    >>> mean, (lo, hi) = mean_interval([1.0, 2.0, 3.0])
    >>> mean, round(lo, 3), round(hi, 3)
    (2.0, -0.484, 4.484)
    >>> mean, (lo, hi) = mean_interval([0.0] * 12, bounds=(0.0, 1.0))
    >>> mean, lo, round(hi, 3)
    (0.0, 0.0, 0.265)
    """
    from statsmodels.stats.weightstats import DescrStatsW

    values = np.asarray(values, dtype=float)
    bad = int(np.sum(~np.isfinite(values)))
    if bad:
        raise ValueError(f"{bad} of {values.size} values are not finite; a mean's interval "
                         "needs every replicate counted.")
    if values.size < 2:
        raise ValueError("a mean's interval needs at least two finite values.")
    low, high = (float(v) for v in bounds)
    if np.any(values < low) or np.any(values > high):
        raise ValueError(f"values outside their bounds [{low:g}, {high:g}].")
    # what n equal draws at the mean allow (docstring): the mass a sample of n cannot
    # show may sit at a bound
    value, share = float(np.mean(values)), 1.0 - 0.025 ** (1.0 / values.size)
    floor_lo = value - share * (value - low) if math.isfinite(low) else -INF
    floor_hi = value + share * (high - value) if math.isfinite(high) else INF
    # no spread beyond round-off (a value one float step off, another BLAS): that
    # interval alone; the t interval would be as narrow as the round-off
    if np.ptp(values) <= 64 * np.finfo(float).eps * max(1.0, float(np.max(np.abs(values)))):
        return value, (float(floor_lo), float(floor_hi))
    lo, hi = DescrStatsW(values).tconfint_mean(alpha=0.05)
    if math.isfinite(low) and math.isfinite(high):
        # a nearly constant share (a few small values among zeros) got a t interval far
        # narrower than a constant one: never narrower than the latter. (Half-bounded,
        # the mass may sit at infinity, which no interval covers: the t interval.)
        lo, hi = min(lo, floor_lo), max(hi, floor_hi)
    # the mean lies within the bounds: a t interval's end beyond one says nothing more
    # (a review: [-0.04, 0.41] for a share; no verdict moves, a margin inside the
    # bounds is never crossed by the clip)
    return value, (float(max(lo, low)), float(min(hi, high)))


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


def is_blocking(row, scale=None):
    """Whether a report row makes the run fail: an error, or an unexplained failure.

    At ``scale="smoke"`` a theory check's failure does not block: the smoke grids test
    the wiring in seconds, at sizes where a theory verdict is not evidence (the copying
    study's six clients leave its per-module tests no power, and the recovery
    boundary's exponent from its few cells lies off the range documented at ``small``
    and ``full``: a review found every clean smoke run exiting 1 on these two). Errors
    and identity checks (facts of the code) block at every scale.
    """
    if row["verdict"] == "error":
        return True
    if scale == "smoke" and row.get("kind") == "theory":
        return False
    return row["verdict"] == "fail" and (
        not row.get("known_failure") or row.get("known_failure_mismatch", False))


def _as_float(value):
    return None if value is None else float(value)


def _checked_numbers(observed, interval):
    """``observed`` and ``interval`` as floats, refused (ValueError) where no verdict
    may be read off them: an interval that is not two numbers, one whose ends are
    inverted, or an observed value outside it or NaN beside a finite interval (a review:
    each of these passed). The ends may be infinite (a one-sided or unbounded
    interval); an observed value on an end up to round-off (a Wilson interval's upper
    end of 0.9999999999999999 beside a rate of 1) is on it."""
    if isinstance(interval, (str, bytes)) or len(interval) != 2:
        raise ValueError(f"the interval {interval!r} is not two numbers")
    lo, hi = (float(value) for value in interval)
    if math.isnan(lo) != math.isnan(hi) or lo > hi:
        raise ValueError(f"the interval [{lo}, {hi}] is not an interval")
    value = _as_float(observed)
    bounded = math.isfinite(lo) or math.isfinite(hi)
    if value is None or math.isnan(value):
        if bounded:
            raise ValueError(f"the observed value is {value} beside the interval "
                             f"[{lo}, {hi}]")
    elif not math.isnan(lo):
        slack = 1e-9 * max(1.0, abs(value))
        if not lo - slack <= value <= hi + slack:
            raise ValueError(f"the observed value {value} lies outside its interval "
                             f"[{lo}, {hi}]")
    return {"observed": value, "interval": [lo, hi]}


def run_check(check, df):
    """Apply ``check`` to its table and return one report row (a dict).

    The row carries ``kind``, ``margin`` and the ``verdict`` that :func:`decide` gives
    the function's interval. An empty table or an exception inside the check gives the
    verdict ``"error"``, with the message, rather than stopping the other checks.
    """
    row = {"name": check.name, "study": check.study, "claim": check.claim,
           "kind": check.kind, "margin": [float(v) for v in check.margin],
           "source": check.source, "known_failure": check.known_failure,
           "known_range": (None if check.known_range is None
                           else [float(v) for v in check.known_range])}
    if df is None or len(df) == 0:
        return {**row, "verdict": "error", "detail": "no results"}
    try:
        result = dict(check.function(df))
    except Exception as error:  # reported, and turned into a non-zero exit status
        return {**row, "verdict": "error", "detail": f"{type(error).__name__}: {error}"}
    missing = [key for key in _REQUIRED if key not in result]
    if missing:
        return {**row, "verdict": "error", "detail": f"malformed result, missing {missing}"}
    result.pop("verdict", None)
    try:  # a malformed interval is the check's error, not the run's (a review)
        result.update(_checked_numbers(result["observed"], result["interval"]))
        verdict = decide(result["interval"], check.margin, check.kind)
    except (TypeError, ValueError) as error:
        return {**row, **{key: value for key, value in result.items()
                          if key not in ("observed", "interval")},
                "verdict": "error", "detail": f"malformed result: {error}"}
    out = {**row, **result, "verdict": verdict}
    if check.known_failure and verdict != "fail":
        # The documented failure is not seen: contradicted (pass) or undecided here.
        out["stale_known_failure"] = True
    elif check.known_failure:
        low, high = check.known_range
        observed = result["observed"]
        # A failure of another size or direction is not the documented one.
        out["known_failure_mismatch"] = not (observed is not None and low <= observed <= high)
    return out

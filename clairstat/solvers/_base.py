"""The solver interface: a public ``solve`` that checks, a private ``_solve`` that works."""

from __future__ import annotations

import dataclasses
import math
import time
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from .._result import DecompositionResult, Problem
from .._validation import as_real_array

__all__ = ["Solver"]


class Solver:
    """Base class of the CLAIR solvers.

    Subclasses implement ``_solve(problem, init) -> DecompositionResult``. ``solve``
    validates the initial point, times the call and warns with scikit-learn's
    ``ConvergenceWarning`` when the stopping certificate was not met.

    ``solve`` hands ``_solve`` the problem in units of a power of two near its largest
    entry when that is more than 16 from 1 (:func:`_unit`; penalties ``alpha``,
    ``beta`` and the initial point alike; ``lam`` has no unit) and scales the answer
    back: both programs are homogeneous, so this is the same problem, and a power of
    two scales without rounding. The solvers then work on entries of size about 1
    whatever the data's units: a float32 solve of entries of 1e20 or 1e-30 (whose
    squares leave float32's range), the exact program's residual balancing (which
    compares a residual in the data's units with a dimensionless one) and the absolute
    tolerances of conic solvers would otherwise depend on them. With a free backbone it
    first takes the clients' mean out of the data and adds it back to ``Theta_0``
    (the same program: ``Theta_0`` absorbs any common level), so that a level large
    against the clients' spread neither enters the residuals' round-off nor the
    certificate's floor (``centres_level``; not for CVXPY, whose conic solvers were
    handed penalties 1e12 times the centred data of near-identical clients by the unit
    rescaling and returned a point 1e10 times worse than without it, a review).

    Parameters
    ----------
    max_iter : int
    tol : float
        Relative duality gap ``gap / objective`` at which to stop.
    """

    name = "base"
    #: Whether :meth:`solve` takes the clients' mean out first (free backbone only).
    centres_level = True

    def __init__(self, *, max_iter=2000, tol=1e-6):
        self.max_iter = max_iter
        self.tol = tol

    def solve(self, problem, init=None):
        """Solve ``problem`` (a :class:`~clairstat._result.Problem`).

        Parameters
        ----------
        problem : Problem
        init : DecompositionResult or dict with ``backbone``, ``low_rank``, ``sparse``, optional
            Warm start.

        Returns
        -------
        DecompositionResult
        """
        if not isinstance(problem, Problem):
            raise TypeError(f"problem must be a clairstat Problem, got {type(problem).__name__}.")
        # a bool is an int to Python: max_iter=True ran one iteration (a review)
        if not (isinstance(self.max_iter, (int, np.integer))
                and not isinstance(self.max_iter, bool) and self.max_iter >= 1):
            raise ValueError(f"max_iter must be a positive integer, got {self.max_iter!r}.")
        if not (np.isfinite(self.tol) and self.tol > 0):
            raise ValueError(f"tol must be a positive number, got {self.tol!r}.")
        init = self._check_init(problem, init)
        # With a free backbone the programs do not see a common level (Theta_0 takes it):
        # the solvers get the data less their client mean, and Theta_0 gets it back. A
        # level large against the clients' spread otherwise entered every residual's
        # round-off and the certificate's floor (a review: data offset by 1e7 stopped
        # with converged=True 91% above the optimum, the floor of the raw data being 13;
        # offset by 1e6, the exact program took 6 525 iterations instead of 25).
        data = problem.local_estimates
        # The level as the first client plus the mean difference from it: the same mean,
        # but identical clients get exactly 0 (their plain mean can round off by an ulp,
        # which the power-of-two unit below then scaled to 1, and the penalties with it
        # by 1e16: SCS answered 'unbounded_inaccurate', a review).
        level = (data[0] + (data - data[0]).mean(0)
                 if problem.backbone and self.centres_level else None)
        if level is not None:
            problem = dataclasses.replace(problem,
                                          local_estimates=problem.local_estimates - level)
            if init is not None:
                init = {**init, "backbone": init["backbone"] - level}
        scale = _unit(problem.local_estimates)
        start = time.perf_counter()
        result = self._solve(_scaled_problem(problem, scale),
                             None if init is None else {k: v / scale for k, v in init.items()})
        result = _rescaled(result, scale, 2 if problem.formulation == "penalized" else 1)
        if level is not None:
            result.backbone = result.backbone + level
            if problem.formulation == "exact":  # feasible for the data themselves
                result.sparse = data - result.backbone[None] - result.low_rank
        result.time = time.perf_counter() - start
        if not result.converged:
            warnings.warn(
                f"{self.name} solver stopped at iteration {result.n_iter} with relative "
                f"duality gap {result.relative_gap:.2e} > tol={self.tol:g} ({result.status}); "
                "increase max_iter or tol.", ConvergenceWarning, stacklevel=2)
        return result

    @staticmethod
    def _check_init(problem, init):
        if init is None:
            return None
        get = (lambda k: getattr(init, k)) if not isinstance(init, dict) else init.__getitem__
        n_clients, p, q = problem.shape
        parts = {"backbone": (p, q), "low_rank": (n_clients, p, q),
                 "sparse": (n_clients, p, q)}
        out = {}
        for key, shape in parts.items():
            value = np.asarray(as_real_array(get(key), f"init.{key}"), dtype=float)
            if value.shape != shape:
                raise ValueError(f"init.{key} has shape {value.shape}, expected {shape}.")
            out[key] = value
        return out

    def _certified(self, gap, primal, floor, eps, tol=None):
        """The stopping certificate: ``gap <= max(max(tol, 100 eps) primal, floor)``.

        ``tol`` defaults to ``self.tol`` (a continuation stage passes its own).
        ``eps`` is the working precision. The gap is the difference of two sums of
        the objective's size, each rounded at a few eps of it, so a relative gap below
        about 100 eps cannot be certified (in float32 the exact program's gap hovered
        at 7 to 30 eps of the objective, above ``tol = 1e-6``, for thousands of
        iterations; :func:`clairstat.aggregation.clair_modules` raises its float32
        default tolerance to the same 100 eps). ``floor`` is an absolute round-off
        floor (:meth:`TorchSolver._objective_floor`) for an objective near 0.
        """
        tol = self.tol if tol is None else tol
        threshold = max(max(tol, 100.0 * eps) * primal, floor, np.finfo(float).tiny)
        return bool(gap <= threshold)

    def _solve(self, problem, init):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}(max_iter={self.max_iter}, tol={self.tol})"


#: Data whose largest entry is within 2^UNIT_BAND of 1 are solved in their own units.
UNIT_BAND = 4


def _unit(blocks):
    """The power of two nearest the largest absolute entry, or 1 when that is within
    a factor ``2^UNIT_BAND = 16`` of 1 (and for all-zero data).

    Within the band the float32 squares are far from overflow and underflow, and the
    exact program's ALM took 25 to 75 iterations against 25 to 40 at the unit (three
    noiseless problems at scales 2^-4 to 2^4; it doubles per factor 4 beyond, 430 to
    1980 at 2^-14, 505 to 915 at 2^14); data in it are solved as given, which keeps the
    estimator's (in units of their largest entry) and the committed recovery tables'
    iterations.
    """
    largest = float(np.max(np.abs(blocks), initial=0.0))
    if not (np.isfinite(largest) and largest > 0):
        return 1.0
    exponent = min(round(math.log2(largest)), 1023)
    return 1.0 if abs(exponent) <= UNIT_BAND else math.ldexp(1.0, exponent)


def _scaled_problem(problem, scale):
    if scale == 1.0:
        return problem
    return dataclasses.replace(
        problem, local_estimates=problem.local_estimates / scale,
        alpha=None if problem.alpha is None else problem.alpha / scale,
        beta=None if problem.beta is None else problem.beta / scale)


def _rescaled(result, scale, power):
    """``result`` of the problem in units of ``scale`` back in the data's units
    (objective and gap are of degree ``power``: 2 penalized, 1 exact)."""
    if scale == 1.0:
        return result

    def value(v):  # one factor at a time: 0 stays 0, a value beyond float64 is inf
        with np.errstate(over="ignore"):
            for _ in range(power):
                v = float(np.float64(v) * scale)
        return v

    history = [{**h, "objective": value(h["objective"]), "gap": value(h["gap"])}
               for h in result.history]
    return dataclasses.replace(
        result, backbone=result.backbone * scale, low_rank=result.low_rank * scale,
        sparse=result.sparse * scale, objective=value(result.objective),
        dual_gap=value(result.dual_gap), history=history)

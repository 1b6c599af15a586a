"""The solver interface: a public ``solve`` that checks, a private ``_solve`` that works."""

from __future__ import annotations

import time
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from .._result import DecompositionResult, Problem

__all__ = ["Solver"]


class Solver:
    """Base class of the CLAIR solvers.

    Subclasses implement ``_solve(problem, init) -> DecompositionResult``. ``solve``
    validates the initial point, times the call and warns with scikit-learn's
    ``ConvergenceWarning`` when the stopping certificate was not met.

    Parameters
    ----------
    max_iter : int
    tol : float
        Relative duality gap ``gap / objective`` at which to stop.
    """

    name = "base"

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
        if not (isinstance(self.max_iter, (int, np.integer)) and self.max_iter >= 1):
            raise ValueError(f"max_iter must be a positive integer, got {self.max_iter!r}.")
        if not (np.isfinite(self.tol) and self.tol > 0):
            raise ValueError(f"tol must be a positive number, got {self.tol!r}.")
        init = self._check_init(problem, init)
        start = time.perf_counter()
        result = self._solve(problem, init)
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
            value = np.asarray(get(key), dtype=float)
            if value.shape != shape:
                raise ValueError(f"init.{key} has shape {value.shape}, expected {shape}.")
            out[key] = value
        return out

    def _solve(self, problem, init):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}(max_iter={self.max_iter}, tol={self.tol})"

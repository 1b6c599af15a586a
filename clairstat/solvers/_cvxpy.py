"""Reference CLAIR solver: the convex programs written in CVXPY."""

from __future__ import annotations

import warnings

import numpy as np

from .._objective import exact_gap, penalized_gap
from .._result import DecompositionResult
from ._base import Solver

__all__ = ["CVXPYSolver"]


def _import_cvxpy():
    try:
        import cvxpy
    except ImportError as exc:
        raise ImportError("solver='cvxpy' needs CVXPY: pip install 'clairstat[cvxpy]'"
                          ) from exc
    return cvxpy


class CVXPYSolver(Solver):
    """Solve the CLAIR programs with any conic solver CVXPY has installed.

    The duality gap reported is clairstat's own (:mod:`clairstat._objective`), computed at
    the returned point, so it is comparable with the torch solver's. ``converged`` is the
    conic solver's own verdict (status ``optimal``); an inaccurate status warns.

    Parameters
    ----------
    conic_solver : str, default="SCS"
        Any CVXPY solver name that handles SOC + SDP constraints (SCS, CLARABEL, MOSEK).
    max_iter : int, default=100000
        Passed to SCS as ``max_iters``.
    tol : float, default=1e-6
        Used for the certificate check of :class:`Solver` (``relative_gap``) only.
    **solver_options
        Passed to ``problem.solve`` (for SCS e.g. ``eps_abs=1e-9, eps_rel=1e-9``).
    """

    name = "cvxpy"

    def __init__(self, conic_solver="SCS", *, max_iter=100000, tol=1e-6, **solver_options):
        super().__init__(max_iter=max_iter, tol=tol)
        self.conic_solver = conic_solver
        self.solver_options = solver_options

    def _variables(self, cp, shape, backbone):
        n_clients, p, q = shape
        theta0 = cp.Variable((p, q)) if backbone else cp.Constant(np.zeros((p, q)))
        low_rank = cp.Variable((p, n_clients * q))
        sparse = [cp.Variable((p, q)) for _ in range(n_clients)]
        return theta0, low_rank, sparse

    def _solve(self, problem, init):
        cp = _import_cvxpy()
        X = problem.local_estimates
        n_clients, p, q = X.shape
        theta0, low_rank, sparse = self._variables(cp, X.shape, problem.backbone)
        stacked = np.concatenate(list(X), axis=1)
        fitted = cp.hstack([theta0 + low_rank[:, k * q:(k + 1) * q] + sparse[k]
                            for k in range(n_clients)])
        block_norm = sum(cp.norm(s, "fro") for s in sparse)
        constraints = []
        if problem.formulation == "penalized":
            cost = (0.5 * cp.sum_squares(stacked - fitted) + problem.alpha * cp.normNuc(low_rank)
                    + problem.beta * block_norm)
        else:
            cost = cp.normNuc(low_rank) + problem.lam * block_norm
            constraints = [fitted == stacked]
        program = cp.Problem(cp.Minimize(cost), constraints)
        options = dict(self.solver_options)
        if self.conic_solver.upper() == "SCS":
            options.setdefault("max_iters", self.max_iter)
        try:
            program.solve(solver=self.conic_solver, **options)
        except cp.error.SolverError as exc:
            raise RuntimeError(f"CVXPY solver {self.conic_solver} failed: {exc}") from exc
        return self._result(program, problem, theta0, low_rank, sparse, constraints)

    def _result(self, program, problem, theta0, low_rank, sparse, constraints):
        status = program.status
        if status not in ("optimal", "optimal_inaccurate"):
            raise RuntimeError(f"CVXPY returned status {status!r}; no solution to report.")
        if status == "optimal_inaccurate":
            warnings.warn(f"CVXPY/{self.conic_solver} returned 'optimal_inaccurate'; the "
                          "solution may be imprecise (tighten the solver's eps or iterations).",
                          UserWarning, stacklevel=3)
        X = problem.local_estimates
        n_clients, p, q = X.shape
        theta = np.asarray(theta0.value, dtype=float).reshape(p, q)
        L = np.asarray(low_rank.value).reshape(p, n_clients, q).transpose(1, 0, 2)
        S = np.stack([np.asarray(s.value, dtype=float) for s in sparse])
        if problem.formulation == "penalized":
            gap, value = penalized_gap(X, theta, L, S, alpha=problem.alpha, beta=problem.beta,
                                       fit_backbone=problem.backbone)
        else:
            gap, value, theta, S = self._exact_certificate(X, L, S, constraints, problem)
        stats = program.solver_stats
        return DecompositionResult(
            backbone=theta, low_rank=L, sparse=S, objective=value, dual_gap=gap,
            n_iter=int(stats.num_iters or 0), converged=status == "optimal",
            status=f"{self.conic_solver}: {status}", solver=self.name)

    @staticmethod
    def _exact_certificate(X, L, S, constraints, problem):
        n_clients, p, q = X.shape
        dual = np.asarray(constraints[0].dual_value, dtype=float).reshape(p, n_clients, q)
        dual = dual.transpose(1, 0, 2)
        # CVXPY's sign convention for equality duals depends on how the constraint is
        # written; the gap is valid for either sign, so keep the tighter one.
        candidates = [exact_gap(X, L, S, sign * dual, lam=problem.lam,
                                fit_backbone=problem.backbone) for sign in (1.0, -1.0)]
        return min(candidates, key=lambda c: c[0])

    def __repr__(self):
        return f"CVXPYSolver(conic_solver={self.conic_solver!r}, tol={self.tol})"

"""Reference CLAIR solver: the convex programs written in CVXPY."""

from __future__ import annotations

import os
import warnings

import numpy as np

from .._objective import exact_gap, penalized_gap
from .._result import DecompositionResult
from ._base import Solver

__all__ = ["CVXPYSolver"]

# The name under which each conic solver takes an iteration cap (CVXPY passes the
# keyword arguments of ``problem.solve`` through to the solver's settings).
_ITERATION_OPTION = {"SCS": "max_iters", "CLARABEL": "max_iter", "CVXOPT": "max_iters",
                     "ECOS": "max_iters"}
# First-order solvers: memory linear in the size of the cone program.
_FIRST_ORDER = {"SCS"}
# Bytes per entry of the dense m x m block an interior-point solver factorises for the
# PSD cone. The peak resident memory of a Clarabel solve grew by 53 to 64 bytes per
# entry for cone sides 60 to 120 (CVXPY 1.9.3, Clarabel 0.11.1:
# benchmarks/cvxpy_memory.py); 64 keeps the estimate an upper bound there.
_DENSE_BYTES = 64
# Bytes per scalar of the cone program (PSD triangle plus the K p q block entries) for
# the parts that grow linearly (data, iterates, sparse factorisations): SCS grew by 2.2
# to 3.2 KiB per scalar on the same problems; 4 KiB is an upper bound there.
_LINEAR_BYTES = 4096
# Solver statuses that come with a point (CVXPY's SOLUTION_PRESENT): only "optimal"
# counts as converged.
_WITH_SOLUTION = ("optimal", "optimal_inaccurate", "user_limit")


def _import_cvxpy():
    try:
        import cvxpy
    except ImportError as exc:
        raise ImportError("solver='cvxpy' needs CVXPY: pip install 'clairstat[cvxpy]'"
                          ) from exc
    return cvxpy


def available_memory():
    """Bytes of memory available to a new allocation, or None when unknown.

    ``psutil.virtual_memory().available`` when psutil is installed, else the free
    physical pages (``os.sysconf``; an underestimate, it leaves out reclaimable cache).
    """
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # not a POSIX system that reports it
        return None


class CVXPYSolver(Solver):
    """Solve the CLAIR programs with any conic solver CVXPY has installed.

    The duality gap reported is clairstat's own (:mod:`clairstat._objective`), computed at
    the returned point, so it is comparable with the torch solver's. ``converged`` needs
    both the conic solver's own verdict (status ``optimal``) and that certificate: the
    relative gap at most ``tol`` (:meth:`Solver._certified`), as for the torch solver; a
    conic solver that calls a point optimal under its own, absolute, tolerances may
    still be far from it (SCS's defaults left a relative gap of 3e-5, above the default
    ``tol = 1e-6``), and the status then says ``duality gap above tol``. When it stops
    short (iteration cap reached: SCS ``optimal_inaccurate``, Clarabel ``user_limit``)
    the point it stopped at is returned with ``converged=False``, the status, and a
    ``ConvergenceWarning``, as the torch solver does.

    Parameters
    ----------
    conic_solver : str, default="SCS"
        Any CVXPY solver name that handles SOC + SDP constraints (SCS, CLARABEL, MOSEK).
    max_iter : int, default=100000
        Iteration cap, passed as SCS ``max_iters``, Clarabel ``max_iter`` and CVXOPT
        ``max_iters`` (unless ``solver_options`` sets it). Other solvers get a warning:
        pass their own option in ``solver_options``.
    tol : float, default=1e-6
        Relative duality gap the returned point must certify to count as converged.
        SCS is also asked for ``eps_abs = eps_rel = max(tol / 10, 1e-9)`` (unless
        ``solver_options`` set them): on three problems of tests/test_solvers.py's
        sizes (K = 8 to 20) that left a relative gap below ``tol = 1e-6`` at no
        measurable cost, where SCS's defaults left 8e-6 to 3e-5.
    max_memory : float, optional
        Refuse, with a MemoryError, programs whose estimated memory
        (:meth:`memory_estimate`) exceeds this many bytes. Default: the memory available
        now (:func:`available_memory`); ``float("inf")`` disables the check.
    **solver_options
        Passed to ``problem.solve`` (for SCS e.g. ``eps_abs=1e-9, eps_rel=1e-9``).

    Notes
    -----
    Memory. CVXPY writes the nuclear norm of the p x (K q) matrix L as a PSD cone of side
    ``n = p + K q``, that is ``m = n (n + 1) / 2`` scalars. An interior-point solver
    (Clarabel, MOSEK, CVXOPT) factorises a dense m x m block for it, so the estimate is
    ``64 m^2 + 4096 (m + K p q)`` bytes; a first-order solver (SCS) needs only the
    linear part, ``4096 (m + K p q)``. The constants are upper bounds of the peak memory
    measured by ``benchmarks/cvxpy_memory.py``. On the demo's size (K = 40, p = 30,
    q = 8; n = 350) Clarabel would need about 225 GiB and is refused before anything
    is built, while SCS needs well under 1 GiB; ``solver="torch"`` needs a few arrays
    of size K p q.

    Examples
    --------
    >>> f"{CVXPYSolver('CLARABEL').memory_estimate((40, 30, 8)) / 2**30:.0f} GiB"
    '225 GiB'
    >>> f"{CVXPYSolver('SCS').memory_estimate((40, 30, 8)) / 2**30:.2f} GiB"
    '0.27 GiB'
    """

    name = "cvxpy"
    # The data as given (Solver.solve's centring off): centred near-identical clients
    # are round-off that the unit rescaling blows up, penalties with it (a review).
    centres_level = False

    def __init__(self, conic_solver="SCS", *, max_iter=100000, tol=1e-6, max_memory=None,
                 **solver_options):
        super().__init__(max_iter=max_iter, tol=tol)
        self.conic_solver = conic_solver
        self.max_memory = max_memory
        self.solver_options = solver_options

    def memory_estimate(self, shape):
        """Estimated peak memory, in bytes, of solving a CLAIR program of ``shape``.

        Parameters
        ----------
        shape : tuple of int
            ``(n_clients, p, q)``.

        Returns
        -------
        int
            ``4096 (m + K p q)``, plus ``64 m^2`` for an interior-point solver, with
            ``m = n (n + 1) / 2`` and ``n = p + K q`` (class Notes).
        """
        n_clients, p, q = (int(v) for v in shape)
        side = p + n_clients * q
        triangle = side * (side + 1) // 2
        linear = _LINEAR_BYTES * (triangle + n_clients * p * q)
        if self.conic_solver.upper() in _FIRST_ORDER:
            return linear
        return _DENSE_BYTES * triangle**2 + linear

    def _check_memory(self, shape):
        """MemoryError when the estimate exceeds ``max_memory`` (or the available memory)."""
        limit, source = self.max_memory, "max_memory cap"
        if limit is None:
            limit, source = available_memory(), "memory available"
        estimate = self.memory_estimate(shape)
        if limit is None or estimate <= limit:
            return
        n_clients, p, q = shape
        side = p + n_clients * q
        first_order = CVXPYSolver("SCS").memory_estimate(shape)
        raise MemoryError(
            f"CVXPYSolver({self.conic_solver!r}) on K={n_clients} clients, p={p}, q={q}: "
            f"the nuclear norm becomes a PSD cone of side p + K q = {side}, and the "
            f"program is estimated to need {estimate / 2**30:.3g} GiB, above the "
            f"{limit / 2**30:.3g} GiB {source}. Use solver='torch', or "
            f"CVXPYSolver('SCS') (first order, about {first_order / 2**30:.3g} GiB here).")

    def _options(self):
        """``problem.solve`` keyword arguments: the user's, plus the iteration cap."""
        options = dict(self.solver_options)
        key = _ITERATION_OPTION.get(self.conic_solver.upper())
        if key is None:
            warnings.warn(f"CVXPYSolver does not know how to pass max_iter to "
                          f"{self.conic_solver}; set its iteration option in solver_options.",
                          UserWarning, stacklevel=4)
        else:
            options.setdefault(key, int(self.max_iter))
        return options

    def _default_tolerances(self):
        """SCS's tolerances from ``tol`` (class docstring); other solvers' defaults."""
        if self.conic_solver.upper() != "SCS":
            return {}
        eps = max(0.1 * float(self.tol), 1e-9)
        return {"eps_abs": eps, "eps_rel": eps}

    def _variables(self, cp, shape, backbone):
        n_clients, p, q = shape
        theta0 = cp.Variable((p, q)) if backbone else cp.Constant(np.zeros((p, q)))
        low_rank = cp.Variable((p, n_clients * q))
        sparse = [cp.Variable((p, q)) for _ in range(n_clients)]
        return theta0, low_rank, sparse

    def _solve(self, problem, init):
        X = problem.local_estimates
        self._check_memory(X.shape)  # before CVXPY builds anything
        cp = _import_cvxpy()
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
        try:
            with warnings.catch_warnings():
                # CVXPY's own "inaccurate" warning: Solver.solve reports the same as a
                # ConvergenceWarning with the status and the duality gap.
                warnings.filterwarnings("ignore", message="Solution may be inaccurate")
                program.solve(solver=self.conic_solver,
                              **{**self._default_tolerances(), **self._options()})
        except cp.error.SolverError as exc:
            # (SCS stopped at max_iter=2 leaves no status at all: say the cap, a review)
            raise RuntimeError(f"CVXPY solver {self.conic_solver} failed (max_iter="
                               f"{self.max_iter}; a cap of a few iterations can leave it "
                               f"no status: raise max_iter): {exc}") from exc
        return self._result(program, problem, theta0, low_rank, sparse, constraints)

    def _result(self, program, problem, theta0, low_rank, sparse, constraints):
        status = program.status
        if status not in _WITH_SOLUTION or low_rank.value is None:
            raise RuntimeError(f"CVXPY/{self.conic_solver} returned status {status!r} "
                               f"(max_iter={self.max_iter}); no solution to report.")
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
        n_iter = int(program.solver_stats.num_iters or 0)
        detail = " (max_iter reached)" if status != "optimal" and n_iter >= self.max_iter else ""
        # the gap is evaluated in float64: its round-off floor as the torch solver's. The
        # penalized objective's round-off is that of the residuals (eps |X| per entry)
        # times their size, which a free backbone bounds by the data less their common
        # level: ||X||^2 took the level's square for it (the data are not centred here,
        # centres_level), and data at a common level of 1e7 stopped with converged=True
        # 57% above the optimum, 1e9 at 4 000 times it (a review).
        eps = float(np.finfo(float).eps)
        norm = float(np.linalg.norm(X))
        if problem.formulation == "penalized":
            spread = (float(np.linalg.norm(X - (X[0] + (X - X[0]).mean(0))))
                      if problem.backbone else norm)
            floor = np.sqrt(max(p, n_clients * q)) * eps * norm * spread
        else:
            floor = np.sqrt(max(p, n_clients * q)) * eps * norm
        certified = self._certified(gap, value, floor, eps)
        if status == "optimal" and not certified:
            detail = " (duality gap above tol)"
        return DecompositionResult(
            backbone=theta, low_rank=L, sparse=S, objective=value, dual_gap=gap,
            n_iter=n_iter, converged=status == "optimal" and certified,
            status=f"{self.conic_solver}: {status}{detail}", solver=self.name)

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
        return (f"CVXPYSolver(conic_solver={self.conic_solver!r}, max_iter={self.max_iter}, "
                f"tol={self.tol})")

"""First-order CLAIR solver in PyTorch (CPU or CUDA through ``device``).

Penalized program
    Accelerated proximal gradient (FISTA with gradient-based adaptive restart) on ``L``
    alone: ``(Theta_0, S)`` are minimized out exactly for the current ``L``. For fixed L
    that partial minimization is a Huber-type location problem in Theta_0 (solved by
    IRLS, no SVD) followed by block soft-thresholding, and the value function
    ``g(L) = min_{Theta_0, S} 1/2 ||M - Theta_0 - L - S||^2 + beta sum ||S_k||`` is a
    Moreau envelope: its gradient ``-R`` (minus the residual) is 1-Lipschitz, so the step
    is 1 and each iteration costs one singular value thresholding of the stacked matrix.
Exact program
    Inexact augmented Lagrangian (the RPCA scheme of Lin, Chen and Ma, 2010) with the same
    partial minimization for ``(Theta_0, S)``.
Both stop when the relative duality gap of :mod:`clairstat._objective` drops below ``tol``.
"""

from __future__ import annotations

import math

import numpy as np

from .._objective import _op_norm, exact_gap, penalized_gap, stack_blocks, unstack_blocks
from .._prox import block_soft_threshold_torch, svt_torch
from .._result import DecompositionResult
from .._validation import check_device
from ._base import Solver

__all__ = ["TorchSolver"]


def _import_torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - exercised only without torch
        raise ImportError("solver='torch' needs PyTorch: pip install 'clairstat[torch]'"
                          ) from exc
    return torch


class TorchSolver(Solver):
    """First-order solver for both CLAIR programs.

    Parameters
    ----------
    max_iter : int, default=2000
    tol : float, default=1e-6
        Relative duality gap at which to stop; at least ``100 eps`` of the dtype
        (1.2e-5 in float32, which cannot certify less: :meth:`Solver._certified`). The
        solver also stops at an absolute gap below the dtype's round-off floor
        (:meth:`_objective_floor`, ``sqrt(n) eps ||M||^2``), which in float32 can be
        far above ``tol`` times a small objective (a review: a relative gap of 5e-3 on
        an objective of 66, the true suboptimality 9e-8): ``converged`` then means "as
        certified as the dtype allows", and the gap is the bound to use.
    device : str, torch.device or None, default="cpu"
        ``None`` is the CPU (:func:`clairstat._validation.check_device`).
    dtype : {"float64", "float32"}, default="float64"
    svd_method : {"auto", "svd", "gram"}, default="auto"
        How singular value thresholding is computed (see :func:`clairstat._prox.svt_torch`).
    check_every : int, default=5
        Iterations between duality-gap evaluations (each costs about one SVD).
    """

    name = "torch"

    def __init__(self, *, max_iter=2000, tol=1e-6, device="cpu", dtype="float64",
                 svd_method="auto", check_every=5):
        super().__init__(max_iter=max_iter, tol=tol)
        self.device = device
        self.dtype = dtype
        self.svd_method = svd_method
        self.check_every = check_every

    # -- helpers -----------------------------------------------------------------
    def _tensor(self, array):
        torch = _import_torch()
        if self.dtype not in ("float64", "float32"):
            raise ValueError(f"dtype must be 'float64' or 'float32', got {self.dtype!r}.")
        check_device(self.device)
        device = torch.device("cpu" if self.device is None else self.device)
        return torch.as_tensor(np.asarray(array), dtype=getattr(torch, self.dtype),
                               device=device)

    def _objective_floor(self, X, power):
        """The certificate's absolute floor: the dtype's round-off of the objective's
        natural size, ``sqrt(n) eps ||X||_F^power`` (power 2: the penalized objective,
        half a squared residual; 1: the exact one, a sum of norms), n the long side of
        the stacked p x (n_clients q) matrix. An iterate is computed to the backward
        error of its SVT, about ``sqrt(n) eps ||M||`` (rounding accumulated over
        n-long inner products), which bounds how well its objective can be certified.
        Where the optimum is 0 (``alpha = 0``, or identical clients), objective and gap
        are both round-off, and their ratio never falls below ``tol``; in float32 a LoRA
        module's gap stalls above ``tol = 100 eps`` times the objective (100 rank-16
        clients on a 4096-wide module, a 1600 x 1600 stack: not converged after 400
        iterations and 370 s without the factor sqrt(n), 15 iterations and 27 s with it;
        tests/test_lora_torch.py keeps a 768 x 768 case). A gap under this floor is as small as the data's own rounding can
        certify, so the solver stops at ``gap <= max(max(tol, 100 eps) * primal, floor)``
        (:meth:`Solver._certified`; in float64 the floor matters only for an objective
        below ``sqrt(n) eps / tol`` of ``||X||^power``, 1e-8 at the default tol and
        n = 1600)."""
        torch = _import_torch()
        eps = float(torch.finfo(X.dtype).eps)
        n_long = max(X.shape[1], X.shape[0] * X.shape[2]) if X.ndim == 3 else max(X.shape)
        return math.sqrt(n_long) * eps * float(torch.linalg.vector_norm(X)) ** power

    @staticmethod
    def _eps(X):
        torch = _import_torch()
        return float(torch.finfo(X.dtype).eps)

    def _inner_tol(self):
        # IRLS stops when Theta_0 moves less than this (relative); a few ulps above the
        # dtype's resolution so the outer certificate is not limited by it.
        return 1e-13 if self.dtype == "float64" else 1e-6

    def _partial_min(self, Z, theta0, threshold, backbone):
        """argmin over (Theta_0, S) of 1/2 sum ||Z_k - Theta_0 - S_k||^2 + t sum ||S_k||."""
        torch = _import_torch()
        if not backbone:
            return torch.zeros_like(Z[0]), block_soft_threshold_torch(Z, threshold)
        if threshold <= 0:  # S absorbs everything; any Theta_0 is optimal
            theta0 = Z.mean(0)
            return theta0, Z - theta0
        scale = float(torch.linalg.vector_norm(Z)) / math.sqrt(Z.shape[0]) + 1e-300
        for _ in range(200):  # IRLS for the Huber location problem; monotone
            norms = torch.linalg.vector_norm(Z - theta0, dim=(1, 2))
            weights = torch.where(norms > threshold, threshold / torch.clamp(norms, min=1e-300),
                                  torch.ones_like(norms))
            new = (weights[:, None, None] * Z).sum(0) / weights.sum()
            moved = float(torch.linalg.vector_norm(new - theta0))
            theta0 = new
            if moved <= self._inner_tol() * scale:
                break
        return theta0, block_soft_threshold_torch(Z - theta0, threshold)

    def _svt(self, blocks, threshold, *, certify=True):
        """Singular value thresholding of the stacked blocks: (low rank, its nuclear norm).

        ``certify=False`` tells a subclass whose spectrum is iterative that the step's
        point will not be certified (no duality gap is evaluated at it), so the step may
        skip checks that only the certified point needs; the dense SVD here is exact
        either way.
        """
        low_rank, sing = svt_torch(stack_blocks(blocks), threshold, method=self.svd_method)
        return unstack_blocks(low_rank, blocks.shape[0]), float(sing.sum())

    def _op_norm(self, matrix):
        """Operator norm of a stacked matrix (a subclass may use another routine)."""
        return _op_norm(matrix)

    def _init(self, X, init, backbone):
        torch = _import_torch()
        if init is None:
            zeros = torch.zeros_like(X)
            theta0 = X.mean(0) if backbone else torch.zeros_like(X[0])
            return theta0, zeros, zeros.clone()
        return (self._tensor(init["backbone"]), self._tensor(init["low_rank"]),
                self._tensor(init["sparse"]))

    @staticmethod
    def _numpy(*tensors):
        return [t.detach().cpu().numpy().astype(float) for t in tensors]

    def _should_check(self, iteration):
        return iteration <= 2 or iteration % self.check_every == 0 or iteration == self.max_iter

    # -- solvers -----------------------------------------------------------------
    def _solve(self, problem, init):
        X = self._tensor(problem.local_estimates)
        if problem.formulation == "penalized":
            return self._penalized(X, problem, init)
        return self._exact(X, problem, init)

    def _penalized(self, X, problem, init):
        """FISTA on L, with continuation when the penalties are far below the data scale.

        With alpha << ||M||_op the first-order method crawls (L and S compete for nearly
        free); solving a short sequence of problems with penalties 10^s times larger, each
        warm-started from the last and solved loosely (relative gap 1e-3), is 5-25x
        faster on such cases and leaves the default regime (alpha near the noise level,
        ||M||_op / alpha well below 100) untouched.
        """
        torch = _import_torch()
        state = self._init(X, init, problem.backbone)
        op_norm = self._op_norm(stack_blocks(X))
        # ratio 0: all-zero data, nothing to continue from; alpha = 0: no penalty to
        # scale down from (and no division by it)
        ratio = op_norm / problem.alpha if problem.alpha > 0 else 0.0
        n_stages = int(np.clip(np.floor(np.log10(ratio)) - 1, 0, 6)) \
            if init is None and ratio > 0 else 0
        floor = self._objective_floor(X, 2)
        history, n_svd, total = [], 1, 0  # the operator norm above is one factorization
        for stage in range(n_stages, -1, -1):
            factor, last = 10.0 ** stage, stage == 0
            state, info = self._fista(X, problem.alpha * factor, problem.beta * factor,
                                      problem.backbone, state,
                                      tol=self.tol if last else max(self.tol, 1e-3),
                                      max_iter=self.max_iter - total, floor=floor)
            total += info["n_iter"]
            n_svd += info["n_svd"]
            history += [{**h, "iteration": h["iteration"] + total - info["n_iter"],
                         "penalty_factor": factor} for h in info["history"]]
            if total >= self.max_iter:
                break
        if not last:
            # max_iter ran out in an earlier stage, whose objective and gap are those of
            # larger penalties: report the point's objective and gap in the program asked
            # for (S and Theta_0 re-minimised at its beta; one full spectrum of L)
            theta0, L, S = state
            theta0, S = self._partial_min(X - L, theta0, problem.beta, problem.backbone)
            state = (theta0, L, S)
            gap, primal = penalized_gap(X, theta0, L, S, alpha=problem.alpha,
                                        beta=problem.beta, fit_backbone=problem.backbone,
                                        op_norm=self._op_norm)
            n_svd += 2
            history.append({"iteration": total, "objective": primal, "gap": gap,
                            "penalty_factor": 1.0})
        theta0, L, S = self._numpy(*state)
        converged = info["converged"] and last
        if X.dtype != torch.float64:
            # The gap evaluated on the data rounded to float32 is clipped at 0 and came
            # out exactly 0 at points 3.5e-8 above the optimum (4 of 40 random problems,
            # a review): the returned point's objective and gap, in float64, on the data
            # themselves (as the exact program's; float64's operator norm for the dual).
            gap, primal = penalized_gap(problem.local_estimates, theta0, L, S,
                                        alpha=problem.alpha, beta=problem.beta,
                                        fit_backbone=problem.backbone)
            history[-1] = {**history[-1], "objective": primal, "gap": gap}
        converged, status = self._recertified(converged, history[-1]["gap"],
                                              history[-1]["objective"], floor, X)
        return DecompositionResult(
            backbone=theta0, low_rank=L, sparse=S, objective=history[-1]["objective"],
            dual_gap=history[-1]["gap"], n_iter=total, converged=converged,
            status=status, solver=self.name, history=history, n_svd=n_svd)

    def _fista(self, X, alpha, beta, backbone, state, *, tol, max_iter, floor=0.0):
        torch = _import_torch()
        theta0, L, S = state
        momentum_point, t_k = L.clone(), 1.0
        history, n_svd, converged = [], 0, False
        for it in range(1, max_iter + 1):
            # Gradient of the envelope at the extrapolated point: minus the residual.
            theta0, S = self._partial_min(X - momentum_point, theta0, beta, backbone)
            step_point = X - theta0 - S  # = momentum_point + residual
            # the duality gap is evaluated at this iteration's point, or not at all
            check = self._should_check(it) or it == max_iter
            L_new, nuclear = self._svt(step_point, alpha, certify=check)
            n_svd += 1
            # Adaptive restart (O'Donoghue and Candes, 2015): drop momentum when it points
            # against the proximal step.
            step = L_new - L  # formed once: the restart test and the momentum use it
            if float(((momentum_point - L_new) * step).sum()) > 0:
                t_k, momentum_point = 1.0, L_new
            else:
                t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t_k * t_k))
                momentum_point = torch.add(L_new, step, alpha=(t_k - 1.0) / t_next)
                t_k = t_next
            L = L_new
            if not check:
                continue
            theta0, S = self._partial_min(X - L, theta0, beta, backbone)
            gap, primal = penalized_gap(X, theta0, L, S, alpha=alpha, beta=beta,
                                        fit_backbone=backbone, nuclear_norm=nuclear,
                                        op_norm=self._op_norm)
            n_svd += 1
            history.append({"iteration": it, "objective": primal, "gap": gap})
            if self._certified(gap, primal, floor, self._eps(X), tol=tol):
                converged = True
                break
        return (theta0, L, S), {"n_iter": it, "n_svd": n_svd, "history": history,
                                "converged": converged}

    def _exact(self, X, problem, init):
        torch = _import_torch()
        lam, backbone = problem.lam, problem.backbone
        theta0, L, S = self._init(X, init, backbone)
        op_norm = float(torch.linalg.matrix_norm(stack_blocks(X), ord=2))
        block_max = float(torch.linalg.vector_norm(X, dim=(1, 2)).max())
        # Standard IALM start: a dual-feasible multiplier and mu = 1.25 / ||M||_op. mu is
        # then adapted by residual balancing (Boyd et al., 2011, section 3.4.1) rather than
        # grown geometrically: a geometric mu hits any cap within tens of iterations, after
        # which the iterates freeze short of the optimum.
        # (all-zero data: the guards are the working dtype's smallest normal number; in
        # float32 float64's tiny rounds to 0, and 0 / 0 made the iterates NaN)
        tiny = float(torch.finfo(X.dtype).tiny)
        multiplier = X / max(op_norm, block_max / lam, tiny)
        mu = 1.25 / max(op_norm, tiny)
        history, n_svd, converged, gap = [], 1, False, math.inf  # counting ||M||_op
        floor = self._objective_floor(X, 1)
        for it in range(1, self.max_iter + 1):
            L, _ = self._svt(X - theta0 - S + multiplier / mu, 1.0 / mu)
            n_svd += 1
            previous = theta0[None] + S
            theta0, S = self._partial_min(X - L + multiplier / mu, theta0, lam / mu, backbone)
            primal_resid = X - theta0 - L - S
            multiplier = multiplier + mu * primal_resid
            r_primal = float(torch.linalg.vector_norm(primal_resid))
            r_dual = mu * float(torch.linalg.vector_norm(theta0[None] + S - previous))
            if r_primal > 10.0 * r_dual:
                mu *= 2.0
            elif r_dual > 10.0 * r_primal:
                mu /= 2.0
            if not self._should_check(it):
                continue
            gap, primal, feas_theta0, feas_S = exact_gap(X, L, S, multiplier, lam=lam,
                                                         fit_backbone=backbone)
            n_svd += 2
            history.append({"iteration": it, "objective": primal, "gap": gap})
            if self._certified(gap, primal, floor, self._eps(X)):
                converged = True
                break
        theta0, L, S = self._numpy(feas_theta0, L, feas_S)
        if X.dtype != torch.float64:
            # The point was made feasible for the data rounded to the working dtype;
            # make it feasible for the data themselves (as exact_gap does, in float64),
            # or Theta_hat - Theta_0 - L - S is float32's rounding of the data, which a
            # caller reading the residual as noise (CLAIREstimator's whitening) takes
            # for the noise.
            # The objective and gap are then those of that point, in float64 (the last
            # multiplier's dual bound): the float32 evaluation described a point that is
            # not returned, and once fell short of its suboptimality by float32's
            # rounding (a review: 7.106e-4 against a gap of 7.04e-4).
            gap, primal, theta0, S = exact_gap(
                problem.local_estimates, L, S,
                multiplier.detach().to("cpu", torch.float64).numpy(), lam=lam,
                fit_backbone=backbone)
            history[-1] = {**history[-1], "objective": primal, "gap": gap}
        converged, status = self._recertified(converged, gap, primal, floor, X)
        return DecompositionResult(
            backbone=theta0, low_rank=L, sparse=S, objective=history[-1]["objective"],
            dual_gap=gap, n_iter=it, converged=converged, status=status, solver=self.name,
            history=history, n_svd=n_svd)

    def _recertified(self, converged, gap, primal, floor, X):
        """``(converged, status)`` once a float32 solve's gap is evaluated in float64.

        The flag of the working dtype's check stood after the float64 evaluation had
        broken the stopping rule (a review: relative gap 1.25e-5 > 100 eps of float32,
        converged=True, no warning); the same rule, at the working dtype's eps and
        floor, is applied to the gap reported.
        """
        torch = _import_torch()
        if X.dtype != torch.float64 and converged and not self._certified(
                gap, primal, floor, self._eps(X)):
            return False, "converged in the working dtype; float64 gap above tol"
        return converged, "converged" if converged else "max_iter reached"

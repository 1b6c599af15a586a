"""The functional core: ``clair_decompose``."""

from __future__ import annotations

from numpy.typing import ArrayLike

from ._result import DecompositionResult, Problem
from ._threads import thread_limits
from ._tuning import default_penalties, estimate_noise_scale, floor_noise_scale
from ._validation import check_local_estimates, check_noise_scale, check_penalty
from .solvers import Solver, resolve_solver

__all__ = ["clair_decompose"]


def clair_decompose(local_estimates: ArrayLike, *, alpha: float | str = "auto",
                    beta: float | str = "auto", lam: float | str = "auto",
                    formulation: str = "penalized", backbone: bool = True,
                    solver: str | Solver = "auto", noise_scale: float | ArrayLike | None = None,
                    max_iter: int = 2000, tol: float = 1e-6, device: str = "cpu",
                    dtype: str = "float64",
                    init: DecompositionResult | dict | None = None,
                    n_jobs: int | None = None) -> DecompositionResult:
    """Decompose stacked client estimates into backbone + low rank + block sparse.

    Parameters
    ----------
    local_estimates : array-like of shape (n_clients, p, q), list of (p, q) arrays, or (n_clients, p)
        The clients' preliminary estimates Theta_hat_k.
    alpha, beta : float or "auto", default="auto"
        Penalties of the penalized program (see Notes); "auto" uses
        :func:`clairstat._tuning.default_penalties` with the noise scale.
    lam : float or "auto", default="auto"
        Block weight of the exact program.
    formulation : {"penalized", "exact"}, default="penalized"
    backbone : bool, default=True
        Estimate a free common Theta_0 (``False`` fixes Theta_0 = 0).
    solver : {"auto", "torch", "cvxpy"} or Solver, default="auto"
        See :func:`clairstat.solvers.resolve_solver`.
    noise_scale : float, ndarray of shape (n_clients,) or None
        Per-entry noise standard deviation of the estimates; estimated robustly
        (:func:`clairstat._tuning.estimate_noise_scale`) when ``None`` and needed.
    max_iter, tol, device, dtype
        Passed to the solver (``tol`` is the relative duality gap).
    init : DecompositionResult or dict, optional
        Warm start.
    n_jobs : int or None, default=None
        Threads of torch and of the BLAS/OpenMP pools during the solve
        (:func:`clairstat._threads.thread_limits`): ``None`` chooses from the problem size
        (one thread for small problems and in a process run under ``nice``, or the count of
        an enclosing ``thread_limits``),
        ``-1`` uses every usable CPU, a positive int that many.

    Returns
    -------
    DecompositionResult
        With ``alpha``, ``beta``, ``lam`` and ``noise_scale`` filled in.

    Notes
    -----
    Penalized program (M = [Theta_hat_1, ..., Theta_hat_K], L and S stacked alike)::

        min 1/2 sum_k ||Theta_hat_k - Theta_0 - L_k - S_k||_F^2
            + alpha ||L||_* + beta sum_k ||S_k||_F

    Exact program::

        min ||L||_* + lam sum_k ||S_k||_F   s.t.  Theta_hat_k = Theta_0 + L_k + S_k.

    Both solvers stop on the same duality gap (:mod:`clairstat._objective`).

    Examples
    --------
    >>> from clairstat.datasets import make_low_rank_block_sparse
    >>> data = make_low_rank_block_sparse(20, 10, 3, 2, 3, noise_level=0.1, random_state=0)
    >>> result = clair_decompose(data.local_estimates, solver="torch")
    >>> result.converged, result.relative_gap <= 1e-6
    (True, True)
    """
    blocks, _ = check_local_estimates(local_estimates)
    alpha, beta, lam = (check_penalty(n, v) for n, v in
                        (("alpha", alpha), ("beta", beta), ("lam", lam)))
    sigma = check_noise_scale(noise_scale, blocks.shape[0])
    needs_sigma = formulation == "penalized" and "auto" in (alpha, beta)
    engine = resolve_solver(solver, max_iter=max_iter, tol=tol, device=device, dtype=dtype)
    with thread_limits(n_jobs, blocks.shape):  # the noise estimate's SVDs and the solve
        if sigma is None and needs_sigma:
            sigma = floor_noise_scale(estimate_noise_scale(blocks), blocks)
        auto = default_penalties(blocks.shape, sigma if sigma is not None else 1.0)
        alpha = auto["alpha"] if alpha == "auto" else alpha
        beta = auto["beta"] if beta == "auto" else beta
        lam = auto["lam"] if lam == "auto" else lam
        problem = Problem(blocks, formulation=formulation, alpha=alpha, beta=beta, lam=lam,
                          backbone=bool(backbone))
        result = engine.solve(problem, init=init)
    result.alpha, result.beta, result.lam = alpha, beta, lam
    result.noise_scale = None if sigma is None else float(
        (sigma ** 2).mean() ** 0.5 if hasattr(sigma, "__len__") else sigma)
    return result

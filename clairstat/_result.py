"""One result object for every solver backend."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["DecompositionResult", "Problem"]


@dataclass(frozen=True)
class Problem:
    """A CLAIR decomposition problem, checked once and handed to any solver.

    Attributes
    ----------
    local_estimates : ndarray of shape (n_clients, p, q)
    formulation : {"penalized", "exact"}
    alpha, beta : float or None
        Penalties of the penalized program.
    lam : float or None
        Block-penalty weight of the exact program.
    backbone : bool
        Whether Theta_0 is free (``False`` fixes it to 0).
    """

    local_estimates: np.ndarray
    formulation: str = "penalized"
    alpha: float | None = None
    beta: float | None = None
    lam: float | None = None
    backbone: bool = True

    def __post_init__(self) -> None:
        X = self.local_estimates
        if not isinstance(X, np.ndarray) or X.ndim != 3:
            raise ValueError("local_estimates must be an ndarray of shape (n_clients, p, q).")
        if X.shape[0] < 2:
            raise ValueError(f"CLAIR needs at least 2 clients, got {X.shape[0]}.")
        if self.formulation == "penalized":
            self._check_penalty("alpha", self.alpha)
            self._check_penalty("beta", self.beta)
        elif self.formulation == "exact":
            self._check_penalty("lam", self.lam)
            if self.lam == 0:  # the torch solver divided by it (a review)
                raise ValueError("lam must be positive: with lam = 0 the sparse blocks "
                                 "cost nothing, so L = 0 and S_k = Theta_hat_k - Theta_0 "
                                 "is optimal for any data.")
        else:
            raise ValueError(f"formulation must be 'penalized' or 'exact', got "
                             f"{self.formulation!r}.")

    @staticmethod
    def _check_penalty(name: str, value: float | None) -> None:
        if value is None or not np.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite non-negative number, got {value!r}.")

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(n_clients, p, q)``."""
        return self.local_estimates.shape


@dataclass
class DecompositionResult:
    """What every solver returns.

    Attributes
    ----------
    backbone : ndarray of shape (p, q)
    low_rank, sparse : ndarray of shape (n_clients, p, q)
    objective : float
        Penalized objective (or ``||L||_* + lam sum ||S_k||_F`` for the exact program).
    dual_gap : float
        Absolute duality gap at the returned point (same formula for every backend).
    n_iter : int
    converged : bool
        Whether the solver's stopping certificate was met.
    status : str
    solver : str
    time : float
        Wall-clock seconds of the solve.
    history : list of dict
        Per check: iteration, objective, gap.
    n_svd : int
        Number of singular value decompositions (or Gram eigen-decompositions) of the
        stacked matrix the solve used (0 for conic solvers, which do not report it).
    alpha, beta, lam, noise_scale : float or None
        The penalties used and the noise scale they were derived from (set by
        :func:`clairstat.clair_decompose`).
    """

    backbone: np.ndarray
    low_rank: np.ndarray
    sparse: np.ndarray
    objective: float
    dual_gap: float
    n_iter: int
    converged: bool
    status: str
    solver: str
    time: float = 0.0
    history: list[dict] = field(default_factory=list)
    n_svd: int = 0
    alpha: float | None = None
    beta: float | None = None
    lam: float | None = None
    noise_scale: float | None = None

    @property
    def relative_gap(self) -> float:
        """``dual_gap / max(objective, tiny)``."""
        return float(self.dual_gap / max(abs(self.objective), np.finfo(float).tiny))

"""Synthetic data from the model of the method (section 1).

For a collaborative client k (not contaminated)::

    Theta_k = Theta_0 + U* W_k,          Theta_hat_k = Theta_k + E_k

and a contaminated client leaves the shared structure by an off-subspace block of
Frobenius norm ``separation``:  Theta_k = Theta_0 + U* W_k + D_k with (I - P*) D_k = D_k.
"""

from __future__ import annotations

from typing import Union

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.utils import Bunch, check_random_state

__all__ = ["make_low_rank_block_sparse", "make_federated_regression", "random_subspace"]

#: What ``random_state`` accepts (scikit-learn's convention).
RandomStateLike = Union[int, np.random.RandomState, None]


def random_subspace(p: int, rank: int, random_state: RandomStateLike = None) -> NDArray:
    """Haar-random orthonormal basis of shape (p, rank).

    Examples
    --------
    >>> U = random_subspace(5, 2, random_state=0)
    >>> bool(np.allclose(U.T @ U, np.eye(2)))
    True
    """
    rng = check_random_state(random_state)
    if not 0 <= rank <= p:
        raise ValueError(f"rank must lie in [0, p={p}], got {rank}.")
    q_factor, r_factor = np.linalg.qr(rng.standard_normal((p, rank)))
    # Fix the signs so the distribution is Haar (QR alone is not).
    return q_factor * np.sign(np.diag(r_factor))


def _check_sizes(n_clients: int, p: int, q: int, rank: int, n_contaminated: int,
                 noise_level: float) -> None:
    if noise_level < 0:
        raise ValueError(f"noise_level must be non-negative, got {noise_level}.")
    if n_clients < 2:
        raise ValueError(f"n_clients must be at least 2, got {n_clients}.")
    if min(p, q) < 1:
        raise ValueError(f"p and q must be positive, got p={p}, q={q}.")
    if not 0 <= rank <= p:
        raise ValueError(f"rank must lie in [0, p={p}], got {rank}.")
    if not 0 <= n_contaminated < n_clients:
        raise ValueError(
            f"n_contaminated must lie in [0, n_clients), got {n_contaminated} of {n_clients}."
        )


def _true_parameters(rng, n_clients, p, q, rank, n_contaminated, *, backbone,
                     coefficient_scale, separation, noise_level):
    """Draw Theta_0, U*, W_k, the contaminated set and the true Theta_k (a Bunch)."""
    subspace = random_subspace(p, rank, rng)
    theta0 = rng.standard_normal((p, q)) if backbone else np.zeros((p, q))
    coefficients = coefficient_scale * rng.standard_normal((n_clients, rank, q))
    truth = theta0 + np.einsum("pr,krq->kpq", subspace, coefficients)
    contaminated = np.zeros(n_clients, dtype=bool)
    contaminated[rng.choice(n_clients, size=n_contaminated, replace=False)] = True
    if separation is None:
        # Default: as far off the subspace as a typical benign signal is inside it.
        separation = coefficient_scale * np.sqrt(max(rank, 1) * q)
    for k in np.flatnonzero(contaminated):
        shift = rng.standard_normal((p, q))
        shift -= subspace @ (subspace.T @ shift)  # leave the shared subspace
        norm = np.linalg.norm(shift)
        if norm > 0:
            truth[k] += separation * shift / norm
    return Bunch(truth=truth, subspace=subspace, backbone=theta0, coefficients=coefficients,
                 contaminated=contaminated, collaborative_set=np.flatnonzero(~contaminated),
                 noise_level=noise_level, separation=float(separation))


def make_low_rank_block_sparse(n_clients: int = 40, p: int = 30, q: int = 8, rank: int = 3,
                               n_contaminated: int = 8, *, noise_level: float = 0.0,
                               backbone: bool = True, coefficient_scale: float = 1.0,
                               separation: float | None = None,
                               random_state: RandomStateLike = None) -> Bunch:
    """Stacked client estimates: low rank plus block-sparse, with optional noise.

    Parameters
    ----------
    n_clients, p, q, rank, n_contaminated : int
        K clients of p x q estimates; U* has ``rank`` columns; ``n_contaminated`` clients
        leave the shared structure.
    noise_level : float, default=0.0
        Standard deviation of the i.i.d. Gaussian entries of E_k (0: noiseless).
    backbone : bool, default=True
        Draw a common Theta_0 (standard Gaussian); ``False`` sets Theta_0 = 0.
    coefficient_scale : float, default=1.0
        Standard deviation of the entries of W_k.
    separation : float or None
        ``||(I - P*)(Theta_k - Theta_0)||_F`` of every contaminated client; ``None`` uses
        ``coefficient_scale * sqrt(rank * q)``.
    random_state : int, RandomState instance or None

    Returns
    -------
    data : Bunch
        ``local_estimates`` (n_clients, p, q), ``truth`` (n_clients, p, q),
        ``subspace`` (p, rank), ``backbone`` (p, q), ``coefficients`` (n_clients, rank, q),
        ``contaminated`` bool (n_clients,), ``collaborative_set`` indices,
        ``noise_level``, ``separation``.

    Examples
    --------
    >>> data = make_low_rank_block_sparse(10, 6, 2, 1, 2, random_state=0)
    >>> data.local_estimates.shape, int(data.contaminated.sum())
    ((10, 6, 2), 2)
    """
    _check_sizes(n_clients, p, q, rank, n_contaminated, noise_level)
    rng = check_random_state(random_state)
    model = _true_parameters(rng, n_clients, p, q, rank, n_contaminated, backbone=backbone,
                             coefficient_scale=coefficient_scale, separation=separation,
                             noise_level=noise_level)
    noise = noise_level * rng.standard_normal(model.truth.shape)
    return Bunch(**model, local_estimates=model.truth + noise)


def make_federated_regression(n_clients: int = 40, p: int = 30, q: int = 8, rank: int = 3,
                              n_samples: int | ArrayLike = 200, n_contaminated: int = 8, *,
                              noise_level: float = 1.0, backbone: bool = True,
                              coefficient_scale: float = 1.0,
                              separation: float | None = None,
                              random_state: RandomStateLike = None) -> Bunch:
    """Federated multivariate regression with per-client OLS estimates.

    Client k draws an isotropic Gaussian design X_k (n_k x p), responses
    ``Y_k = X_k Theta_k + noise`` with i.i.d. N(0, noise_level^2) entries, and its local
    estimate is the OLS fit ``(X_k^T X_k)^{-1} X_k^T Y_k``.

    Parameters
    ----------
    n_samples : int or array-like of shape (n_clients,)
        Sample size of every client (each must exceed p + 1, for the OLS noise's
        ``n_k - p - 1``).
    noise_level : float, default=1.0
        Response noise standard deviation sigma.
    n_clients, p, q, rank, n_contaminated, backbone, coefficient_scale, separation, random_state
        As in :func:`make_low_rank_block_sparse`.

    Returns
    -------
    data : Bunch
        Everything :func:`make_low_rank_block_sparse` returns (``local_estimates`` are the
        OLS estimates), plus ``designs`` and ``responses`` (lists), ``n_samples``
        (n_clients,), and ``estimate_noise_scale`` (n_clients,): the expected per-entry
        standard deviation of E_k, ``sigma / sqrt(n_k - p - 1)``.

    Examples
    --------
    >>> data = make_federated_regression(5, 4, 2, 1, 50, 1, random_state=0)
    >>> data.local_estimates.shape, data.designs[0].shape
    ((5, 4, 2), (50, 4))
    """
    _check_sizes(n_clients, p, q, rank, n_contaminated, noise_level)
    n_samples = np.broadcast_to(np.asarray(n_samples, dtype=int), (n_clients,)).copy()
    if np.any(n_samples <= p + 1):
        raise ValueError(f"every client needs more than p + 1 = {p + 1} samples for OLS; "
                         f"got min n_samples = {n_samples.min()}.")
    rng = check_random_state(random_state)
    model = _true_parameters(rng, n_clients, p, q, rank, n_contaminated, backbone=backbone,
                             coefficient_scale=coefficient_scale, separation=separation,
                             noise_level=noise_level)
    designs, responses, estimates = [], [], np.empty_like(model.truth)
    for k in range(n_clients):
        X = rng.standard_normal((n_samples[k], p))
        Y = X @ model.truth[k] + noise_level * rng.standard_normal((n_samples[k], q))
        estimates[k] = np.linalg.lstsq(X, Y, rcond=None)[0]
        designs.append(X)
        responses.append(Y)
    return Bunch(**model, local_estimates=estimates, designs=designs, responses=responses,
                 n_samples=n_samples,
                 estimate_noise_scale=noise_level / np.sqrt(n_samples - p - 1.0))

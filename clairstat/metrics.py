"""Metrics for subspace recovery, detection and estimation."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["subspace_distance", "detection_scores", "estimation_errors"]


def _projector(basis: ArrayLike) -> NDArray:
    basis = np.asarray(basis, dtype=float)
    if basis.ndim != 2:
        raise ValueError(f"a subspace basis must be 2-D (p, rank), got shape {basis.shape}.")
    q_factor, _ = np.linalg.qr(basis) if basis.shape[1] else (basis, None)
    return q_factor @ q_factor.T


def subspace_distance(estimated: ArrayLike, true: ArrayLike) -> float:
    """Frobenius distance ``||P_hat - P*||_F`` between the projectors onto two subspaces.

    Parameters
    ----------
    estimated, true : ndarray of shape (p, r_hat) and (p, r)
        Bases (orthonormalised here, so any basis works); the ranks may differ.

    Examples
    --------
    >>> e = np.eye(3)
    >>> float(subspace_distance(e[:, :1], e[:, :1]))
    0.0
    >>> round(float(subspace_distance(e[:, :1], e[:, 1:2])), 6)
    1.414214
    """
    estimated, true = np.asarray(estimated), np.asarray(true)
    if estimated.shape[0] != true.shape[0]:
        raise ValueError(f"bases live in different spaces: {estimated.shape} vs {true.shape}.")
    return float(np.linalg.norm(_projector(estimated) - _projector(true)))


def detection_scores(flagged: ArrayLike, contaminated: ArrayLike) -> dict[str, float | bool]:
    """Precision, recall, false-positive rate and exact recovery of the contaminated set.

    Precision is 1 when nothing is flagged; recall is 1 when nothing is contaminated
    (no error of that kind was possible).

    Examples
    --------
    >>> detection_scores([True, False, False], [True, True, False])["recall"]
    0.5
    """
    flagged = np.asarray(flagged, dtype=bool)
    contaminated = np.asarray(contaminated, dtype=bool)
    if flagged.shape != contaminated.shape:
        raise ValueError(f"shapes differ: {flagged.shape} vs {contaminated.shape}.")
    true_pos = int(np.sum(flagged & contaminated))
    n_flagged, n_bad = int(flagged.sum()), int(contaminated.sum())
    n_good = flagged.size - n_bad
    return {
        "precision": true_pos / n_flagged if n_flagged else 1.0,
        "recall": true_pos / n_bad if n_bad else 1.0,
        "false_positive_rate": (n_flagged - true_pos) / n_good if n_good else 0.0,
        "exact": bool(np.array_equal(flagged, contaminated)),
    }


def estimation_errors(estimates: ArrayLike, truth: ArrayLike) -> NDArray:
    """Per-client squared Frobenius errors ``||Theta_tilde_k - Theta_k||_F^2``.

    Parameters
    ----------
    estimates, truth : ndarray of shape (n_clients, p, q)

    Returns
    -------
    errors : ndarray of shape (n_clients,)
    """
    estimates, truth = np.asarray(estimates), np.asarray(truth)
    if estimates.shape != truth.shape:
        raise ValueError(f"shapes differ: {estimates.shape} vs {truth.shape}.")
    diff = (estimates - truth).reshape(len(truth), -1)
    return np.einsum("ij,ij->i", diff, diff)

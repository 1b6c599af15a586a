"""Input checks shared by the functional core and the estimator."""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.utils import check_array

__all__ = ["check_local_estimates", "check_sample_weight", "check_noise_scale"]


def _as_blocks(local_estimates, dtype):
    if isinstance(local_estimates, (list, tuple)):
        if len(local_estimates) == 0:
            raise ValueError("local_estimates is empty: CLAIR needs at least 2 clients.")
        shapes = [np.shape(block) for block in local_estimates]
        if any(len(s) != 2 for s in shapes):
            bad = next(k for k, s in enumerate(shapes) if len(s) != 2)
            raise ValueError(f"client {bad}'s estimate has shape {shapes[bad]}; every "
                             "client must give a 2-D (p, q) array.")
        if len(set(shapes)) > 1:
            bad = next(k for k, s in enumerate(shapes) if s != shapes[0])
            raise ValueError(f"ragged estimates: client 0 has shape {shapes[0]} but client "
                             f"{bad} has {shapes[bad]}; all clients must share (p, q).")
    try:
        array = np.asarray(local_estimates)
    except ValueError as exc:  # numpy refuses some ragged nestings outright
        raise ValueError(f"local_estimates could not be read as an array: {exc}") from exc
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number)
                                     or array.dtype == bool):
        raise ValueError(f"local_estimates must be numeric, got dtype {array.dtype}.")
    return array.astype(dtype, copy=True)


def check_local_estimates(local_estimates, *, dtype=np.float64, min_clients=2):
    """Read client estimates into an ndarray of shape (n_clients, p, q).

    Accepts an array (n_clients, p, q), a list of (p, q) arrays, or a 2-D array
    (n_clients, p) read as q = 1.

    Returns
    -------
    blocks : ndarray of shape (n_clients, p, q)
    was_2d : bool
    """
    if hasattr(local_estimates, "ndim") and local_estimates.ndim == 2 or (
            not isinstance(local_estimates, (list, tuple))
            and np.ndim(local_estimates) == 2):
        array = check_array(local_estimates, dtype=dtype, ensure_min_samples=1,
                            ensure_all_finite=False)
        blocks, was_2d = array[:, :, None].copy(), True
    else:
        blocks, was_2d = _as_blocks(local_estimates, dtype), False
        if blocks.ndim != 3:
            raise ValueError(f"local_estimates must have shape (n_clients, p, q) or "
                             f"(n_clients, p); got an array of dimension {blocks.ndim}.")
    if min(blocks.shape[1:], default=0) < 1:
        raise ValueError(f"client estimates are empty: shape (p, q) = {blocks.shape[1:]}.")
    if blocks.shape[0] < min_clients:
        raise ValueError(f"CLAIR needs at least {min_clients} clients, got "
                         f"{blocks.shape[0]} sample (client)"
                         f"{'s' if blocks.shape[0] != 1 else ''}.")
    bad = ~np.isfinite(blocks).reshape(len(blocks), -1).all(axis=1)
    if bad.any():
        raise ValueError(f"local estimates contain NaN or infinite entries (clients "
                         f"{np.flatnonzero(bad).tolist()}); remove or repair those clients.")
    return blocks, was_2d


def check_sample_weight(sample_weight, n_clients):
    """Per-client non-negative weights (sample sizes) with a positive total."""
    if sample_weight is None:
        return np.ones(n_clients)
    weights = np.asarray(sample_weight, dtype=float).reshape(-1)
    if weights.shape != (n_clients,):
        raise ValueError(f"sample_weight must have one entry per client ({n_clients}), "
                         f"got shape {np.shape(sample_weight)}.")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError("sample_weight must be finite, non-negative and not all zero.")
    return weights


def check_noise_scale(noise_scale, n_clients):
    """``None``, a positive scalar, or one positive scale per client."""
    if noise_scale is None:
        return None
    scale = np.asarray(noise_scale, dtype=float)
    if scale.ndim == 0:
        scale = np.full(n_clients, float(scale))
    if scale.shape != (n_clients,) or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        raise ValueError("noise_scale must be a positive number or one positive number per "
                         f"client ({n_clients}); got {noise_scale!r}.")
    return scale


def check_penalty(name, value, *, allow_auto=True):
    """A non-negative finite number, or "auto"."""
    if allow_auto and isinstance(value, str) and value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be 'auto' or a non-negative number, got {value!r}.")
    return float(value)

"""Input checks shared by the functional core and the estimator."""

from __future__ import annotations

import os
import sys

import numbers
from collections.abc import Mapping
import warnings

import numpy as np
import scipy.sparse
from sklearn.utils import check_array

__all__ = ["as_real_array", "check_local_estimates", "check_noise_cov", "check_noise_scale",
           "check_sample_weight", "data_scale", "check_device"]


def _refuse_masked(values, name):
    """Refuse masked entries of a numpy masked array (or of a list of them, one per
    client): ``np.asarray`` drops the mask and the hidden values, whatever they are,
    would be used as data (a review: a masked entry holding 1e6 flagged its client)."""
    if isinstance(values, (list, tuple)):
        bad = [k for k, block in enumerate(values)
               if np.ma.isMaskedArray(block) and np.ma.getmaskarray(block).any()]
        if not bad:
            return
    elif np.ma.isMaskedArray(values) and np.ma.getmaskarray(values).any():
        mask = np.ma.getmaskarray(values)  # estimates: clients along the first axis
        bad = (np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1)).tolist()
               if "estimates" in name and mask.ndim > 1 else None)
    else:
        return
    where = f" (clients {bad})" if bad is not None else ""
    raise ValueError(f"{name} contain{'' if name.endswith('s') else 's'} missing values "
                     f"(masked entries){where}: drop or impute them first.")


def refuse_mapping(local_estimates):
    """A TypeError for per-client estimates given as a mapping (sklearn's check_array
    said "float() argument must be ... not 'dict'", a review)."""
    # scipy's DOK sparse arrays are dicts: they get the sparse input's own message
    if isinstance(local_estimates, Mapping) and not scipy.sparse.issparse(local_estimates):
        raise TypeError("local_estimates is a mapping: pass its values, "
                        "list(estimates.values()) (local_ols takes per-client mappings "
                        "and keeps their keys as client names).")


def _is_frame(block):
    return hasattr(block, "index") and hasattr(block, "columns") and hasattr(block, "loc")


def _is_series(block):
    return (hasattr(block, "index") and hasattr(block, "loc") and not hasattr(block, "columns")
            and getattr(block, "ndim", 0) == 1)


def aligned_frames(blocks, labels=None):
    """Per-client labelled estimates read by their labels: ``(arrays, labels, moved)``.

    Data frames (statsmodels' ``params`` of a multi-output fit, (p, q)) and pandas
    Series (one output's ``params``, (p,)) are realigned to ``labels`` (``(row labels,
    column labels)``, the column labels ``None`` for Series; default the first table's),
    a client with other labels refused (a review: a site whose design had its columns
    in another order was read by position and flagged at p = 0; a swap of two similar
    coefficients would have put it in the mean). Given ``labels`` (a fit's), every
    table's rows are matched to them whatever its kind: a one-column frame where the
    fit had Series, a Series where it had one-column frames. ``moved`` says whether any
    client was reordered (its covariance, if given as arrays, would then be read in
    another order than its estimate). Blocks that are not labelled come back as they
    are, with ``labels`` ``None``.
    """
    frames, series = list(map(_is_frame, blocks)), list(map(_is_series, blocks))
    if not any(frames) and not any(series):
        return blocks, None, False
    kind = frames if any(frames) else series
    if not all(kind):
        bad = kind.index(False)
        what = "data frame" if any(frames) else "pandas Series"
        raise ValueError(f"client {bad}'s estimate is not a {what} while others are: give "
                         "every client's coefficients labelled alike or none labelled.")
    if labels is None:
        first = blocks[0]
        labels = (list(first.index), None if kind is series else list(first.columns))
    index, columns = labels
    out, moved = [], False
    for k, table in enumerate(blocks):
        rows = list(table.index)
        cols = list(table.columns) if kind is frames else None
        if len(set(rows)) != len(rows) or (cols is not None and len(set(cols)) != len(cols)):
            raise ValueError(f"client {k}'s estimate repeats a row or column label.")
        # a one-column frame against Series labels (or a Series against one-column
        # frames' labels): its single column is the single output, whatever its name
        single = cols is None or columns is None
        if set(rows) != set(index) or (not single and set(cols) != set(columns)) or (
                single and cols is not None and len(cols) != 1) or (
                single and columns is not None and len(columns) != 1):
            shown = rows if cols is None else f"{rows} x {cols}"
            want = index if columns is None else f"{index} x {columns}"
            raise ValueError(f"client {k}'s estimate is labelled {shown}, the fitted "
                             f"clients' {want}: every client must estimate the same "
                             "coefficients of the same outputs.")
        moved = moved or rows != list(index) or (not single and cols != list(columns))
        if cols is None:
            values = table.loc[index].to_numpy()
            out.append(values if columns is None else values[:, None])
        else:
            values = table.loc[index, cols if single else columns].to_numpy()
            out.append(values[:, 0] if columns is None else values)
    return out, (list(index), None if columns is None else list(columns)), moved


def _as_blocks(local_estimates, dtype):
    if isinstance(local_estimates, (list, tuple)):
        if len(local_estimates) == 0:
            raise ValueError("local_estimates is empty: no clients were given.")
        local_estimates = aligned_frames(list(local_estimates))[0]
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
    _refuse_non_real(array, "local_estimates", "Complex data not supported: local_estimates "
                     "are complex; CLAIR works on real estimates.")
    return array.astype(dtype, copy=True)


def _refuse_non_real(array, name, complex_message):
    """A ValueError for a complex array (``complex_message``) or one that is not numbers
    (text, objects); booleans pass."""
    if np.iscomplexobj(array):
        raise ValueError(complex_message)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number)
                                     or array.dtype == bool):
        raise ValueError(f"{name} must be numeric, got dtype {array.dtype}.")


def check_local_estimates(local_estimates, *, dtype=np.float64, min_clients=2):
    """Read client estimates into an ndarray of shape (n_clients, p, q).

    Accepts an array (n_clients, p, q), a list of (p, q) arrays, or a 2-D array
    (n_clients, p) read as q = 1; torch tensors (or lists of them) as
    :func:`as_real_array` reads them (any float dtype, bf16 included, with or without
    ``requires_grad``, on any device with data).

    Returns
    -------
    blocks : ndarray of shape (n_clients, p, q)
    was_2d : bool
    """
    refuse_mapping(local_estimates)
    if hasattr(local_estimates, "index") and getattr(local_estimates, "ndim", 0) == 1 \
            and getattr(local_estimates, "dtype", None) == object:
        local_estimates = list(local_estimates)  # a pandas Series of per-client tables
    if _is_tensor(local_estimates) or (isinstance(local_estimates, (list, tuple))
                                       and any(map(_is_tensor, local_estimates))):
        local_estimates = as_real_array(local_estimates, "local_estimates")
    _refuse_masked(local_estimates, "local estimates")
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
        raise ValueError(f"CLAIR needs at least {min_clients} client"
                         f"{'s' if min_clients != 1 else ''}, got "
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
    # complex weights refused as complex estimates are (they were cast with a warning,
    # the imaginary part dropped), text and objects refused rather than parsed, and the
    # shape (n_clients,) or a scalar (equal weights, as scikit-learn reads one) exactly:
    # a (2, 5) array was flattened into ten clients' weights (a review)
    if _is_tensor(sample_weight) and sample_weight.is_complex():
        raw = np.zeros(0, dtype=complex)
    elif _is_tensor(sample_weight):
        raw = as_real_array(sample_weight, "sample_weight")
    else:
        _refuse_masked(sample_weight, "sample_weight")
        raw = np.asarray(sample_weight)
    _refuse_non_real(raw, "sample_weight", "sample_weight is complex; weights are real, "
                     "non-negative numbers (sample sizes).")
    if raw.ndim == 0:
        raw = np.full(n_clients, raw)
    if raw.shape != (n_clients,):
        raise ValueError(f"sample_weight must have one entry per client ({n_clients}), "
                         f"got shape {np.shape(sample_weight)}.")
    weights = raw.astype(float)
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("sample_weight must be finite and non-negative.")
    if np.sum(weights > 0) < 2:
        raise ValueError("sample_weight must give non-zero weight to at least two clients: "
                         "the collaborative mean and every client's comparison need them.")
    # Only ratios matter: dividing by the largest keeps a claim of 1e308 from overflowing.
    weights = weights / weights.max()
    # A zero weight is the limit of a vanishing one: the client adds nothing to a mean
    # that has weighted members (1e-200 of an entry of at most 1 after the fit's
    # rescaling), and a set with no weighted member (the weighted clients flagged, or a
    # weighted client's leave-one-out comparison) is averaged equally instead of
    # dividing by zero.
    return np.maximum(weights, VANISHING_WEIGHT)


VANISHING_WEIGHT = 1e-200


def check_noise_scale(noise_scale, n_clients):
    """``None``, a positive scalar, or one positive scale per client."""
    if noise_scale is None:
        return None
    _refuse_masked(noise_scale, "noise_scale")  # np.asarray would read the hidden values
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


def check_device(device):
    """A torch device the fits can run on: ``None`` or ``"cpu"`` (numpy's and torch's
    CPU, without importing torch), or a parseable ``"cuda"`` / ``"cuda:N"`` that this
    torch build sees.

    Raises
    ------
    ValueError
        A string torch cannot parse (torch's own ``RuntimeError`` said only which device
        types exist), a device type other than cpu or cuda, or CUDA without a CUDA
        device.
    """
    if device is None or (isinstance(device, str) and device == "cpu"):
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as error:
        raise ValueError(f"device={device!r}: not a torch device ({error}).") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: the fits run on cpu or cuda.")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: this torch build sees no CUDA device; use "
                         "device='cpu'.")


def _is_tensor(values):
    return hasattr(values, "detach") and hasattr(values, "cpu")


def as_real_array(values, name):
    """Torch tensors (any float dtype, on any device, with or without grad) and
    array-likes as real numpy data; complex input is refused, not truncated."""
    if _is_tensor(values):  # a torch tensor
        if getattr(values, "is_meta", False):
            raise ValueError(f"{name} is a tensor on the meta device: it has a shape but "
                             "no values to fit.")
        values = values.detach().cpu()
        if values.is_complex():
            raise ValueError(f"Complex data not supported: {name} is {values.dtype}; pass "
                             "the real and imaginary parts as separate outputs if that is "
                             "what they are.")
        values = values.double().numpy()
    elif isinstance(values, (list, tuple)) and any(map(_is_tensor, values)):
        values = [as_real_array(v, name) for v in values]
    _refuse_masked(values, name)
    if isinstance(values, (list, tuple)) or scipy.sparse.issparse(values):
        return values  # lists are read client by client; sparse input is refused later
    array = np.asarray(values) if not hasattr(values, "iloc") else values
    if np.iscomplexobj(array):
        raise ValueError(f"Complex data not supported: {name} is "
                         f"{np.asarray(array).dtype}; pass the real and imaginary parts as "
                         "separate outputs if that is what they are.")
    return array


def data_scale(blocks):
    """The largest absolute entry (1 for all-zero data): the unit the fit works in.

    Dividing by it keeps every square and product of the fit inside float64's range
    (entries of 1e154 would overflow a squared norm) and makes the fit scale-equivariant.
    """
    scale = float(np.max(np.abs(blocks), initial=0.0))
    return scale if scale > 0 else 1.0


def _cov_factor(matrix, n_clients, size, name):
    matrix = np.asarray(as_real_array(matrix, name), dtype=float)
    if matrix.shape == (size, size):
        matrix = np.broadcast_to(matrix, (n_clients, size, size))
    if matrix.shape != (n_clients, size, size):
        raise ValueError(f"{name} must have shape ({size}, {size}) or ({n_clients}, {size}, "
                         f"{size}); got {matrix.shape}.")
    if not np.all(np.isfinite(matrix)):
        raise ValueError(f"{name} contains NaN or infinite entries.")
    # Each client's matrix against its own largest entry: clients' noise can differ by
    # many orders of magnitude (a large site among small ones), and a check against the
    # largest entry over all clients let a precise client's indefinite matrix through.
    size_ = np.maximum(np.abs(matrix).max(axis=(1, 2), initial=0.0), np.finfo(float).tiny)
    asym = np.abs(matrix - matrix.transpose(0, 2, 1)).max(axis=(1, 2), initial=0.0) / size_
    # symmetric up to round-off of the products that made it
    bad = np.flatnonzero(asym > 1e-8)
    if bad.size:
        raise ValueError(f"{name} is not symmetric for clients {bad.tolist()} (largest "
                         f"asymmetry {asym[bad].max():.3g} of the largest entry).")
    matrix = 0.5 * (matrix + matrix.transpose(0, 2, 1))
    low = np.linalg.eigvalsh(matrix).min(axis=1)
    bad = np.flatnonzero(low < -1e-8 * size_)
    if bad.size:
        raise ValueError(f"{name} is not positive semi-definite for clients "
                         f"{bad.tolist()} (smallest eigenvalue {low[bad[0]]:.3g}).")
    diagonal = np.diagonal(matrix, axis1=1, axis2=2)
    bad = np.flatnonzero(np.any(diagonal <= 0, axis=1))
    if bad.size:
        raise ValueError(f"{name} gives a zero variance for clients {bad.tolist()}: every "
                         "coefficient and output needs a positive noise variance.")
    # Singular to working precision: no noise along some combination of coefficients or
    # outputs, which the test's null then takes as exact. Judged on the correlation
    # matrix (coefficients in very different units are not singular) at the round-off
    # of its eigenvalues: an ill-conditioned but full-rank design's covariance (a
    # quadratic trend in calendar years: smallest correlation eigenvalue 5e-12, a
    # review) is not warned about.
    root = np.sqrt(diagonal)
    corr = matrix / root[:, :, None] / root[:, None, :]
    bad = np.flatnonzero(np.linalg.eigvalsh(corr).min(axis=1)
                         <= 10 * size * np.finfo(float).eps)
    if bad.size:
        warnings.warn(f"{name} is singular for clients {bad.tolist()}: it gives no noise "
                      "along some combination of coefficients or outputs, and their tests "
                      "take that combination as exact: such a client is flagged if its "
                      "estimate varies along it, unless the rank rule keeps that "
                      "direction as a shared one (it has no noise there; give rank= to "
                      "test it). Check the covariance.",
                      UserWarning, stacklevel=4)
    return matrix


def check_noise_cov(noise_cov, n_clients, p, q, *, transpose=False):
    """``(row_cov, col_cov)`` as arrays (n_clients, p, p) and (n_clients, q, q).

    ``p, q`` are the working orientation's; with ``transpose`` (a shared row space) the
    user's covariance of ``vec Theta_k`` is that of the transposes with the factors
    swapped.
    """
    if not isinstance(noise_cov, (tuple, list)) or len(noise_cov) != 2:
        raise ValueError("noise_cov must be a pair (row_cov, col_cov) with cov(vec Theta_k) "
                         "= col_cov_k (x) row_cov_k.")
    row, col = noise_cov[::-1] if transpose else noise_cov
    return (_cov_factor(row, n_clients, p, "noise_cov[0] (row_cov)" if not transpose
                        else "noise_cov[1] (col_cov)"),
            _cov_factor(col, n_clients, q, "noise_cov[1] (col_cov)" if not transpose
                        else "noise_cov[0] (row_cov)"))


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def user_stacklevel():
    """The ``stacklevel`` of ``warnings.warn``, called by the function that calls this,
    that points at the first frame outside the package: a public method reached through
    others (``predict`` -> ``decision_function`` -> ``score_samples``) warns at the
    user's line, not at the package's (a review)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
            _PACKAGE_DIR + os.sep):
        frame, level = frame.f_back, level + 1
    return level

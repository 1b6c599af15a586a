"""Per-client least squares: the statistician's entry point from per-client data."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse
from numpy.typing import ArrayLike

__all__ = ["LocalOLS", "local_ols"]

# Below this many residual degrees of freedom the residual covariance is too rough to be
# taken as the noise's (a review measured 20% of null fits flagging at 6 df, 10% at 14).
_MIN_RESIDUAL_DF = 20


# local_ols's covariances: the classical one and White's four (statsmodels' names)
_COV_TYPES = {"nonrobust", "HC0", "HC1", "HC2", "HC3"}


@dataclass(frozen=True, eq=False)
class LocalOLS:
    """Per-client OLS estimates with their noise covariance.

    Indexing selects clients (``ols[3]``, ``ols[[0, 2]]``, ``ols[mask]``, with every
    field cut alike), and ``len(ols)`` and ``ols.shape`` are those of ``estimates``:
    scikit-learn's model selection (``GridSearchCV``, ``cross_val_score``) splits a
    LocalOLS into folds of clients as it splits an array; it needs a ``scoring=`` of
    your own, since :class:`~clairstat.CLAIREstimator` has no ``score`` method (its
    notes on model selection say why).

    Attributes
    ----------
    estimates : ndarray of shape (n_clients, p, q)
        ``(X_k^T X_k)^{-1} X_k^T Y_k``.
    noise_cov : tuple of ndarray of shapes (n_clients, p, p) and (n_clients, q, q)
        ``(row_cov, col_cov)`` with ``cov(vec Theta_hat_k) = col_cov_k (x) row_cov_k``:
        ``row_cov_k = (X_k^T X_k)^{-1}`` (with ``cov_type`` other than
        ``"nonrobust"``, the sandwich of :func:`local_ols`) and ``col_cov_k`` the residual covariance
        ``R_k^T R_k / (n_k - p)`` (unbiased under homoscedastic Gaussian errors; an
        output with no residual variance beyond round-off has exactly zero, which
        :class:`~clairstat.CLAIREstimator` refuses).
    n_samples : ndarray of shape (n_clients,)
    residual_df : ndarray of shape (n_clients,)
        ``n_k - p``.
    feature_names, output_names : list of str
        Column names of the first client's design and response (from DataFrames, or
        patsy design matrices), or ``x0, x1, ...`` and ``y0, y1, ...``.
    generated_names : tuple of (bool, bool) or None
        Whether ``feature_names`` and ``output_names`` were made up by :func:`local_ols`
        (arrays without column labels): a fitted estimator matches new clients' columns
        by name only where both sides have names of their own (a data frame's columns
        named ``x0, x1, ...`` are names like any other). ``None`` (a LocalOLS built by
        hand, or pickled by a version without this field): names ``x0, x1, ...`` and
        ``y0, y1, ...`` count as generated.
    client_names : list of str or None
        The clients' names when :func:`local_ols` was given mappings (their keys, as
        strings, in the mappings' order); ``None`` for sequences. A fit on this
        LocalOLS keeps them as ``client_names_`` and labels its summary's rows with them.
    cov_type : str
        How ``row_cov`` was estimated: ``"nonrobust"`` (the classical
        ``(X_k^T X_k)^{-1}``) or a heteroscedasticity-consistent sandwich, ``"HC0"`` to
        ``"HC3"`` (:func:`local_ols`).
    """

    estimates: np.ndarray
    noise_cov: tuple
    n_samples: np.ndarray
    residual_df: np.ndarray
    feature_names: list = field(default_factory=list)
    output_names: list = field(default_factory=list)
    generated_names: tuple | None = None
    client_names: list | None = None
    cov_type: str = "nonrobust"

    def __post_init__(self):
        if self.cov_type not in _COV_TYPES:
            raise ValueError(f"cov_type must be one of {sorted(_COV_TYPES)}, got "
                             f"{self.cov_type!r}.")
        self._check_shapes()
        names = self.client_names
        if names is None:
            return
        names = [name for name in names]
        if not all(isinstance(name, str) for name in names):
            raise TypeError("client_names must be strings (local_ols makes them from the "
                            "mapping's keys).")
        if len(names) != len(self.estimates):
            raise ValueError(f"{len(names)} client_names for {len(self.estimates)} clients.")
        if len(set(names)) != len(names):
            raise ValueError("client_names must tell the clients apart; "
                             f"{sorted({n for n in names if names.count(n) > 1})} repeat.")
        object.__setattr__(self, "client_names", names)

    def _check_shapes(self):
        """Every field's shape against ``estimates``' (n_clients, p, q), as arrays (a
        review: a list of estimates fitted but could not be indexed, shared (p, p) and
        (q, q) covariances failed inside the fit with numpy's AxisError, and feature
        names of the wrong length reached the summary). Shared covariances, as
        ``fit(noise_cov=...)`` takes them, are given to every client; ``noise_cov=None``
        is kept (a fit then says to pass the estimates alone)."""
        estimates = np.asarray(self.estimates)
        if estimates.ndim != 3:
            raise ValueError("a LocalOLS's estimates have shape (n_clients, p, q), got "
                             f"{estimates.shape}.")
        n_clients, p, q = estimates.shape
        object.__setattr__(self, "estimates", estimates)
        for name in ("n_samples", "residual_df"):
            values = np.asarray(getattr(self, name))
            if values.shape != (n_clients,):
                raise ValueError(f"a LocalOLS's {name} has shape (n_clients,) = "
                                 f"({n_clients},), got {values.shape}.")
            object.__setattr__(self, name, values)
        if self.noise_cov is not None:
            if not isinstance(self.noise_cov, (tuple, list)) or len(self.noise_cov) != 2:
                raise ValueError("a LocalOLS's noise_cov is a pair (row_cov, col_cov).")
            pair = []
            for label, cov, size in (("row_cov", self.noise_cov[0], p),
                                     ("col_cov", self.noise_cov[1], q)):
                cov = np.asarray(cov)
                if cov.shape == (size, size):  # shared by every client
                    cov = np.broadcast_to(cov, (n_clients, size, size)).copy()
                if cov.shape != (n_clients, size, size):
                    raise ValueError(f"a LocalOLS's {label} has shape ({size}, {size}) or "
                                     f"({n_clients}, {size}, {size}), got {cov.shape}.")
                pair.append(cov)
            object.__setattr__(self, "noise_cov", tuple(pair))
        for label, names, size in (("feature_names", self.feature_names, p),
                                   ("output_names", self.output_names, q)):
            if names is not None and len(names) and len(names) != size:
                raise ValueError(f"a LocalOLS's {label} has {len(names)} names for "
                                 f"{size} {'coefficients' if label[0] == 'f' else 'outputs'}.")

    @property
    def shape(self):
        """``estimates.shape``: (n_clients, p, q)."""
        return self.estimates.shape

    def __len__(self):
        return len(self.estimates)

    def __getitem__(self, key):
        """The clients ``key`` selects (an int keeps one client, as a LocalOLS of one);
        ``ols[key, ...]`` is the same (scikit-learn indexes arrays so)."""
        if isinstance(key, tuple):
            if len(key) != 2 or key[1] is not Ellipsis:
                raise IndexError("a LocalOLS is indexed by clients only: ols[clients] or "
                                 "ols[clients, ...].")
            key = key[0]
        if isinstance(key, (bool, np.bool_)):  # numpy reads a scalar bool as a new axis
            raise IndexError("a LocalOLS is indexed by clients (an int, a slice, a list "
                             "of ints or a boolean mask per client), not by a single "
                             "boolean.")
        if isinstance(key, (int, np.integer)):
            key = [int(key)]
        # a LocalOLS built by hand without a covariance is cut too (a fit then says to
        # pass its estimates alone)
        cov = None if self.noise_cov is None else tuple(c[key] for c in self.noise_cov)
        names = getattr(self, "client_names", None)  # absent from older pickles
        if names is not None:  # cut as the arrays are (a list, a mask, a slice)
            names = np.asarray(names, dtype=object)[key].tolist()
        return LocalOLS(self.estimates[key], cov,
                        self.n_samples[key], self.residual_df[key],
                        list(self.feature_names), list(self.output_names),
                        self.generated_names, names,
                        getattr(self, "cov_type", "nonrobust"))

    def __eq__(self, other):
        if not isinstance(other, LocalOLS):
            return NotImplemented
        if (self.noise_cov is None) != (other.noise_cov is None):
            return False
        arrays = ((self.estimates, other.estimates), (self.n_samples, other.n_samples),
                  (self.residual_df, other.residual_df),
                  *zip(self.noise_cov or (), other.noise_cov or ()))
        return (all(np.array_equal(a, b) for a, b in arrays)
                and list(self.feature_names) == list(other.feature_names)
                and list(self.output_names) == list(other.output_names)
                and self.generated_names == other.generated_names
                and getattr(self, "client_names", None)
                == getattr(other, "client_names", None)
                and getattr(self, "cov_type", "nonrobust")
                == getattr(other, "cov_type", "nonrobust"))

    __hash__ = None  # mutable arrays inside: not hashable, as an ndarray is not

    def __repr__(self):
        n_clients, p, q = self.estimates.shape
        sizes = (f", n_samples {int(self.n_samples.min())}-{int(self.n_samples.max())}"
                 if n_clients else "")
        cov_type = getattr(self, "cov_type", "nonrobust")
        robust = "" if cov_type == "nonrobust" else f", cov_type {cov_type}"
        return (f"LocalOLS({n_clients} clients, p={p} {list(self.feature_names)}, "
                f"q={q} {list(self.output_names)}{sizes}{robust})")


def _patsy_names(table):
    """A patsy ``DesignMatrix``'s column names (``dmatrices``' default return type, an
    ndarray that carries its names in ``design_info``, as statsmodels reads them), or
    None for anything else."""
    names = getattr(getattr(table, "design_info", None), "column_names", None)
    return None if names is None else list(names)


def _has_names(table, width):
    """Whether ``table`` labels its columns (a data frame, a patsy design matrix, a
    named Series of one)."""
    return (getattr(table, "columns", None) is not None
            or _patsy_names(table) is not None
            or (getattr(table, "name", None) is not None and width == 1))


def _names(table, prefix, width):
    columns = getattr(table, "columns", None)
    if columns is None:
        columns = _patsy_names(table)
    if columns is not None:
        return [str(c) for c in columns]
    name = getattr(table, "name", None)  # a pandas Series
    if name is not None and width == 1:
        return [str(name)]
    return [f"{prefix}{j}" for j in range(width)]


def _columns(table):
    """A table's column labels (DataFrame columns, a patsy design matrix's names, a
    named Series' name), or None."""
    columns = getattr(table, "columns", None)
    if columns is not None:
        return list(columns)
    columns = _patsy_names(table)
    if columns is not None:
        # the names patsy gives each client's own levels (C(site)[T.b]): clients
        # lacking a level have other columns, which position alone would pair wrongly
        return columns
    name = getattr(table, "name", None) if hasattr(getattr(table, "index", None),
                                                   "equals") else None
    return None if name is None else [name]


def _aligned(design, response, k, reference, first_label="0"):
    """Client k's design and response as the first client's columns, rows paired.

    pandas inputs are matched by label, never silently by position: rows by index (a
    response whose index differs from its design's is an error, as in statsmodels; an
    array beside a pandas table has no labels and is paired by position, as in
    statsmodels), and
    columns by name against the first client's (``reference``: its design's and
    response's labels): the same names in another order are put in the first client's
    order; other names are an error naming the client.
    """
    # pandas indexes only (a list's .index is a method)
    rows = [getattr(table, "index", None) for table in (design, response)]
    rows = [index if hasattr(index, "equals") else None for index in rows]
    if rows[0] is not None and rows[1] is not None and not rows[0].equals(rows[1]):
        raise ValueError(f"client {k}'s design and response have different row indexes: "
                         "align them (e.g. response.loc[design.index]) or pass arrays.")
    out = []
    for table, what, first in zip((design, response), ("design", "response"), reference):
        names = _columns(table)
        text = [] if names is None else [str(name) for name in names]
        repeated = sorted({name for name in text if text.count(name) > 1})
        if repeated:  # (as strings: LocalOLS keeps the names as strings)
            raise ValueError(f"client {k}'s {what} has the column name(s) {repeated} more "
                             "than once: give every column its own name (new clients' "
                             "columns are matched to the fit's by name).")
        if (names is None) != (first is None):
            raise ValueError(f"client {k}'s {what} {'has no' if names is None else 'has'} "
                             f"column names and client {first_label}'s "
                             f"{'has' if names is None else 'has no'}"
                             ": pass every client as a DataFrame (matched by name) or "
                             "every client as an array (matched by position).")
        if names is not None and first is not None and names != first:
            if set(names) != set(first) or len(set(names)) != len(names) \
                    or len(names) != len(first):
                skipped = ({"const"} in (set(first) - set(names), set(names) - set(first))
                           and what == "design")
                raise ValueError(f"client {k}'s {what} has columns {names}, client {first_label}'s "
                                 f"{first}: every client needs the same columns."
                                 + (_SKIPPED_CONSTANT if skipped else ""))
            if hasattr(table, "columns"):
                table = table[first]  # the same names, in client 0's order
            else:  # a patsy design matrix: its columns, and its names, reordered
                from patsy import DesignInfo, DesignMatrix
                order = [names.index(name) for name in first]
                table = DesignMatrix(np.asarray(table)[:, order],
                                     DesignInfo([str(name) for name in first]))
        out.append(table)
    return out


def _dense(values, what, k):
    """Refuse what ``np.asarray`` would misread: masked entries (their hidden values
    would be used) and scipy.sparse matrices."""
    if scipy.sparse.issparse(values):
        raise TypeError(f"client {k}'s {what} is a scipy.sparse matrix, which local_ols "
                        "does not support: convert it with .toarray().")
    if np.ma.isMaskedArray(values) and np.ma.getmaskarray(values).any():
        raise ValueError(f"client {k}'s {what} contain{'' if what == 'weights' else 's'} "
                         "missing values (masked entries): drop or impute them first.")


def _categorical_columns(table):
    """The names of a pandas table's categorical columns (a categorical Series: its
    name), as strings; empty for anything else."""
    columns, dtypes = getattr(table, "columns", None), getattr(table, "dtypes", None)
    if columns is not None and dtypes is not None and not np.isscalar(dtypes):
        return [str(c) for c, t in zip(columns, dtypes) if str(t) == "category"]
    if hasattr(getattr(table, "index", None), "equals") \
            and str(getattr(table, "dtype", None)) == "category":  # a Series
        return [str(getattr(table, "name", None))]
    return []


def _holds_text(values):
    """Whether an array (of Python objects, or of strings) holds a string or bytes.

    pandas' ``infer_dtype`` reads an object array in C; only a mixture it cannot name
    is scanned value by value (a Python loop made ``local_ols`` three times slower on
    object columns of numbers; a review)."""
    from pandas.api.types import infer_dtype

    values = np.asarray(values)
    if values.dtype.kind in "UST":  # T: numpy 2's variable-width StringDType
        return True
    if values.dtype.kind != "O":
        return False
    kind = infer_dtype(values.ravel(), skipna=True)
    if kind in ("string", "bytes"):
        return True
    if kind not in ("mixed", "mixed-integer"):
        return False
    return any(isinstance(v, (str, bytes)) for v in values.ravel())


def _text_columns(table):
    """The names of a table's columns that hold text (a text Series: its name; any
    other table, a list of rows included: ``["all"]``), as strings:
    ``np.asarray(..., dtype=float)`` parses "1", "2" as numbers, so a factor coded as
    text (regions, zip codes) became one slope."""
    columns, dtypes = getattr(table, "columns", None), getattr(table, "dtypes", None)
    if hasattr(table, "iloc") and columns is not None and dtypes is not None \
            and not np.isscalar(dtypes):  # a pandas DataFrame: name the columns
        return [str(c) for i, (c, t) in enumerate(zip(columns, dtypes))
                if getattr(t, "kind", "O") in "OUST"
                and _holds_text(table.iloc[:, i].to_numpy(dtype=object))]
    if hasattr(table, "iloc") and hasattr(getattr(table, "index", None), "equals"):
        kind = getattr(getattr(table, "dtype", None), "kind", "O")
        name = getattr(table, "name", None)
        return ([("all" if name is None else str(name))] if kind in "OUST"
                and _holds_text(table.to_numpy(dtype=object)) else [])
    try:  # arrays, lists of rows (csv.reader's), other frame libraries' tables
        values = np.asarray(table)
    except (TypeError, ValueError):  # ragged: the conversion below says what is wrong
        return []
    return ["all"] if _holds_text(values) else []


def _as_matrix(table, what, k):
    _dense(table, what, k)
    missing = getattr(table, "isna", None)
    if callable(missing) and np.asarray(missing()).any():  # pandas NA, NaN or None
        raise ValueError(f"client {k}'s {what} contains missing values: drop or impute "
                         "them first.")
    categorical = _categorical_columns(table)
    if categorical:  # np.asarray reads numeric categories' values: a factor as a slope
        raise TypeError(f"client {k}'s {what} has categorical columns {categorical}: a "
                        "category is a label, not a number (np.asarray would read its "
                        "values as numbers: a factor fitted as one slope); encode it as "
                        "indicator columns first, e.g. pandas.get_dummies(..., "
                        "drop_first=True, dtype=float), or convert it with .astype(float) "
                        "if its values are numbers meant as such.")
    text = _text_columns(table)
    if text:
        where = "holds text" if text == ["all"] else f"has text columns {text}"
        raise TypeError(f"client {k}'s {what} {where}: a text value is a label, not a "
                        "number (np.asarray would parse '1', '2' as numbers: a factor "
                        "fitted as one slope); encode a factor as indicator columns, "
                        "e.g. pandas.get_dummies(..., drop_first=True, dtype=float), or "
                        "convert numbers stored as text with pandas.to_numeric first.")
    # refused, not truncated: np.asarray(..., dtype=float) drops the imaginary part with
    # a mere ComplexWarning (the estimator refuses complex estimates alike)
    if np.iscomplexobj(table):
        raise ValueError(f"Complex data not supported: client {k}'s {what} is complex; "
                         "pass the real and imaginary parts as separate columns if that "
                         "is what they are.")
    try:
        array = np.asarray(table, dtype=float)
    except (TypeError, ValueError) as exc:
        columns = getattr(table, "columns", None)
        dtypes = getattr(table, "dtypes", None)
        odd = [(str(c), t.kind) for c, t in zip(columns, dtypes) if t.kind not in "biufc"] \
            if columns is not None and dtypes is not None and not np.isscalar(dtypes) else []
        dates = [c for c, kind in odd if kind in "mM"]
        others = [c for c, kind in odd if kind not in "mM"]
        hint = "".join([
            f" (columns {dates}: dates and durations are not numbers; convert them, e.g. "
            "to days since a reference date)" if dates else "",
            f" (columns {others}: encode categories as indicator columns first, e.g. "
            "pandas.get_dummies(..., drop_first=True, dtype=float))" if others else ""])
        raise TypeError(f"client {k}'s {what} is not numeric: {exc}{hint}") from exc
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(f"client {k}'s {what} must be 2-D (n_samples, columns); got "
                         f"shape {array.shape}.")
    if array.shape[1] == 0:
        raise ValueError(f"client {k}'s {what} has no columns: " + (
            "give at least one covariate (a column of ones for an intercept-only "
            "model)." if what == "design"
            else "give at least one output."))
    if not np.all(np.isfinite(array)):
        raise ValueError(f"client {k}'s {what} contains NaN or infinite values.")
    return array


def _sandwich_weights(left, resid, col_cov, cov_type, y_max):
    """The rows' weights ``w_i`` of :func:`local_ols`'s sandwich ``row_cov`` (scaled
    units; ``left``: the design's left singular vectors, whose rows' squared norms are
    the leverages) and how many rows have leverage 1, or ``(None, 0)`` where no output
    has residual variance (the classical ``row_cov`` is then kept, and
    :func:`_no_residual` says what is wrong)."""
    n_samples, p = left.shape
    # e_i^T col_cov^+ e_i / q on the outputs' correlation matrix: the outputs' units
    # leave it unchanged (a pseudo-inverse of col_cov itself dropped an output 1e8 times
    # smaller than another as if it had no variance, a review), and an output with no
    # residual variance drops out of the count as of the sum
    spread = np.sqrt(np.clip(np.diag(col_cov), 0.0, None))
    # an output without residual variance beyond round-off (_no_residual's rule, which
    # sets it to zero): its round-off residuals, divided by their own spread, would
    # count as noise of unit size
    live = spread > 64 * np.finfo(float).eps * y_max
    if not np.any(live):
        return None, 0
    unit = resid[:, live] / spread[live]
    corr = col_cov[np.ix_(live, live)] / np.outer(spread[live], spread[live])
    inverse = np.linalg.pinv(corr, hermitian=True)
    size = np.einsum("ij,ij->i", unit @ inverse, unit) / np.linalg.matrix_rank(
        corr, hermitian=True)
    # 1 - h_ii: a row that alone sets a combination of coefficients (a dummy that is 1
    # on one row) has h_ii = 1 up to round-off of the orthonormal rows' norms (a few eps
    # each) and a residual of round-off: it says nothing about its own noise. Every
    # sandwich gave it weight 0 (HC2/HC3: round-off over round-off, taken as 0; it was up
    # to 1e3 times the other rows' for half of the seeds of a review), a row_cov with no
    # noise along that combination, and the tests flagged such a benign client in 23 of
    # 40 fits (a review; 0 of 40 with the classical covariance). Such a row gets the
    # classical covariance's weight instead, 1 (the rows' sizes average (n - p) / n).
    kept = 1.0 - np.einsum("ij,ij->i", left, left)
    alone = kept <= 16 * max(n_samples, p) * np.finfo(float).eps
    if cov_type == "HC1":
        weights = size * n_samples / (n_samples - p)
    elif cov_type in ("HC2", "HC3"):
        power = 1 if cov_type == "HC2" else 2
        weights = size / np.where(alone, 1.0, kept) ** power
    else:
        weights = size
    return np.where(alone, 1.0, weights), int(np.count_nonzero(alone))


def _client_fit(design, response, k, names, cov_type="nonrobust", notes=None):
    n_samples, p = design.shape
    if response.shape[0] != n_samples:
        raise ValueError(f"client {k}: the design has {n_samples} rows but the response "
                         f"has {response.shape[0]}.")
    if n_samples <= p:
        raise ValueError(f"client {k} has {n_samples} samples for {p} coefficients per "
                         "output: OLS needs more samples than coefficients to estimate "
                         "its noise.")
    # The design and the response divided by powers of two near their largest entries
    # (exact; undone below): norms and squared residuals of data near float64's limits
    # (entries of 1e155 or 1e-165) would overflow or underflow.
    x_exp, y_exp = _exponent(design), _exponent(response)
    design, response = np.ldexp(design, -x_exp), np.ldexp(response, -y_exp)
    # Columns scaled to unit norm first (OLS is equivariant to it): the rank test then
    # sees collinearity, not units (columns in units of 1e-7 and 1e7 are not singular).
    norms = np.linalg.norm(design, axis=0)
    # A column below eps of the largest is round-off, not a unit (columns in units 1e-7
    # and 1e7, a ratio of 1e-14, are a design; 1e-17 against 1 is not).
    tiny = norms <= norms.max() * np.finfo(float).eps
    if np.any(tiny):
        raise ValueError(f"client {k}'s design column(s) "
                         f"{[names[j] for j in np.flatnonzero(tiny)]} are zero (to "
                         "round-off against the largest column): drop them from every "
                         "client's design (every client needs the same columns), or "
                         "leave this client out.")
    # The SVD gives the pseudo-inverse and the numerical rank in one pass.
    left, sing, right_t = np.linalg.svd(design / norms, full_matrices=False)
    if sing[-1] <= sing[0] * max(design.shape) * np.finfo(float).eps:
        weights = np.abs(right_t[-1])
        involved = [names[j] for j in np.flatnonzero(weights > 0.1 * weights.max())]
        raise ValueError(f"client {k}'s design is rank deficient (columns {involved} are "
                         f"collinear; singular values of the unit-norm columns "
                         f"{sing[0]:.3g} ... {sing[-1]:.3g}): drop one of them from "
                         "every client's design (every client needs the same columns), "
                         "or leave this client out.")
    if sing[-1] ** 2 <= sing[0] ** 2 * 10 * p * np.finfo(float).eps and notes is not None:
        # full rank, but (X^T X)^{-1}'s correlation is singular to working precision
        # (the estimator then warns that the covariance gives no noise along a
        # combination): local_ols says which columns, in the user's terms (a review: a
        # column equal to another up to 1e-9 gave coefficients of 7.6e7 and only the
        # fit's warning about a "singular" covariance)
        weights = np.abs(right_t[-1])
        notes.append((k, [names[j] for j in np.flatnonzero(weights > 0.1 * weights.max())],
                      sing[-1] / sing[0]))
    inv_sing = right_t.T / sing / norms[:, None]  # (X D^-1)^+ with D undone: X^+
    estimate = inv_sing @ (left.T @ response)
    row_cov = inv_sing @ inv_sing.T  # (X^T X)^{-1}
    resid = response - design @ estimate
    col_cov = resid.T @ resid / (n_samples - p)
    weights, alone = (None, 0) if cov_type == "nonrobust" else _sandwich_weights(
        left, resid, col_cov, cov_type, np.max(np.abs(response), axis=0))
    if alone:
        warnings.warn(f"client {k}: {alone} row(s) of its design have leverage 1 (each "
                      "alone sets a combination of the coefficients, e.g. a dummy that "
                      f"is 1 on one row): their residuals are zero and cov_type="
                      f"{cov_type!r} cannot estimate their noise, so they get the "
                      "classical covariance's weight (the pooled residual variance). "
                      "Merge such a category with another, or drop the column.",
                      UserWarning, stacklevel=3)
    if weights is not None:  # X^+ diag(w) X^+T, X^+ = inv_sing @ left.T
        pinv_x = inv_sing @ left.T
        row_cov = (pinv_x * weights) @ pinv_x.T
    variances = np.diag(col_cov)
    with np.errstate(over="ignore", under="ignore"):
        estimate = np.ldexp(estimate, y_exp - x_exp)
        row_cov = np.ldexp(0.5 * (row_cov + row_cov.T), -2 * x_exp)
        col_cov = np.ldexp(col_cov, 2 * y_exp)
    tiny = np.finfo(float).tiny
    lost = (variances > 0) & ~(np.diag(col_cov) >= tiny)  # a residual variance underflowed
    if not (np.all(np.isfinite(estimate)) and np.all(np.isfinite(row_cov))
            and np.all(np.isfinite(col_cov)) and np.all(np.diag(row_cov) >= tiny)
            and not np.any(lost)):
        raise ValueError(f"client {k}: its estimates or their covariance fall outside "
                         f"float64's range (design entries up to {np.ldexp(1.0, x_exp):.3g}, "
                         f"responses up to {np.ldexp(1.0, y_exp):.3g}; the covariance "
                         "scales as response^2 / design^2): express the design's columns "
                         "or the responses in other units.")
    return estimate, row_cov, col_cov


def _warn_dependent_outputs(col_cov, residual_df, output_names, labels):
    """Warn about outputs linearly dependent in a client's residuals (one output is a
    combination of others and the design, as a total beside its parts): it adds no
    information, and its residual covariance gives no noise along that combination,
    which the tests then take as exact (a review: a total beside its two parts moved the
    rank rule in 4 of 12 splits of fair and the smallest p-value from 0.007 to 0.09,
    with only the estimator's warning that the covariance is singular, not which
    outputs). Judged as :class:`~clairstat.CLAIREstimator`'s check judges a covariance:
    the residual correlation's smallest eigenvalue at round-off. Clients with fewer
    residual degrees of freedom than outputs (warned about, and refused by the
    estimator) and outputs without residual variance (warned about) are left out."""
    q = col_cov.shape[1]
    if q < 2:
        return
    found = {}
    for k in np.flatnonzero(residual_df >= q):
        live = np.flatnonzero(np.diag(col_cov[k]) > 0)
        if len(live) < 2:
            continue
        root = np.sqrt(np.diag(col_cov[k])[live])
        corr = col_cov[k][np.ix_(live, live)] / root[:, None] / root[None, :]
        values, vectors = np.linalg.eigh(corr)
        if values[0] <= 10 * len(live) * np.finfo(float).eps:
            weights = np.abs(vectors[:, 0])
            names = tuple(output_names[live[j]] for j in
                          np.flatnonzero(weights > 0.1 * weights.max()))
            found.setdefault(names, []).append(labels[k])
    for names, clients in found.items():
        shown = ", ".join(clients[:5]) + (f" and {len(clients) - 5} more"
                                          if len(clients) > 5 else "")
        warnings.warn(f"outputs {list(names)} are linearly dependent in the residuals of "
                      f"clients {shown}: one is a combination of the others (and the "
                      "design), which adds no information, and the residual covariance "
                      "gives no noise along that combination, so that CLAIREstimator's "
                      "tests take it as exact. Drop one of these outputs.",
                      UserWarning, stacklevel=3)


def _exponent(array):
    """``e`` with ``2^(e-1) <= max |array| < 2^e`` (0 for an all-zero array)."""
    largest = float(np.max(np.abs(array))) if array.size else 0.0
    return int(np.frexp(largest)[1]) if largest > 0 else 0


def _no_residual(col_cov, y_max, output_names, labels):
    """``col_cov`` with the outputs that have no residual variance (constant, or fitted
    exactly: a variance at round-off level) set to exactly zero, with a warning naming
    the client: a residual of 0.0 and one of 1e-16 (a constant 1.0) are the same, and
    :class:`~clairstat.CLAIREstimator` refuses both. ``y_max`` (n_clients, q): each
    client's largest absolute response per output."""
    variances = np.diagonal(col_cov, axis1=1, axis2=2)  # (n_clients, q)
    # Round-off: residuals of size ~ eps * |y|, squared.
    dead = variances <= (64 * np.finfo(float).eps * np.maximum(y_max, 1e-300)) ** 2
    col_cov = col_cov.copy()
    for k, j in zip(*np.nonzero(dead)):
        col_cov[k, j, :] = col_cov[k, :, j] = 0.0
        warnings.warn(f"client {labels[k]}'s output {output_names[j]!r} has no residual variance "
                      "(constant, or fitted exactly): its residual variance is set to zero, "
                      "and CLAIREstimator refuses it (a test would take that output's noise "
                      "as zero, so that any deviation of the client is significant). Drop "
                      "the output or the client.", UserWarning, stacklevel=3)
    return col_cov


def _weighted(design, response, weights, k, rows=None):
    """Client k's rows scaled by the square roots of its WLS ``weights`` (OLS on the
    scaled rows is WLS on the raw ones, as statsmodels' ``WLS`` whitens); ``rows``, the
    design's pandas index where it has one, must match a weight Series' index."""
    index = getattr(weights, "index", None)
    if hasattr(index, "equals") and hasattr(rows, "equals") and not index.equals(rows):
        raise ValueError(f"client {k}'s weights and data have different row indexes: "
                         "align them (e.g. weights.loc[design.index]) or pass arrays.")
    _dense(weights, "weights", k)
    if np.iscomplexobj(weights):  # refused, not truncated (see _as_matrix)
        raise ValueError(f"Complex data not supported: client {k}'s weights are complex.")
    try:
        weights = np.asarray(weights, dtype=float)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"client {k}'s weights are not numeric: {exc}") from exc
    if weights.ndim != 1 or weights.shape[0] != design.shape[0]:
        raise ValueError(f"client {k}'s weights have shape {weights.shape}; expected "
                         f"({design.shape[0]},), one per row of its design.")
    if not np.all(np.isfinite(weights)) or np.any(weights <= 0):
        raise ValueError(f"client {k}'s weights must be finite and positive (drop the "
                         "rows a zero weight would remove: they would still count as "
                         "residual degrees of freedom).")
    if response.shape[0] != design.shape[0]:  # _client_fit's message, before broadcasting
        return design, response
    root = np.sqrt(weights)[:, None]
    return design * root, response * root


def local_ols(designs: Sequence[ArrayLike] | Mapping[object, ArrayLike],
              responses: Sequence[ArrayLike] | Mapping[object, ArrayLike],
              weights: Sequence[ArrayLike] | Mapping[object, ArrayLike] | None = None,
              cov_type: str = "nonrobust") -> LocalOLS:
    """Fit ordinary (or weighted) least squares on every client's own data.

    Parameters
    ----------
    designs : sequence or mapping of array-like or DataFrame, each of shape (n_k, p)
        Client ``k``'s design matrix (include a column of ones for an intercept:
        ``statsmodels.api.add_constant`` does). A mapping ``{name: design}`` names the
        clients: ``responses`` (and ``weights``) must then be mappings with the same
        keys, the clients come in the order of the designs' keys, and the names (as
        strings) are kept as ``client_names`` for the fit's summary and the error
        messages. A pandas Series of tables, or a GroupBy, counts as a mapping. From
        one long table: ``{site: sm.add_constant(group[columns]) for site, group in
        frame.groupby("site")}``, and ``frame.groupby("site")[outputs]`` as the
        responses.
    responses : sequence or mapping of array-like, Series or DataFrame, each of shape (n_k, q) or (n_k,)
        Client ``k``'s responses (``q`` outputs).
    weights : sequence or mapping of array-like, each of shape (n_k,), optional
        Weighted least squares, as statsmodels' ``WLS(response, design, weights)``:
        weights proportional to the inverse of each row's noise variance (finite and
        positive). Then ``estimates`` is ``(X_k^T W_k X_k)^{-1} X_k^T W_k Y_k``,
        ``row_cov`` is ``(X_k^T W_k X_k)^{-1}`` (or the sandwich of ``cov_type`` on
        the rows scaled by ``sqrt(W_k)``) and ``col_cov`` the weighted residual
        covariance ``R_k^T W_k R_k / (n_k - p)`` (statsmodels' ``scale``). Default: OLS.
    cov_type : {"nonrobust", "HC0", "HC1", "HC2", "HC3"}, default="nonrobust"
        How ``row_cov`` is estimated. ``"nonrobust"``: ``(X_k^T X_k)^{-1}``, right when
        every row's noise has the same covariance. The others are heteroscedasticity-
        consistent sandwiches in the Kronecker form the estimator takes, ``cov(vec
        Theta_hat_k) = col_cov_k (x) row_cov_k`` with ``row_cov_k = X_k^+ diag(w_i)
        X_k^+T``, ``w_i = c_i e_i^T col_cov_k^+ e_i / q`` (``e_i`` row i's residual,
        ``X_k^+`` the pseudo-inverse; computed on the outputs' correlation matrix,
        so that their units do not enter, over its rank), and ``c_i`` statsmodels'
        factor: 1 (HC0), ``n_k / (n_k - p)`` (HC1), ``1 / (1 - h_ii)`` (HC2), ``1 / (1 - h_ii)^2``
        (HC3; ``h_ii`` the leverage). The Kronecker form is the covariance's where
        each row's noise is its own multiple of one covariance (``e_i = sqrt(v_i)
        eps_i``); with one output the result is statsmodels'
        ``OLS(y, X).fit(cov_type=...)`` covariance (WLS's with ``weights``). On real
        regressions whose noise grows with a covariate (firm sizes, incomes, county
        populations) the classical covariance understated the clients' spread up to
        ten-fold, HC3 at most 1.7-fold; on small clients with little
        heteroscedasticity HC3 overstates it up to 1.5-fold, which makes the tests
        conservative (benchmarks/RESULTS.md, "Heteroscedasticity-consistent
        covariances").

    Returns
    -------
    LocalOLS
        ``estimates`` (n_clients, p, q), ``noise_cov`` = ((n_clients, p, p),
        (n_clients, q, q)) and ``n_samples`` (n_clients,), ready for
        ``CLAIREstimator().fit(ols)``, which is ``fit(ols.estimates,
        sample_weight=ols.n_samples, noise_cov=ols.noise_cov)`` (and ``predict(ols)``,
        ``score_samples(ols)``, ``transform(ols)`` for new clients).

    Raises
    ------
    TypeError
        Some per-client arguments given as mappings and others as sequences; a
        scipy.sparse design or response (convert it with ``.toarray()``); a
        non-numeric or categorical (pandas ``category``) column, whatever its
        categories, or a column of text (object or string dtype; also "1", "2"): a
        factor's values are labels (encode it as indicator columns).
    ValueError
        Mappings with different keys, or keys that are equal as strings; a per-client
        argument that holds scalars (one column of a whole table) or is one table (a
        data frame, or a 2-D array of designs: pass ``[table]`` for one client) instead
        of one table or weight vector per client; clients of different widths, a design
        or response with no columns, a client with no more samples than coefficients,
        a rank-deficient design, complex data (refused, not truncated), or non-finite
        or missing data (NaN, pandas NA, masked entries of a numpy masked array; the
        message names the client).
        With pandas inputs: a design and response whose row indexes differ (an array
        beside a pandas table has no index and is paired by position). With
        pandas or patsy inputs (``dmatrices``' design matrices carry their column
        names): a table with a column name twice, or a client whose column names are
        not the first client's (the same names in another order are reordered to the
        first client's).

    Warns
    -----
    UserWarning
        An output with no residual variance (constant, or fitted exactly): its
        residual variance is set to zero, and ``CLAIREstimator`` refuses the result
        (drop the output or the client). Fewer than 20 residual degrees of freedom.
        With a heteroscedasticity-consistent ``cov_type``, rows of leverage 1 (a row
        that alone sets a combination of the coefficients, such as a dummy that is 1
        on one row): their noise cannot be estimated from their zero residuals, and
        they get the classical covariance's weight.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> designs = [np.c_[np.ones(50), rng.standard_normal((50, 2))] for _ in range(4)]
    >>> responses = [x @ np.ones((3, 2)) + rng.standard_normal((50, 2)) for x in designs]
    >>> ols = local_ols(designs, responses)
    >>> ols.estimates.shape, ols.noise_cov[0].shape, ols.noise_cov[1].shape
    ((4, 3, 2), (4, 3, 3), (4, 2, 2))
    """
    if cov_type not in _COV_TYPES:
        raise ValueError(f"cov_type must be one of {sorted(_COV_TYPES)}, got {cov_type!r}.")
    designs, responses, weights, client_names = _by_client(designs, responses, weights)
    # how messages name a client: its position, or its name when the clients have names
    labels = ([str(k) for k in range(len(designs))] if client_names is None
              else [f'"{name}"' for name in client_names])
    if len(designs) != len(responses):
        raise ValueError(f"{len(designs)} designs but {len(responses)} responses: give one "
                         "of each per client.")
    if len(designs) == 0:
        raise ValueError("no clients given.")
    if weights is not None:
        weights = list(weights)
        if len(weights) != len(designs):
            raise ValueError(f"{len(weights)} weight vectors for {len(designs)} clients: "
                             "give one per client.")
    fits, first, constants, collinear = [], None, [], []
    reference = (_columns(designs[0]), _columns(responses[0]))
    for k, (design, response) in enumerate(zip(designs, responses)):
        label = labels[k]
        design, response = _aligned(design, response, label, reference, labels[0])
        x_mat, y_mat = (_as_matrix(design, "design", label),
                        _as_matrix(response, "response", label))
        constants.append(np.where(np.ptp(x_mat, axis=0) == 0, x_mat[0], np.nan)
                         if len(x_mat) else np.full(x_mat.shape[1], np.nan))
        if weights is not None:
            # a weight Series is matched against whichever table labels the rows
            rows = [getattr(table, "index", None) for table in (design, response)]
            rows = [index for index in rows if hasattr(index, "equals")]
            x_mat, y_mat = _weighted(x_mat, y_mat, weights[k], label,
                                     rows[0] if rows else None)
        width = (x_mat.shape[1], y_mat.shape[1])
        first = width if first is None else first
        if width != first:
            # one column fewer and a constant one: add_constant skipped the intercept
            skipped = (width[0] == first[0] - 1 and len(x_mat) > 1
                       and np.any(np.ptp(x_mat, axis=0) == 0))
            raise ValueError(f"client {label} has (p, q) = {width} but client {labels[0]} "
                             f"has {first}: "
                             "every client needs the same columns."
                             + (_SKIPPED_CONSTANT if skipped else ""))
        fits.append((*_client_fit(x_mat, y_mat, label, _names(design, "x", x_mat.shape[1]),
                                  cov_type, collinear),
                     len(x_mat), np.max(np.abs(y_mat), axis=0)))
    estimates, row_cov, col_cov, n_samples, y_max = (np.stack(part) for part in zip(*fits))
    p, q = estimates.shape[1:]
    _warn_scaled_intercepts(np.stack(constants), _names(designs[0], "x", p))
    col_cov = _no_residual(col_cov, y_max, _names(responses[0], "y", q), labels)
    _warn_dependent_outputs(col_cov, n_samples - p, _names(responses[0], "y", q), labels)
    if collinear:
        shown = "; ".join(f"{label} ({', '.join(map(str, cols))}: ratio {ratio:.2g})"
                          for label, cols, ratio in collinear[:5])
        more = f"; and {len(collinear) - 5} more" if len(collinear) > 5 else ""
        warnings.warn(f"the designs of clients {shown}{more} are nearly collinear (the "
                      "named columns; ratio: smallest to largest singular value of the "
                      "unit-norm columns): those coefficients are determined in "
                      "combination only, each with a huge standard error, and the "
                      "covariance's correlation is singular to working precision. Drop "
                      "one of the columns from every client's design, or, for powers of "
                      "a covariate far from zero (calendar years), centre it first.",
                      UserWarning, stacklevel=2)
    short = np.flatnonzero(n_samples - p < q) if q > 1 else np.array([], dtype=int)
    if short.size:
        warnings.warn(f"clients {', '.join(labels[k] for k in short)} have fewer residual "
                      f"degrees of freedom than the {q} outputs (at least p + q = {p + q} "
                      "rows are needed): their residual covariance is singular, and "
                      "CLAIREstimator refuses it; their estimates (ols.estimates) can be "
                      "fitted without a covariance.", UserWarning, stacklevel=2)
    few = np.flatnonzero(n_samples - p < _MIN_RESIDUAL_DF)
    if few.size:
        warnings.warn(f"clients {', '.join(labels[k] for k in few)} have fewer than {_MIN_RESIDUAL_DF} residual "
                      "degrees of freedom: their residual covariance is a rough estimate, "
                      "and tests that take it as exact flag benign clients more often "
                      "than the level says (measured: 20% of null fits at 6 residual df).",
                      UserWarning, stacklevel=2)
    return LocalOLS(estimates, (row_cov, col_cov), n_samples.astype(int),
                    n_samples.astype(int) - p, _names(designs[0], "x", p),
                    _names(responses[0], "y", q),
                    (not _has_names(designs[0], p), not _has_names(responses[0], q)),
                    client_names, cov_type)


#: The hint of a column mismatch that statsmodels' add_constant makes: it adds no
#: intercept to a design that already holds a constant column (a dummy that takes one
#: value at a site; a review on griliches76, one site all urban).
_SKIPPED_CONSTANT = (" A client's design lacking the intercept the others have is what "
                     "statsmodels' add_constant gives where a column is already constant "
                     "at that client (a dummy with one value there): add the intercept "
                     "with add_constant(..., has_constant='add').")


def _warn_scaled_intercepts(constants, names):
    """Warn about a column constant within every client at values that differ between
    clients: its coefficient is each client's intercept divided by its value, which
    means something else in each client. ``sm.add_constant`` (``has_constant="skip"``)
    adds no intercept to a design that already holds a constant column, such as the
    covariate the sites were formed by (a review: fair split by occupation, 'const'
    silently absent). ``constants`` (n_clients, p): a column's value where it is
    constant in that client, else nan."""
    for j in np.flatnonzero(np.all(np.isfinite(constants), axis=0)):
        values = constants[:, j]
        if np.all(values == values[0]):
            continue  # an intercept (or a column every client holds at one value)
        shown = ", ".join(f"{v:.4g}" for v in np.unique(values)[:5])
        warnings.warn(f"design column {names[j]!r} is constant within every client but "
                      f"at different values across them ({shown}"
                      f"{', ...' if len(np.unique(values)) > 5 else ''}): it acts as "
                      "each client's intercept on a different scale, so its coefficient "
                      "means something else in each client. If the clients were formed "
                      "by this column, drop it; if an intercept was meant, add one "
                      "explicitly (statsmodels' add_constant skips a design that already "
                      "holds a constant column: has_constant='add').",
                      UserWarning, stacklevel=3)


def _as_mapping(value):
    """A pandas Series of per-client tables, or a GroupBy (``frame.groupby("site")``,
    with columns selected or not), as the ``{name: table}`` mapping it stands for:
    both are keyed by the clients' names, and pairing them by position would be a
    guess. Anything else is returned as it is."""
    if hasattr(value, "ngroups") and hasattr(value, "groups"):  # a pandas GroupBy
        return {key: table for key, table in value}
    index = getattr(value, "index", None)
    if getattr(value, "ndim", None) == 1 and hasattr(index, "equals") \
            and hasattr(value, "items"):  # a Series (of tables, or of weight vectors)
        return dict(value.items())
    return value


def _per_client(value, what):
    """Refuse one vector of scalars (a whole table's column, say) where one table or
    weight vector per client is expected: its entries would be read as clients. So is
    one client's table: a data frame would be read column label by column label, and a
    2-D array of designs row by row (``local_ols(X, Y)`` of scikit-learn's linnerud,
    20 x 3, fitted 20 "clients" of 3 samples and one covariate, a review); a 2-D array
    of responses is kept, as one 1-D response per client."""
    kind = "weight vector" if what == "weights" else what[:-1]
    if getattr(value, "columns", None) is not None or (
            what == "designs" and isinstance(value, np.ndarray) and value.ndim == 2
            and value.dtype != object):
        raise ValueError(
            f"{what} is one table of shape {np.shape(value)}, not one {kind} per client: "
            f"for a single client pass a list of one ([table]); for several, a list or "
            f"mapping of per-client tables (or a 3-D array (n_clients, n_samples, "
            f"columns)), e.g. frame.groupby('site')[columns].")
    if isinstance(value, Mapping):
        items = list(value.values())
    elif isinstance(value, np.ndarray) or (isinstance(value, Sequence)
                                           and not isinstance(value, (str, bytes))):
        items = list(value)
    else:  # an iterator, read once later
        return
    if items and all(isinstance(item, (numbers.Number, str, bytes))
                     or getattr(item, "ndim", None) == 0 for item in items):
        part = "'w'" if what == "weights" else "columns"
        raise ValueError(
            f"{what} holds {len(items)} scalars (one column of the whole table?), not one "
            f"{kind} per client: give each client's own, e.g. {{site: group[{part}] for "
            f"site, group in frame.groupby('site')}}, or frame.groupby('site')[{part}].")


def _by_client(designs, responses, weights):
    """``(designs, responses, weights, client_names)`` as lists in one client order.

    Mappings (``{name: table}``; a pandas Series of tables or a GroupBy count as one)
    are matched by key, in the designs' key order, and their keys become the clients'
    names; sequences are matched by position and have no names. Mixing the two, or
    mappings with different keys, is an error: pairing them by position would be a
    guess.
    """
    given = {"designs": designs, "responses": responses}
    if weights is not None:
        given["weights"] = weights
    given = {what: _as_mapping(value) for what, value in given.items()}
    for what, value in given.items():
        _per_client(value, what)
    designs, responses, weights = (given["designs"], given["responses"],
                                   given.get("weights"))
    mapped = [what for what, value in given.items() if isinstance(value, Mapping)]
    if not mapped:
        return (list(designs), list(responses),
                None if weights is None else list(weights), None)
    if len(mapped) != len(given):
        plain = [what for what in given if what not in mapped]
        raise TypeError(f"{' and '.join(mapped)} {'is a mapping' if len(mapped) == 1 else 'are mappings'} "
                        f"but {' and '.join(plain)} {'is' if len(plain) == 1 else 'are'} not: pass "
                        "every per-client argument as a mapping with the same keys (the "
                        "clients' names), or every one as a sequence in one order.")
    keys = list(designs.keys())
    for what, value in given.items():
        if set(value.keys()) != set(keys):
            missing = [key for key in keys if key not in value]
            extra = [key for key in value if key not in designs]
            raise ValueError(f"{what} and designs have different keys (in designs only: "
                             f"{missing}; in {what} only: {extra}): give every client "
                             "one of each.")
    names = [str(key) for key in keys]
    if len(set(names)) != len(names):
        repeated = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"the clients' keys {repeated} are the same as strings: the "
                         "names must tell the clients apart.")
    return ([designs[key] for key in keys], [responses[key] for key in keys],
            None if weights is None else [weights[key] for key in keys], names)

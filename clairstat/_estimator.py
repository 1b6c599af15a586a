"""``CLAIREstimator``: the scikit-learn shell around :func:`clairstat.clair_decompose`."""

from __future__ import annotations

import numbers
import warnings

import numpy as np
from scipy import stats
from sklearn.base import BaseEstimator, OutlierMixin, TransformerMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from ._decompose import clair_decompose
from ._detection import projection_statistics, refine, detect_clients
from ._tuning import estimate_noise_scale, factored_noise_scale, floor_noise_scale
from ._validation import check_local_estimates, check_noise_scale, check_sample_weight
from .solvers import Solver, resolve_solver

__all__ = ["CLAIREstimator"]

_CORRECTIONS = {"bonferroni", "sidak", "holm-sidak", "holm", "simes-hochberg", "hommel",
                "fdr_bh", "fdr_by", "fdr_tsbh", "fdr_tsbky"}


class CLAIREstimator(OutlierMixin, TransformerMixin, BaseEstimator):
    """Collaborative low-rank estimation with contaminated clients (CLAIR).

    Fits the decomposition of the clients' estimates into a backbone, a shared low-rank
    part and one sparse block per contaminated client, flags contaminated clients with
    calibrated per-client tests, recovers the shared subspace on the collaborative set,
    and refines every collaborative client's estimate.

    Parameters
    ----------
    rank : int or None, default=None
        Dimension of the shared subspace; ``None`` chooses it by the noise-edge rule
        (:func:`clairstat._detection.select_rank`).
    alpha, beta, lam : float or "auto", default="auto"
        Penalties (see :func:`clairstat.clair_decompose`).
    formulation : {"penalized", "exact"}, default="penalized"
    backbone : bool, default=True
        Estimate a free common backbone Theta_0 (``False``: Theta_0 = 0).
    subspace : {"column", "row"}, default="column"
        ``"row"`` works on the transposed estimates (a shared row space); fitted
        shapes then refer to the transposes, and outputs come back untransposed.
    solver : {"auto", "torch", "cvxpy"} or Solver, default="auto"
        ``"auto"``: torch when installed, else CVXPY (recorded in ``solver_``).
    noise_scale : float, array-like of shape (n_clients,) or None, default=None
        Per-entry standard deviation of the estimates' noise; estimated robustly when
        ``None``.
    detection : {"test", "threshold"}, default="test"
        ``"threshold"``: flag ``||S_k||_F > threshold``; ``"test"``: per-client tests with a
        multiple-testing correction, refitted until the collaborative set is stable.
    test_level : float, default=0.05
    correction : str, default="fdr_bh"
        Any method of ``statsmodels.stats.multitest.multipletests``.
    subspace_source : {"refit", "low_rank"}, default="refit"
        ``"refit"``: top singular vectors of the collaborative clients' centred
        estimates; ``"low_rank"``: the column space of the decomposition's L.
    threshold : float or "auto", default="auto"
        Block-norm threshold on ``||S_k||_F`` (``"auto"``: ``sqrt(tol)`` times the root mean
        square client norm, i.e. zero up to the solver's accuracy).
    max_iter : int, default=2000
    tol : float, default=1e-6
        Relative duality gap at which the solver stops.
    device : str, default="cpu"
        Torch device of the first-order solver ("cuda" on a GPU machine).
    dtype : {"float64", "float32"}, default="float64"
        Precision of the first-order solver.
    random_state : int, RandomState instance or None, default=None
        Seeds the random starts of the concentration steps (the robust start of the
        test) and the randomized SVD of the refit on large problems. With ``None``
        (numpy's global generator) a client on the edge of the decision can change
        flag between two fits; pass an int for reproducible fits.

    Attributes
    ----------
    backbone_ : ndarray of shape (p, q)
    low_rank_, sparse_ : ndarray of shape (n_clients, p, q)
    subspace_ : ndarray of shape (p, rank_)
    rank_ : int
    contamination_scores_ : ndarray of shape (n_clients,)
        ``||S_k||_F``.
    test_statistics_ : ndarray of shape (n_clients,)
        ``||(I - P)(Theta_hat_k - mean)||_F^2``; for a collaborative client, P and the
        mean are refitted without it (so every client is tested out of sample).
    p_values_ : ndarray of shape (n_clients,)
    contaminated_ : ndarray of bool, shape (n_clients,)
    collaborative_set_ : ndarray of int
    collaborative_mean_ : ndarray of shape (p, q)
    refined_ : ndarray of shape (n_clients, p, q)
    objective_, dual_gap_ : float
    n_iter_ : int
    converged_ : bool
    solver_ : str
    alpha_, beta_, lam_ : float
    noise_scale_ : float
        Root mean square of the per-client noise scales used by the tests.
    offset_ : float
        ``decision_function = score_samples - offset_``.
    decomposition_ : DecompositionResult

    Notes
    -----
    The penalized program::

        min 1/2 sum_k ||Theta_hat_k - Theta_0 - L_k - S_k||_F^2
            + alpha ||[L_1, ..., L_K]||_* + beta sum_k ||S_k||_F

    and the refined estimate ``P Theta_hat_k + (I - P) mean_C`` of method.md section 3.

    Examples
    --------
    >>> from clairstat.datasets import make_federated_regression
    >>> data = make_federated_regression(30, 20, 5, 2, 200, 5, separation=3.0,
    ...                                  random_state=0)
    >>> est = CLAIREstimator(solver="torch").fit(data.local_estimates)
    >>> bool(np.array_equal(est.contaminated_, data.contaminated))
    True
    >>> est.rank_
    2
    """

    _parameter_constraints = {
        "rank": [Interval(numbers.Integral, 0, None, closed="left"), None],
        "alpha": [Interval(numbers.Real, 0, None, closed="left"), StrOptions({"auto"})],
        "beta": [Interval(numbers.Real, 0, None, closed="left"), StrOptions({"auto"})],
        "lam": [Interval(numbers.Real, 0, None, closed="left"), StrOptions({"auto"})],
        "formulation": [StrOptions({"penalized", "exact"})],
        "backbone": ["boolean"],
        "subspace": [StrOptions({"column", "row"})],
        "solver": [StrOptions({"auto", "torch", "cvxpy"}), Solver],
        "noise_scale": [Interval(numbers.Real, 0, None, closed="neither"), "array-like", None],
        "detection": [StrOptions({"test", "threshold"})],
        "test_level": [Interval(numbers.Real, 0, 1, closed="neither")],
        "correction": [StrOptions(_CORRECTIONS)],
        "subspace_source": [StrOptions({"refit", "low_rank"})],
        "threshold": [Interval(numbers.Real, 0, None, closed="left"), StrOptions({"auto"})],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="neither")],
        "device": [str],
        "dtype": [StrOptions({"float64", "float32"})],
        "random_state": ["random_state"],
    }

    def __init__(self, rank=None, alpha="auto", beta="auto", lam="auto",
                 formulation="penalized", backbone=True, subspace="column", solver="auto",
                 noise_scale=None, detection="test", test_level=0.05, correction="fdr_bh",
                 subspace_source="refit", threshold="auto", max_iter=2000, tol=1e-6,
                 device="cpu", dtype="float64", random_state=None):
        self.rank = rank
        self.alpha = alpha
        self.beta = beta
        self.lam = lam
        self.formulation = formulation
        self.backbone = backbone
        self.subspace = subspace
        self.solver = solver
        self.noise_scale = noise_scale
        self.detection = detection
        self.test_level = test_level
        self.correction = correction
        self.subspace_source = subspace_source
        self.threshold = threshold
        self.max_iter = max_iter
        self.tol = tol
        self.device = device
        self.dtype = dtype
        self.random_state = random_state

    # -- input -------------------------------------------------------------------
    def _read(self, X, *, reset):
        """Blocks (n_clients, p, q) in the working orientation, and whether X was 2-D."""
        if isinstance(X, (list, tuple)):
            two_d = len(X) > 0 and np.asarray(X[0]).ndim == 1
        else:
            two_d = np.asarray(X).ndim <= 2  # 1-D input gets scikit-learn's "reshape" error
        if two_d:
            X = validate_data(self, X, reset=reset, dtype=[np.float64, np.float32],
                              ensure_all_finite=False, ensure_min_samples=1)
        blocks, was_2d = check_local_estimates(X, min_clients=2 if reset else 1)
        if self.subspace == "row":
            blocks = np.ascontiguousarray(blocks.transpose(0, 2, 1))
        if reset:
            self.estimate_shape_ = blocks.shape[1:]
            self.input_2d_ = was_2d
        elif blocks.shape[1:] != self.estimate_shape_:
            raise ValueError(f"estimates have shape {blocks.shape[1:]} (working orientation), "
                             f"but the estimator was fitted on {self.estimate_shape_}.")
        return blocks

    def _output(self, blocks):
        if self.subspace == "row":
            blocks = blocks.transpose(0, 2, 1)
        return blocks[:, :, 0] if self.input_2d_ else blocks

    # -- fit ---------------------------------------------------------------------
    def fit(self, X, y=None, sample_weight=None):
        """Fit CLAIR to the clients' estimates.

        Parameters
        ----------
        X : array-like of shape (n_clients, p, q), list of (p, q) arrays, or (n_clients, p)
            Local estimates (2-D input is read as q = 1).
        y : ignored
        sample_weight : array-like of shape (n_clients,), default=None
            Client weights (sample sizes) of the collaborative mean.

        Returns
        -------
        self
        """
        self._validate_params()
        blocks = self._read(X, reset=True)
        return self._fit(blocks, blocks, sample_weight, estimate_noise_scale, self.backbone)

    def _fit_factored(self, stack, sample_weight=None):
        """Fit on a :class:`clairstat._factored.FactoredBlocks` stack (LoRA updates).

        The decomposition runs on the per-client blocks ``Y_k`` (n_clients, p, r) with no
        backbone (exact: method, section 2), the detection and the refinement on the
        factored stack; ``collaborative_mean_`` is then a ``FactoredMean`` and
        ``refined_`` a ``FactoredRefined`` (both expand to (p, t) matrices). Used by the
        aggregation rule ``"clair"``; needs ``backbone=False`` and
        ``subspace="column"``.
        """
        self._validate_params()
        if self.backbone or self.subspace != "column":
            raise ValueError("the factored fit needs backbone=False and subspace='column'.")
        n_clients, p, q = stack.shape
        self.estimate_shape_, self.input_2d_ = (p, q), False
        return self._fit(stack, stack.coef, sample_weight, factored_noise_scale, False)

    def _fit(self, blocks, solve_blocks, sample_weight, noise_estimator, backbone):
        """Decompose ``solve_blocks``, then detect and refine on ``blocks``."""
        n_clients, p, q = blocks.shape
        if self.rank is not None and self.rank > min(p, q * n_clients):
            raise ValueError(f"rank={self.rank} exceeds min(p, q * n_clients) = "
                             f"{min(p, q * n_clients)}; choose a smaller rank or None.")
        weights = check_sample_weight(sample_weight, n_clients)
        sigma = check_noise_scale(self.noise_scale, n_clients)
        estimate_noise = sigma is None
        if estimate_noise:
            sigma = np.full(n_clients, floor_noise_scale(noise_estimator(blocks), solve_blocks))
        engine = resolve_solver(self.solver, max_iter=self.max_iter, tol=self.tol,
                                device=self.device, dtype=self.dtype)
        result = clair_decompose(solve_blocks, alpha=self.alpha, beta=self.beta, lam=self.lam,
                                 formulation=self.formulation, backbone=backbone,
                                 solver=engine, noise_scale=sigma)
        self._store_decomposition(result, engine)
        start = self.contamination_scores_ <= self._threshold_value(solve_blocks)
        outcome = self._detect(blocks, weights, start, sigma, estimate_noise)
        self._store_detection(blocks, outcome, result)
        return self

    def _store_decomposition(self, result, engine):
        self.decomposition_ = result
        self.backbone_, self.low_rank_, self.sparse_ = (result.backbone, result.low_rank,
                                                        result.sparse)
        self.objective_, self.dual_gap_ = result.objective, result.dual_gap
        self.n_iter_, self.converged_ = result.n_iter, result.converged
        self.solver_ = engine.name
        self.alpha_, self.beta_, self.lam_ = result.alpha, result.beta, result.lam
        self.contamination_scores_ = np.linalg.norm(result.sparse, axis=(1, 2))

    def _threshold_value(self, blocks):
        if self.threshold != "auto":
            return float(self.threshold)
        # Zero up to the solver's accuracy: the exact program folds its feasibility
        # residual (relative size ~ tol) into S, the penalized one gives exact zeros.
        return float(np.sqrt(self.tol) * np.sqrt(np.mean(np.sum(blocks ** 2, axis=(1, 2)))))

    def _detect(self, blocks, weights, start, sigma, estimate_noise):
        if self.detection == "test":
            return detect_clients(blocks, weights, start, rank=self.rank, noise_scale=sigma,
                                level=self.test_level, correction=self.correction,
                                estimate_noise=estimate_noise, random_state=self.random_state)
        return self._threshold_outcome(blocks, weights, start, sigma)

    def _threshold_outcome(self, blocks, weights, start, sigma):
        """Threshold detection: one fit on the unflagged clients; p-values for the record."""
        if start.sum() < 2:
            warnings.warn(f"{int((~start).sum())} of {len(start)} clients have a non-zero "
                          "sparse block: every client looks contaminated; estimates are "
                          "returned unrefined (lower beta/lam or raise threshold).",
                          UserWarning, stacklevel=3)
        return detect_clients(blocks, weights, start, rank=self.rank, noise_scale=sigma,
                            level=self.test_level, correction=self.correction,
                            estimate_noise=False, iterate=False,
                            random_state=self.random_state)

    def _low_rank_basis(self, result, rank):
        from ._objective import stack_blocks
        left, sing, _ = np.linalg.svd(stack_blocks(result.low_rank), full_matrices=False)
        if rank is None:
            rank = int(np.sum(sing > np.sqrt(self.tol) * max(sing.max(initial=0.0), 1e-300)))
        return left[:, :rank]

    def _store_detection(self, blocks, outcome, result):
        basis = outcome.basis
        if self.subspace_source == "low_rank":
            basis = self._low_rank_basis(result, self.rank)
        self.subspace_, self.rank_ = basis, basis.shape[1]
        self.contaminated_ = outcome.contaminated
        self.collaborative_set_ = np.flatnonzero(~outcome.contaminated)
        self.collaborative_mean_ = outcome.mean
        self.client_noise_scale_ = outcome.noise_scale
        self.noise_scale_ = float(np.sqrt(np.mean(outcome.noise_scale ** 2)))
        self.degrees_of_freedom_ = outcome.degrees_of_freedom
        self.n_detection_rounds_ = outcome.n_rounds
        if self.subspace_source == "refit":  # what the detection tested
            self.test_statistics_, self.p_values_ = outcome.statistics, outcome.p_values
        else:
            self.test_statistics_ = projection_statistics(blocks, outcome.mean, basis)
            self.p_values_ = self._p_values(self.test_statistics_, outcome.noise_scale)
        self.refined_ = self._output(refine(blocks, basis, outcome.mean, self.contaminated_))
        self.offset_ = _offset(np.log(np.maximum(self.p_values_, 1e-300)), self.contaminated_,
                               self.test_level)
        if self.contaminated_.all():
            warnings.warn("every client was flagged as contaminated; refined_ holds the "
                          "unchanged local estimates.", UserWarning, stacklevel=3)

    def _p_values(self, statistics, noise):
        """P-values under the null the detection used (its scale and degrees of freedom)."""
        nu = self.degrees_of_freedom_
        df = (self.estimate_shape_[0] - self.rank_) * self.estimate_shape_[1]
        if nu == 0 or df == 0:
            return np.ones_like(statistics)
        return stats.chi2.sf(statistics / noise ** 2 * nu / df, nu)

    # -- outlier-detector and transformer interface -------------------------------
    def score_samples(self, X):
        """Log p-value of each client's off-subspace test (higher: more collaborative).

        Parameters
        ----------
        X : array-like of shape (n_clients, p, q) or (n_clients, p)

        Returns
        -------
        scores : ndarray of shape (n_clients,)
        """
        check_is_fitted(self)
        blocks = self._read(X, reset=False)
        stat = projection_statistics(blocks, self.collaborative_mean_, self.subspace_)
        p_values = self._p_values(stat, self.noise_scale_)
        return np.log(np.maximum(p_values, 1e-300))

    def decision_function(self, X):
        """``score_samples(X) - offset_``: negative for contaminated clients."""
        return self.score_samples(X) - self.offset_

    def predict(self, X):
        """+1 for collaborative clients, -1 for contaminated ones."""
        return np.where(self.decision_function(X) >= 0, 1, -1)

    def fit_predict(self, X, y=None, sample_weight=None):
        """Fit, then return the fitted flags as +1 / -1."""
        return np.where(self.fit(X, sample_weight=sample_weight).contaminated_, -1, 1)

    def transform(self, X):
        """Refine clients with the fitted subspace and collaborative mean.

        Clients predicted contaminated are returned unchanged.

        Returns
        -------
        refined : ndarray of the input's shape
        """
        check_is_fitted(self)
        blocks = self._read(X, reset=False)
        flagged = self.predict(X) == -1
        return self._output(refine(blocks, self.subspace_, self.collaborative_mean_, flagged))

    def summary(self):
        """A statsmodels-style report of the fit (see :class:`clairstat.CLAIRSummary`)."""
        from ._summary import CLAIRSummary
        check_is_fitted(self)
        return CLAIRSummary(self)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags


def _offset(log_p, contaminated, level):
    """A cut in log p-value that separates the fitted flags (so predict == fit flags)."""
    flagged, kept = log_p[contaminated], log_p[~contaminated]
    if flagged.size and kept.size:
        return 0.5 * (flagged.max() + kept.min())
    if kept.size:  # nothing flagged: Bonferroni cut, kept below every fitted score
        return min(np.log(level / len(log_p)), kept.min() - np.log(2.0))
    return flagged.max() + np.log(2.0)

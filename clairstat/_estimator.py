"""``CLAIREstimator``: the scikit-learn shell around :func:`clairstat.clair_decompose`."""

from __future__ import annotations

import contextlib
import contextvars
import math
import dataclasses
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
import warnings
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike
from sklearn.base import BaseEstimator, OutlierMixin, TransformerMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from ._decompose import clair_decompose
from ._detection import refine, refit_subspace, select_rank
from ._reduced import FactoredBlocks, stack_caches
from ._inference import NoiseKnowledge, detect_clients
from ._null import MAD_EFFICIENCY, MIN_OTHERS, NoiseCovariance, PredictiveNull
from ._ols import LocalOLS
from ._threads import thread_limits
from ._tuning import estimate_noise_scale, factored_noise_scale, floor_noise_scale
from ._validation import (aligned_frames, as_real_array, check_device, check_local_estimates,
                          check_noise_cov, check_noise_scale, check_sample_weight,
                          data_scale, refuse_mapping, user_stacklevel, VANISHING_WEIGHT)
from .solvers import Solver, resolve_solver
from .solvers._base import _rescaled

if TYPE_CHECKING:
    from ._summary import CLAIRSummary

__all__ = ["CLAIREstimator"]

# The rank rule with rank_support = s runs once per sub-stack without s - 1 clients:
# C(K, s - 1) times per fit of the subspace, refused beyond this many.
_MAX_SUB_STACKS = 20_000

# Every method of ``statsmodels.stats.multitest.multipletests`` that adjusts p-values
# for a family-wise error rate or a false discovery rate, by name or alias (a newcomer's
# review found "fdr_gbs" refused while the docstring said "any method"); all of them in
# statsmodels 0.14 and 0.15. Not "lfdr" (statsmodels 0.15's local-fdr support line,
# absent from 0.14 and, in 0.15, from installs with scipy below 1.12: a review).
# tests/test_hostile_estimator.py checks the set against the installed statsmodels.
_CORRECTIONS = {"b", "bonf", "bonferroni", "s", "sidak", "h", "holm", "hs", "holm-sidak",
                "sh", "simes-hochberg", "ho", "hommel",
                "fdr_bh", "fdr_i", "fdr_p", "fdri", "fdrp",
                "fdr_by", "fdr_n", "fdr_c", "fdrn", "fdrcorr",
                "fdr_tsbh", "fdr_2sbh", "fdr_tsbky", "fdr_2sbky", "fdr_twostage",
                "fdr_gbs"}


class CLAIREstimator(OutlierMixin, TransformerMixin, BaseEstimator,
                     auto_wrap_output_keys=None):
    """Collaborative low-rank estimation with contaminated clients (CLAIR).

    Fits the decomposition of the clients' estimates into a backbone, a shared low-rank
    part and one sparse block per contaminated client, flags contaminated clients with
    calibrated per-client tests, recovers the shared subspace on the collaborative set,
    and refines every collaborative client's estimate.

    Parameters
    ----------
    rank : int or None, default=None
        Dimension of the shared subspace. ``None`` chooses it at every detection round
        by the noise-edge rule (:func:`clairstat._detection.select_rank`): singular
        values of the collaborative clients' centred stack above 1.1 times the largest
        singular value pure noise would give, after a common rescaling of rows and
        outputs to equal noise (from ``noise_cov`` when given, else from the
        decomposition's residual).
    alpha, beta, lam : float or "auto", default="auto"
        Penalties of the nuclear norm (alpha), of the client blocks (beta) and, for the
        exact program, of the blocks against the nuclear norm (lam); see
        :func:`clairstat.clair_decompose`. ``"auto"`` sets them from the noise scale
        (docs/method_notes.md, "Default tuning"). Given values are in the data's units.
    formulation : {"penalized", "exact"}, default="penalized"
        ``"penalized"``: least squares plus both penalties (noisy estimates).
        ``"exact"``: minimise ``||L||_* + lam sum_k ||S_k||_F`` subject to the estimates
        being exactly ``Theta_0 + L_k + S_k`` (noiseless theory; recovery checks).
    backbone : bool, default=True
        Estimate a free common backbone Theta_0 (``False``: Theta_0 = 0, e.g. LoRA
        updates, which are already differences from the base weights).
    subspace : {"column", "row"}, default="column"
        ``"row"`` works on the transposed estimates (a shared row space); fitted
        shapes then refer to the transposes, and outputs come back untransposed.
    solver : {"auto", "torch", "cvxpy"} or Solver, default="auto"
        ``"auto"``: torch when installed, else CVXPY (recorded in ``solver_``).
    noise_scale : float, array-like of shape (n_clients,) or None, default=None
        Known per-entry standard deviation of the estimates' noise (isotropic; one per
        client or one for all). The tests then use it as it is (exact chi^2 moments,
        raised, never lowered, if the statistics show more noise). ``None``: estimated
        (see ``noise_cov`` in :meth:`fit` for a full covariance).
    detection : {"test", "threshold"}, default="test"
        ``"test"``: per-client tests with a multiple-testing correction, the mean and
        subspace refitted on the clients kept until the set is the one its own test
        keeps (:func:`clairstat._detection.detect_clients`). ``"threshold"``: flag
        ``||S_k||_F > threshold`` and fit once on the others (p-values for the record).
    test_level : float, default=0.05
        Level of the corrected tests: the false discovery rate (the ``"fdr*"``
        corrections, aliases included) or the family-wise error rate (the others) over
        the training
        clients; for a new client (:meth:`predict`), its own test's level.
    correction : str, default="fdr_bh"
        A method of ``statsmodels.stats.multitest.multipletests``, by its name or an
        alias, in lower case ("fdr_bh", "holm", "bonferroni", "fdr_gbs", ...; every
        family-wise and false-discovery-rate method, not the local-fdr "lfdr"): how the
        training clients' p-values are adjusted.
    subspace_source : {"refit", "low_rank"}, default="refit"
        ``"refit"``: top singular vectors of the collaborative clients' centred
        estimates, the subspace the tests use. ``"low_rank"``: the column space of the
        decomposition's L for ``subspace_`` and the refinement (the tests still use the
        refit: L's column space is shrunk by the nuclear penalty and tilted by the
        backbone).
    threshold : float or "auto", default="auto"
        Block-norm threshold on ``||S_k||_F`` that gives the detection's starting set
        (and the flags with ``detection="threshold"``). ``"auto"``: ``sqrt(tol)`` times
        the root mean square client norm, i.e. zero up to the solver's accuracy.
    max_iter : int, default=2000
        Iteration cap of the solver (torch: proximal-gradient iterations; CVXPY: passed
        to SCS/Clarabel). Reaching it raises a ``ConvergenceWarning``.
    tol : float, default=1e-6
        Relative duality gap at which the solver stops.
    device : str, default="cpu"
        Torch device of the first-order solver ("cuda" on a GPU machine).
    dtype : {"float64", "float32"}, default="float64"
        Precision of the first-order solver.
    n_jobs : int or None, default=None
        Threads of torch and of the BLAS/OpenMP pools for the duration of the fit
        (:func:`clairstat._threads.thread_limits`, set together and restored after):
        ``None`` chooses from the problem's size (one thread for small problems: a
        second thread only pays off above about 1e8 flops per solver iteration; one
        thread in a process run under ``nice``, whose pools' threads yield to other
        jobs, :func:`clairstat._threads.threads_for_size`),
        ``-1`` every CPU the process may use, ``-k`` all but ``k - 1``, a positive int
        that many, at most the usable CPUs. Pools left unpinned spin against each
        other: a fit beside a second fit ran 38x slower unpinned than with this policy
        (benchmarks/RESULTS.md).
        With two or more threads, the robust start's independent concentration chains
        (and, on factored LoRA stacks, the members' leave-one-out refits) run on that
        many Python threads with one BLAS thread each
        (:func:`clairstat._threads.map_in_threads`).
    random_state : int, RandomState instance or None, default=None
        Seeds the random starts of the concentration steps (the robust start of the
        test). With ``None``
        (numpy's global generator) a client on the edge of the decision can change
        flag between two fits; pass an int for reproducible fits.
    rank_support : int, default=1
        With ``rank=None``: how many clients a direction must be carried by to count as
        shared. The rank rule's count is lowered to its smallest value over the
        collaborative stacks without any ``rank_support - 1`` of the clients (each
        sub-stack with its own noise edge; :func:`clairstat._detection.select_rank`),
        so that a direction that ``rank_support - 1`` clients alone carry (contaminated
        clients corrupted alike, which the rule otherwise takes for a shared direction
        when the clients are few) is left to the tests. ``1``: the rule as it is.
        ``3``: a direction must survive the removal of any two clients. With
        ``noise_cov``, two clients of a real regression corrupted alike were flagged
        with power 1.00 where the rule as it is gave 0.85-1.00 (development data, 8 to
        20 clients), and 0.69-0.98 where it gave 0.14-0.89 (a held-out pair, six
        clients, whose null shares exceeded 0.10 under either rule, 0.12-0.24: the
        classical OLS covariance understated the clients' spread; with
        ``local_ols(cov_type="HC3")`` on a later held-out set of three, null shares
        0.01-0.03 and power 0.98-1.00; benchmarks/RESULTS.md). The price: a direction that
        ``rank_support - 1`` benign clients alone share is taken for contamination, a
        weak shared direction is dropped more often (ten synthetic clients: a rank-2
        subspace near the edge kept in 0.4 of the fits against 0.94, RESULTS.md), and
        the rule runs ``C(K, rank_support - 1)`` times per fit of the subspace.
        Sub-stacks keep at least three clients: on a collaborative set of fewer than
        ``rank_support + 2`` clients (the later rounds of a fit of six clients with two
        flagged, say) the rule is used as it is there. Ignored when ``rank`` is given;
        dense estimates only (not a FactoredBlocks stack); at most 20 000 sub-stacks.
        With ``1``, a given noise (``noise_cov`` or ``noise_scale``) and 4 to 20
        collaborative clients, the fit reruns the rule with a support of three and
        warns when that keeps fewer directions: two clients corrupted alike, or
        clients noisier than their covariance says (benchmarks/alike_corruption.py:
        the warning in every split where the defaults missed such a pair at ten
        sites).

    Attributes
    ----------
    backbone_ : ndarray of shape (p, q)
        The decomposition's common part Theta_0 (zero with ``backbone=False``).
    low_rank_, sparse_ : ndarray of shape (n_clients, p, q)
        The decomposition's blocks L_k and S_k.
    subspace_ : ndarray of shape (p, r), r = ``rank_``
        Orthonormal basis of the shared subspace, fitted on ``collaborative_set_``: with
        ``noise_cov``, in the noise's frame and mapped back; where the detection ran in
        the frame of robust scales (``robust_frame_``), refitted in the data's units on
        the same set with the tests' rank (``test_rank_``); with
        ``subspace_source="low_rank"``, L's column space.
    rank_ : int
        Its dimension (given, or chosen by the rule on the final collaborative set;
        with ``subspace_source="low_rank"``, the numerical rank of L, which can differ
        from ``test_rank_``).
    test_rank_ : int
        The dimension of the refitted subspace the tests used (``rank_`` unless
        ``subspace_source="low_rank"``).
    contamination_scores_ : ndarray of shape (n_clients,)
        ``||S_k||_F``: the decomposition's evidence, which seeds the detection.
    test_statistics_ : ndarray of shape (n_clients,)
        Every client's off-subspace statistic, out of sample: a collaborative client
        against P and the mean refitted without it, the others against ``subspace_``
        and ``collaborative_mean_``. With a known covariance, the sum of squared
        z-scores of ``(I - P)(Theta_hat_k - mean)`` (rows and outputs divided by their
        noise scales; dimensionless). Without one, on dense estimates, the detection
        runs in the frame ``D_r Theta_hat_k D_c`` of the rows' and outputs' robust noise
        scales (their spread over the clients once the decomposition's backbone and
        low-rank part are removed; ``D_r`` normalised so that the framed estimates'
        largest entry is 1) and the statistic is ``||(I - P)(D_r (Theta_hat_k - mean)
        D_c)||_F^2`` there (dimensionless; ``P`` the frame's subspace): an intercept's
        spread no longer drowns the slopes', and outputs on different scales weigh
        alike (docs/method_notes.md, section 8). Where ``robust_frame_`` is ``False``
        (noiseless or identical clients, ``formulation="exact"``, LoRA stacks),
        ``||(I - P)(Theta_hat_k - mean)||_F^2`` in the data's units squared.
    p_values_ : ndarray of shape (n_clients,)
        P-values of ``T_k`` under its null (``null_scale_ * chi^2`` with
        ``degrees_of_freedom_``; an F when the scale was estimated): see
        docs/method_notes.md, "The null of the per-client test".
    adjusted_p_values_ : ndarray of shape (n_clients,)
        ``p_values_`` adjusted by ``correction``; a client is flagged when its adjusted
        p-value is at most ``test_level`` (when ``detection_converged_``).
    null_scale_, degrees_of_freedom_ : ndarray of shape (n_clients,)
        Each client's null ``T_k ~ null_scale_k * chi^2_{df_k}`` (Satterthwaite's
        moment match to the statistic's mean and variance), or, when the scale was
        estimated from the clients (``null_scale_df_`` finite),
        ``T_k / (null_scale_k df_k) ~ F(df_k, null_scale_df_)``. For a LoRA stack
        (:class:`~clairstat._reduced.FactoredBlocks`) each statistic's cube root is
        predicted from the other clients' (a Student t, docs/method_notes.md, section
        8): ``null_scale_`` is NaN and ``degrees_of_freedom_`` are the t's.
    null_scale_df_ : float
        Degrees of freedom of the estimated scale (``inf``: the scale was not
        estimated, the null is the scaled chi^2; NaN for a LoRA stack).
    null_kind_ : {"chi2", "F", "predictive"}
        The null's family: the scaled chi^2, the F of an estimated scale, or (LoRA
        stacks) each statistic's cube root predicted from the other clients' (a t).
    null_scale_factor_ : float
        With ``noise_cov`` or ``noise_scale``: the factor by which the calibration
        raised the given noise's null scale so that the calibration clients' median
        p-value is 1/2, after any widening (which keeps the null's mean): the
        calibrated null's mean over the mean the given noise implies. Never below 1;
        near 1, the given noise accounts for the clients' statistics; large, each
        client is tested against the median client rather than its own noise (the
        statistics sit higher than the noise implies, or spread so much more that the
        widened null's median fell far below its mean). ``nan`` when the noise was
        estimated (the scale is then the estimate itself) and on factored LoRA stacks
        (each statistic is predicted from the others' whatever noise is given). The
        rank rule's edge is set by the given noise: when, rerun at the calibrated
        noise (and counting only directions no single client carries alone), it keeps
        fewer directions than the fit did, the fit warns and names that rank (with
        ``rank=None``; a covariance understated twofold had let one contaminated
        client's push count as a shared direction). The factor is never lowered: a
        covariance given too large (such as an OLS ``cov_params()``, which holds the
        residual variance, paired with the residual covariance again) is kept as given,
        and only clients that deviate far more than it are then flagged (1 000 times
        too large, a site whose slopes were flipped got p = 0.995). No warning says so:
        one that fired where the statistics' median sat below a quarter of the given
        noise's also fired on 0.30 of the uncorrupted splits of a real dataset whose
        classical covariance is far off (``benchmarks/overstated_noise.py``).
    null_spread_df_ : float
        Degrees of freedom implied by the spread of the calibration clients'
        log-statistics (their MAD); a client's null whose model df exceed it was
        widened to it (same mean, heavier tail). ``inf`` when not estimated (fewer
        than 8 clients) or on factored LoRA stacks, whose null is read off the other
        clients' statistics directly (``degrees_of_freedom_`` are its Student t's).
    noise_model_ : {"noise_cov", "noise_scale", "estimated"}
        Where the null came from.
    robust_frame_ : bool
        Whether the detection ran in the frame of robust row and output scales (see
        ``test_statistics_``): dense estimates without ``noise_cov`` or ``noise_scale``
        whose residual spreads measurably somewhere. ``False`` on noiseless or
        identical clients, with ``formulation="exact"`` (its residual is the solver's
        feasibility error), on LoRA stacks and with a given noise.
    contaminated_ : ndarray of bool, shape (n_clients,)
        The flags: the clients outside ``collaborative_set_``.
    collaborative_set_ : ndarray of int
        Indices of the clients the final fit used.
    collaborative_mean_ : ndarray of shape (p, q)
        Their ``sample_weight``-weighted mean (a lazy factored object for LoRA stacks).
    refined_ : ndarray of the input's shape
        ``P Theta_hat_k + (I - P) collaborative_mean_`` for collaborative clients, moved
        back towards their own estimates by ``refinement_keep_`` (``kappa``):
        ``(1 - kappa) (P Theta_hat_k + (I - P) collaborative_mean_) + kappa Theta_hat_k``;
        a flagged client's own estimate, unchanged. ``P`` is ``projector_``.
    refinement_keep_ : float
        ``kappa = 1 - 1 / null_scale_factor_`` with a given noise (``noise_cov`` or
        ``noise_scale``), 0 where that factor is 1 or not defined (without a given
        noise, and on factored LoRA stacks; also where a given noise so small that its
        statistics leave float64's range left the factor at 1): the fraction of each
        collaborative client's deviation off the subspace that the refinement keeps. A factor ``f``
        says the clients' off-subspace statistics are ``f`` times what their noise
        implies; were the deviations normal with variance ``f - 1`` times the noise's,
        keeping ``1 - 1/f`` of each is their posterior mean, where pooling them all
        replaced the noise by a bias ``f - 1`` times as large (on statsmodels' grunfeld
        data, firms as clients, the projection alone predicted held-out years 4-5 times
        worse than each firm's own regression; with ``kappa`` 1.2-1.4 times, and a
        third of the firms better than by their own; measured on that one dataset, the
        one the rule was chosen on:
        benchmarks/RESULTS.md, "The refinement shrunk by the null scale factor").
        Without a given noise nothing measures how far the clients differ: there the
        refinement pools along the fitted subspace whatever they are (dietox's pigs,
        which differ in weight and growth: 4 times their own estimates' error).
    projector_ : ndarray of shape (p, p)
        The projector onto ``subspace_`` (``U``) that ``refined_`` and :meth:`transform`
        apply (before ``refinement_keep_`` gives back part of each client's deviation off
        the subspace): with ``noise_cov``, along the noise's metric,
        ``U (U^T Rbar^-1 U)^-1 U^T Rbar^-1`` with ``Rbar`` the clients' average row
        covariance, each normalised to determinant 1 (docs/method_notes.md, section 8);
        otherwise (and with ``subspace_source="low_rank"``) the orthogonal ``U U^T``,
        also where the detection ran in the frame of robust scales (``subspace_`` is then
        refitted in the data's units: a projection along the estimated scales lost
        accuracy on simulated clients, and the frame's subspace projected orthogonally
        leaked a large coefficient into the others).
        With ``subspace="row"`` the roles of rows and columns swap (shape (q, q)).
    detection_converged_ : bool
        Whether the refit-and-test loop ended on a set its own test reproduces; if not
        (a cycle), the collaborative set keeps every client some round of the cycle
        kept, so some members may be kept although the final test rejects them (their
        adjusted p-value is below ``test_level`` while ``contaminated_`` is False), and
        a client no round kept stays flagged although the final test, on the larger
        set, may keep it (adjusted p-value above ``test_level``); a warning names both.
    n_detection_rounds_ : int
        Refits the detection made.
    objective_, dual_gap_ : float
        The program's objective and absolute duality gap at the returned point.
    n_iter_ : int
        Solver iterations.
    converged_ : bool
        Whether the solver met its duality-gap certificate.
    solver_ : str
        The backend used: ``"torch"``, ``"cvxpy"`` (the conic solver it called is named
        in ``decomposition_.status``, e.g. ``"SCS: optimal"``), or a given
        :class:`~clairstat.solvers.Solver`'s ``name``.
    alpha_, beta_, lam_ : float
        The penalties used (in the data's units).
    noise_scale_ : float
        Root mean square of ``client_noise_scale_``.
    client_noise_scale_ : ndarray of shape (n_clients,)
        Each client's noise scale behind the penalties (and behind the rank rule where
        the detection runs in the data's units, not in a frame). Without ``noise_cov``
        a per-entry noise standard deviation in the data's units (``noise_scale`` as
        given, or the one estimated for every client). With ``noise_cov`` a
        summary of the covariance's size, not the standard deviation of any one entry
        (those are ``sqrt(diag(row_cov_k)) sqrt(diag(col_cov_k))^T``, and their units
        differ by coefficient): the square root of the geometric-mean eigenvalues of
        ``row_cov_k`` and ``col_cov_k`` (``det^{1/p} det^{1/q}``), which a change of a
        covariate's or an output's units multiplies alike for every client, times the
        client's shape's mean eigenvalue in the clients' common whitened frame (about 1
        for a client of the average shape: 0.99-1.04 on fair split into 14 sites, where
        each client's standard errors range over a factor 42-94).
    offset_ : float
        ``log(test_level)``: ``decision_function = score_samples - offset_``.
    decomposition_ : DecompositionResult
        The solver's full result (history, status, time), in the data's units.
    estimate_shape_ : tuple of int
        ``(p, q)`` in the working orientation.
    n_features_in_ : int
        Set for 2-D input (``(n_clients, p)``, read as q = 1), as scikit-learn does.
    client_names_ : list of str
        The training clients' names, in their order, when the fit was given a
        :class:`~clairstat.LocalOLS` made from mappings (``local_ols({name: design},
        {name: response})``); :meth:`summary` labels its rows with them. Not set
        otherwise (as scikit-learn's ``feature_names_in_``).

    Notes
    -----
    The penalized program::

        min 1/2 sum_k ||Theta_hat_k - Theta_0 - L_k - S_k||_F^2
            + alpha ||[L_1, ..., L_K]||_* + beta sum_k ||S_k||_F

    and the refined estimate ``P Theta_hat_k + (I - P) mean_C``
    (docs/method_notes.md).

    The fit works in units of the data's largest entry, so scaling the estimates by any
    positive factor leaves the flags unchanged and scales every estimate (quadratic
    attributes such as ``test_statistics_`` become ``inf`` beyond float64's range).

    Training clients and new clients (:meth:`score_samples`): a row equal to a training
    client up to round-off (the same data refitted, e.g. with the columns in another
    order) gets its fitted, out-of-sample, multiplicity-adjusted test; any other row is
    a new client, tested on its own at ``test_level`` against the fitted model.

    Model selection: there is no ``score`` method. No held-out quantity of the clients
    measures a fit without their truths (the off-subspace residual of held-out clients
    falls with the rank whatever the truth), so ``GridSearchCV`` needs ``scoring=``, a
    callable of your own criterion. A :class:`clairstat.LocalOLS` is split into folds of
    clients like an array, each fold with its own covariance and sample sizes
    (``GridSearchCV(...).fit(ols)``); a ``noise_cov`` passed beside plain estimates is
    not split (pass the LocalOLS instead).

    ``set_output`` is not offered: ``transform`` returns (n_clients, p, q) blocks,
    which no data frame holds.

    Examples
    --------
    >>> from clairstat.datasets import make_federated_regression
    >>> data = make_federated_regression(30, 20, 5, 2, 200, 5, separation=3.0,
    ...                                  random_state=0)
    >>> est = CLAIREstimator(solver="torch", random_state=0).fit(data.local_estimates)
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
        "n_jobs": [numbers.Integral, None],
        "random_state": ["random_state"],
        "rank_support": [Interval(numbers.Integral, 1, None, closed="left")],
    }

    def __init__(self, rank=None, alpha="auto", beta="auto", lam="auto",
                 formulation="penalized", backbone=True, subspace="column", solver="auto",
                 noise_scale=None, detection="test", test_level=0.05, correction="fdr_bh",
                 subspace_source="refit", threshold="auto", max_iter=2000, tol=1e-6,
                 device="cpu", dtype="float64", n_jobs=None, random_state=None,
                 rank_support=1):
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
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.rank_support = rank_support

    def __setstate__(self, state):
        # an estimator pickled before rank_support existed fitted with the rule as it is
        state.setdefault("rank_support", 1)
        if "noise_model_" in state:  # fitted before the frame of robust scales
            state.setdefault("robust_frame_", False)
        super().__setstate__(state)

    # -- input -------------------------------------------------------------------
    def _read(self, X, *, reset, noise_cov=None):
        """Blocks (n_clients, p, q) in the working orientation, and whether X was 2-D.
        ``noise_cov``: the covariance given beside ``X`` (labelled estimates that need
        reordering are refused with it)."""
        if isinstance(X, FactoredBlocks):
            if not reset:
                raise TypeError("score_samples, predict and transform take dense estimates "
                                "(n_clients, p, q), not a FactoredBlocks stack.")
            if self.backbone or self.subspace != "column":
                raise ValueError("a FactoredBlocks stack (LoRA updates) is fitted with "
                                 "backbone=False and subspace='column'.")
            # the updates' (p, t), not the factors' (p, r): new clients are dense
            self.estimate_shape_, self._input_2d = X.dense_shape[1:], False
            self._frame_labels = None  # never an earlier fit's labels
            return X
        refuse_mapping(X)
        if getattr(X, "ndim", 0) == 1 and getattr(X, "dtype", None) == object:
            X = list(X)  # a pandas Series or an object array of per-client tables
        labels = None
        if isinstance(X, (list, tuple)):
            # labelled per-client tables: read by their labels, new clients' in the
            # fitted clients' order (aligned_frames)
            X, labels, moved = aligned_frames(list(X), None if reset else
                                              getattr(self, "_frame_labels", None))
            if moved and noise_cov is not None:
                raise ValueError(
                    "the clients' labelled estimates are not all in one order, and "
                    "noise_cov, read by position, would not follow them: give every "
                    "client's table (and its covariance) in one order, or use "
                    "clairstat.local_ols, whose LocalOLS realigns both by name.")
        if reset:
            self._frame_labels = labels
        X = as_real_array(X, "local_estimates")
        if isinstance(X, np.ndarray) and X.dtype == object and X.ndim == 1:
            X = list(X)  # an object array of per-client blocks: read (and checked) as a list
        row = self._orientation(reset) == "row"
        if isinstance(X, (list, tuple)):
            two_d = len(X) > 0 and np.asarray(X[0]).ndim == 1
        else:
            two_d = np.asarray(X).ndim <= 2  # 1-D input gets scikit-learn's "reshape" error
        shape = tuple(int(v) for v in getattr(self, "estimate_shape_", (0, 0)))
        shape = shape[::-1] if row else shape
        if (two_d and not reset and not self._input_2d and np.asarray(X).ndim == 2
                and (shape[1] != 1 or np.asarray(X).shape == shape)):
            # q = 1 fits take (n_clients, p) as they always did, unless it is (p, 1)
            raise ValueError(
                f"this estimator was fitted on (n_clients, p, q) = (., {shape[0]}, "
                f"{shape[1]}) blocks; a 2-D array of shape {np.asarray(X).shape} would be "
                "read as (n_clients, p) with q = 1. One client's (p, q) estimate: pass "
                "it as X[None], of shape (1, p, q).")
        if two_d:
            X = validate_data(self, X, reset=reset, dtype=[np.float64, np.float32],
                              ensure_all_finite=False, ensure_min_samples=1)
        blocks, was_2d = check_local_estimates(X, min_clients=2 if reset else 1)
        if row:
            blocks = np.ascontiguousarray(blocks.transpose(0, 2, 1))
        if reset:
            self.estimate_shape_ = blocks.shape[1:]
            self._input_2d = was_2d
            if not two_d:  # the width and column names of an earlier 2-D fit
                self.__dict__.pop("n_features_in_", None)
                self.__dict__.pop("feature_names_in_", None)
        elif blocks.shape[1:] != self.estimate_shape_:
            # in the user's (p, q), not the transposed working orientation of a row fit
            given, fitted = blocks.shape[1:], tuple(int(v) for v in self.estimate_shape_)
            if row:
                given, fitted = given[::-1], fitted[::-1]
            raise ValueError(f"estimates have (p, q) = {tuple(int(v) for v in given)}, "
                             f"but the estimator was fitted on (p, q) = {fitted}.")
        return blocks

    @property
    def projector_(self) -> np.ndarray:
        """The projector ``refined_`` applies before ``refinement_keep_`` (see the
        class's attributes)."""
        check_is_fitted(self)
        projector = getattr(self, "_projector", None)
        return self.subspace_ @ self.subspace_.T if projector is None else projector

    def _orientation(self, reset=False):
        """The ``subspace`` of the fit (``reset``: of the fit under way). The fitted
        attributes are in its working orientation: a ``set_params(subspace=...)`` since
        the fit must not transpose what :meth:`predict` and :meth:`transform` read and
        return (on square estimates it silently flagged every client, a review)."""
        fitted = getattr(self, "_fit_params", None)  # absent from older pickles
        return self.subspace if reset or not fitted else fitted["subspace"]

    def _output(self, blocks):
        if self._orientation() == "row":
            blocks = blocks.transpose(0, 2, 1)
        return blocks[:, :, 0] if self._input_2d else blocks

    # -- fit ---------------------------------------------------------------------
    def fit(self, X: ArrayLike | FactoredBlocks, y: None = None,
            sample_weight: ArrayLike | None = None,
            noise_cov: tuple[ArrayLike, ArrayLike] | None = None) -> CLAIREstimator:
        """Fit CLAIR to the clients' estimates.

        Parameters
        ----------
        X : array-like of shape (n_clients, p, q), list of (p, q) arrays, (n_clients, p), LocalOLS, or FactoredBlocks
            Local estimates (2-D input is read as q = 1). Torch tensors (any float dtype,
            bf16 included, with or without ``requires_grad``) are read as float64. A
            :class:`clairstat.LocalOLS` (from :func:`clairstat.local_ols`) gives its
            ``estimates``, with its ``n_samples`` as ``sample_weight`` and its
            ``noise_cov``: the path whose tests are calibrated on real regressions
            (passing either argument too is an error; one with an output that has no
            residual variance, which ``local_ols`` warns about, is refused). A
            :class:`clairstat._reduced.FactoredBlocks` stack holds LoRA updates in
            factored form (needs ``backbone=False``); its fitted ``collaborative_mean_``
            and ``refined_`` are then lazy factored objects.
        y : ignored
        sample_weight : array-like of shape (n_clients,), default=None
            Client weights of the collaborative mean (sample sizes); non-negative, at
            least two positive. ``None``: equal weights. A zero weight is the limit of
            a vanishing one: the client is tested but adds nothing to a mean with
            weighted members, and a set with none (its weighted clients flagged) is
            averaged equally. They weight the mean only:
            without ``noise_cov`` or ``noise_scale`` the tests take every client's
            estimate as equally noisy, so clients with fewer samples are flagged more
            often (a warning says so when the weights differ more than two-fold).
        noise_cov : tuple (row_cov, col_cov), default=None
            The estimates' noise covariance, ``cov(vec Theta_hat_k) = col_cov_k (x)
            row_cov_k``, with ``row_cov`` of shape (p, p) or (n_clients, p, p) and
            ``col_cov`` of shape (q, q) or (n_clients, q, q) (OLS:
            ``(X_k^T X_k)^{-1}`` and the residual covariance; :func:`clairstat.local_ols`
            returns them). Each client is then tested with the sum of squared z-scores of
            its off-subspace residual, whose null matches the exact first two moments
            under the covariance; the clients may raise the noise's scale (never lower
            it) when their statistics show it understated (docs/method_notes.md,
            section 8). The penalties and the rank rule use its average. ``None``: the
            null is estimated from the clients (a shared Kronecker shape and a robust
            scale). Passing both ``noise_cov`` and ``noise_scale`` is an error.

        Returns
        -------
        self
        """
        self._validate_params()
        if isinstance(self.rank, (bool, np.bool_)):  # an Integral to the constraints
            raise TypeError(f"rank must be an int or None, got {self.rank!r}.")
        if isinstance(self.rank_support, (bool, np.bool_)):
            raise TypeError(f"rank_support must be an int, got {self.rank_support!r}.")
        check_device(self.device)
        names = _ols_names(X)
        clients = getattr(X, "client_names", None) if isinstance(X, LocalOLS) else None
        # how a LocalOLS's covariance was estimated, for the report (None: given by hand)
        cov_type = getattr(X, "cov_type", "nonrobust") if isinstance(X, LocalOLS) else None
        X, sample_weight, noise_cov = _unpack_ols(X, noise_cov, sample_weight, "fit",
                                                  self.noise_scale)
        # A fit that fails (invalid input found late, an interrupt) leaves the estimator
        # as it was: a fitted one keeps its fit, whole, not a new shape with old results.
        before = dict(self.__dict__)
        try:
            blocks = self._read(X, reset=True, noise_cov=noise_cov)
            caches = stack_caches(blocks) if isinstance(blocks, FactoredBlocks) \
                else contextlib.nullcontext()
            with thread_limits(self.n_jobs, getattr(blocks, "coef", blocks).shape), caches:
                self._fit(blocks, sample_weight, noise_cov)
            self._local_ols_names = names
            self._fit_params["cov_type"] = cov_type
            # as scikit-learn's feature_names_in_: set by a fit that has names, and
            # gone after one that has none (never a previous fit's names)
            if clients is not None:
                self.client_names_ = list(clients)
            else:
                self.__dict__.pop("client_names_", None)
            return self
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise

    def _fit(self, blocks, sample_weight, noise_cov):
        n_clients, p, q = blocks.shape
        if self.rank is not None and self.rank > min(p, q * n_clients):
            raise ValueError(f"rank={self.rank} exceeds min(p, q * n_clients) = "
                             f"{min(p, q * n_clients)}; choose a smaller rank or None.")
        weights = check_sample_weight(sample_weight, n_clients)
        factored = isinstance(blocks, FactoredBlocks)
        # Work in units of the largest entry (overflow-safe, scale-equivariant); LoRA
        # stacks keep theirs (their lazy mean and refinement refer to the stack).
        scale = 1.0 if factored else data_scale(blocks)
        original, blocks = blocks, (blocks if factored else blocks / scale)
        noise, design_cov = self._noise_knowledge(blocks, noise_cov, scale, factored)
        _warn_few_clients(n_clients, noise.estimated, predictive=factored)
        if noise.estimated and not factored:
            _warn_unequal_weights(weights)
        engine = resolve_solver(self.solver, max_iter=self.max_iter, tol=self.tol,
                                device=self.device, dtype=self.dtype)
        solve_blocks = blocks.coef if factored else blocks
        result, start = self._decompose(solve_blocks, noise, engine, scale, factored)
        reported_sigma = noise.sigma  # in the data's units (the frame has its own)
        if noise.estimated and not factored:
            # the penalized program's certificate bounds the objective's relative gap
            # by tol: its iterates are accurate to about sqrt(tol) of the data
            noise = _estimated_frame(blocks, result, noise, ESTIMATED_FRAME,
                                     np.sqrt(self.tol))
        frame = noise.frame
        support = self._rank_support(n_clients, factored)
        fit = detect_clients(blocks if frame is None else frame.to(blocks), weights, start,
                             rank=self.rank, noise=noise, level=self.test_level,
                             correction=self.correction, iterate=self.detection == "test",
                             random_state=self.random_state,
                             rank_support=support)
        self._frame = frame
        if not noise.estimated and not factored and self.rank is None:
            self._warn_rank_at_calibrated_noise(
                blocks if frame is None else frame.to(blocks), weights, fit, noise, support)
        if not noise.estimated and not factored and self.rank is None and support == 1:
            _warn_directions_few_carry(blocks if frame is None else frame.to(blocks),
                                       weights, fit, noise)
        # With the frame of robust scales the subspace that refines is refitted in the
        # data's units on the same collaborative set with the tests' rank: the frame's
        # subspace mapped back and projected orthogonally leaked a coefficient 1e4 times
        # the others' into every other row (refined_ 6 times the raw estimates' error, a
        # review), and along the frame's estimated metric the refinement lost accuracy
        # on simulated clients (relative error 0.466 -> 0.489 at K = 20)
        data_basis = None
        if noise.estimated and frame is not None:
            data_basis = refit_subspace(blocks[fit.members], weights[fit.members],
                                        fit.rank, self.random_state)
        self._store(blocks, result, engine, fit, scale, noise, design_cov, reported_sigma,
                    data_basis)
        self._fit_params["rank_support"] = support  # the one used (1 with a given rank)
        if not factored:  # the mean of the set, in the data's units, exactly
            members = fit.members
            self.collaborative_mean_ = np.tensordot(
                weights[members] / weights[members].sum(), original[members], axes=1)
        refined = self._refine(original, self.contaminated_)
        self.refined_ = self._output(refined)
        # (a LoRA stack's noise scale sits at its floor: its null is predicted from the
        # clients' statistics, clairstat._null.predictive_null)
        if not _REFINEMENT_REPLACED.get() and (
                factored or np.sqrt(np.mean(noise.sigma ** 2)) > 1e3 * np.sqrt(noise.floor)):
            # the projection's pooling, before refinement_keep_ gives some of it back (with
            # the share kept near 1 it warned that the subspace held every deviation, and
            # advised a smaller rank at rank 0, a review)
            _warn_refinement_pools_nothing(
                original, refined if self.refinement_keep_ == 0.0 else
                self._refine(original, self.contaminated_, keep=False),
                self.collaborative_mean_, self.contaminated_)
        return self

    def _refine(self, blocks, flagged, keep=True):
        """``mean + Pi (Theta_k - mean)`` for the others, flagged clients unchanged; with
        ``refinement_keep_ = kappa > 0`` the others' ``(1 - kappa) (mean + Pi (Theta_k -
        mean)) + kappa Theta_k``.

        ``Pi`` is ``projector_``: onto ``subspace_``, along the noise's metric with
        ``noise_cov``, orthogonally otherwise (docs/method_notes.md, section 8).
        """
        if getattr(self, "_projector", None) is None:  # orthogonal (or an older pickle)
            refined = refine(blocks, self.subspace_, self.collaborative_mean_, flagged)
        else:
            mean = self.collaborative_mean_
            refined = mean[None] + self._projector @ (blocks - mean[None])
            refined[flagged] = blocks[flagged]
        # 0.0: pickled before it existed; keep=False: the projection alone
        keep = getattr(self, "refinement_keep_", 0.0) if keep else 0.0
        if keep > 0.0 and isinstance(blocks, np.ndarray):
            kept = ~np.asarray(flagged, dtype=bool)
            refined[kept] = (1.0 - keep) * refined[kept] + keep * blocks[kept]
        return refined

    def _decompose(self, solve_blocks, noise, engine, scale, factored):
        """The decomposition, in the data's units, and the detection's start (the clients
        whose sparse block is zero up to the solver's accuracy).

        With ``DECOMPOSITION_FRAME`` other than "none" (not the default), without a
        covariance and with the default penalties and threshold, the program runs on the
        estimates pre-scaled by robust row and output spreads (:func:`_robust_frame`, as
        a lasso on standardised covariates), its start is read there and its parts are
        mapped back: the flags, the rank and the p-values then do not depend on the
        units of a covariate or an output (``refined_`` does: the refinement refits in
        the data's units). The objective, gap and penalties it reports are then the
        pre-scaled program's times the data's scale, comparable with no fit in the
        data's units."""
        if DECOMPOSITION_FRAME not in _DECOMPOSITION_FRAMES or not (
                isinstance(DECOMPOSITION_PASSES, int) and DECOMPOSITION_PASSES >= 1):
            raise ValueError(f"DECOMPOSITION_FRAME must be one of {_DECOMPOSITION_FRAMES} "
                             f"and DECOMPOSITION_PASSES an int of at least 1, not "
                             f"{DECOMPOSITION_FRAME!r} and {DECOMPOSITION_PASSES!r}.")
        pre = None
        if (DECOMPOSITION_FRAME != "none" and noise.estimated and not factored
                and all(isinstance(v, str) and v == "auto"
                        for v in (self.alpha, self.beta, self.threshold))):
            pre = _robust_frame(solve_blocks, solve_blocks, 0.0)
        result, start = self._decompose_in(solve_blocks, pre, noise, engine, scale,
                                           factored)
        for _ in range(DECOMPOSITION_PASSES - 1 if DECOMPOSITION_FRAME == "residual"
                       and pre is not None else 0):
            # the scales of what the last pass's backbone and low-rank part leave (the
            # estimates' spread mixes in the shared signal's); none resolved (noiseless
            # data, the exact program's feasibility error): the last pass stands
            following = _robust_frame(solve_blocks - result.backbone[None] - result.low_rank,
                                      solve_blocks, np.sqrt(self.tol))
            if following is None:
                break
            pre = following
            result, start = self._decompose_in(solve_blocks, pre, noise, engine, scale,
                                               factored)
        return result, start

    def _decompose_in(self, solve_blocks, pre, noise, engine, scale, factored):
        sigma, blocks = noise.sigma, solve_blocks
        if pre is not None:
            blocks = pre.to(solve_blocks)
            sigma = np.full(len(blocks), max(floor_noise_scale(
                estimate_noise_scale(blocks), blocks), _ROUND_OFF))
        result = clair_decompose(blocks, alpha=self._scaled(self.alpha, scale),
                                 beta=self._scaled(self.beta, scale), lam=self.lam,
                                 formulation=self.formulation,
                                 backbone=False if factored else self.backbone,
                                 solver=engine, noise_scale=sigma)
        scores = np.linalg.norm(result.sparse, axis=(1, 2))
        start = scores <= self._threshold_value(blocks, scale)
        if pre is not None:
            back_left, back_right = np.diag(pre.left_inv), 1.0 / np.diag(pre.right)
            result = dataclasses.replace(
                result, backbone=back_left[:, None] * result.backbone * back_right,
                low_rank=back_left[None, :, None] * result.low_rank * back_right,
                sparse=back_left[None, :, None] * result.sparse * back_right)
        return result, start

    @staticmethod
    def _scaled(value, scale):
        return value if isinstance(value, str) else value / scale

    def _noise_knowledge(self, blocks, noise_cov, scale, factored):
        """The noise as the test knows it, in the rescaled units of the fit, and the
        covariance factor of the coefficients (along the working rows, or the columns
        with ``subspace="row"``) when ``noise_cov`` gives it (else ``None``)."""
        n_clients, p, q = blocks.shape
        # Dense data are in units of their largest entry: round-off in the statistics is
        # relative to entries of that size. A LoRA stack states its own (the clients'
        # median squared norm and the reduction's precision: clairstat._reduced._round_off).
        round_off = _ROUND_OFF if getattr(blocks, "round_off", None) is None \
            else blocks.round_off
        floor = round_off ** 2
        if noise_cov is not None and self.noise_scale is not None:
            raise ValueError("pass noise_cov or noise_scale, not both.")
        if noise_cov is not None:
            if factored:
                raise ValueError("noise_cov is for dense estimates; LoRA stacks estimate "
                                 "their noise.")
            row, col = check_noise_cov(noise_cov, n_clients, *self.estimate_shape_,
                                       transpose=self.subspace == "row")
            return (_whitened_noise(row, col, scale, floor),
                    col if self.subspace == "row" else row)
        sigma = check_noise_scale(self.noise_scale, n_clients)
        if sigma is not None:
            sigma = sigma / scale
            return (NoiseKnowledge(sigma, NoiseCovariance.isotropic(sigma ** 2, p, q), floor),
                    None)
        estimate = factored_noise_scale(blocks) if factored else estimate_noise_scale(blocks)
        solve_blocks = blocks.coef if factored else blocks
        # The data are in units of their largest entry: below round-off there is no noise
        # to tell apart (all-zero or noiseless data).
        sigma = max(floor_noise_scale(estimate, solve_blocks), round_off)
        return NoiseKnowledge(np.full(n_clients, sigma), None, floor), None

    def _threshold_value(self, blocks, scale):
        if self.threshold != "auto":
            return float(self.threshold) / scale
        # Zero up to the solver's accuracy: the exact program folds its feasibility
        # residual (relative size ~ tol) into S, the penalized one gives exact zeros.
        return float(np.sqrt(self.tol) * np.sqrt(np.mean(np.sum(blocks ** 2, axis=(1, 2)))))

    def _store(self, blocks, result, engine, fit, scale, noise, design_cov, sigma,
               data_basis=None):
        """Copy the decomposition and the detection out, in the data's own units."""
        self._collaborative, self._scale = fit, scale
        # the training estimates, and how far a row may be from one and still be it
        self._training = None if not isinstance(blocks, np.ndarray) else (
            blocks, _match_tolerance(blocks, design_cov, 2 if self.subspace == "row" else 1))
        # the parameters this fit used, for its report (set_params may change them since)
        self._fit_params = {name: getattr(self, name) for name in (
            "formulation", "backbone", "subspace", "detection", "correction", "test_level")}
        # The objective, gap and history are of degree 2 in the data (penalized) or 1
        # (exact: a norm plus lam times norms); the solvers' own rescaling, once. (Before,
        # an exact fit's objective and gap were scaled as squares: off by the data's
        # largest entry, a review; its history was left in the fit's units.)
        self.decomposition_ = dataclasses.replace(
            _rescaled(result, scale, 2 if self.formulation == "penalized" else 1),
            alpha=result.alpha * scale, beta=result.beta * scale,
            noise_scale=None if result.noise_scale is None else result.noise_scale * scale)
        res = self.decomposition_
        self.backbone_, self.low_rank_, self.sparse_ = res.backbone, res.low_rank, res.sparse
        self.objective_, self.dual_gap_ = res.objective, res.dual_gap
        self.n_iter_, self.converged_ = res.n_iter, res.converged
        self.solver_ = engine.name
        self.alpha_, self.beta_, self.lam_ = res.alpha, res.beta, res.lam
        self.contamination_scores_ = np.linalg.norm(result.sparse, axis=(1, 2)) * scale
        basis, projector = fit.basis, None
        if data_basis is not None:  # the frame of robust scales: see _fit
            basis = data_basis
        elif self._frame is not None:
            basis, projector = self._frame.subspace(fit.basis)
        if self.subspace_source == "low_rank":  # L's column space, orthogonal projection
            basis = self._low_rank_basis(result, self.rank)
            projector = basis @ basis.T
        self._projector = projector  # None: U U^T (clairstat._detection.refine)
        self.subspace_, self.rank_ = basis, basis.shape[1]
        self.test_rank_ = fit.rank
        self.contaminated_ = fit.contaminated.copy()
        self.collaborative_set_ = np.flatnonzero(fit.members)
        self.collaborative_mean_ = _rescale(fit.mean, scale)
        # plain statistics are in the data's units squared; z-scores have no unit
        unit = scale if noise.estimated and self._frame is None else 1.0
        self.test_statistics_ = _squared(fit.statistics, unit)
        self.p_values_ = fit.p_values
        self.adjusted_p_values_ = fit.adjusted
        if isinstance(fit.null, PredictiveNull):  # a LoRA stack: no chi^2 scale
            self.null_scale_ = np.full(len(fit.null.df), np.nan)
            self.null_scale_df_ = float("nan")
            self.null_kind_ = "predictive"
        else:
            self.null_scale_ = _squared(fit.null.scale, unit)
            self.null_scale_df_ = float(fit.null.scale_df)
            self.null_kind_ = "F" if np.isfinite(self.null_scale_df_) else "chi2"
        self.degrees_of_freedom_ = fit.null.df
        spread_df, factor = fit.new_client.calibration[:2]
        self.null_spread_df_ = float(spread_df)
        # factored LoRA stacks predict each statistic from the others' whatever noise is
        # given (clairstat._null.predictive_null): no factor on a given noise to report
        self.null_scale_factor_ = (float("nan") if noise.estimated
                                   or isinstance(blocks, FactoredBlocks) else float(factor))
        # The calibration's factor measures how far the clients' off-subspace deviations
        # exceed their given noise: pooling them all (the projection) replaced noise by a
        # bias f - 1 times as large (grunfeld's firms predicted 4-5 times worse than by
        # their own regressions, benchmarks/real_data_refinement.py); the empirical-Bayes
        # posterior mean keeps the fraction 1 - 1/f of each member's deviation off it.
        factor = self.null_scale_factor_
        self.refinement_keep_ = (float(1.0 - 1.0 / factor) if np.isfinite(factor)
                                 and factor > 1.0 else 0.0)
        self.client_noise_scale_ = sigma * scale
        self.noise_scale_ = float(np.sqrt(np.mean(sigma ** 2)) * scale)
        self.noise_model_ = ("estimated" if noise.estimated else
                             "noise_cov" if self.noise_scale is None else "noise_scale")
        self.robust_frame_ = bool(noise.estimated and self._frame is not None)
        self.detection_converged_ = fit.converged
        self.n_detection_rounds_ = fit.n_rounds
        self.offset_ = float(np.log(self.test_level))
        if self.contaminated_.all():
            warnings.warn("every client was flagged as contaminated; refined_ holds the "
                          "unchanged local estimates.", UserWarning, stacklevel=4)
        else:
            _warn_most_flagged(self.contaminated_, stacklevel=5)
        if self.null_scale_factor_ > LARGE_SCALE_FACTOR:
            widened = (f", and they spread as a chi^2 with {self.null_spread_df_:.2g} df"
                       if np.isfinite(self.null_spread_df_)
                       and np.any(self.degrees_of_freedom_ >= self.null_spread_df_
                                  * (1 - 1e-12)) else "")
            warnings.warn(
                f"the clients' statistics do not follow the given noise: the tests' null "
                f"scale was raised {self.null_scale_factor_:.3g}-fold (its mean that many "
                f"times what the noise implies; null_scale_factor_){widened}, so each "
                "client is tested against the median client, not against its own noise. "
                "Either the clients differ beyond the shared subspace (check rank=), or "
                "their noise is not what was given, or a large share of them is "
                "contaminated and hides itself (masking); read each client's row of "
                "summary() and its own regression. refined_ keeps "
                f"{self.refinement_keep_:.2f} of each collaborative client's own "
                "deviation off the subspace (refinement_keep_ = 1 - 1/factor).",
                UserWarning, stacklevel=4)
        # The factor the median match would take if it could lower a given noise: read
        # by benchmarks/overstated_noise.py. A warning below a quarter failed its
        # pre-registered false-alarm bound there (classical covariances of heteroscedastic
        # data: 0.30 of cancer's uncorrupted splits) and was withdrawn.
        self._free_scale_factor = float(fit.new_client.calibration[3])
        side = "columns" if self.subspace == "row" else "rows"
        collaborative = ~self.contaminated_
        untestable = collaborative.any() and not np.any(
            self.degrees_of_freedom_[collaborative] > 0)
        # estimate_shape_ is in the working orientation: its first entry is the side
        # the subspace lives in, for subspace="row" too
        if untestable and self.rank_ < self.estimate_shape_[0]:
            # a predictive null (clairstat._null.predictive_null) read from too few
            # other clients: no test of the collaborative clients, whatever the rank (a
            # review: the message below blamed the rank with 2 and 3 LoRA clients).
            # With too few clients in all, the fit's first warning said it already
            # (_warn_few_clients).
            if len(self.contaminated_) - 1 >= MIN_OTHERS:
                n_flagged = int(np.sum(self.contaminated_))
                warnings.warn(
                    f"the {int(collaborative.sum())} collaborative clients left "
                    f"({n_flagged} of {len(self.contaminated_)} flagged) are too few to "
                    "test each other: their tests have 0 degrees of freedom (each "
                    "client's null is predicted from the statistics of at least "
                    f"{MIN_OTHERS} other collaborative clients, copies counted once), so "
                    "none of them can be flagged, and each is refined towards their "
                    "mean, a contaminated one included.", UserWarning, stacklevel=4)
        elif untestable:
            # rank_ = p: the subspace is the whole space, nothing is off it
            warnings.warn(f"the shared subspace has dimension {self.rank_}, all of the "
                          f"estimates' {self.estimate_shape_[0]} {side}: every client's "
                          "test has 0 degrees of freedom and no client can be flagged. "
                          "Contaminated clients (a large share of few clients), or a "
                          "noise_scale below the true noise, make the rank rule keep "
                          "every direction: give rank= (rank=0 for sites sampling one "
                          "population), or check the noise.", UserWarning, stacklevel=4)

    @staticmethod
    def _warn_rank_at_calibrated_noise(blocks, weights, fit, noise, support):
        """Warn when the rank rule, run at the noise the calibration measured, keeps
        fewer directions than it kept at the noise given.

        The rule's edge is set by the given noise; the calibration then raises the
        tests' null scale to the clients' spread (``null_scale_factor_``). A covariance
        understated twofold made the rule keep a direction that one contaminated client
        pushed, which its test then could not see (a review: p 9e-7 at rank 1, 0.52 at
        rank 2 with the covariance halved, and no warning below the factor of 4 of
        :data:`LARGE_SCALE_FACTOR`). The rule is rerun on the collaborative set at the
        calibrated noise with a support of at least :data:`_DIAG_SUPPORT` (a direction
        counts only if it survives leaving out any one client): in that case the
        contaminated client was a member, and its own push kept the direction above the
        edge at the calibrated noise too. Nothing is refitted: the fit stays the one its
        parameters ask for, and the warning says which rank the measured noise supports.
        Scratch checks of this session: 30 seeds each of 8, 12 and 20 simulated clients
        sharing one strong direction, nothing corrupted: no warning; fair split into 15
        sites, classical covariance: 1 of 20 splits (a rank-1 fit on a dataset whose
        random splits share nothing, where rank 0 is right).
        """
        factor = float(fit.new_client.calibration[1])
        if not (factor > 1.0 and fit.rank > 0):
            return
        members = fit.members
        sigma = float(np.sqrt(np.mean(noise.sigma ** 2) * factor))
        calibrated = select_rank(blocks[members], weights[members], sigma,
                                 noise.whitening, max(support, _DIAG_SUPPORT))
        if calibrated < fit.rank:
            warnings.warn(
                f"the tests' calibration measured the clients' noise at {factor:.3g} "
                f"times the variance noise_cov gives (null_scale_factor_); at that noise, "
                "counting only directions that no single client carries alone, the rank "
                f"rule keeps {calibrated} shared direction(s), not {fit.rank}. A "
                "direction kept only because the noise was understated can be one that "
                "a contaminated client pushes, hidden from its test: refit with "
                f"rank={calibrated} and compare, or give a covariance that describes the "
                "clients' spread (local_ols(cov_type=\"HC3\") where the noise grows with "
                "a covariate).", UserWarning, stacklevel=4)

    def _fitted_noise_scale(self):
        """The fit's ``noise_scale`` (None unless the fit used one): a ``set_params``
        after the fit changes nothing fitted (a review: ``set_params(noise_scale=...)``
        after a ``noise_cov`` fit made ``predict(LocalOLS)`` refuse the fit's own kind of
        input)."""
        model = getattr(self, "noise_model_", None)  # absent from older pickles
        if model is None:
            return self.noise_scale
        return self.client_noise_scale_ if model == "noise_scale" else None

    def _rank_support(self, n_clients, factored):
        """The rank rule's support, checked against the stack (1 with a given rank)."""
        support = self.rank_support
        if self.rank is not None or support == 1:
            return 1
        if factored:
            raise ValueError(f"rank_support={support} needs dense estimates: the rule "
                             "would run once per sub-stack of a FactoredBlocks stack; use "
                             "rank_support=1 or give the rank.")
        if n_clients - (support - 1) < 3:
            if support - 1 < n_clients:
                said = (f"leaves out {support - 1} of {n_clients} clients, fewer than "
                        "three remain")
            else:  # "leaves out 29 of 20 clients" read as nonsense (a review)
                said = (f"would leave out {support - 1} clients and there are only "
                        f"{n_clients}")
            warnings.warn(f"rank_support={support} {said}: the rank rule is used as it "
                          "is.", UserWarning, stacklevel=4)
            return 1
        count = math.comb(n_clients, support - 1)
        if count > _MAX_SUB_STACKS:
            raise ValueError(f"rank_support={support} with {n_clients} clients runs the "
                             f"rank rule on {count} sub-stacks (at most {_MAX_SUB_STACKS}); "
                             "choose a smaller rank_support or give the rank.")
        return support

    def _low_rank_basis(self, result, rank):
        from ._objective import stack_blocks
        left, sing, _ = np.linalg.svd(stack_blocks(result.low_rank), full_matrices=False)
        if rank is None:
            rank = int(np.sum(sing > np.sqrt(self.tol) * max(sing.max(initial=0.0), 1e-300)))
        return left[:, :rank]

    # -- outlier-detector and transformer interface -------------------------------
    def score_samples(self, X: ArrayLike,
                      noise_cov: tuple[ArrayLike, ArrayLike] | None = None) -> np.ndarray:
        """Log p-value of each client's test, on the scale of ``test_level``.

        In sample, a client of the training set (a row of ``X`` equal, up to round-off,
        to one the estimator was fitted on; where several training clients sent that
        same estimate, the one at the row's position, or any of them if their tests
        agree, else the row is tested as a new client) gets its fitted, out-of-sample
        test: the log of its p-value adjusted by ``correction`` over the training
        clients (``adjusted_p_values_``, floored at ``np.finfo(float).tiny``: an adjusted
        p-value of 0 scores -708.4, not -inf; for a client whose flag the test did not
        set, with ``detection="threshold"`` or a detection that did not converge, the value
        is moved to the side of ``log(test_level)`` its flag is on). Up to round-off:
        every entry within ``1024 eps cond`` (at most ``sqrt(eps)``; ``cond`` that of
        the client's design, read from ``noise_cov``) of the size of the training
        client's coefficients of that output (their largest, measured in standard
        deviations from ``noise_cov`` and taken back to the entry's units); without
        ``noise_cov``, within ``1024 eps`` of their largest absolute value. So the same data refitted, e.g. a
        :class:`~clairstat.LocalOLS` of the training data with the columns in another
        order (realigned by name, its estimates differ from the fitted ones by about
        1e-13), are the training clients, while an estimate changed by 1e-6 of itself
        is a new client. Out of sample, a new client (any other row) is tested on its
        own against the fitted collaborative
        mean and subspace (its p-value, not adjusted, floored at
        ``np.finfo(float).tiny`` as above), its noise taken as the members'
        (their average covariance with ``noise_cov``, the fitted scale otherwise), unless
        its own ``noise_cov`` is given: a collaborative new client with noise like
        theirs (or with its own covariance given) scores below ``log(test_level)`` with
        probability about ``test_level`` or less from about twelve clients on, and more
        often with fewer: on clients that follow the package's model, at level 0.05,
        with the noise estimated 0.13 at four and six clients, 0.09 at eight and
        0.04-0.05 at twelve and twenty; with it given 0.074 at four (where the rank rule
        can miss a shared direction) and 0.02-0.05 from six on, conservative
        (``benchmarks/new_client_level.py``; below twelve training clients a fit
        without a covariance warns when it tests new clients). On 18 real datasets, a
        site held out of
        the fit: a share of 0.109 flagged without a covariance, 0.057 with the classical
        one and 0.033 with HC3 and ``rank_support=3``, whose fits kept no shared
        direction there (``benchmarks/real_data_new_clients.py``).
        Without its covariance, one with noisier data (fewer samples) is flagged more
        often. The error of the members' subspace enters every new
        client's null, so a client far more precise than the members is not flagged
        for its precision (measured: 0.02 below ``log(0.05)`` for 2 000 samples against
        members of 30-50, ``benchmarks/precise_client_null.py``). To control the error
        rate over a batch of new clients, adjust ``np.exp(score_samples(X))`` with
        ``statsmodels.stats.multitest``.

        After a fit on a :class:`FactoredBlocks` stack (LoRA updates) no row is matched
        to a training client (their dense estimates are never formed): every row of
        ``X``, a dense (p, t) update, is tested as a new client, the stack's own clients
        included: against a mean and subspace their own update helped fit and under the
        new clients' null, not their fitted out-of-sample test, so their scores and
        flags can differ from ``p_values_`` and ``contaminated_`` (a review: p-values
        0.03 -> 0.18 in one seed, and one client of twelve flagged that the fit kept in
        three seeds).

        Parameters
        ----------
        X : array-like of shape (n_clients, p, q) or (n_clients, p), or LocalOLS
            The clients' estimates; a :class:`clairstat.LocalOLS` gives its
            ``estimates`` and its ``noise_cov``.
        noise_cov : tuple (row_cov, col_cov), optional
            The new clients' own noise covariance (as in :meth:`fit`; ``local_ols``
            gives it), for an estimator fitted with ``noise_cov``: each new client is
            then tested with its own covariance, so a client with fewer samples than
            the members is not flagged for its noise alone.

        Returns
        -------
        scores : ndarray of shape (n_clients,)
            Higher: more collaborative. ``predict`` cuts at ``offset_ = log(test_level)``.
        """
        check_is_fitted(self)
        fitted_type = getattr(self, "_fit_params", {}).get("cov_type")
        if isinstance(X, LocalOLS) and fitted_type is not None \
                and getattr(X, "cov_type", "nonrobust") != fitted_type:
            # a review: HC3 members, classical new clients, not a word
            warnings.warn(f"the new clients' covariances are {X.cov_type!r} and the fitted "
                          f"clients' {fitted_type!r}: each client is tested with its own, "
                          "so clients with covariances of another kind are tested on "
                          "another footing (HC3 is typically the larger where the noise "
                          "grows with a covariate); use local_ols with the same cov_type.",
                          UserWarning, stacklevel=user_stacklevel())
        X, _, noise_cov = _unpack_ols(self._aligned_ols(X), noise_cov, None,
                                      "score_samples", self._fitted_noise_scale())
        blocks = self._read(X, reset=False, noise_cov=noise_cov) / self._scale
        frame = self._frame
        if noise_cov is None:
            log_p = self._collaborative.new_client_log_p(
                blocks if frame is None else frame.to(blocks))[0]
        else:
            if frame is None or self.noise_model_ == "estimated":
                raise ValueError("the new clients' noise_cov (given, or carried by a "
                                 "LocalOLS) needs an estimator fitted with noise_cov; this "
                                 "one was not: pass the estimates alone (X.estimates for a "
                                 "LocalOLS) to test them with the members' fitted noise.")
            row, col = check_noise_cov(noise_cov, len(blocks), *self.estimate_shape_,
                                       transpose=self._orientation() == "row")
            log_p = self._collaborative.new_client.log_p_known(
                frame.to(blocks), _frame_cov(frame, row, col, self._scale))
        # a tail probability below the smallest float scores -708.4 as a training
        # client's does, not -inf (scipy's logsf underflows for a client far off; a
        # review: roc_auc_score refused the -inf of held-out attackers)
        log_p = np.maximum(log_p, np.log(np.finfo(float).tiny))
        training = self._collaborative.training_scores()
        new_rows = False
        for i, block in enumerate(blocks):
            sent = self._training_clients(block, i)
            if i in sent:  # at its own position (predict(X_train)): that client's test
                log_p[i] = training[i]
            elif sent.size and np.all(training[sent] == training[sent[0]]):
                log_p[i] = training[sent[0]]
            else:  # a new client (or an estimate several training clients sent, with
                # different fitted results, away from their positions): tested as one
                new_rows = True
        if new_rows and noise_cov is None and self.noise_model_ == "estimated" \
                and self._training_like() and len(self.p_values_) < FEW_CLIENTS_NEW:
            warnings.warn(
                f"new clients are tested against a fit of {len(self.p_values_)} clients "
                "without a covariance: their test is liberal below "
                f"{FEW_CLIENTS_NEW} clients (benign new clients flagged at test_level "
                "0.05: 0.13 at four and six clients, 0.09 at eight, about 0.05 at twelve; "
                "benchmarks/new_client_level.py); fit with noise_cov or noise_scale if "
                "the noise is known.", UserWarning, stacklevel=user_stacklevel())
        return log_p

    def _training_like(self):
        """Whether the fit was on dense estimates (a LoRA stack's is not)."""
        return getattr(self, "_training", None) is not None or bool(
            getattr(self, "_training_keys", None))

    def _training_clients(self, block, position):
        """The training clients whose estimate ``block`` (working units) is, up to
        round-off (:func:`_match_tolerance`); only the one at ``position`` when it is."""
        training = getattr(self, "_training", None)
        if training is None:
            keys = getattr(self, "_training_keys", None)  # pickled by clairstat <= 0.3.0.dev0 of
            if keys:                                       # 2026-12-03: exact copies only
                return np.array(keys.get(np.ascontiguousarray(block, dtype=np.float64)
                                         .tobytes(), []), dtype=int)
            return np.array([], dtype=int)  # a LoRA stack's fit: every row is a new client
        estimates, tolerance = training
        if position < len(estimates) and np.all(
                np.abs(block - estimates[position]) <= tolerance[position]):
            return np.array([position])
        return np.flatnonzero(np.all(np.abs(block[None] - estimates) <= tolerance,
                                     axis=(1, 2)))

    def _aligned_ols(self, X):
        """A new clients' :class:`LocalOLS` in the fitted one's feature and output order
        (matched by name; different names are an error). Features or outputs whose
        names ``local_ols`` generated (arrays without labels: ``x0, ...``, ``y0, ...``),
        on either side, are not matched: their order is the caller's."""
        fitted = getattr(self, "_local_ols_names", None)
        given = _ols_names(X)
        if fitted is None or given is None or getattr(X, "noise_cov", ()) is None:
            return X  # (without a covariance: _unpack_ols says what to pass instead)
        orders = []
        for what, have, want in zip(("features", "outputs"), given, fitted):
            if have is None or want is None:
                orders.append(slice(None))
                continue
            if sorted(have) != sorted(want) or len(set(have)) != len(have):
                raise ValueError(f"the new clients' {what} are {list(have)}, the fitted "
                                 f"clients' {list(want)}: fit local_ols on the same "
                                 "columns.")
            orders.append([list(have).index(name) for name in want])
        rows, cols = orders
        row_cov, col_cov = X.noise_cov
        names = [list(want) if want is not None else list(current) for want, current in
                 zip(fitted, (X.feature_names, X.output_names))]
        return dataclasses.replace(
            X, estimates=X.estimates[:, rows][:, :, cols],
            noise_cov=(row_cov[:, rows][:, :, rows], col_cov[:, cols][:, :, cols]),
            feature_names=names[0], output_names=names[1])

    def decision_function(self, X: ArrayLike,
                          noise_cov: tuple[ArrayLike, ArrayLike] | None = None) -> np.ndarray:
        """``score_samples(X, noise_cov) - offset_``: negative for contaminated clients."""
        return self.score_samples(X, noise_cov) - self.offset_

    def predict(self, X: ArrayLike,
                noise_cov: tuple[ArrayLike, ArrayLike] | None = None) -> np.ndarray:
        """+1 for collaborative clients, -1 for contaminated ones.

        In sample, on the training clients (rows equal to their estimates up to
        round-off, e.g. the training data refitted with the columns in another order),
        this returns the fitted flags; out of sample, a new client is flagged when its
        own test rejects at ``test_level`` (see :meth:`score_samples`, which says what
        round-off means and what ``noise_cov`` does). After a fit on a
        :class:`FactoredBlocks` stack no row is matched to a training client (see
        :meth:`score_samples`): read ``contaminated_`` for them.
        """
        return np.where(self.decision_function(X, noise_cov) >= 0, 1, -1)

    def fit_predict(self, X: ArrayLike, y: None = None, sample_weight: ArrayLike | None = None,
                    noise_cov: tuple[ArrayLike, ArrayLike] | None = None) -> np.ndarray:
        """Fit, then return the fitted flags as +1 / -1."""
        self.fit(X, sample_weight=sample_weight, noise_cov=noise_cov)
        return np.where(self.contaminated_, -1, 1)

    def transform(self, X: ArrayLike,
                  noise_cov: tuple[ArrayLike, ArrayLike] | None = None) -> np.ndarray:
        """Refine clients with the fitted subspace and collaborative mean.

        ``(1 - kappa) (mean + P (Theta_k - mean)) + kappa Theta_k`` with ``P`` the
        ``projector_`` and ``kappa`` the ``refinement_keep_`` (0 unless a given noise's
        null scale was raised), as ``refined_``. Clients that :meth:`predict` flags (with
        ``noise_cov`` if given) are returned unchanged.

        Parameters
        ----------
        X : array-like of shape (n_clients, p, q) or (n_clients, p), or LocalOLS
        noise_cov : tuple (row_cov, col_cov), optional
            The clients' own noise covariance (see :meth:`score_samples`).

        Returns
        -------
        refined : ndarray of the input's shape
            In the fitted clients' feature and output order: a LocalOLS whose names are
            the fitted ones in another order is realigned by name before it is refined,
            so its rows and columns are those of the training LocalOLS's
            ``feature_names`` and ``output_names``, not its own.
        """
        check_is_fitted(self)
        X, _, noise_cov = _unpack_ols(self._aligned_ols(X), noise_cov, None, "transform",
                                      self._fitted_noise_scale())
        blocks = self._read(X, reset=False, noise_cov=noise_cov)
        flagged = self.predict(X, noise_cov) == -1
        return self._output(self._refine(blocks, flagged))

    def summary(self, client_names: Sequence[str] | None = None) -> CLAIRSummary:
        """A statsmodels-style report of the fit (see :class:`clairstat.CLAIRSummary`).

        Parameters
        ----------
        client_names : sequence of str, optional
            One name per training client, in their order, for the per-client table
            (default: ``client_names_`` when the fit had them, else 0, 1, ...). The
            feature and output names of a :class:`~clairstat.LocalOLS` made from data
            frames are listed among the diagnostics.
        """
        from ._summary import CLAIRSummary
        check_is_fitted(self)
        return CLAIRSummary(self, client_names)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags


# Relative size of round-off in an entry: a statistic below (this x the entries' size)^2
# per degree of freedom is numerical zero, not a deviation (noiseless data).
_ROUND_OFF = 64 * np.finfo(float).eps
# Above this factor on a given covariance's null scale the fit warns (null_scale_factor_).
# On random splits of six real datasets into clients, nothing corrupted, the factor
# stayed at or below 2.6; firms that differ beyond a shared subspace (statsmodels'
# grunfeld) gave 6.7; with a third of 12 simulated clients contaminated the factor was
# 43 in the one seed of 20 where they masked themselves, at most 1.6 in the others
# (benchmarks/null_scale_factor.py, benchmarks/RESULTS.md).
LARGE_SCALE_FACTOR = 4.0
#: The support of the rank rule rerun at the calibrated noise
#: (:meth:`CLAIREstimator._warn_rank_at_calibrated_noise`): a direction one client alone
#: carries does not count there.
_DIAG_SUPPORT = 2


def _unit_free_roots(matrix):
    """``(S, S^-1)`` with ``S S^T = matrix``: ``S = Delta Corr^{1/2}``, ``Delta`` the
    square roots of the diagonal and ``Corr`` the correlation matrix.

    The square root that follows the units: for ``D matrix D`` (coordinates in other
    units, ``D`` diagonal) it is ``D S`` up to the signs of ``D`` on the right, so the
    frame ``S^-1 X`` of estimates ``D X`` is that of ``X`` up to the signs of its rows,
    to which the subspace, the z-scores and the statistics are blind: covariates or
    outputs measured in other units give the same tests. (The symmetric root
    ``matrix^{1/2}`` turns with the units, and the z-scores with it.)
    """
    scale = np.sqrt(np.diag(matrix))
    vals, vecs = np.linalg.eigh(matrix / np.outer(scale, scale))
    vals = np.sqrt(np.maximum(vals, vals.max() * 1e-12))
    return scale[:, None] * ((vecs * vals) @ vecs.T), ((vecs / vals) @ vecs.T) / scale[None, :]


@dataclass(frozen=True)
class _Frame:
    """A map ``X -> left X right`` common to every client (``left`` invertible).

    It maps the shared column space to a shared column space (``left``) and leaves
    column spaces alone (``right``), so the model holds in it with the same rank;
    with ``noise_cov`` the detection runs where the clients' average noise is
    isotropic (``left = S_R^{-1}``, ``right = S_C^{-T}`` with ``S S^T`` the average
    factor, :func:`_unit_free_roots`).
    """

    left: np.ndarray
    left_inv: np.ndarray
    right: np.ndarray

    def to(self, blocks):
        return self.left @ blocks @ self.right

    def subspace(self, basis):
        """The subspace in the data's coordinates, and the projector of the metric.

        Returns
        -------
        basis : ndarray of shape (p, r), orthonormal, spanning ``left^{-1} col(basis)``
        projector : ndarray of shape (p, p), ``left^{-1} U U^T left`` (oblique onto it)
        """
        mapped = self.left_inv @ basis
        orthonormal = np.linalg.qr(mapped)[0] if basis.shape[1] else mapped
        return orthonormal, mapped @ (basis.T @ self.left)


def _log_unit(factors):
    """Per client, the log of a factor's geometric-mean eigenvalue (``det^{1/dim}``).

    Under a change of coordinates ``A`` (units) every client's is shifted by the same
    ``log |det A|^{2/dim}``, so the normalised factors' shapes and the clients' relative
    scales do not depend on the units (the trace's would). Computed on the factor's
    correlation matrix, ``det F = prod_i F_ii det(corr)`` (a factor may sit anywhere in
    float64's range, and its variances may span more of it than an eigenvalue floor
    leaves: OLS covariances of covariates in other units); the correlation's
    eigenvalues below 1e-12 of its largest (a singular factor) count at that, a floor
    that a covariate's or an output's units do not move. The variances are positive
    (the covariance checks refuse a zero one); a zero one would only be kept finite.
    """
    diag = np.diagonal(factors, axis1=1, axis2=2)
    positive = diag > 0
    logs = np.log(np.where(positive, diag, 1.0))
    typical = np.sum(logs, axis=1) / np.maximum(positive.sum(axis=1), 1)
    logs = np.where(positive, logs, typical[:, None])
    root = np.exp(0.5 * (logs - typical[:, None]))  # sqrt(F_ii) over a typical scale
    vals = np.linalg.eigvalsh(factors / np.exp(typical)[:, None, None]
                              / root[:, :, None] / root[:, None, :])
    vals = np.maximum(vals, vals.max(axis=1, keepdims=True) * 1e-12)
    return np.mean(logs, axis=1) + np.mean(np.log(vals), axis=1)


def _normalised_factors(row, col, scale):
    """Factors of unit geometric-mean eigenvalue (:func:`_log_unit`) and each client's
    variance scale, in the fit's units (logs: a factor may sit anywhere in float64's
    range)."""
    row_log, col_log = _log_unit(row), _log_unit(col)
    variance = np.exp(row_log + col_log - 2.0 * np.log(scale))
    return (row / np.exp(row_log)[:, None, None], col / np.exp(col_log)[:, None, None],
            variance)


def _frame_cov(frame, row, col, scale):
    """Clients' noise covariance as seen in ``frame`` (the fit's rescaled units):
    ``left R left^T`` and ``right^T C right`` (``X -> left X right``)."""
    row_n, col_n, variance = _normalised_factors(row, col, scale)
    return NoiseCovariance(frame.left @ row_n @ frame.left.T,
                           frame.right.T @ col_n @ frame.right, variance)


def _whitened_noise(row, col, scale, floor):
    """The known noise as the detection sees it: in the frame where it is isotropic.

    Each client's factors are normalised to unit geometric-mean eigenvalue and their
    product's size kept as a per-client scalar (computed in logs: a factor can sit
    anywhere in float64's range, e.g. responses in other units); the frame whitens the
    clients' average shapes with the square roots that follow the units
    (:func:`_unit_free_roots`), so that rescaling a covariate or an output leaves the
    tests unchanged.
    """
    n_clients, p, _ = row.shape
    q = col.shape[1]
    row_n, col_n, variance = _normalised_factors(row, col, scale)
    row_root, row_inv = _unit_free_roots(np.mean(row_n, axis=0))
    col_inv = _unit_free_roots(np.mean(col_n, axis=0))[1]
    frame = _Frame(row_inv, row_root, col_inv.T)
    cov = _frame_cov(frame, row, col, scale)
    sigma = np.sqrt(variance * np.trace(cov.row, axis1=1, axis2=2)
                    * np.trace(cov.col, axis1=1, axis2=2) / (p * q))
    return NoiseKnowledge(sigma, cov, floor, None, frame)


#: Where the estimated path's frame reads its row and output scales
#: (:func:`_estimated_frame`): "residual" (the default), "data" or "none" (no frame: the
#: plain statistic the package used before 2026-12-06, kept for
#: benchmarks/real_data_calibration.py's comparison). On random client splits of the
#: four development datasets, nothing corrupted, the share of splits with a false flag
#: went from 0.01-0.18 ("none") to 0.04-0.11 ("residual"), the power against two clients
#: with reversed outputs from 0.07-0.32 to 0.42-1.00; on eleven held-out datasets the
#: calibration criteria were met on 5 against 1, the pooled null share rising from
#: 0.110 to 0.137. "data" (the estimates' own spread) mixed the shared signal into the
#: scales and lost power on simulated clients (benchmarks/RESULTS.md).
ESTIMATED_FRAME = "residual"
#: Where the decomposition runs without a covariance, with the default penalties and
#: threshold (:meth:`CLAIREstimator._decompose`): "none" (the default), in the data's
#: units; "data", on the estimates pre-scaled by their rows' and outputs' robust spreads;
#: "residual", the same and then ``DECOMPOSITION_PASSES - 1`` more passes, each pre-scaled
#: by the robust spreads of what the previous pass's backbone and low-rank part leave.
#: Both make the flags, the rank and the p-values independent of a covariate's or an
#: output's units (the data's units do not: benchmarks/frame_units.py; ``refined_`` is
#: not, its subspace refitted in the data's units). "residual" with 3 passes was measured
#: against the data's units, pre-registered, and not adopted: criteria met on 8 of 18
#: real datasets against 9 (racd10's sign flips caught 0.93 -> 0.28), and at 40
#: synthetic clients, nothing contaminated, 0.11 of the fits with a false flag against
#: 0.07 (benchmarks/RESULTS.md, "A decomposition that does not depend on the units").
DECOMPOSITION_FRAME = "none"
DECOMPOSITION_PASSES = 3
_DECOMPOSITION_FRAMES = ("none", "data", "residual")
_FRAME_SOURCES = ("residual", "data", "none")
#: Relative spread below which an entry counts as shared by the clients (_robust_frame).
_SHARED = 1e-6


def _estimated_frame(blocks, result, noise, source, resolution):
    """The estimated noise in the frame of the estimates' robust scales, with the
    rank rule's whitening in it.

    Without a covariance the detection runs on ``diag(1/r) Theta_hat_k diag(1/c)``, the
    row and output scales ``r`` and ``c`` read robustly off the clients' spread
    (:func:`_robust_frame`; ``source`` "residual": what the decomposition's backbone and
    low-rank part leave, "data": the estimates themselves, or "none": no frame). Rows
    and outputs on different scales then weigh alike in the statistics and the rank rule
    (an intercept's spread no longer drowns the slopes'), and, every client entering
    the scales alike, no client's statistic is measured against scales fitted to the
    others (docs/method_notes.md, section 8). The frame is normalised so that the framed
    estimates' largest entry is 1, the unit in which ``noise.floor`` (round-off) is
    stated. ``resolution``: the decomposition's relative accuracy (a residual spread
    below it is the solver's error, not noise).
    """
    if source not in _FRAME_SOURCES:
        raise ValueError(f"ESTIMATED_FRAME must be one of {_FRAME_SOURCES}, not {source!r}.")
    resid = blocks - result.backbone[None] - result.low_rank - result.sparse
    frame = None if source == "none" else _robust_frame(
        blocks if source == "data" else blocks - result.backbone[None] - result.low_rank,
        blocks, resolution)
    if frame is None:
        return dataclasses.replace(noise, whitening=_residual_whitening(resid))
    framed = frame.to(blocks)
    sigma = max(floor_noise_scale(estimate_noise_scale(framed), framed), _ROUND_OFF)
    return dataclasses.replace(noise, sigma=np.full(len(blocks), sigma),
                               whitening=_residual_whitening(frame.to(resid)), frame=frame)


def _spread(stack):
    """Each entry's median absolute deviation over the clients from their median."""
    return np.median(np.abs(stack - np.median(stack, axis=0)), axis=0)


def _robust_frame(centred, blocks, resolution, n_sweeps=50):
    """A diagonal :class:`_Frame` of row and output scales read off ``centred``'s spread.

    Each entry's spread over the clients is its median absolute deviation from the
    clients' median (a minority of contaminated clients moves neither); its log is fitted
    by a row term plus an output term (least squares, by alternating means), so that the
    frame is ``D_r X D_c`` and keeps the shared subspace's rank. An entry where the
    estimates themselves do not spread (a coefficient most clients share exactly: frozen
    weights, a clamped or defaulted value) is left out of the fit; counting it at a
    floor gave its row a weight up to 1e8 times the others', which took the rank rule's
    round-off edge above the noise (rank 0, contaminated clients missed) and made any
    ordinary deviation in that row a flag (a review). Where ``centred`` spreads less
    than ``resolution`` times the estimates do, what is left is the solver's error, not
    noise, and the estimates' own spread stands in. ``None`` when that is so of every
    entry (noiseless data, or the exact formulation, whose residual is its feasibility
    error). A row or output with no entry left gets the median of the others' terms.
    """
    spread, raw = _spread(centred), _spread(blocks)
    magnitude = np.max(np.abs(blocks), axis=0)
    # an entry that spreads less than _SHARED of its size is shared: exactly, or up to
    # float32's rounding or a jitter (weights of 1e9 from a 1e-9 relative jitter flagged
    # benign clients, a review)
    spreads = raw > _SHARED * magnitude
    resolved = spreads & (spread > resolution * raw) & (spread > _ROUND_OFF * magnitude)
    if not resolved.any():
        return None
    # where the decomposition's low-rank part took all of an entry's spread (a coefficient
    # far larger than the others, which it fits in the data's units: grunfeld's
    # intercept, 1e4 times its slopes), the estimates' own spread stands in for it
    measured = spreads
    logs = np.log(np.where(resolved, spread, np.where(spreads, raw, 1.0)))
    row, col = np.zeros(spread.shape[0]), np.zeros(spread.shape[1])
    rows_seen, cols_seen = measured.any(axis=1), measured.any(axis=0)
    count_r, count_c = measured.sum(axis=1), measured.sum(axis=0)
    for _ in range(n_sweeps):  # least squares of logs ~ row_i + col_j on the measured
        row = np.where(rows_seen, np.sum(measured * (logs - col[None, :]), axis=1)
                       / np.maximum(count_r, 1), 0.0)
        col = np.where(cols_seen, np.sum(measured * (logs - row[:, None]), axis=0)
                       / np.maximum(count_c, 1), 0.0)
    row = np.where(rows_seen, row, np.median(row[rows_seen]))
    col = np.where(cols_seen, col, np.median(col[cols_seen]))
    left, right = np.exp(-row), np.exp(-col)
    unit = float(np.max(np.abs(left[None, :, None] * blocks * right[None, None, :])))
    if not unit > 0:
        return None
    left = left / unit
    return _Frame(np.diag(left), np.diag(1.0 / left), np.diag(right))


def _residual_whitening(resid):
    """Per-row and per-output noise scales read off the decomposition's residual.

    Real estimates have rows (intercept, features on different scales) and outputs of
    very different precision. The residual ``Theta_hat_k - Theta_0 - L_k - S_k`` is the
    noise left after the low-rank and sparse parts (the spread across clients would mix
    in the signal); the median over clients of its mean square per row, then per
    output, gives diagonal scales under which the noise is close to isotropic, for the
    rank rule (:func:`clairstat._detection.select_rank`).
    """
    row = np.sqrt(np.median(np.mean(resid ** 2, axis=2), axis=0))
    if not row.max() > 0:  # nothing left over (all absorbed, or noiseless): no reweighting
        return None
    # a row with no residual at all is weighted like the least noisy measurable one
    row = np.maximum(row, row.max() * 1e-8)
    col = np.sqrt(np.median(np.mean((resid / row[None, :, None]) ** 2, axis=1), axis=0))
    col = np.maximum(col, col.max() * 1e-8)
    return np.diag(1.0 / row), np.diag(1.0 / col), None


def _squared(value, scale):
    """A quadratic quantity back in the data's units (inf beyond float64's range)."""
    with np.errstate(over="ignore"):
        return np.float64(value) * scale * scale if np.ndim(value) == 0 \
            else np.asarray(value) * scale * scale


def _unpack_ols(X, noise_cov, sample_weight, method, noise_scale=None):
    """``(estimates, sample_weight, noise_cov)`` of a :class:`LocalOLS` (its sample sizes
    as the weights), or the arguments unchanged; giving either alongside one (or an
    estimator with ``noise_scale``) is an error, not a silent choice between two."""
    if isinstance(X, (list, tuple)) and any(isinstance(x, LocalOLS) for x in X):
        # read as an array of objects, it failed deep in numpy (a review)
        raise TypeError(f"{method}: X is a {type(X).__name__} of LocalOLS; pass one "
                        "LocalOLS holding every client: run clairstat.local_ols on all "
                        "the clients' data at once (one LocalOLS of K clients, or of the "
                        "new clients), or index one (ols[[0, 2]]).")
    if not isinstance(X, LocalOLS):
        return X, sample_weight, noise_cov
    given = [name for name, value in (("noise_cov", noise_cov),
                                      ("sample_weight", sample_weight)) if value is not None]
    if given:
        raise ValueError(f"{method}: X is a LocalOLS, which carries its own noise_cov and "
                         f"sample sizes; do not pass {' or '.join(given)} as well (pass "
                         "X.estimates to use other ones).")
    if noise_scale is not None:
        raise ValueError(f"{method}: X is a LocalOLS, which carries its own noise_cov, "
                         "and the estimator has noise_scale: use one of the two (pass "
                         "X.estimates to use noise_scale).")
    if X.noise_cov is None:  # a LocalOLS built by hand without its covariance
        raise ValueError(f"{method}: X is a LocalOLS whose noise_cov is None; a LocalOLS "
                         "carries its OLS covariance (row_cov, col_cov) (local_ols computes "
                         "it). To fit without a covariance, pass X.estimates (and "
                         "sample_weight=X.n_samples).")
    _check_residual_variance(X, method)
    return X.estimates, X.n_samples, X.noise_cov


def _check_residual_variance(ols, method):
    """Refuse a LocalOLS whose residual covariance is singular by an output with no
    residual variance (local_ols sets such variances to zero and warns): its test would
    take that output's noise as zero. Named by client and output, as the user knows them."""
    variances = np.diagonal(np.asarray(ols.noise_cov[1]), axis1=1, axis2=2)
    dead = ~(variances > 0)
    names = getattr(ols, "client_names", None)  # absent from older pickles
    labels = ([str(k) for k in range(len(variances))] if names is None
              else [f'"{name}"' for name in names])  # as local_ols names clients
    n_outputs = variances.shape[1]
    short = np.flatnonzero(np.asarray(ols.residual_df) < n_outputs) if n_outputs > 1 \
        else np.array([], dtype=int)
    if short.size:
        # R^T R / (n - p) of n - p < q residuals has rank n - p < q: the test would take
        # the noise along the missing output combinations as zero (a review: a benign
        # site of 8 rows, p = 6, q = 3, was flagged in 11 of 12 fits, p-value 0.0)
        p_coef = ols.estimates.shape[1]
        shown = ", ".join(f"{labels[k]} ({int(ols.residual_df[k])} residual df)"
                          for k in short)
        raise ValueError(f"{method}: client(s) {shown} have fewer residual degrees of "
                         f"freedom (rows less coefficients) than the {n_outputs} outputs: "
                         "their residual covariance (noise_cov[1]) is singular, and a test "
                         "would take the noise of the output combinations it misses as "
                         f"zero. A client needs at least p + q = {p_coef + n_outputs} rows "
                         "here: drop those clients (e.g. ols[mask]), or fit without a "
                         "covariance (ols.estimates).")
    if not dead.any():
        return
    outputs = list(ols.output_names) or [f"y{j}" for j in range(variances.shape[1])]
    clients = [f"{labels[k]} ({', '.join(repr(outputs[j]) for j in np.flatnonzero(row))})"
               for k, row in enumerate(dead) if row.any()]
    raise ValueError(f"{method}: the LocalOLS's residual covariance (noise_cov[1]) is "
                     f"singular for client(s) {', '.join(clients)}: an output with no "
                     "residual variance (constant, or fitted exactly), whose noise a test "
                     "would take as zero. Drop that output (local_ols without it) or that "
                     "client (e.g. ols[mask]).")


def _ols_names(X):
    """``(feature_names, output_names)`` of a :class:`LocalOLS`, each ``None`` where
    ``local_ols`` generated it (arrays without labels) or it is empty; ``None`` for
    anything but a LocalOLS."""
    if not isinstance(X, LocalOLS):
        return None
    axes = (list(X.feature_names), list(X.output_names))
    generated = X.generated_names
    if generated is None:  # unknown (a LocalOLS pickled before the field, or built by
        # hand without it): names of local_ols's own pattern count as generated
        generated = tuple(names == [f"{prefix}{j}" for j in range(len(names))]
                          for names, prefix in zip(axes, "xy"))
    return tuple(None if made or not names else names
                 for names, made in zip(axes, generated))


#: How far, relative to its scale (:func:`_match_tolerance`), an entry may be from a
#: training client's and the row still be that client (:meth:`CLAIREstimator.score_samples`):
#: ``_ROUND_OFF_FACTOR * eps * cond``, at most sqrt(eps). The same data refitted
#: (columns or rows in another order, another BLAS) give an estimate that differs by
#: round-off: a backward-stable least-squares solve errs by about eps cond of the
#: output's coefficients, cond that of the design with unit-norm columns (read from the
#: coefficients' covariance factor: the square root of the condition number of its
#: correlation matrix). Measured (``local_ols`` on statsmodels datasets split into
#: clients, refitted with the columns and rows permuted, relative to this scale): at
#: most 2.2e-14 on four (cond 5 to 160), 3e-12 on longley (cond 4e4), 3e-11 with a
#: quadratic trend in calendar years (cond 1e5), that is at most 1.4 eps cond: the
#: factor 1024 leaves 700 times that. A fixed sqrt(eps) was too wide: a coefficient 1e8
#: standard deviations from zero (a large intercept, precise data) made every client
#: within 1.5 standard deviations "the same" (a review). Without a covariance (estimates
#: given as arrays, which nothing realigns) the factor is 1024 eps (cond taken as 1).
_ROUND_OFF_FACTOR = 1024.0
_EPS = np.finfo(float).eps


def _match_tolerance(blocks, design_cov, axis):
    """Per training client and entry, how far a row may be from its estimate and still
    be that client: the entry's scale times ``min(1024 eps cond_k, sqrt(eps))`` (1024
    eps without ``design_cov``).

    Round-off of a least-squares solve is relative to each output's coefficients as a
    whole, measured in the design's units (a coefficient near zero is not computed to
    its own relative precision). The scale of entry ``(i, j)`` is therefore the largest
    ``|coefficient| / sd`` of output ``j``, ``sd`` the coefficients' standard deviations
    (square roots of the diagonal of ``design_cov``; ones without it), times entry
    ``i``'s ``sd``: it follows the units of every covariate and output and does not
    depend on the level of the noise a client claims (only on ratios of its ``sd``).

    Parameters
    ----------
    blocks : ndarray of shape (n_clients, p, q)
        The training estimates (working orientation).
    design_cov : ndarray of shape (n_clients, m, m) or None
        The coefficients' covariance factor, along ``axis`` (``m`` its length).
    axis : {1, 2}
        The coefficients' axis of ``blocks``.

    Returns
    -------
    ndarray of shape (n_clients, p, q)
        Zero where the scale is not finite (only an exact copy is then that client).
    """
    n_clients = blocks.shape[0]
    if design_cov is None:
        sd = np.ones((n_clients, blocks.shape[axis]))
        factor = np.full(n_clients, _ROUND_OFF_FACTOR * _EPS)
    else:
        sd = np.sqrt(np.diagonal(design_cov, axis1=1, axis2=2))
        with np.errstate(divide="ignore", invalid="ignore"):
            corr = design_cov / (sd[:, :, None] * sd[:, None, :])
        factor = np.full(n_clients, np.sqrt(_EPS))  # where cond cannot be read
        for k in range(n_clients):
            if np.all(np.isfinite(corr[k])) and np.all(sd[k] > 0):
                values = np.linalg.eigvalsh(0.5 * (corr[k] + corr[k].T))
                if values[0] > 0:
                    cond = np.sqrt(values[-1] / values[0])
                    factor[k] = min(_ROUND_OFF_FACTOR * _EPS * cond, np.sqrt(_EPS))
    sd = np.expand_dims(sd, 3 - axis)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        tolerance = factor[:, None, None] * sd * np.max(np.abs(blocks) / sd, axis=axis,
                                                        keepdims=True)
    return np.where(np.isfinite(tolerance), tolerance, 0.0)


def _rescale(value, scale):
    """Back to the data's units (factored fits are not rescaled: scale is 1)."""
    return value * scale if isinstance(value, np.ndarray) else value


#: True inside :func:`refinement_replaced`: the fit's own refinement is not the output
#: (a LoRA module's fit whose refinement the joint refinement replaces), and
#: :func:`_warn_refinement_pools_nothing` says nothing about it.
_REFINEMENT_REPLACED = contextvars.ContextVar("refinement_replaced", default=False)


@contextlib.contextmanager
def refinement_replaced():
    """Fits made inside do not warn that their own refinement pools nothing (another
    refinement, the joint one of a LoRA adapter, is the output)."""
    token = _REFINEMENT_REPLACED.set(True)
    try:
        yield
    finally:
        _REFINEMENT_REPLACED.reset(token)


def _warn_refinement_pools_nothing(blocks, refined, mean, flagged):
    """Warn when the refinement returns every collaborative client's own estimate.

    ``mean + Pi (Theta_k - mean)`` is ``Theta_k`` where the subspace holds the client's
    whole deviation from the mean: with a rank that reaches the span of the members'
    deviations the refinement pools nothing (a review: every module of a per-module
    LoRA refinement chose such a rank and the refined adapters were the inputs,
    silently: each moved by 2e-8 of its update, below float32's resolution, in which
    the adapters were stored). Measured, not inferred from the rank: each member's
    change against its deviation, both as norms; below 1e-6 of it is next to nothing
    for any storage dtype of the estimates (float32's resolution is 6e-8; a subspace
    that holds the deviations exactly leaves float64 round-off, ~1e-15), while pooling
    the noise of clients of any practical signal-to-noise ratio moves each by a visible
    share of its deviation. Noiseless data (the caller skips them) lie on their
    subspace and are rightly left as they are.
    """
    members = np.flatnonzero(~np.asarray(flagged))
    if len(members) < 2:
        return
    if isinstance(blocks, FactoredBlocks):
        from ._detection import projection_statistics

        basis = refined.basis
        moved = projection_statistics(blocks, mean, basis)[members]
        total = projection_statistics(blocks, mean, basis[:, :0])[members]
    else:
        # in units of the largest entry: squares of entries above 1e154 overflow (inf /
        # inf made this warn "at most nan" on a fit that pools as at unit scale, a review)
        unit = float(np.max(np.abs(blocks[members])))
        unit = unit if 0 < unit < np.inf else 1.0
        deviation = (blocks[members] - mean[None]) / unit
        change = (refined[members] - blocks[members]) / unit
        moved = np.einsum("kpq,kpq->k", change, change)
        total = np.einsum("kpq,kpq->k", deviation, deviation)
    if np.any(total > 0) and np.all(moved <= 1e-12 * total):  # norms: 1e-6
        largest = float(np.sqrt(np.max(moved / np.where(total > 0, total, 1.0))))
        warnings.warn(f"the refinement moved each of the {len(members)} collaborative "
                      f"clients by at most {largest:.2g} of its deviation from their "
                      "mean: the shared subspace holds nearly every client's whole "
                      "deviation, so the refinement pools nothing and refined_ is each "
                      "client's own estimate. Give a smaller rank= to pool their noise.",
                      UserWarning, stacklevel=4)


def _warn_unequal_weights(weights):
    """The estimated null gives every client the same noise; sample sizes that differ
    (weights as sample sizes) make the clients with less data look deviant."""
    positive = weights[weights > VANISHING_WEIGHT]  # zero weights (check_sample_weight)
    if positive.max() > 2.0 * positive.min():
        warnings.warn(f"sample_weight varies {positive.max() / positive.min():.3g}-fold, "
                      "but without noise_cov or noise_scale the tests take every "
                      "client's estimate as equally noisy: if the weights are sample "
                      "sizes, clients with less data are flagged more often. Pass "
                      "noise_cov (clairstat.local_ols computes it) or noise_scale.",
                      UserWarning, stacklevel=3)


#: Below this many clients the tests of a dense stack without a covariance warn that
#: they have little power and can be liberal (benchmarks/exchangeable_null.py,
#: benchmarks/few_clients_frame.py: from eight clients on the level held within the
#: Monte Carlo error).
FEW_CLIENTS_ESTIMATED = 8

#: Below this many training clients a dense fit without a covariance warns when it
#: tests new clients: their test is liberal there (at level 0.05, 0.13 of benign new
#: clients flagged at four and six clients, 0.09 at eight, within the Monte Carlo error
#: at twelve and twenty; benchmarks/new_client_level.py), mostly from the frame of
#: robust scales, which the new client did not help estimate.
FEW_CLIENTS_NEW = 12


#: Below this many clients a LoRA stack's tests (the predictive null: each statistic
#: against the others', a Student t on ``MAD_EFFICIENCY`` x (others) degrees of freedom,
#: about 2.6 at 8 clients, 4.1 at 12) flag large deviations only.
FEW_CLIENTS_PREDICTIVE = 12


#: True inside :func:`few_clients_said`: the warnings of :func:`_warn_few_clients` are
#: then left to the caller, which fits many stacks of the same clients (one per LoRA
#: module) and says it once (a ContextVar: per thread and per task).
_FEW_CLIENTS_SAID = contextvars.ContextVar("few_clients_said", default=False)


@contextlib.contextmanager
def few_clients_said(n_clients, estimated, predictive):
    """Warn once about the number of clients, and not again in the fits inside the
    block (:func:`clairstat.aggregation.clair_modules`: 224 modules of 8 clients gave
    224 copies of the same warning)."""
    _warn_few_clients(n_clients, estimated, predictive, stacklevel=5)
    token = _FEW_CLIENTS_SAID.set(True)
    try:
        yield
    finally:
        _FEW_CLIENTS_SAID.reset(token)


#: The collaborative sets on which :func:`_warn_directions_few_carry` reruns the rank
#: rule with a support of three (``C(m, 2)`` sub-stacks: 190 at twenty members); with
#: more members two clients corrupted alike were outvoted (benchmarks/alike_corruption.py:
#: caught in 1.00 of the splits at twenty sites by default).
FEW_CARRY_MEMBERS = (4, 20)


def _warn_directions_few_carry(blocks, weights, fit, noise):
    """Warn when a shared direction the rank rule kept rests on two clients or fewer.

    With ``rank_support=1`` two clients corrupted alike are a rank-one deviation the
    rule can keep as shared, and their off-subspace tests then do not see it: at ten
    sites of statsmodels' co2 series with two sites' slopes sign-flipped, the defaults
    caught both in 0.57 of the splits, ``rank_support=3`` in 1.00, and the fit said
    nothing (benchmarks/alike_corruption.py). The rule is rerun on the collaborative set
    with a support of three (at the noise the fit's own rule used); where it keeps fewer
    directions the fit warns, and is not changed. Only with a given noise (``noise_cov``
    or ``noise_scale``): without one the rule's directions rest on two clients in about
    a third of uncorrupted splits of co2 (a scratch run), too often for a warning. With
    the classical covariance the warning is also given where the noise grows with a
    covariate (benchmarks/RESULTS.md, "A warning for directions two clients carry").
    """
    members = fit.members
    n_members = int(members.sum())
    low, high = FEW_CARRY_MEMBERS
    if fit.rank == 0 or not low <= n_members <= high:
        return
    sigma = float(np.sqrt(np.mean(noise.sigma ** 2)))
    carried = select_rank(blocks[members], weights[members], sigma, noise.whitening, 3)
    if carried < fit.rank:
        warnings.warn(
            f"the rank rule kept {fit.rank} shared direction(s), of which "
            f"{fit.rank - carried} rest on two clients or fewer (counting only directions "
            f"that survive leaving out any two clients it keeps {carried}): two clients "
            "corrupted alike look like this (their tests do not see a deviation kept as "
            "shared), and so do clients noisier than their covariance says (the classical "
            "one where the noise grows with a covariate). Refit with rank_support=3 (or "
            f"rank={carried}) to test them, with local_ols(cov_type=\"HC3\") where the "
            "noise may grow with a covariate.", UserWarning, stacklevel=user_stacklevel())


def _warn_most_flagged(contaminated, stacklevel=3):
    """Warn when more than half of the clients, but not all, were flagged.

    The model has the collaborative clients a majority; a fit that keeps a minority
    tested the majority against it (a review: one LoRA module of 8 clients flagged 4 of
    the 7 benign ones, at one random_state of two, and the refinement skipped them and
    pulled the other 3 to their mean). Exactly half flagged is within the model."""
    n_flagged, n_clients = int(np.sum(contaminated)), len(contaminated)
    if 2 * n_flagged > n_clients and n_flagged < n_clients:
        warnings.warn(
            f"{n_flagged} of {n_clients} clients were flagged, more than half: the "
            "method takes the collaborative clients to be a majority, and here the "
            f"{n_clients - n_flagged} kept are a minority the others were tested against. "
            "Which group deviates is then not told by the data: check the rank (rank=), "
            "the noise (noise_cov) and the robust start (another random_state), and "
            "whether the clients form two groups.", UserWarning, stacklevel=stacklevel)


def _warn_few_clients(n_clients, estimated, predictive=False, stacklevel=3):
    if _FEW_CLIENTS_SAID.get():
        return
    if predictive and n_clients - 1 < MIN_OTHERS:
        warnings.warn(f"only {n_clients} clients: each client's null is predicted from "
                      f"at least {MIN_OTHERS} other clients' statistics, so no client "
                      "can be flagged, and the refinement pulls every client towards "
                      "the mean of all of them, a contaminated one included.",
                      UserWarning, stacklevel=stacklevel)
    elif n_clients <= 3:
        warnings.warn(f"only {n_clients} clients: each is compared with at most "
                      f"{n_clients - 1} others, and the tests have next to no power.",
                      UserWarning, stacklevel=stacklevel)
    elif predictive and n_clients < FEW_CLIENTS_PREDICTIVE:
        warnings.warn(f"only {n_clients} clients: each client's statistic is predicted "
                      f"from the {n_clients - 1} others' (a Student t on at most "
                      f"{MAD_EFFICIENCY * (n_clients - 1):.2g} degrees of freedom), so "
                      "only large deviations are flagged (benchmarks/"
                      "lora_null_calibration.py: at 8 clients a statistic twice a benign "
                      "one's is flagged in 0.12-0.82 of the cases, at 16 in 0.15-0.99).",
                      UserWarning, stacklevel=stacklevel)
    elif estimated and n_clients < FEW_CLIENTS_ESTIMATED:
        warnings.warn(f"only {n_clients} clients: the tests' null is estimated from "
                      f"{n_clients} statistics and has little power, and it can flag more "
                      "uncorrupted federations than the level says (at test_level "
                      "0.05, 0.089 of those of six clients alike in noise, real data's "
                      "noise shapes, benchmarks/exchangeable_null.py; 0.095-0.125 of "
                      "four, six or seven i.i.d. Gaussian clients whose rows are alike in "
                      "noise, most of it from the frame of robust scales read off so few "
                      "clients, benchmarks/few_clients_frame.py); "
                      "pass noise_cov or noise_scale if the noise is known.",
                      UserWarning, stacklevel=stacklevel)

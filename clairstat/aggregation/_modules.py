"""CLAIR on every module of an adapter: one fit per module, or one joint fit.

The clients' factors arrive grouped by module (``{module: [(B_k, A_k), ...]}``, as
:func:`clairstat.lora.module_factors` reads them from peft state dicts); this module
fits CLAIR on them and returns each module's refined updates, collaborative mean and
flags in reduced coordinates (:class:`clairstat._reduced.ReducedStack`), with the
client-level flags. Reading the results back into adapters is :mod:`clairstat.lora`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from .._reduced import CombinedUpdates, ReducedStack, reduce_factors
from .._threads import svt_flops
from ._api import aggregate
from ._lanczos_solver import partial_spectrum_solver

__all__ = ["ModuleRefinement", "clair_modules", "modules_work", "client_flags",
           "joint_refinement", "JointRefinement", "module_gram", "joint_coefficients",
           "aggregate_modules"]


@dataclasses.dataclass
class ModuleRefinement:
    """Output of :func:`clair_modules`.

    Attributes
    ----------
    flagged : ndarray of shape (n_clients,), bool
        Client-level flags: flagged in more of the fitted modules than a client without
        contamination would be (:func:`client_flags`; a module with every update zero is
        not fitted and does not count).
    module_flagged : dict of str to ndarray of shape (n_clients,)
        Flags of each module's own test (a client may be flagged in a module without
        being flagged at the client level, ``flagged``).
    per_client : dict of str to ReducedStack
        Refined updates ``Delta W~_k`` per module, (n_clients, d_out, d_in) when
        expanded; a flagged client keeps its update (``joint=True``: a client flagged
        at the client level keeps every update; an update flagged in one module only
        enters the refinement as ``flagged_updates`` says (:func:`joint_refinement`):
        by default ``"clip"``, scaled down to the largest norm among the module's
        unflagged collaborative clients; with ``"quarantine"`` replaced by their mean,
        so that it enters nobody's refined update, its own client's included;
        otherwise the module's own flags).
    collaborative_mean : dict of str to ReducedStack
        The collaborative set's mean update per module (one element).
    estimators : dict
        The fitted :class:`clairstat.CLAIREstimator` per module; ``None`` where nothing
        was fitted.
    joint : bool
    zero_modules : frozenset of str
        The modules whose updates are all exactly zero (not fitted).
    rank_selection : RankSelection or None
        With ``joint=True`` and no ``rank`` given: the bi-cross-validation that chose
        the joint rank (:class:`clairstat.aggregation._rank.RankSelection`; ``.rank``).
        ``None`` otherwise, or where it could not run (one fitted module, fewer than
        three collaborative clients: the joint rank is then 0, the collaborative mean).
    """

    flagged: np.ndarray
    module_flagged: dict
    per_client: dict
    collaborative_mean: dict
    estimators: dict
    joint: bool
    zero_modules: frozenset
    rank_selection: Any


def _check_module_lists(factor_lists, weights=None, clair=False):
    """The modules' factor lists at entry, before any path (the all-zero one too): at
    least one module, every module listing the same number of clients (numpy's shape
    errors named nothing: a review), every module's factors valid (the ValueError of
    :func:`check_factors` with the module named), and for CLAIR at least two clients
    and valid ``weights``. Returns the number of clients."""
    from .._validation import check_sample_weight
    from ._validation import check_factors

    if not factor_lists:
        raise ValueError("there are no modules: factor_lists is empty (each module needs "
                         "its clients' (B, A) factors).")
    counts = {name: len(factors) for name, factors in factor_lists.items()}
    first, n_clients = next(iter(counts.items()))
    odd = {name: count for name, count in counts.items() if count != n_clients}
    if odd:
        raise ValueError(f"every module must list the same clients: module(s) {odd} list "
                         f"other numbers of clients than module {first!r} ({n_clients}).")
    if n_clients == 0:
        raise ValueError(f"there are no clients: module {first!r} lists none.")
    for name, factors in factor_lists.items():
        try:
            check_factors(factors)
        except ValueError as error:
            raise ValueError(f"module {name!r} (B: a client's lora_B times its LoRA "
                             f"scaling, A: its lora_A): {error}") from None
    if clair:
        if n_clients < 2:
            raise ValueError(f"CLAIR needs at least two clients, got {n_clients}.")
        check_sample_weight(weights, n_clients)
    return n_clients


def _all_zero(factors):
    """Whether every client's update ``B_k A_k`` of a module is 0 (B_k = 0 or A_k = 0)."""
    return all(not np.any(b_mat) or not np.any(a_mat) for b_mat, a_mat in factors)


def _zero_fit(factors):
    """The outcome for a module whose updates are all 0 (fresh adapters): nothing to fit,
    zero refined updates and mean, nobody flagged, no estimator."""
    red = reduce_factors(factors)
    zeros = np.zeros_like(red.updates)
    return (ReducedStack(red.left_basis, zeros, red.right_basis),
            ReducedStack(red.left_basis, zeros[:1], red.right_basis),
            np.zeros(len(factors), dtype=bool), None)


def _modules(factor_lists, progress):
    """``factor_lists.items()``, through ``progress(iterable, total=n_modules)`` if given."""
    items = factor_lists.items()
    return items if progress is None else progress(items, total=len(factor_lists))


def client_flags(module_flags, level):
    """Client-level flags from the fitted modules' flags: a vote-count test.

    A client without contamination is flagged in a module with probability at most
    ``level`` (each module's test, multiplicity-adjusted across clients). Over ``M``
    fitted modules its number of flags then has at most a Binomial(M, level) tail if
    the modules' tests were independent, and a client is flagged when its count's tail
    probability ``P(Bin(M, level) >= votes)`` is at most ``level``: with 8 modules and
    level 0.05, 3 flags or more; with 1 module, that module's flag; with 224 modules,
    18. A strict majority (the earlier rule) let an attack that shows in a few
    modules only, such as a backdoor, through (docs/method_notes.md, section 9).
    Modules of one client share its data, so their tests are positively dependent;
    the confirmatory copying run measures what that does to false alarms.

    Parameters
    ----------
    module_flags : ndarray of bool, shape (n_modules, n_clients)
    level : float

    Returns
    -------
    ndarray of bool, shape (n_clients,)
    """
    from scipy import stats

    module_flags = np.asarray(module_flags, dtype=bool)
    if module_flags.size == 0:
        return np.zeros(module_flags.shape[-1] if module_flags.ndim == 2 else 0, dtype=bool)
    votes = module_flags.sum(axis=0)
    tail = stats.binom.sf(votes - 1, module_flags.shape[0], level)
    return (votes > 0) & (tail <= level)


def _level(clair_params):
    """The per-module tests' level (the estimator's default unless given)."""
    from .. import CLAIREstimator  # lazily: clairstat's modules import this package

    return float(clair_params.get("test_level", CLAIREstimator().test_level))


def _fit_per_module(factor_lists, weights, clair_params, progress=None):
    out = {}
    for name, factors in _modules(factor_lists, progress):
        if _all_zero(factors):
            out[name] = _zero_fit(factors)
            continue
        params = dict(clair_params)
        solver = partial_spectrum_solver(params)
        if solver is not None and not params.get("backbone", False):
            params["solver"] = solver
        result = aggregate("clair", factors, weights, **params)
        red = result.reduction
        mean = result.reduced_mean[None]  # formed once, by the rule
        out[name] = (result.per_client, ReducedStack(red.left_basis, mean, red.right_basis),
                     result.flagged, result.estimator)
    return out


def module_gram(factors, *, device=None, dtype=None):
    """Gram matrix ``<B_j A_j, B_k A_k>`` (Frobenius) of one module's client updates.

    ``tr(A_j^T B_j^T B_k A_k)`` is the sum of ``(B_j^T B_k) * (A_j A_k^T)`` (entrywise):
    two products of the stacked factors, never a d_out x d_in update.

    Parameters
    ----------
    factors : list of (ndarray (d_out, r_k), ndarray (r_k, d_in))
    device : optional
        Form the two products (the d-sized work) in torch on ``device``, as
        :func:`clair_modules`' reduction; default numpy.
    dtype : optional
        Ignored: the products are float64 on the device too. Distances from the Gram
        matrix, ``G_jj + G_kk - 2 G_jk``, cancel: in float32 they lost every digit once
        the clients differed by 1e-3 relative (a review; the joint rank then came out
        2 instead of 0).

    Returns
    -------
    ndarray of shape (n_clients, n_clients)
    """
    lefts = np.hstack([np.asarray(b_mat, dtype=float) for b_mat, _ in factors])
    rights = np.vstack([np.asarray(a_mat, dtype=float) for _, a_mat in factors])
    if device is None:
        entrywise = (lefts.T @ lefts) * (rights @ rights.T)
    else:
        import torch

        def on(array):
            return torch.as_tensor(array).to(device=device, dtype=torch.float64)

        lefts, rights = on(lefts), on(rights)
        entrywise = ((lefts.T @ lefts) * (rights @ rights.T)).to(
            device="cpu", dtype=torch.float64).numpy()
    starts = np.cumsum([0] + [a_mat.shape[0] for _, a_mat in factors[:-1]])
    gram = np.add.reduceat(np.add.reduceat(entrywise, starts, axis=0), starts, axis=1)
    return 0.5 * (gram + gram.T)


def joint_coefficients(gram, members, weights, rank):
    """Refined updates as combinations of the clients' updates (the joint refinement).

    With the collaborative weighted mean ``m`` and the top-``rank`` principal directions
    ``P`` of the members' centred updates (all modules concatenated), a member's refined
    update is ``m + P (x_k - m)`` and a flagged client keeps ``x_k``. Both are linear in
    the clients' updates; the coefficients need only their Gram matrix.

    Parameters
    ----------
    gram : ndarray of shape (n_clients, n_clients)
        Sum over modules of :func:`module_gram`.
    members : ndarray of bool, shape (n_clients,)
    weights : ndarray of shape (n_clients,)
    rank : int

    Returns
    -------
    coef : ndarray of shape (n_clients, n_clients)
        ``refined_k = sum_j coef[k, j] x_j``.
    mean_coef : ndarray of shape (n_clients,)
        ``m = sum_j mean_coef[j] x_j``.
    """
    n_clients = len(gram)
    index = np.flatnonzero(members)
    omega = weights[index] / weights[index].sum()
    centring = np.eye(len(index)) - omega[None, :]  # rows: x_k - m over the members
    centred = centring @ gram[np.ix_(index, index)] @ centring.T
    eigval, eigvec = np.linalg.eigh(0.5 * (centred + centred.T))
    order = np.argsort(eigval)[::-1][:rank]
    # Directions at round-off relative to the largest carry no signal to project on.
    positive = eigval[order] > max(eigval.max(), 0.0) * len(index) * np.finfo(float).eps
    basis, eigval = eigvec[:, order[positive]], eigval[order[positive]]
    kernel = centring.T @ (basis / eigval) @ basis.T @ centring  # J^T U L^-1 U^T J
    mean_coef = np.zeros(n_clients)
    mean_coef[index] = omega
    coef = np.eye(n_clients)
    cross = gram[index] - (gram[np.ix_(index, index)] @ omega)[:, None]  # C_M (x_k - m)
    coef[index] = 0.0
    coef[np.ix_(index, index)] = (omega[None, :] + (kernel @ cross[:, index]).T)
    return coef, mean_coef


class JointRefinement(NamedTuple):
    """Output of :func:`joint_refinement`: flags, the rank, and the combinations.

    Attributes
    ----------
    flagged : ndarray of bool, shape (n_clients,)
    rank : int
    selection : RankSelection or None
        The bi-cross-validation that chose ``rank`` (None when given or not possible).
    coef : ndarray of shape (n_modules, n_clients, n_clients)
        In module m (the order of ``grams``), client k's refined update is
        ``sum_j coef[m, k, j] B_j A_j``.
    mean_coef : ndarray of shape (n_modules, n_clients)
        The collaborative mean's combination in each module.
    """

    flagged: np.ndarray
    rank: int
    selection: Any
    coef: np.ndarray
    mean_coef: np.ndarray


#: What the joint refinement does with a collaborative client's update that its
#: module's test flags (:func:`joint_refinement`).
FLAGGED_UPDATES = ("quarantine", "clip")
#: The default: ``"clip"`` since the pre-registered comparison on the copying task
#: (simulations/copying/PROTOCOL.md, amendments 3 and 4); ``"quarantine"`` before.
DEFAULT_FLAGGED_UPDATES = "clip"


def check_flagged_updates(value):
    """``value`` if it is one of :data:`FLAGGED_UPDATES`, else a ValueError."""
    from ._validation import check_option

    return check_option("flagged_updates", value, FLAGGED_UPDATES)


def _stand_in_maps(module_flags, members, weights, grams, policy):
    """Per module, the map that stands in for every member's update flagged there.

    ``maps[m]`` (n_clients, n_clients) acts on the clients' updates of module ``m``
    (rows of the identity for every update not flagged there). ``"quarantine"``
    replaces a collaborative client's flagged update by the weighted mean of the
    collaborative clients not flagged in that module: an update that one module's test
    rejects cannot move anyone's refinement (one client poisoning one module, too few
    modules to be flagged at the client level, would otherwise pull every client's
    refined update of that module). ``"clip"`` scales it down to the largest Frobenius
    norm among those unflagged clients (``grams[m]``'s diagonal) and leaves it as it is
    when it is no larger: a poisoned update's size is bounded, and a flagged update of
    ordinary size (a task variant held by few clients, a false alarm) keeps its
    direction in the joint fit.
    """
    n_modules, n_clients = module_flags.shape
    maps = np.repeat(np.eye(n_clients)[None], n_modules, axis=0)
    for m in range(n_modules):
        bad = np.flatnonzero(module_flags[m] & members)
        good = np.flatnonzero(members & ~module_flags[m] & (weights > 0))
        if not (len(bad) and len(good)):
            continue
        if policy == "quarantine":
            maps[m][bad] = 0.0
            maps[m][np.ix_(bad, good)] = weights[good] / weights[good].sum()
        else:
            norms = np.sqrt(np.maximum(np.diagonal(grams[m]), 0.0))
            bound = norms[good].max()
            # bound / norm only where the flagged update is larger: a zero update (a
            # module a client left fresh) no longer overflows a division by `tiny`
            # (a RuntimeWarning that reached the command line; a review)
            larger = norms[bad] > bound
            scale = np.ones(len(bad))
            scale[larger] = bound / norms[bad][larger]
            maps[m][bad, bad] = scale
    return maps


def _unrefined_modules(module_flags, members, weights):
    """The modules whose test flags every collaborative client of positive weight:
    nothing there to stand in for a flagged update, so nobody's update is shared."""
    return [m for m in range(len(module_flags))
            if (module_flags[m] & members).any()
            and not (members & ~module_flags[m] & (weights > 0)).any()]


def check_joint_rank(rank, n_clients):
    """The joint rank as an int in ``[0, n_clients - 1]``, or a ValueError.

    ``n_clients`` centred updates span at most ``n_clients - 1`` directions: a larger
    rank would project on everything, that is, refine nothing.
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 0:
        raise ValueError(f"the joint rank must be a non-negative integer, got {rank!r}.")
    if rank > max(n_clients - 1, 0):
        raise ValueError(f"the joint rank {rank} exceeds what {n_clients} clients support "
                         f"(at most {max(n_clients - 1, 0)}: their centred updates span "
                         "that many directions).")
    return int(rank)


def joint_refinement(grams, module_flags, weights=None, rank=None, level=0.05,
                     flagged_updates=DEFAULT_FLAGGED_UPDATES, rank_rule=None):
    """Client flags, the joint rank and the refined combinations, from per-module results.

    A client flagged at the client level (:func:`client_flags`) keeps every update. The
    update of a collaborative client flagged in a module is, by default
    (``flagged_updates="clip"``), scaled down to the largest norm among the module's
    unflagged collaborative clients wherever it is larger, and used so everywhere the
    update would be used (the joint fit's rank, mean and subspace, and the
    refinement): a poisoned update's size is bounded, and one of ordinary size (a small
    group's direction, a false alarm) keeps its direction. ``"quarantine"`` (the
    default before) replaces it by the module's mean over the collaborative clients not
    flagged in it (:func:`_stand_in_maps`): what one module's test rejects enters nobody's
    refined update, its own client's included, which gets there the mean plus what
    the joint subspace and its other modules imply (a poisoned module is repaired, a
    false alarm costs that module its own deviation, and a task variant held by few
    clients can lose its direction). docs/method_notes.md, section 9, compares the two.
    A module whose test flags every collaborative client has no update to stand in:
    there every client keeps its own update (``coef[m]`` the identity), and the mean
    combination ``mean_coef[m]`` is the plain weighted mean of the members.

    Parameters
    ----------
    grams : ndarray of shape (n_modules, n_clients, n_clients)
        :func:`module_gram` of every fitted module.
    module_flags : ndarray of bool, shape (n_modules, n_clients)
        Each fitted module's flags.
    weights : ndarray of shape (n_clients,), optional
    rank : int, optional
        The joint rank, at most ``n_clients - 1`` (a ValueError otherwise; above the
        collaborative clients' number minus one it is lowered to that, with a
        warning); default: :func:`clairstat.aggregation.cross_validated_rank` on the
        collaborative clients (0 with one module or fewer than three of them, where
        there is nothing to cross-validate against).
    rank_rule : {"smallest-error", "one-standard-error"}, optional
        How :func:`~clairstat.aggregation.cross_validated_rank` reads the rank off its
        errors (default ``"smallest-error"``; ``"one-standard-error"`` was the default
        before the copying task's comparison, docs/method_notes.md, section 9). Giving
        it with ``rank`` is a ValueError: the rank is then not chosen.
    level : float
        The level of the modules' tests (:func:`client_flags`).
    flagged_updates : {"clip", "quarantine"}, default="clip"
        What stands in for a collaborative client's update flagged by its module's
        test (above).

    Returns
    -------
    JointRefinement
        With no collaborative client every client keeps its own update.
    """
    from ._rank import DEFAULT_RANK_RULE, check_rank_rule, cross_validated_rank

    policy = check_flagged_updates(flagged_updates)
    if rank_rule is not None and rank is not None:
        raise ValueError(f"rank_rule={rank_rule!r} chooses the joint rank, which "
                         f"rank={rank!r} fixes: give one of them.")
    rank_rule = DEFAULT_RANK_RULE if rank_rule is None else check_rank_rule(rank_rule)
    grams = np.asarray(grams, dtype=float)
    n_modules, n_clients = grams.shape[:2]
    module_flags = np.reshape(np.asarray(module_flags, dtype=bool), (n_modules, n_clients))
    flagged = client_flags(module_flags, level)
    members = ~flagged
    weights = np.ones(n_clients) if weights is None else np.asarray(weights, dtype=float)
    if rank is not None:
        rank = check_joint_rank(rank, n_clients)
        if rank > max(int(members.sum()) - 1, 0):
            warnings.warn(f"joint rank {rank} exceeds what the {int(members.sum())} "
                          f"collaborative clients support; using "
                          f"{max(int(members.sum()) - 1, 0)}.", UserWarning, stacklevel=2)
            rank = max(int(members.sum()) - 1, 0)
    if not members.any():
        return JointRefinement(flagged, 0 if rank is None else rank, None,
                               np.repeat(np.eye(n_clients)[None], n_modules, axis=0),
                               np.zeros((n_modules, n_clients)))
    maps = _stand_in_maps(module_flags, members, weights, grams, policy)
    clean = maps @ grams @ maps.transpose(0, 2, 1)  # the Gram matrices of the substitutes
    selection = None
    if rank is None:
        if n_modules >= 2 and members.sum() >= 3:
            selection = cross_validated_rank(clean, members, rule=rank_rule)
            rank = selection.rank
        else:
            rank = 0
    coef, mean_coef = joint_coefficients(clean.sum(axis=0), members, weights, int(rank))
    # In module m every client's combination is of the substitutes: a flagged update
    # has weight 0 everywhere, and its own client gets what its other modules imply.
    module_coef, module_mean = coef[None] @ maps, mean_coef[None, None] @ maps
    for m in _unrefined_modules(module_flags, members, weights):  # everyone keeps its own
        module_coef[m] = np.eye(n_clients)
    return JointRefinement(flagged, int(rank), selection, module_coef, module_mean[:, 0])


def _fit_joint(factor_lists, weights, clair_params, progress=None):
    """Per-module detection, then one refinement of every module at once.

    Each module is fitted as in the per-module path (its tests, p-values and flags); the
    client-level flags, the joint rank and the refined combinations are
    :func:`joint_refinement`'s. docs/method_notes.md, section 9, says why.
    """
    params = dict(clair_params)
    rank = params.pop("rank", None)
    rank_rule = params.pop("rank_rule", None)
    policy = check_flagged_updates(params.pop("flagged_updates", DEFAULT_FLAGGED_UPDATES))
    if rank is not None:  # before the modules' fits, not after them
        check_joint_rank(rank, len(next(iter(factor_lists.values()))))
    from .._estimator import refinement_replaced

    with refinement_replaced():  # the modules' own refinements are not the output
        fitted = _fit_per_module(factor_lists, weights, params, progress)
    live = [name for name in factor_lists if fitted[name][3] is not None]
    if not live:
        return fitted, None
    on_device = {"device": params["device"], "dtype": params.get("dtype")} \
        if params.get("device") is not None else {}
    joint = joint_refinement(np.stack([module_gram(factor_lists[name], **on_device)
                                       for name in live]),
                             [fitted[name][2] for name in live], weights, rank,
                             _level(params), policy, rank_rule)
    out, position = {}, {name: m for m, name in enumerate(live)}
    for name, (per_client, mean, module_flags, estimator) in fitted.items():
        if estimator is None:
            out[name] = (per_client, mean, module_flags, estimator)
            continue
        # The module's bases (those of its fit's reduction); the refined updates stay
        # combinations of the clients' factors, never n_clients dense (s, t) blocks.
        left, right = per_client.left_basis, per_client.right_basis
        factors, m = factor_lists[name], position[name]
        out[name] = (ReducedStack(left, CombinedUpdates(factors, joint.coef[m], left,
                                                        right), right),
                     ReducedStack(left, CombinedUpdates(factors, joint.mean_coef[m][None],
                                                        left, right), right),
                     module_flags, estimator)
    return out, joint.selection


def clair_modules(factor_lists: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]],
                  weights: ArrayLike | None = None, *, joint: bool = True,
                  flagged_updates: str | None = None, rank_rule: str | None = None,
                  progress: Any = None, device: Any = None, dtype: Any = None,
                  **clair_params: Any) -> ModuleRefinement:
    """CLAIR on the clients' updates of every module: detect and refine.

    Parameters
    ----------
    factor_lists : dict of str to list of (ndarray (d_out, r_k), ndarray (r_k, d_in))
        Per module, client k's ``(B_k, A_k)`` with the scaling absorbed into ``B_k``;
        every module lists the same clients in the same order.
    weights : array-like of shape (n_clients,), optional
        Client weights of the collaborative mean (e.g. sample sizes).
    joint : bool, default=True
        Both ways fit CLAIR on every module (:func:`clairstat.aggregation.aggregate`
        with ``"clair"``: each module's tests, p-values and flags) and flag a client
        flagged in more modules than a client without contamination would be
        (:func:`client_flags`). ``True``: the collaborative
        clients' adapters, every module concatenated, are then refined together towards
        their mean plus a shared subspace of the rank ``rank`` (default: chosen by
        bi-cross-validation across modules,
        :func:`clairstat.aggregation._rank.cross_validated_rank`); a flagged client keeps
        its adapter. ``False``: each module is refined by its own fit (its own
        collaborative set, column subspace and rank). docs/method_notes.md, section 9,
        compares the two on the copying task.
    flagged_updates : {"clip", "quarantine"}, optional
        With ``joint=True``, what stands in for a collaborative client's update that its
        module's test flags (:func:`clairstat.aggregation.joint_refinement`): the
        update scaled down to the largest norm of the module's unflagged clients where
        it is larger (``"clip"``, the default), or their mean (``"quarantine"``). With
        ``joint=False`` nothing stands in (each module's own fit decides), and giving
        it is a ValueError rather than ignored.
    rank_rule : {"smallest-error", "one-standard-error"}, optional
        With ``joint=True`` and no ``rank``, how the cross-validation picks the joint
        rank (:func:`joint_refinement`): the rank of the smallest held-out error (the
        default) or the smallest within one standard error of it (the default before
        the copying task's pre-registered comparison). A ValueError with
        ``joint=False`` or with ``rank`` given.
    progress : callable, optional
        Called as ``progress(iterable, total=n_modules)`` around the loop over modules.
    device : str or torch.device, optional
        Where the torch work runs, e.g. ``"cuda"``: the decomposition
        (``CLAIREstimator(device=...)``) and the d-sized work of the LoRA path (the
        reduction's QRs, the joint refinement's Gram matrices, the readouts' products
        with the bases; :class:`clairstat._reduced.DeviceBasis`). ``"cpu"`` runs the
        same torch code on the CPU. Not given: the decomposition on the estimator's
        default (the CPU) and the rest in numpy float64, the reference. The detection and
        everything else in reduced coordinates (size at most the sum of the clients'
        ranks, whatever the module's width) run in numpy float64 either way. The result
        keeps every module's two bases on the device while it lives (d x sum r_k each:
        about 12 GB in float64 for 224 modules 4096 wide with 50 rank-16 clients); for
        whole models, ``clairstat refine`` holds one module at a time.
    dtype : {"float64", "float32"} or torch dtype, optional
        The precision of that torch work. In float32 the default duality-gap tolerance
        is raised to ``100 eps_float32`` (1.2e-5): the gap is a difference of two sums
        rounded at ~ eps of their size, so a relative certificate of 1e-6 (8 float32
        ulps) may never be reached; the reduction is exact to float32's precision, and
        the tests' round-off floor is raised to it (noiseless clients are not flagged
        on the reduction's rounding).
    **clair_params
        Parameters of :class:`clairstat.CLAIREstimator` for the per-module fits;
        with ``joint=True``, ``rank`` is the joint subspace's rank instead.

    Raises
    ------
    ValueError
        At entry, before any fit (the all-zero modules' path too): no modules, modules
        listing different numbers of clients (naming them), fewer than two clients,
        invalid ``weights``, or invalid factors (:func:`check_factors`' message, with
        the module named).

    Returns
    -------
    ModuleRefinement
        A module whose updates are all exactly zero is not fitted (nobody flagged in
        it, zero refined updates and mean, estimator ``None``) and does not vote in the
        client-level flags.
    """
    _check_module_lists(factor_lists, weights, clair=True)
    if flagged_updates is not None:
        check_flagged_updates(flagged_updates)
        if not joint:
            raise ValueError(f"flagged_updates={flagged_updates!r} applies to the joint "
                             "refinement (joint=True); with joint=False each module's "
                             "own fit decides.")
    else:
        flagged_updates = DEFAULT_FLAGGED_UPDATES
    if rank_rule is not None:
        from ._rank import check_rank_rule

        check_rank_rule(rank_rule)
        if not joint:
            raise ValueError(f"rank_rule={rank_rule!r} applies to the joint refinement "
                             "(joint=True); with joint=False each module's fit has its "
                             "own rank.")
        if clair_params.get("rank") is not None:
            raise ValueError(f"rank_rule={rank_rule!r} chooses the joint rank, which "
                             f"rank={clair_params['rank']!r} fixes: give one of them.")
    clair_params = _with_device(clair_params, device, dtype)
    selection = None
    with _said_once(factor_lists, clair_params):
        if joint:
            fitted, selection = _fit_joint(
                factor_lists, weights, dict(clair_params, flagged_updates=flagged_updates,
                                            rank_rule=rank_rule), progress)
        else:
            fitted = _fit_per_module(factor_lists, weights, clair_params, progress)
    module_flagged = {name: item[2] for name, item in fitted.items()}
    n_clients = len(next(iter(factor_lists.values())))
    votes = [module_flagged[name] for name, item in fitted.items() if item[3] is not None]
    flagged = client_flags(np.reshape(votes, (len(votes), n_clients)), _level(clair_params))
    zero = frozenset(name for name, factors in factor_lists.items() if _all_zero(factors))
    return ModuleRefinement(flagged, module_flagged,
                            {name: item[0] for name, item in fitted.items()},
                            {name: item[1] for name, item in fitted.items()},
                            {name: item[3] for name, item in fitted.items()}, joint, zero,
                            selection)


def _said_once(factor_lists, clair_params):
    """With two or more modules to fit, the estimator's warning about few clients once
    for all of them (the same clients in every module), else nothing."""
    from .._estimator import few_clients_said

    fitted = [factors for factors in factor_lists.values() if not _all_zero(factors)]
    if len(fitted) < 2:
        return contextlib.nullcontext()
    # the factored path's predictive null (the estimator's own choice: no backbone,
    # column subspace); without a noise_scale the noise is estimated
    factored = (not clair_params.get("backbone", False)
                and clair_params.get("subspace", "column") == "column")
    return few_clients_said(len(fitted[0]), clair_params.get("noise_scale") is None,
                            factored)


def _with_device(clair_params, device, dtype):
    """``clair_params`` with the estimator's ``device`` and ``dtype`` (a string) set."""
    params = dict(clair_params)
    if device is not None:
        params["device"] = str(device)
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        if name not in ("float64", "float32"):
            raise ValueError(f"dtype must be float64 or float32, got {dtype!r}.")
        params["dtype"] = name
        if name == "float32" and "tol" not in params:
            params["tol"] = 1e2 * float(np.finfo(np.float32).eps)  # see clair_modules
    return params


def aggregate_modules(rule, factor_lists, weights=None, **options):
    """Any rule on every module: ``{module: AggregationResult}``.

    ``"clair"`` is the library's default CLAIR on whole adapters (:func:`clair_modules`,
    ``joint=True`` unless ``joint=False`` is passed): each module's result carries that
    fit's module flags, the jointly refined ``per_client`` updates, the collaborative
    mean as ``update`` and its rank-``max r_k`` readout as ``factors``. Every other rule
    runs module by module (:func:`clairstat.aggregation.aggregate`; ``reference``, if
    given, is a dict of per-module factors).

    Parameters
    ----------
    rule : str
    factor_lists : dict of str to list of (ndarray (d_out, r_k), ndarray (r_k, d_in))
    weights : array-like of shape (n_clients,), optional
    **options
        The rule's options.

    Returns
    -------
    dict of str to AggregationResult

    Raises
    ------
    ValueError
        At entry: no modules, modules listing different numbers of clients, or invalid
        factors, naming the module (and :func:`clair_modules`' checks for ``"clair"``).
    """
    from .._reduced import eckart_young_factors, truncated_svd
    from ._result import AggregationResult
    from ._validation import check_weights

    if rule != "clair":
        _check_module_lists(factor_lists)
        reference = options.pop("reference", None)
        return {name: aggregate(rule, factors, weights, **options,
                                **({"reference": reference[name]}
                                   if reference is not None else {}))
                for name, factors in factor_lists.items()}
    fit = clair_modules(factor_lists, weights, **options)
    n_clients = len(next(iter(factor_lists.values())))
    normalised = check_weights(weights, n_clients)
    results = {}
    for name, factors in factor_lists.items():
        mean = fit.collaborative_mean[name]
        rank = max(a_mat.shape[0] for _, a_mat in factors)
        readout = eckart_young_factors(truncated_svd(np.asarray(mean.reduced[0]), rank),
                                       rank, mean.left_basis, mean.right_basis)
        results[name] = AggregationResult("clair", np.asarray(mean)[0], readout,
                                          normalised, {
                                              "flagged": fit.module_flagged[name],
                                              "per_client": fit.per_client[name],
                                              "estimator": fit.estimators[name],
                                              "client_flagged": fit.flagged,
                                              "rank_selection": fit.rank_selection})
    return results


def modules_work(factor_lists):
    """Flops of the largest module: its reduction's two QRs and its fit's SVT.

    A module with client factors ``B_k`` (d_out, r_k), ``A_k`` (r_k, d_in) reduces by QRs
    of (d_out, s) and (d_in, s) matrices, ``s = sum_k r_k``, and is fitted on
    (n_clients, s, max r_k) blocks (:func:`clairstat._threads.svt_flops`).
    """
    work = 0.0
    for factors in factor_lists.values():
        total = sum(a_mat.shape[0] for _, a_mat in factors)
        widest = max(a_mat.shape[0] for _, a_mat in factors)
        d_out, d_in = factors[0][0].shape[0], factors[0][1].shape[1]
        work = max(work, (d_out + d_in) * total ** 2
                   + svt_flops((len(factors), total, widest)))
    return work


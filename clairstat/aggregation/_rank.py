"""Rank of the joint LoRA fit by bi-cross-validation across modules.

The joint fit (:func:`clairstat.aggregation.clair_modules` with ``joint=True``) treats
each client's adapter as one vector (every module's update, concatenated) and refines it
towards an affine subspace ``mean + span(V)`` shared by the collaborative clients. The
rank of ``V`` decides everything: too small and clients with different tasks are pulled
to one mean, too large and each keeps its own noise.

The noise-edge rule of :func:`clairstat._detection.select_rank` assumes independent
entries of a known shape. Neither holds here: the fit sees the vectors after an exact
reduction to the K-dimensional span of the data (a K x K matrix whose singular values
are those of a (sum of module sizes) x K one), and a LoRA update's noise is strongly
correlated within a module (it is low rank there). The edge then sits far above the
signal and the rule picks rank 0, collapsing every heterogeneous federation onto one
mean (docs/method_notes.md, section 9).

Bi-cross-validation (Owen and Perry, 2009) asks the data instead. Split the modules into
two halves A and B; hold one client out; fit the mean and the rank-r subspace on the
others (all modules); place the held-out client in that subspace from its A modules
alone (least squares); score the prediction of its B modules (and the other way round).
A client's noise in different modules is nearly independent, so only structure that
other clients share lowers the error: a direction of one client's own noise does not.
(A far-off client left among the others does: it moves their mean along its direction,
which then predicts every other client. The rank is therefore cross-validated on the
collaborative set, after the tests.) The error is averaged over several splits and every client
(each client's error taken relative to its error at rank 0, so that every client counts
alike), and the rank of the smallest mean error is kept (``rule="smallest-error"``, the
default). ``rule="one-standard-error"`` keeps the smallest rank within one standard error
of it instead (Hastie, Tibshirani and Friedman, 2009, section 7.10): the default until
the pre-registered comparison on the copying task (simulations/copying/PROTOCOL.md,
amendment 6), where with 8 heterogeneous clients it chose too small a rank and cost 2.7
points of accuracy (at 16 clients the smallest-error rank cost 0.07 and 0.24 points;
docs/method_notes.md, section 9).

Everything is computed from per-module Gram matrices of the clients (K x K), exact under
the isometric reductions of :mod:`clairstat._reduced`. The clients count equally here
(plain means), whatever weights the refinement's mean then uses: the rank is a property
of the shared structure, not of how much each client is trusted.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["RankSelection", "module_splits", "cross_validated_rank", "RANK_RULES",
           "DEFAULT_RANK_RULE", "check_rank_rule"]

#: How the joint rank is read off the cross-validated errors.
RANK_RULES = ("smallest-error", "one-standard-error")
#: The default: the smallest error since the pre-registered comparison on the copying
#: task (simulations/copying/PROTOCOL.md, amendments 6 and 7); the one-standard-error
#: rule before.
DEFAULT_RANK_RULE = "smallest-error"


def check_rank_rule(value):
    """``value`` if it is one of :data:`RANK_RULES`, else a ValueError."""
    from ._validation import check_option

    return check_option("rank_rule", value, RANK_RULES)

#: Random module splits used besides the alternating one (fixed seed: the rank is a
#: deterministic function of the adapters).
_N_RANDOM_SPLITS = 5
_SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class RankSelection:
    """Outcome of :func:`cross_validated_rank`.

    Attributes
    ----------
    rank : int
        The rank ``rule`` chooses: ``best_rank`` (``"smallest-error"``) or
        ``one_standard_error_rank`` (``"one-standard-error"``).
    best_rank : int
        The rank of the smallest mean error.
    errors : ndarray of shape (n_members, max_rank + 1)
        Held-out prediction error of each member at each rank (summed over splits and
        both directions), relative to its error at rank 0.
    standard_error : ndarray of shape (max_rank + 1,)
        Standard error of the mean paired difference to ``best_rank``.
    rule : {"smallest-error", "one-standard-error"}
        The rule that chose ``rank``.
    """

    rank: int
    best_rank: int
    errors: np.ndarray
    standard_error: np.ndarray
    rule: str = DEFAULT_RANK_RULE

    @property
    def one_standard_error_rank(self):
        """The smallest rank whose mean error is within one standard error of the best."""
        mean = self.mean_errors
        return int(np.flatnonzero(mean - mean[self.best_rank] <= self.standard_error)[0])

    @property
    def mean_errors(self):
        """Mean held-out error per rank, shape (max_rank + 1,)."""
        return self.errors.mean(axis=0)


def module_splits(n_modules, n_random=_N_RANDOM_SPLITS, seed=_SPLIT_SEED):
    """Halves of the modules: alternating in the given order, then seeded random halves.

    Parameters
    ----------
    n_modules : int
        At least 2.

    Returns
    -------
    list of ndarray of bool, shape (n_modules,)
        ``True`` marks side A of each split (duplicates removed).
    """
    if n_modules < 2:
        raise ValueError("bi-cross-validation needs at least two modules.")
    alternating = np.arange(n_modules) % 2 == 0
    splits = [alternating]
    rng = np.random.default_rng(seed)
    for _ in range(n_random):
        side = np.zeros(n_modules, dtype=bool)
        side[rng.permutation(n_modules)[: n_modules // 2]] = True
        if not any(np.array_equal(side, s) or np.array_equal(~side, s) for s in splits):
            splits.append(side)
    return splits


def _held_out_errors(gram_a, gram_b, max_rank):
    """Errors (n, max_rank + 1) of predicting each client's B part from its A part.

    ``gram_a``, ``gram_b``: (n, n) Gram matrices of the clients' A and B coordinates.
    With the others' centred data ``C = J X_O`` (``J`` the centring), ``C C^T = U L U^T``
    and the coordinate directions ``V = C^T U L^{-1/2}``, every quantity below is an
    inner product inside A or inside B (derivation in the module docstring's terms).
    """
    n = gram_a.shape[0]
    total = gram_a + gram_b
    errors = np.zeros((n, max_rank + 1))
    for k in range(n):
        others = np.flatnonzero(np.arange(n) != k)
        m = len(others)
        centring = np.eye(m) - 1.0 / m
        eigval, eigvec = np.linalg.eigh(centring @ total[np.ix_(others, others)] @ centring)
        order = np.argsort(eigval)[::-1]
        eigval, eigvec = eigval[order], eigvec[:, order]
        # Directions with eigenvalues at round-off carry no coordinates (rank deficit).
        keep = eigval > eigval[0] * np.finfo(float).eps * m if eigval[0] > 0 else eigval > 0
        scaled = eigvec[:, keep] / np.sqrt(eigval[keep])  # U L^{-1/2}
        for own, other in ((gram_a, gram_b), (gram_b, gram_a)):
            g_oo, g_ok = own[np.ix_(others, others)], own[others, k]
            h_oo, h_ok = other[np.ix_(others, others)], other[others, k]
            # V_own^T d_own, V_own^T V_own, and the same in the other part.
            proj_own = scaled.T @ centring @ (g_ok - g_oo.sum(axis=1) / m)
            gram_own = scaled.T @ centring @ g_oo @ centring @ scaled
            proj_other = scaled.T @ centring @ (h_ok - h_oo.sum(axis=1) / m)
            gram_other = scaled.T @ centring @ h_oo @ centring @ scaled
            base = other[k, k] - 2.0 * h_ok.sum() / m + h_oo.sum() / m ** 2  # ||d_other||^2
            errors[k, 0] += base
            for rank in range(1, max_rank + 1):
                r = min(rank, scaled.shape[1])
                weights = np.linalg.lstsq(gram_own[:r, :r], proj_own[:r], rcond=None)[0]
                errors[k, rank] += (base - 2.0 * weights @ proj_other[:r]
                                    + weights @ gram_other[:r, :r] @ weights)
    return errors


def cross_validated_rank(module_grams, members=None, max_rank=None,
                         rule=DEFAULT_RANK_RULE):
    """Rank of the joint fit by bi-cross-validation across modules.

    Parameters
    ----------
    module_grams : ndarray of shape (n_modules, n_clients, n_clients)
        Per module, the Gram matrix ``<Delta W_j, Delta W_k>`` of the clients' updates.
    members : ndarray of bool, shape (n_clients,), optional
        The clients to cross-validate on (the collaborative set); default all.
    max_rank : int, optional
        Largest rank tried; default ``n_members - 2`` (what n - 1 held-in clients span),
        at most 10.
    rule : {"smallest-error", "one-standard-error"}, default="smallest-error"
        The rank of the smallest mean error, or the smallest rank within one standard
        error of it (the default before PROTOCOL amendment 7; module docstring).

    Returns
    -------
    RankSelection

    Examples
    --------
    Three groups of clients in a 3-module model: two shared directions.

    >>> rng = np.random.default_rng(0)
    >>> centres = rng.standard_normal((3, 3, 400))
    >>> updates = centres[np.arange(15) % 3] + 0.5 * rng.standard_normal((15, 3, 400))
    >>> grams = np.einsum("kmd,jmd->mkj", updates, updates)
    >>> cross_validated_rank(grams).rank
    2
    """
    from ._validation import check_option

    rule = check_option("rule", rule, RANK_RULES)  # this function's name for it
    module_grams = np.asarray(module_grams, dtype=float)
    n_modules, n_clients, _ = module_grams.shape
    members = (np.ones(n_clients, dtype=bool) if members is None
               else np.asarray(members, dtype=bool))
    index = np.flatnonzero(members)
    n = len(index)
    if n < 3:
        raise ValueError(f"bi-cross-validation needs at least 3 clients, got {n}.")
    max_rank = min(n - 2, 10) if max_rank is None else min(int(max_rank), n - 2)
    grams = module_grams[:, index[:, None], index[None, :]]
    errors = np.zeros((n, max_rank + 1))
    for side in module_splits(n_modules):
        errors += _held_out_errors(grams[side].sum(axis=0), grams[~side].sum(axis=0),
                                   max_rank)
    # Each client's errors relative to its rank-0 error (the mean's): every client counts
    # alike, and one far-off client (an attacker not yet flagged) cannot outweigh the
    # rest with the size of its own update.
    relative = errors / np.maximum(errors[:, :1], np.finfo(float).tiny)
    mean = relative.mean(axis=0)
    best = int(np.argmin(mean))
    differences = relative - relative[:, [best]]
    standard_error = differences.std(axis=0, ddof=1) / np.sqrt(n)
    selection = RankSelection(best, best, relative, standard_error, rule)
    if rule == "one-standard-error":
        selection = dataclasses.replace(selection, rank=selection.one_standard_error_rank)
    return selection

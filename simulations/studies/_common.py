"""Helpers shared by the studies: incoherence, subspaces of fitted parts, risks.

Only public clairstat API and numpy are used here; these helpers measure, they do not
estimate.
"""

from __future__ import annotations

import numpy as np

__all__ = ["column_incoherence", "block_row_incoherence", "stack", "leading_subspace",
           "oracle_refine", "benign_mean", "predicted_power", "random_basis", "check_control",
           "control_stream"]


def stack(blocks):
    """``[B_1, ..., B_K]`` of shape (p, K q) from blocks of shape (K, p, q)."""
    blocks = np.asarray(blocks)
    return blocks.transpose(1, 0, 2).reshape(blocks.shape[1], -1)


def column_incoherence(basis):
    """``mu(U) = (p / r) max_i ||U^T e_i||^2`` in [1, p / r] (Candes and Recht, 2009)."""
    p, rank = basis.shape
    return float(p / rank * np.max(np.sum(basis**2, axis=1)))


def block_row_incoherence(low_rank_blocks, rank):
    """Block incoherence of the row space of ``L = [L_1, ..., L_K]`` over the clients.

    With ``L = U S V^T`` and ``V_k`` the q rows of V belonging to client k,
    ``mu_V = (K / r) max_k ||V_k||_F^2``: the outlier-pursuit incoherence of Xu,
    Caramanis and Sanghavi (2012) with one column group per client. Clients with a zero
    block (the contaminated ones in the true L) are not counted in K.
    """
    n_clients, _, q = low_rank_blocks.shape
    _, _, right = np.linalg.svd(stack(low_rank_blocks), full_matrices=False)
    per_client = np.sum(right[:rank].T.reshape(n_clients, q, rank) ** 2, axis=(1, 2))
    active = np.linalg.norm(low_rank_blocks.reshape(n_clients, -1), axis=1) > 0
    return float(active.sum() / rank * per_client.max())


def leading_subspace(blocks, relative_tol):
    """Left singular vectors of ``stack(blocks)`` above ``relative_tol * s_max``.

    Returns the basis of shape (p, r_hat) (``r_hat`` may be 0).
    """
    left, singular, _ = np.linalg.svd(stack(blocks), full_matrices=False)
    if singular.size == 0 or singular[0] == 0:
        return left[:, :0]
    return left[:, : int(np.sum(singular > relative_tol * singular[0]))]


def benign_mean(values, contaminated):
    """Mean of per-client ``values`` over the benign clients."""
    return float(np.mean(np.asarray(values)[~np.asarray(contaminated, dtype=bool)]))


def oracle_refine(local_estimates, subspace, collaborative, weights=None):
    """The refinement of docs/theory.md (R1) with the true P* and C plugged in.

    ``Theta_tilde_k = P* Theta_hat_k + (I - P*) Theta_bar_C`` for every client.
    """
    weights = np.ones(len(local_estimates)) if weights is None else np.asarray(weights)
    index = np.asarray(collaborative)
    mean = np.tensordot(weights[index], local_estimates[index], axes=1) / weights[index].sum()
    inside = np.einsum("pr,sr,ksq->kpq", subspace, subspace, local_estimates)
    return inside + (mean - subspace @ (subspace.T @ mean))[None]


def check_control(control, study):
    """Refuse a control the study does not implement (a silent normal run would pass)."""
    if control is not None and control not in study.controls:
        raise ValueError(f"study {study.name!r} does not implement control {control!r}.")


def control_stream(seed):
    """A generator for a control's own draws, independent of every stream the replicate's
    data come from (``default_rng(seed)`` and the generators seeded with ``seed``): the
    first child of ``SeedSequence(seed)``. Drawing a control's randomness from
    ``default_rng(seed)`` itself would replay the data's first draws (a "random" basis
    equal to the QR of the heterogeneity shifts)."""
    return np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])


def random_basis(rng, p, rank):
    """Haar-random orthonormal basis (p, rank): the ``random-subspace`` control's P_hat.

    The first ``rank`` columns of a Haar-random orthogonal matrix (scipy's ``ortho_group``).
    """
    from scipy.stats import ortho_group

    if rank == 0:
        return np.zeros((p, 0))
    return ortho_group.rvs(p, random_state=rng)[:, :rank] if p > 1 else np.ones((1, 1))


def predicted_power(separation, noise_scale, dof, level):
    """P(chi2_dof(nc) > chi2_dof quantile 1 - level), nc = (separation / noise_scale)^2.

    The per-client statistic ``||(I - P*)(Theta_hat_k - Theta_bar)||_F^2 / s^2`` of a client
    whose truth sits ``separation`` off the subspace, with i.i.d. N(0, s^2) estimate noise,
    is non-central chi^2 with ``dof = (p - r) q`` degrees of freedom (docs/theory.md, D2).
    """
    from scipy import stats

    threshold = stats.chi2.isf(level, dof)
    noncentrality = (np.asarray(separation, dtype=float) / noise_scale) ** 2
    return stats.ncx2.sf(threshold, dof, noncentrality)

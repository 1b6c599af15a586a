"""Audit of the aggregation rules against their published definitions (numpy references)."""

import numpy as np

from clairstat.aggregation import aggregate, consensus_basis


def _shared_space(rng, union_rank=2, n_clients=3, d=8, k=6, rank=2):
    space = rng.standard_normal((d, union_rank))
    return [(space @ rng.standard_normal((union_rank, rank)), rng.standard_normal((rank, k)))
            for _ in range(n_clients)]


def test_glora_reference_rank_above_the_union_rank_is_the_union_rank():
    """GLoRA's docstring: a reference rank above the union rank "is the union rank". The
    basis took min(R, d, sum r_i) columns instead: R = 4 over a union of rank 2 gave two
    columns orthogonal to every client's column space (eigenvalue 0, arbitrary)."""
    rng = np.random.default_rng(0)
    factors = _shared_space(rng)
    weights = np.full(3, 1 / 3)
    exact = sum(b @ a for b, a in factors) / 3
    for reference_rank in (2, 4, 6, 7):
        res = aggregate("glora", factors, weights, reference_rank=reference_rank)
        assert res.union_rank == 2
        assert res.reference_basis.shape == (8, 2)
        assert res.coefficients.shape == (2, 6)
        union = np.linalg.qr(np.hstack([b for b, _ in factors]))[0][:, :2]
        basis = res.reference_basis
        assert np.allclose(union @ (union.T @ basis), basis)  # inside the union
        assert np.allclose(res.update, exact)
    basis, eigenvalues, union_rank = consensus_basis(factors, weights, reference_rank=5)
    assert basis.shape[1] == union_rank == 2


def test_trimmed_mean_cuts_a_mass_not_a_count_as_its_docstring_says():
    """16 equal clients, trim 0.1: 1.6 clients' weight per tail (scipy drops 1 whole)."""
    values = np.arange(16.0) ** 2
    values[-1] = 1000.0
    factors = [(np.array([[v]]), np.array([[1.0]])) for v in values]
    mass = (0.4 * values[1] + values[2:14].sum() + 0.4 * values[14]) / 12.8
    assert np.isclose(aggregate("trimmed_mean", factors, trim=0.1).update[0, 0], mass)
    assert not np.isclose(mass, np.sort(values)[1:15].mean())  # scipy's floor(1.6) = 1


def test_krum_and_geomedian_match_dense_references_with_mixed_ranks():
    """Blanchard et al.'s score (n - f - 2 nearest) and the weighted geometric median,
    computed on the dense updates, for clients of ranks 1 to 4."""
    rng = np.random.default_rng(1)
    factors = [(rng.standard_normal((6, r)), rng.standard_normal((r, 5)))
               for r in (1, 3, 2, 4, 2, 1, 3)]
    points = np.stack([(b @ a).ravel() for b, a in factors])
    distances = ((points[:, None] - points[None]) ** 2).sum(-1)
    for f in (0, 1, 2):
        scores = [np.sort(np.delete(distances[i], i))[:7 - f - 2].sum() for i in range(7)]
        res = aggregate("krum", factors, n_byzantine=f, multi=3)
        assert np.allclose(res.scores, scores)
        best = np.sort(np.argsort(scores, kind="stable")[:3])
        assert np.array_equal(res.selected, best)
        assert np.allclose(res.update.ravel(), points[best].mean(axis=0))
    weights = rng.random(7)
    weights /= weights.sum()
    median = weights @ points  # plain Weiszfeld from the weighted mean, run long
    for _ in range(5000):
        pull = weights / np.linalg.norm(points - median, axis=1)
        median = pull @ points / pull.sum()
    res = aggregate("geomedian", factors, weights)
    objective = lambda z: weights @ np.linalg.norm(points - z, axis=1)  # noqa: E731
    assert res.converged
    assert objective(res.update.ravel()) <= objective(median) * (1 + 1e-12)
    assert np.allclose(res.update.ravel(), median, atol=1e-8)

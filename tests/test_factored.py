"""Tests of clairstat._reduced: the factored stack equals the dense one, operation by operation."""

import numpy as np
import pytest

from clairstat import CLAIREstimator
from clairstat import _reduced as reduced
from clairstat._detection import (_centred_left_singular, out_of_sample_statistics,
                                  projection_statistics, refine, refit_subspace,
                                  weighted_mean)
from clairstat._reduced import (FactoredBlocks, eckart_young_factors, singular_values,
                                top_eigh, truncated_svd)
from clairstat._tuning import factored_noise_scale
from clairstat.aggregation import factored_reduction

EPS = np.finfo(np.float64).eps
# Every identity below is exact in real arithmetic; the factored side sums a few hundred
# float64 products per entry (Gram matrices of s x sum r_k factors), so rounding stays
# within ~1e3 eps of the scale; 1e5 eps (2e-11) leaves margin, far below any effect.
RTOL = 1e5 * EPS


def close(actual, desired):
    scale = max(np.linalg.norm(desired), 1.0)
    return np.linalg.norm(np.asarray(actual) - desired) <= RTOL * scale


@pytest.fixture(params=["narrow", "wide"])
def case(request):
    """Mixed ranks (2, 3, 4), one client with a rank-deficient A, a shared column space.

    "narrow": a module wider than the clients' ranks together (t = sum r_k); "wide": a
    12 x 10 module whose 9 clients' ranks add up to 27 (t = 10), where the stack's
    products go through formed combinations of the clients (FactoredBlocks._wide).
    """
    rng = np.random.default_rng(5)
    d, k = (40, 35) if request.param == "narrow" else (12, 10)
    shared = np.linalg.qr(rng.standard_normal((d, 3)))[0]
    factors = []
    for i, rank in enumerate([2, 3, 4, 3, 2, 4, 3, 2, 4]):
        b_mat = shared @ rng.standard_normal((3, rank)) + 0.05 * rng.standard_normal((d, rank))
        a_mat = rng.standard_normal((rank, k))
        if i == 4:  # rank-deficient A: two equal rows
            a_mat[1] = a_mat[0]
        factors.append((b_mat, a_mat))
    left, right, stack = factored_reduction(factors)
    assert stack._wide() == (request.param == "wide")  # each route is the one tested
    dense = np.stack([left.T @ b @ a @ right for b, a in factors])
    weights = rng.uniform(0.5, 2.0, len(factors))
    return stack, dense, weights, factors, (left, right)


def test_reduction_is_exact(case):
    stack, dense, _, factors, (left, right) = case
    assert stack.shape == (9, left.shape[1], 4)
    for k, (b_mat, a_mat) in enumerate(factors):
        assert close(left @ stack.expand(k) @ right.T, b_mat @ a_mat)
    assert close(stack.to_dense(), dense)
    rows = stack.rights.reshape(-1, stack.rights.shape[2])
    norms = np.linalg.norm(rows, axis=1)  # orthonormal rows, zero rows for padding
    assert np.all((np.abs(norms - 1) < 1e3 * EPS) | (norms == 0))
    # the decomposition sees Y_k: the same Frobenius norms as the (s, t) blocks
    assert close(np.sum(stack.coef ** 2, axis=(1, 2)), np.sum(dense ** 2, axis=(1, 2)))


def test_stack_operations_equal_the_dense_ones(case):
    stack, dense, weights, _, _ = case
    members = np.array([1, 1, 1, 0, 1, 1, 0, 1, 1], dtype=bool)
    sub, sub_dense = stack[members], dense[members]
    assert close(np.asarray(weighted_mean(sub, weights[members])),
                 weighted_mean(sub_dense, weights[members]))
    left, sing = _centred_left_singular(sub, weights[members])
    left_dense, sing_dense = _centred_left_singular(sub_dense, weights[members])
    size = min(sing.size, sing_dense.size)
    # Via a Gram matrix, squared singular values carry an absolute error ~ eps s_max^2
    # (tiny ones come out near sqrt(eps) s_max instead of 0).
    assert np.allclose(sing[:size] ** 2, sing_dense[:size] ** 2, rtol=0,
                       atol=1e3 * EPS * sing_dense[0] ** 2)
    basis = refit_subspace(sub, weights[members], 3)
    basis_dense = refit_subspace(sub_dense, weights[members], 3)
    assert close(basis @ basis.T, basis_dense @ basis_dense.T)
    mean = weighted_mean(sub, weights[members])
    mean_dense = weighted_mean(sub_dense, weights[members])
    assert close(projection_statistics(stack, mean, basis),
                 projection_statistics(dense, mean_dense, basis))
    assert close(projection_statistics(sub, mean, basis),
                 projection_statistics(sub_dense, mean_dense, basis))
    refined = refine(stack, basis, mean, ~members)
    assert close(np.asarray(refined), refine(dense, basis, mean_dense, ~members))
    assert close(refined[2], refine(dense, basis, mean_dense, ~members)[2])


def test_the_wide_and_kernel_routes_agree(case, monkeypatch):
    """The centred Gram, its operator and the outer products are the same through formed
    combinations of the clients (wide) and through the cross-Gram kernel (the
    statistics, one route for both, are compared with the dense ones above)."""
    stack, _, weights, _, _ = case
    members = np.array([1, 1, 1, 0, 1, 1, 0, 1, 1], dtype=bool)
    sub, w_sub = stack[members], weights[members]
    omega = w_sub / w_sub.sum()
    block = np.random.default_rng(0).standard_normal((stack.shape[1], 3))
    answers = []
    for factor in (0, 10 ** 9):  # always wide, never wide
        monkeypatch.setattr(reduced, "_WIDE_FACTOR", factor)
        assert sub._wide() == (factor == 0)
        answers.append((sub.centred_gram(w_sub), sub._centred_operator(w_sub)[0](block),
                        *sub._outer(omega, 1.0 - len(omega) * omega)))
    for wide, kernel in zip(*answers):
        assert close(wide, kernel)


@pytest.mark.parametrize("p, short", [(10, True), (20, False)])
def test_a_wide_stack_forms_the_operator_only_when_short(p, short, monkeypatch):
    """8 rank-4 clients on a t = 6 module (n r = 32 > 2 t): the operator is the formed
    Gram where the stack is also short (n r > 2 p), else the kernel; both equal the
    centred Gram's product (a review: forming it for a tall module was 7x slower)."""
    rng = np.random.default_rng(1)
    rights = np.stack([np.linalg.qr(rng.standard_normal((6, 4)))[0].T for _ in range(8)])
    stack = FactoredBlocks(rng.standard_normal((8, p, 4)), rights)
    weights = rng.uniform(0.5, 2.0, 8)
    assert stack._wide()
    formed = []
    monkeypatch.setattr(stack, "centred_gram",
                        lambda w, real=stack.centred_gram: formed.append(1) or real(w))
    apply, _ = stack._centred_operator(weights)
    assert bool(formed) == short  # the formed Gram only for the short stack
    block = rng.standard_normal((p, 3))
    assert close(apply(block), FactoredBlocks.centred_gram(stack, weights) @ block)


def test_mean_of_another_stack_is_refused(case):
    stack, _, weights, _, _ = case
    other = FactoredBlocks(stack.coef.copy(), stack.rights.copy())
    mean = weighted_mean(other, weights)
    with pytest.raises(ValueError, match="another stack"):
        projection_statistics(stack, mean, np.zeros((stack.shape[1], 0)))


def test_mismatched_factors_are_refused():
    with pytest.raises(ValueError, match="do not match"):
        FactoredBlocks(np.zeros((3, 5, 2)), np.zeros((3, 3, 6)))


def test_factored_fit_equals_the_dense_fit_without_backbone(case):
    """Same flags, subspace and refined estimates as the dense estimator (given all knobs)."""
    stack, dense, weights, _, _ = case
    params = dict(rank=3, alpha=1.0, beta=2.0, noise_scale=0.05, backbone=False,
                  detection="threshold", random_state=0)
    factored = CLAIREstimator(**params).fit(stack, sample_weight=weights)
    full = CLAIREstimator(**params).fit(dense, sample_weight=weights)
    assert np.array_equal(factored.contaminated_, full.contaminated_)
    assert close(factored.subspace_ @ factored.subspace_.T, full.subspace_ @ full.subspace_.T)
    # The decomposition runs on (s, r) instead of (s, t) blocks: the same convex program
    # up to the solver's relative duality gap (tol=1e-6), hence this looser check.
    assert np.allclose(factored.contamination_scores_, full.contamination_scores_,
                       atol=1e-5 * np.linalg.norm(dense))
    # The dense fit's given noise scale has a calibration factor, and its refinement keeps
    # refinement_keep_ of each member's own deviation; a factored stack's null is
    # predicted from the clients' statistics (no factor, nothing kept). The projections
    # are the same: the dense fit's, read with nothing kept (as an older pickle).
    assert factored.refinement_keep_ == 0.0
    assert np.isfinite(full.null_scale_factor_)
    with_keep = full.transform(dense)
    assert close(with_keep, full.refined_)
    full.refinement_keep_ = 0.0
    assert close(np.asarray(factored.refined_), full.transform(dense))
    assert close(np.asarray(factored.collaborative_mean_), full.collaborative_mean_)


def test_factored_fit_needs_no_backbone(case):
    with pytest.raises(ValueError, match="backbone=False"):
        CLAIREstimator().fit(case[0])


def test_noise_scale_of_pure_noise():
    rng = np.random.default_rng(0)
    sigma, n_clients, p, rank = 0.3, 40, 200, 5
    rights = np.stack([np.linalg.qr(rng.standard_normal((300, rank)))[0].T
                       for _ in range(n_clients)])
    stack = FactoredBlocks(sigma * rng.standard_normal((n_clients, p, rank)), rights)
    # 200 x 200 noise: the median singular value has a relative sd of about 1%.
    assert abs(factored_noise_scale(stack) / sigma - 1) < 0.05
    twice = FactoredBlocks(np.concatenate([stack.coef, stack.coef]),
                           np.concatenate([rights, rights]))
    assert factored_noise_scale(twice) == pytest.approx(factored_noise_scale(stack))


def test_truncated_svd_paths_agree():
    rng = np.random.default_rng(1)
    matrix = rng.standard_normal((300, 12)) @ rng.standard_normal((12, 250))
    matrix += 0.01 * rng.standard_normal(matrix.shape)
    left, sing, right_t = truncated_svd(matrix, 8)  # the Lanczos path
    dense = np.linalg.svd(matrix, compute_uv=False)
    assert np.all(np.diff(sing) <= 0)
    # ARPACK with tol=0 converges to machine precision relative to the largest value.
    assert np.allclose(sing, dense[:8], rtol=0, atol=1e3 * EPS * dense[0])
    approx = left * sing @ right_t
    assert np.isclose(np.linalg.norm(matrix - approx), np.linalg.norm(dense[8:]),
                      rtol=1e3 * EPS * dense[0] / np.linalg.norm(dense[8:]))
    small = truncated_svd(matrix[:50, :40], 8)[1]  # the dense path
    assert np.allclose(small, np.linalg.svd(matrix[:50, :40], compute_uv=False)[:8])


def test_top_eigh_paths_agree():
    rng = np.random.default_rng(2)
    half = rng.standard_normal((200, 200))
    matrix = half @ half.T
    values, vectors = top_eigh(matrix, 5)  # Lanczos
    full = np.linalg.eigvalsh(matrix)[::-1]
    assert np.allclose(values, full[:5], rtol=0, atol=1e3 * EPS * full[0])
    assert np.allclose(matrix @ vectors, vectors * values, atol=1e3 * EPS * full[0])


@pytest.mark.parametrize("flagged", [False, True])
def test_structured_readout_is_the_dense_truncated_svd(flagged):
    """Client readouts from C^T C's eigenbasis equal the dense SVD of the refined matrix."""
    rng = np.random.default_rng(3)
    n_clients, s, rank, t = 30, 120, 6, 180
    rights = np.stack([np.linalg.qr(rng.standard_normal((t, rank)))[0].T
                       for _ in range(n_clients)])
    shared = np.linalg.qr(rng.standard_normal((s, 3)))[0]
    coef = shared @ rng.standard_normal((n_clients, 3, rank))
    coef += 0.1 * rng.standard_normal(coef.shape)
    stack = FactoredBlocks(coef, rights)
    weights = np.ones(n_clients)
    basis = refit_subspace(stack, weights, 3)
    contaminated = np.zeros(n_clients, dtype=bool)
    contaminated[4] = flagged
    refined = refine(stack, basis, weighted_mean(stack, weights), contaminated)
    dense = refined[4]
    left, sing, right_t = refined.truncated_svd(4, rank)  # t = 180: the Lanczos path
    want = np.linalg.svd(dense, compute_uv=False)
    # Via C^T C the squared singular values carry an absolute error ~ eps s_max^2.
    assert np.allclose(sing ** 2, want[:rank] ** 2, rtol=0, atol=1e3 * EPS * want[0] ** 2)
    assert np.allclose(left.T @ left, np.eye(rank), atol=1e-8)
    error = np.linalg.norm(dense - left * sing @ right_t)
    assert abs(error - np.linalg.norm(want[rank:])) <= 1e-8 * want[0]


# ------------------------------------------------- leave-one-out without K refits

def _dense_problem(rng, n_clients, p, q, rank):
    shared = np.linalg.qr(rng.standard_normal((p, rank)))[0]
    blocks = shared @ rng.standard_normal((n_clients, rank, q))
    blocks += 0.1 * rng.standard_normal((n_clients, p, q))
    blocks[:2] += rng.standard_normal((2, p, q))  # two clients off the subspace
    return blocks


def _factored_problem(rng, n_clients, d, rank):
    shared = np.linalg.qr(rng.standard_normal((d, rank)))[0]
    factors = []
    for i in range(n_clients):
        r_i = 3 + i % 3  # mixed ranks: zero-padded columns in the stack
        b_mat = shared @ rng.standard_normal((rank, r_i)) + 0.05 * rng.standard_normal((d, r_i))
        factors.append((b_mat, rng.standard_normal((r_i, d))))
    return factored_reduction(factors).updates


def _refits(blocks, weights, members, rank):
    """The definition: a mean and a subspace refitted on the other members, per member."""
    stat, bases, gaps = {}, {}, {}
    for k in np.flatnonzero(members):
        others = members.copy()
        others[k] = False
        mean = weighted_mean(blocks[others], weights[others])
        basis = refit_subspace(blocks[others], weights[others], rank)
        one = np.arange(len(members)) == k
        stat[k] = projection_statistics(blocks[one], mean, basis)[0]
        sing = _centred_left_singular(blocks[others], weights[others])[1]
        gaps[k] = (sing[rank - 1] ** 2 - sing[rank] ** 2) / sing[0] ** 2
        bases[k] = basis
    return stat, bases, gaps


@pytest.mark.parametrize("kind, shape, rank", [
    ("dense", (40, 30, 8), 3),      # Gram route, dense eigensolver
    ("dense", (30, 120, 10), 4),    # Gram route, Lanczos (p >= 100, rank <= p / 4)
    ("dense", (12, 60, 3), 2),      # narrow stack: thin-SVD refits
    ("factored", (24, 200, None), 3),  # s ~ 100: Lanczos on the downdated Gram
    ("factored", (9, 40, None), 2)])
@pytest.mark.parametrize("weighting", ["equal", "random", "one zero", "one dominant"])
def test_leave_one_out_equals_the_refits(kind, shape, rank, weighting):
    """The Gram downdates give the statistics and subspaces of K separate refits."""
    rng = np.random.default_rng(11)
    if kind == "dense":
        blocks = _dense_problem(rng, *shape, rank)
    else:
        blocks = _factored_problem(rng, shape[0], shape[1], rank)
    n_clients = len(blocks)
    weights = {"equal": np.ones(n_clients), "random": rng.uniform(0.2, 3.0, n_clients),
               "one zero": np.r_[0.0, rng.uniform(0.2, 3.0, n_clients - 1)],
               # a member with most of the weight: refitted, a downdate would not be exact
               "one dominant": np.r_[1e6, rng.uniform(0.2, 3.0, n_clients - 1)]}[weighting]
    members = np.ones(n_clients, dtype=bool)
    members[[1, 5]] = False
    mean = weighted_mean(blocks[members], weights[members])
    basis = refit_subspace(blocks[members], weights[members], rank)
    stat, fits = out_of_sample_statistics(blocks, weights, members, mean, basis)
    want, bases, gaps = _refits(blocks, weights, members, rank)
    assert np.array_equal(stat[~members], projection_statistics(blocks, mean, basis)[~members])
    for k in want:
        # Both sides eigen-decompose the same Gram matrix up to rounding (~1e2 eps of its
        # largest eigenvalue); Davis-Kahan turns that into a subspace error of
        # 1e2 eps / (relative eigengap), and the statistic moves by at most twice that
        # times the residual's squared norm (itself bounded here by ||X_k - mean||^2).
        tol = 1e3 * EPS / gaps[k]
        assert np.linalg.norm(fits[k][0] @ fits[k][0].T - bases[k] @ bases[k].T) <= tol
        assert np.array_equal(fits[k][1], members & (np.arange(n_clients) != k))
        scale = np.sum((blocks.expand(k) if kind == "factored" else blocks[k]) ** 2)
        assert abs(stat[k] - want[k]) <= 4 * tol * (scale + np.sum(np.asarray(mean) ** 2))


@pytest.mark.parametrize("shape", [(30, 200), (200, 30), (60, 80)])
def test_singular_values_follow_the_gram_rule_to_round_off(shape):
    """Wide, tall (Gram of the short side) and square (SVD): the same values."""
    rng = np.random.default_rng(4)
    matrix = rng.standard_normal(shape)
    want = np.linalg.svd(matrix, compute_uv=False)
    got = singular_values(matrix)
    # Via a Gram matrix, squared values carry an absolute error ~ eps s_max^2.
    assert np.allclose(got ** 2, want ** 2, rtol=0, atol=1e3 * EPS * want[0] ** 2)


@pytest.mark.parametrize("shape", [(61, 61), (60, 60), (40, 90), (90, 41)])
def test_median_singular_value_is_the_svds_median(shape, monkeypatch):
    """Odd and even counts, square, wide and tall: the median of all singular values.
    A low-rank part about 100 times the bulk's singular values (as a LoRA stack's shared
    subspace) keeps the Gram route (its error bound is below 1e-6 of the median's
    square: no SVD is called); the median then agrees to that bound and, in practice,
    to about 1e-8."""
    import scipy.linalg

    from clairstat import _reduced

    rng = np.random.default_rng(11)
    matrix = rng.standard_normal(shape)
    matrix += 10 * np.outer(rng.standard_normal(shape[0]), rng.standard_normal(shape[1]))
    want = float(np.median(np.linalg.svd(matrix, compute_uv=False)))

    def no_svd(*args, **kwargs):
        raise AssertionError("the Gram route was expected here")

    monkeypatch.setattr(_reduced.scipy.linalg, "svd", no_svd)
    median_singular_value = _reduced.median_singular_value
    # the route's error estimate: s^2 to 1e-6 relative, so s to about 5e-7
    assert abs(median_singular_value(matrix) - want) <= 5e-7 * want


@pytest.mark.parametrize("scale", [1e-300, 1e-200, 1e200, 1e300])
def test_median_singular_value_follows_the_units(scale):
    """Far outside float64's squared range (the Gram matrix of the raw entries would
    underflow to 0 or overflow to inf): the median scales with the data."""
    from clairstat._reduced import median_singular_value

    rng = np.random.default_rng(13)
    matrix = rng.standard_normal((30, 30)) + 5 * np.outer(rng.standard_normal(30),
                                                           rng.standard_normal(30))
    # scale * matrix is the matrix to one rounding per entry (eps relative), and the
    # rescaling inside is by a power of two (exact): the medians agree to a few eps
    assert np.isclose(median_singular_value(scale * matrix),
                      scale * median_singular_value(matrix), rtol=1e-8, atol=0)


def test_median_singular_value_near_round_off_takes_the_svd():
    """A median 1e-12 of the largest singular value: the Gram route's eigenvalues are
    round-off there (shown below), so the SVD answers."""
    from clairstat._reduced import median_singular_value

    rng = np.random.default_rng(12)
    big = np.outer(rng.standard_normal(50), rng.standard_normal(50))
    matrix = big + 1e-12 * rng.standard_normal((50, 50))
    want = float(np.median(np.linalg.svd(matrix, compute_uv=False)))
    gram_route = np.sqrt(np.abs(np.median(np.linalg.eigvalsh(matrix.T @ matrix))))
    assert abs(gram_route - want) > 0.5 * want  # what the check guards against
    assert abs(median_singular_value(matrix) - want) <= 5e-7 * want
    with pytest.raises(ValueError, match="empty"):
        median_singular_value(np.zeros((0, 3)))


def _svd_calls(monkeypatch):
    """Count the SVDs :mod:`clairstat._reduced` runs (the median's fallback route)."""
    from clairstat import _reduced

    calls, svd = [], _reduced.scipy.linalg.svd

    def counted(*args, **kwargs):
        calls.append(True)
        return svd(*args, **kwargs)

    monkeypatch.setattr(_reduced.scipy.linalg, "svd", counted)
    return calls


def test_median_singular_value_route_counts_the_long_side(monkeypatch):
    """The decision itself, whatever the BLAS: singular values 1e3, 1, 0.5 on 1e5 rows.
    The short side's terms (3 eps (||A||_F^2 + s_max^2) = 1.3e-9 of the median's
    square) would take the Gram route; the long side's, 1e5 eps ||A||_F^2 = 2.2e-5 of
    it, sends it to the SVD (negative control: with n in place of m, no SVD is run)."""
    from clairstat._reduced import median_singular_value

    rng = np.random.default_rng(1)
    left = np.linalg.qr(rng.standard_normal((10**5, 3)))[0]
    right = np.linalg.qr(rng.standard_normal((3, 3)))[0]
    matrix = (left * [1e3, 1.0, 0.5]) @ right.T
    calls = _svd_calls(monkeypatch)
    got = median_singular_value(matrix)
    assert calls, "the long side's round-off was not counted"
    assert abs(got - 1.0) <= 1e-12  # the SVD's answer (a few eps, with the QRs' own)


def test_median_singular_value_of_a_long_matrix_counts_its_long_side(monkeypatch):
    """Four million nearly repeated rows, three columns: each Gram entry sums 4e6
    products of one sign pattern, so its round-off grows with the long side. A bound
    counting only the short side (3 eps s_max^2) passes the route here; with OpenBLAS's
    summation its median's square is then off by 5e-6, beyond the 1e-6 asked (a BLAS
    that sums more accurately may stay inside it: that part is only reported). The
    package takes the SVD and gives its answer."""
    import scipy.linalg

    from clairstat._reduced import median_singular_value

    rng = np.random.default_rng(0)
    rows = 4 * 10**6
    matrix = np.ones((rows, 1)) * np.array([0.5, 0.35, 0.15])
    matrix += (0.5 / 3e4) * rng.choice([-1.0, 1.0], size=(rows, 3))
    want = float(np.median(np.linalg.svd(matrix, compute_uv=False)))
    eigenvalues = scipy.linalg.eigvalsh(matrix.T @ matrix, driver="evr")
    assert 3 * EPS * eigenvalues[-1] <= 1e-6 * eigenvalues[1]  # the short-side rule's yes
    calls = _svd_calls(monkeypatch)
    assert abs(median_singular_value(matrix) - want) <= 1e3 * EPS * want
    assert calls  # the SVD's answer, not the Gram route's
    gram_error = abs(eigenvalues[1] - want ** 2) / want ** 2
    print(f"this BLAS's Gram route: median's square off by {gram_error:.1e}")


def test_structured_readout_of_a_narrow_module_uses_the_dense_solver():
    """t < 100: the operator of FactoredRefined.truncated_svd is formed and eigh-solved."""
    rng = np.random.default_rng(6)
    n_clients, s, rank, t = 8, 20, 2, 30
    rights = np.stack([np.linalg.qr(rng.standard_normal((t, rank)))[0].T
                       for _ in range(n_clients)])
    stack = FactoredBlocks(rng.standard_normal((n_clients, s, rank)), rights)
    weights = np.ones(n_clients)
    basis = refit_subspace(stack, weights, 2)
    refined = refine(stack, basis, weighted_mean(stack, weights), np.zeros(n_clients, bool))
    sing = refined.truncated_svd(3, rank)[1]
    want = np.linalg.svd(refined[3], compute_uv=False)
    assert np.allclose(sing ** 2, want[:rank] ** 2, rtol=0, atol=1e3 * EPS * want[0] ** 2)


def test_eckart_young_factors_pad_to_the_rank():
    rng = np.random.default_rng(8)
    left_basis = np.linalg.qr(rng.standard_normal((12, 3)))[0]
    right_basis = np.linalg.qr(rng.standard_normal((10, 2)))[0]
    reduced = rng.standard_normal((3, 2))
    b_mat, a_mat = eckart_young_factors(truncated_svd(reduced, 4), 4, left_basis,
                                        right_basis)
    assert b_mat.shape == (12, 4) and a_mat.shape == (4, 10)
    assert close(b_mat @ a_mat, left_basis @ reduced @ right_basis.T)  # rank 2 <= 4: exact
    assert not np.any(b_mat[:, 2:]) and not np.any(a_mat[2:])


# ------------------------------------- fast paths against the solvers they replace

def _spectrum_case(rng, dim=160, signal=(50.0, 40.0, 30.0, 20.0, 10.0)):
    """A symmetric matrix with a few separated top eigenvalues over a noise bulk."""
    noise = rng.standard_normal((dim, 2 * dim)) / np.sqrt(2 * dim)
    shared = np.linalg.qr(rng.standard_normal((dim, len(signal))))[0]
    return noise @ noise.T + shared @ np.diag(signal) @ shared.T, shared


def test_warm_top_eigh_equals_the_dense_eigenpairs():
    """Certified subspace iteration: the top eigenpairs of eigh, within Davis-Kahan."""
    from clairstat._reduced import warm_top_eigh

    rng = np.random.default_rng(21)
    matrix, shared = _spectrum_case(rng)
    want_val, want_vec = np.linalg.eigh(matrix)
    want_val, want_vec = want_val[::-1], want_vec[:, ::-1]
    start = np.hstack([shared + 0.1 * rng.standard_normal(shared.shape),
                       rng.standard_normal((len(matrix), 4))])
    values, vectors = warm_top_eigh(lambda z: matrix @ z, start, 5)
    # The certificate bounds each residual by 4 sqrt(dim) eps lambda_1; Davis-Kahan turns
    # it into a subspace error of that over the eigengap (1e2 eps margin for eigh's own).
    gap = want_val[4] - want_val[5]
    bound = (4 * np.sqrt(len(matrix)) + 1e2) * EPS * want_val[0] / gap
    assert np.linalg.norm(vectors @ vectors.T - want_vec[:, :5] @ want_vec[:, :5].T) <= bound
    assert np.allclose(values, want_val[:5], rtol=0, atol=1e2 * EPS * want_val[0])
    # no certificate within the allowed products: None, the caller solves as before
    assert warm_top_eigh(lambda z: matrix @ z, rng.standard_normal((len(matrix), 6)), 5,
                         max_iter=1) is None


def test_batched_warm_top_eigh_equals_one_problem_at_a_time():
    """Each problem of a batch: the eigenpairs warm_top_eigh certifies from the same
    start, to round-off; an uncertified problem is None while the others are found."""
    from clairstat._reduced import batched_warm_top_eigh, warm_top_eigh

    rng = np.random.default_rng(5)
    cases = [_spectrum_case(rng) for _ in range(4)]
    matrices = np.stack([matrix for matrix, _ in cases])
    starts = np.stack([np.hstack([shared + 0.1 * rng.standard_normal(shared.shape),
                                  rng.standard_normal((len(shared), 4))])
                       for _, shared in cases])

    def apply(active, blocks):
        return np.matmul(matrices[active], blocks)

    found = batched_warm_top_eigh(apply, starts, 5)
    for matrix, start, (values, vectors) in zip(matrices, starts, found):
        want_val, want_vec = warm_top_eigh(lambda z, m=matrix: m @ z, start, 5)
        # both certified: within 4 sqrt(dim) eps lambda_1 / gap of the same subspace
        gap = want_val[4] - np.linalg.eigvalsh(matrix)[::-1][5]
        bound = 2 * (4 * np.sqrt(len(matrix)) + 1e2) * EPS * want_val[0] / gap
        assert np.linalg.norm(vectors @ vectors.T - want_vec @ want_vec.T) <= bound
        assert np.allclose(values, want_val, rtol=0, atol=1e2 * EPS * want_val[0])
    # Started at their exact top eigenvectors, three problems are certified within two
    # products; the third, started at random, needs about 25 (its bulk directions
    # shrink by lambda_10 / lambda_5 ~ 0.3 per product from O(1) to eps): None.
    exact = np.stack([np.linalg.eigh(matrix)[1][:, ::-1][:, :9] for matrix in matrices])
    exact[2] = rng.standard_normal(exact[2].shape)
    short = batched_warm_top_eigh(apply, exact, 5, max_iter=2)
    assert short[2] is None
    assert all(answer is not None for i, answer in enumerate(short) if i != 2)


@pytest.mark.parametrize("batch", [None, 64, 7])
@pytest.mark.parametrize("weighting", ["equal", "random"])
def test_leave_one_out_fits_equal_the_formed_downdates(weighting, batch, monkeypatch):
    """Per member: the statistic and basis of the formed p x p downdate, to round-off,
    one client at a time (``fit(k)``) and as batches (``fit.all()``: equal weights
    share one downdate base and iterate together, in chunks of ``_LOO_BATCH``)."""
    import clairstat._reduced as reduced

    if batch is not None:
        monkeypatch.setattr(reduced, "_LOO_BATCH", batch)
    rng = np.random.default_rng(12)
    stack = _factored_problem(rng, 30, 220, 3)
    weights = np.ones(30) if weighting == "equal" else rng.uniform(0.2, 3.0, 30)
    rank = 3
    basis = top_eigh(stack.centred_gram(weights), rank)[1]
    fit = stack.leave_one_out_fits(weights, rank, basis)
    fits = fit.all() if batch is not None else [fit(k) for k in range(len(stack))]
    without = stack.leave_one_out_grams(weights)
    for k in range(len(stack)):
        gram, residual = without(k)
        eigval, want_basis = top_eigh(gram, rank + 1)
        want = residual - want_basis[:, :rank] @ (want_basis[:, :rank].T @ residual)
        stat, got_basis = fits[k]
        # Davis-Kahan over the relative gap, as test_leave_one_out_equals_the_refits.
        tol = 1e3 * EPS * eigval[0] / (eigval[rank - 1] - eigval[rank])
        assert np.linalg.norm(got_basis @ got_basis.T
                              - want_basis[:, :rank] @ want_basis[:, :rank].T) <= tol
        assert abs(stat - np.sum(want ** 2)) <= 4 * tol * np.sum(residual ** 2)


def test_count_above_equals_the_count_of_the_spectrum():
    """The rank rule's count from a few Lanczos pairs equals counting every value."""
    rng = np.random.default_rng(13)
    stack = _factored_problem(rng, 30, 220, 3)
    weights = rng.uniform(0.2, 3.0, 30)
    sing = np.sqrt(np.clip(np.linalg.eigvalsh(stack.centred_gram(weights)), 0, None))
    # edges between well-separated values (none within round-off of an edge)
    # 8 and 12 above: the first Lanczos run (8 pairs) is all above the edge and the
    # deflated check decides (8: stop; 12: a second run of 16 pairs).
    for edge in [0.5 * (sing[-1] + sing[-2]), 0.5 * (sing[-3] + sing[-4]),
                 0.5 * (sing[-8] + sing[-9]), 0.5 * (sing[-12] + sing[-13]),
                 np.median(sing), 0.5 * sing[0]]:
        assert stack.count_above(weights, edge) == int(np.sum(sing > edge))


def _nearly_noiseless_stack(rng, n_clients=12, dim=150, rank=3, noise=1e-7):
    """Clients ``(U W_k + noise N_k) A_k``: nearly all of each in a rank-``rank`` column
    space U; returns the stack, the dense stack and U in the stack's coordinates."""
    shared = np.linalg.qr(rng.standard_normal((dim, rank)))[0]
    factors = [(shared @ rng.standard_normal((rank, 4)) + noise * rng.standard_normal((dim, 4)),
                rng.standard_normal((4, 90))) for _ in range(n_clients)]
    reduction = factored_reduction(factors)
    left, right = reduction.left_basis, reduction.right_basis
    dense = np.stack([left.T @ b @ a @ right for b, a in factors])
    return reduction.updates, dense, left.T @ shared


@pytest.mark.parametrize("floor", ["package", "none"])
def test_off_subspace_statistics_keep_their_digits_when_the_subspace_holds_nearly_all(
        floor, monkeypatch):
    """The statistics by difference (raw inner products minus the in-subspace ones) lose
    digits where the off-subspace part is tiny against the whole; there the direct
    route (off-subspace factors) is taken.

    Off-subspace parts 1e-14 of the clients' squared norms: by difference the
    statistics would carry an error ~ eps |X|^2, about 1% of themselves; directly, they
    equal the dense computation to ~1e-8 relative (the dense side's own round-off,
    eps sqrt(|X|^2 / statistic)). Negative control (``floor="none"``): always by
    difference, the 1e-6 tolerance fails.
    """
    import clairstat._reduced as reduced

    if floor == "none":
        monkeypatch.setattr(reduced, "_DIFFERENCE_FLOOR", 0.0)
    rng = np.random.default_rng(31)
    stack, dense, basis = _nearly_noiseless_stack(rng)
    weights = np.ones(len(stack))
    got = projection_statistics(stack, weighted_mean(stack, weights), basis)
    want = projection_statistics(dense, weighted_mean(dense, weights), basis)
    error = np.max(np.abs(got - want) / want)
    assert (error <= 1e-6) == (floor == "package")


def test_warm_svt_spectrum_equals_the_cold_one_and_refuses_a_missing_direction():
    """The warm SVT's pairs are the cold run's kept ones; a start that lacks a direction
    above the threshold is refused by the deflated check (not silently thresholded away)."""
    from clairstat.aggregation._lanczos_solver import _top_gram_eigen, _warm_gram_eigen

    rng = np.random.default_rng(32)
    dim = 160
    signal = np.linalg.qr(rng.standard_normal((dim, 5)))[0] * np.array([9.0, 8, 7, 6, 5])
    matrix = signal @ rng.standard_normal((5, 2 * dim)) / np.sqrt(dim) \
        + rng.standard_normal((dim, 2 * dim)) / np.sqrt(2 * dim)
    threshold = 0.5 * (np.linalg.svd(matrix, compute_uv=False)[4]
                       + np.linalg.svd(matrix, compute_uv=False)[5])
    cold_val, cold_vec, wide = _top_gram_eigen(matrix, threshold, 5)
    keep = cold_val > threshold ** 2
    assert keep.sum() == 5
    nearby = cold_vec[:, keep] + 1e-3 * rng.standard_normal((dim, 5))
    warm_val, warm_vec, warm_wide = _warm_gram_eigen(matrix, threshold,
                                                     np.linalg.qr(nearby)[0])
    assert warm_wide == wide
    assert np.allclose(warm_val, cold_val[keep], rtol=0, atol=1e2 * EPS * cold_val[0])
    assert np.linalg.norm(warm_vec @ warm_vec.T - cold_vec[:, keep] @ cold_vec[:, keep].T) \
        <= 1e-10
    # Four of the five kept directions: the fifth stays above the threshold after deflation.
    assert _warm_gram_eigen(matrix, threshold, cold_vec[:, :4]) is None


def test_batched_readouts_equal_one_by_one():
    """ReducedStack.readouts: the factors of readout(k, rank), client by client."""
    from clairstat._reduced import FactoredRefined, ReducedStack

    rng = np.random.default_rng(14)
    d = 220
    shared = np.linalg.qr(rng.standard_normal((d, 3)))[0]
    factors = [(shared @ rng.standard_normal((3, 4)) + 0.05 * rng.standard_normal((d, 4)),
                rng.standard_normal((4, d))) for _ in range(30)]
    left, right, stack = factored_reduction(factors)
    weights = np.ones(30)
    basis = refit_subspace(stack, weights, 3)
    flagged = np.arange(30) < 3
    refined = ReducedStack(left, FactoredRefined(stack, basis, stack.mean(weights), flagged),
                           right)
    clients = [0, 4, 7, 12, 29]
    batched = refined.readouts(clients, [4, 4, 2, 4, 3])
    for k, rank, (b_mat, a_mat) in zip(clients, [4, 4, 2, 4, 3], batched):
        b_one, a_one = refined.readout(k, rank)
        assert b_mat.shape == b_one.shape and a_mat.shape == a_one.shape
        # the same Lanczos runs and formulas; only the grouping of products differs
        assert close(b_mat @ a_mat, b_one @ a_one)


def test_partial_spectrum_solver_equals_the_torch_solver():
    """The LoRA modules' solver (Lanczos SVT and norms) runs the parent's iterations."""
    pytest.importorskip("torch")
    from clairstat import clair_decompose
    from clairstat.aggregation._lanczos_solver import partial_spectrum_solver
    from clairstat.solvers import TorchSolver

    rng = np.random.default_rng(15)
    stack = _factored_problem(rng, 30, 220, 3)
    blocks = stack.coef.copy()
    blocks[:3] += 3.0 * rng.standard_normal(blocks[:3].shape)  # three contaminated
    sigma = factored_noise_scale(stack)
    want = clair_decompose(blocks, backbone=False, solver=TorchSolver(), noise_scale=sigma)
    got = clair_decompose(blocks, backbone=False, solver=partial_spectrum_solver({}),
                          noise_scale=sigma)
    assert got.n_iter == want.n_iter
    # The Gram route gives each kept singular value s to eps s_max^2 / s, i.e. a relative
    # perturbation of the SVT of at most eps (s_max / alpha)^2 per iteration; FISTA's
    # steps are non-expansive, so n_iter of them add up at most linearly.
    s_max = np.linalg.norm(np.hstack(list(blocks)), 2)
    tol = want.n_iter * EPS * (s_max / want.alpha) ** 2
    assert np.linalg.norm(got.low_rank - want.low_rank) <= tol * np.linalg.norm(want.low_rank)
    assert np.linalg.norm(got.sparse - want.sparse) <= tol * np.linalg.norm(blocks)
    assert abs(got.objective - want.objective) <= tol * want.objective
    flags = np.linalg.norm(want.sparse, axis=(1, 2)) > 0
    assert np.array_equal(np.linalg.norm(got.sparse, axis=(1, 2)) > 0, flags)
    assert flags[:3].all() and 0 < flags.sum() < len(flags)


def _missing_top_pair(apply, start, count, **_):
    """Certified eigenpairs of the Gram operator, the 2nd to the (count+1)-th: a warm
    start that has lost the top direction (the failure a deflated check exists for)."""
    gram = apply(np.eye(start.shape[0]))
    val, vec = np.linalg.eigh(0.5 * (gram + gram.T))
    return val[::-1][1:count + 1], vec[:, ::-1][:, 1:count + 1]


@pytest.mark.parametrize("wrong_steps", ["transient", "persistent"])
def test_unchecked_warm_svt_steps_never_give_a_wrong_certified_answer(monkeypatch,
                                                                      wrong_steps):
    """The SVT checks a warm start only at the FISTA steps whose point is certified (where
    the duality gap is evaluated). Warm starts that lose the top direction at a few steps
    (transient) cost iterations, not accuracy: the answer is the dense solver's within
    the two certificates. Lost at every step (persistent: a failure no real warm start
    has, as a subspace iteration keeps the top directions of its start), the unchecked
    steps are wrong each time and the solver says it did not converge; it never reports
    a certified point that is not one."""
    pytest.importorskip("torch")
    from sklearn.exceptions import ConvergenceWarning

    from clairstat import clair_decompose
    from clairstat.aggregation import _lanczos_solver
    from clairstat.aggregation._lanczos_solver import partial_spectrum_solver
    from clairstat.solvers import TorchSolver

    rng = np.random.default_rng(15)
    stack = _factored_problem(rng, 30, 220, 3)
    blocks = stack.coef.copy()
    blocks[:3] += 3.0 * rng.standard_normal(blocks[:3].shape)
    sigma = factored_noise_scale(stack)
    want = clair_decompose(blocks, backbone=False, solver=TorchSolver(), noise_scale=sigma)
    warm, checks = _lanczos_solver.warm_top_eigh, _lanczos_solver.deflated_top
    calls = {"warm": 0, "checks": 0}

    def sabotaged(apply, start, count, **options):
        calls["warm"] += 1
        wrong = calls["warm"] in (2, 3, 4, 5) if wrong_steps == "transient" else True
        return (_missing_top_pair if wrong else warm)(apply, start, count, **options)

    def counted(*args, **kwargs):
        calls["checks"] += 1
        return checks(*args, **kwargs)

    monkeypatch.setattr(_lanczos_solver, "warm_top_eigh", sabotaged)
    monkeypatch.setattr(_lanczos_solver, "deflated_top", counted)
    solver = partial_spectrum_solver({"max_iter": 60})
    if wrong_steps == "persistent":
        with pytest.warns(ConvergenceWarning):
            got = clair_decompose(blocks, backbone=False, solver=solver, noise_scale=sigma)
        assert not got.converged
        assert got.relative_gap > 1e-3  # the certificate sees the wrong point
        return
    got = clair_decompose(blocks, backbone=False, solver=solver, noise_scale=sigma)
    assert got.converged and want.converged
    # only some warm steps are checked (the others went through unchecked) ...
    assert 0 < calls["checks"] < calls["warm"]
    # ... and the answer is the optimum: each certified gap bounds its point's distance
    # to the optimal objective, so the two objectives differ by at most their sum
    gaps = got.dual_gap + want.dual_gap
    assert abs(got.objective - want.objective) <= gaps
    flags = np.linalg.norm(want.sparse, axis=(1, 2)) > 0
    assert np.array_equal(np.linalg.norm(got.sparse, axis=(1, 2)) > 0, flags)


def test_the_lanczos_solver_matches_the_dense_one_when_its_rank_outgrows_lanczos():
    """Continuation from a low-rank stage (Lanczos SVT) to a final stage whose rank
    exceeds a quarter of the stack (the dense SVT): the last Lanczos basis must not
    warm-start the dense stage's unchecked steps (a review's case: 2000 iterations, not
    converged, when it did; the dense solver converges in 25)."""
    pytest.importorskip("torch")
    from clairstat import clair_decompose
    from clairstat._objective import stack_blocks
    from clairstat.aggregation._lanczos_solver import partial_spectrum_solver
    from clairstat.solvers import TorchSolver

    rng = np.random.default_rng(100)
    n_clients, s, r = 40, 160, 4  # stacked 160 x 160: Lanczos pays for at most 40 pairs
    left = np.linalg.qr(rng.standard_normal((s, 40)))[0]
    right = np.linalg.qr(rng.standard_normal((n_clients * r, 40)))[0]
    stacked = (left * (10 * 0.85 ** np.arange(40))) @ right.T \
        + 0.01 * rng.standard_normal((s, n_clients * r))
    blocks = stacked.reshape(s, n_clients, r).transpose(1, 0, 2).copy()
    blocks[:2] *= 3
    op_norm = np.linalg.norm(stack_blocks(blocks), 2)
    options = dict(backbone=False, alpha=op_norm / 300, beta=op_norm / 100)
    want = clair_decompose(blocks, solver=TorchSolver(), **options)
    got = clair_decompose(blocks, solver=partial_spectrum_solver({"max_iter": 300}),
                          **options)
    assert want.converged and got.converged
    assert abs(got.objective - want.objective) <= got.dual_gap + want.dual_gap
    rank = np.linalg.matrix_rank(stack_blocks(got.low_rank))
    assert rank == np.linalg.matrix_rank(stack_blocks(want.low_rank)) > s // 4


def test_first_occurrences_match_numpy_unique_and_treat_signed_zeros_alike():
    # The noise scales count each distinct client once; the hash of the rows' bytes must
    # find what np.unique(axis=0) finds, -0.0 and +0.0 being equal as numbers.
    from clairstat._tuning import _first_occurrences

    rng = np.random.default_rng(3)
    rows = rng.standard_normal((9, 5))
    rows[[4, 7]] = rows[1]
    rows[0, 0] = 0.0
    rows[6] = rows[0]
    rows[6, 0] = -0.0
    want = np.sort(np.unique(rows, axis=0, return_index=True)[1])
    assert _first_occurrences(rows).tolist() == want.tolist() == [0, 1, 2, 3, 5, 8]


def test_leave_one_out_statistic_keeps_its_digits_when_large_members_cancel():
    """Three members of norm ~1e7 that sum to about zero: the mean is small, so the
    statistics by difference would carry a round-off ~eps (1e7)^2 (1.7e-3 relative,
    found by review); the guard's scale bounds every term and takes the direct route."""
    rng = np.random.default_rng(0)
    p, t, n_clients, big = 120, 12, 8, 1e7
    coef, rights = np.zeros((n_clients, p, 4)), np.zeros((n_clients, 4, t))

    def put(k, y_mat, r_mat):
        coef[k, :, :y_mat.shape[1]], rights[k, :r_mat.shape[0]] = y_mat, r_mat

    total = 0.0
    for k in range(2):
        y_mat = big * rng.standard_normal((p, 2))
        r_mat = np.linalg.qr(rng.standard_normal((t, 2)))[0].T
        put(k, y_mat, r_mat)
        total = total + y_mat @ r_mat
    left, sing, right_t = np.linalg.svd(-total, full_matrices=False)
    put(2, left[:, :4] * sing[:4], right_t[:4])
    for k in range(3, n_clients):
        put(k, rng.standard_normal((p, 2)), np.linalg.qr(rng.standard_normal((t, 2)))[0].T)
    stack, weights = FactoredBlocks(coef, rights), np.ones(n_clients)
    basis = stack.centred_left_singular(weights, 3)[0]
    fit, without = stack.leave_one_out_fits(weights, 3, basis), stack.leave_one_out_grams(weights)
    for k in range(3, n_clients):
        stat, sub_basis = fit(k)
        residual = without(k)[1]
        residual = residual - sub_basis @ (sub_basis.T @ residual)
        # the direct route's own round-off: ~eps |X|^2 over a statistic ~1e2 -> 1e-9 is wide
        assert stat == pytest.approx(np.sum(residual ** 2), rel=1e-9)


def test_warm_svt_refuses_when_a_kept_direction_is_orthogonal_to_ones():
    """A sixth value above the threshold whose eigenvector is orthogonal to the vector of
    ones (Lanczos' default start): the deflated check starts elsewhere and sees it."""
    from clairstat.aggregation._lanczos_solver import _warm_gram_eigen

    rng = np.random.default_rng(0)
    dim, width = 200, 600
    ones = np.ones(dim) / np.sqrt(dim)
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    hidden = basis[:, 5] - (basis[:, 5] @ ones) * ones
    basis = np.linalg.qr(np.hstack([hidden[:, None], np.delete(basis, 5, axis=1)]))[0]
    basis = np.hstack([basis[:, 1:6], basis[:, :1], basis[:, 6:]])  # 5 kept, hidden, bulk
    squares = np.concatenate([[9, 7, 5, 4, 3], [1.005], 0.99 - 0.5 * rng.random(dim - 6) ** 3])
    matrix = (basis * np.sqrt(squares)) @ np.linalg.qr(rng.standard_normal((width, dim)))[0].T
    found = _warm_gram_eigen(matrix, 1.0, basis[:, :5])  # warm start from the five
    assert found is None or np.sum(found[0] > 1.0) == 6


def test_a_fitted_lora_module_keeps_no_stack_caches():
    """The inner products and dense means cached during a fit are dropped after it (a
    fitted estimator holds its stack: 40 MB per module at s = t = 1600 otherwise)."""
    from clairstat.aggregation import clair_modules

    rng = np.random.default_rng(0)
    shared = rng.standard_normal((160, 4))
    factors = [(shared + 0.1 * rng.standard_normal((160, 4)),
                rng.standard_normal((4, 160)) / np.sqrt(160)) for _ in range(12)]
    estimator = clair_modules({"m": factors}, joint=False, n_jobs=1).estimators["m"]
    root = estimator.collaborative_mean_.stack.root
    assert "_raw_inner" not in root.__dict__ and "_dense_means" not in root.__dict__


def _conditioned(rng, rows, cols, cond):
    """A (rows, cols) matrix with singular values log-spaced from 1 down to 1 / cond."""
    left = np.linalg.qr(rng.standard_normal((rows, cols)))[0]
    right = np.linalg.qr(rng.standard_normal((cols, cols)))[0]
    return (left * np.logspace(0, -np.log10(cond), cols)) @ right.T


@pytest.mark.parametrize("cond", [1.0, 1e3, 1e4, 1e5, 1e7, 1e12])
def test_span_basis_is_orthonormal_whatever_the_conditioning(cond):
    """The reduction's bases (CholeskyQR where its checks pass, Householder otherwise)
    are orthonormal and reproduce the matrix. The bound 2^-30 on ||Q^T Q - I||_F is the
    CholeskyQR acceptance tolerance (a one-pass Q is taken only within it; Householder
    and the second pass sit near 1e-14); one pass alone is 4e-10 off (max entry) at
    cond 1e4 and 4e-8 at 1e5, which the next test makes fail."""
    from clairstat._reduced import _span_columns

    matrix = _conditioned(np.random.default_rng(3), 500, 100, cond)
    basis, coordinates = _span_columns(matrix)
    assert np.linalg.norm(basis.T @ basis - np.eye(basis.shape[1])) <= 2.0 ** -30
    if coordinates is not None:  # a certified full-rank QR: Q R == matrix
        assert basis.shape[1] == 100
        assert close(basis @ coordinates, matrix)
    else:  # the numerical rank decided by an SVD: the span still holds the matrix
        assert close(basis @ (basis.T @ matrix), matrix)


def test_span_basis_without_its_orthogonality_check_fails(monkeypatch):
    """Negative control of the test above: accept CholeskyQR's first pass unchecked."""
    from clairstat import _reduced

    monkeypatch.setattr(_reduced, "_ORTHO_TOL", np.inf)
    matrix = _conditioned(np.random.default_rng(3), 500, 100, 1e5)
    basis, _ = _reduced._span_columns(matrix)
    assert np.linalg.norm(basis.T @ basis - np.eye(basis.shape[1])) > 2.0 ** -30


def test_span_basis_of_a_rank_deficient_stack_has_its_rank():
    """Duplicated columns (clients sending the same B): not positive definite, so the
    rank-revealing route, with the numerical rank and an orthonormal basis."""
    from clairstat._reduced import _span_columns

    rng = np.random.default_rng(4)
    matrix = rng.standard_normal((200, 30))
    matrix = np.hstack([matrix, matrix[:, :10]])
    basis, _ = _span_columns(matrix)
    assert basis.shape[1] == 30
    assert np.linalg.norm(basis.T @ basis - np.eye(30)) <= 1e3 * EPS
    assert close(basis @ (basis.T @ matrix), matrix)


def test_a_factored_fit_reports_no_calibration_factor_on_a_given_noise():
    """Factored stacks predict each statistic from the other clients' whatever noise is
    given, so there is no factor on it to report: ``null_scale_factor_`` is nan, not a
    1 that would say the given noise fits (a review found "scale x1" for noise scales
    100 times apart with identical nulls); the p-values do not depend on it."""
    import warnings

    rng = np.random.default_rng(0)
    coef = rng.standard_normal((12, 8, 2)) * 0.1
    coef[:, :, 0] += rng.standard_normal(8)[None]
    rights = np.stack([np.linalg.qr(rng.standard_normal((7, 2)))[0].T for _ in range(12)])
    nulls = []
    for scale in (1.0, 100.0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est = CLAIREstimator(backbone=False, random_state=0, noise_scale=scale).fit(
                FactoredBlocks(coef, rights))
        assert np.isnan(est.null_scale_factor_) and np.all(np.isnan(est.null_scale_))
        assert "scale x" not in str(est.summary())
        nulls.append(est.p_values_)
    np.testing.assert_array_equal(nulls[0], nulls[1])


def test_the_operator_norm_of_a_narrow_stack_is_the_dense_one(monkeypatch):
    """A review: Lanczos to machine precision on a clustered top of the spectrum took
    1.4 s per norm of a 256 x 320 stack (116 of a module's 150 s); below
    DENSE_NORM_BELOW the dense SVD gives it in milliseconds. Wider stacks keep Lanczos."""
    import torch

    from clairstat.aggregation import _lanczos_solver as lanczos

    solver = lanczos._PartialSpectrumSolver()

    def refuse(*args, **kwargs):
        raise AssertionError("Lanczos called for a narrow stack")

    monkeypatch.setattr(lanczos, "top_eigh", refuse)
    matrix = torch.as_tensor(np.random.default_rng(0).standard_normal((256, 320)))
    assert solver._op_norm(matrix) == pytest.approx(np.linalg.norm(matrix.numpy(), 2),
                                                    rel=1e-12)
    wide = torch.as_tensor(np.random.default_rng(1).standard_normal((600, 700)))
    with pytest.raises(AssertionError, match="Lanczos called"):
        solver._op_norm(wide)


# ----------------------------------------- the shortcuts of the LoRA path's solvers

@pytest.mark.parametrize("weighting", ["equal", "random"])
def test_the_downdate_terms_agree_through_the_mean_and_the_kernel(weighting, monkeypatch):
    """_downdate_terms through the formed mean (G = own - n m m^T - (e m^T + m e^T)) and
    through the (n r, n r) kernel: the same terms to round-off; leaving out the spread
    term (which unequal weights make non-zero) fails the comparison."""
    rng = np.random.default_rng(40)
    stack = _factored_problem(rng, 30, 220, 3)
    weights = np.ones(30) if weighting == "equal" else rng.uniform(0.2, 3.0, 30)
    assert stack._dense_mean_pays()  # t <= n r: the formed mean is the route taken
    dense = stack._downdate_terms(weights)
    monkeypatch.setattr(FactoredBlocks, "_dense_mean_pays", lambda self: False)
    kernel = stack._downdate_terms(weights)
    for got, want in zip(dense, kernel):
        assert close(got, want)
    if weighting == "random":  # negative control: without e m^T + m e^T
        assert not close(dense[0] + dense[4], kernel[0])


def test_a_broadcast_start_is_one_block_and_gives_the_copied_starts_answer():
    """batched_warm_top_eigh with one start broadcast to every problem: the first
    product receives it broadcast (zero first stride), the answers are those of the same
    start copied per problem."""
    from clairstat._reduced import batched_warm_top_eigh

    rng = np.random.default_rng(41)
    cases = [_spectrum_case(rng) for _ in range(3)]
    matrices = np.stack([matrix for matrix, _ in cases])
    start = np.hstack([cases[0][1] + 0.1 * rng.standard_normal(cases[0][1].shape),
                       rng.standard_normal((len(matrices[0]), 4))])
    strides = []

    def apply(active, blocks):
        strides.append(blocks.strides[0])
        return np.matmul(matrices[active], blocks)

    shared = batched_warm_top_eigh(apply, np.broadcast_to(start, (3,) + start.shape), 5)
    assert strides[0] == 0 and all(stride != 0 for stride in strides[1:])
    copied = batched_warm_top_eigh(apply, np.stack([start] * 3), 5)
    for (val_a, vec_a), (val_b, vec_b) in zip(shared, copied):
        assert np.allclose(val_a, val_b, rtol=0, atol=1e2 * EPS * val_b[0])
        assert np.linalg.norm(vec_a @ vec_a.T - vec_b @ vec_b.T) <= 1e-10


@pytest.mark.parametrize("cond", [1.0, 1e6, 1e12])
def test_orthonormal_stack_is_orthonormal_whatever_the_conditioning(cond):
    """CholeskyQR2 through the b x b inverses: orthonormal to round-off and spanning the
    blocks; at cond 1e12 Cholesky fails and Householder takes over."""
    from clairstat._reduced import _orthonormal_stack

    rng = np.random.default_rng(42)
    n, dim, b = 5, 300, 12
    left = np.linalg.qr(rng.standard_normal((n, dim, b)))[0]
    right = np.linalg.qr(rng.standard_normal((n, b, b)))[0]
    blocks = np.matmul(left * np.geomspace(1.0, 1.0 / cond, b)[None, None, :], right)
    found = _orthonormal_stack(blocks)
    gram = np.matmul(found.transpose(0, 2, 1), found)
    assert np.abs(gram - np.eye(b)).max() <= 1e2 * EPS * b
    # the same span: the blocks are reproduced by their projection on it
    back = np.matmul(found, np.matmul(found.transpose(0, 2, 1), blocks))
    assert np.abs(back - blocks).max() <= 1e2 * EPS * np.abs(blocks).max() * cond ** 0

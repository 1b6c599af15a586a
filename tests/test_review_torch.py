"""A review of the torch paths: scale, float32 certificates, exact feasibility, inputs.

Tolerances come from the certificates (objective - optimum <= duality gap) and from the
dtypes; a power of two scales floating-point numbers without rounding, so results at
scales 2^k are compared exactly.
"""

import warnings
from importlib.util import find_spec

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

from clairstat import CLAIREstimator, clair_decompose
from clairstat.datasets import make_low_rank_block_sparse
from clairstat.solvers import CVXPYSolver, TorchSolver

torch = pytest.importorskip("torch")

EPS32 = float(np.finfo(np.float32).eps)
needs_cvxpy = pytest.mark.skipif(find_spec("cvxpy") is None, reason="needs cvxpy")


def _data(seed=0, shape=(8, 6, 2, 1, 2), noise=0.3):
    K, p, q, r, m = shape
    return make_low_rank_block_sparse(K, p, q, r, m, noise_level=noise,
                                      random_state=seed).local_estimates


# ------------------------------------------------------------------ scale equivariance

@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("formulation", ["penalized", "exact"])
@pytest.mark.parametrize("power", [70, -110])
def test_torch_solver_is_exactly_scale_equivariant(dtype, formulation, power):
    """Entries of 2^70 (1e21) overflowed float32's squares (LinAlgError, or an infinite
    gap reported as converged); 2^-110 (8e-34) underflowed them (a wrong answer); in
    float64 the exact program's residual balancing, which compares a residual in the
    data's units with a dimensionless one, ran 2000 iterations without converging at
    scales 1e-5 or 1e20. A power of two scales without rounding: the answers must be
    the unit-scale ones times it, exactly."""
    X, s = _data(), 2.0 ** power
    X = X / np.abs(X).max()  # largest entry exactly 1: X * s is solved in units of s
    pen = {"alpha": 1.0, "beta": 0.8} if formulation == "penalized" else {"lam": 0.5}
    big = {k: v * s for k, v in pen.items()} if formulation == "penalized" else pen
    unit = clair_decompose(X, formulation=formulation, solver="torch", dtype=dtype, **pen)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        scaled = clair_decompose(X * s, formulation=formulation, solver="torch",
                                 dtype=dtype, **big)
    assert unit.converged and scaled.converged
    for part in ("backbone", "low_rank", "sparse"):
        np.testing.assert_array_equal(getattr(scaled, part), getattr(unit, part) * s)
    degree = 2 if formulation == "penalized" else 1
    assert scaled.objective == unit.objective * s ** degree
    assert scaled.dual_gap == unit.dual_gap * s ** degree


def test_float32_solver_at_a_non_power_of_two_scale():
    """1e-30: the squares of float32 entries of that size underflow (the penalized fit
    ran 2000 iterations to an objective 43% below the optimum, not converged). Both
    objectives lie within their gaps of the optimum: they differ by at most the sum."""
    X, s = _data(), 1e-30
    unit = clair_decompose(X, alpha=1.0, beta=0.8, solver="torch", dtype="float32")
    tiny = clair_decompose(X * s, alpha=s, beta=0.8 * s, solver="torch", dtype="float32")
    assert tiny.converged
    assert abs(tiny.objective / s**2 - unit.objective) <= \
        unit.dual_gap + tiny.dual_gap / s**2 + 10 * EPS32 * unit.objective


@needs_cvxpy
def test_cvxpy_solver_is_not_fooled_by_small_units():
    """SCS's absolute tolerances against entries of 1e-8: it called a point 6 times the
    optimum 'optimal' (relative gap 1.1), and the result said converged."""
    X, s = _data(), 1e-8
    reference = clair_decompose(X, alpha=1.0, beta=0.8, solver=CVXPYSolver("CLARABEL"))
    small = clair_decompose(X * s, alpha=s, beta=0.8 * s, solver="cvxpy")
    assert small.converged and small.relative_gap <= 1e-6
    # both within their gaps of the same optimum (in unit scale)
    assert abs(small.objective / s**2 - reference.objective) <= \
        small.dual_gap / s**2 + reference.dual_gap + 1e-12 * reference.objective


# -------------------------------------------------------------- CVXPY's converged flag

@needs_cvxpy
def test_cvxpy_converged_needs_the_certificate():
    """SCS at tolerance 1e-4 reports 'optimal' with a relative gap of about 3e-5: above
    tol = 1e-6, so not converged (it was reported converged, without a warning)."""
    X = _data()
    solver = CVXPYSolver("SCS", tol=1e-6, eps_abs=1e-4, eps_rel=1e-4)
    with pytest.warns(ConvergenceWarning, match="duality gap above tol"):
        result = clair_decompose(X, alpha=1.0, beta=0.8, solver=solver)
    assert result.relative_gap > 1e-6 and not result.converged


@needs_cvxpy
@pytest.mark.parametrize("formulation", ["penalized", "exact"])
def test_default_cvxpy_meets_its_tolerance(formulation):
    """With its default options SCS left relative gaps of 1e-5 to 3e-5 for tol = 1e-6;
    it is now asked for tol / 10 and the certificate holds, without a warning."""
    X = _data(seed=1, shape=(10, 8, 3, 2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        result = clair_decompose(X, formulation=formulation, solver="cvxpy")
    assert result.converged and result.relative_gap <= 1e-6


# ---------------------------------------------------------- float32 certificates

def test_float32_exact_program_certifies_at_float32_precision():
    """In float32 the exact program's gap hovers at 7 to 30 eps of the objective: at the
    default tol = 1e-6 (8 eps) it ran to max_iter with a ConvergenceWarning. Its
    certificate is scaled to float32 (100 eps), and honest: the float64 optimum is
    within the two gaps plus float32's rounding of the data (the solver's floor)."""
    X = _data(seed=1, shape=(20, 10, 3, 2, 3), noise=0.1)
    X = X / np.abs(X).max()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        single = clair_decompose(X, formulation="exact",
                                 solver=TorchSolver(dtype="float32", max_iter=600))
    double = clair_decompose(X, formulation="exact", solver=TorchSolver(tol=1e-10))
    assert single.converged and single.relative_gap <= 100 * EPS32
    floor = np.sqrt(max(X.shape[1], X.shape[0] * X.shape[2])) * EPS32 * np.linalg.norm(X)
    assert abs(single.objective - double.objective) <= \
        single.dual_gap + double.dual_gap + floor


def test_float32_exact_point_is_feasible_for_the_data():
    """The float32 solver made its point feasible for the data rounded to float32: the
    returned parts missed the float64 data by float32's rounding (3e-8), which the
    estimator read as the noise (its residual whitening), so that the rank, the
    subspace and the refined estimates differed from float64's (rank 3 against 2,
    refined estimates by 0.18, adjusted p-values by 0.43) with the same flags."""
    X = _data(seed=5, shape=(20, 10, 3, 2, 3), noise=0.1)
    res = clair_decompose(X, formulation="exact", solver="torch", dtype="float32")
    # exactly feasible, as the float64 solver's point (the same float64 subtraction)
    assert np.all(X - res.backbone[None] - res.low_rank - res.sparse == 0)
    a = CLAIREstimator(formulation="exact", random_state=0).fit(X)
    b = CLAIREstimator(formulation="exact", dtype="float32", random_state=0).fit(X)
    assert np.array_equal(a.contaminated_, b.contaminated_)
    assert a.rank_ == b.rank_
    # refined = mean + projection on the subspace: float32's rounding of a fit on data
    # of size max|X| (1e3 eps32 as tests/test_lora_torch.py)
    np.testing.assert_allclose(b.refined_, a.refined_, rtol=0,
                               atol=1e3 * EPS32 * np.abs(X).max())


@pytest.mark.parametrize("backbone", [True, False])
def test_float32_exact_program_on_all_zero_data(backbone):
    """float64's tiny, the guard of the first multiplier and of mu, is 0 in float32:
    0 / 0 made the iterates NaN and the SVD raised LinAlgError."""
    res = clair_decompose(np.zeros((4, 3, 2)), formulation="exact", solver="torch",
                          dtype="float32", backbone=backbone)
    assert res.converged and res.objective == 0.0
    assert not res.low_rank.any() and not res.sparse.any() and not res.backbone.any()


# ---------------------------------------------------------------- inputs and devices

def test_clair_decompose_reads_tensors_as_the_estimator_does():
    """bf16 tensors (TypeError: unsupported ScalarType BFloat16) and tensors with
    requires_grad (RuntimeError: Can't call numpy() on Tensor that requires grad) were
    refused by clair_decompose and by a warm start, though CLAIREstimator.fit reads
    them; a meta tensor got numpy's TypeError."""
    X = _data()
    t = torch.tensor(X)
    want = clair_decompose(X, solver="torch")
    got = clair_decompose(t.clone().requires_grad_(True), solver="torch")
    np.testing.assert_array_equal(got.low_rank, want.low_rank)
    half = t.bfloat16()
    got = clair_decompose(half, solver="torch")
    same = clair_decompose(half.double().numpy(), solver="torch")  # the values bf16 holds
    np.testing.assert_array_equal(got.low_rank, same.low_rank)
    init = {"backbone": torch.tensor(want.backbone).requires_grad_(True),
            "low_rank": torch.tensor(want.low_rank), "sparse": torch.tensor(want.sparse)}
    assert clair_decompose(X, solver="torch", init=init).converged
    with pytest.raises(ValueError, match="meta device"):
        clair_decompose(torch.empty(4, 3, 2, device="meta"), solver="torch")
    assert torch.is_grad_enabled()


@needs_cvxpy
def test_cpu_devices_are_the_cpu_for_every_solver():
    """device=None (which check_device accepts as the CPU) raised torch's TypeError in
    the torch solver, and solver='cvxpy' refused torch.device('cpu') and 'cpu:0' as
    not the CPU."""
    X = _data()
    want = clair_decompose(X, solver="torch")
    np.testing.assert_array_equal(clair_decompose(X, solver="torch", device=None).low_rank,
                                  want.low_rank)
    for device in (torch.device("cpu"), "cpu:0", None):
        assert clair_decompose(X, solver="cvxpy", device=device).solver == "cvxpy"
    with pytest.raises(ValueError):
        clair_decompose(X, solver="cvxpy", device="meta")


def test_max_iter_true_and_cvxpy_dtype_are_refused():
    """A review: ``max_iter=True`` (a bool, an int to Python) ran one iteration, and
    ``solver="cvxpy"`` ignored ``dtype="float32"`` silently."""
    from clairstat import CLAIREstimator, clair_decompose
    from clairstat.datasets import make_low_rank_block_sparse

    data = make_low_rank_block_sparse(10, 6, 2, 1, 1, random_state=0).local_estimates
    with pytest.raises(ValueError, match="max_iter must be a positive integer"):
        clair_decompose(data, max_iter=True, solver="torch")
    with pytest.raises(ValueError, match="max_iter must be a positive integer"):
        CLAIREstimator(max_iter=True).fit(data)
    with pytest.raises(ValueError, match="solves in float64 only"):
        clair_decompose(data, solver="cvxpy", dtype="float32")
    with pytest.raises(ValueError, match="solves in float64 only"):
        CLAIREstimator(solver="cvxpy", dtype="float32").fit(data)


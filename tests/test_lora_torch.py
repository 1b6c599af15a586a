"""LoRA refinement with the torch work on a ``device`` and in a ``dtype``.

``clair_modules(..., device=, dtype=)`` and ``refine_adapters(..., device=, dtype=)``
run each module's decomposition and its d-sized work (the reduction's QRs, the joint
refinement's Gram matrices, the readouts' products with the bases) in torch there; the
detection and the rest of the reduced coordinates stay numpy float64 (the reference,
which is also what runs when no device is given). ``device="cpu"`` runs the same torch
code as a GPU would, which is how these tests cover it without one.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from clairstat.aggregation import clair_modules  # noqa: E402
from clairstat.lora import refine_adapters  # noqa: E402

KEY = "base_model.model.layers.0.q_proj.lora_{}.weight"
CONFIG = {"lora_alpha": 1}  # scaling 1 / r, r read from the factors (no "r": ranks vary)


def _adapters(dim=160, n_clients=14, rank=4, seed=0):
    """Benign clients share a column space; the first two have a random B."""
    rng = np.random.default_rng(seed)
    shared = np.linalg.qr(rng.standard_normal((dim, 2)))[0]
    states = []
    for client in range(n_clients):
        b_mat = shared @ rng.standard_normal((2, rank)) + 0.02 * rng.standard_normal((dim, rank))
        if client < 2:
            b_mat = rng.standard_normal((dim, rank)) / np.sqrt(dim) * np.sqrt(rank) * 3
        states.append({KEY.format("A"): rng.standard_normal((rank, dim)) / np.sqrt(dim),
                       KEY.format("B"): b_mat})
    return states, np.arange(n_clients) < 2


def _products(fit):
    return [state[KEY.format("B")] @ state[KEY.format("A")] for state in fit.state_dicts]


def _check_against_reference(device, dtype):
    states, bad = _adapters()
    want = refine_adapters(states, CONFIG, joint=False, random_state=0)
    got = refine_adapters(states, CONFIG, joint=False, random_state=0, device=device,
                          dtype=dtype)
    assert want.flagged[bad].all() and not want.flagged[~bad].any()
    assert np.array_equal(got.flagged, want.flagged)
    name = next(iter(want.estimators))
    assert got.estimators[name].dtype == str(dtype).removeprefix("torch.")
    # The same flags; the reduced coordinates differ by the reduction's rounding (a
    # Householder QR on the device against CholeskyQR in numpy, about m eps of their
    # scale, m = 56 columns here), and in float32 by float32's: 1e3 float32 eps bounds
    # the adapters' difference in either dtype.
    tol = 1e3 * np.finfo(np.float32).eps
    for w, g in zip(_products(want), _products(got)):
        assert np.linalg.norm(g - w) <= tol * max(np.linalg.norm(w), 1.0)


@pytest.mark.parametrize("dtype", ["float64", torch.float64, "float32", torch.float32])
def test_cpu_device_matches_the_numpy_reference(dtype):
    _check_against_reference("cpu", dtype)


def test_float32_raises_the_default_tolerance_only():
    states, _ = _adapters()
    fit = refine_adapters(states, CONFIG, joint=False, random_state=0, dtype="float32")
    estimator = next(iter(fit.estimators.values()))
    assert estimator.tol == pytest.approx(1e2 * np.finfo(np.float32).eps)
    fit = refine_adapters(states, CONFIG, joint=False, random_state=0, dtype="float32",
                          tol=1e-4)
    assert next(iter(fit.estimators.values())).tol == 1e-4


def test_clair_modules_rejects_other_dtypes():
    states, _ = _adapters(n_clients=6)
    from clairstat.lora import module_factors
    with pytest.raises(ValueError, match="float64 or float32"):
        clair_modules(module_factors(states, CONFIG), dtype="float16")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cuda_device_matches_the_numpy_reference(dtype):
    _check_against_reference("cuda", dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torch_solver_on_cuda_reaches_the_cpu_optimum(dtype):
    """The dense solver on the device (tests/test_solvers.py, which needs CVXPY, is not
    run where the device image lacks it). Each solution's duality gap, recomputed in
    float64 on the host, bounds its objective's excess over the optimum, so the two
    objectives differ by at most the larger gap (plus float64 round-off of the
    objectives, ~1e3 eps of their size)."""
    from clairstat import clair_decompose
    from clairstat._objective import penalized_gap
    from clairstat.datasets import make_low_rank_block_sparse

    X = make_low_rank_block_sparse(20, 30, 5, 2, 3, noise_level=0.1,
                                   random_state=0).local_estimates
    fits = [clair_decompose(X, solver="torch", device=device, dtype=kind)
            for device, kind in (("cpu", "float64"), ("cuda", dtype))]
    assert fits[1].converged
    assert (fits[0].alpha, fits[0].beta) == (fits[1].alpha, fits[1].beta)
    gaps, values = zip(*(penalized_gap(X, f.backbone, f.low_rank, f.sparse, alpha=f.alpha,
                                       beta=f.beta) for f in fits))
    assert abs(values[1] - values[0]) <= max(gaps) + 1e3 * np.finfo(float).eps * values[0]


# -- the reduction on the device --------------------------------------------------------

def _factors(rng, dim_out=300, dim_in=200, n_clients=10, rank=4, shared_a=False):
    a_shared = rng.standard_normal((rank, dim_in))
    return [(rng.standard_normal((dim_out, rank)),
             a_shared if shared_a else rng.standard_normal((rank, dim_in)))
            for _ in range(n_clients)]


def _reduction_error(reduction, factors):
    """Largest ``||Q X_i V^T - B_i A_i||_F / (||B_i|| ||A_i||)`` over the clients."""
    stack = reduction.updates
    return max(np.linalg.norm(reduction.left_basis @ stack.expand(i) @ reduction.right_basis.T
                              - b @ a) / (np.linalg.norm(b) * np.linalg.norm(a))
               for i, (b, a) in enumerate(factors))


@pytest.mark.parametrize("shared_a", [False, True])
def test_device_reduction_is_exact_to_its_precision(shared_a):
    """``factored_reduction(device=, dtype=)`` reproduces every update to its working
    precision: a Householder QR's backward error is about ``m eps`` (m = 40 columns), so
    ``64 sqrt(d) eps`` (d = 300) bounds it with room. The float32 reduction does not meet
    the float64 bound (it really ran in float32). With one A shared by every client (as
    when A is frozen) the right span has rank 4, not 40: the rank-revealing branch."""
    from clairstat._reduced import DeviceBasis, factored_reduction

    factors = _factors(np.random.default_rng(0), shared_a=shared_a)
    reference = factored_reduction(factors)
    bound = {name: 64 * np.sqrt(300) * np.finfo(name).eps for name in ("float64", "float32")}
    errors = {}
    for dtype in ("float64", "float32"):
        got = factored_reduction(factors, device="cpu", dtype=dtype)
        assert isinstance(got.left_basis, DeviceBasis)
        assert got.left_basis.tensor.dtype == getattr(torch, dtype)
        assert got.updates.shape == reference.updates.shape
        assert got.right_basis.shape == reference.right_basis.shape == (200, 4 if shared_a else 40)
        errors[dtype] = _reduction_error(got, factors)
        assert errors[dtype] <= bound[dtype]
    assert errors["float32"] > bound["float64"]


def test_device_reduction_of_fresh_adapters_is_zero():
    """Every B zero (fresh adapters): the left span is {0}, kept as one unit vector."""
    from clairstat._reduced import factored_reduction

    factors = [(np.zeros((30, 2)), a) for _, a in _factors(np.random.default_rng(1), 30, 20, 4, 2)]
    got = factored_reduction(factors, device="cpu", dtype="float32")
    assert got.left_basis.shape == (30, 1)
    assert np.all(got.updates.coef == 0)


def test_device_basis_products_are_numpy_products():
    from clairstat._reduced import DeviceBasis

    rng = np.random.default_rng(2)
    matrix, other, stack = (rng.standard_normal((7, 3)), rng.standard_normal((3, 2)),
                            rng.standard_normal((4, 3, 5)))
    basis = DeviceBasis(torch.as_tensor(matrix))
    assert np.allclose(basis @ other, matrix @ other, rtol=0, atol=1e-14)
    assert np.allclose(other.T @ basis.T, other.T @ matrix.T, rtol=0, atol=1e-14)
    assert np.allclose(basis @ stack, matrix @ stack, rtol=0, atol=1e-14)
    assert np.array_equal(np.asarray(basis.T), matrix.T)
    assert (basis @ other).dtype == np.float64


def _refactored(seed, scale=1.0, n_clients=12, rank=4):
    """One update ``B A`` sent by every client as ``(B M_k, M_k^-1 A)``: noiseless."""
    rng = np.random.default_rng(seed)
    b_mat, a_mat = rng.standard_normal((400, rank)), rng.standard_normal((rank, 300))
    factors = []
    for _ in range(n_clients):
        mixing = rng.standard_normal((rank, rank))
        factors.append((scale * b_mat @ mixing, np.linalg.solve(mixing, a_mat)))
    return factors


@pytest.mark.filterwarnings("ignore:the detection did not settle")
@pytest.mark.parametrize("where", [{}, {"device": "cpu"},
                                   {"device": "cpu", "dtype": "float32"}])
@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_one_update_in_other_factorizations_flags_nobody(where, scale):
    """Noiseless clients: the same update in twelve factorizations. Their statistics
    are round-off, which the stack's floor (clairstat._reduced._round_off) must cover
    at every scale and precision; the next test is its negative control."""
    from clairstat.aggregation import aggregate

    for seed in (0, 3):
        fit = aggregate("clair", _refactored(seed, scale), np.ones(12), random_state=0,
                        **where)
        assert not fit.flagged.any()
        # and the final test itself rejects nobody (flags alone could hide a rejection
        # behind a detection cycle's union, which keeps every client some round kept)
        estimator = fit.estimator
        assert estimator.adjusted_p_values_.min() >= estimator.test_level


@pytest.mark.filterwarnings("ignore:the detection did not settle")
def test_one_update_in_other_factorizations_without_the_stack_floor_is_rejected(monkeypatch):
    """Negative control: with the dense data's floor (64 eps per entry of size 1) instead
    of the stack's, the final test of the test above rejects clients on round-off.

    The p-values are round-off's, so they depend on OpenBLAS's kernels: about 1e-14 under
    its Haswell kernels, 5e-22 under SkylakeX (an AVX-512 CPU), where the rejected clients
    alternate between rounds and the cycle's union keeps them all (no flag). The final test's rejections,
    which the test above asserts absent, are what the floor removes on every machine."""
    from clairstat import _reduced
    from clairstat.aggregation import aggregate

    monkeypatch.setattr(_reduced, "_round_off", lambda *args: None)
    fit = aggregate("clair", _refactored(0), np.ones(12), random_state=0)
    estimator = fit.estimator
    assert estimator.adjusted_p_values_.min() < estimator.test_level


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_joint_refinement_on_the_device_matches_the_reference(dtype):
    """The default joint refinement (Gram matrices and readouts on the device): the same
    flags, the adapters to 1e3 float32 eps of their scale (as the per-module test)."""
    states, bad = _adapters()
    want = refine_adapters(states, CONFIG, random_state=0)
    got = refine_adapters(states, CONFIG, random_state=0, device="cpu", dtype=dtype)
    assert want.flagged[bad].all() and not want.flagged[~bad].any()
    assert np.array_equal(got.flagged, want.flagged)
    assert got.rank_selection == want.rank_selection
    tol = 1e3 * np.finfo(np.float32).eps
    for w, g in zip(_products(want), _products(got)):
        assert np.linalg.norm(g - w) <= tol * max(np.linalg.norm(w), 1.0)


def _float32_module_fit(max_iter, dim=768, n_clients=48, rank=16):
    """Clients as ``benchmarks/lora_benchmark.py`` builds them: ``B_k = U W_k + noise``
    with U of rank ``rank // 2``, the first 10% with a random B."""
    rng = np.random.default_rng(0)
    shared = np.linalg.qr(rng.standard_normal((dim, rank // 2)))[0]
    states = []
    for client in range(n_clients):
        b_mat = shared @ rng.standard_normal((rank // 2, rank))
        b_mat += 0.1 * rng.standard_normal((dim, rank)) / np.sqrt(dim) * np.sqrt(rank)
        if client < n_clients // 10:
            b_mat = rng.standard_normal((dim, rank)) / np.sqrt(dim) * np.sqrt(rank)
        states.append({KEY.format("A"): rng.standard_normal((rank, dim)) / np.sqrt(dim),
                       KEY.format("B"): b_mat})
    fit = refine_adapters(states, CONFIG, joint=False, random_state=0, device="cpu",
                          dtype="float32", max_iter=max_iter, n_jobs=1)
    return next(iter(fit.estimators.values())).decomposition_


@pytest.mark.filterwarnings("ignore:the detection did not settle")
def test_float32_lora_module_reaches_its_certificate():
    """The float32 gap of a 768 x 768 stack (48 rank-16 clients) stalls above
    ``tol = 100 eps`` times the objective (measured: not converged after 80 iterations;
    at the benchmark's 4096-wide module with 100 clients, not after 400, 370 s); the
    solver's floor (sqrt(n) eps ||X||^2, TorchSolver._objective_floor) certifies it
    after 20 (15 at the benchmark's module, 27 s)."""
    assert _float32_module_fit(40).converged


@pytest.mark.filterwarnings("ignore:the detection did not settle")
def test_float32_lora_module_without_the_sqrt_n_floor_does_not_converge(monkeypatch):
    """Negative control: the floor ``eps ||X||^2`` without sqrt(n) is not reached."""
    from clairstat.solvers import _torch

    def plain(self, X, power):
        eps = float(torch.finfo(X.dtype).eps)
        return eps * float(torch.linalg.vector_norm(X)) ** power

    monkeypatch.setattr(_torch.TorchSolver, "_objective_floor", plain)
    with pytest.warns(Warning, match="max_iter reached"):
        assert not _float32_module_fit(40).converged


# -- a review's cases: nobody buys a floor, float32 keeps small clients and small changes --

DEVICE_PATHS = [{}, {"device": "cpu"}, {"device": "cpu", "dtype": "float32"}]


@pytest.mark.filterwarnings("ignore:the detection did not settle")
@pytest.mark.parametrize("where", DEVICE_PATHS)
def test_an_ill_conditioned_factorization_hides_no_attacker(where):
    """Two attackers (B off the shared column space); attacker 0 sends its update as
    ``(B M, M^-1 A)``, cond(M) = 1e8 (the product unchanged to 1e-6). A floor taken from
    the largest ``||B_k|| ||A_k||`` hid both; the stack's floor is the clients' median
    squared norm, and the device path balances the factors first."""
    from clairstat.aggregation import aggregate

    rng = np.random.default_rng(0)
    shared = np.linalg.qr(rng.standard_normal((256, 3)))[0]
    factors = []
    for client in range(12):
        b_mat = shared @ rng.standard_normal((3, 8)) + 0.1 * rng.standard_normal((256, 8)) / 16
        if client < 2:
            b_mat = b_mat + rng.standard_normal((256, 8)) / 16 * np.sqrt(3)
        a_mat = rng.standard_normal((8, 256)) / 16
        if client == 0:
            rotation = np.linalg.qr(rng.standard_normal((8, 8)))[0]
            mixing = rotation @ np.diag(np.logspace(0, 8, 8)) @ rotation.T
            b_mat, a_mat = b_mat @ mixing, np.linalg.solve(mixing, a_mat)
        factors.append((b_mat, a_mat))
    fit = aggregate("clair", factors, np.ones(12), random_state=0, **where)
    assert fit.flagged.tolist() == [True, True] + [False] * 10


@pytest.mark.filterwarnings("ignore:the detection did not settle")
@pytest.mark.parametrize("change", [1e-2, 1e-3])
def test_float32_sees_a_small_local_change(change):
    """A later federated round: every adapter is the global one plus a local change of
    relative size ``change``; the two attackers' changes leave the shared directions.
    The float32 reduction is exact to about 4e-7 relative, so these are detectable;
    a floor of ``(64 eps_float32)^2`` times the squared norms (not ``64 eps_float32``)
    keeps them (a review measured the attackers missed at 1e-2 and 1e-3 with the
    latter)."""
    from clairstat.aggregation import aggregate

    rng = np.random.default_rng(0)
    b_global, a_global = rng.standard_normal((256, 8)), rng.standard_normal((8, 256)) / 16
    shared = np.linalg.qr(rng.standard_normal((256, 2)))[0]
    factors = []
    for client in range(14):
        b_mat = (b_global + change * shared @ rng.standard_normal((2, 8))
                 + 1e-2 * change * rng.standard_normal((256, 8)))
        if client < 2:
            b_mat = b_mat + change * rng.standard_normal((256, 8))
        factors.append((b_mat, a_global))
    fit = aggregate("clair", factors, np.ones(14), random_state=0, device="cpu",
                    dtype="float32")
    assert fit.flagged.tolist() == [True, True] + [False] * 12


@pytest.mark.parametrize("scale", [1e-4, 1e39])
def test_float32_reduction_keeps_a_small_client_and_any_scale(scale):
    """One client's B scaled by 1e-4 (a barely trained adapter) is not dropped by the
    rank decision of the whole stack (its columns are normalised first), and factors
    beyond float32's range (3.4e38) stay finite: each update reproduced to the float32
    bound of the exactness test above."""
    from clairstat._reduced import factored_reduction

    factors = _factors(np.random.default_rng(6), 512, 200, 12, 4)
    factors[11] = (factors[11][0] * scale, factors[11][1])
    got = factored_reduction(factors, device="cpu", dtype="float32")
    assert got.left_basis.shape[1] == 48
    assert _reduction_error(got, factors) <= 64 * np.sqrt(512) * np.finfo(np.float32).eps


def test_module_gram_on_the_device_is_float64_whatever_the_dtype():
    """Distances from the Gram matrix, G_jj + G_kk - 2 G_jk, cancel: clients that differ
    by 1e-3 relative keep them to float64 precision with dtype float32 given."""
    from clairstat.aggregation import module_gram

    rng = np.random.default_rng(7)
    b_mat, a_mat = rng.standard_normal((300, 4)), rng.standard_normal((4, 200))
    factors = [(b_mat + 1e-3 * rng.standard_normal((300, 4)), a_mat) for _ in range(6)]

    def distances(gram):
        diag = np.diag(gram)
        return diag[:, None] + diag[None] - 2 * gram

    want = distances(module_gram(factors))
    got = distances(module_gram(factors, device="cpu", dtype="float32"))
    assert np.allclose(got, want, rtol=1e-6, atol=1e-9 * np.abs(want).max())

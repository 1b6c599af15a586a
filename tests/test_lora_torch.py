"""LoRA refinement with the decomposition on a torch ``device`` and ``dtype``.

``clair_modules(..., device=, dtype=)`` and ``refine_adapters(..., device=, dtype=)``
run each module's decomposition in torch there; the reduction, the detection and the
readouts stay numpy float64 (the reference). The decomposition enters the result only
through its start set (the clients with a zero sparse block), so a float32 run that
finds the same start set gives the float64 adapters to float64 round-off.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from clairstat.aggregation import clair_modules  # noqa: E402
from clairstat.lora import refine_adapters  # noqa: E402

KEY = "base_model.model.layers.0.q_proj.lora_{}.weight"
CONFIG = {"lora_alpha": 1, "r": 1}


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
    # Same start set -> the float64 detection and readouts see the same input: the
    # adapters agree to float64 round-off of the readout (1e3 eps of their scale);
    # 1e3 float32 eps bounds it whatever the dtype of the decomposition.
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

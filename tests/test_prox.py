"""Proximal operators: optimality against brute force, numpy/torch twins."""

import numpy as np
import pytest
from scipy.optimize import minimize

from clairstat._prox import (block_soft_threshold, block_soft_threshold_torch, svt,
                             svt_torch)

torch = pytest.importorskip("torch")


def _nuclear(x):
    return np.linalg.svd(x, compute_uv=False).sum()


@pytest.mark.parametrize("seed", range(3))
def test_svt_is_the_prox_of_the_nuclear_norm(seed):
    rng = np.random.default_rng(seed)
    X, t = rng.standard_normal((4, 3)), 0.8
    L, _ = svt(X, t)

    def prox_objective(flat):
        Z = flat.reshape(X.shape)
        return 0.5 * np.sum((Z - X) ** 2) + t * _nuclear(Z)

    best = prox_objective(L.ravel())
    # Brute force: no nearby or random point does better (the prox objective is
    # 1-strongly convex, so any improvement would be a real error, not rounding).
    for _ in range(200):
        trial = L + 0.05 * rng.standard_normal(L.shape)
        assert prox_objective(trial.ravel()) >= best - 1e-12
    found = minimize(prox_objective, X.ravel(), method="Powell",
                     options={"xtol": 1e-10, "ftol": 1e-14, "maxiter": 200000})
    assert found.fun >= best - 1e-9


def test_svt_shrinks_singular_values():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((6, 4))
    L, sing = svt(X, 1.0)
    expected = np.linalg.svd(X, compute_uv=False) - 1.0
    np.testing.assert_allclose(sing, expected[expected > 0], rtol=1e-12)
    np.testing.assert_allclose(np.linalg.svd(L, compute_uv=False)[: len(sing)], sing,
                               rtol=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_block_soft_threshold_is_the_group_prox(seed):
    rng = np.random.default_rng(seed)
    X, t = rng.standard_normal((3, 2, 2)), 1.5
    S = block_soft_threshold(X, t)

    def prox_objective(flat):
        Z = flat.reshape(X.shape)
        return 0.5 * np.sum((Z - X) ** 2) + t * np.linalg.norm(Z, axis=(1, 2)).sum()

    found = minimize(prox_objective, X.ravel(), method="Powell",
                     options={"xtol": 1e-10, "ftol": 1e-14, "maxiter": 200000})
    assert prox_objective(S.ravel()) <= found.fun + 1e-9


def test_block_soft_threshold_zeroes_small_blocks():
    X = np.stack([np.full((2, 2), 0.1), np.full((2, 2), 3.0)])
    S = block_soft_threshold(X, 1.0)
    assert np.all(S[0] == 0)
    np.testing.assert_allclose(np.linalg.norm(S[1]), np.linalg.norm(X[1]) - 1.0)


@pytest.mark.parametrize("method", ["svd", "gram"])
@pytest.mark.parametrize("shape", [(5, 40), (40, 5), (8, 8)])
def test_torch_svt_matches_numpy(method, shape):
    rng = np.random.default_rng(1)
    X = rng.standard_normal(shape)
    t = 0.5 * np.linalg.svd(X, compute_uv=False)[1]
    expected, sing = svt(X, t)
    got, got_sing = svt_torch(torch.as_tensor(X), t, method=method)
    # Gram route: singular values from eigenvalues carry eps * s_max^2 / s absolute error.
    tol = 1e-12 if method == "svd" else 1e-9
    np.testing.assert_allclose(got.numpy(), expected, atol=tol * np.abs(X).max())
    np.testing.assert_allclose(np.sort(got_sing.numpy()), np.sort(sing), rtol=tol)


def test_torch_block_soft_threshold_matches_numpy():
    X = np.random.default_rng(2).standard_normal((5, 3, 2))
    np.testing.assert_allclose(block_soft_threshold_torch(torch.as_tensor(X), 1.2).numpy(),
                               block_soft_threshold(X, 1.2), rtol=1e-14, atol=1e-15)


def test_negative_threshold_is_refused():
    with pytest.raises(ValueError, match="non-negative"):
        svt(np.eye(2), -1.0)
    with pytest.raises(ValueError, match="non-negative"):
        block_soft_threshold(np.ones((2, 1, 1)), -1.0)

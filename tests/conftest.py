"""Shared fixtures: small problems sized for a 2-core CI machine."""

import numpy as np
import pytest

from clairstat.datasets import make_federated_regression, make_low_rank_block_sparse


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(scope="session")
def regression():
    """The demo's regression model at a smaller size (fits in well under a second)."""
    return make_federated_regression(30, 20, 5, 2, 200, 5, separation=3.0, random_state=7)


@pytest.fixture(scope="session")
def noiseless():
    """A noiseless low-rank + block-sparse instance inside the recovery region."""
    return make_low_rank_block_sparse(40, 30, 4, 2, 4, noise_level=0.0, random_state=3)


@pytest.fixture
def tiny_peft():
    """torch, peft, a two-projection module (q_proj, v_proj: 8 -> 6) and a rank-2 config."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(8, 6, bias=False)
            self.v_proj = torch.nn.Linear(8, 6, bias=False)

    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    return torch, peft, Tiny, config

"""The CVXPY reference solver's limits: the iteration cap and the memory estimate."""

import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

pytest.importorskip("cvxpy")

from clairstat import clair_decompose  # noqa: E402
from clairstat.solvers import CVXPYSolver, resolve_solver  # noqa: E402
from clairstat.solvers import _cvxpy  # noqa: E402

DEMO_SHAPE = (40, 30, 8)  # the demo's K, p, q: a PSD cone of side 30 + 40 * 8 = 350


def small_problem():
    rng = np.random.default_rng(0)
    low_rank = rng.standard_normal((8, 2)) @ rng.standard_normal((2, 3 * 10))
    X = low_rank.reshape(8, 10, 3).transpose(1, 0, 2) + 0.1 * rng.standard_normal((10, 8, 3))
    X[0] += 3.0
    return X


# ---------------------------------------------------------------- the iteration cap

def test_resolve_solver_passes_max_iter_to_cvxpy():
    assert resolve_solver("cvxpy", max_iter=50).max_iter == 50


@pytest.mark.parametrize("formulation", ["penalized", "exact"])
def test_solver_cvxpy_honours_a_tiny_max_iter(formulation):
    with pytest.warns(ConvergenceWarning, match="max_iter reached"):
        result = clair_decompose(small_problem(), formulation=formulation, solver="cvxpy",
                                 max_iter=3)
    assert not result.converged and result.n_iter <= 3
    assert result.status.startswith("SCS: ") and "max_iter reached" in result.status
    assert np.isfinite(result.objective) and np.isfinite(result.dual_gap)


def test_clarabel_gets_its_max_iter():
    with pytest.warns(ConvergenceWarning, match="user_limit"):
        result = clair_decompose(small_problem(), solver=CVXPYSolver("CLARABEL", max_iter=2))
    assert not result.converged and result.n_iter == 2
    assert result.status == "CLARABEL: user_limit (max_iter reached)"


def test_enough_iterations_converge_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        result = clair_decompose(small_problem(), solver=CVXPYSolver("CLARABEL", max_iter=200))
    assert result.converged and result.status == "CLARABEL: optimal"


def test_iteration_option_names_and_precedence():
    assert CVXPYSolver("SCS", max_iter=9)._options() == {"max_iters": 9}
    assert CVXPYSolver("CLARABEL", max_iter=9)._options() == {"max_iter": 9}
    assert CVXPYSolver("SCS", max_iter=9, max_iters=4)._options() == {"max_iters": 4}
    with pytest.warns(UserWarning, match="does not know how to pass max_iter"):
        assert CVXPYSolver("MOSEK", max_iter=9)._options() == {}


# ---------------------------------------------------------------- the memory estimate

@pytest.fixture
def no_cvxpy_build(monkeypatch):
    """Fail, instead of allocating tens of GiB, if a refused program reached CVXPY."""
    def refuse():
        raise AssertionError("the program was built: the memory check did not refuse it")
    monkeypatch.setattr(_cvxpy, "_import_cvxpy", refuse)


def test_clarabel_on_the_demo_size_is_refused_before_building(no_cvxpy_build):
    X = np.zeros(DEMO_SHAPE)
    solver = CVXPYSolver("CLARABEL", max_memory=8 * 2**30)
    with pytest.raises(MemoryError, match=r"side p \+ K q = 350") as error:
        clair_decompose(X, solver=solver, alpha=1.0, beta=1.0)
    message = str(error.value)
    assert "max_memory cap" in message and "solver='torch'" in message
    assert "CVXPYSolver('SCS')" in message


def test_default_limit_is_the_available_memory(monkeypatch, no_cvxpy_build):
    monkeypatch.setattr(_cvxpy, "available_memory", lambda: 2**30)
    with pytest.raises(MemoryError, match="GiB memory available"):
        clair_decompose(np.zeros(DEMO_SHAPE), solver=CVXPYSolver("CLARABEL"), alpha=1.0,
                        beta=1.0)


def test_scs_needs_far_less_than_an_interior_point_solver():
    scs, clarabel = (CVXPYSolver(name).memory_estimate(DEMO_SHAPE)
                     for name in ("SCS", "CLARABEL"))
    assert scs < 2**30 < 100 * 2**30 < clarabel
    # The dense block has (n (n + 1) / 2)^2 entries for a cone of side n = p + K q: the
    # estimate follows it (the linear part adds about 0.1% here).
    bigger = CVXPYSolver("CLARABEL").memory_estimate((80, 30, 8))  # n = 670
    assert bigger / clarabel == pytest.approx((670 * 671 / (350 * 351)) ** 2, rel=1e-2)


def test_small_problem_passes_the_check():
    solver = CVXPYSolver("CLARABEL", max_memory=2**30)
    assert solver.memory_estimate(small_problem().shape) < 2**30
    assert clair_decompose(small_problem(), solver=solver).converged


def test_available_memory_without_psutil(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil raises ImportError
    available = _cvxpy.available_memory()
    assert available is None or available > 0

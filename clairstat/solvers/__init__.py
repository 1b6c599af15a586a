"""Interchangeable CLAIR solvers behind one signature (``solve(problem, init=None)``)."""

from importlib.util import find_spec

from ._base import Solver
from ._cvxpy import CVXPYSolver
from ._torch import TorchSolver

__all__ = ["Solver", "CVXPYSolver", "TorchSolver", "resolve_solver"]


def resolve_solver(solver="auto", *, max_iter=2000, tol=1e-6, device="cpu", dtype="float64"):
    """Turn the ``solver`` parameter into a :class:`Solver` instance.

    The rule for ``"auto"``: the first-order torch solver when PyTorch is installed (it is
    orders of magnitude faster and certifies its answer with the same duality gap), else
    the CVXPY reference solver, else an ImportError naming the extras to install.

    Examples
    --------
    >>> resolve_solver("torch").name
    'torch'
    """
    if isinstance(solver, Solver):
        return solver
    if solver == "auto":
        if find_spec("torch") is not None:
            solver = "torch"
        elif find_spec("cvxpy") is not None:
            solver = "cvxpy"
        else:
            raise ImportError("CLAIR needs a solver backend: pip install 'clairstat[torch]' "
                              "(fast) or 'clairstat[cvxpy]' (reference).")
    if solver == "torch":
        return TorchSolver(max_iter=max_iter, tol=tol, device=device, dtype=dtype)
    if solver == "cvxpy":
        if not _on_cpu(device):
            raise ValueError("solver='cvxpy' runs on the CPU only; use solver='torch' for "
                             f"device={device!r}.")
        if str(dtype).removeprefix("torch.") != "float64":  # it was ignored (a review)
            raise ValueError(f"solver='cvxpy' solves in float64 only; dtype={dtype!r} is "
                             "the torch solver's option (solver='torch').")
        return CVXPYSolver(max_iter=max_iter, tol=tol)
    raise ValueError(f"solver must be 'auto', 'torch', 'cvxpy' or a clairstat Solver "
                     f"instance, got {solver!r}.")


def _on_cpu(device):
    """Whether ``device`` (None, a string or a torch.device) names the CPU."""
    if device is None or (isinstance(device, str) and device == "cpu"):
        return True
    try:
        import torch

        return torch.device(device).type == "cpu"
    except (ImportError, RuntimeError, TypeError, ValueError):  # not a device
        return False

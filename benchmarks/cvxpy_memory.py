"""Peak memory of the CVXPY reference solver against ``CVXPYSolver.memory_estimate``.

Each case runs in a fresh subprocess: after a tiny warm-up solve (so that importing
CVXPY and the solver is not counted) it records the peak resident memory
(``ru_maxrss``), solves a CLAIR problem of shape (K, p, q) with the CVXPY solver and
reports the growth of the peak. An interior-point solver allocates its KKT system and
factorises it in the first iteration, so Clarabel runs 1 iteration and SCS 10 (the
peak does not grow afterwards). The table shows the PSD cone's side ``n = p + K q``,
the measured growth, the estimate, and their ratio (the estimate should stay above).

    python benchmarks/cvxpy_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys

CASES = [(10, 20, 4), (15, 20, 4), (20, 20, 4), (25, 20, 4)]  # (K, p, q): n = 60..120

_CHILD = """
import json, resource, warnings
import numpy as np
from clairstat import clair_decompose
from clairstat.solvers import CVXPYSolver

K, p, q, name, iters = {K}, {p}, {q}, {name!r}, {iters}
X = np.random.default_rng(0).standard_normal((K, p, q))
solver = CVXPYSolver(name, max_iter=iters, max_memory=float("inf"))
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the iteration cap is reached on purpose
    clair_decompose(X[:2, :2, :1], solver=solver, alpha=1.0, beta=1.0)  # imports, once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    clair_decompose(X, solver=solver, alpha=1.0, beta=1.0)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"grown": (after - before) * 1024,
                   "estimate": solver.memory_estimate((K, p, q))}}))
"""


def measure(n_clients, p, q, name, iters):
    """Peak-memory growth and estimate, in bytes, of one solve in a new process."""
    code = _CHILD.format(K=n_clients, p=p, q=q, name=name, iters=iters)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    print("| solver | K | p | q | n = p + Kq | measured MiB | estimate MiB "
          "| estimate / measured |")
    print("|---|---|---|---|---|---|---|---|")
    for name, iters in (("CLARABEL", 1), ("SCS", 10)):
        for n_clients, p, q in CASES:
            row = measure(n_clients, p, q, name, iters)
            grown, estimate = row["grown"] / 2**20, row["estimate"] / 2**20
            print(f"| {name} | {n_clients} | {p} | {q} | {p + n_clients * q} | {grown:.0f} | "
                  f"{estimate:.0f} | {estimate / max(grown, 1e-9):.2f} |", flush=True)


if __name__ == "__main__":
    main()

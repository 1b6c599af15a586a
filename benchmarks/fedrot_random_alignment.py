"""A broken alignment tried as a negative control for the three FedRot tightening checks.

Each client of the ``fedrot`` study's small grid (hard alignment, rotational mismatch)
is rotated by an independent Haar-random SO(r) matrix instead of its alignment
rotation: an alignment that knows nothing of the mismatch. The checks
``fedrot_*_tightens_bound`` ask that the mean of aligned / unaligned Cauchy-Schwarz
bounds be below 1; a control must make them fail (interval above 1). Printed: the mean
ratio and its interval (``validation._core.mean_interval``) per alignment mode, on the
same data and seeds as the study (the random rotations from their own stream).
It does not make them fail (0.995-1.000, intervals across 1: validation/README.md);
the committed control of these checks is ``spread-alignment`` (simulations/_controls.py),
which cancels the factors' means instead.

    PYTHONPATH=. python benchmarks/fedrot_random_alignment.py
"""

from __future__ import annotations

import numpy as np
import scipy.stats

from simulations.studies.fedrot import STUDY, client_factors, factor_bound
from validation._core import mean_interval


def main():
    ratios = {"A": [], "B": [], "concatenated": []}
    for _, _, params, seed in STUDY.tasks("small"):
        if params["gauge"] != "rotation" or params["lam"] != 1.0:
            continue
        rng = np.random.default_rng(seed)  # the study's own draws, in its order
        factors = client_factors(rng, params["n_clients"], params["d"], params["k"],
                                 params["rank"], params["heterogeneity"], params["gauge"])
        weights = rng.dirichlet(np.full(params["n_clients"], 5.0))
        before = factor_bound(factors, weights)
        control = np.random.default_rng([seed, 1])
        for values in ratios.values():
            gauges = scipy.stats.special_ortho_group.rvs(params["rank"], size=len(factors),
                                                         random_state=control)
            rotated = [(b @ g, g.T @ a) for (b, a), g in zip(factors, gauges)]
            values.append(factor_bound(rotated, weights) / before)
    print("| mode | rows | mean ratio | 95% interval |\n|---|---|---|---|")
    for mode, values in ratios.items():
        mean, (low, high) = mean_interval(np.array(values), bounds=(0.0, np.inf))
        print(f"| {mode} | {len(values)} | {mean:.3f} | [{low:.3f}, {high:.3f}] |")


if __name__ == "__main__":
    main()

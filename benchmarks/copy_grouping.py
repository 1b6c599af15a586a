"""How often the grouping of copies merges independent clients (false merges).

``clairstat._tuning.copy_groups`` treats two clients as copies of one estimate when
their squared distance is below a share of the median over clients of the squared
distance to the nearest neighbour: ``min(1e-2, 1e-8^(2/d))`` for estimates of d entries
(``clairstat._tuning._near_copy_share``). Independent clients are never copies; this
script counts how often it merges some anyway: K clients with i.i.d. standard Gaussian
estimates of d entries, 200 seeds per cell, no copies at all. A merged client counts once in the noise
scale, the robust start and the calibration (docs/method_notes.md, section 8).

    python benchmarks/copy_grouping.py [--seeds 200]
"""

from __future__ import annotations

import argparse

import numpy as np

from clairstat import __version__
from clairstat._tuning import copy_groups


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200)
    args = parser.parse_args(argv)
    print(f"clairstat {__version__}, {args.seeds} seeds per cell, i.i.d. N(0, 1) clients\n")
    print("| entries d | clients K | fits with a merge | clients merged per fit |")
    print("|---|---|---|---|")
    for dim in (1, 2, 4, 8, 16):
        for n_clients in (20, 100, 500):
            merged = np.array([
                n_clients - len(np.unique(copy_groups(
                    np.random.default_rng(seed).standard_normal((n_clients, dim, 1)))))
                for seed in range(args.seeds)])
            print(f"| {dim} | {n_clients} | {np.mean(merged > 0):.3f} | {merged.mean():.3f} |")


if __name__ == "__main__":
    main()

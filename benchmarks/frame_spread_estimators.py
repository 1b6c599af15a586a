"""Exploration: the frame's scale estimator at few clients, MAD against more efficient ones.

Without ``noise_cov`` the detection of dense estimates runs in a frame of row and output
scales, each entry's spread over the clients read by its median absolute deviation
(``clairstat._estimator._spread``) and its log fitted by a row plus an output term
(``_robust_frame``). ``benchmarks/few_clients_frame.py`` found that frame's estimation
error behind the path's excess of false flags at six and seven clients (0.100 and 0.125
of uncorrupted federations with the rows alike, against 0.015 and 0.020 without a
frame). The MAD's efficiency is 37%: a more efficient robust scale makes a less noisy
frame, but one client's deviation moves it more. This script measures that trade on
``few_clients_frame.py``'s synthetic clients (``draw``: p = 5, q = 2, true rank 0, rows
alike or their noise over a factor 55; ``null``: nothing corrupted; ``shifted``: client
0's most precise row moved by 4 of its noise SDs), the estimator's default fit (rank
rule) with ``_spread`` replaced for the fit by:

* ``mad``: the package's (median absolute deviation from the median);
* ``shamos``: the median of the pairwise absolute differences (86% efficient, breaks
  down at 29% of the clients);
* ``qn``: Rousseeuw and Croux's Qn, the ``C(h, 2)``-th smallest pairwise absolute
  difference, ``h = K // 2 + 1`` (82%, 50%);
* ``sn``: Rousseeuw and Croux's Sn, the median over clients of each one's median
  absolute difference to the others (58%, 50%);
* ``trimmed``: the root mean square of the absolute deviations from the median, the
  largest quarter (at least one) left out.

A scale estimator's constant factor does not matter: the frame's logs are fitted by
row plus output terms and the frame is normalised afterwards. Rows are appended as they
are produced (resumable), each replicate seeded as in ``few_clients_frame.py``, the
package version and the code's provenance beside every row; the summary gives each
share with its Wilson 95% interval.

    OMP_NUM_THREADS=1 python benchmarks/frame_spread_estimators.py --clients 6 7 \\
        --replicates 400 700 --out benchmarks/results/frame_spread_estimators.csv
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from _tables import appending, existing_rows
from few_clients_frame import ROW_SPREADS, SCENARIOS, SHIFT, draw, scenario_cells

ESTIMATORS = ("mad", "shamos", "qn", "sn", "trimmed")
FIELDS = ["n_clients", "row_spread", "estimator", "test_level", "scenario", "replicate",
          "victim_flagged", "other_flagged", "rank", "version", "code_commit"]


def _pairs(stack):
    a, b = np.triu_indices(len(stack), 1)
    return np.abs(stack[a] - stack[b])


def spread(stack, estimator):
    """Each entry's spread over the clients (axis 0) by ``estimator``."""
    if estimator == "mad":
        return np.median(np.abs(stack - np.median(stack, axis=0)), axis=0)
    if estimator == "shamos":
        return np.median(_pairs(stack), axis=0)
    if estimator == "qn":
        h = len(stack) // 2 + 1
        return np.sort(_pairs(stack), axis=0)[h * (h - 1) // 2 - 1]
    if estimator == "sn":
        inner = np.median(np.abs(stack[:, None] - stack[None, :]), axis=1)
        return np.median(inner, axis=0)
    if estimator == "trimmed":
        deviations = np.sort(np.abs(stack - np.median(stack, axis=0)), axis=0)
        keep = len(stack) - max(1, len(stack) // 4)
        return np.sqrt(np.mean(deviations[:keep] ** 2, axis=0))
    raise ValueError(f"estimator must be one of {ESTIMATORS}, not {estimator!r}")


def run_one(n_clients, row_spread, estimator, scenario, replicate, test_level=0.05):
    import clairstat._estimator
    from clairstat import CLAIREstimator

    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, not {estimator!r}")
    estimates, row_sd = draw(n_clients, row_spread, replicate)
    if scenario == "shifted":
        precise = int(np.argmin(row_sd))
        estimates[0, precise, :] += SHIFT * row_sd[precise]
    previous = clairstat._estimator._spread
    clairstat._estimator._spread = lambda stack: spread(stack, estimator)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the few-clients warning
            est = CLAIREstimator(random_state=replicate, test_level=test_level).fit(estimates)
    finally:
        clairstat._estimator._spread = previous
    flags = est.contaminated_
    victim = int(flags[0]) if scenario == "shifted" else 0
    others = flags[1:] if scenario == "shifted" else flags
    return dict(n_clients=n_clients, row_spread=row_spread, estimator=estimator,
                test_level=test_level, scenario=scenario, replicate=replicate, victim_flagged=victim,
                other_flagged=int(others.any()), rank=est.rank_)


def run(clients, replicates, estimators, out, test_level=0.05):
    import clairstat

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from simulations._framework import code_provenance

    commit = code_provenance()
    done = {(int(r["n_clients"]), float(r["row_spread"]), r["estimator"], r["scenario"],
             int(r["replicate"]), float(r["test_level"])) for r in existing_rows(out, FIELDS)}
    with appending(out, FIELDS) as (writer, handle):
        for replicate in range(*replicates):
            for n_clients in clients:
                for row_spread in ROW_SPREADS:
                    for estimator in estimators:
                        for scenario in SCENARIOS:
                            key = (n_clients, row_spread, estimator, scenario, replicate)
                            if (*key, test_level) in done:
                                continue
                            row = run_one(*key, test_level=test_level)
                            writer.writerow({**row, "version": clairstat.__version__,
                                             "code_commit": commit})
                            handle.flush()


def summarize(out):
    import pandas as pd

    table = pd.read_csv(out, keep_default_na=False)  # "null" is a scenario, not NaN
    lines = ["| K | row spread | estimator | test level | replicates | null: any flag | "
             "shifted: client 0 flagged (power) | shifted: another client flagged |",
             "|---|---|---|---|---|---|---|---|"]
    for (n_clients, row_spread), cell in table.groupby(["n_clients", "row_spread"]):
        for estimator in ESTIMATORS:
            mine = cell[cell.estimator == estimator]
            for level in sorted(set(mine.test_level), reverse=True):
                cells = scenario_cells(mine[mine.test_level == level])
                if cells is not None:
                    lines.append(f"| {n_clients} | {row_spread:g} | {estimator} | {level:g} | "
                                 + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 6, 7, 12])
    parser.add_argument("--replicates", type=int, nargs=2, default=[400, 700],
                        metavar=("FIRST", "STOP"), help="replicates FIRST..STOP-1")
    parser.add_argument("--estimators", nargs="+", choices=ESTIMATORS, default=ESTIMATORS)
    parser.add_argument("--test-level", type=float, default=0.05,
                        help="the estimator's test_level (BH level)")
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/frame_spread_estimators.csv"))
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.summary_only:
        run(args.clients, args.replicates, args.estimators, args.out, args.test_level)
    print(summarize(args.out))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

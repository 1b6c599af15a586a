"""The path without a covariance at few clients: how much of its excess is the frame?

Without ``noise_cov`` the detection of dense estimates runs in a frame of row and output
scales read robustly off the clients' spread (``clairstat._estimator.ESTIMATED_FRAME``,
docs/method_notes.md section 8): ``residual`` (the package's default: what the
decomposition's backbone and low-rank part leave), ``data`` (the estimates' own
spread) or ``none`` (no frame, the plain statistic). With six or seven clients that
path flags more uncorrupted federations than its level. This script measures, on
synthetic clients whose truth is known, how much of that comes from the frame, and,
where rows differ in precision, how often each frame finds a shift in the most precise
row (it records flags, not the frame's scales):

* K clients, ``p = 5`` coefficients, ``q = 2`` outputs, estimates
  ``Theta + E_k`` with one shared ``Theta`` (true rank 0) and Gaussian noise whose
  standard deviation in row i is ``0.3 exp(s t_i)`` (``t`` evenly spaced over
  [-1, 1]; ``s = row_spread``: 0, rows alike; 2, the rows' noise over a factor
  e^4 = 55, as an intercept against slopes);
* ``null``: nothing corrupted, the share of fits with any flag (BH at 5%, the
  estimator's default); ``shifted``: client 0's most precise row moved by 4 of its
  noise standard deviations in every output, the share of fits that flag client 0
  (its power) and the share that flag any other client.

Every fit is the estimator's default (rank rule, ``random_state`` the replicate) with
``ESTIMATED_FRAME`` set for the fit. Rows are appended as they are produced
(resumable: finished (K, row_spread, frame, scenario, replicate) rows are skipped),
each replicate seeded by (replicate, K, row_spread index), the package version beside
every row; the summary gives each share with its Wilson 95% interval.

    OMP_NUM_THREADS=1 python benchmarks/few_clients_frame.py --reps 200 \\
        --out benchmarks/results/few_clients_frame.csv
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import numpy as np

from _tables import appending, existing_rows

CLIENTS = (4, 6, 7, 8, 12)
ROW_SPREADS = (0.0, 2.0)
FRAMES = ("residual", "data", "none")
SCENARIOS = ("null", "shifted")
P, Q, SIGMA, SHIFT = 5, 2, 0.3, 4.0
FIELDS = ["n_clients", "row_spread", "frame", "scenario", "replicate", "p", "q",
          "victim_flagged", "other_flagged", "rank", "version"]


def draw(n_clients, row_spread, replicate):
    """``(estimates, row_sd)`` of one replicate (the same for every frame and scenario)."""
    rng = np.random.default_rng([replicate, n_clients, ROW_SPREADS.index(row_spread), 11])
    row_sd = SIGMA * np.exp(row_spread * np.linspace(-1.0, 1.0, P))
    theta = rng.standard_normal((P, Q)) * row_sd[:, None] / SIGMA
    noise = rng.standard_normal((n_clients, P, Q)) * row_sd[None, :, None]
    return theta[None] + noise, row_sd


def run_one(n_clients, row_spread, frame, scenario, replicate):
    import clairstat._estimator
    from clairstat import CLAIREstimator

    estimates, row_sd = draw(n_clients, row_spread, replicate)
    if scenario == "shifted":
        precise = int(np.argmin(row_sd))
        estimates[0, precise, :] += SHIFT * row_sd[precise]
    previous = clairstat._estimator.ESTIMATED_FRAME
    clairstat._estimator.ESTIMATED_FRAME = frame
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the few-clients warning
            est = CLAIREstimator(random_state=replicate).fit(estimates)
    finally:
        clairstat._estimator.ESTIMATED_FRAME = previous
    flags = est.contaminated_
    victim = int(flags[0]) if scenario == "shifted" else 0
    others = flags[1:] if scenario == "shifted" else flags
    return dict(n_clients=n_clients, row_spread=row_spread, frame=frame, scenario=scenario,
                replicate=replicate, p=P, q=Q, victim_flagged=victim,
                other_flagged=int(others.any()), rank=est.rank_)


def run(reps, out):
    import clairstat

    done = {(int(r["n_clients"]), float(r["row_spread"]), r["frame"], r["scenario"],
             int(r["replicate"])) for r in existing_rows(out, FIELDS)}
    with appending(out, FIELDS) as (writer, handle):
        for replicate in range(reps):
            for n_clients in CLIENTS:
                for row_spread in ROW_SPREADS:
                    for frame in FRAMES:
                        for scenario in SCENARIOS:
                            key = (n_clients, row_spread, frame, scenario, replicate)
                            if key in done:
                                continue
                            row = run_one(*key)
                            writer.writerow({**row, "version": clairstat.__version__})
                            handle.flush()


def scenario_cells(part):
    """``(replicates, null share, power, others flagged)`` of one cell's rows, each
    share with its Wilson 95% interval; ``None`` when a scenario has no rows."""
    from statsmodels.stats.proportion import proportion_confint

    def share(column):
        lo, hi = proportion_confint(column.sum(), len(column), method="wilson")
        return f"{column.mean():.3f} [{lo:.3f}, {hi:.3f}]"

    null, shifted = part[part.scenario == "null"], part[part.scenario == "shifted"]
    if null.empty or shifted.empty:
        return None
    return (len(null), share(null.other_flagged), share(shifted.victim_flagged),
            share(shifted.other_flagged))


def summarize(out):
    import pandas as pd

    table = pd.read_csv(out, keep_default_na=False)  # "null" is a scenario, not NaN
    lines = ["| K | row spread | frame | replicates | null: any flag | shifted: client 0 "
             "flagged (power) | shifted: another client flagged |",
             "|---|---|---|---|---|---|---|"]
    for (n_clients, row_spread), cell in table.groupby(["n_clients", "row_spread"]):
        for frame in FRAMES:
            cells = scenario_cells(cell[cell.frame == frame])
            if cells is not None:
                lines.append(f"| {n_clients} | {row_spread:g} | {frame} | "
                             + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=200, help="replicates per cell")
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/few_clients_frame.csv"))
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.summary_only:
        run(args.reps, args.out)
    print(summarize(args.out))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

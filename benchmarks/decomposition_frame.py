"""Where the decomposition runs without a covariance: in the data's units or pre-scaled.

Without ``noise_cov`` the detection of dense estimates runs in a frame of row and output
scales read off what the decomposition leaves (``clairstat._estimator._estimated_frame``),
and starts from the clients the decomposition's sparse part leaves at zero. The
decomposition itself ran in the data's units, so a covariate or an output counted in
other units moved the tests (``benchmarks/frame_units.py``). With
``clairstat._estimator.DECOMPOSITION_FRAME = "data"`` the penalized program runs on the
estimates pre-scaled by their rows' and outputs' robust spreads (each entry's MAD over the
clients, its log fitted by a row plus an output term: ``_robust_frame`` on the estimates
themselves, exactly equivariant under a change of units) and its parts are mapped back;
``"none"`` is the program in the data's units.

This script compares the two, paired on the same draws, on the detection study's
synthetic clients (``clairstat.datasets.make_federated_regression``: p = 20, q = 5, a
shared rank-2 signal, n = 200 samples per client, noise 1, contaminated clients off the
subspace by ``separation_ratio`` times ``sigma sqrt(p q / n)``), at 8 clients (0, 1 or 2
contaminated) and 40 (0, 5 or 10), each drawn as it is (``units = "drawn"``) and in other
units (``"rescaled"``: every estimate's rows and outputs multiplied by fixed factors,
log-uniform over 1e-2..1e2, drawn once per replicate). Per fit: the contaminated clients
flagged (recall), the benign clients flagged, the rank, and the refinement's error on the
benign clients relative to their local estimates' (Frobenius, in the fit's units).

Rows are appended as they are produced (resumable), each replicate seeded by its number,
the package version and the code's provenance beside every row.

    OMP_NUM_THREADS=1 python benchmarks/decomposition_frame.py --replicates 3000 3100
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from _tables import appending, existing_rows

FRAMES = ("none", "data", "residual-2", "residual-3")
UNITS = ("drawn", "rescaled")
CELLS = ((8, 0), (8, 1), (8, 2), (40, 0), (40, 5), (40, 10))
P, Q, RANK, N, SIGMA = 20, 5, 2, 200, 1.0
FIELDS = ["n_clients", "n_contaminated", "separation_ratio", "units", "frame", "replicate",
          "recall", "benign_flagged", "rank", "refined_error_ratio", "converged",
          "version", "code_commit"]


def draw(n_clients, n_contaminated, separation_ratio, units, replicate):
    """The clients' estimates, the truth and the contaminated mask, in ``units``."""
    from clairstat.datasets import make_federated_regression

    separation = separation_ratio * SIGMA * np.sqrt(P * Q / N)
    data = make_federated_regression(n_clients, P, Q, RANK, N, n_contaminated,
                                     noise_level=SIGMA, separation=separation,
                                     random_state=replicate)
    estimates, truth = data.local_estimates, data.truth
    if units == "rescaled":
        rng = np.random.default_rng([replicate, 1])
        rows, cols = 10.0 ** rng.uniform(-2, 2, P), 10.0 ** rng.uniform(-2, 2, Q)
        estimates = rows[None, :, None] * estimates * cols
        truth = rows[None, :, None] * truth * cols
    return estimates, truth, np.asarray(data.contaminated, bool), data.n_samples


def run_one(n_clients, n_contaminated, separation_ratio, units, frame, replicate):
    import clairstat._estimator
    from clairstat import CLAIREstimator

    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {FRAMES}, not {frame!r}")
    estimates, truth, contaminated, n_samples = draw(n_clients, n_contaminated,
                                                     separation_ratio, units, replicate)
    module = clairstat._estimator
    previous = module.DECOMPOSITION_FRAME, module.DECOMPOSITION_PASSES
    module.DECOMPOSITION_FRAME, _, passes = frame.partition("-")
    module.DECOMPOSITION_PASSES = int(passes or 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # few clients, non-convergence
            est = CLAIREstimator(random_state=replicate).fit(estimates,
                                                             sample_weight=n_samples)
    finally:
        module.DECOMPOSITION_FRAME, module.DECOMPOSITION_PASSES = previous
    flags = np.asarray(est.contaminated_, bool)
    benign = ~contaminated
    error = np.linalg.norm(est.refined_[benign] - truth[benign])
    local = np.linalg.norm(estimates[benign] - truth[benign])
    return dict(n_clients=n_clients, n_contaminated=n_contaminated,
                separation_ratio=separation_ratio, units=units, frame=frame,
                replicate=replicate,
                recall=float(flags[contaminated].mean()) if contaminated.any() else "",
                benign_flagged=int(flags[benign].sum()), rank=int(est.rank_),
                refined_error_ratio=float(error / local),
                converged=bool(est.detection_converged_))


def run(replicates, separation_ratio, out, frames=FRAMES, units_list=UNITS):
    import clairstat

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from simulations._framework import code_provenance

    commit = code_provenance()
    done = {(int(r["n_clients"]), int(r["n_contaminated"]), float(r["separation_ratio"]),
             r["units"], r["frame"], int(r["replicate"])) for r in existing_rows(out, FIELDS)}
    with appending(out, FIELDS) as (writer, handle):
        for replicate in range(*replicates):
            for n_clients, n_contaminated in CELLS:
                for units in units_list:
                    for frame in frames:
                        key = (n_clients, n_contaminated, separation_ratio, units, frame,
                               replicate)
                        if key in done:
                            continue
                        writer.writerow({**run_one(*key), "version": clairstat.__version__,
                                         "code_commit": commit})
                        handle.flush()


def summarize(out):
    import pandas as pd
    from statsmodels.stats.proportion import proportion_confint

    table = pd.read_csv(out)
    lines = ["| K | contaminated | units | frame | replicates | recall | benign flagged "
             "(per fit) | fits with a false flag [95% CI] | rank (mean) | refined / local "
             "error (mean) | flags equal to the drawn units' |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = ["n_clients", "n_contaminated", "separation_ratio", "frame", "replicate"]
    drawn = table[table.units == "drawn"].set_index(keys)
    for (k, c, units, frame), cell in table.groupby(
            ["n_clients", "n_contaminated", "units", "frame"], sort=True):
        n = len(cell)
        false = int((cell.benign_flagged > 0).sum())
        low, high = proportion_confint(false, n, method="wilson")
        recall = f"{cell.recall.mean():.3f}" if c else "-"
        same = cell.set_index(keys)
        joined = same.join(drawn.add_suffix("_drawn"), how="inner")
        equal = int(((joined.benign_flagged == joined.benign_flagged_drawn)
                     & ((joined.recall == joined.recall_drawn)
                        | joined.recall.isna())).sum())
        lines.append(f"| {k} | {c} | {units} | {frame} | {n} | {recall} | "
                     f"{cell.benign_flagged.mean():.3f} | {false / n:.3f} [{low:.3f}, "
                     f"{high:.3f}] | {cell['rank'].mean():.2f} | "
                     f"{cell.refined_error_ratio.mean():.3f} | {equal} of {len(joined)} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicates", type=int, nargs=2, default=[3000, 3100],
                        metavar=("FIRST", "STOP"), help="replicates FIRST..STOP-1")
    parser.add_argument("--separation-ratio", type=float, default=1.0)
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/decomposition_frame.csv"))
    parser.add_argument("--frames", nargs="+", choices=FRAMES, default=FRAMES)
    parser.add_argument("--units", nargs="+", choices=UNITS, default=UNITS)
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.summary_only:
        run(args.replicates, args.separation_ratio, args.out, args.frames, args.units)
    print(summarize(args.out))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

"""What the calibration of a given covariance costs where that covariance is right.

With ``noise_cov`` the per-client tests' null is widened where the clients' statistics
spread more than chi^2 allows and its scale matched at the median, never lowered
(``clairstat._inference._calibrate``): a guard against covariances that understate the
noise (the classical OLS covariance under heteroscedasticity). Where the covariance is
exactly right the guard only costs: with the estimates of
``benchmarks/exchangeable_null.py`` (the 18 real datasets' clients redrawn as Gaussian
noise about their mean, with one covariance for all (``common``) or each client's own
(``own``), the true covariance given) 0.012 of the null splits had a flag where Simes'
level is 0.05. This script measures the power that costs: the same draws, nothing
corrupted (``kind = clean``) or one client shifted (``kind = shift``) by ``t`` in its own
noise's metric (a random direction; ``t^2 = 4 sqrt(2 p q)``, four null standard
deviations of a chi^2 on p q df), each fitted twice: with the package's calibration
(``calibration = package``) and with the calibration step replaced by the identity
(``calibration = none``: the null the covariance implies, as the tests would use it if
the covariance were known to be right).

Rows are appended as they are produced (resumable by (dataset, split)), the package
version beside every row; the summary gives the shares with Wilson 95% intervals.

    OMP_NUM_THREADS=1 python benchmarks/calibration_cost.py --splits 40 \\
        --out benchmarks/results/calibration_cost.csv
"""

from __future__ import annotations

import contextlib
import os
import warnings

import numpy as np

import exchangeable_null
from exchangeable_null import _datasets, client_estimates, variant_estimates

FIELDS = ["dataset", "split", "variant", "kind", "calibration", "n_clients", "p", "q",
          "victim", "any_flag", "victim_flagged", "false_flags", "version"]


@contextlib.contextmanager
def identity_calibration():
    """``clairstat._inference._calibrate`` replaced by the identity (the null as given)."""
    from clairstat import _inference
    from clairstat._null import NullDistribution

    original = _inference._calibrate

    def identity(stat, null, new, calibrate_on, estimated, floor):
        return (NullDistribution(null.scale, null.df), NullDistribution(new.scale, new.df),
                (np.inf, 1.0, np.inf, 1.0))  # spread df, factor, scale df, free

    _inference._calibrate = identity
    try:
        yield
    finally:
        _inference._calibrate = original


def shifted(estimates, noise_cov, victim, rng):
    """``estimates`` with client ``victim`` moved by ``t`` in its own noise's metric."""
    row_covs, col_covs = noise_cov
    p, q = estimates.shape[1:]
    direction = rng.standard_normal((p, q))
    direction /= np.linalg.norm(direction)
    size = np.sqrt(4.0 * np.sqrt(2.0 * p * q))
    out = estimates.copy()
    out[victim] += size * (np.linalg.cholesky(row_covs[victim]) @ direction
                           @ np.linalg.cholesky(col_covs[victim]).T)
    return out


def run_one(entry, split):
    from clairstat import CLAIREstimator

    name, features, outputs, frame, n_clients = entry
    ols = client_estimates(name, frame, features, outputs, n_clients, split)
    rows = []
    for index, variant in enumerate(("own", "common")):
        # the draws of exchangeable_null.py (variant index 1 and 2 there)
        draws, noise_cov = variant_estimates(
            ols, variant, np.random.default_rng([split, len(name), 7, index + 1]))
        rng = np.random.default_rng([split, len(name), 11, index])
        victim = int(rng.integers(n_clients))
        for kind, estimates in (("clean", draws),
                                ("shift", shifted(draws, noise_cov, victim, rng))):
            for calibration in ("package", "none"):
                guard = (identity_calibration() if calibration == "none"
                         else contextlib.nullcontext())
                with guard, warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    est = CLAIREstimator(random_state=split).fit(
                        estimates, sample_weight=ols.n_samples, noise_cov=noise_cov)
                flags = est.contaminated_
                hit = bool(flags[victim]) if kind == "shift" else False
                rows.append(dict(dataset=name, split=split, variant=variant, kind=kind,
                                 calibration=calibration, n_clients=n_clients,
                                 p=estimates.shape[1], q=estimates.shape[2],
                                 victim=victim if kind == "shift" else "",
                                 any_flag=int(flags.any()), victim_flagged=int(hit),
                                 false_flags=int(flags.sum() - hit)))
    return rows


def run(n_splits, out, datasets=None):
    """Resumable: the loop of :func:`exchangeable_null.run` with this script's rows."""
    exchangeable_null.run(n_splits, out, datasets, one=run_one, fields=FIELDS)


def summarize(out):
    import pandas as pd
    from statsmodels.stats.proportion import proportion_confint

    table = pd.read_csv(out)

    def share(hits, n):
        lo, hi = proportion_confint(hits, n, method="wilson")
        return f"{hits / n:.3f} [{lo:.3f}, {hi:.3f}]"

    lines = ["| variant | calibration | null splits with a flag | shifted client flagged | "
             "other clients flagged (shift) |", "|---|---|---|---|---|"]
    for (variant, calibration), group in table.groupby(["variant", "calibration"],
                                                       sort=False):
        null = group[group.kind == "clean"]
        shift = group[group.kind == "shift"]
        lines.append(f"| {variant} | {calibration} | "
                     f"{share(null.any_flag.sum(), len(null))} | "
                     f"{share(shift.victim_flagged.sum(), len(shift))} | "
                     f"{shift.false_flags.sum()} in {len(shift)} fits |")
    per = (table[table.kind == "shift"]
           .pivot_table(index="dataset", columns=["variant", "calibration"],
                        values="victim_flagged", aggfunc="mean", sort=False))
    lines += ["", "| dataset | " + " | ".join(f"{v}, {c}" for v, c in per.columns)
              + " |", "|---|" + "---|" * len(per.columns)]
    for name, row in per.iterrows():
        lines.append(f"| {name} | " + " | ".join(f"{x:.3f}" for x in row) + " |")
    return "\n".join(lines)


def main(argv=None):
    exchangeable_null.command_line(__doc__, 40, "benchmarks/results/calibration_cost.csv",
                                   run, summarize, argv)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

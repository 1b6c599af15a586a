"""How well the LoRA path's per-module test holds its level: the estimated null's error.

On factored LoRA stacks (:func:`clairstat._reduced.factored_reduction`) the per-client
statistic ``T_k = ||(I - P)(X_k - mean_(-k))||_F^2`` is referred to a scaled
``chi^2_nu`` whose scale and degrees of freedom are estimated from the clients'
statistics themselves (:func:`clairstat._detection.calibrate_null`: nu from the lower
quartile over the median and from the MAD of the log-statistics, the smaller kept; the
scale from the median, its error carried into an F). With one module's 8-50 clients
these estimates are rough, and the BH test at 5% over the clients can reject more often
than 5% when every client is benign. This script measures by how much:

* **Part A, the estimate alone.** ``T_k`` i.i.d. ``chi^2_nu`` (exactly the null family),
  the package's estimate and p-values as :func:`clairstat._inference._factored_tests`
  forms them for equal weights, BH at 5%: the share of replicates with any rejection.
  Beside it, a measured alternative not in the package: the plug-in p-values
  prepivoted by a parametric bootstrap (Beran, 1988): ``p -> P*(p* <= p)``, with
  ``p*`` the plug-in p-value of a new draw under the estimate refitted on ``n`` draws
  from the fitted null (``--boot`` draws, Rao-Blackwellised over the new draw).
* **Part B, end to end.** One module of ``K`` synthetic benign clients (d = 64, rank 4,
  every client i.i.d.) through :func:`clairstat.aggregation.clair_modules`
  (``joint=False``, the package default otherwise): the share of fits that flag any
  client. ``shared-A``: ``B_k = B_0 + noise``, one ``A`` (the noise of every update
  lies in one row space: the statistic is a scaled chi^2); ``independent``: ``B_k``
  and ``A_k`` i.i.d. Gaussian (each update's noise in its own row space, as when both
  factors train).

Wilson 95% intervals. Usage (about 10 minutes on one core):

    python benchmarks/lora_null_calibration.py [--reps 2000] [--fits 200] [--boot 400]
"""

from __future__ import annotations

import argparse
import functools
import os
import warnings

import numpy as np
from scipy import special, stats

import clairstat
from clairstat._detection import calibrate_null
from clairstat._null import NullDistribution, median_scale_df

LEVEL = 0.05
DF_THEORY = 256.0  # (p - rank) q of a 64-row module with rank-4 clients
# Plug-in log p-values at which the prepivot map is tabulated (1 down to 1e-300).
_LOG_P = -np.concatenate([np.linspace(0, 12, 121), np.linspace(12.5, 300, 60)]) * np.log(10)
_NU_GRID = np.geomspace(0.05, 1e8, 4001)


def _any_rejection(p_values):
    from statsmodels.stats.multitest import multipletests

    return bool(multipletests(p_values, LEVEL, "fdr_bh")[0].any())


def package_log_p(stat, df_theory):
    """The package's null for equal weights: calibrate_null, the scale's F, log p."""
    n = len(stat)
    sigma2, nu = calibrate_null(stat / df_theory, np.ones(n, dtype=bool), df_theory)
    null = NullDistribution(np.full(n, sigma2 * df_theory / nu), np.full(n, nu),
                            median_scale_df(nu, n))
    return null.log_sf(stat), sigma2 * df_theory, nu


@functools.cache
def _spread_table():
    return 1.0 - stats.chi2.ppf(0.25, _NU_GRID) / stats.chi2.ppf(0.5, _NU_GRID)


def vectorised_estimate(samples, df_theory):
    """:func:`calibrate_null` on each row of ``samples`` (bootstrap draws, all > 0).

    The same two estimates of nu, the quartile match inverted on a fine grid instead of
    by root finding (checked against the package's in :func:`main`). Positive samples
    only: the package drops zeros from the log-MAD, this does not.
    """
    if not np.all(samples > 0):
        raise ValueError("vectorised_estimate takes positive samples only.")
    m = samples.shape[1]
    med = np.median(samples, axis=1)
    target = 1.0 - np.percentile(samples, 25, axis=1) / med
    nu = np.full(len(samples), float(df_theory))
    cap = 1.0 - stats.chi2.ppf(0.25, df_theory) / stats.chi2.ppf(0.5, df_theory)
    if m >= 8:
        inverted = np.exp(np.interp(target, _spread_table()[::-1], np.log(_NU_GRID)[::-1]))
        nu = np.where(target > cap, np.minimum(inverted, df_theory), nu)
        logs = np.log(samples)
        log_sd = 1.4826 * np.median(np.abs(logs - np.median(logs, axis=1, keepdims=True)),
                                    axis=1)
        nu = np.where(log_sd > 0, np.minimum(nu, np.maximum(2.0 / np.where(
            log_sd > 0, log_sd, 1.0) ** 2, 0.05)), nu)
    return med / (stats.chi2.median(nu) / nu), nu


def prepivoted_log_p(stat, df_theory, n_boot, seed):
    """Plug-in chi^2 p-values mapped through ``p -> P*(p* <= p)`` (module docstring)."""
    n = len(stat)
    sigma2, nu_hat = vectorised_estimate(stat[None] / df_theory, df_theory)
    log_p = stats.chi2.logsf(stat / df_theory / (sigma2[0] / nu_hat[0]), nu_hat[0])
    draws = np.random.default_rng(seed).chisquare(nu_hat[0], (n_boot, n)) / nu_hat[0]
    s2_b, nu_b = vectorised_estimate(draws, df_theory)
    thresholds = (s2_b / nu_b)[:, None] * stats.chi2.isf(np.exp(_LOG_P)[None], nu_b[:, None])
    with np.errstate(divide="ignore"):
        tails = stats.chi2.logsf(thresholds * nu_hat[0], nu_hat[0])
    mapped = special.logsumexp(tails, axis=0) - np.log(n_boot)
    return np.interp(log_p, _LOG_P[::-1], mapped[::-1])


def part_a(reps, n_boot):
    rows = []
    for n in (8, 16, 50):
        for nu in (20.0, 128.0, DF_THEORY):
            rng = np.random.default_rng([n, int(nu)])
            hits = np.zeros(2, dtype=int)
            for rep in range(reps):
                stat = rng.chisquare(nu, n)
                hits[0] += _any_rejection(np.exp(package_log_p(stat, DF_THEORY)[0]))
                hits[1] += _any_rejection(np.exp(prepivoted_log_p(stat, DF_THEORY, n_boot,
                                                                  seed=rep)))
            rows.append((n, nu, reps, *hits))
    return rows


def _factors(kind, n_clients, rng, dim=64, rank=4):
    b_0 = 0.05 * rng.standard_normal((dim, rank))
    a_0 = rng.standard_normal((rank, dim)) / np.sqrt(dim)
    out = []
    for _ in range(n_clients):
        if kind == "shared-A":
            out.append((b_0 + 0.01 * rng.standard_normal((dim, rank)), a_0))
        else:
            out.append((rng.standard_normal((dim, rank)), rng.standard_normal((rank, dim))))
    return out


def part_b(fits):
    from clairstat.aggregation import clair_modules

    rows = []
    for kind in ("shared-A", "independent"):
        for n_clients in (8, 16, 50):
            hits, ranks = 0, []
            for rep in range(fits):
                rng = np.random.default_rng([n_clients, rep, kind == "independent"])
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # small-K power warnings
                    fit = clair_modules({"m": _factors(kind, n_clients, rng)}, None,
                                        joint=False, test_level=LEVEL, random_state=rep)
                hits += bool(fit.module_flagged["m"].any())
                ranks.append(fit.estimators["m"].rank_)
            rows.append((kind, n_clients, fits, hits, float(np.mean(ranks))))
    return rows


def _share(hits, total):
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = proportion_confint(hits, total, method="wilson")
    return f"{hits / total:.3f} [{lo:.3f}, {hi:.3f}]"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2000)
    parser.add_argument("--fits", type=int, default=200)
    parser.add_argument("--boot", type=int, default=400)
    args = parser.parse_args(argv)
    # The vectorised estimate is the package's (checked on a few samples).
    rng = np.random.default_rng(0)
    for n in (8, 16, 50):
        sample = rng.chisquare(40.0, n) / DF_THEORY
        ours = vectorised_estimate(sample[None], DF_THEORY)
        theirs = calibrate_null(sample, np.ones(n, dtype=bool), DF_THEORY)
        assert np.allclose([ours[0][0], ours[1][0]], theirs, rtol=1e-3), (ours, theirs)
    print(f"clairstat {clairstat.__version__}; BH at {LEVEL}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print("\nPart A: T_k i.i.d. chi^2_nu, df_theory = 256, share of replicates with any "
          "rejection [Wilson 95%]\n")
    print("| clients | nu | replicates | package null | prepivoted (not in the package) |")
    print("|---|---|---|---|---|")
    for n, nu, reps, package, prepivot in part_a(args.reps, args.boot):
        print(f"| {n} | {nu:g} | {reps} | {_share(package, reps)} | {_share(prepivot, reps)} |")
    print("\nPart B: one synthetic module (d = 64, rank 4), every client benign, "
          "clair_modules(joint=False): share of fits with any flag [Wilson 95%]\n")
    print("| noise | clients | fits | any flag | mean rank |")
    print("|---|---|---|---|---|")
    for kind, n_clients, fits, hits, rank in part_b(args.fits):
        print(f"| {kind} | {n_clients} | {fits} | {_share(hits, fits)} | {rank:.2f} |")


if __name__ == "__main__":
    main()

"""How well the LoRA path's per-module test holds its level, and what it keeps of power.

On factored LoRA stacks (:func:`clairstat._reduced.factored_reduction`) the per-client
statistic ``T_k = ||(I - P)(X_k - mean_(-k))||_F^2`` has no closed-form null (the noise
of a rank-r update is rank r). The package predicts each statistic from the others'
(:func:`clairstat._null.predictive_null`): the cube root of ``T_k`` against the median
and MAD of the calibration clients' cube roots, client k left out, referred to a
Student t whose degrees of freedom carry the MAD's own error. Until 2026-12-03 it fitted
a scaled ``chi^2_nu`` to the statistics instead (nu from the lower quartile over the
median and from the MAD of the log-statistics, the smaller kept; the scale from the
median, its error carried into an F), whose estimated nu was treated as known. This
script measures both in one run (the former as :func:`previous_log_p`, a copy of the
package's code of that day):

* **Part A, the statistics alone.** ``T_k`` i.i.d. ``chi^2_nu`` (a scaled chi^2, as the
  previous null assumed), BH at 5% over the clients: the share of replicates with any
  rejection; then the same with one client in eight multiplied by ``c`` (its
  statistic ``c`` times a benign one's), the share of those clients flagged.
* **Part B, end to end.** One module of ``K`` synthetic clients (d = 64, rank 4)
  through :func:`clairstat.aggregation.clair_modules` (``joint=False``, the package
  default otherwise), with the package's null and with the previous one patched in:
  the share of all-benign fits that flag any client, and with one client in eight whose
  noise (``shared-A``) or update (``independent``) is multiplied by ``sqrt(c)``, its
  statistic about ``c`` times a benign one's, the share of those clients flagged.
  ``shared-A``: ``B_k = B_0 + noise``, one ``A`` (every update's noise in one row space:
  the statistic is a scaled chi^2); ``independent``: ``B_k`` and ``A_k`` i.i.d.
  Gaussian (each update's noise in its own row space, as when both factors train; the
  statistic is a product of Gaussians' norm).

* **Part C, products.** ``T_k = chi^2_d * chi^2_d`` i.i.d. (the squared norm of a rank-1
  update ``b a^T`` whose factors both carry Gaussian noise: heavier-tailed than any
  chi^2), d in {8, 64}, with 50 and 150 clients: the share of replicates with any
  rejection under each null. Where the cube root of such a statistic is not close to
  normal the predictive null is too narrow in the far tail that BH reaches with many
  clients.

* **Part D, few clients.** ``T_k`` i.i.d. ``chi^2_20`` with 4-6 clients: the share of
  replicates with any rejection under the package's null, and under it without the
  MAD's small-sample factor for three values (``clairstat._null.MAD_SMALL_SAMPLE``).

Wilson 95% intervals. Usage (about 10 minutes on one core; ``--parts C`` for one part):

    python benchmarks/lora_null_calibration.py [--reps 2000] [--fits 200] [--parts ABCD]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import warnings
from unittest import mock

import numpy as np
from scipy import optimize, stats

import clairstat
from clairstat import _inference
from clairstat._null import NullDistribution, median_scale_df, predictive_null

LEVEL = 0.05
DF_THEORY = 256.0  # (p - rank) q of a 64-row module with rank-4 clients
SCALES = (2.0, 4.0)  # an attacker's statistic over a benign one's, in the power rows


def _rejections(log_p):
    from statsmodels.stats.multitest import multipletests

    return multipletests(np.exp(log_p), LEVEL, "fdr_bh")[0]


def previous_quartile_null(ratios, members, df_theory):
    """The former ``clairstat._detection.calibrate_null``: ``(sigma2, nu)`` of
    ``sigma2 chi^2_nu / nu`` matched to the given clients' median and lower quartile,
    nu lowered to the log-statistics' MAD when that is smaller, at most ``df_theory``."""
    sample = ratios[members]
    med = float(np.median(sample))
    q1 = float(np.percentile(sample, 25))

    def spread(nu):  # 1 - Q1 / median of chi^2_nu: falls monotonically in nu
        lo, mid = stats.chi2.ppf([0.25, 0.5], nu)
        return 1.0 - lo / mid

    target = 1.0 - q1 / med if med > 0 else 0.0
    nu = float(df_theory)
    if len(sample) >= 8 and target > spread(df_theory):
        nu = 0.05 if target >= spread(0.05) else float(
            optimize.brentq(lambda v: spread(v) - target, 0.05, df_theory))
    positive = sample[sample > 0]
    if len(positive) >= 8:
        log_sd = 1.4826 * np.median(np.abs(np.log(positive) - np.median(np.log(positive))))
        if log_sd > 0:
            nu = min(nu, max(2.0 / log_sd ** 2, 0.05))
    return med / (stats.chi2.median(nu) / nu), nu


def previous_log_p(stat, relative, calibrate_on, df_theory):
    """The former null's log p-values: :func:`previous_quartile_null`, the scale's F."""
    sigma2, nu = previous_quartile_null(stat / (relative * df_theory), calibrate_on,
                                        df_theory)
    relative = np.broadcast_to(relative, np.shape(stat))
    null = NullDistribution(sigma2 * df_theory * relative / nu, np.full(len(stat), nu),
                            median_scale_df(nu, int(np.sum(calibrate_on))))
    return null.log_sf(stat), null


def package_log_p(stat):
    everyone = np.ones(len(stat), dtype=bool)
    return predictive_null(stat, np.ones(len(stat)), everyone, 0.0)[0].log_sf(stat)


def part_a(reps):
    rows = []
    for n in (8, 16, 50):
        for nu in (20.0, 128.0, DF_THEORY):
            rng = np.random.default_rng([n, int(nu)])
            level = np.zeros(2, dtype=int)
            power = np.zeros((len(SCALES), 2))
            n_bad = max(1, n // 8)
            everyone = np.ones(n, dtype=bool)
            for _ in range(reps):
                stat = rng.chisquare(nu, n)
                level[0] += _rejections(previous_log_p(stat, 1.0, everyone, DF_THEORY)[0]).any()
                level[1] += _rejections(package_log_p(stat)).any()
                for i, c in enumerate(SCALES):
                    hit = stat.copy()
                    hit[:n_bad] *= c
                    power[i, 0] += _rejections(
                        previous_log_p(hit, 1.0, everyone, DF_THEORY)[0])[:n_bad].mean()
                    power[i, 1] += _rejections(package_log_p(hit))[:n_bad].mean()
            rows.append((n, nu, reps, level, power / reps))
    return rows


def _previous_factored_tests(blocks, weights, members, mean, basis, stat, fits,
                             calibrate_on, noise):
    """The package's ``_factored_tests`` as it was, with :func:`previous_log_p`'s null."""
    n_clients, p, q = blocks.shape
    df_theory = (p - basis.shape[1]) * q
    share = np.array([1.0 + np.sum(_inference._mean_weights(weights, others) ** 2)
                      for _, others in fits])
    relative = noise.sigma ** 2 / np.mean(noise.sigma ** 2) * share
    sigma2, nu = previous_quartile_null(stat / (relative * df_theory), calibrate_on,
                                        df_theory)
    sigma2 = max(sigma2 * df_theory, noise.floor * df_theory)
    scale_df = median_scale_df(nu, int(np.sum(calibrate_on)))
    null = NullDistribution(sigma2 * relative / nu, np.full(n_clients, nu), scale_df)
    share_new = 1.0 + np.sum(_inference._mean_weights(weights, members) ** 2)
    new = NullDistribution(np.array([sigma2 * share_new / nu]), np.array([nu]), scale_df)
    return null, _inference.NewClientTest(mean, basis, new)


def _factors(kind, n_clients, rng, n_bad=0, c=1.0, dim=64, rank=4):
    b_0 = 0.05 * rng.standard_normal((dim, rank))
    a_0 = rng.standard_normal((rank, dim)) / np.sqrt(dim)
    out = []
    for i in range(n_clients):
        # an attacker's noise (shared-A) or update (independent) times sqrt(c): its
        # statistic about c times a benign one's
        boost = np.sqrt(c) if i < n_bad else 1.0
        if kind == "shared-A":
            out.append((b_0 + boost * 0.01 * rng.standard_normal((dim, rank)), a_0))
        else:
            out.append((boost * rng.standard_normal((dim, rank)),
                        rng.standard_normal((rank, dim))))
    return out


def _module_flags(factors, seed, previous):
    from clairstat.aggregation import clair_modules

    patch = (mock.patch.object(_inference, "_factored_tests", _previous_factored_tests)
             if previous else contextlib.nullcontext())
    with patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small-K power warnings
        fit = clair_modules({"m": factors}, None, joint=False, test_level=LEVEL,
                            random_state=seed)
    return fit.module_flagged["m"]


def part_b(fits):
    rows = []
    for kind in ("shared-A", "independent"):
        for n_clients in (8, 16, 50):
            n_bad = max(1, n_clients // 8)
            level = np.zeros(2, dtype=int)
            power = np.zeros((len(SCALES), 2))
            for rep in range(fits):
                seed = [n_clients, rep, kind == "independent"]
                for j, previous in enumerate((True, False)):
                    factors = _factors(kind, n_clients, np.random.default_rng(seed))
                    level[j] += _module_flags(factors, rep, previous).any()
                    for i, c in enumerate(SCALES):
                        factors = _factors(kind, n_clients, np.random.default_rng(seed),
                                           n_bad, c)
                        power[i, j] += _module_flags(factors, rep, previous)[:n_bad].mean()
            rows.append((kind, n_clients, fits, level, power / fits))
    return rows


def part_c(reps):
    rows = []
    for d in (8, 64):
        for n in (50, 150):
            rng = np.random.default_rng([d, n])
            everyone = np.ones(n, dtype=bool)
            level = np.zeros(2, dtype=int)
            for _ in range(reps):
                stat = rng.chisquare(d, n) * rng.chisquare(d, n)
                level[0] += _rejections(previous_log_p(stat, 1.0, everyone, DF_THEORY)[0]).any()
                level[1] += _rejections(package_log_p(stat)).any()
            rows.append((d, n, reps, level))
    return rows


def part_d(reps):
    from unittest import mock

    from clairstat import _null

    rows = []
    for n in (4, 5, 6):
        level = np.zeros(2, dtype=int)
        for j, factors in enumerate((_null.MAD_SMALL_SAMPLE, {})):
            rng = np.random.default_rng([n, 20])
            with mock.patch.object(_null, "MAD_SMALL_SAMPLE", factors):
                for _ in range(reps):
                    level[j] += _rejections(package_log_p(rng.chisquare(20.0, n))).any()
        rows.append((n, reps, level))
    return rows


def _share(hits, total):
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = proportion_confint(hits, total, method="wilson")
    return f"{hits / total:.3f} [{lo:.3f}, {hi:.3f}]"


def _power(power):
    return " | ".join(f"{power[i, 0]:.2f} / {power[i, 1]:.2f}" for i in range(len(SCALES)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2000)
    parser.add_argument("--fits", type=int, default=200)
    parser.add_argument("--parts", default="ABCD", help="which parts to run (default ABCD)")
    args = parser.parse_args(argv)
    print(f"clairstat {clairstat.__version__}; BH at {LEVEL}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    scales = " | ".join(f"flagged, x{c:g}: previous / package" for c in SCALES)
    if "A" in args.parts:
        _print_a(args, scales)
    if "B" in args.parts:
        _print_b(args, scales)
    if "C" in args.parts:
        print("\nPart C: T_k = chi^2_d chi^2_d i.i.d. (a rank-1 product); share of "
              "replicates with any rejection [Wilson 95%]\n")
        print("| d | clients | replicates | product: any rejection, previous | "
              "product: any rejection, package |")
        print("|---|---|---|---|---|")
        for d, n, reps, level in part_c(max(args.reps // 4, 1)):
            print(f"| {d} | {n} | {reps} | {_share(level[0], reps)} | "
                  f"{_share(level[1], reps)} |")
    if "D" in args.parts:
        print("\nPart D: T_k i.i.d. chi^2_20, few clients; share of replicates with any "
              "rejection [Wilson 95%]\n")
        print("| clients | replicates | few clients: package | few clients: without the "
              "small-sample factor |")
        print("|---|---|---|---|")
        for n, reps, level in part_d(2 * args.reps):
            print(f"| {n} | {reps} | {_share(level[0], reps)} | {_share(level[1], reps)} |")


def _print_a(args, scales):
    print("\nPart A: T_k i.i.d. chi^2_nu (previous null: df_theory = 256); share of "
          "replicates with any rejection [Wilson 95%]; one client in eight times c: "
          "share of them flagged\n")
    print(f"| clients | nu | replicates | any rejection, previous | any rejection, package "
          f"| {scales} |")
    print("|---|---|---|---|---|" + "---|" * len(SCALES))
    for n, nu, reps, level, power in part_a(args.reps):
        print(f"| {n} | {nu:g} | {reps} | {_share(level[0], reps)} | "
              f"{_share(level[1], reps)} | {_power(power)} |")


def _print_b(args, scales):
    print("\nPart B: one synthetic module (d = 64, rank 4), clair_modules(joint=False): "
          "share of all-benign fits with any flag [Wilson 95%]; one client in eight with "
          "its noise or update times sqrt(c): share of them flagged\n")
    print(f"| noise | clients | fits | any flag, previous | any flag, package | {scales} |")
    print("|---|---|---|---|---|" + "---|" * len(SCALES))
    for kind, n_clients, fits, level, power in part_b(args.fits):
        print(f"| {kind} | {n_clients} | {fits} | {_share(level[0], fits)} | "
              f"{_share(level[1], fits)} | {_power(power)} |")


if __name__ == "__main__":
    main()

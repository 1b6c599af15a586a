"""How often the refit-and-test loop cycles, and what a cycle costs in flags.

The detection refits the collaborative mean and subspace on the kept clients and tests
every client again until the kept set repeats (``clairstat._inference``). When the sets
cycle instead, the collaborative set becomes every client some set of the cycle kept,
fitted once, ``detection_converged_`` is ``False`` and a warning names the clients the
final test disagrees with. This script counts those fits and compares their flags with
the converged fits' on the same cells:

* **LoRA modules**: one synthetic module (d = 64, rank 4) per fit through
  :func:`clairstat.aggregation.clair_modules` (``joint=False``), the two kinds of
  ``benchmarks/lora_null_calibration.py`` part B (``shared-A``: one A, noisy B;
  ``independent``: both factors i.i.d. Gaussian), 8, 16 and 50 clients, with no
  attacker and with one client in eight whose noise or update is scaled by 2
  (statistic about 4 times a benign one's).
* **Regression estimates**: :func:`clairstat.datasets.make_low_rank_block_sparse`
  (p = 30, q = 8, rank 3, noise 0.5), 20 and 40 clients: none contaminated, or a fifth
  of them at separation 5 or 10 (the noise off the subspace has norm about
  0.5 sqrt(27 x 8) = 7.3), through
  :class:`clairstat.CLAIREstimator` with its defaults.

Per cell: the share of fits that did not converge [Wilson 95%], the mean number of
rounds, and, split by convergence, the share of benign clients flagged and the share of
attackers flagged. Seeds are the replicate number per cell.

    python benchmarks/detection_cycles.py [--fits 200]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from statsmodels.stats.proportion import proportion_confint

import clairstat
from clairstat.aggregation import clair_modules
from clairstat.datasets import make_low_rank_block_sparse
from lora_null_calibration import _factors as lora_factors  # its module, attackers first


def lora_fit(kind, n_clients, n_bad, seed):
    factors = lora_factors(kind, n_clients, np.random.default_rng([n_clients, seed]),
                           n_bad, 4.0)
    fit = clair_modules({"m": factors}, None, joint=False, random_state=seed)
    est = fit.estimators["m"]
    bad = np.arange(n_clients) < n_bad
    return est.detection_converged_, est.n_detection_rounds_, fit.module_flagged["m"], bad


def regression_fit(n_clients, separation, seed):
    n_bad = 0 if separation is None else n_clients // 5
    data = make_low_rank_block_sparse(n_clients, 30, 8, 3, n_bad, noise_level=0.5,
                                      separation=separation, random_state=seed)
    est = clairstat.CLAIREstimator(random_state=seed).fit(data.local_estimates)
    return (est.detection_converged_, est.n_detection_rounds_,
            np.asarray(est.contaminated_, dtype=bool), np.asarray(data.contaminated))


def _share(hits, total):
    if total == 0:
        return "-"
    lo, hi = proportion_confint(hits, total, method="wilson")
    return f"{hits / total:.3f} [{lo:.3f}, {hi:.3f}]"


def _rate(hits, total):
    return f"{hits / total:.3f} ({hits}/{total})" if total else "-"


def run_cell(fit, fits):
    """Over ``fits`` seeds: the number of fits that did not converge, the rounds, and per
    convergence state the counts (benign flagged, benign, attackers flagged, attackers)."""
    counts = {True: np.zeros(4, dtype=int), False: np.zeros(4, dtype=int)}
    rounds, not_converged = [], 0
    for seed in range(fits):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the cycle's and small-K warnings
            converged, n_rounds, flagged, bad = fit(seed)
        rounds.append(n_rounds)
        not_converged += not converged
        counts[bool(converged)] += [int((flagged & ~bad).sum()), int((~bad).sum()),
                                    int((flagged & bad).sum()), int(bad.sum())]
    return not_converged, counts, np.array(rounds)


def cells():
    """(path, label, attackers per fit, fit(seed)) for every cell of the table."""
    out = []
    for kind in ("shared-A", "independent"):
        for n_clients in (8, 16, 50):
            for n_bad in (0, max(1, n_clients // 8)):
                out.append(("LoRA module", f"{kind}, K = {n_clients}", n_bad,
                            lambda s, k=kind, n=n_clients, b=n_bad: lora_fit(k, n, b, s)))
    for n_clients in (20, 40):
        # separation None: no client contaminated
        for separation in (None, 5.0, 10.0):
            label = f"K = {n_clients}" + ("" if separation is None
                                          else f", separation {separation:g}")
            out.append(("regression", label, 0 if separation is None else n_clients // 5,
                        lambda s, n=n_clients, sep=separation:
                        regression_fit(n, sep, s)))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fits", type=int, default=200)
    args = parser.parse_args(argv)
    start = time.time()
    print(f"clairstat {clairstat.__version__}, {args.fits} fits per cell\n")
    print("| path | cell | attackers | not converged [95%] | rounds (mean, max) | benign "
          "flagged: converged / not | attackers flagged: converged / not |")
    print("|---|---|---|---|---|---|---|")
    for path, label, n_bad, fit in cells():
        not_converged, counts, rounds = run_cell(fit, args.fits)
        conv, cyc = counts[True], counts[False]
        print(f"| {path} | {label} | {n_bad} | {_share(not_converged, args.fits)} | "
              f"{rounds.mean():.2f}, {rounds.max()} | {_rate(conv[0], conv[1])} / "
              f"{_rate(cyc[0], cyc[1])} | {_rate(conv[2], conv[3])} / "
              f"{_rate(cyc[2], cyc[3])} |", flush=True)
    print(f"\nWall time {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()

"""A measured alternative for the default path (no covariance): whiten by a Kronecker
covariance estimated from the other clients and take the null by Monte Carlo.

The default path of :class:`clairstat.CLAIREstimator` tests the plain statistic
``||(I - P)(X_k - mean_(-k))||_F^2`` because whitening by a covariance estimated from
the clients, referred to a chi^2 null, flagged most real-data null splits
(docs/method_notes.md, section 8). This script measures the principled repair of that
attempt, on the real-data splits of ``benchmarks/real_data_calibration.py`` (same
datasets, splits and corruptions), with the true rank of those splits (0: every client
samples one population):

* statistic: ``T_k = vec(D_k)^T (C_(-k) (x) R_(-k))^-1 vec(D_k) / (1 + 1/m)`` with
  ``D_k = X_k - mean_(-k)`` and ``(R_(-k), C_(-k))`` the matrix-normal maximum-likelihood
  (flip-flop) fit to the other m members' deviations from their mean;
* null: the flip-flop estimate is affine-equivariant (``X -> A X B^T`` maps it to
  ``A R A^T``, ``B C B^T``), so under i.i.d. matrix-normal clients ``T_k`` has the same
  law whatever the true ``(R, C)``: it is simulated once per (m, p, q) with identity
  covariances (3 000 draws; p-value ``(1 + #{draws >= T}) / 3 001``);
* detection: BH at 5% over the clients, started from the half of the clients nearest
  the entrywise median (in MAD units), the members re-fitted on the unflagged clients
  until the set repeats (``--rounds 1``: the first round only);
* subspace: ``--rank true`` tests the whole estimates (the splits' true rank, 0);
  ``--rank package`` first fits the default :class:`clairstat.CLAIREstimator` and tests
  the estimates' coordinates in the complement of its ``subspace_`` (its rank rule,
  which keeps noise directions on these data).

It prints, per dataset, the share of null splits with any flag and the share of the
corrupted clients flagged per corruption, with Wilson 95% intervals.

``--plug-in all|half`` measures the naive alternative instead: the same flip-flop
covariance, fitted to every client's deviation from the entrywise median (``all``) or to
the robust half-set's deviations from its mean (``half``), passed to the package's
``noise_cov`` path as if it were known (its calibration, scale and widening as for a
given covariance).

    python benchmarks/default_null_alternatives.py --splits 40 [--rounds 10] [--rank package]
    python benchmarks/default_null_alternatives.py --splits 40 --plug-in all|half
"""

from __future__ import annotations

import argparse
import functools
import os
import warnings

import numpy as np

import real_data_calibration as real

KINDS = ("none", "scale", "flip", "replace")


def flip_flop(deviations, n_sweeps=50):
    """Matrix-normal maximum likelihood ``(R, C)`` (tr R = p) of ``deviations`` (n, p, q)."""
    n, p, q = deviations.shape
    row, col = np.eye(p), np.eye(q)
    for _ in range(n_sweeps):
        row = np.einsum("nij,jk,nlk->il", deviations, np.linalg.pinv(col), deviations) / (n * q)
        col = np.einsum("nji,jk,nkl->il", deviations, np.linalg.pinv(row), deviations) / (n * p)
        scale = np.trace(row) / p
        row, col = row / scale, col * scale
    return row, col


def statistic(estimates, k, others):
    """Client k's whitened distance to the mean of ``others`` (indices), and m."""
    mean = estimates[others].mean(axis=0)
    row, col = flip_flop(estimates[others] - mean)
    dev = estimates[k] - mean
    value = np.einsum("ij,jk,lk,il->", np.linalg.pinv(row), dev, np.linalg.pinv(col), dev)
    return value / (1.0 + 1.0 / len(others))


@functools.lru_cache(maxsize=None)
def null_draws(m, p, q, n_draws=3000):
    """Sorted draws of the statistic under i.i.d. standard matrix-normal clients."""
    rng = np.random.default_rng([m, p, q])
    others = np.arange(1, m + 1)
    return np.sort([statistic(rng.standard_normal((m + 1, p, q)), 0, others)
                    for _ in range(n_draws)])


def p_values(estimates, members):
    out = np.empty(len(estimates))
    for k in range(len(estimates)):
        others = np.flatnonzero(members & (np.arange(len(estimates)) != k))
        draws = null_draws(len(others), *estimates.shape[1:])
        value = statistic(estimates, k, others)
        out[k] = (1 + np.sum(draws >= value)) / (1 + len(draws))
    return out


def _robust_start(estimates):
    """The half of the clients (plus one) closest to the entrywise median, in units of
    each entry's median absolute deviation: attackers (fewer than half) outside it do
    not enter the first covariance (two clients flipped alike would otherwise inflate
    it along their common deviation and mask each other)."""
    centre = np.median(estimates, axis=0)
    spread = np.median(np.abs(estimates - centre), axis=0)
    spread = np.where(spread > 0, spread, 1.0)
    distance = np.sum(((estimates - centre) / spread) ** 2, axis=(1, 2))
    members = np.zeros(len(estimates), dtype=bool)
    members[np.argsort(distance)[:len(estimates) // 2 + 1]] = True
    return members


def detect(estimates, rounds, level=0.05):
    from statsmodels.stats.multitest import multipletests

    members, seen = _robust_start(estimates), set()
    for _ in range(rounds):
        flagged = multipletests(p_values(estimates, members), level, "fdr_bh")[0]
        if (~flagged).tobytes() in seen or (~flagged).sum() < 3:
            break
        seen.add((~flagged).tobytes())
        members = ~flagged
    return flagged


def _complement_coordinates(estimates, n_samples, seed):
    """The estimates in an orthonormal basis of the complement of the default fit's
    subspace, and the fitted rank."""
    from clairstat import CLAIREstimator
    from clairstat._null import complement_basis

    fit = CLAIREstimator(random_state=seed).fit(estimates, sample_weight=n_samples)
    basis = complement_basis(fit.subspace_) if fit.rank_ else np.eye(estimates.shape[1])
    return np.einsum("pi,kpq->kiq", basis, estimates), fit.rank_


def plug_in_flags(estimates, n_samples, seed, where):
    """The package's flags with ``noise_cov`` the flip-flop fit of the clients' own
    deviations (``where``: "all" from the entrywise median, "half" from the robust
    half-set's mean), taken as known."""
    from clairstat import CLAIREstimator

    if where == "all":
        deviations = estimates - np.median(estimates, axis=0)
    else:
        half = _robust_start(estimates)
        deviations = estimates[half] - estimates[half].mean(axis=0)
    row, col = flip_flop(deviations)
    fit = CLAIREstimator(random_state=seed).fit(estimates, sample_weight=n_samples,
                                                noise_cov=(row, col))
    return fit.contaminated_


def run(n_splits, rounds, rank="true", plug_in=None):
    from statsmodels.stats.proportion import proportion_confint

    from clairstat import local_ols

    print("| dataset | rank | null splits with a flag [95% CI] | power: scale | flip | "
          "replace |")
    print("|---|---|---|---|---|---|")
    for name, features, outputs, frame, n_clients in real._datasets():
        counts, ranks = {kind: [0, 0] for kind in KINDS}, []
        for kind in KINDS:
            n_victims = 0 if kind == "none" else 2
            for split in range(n_splits):  # the seeds of real_data_calibration.run_one
                rng = np.random.default_rng([split, len(name), n_victims, KINDS.index(kind)])
                designs, responses = real.split_clients(frame, features, outputs, n_clients, rng)
                victims = rng.choice(n_clients, size=n_victims, replace=False)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    ols = local_ols(designs, responses)
                    estimates = real.corrupt(ols.estimates, kind, victims)
                    estimates = estimates / np.abs(estimates).max()
                    if rank == "package":
                        estimates, fitted = _complement_coordinates(estimates,
                                                                    ols.n_samples, split)
                        ranks.append(fitted)
                flagged = (detect(estimates, rounds) if plug_in is None else
                           plug_in_flags(estimates, ols.n_samples, split, plug_in))
                if kind == "none":
                    counts[kind][0] += int(flagged.any())
                    counts[kind][1] += 1
                else:
                    counts[kind][0] += int(flagged[victims].sum())
                    counts[kind][1] += n_victims
        cells = []
        for kind in KINDS:
            hits, total = counts[kind]
            lo, hi = proportion_confint(hits, total, method="wilson")
            cells.append(f"{hits / total:.2f} [{lo:.2f}, {hi:.2f}]")
        shown = (f"{np.mean(ranks):.2f} (mean)" if ranks else
                 "0 (true)" if plug_in is None else f"package (plug-in {plug_in})")
        print(f"| {name} | {shown} | " + " | ".join(cells) + " |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--splits", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=10,
                        help="detection rounds (1: the first round only)")
    parser.add_argument("--rank", choices=["true", "package"], default="true",
                        help="test the whole estimates (true rank 0) or their complement "
                             "of the default fit's subspace")
    parser.add_argument("--plug-in", choices=["all", "half"], default=None,
                        help="the package's noise_cov path with the flip-flop covariance "
                             "of the clients' own deviations taken as known")
    args = parser.parse_args(argv)
    run(args.splits, args.rounds, args.rank, args.plug_in)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

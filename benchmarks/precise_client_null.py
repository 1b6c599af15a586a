"""The per-client tests' level for a client far more precise than the others.

Simulated regressions, nothing corrupted: ``--members`` clients with 30 to 50 samples,
p coefficients and q outputs, benign clients ``Theta_0 + U w_k`` with a shared subspace
of rank ``--rank`` (``w_k`` standard normal), homoscedastic Gaussian errors, fitted with
``local_ols`` and ``CLAIREstimator().fit(ols)`` (the ``noise_cov`` path). Measured:

- new clients with ``--big`` samples, each tested with its own covariance
  (``score_samples(new_ols)``) against the fit on the small clients: the share with
  p < 0.05 and p < 0.01;
- the first of them as a training client in place of one small client: the share of
  fits in which its raw p-value is below 0.05 and 0.01.

A test at its level gives about 0.05 and 0.01. A precise client's own noise is small, so
what else moves its residual, the error of the subspace the others estimate, shows in
its statistic. One replicate per seed (``--seeds``), every row printed with the
package version.

    python benchmarks/precise_client_null.py --big 40 2000 --seeds 300
"""

from __future__ import annotations

import argparse
import os
import warnings

import numpy as np


def replicate(seed, n_members, p, q, rank, big, n_new=4):
    from clairstat import CLAIREstimator, local_ols

    rng = np.random.default_rng(seed)
    theta0 = rng.standard_normal((p, q))
    basis = rng.standard_normal((p, rank))

    def client(n):
        design = np.c_[np.ones(n), rng.standard_normal((n, p - 1))]
        theta = theta0 + basis @ rng.standard_normal((rank, q))
        return design, design @ theta + rng.standard_normal((n, q))

    small = [client(int(rng.integers(30, 51))) for _ in range(n_members)]
    new = [client(big) for _ in range(n_new)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        # New precise clients against a fit on the small ones ...
        est = CLAIREstimator(random_state=seed).fit(local_ols(*zip(*small)))
        new_p = np.exp(est.score_samples(local_ols(*zip(*new))))
        # ... and the first of them as a training client in place of a small one.
        with_big = CLAIREstimator(random_state=seed).fit(
            local_ols(*zip(*(small[1:] + new[:1]))))
    return new_p, with_big.p_values_[-1], est.rank_


def main(argv=None):
    import clairstat

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=12)
    parser.add_argument("--p", type=int, default=6)
    parser.add_argument("--q", type=int, default=2)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--big", type=int, nargs="+", default=[40, 2000])
    parser.add_argument("--seeds", type=int, default=300)
    args = parser.parse_args(argv)
    print(f"clairstat {clairstat.__version__}; members {args.members}, p {args.p}, "
          f"q {args.q}, true rank {args.rank}, seeds 0-{args.seeds - 1}")
    print("| samples of the precise client | new clients | p < 0.05 | p < 0.01 | "
          "training client p < 0.05 | p < 0.01 | fitted rank (mean) |")
    print("|---|---|---|---|---|---|---|")
    for big in args.big:
        new_p, train_p, ranks = [], [], []
        for seed in range(args.seeds):
            a, b, r = replicate(seed, args.members, args.p, args.q, args.rank, big)
            new_p.append(a)
            train_p.append(b)
            ranks.append(r)
        new_p, train_p = np.concatenate(new_p), np.array(train_p)
        print(f"| {big} | {len(new_p)} | {np.mean(new_p < 0.05):.3f} | "
              f"{np.mean(new_p < 0.01):.3f} | {np.mean(train_p < 0.05):.3f} | "
              f"{np.mean(train_p < 0.01):.3f} | {np.mean(ranks):.2f} |")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

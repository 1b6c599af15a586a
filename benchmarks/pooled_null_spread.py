"""Pooling the relative spread of the LoRA predictive null across modules of one shape.

A variant measured and not adopted (benchmarks/RESULTS.md, section "Pooling the LoRA
null's spread across modules"). Compares, on the same draws,

* package: clairstat._null.predictive_null per module (center = median, spread = MAD of
  the other clients' cube roots in that module, t on MAD_EFFICIENCY * m df);
* pooled:  center from the others' median in the module (as now), spread = center *
  pooled CV, the CV a MAD of the relative residuals pooled over the M modules of one
  shape (client k left out in every module), t on MAD_EFFICIENCY * M * (m - 1) df.

Part A : T[j, i] = s_j * chi^2_nu i.i.d., s_j log-uniform over a factor 10, one nu.
Part A': the same, half the modules nu = 20, half nu = 128, pooled as one shape.

Usage: python benchmarks/pooled_null_spread.py [--reps 2000] [--parts AP]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

from clairstat._null import MAD_EFFICIENCY, MIN_OTHERS, predictive_null

LEVEL = 0.05
SCALES = (2.0, 4.0)
MAD_NORMAL = 1.4826


# ---------------------------------------------------------------------------------------
# The pooled variant
# ---------------------------------------------------------------------------------------
_CONSISTENCY = {}


def pooled_consistency(m, n_samples=400_000):
    """Factor making 1.4826 * median(|x_i - median(x)|), pooled over many Gaussian
    samples of size m, consistent for sigma. The residuals from a sample median are
    smaller than from the true center (for odd m one of them is exactly 0), which
    a per-module MAD on a t with ~2.6 df can ignore but a pooled one on ~20-170 df
    cannot. Computed once per m by Monte Carlo (fixed seed) under normality, which
    the cube roots approximate (Wilson-Hilferty)."""
    if m not in _CONSISTENCY:
        x = np.random.default_rng(20261203 + m).standard_normal((n_samples, m))
        res = np.abs(x - np.median(x, axis=1, keepdims=True))
        _CONSISTENCY[m] = 1.0 / (MAD_NORMAL * float(np.median(res)))
    return _CONSISTENCY[m]


def pooled_log_p(statistics, relative=None, floor=0.0):
    """Log p-values (M, K) of K clients in M modules of one shape, the relative spread
    (CV) of the cube roots pooled over the modules; every client calibrates.

    Degrees of freedom: a MAD of n independent normal values estimates sigma about as
    well as a chi^2 scale on MAD_EFFICIENCY * n df (the package's own rule). Client k's
    pooled CV is a MAD of M * m relative residuals of which M (one per module, the
    module's median) carry no information on the spread, so n = M * (m - 1). The
    centre's own error is carried, as in the package, by sqrt(1 + pi / (2 m)) on the
    spread (it is per module and is not pooled). The df are checked against the
    simulated spread of the pooled CV (``effective_df`` below).
    """
    stat = np.asarray(statistics, dtype=float)
    M, K = stat.shape
    y = np.cbrt(stat if relative is None else stat / relative)
    m = K - 1
    out = np.zeros((M, K))
    if m < MIN_OTHERS:
        return out, np.zeros(K)
    others = np.array([np.delete(np.arange(K), k) for k in range(K)])   # (K, m)
    yo = y[:, others]                                                    # (M, K, m)
    center = np.median(yo, axis=2)                                       # (M, K)
    rel = np.abs(yo - center[..., None]) / center[..., None]
    cv = pooled_consistency(m) * MAD_NORMAL * np.median(rel.transpose(1, 0, 2).reshape(K, -1), axis=1)
    spread = np.maximum(center * cv * np.sqrt(1.0 + np.pi / (2.0 * m)), np.cbrt(floor))
    df = MAD_EFFICIENCY * M * (m - 1)
    ok = spread > 0
    out[ok] = stats.t.logsf((y[ok] - center[ok]) / spread[ok], df)
    return out, cv


# --- v2: the ratio to the centre referred to its own distribution ----------------------
_MEDIAN_GRID = {}
_POOLED_DF = {}


def median_grid(m, n=161):
    """Nodes and log-weights of the median of m standard normals (odd m: order
    statistic density m!/(h!h!) Phi^h (1-Phi)^h phi, h = (m-1)/2; even m: by MC)."""
    if m not in _MEDIAN_GRID:
        sd = np.sqrt(np.pi / (2 * m))
        x = np.linspace(-6 * sd, 6 * sd, n)
        if m % 2:
            h = (m - 1) // 2
            logf = (stats.norm.logcdf(x) + stats.norm.logsf(x)) * h + stats.norm.logpdf(x)
        else:
            med = np.median(np.random.default_rng(m).standard_normal((400_000, m)), axis=1)
            logf = stats.gaussian_kde(med[:50_000])(x); logf = np.log(logf)
        w = logf - np.logaddexp.reduce(logf)
        _MEDIAN_GRID[m] = (x, w)
    return _MEDIAN_GRID[m]


def pooled_df(m, M, n_blocks=20_000):
    """Degrees of freedom of the pooled CV: 1 / (2 relvar) of the pooled, corrected MAD
    of M Gaussian samples of size m (Monte Carlo once per (m, M), fixed seed). The
    v1 rule MAD_EFFICIENCY * M * (m - 1) overstated them by 7-28 % (simulated)."""
    if (m, M) not in _POOLED_DF:
        x = np.random.default_rng(7 * m + M).standard_normal((n_blocks, M, m))
        res = np.abs(x - np.median(x, axis=2, keepdims=True)).reshape(n_blocks, -1)
        s = np.median(res, axis=1)
        _POOLED_DF[(m, M)] = 1.0 / (2.0 * s.var() / s.mean() ** 2)
    return _POOLED_DF[(m, M)]


def pooled_log_p_ratio(statistics, relative=None, floor=0.0):
    """As :func:`pooled_log_p` (same pooled CV), but the spread is c_k * cv, so the
    centre's error also scales the denominator: (y - c)/(c cv) has a heavier right tail
    than a t (v1 was liberal, 0.065 per module at nu = 20, M = 32, K = 8 even with the
    true CV). Under y = mu (1 + cv e), c = mu (1 + cv med_m(e)), exactly
    P(y/c > r) = E_med[ P(e > (r (1 + cv med) - 1) / cv) ]; integrated over the median's
    density on a grid, e's tail a t on the pooled CV's simulated df (pooled_df)."""
    stat = np.asarray(statistics, dtype=float)
    M, K = stat.shape
    m = K - 1
    out = np.zeros((M, K))
    if m < MIN_OTHERS:
        return out, np.zeros(K)
    y = np.cbrt(stat if relative is None else stat / relative)
    others = np.array([np.delete(np.arange(K), k) for k in range(K)])
    yo = y[:, others]
    center = np.median(yo, axis=2)
    rel = np.abs(yo - center[..., None]) / center[..., None]
    cv = pooled_consistency(m) * MAD_NORMAL * np.median(rel.transpose(1, 0, 2).reshape(K, -1), axis=1)
    cv = np.maximum(cv, 1e-12)
    x, logw = median_grid(m)
    r = (y / center)[..., None]                                  # (M, K, 1)
    e = (r * (1.0 + cv[None, :, None] * x) - 1.0) / cv[None, :, None]
    out = np.logaddexp.reduce(stats.t.logsf(e, pooled_df(m, M)) + logw, axis=2)
    return np.minimum(out, 0.0), cv


# ---------------------------------------------------------------------------------------
def package_log_p(stat):
    """The package's predictive null, module by module (rows of stat)."""
    M, K = stat.shape
    everyone = np.ones(K, dtype=bool)
    return np.array([predictive_null(row, np.ones(K), everyone, 0.0)[0].log_sf(row)
                     for row in stat])


def bh(log_p):
    """Benjamini-Hochberg at LEVEL within each row of (M, K) log p-values."""
    p = np.exp(log_p)
    M, K = p.shape
    order = np.argsort(p, axis=1)
    ps = np.take_along_axis(p, order, axis=1)
    below = ps <= LEVEL * np.arange(1, K + 1) / K
    n_rej = np.where(below.any(axis=1), K - np.argmax(below[:, ::-1], axis=1), 0)
    rej = np.zeros_like(p, dtype=bool)
    ranks = np.argsort(order, axis=1)
    rej[:] = ranks < n_rej[:, None]
    return rej


def _check_bh():
    from statsmodels.stats.multitest import multipletests
    rng = np.random.default_rng(0)
    for _ in range(500):
        p = rng.uniform(0, 0.1, (3, 8)) ** rng.uniform(0.5, 3)
        ours = bh(np.log(p))
        ref = np.array([multipletests(row, LEVEL, "fdr_bh")[0] for row in p])
        assert (ours == ref).all()


def wilson(hits, n):
    lo, hi = proportion_confint(hits, n, method="wilson")
    return f"{hits / n:.3f} [{lo:.3f}, {hi:.3f}]"


def wilson_clustered(per_rep_share, n_modules):
    """Mean of the per-module indicator over replicates and modules; Wilson interval on
    the effective number of module-tests (reps * M / design effect, the design effect
    from the between-replicate variance: the pooled variant's modules share one CV)."""
    reps = len(per_rep_share)
    mean = per_rep_share.mean()
    var_iid = mean * (1 - mean) / (reps * n_modules)
    var_obs = per_rep_share.var(ddof=1) / reps
    deff = max(var_obs / var_iid, 1.0) if var_iid > 0 else 1.0
    n_eff = reps * n_modules / deff
    lo, hi = proportion_confint(mean * n_eff, n_eff, method="wilson")
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]", deff


NULLS = ("pkg", "v1", "v2")


def run_cell(M, K, nus, reps, offset, attack_modules):
    """nus: array (M,) of each module's nu. The three nulls on the same draws."""
    nus = np.asarray(nus, dtype=float)
    groups = {f"nu={g:g}": nus == g for g in np.unique(nus)}
    lvl = {name: {g: np.zeros(reps) for g in groups} for name in NULLS}
    any_all = dict.fromkeys(NULLS, 0)
    power = {(name, j, c): 0 for name in NULLS for j in attack_modules for c in SCALES}
    cvs = np.zeros(reps)
    for r in range(reps):
        rng = np.random.default_rng(r + offset)
        s = 10.0 ** rng.uniform(0.0, 1.0, M)
        stat = s[:, None] * rng.chisquare(nus[:, None], (M, K))
        lp1, cv = pooled_log_p(stat)
        cvs[r] = cv[0]
        rej = {"pkg": bh(package_log_p(stat)), "v1": bh(lp1),
               "v2": bh(pooled_log_p_ratio(stat)[0])}
        for name in NULLS:
            any_row = rej[name].any(axis=1)
            for g, mask in groups.items():
                lvl[name][g][r] = any_row[mask].mean()
            any_all[name] += any_row.any()
        for c in SCALES:
            hit = stat.copy()
            hit[attack_modules, 0] *= c          # client 0, in each attacked module
            rh = {"pkg": bh(package_log_p(hit[attack_modules])),
                  "v1": bh(pooled_log_p(hit)[0])[attack_modules],
                  "v2": bh(pooled_log_p_ratio(hit)[0])[attack_modules]}
            for name in NULLS:
                for i, j in enumerate(attack_modules):
                    power[(name, j, c)] += rh[name][i, 0]
    rel_var = cvs.var(ddof=1) / cvs.mean() ** 2
    return dict(groups=groups, lvl=lvl, any_all=any_all, reps=reps, power=power,
                eff_df=1.0 / (2.0 * rel_var), df_used=MAD_EFFICIENCY * M * (K - 2),
                df_v2=pooled_df(K - 1, M), cv_mean=cvs.mean())


def _pw(res, j, reps):
    return " | ".join(" / ".join(f"{res['power'][(n, j, c)] / reps:.2f}" for n in NULLS)
                      for c in SCALES)


def part_a(reps):
    print("\n### Part A: T = s_j chi^2_nu, s_j log-uniform over x10, one nu per cell\n")
    print("| M | K | nu | per-module level: package | v1 pooled | v2 pooled-ratio "
          "| any of M: package | v1 | v2 | x2 flagged pkg / v1 / v2 "
          "| x4 flagged pkg / v1 / v2 | df v1 / v2 / simulated (CV) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    cell = 0
    for M in (8, 32):
        for K in (8, 16):
            for nu in (20.0, 128.0):
                cell += 1
                t0 = time.time()
                res = run_cell(M, K, np.full(M, nu), reps, cell * 1_000_000, [0])
                g = f"nu={nu:g}"
                lv = [wilson_clustered(res["lvl"][n][g], M) for n in NULLS]
                print(f"| {M} | {K} | {nu:g} | " + " | ".join(v[0] for v in lv) + " | "
                      + " | ".join(wilson(res['any_all'][n], reps) for n in NULLS)
                      + f" | {_pw(res, 0, reps)} | {res['df_used']:.1f} / "
                      f"{res['df_v2']:.1f} / {res['eff_df']:.1f} |", flush=True)
                print(f"<!-- cell {cell}: {time.time() - t0:.0f}s, deff "
                      + ", ".join(f"{n} {v[1]:.2f}" for n, v in zip(NULLS, lv))
                      + f", mean pooled CV {res['cv_mean']:.4f} (sd/mean of cbrt chi2_nu "
                      f"~ {np.sqrt(2 / (9 * nu)) / (1 - 2 / (9 * nu)):.4f}) -->", flush=True)


def part_a_prime(reps):
    print("\n### Part A': half the modules nu = 20, half nu = 128, pooled as one shape\n")
    print("| M | K | half | per-module level: package | v1 pooled | v2 pooled-ratio "
          "| x2 flagged pkg / v1 / v2 | x4 flagged pkg / v1 / v2 |")
    print("|---|---|---|---|---|---|---|---|")
    cell = 100
    for M in (8, 32):
        for K in (8, 16):
            cell += 1
            t0 = time.time()
            nus = np.where(np.arange(M) < M // 2, 20.0, 128.0)
            attack = [0, M // 2]                  # one nu = 20 module, one nu = 128
            res = run_cell(M, K, nus, reps, cell * 1_000_000, attack)
            for g, j in (("nu=20", 0), ("nu=128", M // 2)):
                lv = [wilson_clustered(res["lvl"][n][g], M // 2)[0] for n in NULLS]
                print(f"| {M} | {K} | {g} | " + " | ".join(lv) + f" | {_pw(res, j, reps)} |",
                      flush=True)
            print(f"| {M} | {K} | any of M | " + " | ".join(
                wilson(res['any_all'][n], reps) for n in NULLS) + " | | |", flush=True)
            print(f"<!-- cell {cell}: {time.time() - t0:.0f}s, mean pooled CV "
                  f"{res['cv_mean']:.4f} -->", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--parts", default="AP")
    args = ap.parse_args()
    _check_bh()
    print(f"BH at {LEVEL}; reps {args.reps}; consistency factors "
          + ", ".join(f"m={m}: {pooled_consistency(m):.4f}" for m in (7, 15)))
    t0 = time.time()
    if "A" in args.parts:
        part_a(args.reps)
    if "P" in args.parts:
        part_a_prime(args.reps)
    print(f"\nwall {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()

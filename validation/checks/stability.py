"""Claim 2, stable recovery: power-law exponents of the subspace error (``stability``)."""

from __future__ import annotations

from .._core import Check, ols_slope, overlaps, verdict

# First-order perturbation theory gives the exponents exactly; higher-order terms bend a
# finite-range log-log fit by a few percent, so an exponent counts as confirmed when its
# 95% interval meets [expected - 0.1, expected + 0.1] (a 10%-of-one-decade band).
BAND = 0.1
REGIME = ["p", "q"]  # per-regime intercepts; within a sweep these fix the regime


def _exponent(df, sweep, x, expected, what):
    rows = df[df["sweep"] == sweep]
    slope, interval = ols_slope(rows, x, "subspace_error", by=REGIME)
    per_regime = []
    for (p, q), group in rows.groupby(REGIME):
        per_regime.append(f"(p={p}, q={q}): {ols_slope(group, x, 'subspace_error')[0]:.2f}")
    return dict(statistic=f"log-log slope of ||P_hat - P*||_F on {what}, per-regime "
                          "intercepts (OLS 95%)",
                expected=expected, observed=slope, interval=interval,
                verdict=verdict(overlaps(interval, expected - BAND, expected + BAND)),
                detail=f"{len(rows)} replicates; per regime " + ", ".join(per_regime) + ".")


def noise_exponent(df):
    """Error against the noise level sigma: slope 1."""
    return _exponent(df, "sigma", "sigma", 1.0, "sigma")


def clients_exponent(df):
    """Error against the number of clients K: slope -1/2."""
    return _exponent(df, "K", "n_clients", -0.5, "K")


def samples_exponent(df):
    """Error against the effective sample size n - p - 1: slope -1/2."""
    return _exponent(df, "n", "effective_n", -0.5, "n - p - 1")


CHECKS = [
    Check("stability_noise_exponent", "stability",
          "||P_hat - P*||_F grows linearly in the noise level (log-log slope 1).",
          noise_exponent),
    Check("stability_clients_exponent", "stability",
          "For fixed p, q, ||P_hat - P*||_F falls like K^{-1/2}.", clients_exponent),
    Check("stability_samples_exponent", "stability",
          "For fixed p, q, ||P_hat - P*||_F falls like n^{-1/2} (effective n - p - 1, the "
          "OLS noise variance's denominator).", samples_exponent),
]

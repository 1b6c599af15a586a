"""Claim 1, exact recovery: checks on the ``recovery`` table."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .._core import Check, ols_slope, verdict, wilson

# "gamma and r small enough": the corner of the grid both the theory and every
# outlier-pursuit experiment put inside the recovery region.
SMALL_GAMMA, SMALL_RANK_FRACTION = 0.2, 0.2
# Success must be the rule there, not just likely: at most one replicate in twenty may
# miss (a solver stopping a little early near a degenerate instance).
MIN_RATE = 0.95


def _default_lam(df):
    """The phase-diagram rows (default block weight), not the fixed-lam side sweep."""
    return df[df["lam_setting"] == "auto"]


def small_corner(df):
    """Success rate where gamma <= 0.2 and r/p <= 0.2 (claim: recovery is exact)."""
    df = _default_lam(df)
    corner = df[(df["gamma"] <= SMALL_GAMMA) & (df["rank"] / df["p"] <= SMALL_RANK_FRACTION)]
    rate, interval = wilson(corner["success"].sum(), len(corner))
    return dict(statistic=f"P(success) for gamma <= {SMALL_GAMMA}, r/p <= "
                          f"{SMALL_RANK_FRACTION} (Wilson 95%)",
                expected=f">= {MIN_RATE}", observed=rate, interval=interval,
                verdict=verdict(rate >= MIN_RATE),
                detail=f"{int(corner['success'].sum())} of {len(corner)} replicates succeed; "
                       f"median ||P_hat - P*||_F = {corner['subspace_distance'].median():.1e}.")


def _crossing(gammas, rates):
    """First gamma at which the success rate falls through 1/2 (linear interpolation).

    ``nan`` when the rate never crosses 1/2 inside the grid (censored boundary).
    """
    for i in range(1, len(gammas)):
        if rates[i - 1] >= 0.5 > rates[i]:
            weight = (rates[i - 1] - 0.5) / (rates[i - 1] - rates[i])
            return gammas[i - 1] + weight * (gammas[i] - gammas[i - 1])
    return np.nan


def empirical_boundary(df):
    """One row per (p, rank): the boundary gamma* and the mean incoherences.

    Columns: p, rank, gamma_star, odds_star = gamma*/(1-gamma*), mu_r (mean mu(U*) times
    r), muv_r (mean block incoherence of the row space times r).
    """
    rows = []
    for (p, rank), group in df.groupby(["p", "rank"]):
        rates = group.groupby("gamma")["success"].mean().sort_index()
        gamma_star = _crossing(rates.index.to_numpy(), rates.to_numpy())
        rows.append({"p": p, "rank": rank, "gamma_star": gamma_star,
                     "odds_star": gamma_star / (1 - gamma_star),
                     "mu_r": group["mu_u"].mean() * rank,
                     "muv_r": group["mu_v"].mean() * rank})
    return pd.DataFrame(rows)


def boundary_exponent(df):
    """Slope of log(gamma*/(1-gamma*)) on log(mu r) across ranks; the bound says -1."""
    boundary = empirical_boundary(_default_lam(df)).dropna()
    slope, interval = ols_slope(boundary, "mu_r", "odds_star", by="p")
    c_hat = boundary["odds_star"] * boundary["mu_r"]
    alt = ols_slope(boundary, "muv_r", "odds_star", by="p") if len(boundary) > 3 else None
    alt_text = f"; with the row-space block incoherence: {alt[0]:.2f}" if alt else ""
    return dict(statistic="slope of log(gamma*/(1-gamma*)) on log(mu(U*) r), per-p intercepts",
                expected=-1.0, observed=slope, interval=interval,
                verdict=verdict(interval[0] <= -1.0 <= interval[1]),
                detail=f"{len(boundary)} boundary points (gamma* where P(success) crosses "
                       f"1/2); c = gamma*/(1-gamma*) mu r ranges {c_hat.min():.2f}.."
                       f"{c_hat.max():.2f}{alt_text}.")


def block_incoherence(df):
    """No benign client is flagged when lam >= max_k ||V_k||_F (derived claim).

    The exact program keeps benign block k in L only if the nuclear norm's subgradient
    restricted to it, ``U V_k^T`` (Frobenius norm ``||V_k||_F``), fits in the block ball of
    radius lam: a dual-certificate condition. ``max_k ||V_k||_F^2 = mu_v r / |C|`` with
    ``mu_v`` the block incoherence of the true row space. All rows count, the fixed-lam
    sweep included, so the condition is tested at several lam.
    """
    inside = df[df["max_benign_block"] <= df["lam"]]
    clean = int((inside["false_positive_rate"] == 0).sum())
    rate, interval = wilson(clean, len(inside))
    outside = df[df["max_benign_block"] > df["lam"]]
    lams = ", ".join(f"{lam:.2f}" for lam in sorted(df["lam"].unique()))
    return dict(statistic="P(no benign client flagged | lam >= max_k ||V_k||_F) (Wilson)",
                expected=f">= {MIN_RATE}", observed=rate, interval=interval,
                verdict=verdict(rate >= MIN_RATE),
                detail=f"lam in {{{lams}}}: {clean} of {len(inside)} replicates inside the "
                       f"condition keep every benign client; outside it ({len(outside)} "
                       f"replicates) {(outside['false_positive_rate'] > 0).mean():.0%} flag "
                       "some.")


CHECKS = [
    Check("recovery_small_corner", "recovery",
          "Noiseless, gamma and r small enough: the exact program returns P_hat = P* and "
          "C_hat = C.", small_corner),
    Check("recovery_boundary_exponent", "recovery",
          "The recovery boundary follows gamma/(1-gamma) <= c/(mu r).", boundary_exponent),
    Check("recovery_block_incoherence", "recovery",
          "(Derived, explains the rank boundary.) Benign clients stay in L whenever "
          "lam >= max_k ||V_k||_F = (mu_v r / |C|)^{1/2}.", block_incoherence),
]

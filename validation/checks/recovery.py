"""Exact recovery (docs/theory.md, E1-E3): checks on the ``recovery`` table."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .._core import INF, Check, logit_fit, wilson

# "gamma and r small enough": the corner of the grid both the theory and every
# outlier-pursuit experiment put inside the recovery region.
SMALL_GAMMA, SMALL_RANK_FRACTION = 0.2, 0.2
# Success must be the rule there, not just likely: at most one replicate in twenty may
# miss (a solver stopping a little early near a degenerate instance).
MIN_RATE = 0.95
# E2 (outlier-pursuit form): the boundary exponent is -1; equivalence band +- 0.1.
EXPONENT_MARGIN = (-1.1, -0.9)
# E3 is tested only at block weights not used when the condition was found.
HOLDOUT_LAMS = (0.5, 0.8)


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
                expected=f">= {MIN_RATE}", observed=rate, interval=interval, n=len(corner),
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


def logistic_boundary_slope(df, incoherence="mu_u"):
    """Slope of the 50% success contour in (log mu r, log gamma/(1 - gamma)), all cells.

    Fits ``logit P(success) = a + b1 log(gamma / (1 - gamma)) + b2 log(mu r)`` to every
    replicate (statsmodels ``Logit``): ranks whose rate never crosses 1/2 inside the grid
    enter the likelihood like any other, so nothing is censored. The contour
    ``a + b1 x + b2 y = 0`` has slope ``dx/dy = -b2 / b1``, with a delta-method 95%
    interval. Returns ``(slope, (lo, hi))``, or ``None`` when no finite fit exists.
    """
    frame = df.assign(log_odds=np.log(df["gamma"] / (1 - df["gamma"])),
                      log_mu_r=np.log(df[incoherence] * df["rank"]))
    fit = logit_fit(frame, "success", ["log_odds", "log_mu_r"])
    if fit is None:
        return None
    _, b1, b2 = (float(v) for v in fit.params)
    gradient = np.array([0.0, b2 / b1**2, -1.0 / b1])  # of -b2/b1 in (a, b1, b2)
    half = 1.959964 * float(np.sqrt(gradient @ fit.cov_params() @ gradient))
    slope = -b2 / b1
    return slope, (slope - half, slope + half)


def boundary_exponent(df):
    """E2: the 50% contour of the success probability has slope -1 (outlier pursuit)."""
    rows = _default_lam(df)
    everything = empirical_boundary(rows)
    crossing = everything.dropna()
    c_hat = crossing["odds_star"] * crossing["mu_r"]
    fitted = logistic_boundary_slope(rows)
    alt = logistic_boundary_slope(rows, "mu_v")
    alt_text = f"; with the row-space block incoherence mu_V: {alt[0]:.2f}" if alt else ""
    censored = len(everything) - len(crossing)
    detail = (f"{len(rows)} replicates in {rows['cell'].nunique()} cells; the old per-rank "
              f"crossing estimate had {len(crossing)} boundary points ({censored} of "
              f"{len(everything)} (p, rank) pairs censored) and c = gamma*/(1-gamma*) mu r "
              f"ranging {c_hat.min():.2f}..{c_hat.max():.2f}{alt_text}.")
    slope, interval = fitted if fitted else (float("nan"), (-INF, INF))
    return dict(statistic="slope of the 50% contour of a logistic fit of success on "
                          "log(gamma/(1-gamma)) and log(mu(U*) r), every replicate (delta "
                          "method 95%)", expected=-1.0, observed=slope, interval=interval,
                n=len(rows), detail=detail)


def block_incoherence(df):
    """No benign client is flagged when lam >= max_k ||V_k||_F (derived claim).

    The exact program keeps benign block k in L only if the nuclear norm's subgradient
    restricted to it, ``U V_k^T`` (Frobenius norm ``||V_k||_F``), fits in the block ball of
    radius lam: a dual-certificate condition. ``max_k ||V_k||_F^2 = mu_v r / |C|`` with
    ``mu_v`` the block incoherence of the true row space.

    Only the held-out block weights count (``HOLDOUT_LAMS``, fresh seeds): the condition
    was read off the other weights' rows.
    """
    df = df[df["lam_setting"].isin([str(v) for v in HOLDOUT_LAMS] + list(HOLDOUT_LAMS))]
    inside = df[df["max_benign_block"] <= df["lam"]]
    clean = int((inside["false_positive_rate"] == 0).sum())
    rate, interval = wilson(clean, len(inside))
    outside = df[df["max_benign_block"] > df["lam"]]
    lams = ", ".join(f"{lam:.2f}" for lam in sorted(df["lam"].unique()))
    return dict(statistic="P(no benign client flagged | lam >= max_k ||V_k||_F) (Wilson)",
                expected=f">= {MIN_RATE}", observed=rate, interval=interval, n=len(inside),
                detail=f"held-out lam in {{{lams}}}: {clean} of {len(inside)} replicates "
                       "inside the "
                       f"condition keep every benign client; outside it ({len(outside)} "
                       f"replicates) {(outside['false_positive_rate'] > 0).mean():.0%} flag "
                       "some.")


CHECKS = [
    Check("recovery_small_corner", "recovery",
          "Noiseless, gamma and r small enough: the exact program returns P_hat = P* and "
          "C_hat = C.", small_corner, margin=(MIN_RATE, INF), source="docs/theory.md#e1",
          # Documented: p = 80, r = 16 fails in all its replicates (0.901 full); a
          # corner failing elsewhere too would fall below this range.
          known_failure="validation/README.md#recovery-corner", known_range=(0.85, 0.95)),
    Check("recovery_boundary_exponent", "recovery",
          "As stated (outlier-pursuit form): the recovery boundary follows "
          "gamma/(1-gamma) <= c/(mu r), exponent -1.", boundary_exponent,
          margin=EXPONENT_MARGIN, source="docs/theory.md#e2",
          # Documented: a contour steeper than -1 (-3.55 small, -4.71 full).
          known_failure="validation/README.md#recovery", known_range=(-6.0, -1.1)),
    Check("recovery_block_incoherence", "recovery",
          "(Derived, explains the rank boundary.) Benign clients stay in L whenever "
          "lam >= max_k ||V_k||_F = (mu_v r / |C|)^{1/2} (held-out block weights).",
          block_incoherence, margin=(MIN_RATE, INF), source="docs/theory.md#e3"),
]

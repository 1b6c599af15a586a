"""
From per-client data to a CLAIR fit, on a real survey
=====================================================

The statistician's path: each client fits its own regression (local OLS), CLAIR pools
the clients' coefficient matrices, tests each client, and refines the estimates of the
collaborative ones; a fitted model then tests and refines a new client.

The data are the Fair (1978) extramarital-affairs survey that ships with statsmodels:
6,366 women, each with her occupation and her husband's. A client is one
(occupation, husband's occupation) stratum, as if each stratum's data sat with a
different agency. Each client regresses two outcomes, the self-rated marriage
(``rate_marriage``, 1-5) and the time spent in affairs (``affairs``), on an intercept
and five covariates: its estimate is a 6 x 2 coefficient matrix.
"""

# %%
# The clients
# -----------
import matplotlib.pyplot as plt
from matplotlib.ticker import NullFormatter, ScalarFormatter
import numpy as np
import pandas as pd
import statsmodels.api as sm

import clairstat
from clairstat import CLAIREstimator

fair = sm.datasets.fair.load_pandas().data
features = ["age", "yrs_married", "children", "religious", "educ"]
outcomes = ["rate_marriage", "affairs"]
strata = {key: rows for key, rows in fair.groupby(["occupation", "occupation_husb"])}
# Strata with at least 80 women are the federation; those with 40 to 79 arrive later.
members = [key for key, rows in strata.items() if len(rows) >= 80]
newcomers = [key for key, rows in strata.items() if 40 <= len(rows) < 80]
print(len(members), "clients,", len(newcomers), "newcomers")

# %%
# A held-out quarter of each client's rows will score the predictions at the end.
rng = np.random.default_rng(0)
train, test = {}, {}
for key in members:
    rows = strata[key].sample(frac=1.0, random_state=rng.integers(2**31))
    cut = int(0.75 * len(rows))
    train[key], test[key] = rows.iloc[:cut], rows.iloc[cut:]

# %%
# Local OLS on every client
# -------------------------
# :func:`clairstat.local_ols` fits each client on its own rows and keeps, besides the
# estimates, their noise covariance: ``(X_k^T X_k)^{-1}`` (rows) and the residual
# covariance (columns), which the per-client tests use. Given mappings, the keys name
# the clients (``ols.client_names``), and the fit's summary labels its rows with them.
name = {key: f"occupation {key[0]:.0f}/{key[1]:.0f}" for key in members}
designs = {name[key]: sm.add_constant(train[key][features]) for key in members}
responses = {name[key]: train[key][outcomes] for key in members}
ols = clairstat.local_ols(designs, responses)
print(ols.estimates.shape, ols.feature_names, ols.output_names)

# %%
# Fit CLAIR
# ---------
# Given the ``LocalOLS`` itself, the fit takes its estimates with their sample sizes as
# weights and their noise covariance (``fit(ols.estimates, sample_weight=ols.n_samples,
# noise_cov=ols.noise_cov)``).
est = CLAIREstimator(random_state=0).fit(ols)
print(est.summary())

# %%
# The rank of the shared subspace is chosen by the noise-edge rule: the directions in
# which the collaborative clients' coefficients differ by more than their estimation
# noise explains. At rank 0 the clients differ by no more than noise, and the refined
# estimate of a collaborative client is the collaborative (weighted) mean itself.
print("shared rank:", est.rank_)

# %%
# The per-client p-values
# -----------------------
# A small p-value says the client's coefficients leave the subspace the others share;
# ``contaminated_`` applies the multiple-testing correction (Benjamini-Hochberg at 5% by
# default).
for key, p_value, flag in zip(members, est.p_values_, est.contaminated_):
    print(f"occupation {key[0]:.0f}, husband's {key[1]:.0f}: n = {len(train[key]):4d}, "
          f"p = {p_value:.3g}{'  flagged' if flag else ''}")

# %%
# Does pooling help to predict?
# -----------------------------
# Each client's held-out rows, predicted with its own OLS coefficients and with its
# CLAIR-refined ones. Small clients have the most to gain from borrowing; a client whose
# coefficients really differ from the shared pattern can lose a little.


def held_out_mse(coefficients):
    errors = [np.mean((test[key][outcomes].to_numpy()
                       - sm.add_constant(test[key][features], has_constant="add").to_numpy()
                       @ coef) ** 2) for key, coef in zip(members, coefficients)]
    return np.array(errors)


local_mse, refined_mse = held_out_mse(ols.estimates), held_out_mse(est.refined_)
print(f"held-out mean squared error, averaged over clients: local OLS "
      f"{local_mse.mean():.3f}, CLAIR refined {refined_mse.mean():.3f}")
sizes = np.array([len(train[key]) for key in members])
change = 100 * (refined_mse / local_mse - 1)
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.scatter(sizes, change, c=np.where(est.contaminated_, "tab:red", "tab:blue"))
ax.axhline(0, color="k", lw=1)
ax.set(xscale="log", xlabel="client's training rows n (log scale)",
       ylabel="held-out MSE change (%)",
       title="Refined vs own OLS, one point per client (red: flagged)")
ax.xaxis.set_major_formatter(ScalarFormatter())
ax.xaxis.set_minor_formatter(NullFormatter())
fig.tight_layout()

# %%
# A new client
# ------------
# The newcomers fit their own OLS; the fitted model tests each against the shared
# subspace with its own noise covariance (``predict``: +1 collaborative, -1
# contaminated) and refines them (``transform``) without refitting anything.
new = clairstat.local_ols([sm.add_constant(strata[key][features]) for key in newcomers],
                          [strata[key][outcomes] for key in newcomers])
labels = est.predict(new)  # a LocalOLS: its estimates with its own noise_cov
scores = est.score_samples(new)
for key, label, p_value in zip(newcomers, labels, np.exp(scores)):
    print(f"newcomer {key}: n = {len(strata[key])}, p = {p_value:.3g}, "
          f"{'collaborative' if label == 1 else 'contaminated'}")

# %%
# A newcomer predicted contaminated keeps its own estimate; a collaborative one gets
# its component in the shared subspace and the collaborative mean's outside it.
refined_new = est.transform(new)
k = int(np.flatnonzero(labels == 1)[0])
columns = pd.MultiIndex.from_product([ols.output_names, ["own OLS", "refined"]])
table = pd.DataFrame(np.stack([new.estimates[k], refined_new[k]], axis=2).reshape(6, 4),
                     index=ols.feature_names, columns=columns)
print(f"newcomer {newcomers[k]}:")
print(table.round(3))

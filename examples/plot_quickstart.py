"""
Quick start: flag contaminated clients and refine the others
=============================================================

Forty clients each fit a multivariate regression on their own data; their p x q
coefficient matrices share a rank-3 column space, except for eight contaminated clients
whose matrices leave it. :class:`clairstat.CLAIREstimator` finds the shared subspace,
tests every client against it, and refines the collaborative clients' estimates.
"""

# %%
# Generate the clients
# --------------------
# :func:`clairstat.datasets.make_federated_regression` draws the model of the method and
# returns each client's local OLS estimate together with the truth, so that we can score
# the fit below.
import numpy as np

from clairstat import CLAIREstimator
from clairstat.datasets import make_federated_regression
from clairstat.metrics import detection_scores, estimation_errors, subspace_distance

data = make_federated_regression(n_clients=40, p=30, q=8, rank=3, n_samples=200,
                                 n_contaminated=8, random_state=0)
print(data.local_estimates.shape)  # (n_clients, p, q)

# %%
# Fit CLAIR
# ---------
# ``sample_weight`` gives each client's weight in the collaborative mean (its sample
# size here). ``random_state`` seeds the random starts of the robust detection.
est = CLAIREstimator(random_state=0).fit(data.local_estimates,
                                         sample_weight=data.n_samples)
print(est.summary())

# %%
# Score the fit against the truth
# -------------------------------
# The flags, the distance between the estimated and the true subspace (as projectors),
# and the benign clients' squared error before and after refinement.
benign = ~data.contaminated
print(detection_scores(est.contaminated_, data.contaminated))
print(f"||P_hat - P*||_F = {subspace_distance(est.subspace_, data.subspace):.4f}")
print(f"benign mean squared error: local OLS "
      f"{estimation_errors(data.local_estimates, data.truth)[benign].mean():.4f}, refined "
      f"{estimation_errors(est.refined_, data.truth)[benign].mean():.4f}")

# %%
# The per-client tests
# --------------------
# Each client's statistic is its squared distance from the shared subspace (for a
# collaborative client, from a refit without it); under the null it follows a scaled
# chi-square, which gives the p-values. The demo's figure shows them: colour says what
# CLAIR decided, the marker what is true. On the right, the singular values of the
# low-rank part: three stand out, the rank of the shared subspace.
from clairstat.demo import draw_figure  # noqa: E402

fig = draw_figure(est, data)

# %%
# New clients
# -----------
# A fitted estimator tests clients it has not seen (``predict``: +1 collaborative,
# -1 contaminated) and refines them with the fitted subspace and mean (``transform``).
# Here the last eight clients are held out of the fit.
held_out = slice(32, 40)
est_32 = CLAIREstimator(random_state=0).fit(data.local_estimates[:32],
                                            sample_weight=data.n_samples[:32])
print("predicted:", est_32.predict(data.local_estimates[held_out]))
print("truth:    ", np.where(data.contaminated[held_out], -1, 1))
refined_new = est_32.transform(data.local_estimates[held_out])
print("held-out squared errors, local vs refined:")
print(np.c_[estimation_errors(data.local_estimates[held_out], data.truth[held_out]),
            estimation_errors(refined_new, data.truth[held_out])].round(3))

"""
Check a claim: a study, a check, a verdict, and a negative control
==================================================================

The theory verifier's loop, in miniature. A *study* (``simulations``) runs seeded,
resumable Monte Carlo replicates over a grid and stores one row per replicate; a *check*
(``validation``) turns a study's table into a statistic with a 95% interval and compares
it with a margin declared before the data; a *negative control* runs the same study on a
deliberately broken method and must make the check fail, which shows the check can fail.

The claim checked here: refining the collaborative clients' estimates lowers their risk,
here stated with a margin fixed in advance: in most draws (a share above one half) the
ratio of the benign clients' mean squared error after refinement to that of their local
OLS estimates is below 0.9. The
repository's own studies and checks (``python -m validation``) follow the same pattern
at larger sizes.

``simulations`` and ``validation`` are folders of the checkout, not installed with the
package: to run this script by hand, put the repository root on the path
(``PYTHONPATH=. python examples/plot_theory_check.py`` from the root); the documentation
build does that itself.
"""

# %%
# A study: one function of (parameters, seed) and a grid
# ------------------------------------------------------
# ``simulate_one`` must depend only on its arguments (the seed is derived from the study
# name, the cell and the replicate, so reruns and extensions reproduce every row). A
# study that declares controls also gets ``control``: under ``local-refinement`` the
# "refined" estimate of every client is its own local estimate.
import tempfile

import matplotlib.pyplot as plt

from clairstat import CLAIREstimator
from clairstat.datasets import make_federated_regression
from clairstat.metrics import estimation_errors
from simulations import Study, control_results_dir, grid, load_results, run_study
from validation import INF, Check, run_check, wilson


def simulate_one(params, seed, control=None):
    """Fit CLAIR on one draw; return the benign clients' risk ratio (flat scalars)."""
    data = make_federated_regression(n_clients=20, p=params["p"], q=3, rank=2,
                                     n_samples=60, n_contaminated=2, random_state=seed)
    est = CLAIREstimator(random_state=seed).fit(data.local_estimates,
                                                sample_weight=data.n_samples)
    refined = data.local_estimates if control == "local-refinement" else est.refined_
    benign = ~data.contaminated
    local = estimation_errors(data.local_estimates, data.truth)[benign].mean()
    return {"risk_ratio": estimation_errors(refined, data.truth)[benign].mean() / local,
            "rank": est.rank_, "solver": est.solver_}


cells = grid(p=[10, 20])
study = Study(name="refinement_gain", description="refinement lowers the benign risk",
              grids={"smoke": cells, "small": cells, "full": cells},
              replicates={"smoke": 4, "small": 20, "full": 200},
              simulate_one=simulate_one, controls=("local-refinement",))

# %%
# Run it
# ------
# Rows are appended, one JSON line per replicate, to ``RESULTS_DIR/smoke/refinement_gain.jsonl``;
# running the same call again runs only what is missing.
results_dir = tempfile.mkdtemp()
print(run_study(study, "smoke", results_dir=results_dir, progress=False), "replicates run")
print(run_study(study, "smoke", results_dir=results_dir, progress=False), "on the rerun")
table = load_results(study, "smoke", results_dir, current_only=True)
print(table[["p", "replicate", "seed", "risk_ratio", "rank", "clairstat_version"]])

# %%
# A check with a pre-registered margin
# ------------------------------------
# The function returns the statistic, the expected value, the observed value and its 95%
# interval; the verdict is not the function's to give. ``kind="theory"`` with margin
# ``(0.5, inf)`` on the share of draws whose ratio is below 0.9 (a Wilson interval):
# ``pass`` when the whole interval lies above one half, ``fail`` when it lies entirely
# below, ``inconclusive`` otherwise (too few replicates to decide). A mean of the ratios
# would not do here: under the control below every ratio is exactly 1, and n equal
# values cannot place a mean (``mean_interval`` then returns an interval that decides
# nothing), so the broken method could never make that check fail.


def refinement_gain(df):
    share, interval = wilson(int((df["risk_ratio"] < 0.9).sum()), len(df))
    return dict(statistic="share of draws with risk ratio refined / local OLS < 0.9, "
                          "benign clients (Wilson 95%)",
                expected="> 0.5", observed=share, interval=interval, n=len(df))


check = Check("refinement_gain", "refinement_gain",
              "In most draws refinement lowers the benign clients' risk by at least 10%.",
              refinement_gain, kind="theory", margin=(0.5, INF))
row = run_check(check, table)
print({key: row[key] for key in ("name", "observed", "interval", "margin", "verdict")})

# %%
# The negative control
# --------------------
# The same study with the refinement switched off: the ratio is then exactly 1 in every
# draw, no draw is below 0.9, and the check must fail. A check that no broken method can
# make fail would not be evidence for anything. The control's rows go to their own
# table, with the same seeds.
run_study(study, "smoke", results_dir=results_dir, progress=False,
          control="local-refinement")
broken = load_results(study, "smoke", control_results_dir("local-refinement", results_dir),
                      current_only=True)
control_row = run_check(check, broken)
print({key: control_row[key] for key in ("observed", "interval", "verdict")})

# %%
# What the check saw
# ------------------
fig, ax = plt.subplots(figsize=(6, 3.2))
for frame, label, shift in ((table, "CLAIR", -0.1), (broken, "control: no refinement", 0.1)):
    ax.plot(frame["p"] + shift * 5, frame["risk_ratio"], "o", alpha=0.7, label=label)
ax.axhline(0.9, color="k", ls="--", label="ratio 0.9 (counted below it)")
ax.set(xlabel="p (rows of each estimate)", ylabel="risk ratio refined / local",
       xticks=[10, 20], ylim=(0, 1.15),
       title=f"check: {row['verdict']}; under the control: {control_row['verdict']}")
ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
fig.tight_layout()

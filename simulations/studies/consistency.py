"""Study 3b: consistency of collaborative-set recovery (docs/theory.md, D1).

Along a path of growing size, ``(K, n) = (20, 100), (40, 200), (80, 400), ...`` (the
number of clients and every client's sample size double together), with a fixed
off-subspace shift ``delta`` of the contaminated clients (so the separation ratio
``delta / (sigma sqrt(pq/n))`` grows like sqrt(n)) and a test level that shrinks with the
size, ``alpha_K = 1 / K``, under Holm's family-wise correction. The claim: P(C_hat = C)
rises toward 1. Controls as in ``detection``, and ``fixed-level``: the test runs at the
fixed level 0.05 at every size, uncorrected (a client is flagged when its own p-value is
below 0.05), so about 0.05 (K - m) benign clients are flagged and exact recovery becomes
rarer as K grows.
"""

from __future__ import annotations

from .._framework import Study
from ._common import check_control
from .detection import CONTROLS, TEST_LEVEL, fit_and_score

# Off-subspace shift of every contaminated client (Frobenius norm, sigma = 1): at the
# smallest size (n = 100, per-entry noise sd 1/sqrt(79)) the non-centrality is 28 against
# 90 degrees of freedom, a per-client power of about 1/3 at level 1/(20 K); it grows
# linearly in n along the path.
SEPARATION = 0.6
CORRECTION = "holm"


def level_for(n_clients):
    """The shrinking level alpha_K = 1 / K (family-wise, Holm)."""
    return 1.0 / n_clients


def simulate_one(params, seed, control=None):
    """One replicate at one size: does the test find exactly the contaminated set?"""
    check_control(control, STUDY)
    # fixed-level: the detection study's fixed level at every size, no correction
    level = TEST_LEVEL if control == "fixed-level" else level_for(params["n_clients"])
    return fit_and_score({**params, "separation": SEPARATION}, seed, level, CORRECTION,
                         control)


def _path(sizes):
    """Cells along the size path; ``size`` indexes it (K = 20 * 2**size)."""
    return [dict(n_clients=k, n=n, size=i, p=20, q=5, rank=2, sigma=1.0, gamma=0.1)
            for i, (k, n) in enumerate(sizes)]


SIZES = [(20, 100), (40, 200), (80, 400), (160, 800), (320, 1600)]
STUDY = Study(
    name="consistency",
    description="3b. consistency: P(C_hat = C) along growing (K, n), level 1/K, Holm",
    grids={"smoke": [_path(SIZES)[0], _path(SIZES)[3]], "small": _path(SIZES[:4]),
           "full": _path(SIZES)},
    replicates={"smoke": 2, "small": 50, "full": 200},
    simulate_one=simulate_one,
    controls=(*CONTROLS, "fixed-level"),
)

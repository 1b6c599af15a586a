"""Studies 5-7 (FedRot, GLoRA, robustness): purity, checks that can fail, the pipeline."""

import math

import numpy as np
import pandas as pd
import pytest

from simulations import load_results, run_study
from simulations.studies import fedrot, glora, robustness
from validation import run_check
from validation.checks import fedrot as fedrot_checks
from validation.checks import glora as glora_checks
from validation.checks import robustness as robustness_checks

STUDIES = [(fedrot, fedrot_checks), (glora, glora_checks), (robustness, robustness_checks)]


@pytest.mark.parametrize("module", [fedrot, glora, robustness])
def test_simulate_one_is_a_function_of_params_and_seed(module):
    cell = module.STUDY.cells("smoke")[-1]
    first, again = module.simulate_one(cell, 11), module.simulate_one(cell, 11)
    assert first == again and first != module.simulate_one(cell, 12)
    assert all(np.isscalar(value) for value in first.values())


@pytest.fixture(scope="module")
def smoke_tables(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    for module, _ in STUDIES:
        run_study(module.STUDY, "smoke", results_dir=root, progress=False)
    return root


@pytest.mark.parametrize("module,checks", STUDIES)
def test_identity_checks_pass_and_theory_checks_decide_at_smoke_scale(smoke_tables, module,
                                                                      checks):
    table = load_results(module.STUDY.name, "smoke", smoke_tables)
    assert len(table) == len(module.STUDY.tasks("smoke"))
    for check in checks.CHECKS:
        row = run_check(check, table)
        # Identities hold in every replicate at any scale; a theory check at smoke scale
        # may be undecided, but never an error.
        if check.kind == "identity":
            assert row["verdict"] == "pass", row
        else:
            assert row["verdict"] in ("pass", "inconclusive", "fail"), row


@pytest.mark.parametrize("module,checks", STUDIES)
def test_figure_scripts_draw_from_the_smoke_tables(smoke_tables, tmp_path, module, checks):
    import importlib

    script = importlib.import_module(f"paper.figures.{module.STUDY.name}")
    paths = script.main(smoke_tables / "smoke", tmp_path)
    assert all(path.exists() and path.stat().st_size > 0 for path in paths)


def _table(**columns):
    return pd.DataFrame(columns)


def _verdict(check, frame):
    return run_check(check, frame)["verdict"]


def test_identity_checks_fail_on_a_single_violation():
    # One replicate breaking each exact claim must turn its check into a failure.
    rows = _table(identity_residual=[0.0, 1e-6], cs_excess=[-0.5, 1e-3],
                  bound_excess_after=[-0.1, 1e-3], product_drift=[0.0, 1e-3],
                  lam=[0.5, 0.5], soft_bound_ratio=[0.2, 1.2], gauge=["rotation"] * 2,
                  heterogeneity=[0.5, 0.5])
    names = ["fedrot_error_identity", "fedrot_cauchy_schwarz",
             "fedrot_bound_valid_after_alignment", "fedrot_products_kept",
             "fedrot_soft_rotation_bound"]
    by_name = {check.name: check for check in fedrot_checks.CHECKS}
    for name in names:
        assert _verdict(by_name[name], rows) == "fail", name
        assert _verdict(by_name[name], rows.iloc[:1]) == "pass", name
    rows = _table(reference_rank=[8, 8], union_rank=[6, 6], error_glora=[0.0, 1e-3])
    exact = next(c for c in glora_checks.CHECKS if c.name == "glora_exact_full_rank")
    assert _verdict(exact, rows) == "fail"


def test_theory_checks_fail_when_the_claim_is_false_and_pass_when_true():
    by_name = {c.name: c for c in robustness_checks.CHECKS + fedrot_checks.CHECKS}
    gammas = np.repeat([0.1, 0.2, 0.3, 0.4], 5)
    flat = _table(attack="scaled", gamma=gammas, error_mean=np.full(20, 0.7))
    assert _verdict(by_name["robust_mean_breakdown"], flat) == "fail"  # slope 0, not 1
    rising = flat.assign(error_mean=3 * gammas)
    assert _verdict(by_name["robust_mean_breakdown"], rising) == "pass"
    far = _table(gamma=[0.2, 0.3], benign_radius=[1.0, 1.0], error_geomedian=[0.5, 1.6])
    assert _verdict(by_name["robust_geomedian_bound"], far) == "fail"  # C_0.3 = 1.107
    hard = dict(lam=[1.0] * 40, gauge=["rotation"] * 40, heterogeneity=[0.3] * 40)
    worse = _table(**hard, error_rot_a=[2.0] * 40, error_fedit=[1.0] * 40)
    assert _verdict(by_name["fedrot_alignment_helps"], worse) == "fail"
    better = worse.assign(error_rot_a=0.5)
    assert _verdict(by_name["fedrot_alignment_helps"], better) == "pass"
    # A looser bound after alignment fails the claim.
    looser = _table(**hard, bound_ratio_a=np.linspace(1.1, 1.3, 40))
    assert _verdict(by_name["fedrot_alignment_tightens_bound"], looser) == "fail"
    # No alignment: the aligned bound equals the unaligned one in every replicate. Forty
    # equal values cannot tell a mean of 1 from one just below it (mean_interval's
    # constant-sample rule): inconclusive, never a pass.
    same = _table(**hard, bound_ratio_a=[1.0] * 40)
    assert _verdict(by_name["fedrot_alignment_tightens_bound"], same) == "inconclusive"
    tighter = same.assign(bound_ratio_a=np.linspace(0.2, 0.4, 40))
    assert _verdict(by_name["fedrot_alignment_tightens_bound"], tighter) == "pass"


def test_a_wide_interval_is_inconclusive_never_a_pass():
    # Three replicates of a rate that is 1: the Wilson interval reaches far below 0.9.
    rows = _table(attack=["random"] * 3, gamma=[0.1] * 3, clair_recall=[1.0] * 3)
    check = next(c for c in robustness_checks.CHECKS if c.name == "robust_clair_detection")
    assert _verdict(check, rows) == "inconclusive"
    assert not math.isinf(check.margin[0]) and math.isinf(check.margin[1])

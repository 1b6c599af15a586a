"""Studies 5-7 (FedRot, GLoRA, robustness): purity, checks that can fail, the pipeline."""

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
def test_every_check_passes_or_is_a_documented_failure_at_smoke_scale(smoke_tables, module,
                                                                      checks):
    table = load_results(module.STUDY.name, "smoke", smoke_tables)
    assert len(table) == len(module.STUDY.tasks("smoke"))
    for check in checks.CHECKS:
        row = run_check(check, table)
        assert row["verdict"] in ("pass", "fail"), row
        assert row["verdict"] == "pass" or check.known_failure, row


@pytest.mark.parametrize("module,checks", STUDIES)
def test_figure_scripts_draw_from_the_smoke_tables(smoke_tables, tmp_path, module, checks):
    import importlib

    script = importlib.import_module(f"paper.figures.{module.STUDY.name}")
    paths = script.main(smoke_tables / "smoke", tmp_path)
    assert all(path.exists() and path.stat().st_size > 0 for path in paths)


def _table(**columns):
    return pd.DataFrame(columns)


def test_identity_and_bound_checks_fail_on_violations():
    # One replicate breaking each exact claim must turn its check into a failure.
    rows = _table(identity_residual=[0.0, 1e-6], cs_ratio=[0.5, 1.01],
                  product_drift=[0.0, 1e-3], lam=[0.5, 0.5], soft_bound_ratio=[0.2, 1.2])
    for check in fedrot_checks.CHECKS[:4]:
        assert check.function(rows)["verdict"] == "fail", check.name
    rows = _table(reference_rank=[8, 8], union_rank=[6, 6], error_glora=[0.0, 1e-3])
    assert glora_checks.exact(rows)["verdict"] == "fail"


def test_statistical_checks_fail_when_the_claim_is_false():
    gammas = np.repeat([0.1, 0.2, 0.3, 0.4], 5)
    flat = _table(attack="scaled", gamma=gammas, error_mean=np.full(20, 0.7))
    assert robustness_checks.mean_breaks_down(flat)["verdict"] == "fail"  # slope 0, not 1
    rising = flat.assign(error_mean=3 * gammas)
    assert robustness_checks.mean_breaks_down(rising)["verdict"] == "pass"
    far = _table(gamma=[0.2, 0.3], benign_radius=[1.0, 1.0], error_geomedian=[0.5, 1.6])
    assert robustness_checks.geomedian_bound(far)["verdict"] == "fail"  # C_0.3 = 1.107
    worse = _table(lam=[1.0] * 6, error_rot_a=[2.0] * 6, error_fedit=[1.0] * 6,
                   heterogeneity=[0.0] * 6)
    assert fedrot_checks.alignment_helps(worse)["verdict"] == "fail"

"""The documentation builds without a warning and runs every example; the project's
furniture (licence, changelog, citation) agrees with pyproject.toml."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_licence_is_the_declared_one():
    assert _pyproject()["license"]["text"] == "BSD-3-Clause"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License")
    assert "Neither the name of the copyright holder" in text  # the third clause


def test_changelog_and_citation_name_the_current_version():
    """Every release has a dated changelog section; a development version has an
    "Unreleased" one; the citation names a released version (the current one once it is
    released)."""
    yaml = pytest.importorskip("yaml")
    from packaging.version import Version

    version = Version(_pyproject()["version"])
    changelog = (ROOT / "CHANGELOG.md").read_text()
    released = re.findall(r"^## (\S+) \(\d{4}-\d{2}-\d{2}\)$", changelog, re.M)
    assert {"0.1.0", "0.2.0"} <= set(released)
    if version.is_devrelease or version.is_prerelease:
        assert re.search(r"^## Unreleased$", changelog, re.M)
    else:
        assert str(version) in released
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["authors"]
    assert citation["license"] == "BSD-3-Clause"
    assert str(citation["version"]) in released
    if not (version.is_devrelease or version.is_prerelease):
        assert citation["version"] == str(version)


def test_readme_links_the_docs_and_cites():
    readme = (ROOT / "README.md").read_text()
    assert "make docs" in readme and "docs/_build/html/index.html" in readme
    assert "CITATION.cff" in readme
    # The README's rule names are the ones aggregate() accepts.
    from clairstat.aggregation import RULE_NAMES

    named = re.findall(r'aggregate\("(\w+)"', readme)
    assert all(name in RULE_NAMES for name in named)


@pytest.mark.parametrize("module", ["clairstat.demo", "simulations", "validation", "paper"])
def test_help_is_plain_words(module):
    """``--help`` shows no reStructuredText markup; the checkout's tools say where to run."""
    pytest.importorskip("pandas")
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m {module}")
    assert "``" not in result.stdout and ":class:" not in result.stdout
    if module != "clairstat.demo":
        assert "repository root" in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_docs_build_without_warnings_and_run_every_example(tmp_path):
    """``make docs`` in a scratch copy: the source tree is left as it is, and no example
    is skipped as already run (sphinx-gallery skips unchanged ones in place)."""
    for module in ("sphinx", "numpydoc", "sphinx_gallery", "myst_parser",
                   "pydata_sphinx_theme", "matplotlib", "peft", "pandas"):
        pytest.importorskip(module)
    tree = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("_build", "generated", "auto_examples",
                                    "sg_execution_times.rst", "__pycache__")
    shutil.copytree(ROOT / "docs", tree / "docs", ignore=ignore)
    shutil.copytree(ROOT / "examples", tree / "examples", ignore=ignore)
    for name in ("CHANGELOG.md", "CITATION.cff"):  # included or read by the docs
        shutil.copy(ROOT / name, tree / name)
    for package in ("clairstat", "simulations", "validation"):  # read, never written
        (tree / package).symlink_to(ROOT / package, target_is_directory=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q",
         "-d", str(tmp_path / "doctrees"), str(tree / "docs"), str(tmp_path / "html")],
        cwd=tree, env=env, capture_output=True, text=True, timeout=850)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-6000:]
    examples = sorted(path.stem for path in (ROOT / "examples").glob("*.py"))
    assert examples
    for name in examples:
        page = (tmp_path / "html" / "auto_examples" / f"{name}.html").read_text()
        assert "sphx-glr-script-out" in page, name  # its printed output: it ran
    assert (tmp_path / "html" / "api.html").exists()


def _readme_python_blocks():
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_code_runs_and_says_what_it_prints():
    """Every Python block of the README runs as written, in the order given; the
    statistician's block says which site the real-data fit flags ("site N is flagged")
    and that the new site is predicted +1: both are read from the README's text and
    held against the fit, so an edit of the code or of the package that changes them
    fails here."""
    pytest.importorskip("statsmodels")
    pytest.importorskip("pandas")
    import numpy as np

    blocks = _readme_python_blocks()
    assert len(blocks) >= 2
    statistician = [b for b in blocks if "local_ols(" in b]
    assert len(statistician) == 1
    namespaces = []
    for block in blocks:
        namespace = {"__name__": "readme"}
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (our own text)
        namespaces.append(namespace)
    fitted = namespaces[blocks.index(statistician[0])]
    claimed = [int(n) for n in re.findall(r"site (\d+) is flagged", statistician[0])]
    assert claimed, "the README no longer says which site is flagged"
    assert np.flatnonzero(fitted["est"].contaminated_).tolist() == claimed
    assert re.search(r"est\.predict\(new\)\s+# \+1", statistician[0])
    assert fitted["est"].predict(fitted["new"]).tolist() == [1]

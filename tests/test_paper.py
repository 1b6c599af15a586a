"""The manuscript (``make paper``): built from the committed results, every reference
resolved, every figure included, and its numbers traced back to their source files.

The build runs once per session in a scratch folder (figures, generated macros and
tables, latexmk), so the working tree is left as it is. The checks of the generated
macros against the result files need no TeX and always run.
"""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEX = ROOT / "paper" / "clairstat.tex"
pytest.importorskip("pandas")
pytest.importorskip("matplotlib")
pytest.importorskip("statsmodels")

needs_tex = pytest.mark.skipif(
    shutil.which("latexmk") is None or shutil.which("pdftotext") is None,
    reason="latexmk or pdftotext is not on PATH: TeX Live is not installed (README, "
           "'Paper'; .ci/run installs it), so the PDF is not built")


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """``python -m paper --scale small --pdf`` into a scratch folder; its folders."""
    tmp = tmp_path_factory.mktemp("paper")
    dirs = {"figures": tmp / "figures", "generated": tmp / "generated",
            "build": tmp / "build"}
    result = subprocess.run(
        [sys.executable, "-m", "paper", "--scale", "small", "--pdf",
         "--out-dir", str(dirs["figures"]), "--generated-dir", str(dirs["generated"]),
         "--build-dir", str(dirs["build"])],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    log = dirs["build"] / "clairstat.log"
    assert result.returncode == 0, (result.stderr[-3000:]
                                    + (log.read_text()[-3000:] if log.exists() else ""))
    return dirs


@needs_tex
@pytest.mark.timeout(300)
def test_pdf_has_no_undefined_reference_citation_or_question_marks(build):
    log = (build["build"] / "clairstat.log").read_text(errors="replace")
    assert not re.search(r"(Reference|Citation) `[^']*' on page \d+ undefined", log)
    assert "There were undefined references" not in log
    assert "Label(s) may have changed" not in log  # latexmk ran to a fixed point
    text = subprocess.run(["pdftotext", str(build["build"] / "clairstat.pdf"), "-"],
                          capture_output=True, text=True, check=True).stdout
    assert "??" not in text
    assert "Programs, certificates and solvers" in text  # the text itself is there


@needs_tex
@pytest.mark.timeout(300)
def test_every_figure_drawn_is_included(build):
    drawn = sorted(path.name for path in build["figures"].glob("*.pdf"))
    # Every figure script draws (its source table is committed): a PDF named after it,
    # or several named <script>_<part> (the copying figures, one per setting).
    scripts = {p.stem for p in (ROOT / "paper" / "figures").glob("[!_]*.py")}
    def owner(stem):  # the script of that name, else the longest <script>_ prefix
        if stem in scripts:
            return stem
        return max((s for s in scripts if stem.startswith(s + "_")), key=len)

    owners = {owner(Path(name).stem) for name in drawn}
    assert owners == scripts
    log = (build["build"] / "clairstat.log").read_text(errors="replace")
    used = {Path(re.sub(r"/+", "/", m)).name
            for m in re.findall(r"pdftex\.def Info: (\S+) +used on input line", log)}
    assert used == set(drawn), "drawn but not in the PDF: " + str(set(drawn) - used)


def _macros():
    """The generated macros, key -> LaTeX text, computed in process."""
    from paper._generate import collect

    return collect()[0]


def _as_float(tex):
    """A macro's number back as a float: '0.0411', '\\ensuremath{4.49\\times10^{-16}}'."""
    text = tex.replace(r"\ensuremath{-}", "-").replace(r"\,\%", "")
    match = re.search(r"(-?[\d.]+)\\times10\^\{(-?\d+)\}", text)
    if match:
        return float(match.group(1)) * 10.0 ** int(match.group(2))
    return float(re.search(r"-?\d+(\.\d+)?", text).group(0))


def _agrees(shown, value, digits=3):
    """``shown`` is ``value`` rounded to ``digits`` significant digits (or exact)."""
    if value == 0 or not math.isfinite(value):
        return shown == value
    return math.isclose(shown, float(f"{value:.{digits}g}"), rel_tol=1e-12)


def test_validation_macros_are_the_report_values():
    report = json.loads((ROOT / "validation" / "report.json").read_text())
    macros = _macros()
    for check in report["checks"]:
        key = f"val.{check['name']}"
        if isinstance(check.get("observed"), (int, float)):
            assert _agrees(_as_float(macros[f"{key}.observed"]), check["observed"]), key
        if check.get("interval"):
            assert _agrees(_as_float(macros[f"{key}.lo"]), check["interval"][0]), key
            assert _agrees(_as_float(macros[f"{key}.hi"]), check["interval"][1]), key
        verdict = check.get("verdict") or ("pass" if check.get("passed") else "fail")
        assert verdict in macros[f"{key}.verdict"], key
    for kind in ("theory", "identity"):
        rows = [c for c in report["checks"] if c.get("kind", "theory") == kind]
        assert macros[f"val.{kind}.total"] == str(len(rows))
        counts = report["meta"].get(kind)
        if counts:  # the report's own tally, when it writes one
            for verdict in ("pass", "inconclusive", "fail"):
                assert macros[f"val.{kind}.{verdict}"] == str(counts[verdict])


def test_benchmark_macros_are_the_committed_tables():
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    macros = _macros()
    # Read the solver rows here by plain splitting, independently of paper/_sources.py:
    # the pipe lines after the header that names both solvers' times, up to a blank line.
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines)
                 if "| torch s |" in line and "| CVXPY s |" in line)
    solver = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        solver.append([cell.strip() for cell in line.split("|")[1:-1]])
    with_cvxpy = [row for row in solver if row[4] not in ("—", "-", "")]
    p, q, k, torch_s, cvxpy_s, ratio = with_cvxpy[-1][:6]
    assert macros["bench.solver.maxcvxpy.p"] == p and macros["bench.solver.maxcvxpy.K"] == k
    assert _agrees(_as_float(macros["bench.solver.maxcvxpy.ratio"]), float(ratio))
    assert _agrees(_as_float(macros["bench.solver.maxcvxpy.torch"]), float(torch_s))
    assert _agrees(_as_float(macros[f"bench.solver.{p}-{q}-{k}.cvxpy"]), float(cvxpy_s))


def test_calibration_macros_are_the_csv():
    import pandas as pd

    table = pd.read_csv(ROOT / "benchmarks" / "results" / "real_data_calibration.csv")
    macros = _macros()
    for path, tag in (("default", "default"), ("noise_cov", "noisecov")):
        null = table[(table.path == path) & (table.corruption == "none")]
        assert macros[f"calib.all.{tag}.splits"] == str(len(null))
        assert macros[f"calib.all.{tag}.null"] == f"{null.any_flag.mean():.3f}"
        fair = table[(table.path == path) & (table.dataset == "fair")
                     & (table.corruption == "flip")]
        assert macros[f"calib.fair.{tag}.powerflip"] == (
            f"{fair.victims_flagged.sum() / fair.n_victims.sum():.2f}")


def test_copying_macros_are_the_results_table():
    from paper._sources import copying_scale, read_copying

    scale = copying_scale()
    if scale is None:
        pytest.skip("no copying results committed")
    frame = read_copying(scale)
    macros = _macros()
    # Recompute one cell from the raw per-client columns, without the summary helpers:
    # heterogeneous, CLAIR's default, mean over replicates of the replicate-mean
    # relative change of the benign clients against local LoRA.
    rows = frame[frame.setting == "heterogeneous"]
    means = []
    for _, row in rows.iterrows():
        changes = [(row[f"acc_clair_c{k}"] - row[f"acc_local_c{k}"])
                   / row[f"acc_local_c{k}"] for k in range(int(row["n_clients"]))
                   if not row[f"contaminated_c{k}"]]
        means.append(sum(changes) / len(changes))
    expected = f"{100 * sum(means) / len(means):+.1f}"
    assert macros["copy.heterogeneous.clair.gain"].startswith(
        expected.replace("-", r"\ensuremath{-}") + r"\,\%")
    assert macros["copy.replicates"] == str(int(rows["replicate"].nunique())) or \
        int(macros["copy.replicates"]) <= rows["replicate"].nunique()


def test_changing_a_result_changes_the_macro(tmp_path, monkeypatch):
    """A macro is recomputed from the file at every build: edit the file, the text moves."""
    from paper import _sources

    report = json.loads((ROOT / "validation" / "report.json").read_text())
    check = report["checks"][0]
    check["observed"] = 0.123456
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    monkeypatch.setitem(_sources.SOURCES, "report", path)
    assert _macros()[f"val.{check['name']}.observed"] == "0.123"


def test_old_report_shape_is_read():
    """A report without kind/verdict/margin (the shape before the split) still reads."""
    from paper._generate import validation_macros, verdict_table

    old = {"meta": {"scale": "small"},
           "checks": [{"name": "a_check", "study": "s", "claim": "c", "expected": ">= 0.9",
                       "observed": 0.95, "interval": [0.91, 0.98], "n": 40,
                       "passed": True}]}
    macros = validation_macros(old)
    assert macros["val.a_check.verdict"] == "pass"
    assert macros["val.theory.total"] == "1" and macros["val.identity.total"] == "0"
    assert r"\geq" in verdict_table(old, "theory")


def test_text_types_no_decimal_number():
    """Numbers reach the text through \\res{...} only: outside mathematics (formulas
    and the method's constants) the body holds no decimal number."""
    body = TEX.read_text().split(r"\begin{document}", 1)[1]
    body = re.sub(r"(?<!\\)%.*", "", body)  # comments
    body = re.sub(r"\\res\{[^}]*\}|\\(obs|verdict)\{[^}]*\}", "", body)
    body = re.sub(r"\\\w+\[[^\]]*\]", "", body)  # a command's options (widths)
    body = re.sub(r"\\begin\{equation\}.*?\\end\{equation\}|\\\[.*?\\\]|\$[^$]*\$", "",
                  body, flags=re.S)
    assert not re.findall(r"(?<![\w.{])\d+\.\d+", body)

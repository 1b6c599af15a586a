"""The manuscript (``make paper``): built from the committed results, every reference
resolved, every figure included, and its numbers traced back to their source files.

The build runs once per session in a scratch folder (figures, generated macros and
tables, latexmk), so the working tree is left as it is. The checks of the generated
macros against the result files need no TeX and always run.
"""

import functools
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
def test_readme_states_the_page_count(build):
    """The README's "(N pages)" beside ``make paper`` is the built PDF's."""
    log = (build["build"] / "clairstat.log").read_text(errors="replace")
    pages = re.search(r"Output written on clairstat\.pdf \((\d+) pages?", log)
    stated = re.search(r"clairstat\.pdf \((\d+) pages\)", (ROOT / "README.md").read_text())
    assert pages and stated
    assert stated.group(1) == pages.group(1), (
        f"README.md says {stated.group(1)} pages, the PDF has {pages.group(1)}")


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
    """The generated macros, key -> LaTeX text, computed in process.

    ``collect`` reads committed files: those named in ``paper._sources.SOURCES`` and,
    found by their own modules, the design sweep's table (``simulations/results``) and
    the studies' definitions (code). No test writes any of them, and the tests that
    change an input do it by pointing a ``SOURCES`` entry at a scratch copy
    (monkeypatch). So while ``SOURCES`` is the committed mapping the dozen tests that
    read the macros share one run (about 15 s each on 2 cores); otherwise every call
    runs ``collect`` afresh. A test that changed anything else (the sweep's table, a
    study) would have to call ``collect`` itself: the cache does not see it.
    """
    from paper import _sources
    from paper._generate import collect

    if _sources.SOURCES == _COMMITTED_SOURCES:
        return dict(_committed_macros())
    return collect()[0]


@functools.lru_cache(maxsize=1)
def _committed_macros():
    from paper._generate import collect

    return tuple(collect()[0].items())


def _committed_sources():
    from paper import _sources

    return dict(_sources.SOURCES)


_COMMITTED_SOURCES = _committed_sources()  # at import, before any test patches it


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
    # claims documented as false that still fail: the report's count, not the tags (the
    # abstract said 5 beside the report's 3, two tags being stale: a review)
    assert macros["val.theory.knownfail"] == str(report["meta"]["n_known_failures"])


def test_the_paper_refuses_a_negative_control_s_report(tmp_path, capsys):
    """``python -m paper --report`` took a negative control's report and showed the
    broken method's verdicts beside the method's figures, exit 0 (a review)."""
    sys.path.insert(0, str(ROOT))
    from paper.__main__ import main

    control = ROOT / "validation" / "controls" / "random-subspace" / "report.json"
    code = main(["--scale", "small", "--report", str(control), "--out-dir",
                 str(tmp_path), "--only", "stability"])
    assert code == 2
    assert "negative control 'random-subspace'" in capsys.readouterr().err
    assert not (tmp_path / "verdicts.md").exists()


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


def test_solver_table_names_the_version_it_was_measured_with():
    """The solver table's caption names the clairstat version its section of
    benchmarks/RESULTS.md states before the table (the table is older than the code)."""
    macros = _macros()
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    before_table = text[:text.index("| torch s |")]
    stated = re.findall(r"clairstat (\d+\.\d+\.\d+(?:\.?[a-z]+\d*)?)", before_table)
    assert stated and macros["bench.solver.version"] == stated[-1]
    # and the commit, where the section states one (a development version names no code)
    commits = re.findall(r"at commit\s+([0-9a-f]{7,})", before_table)
    assert commits and macros["bench.solver.commit"] == commits[-1]


def test_device_macros_are_the_committed_table():
    """The torch-device ratios, read by plain splitting of the table's lines: those of
    the run the LLM-scale paragraph quotes (the first device table after the first
    target table), not an older run's."""
    macros = _macros()
    lines = (ROOT / "benchmarks" / "RESULTS.md").read_text().splitlines()
    target = next(i for i, line in enumerate(lines) if "| two QRs (s, median of 3) |" in line)
    start = next(i for i, line in enumerate(lines)
                 if i > target and "| end to end / default's |" in line)
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        rows[cells[0]] = float(cells[3])
    assert _agrees(_as_float(macros["bench.device.f64.ratio"]), rows["torch cpu float64"])
    assert _agrees(_as_float(macros["bench.device.f32.ratio"]), rows["torch cpu float32"])


def test_calibration_macros_are_the_csv():
    """The development table with the frame of robust scales (``calib.*``) and before it
    (``calibplain.*``)."""
    import pandas as pd

    macros = _macros()
    for name, prefix in (("real_data_calibration_frame.csv", "calib"),
                         ("real_data_calibration.csv", "calibplain")):
        table = pd.read_csv(ROOT / "benchmarks" / "results" / name)
        for path, tag in (("default", "default"), ("noise_cov", "noisecov")):
            null = table[(table.path == path) & (table.corruption == "none")]
            assert macros[f"{prefix}.all.{tag}.splits"] == str(len(null))
            assert macros[f"{prefix}.all.{tag}.null"] == f"{null.any_flag.mean():.3f}"
            fair = table[(table.path == path) & (table.dataset == "fair")
                         & (table.corruption == "flip")]
            assert macros[f"{prefix}.fair.{tag}.powerflip"] == (
                f"{fair.victims_flagged.sum() / fair.n_victims.sum():.2f}")


def test_frame_heldout_macros_are_the_csvs():
    """The frame's held-out run against the plain statistic on the same splits: the
    datasets meeting the criteria counted from the raw rows."""
    import pandas as pd

    macros = _macros()
    if macros.get("calibhof.has") != "1":
        pytest.skip("the frame's held-out tables are not committed")
    results = ROOT / "benchmarks" / "results"
    for name, prefix in (("real_data_calibration_heldout_all_frame_reviewed.csv", "calibhof"),
                         ("real_data_calibration_heldout_all_frame.csv", "calibhofpre"),
                         ("real_data_calibration_heldout_all_plain.csv", "calibhofplain")):
        table = pd.read_csv(results / name)
        table = table[table.path == "default"]
        met = 0
        for dataset, group in table.groupby("dataset"):
            kinds = ["scale", "flip"] + (["replace"] if group.q.iloc[0] > 1 else [])
            power = [group[group.corruption == k].victims_flagged.sum()
                     / group[group.corruption == k].n_victims.sum() for k in kinds]
            null = group[group.corruption == "none"].any_flag.mean()
            met += bool(null <= 0.10 and min(power) >= 0.8)
        assert macros[f"{prefix}.default.met"] == str(met)


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


def _rounds_rows():
    """The multi-round table the paper quotes, and its scale: of full and small, the
    one whose least-run cell has more replicates (full on a tie), only the replicates of
    that scale's grid."""
    from simulations import get_study

    study = get_study("copying_rounds")
    found = []
    for scale in ("full", "small"):
        path = ROOT / "simulations" / "results" / scale / "copying_rounds.jsonl"
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            wanted = {(task[0], task[1]) for task in study.tasks(scale)}
            rows = [r for r in rows if (r["cell"], r["replicate"]) in wanted]
            depth = min(len({r["replicate"] for r in rows if r["cell"] == cell})
                        for cell, _ in wanted)
            if rows:
                found.append((depth, scale == "full", rows, scale))
    if not found:
        pytest.skip("no multi-round results committed")
    _, _, rows, scale = max(found, key=lambda item: item[:2])
    return rows, scale


def _pct_prefix(value):
    """How ``fmt_pct`` starts: ``+3.2`` or ``\\ensuremath{-}7.5``, then the unit."""
    return f"{value:+.1f}".replace("-", r"\ensuremath{-}") + r"\,\%"


def test_rounds_macros_are_the_results_table():
    """Two rounds numbers recomputed from the raw rows by plain loops: CLAIR's mean gain
    in one cell, and its flag share among the clean clients of the clean design."""
    rows, scale = _rounds_rows()
    macros = _macros()
    assert macros["rounds.scale"] == scale
    cell = [r for r in rows if (r["design"], r["setting"]) == ("contaminated", "homogeneous")]
    gain = 100 * sum(r["rel_clair"] for r in cell) / len(cell)
    assert macros["rounds.contaminated.homogeneous.clair.gain"].startswith(_pct_prefix(gain))
    flags = [r[f"flagged_clair_c{k}"] for r in rows if r["design"] == "clean"
             for k in range(r["n_clients"]) if r[f"kind_c{k}"] == "benign"]
    share = sum(flags) / len(flags)
    assert macros["rounds.clean.benign"].startswith(f"{share:.2f} [")
    replicates = {}
    for r in rows:
        replicates.setdefault((r["design"], r["setting"]), set()).add(r["replicate"])
    assert macros["rounds.replicates"] == str(min(len(v) for v in replicates.values()))


def test_changing_the_rounds_table_changes_its_macros(tmp_path, monkeypatch):
    """Edit a copy of the multi-round table: the macros follow; remove it: the section
    is switched off and its table not written (the text skips it)."""
    from paper import _sources
    from paper._generate import write_generated

    rows, scale = _rounds_rows()
    for row in rows:
        if (row["design"], row["setting"]) == ("contaminated", "homogeneous"):
            row["rel_clair"] += 0.5  # +50 points of gain in every replicate
        if row["design"] == "clean":  # every clean client flagged
            row.update({f"flagged_clair_c{k}": True for k in range(row["n_clients"])})
    (tmp_path / scale).mkdir()
    (tmp_path / scale / "copying_rounds.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in rows))
    monkeypatch.setitem(_sources.SOURCES, "copying", tmp_path)
    macros = _macros()
    cell = [r for r in rows if (r["design"], r["setting"]) == ("contaminated", "homogeneous")]
    gain = 100 * sum(r["rel_clair"] for r in cell) / len(cell)
    assert macros["rounds.contaminated.homogeneous.clair.gain"].startswith(_pct_prefix(gain))
    assert macros["rounds.clean.benign"] == "1.00 [1.00, 1.00]"

    (tmp_path / scale / "copying_rounds.jsonl").unlink()
    macros = _macros()
    assert macros["rounds.has"] == "0"
    assert macros["rounds.prev.has"] == "0"  # no current table to set beside the archived
    assert not any(key.startswith("rounds.") and key not in ("rounds.has", "rounds.prev.has")
                   for key in macros)
    written = write_generated(tmp_path / "generated")
    assert "copying_rounds.tex" not in {path.name for path in written}
    assert r"\copyroundsfalse" in (tmp_path / "generated" / "macros.tex").read_text()


def _rdet_rows():
    path = ROOT / "simulations" / "results" / "small" / "rounds_detection.jsonl"
    if not path.exists():
        pytest.skip("no per-round results committed")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_rounds_detection_macros_are_the_results_table():
    """The per-round counts recomputed from the raw rows by plain loops, per block and
    arm (the confirmation block and the interventions kept apart)."""
    from paper import _generate, _sources

    rows = _rdet_rows()
    macros = _generate.rounds_detection_macros(*_sources.read_rounds(study="rounds_detection"))
    main = [r for r in rows if r["seed_block"] == "rounds_detection"]
    plain = [r for r in main if "intervention" not in r]
    clean = [r for r in plain if r["design"] == "clean"]
    last = min(r["rounds"] for r in rows)
    share = (sum(r["module_benign_any_r1"] for r in clean)
             / sum(r["modules_r1"] for r in clean))
    assert macros["rdet.module.first"].startswith(f"{share:.2f} [")
    assert macros["rdet.clean.nrep"] == str(len(clean))
    assert macros["rdet.clean.anyrep.last"] == str(
        sum(r[f"client_benign_r{last}"] > 0 for r in clean))
    assert macros["rdet.clean.kept"] == str(sum(r[f"client_kept_flag_r{t}"] for r in clean
                                                for t in range(2, last + 1)))
    option = [r for r in main if r.get("intervention") == "flagged-get-global"
              and r["design"] == "clean"]
    assert macros["rdet.global.clean.anyrep.last"] == str(
        sum(r[f"client_benign_r{last}"] > 0 for r in option))
    assert macros["rdet.global.clean.anyrep.max"] == str(max(
        sum(r[f"client_benign_r{t}"] > 0 for r in option) for t in range(1, last + 1)))
    confirm = [r for r in rows if r["seed_block"] == "rounds_detection_confirm"]
    if macros["rdet.confirm.has"] == "1":
        arm = [r for r in confirm if r.get("intervention") == "flagged-get-global"
               and r["design"] == "clean"]
        flagged = sum(r[f"client_benign_r{last}"] > 0 for r in arm)
        assert macros["rdet.confirm.c1"] == ("met" if flagged <= 2 else "not met")


def test_the_confirmation_waits_for_its_whole_block():
    """Verdicts from a part of the confirmation block would be read as the criteria's."""
    import pandas as pd

    from paper import _generate

    rows = [r for r in _rdet_rows() if r["seed_block"] == "rounds_detection_confirm"]
    if not rows:
        pytest.skip("no confirmation rows committed")
    frame = pd.DataFrame(rows)
    arm = frame["intervention"].fillna("none") if "intervention" in frame else \
        pd.Series("none", index=frame.index)
    partial = frame.index[frame["replicate"] < frame["replicate"].max()]
    assert _generate._rounds_confirmation_macros(frame.loc[partial], arm.loc[partial]) == {
        "rdet.confirm.has": "0"}
    one_arm = frame.index[arm == "none"]
    assert _generate._rounds_confirmation_macros(frame.loc[one_arm], arm.loc[one_arm]) == {
        "rdet.confirm.has": "0"}


def test_lora_null_macros_are_the_committed_tables():
    """Read by plain splitting: the row of 16 clients and nu = 128 of the first table,
    and the independent-factor row of 16 clients of the second (previous null, then
    the package's)."""
    from paper._generate import lora_null_macros

    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    if "lora_null_calibration.py" not in text:
        pytest.skip("no LoRA null benchmark committed")
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
             if line.startswith("| 16 | 128 |") or line.startswith("| independent | 16 |")]
    macros = lora_null_macros(text)
    assert macros["bench.loranull.a16prev"] == cells[0][3]
    assert macros["bench.loranull.a16"] == cells[0][4]
    assert macros["bench.loranull.b16prev"] == cells[1][3]
    assert macros["bench.loranull.b16"] == cells[1][4]


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


# Numbers the text may type outside mathematics, each with its reason. Any other digit
# in the prose is a result or a design parameter typed by hand: it belongs in a macro.
TYPED = {
    r"95\%": "the confidence level of every interval",
    r"5\%": "the test level, a default of the method",
    r"50\%": "the contour that defines the recovery boundary",
    "1/2": "the same contour, as a rate",
    "1-Lipschitz": "a property of the gradient",
    "at 1.": "the step that the block-incoherence condition predicts",
    "below 1": "where a ratio means an improvement",
    "(0 is": "the end of the rotation-strength axis",
    "by 3": "the calibration benchmark's scale corruption (a constant of its script, "
            "not in its CSV)",
    "7B-shaped": "the whole-model benchmark's shapes (its own table)",
    "rank-16": "the whole-model benchmark's adapters (its own table)",
    "bf16": "the whole-model benchmark's dtype",
    "0.2.0": "the version of the superseded LoRA benchmark",
}


def test_text_types_no_number_but_the_listed():
    """Outside mathematics, \res{...} and layout commands, every digit of the body is
    one of TYPED: no result and no design size is typed into the prose."""
    body = TEX.read_text().split(r"\begin{document}", 1)[1]
    body = re.sub(r"(?<!\\)%.*", "", body)  # comments
    body = re.sub(r"\\begin\{equation\}.*?\\end\{equation\}|\\\[.*?\\\]|\$[^$]*\$", "",
                  body, flags=re.S)  # mathematics: formulas and the method's constants
    body = re.sub(r"\\(res|obs|verdict|ref|label|eqref|citep|citet|includegraphics"
                  r"|restable|multicolumn|cmidrule|setlength)\{[^}]*\}"
                  r"|\\(begin|end)\{[^}]*\}(\{[^}]*\})?|\\\\\[[^\]]*\]", "", body)
    body = re.sub(r"\\\w+\[[^\]]*\]|\{\d+pt\}|\(lr\)\{[\d-]+\}|\{\d\}\{c\}", "", body)
    for allowed in TYPED:
        body = body.replace(allowed, "")
    typed = re.findall(r".{0,30}(?<![\w\\])\d.{0,20}", body)
    assert not typed, typed


# Numbers the mathematics may type: the method's constants, each checked against the
# code. Any other decimal (or number of two digits or more) in a formula is a result
# typed by hand (a review: the two tests above strip the mathematics, so "$0.176$"
# passed them).
MATH_TYPED = {"1.1": ("clairstat/_detection.py", "edge = 1.1 * noise_scale"),
              "0.37": ("clairstat/_null.py", "MAD_EFFICIENCY = 0.37")}


def test_mathematics_types_no_number_but_the_method_s_constants():
    body = TEX.read_text().split(r"\begin{document}", 1)[1]
    body = re.sub(r"(?<!\\)%.*", "", body)  # comments
    maths = re.findall(r"\\begin\{equation\}.*?\\end\{equation\}|\\\[.*?\\\]|\$[^$]*\$",
                       body, flags=re.S)
    # a number after "{" counts too ("$\\frac{0.176}{1}$" passed a first version)
    typed = {number for formula in maths
             for number in re.findall(r"(?<![\w.\\])(?:\d+\.\d+|\d{2,})",
                                      re.sub(r"\\(res|label|ref|eqref)\{[^}]*\}", "",
                                             formula))}
    assert typed <= set(MATH_TYPED), sorted(typed - set(MATH_TYPED))
    for path, line in MATH_TYPED.values():  # the constants are the code's
        assert line in (ROOT / path).read_text(), (path, line)


def _paired_rows(before, after):
    """``(old, new)`` rows of two tables of the same cells and replicates (same seeds)."""
    rows = {name: {(r["cell"], r["replicate"]): r for r in
                   map(json.loads, path.read_text().splitlines())}
            for name, path in (("before", before), ("after", after))}
    pairs = [(old, rows["after"][key]) for key, old in rows["before"].items()]
    assert all(old["seed"] == new["seed"] for old, new in pairs)
    return pairs


def _clair_gain(row):
    """CLAIR's mean relative gain over local LoRA (%) over a row's benign clients."""
    benign = [k for k in range(row["n_clients"]) if row[f"kind_c{k}"] == "benign"]
    return 100 * sum(row[f"acc_clair_c{k}"] / row[f"acc_local_c{k}"] - 1
                     for k in benign) / len(benign)


def test_quarantine_macros_are_the_two_tables():
    """The development block before and after the quarantine, replicate by replicate:
    CLAIR's mean gain difference per setting recomputed by plain loops."""
    before = ROOT / "simulations" / "results" / "archive" / "copying_small_before_quarantine.jsonl"
    after = ROOT / "simulations" / "results" / "archive" / "copying_small_quarantine.jsonl"
    if not after.exists():  # the quarantine's table, until the study is rerun on the clip
        after = ROOT / "simulations" / "results" / "small" / "copying.jsonl"
    if not (before.exists() and after.exists()):
        pytest.skip("no archived development block")
    pairs = _paired_rows(before, after)
    macros = _macros()
    assert macros["copy.quarantine.has"] == "1"
    for setting in ("homogeneous", "heterogeneous"):
        diffs = [_clair_gain(new) - _clair_gain(old) for old, new in pairs
                 if old["setting"] == setting]
        shown = macros[f"copy.quarantine.{setting}.diff"].replace(r"\ensuremath{-}", "-")
        assert float(shown.split()[0]) == pytest.approx(sum(diffs) / len(diffs), abs=0.006)


def test_null_change_macros_are_the_two_tables():
    """The development block before and after the predictive LoRA null, replicate by
    replicate: the largest change of CLAIR's gain and the count of changed client flags
    recomputed by plain loops."""
    archive = ROOT / "simulations" / "results" / "archive"
    before = archive / "copying_small_clip_previous_null.jsonl"
    # the predictive null's rows, archived when the joint rank's default changed (the
    # rerun after that is the rank change's, not the null's)
    after = archive / "copying_small_one_standard_error.jsonl"
    if not after.exists():
        after = ROOT / "simulations" / "results" / "small" / "copying.jsonl"
    if not (before.exists() and after.exists()):
        pytest.skip("no archived development block")
    macros = _macros()
    assert macros["copy.nullchange.has"] == "1"
    largest, changed = 0.0, 0
    for old, new in _paired_rows(before, after):
        largest = max(largest, abs(_clair_gain(new) - _clair_gain(old)))
        changed += sum(old[c] != new[c] for c in old if c.startswith("flagged_clair"))
    assert float(macros["copy.nullchange.maxdiff"]) == pytest.approx(largest, abs=0.006)
    assert (macros["copy.nullchange.flags"] == "not one client flag changed") == (changed == 0)



def test_rank_change_macros_are_the_two_tables():
    """The development block before and after the smallest-error joint rank became the
    default, replicate by replicate: CLAIR's mean gain change per setting, the largest
    change, the replicates whose joint rank changed and the changed client flags,
    recomputed by plain loops (the null's change is not mixed in: ``before`` is the
    rows of the predictive null with the one-standard-error rule)."""
    before = (ROOT / "simulations" / "results" / "archive"
              / "copying_small_one_standard_error.jsonl")
    after = ROOT / "simulations" / "results" / "small" / "copying.jsonl"
    if not (before.exists() and after.exists()):
        pytest.skip("no archived development block")
    macros = _macros()
    assert macros["copy.rankchange.has"] == "1"
    largest, changed, diffs, ranks = 0.0, 0, {}, {}
    for old, new in _paired_rows(before, after):
        diff = _clair_gain(new) - _clair_gain(old)
        largest = max(largest, abs(diff))
        diffs.setdefault(old["setting"], []).append(diff)
        ranks.setdefault(old["setting"], []).append(old["rank_clair"] != new["rank_clair"])
        changed += sum(old[c] != new[c] for c in old if c.startswith("flagged_clair"))
    assert float(macros["copy.rankchange.maxdiff"]) == pytest.approx(largest, abs=0.006)
    assert (macros["copy.rankchange.flags"] == "not one client flag changed") == (changed == 0)
    for setting, values in diffs.items():
        shown = macros[f"copy.rankchange.{setting}.diff"].replace(r"\ensuremath{-}", "-")
        assert float(shown.split()[0]) == pytest.approx(sum(values) / len(values), abs=0.006)
        assert macros[f"copy.rankchange.{setting}.nrank"] == str(sum(ranks[setting]))


def test_rank_rule_macros_follow_the_rows_commits():
    """``copy.ranknew.<study>`` (the text then names the smallest-error joint rank) is
    ``1`` exactly when git places every row's commit at or after the rule's change, and
    a study made before it is listed as not rerun."""
    from paper._generate import NULL_STUDIES, RANK_RULE_COMMIT
    from paper._sources import commit_relation

    macros = _macros()
    for study, scale, words in NULL_STUDIES:
        path = ROOT / "simulations" / "results" / scale / f"{study}.jsonl"
        if study == "copying_joint_rank" or not path.exists():
            continue
        commits = {json.loads(line).get("code_commit")
                   for line in path.read_text().splitlines()}
        relations = {commit_relation(RANK_RULE_COMMIT, commit) for commit in commits}
        if None in relations:
            pytest.skip("a row's commit cannot be placed (no git history)")
        assert macros[f"copy.ranknew.{study}"] == ("1" if relations == {True} else "0")
        assert (words in macros["copy.rankchange.stale"]) == (False in relations), study


def test_the_multikrum_comparison_is_quoted_only_whole(tmp_path, monkeypatch):
    """PROTOCOL amendment 8: the comparison is read only when a row that reproduces the
    table's replicate (seed, the gains of CLAIR and the registered rules, local LoRA's
    accuracy, to the script's tolerances) is in for
    every replicate of the fifth block; its differences, verdicts and the rules' f and m
    are the rows' and the script's (synthetic rows: two replicates per setting)."""
    from paper import _sources
    from paper._generate import MULTIKRUM_RULES, multikrum_macros

    script = _sources._load_script("copying_multikrum")
    block = tmp_path / "results" / "full"
    block.mkdir(parents=True)
    gains = {"homogeneous": (3.0, 4.0), "heterogeneous": (2.0, -14.0)}  # CLAIR, rules
    table = [{"setting": s, "replicate": r, "seed": 100 * r + len(s),
              "rel_clair": (gains[s][0] + 0.1 * r) / 100, "rel_krum": gains[s][1] / 100,
              "rel_trimmed_mean": gains[s][1] / 100, "acc_local": 0.9}
             for s in ("homogeneous", "heterogeneous") for r in range(2)]
    (block / "copying.jsonl").write_text("".join(json.dumps(r) + "\n" for r in table))
    rows = [{"block": "full", "setting": r["setting"], "replicate": r["replicate"],
             "seed": r["seed"], "code_commit": "abc1234" if r["replicate"] else "def5678",
             "acc_local": r["acc_local"],
             "gains": {"clair": 100 * r["rel_clair"],
                       **{rule: gains[r["setting"]][1] for rule in script.RULES}}}
            for r in table]
    scores = tmp_path / "copying_multikrum.jsonl"
    monkeypatch.setitem(_sources.SOURCES, "copying", tmp_path / "results")
    monkeypatch.setitem(_sources.SOURCES, "multikrum", scores)

    def write(lines):
        scores.write_text("".join(json.dumps(r) + "\n" for r in lines))

    write(rows[:-1])
    assert _sources.read_multikrum() == (None, None)  # one replicate missing
    write(rows[:-1] + [dict(rows[-1], seed=rows[-1]["seed"] + 1)])
    assert _sources.read_multikrum() == (None, None)  # another seed: not this block
    stale = dict(rows[-1], gains=dict(rows[-1]["gains"], clair=9.0))
    write(rows[:-1] + [stale])
    assert _sources.read_multikrum() == (None, None)  # CLAIR of other code: stale
    write(rows[:-1] + [dict(rows[-1], acc_local=0.8)])
    assert _sources.read_multikrum() == (None, None)  # other fine-tuned adapters
    write(rows[:-1] + [stale, rows[-1]])  # a rescore after a stale row replaces it
    macros = multikrum_macros(*_sources.read_multikrum())
    assert macros["mk.has"] == "1" and macros["mk.n"] == "2"
    assert macros["mk.commits"] == r"commits \code{abc1234} and \code{def5678}"
    assert macros["mk.hom.m10.diff"].startswith(r"\ensuremath{-}0.95")  # 3.05 - 4.0
    assert macros["mk.het.m10.diff"].startswith("+16.05")
    assert (macros["mk.hom.m10.verdict"], macros["mk.het.f4.verdict"]) == ("behind",
                                                                         "ahead")
    assert macros["mk.hom.m10.below"] == "2"
    assert (macros["mk.hom.behind"], macros["mk.het.behind"]) == ("1", "0")
    assert macros["mk.hom.undecided"] == "0"  # behind one configuration: not undecided
    for key, rule in MULTIKRUM_RULES.items():  # f and m as the script configures them
        options = script.RULES[rule][1]
        assert macros[f"mk.{key}.m"] == str(options["multi"])
        f = options.get("n_byzantine")
        if f is None:  # krum's own default for 16 clients, asked of the rule itself
            from clairstat.aggregation._robust import krum

            import numpy as np

            rng = np.random.default_rng(0)
            factors = [(rng.normal(size=(3, 1)), rng.normal(size=(1, 2))) for _ in range(16)]
            f = krum(factors, np.ones(16) / 16, multi=options["multi"]).n_byzantine
        assert macros[f"mk.{key}.f"] == str(f)


def test_no_detection_macros_are_the_two_tables():
    """What the tests add: the no-detection control's development table against the
    default's on the same seeds, CLAIR's gain and its change per setting and the mean
    joint ranks, recomputed by plain loops."""
    normal = ROOT / "simulations" / "results" / "small" / "copying.jsonl"
    pooled = (ROOT / "simulations" / "results" / "controls" / "no-detection" / "small"
              / "copying.jsonl")
    if not (normal.exists() and pooled.exists()):
        pytest.skip("no development block or no control table")
    macros = _macros()
    assert macros["copy.nodetect.has"] == "1"
    by_setting = {}
    for old, new in _paired_rows(normal, pooled):
        assert old["code_commit"] == new["code_commit"]  # only the tests differ
        entry = by_setting.setdefault(old["setting"], {"gain": [], "diff": [], "rank": [],
                                                       "rankpooled": []})
        entry["gain"].append(_clair_gain(new))
        entry["diff"].append(_clair_gain(new) - _clair_gain(old))
        entry["rank"].append(old["rank_clair"])
        entry["rankpooled"].append(new["rank_clair"])
    for setting, entry in by_setting.items():
        for key in ("gain", "diff"):
            shown = macros[f"copy.nodetect.{setting}.{key}"].replace(r"\ensuremath{-}", "-")
            mean = sum(entry[key]) / len(entry[key])
            assert float(shown.split()[0]) == pytest.approx(mean, abs=0.006)
        for key in ("rank", "rankpooled"):
            mean = sum(entry[key]) / len(entry[key])
            assert float(macros[f"copy.nodetect.{setting}.{key}"]) == pytest.approx(mean,
                                                                                 abs=0.06)


def _clip_minus_quarantine(path):
    """Per cell of a copying_flagged table, every replicate's clip - quarantine gain
    (points), by plain loops over the benign clients' accuracies."""
    diffs = {}
    for r in map(json.loads, path.read_text().splitlines()):
        benign = [k for k in range(r["n_clients"]) if r[f"kind_c{k}"] == "benign"]
        gain = {p: 100 * sum(r[f"acc_{p}_c{k}"] / r[f"acc_local_c{k}"] - 1 for k in benign)
                / len(benign) for p in ("clip", "quarantine")}
        short = "het" if r["setting"] == "heterogeneous" else "hom"
        diffs.setdefault(f"flagged.{short}{r['n_clients']}", []).append(
            gain["clip"] - gain["quarantine"])
    return diffs


def test_flagged_macros_are_the_table():
    """The clip-vs-quarantine comparison: the quoted table (full once complete, else the
    development one) and its per-cell mean difference by plain loops over the benign
    clients' accuracies."""
    root = ROOT / "simulations" / "results"
    macros = _macros()
    paths = [root / scale / "copying_flagged.jsonl" for scale in ("full", "small")]
    if not any(path.exists() for path in paths):
        pytest.skip("no copying_flagged table")
    assert macros["flagged.has"] == "1"
    path = paths[0] if macros["flagged.full"] == "1" else paths[1]
    archived = root / "archive" / "copying_flagged_full_amendment3.jsonl"
    if macros["flagged.full"] == "1" and archived.exists():
        path = archived  # the pre-registered run, rerun since: its verdicts are quoted
        assert macros["flagged.rerun.has"] == "1"
        rerun = _clip_minus_quarantine(paths[0])
        for key, values in rerun.items():
            shown = macros[key.replace("flagged.", "flagged.rerun.") + ".diff"]
            shown = shown.replace(r"\ensuremath{-}", "-")
            assert float(shown.split()[0]) == pytest.approx(sum(values) / len(values),
                                                            abs=0.006)
        # the rerun's commit is its rows', not a constant of the generator
        commits = {json.loads(line)["code_commit"]
                   for line in paths[0].read_text().splitlines()}
        assert macros["flagged.rerun.commit"] == ", ".join(sorted(commits))
    diffs = _clip_minus_quarantine(path)
    for key, values in diffs.items():
        shown = macros[f"{key}.diff"].replace(r"\ensuremath{-}", "-")
        assert float(shown.split()[0]) == pytest.approx(sum(values) / len(values), abs=0.006)
    assert macros["flagged.replicates"] == str(min(len(v) for v in diffs.values()))
    from paper._sources import read_flagged
    from simulations.studies.copying_flagged import verdicts

    decided = verdicts(read_flagged()[0])
    assert [macros[f"{key}.verdict"] for key in ("flagged.het16", "flagged.het8",
                                                  "flagged.hom16")] == \
        decided["verdict"].tolist()[:3]
    assert macros["flagged.allpass"] == ("1" if (decided["verdict"] == "pass").all()
                                         else "0")


def test_a_partial_flagged_comparison_is_not_quoted(tmp_path):
    """The pre-registered comparison is quoted only once every replicate is in: with a
    part of it, the complete development table is quoted instead."""
    from paper._sources import read_flagged

    small = ROOT / "simulations" / "results" / "small" / "copying_flagged.jsonl"
    if not small.exists():
        pytest.skip("no development table")
    from simulations.studies.copying_flagged import STUDY

    lines = small.read_text().splitlines()
    full = [json.loads(line) for line in lines[:5]]  # as rows of the full grid's cells
    for row, (cell, replicate, params, seed) in zip(full, STUDY.tasks("full")):
        row.update(params, cell=cell, replicate=replicate, seed=seed)
    for scale, rows in (("small", lines), ("full", [json.dumps(r) for r in full])):
        (tmp_path / scale).mkdir()
        (tmp_path / scale / "copying_flagged.jsonl").write_text("\n".join(rows) + "\n")
    from simulations import load_results

    assert len(load_results(STUDY, "full", tmp_path, current_only=True)) == 5  # of the grid
    frame, scale = read_flagged(tmp_path)
    assert scale == "small" and len(frame) == len(lines)
    complete = []  # every replicate of the full grid (rows reused): quoted as full
    for k, (cell, replicate, params, seed) in enumerate(STUDY.tasks("full")):
        row = json.loads(lines[k % len(lines)])
        row.update(params, cell=cell, replicate=replicate, seed=seed)
        complete.append(json.dumps(row))
    (tmp_path / "full" / "copying_flagged.jsonl").write_text("\n".join(complete) + "\n")
    frame, scale = read_flagged(tmp_path)
    assert scale == "full" and len(frame) == len(STUDY.tasks("full"))
    for scale in ("small", "full"):
        (tmp_path / scale / "copying_flagged.jsonl").unlink()
    assert read_flagged(tmp_path) == (None, None)


def test_a_rerun_with_the_clipping_is_not_read_as_the_quarantine(tmp_path, monkeypatch):
    """The development block rerun on the clipping default (its rows say so) is not the
    table after the quarantine: the before/after comparison is then not quoted."""
    from paper import _sources

    before = ROOT / "simulations" / "results" / "archive" / "copying_small_before_quarantine.jsonl"
    after = ROOT / "simulations" / "results" / "small" / "copying.jsonl"
    if not (before.exists() and after.exists()):
        pytest.skip("no archived development block")
    (tmp_path / "archive").mkdir()
    (tmp_path / "small").mkdir()
    (tmp_path / "archive" / before.name).write_bytes(before.read_bytes())
    monkeypatch.setitem(_sources.SOURCES, "copying", tmp_path)
    rows = [json.loads(line) for line in after.read_text().splitlines()]
    for stand_in, quoted in (("quarantine", True), ("clip", False)):
        (tmp_path / "small" / after.name).write_text("".join(
            json.dumps(dict(r, clair_stand_in=stand_in)) + "\n" for r in rows))
        old, new = _sources.read_quarantine()
        assert old is not None and (new is not None) == quoted


def test_sweep_quarantine_macros_are_the_two_tables():
    """The sweep before and after the quarantine: the number of design points and the
    largest mean fall of CLAIR's gain, by plain loops."""
    before = ROOT / "simulations" / "results" / "archive" / \
        "copying_sweep_small_before_quarantine.jsonl"
    after = ROOT / "simulations" / "results" / "archive" / "copying_sweep_small_quarantine.jsonl"
    if not after.exists():  # the quarantine's table, until the sweep is rerun on the clip
        after = ROOT / "simulations" / "results" / "small" / "copying_sweep.jsonl"
    if not (before.exists() and after.exists()):
        pytest.skip("no archived sweep")
    old = {(r["cell"], r["replicate"]): r for r in map(json.loads, before.read_text().splitlines())}
    diffs, shares = {}, {}
    for r in map(json.loads, after.read_text().splitlines()):
        key = (r["setting"], r["n_clients"], r["n_contaminated"])
        diffs.setdefault(key, []).append(100 * (r["rel_clair"]
                                                - old[(r["cell"], r["replicate"])]["rel_clair"]))
        shares[key] = r["contaminated_share"]
    means = {key: sum(v) / len(v) for key, v in diffs.items()}
    worst = min(means, key=means.get)
    macros = _macros()
    assert macros["copy.quarantine.sweep.npoints"] == str(len(means))
    shown = macros["copy.quarantine.sweep.worst.diff"].replace(r"\ensuremath{-}", "-")
    assert float(shown.split()[0]) == pytest.approx(means[worst], abs=0.06)
    assert macros["copy.quarantine.sweep.worst.clients"] == str(worst[1])
    # The point is named by the design's share, as the sweep's summary names its points
    # (sweep.sharelist): 3 of 8 clients is "40 %" in both sentences of the subsection.
    assert macros["copy.quarantine.sweep.worst.share"] == f"{round(100 * shares[worst])}\\,\\%"
    assert macros["copy.quarantine.sweep.worst.share"].split("\\")[0] in \
        macros["sweep.sharelist"]


def test_rounds_previous_macros_are_the_two_tables():
    """rounds_detection with the quarantine and the earlier null (archived) and as
    committed now, on the same seeds: the clean designs' mean gain change (default
    strategy) and the earlier table's last-round false alarms, by plain loops; the robust
    start's whole-variant difference."""
    before = ROOT / "simulations" / "results" / "archive" / \
        "rounds_detection_small_quarantine.jsonl"
    after = ROOT / "simulations" / "results" / "small" / "rounds_detection.jsonl"
    if not (before.exists() and after.exists()):
        pytest.skip("no archived rounds_detection table")
    old = {(r["cell"], r["replicate"]): r for r in map(json.loads, before.read_text().splitlines())}
    new = [json.loads(line) for line in after.read_text().splitlines()]
    from paper import _sources
    from paper._generate import CLIP_COMMIT

    if any(_sources.commit_relation(CLIP_COMMIT, r["code_commit"]) is None for r in new):
        pytest.skip("no git history to place the rows' commits (a shallow clone)")

    def default_clean(r):
        return (r["design"] == "clean" and r["seed_block"] == "rounds_detection"
                and (r.get("intervention") or "none") == "none")

    diffs = [100 * (r["rel_clair"] - old[(r["cell"], r["replicate"])]["rel_clair"])
             for r in new if default_clean(r)]
    assert len(diffs) == 40
    macros = _macros()
    assert macros["rdet.prev.has"] == "1"
    # the rows predate the clair_stand_in column: their commit says clipping
    assert macros["copy.clip.rounds_detection"] == "1"
    assert macros["rdet.commit"] == ", ".join(sorted({r["code_commit"] for r in new}))
    shown = macros["rdet.prev.clean.diff"].replace(r"\ensuremath{-}", "-")
    assert float(shown.split()[0]) == pytest.approx(sum(diffs) / len(diffs), abs=0.006)
    last = [r for r in old.values() if default_clean(r)]
    assert macros["rdet.prev.none.clean.anyrep.last"] == str(
        sum(r[f"client_benign_r{r['rounds']}"] > 0 for r in last))
    first = [r for r in old.values() if r["design"] == "clean"
             and r["seed_block"] == "rounds_detection"
             and (r.get("intervention") or "none") == "none"]
    share = sum(r["module_benign_any_r1"] for r in first) / sum(r["modules_r1"] for r in first)
    assert macros["rdet.prev.module.first"].startswith(f"{share:.2f} [")

    def groups(arm):
        return [r[f"module_group_r{r['rounds']}"] for r in new
                if r["design"] == "clean" and r["setting"] == "heterogeneous"
                and r["seed_block"] == "rounds_detection"
                and (r.get("intervention") or "none") == arm]

    with_start, without = groups("none"), groups("no-robust-start")
    diff = sum(with_start) / len(with_start) - sum(without) / len(without)
    shown = macros["rdet.norobust.group.diff"].replace(r"\ensuremath{-}", "-")
    assert float(shown.split()[0]) == pytest.approx(diff, abs=0.06)
    low, high = (float(x) for x in shown.split("[")[1].rstrip("]").split(","))
    assert low <= diff <= high


def test_a_later_confirmatory_block_quotes_the_earlier_ones_beside_it():
    """With a later confirmatory block committed and the earlier ones archived, the
    copying section names the block and quotes the earlier blocks' CLAIR gains,
    recomputed here by plain loops from the archived rows."""
    full = ROOT / "simulations" / "results" / "full" / "copying.jsonl"
    archive = ROOT / "simulations" / "results" / "archive"
    first = archive / "copying_full_before_quarantine.jsonl"
    second = archive / "copying_full_confirmatory2_quarantine.jsonl"
    if not (full.exists() and first.exists()):
        pytest.skip("no later confirmatory block committed")
    blocks = {json.loads(line)["seed_block"] for line in full.read_text().splitlines()}
    macros = _macros()
    if blocks == {"confirmatory-2"}:
        assert macros["copy.block"] == "second confirmatory" and macros["copy.second"] == "1"
        earlier = {"copy.first": first}
    elif blocks == {"confirmatory-3"}:
        assert second.exists()
        assert macros["copy.block"] == "third confirmatory" and macros["copy.third"] == "1"
        earlier = {"copy.first": first, "copy.secondblock": second}
    elif blocks == {"confirmatory-4"}:
        third = archive / "copying_full_confirmatory3_clip.jsonl"
        assert second.exists() and third.exists()
        assert macros["copy.block"] == "fourth confirmatory" and macros["copy.fourth"] == "1"
        earlier = {"copy.first": first, "copy.secondblock": second,
                   "copy.thirdblock": third}
    else:
        third = archive / "copying_full_confirmatory3_clip.jsonl"
        fourth = archive / "copying_full_confirmatory4_predictive.jsonl"
        assert blocks == {"confirmatory-5"} and second.exists() and third.exists()
        assert fourth.exists()
        assert macros["copy.block"] == "fifth confirmatory" and macros["copy.fifth"] == "1"
        earlier = {"copy.first": first, "copy.secondblock": second,
                   "copy.thirdblock": third, "copy.fourthblock": fourth}
    for prefix, path in earlier.items():
        assert macros[f"{prefix}.has"] == "1"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for setting in ("homogeneous", "heterogeneous"):
            gains = []
            for r in rows:
                if r["setting"] != setting:
                    continue
                benign = [k for k in range(r["n_clients"]) if r[f"kind_c{k}"] == "benign"]
                gains.append(100 * sum(r[f"acc_clair_c{k}"] / r[f"acc_local_c{k}"] - 1
                                       for k in benign) / len(benign))
            shown = macros[f"{prefix}.{setting}.clair.gain"]
            value = float(shown.replace(r"\ensuremath{-}", "-").split("\\")[0])
            assert value == pytest.approx(sum(gains) / len(gains), abs=0.06)


def test_heldout_calibration_macros_are_the_csvs():
    """The held-out paragraph's numbers, recomputed from the two held-out CSVs by plain
    pandas (not the paper's summary helpers)."""
    import pandas as pd

    results = ROOT / "benchmarks" / "results"
    heldout = pd.read_csv(results / "real_data_calibration_heldout.csv")
    given = pd.read_csv(results / "real_data_calibration_heldout_rank0.csv")
    macros = _macros()
    assert macros["calibho.has"] == "1"
    assert (given["rank_given"] == 0).all() and heldout["rank_given"].isna().all()
    for name in ("breast_cancer", "star98"):
        for path, tag in (("default", "default"), ("noise_cov", "noisecov")):
            null = heldout[(heldout.dataset == name) & (heldout.path == path)
                           & (heldout.corruption == "none")]
            assert macros[f"calibho.{name}.{tag}.null"] == f"{null.any_flag.mean():.3f}"
        powers = {}
        for kind in ("scale", "flip", "replace"):
            part = heldout[(heldout.dataset == name) & (heldout.path == "noise_cov")
                           & (heldout.corruption == kind)]
            powers[kind] = part.victims_flagged.sum() / part.n_victims.sum()
        low = min(powers, key=powers.get)
        assert macros[f"calibho.{name}.noisecov.power.min"] == f"{powers[low]:.2f}"
        part = given[(given.dataset == name) & (given.path == "noise_cov")
                     & (given.corruption == low)]
        assert macros[f"calibhorank.{name}.noisecov.power.atmin"] == (
            f"{part.victims_flagged.sum() / part.n_victims.sum():.2f}")


def test_later_heldout_macros_are_the_csvs():
    """The later held-out sets' paragraph (paper/_generate.py LATER_HELDOUT), recomputed
    from their CSVs by plain pandas: per-dataset null shares, the ranges of power over
    the datasets with the reversed outputs of single-output datasets left out (there
    they are not a corruption), and the pooled rows without them."""
    import pandas as pd

    from paper._generate import LATER_HELDOUT

    macros = _macros()
    assert macros["calibhoc.has"] == "1"
    for name, prefix in LATER_HELDOUT.items():
        table = pd.read_csv(ROOT / "benchmarks" / "results" / f"real_data_{name}.csv")
        powers = []
        for (dataset, path), group in table.groupby(["dataset", "path"]):
            tag = path.replace("_", "")
            null = group[group.corruption == "none"].any_flag.mean()
            assert macros[f"{prefix}.{dataset}.{tag}.null"] == f"{null:.3f}"
            kinds = ("scale", "flip") + (("replace",) if group.q.iloc[0] > 1 else ())
            for kind in kinds:
                part = group[group.corruption == kind]
                value = part.victims_flagged.sum() / part.n_victims.sum()
                if path == "noise_cov":
                    powers.append(value)
            if group.q.iloc[0] == 1:
                assert f"{prefix}.{dataset}.{tag}.powerreplace" not in macros
        assert macros[f"{prefix}.noisecov.power.min"] == f"{min(powers):.2f}"
        assert macros[f"{prefix}.noisecov.power.max"] == f"{max(powers):.2f}"
        if (table.q == 1).any():
            assert f"{prefix}.all.noisecov.powerreplace" not in macros
        if "rank_support" in table:
            assert macros[f"{prefix}.support"] == str(int(table.rank_support.iloc[0]))


def test_cycles_macros_are_the_rows():
    """The detection's cycles (benchmarks/copying_cycles.py): the 8-client recalls and
    the share of module fits that did not converge, by plain loops over the rows."""
    path = ROOT / "benchmarks" / "results" / "copying_cycles.jsonl"
    if not path.exists():
        pytest.skip("no copying_cycles table")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    macros = _macros()
    assert macros["cyc.has"] == "1"
    cell = [r for r in rows if r["n_clients"] == 8 and r["setting"] == "heterogeneous"]
    caught = {rule: sum(r[rule]["recall"] * r["attackers"] for r in cell) for rule in
              ("package", "rejections_count")}
    attackers = sum(r["attackers"] for r in cell)
    assert _as_float(macros["cyc.het8.recall"]) == pytest.approx(
        caught["package"] / attackers, abs=0.006)
    assert _as_float(macros["cyc.het8.recallrej"]) == pytest.approx(
        caught["rejections_count"] / attackers, abs=0.006)
    assert macros["cyc.het8.replicates"] == str(len(cell))
    assert macros["cyc.het8.mostmissed"] == (
        "1" if caught["rejections_count"] < attackers / 2 else "0")
    shares = []
    for key in {(r["setting"], r["n_clients"]) for r in rows}:
        sub = [r for r in rows if (r["setting"], r["n_clients"]) == key]
        shares.append(100 * sum(r["not_converged"] for r in sub)
                      / sum(r["modules"] for r in sub))
    assert _as_float(macros["cyc.notconv.low"]) == pytest.approx(min(shares), abs=0.5)
    assert _as_float(macros["cyc.notconv.high"]) == pytest.approx(max(shares), abs=0.5)


def test_multikrum_macros_are_the_committed_rows():
    """Amendment 8 as committed: each quoted difference is the mean over the block's
    rows of CLAIR's gain minus the rule's, by plain loops, and the verdict the script's
    rule gives on the quoted interval."""
    from paper._sources import _load_script, read_multikrum

    summary, _ = read_multikrum()
    if summary is None:
        pytest.skip("amendment 8's block is not complete")
    macros = _macros()
    assert macros["mk.has"] == "1"
    script = _load_script("copying_multikrum")
    path = ROOT / "benchmarks" / "results" / "copying_multikrum.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    latest = {(r["setting"], r["replicate"]): r for r in rows if r["block"] == "full"}
    for setting, short in (("homogeneous", "hom"), ("heterogeneous", "het")):
        for key, rule in (("m10", "multikrum_m10"), ("f4", "multikrum_f4_m12")):
            diffs = [r["gains"]["clair"] - r["gains"][rule]
                     for (s, _), r in latest.items() if s == setting]
            shown = macros[f"mk.{short}.{key}.diff"].replace(r"\ensuremath{-}", "-")
            mean, interval = shown.split(" ", 1)
            assert float(mean) == pytest.approx(sum(diffs) / len(diffs), abs=0.006)
            low, high = (float(v) for v in interval.strip("[]").split(","))
            assert macros[f"mk.{short}.{key}.verdict"] == script.decision(low, high)


def test_few_clients_frame_macros_are_the_csv(tmp_path):
    """``fewk.*`` (the path without a covariance at few synthetic clients): every macro
    recomputed here from the committed rows, cell by cell; without the table the
    paragraph is off."""
    import pandas as pd

    from paper._generate import few_clients_frame_macros

    macros = _macros()
    table = pd.read_csv(ROOT / "benchmarks" / "results" / "few_clients_frame.csv",
                        keep_default_na=False)

    def share(frame, spread, scenario, k, column):
        cell = table[(table.frame == frame) & (table.row_spread == spread)
                     & (table.scenario == scenario) & (table.n_clients == k)]
        assert len(cell) == 200
        return cell[column].mean()

    def span(values, decimals=3):
        low, high = f"{min(values):.{decimals}f}", f"{max(values):.{decimals}f}"
        return low if low == high else f"{low}--{high}"

    small, large = (4, 6, 7), (8, 12)  # below the few-clients warning's bound, and from it
    expected = {
        "fewk.has": "1", "fewk.reps": "200", "fewk.p": "5", "fewk.q": "2",
        "fewk.spreadfactor": "55", "fewk.large.from": "8", "fewk.small.list": "4, 6 or 7",
        "fewk.ratio.from": "6",
        "fewk.residual.alike.small.range": span(
            [share("residual", 0.0, "null", k, "other_flagged") for k in small]),
        "fewk.residual.alike.large.range": span(
            [share("residual", 0.0, "null", k, "other_flagged") for k in large]),
        "fewk.none.alike.small.range": span(
            [share("none", 0.0, "null", k, "other_flagged") for k in small]),
        "fewk.none.differ.power.max": "{:.3f}".format(max(
            share("none", 2.0, "shifted", k, "victim_flagged") for k in small + large)),
        "fewk.ratio.range": span(
            [share("data", 2.0, "shifted", k, "victim_flagged")
             / share("residual", 2.0, "shifted", k, "victim_flagged")
             for k in (6, 7, 8, 12)], 1),
    }
    assert {key: macros[key] for key in expected} == expected
    assert sorted(key for key in macros if key.startswith("fewk.")) == sorted(expected)
    assert few_clients_frame_macros(tmp_path / "missing.csv") == {"fewk.has": "0"}


def test_new_clients_macros_are_the_scripts_summary(tmp_path):
    """``newcl.*`` (new clients on real data): the pooled shares and the counts of
    datasets meeting the criteria are those of ``real_data_new_clients.summarize`` (the
    table of benchmarks/RESULTS.md, computed by the script's own code); the largest
    shares recomputed from the rows; without the table the paragraph is off."""
    import pandas as pd

    from paper._generate import new_clients_macros

    sys.path.insert(0, str(ROOT / "benchmarks"))
    script = pytest.importorskip("real_data_new_clients")
    path = ROOT / "benchmarks" / "results" / "real_data_new_clients.csv"
    summary = script.summarize(path)
    macros = _macros()
    table = pd.read_csv(path)
    for configuration, key in (("default", "default"), ("noise_cov", "noisecov"),
                               ("hc3_support3", "hcthreesupportthree")):
        pooled, met = re.search(rf"\| {configuration} \| ([\d.]+) \[[^|]*\| (\d+) of 18 \|",
                                summary).groups()
        assert macros[f"newcl.{key}.pooled"] == pooled
        assert macros[f"newcl.{key}.met"] == met
        shares = table[table.configuration == configuration].groupby(
            "dataset").flagged_none.mean()
        assert macros[f"newcl.{key}.max"] == f"{shares.max():.2f}"
        assert macros[f"newcl.{key}.maxdataset"] == shares.idxmax()
        rows = table[table.configuration == configuration]
        assert macros[f"newcl.{key}.meanrank"] == f"{rows['rank'].mean():.2f}"
        assert macros[f"newcl.{key}.support"] == str(
            script.CONFIGURATIONS[configuration][2])
        # the lowest power over the corruptions that are criteria (reversing one
        # output changes nothing), per dataset
        lowest = min(min(part[f"flagged_{kind}"].mean() for kind in
                         ("scale", "flip") + (("replace",) if part.q.iloc[0] > 1 else ()))
                     for _, part in rows.groupby("dataset"))
        assert macros[f"newcl.{key}.power.min"] == f"{lowest:.2f}"
    assert macros["newcl.fits"] == "1800" and macros["newcl.splits"] == "100"
    assert new_clients_macros(tmp_path / "missing.csv") == {"newcl.has": "0"}


def test_tilt_cap_macros_are_the_csv():
    """``tilt.*`` (the subspace's tilt bounded, and the recommended configuration's two
    parts one at a time): the datasets meeting the criteria per configuration and path,
    and the classical covariance's rows before and after, recomputed here from the
    committed rows."""
    import pandas as pd

    macros = _macros()
    results = ROOT / "benchmarks" / "results"

    def table(suffix):
        return pd.concat([pd.read_csv(results / f"real_data_calibration_{group}{suffix}.csv")
                          for group in ("", "heldout_all_", "heldout6_")], ignore_index=True)

    def met(frame, path):
        count = 0
        for _, group in frame[frame.path == path].groupby("dataset"):
            null = group[group.corruption == "none"].any_flag.mean()
            kinds = ["scale", "flip"] + ([] if (group.q == 1).all() else ["replace"])
            powers = [group[group.corruption == kind].victims_flagged.sum()
                      / group[group.corruption == kind].n_victims.sum() for kind in kinds]
            count += null <= 0.10 and min(powers) >= 0.8
        return str(count)

    configs = {"classicalbefore": "exact_spread", "classical": "tilt_cap",
               "recommendedbefore": "hc3_support3_exact_spread",
               "recommended": "hc3_support3_tilt_cap", "hcthree": "hc3_alone",
               "supportthree": "support3_alone"}
    tables = {key: table(suffix) for key, suffix in configs.items()}
    expected = {"tilt.has": "1", "tilt.cap": "100", "tilt.distance": "10", "tilt.datasets": "18"}
    for key, frame in tables.items():
        for path in ("default", "noise_cov"):
            expected[f"tilt.{key}.{path.replace('_', '')}.met"] = met(frame, path)
    keys = ["dataset", "split", "corruption", "path"]
    pair = tables["classicalbefore"].merge(tables["classical"], on=keys,
                                           suffixes=("_b", "_a"))
    cov = pair[pair.path == "noise_cov"]
    columns = ("any_flag", "false_flags", "victims_flagged", "rank")
    expected.update({
        "tilt.rows": str(len(cov)),
        "tilt.changed": str(sum(any(row[f"{c}_b"] != row[f"{c}_a"] for c in columns)
                                for _, row in cov.iterrows())),
        "tilt.victims.before": str(cov.victims_flagged_b.sum()),
        "tilt.victims.after": str(cov.victims_flagged_a.sum()),
        "tilt.falseflags.before": str(cov.false_flags_b.sum()),
        "tilt.falseflags.after": str(cov.false_flags_a.sum())})
    assert len(cov) == 18 * 100 * 4
    assert {key: macros[key] for key in expected} == expected


def test_current_calibration_macros_are_the_readme_table():
    """``calibnow.*`` (the current code on every real dataset, Table calibnow): a review
    found the paper's calibration tables made by superseded code, one captioned "by the
    current code". The macros must say what README.md's "Which configuration" table says
    (itself recomputed from the same committed rows by
    ``tests/test_doc_consistency.py``), per configuration: pooled null share and its
    splits, worst dataset's share, datasets meeting the criteria, lowest power."""
    macros = _macros()
    readme = (ROOT / "README.md").read_text()
    rows = {"recommended": "`local_ols(..., cov_type=\"HC3\")`",
            "classical": "`local_ols(...)` (classical covariance)",
            "nocov": "`CLAIREstimator().fit(estimates)` (no covariance)"}
    assert macros["calibnow.has"] == "1" and macros["calibnow.datasets"] == "18"
    assert macros["calibnow.support"] == "3" and macros["calibnow.covtype"] == "HC3"
    for tag, start in rows.items():
        line = next(line for line in readme.splitlines()
                    if line.startswith("| ") and f"| {start}" in line)
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        null, splits, worst = re.fullmatch(r"([\d.]+) of ([\d ]+) \(([\d.]+)\)",
                                           cells[2]).groups()
        assert macros[f"calibnow.{tag}.null"] == null, tag
        assert macros[f"calibnow.{tag}.splits"] == splits.replace(" ", ""), tag
        assert macros[f"calibnow.{tag}.worst"] == worst, tag
        assert macros[f"calibnow.{tag}.met"] == cells[3].split(" of ")[0], tag
        assert macros[f"calibnow.{tag}.lowest"] == cells[4], tag
    assert r"\restable{calibration_current}" in TEX.read_text()  # the table is shown


def test_the_title_names_the_commits_of_the_report_s_tables():
    """The title said "results of commit 28d6e31": the commit of a --no-run report,
    whose tables were written by five other commits (a review)."""
    report = json.loads((ROOT / "validation" / "report.json").read_text())
    commits = sorted({value for values in report["meta"]["table_commits"].values()
                      for value in values if value})
    shown = _macros()["val.tablecommits"]
    assert commits and all(commit in shown for commit in commits)
    title = TEX.read_text().split(r"\begin{document}")[0]
    assert r"\res{val.tablecommits}" in title and r"\res{valfull.tablecommits}" in title


def test_a_label_that_is_not_a_bare_commit_is_printed_whole():
    """Labels were cut to their first word: "no git checkout (code digest ...)" read
    "no", and two uncommitted states of one commit read as that commit (a review)."""
    from paper._generate import validation_macros

    report = json.loads((ROOT / "validation" / "report.json").read_text())
    labels = ["abc1234 with uncommitted changes in clairstat (digest 0123456789ab)",
              "no git checkout (code digest 0123456789ab)"]
    meta = dict(report["meta"], commit=labels[1],
                table_commits={"toy": labels, "other": ["abc1234"]})
    macros = validation_macros(dict(report, meta=meta))
    assert macros["val.commit"] == labels[1]
    assert macros["val.tablecommits"] == f"abc1234, {labels[0]} and {labels[1]}"


def test_the_copying_section_names_the_commit_of_its_rows():
    """The copying section said it "tests the library's default" 246 commits after the
    rows' code (a review): it names that code."""
    from paper._sources import copying_scale, read_copying

    scale = copying_scale()
    if scale is None:
        pytest.skip("no copying results committed")
    frame = read_copying(scale)
    shown = _macros()["copy.commits"]
    for commit in set(frame["code_commit"].dropna()):
        assert commit.split()[0] in shown

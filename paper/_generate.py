"""The manuscript's numbers and tables, written as LaTeX from the committed results.

``write_generated(out_dir)`` writes ``macros.tex`` (one ``\\setres{key}{value}`` per
number the text quotes; the text reads them with ``\\res{key}``, which stops the build on
an unknown key) and one ``.tex`` file per table. Nothing here is typed by hand: change a
result file, rebuild, and the PDF changes. The readers are in ``paper/_sources.py``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from . import _sources as src

__all__ = ["write_generated", "fmt", "fmt_pct", "tex_escape", "collect"]

def tex_escape(text):
    """Plain text made safe for LaTeX (the characters a check name or claim may hold)."""
    table = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
             "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
             "^": r"\textasciicircum{}"}
    return "".join(table.get(ch, ch) for ch in str(text))


def fmt(value, digits=3):
    """A number as LaTeX text with ``digits`` significant digits; powers of ten in math.

    Examples
    --------
    >>> fmt(0.041141), fmt(676.0), fmt(4.49e-16), fmt(float("inf"))
    ('0.0411', '676', '\\\\ensuremath{4.49\\\\times10^{-16}}', '\\\\ensuremath{\\\\infty}')
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "--"
    if isinstance(value, str):  # a report may hold a statistic as text
        return tex_escape(value)
    if isinstance(value, float) and math.isinf(value):
        return r"\ensuremath{\infty}" if value > 0 else r"\ensuremath{-\infty}"
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e6:
        return f"{int(value)}"
    text = f"{value:.{digits}g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        return rf"\ensuremath{{{mantissa}\times10^{{{int(exponent)}}}}}"
    return text.replace("-", "\\ensuremath{-}") if text.startswith("-") else text


def fmt_fixed(value, decimals=3):
    """A number with a fixed count of decimals (shares, rates), '--' for a missing one."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "--"
    text = f"{value:.{decimals}f}"
    if float(text) == 0:  # no "-0.0": a value that rounds to zero has no sign
        text = text.lstrip("-")
    return text.replace("-", "\\ensuremath{-}") if text.startswith("-") else text


def fmt_pct(value, decimals=1, sign=True):
    """A share as a percentage (``+2.5\\,\\%``), the sign shown when ``sign``."""
    text = f"{100 * value:+.{decimals}f}" if sign else f"{100 * value:.{decimals}f}"
    return text.replace("-", "\\ensuremath{-}") + r"\,\%"


def code_label(value):
    """A report's or a row's code label as the text prints it, whole: a bare commit, or
    the commit with its note of uncommitted changes, or an unversioned copy's digest
    (its first word alone made two uncommitted states one commit, and an unversioned
    copy "no", a review)."""
    return tex_escape(str(value).strip())


def fmt_list(values, unit=""):
    """Values as an English list: ``8, 16 and 32``; ``unit`` after the last one."""
    values = list(values)
    text = values[0] if len(values) == 1 else (", ".join(values[:-1]) + " and "
                                                + values[-1])
    return text + unit


def _margin(check):
    margin = src.check_margin(check)
    if margin is None:  # an older report: only the expected value, as text
        text = tex_escape(check.get("expected", ""))
        for plain, math_op in ((">=", r"$\geq$"), ("<=", r"$\leq$"), (">", "$>$"),
                               ("<", "$<$")):
            text = text.replace(plain, math_op) if "$" not in text else text
        return text
    low, high = margin
    if math.isinf(high):
        return rf"$\geq$ {fmt(low)}"
    if math.isinf(low):
        return rf"$\leq$ {fmt(high)}"
    return f"[{fmt(low)}, {fmt(high)}]"


def _claim_id(check):
    """'D3' from a source 'docs/theory.md#d3'; '' without one."""
    anchor = str(check.get("source") or "").rpartition("#")[2]
    return anchor.upper() if re.fullmatch(r"[a-z]\d+", anchor) else ""


VERDICT_TEX = {"pass": "pass", "inconclusive": r"\emph{inconclusive}",
               "fail": r"\textbf{fail}", "error": r"\textbf{error}"}


# ---------------------------------------------------------------- validation ----------

def validation_macros(report, prefix="val"):
    """Counts and, per check, observed value, interval, margin and verdict."""
    macros = {}
    checks = report["checks"]
    meta = report.get("meta", {})
    macros[f"{prefix}.scale"] = tex_escape(meta.get("scale", ""))
    macros[f"{prefix}.version"] = tex_escape(meta.get("clairstat_version", ""))
    macros[f"{prefix}.commit"] = code_label(meta.get("commit", ""))
    # the commits that wrote the report's tables (a --no-run report is written at a later
    # commit than its rows: the title named the report's commit alone, a review)
    table_commits = sorted({str(value).strip() for values in
                            meta.get("table_commits", {}).values() for value in values
                            if value})
    macros[f"{prefix}.tablecommits"] = (fmt_list([code_label(c) for c in table_commits])
                                        if table_commits else "not recorded")
    macros[f"{prefix}.replicates"] = fmt(sum(meta.get("replicates", {}).values()))
    macros[f"{prefix}.checks"] = fmt(len(checks))
    for kind in ("theory", "identity"):
        rows = [c for c in checks if src.check_kind(c) == kind]
        macros[f"{prefix}.{kind}.total"] = fmt(len(rows))
        for verdict in ("pass", "inconclusive", "fail", "error"):
            count = sum(src.check_verdict(c) == verdict for c in rows)
            macros[f"{prefix}.{kind}.{verdict}"] = fmt(count)
        # claims documented as false that the data still show false: a tag whose check
        # now passes or is undecided is stale (the report's stale_known_failures), not a
        # claim shown false (counted, the abstract said 5 beside 3 failures, a review)
        known = sum(bool(c.get("known_failure")) and src.check_verdict(c) == "fail"
                    for c in rows)
        macros[f"{prefix}.{kind}.knownfail"] = fmt(known)
        for verdict in ("inconclusive", "fail"):  # which checks, by name
            names = [rf"\code{{{tex_escape(c['name'])}}}" for c in rows
                     if src.check_verdict(c) == verdict]
            macros[f"{prefix}.{kind}.{verdict}.names"] = fmt_list(names) if names else "none"
    from validation.checks.recovery import SMALL_GAMMA, SMALL_RANK_FRACTION

    # The small corner of the recovery check (its definition, not a result).
    macros[f"{prefix}.corner.gamma"] = fmt(SMALL_GAMMA)
    macros[f"{prefix}.corner.rank"] = fmt(SMALL_RANK_FRACTION)
    for check in checks:
        key = f"{prefix}.{check['name']}"
        macros[f"{key}.observed"] = fmt(check.get("observed"))
        interval = check.get("interval") or [math.nan, math.nan]
        macros[f"{key}.lo"], macros[f"{key}.hi"] = fmt(interval[0]), fmt(interval[1])
        macros[f"{key}.margin"] = _margin(check)
        macros[f"{key}.verdict"] = VERDICT_TEX.get(src.check_verdict(check), "?")
        macros[f"{key}.n"] = fmt(check.get("n"))
    return macros


# Claims in the order of docs/theory.md: exact and stable recovery, detection, refinement,
# FedRot-LoRA, GLoRA, robust aggregation; checks without a claim id last.
CLAIM_ORDER = "ESDRFGB"


def _claim_order(check):
    claim = _claim_id(check)
    if not claim or claim[0] not in CLAIM_ORDER:
        return (len(CLAIM_ORDER), 0)
    return (CLAIM_ORDER.index(claim[0]), int(claim[1:]))


def verdict_table(report, kind):
    """The checks of one ``kind`` as the body rows of a LaTeX table, in claim order."""
    lines = []
    checks = sorted(report["checks"], key=_claim_order)  # stable: report order within
    for check in checks:
        if src.check_kind(check) != kind:
            continue
        interval = check.get("interval") or [math.nan, math.nan]
        shown_false = r"$^\dagger$" if check.get("known_failure") else ""
        name = tex_escape(check["name"]).replace(r"\_", r"\_\allowbreak{}")
        lines.append(" & ".join([
            _claim_id(check), rf"\texttt{{{name}}}", _margin(check),
            fmt(check.get("observed")), f"[{fmt(interval[0])}, {fmt(interval[1])}]",
            fmt(check.get("n")),
            VERDICT_TEX.get(src.check_verdict(check), "?") + shown_false]) + r" \\")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- benchmarks ----------

SOLVER_COLUMNS = ("p", "q", "K", "torch s", "CVXPY s", "CVXPY/torch")
LORA_COLUMNS = ("d", "K", "r", "variant", "seconds", "recall", "false flags")


def solver_rows(text):
    """The solver benchmark's rows (floats; nan where CVXPY was not run)."""
    rows = src.find_table(text, *SOLVER_COLUMNS) or []
    keep = ("p", "q", "K", "torch s", "CVXPY s", "CVXPY/torch", "torch rel. gap",
            "CVXPY rel. gap", "iters", "torch objective", "CVXPY objective")
    return [{k: src.number(row.get(k, "")) for k in keep} for row in rows]


def lora_rows(text):
    """The LoRA benchmark's rows (size, variant, seconds, recall, false flags)."""
    rows = src.find_table(text, *LORA_COLUMNS) or []
    return [{"d": src.number(r["d"]), "K": src.number(r["K"]), "r": src.number(r["r"]),
             "variant": r["variant"], "seconds": src.number(r["seconds"]),
             "recall": src.number(r["recall"]), "false": src.number(r["false flags"])}
            for r in rows]


def _size_key(row, names):
    return "-".join(str(int(row[n])) for n in names)


def lora_scale_macros(text):
    """The LLM-scale LoRA benchmark (target ratio, K scaling) and the whole-model command
    line benchmark, from their tables in ``benchmarks/RESULTS.md`` (empty if absent)."""
    macros = {}
    target = src.find_table(text, "two QRs (s, median of 3)", "end to end (s, median of 2)")
    for row in target or []:
        key = "one" if src.number(row["n_jobs"]) == 1 else "default"
        for col, short in (("two QRs (s, median of 3)", "qr"),
                           ("end to end (s, median of 2)", "e2e"), ("ratio", "ratio"),
                           ("ratio of minima", "ratiomin"),
                           ("recall", "recall"), ("false flags", "false")):
            macros[f"bench.lorascale.{key}.{short}"] = fmt(src.number(row[col]))
        bases = "the package's two bases (s, median of 3)"
        if bases in row:  # runs since the package computes its bases by CholeskyQR
            macros[f"bench.lorascale.{key}.bases"] = fmt(src.number(row[bases]))
        for col in ("d", "K", "r"):
            macros[f"bench.lorascale.{col}"] = fmt(src.number(row[col]))
        verdict = [value for name, value in row.items() if re.fullmatch(r"<=\s*[\d.]+", name)]
        if verdict:  # the table's own verdict on the target, in words
            macros[f"bench.lorascale.{key}.verdict"] = (
                "met" if verdict[0].strip().lower() == "met" else "not met")
    slopes = src.find_table(text, "log-log slope over K", "value")
    for row in slopes or []:
        name = {"end to end": "e2e", "two QRs": "qr"}.get(row["log-log slope over K"])
        if name:
            macros[f"bench.lorascale.slope.{name}"] = fmt(src.number(row["value"]))
    whole = [row for header, rows in src.markdown_tables(text)
             if {"path", "modules", "peak RSS (MiB)"} <= set(header)
             for row in rows if "streamed" in row["path"]]
    if whole:
        # The streamed runs with the most clients, then the most modules: the first in
        # the file (the latest), the last (the oldest: before the memory release) and,
        # with three or more, the second (the run before the latest).
        size = max((src.number(r["clients"]), src.number(r["modules"])) for r in whole)
        largest = [r for r in whole
                   if (src.number(r["clients"]), src.number(r["modules"])) == size]
        chosen = [("bench.whole", largest[0])]
        if len(largest) >= 2:
            chosen.append(("bench.whole.before", largest[-1]))
        if len(largest) >= 3:
            chosen.append(("bench.whole.previous", largest[1]))
        for prefix, row in chosen:
            for col, short in (("modules", "modules"), ("clients", "clients"),
                               ("wall time (s)", "wall"), ("per module (s)", "permodule"),
                               ("peak RSS (MiB)", "rss")):
                # whole seconds for the wall time (4273.1 s, not 4.27e3)
                value = src.number(row[col])
                macros[f"{prefix}.{short}"] = fmt(round(value) if short == "wall" else value)
    return macros


def device_macros(text):
    """The LoRA path on a torch device, on the CPU: each variant's end-to-end time over
    the numpy reference's (``benchmarks/lora_benchmark.py``, part 3; empty if absent).

    The table of the run the LLM-scale macros quote (the first such table after that
    run's target table), so that the paragraph quoting both speaks of one run; else the
    first in the file (``--torch-only``)."""
    tables = src.markdown_tables(text)
    columns = ("end to end / default's", "two bases (s)")
    device = [i for i, (header, _) in enumerate(tables) if all(c in header for c in columns)]
    target = next((i for i, (header, _) in enumerate(tables)
                   if "two QRs (s, median of 3)" in header), None)
    after = [i for i in device if target is not None and i > target]
    chosen = after[0] if after else (device[0] if device else None)
    rows = tables[chosen][1] if chosen is not None else []
    names = {"torch cpu float64": "f64", "torch cpu float32": "f32"}
    return {f"bench.device.{names[row[next(iter(row))]]}.ratio":
            fmt(src.number(row["end to end / default's"]))
            for row in rows if row[next(iter(row))] in names}


def lora_target_macros(text):
    """The LLM-scale benchmark's target ratio, read from its table's ``<= N`` column."""
    for header, _ in src.markdown_tables(text):
        if "two QRs (s, median of 3)" in header:
            for name in header:
                match = re.fullmatch(r"<=\s*([\d.]+)", name)
                if match:
                    return {"bench.lorascale.target": fmt(float(match.group(1)))}
    return {}


def solver_version(text):
    """The clairstat version the solver benchmark's table was measured with, as its
    section of ``benchmarks/RESULTS.md`` states it before the table (or None)."""
    head = text[:text.find("| torch s |")] if "| torch s |" in text else ""
    found = re.findall(r"clairstat (\d+\.\d+\.\d+[\w.]*)", head)
    return found[-1] if found else None


def solver_commit(text):
    """The commit the solver benchmark's table was measured at, as its section states it
    before the table ("at commit <hash>"), or None: a development version names no code
    (a review)."""
    head = text[:text.find("| torch s |")] if "| torch s |" in text else ""
    found = re.findall(r"at commit\s+([0-9a-f]{7,40})\b", head)
    return found[-1] if found else None


def benchmark_macros(text):
    """Solver and LoRA benchmark numbers; 'largest' keys follow the table's last rows."""
    macros = {}
    version = solver_version(text)
    if version:
        macros["bench.solver.version"] = version
    commit = solver_commit(text)
    if commit:
        macros["bench.solver.commit"] = commit
    solver = solver_rows(text)
    for row in solver:
        key = f"bench.solver.{_size_key(row, ('p', 'q', 'K'))}"
        macros[f"{key}.torch"] = fmt(row["torch s"])
        macros[f"{key}.cvxpy"] = fmt(row["CVXPY s"])
        macros[f"{key}.ratio"] = fmt(row["CVXPY/torch"])
    both = [r for r in solver if not math.isnan(r["CVXPY s"])]
    for name, row in (("maxcvxpy", both[-1] if both else None),
                      ("largest", solver[-1] if solver else None)):
        if row is None:
            continue
        for col, short in (("p", "p"), ("q", "q"), ("K", "K"), ("torch s", "torch"),
                           ("CVXPY s", "cvxpy"), ("CVXPY/torch", "ratio"),
                           ("torch rel. gap", "torchgap"), ("CVXPY rel. gap", "cvxpygap"),
                           ("iters", "iters")):
            macros[f"bench.solver.{name}.{short}"] = fmt(row[col], 3)
        macros[f"bench.solver.{name}.qK"] = fmt(row["q"] * row["K"])
    if both:
        macros["bench.solver.ratio.min"] = fmt(min(r["CVXPY/torch"] for r in both))
        macros["bench.solver.ratio.max"] = fmt(max(r["CVXPY/torch"] for r in both))
        gaps = [r[c] for r in solver for c in ("torch rel. gap", "CVXPY rel. gap")
                if not math.isnan(r[c])]
        macros["bench.solver.gap.max"] = fmt(max(gaps), 2)
    lora = lora_rows(text)
    if lora:
        top = max(r["d"] for r in lora)
        for row in (r for r in lora if r["d"] == top):
            variant = re.sub(r"[^a-z]", "", row["variant"].lower())
            key = f"bench.lora.largest.{variant}"
            macros[f"{key}.seconds"] = fmt(row["seconds"])
            macros[f"{key}.recall"] = fmt_fixed(row["recall"], 2)
            macros[f"{key}.false"] = fmt(row["false"])
            macros["bench.lora.largest.d"], macros["bench.lora.largest.K"] = (
                fmt(row["d"]), fmt(row["K"]))
            macros["bench.lora.largest.r"] = fmt(row["r"])
        times = {re.sub(r"[^a-z]", "", r["variant"].lower()): r["seconds"]
                 for r in lora if r["d"] == top}
        if {"permodule", "permodulebackbone"} <= set(times):
            macros["bench.lora.largest.ratio"] = fmt(times["permodulebackbone"]
                                                     / times["permodule"], 3)
    return macros


CONCURRENCY_COLUMNS = ("setting", "threads", "second fit running", "median s")


def concurrency_macros(text):
    """A fit's median time alone and beside a second fit, per thread policy (the first
    concurrency table of the benchmarks); nothing when that table is absent."""
    rows = src.find_table(text, *CONCURRENCY_COLUMNS) or []
    # "yes" in the earlier tables, "in another process" since the thread cell was added
    times = {(r["setting"], {"in another process": "yes"}.get(r["second fit running"],
                                                              r["second fit running"])):
             src.number(r["median s"]) for r in rows}
    macros = {}
    for setting in ("policy", "unpinned"):
        alone, beside = times.get((setting, "no")), times.get((setting, "yes"))
        if alone is None or beside is None:
            continue
        macros[f"bench.conc.{setting}.alone"] = fmt(alone)
        macros[f"bench.conc.{setting}.beside"] = fmt(beside)
        macros[f"bench.conc.{setting}.slowdown"] = fmt(beside / alone, 2)
    if {"bench.conc.policy.beside", "bench.conc.unpinned.beside"} <= set(macros):
        macros["bench.conc.ratio"] = fmt(times[("unpinned", "yes")]
                                         / times[("policy", "yes")], 3)
    return macros


def lora_null_macros(text):
    """The LoRA null benchmark (``benchmarks/lora_null_calibration.py``): the share of
    replicates with any rejection at 16 clients, for exactly chi^2_128 statistics
    (``bench.loranull.a16``, and ``.a16prev`` under the null before the predictive one)
    and for a module with independent factors (``bench.loranull.b16``, ``.b16prev``);
    nothing when its tables are absent."""
    clients, nu = 16, 128  # the copying task's clients per round; nu below the cap
    macros = {}
    columns = {"": "package", "prev": "previous"}
    exact = src.find_table(text, "clients", "nu", "any rejection, package") or []
    for row in exact:
        if src.number(row["clients"]) == clients and src.number(row["nu"]) == nu:
            for tag, which in columns.items():
                macros[f"bench.loranull.a16{tag}"] = tex_escape(row[f"any rejection, {which}"])
    synthetic = src.find_table(text, "noise", "clients", "any flag, package") or []
    for row in synthetic:
        if row["noise"] == "independent" and src.number(row["clients"]) == clients:
            for tag, which in columns.items():
                macros[f"bench.loranull.b16{tag}"] = tex_escape(row[f"any flag, {which}"])
    if macros:
        macros.update({"bench.loranull.clients": fmt(clients), "bench.loranull.nu": fmt(nu)})
    return macros


def solver_table(text):
    lines = []
    for r in solver_rows(text):
        lines.append(" & ".join([fmt(r["p"]), fmt(r["q"]), fmt(r["K"]), fmt(r["torch s"]),
                                 fmt(r["CVXPY s"]), fmt(r["CVXPY/torch"]),
                                 fmt(r["torch rel. gap"], 2), fmt(r["CVXPY rel. gap"], 2),
                                 fmt(r["iters"])]) + r" \\")
    return "\n".join(lines) + "\n"


def lora_table(text):
    lines = []
    for r in lora_rows(text):
        lines.append(" & ".join([fmt(r["d"]), fmt(r["K"]), fmt(r["r"]),
                                 tex_escape(r["variant"]), fmt(r["seconds"]),
                                 fmt_fixed(r["recall"], 2), fmt(r["false"])]) + r" \\")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- calibration ---------

def calibration_macros(rows, prefix="calib"):
    """Per dataset and path (``<prefix>.<dataset>.<path>.null`` ...), the number of
    datasets, and per path the range of the power and the largest null share with its
    dataset (``<prefix>.<path>.null.max``, ``.null.maxdataset``)."""
    macros = {}
    for row in rows:
        key = f"{prefix}.{row['dataset']}.{row['path'].replace('_', '')}"
        macros[f"{key}.null"] = fmt_fixed(row["null"])
        macros[f"{key}.lo"], macros[f"{key}.hi"] = fmt_fixed(row["lo"]), fmt_fixed(row["hi"])
        macros[f"{key}.splits"] = fmt(row["splits"])
        for kind in ("scale", "flip", "replace"):
            if f"power_{kind}" in row:
                macros[f"{key}.power{kind}"] = fmt_fixed(row[f"power_{kind}"], 2)
    per_dataset = [r for r in rows if r["dataset"] != "all"]
    macros[f"{prefix}.datasets"] = fmt(len({r["dataset"] for r in per_dataset}))
    for path in {r["path"] for r in per_dataset}:
        tag = path.replace("_", "")
        worst = max((r for r in per_dataset if r["path"] == path), key=lambda r: r["null"])
        macros[f"{prefix}.{tag}.null.max"] = fmt_fixed(worst["null"])
        macros[f"{prefix}.{tag}.null.maxdataset"] = tex_escape(worst["dataset"])
        powers = [v for r in per_dataset if r["path"] == path
                  for k, v in r.items() if k.startswith("power_")]
        if powers:
            macros[f"{prefix}.{tag}.power.min"] = fmt_fixed(min(powers), 2)
            macros[f"{prefix}.{tag}.power.max"] = fmt_fixed(max(powers), 2)
    return macros


def calibration_design_macros(table, prefix="calib"):
    """Clients per split and corrupted clients per power run (the benchmark's design)."""
    corrupted = table[table["corruption"] != "none"]
    macros = {f"{prefix}.clients": fmt_list(sorted({fmt(int(v)) for v in table["n_clients"]},
                                                   key=int))}
    if len(corrupted):
        macros[f"{prefix}.victims"] = fmt_list(sorted({fmt(int(v)) for v in
                                                       corrupted["n_victims"]}, key=int))
    return macros


def heldout2_macros(table):
    """The second held-out pair (``calibhob.*``; ``calibhob.has``, the paragraph's
    switch), and per dataset the share of the default path's corrupted fits whose rank
    equals the number of outputs (``calibhob.<dataset>.default.fullrank``: the rank rule
    kept every output direction)."""
    if table is None:
        return {"calibhob.has": "0"}
    macros = {"calibhob.has": "1"}
    macros.update(calibration_macros(src.calibration_summary(table), "calibhob"))
    for name, group in table.groupby("dataset"):
        macros[f"calibhob.{name}.clients"] = fmt(int(group["n_clients"].iloc[0]))
        fits = group[(group["path"] == "default") & (group["corruption"] != "none")]
        if len(fits):
            macros[f"calibhob.{name}.default.fullrank"] = fmt_fixed(
                float((fits["rank"] == fits["q"]).mean()), 2)
    return macros


#: The later held-out sets' tables and their macro prefixes (``<prefix>.has`` switches
#: the paragraph on when every one of them is committed).
LATER_HELDOUT = {"calibration_heldout3": "calibhoc",
                 "calibration_heldout4_support3": "calibhod",
                 "calibration_heldout4": "calibhodrule",
                 "calibration_heldout5_hc3_support3": "calibhoe",
                 "calibration_heldout5": "calibhoeclassic",
                 "calibration_heldout5_hc3": "calibhoehc"}


def _corruption_rows(table):
    """``_sources.calibration_summary`` without the reversed outputs
    of a single-output dataset (reversing one output leaves the estimate as it is: not a
    corruption, and no criterion)."""
    rows = src.calibration_summary(table)
    single = set(table.loc[table["q"] == 1, "dataset"])
    for row in rows:
        # the pooled rows too: their reversed outputs would average in the non-corruptions
        if row["dataset"] in single or (single and row["dataset"] == "all"):
            row.pop("power_replace", None)
    return rows


def later_heldout_macros(tables):
    """The later held-out sets (``LATER_HELDOUT``: ``<prefix>.<dataset>.<path>.null``,
    ``<prefix>.<path>.power.min`` ... as :func:`calibration_macros`, reversed outputs of
    single-output datasets left out) and ``calibhoc.has``, on when all are committed."""
    if any(tables.get(name) is None for name in LATER_HELDOUT):
        return {"calibhoc.has": "0"}
    macros = {"calibhoc.has": "1"}
    for name, prefix in LATER_HELDOUT.items():
        macros.update(calibration_macros(_corruption_rows(tables[name]), prefix))
        if "rank_support" in tables[name]:  # the estimator's rank_support of the run
            macros[f"{prefix}.support"] = fmt(int(tables[name]["rank_support"].iloc[0]))
    return macros


#: The sixth held-out set's tables and their macro prefixes (``calibhog.has`` switches
#: its paragraph on when both are committed).
SIXTH_HELDOUT = {"calibration_heldout6_hc3_support3": "calibhog",
                 "calibration_heldout6": "calibhogclassic"}


def sixth_heldout_macros(tables):
    """The sixth held-out set (``calibhog.*``, HC3 with ``rank_support``; ``calibhogclassic.*``,
    the package's defaults): as :func:`calibration_macros`, the datasets meeting the
    criteria per run and path (``<prefix>.<path>.met``), the clients per dataset
    (``calibhog.<dataset>.clients``), ``calibhog.support`` and ``calibhog.has``."""
    if any(tables.get(name) is None for name in SIXTH_HELDOUT):
        return {"calibhog.has": "0"}
    macros = {"calibhog.has": "1"}
    for name, prefix in SIXTH_HELDOUT.items():
        rows = _corruption_rows(tables[name])
        macros.update(calibration_macros(rows, prefix))
        for path in ("default", "noise_cov"):
            macros[f"{prefix}.{path.replace('_', '')}.met"] = fmt(_criteria_met(rows, path))
    first = tables["calibration_heldout6_hc3_support3"]
    macros["calibhog.support"] = fmt(int(first["rank_support"].iloc[0]))
    for name, group in first.groupby("dataset"):
        macros[f"calibhog.{name}.clients"] = fmt(int(group["n_clients"].iloc[0]))
    return macros


#: The regression check of the spread matched exactly: the recommended configuration
#: (HC3, ``rank_support=3``) and the defaults on every real dataset after the change
#: (``calibev.has``), the same before it, and the defaults under the variant tried and
#: dropped (the spread gated and not widened in the first round, commit 605c774).
EVIDENCE_AFTER = ("calibration_hc3_support3_exact_spread",
                  "calibration_heldout_all_hc3_support3_exact_spread",
                  "calibration_heldout6_hc3_support3_exact_spread")
EVIDENCE_DEFAULTS = ("calibration_exact_spread", "calibration_heldout_all_exact_spread",
                     "calibration_heldout6_exact_spread")
EVIDENCE_BEFORE = ("calibration_hc3_support3", "calibration_heldout_hc3_support3",
                   "calibration_heldout2_hc3_support3", "calibration_heldout3_hc3_support3",
                   "calibration_heldout4_hc3_support3", "calibration_heldout5_hc3_support3",
                   "calibration_heldout6_hc3_support3")
EVIDENCE_DEFAULTS_BEFORE = ("calibration", "calibration_heldout_all_frame",
                            "calibration_heldout6")
EVIDENCE_GATED = ("calibration_evidence", "calibration_heldout_all_evidence",
                  "calibration_heldout6_evidence")
EVIDENCE = {"calibev": EVIDENCE_AFTER, "calibevdefault": EVIDENCE_DEFAULTS,
            "calibevbefore": EVIDENCE_BEFORE, "calibevdefaultbefore": EVIDENCE_DEFAULTS_BEFORE,
            "calibevgated": EVIDENCE_GATED}


def _joined(tables, names):
    import pandas as pd

    return pd.concat([tables[name] for name in names], ignore_index=True)


def evidence_macros(tables):
    """The regression check (prefixes of :data:`EVIDENCE`: ``calibev`` the recommended
    configuration after the change, ``calibevbefore`` before it, ``calibevdefault`` and
    ``calibevdefaultbefore`` the defaults after and before, ``calibevgated`` the defaults
    under the dropped variant) as :func:`calibration_macros`, with the datasets meeting
    the criteria per path (``<prefix>.<path>.met``) and ``calibev.has``; and the after
    table's rows of the covariance path."""
    names = [name for group in EVIDENCE.values() for name in group]
    if any(tables.get(name) is None for name in names):
        return {"calibev.has": "0"}, None
    macros = {"calibev.has": "1"}
    # the splits run after the change (the development data's earlier runs have 250)
    splits = _joined(tables, EVIDENCE_AFTER)[["dataset", "split"]].drop_duplicates()
    after, nulls = None, {}
    for prefix, group in EVIDENCE.items():
        table = _joined(tables, group).merge(splits, on=["dataset", "split"])
        rows = [r for r in _corruption_rows(table) if r["dataset"] != "all"]
        macros.update(calibration_macros(rows, prefix))
        for path in ("default", "noise_cov"):
            macros[f"{prefix}.{path.replace('_', '')}.met"] = fmt(_criteria_met(rows, path))
        nulls[prefix] = {r["dataset"]: r["null"] for r in rows if r["path"] == "default"}
        if prefix == "calibev":
            after = [r for r in rows if r["path"] == "noise_cov"]
    # the dropped variant's largest rise of a null share without a covariance
    before, gated = nulls["calibevdefaultbefore"], nulls["calibevgated"]
    worst = max(gated, key=lambda name: gated[name] - before[name])
    macros["calibevgated.rise.dataset"] = tex_escape(worst)
    macros["calibevgated.rise.before"] = fmt_fixed(before[worst])
    macros["calibevgated.rise.after"] = fmt_fixed(gated[worst])
    return macros, after


def exchangeable_macros(path):
    """The alike-clients check (``exnull.*``; ``exnull.has`` 0 where the table is not
    committed): per variant and path the share of null splits with a flag per dataset
    (``.ds.<name>``), pooled (``.pooled``; without star98 ``.nostar.pooled``; over the
    datasets with the fewest clients ``.fewest.pooled`` and the others ``.more.pooled``),
    its largest value, and how many datasets are at most ``MAX_NULL_SHARE``."""
    import pandas as pd

    if not path.exists():
        return {"exnull.has": "0"}
    table = pd.read_csv(path)
    max_null, _ = src.calibration_criteria()
    macros = {"exnull.has": "1", "exnull.datasets": fmt(table.dataset.nunique()),
              "exnull.splits": fmt(int(table.groupby("dataset").split.nunique().min()))}
    for (variant, path_), group in table.groupby(["variant", "path"]):
        key = f"exnull.{variant}.{path_.replace('_', '')}"
        shares = group.groupby("dataset").any_flag.mean()
        macros[f"{key}.pooled"] = fmt_fixed(group.any_flag.mean())
        macros[f"{key}.met"] = fmt(int((shares <= max_null).sum()))
        for name, value in shares.items():
            macros[f"{key}.ds.{name}"] = fmt_fixed(value, 2)
        macros[f"{key}.nostar.pooled"] = fmt_fixed(
            group[group.dataset != "star98"].any_flag.mean())
        fewest = group.n_clients == group.n_clients.min()
        macros[f"{key}.fewest.pooled"] = fmt_fixed(group[fewest].any_flag.mean())
        macros[f"{key}.more.pooled"] = fmt_fixed(group[~fewest].any_flag.mean())
        macros[f"{key}.max"] = fmt_fixed(shares.max(), 2)
    from clairstat import CLAIREstimator

    macros["exnull.maxnull"] = fmt_fixed(max_null, 2)
    macros["exnull.level"] = fmt_fixed(CLAIREstimator().test_level, 2)
    macros["exnull.fewest"] = fmt(int(table.n_clients.min()))
    macros["exnull.fewest.datasets"] = fmt(
        table[table.n_clients == table.n_clients.min()].dataset.nunique())
    return macros


def calibration_cost_macros(path):
    """What the calibration of a right covariance costs (``calcost.*``; ``calcost.has``
    0 where the table is not committed): per calibration (``package``, ``none``) the
    range over the two variants of the clean splits' share with a flag and of the
    shifted client's share flagged."""
    import pandas as pd

    if not path.exists():
        return {"calcost.has": "0"}
    table = pd.read_csv(path)
    macros = {"calcost.has": "1", "calcost.splits": fmt(int(table.split.nunique()))}
    for calibration, group in table.groupby("calibration"):
        for kind, column, name in (("clean", "any_flag", "null"),
                                   ("shift", "victim_flagged", "power")):
            shares = group[group.kind == kind].groupby("variant")[column].mean()
            low, high = fmt_fixed(shares.min()), fmt_fixed(shares.max())
            macros[f"calcost.{calibration}.{name}.lo"] = low
            macros[f"calcost.{calibration}.{name}.hi"] = high
            # one number where both variants give it, else the range
            macros[f"calcost.{calibration}.{name}.range"] = (
                low if low == high else f"{low}--{high}")
    return macros


def new_clients_macros(path):
    """New clients on real data (``newcl.*``; ``newcl.has`` 0 where the table is not
    committed): per configuration (``default``, ``noisecov``, ``hcthreesupportthree``)
    the pooled share of benign new clients flagged (``.pooled``), the number of
    datasets meeting both criteria (``.met``), the largest share and its dataset
    (``.max``, ``.maxdataset``), the lowest power over the corruptions that are
    criteria (``.power.min``), the mean fitted rank (``.meanrank``) and the
    configuration's ``rank_support`` (``.support``); the datasets, splits per dataset
    and fits per configuration."""
    import pandas as pd

    if not path.exists():
        return {"newcl.has": "0"}
    table = pd.read_csv(path)
    max_null, min_power = src.calibration_criteria()
    macros = {"newcl.has": "1", "newcl.datasets": fmt(table.dataset.nunique()),
              "newcl.splits": fmt(int(table.groupby("dataset").split.nunique().min())),
              "newcl.fits": fmt(int(table.groupby("configuration").size().min()))}
    for configuration, group in table.groupby("configuration"):
        key = "newcl." + configuration.replace("_", "").replace("3", "three")
        met, lowest = 0, []
        for _, rows in group.groupby("dataset"):
            kinds = ["scale", "flip"] + (["replace"] if rows.q.iloc[0] > 1 else [])
            power = min(rows[f"flagged_{kind}"].mean() for kind in kinds)
            lowest.append(power)
            met += bool(rows.flagged_none.mean() <= max_null and power >= min_power)
        shares = group.groupby("dataset").flagged_none.mean()
        macros.update({f"{key}.pooled": fmt_fixed(group.flagged_none.mean()),
                       f"{key}.meanrank": fmt_fixed(group["rank"].mean(), 2),
                       f"{key}.support": fmt(int(group.rank_support.iloc[0])),
                       f"{key}.met": fmt(met), f"{key}.max": fmt_fixed(shares.max(), 2),
                       f"{key}.maxdataset": tex_escape(str(shares.idxmax())),
                       f"{key}.power.min": fmt_fixed(min(lowest), 2)})
    return macros


def _range(values, decimals=3):
    """``lo--hi`` of ``values`` as fixed decimals, one number where they agree."""
    low, high = fmt_fixed(min(values), decimals), fmt_fixed(max(values), decimals)
    return low if low == high else f"{low}--{high}"


#: The fewest clients from which the paper quotes the data frame's power over the
#: package's (few_clients_frame_macros).
RATIO_FROM = 6


def few_clients_frame_macros(path):
    """The path without a covariance at few synthetic clients and its frame
    (``fewk.*``; ``fewk.has`` 0 where the table is not committed): null shares with rows
    alike over the client counts below the few-clients warning's bound
    (``clairstat._estimator.FEW_CLIENTS_ESTIMATED``) and from it, the same without a
    frame, the most that no frame flags the precise row's shift where rows differ in
    precision, and the ``data`` frame's power over the package's there from
    ``RATIO_FROM`` clients on (at four the package frame's power is 0.020: a ratio of
    near-zeros)."""
    import pandas as pd

    from clairstat._estimator import FEW_CLIENTS_ESTIMATED

    if not path.exists():
        return {"fewk.has": "0"}
    table = pd.read_csv(path, keep_default_na=False)  # "null" is a scenario
    held_below = FEW_CLIENTS_ESTIMATED
    cells = table.groupby(["frame", "row_spread", "scenario", "n_clients"])
    null = cells.other_flagged.mean().xs("null", level="scenario")
    power = cells.victim_flagged.mean().xs("shifted", level="scenario")
    alike, differ = float(table.row_spread.min()), float(table.row_spread.max())
    counts = sorted(table.n_clients.unique())
    small = [k for k in counts if k < held_below]
    large = [k for k in counts if k >= held_below]
    macros = {"fewk.has": "1",
              "fewk.reps": fmt(int(table.groupby(["frame", "row_spread", "scenario",
                                                  "n_clients"]).size().min())),
              "fewk.p": fmt(int(table.p.iloc[0])), "fewk.q": fmt(int(table.q.iloc[0])),
              "fewk.large.from": fmt(int(min(large))),
              "fewk.small.list": ", ".join(fmt(int(k)) for k in small[:-1])
              + f" or {fmt(int(small[-1]))}",
              "fewk.spreadfactor": fmt(round(math.exp(2.0 * differ)), 2)}
    macros["fewk.residual.alike.small.range"] = _range(
        [null["residual", alike, k] for k in small])
    macros["fewk.residual.alike.large.range"] = _range(
        [null["residual", alike, k] for k in large])
    macros["fewk.none.alike.small.range"] = _range([null["none", alike, k] for k in small])
    macros["fewk.none.differ.power.max"] = fmt_fixed(
        max(power["none", differ, k] for k in counts))
    from6 = [k for k in counts if k >= RATIO_FROM]
    macros["fewk.ratio.from"] = fmt(int(min(from6)))
    macros["fewk.ratio.range"] = _range(
        [power["data", differ, k] / power["residual", differ, k] for k in from6], 1)
    return macros


#: The subspace's tilt bounded (``tilt.*``): per configuration the three tables of the
#: 18 real datasets (development, eleven held out, three held out).
TILT_GROUPS = ("", "heldout_all_", "heldout6_")
TILT = {"classicalbefore": "exact_spread", "classical": "tilt_cap",
        "recommendedbefore": "hc3_support3_exact_spread",
        "recommended": "hc3_support3_tilt_cap", "hcthree": "hc3_alone",
        "supportthree": "support3_alone"}


def _tilt_table(tables, suffix):
    return _joined(tables, [f"calibration_{group}{suffix}" for group in TILT_GROUPS])


def tilt_cap_macros(tables):
    """The subspace's tilt bounded (``tilt.*``; ``tilt.has`` 0 unless every table is
    committed): per configuration of :data:`TILT` the datasets meeting the criteria per
    path (``tilt.<config>.<path>.met``); the classical covariance's rows before and
    after compared split by split (``tilt.rows``, ``tilt.changed``: rows whose flags,
    victims flagged or rank differ; ``tilt.victims.before``/``.after`` and
    ``tilt.falseflags.before``/``.after`` summed over the ``noise_cov`` rows;
    ``tilt.defaultchanged``: rows of the path without a covariance that differ, over
    every configuration run twice) and the bound (``tilt.cap``)."""
    import numpy as np

    from clairstat._inference import TILT_LEVERAGE_CAP

    names = [f"calibration_{g}{s}" for g in TILT_GROUPS for s in TILT.values()]
    if any(tables.get(name) is None for name in names):
        return {"tilt.has": "0"}
    macros = {"tilt.has": "1", "tilt.cap": fmt(int(TILT_LEVERAGE_CAP)),
              "tilt.distance": fmt(int(round(math.sqrt(TILT_LEVERAGE_CAP))))}
    joined = {}
    for key, suffix in TILT.items():
        joined[key] = table = _tilt_table(tables, suffix)
        macros["tilt.datasets"] = fmt(table.dataset.nunique())
        rows = [r for r in _corruption_rows(table) if r["dataset"] != "all"]
        for path in ("default", "noise_cov"):
            macros[f"tilt.{key}.{path.replace('_', '')}.met"] = fmt(_criteria_met(rows, path))
    keys = ["dataset", "split", "corruption", "path"]
    measured = ["any_flag", "false_flags", "victims_flagged", "rank"]

    def compared(before, after, path):
        pair = joined[before].merge(joined[after], on=keys, suffixes=("_b", "_a"))
        pair = pair[pair.path == path]
        differ = np.zeros(len(pair), dtype=bool)
        for column in measured:
            differ |= (pair[f"{column}_b"] != pair[f"{column}_a"]).to_numpy()
        return pair, int(differ.sum())

    pair, changed = compared("classicalbefore", "classical", "noise_cov")
    macros.update({"tilt.rows": fmt(len(pair)), "tilt.changed": fmt(changed),
                   "tilt.victims.before": fmt(int(pair.victims_flagged_b.sum())),
                   "tilt.victims.after": fmt(int(pair.victims_flagged_a.sum())),
                   "tilt.falseflags.before": fmt(int(pair.false_flags_b.sum())),
                   "tilt.falseflags.after": fmt(int(pair.false_flags_a.sum()))})
    macros["tilt.defaultchanged"] = fmt(sum(
        compared(before, after, "default")[1]
        for before, after in (("classicalbefore", "classical"),
                              ("recommendedbefore", "recommended"),
                              ("classicalbefore", "hcthree"))))
    return macros


def _optional_calibrations(names):
    """``{name: table}`` of the calibration tables ``names`` (None where not committed)."""
    return {name: (src.read_calibration(src.SOURCES[name])
                   if src.SOURCES[name].exists() else None) for name in names}


#: The current code's real-data tables (``calibration_now_<group><suffix>``): development,
#: the eleven held-out datasets and the sixth held-out set.
NOW_GROUPS = ("", "heldout_all_", "heldout6_")
#: The configurations compared on them: (macro tag, table suffix, path), as README.md's
#: "Which configuration" table.
NOW_CONFIGS = (("recommended", "hc3_support3_mean_share", "noise_cov"),
               ("classical", "mean_share", "noise_cov"),
               ("nocov", "mean_share", "default"))


def current_calibration(tables):
    """The current code on every real dataset (``calibnow.*``; ``calibnow.has`` 0 unless
    every table of :data:`NOW_GROUPS` x :data:`NOW_CONFIGS` is committed): per
    configuration the pooled null share with its Wilson interval and splits, the worst
    dataset's null share, the datasets meeting the criteria (those of
    ``benchmarks/calibration_compare.py``, the README's) and the lowest power with its
    dataset; and the table's body, one row per dataset: clients, then per configuration
    null share / lowest power, starred where the criteria are not met."""
    import pandas as pd
    from statsmodels.stats.proportion import proportion_confint

    names = [f"calibration_now_{group}{suffix}" for group in NOW_GROUPS
             for _, suffix, _ in NOW_CONFIGS]
    if any(tables.get(name) is None for name in names):
        return {"calibnow.has": "0"}, None
    compare = src._load_script("calibration_compare")
    macros, cells, clients = {"calibnow.has": "1"}, {}, {}
    for tag, suffix, path in NOW_CONFIGS:
        table = pd.concat([tables[f"calibration_now_{group}{suffix}"]
                           for group in NOW_GROUPS], ignore_index=True)
        cells[tag] = compare._cells(table, path)
        clients.update(table.groupby("dataset", sort=False)["n_clients"].first().to_dict())
        if tag == "recommended":  # the run's rank_support and covariance, read off its rows
            macros["calibnow.support"] = fmt(int(table["rank_support"].iloc[0]))
            macros["calibnow.covtype"] = tex_escape(str(table["cov_type"].iloc[0]))
        null = table[(table.path == path) & (table.corruption == "none")]
        flagged, splits = int(null.any_flag.sum()), len(null)
        low, high = proportion_confint(flagged, splits, method="wilson")
        worst = max(cells[tag], key=lambda name: cells[tag][name][0])
        weakest = min(cells[tag], key=lambda name: cells[tag][name][1])
        macros.update({
            f"calibnow.{tag}.null": fmt_fixed(flagged / splits),
            f"calibnow.{tag}.lo": fmt_fixed(low), f"calibnow.{tag}.hi": fmt_fixed(high),
            f"calibnow.{tag}.splits": fmt(splits),
            f"calibnow.{tag}.worst": fmt_fixed(cells[tag][worst][0], 2),
            f"calibnow.{tag}.worstdataset": tex_escape(worst),
            f"calibnow.{tag}.met": fmt(sum(compare._met(cell)
                                           for cell in cells[tag].values())),
            f"calibnow.{tag}.lowest": fmt_fixed(cells[tag][weakest][1], 2),
            f"calibnow.{tag}.lowestdataset": tex_escape(weakest)})
    datasets = list(cells["nocov"])
    macros["calibnow.datasets"] = fmt(len(datasets))
    macros["calibnow.maxnull"] = fmt(compare.MAX_NULL_SHARE)
    macros["calibnow.minpower"] = fmt(compare.MIN_POWER)
    lines = []
    for name in datasets:
        row = [tex_escape(name), fmt(int(clients[name]))]
        for tag, _, _ in NOW_CONFIGS:
            null, power, _ = cells[tag][name]
            mark = "" if compare._met(cells[tag][name]) else "$^{*}$"
            row.append(f"{fmt_fixed(null, 2)} / {fmt_fixed(power, 2)}{mark}")
        lines.append(" & ".join(row) + r" \\")
    return macros, "\n".join(lines) + "\n"


def _criteria_met(rows, path="default"):
    """How many datasets meet the calibration criteria on ``path`` (null share at most
    ``MAX_NULL_SHARE``, every corruption's power at least ``MIN_POWER``)."""
    max_null, min_power = src.calibration_criteria()
    return sum(1 for r in rows if r["dataset"] != "all" and r["path"] == path
               and r["null"] <= max_null
               and all(v >= min_power for k, v in r.items() if k.startswith("power_")))


def frame_macros(plain, heldout_frame, heldout_plain, heldout_prereg):
    """The frame of robust scales (``calibhof.*``): its held-out run, the same splits
    with the plain statistic at the same commit (``calibhofplain.*``), the development
    splits before it (``calibplain.*``), the datasets meeting the criteria on the path
    without a covariance (``<prefix>.default.met``), those whose null share and whose
    lowest power rose (``calibhof.nullup``, ``calibhof.powerup``), and ``calibhof.has``."""
    if any(t is None for t in (plain, heldout_frame, heldout_plain, heldout_prereg)):
        return {"calibhof.has": "0"}
    macros = {"calibhof.has": "1"}
    macros.update(calibration_macros(src.calibration_summary(plain), "calibplain"))
    rows, before = _corruption_rows(heldout_frame), _corruption_rows(heldout_plain)
    macros.update(calibration_macros(rows, "calibhof"))
    macros.update(calibration_macros(before, "calibhofplain"))
    macros["calibhof.default.met"] = fmt(_criteria_met(rows))
    macros["calibhofplain.default.met"] = fmt(_criteria_met(before))
    prereg = _corruption_rows(heldout_prereg)  # the frame's first version, pre-registered
    macros.update(calibration_macros(prereg, "calibhofpre"))
    macros["calibhofpre.default.met"] = fmt(_criteria_met(prereg))
    now = {r["dataset"]: r for r in rows if r["path"] == "default" and r["dataset"] != "all"}
    was = {r["dataset"]: r for r in before if r["path"] == "default"}
    lowest = lambda r: min(v for k, v in r.items() if k.startswith("power_"))  # noqa: E731
    macros["calibhof.nullup"] = fmt(sum(now[d]["null"] > was[d]["null"] for d in now))
    macros["calibhof.powerup"] = fmt(sum(lowest(now[d]) > lowest(was[d]) for d in now))
    macros.update(calibration_design_macros(heldout_frame, "calibhof"))
    return macros


def heldout_macros(heldout, heldout_rank0, rank0):
    """The held-out datasets (``calibho.*``), the same splits with ``rank=0``
    (``calibhorank.*``), the development splits with ``rank=0`` (``calibrank.*``), and
    ``calibho.has`` (the paragraph's switch). On each held-out dataset the lowest power
    of the ``noise_cov`` path with the rank rule (``calibho.<dataset>.noisecov.power.min``,
    ``.power.minkind``) and, on the same dataset and corruption, with ``rank=0``
    (``calibhorank.<dataset>.noisecov.power.atmin``)."""
    if heldout is None:
        return {"calibho.has": "0"}
    macros = {"calibho.has": "1"}
    rows = src.calibration_summary(heldout)
    macros.update(calibration_macros(rows, "calibho"))
    macros.update(calibration_design_macros(heldout, "calibho"))
    macros["calibho.names"] = fmt_list([tex_escape(d) for d in dict.fromkeys(heldout.dataset)])
    for name, group in heldout.groupby("dataset"):
        macros[f"calibho.{name}.clients"] = fmt(int(group["n_clients"].iloc[0]))
    max_null, min_power = src.calibration_criteria()
    macros["calibho.maxnull"], macros["calibho.minpower"] = (fmt_fixed(max_null, 2),
                                                             fmt_fixed(min_power, 1))
    given = src.calibration_summary(heldout_rank0) if heldout_rank0 is not None else []
    macros.update(calibration_macros(given, "calibhorank") if given else {})
    for row in rows:
        if row["path"] != "noise_cov" or row["dataset"] == "all":
            continue
        kinds = [k for k in row if k.startswith("power_")]
        low = min(kinds, key=lambda k: row[k])
        key = f"calibho.{row['dataset']}.noisecov"
        macros[f"{key}.power.min"] = fmt_fixed(row[low], 2)
        macros[f"{key}.power.minkind"] = {"power_scale": "scaling", "power_flip":
                                          "sign flips", "power_replace":
                                          "reversed outputs"}[low]
        match = [r for r in given if r["dataset"] == row["dataset"]
                 and r["path"] == "noise_cov"]
        if match:
            macros[f"calibhorank.{row['dataset']}.noisecov.power.atmin"] = (
                fmt_fixed(match[0][low], 2))
    if rank0 is not None:
        macros.update(calibration_macros(src.calibration_summary(rank0), "calibrank"))
    return macros


def calibration_table(rows, criteria=None):
    """The table's rows; with ``criteria = (max_null, min_power)`` a last column says
    whether each dataset and path meets them."""
    lines = []
    for row in rows:
        powers = " / ".join(fmt_fixed(row[k], 2) for k in ("power_scale", "power_flip",
                                                            "power_replace") if k in row)
        dataset = r"\emph{all}" if row["dataset"] == "all" else tex_escape(row["dataset"])
        cells = [dataset, rf"\texttt{{{tex_escape(row['path'])}}}", fmt(row["splits"]),
                 f"{fmt_fixed(row['null'])} [{fmt_fixed(row['lo'])}, {fmt_fixed(row['hi'])}]",
                 powers if row["dataset"] != "all" else ""]
        if criteria is not None:
            max_null, min_power = criteria
            null_ok = row["null"] <= max_null
            power_ok = all(row[k] >= min_power for k in row if k.startswith("power_"))
            cells.append("" if row["dataset"] == "all" else
                         "both" if null_ok and power_ok else
                         "null only" if null_ok else "power only" if power_ok else
                         "neither")
        lines.append(" & ".join(cells) + r" \\")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- copying -------------

def _gain_text(value, low, high, unit=True):
    """``+2.5\\,\\% [1.9, 3.1]`` from gains already in %; without the ``%`` when not
    ``unit`` (table cells, whose header names the unit)."""
    text = fmt_pct(value / 100)
    if not unit:
        text = text.removesuffix(r"\,\%")
    return (f"{text} [{fmt_fixed(low, 1)}, {fmt_fixed(high, 1)}]"
            if not math.isnan(low) else text)


def earlier_block_macros(earlier_frame, quoted, prefix="copy.first"):
    """An archived confirmatory block's CLAIR gains and closest margins
    (``<prefix>.<setting>.clair.gain``, ``.closest``, ``.closest.margin``), quoted
    beside a later block; ``{"<prefix>.has": "0"}`` unless ``quoted`` (the current
    table is a later block) and the archived block is complete."""
    if earlier_frame is None or earlier_frame.empty or not quoted:
        return {f"{prefix}.has": "0"}
    earlier = copying_macros(earlier_frame, "full")
    if earlier.get("copy.complete") != "1":
        return {f"{prefix}.has": "0"}
    macros = {f"{prefix}.has": "1", f"{prefix}.replicates": earlier["copy.replicates"]}
    for setting in ("homogeneous", "heterogeneous"):
        for key in (f"{setting}.clair.gain", f"{setting}.closest", f"{setting}.closest.margin"):
            macros[f"{prefix}.{key}"] = earlier[f"copy.{key}"]
    return macros


def copying_macros(frame, scale):
    from simulations.copying.analysis import (BASELINES, METHODS, detection_table,
                                              flagged_by_kind, gain_table)
    from simulations.studies.copying import STUDY

    per_setting = frame.groupby("setting")["replicate"].nunique()
    blocks = set(frame["seed_block"]) if "seed_block" in frame else set()
    macros = {"copy.scale": scale,
              "copy.block": src.copying_block_name(frame, scale),
              "copy.second": "1" if blocks == {"confirmatory-2"} else "0",
              "copy.third": "1" if blocks == {"confirmatory-3"} else "0",
              "copy.fourth": "1" if blocks == {"confirmatory-4"} else "0",
              "copy.fifth": "1" if blocks == {"confirmatory-5"} else "0",
              # the blocks made on the clipping default (the wording about the default)
              "copy.clip": "1" if blocks & {"confirmatory-3", "confirmatory-4",
                                            "confirmatory-5"} else "0",
              "copy.confirmatory": "1" if scale == "full" else "0",
              "copy.replicates": fmt(int(per_setting.min())),
              "copy.planned": fmt(int(STUDY.replicates[scale])),
              "copy.plannedfull": fmt(int(STUDY.replicates["full"])),
              "copy.variants": fmt(int(frame["n_variants"].max())),
              "copy.variantdirs": fmt(int(frame["n_variants"].max()) - 1),
              "copy.complete": "1" if int(per_setting.min()) >= STUDY.replicates[scale]
              and len(per_setting) == 2 else "0",
              "copy.clients": fmt(int(frame["n_clients"].iloc[0])),
              "copy.contaminated": fmt(int(frame["n_contaminated"].iloc[0])),
              "copy.rank": fmt(int(frame["rank"].iloc[0])),
              "copy.version": tex_escape(", ".join(sorted(frame["clairstat_version"]
                                                          .unique()))),
              # the code that made the rows (a review: the section said "the library's
              # default" 246 commits later)
              "copy.commits": (fmt_list([code_label(c) for c in
                                         sorted(set(frame["code_commit"].dropna()))])
                               if "code_commit" in frame
                               and frame["code_commit"].notna().any()
                               else "not recorded")}
    for column in ("d_model", "n_layers", "n_heads", "steps", "n_train", "n_test",
                   "pretrain_steps", "n_moved", "n_content"):
        if column in frame:
            macros[f"copy.{column.replace('_', '')}"] = fmt(int(frame[column].iloc[0]))
    for row in gain_table(frame).to_dict("records"):
        key = f"copy.{row['setting']}.{row['method'].replace('_', '')}"
        macros[f"{key}.acc"] = fmt_fixed(row["accuracy"] / 100)
        macros[f"{key}.gain"] = _gain_text(row["gain"], row["gain_low"], row["gain_high"])
        if row["method"] != "clair":
            macros[f"{key}.margin"] = _gain_text(row["clair_margin"],
                                                 row["margin_low"], row["margin_high"])
    gains = gain_table(frame)
    for setting, sub in gains[gains["method"].isin(BASELINES)].groupby("setting"):
        closest = sub.loc[sub["clair_margin"].idxmin()]
        macros[f"copy.{setting}.closest"] = tex_escape(METHODS[closest["method"]])
        macros[f"copy.{setting}.closest.margin"] = _gain_text(
            closest["clair_margin"], closest["margin_low"], closest["margin_high"])
    flags = flagged_by_kind(frame, methods=("clair",))
    for (setting, _), values in flags.iterrows():
        for kind, share in values.items():
            macros[f"copy.flag.{setting}.{kind}"] = fmt_fixed(share, 2)
    for row in detection_table(frame).to_dict("records"):
        key = f"copy.{row['setting']}.{row['method'].replace('_', '')}"
        macros[f"{key}.rank"] = fmt(row["rank_median"])
        macros[f"{key}.rankshare"] = fmt_pct(row["rank_modal_share"], 0, sign=False)
    macros.update(_low_rank_macros(frame))
    return macros


def _low_rank_macros(frame):
    """Heterogeneous replicates whose joint rank is below the directions the task
    variants span off their mean (``copy.lowrank.n`` of ``copy.lowrank.of``), CLAIR's
    mean gain in them and in the others (``copy.lowrank.gain``, ``copy.lowrank.rest``, in
    %), and the lowest replicate gain (``copy.lowrank.worst``)."""
    import numpy as np

    sub = frame[frame["setting"] == "heterogeneous"].dropna(subset=["rank_clair"])
    if sub.empty:
        return {"copy.lowrank.n": "0"}
    low = sub["rank_clair"] < sub["n_variants"] - 1
    gains = 100 * sub["rel_clair"].to_numpy(float)
    macros = {"copy.lowrank.n": fmt(int(low.sum())), "copy.lowrank.of": fmt(len(sub))}
    if low.any():
        macros["copy.lowrank.gain"] = fmt_pct(float(np.mean(gains[low.to_numpy()])) / 100)
        macros["copy.lowrank.worst"] = fmt_pct(float(np.min(gains[low.to_numpy()])) / 100)
    if (~low).any():
        macros["copy.lowrank.rest"] = fmt_pct(float(np.mean(gains[~low.to_numpy()])) / 100)
    return macros


def copying_table(frame):
    from simulations.copying.analysis import METHODS, gain_table

    table = gain_table(frame).set_index(["method", "setting"])
    lines = []
    for method in [m for m in METHODS if m in table.index.get_level_values(0)]:
        cells = [tex_escape(METHODS[method])]
        for setting in ("homogeneous", "heterogeneous"):
            if (method, setting) not in table.index:
                cells += ["--"] * 3
                continue
            row = table.loc[(method, setting)]
            cells.append(fmt_fixed(row["accuracy"] / 100))
            if method == "local":
                cells += ["0", "--"]
                continue
            cells.append(_gain_text(row["gain"], row["gain_low"], row["gain_high"],
                                    unit=False))
            cells.append("--" if method == "clair" else _gain_text(
                row["clair_margin"], row["margin_low"], row["margin_high"], unit=False))
        lines.append(" & ".join(cells) + r" \\")
    return "\n".join(lines) + "\n"


def copying_flag_table(frame):
    from simulations.copying.analysis import METHODS, flagged_by_kind

    flags = flagged_by_kind(frame)
    kinds = [k for k in ("random", "reverse", "backdoor", "adversarial", "benign")
             if k in flags.columns]
    lines = []
    for method in ("clair", "clair_per_module", "clair_rank_given"):
        cells = [tex_escape(METHODS[method])]
        for kind in kinds:
            pair = [fmt_fixed(flags.loc[(s, method), kind], 2)
                    if (s, method) in flags.index else "--"
                    for s in ("homogeneous", "heterogeneous")]
            cells.append(" / ".join(pair))
        lines.append(" & ".join(cells) + r" \\")
    return "\n".join(lines) + "\n"


def sweep_macros():
    """The sweep's summary (``copying_sweep``), or ``{"sweep.has": "0"}`` without a table."""
    from paper.figures.copying_sweep import _table, point_summary

    frame, scale = _table()
    if frame is None:
        return {"sweep.has": "0"}
    points = point_summary(frame)
    macros = {"sweep.has": "1", "sweep.scale": scale,
              "sweep.points": fmt(len(points)),
              "sweep.replicates": fmt(int(points["replicates"].min())),
              "sweep.clientlist": fmt_list([fmt(int(v)) for v in
                                            sorted(points["n_clients"].unique())]),
              "sweep.sharelist": fmt_list([fmt(round(100 * v)) for v in
                                           sorted(points["share"].unique())], r"\,\%")}
    for setting, sub in points.groupby("setting"):
        worst = sub.loc[sub["gain"].idxmin()]
        key = f"sweep.{setting}"
        macros[f"{key}.above"] = fmt(int((sub["low"] > 0).sum()))
        macros[f"{key}.npoints"] = fmt(len(sub))
        macros[f"{key}.beats"] = fmt(int((sub["gain"] > sub["best_rule"]).sum()))
        macros[f"{key}.worst.gain"] = _gain_text(worst["gain"], worst["low"], worst["high"])
        macros[f"{key}.worst.clients"] = fmt(int(worst["n_clients"]))
        macros[f"{key}.worst.share"] = fmt_pct(worst["share"], 0, sign=False)
        macros[f"{key}.backdoor.min"] = fmt_fixed(float(sub["flag_backdoor"].min()), 2)
        macros[f"{key}.benign.max"] = fmt_fixed(float(sub["flag_benign"].max()), 2)
    # Whether the table was made on the clipping default (its rows say so since the
    # column exists; older rows, the quarantine's, do not).
    stand_in = (set(frame["clair_stand_in"].dropna()) if "clair_stand_in" in frame
                else set())
    macros["sweep.clip"] = "1" if stand_in == {"clip"} else "0"
    return macros


# ---------------------------------------------------------------- rounds --------------

#: The multi-round study's designs and settings, in the table's column order.
ROUNDS_CELLS = tuple((d, s) for d in ("contaminated", "clean")
                     for s in ("homogeneous", "heterogeneous"))
#: Row labels: Flower's strategies by their class names (its FedAvg averages the LoRA
#: factors, i.e. FedIT), clairstat's LoraStrategy rules by the rule's name.
ROUNDS_LABELS = {"local": "local LoRA", "fedavg": "FedAvg (factors)",
                 "median": "FedMedian", "trimmed_mean": "FedTrimmedAvg", "krum": "Krum",
                 "bulyan": "Bulyan", "fedrot": "FedRot-LoRA", "glora": "GLoRA",
                 "clair": "CLAIR (default)"}


def _rounds_gains(frame, design, setting):
    """Per method: (gain, low, high) over local LoRA and CLAIR's margin over it, in %
    (``replicate_gains`` and ``paired_bootstrap`` of the copying analysis)."""
    from simulations.copying.analysis import paired_bootstrap, replicate_gains

    gains = replicate_gains(frame[frame["design"] == design], setting)
    out = {}
    for method in ROUNDS_LABELS:
        if method in gains:
            margin = paired_bootstrap(gains["clair"] - gains[method])
            out[method] = (paired_bootstrap(gains[method]), margin)
    return out


def _per_replicate_flags(frame):
    """CLAIR's flag share per replicate (rows) and kind of client (columns).

    ``flagged_by_kind`` tabulates by ``setting``: given one label per replicate it
    returns each replicate's shares."""
    from simulations.copying.analysis import flagged_by_kind

    keys = frame["cell"].astype(str) + "/" + frame["replicate"].astype(str)
    return flagged_by_kind(frame.assign(setting=keys), methods=("clair",))


def _flag_share(frame, kind):
    """CLAIR's last-round flag share among the clients of ``kind`` pooled over the rows
    of ``frame``, and a bootstrap interval over its replicates' shares:
    ``(mean, low, high)``."""
    from simulations.copying.analysis import flagged_by_kind, paired_bootstrap

    if len(frame) == 0:
        return math.nan, math.nan, math.nan
    per_replicate = _per_replicate_flags(frame)
    if kind not in per_replicate:
        return math.nan, math.nan, math.nan
    pooled = flagged_by_kind(frame.assign(setting="all"), methods=("clair",))
    _, low, high = paired_bootstrap(per_replicate[kind].to_numpy())
    return float(pooled[kind].iloc[0]), low, high


def _pooled_attacks(frame):
    """``frame`` with every attack kind (``kind_c<k>``) renamed ``attacker``: the attack
    recall is the flag share of that one kind."""
    n_clients = int(frame["n_clients"].max())
    return frame.assign(**{f"kind_c{k}": frame[f"kind_c{k}"].where(
        frame[f"kind_c{k}"] == "benign", "attacker") for k in range(n_clients)})


def _share_text(share):
    mean, low, high = share
    if math.isnan(low):
        return fmt_fixed(mean, 2)
    return f"{fmt_fixed(mean, 2)} [{fmt_fixed(low, 2)}, {fmt_fixed(high, 2)}]"


def _compare(low, high):
    """Where an interval of CLAIR's margin lies: 'above', 'below' or 'level with'."""
    return "above" if low > 0 else "below" if high < 0 else "level with"


def rounds_macros(frame, scale):
    """The multi-round study (``copying_rounds``): design, each rule's gain per cell,
    CLAIR's margin over the best other rule, its flags among clean clients and
    attackers. ``{"rounds.has": "0"}`` without a table."""
    if frame is None or frame.empty:
        return {"rounds.has": "0"}
    first = frame.iloc[0]
    attacked = frame[frame["design"] == "contaminated"]
    per_cell = frame.groupby(["design", "setting"])["replicate"].nunique()
    from simulations import get_study

    planned = get_study("copying_rounds").replicates[scale]
    macros = {"rounds.has": "1", "rounds.scale": scale,
              "rounds.replicates": fmt(int(per_cell.min())),
              # the full scale, every cell complete: the text then drops "small run"
              "rounds.full": "1" if scale == "full" and per_cell.min() >= planned
              and len(per_cell) == len(ROUNDS_CELLS) else "0",
              "rounds.smallreplicates": fmt(get_study("copying_rounds").replicates["small"]),
              "rounds.cells": fmt(len(per_cell)),
              "rounds.clients": fmt(int(first["n_clients"])),
              "rounds.rounds": fmt(int(first["rounds"])),
              "rounds.steps": fmt(int(first["steps_per_round"])),
              "rounds.variants": fmt(int(frame["n_variants"].max()))}
    if len(attacked):
        row = attacked.iloc[0]
        for column in ("n_contaminated", "krum_f", "bulyan_f"):
            macros[f"rounds.{column.replace('_', '')}"] = fmt(int(row[column]))
    for design, setting in ROUNDS_CELLS:
        if not ((frame["design"] == design) & (frame["setting"] == setting)).any():
            continue
        key = f"rounds.{design}.{setting}"
        gains = _rounds_gains(frame, design, setting)
        for method, ((gain, low, high), _) in gains.items():
            macros[f"{key}.{method.replace('_', '')}.gain"] = _gain_text(gain, low, high)
        others = {m: g for m, g in gains.items() if m not in ("clair", "local")}
        best = max(others, key=lambda m: others[m][0][0])
        margin = others[best][1]
        macros[f"{key}.best"] = tex_escape(ROUNDS_LABELS[best])
        macros[f"{key}.best.margin"] = _gain_text(*margin)
        macros[f"{key}.best.cmp"] = _compare(margin[1], margin[2])
        cell = frame[(frame["design"] == design) & (frame["setting"] == setting)]
        macros[f"{key}.benign"] = _share_text(_flag_share(cell, "benign"))
    for design in ("contaminated", "clean"):
        rows = frame[frame["design"] == design]
        macros[f"rounds.{design}.benign"] = _share_text(_flag_share(rows, "benign"))
        # Replicates in which at least one clean client is flagged.
        per_replicate = _per_replicate_flags(rows) if len(rows) else None
        if per_replicate is not None and "benign" in per_replicate:
            macros[f"rounds.{design}.anyflag"] = fmt(int((per_replicate["benign"] > 0).sum()))
            macros[f"rounds.{design}.nrep"] = fmt(len(per_replicate))
    macros["rounds.level"] = fmt(float(first["test_level"]))
    if len(attacked):
        macros["rounds.recall"] = _share_text(_flag_share(_pooled_attacks(attacked),
                                                          "attacker"))
    # FedRot-LoRA against Flower's FedAvg: the largest per-replicate gap, per setting.
    for setting, sub in frame.groupby("setting"):
        gap = 100 * (sub["rel_fedrot"] - sub["rel_fedavg"]).abs().max()
        macros[f"rounds.{setting}.fedrotgap"] = fmt_fixed(gap, 2)
    return macros


def _replicate_share_values(frame, numerator, denominator):
    """Pooled ``sum numerator / sum denominator`` with a bootstrap interval over the
    replicates (resampled whole: the modules and clients of one replicate are not
    independent): ``(share, low, high)``, or None without a denominator."""
    from simulations.copying.analysis import paired_bootstrap

    num, den = frame[numerator].to_numpy(float), frame[denominator].to_numpy(float)
    if den.sum() == 0:
        return None
    _, low, high = paired_bootstrap(num / den)  # equal denominators per cell
    return num.sum() / den.sum(), low, high


def _replicate_share(frame, numerator, denominator):
    """:func:`_replicate_share_values` as text (``--`` without a denominator)."""
    share = _replicate_share_values(frame, numerator, denominator)
    return "--" if share is None else _share_text(share)


# The interventions of the per-round study and their macro names.
RDET_ARMS = {"none": "none", "flagged-get-global": "global",
             "no-robust-start": "norobust"}


def _rounds_intervention_macros(frame, arm):
    """Per arm of the per-round study (``rdet.<arm>.*``): the clean replicates that
    flag a client in the last round, the clean flags after the first round that repeat
    the round before, whole-variant module flags in the last round (clean
    heterogeneous), the last round's recall, and CLAIR's gain over local LoRA per
    design (mean relative change in %, bootstrap interval over replicates)."""
    from simulations.copying.analysis import paired_bootstrap

    macros = {}
    for name, short in RDET_ARMS.items():
        rows = frame[arm == name]
        if rows.empty:
            continue
        last = int(rows["rounds"].min())
        key = f"rdet.{short}"
        clean = rows[rows["design"] == "clean"]
        attacked = rows[rows["design"] == "contaminated"]
        macros[f"{key}.clean.nrep"] = fmt(len(clean))
        macros[f"{key}.clean.anyrep.last"] = fmt(int((clean[f"client_benign_r{last}"] > 0).sum()))
        for t in range(1, last + 1):  # clean replicates with a flagged client, per round
            macros[f"{key}.clean.anyrep.r{t}"] = fmt(int((clean[f"client_benign_r{t}"] > 0).sum()))
        macros[f"{key}.clean.anyrep.max"] = fmt(max(
            int((clean[f"client_benign_r{t}"] > 0).sum()) for t in range(1, last + 1)))
        later = range(2, last + 1)
        macros[f"{key}.clean.flags"] = fmt(int(sum(clean[f"client_benign_r{t}"].sum()
                                                   for t in later)))
        macros[f"{key}.clean.kept"] = fmt(int(sum(clean[f"client_kept_flag_r{t}"].sum()
                                                  for t in later)))
        hetero = clean[clean["setting"] == "heterogeneous"]
        macros[f"{key}.clean.heterogeneous.group.last"] = fmt(
            int(hetero[f"module_group_r{last}"].sum()))
        if len(attacked):
            macros[f"{key}.recall.last"] = fmt_fixed(
                attacked[f"client_attackers_r{last}"].sum()
                / attacked["n_attackers"].sum(), 2)
        for design, sub in (("clean", clean), ("contaminated", attacked)):
            if "rel_clair" in sub and sub["rel_clair"].notna().any():
                gains = 100 * sub["rel_clair"].dropna().to_numpy()  # in %
                macros[f"{key}.{design}.gain"] = _gain_text(*paired_bootstrap(gains))
    # Whole task variants flagged in the last round (clean heterogeneous), per replicate:
    # the strategy (robust start) minus the arm without it; the arms are not paired.
    groups = {}
    for name in ("none", "no-robust-start"):
        rows = frame[(arm == name) & (frame["design"] == "clean")
                     & (frame["setting"] == "heterogeneous")]
        if not rows.empty:
            groups[name] = rows[f"module_group_r{int(rows['rounds'].min())}"].to_numpy(float)
    if len(groups) == 2:
        mean, low, high = _unpaired_difference(groups["none"], groups["no-robust-start"])
        macros["rdet.norobust.group.diff"] = (f"{fmt_fixed(mean, 1)} [{fmt_fixed(low, 1)}, "
                                              f"{fmt_fixed(high, 1)}]")
        macros["rdet.norobust.group.excludes0"] = "1" if low > 0 or high < 0 else "0"
    return macros


def _unpaired_difference(first, second):
    """Difference of two means and its 95% percentile bootstrap interval, each sample
    resampled on its own (scipy.stats.bootstrap, the copying analysis's seed)."""
    import numpy as np
    from scipy import stats

    from simulations.copying.analysis import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED

    first, second = np.asarray(first, float), np.asarray(second, float)
    result = stats.bootstrap((first, second), lambda a, b, axis: a.mean(axis) - b.mean(axis),
                             n_resamples=BOOTSTRAP_RESAMPLES, confidence_level=0.95,
                             method="percentile", vectorized=True,
                             random_state=np.random.default_rng(BOOTSTRAP_SEED))
    interval = result.confidence_interval
    return float(first.mean() - second.mean()), float(interval.low), float(interval.high)


def _rounds_confirmation_macros(frame, arm):
    """The confirmation block of ``flagged_receive="global"`` (criteria fixed before its
    run, ``simulations/studies/rounds_detection.py``): per arm the clean replicates
    flagging a client in the last round, the gains and the recall, and the verdicts of
    C1 (at most 2 such replicates under the option) and C2 (its mean gain at most 0.5
    percentage points below the strategy's, clean and contaminated designs)."""
    # Verdicts only on the whole block (its criteria count 40 clean replicates per arm):
    # the study's replicates per cell, in every cell of both arms.
    from simulations.studies.rounds_detection import CONFIRM_BLOCK, STUDY

    expected = {(c["design"], c["setting"], c.get("intervention", "none"))
                for c in STUDY.cells("small") if c["seed_block"] == CONFIRM_BLOCK}
    counts = frame.assign(arm=arm).groupby(["design", "setting", "arm"])["replicate"].nunique()
    if frame.empty or set(counts.index) != expected or \
            counts.min() < STUDY.replicates["small"]:
        return {"rdet.confirm.has": "0"}
    last = int(frame["rounds"].min())
    macros, gains = {"rdet.confirm.has": "1"}, {}
    for name, short in (("none", "none"), ("flagged-get-global", "global")):
        rows = frame[arm == name]
        clean = rows[rows["design"] == "clean"]
        attacked = rows[rows["design"] == "contaminated"]
        key = f"rdet.confirm.{short}"
        macros[f"{key}.clean.nrep"] = fmt(len(clean))
        macros[f"{key}.clean.anyrep.last"] = fmt(int((clean[f"client_benign_r{last}"] > 0).sum()))
        macros[f"{key}.recall.last"] = fmt_fixed(attacked[f"client_attackers_r{last}"].sum()
                                                 / attacked["n_attackers"].sum(), 2)
        for design, sub in (("clean", clean), ("contaminated", attacked)):
            gains[(short, design)] = 100 * sub["rel_clair"].dropna().to_numpy(float)
            macros[f"{key}.{design}.gain"] = _gain_text(*_bootstrap_mean(gains[(short, design)]))
    option = frame[(arm == "flagged-get-global") & (frame["design"] == "clean")]
    c1 = int((option[f"client_benign_r{last}"] > 0).sum()) <= 2
    c2 = all(gains[("global", d)].mean() - gains[("none", d)].mean() >= -0.5
             for d in ("clean", "contaminated"))
    for design in ("clean", "contaminated"):
        diff = gains[("global", design)].mean() - gains[("none", design)].mean()
        macros[f"rdet.confirm.{design}.diff"] = fmt_fixed(diff, 2)
    macros["rdet.confirm.c1"] = "met" if c1 else "not met"
    macros["rdet.confirm.c2"] = "met" if c2 else "not met"
    return macros


def _bootstrap_mean(values):
    from simulations.copying.analysis import paired_bootstrap

    return paired_bootstrap(values)


def rounds_detection_macros(frame, scale):
    """CLAIR's flags round by round (``rounds_detection``): how often a module's test
    flags a benign client, whole task variants flagged, client-level false alarms in the
    first and the last round, flags kept from one round to the next, the joint rank.
    ``{"rdet.has": "0"}`` without a table."""
    if frame is None or frame.empty:
        return {"rdet.has": "0"}
    import pandas as pd

    arm = (frame["intervention"].fillna("none") if "intervention" in frame
           else pd.Series("none", index=frame.index))
    confirm = frame["seed_block"] == "rounds_detection_confirm"
    macros = _rounds_confirmation_macros(frame[confirm], arm[confirm])
    frame, arm = frame[~confirm], arm[~confirm]
    macros.update(_rounds_intervention_macros(frame, arm))
    frame = frame[arm == "none"]
    last = int(frame["rounds"].min())
    clean = frame[frame["design"] == "clean"]
    macros.update({"rdet.has": "1", "rdet.scale": scale, "rdet.last": fmt(last),
              "rdet.replicates": fmt(int(frame.groupby(["design", "setting"])[
                  "replicate"].nunique().min())),
              "rdet.modules": fmt(int(frame["modules_r1"].max())),
              # BH bounds the chance of any false flag only where every client is
              # benign: the clean cells
              "rdet.module.first": _replicate_share(
                  frame[frame["design"] == "clean"], "module_benign_any_r1",
                  "modules_r1")})
    # Whether the first round's module tests are shown above their level: the share's
    # whole interval above the test level (the text says "exceed" only then).
    first_share = _replicate_share_values(clean, "module_benign_any_r1", "modules_r1")
    level = float(frame["test_level"].iloc[0]) if "test_level" in frame else 0.05
    macros["rdet.module.first.excess"] = (
        "1" if first_share is not None and first_share[1] > level else "0")
    for setting in ("homogeneous", "heterogeneous"):
        cell = clean[clean["setting"] == setting]
        if cell.empty:
            continue
        key = f"rdet.clean.{setting}"
        macros[f"{key}.module.last"] = _replicate_share(cell, f"module_benign_any_r{last}",
                                                        f"modules_r{last}")
        macros[f"{key}.group.last"] = fmt(int(cell[f"module_group_r{last}"].sum()))
        macros[f"{key}.modules.last"] = fmt(int(cell[f"modules_r{last}"].sum()))
    for t, name in ((1, "first"), (last, "last")):
        macros[f"rdet.clean.anyrep.{name}"] = fmt(int((clean[f"client_benign_r{t}"] > 0).sum()))
        macros[f"rdet.jointrank.{name}"] = fmt_fixed(float(frame[f"joint_rank_r{t}"].mean()), 1)
    macros["rdet.clean.nrep"] = fmt(len(clean))
    # Of the clean clients flagged in rounds 2.., those flagged in the round before too.
    flags = sum(int(clean[f"client_benign_r{t}"].sum()) for t in range(2, last + 1))
    kept = sum(int(clean[f"client_kept_flag_r{t}"].sum()) for t in range(2, last + 1))
    macros["rdet.clean.kept"] = fmt(kept)
    macros["rdet.clean.flags"] = fmt(flags)
    attacked = frame[frame["design"] == "contaminated"]
    if len(attacked):
        for t, name in ((1, "first"), (last, "last")):
            macros[f"rdet.recall.{name}"] = fmt_fixed(
                attacked[f"client_attackers_r{t}"].sum() / attacked["n_attackers"].sum(), 2)
    return macros


def rounds_table(frame):
    """Gain over local LoRA per method (rows) and cell (columns), with CLAIR's flag
    shares among clean clients and attackers as the last two rows."""
    cells = {c: frame[(frame["design"] == c[0]) & (frame["setting"] == c[1])]
             for c in ROUNDS_CELLS}  # every column of the table, '--' where absent
    gains = {c: _rounds_gains(frame, *c) if len(sub) else {} for c, sub in cells.items()}
    lines = []
    for method, label in ROUNDS_LABELS.items():
        row = [tex_escape(label)]
        for cell in cells:
            if method in gains[cell]:
                row.append("0" if method == "local"
                           else _gain_text(*gains[cell][method][0], unit=False))
            else:
                row.append("--")
        lines.append(" & ".join(row) + r" \\")
    lines.append(r"\midrule")
    for kind, label in (("benign", "CLAIR: share of clean clients flagged"),
                        ("attacker", "CLAIR: share of attackers flagged")):
        row = [label]
        for sub in cells.values():
            share = _flag_share(_pooled_attacks(sub), kind) if len(sub) else (math.nan,)
            row.append("--" if math.isnan(share[0]) else _share_text(share))
        lines.append(" & ".join(row) + r" \\")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- writing -------------

def collect():
    """Every macro and table the manuscript uses: ``(macros, tables)`` dicts.

    A missing source leaves its macros out; the text's ``\\res`` then stops the build
    naming the key, instead of printing a stale or invented value.
    """
    macros, tables = {}, {}
    report = src.read_report(src.SOURCES["report"])
    if report:
        macros.update(validation_macros(report))
        tables["verdicts_theory"] = verdict_table(report, "theory")
        tables["verdicts_identity"] = verdict_table(report, "identity")
    full = src.read_report(src.SOURCES["report_full"])
    macros["val.hasfull"] = "1" if full else "0"
    if full:
        macros.update(validation_macros(full, prefix="valfull"))
        tables["verdicts_theory_full"] = verdict_table(full, "theory")
    bench = src.SOURCES["benchmarks"]
    if bench.exists():
        text = bench.read_text()
        macros.update(benchmark_macros(text))
        macros.update(lora_scale_macros(text))
        macros.update(device_macros(text))
        macros.update(lora_target_macros(text))
        macros.update(concurrency_macros(text))
        macros.update(lora_null_macros(text))
        # The text quotes the concurrency benchmark only when its table is committed.
        macros["bench.hasconc"] = "1" if "bench.conc.ratio" in macros else "0"
        tables["solver"], tables["lora"] = solver_table(text), lora_table(text)
    if src.SOURCES["calibration"].exists():
        raw = src.read_calibration(src.SOURCES["calibration"])
        rows = src.calibration_summary(raw)
        macros.update(calibration_macros(rows))
        macros.update(calibration_design_macros(raw))
        macros["calib.source"] = tex_escape(
            src.SOURCES["calibration"].relative_to(src.ROOT).as_posix())
        tables["calibration"] = calibration_table(rows)
    now, body = current_calibration(_optional_calibrations(
        [f"calibration_now_{group}{suffix}" for group in NOW_GROUPS
         for _, suffix, _ in NOW_CONFIGS]))
    macros.update(now)
    if body is not None:
        tables["calibration_current"] = body
    optional = _optional_calibrations(("calibration_heldout", "calibration_heldout_rank0",
                                       "calibration_rank0"))
    macros.update(heldout_macros(*optional.values()))
    if optional["calibration_heldout"] is not None:
        tables["calibration_heldout"] = calibration_table(
            src.calibration_summary(optional["calibration_heldout"]),
            src.calibration_criteria())
    second = (src.read_calibration(src.SOURCES["calibration_heldout2"])
              if src.SOURCES["calibration_heldout2"].exists() else None)
    macros.update(heldout2_macros(second))
    if second is not None:
        tables["calibration_heldout2"] = calibration_table(
            src.calibration_summary(second), src.calibration_criteria())
    # the later held-out sets and the sixth: their macros, and the table of each one's
    # primary run once its paragraph is on
    for group, make_macros, switch, table, primary in (
            (LATER_HELDOUT, later_heldout_macros, "calibhoc.has", "calibration_heldout5",
             "calibration_heldout5_hc3_support3"),
            (SIXTH_HELDOUT, sixth_heldout_macros, "calibhog.has", "calibration_heldout6",
             "calibration_heldout6_hc3_support3")):
        read = _optional_calibrations(group)
        macros.update(make_macros(read))
        if macros[switch] == "1":
            tables[table] = calibration_table(_corruption_rows(read[primary]),
                                              src.calibration_criteria())
    evidence, after = evidence_macros(_optional_calibrations(
        [name for group in EVIDENCE.values() for name in group]))
    macros.update(evidence)
    if after is not None:
        tables["calibration_evidence"] = calibration_table(after, src.calibration_criteria())
    macros.update(exchangeable_macros(src.SOURCES["exchangeable_null"]))
    macros.update(calibration_cost_macros(src.SOURCES["calibration_cost"]))
    macros.update(few_clients_frame_macros(src.SOURCES["few_clients_frame"]))
    macros.update(new_clients_macros(src.SOURCES["new_clients"]))
    macros.update(tilt_cap_macros(_optional_calibrations(
        [f"calibration_{g}{s}" for g in TILT_GROUPS for s in TILT.values()])))
    framed = _optional_calibrations(("calibration_plain", "calibration_heldout_all_frame",
                                     "calibration_heldout_all_plain",
                                     "calibration_heldout_all_frame_prereg"))
    macros.update(frame_macros(*framed.values()))
    if macros["calibhof.has"] == "1":
        tables["calibration_heldout_frame"] = calibration_table(
            [r for r in _corruption_rows(framed["calibration_heldout_all_frame"])
             if r["path"] == "default"], src.calibration_criteria())
    macros.update(sweep_macros())
    rounds, rounds_scale = src.read_rounds()
    macros.update(rounds_macros(rounds, rounds_scale))
    if rounds is not None:
        tables["copying_rounds"] = rounds_table(rounds)
    macros.update(rounds_previous_table_macros(*src.read_rounds_previous("copying_rounds")))
    macros.update(rounds_detection_macros(*src.read_rounds(study="rounds_detection")))
    macros.update(rounds_previous_macros(*src.read_rounds_previous("rounds_detection")))
    macros.update(quarantine_macros(*src.read_quarantine()))
    macros.update(null_change_macros(*src.read_null_change()))
    macros.update(rank_change_macros(*src.read_rank_change()))
    macros.update(no_detection_macros(*src.read_control_pair("no-detection")))
    macros.update(multikrum_macros(*src.read_multikrum()))
    macros.update(cycles_macros(src.read_cycles()))
    macros["copy.quarantine.commit"] = QUARANTINE_COMMIT  # named wherever the text needs it
    macros["copy.rankchange.commit"] = RANK_RULE_COMMIT
    macros.update(sweep_quarantine_macros(*src.read_quarantine("copying_sweep")))
    macros.update(flagged_macros(*src.read_flagged()))
    macros.update(joint_rank_macros(src.read_joint_rank()))
    macros.update(flagged_rerun_macros(*src.read_flagged_rerun()))
    macros.update(null_rerun_macros())
    scale = src.copying_scale()
    if scale:
        frame = src.read_copying(scale)
        macros.update(copying_macros(frame, scale))
        later = [macros.get(f"copy.{n}") == "1"
                 for n in ("second", "third", "fourth", "fifth")]
        macros.update(earlier_block_macros(src.read_archived_block("first"), any(later)))
        macros.update(earlier_block_macros(src.read_archived_block("second"),
                                           any(later[1:]), prefix="copy.secondblock"))
        macros.update(earlier_block_macros(src.read_archived_block("third"),
                                           any(later[2:]), prefix="copy.thirdblock"))
        macros.update(earlier_block_macros(src.read_archived_block("fourth"), later[3],
                                           prefix="copy.fourthblock"))
        tables["copying"], tables["copying_flags"] = (copying_table(frame),
                                                     copying_flag_table(frame))
    return macros, tables


#: The commit after which an update flagged in one module enters no refined update
#: (simulations/results/archive/README.md).
QUARANTINE_COMMIT = "54cbe35"
#: The commit that made the LoRA null predictive (each statistic from the others').
NULL_COMMIT = "7e7a791"
#: The commit that made the smallest cross-validated error the joint rank's default
#: (PROTOCOL amendment 7).
RANK_RULE_COMMIT = "623c5d6"
#: The commit that made clipping the default stand-in for a module-flagged update.
CLIP_COMMIT = "cdaa0d4"
#: The code of the archived ``rounds_detection`` table with the quarantine
#: (simulations/results/archive/README.md; its rows predate the ``code_commit`` column).
RDET_PREVIOUS_COMMIT = "d0adb7f"


def _relation(frame, commit):
    """Whether every row of ``frame`` was written by ``commit`` or a descendant: True,
    False (some row not), or None (some row's commit cannot be placed: no git history,
    a shallow clone, no ``code_commit`` column)."""
    commits = set(frame["code_commit"]) if "code_commit" in frame else set()
    relations = {src.commit_relation(commit, c) for c in commits} or {None}
    if False in relations:
        return False
    return True if relations == {True} else None


def _stand_in(frame):
    """The stand-ins for a module-flagged update a table's rows were made with: the
    ``clair_stand_in`` column where the study writes it, else ``{"clip"}`` when every
    row's ``code_commit`` is ``CLIP_COMMIT`` or later (the default since), an empty set
    when some row's is known to be earlier, and None when that cannot be told."""
    if "clair_stand_in" in frame:
        return set(frame["clair_stand_in"].dropna())
    relation = _relation(frame, CLIP_COMMIT)
    return {"clip"} if relation else (None if relation is None else set())


def _paired_tables(before, after):
    """Two tables of one study sorted alike, or None unless both exist with the same
    seeds row for row (then their replicates can be compared pairwise)."""
    if before is None or after is None or before.empty or after.empty:
        return None
    before = before.sort_values(["cell", "replicate"]).reset_index(drop=True)
    after = after.sort_values(["cell", "replicate"]).reset_index(drop=True)
    if len(before) != len(after) or not (before["seed"].values == after["seed"].values).all():
        return None
    return before, after


def quarantine_macros(before, after):
    """CLAIR's gain on the development block before and after the joint refinement
    quarantined module-flagged updates (commit 54cbe35), replicate by replicate on the
    same seeds: ``copy.quarantine.<setting>.diff`` (after minus before, percentage
    points, paired bootstrap interval), ``copy.quarantine.flags`` (whether every
    client-level flag is the same, as words), ``copy.quarantine.replicates``. ``{"copy.quarantine.has":
    "0"}`` when either table is missing or their seeds differ."""
    paired = _paired_tables(before, after)
    if paired is None:
        return {"copy.quarantine.has": "0"}
    before, after = paired
    macros = {"copy.quarantine.has": "1", "copy.quarantine.commit": QUARANTINE_COMMIT,
              "copy.quarantine.replicates": fmt(int(before.groupby("cell").size().min()))}
    macros.update(_gain_differences(before, after, "copy.quarantine")[0])
    flags = [c for c in before.columns if c.startswith("flagged_clair_c")]
    same = bool((before[flags].values == after[flags].values).all())
    macros["copy.quarantine.flags"] = ("with the same client flags in every replicate"
                                       if same else "and some client flags changed")
    return macros


def _gain_differences(before, after, prefix):
    """CLAIR's gain after minus before, replicate by replicate on paired tables: per
    setting ``<prefix>.<setting>.diff`` (mean, paired bootstrap interval), and every
    replicate's difference."""
    from simulations.copying.analysis import paired_bootstrap, replicate_gains

    macros, every = {}, []
    for setting in ("homogeneous", "heterogeneous"):
        diff = (replicate_gains(after, setting)["clair"]
                - replicate_gains(before, setting)["clair"]).to_numpy()
        mean, low, high = paired_bootstrap(diff)
        macros[f"{prefix}.{setting}.diff"] = (
            f"{fmt_fixed(mean, 2)} [{fmt_fixed(low, 2)}, {fmt_fixed(high, 2)}]")
        every.extend(diff)
    return macros, every


def null_change_macros(before, after):
    """The development block before and after the predictive LoRA null (commit
    ``NULL_COMMIT``), replicate by replicate on the same seeds: CLAIR's gain change per
    setting (``copy.nullchange.<setting>.diff``, paired bootstrap interval), the largest
    change in any replicate (``copy.nullchange.maxdiff``, percentage points), and whether
    every client flag of CLAIR's variants is the same (``copy.nullchange.flags``, words).
    ``{"copy.nullchange.has": "0"}`` without both tables on the same seeds."""
    paired = _paired_tables(before, after)
    if paired is None:
        return {"copy.nullchange.has": "0"}
    before, after = paired
    macros = {"copy.nullchange.has": "1", "copy.nullchange.commit": NULL_COMMIT}
    differences, diffs = _gain_differences(before, after, "copy.nullchange")
    macros.update(differences)
    macros["copy.nullchange.maxdiff"] = fmt_fixed(max(abs(float(v)) for v in diffs), 2)
    flags = [c for c in before.columns if c.startswith("flagged_clair")]
    changed = int((before[flags].values != after[flags].values).sum())
    macros["copy.nullchange.flags"] = ("not one client flag changed" if changed == 0 else
                                       f"{fmt(changed)} client flags changed")
    return macros


#: PROTOCOL amendment 8's two multi-Krum configurations, as the text names them: the
#: primary (Krum's f, m = n - f) and the one told the number of attackers.
MULTIKRUM_RULES = {"m10": "multikrum_m10", "f4": "multikrum_f4_m12"}


def multikrum_macros(summary, commits):
    """PROTOCOL amendment 8 (``mk.*``): per setting (``hom``, ``het``) and configuration
    (:data:`MULTIKRUM_RULES`) multi-Krum's gain, CLAIR minus it in points with the
    paired interval, the replicates where CLAIR is below and the amendment's verdict
    (``ahead``, ``behind``, ``undecided``); the configurations' f and m (from the
    script's ``RULES``), the smallest difference that counts, the replicates per
    setting, the rows' commits as words (``mk.commits``); ``mk.has`` (the whole block
    in) and per setting ``mk.<setting>.behind`` (CLAIR behind either configuration) and
    ``mk.<setting>.undecided`` (behind neither, not ahead of both)."""
    if summary is None:
        return {"mk.has": "0", "mk.hom.behind": "0", "mk.het.behind": "0",
                "mk.hom.undecided": "0"}
    from simulations.copying.replicate import DEFAULT_PARAMS

    script = src._load_script("copying_multikrum")
    n_clients = int(DEFAULT_PARAMS["n_clients"])
    names = {"homogeneous": "hom", "heterogeneous": "het"}
    rows = {(names[r["setting"]], r["rule"]): r for r in summary if r["block"] == "full"}
    codes = [rf"\code{{{commit}}}" for commit in commits]
    macros = {"mk.has": "1",
              "mk.commits": ("commit " if len(codes) == 1 else "commits ") + (
                  ", ".join(codes[:-1]) + " and " + codes[-1] if len(codes) > 1
                  else codes[0]),
              "mk.n": fmt(min(r["replicates"] for r in rows.values())),
              "mk.minpoints": fmt(script.MIN_POINTS)}
    for key, rule in MULTIKRUM_RULES.items():
        options = script.RULES[rule][1]
        # krum's default f: the largest with n_clients >= 2 f + 3
        f = options.get("n_byzantine", (n_clients - 3) // 2)
        macros.update({f"mk.{key}.f": fmt(f), f"mk.{key}.m": fmt(options["multi"])})
    for setting in ("hom", "het"):
        for key, rule in MULTIKRUM_RULES.items():
            row = rows[(setting, rule)]
            prefix = f"mk.{setting}.{key}"
            macros.update({
                f"{prefix}.gain": fmt_pct(row["rule_gain"] / 100),
                f"{prefix}.diff": _diff_text({"diff": row["diff"], "diff_low": row["low"],
                                              "diff_high": row["high"]}),
                f"{prefix}.below": fmt(row["below"]),
                f"{prefix}.verdict": row["verdict"]})
        verdicts = {rows[(setting, rule)]["verdict"] for rule in MULTIKRUM_RULES.values()}
        macros[f"mk.{setting}.behind"] = "1" if "behind" in verdicts else "0"
        # not behind either configuration, not ahead of both
        macros[f"mk.{setting}.undecided"] = "1" if "undecided" in verdicts and \
            "behind" not in verdicts else "0"
    return macros


def cycles_macros(rows):
    """The detection's cycles in the copying experiment (``cyc.*``, from
    ``benchmarks/copying_cycles.py``'s rows): at 8 heterogeneous clients the attackers'
    recall with the package's flags and with the final tests' rejections counted, the
    replicates, ``cyc.het8.mostmissed`` (most attackers pass even then); over the cells
    the smallest and largest share of module fits that did not converge; ``cyc.has``."""
    cell = [r for r in rows or () if (r["setting"], r["n_clients"]) == ("heterogeneous", 8)]
    if not cell:
        return {"cyc.has": "0"}

    def recall(rule):
        return sum(r[rule]["recall"] * r["attackers"] for r in cell) / sum(
            r["attackers"] for r in cell)

    shares = []
    for key in {(r["setting"], r["n_clients"]) for r in rows}:
        sub = [r for r in rows if (r["setting"], r["n_clients"]) == key]
        shares.append(sum(r["not_converged"] for r in sub) / sum(r["modules"] for r in sub))
    return {"cyc.has": "1", "cyc.het8.replicates": fmt(len(cell)),
            # "1": most attackers pass even with the rejections counted (the cycles are
            # then the smaller part of the loss of recall)
            "cyc.het8.mostmissed": "1" if recall("rejections_count") < 0.5 else "0",
            "cyc.het8.recall": fmt_fixed(recall("package"), 2),
            "cyc.het8.recallrej": fmt_fixed(recall("rejections_count"), 2),
            "cyc.notconv.low": fmt_pct(min(shares), 0, sign=False),
            "cyc.notconv.high": fmt_pct(max(shares), 0, sign=False)}


def no_detection_macros(normal, pooled):
    """What the tests add to CLAIR's gain on the development block: the ``no-detection``
    control (nobody flagged, the joint refinement pooling every client) against the
    default on the same seeds. Per setting ``copy.nodetect.<setting>.gain`` (the
    control's gain over local LoRA, paired bootstrap interval), ``.fedavg`` (FedAvg's
    on the same replicates, which also averages every client), ``.diff`` (control
    minus default, replicate by replicate), ``.rank`` and ``.rankpooled`` (the mean
    joint rank of the default and of the control); ``copy.nodetect.replicates`` and
    ``copy.nodetect.contaminated``. ``{"copy.nodetect.has": "0"}`` without both tables
    on the same seeds, or unless the control's rows were made by the code of the
    default's rows (the same ``code_commit``: the comparison is of the tests, nothing
    else)."""
    from simulations.copying.analysis import paired_bootstrap, replicate_gains

    paired = _paired_tables(normal, pooled)
    if paired is None or set(paired[0]["code_commit"]) != set(paired[1]["code_commit"]):
        return {"copy.nodetect.has": "0"}
    normal, pooled = paired
    macros = {"copy.nodetect.has": "1",
              "copy.nodetect.replicates": fmt(int(normal.groupby("cell").size().min())),
              "copy.nodetect.contaminated": fmt(int(normal["n_contaminated"].max()))}
    macros.update(_gain_differences(normal, pooled, "copy.nodetect")[0])
    for setting in ("homogeneous", "heterogeneous"):
        for key, gains in (("gain", replicate_gains(pooled, setting)["clair"]),
                           ("fedavg", replicate_gains(normal, setting)["fedavg"])):
            mean, low, high = paired_bootstrap(gains)
            macros[f"copy.nodetect.{setting}.{key}"] = (
                f"{fmt_fixed(mean, 2)} [{fmt_fixed(low, 2)}, {fmt_fixed(high, 2)}]")
        for key, frame in (("rank", normal), ("rankpooled", pooled)):
            ranks = frame.loc[frame["setting"] == setting, "rank_clair"]
            macros[f"copy.nodetect.{setting}.{key}"] = fmt_fixed(float(ranks.mean()), 1)
    return macros


def rank_change_macros(before, after):
    """The development block before and after the smallest-error joint rank became the
    default (``RANK_RULE_COMMIT``), replicate by replicate on the same seeds: CLAIR's
    gain change per setting (``copy.rankchange.<setting>.diff``, percentage points,
    paired bootstrap interval), the largest change (``copy.rankchange.maxdiff``), the
    replicates whose joint rank changed (``copy.rankchange.<setting>.nrank``), and
    whether every client flag is the same (``copy.rankchange.flags``, words).
    ``{"copy.rankchange.has": "0"}`` without both tables on the same seeds, or unless
    the later rows were made, as far as git tells, with the new rule."""
    paired = _paired_tables(before, after)
    if paired is None or not _relation(paired[1], RANK_RULE_COMMIT):
        return {"copy.rankchange.has": "0"}
    before, after = paired
    macros = {"copy.rankchange.has": "1",
              "copy.rankchange.replicates": fmt(int(before.groupby("setting")
                                                    ["replicate"].nunique().min()))}
    differences, diffs = _gain_differences(before, after, "copy.rankchange")
    macros.update(differences)
    macros["copy.rankchange.maxdiff"] = fmt_fixed(max(abs(float(v)) for v in diffs), 2)
    for setting in ("homogeneous", "heterogeneous"):
        rows = (before["setting"] == setting).to_numpy()
        changed = (before["rank_clair"].to_numpy()[rows]
                   != after["rank_clair"].to_numpy()[rows])
        macros[f"copy.rankchange.{setting}.nrank"] = fmt(int(changed.sum()))
    flags = [c for c in before.columns if c.startswith("flagged_clair")]
    changed = int((before[flags].values != after[flags].values).sum())
    macros["copy.rankchange.flags"] = ("not one client flag changed" if changed == 0 else
                                       f"{fmt(changed)} client flags changed")
    return macros


def _paired_on_current(before, after):
    """:func:`_paired_tables`, or None unless the later table's rows were made, as far
    as git tells, with the clipping and the predictive null (the text's claims)."""
    paired = _paired_tables(before, after)
    if paired is None or _stand_in(after) != {"clip"} or not _relation(after, NULL_COMMIT):
        return None
    return paired


def rounds_previous_macros(before, after):
    """``rounds_detection`` with the code of ``RDET_PREVIOUS_COMMIT`` (the quarantine of
    module-flagged updates and the LoRA null before the predictive one) and as committed
    now, on the same seeds: the earlier table's macros under ``rdet.prev.`` (those the
    text compares), the current rows' commit (``rdet.commit``), and CLAIR's gain change
    on the clean designs, default strategy, replicate by replicate
    (``rdet.prev.clean.diff``, percentage points, paired bootstrap interval).
    ``{"rdet.prev.has": "0"}`` without both tables on the same seeds, or unless the
    current rows were made, as far as git tells, with the clipping and the predictive
    null."""
    from simulations.copying.analysis import paired_bootstrap

    paired = _paired_on_current(before, after)
    if paired is None:
        return {"rdet.prev.has": "0"}
    before, after = paired
    earlier = rounds_detection_macros(before, "small")
    keep = ("rdet.module.first", "rdet.clean.heterogeneous.module.last",
            "rdet.clean.homogeneous.module.last", "rdet.clean.anyrep.last",
            "rdet.clean.flags", "rdet.clean.kept", "rdet.none.clean.gain",
            "rdet.none.clean.anyrep.last", "rdet.global.clean.anyrep.last",
            "rdet.confirm.global.clean.anyrep.last", "rdet.confirm.none.clean.anyrep.last",
            "rdet.confirm.global.recall.last", "rdet.confirm.none.recall.last",
            "rdet.confirm.clean.diff", "rdet.confirm.contaminated.diff", "rdet.confirm.c1",
            "rdet.confirm.c2", "rdet.none.clean.heterogeneous.group.last",
            "rdet.norobust.clean.heterogeneous.group.last", "rdet.norobust.group.diff")
    if not set(keep) <= set(earlier):
        return {"rdet.prev.has": "0"}
    macros = {"rdet.prev.has": "1", "rdet.prev.commit": RDET_PREVIOUS_COMMIT,
              "rdet.commit": ", ".join(sorted(set(after["code_commit"])))}
    macros.update({"rdet.prev." + key[len("rdet."):]: earlier[key] for key in keep})
    arm = after["intervention"].fillna("none") if "intervention" in after else None
    rows = ((after["design"] == "clean") & (after["seed_block"] != "rounds_detection_confirm")
            & ((arm == "none") if arm is not None else True))
    diff = 100 * (after.loc[rows, "rel_clair"] - before.loc[rows, "rel_clair"]).to_numpy(float)
    mean, low, high = paired_bootstrap(diff)
    macros["rdet.prev.clean.diff"] = (f"{fmt_fixed(mean, 2)} [{fmt_fixed(low, 2)}, "
                                      f"{fmt_fixed(high, 2)}]")
    return macros


def rounds_previous_table_macros(before, after):
    """``copying_rounds`` with the quarantine and the earlier LoRA null (archived) and as
    committed now on the clipping default, on the same seeds: the earlier table's
    clean-design false alarms (``rounds.prev.clean.anyflag``, ``.benign``, ``.nrep``).
    ``{"rounds.prev.has": "0"}`` without both tables on the same seeds, or unless the
    current rows were made, as far as git tells, with the clipping and the predictive
    null."""
    paired = _paired_on_current(before, after)
    if paired is None:
        return {"rounds.prev.has": "0"}
    earlier = rounds_macros(paired[0], "small")
    keys = ("rounds.clean.anyflag", "rounds.clean.benign", "rounds.clean.nrep")
    if not set(keys) <= set(earlier):
        return {"rounds.prev.has": "0"}
    return {"rounds.prev.has": "1", **{"rounds.prev." + key[len("rounds."):]: earlier[key]
                                       for key in keys}}


def sweep_quarantine_macros(before, after):
    """The design sweep before and after the quarantine (commit ``QUARANTINE_COMMIT``),
    replicate by replicate on the same seeds: per design point CLAIR's mean gain change
    (percentage points, paired bootstrap interval); ``copy.quarantine.sweep.below``
    points whose interval lies below zero, ``.above`` above it, ``.npoints``, and the
    point of the largest fall (``.worst.diff``, ``.worst.setting``, ``.worst.clients``,
    ``.worst.share``). ``{"copy.quarantine.sweep.has": "0"}`` without both tables on the
    same seeds."""
    from simulations.copying.analysis import paired_bootstrap

    paired = _paired_tables(before, after)
    if paired is None:
        return {"copy.quarantine.sweep.has": "0"}
    before, after = paired
    diff = after.assign(diff=100 * (after["rel_clair"] - before["rel_clair"]))
    rows = []
    for (setting, n_clients, n_bad), sub in diff.groupby(["setting", "n_clients",
                                                          "n_contaminated"]):
        mean, low, high = paired_bootstrap(sub["diff"].to_numpy())
        # the design's nominal share, as the sweep's own summary names its points
        # (3 of 8 clients is the point "40 %", not 38 %)
        share = (float(sub["contaminated_share"].iloc[0]) if "contaminated_share" in sub
                 else n_bad / n_clients)
        rows.append((mean, low, high, setting, int(n_clients), share))
    worst = min(rows)
    return {"copy.quarantine.sweep.has": "1", "copy.quarantine.sweep.npoints": fmt(len(rows)),
            "copy.quarantine.sweep.below": fmt(sum(row[2] < 0 for row in rows)),
            "copy.quarantine.sweep.above": fmt(sum(row[1] > 0 for row in rows)),
            "copy.quarantine.sweep.worst.diff": (f"{fmt_fixed(worst[0], 1)} "
                                                 f"[{fmt_fixed(worst[1], 1)}, "
                                                 f"{fmt_fixed(worst[2], 1)}]"),
            "copy.quarantine.sweep.worst.setting": worst[3],
            "copy.quarantine.sweep.worst.clients": fmt(worst[4]),
            "copy.quarantine.sweep.worst.share": fmt_pct(worst[5], 0, sign=False)}


def _diff_text(row):
    """A copying_flagged summary row's clip - quarantine difference with its interval."""
    sign = "+" if row["diff"] > 0 else ""
    return (f"{sign}{fmt_fixed(row['diff'], 2)} [{fmt_fixed(row['diff_low'], 2)}, "
            f"{fmt_fixed(row['diff_high'], 2)}]")


def flagged_macros(frame, scale):
    """The comparison of the stand-ins for a module-flagged update (``copying_flagged``):
    per cell (``flagged.het16``, ``flagged.het8``, ``flagged.hom16``) each policy's gain,
    the paired difference clip - quarantine in points with its interval, the replicates
    either way and the pre-registered verdict; ``flagged.has``, ``flagged.full`` (the
    pre-registered block, else development), ``flagged.allpass``."""
    from simulations.studies.copying_flagged import summary, verdicts

    if frame is None:
        return {"flagged.has": "0"}
    table, decided = summary(frame), verdicts(frame)
    names = {"heterogeneous": "het", "homogeneous": "hom"}
    macros = {"flagged.has": "1", "flagged.full": "1" if scale == "full" else "0",
              "flagged.replicates": fmt(int(table["replicates"].min())),
              "flagged.allpass": "1" if (decided["verdict"] == "pass").all() else "0",
              "flagged.identity": decided["verdict"].iloc[-1],
              "flagged.flagdiffs": fmt(int(decided["observed"].iloc[-1]))}
    for row in table.to_dict("records"):
        key = f"flagged.{names[row['setting']]}{int(row['n_clients'])}"
        macros.update({
            f"{key}.diff": _diff_text(row),
            f"{key}.quarantine": _gain_text(row["gain_quarantine"],
                                            row["low_quarantine"],
                                            row["high_quarantine"]),
            f"{key}.clip": _gain_text(row["gain_clip"], row["low_clip"], row["high_clip"]),
            f"{key}.better": fmt(int(row["clip_better"])),
            f"{key}.worse": fmt(int(row["clip_worse"])),
            f"{key}.contaminated": fmt(int(row["n_contaminated"])),
            f"{key}.clients": fmt(int(row["n_clients"]))})
    for row in decided.iloc[:-1].to_dict("records"):
        setting, clients = row["rule"].split(", ")[1:]
        key = f"flagged.{names[setting]}{clients.split()[0]}"
        macros[f"{key}.verdict"] = row["verdict"]
        macros[f"{key}.margin"] = fmt_fixed(row["margin"][0], 2)
    return macros


def flagged_rerun_macros(preregistered, rerun):
    """The pre-registered ``copying_flagged`` block against its rerun on the same seeds
    with the predictive LoRA null (and whatever else changed by the commit of its rows,
    ``flagged.rerun.commit``): per cell (``flagged.rerun.het16`` ...) the rerun's
    clip - quarantine difference, clipping's gain and verdict, and the attackers'
    recall under clipping in both (``.recall``, ``.recallbefore``); ``flagged.rerun.has``
    and ``flagged.rerun.allpass``. ``{"flagged.rerun.has": "0"}`` without both."""
    from simulations.studies.copying_flagged import summary, verdicts

    if _paired_tables(preregistered, rerun) is None:
        return {"flagged.rerun.has": "0"}
    names = {"heterogeneous": "het", "homogeneous": "hom"}
    before, after = summary(preregistered), summary(rerun)
    decided = verdicts(rerun)
    from clairstat._estimator import FEW_CLIENTS_PREDICTIVE

    macros = {"flagged.rerun.has": "1",
              "flagged.rerun.commit": ", ".join(sorted(set(rerun["code_commit"]))),
              "lora.fewclients": fmt(FEW_CLIENTS_PREDICTIVE),
              "flagged.rerun.allpass": "1" if (decided["verdict"] == "pass").all()
              else "0"}
    for old, row in zip(before.to_dict("records"), after.to_dict("records")):
        key = f"flagged.rerun.{names[row['setting']]}{int(row['n_clients'])}"
        macros.update({
            f"{key}.diff": _diff_text(row),
            f"{key}.clip": _gain_text(row["gain_clip"], row["low_clip"], row["high_clip"]),
            f"{key}.recall": fmt_fixed(row["recall_clip"], 2),
            f"{key}.recallbefore": fmt_fixed(old["recall_clip"], 2)})
    for row in decided.iloc[:-1].to_dict("records"):
        setting, clients = row["rule"].split(", ")[1:]
        macros[f"flagged.rerun.{names[setting]}{clients.split()[0]}.verdict"] = row["verdict"]
    return macros


def joint_rank_macros(frame):
    """The joint rank's confirmatory block (``jr.*``; ``jr.has`` its paragraph's switch,
    ``jr.better`` the amendment's decision): per cell (``small``: 8 heterogeneous
    clients; ``het``, ``hom``: 16) the gains of the default and the smallest-error
    rule in %, their paired difference in points with its interval, and how often the
    cross-validation chose rank 0."""
    if frame is None:
        return {"jr.has": "0", "jr.better": "0"}
    from simulations.studies.copying_joint_rank import (MAX_COST_POINTS, amendment_six,
                                                        rank_table)

    table = rank_table(frame)
    macros = {"jr.has": "1", "jr.better": "1" if amendment_six(table)["better"] else "0",
              "jr.n": fmt(int(table["replicates"].min())),
              "jr.maxcost": fmt_fixed(MAX_COST_POINTS, 1)}
    for _, row in table.iterrows():
        key = ("small" if row["n_clients"] == 8 else
               "het" if row["setting"] == "heterogeneous" else "hom")
        for name in ("default", "best"):
            macros[f"jr.{key}.{name}"] = fmt_pct(row[f"gain_{name}"] / 100, 2)
        for name, column in (("diff", "best_minus_default"), ("difflo", "diff_low"),
                             ("diffhi", "diff_high")):
            text = fmt_fixed(row[column], 2)  # points, the sign shown
            macros[f"jr.{key}.{name}"] = ("+" + text if float(f"{row[column]:.2f}") > 0
                                          else text)
        macros[f"jr.{key}.rankzero"] = fmt(int(row["rank_cv_zero"]))
        macros[f"jr.{key}.clients"] = fmt(int(row["n_clients"]))
    return macros


#: The development studies of the copying section that use the LoRA per-module null,
#: with how the text names them: (study, scale, words).
NULL_STUDIES = (("copying_flagged", "full", "the comparison of what stands in for a "
                 "module-flagged update"),
                ("copying_joint_rank", "small", "the joint rank's study"),
                ("copying_sweep", "small", "the design sweep"),
                ("copying_rounds", "small", "the multi-round runs in Flower"),
                ("rounds_detection", "small", "the replay of the multi-round runs"))


def null_rerun_macros(results_dir=None):
    """Which of :data:`NULL_STUDIES` were written by the code of ``NULL_COMMIT`` or later
    (every row's ``code_commit``, by git ancestry) and which before:
    ``copy.nullchange.rerun`` and ``copy.nullchange.stale`` (their names, as a list in
    words), ``copy.nullchange.nrerun`` and ``copy.nullchange.nstale``, and
    ``copy.nullchange.rdetstale`` (``1`` when the replay is among the stale) and
    ``copy.nullchange.rdetnew`` (among the rerun); a table whose rows' commits git
    cannot place (no history) is in neither. ``copy.rankchange.stale`` (and ``.nstale``)
    name those made before ``RANK_RULE_COMMIT``; ``copy.ranknew.<study>`` is ``1`` when
    every row of a study (not ``copying_joint_rank``, which names its rule) was made with
    the smallest-error joint rank."""
    from simulations import load_table, results_path

    root = Path(results_dir or src.SOURCES["copying"])
    rerun, stale, rank_stale, macros = [], [], [], {}
    for study, scale, words in NULL_STUDIES:
        path = results_path(study, scale, root)
        if not path.exists():
            continue
        frame = load_table(path)
        # the stand-in for a module-flagged update the rows were made with ("?": it
        # cannot be told, and the text then says nothing of it)
        stand_in = _stand_in(frame)
        macros[f"copy.clip.{study}"] = ("?" if stand_in is None
                                        else "1" if stand_in == {"clip"} else "0")
        on_new = _relation(frame, NULL_COMMIT)
        if on_new is not None:  # a table that cannot be placed is named in neither list
            (rerun if on_new else stale).append((study, words))
        # copying_joint_rank names its rule; the others used the default of their time
        if study != "copying_joint_rank":
            on_rank_rule = _relation(frame, RANK_RULE_COMMIT)
            if on_rank_rule is False:
                rank_stale.append((study, words))
            # "1": every row made with the smallest-error joint rank (the text says so)
            macros[f"copy.ranknew.{study}"] = "1" if on_rank_rule else "0"

    def listed(items):
        words = [w for _, w in items]
        return (", ".join(words[:-1]) + " and " + words[-1]) if len(words) > 1 else \
            "".join(words)

    return {**macros,
            "copy.rankchange.stale": listed(rank_stale),
            "copy.rankchange.nstale": fmt(len(rank_stale)),
            "copy.nullchange.rerun": listed(rerun), "copy.nullchange.stale": listed(stale),
            "copy.nullchange.nrerun": fmt(len(rerun)), "copy.nullchange.nstale": fmt(len(stale)),
            "copy.nullchange.rdetstale": "1" if any(s == "rounds_detection" for s, _ in stale)
            else "0",
            "copy.nullchange.rdetnew": "1" if any(s == "rounds_detection" for s, _ in rerun)
            else "0",
            "copy.nullchange.flaggedstale": "1" if any(s == "copying_flagged" for s, _ in stale)
            else "0"}


def write_generated(out_dir):
    """Write ``macros.tex`` and the tables into ``out_dir``; the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    macros, tables = collect()
    header = ("% Written by `python -m paper --tex` from the committed result files\n"
              "% (paper/_sources.py). Do not edit: rebuild.\n")
    lines = [rf"\setres{{{key}}}{{{value}}}" for key, value in sorted(macros.items())]
    def switch(name, *keys, test=lambda value: value == "1"):
        """``\\<name>true`` when every macro of ``keys`` passes ``test``, else false."""
        on = all(test(macros.get(key)) for key in keys)
        return rf"\{name}{'true' if on else 'false'}"

    # Each \if of the text and the macros it needs. The copying section says which seed
    # block it quotes (confirmatory and complete, or development / incomplete); the text
    # quotes the concurrency benchmark and the full-scale verdicts only when committed;
    # the per-round paragraphs need the replay's table with both interventions and the
    # null benchmark, the confirmation's its complete block.
    lines += [
        switch("valfull", "val.hasfull"), switch("concurrency", "bench.hasconc"),
        switch("copysweep", "sweep.has"), switch("sweepclip", "sweep.clip"),
        switch("quarantine", "copy.quarantine.has"),
        switch("sweepquarantine", "copy.quarantine.sweep.has"),
        switch("copyrounds", "rounds.has"), switch("roundsfull", "rounds.full"),
        switch("roundsprev", "rounds.prev.has"),
        switch("roundsanyflag", "rounds.clean.anyflag", test=lambda v: v not in (None, "0")),
        switch("rdet", "rdet.has") if {"bench.loranull.a16", "rdet.global.clean.nrep",
                                       "rdet.norobust.clean.nrep"} <= set(macros)
        else r"\rdetfalse",
        switch("rdetconfirm", "rdet.confirm.has"),
        switch("rdetprev", "rdet.prev.has"),
        switch("rdetgroupdiff", "rdet.norobust.group.excludes0"),
        switch("rdetfirstexcess", "rdet.has", "rdet.module.first.excess"),
        switch("calibnow", "calibnow.has"),
        switch("calibheldout", "calibho.has"), switch("calibheldoutb", "calibhob.has"),
        switch("calibheldoutc", "calibhoc.has"), switch("calibframe", "calibhof.has"),
        switch("calibheldoutg", "calibhog.has"), switch("calibevidence", "calibev.has"),
        switch("exnull", "exnull.has"), switch("calcost", "calcost.has"),
        switch("fewk", "fewk.has"), switch("tiltcap", "tilt.has"),
        switch("newcl", "newcl.has"),
        switch("jointrank", "jr.has"), switch("jointrankbetter", "jr.has", "jr.better"),
        switch("flagged", "flagged.has"), switch("flaggedfull", "flagged.full"),
        switch("flaggedallpass", "flagged.allpass"),
        switch("copylowrank", "copy.lowrank.n", test=lambda value: value not in (None, "0")),
        switch("copysecond", "copy.second", "copy.first.has"),
        switch("copythird", "copy.third", "copy.first.has", "copy.secondblock.has"),
        switch("copyfourth", "copy.fourth", "copy.first.has", "copy.secondblock.has",
               "copy.thirdblock.has", "copy.nullchange.has"),
        switch("copyfifth", "copy.fifth", "copy.first.has", "copy.secondblock.has",
               "copy.thirdblock.has", "copy.fourthblock.has", "copy.rankchange.has"),
        switch("rankchange", "copy.rankchange.has"),
        switch("nodetect", "copy.nodetect.has"),
        switch("multikrum", "mk.has"), switch("mkhombehind", "mk.hom.behind"),
        switch("mkhetbehind", "mk.het.behind"), switch("mkhomundecided", "mk.hom.undecided"),
        switch("cycles", "cyc.has"), switch("cycmostmissed", "cyc.het8.mostmissed"),
        switch("rankstale", "copy.rankchange.nstale", test=lambda v: v not in (None, "0")),
        switch("clipdefault", "copy.clip"),  # the wording about the default
        switch("nullchange", "copy.nullchange.has"),
        switch("nullrerun", "copy.nullchange.nrerun", test=lambda v: v not in (None, "0")),
        switch("nullstale", "copy.nullchange.nstale", test=lambda v: v not in (None, "0")),
        switch("rdetnullstale", "copy.nullchange.rdetstale"),
        switch("rdetnullnew", "copy.nullchange.rdetnew"),
        switch("flaggedrerun", "flagged.rerun.has"),
        switch("flaggedranknew", "copy.ranknew.copying_flagged"),
        switch("rdetranknew", "copy.ranknew.rounds_detection"),
        # "?" (no git history to tell): no sentence saying the rows are stale
        switch("roundsclip", "copy.clip.copying_rounds", test=lambda v: v in ("1", "?")),
        switch("rdetclip", "copy.clip.rounds_detection", test=lambda v: v in ("1", "?")),
        switch("copyconfirm", "copy.confirmatory", "copy.complete")]
    paths = [out_dir / "macros.tex"]
    paths[0].write_text(header + "\n".join(lines) + "\n")
    for name, body in tables.items():
        path = out_dir / f"{name}.tex"
        path.write_text(header + body)
        paths.append(path)
    return paths

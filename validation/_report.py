"""The verdict tables: printed, and written as JSON and Markdown.

Theory checks (statistical evidence, verdict from a pre-registered margin) and identity
checks (exact facts of the code, unit-test grade) are tabled and counted apart.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

__all__ = ["format_value", "format_margin", "markdown_table", "write_report"]

_COLUMNS = ("check", "kind", "study", "statistic", "expected", "observed", "95% interval",
            "margin", "verdict")


def format_value(value, digits=3):
    """Short text for a number (or pass other values through ``str``).

    Examples
    --------
    >>> format_value(0.123456), format_value(None), format_value("<= 1")
    ('0.123', '', '<= 1')
    """
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


def format_margin(margin):
    """A margin as text: ``[a, b]``, ``>= a`` or ``<= b`` for a one-sided claim.

    Examples
    --------
    >>> format_margin([0.9, 1.1]), format_margin([0.9, math.inf])
    ('[0.9, 1.1]', '>= 0.9')
    >>> format_margin([-math.inf, 0.05])
    '<= 0.05'
    """
    if not margin:
        return ""
    low, high = margin
    if math.isinf(high):
        return f">= {format_value(low)}"
    if math.isinf(low):
        return f"<= {format_value(high)}"
    return f"[{format_value(low)}, {format_value(high)}]"


def _cells(row):
    interval = row.get("interval")
    shown = (f"[{format_value(interval[0])}, {format_value(interval[1])}]"
             if interval else "")
    shown_verdict = "pass" if row["verdict"] == "pass" else row["verdict"].upper()
    if row["verdict"] == "fail" and row.get("known_failure_mismatch"):
        low, high = row["known_range"]
        shown_verdict += (f" (outside the documented failure's range [{format_value(low)}, "
                          f"{format_value(high)}]: {row['known_failure']})")
    elif row["verdict"] == "fail" and row.get("known_failure"):
        shown_verdict += f" (known: {row['known_failure']})"
    if row.get("stale_known_failure"):
        shown_verdict += (f" (documented as failing: {row['known_failure']}; "
                          + ("stale tag)" if row["verdict"] == "pass" else "not decided here)"))
    return (row["name"], row.get("kind", ""), row["study"], str(row.get("statistic", "")),
            format_value(row.get("expected")), format_value(row.get("observed")), shown,
            format_margin(row.get("margin")), shown_verdict)


def markdown_table(rows):
    """The verdicts as a GitHub-flavoured Markdown table."""
    escape = lambda text: str(text).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(escape(c) for c in _cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def _details(rows):
    lines = []
    for row in rows:
        source = f" [{row['source']}]" if row.get("source") else ""
        lines.append(f"- **{row['name']}** ({row.get('kind', '')}, {row['verdict']}): "
                     f"{row['claim']}{source}")
        if row.get("detail"):
            lines.append(f"  - {row['detail']}")
    return "\n".join(lines)


def _figures(rows, scale, output_dir):
    """Links to each study's figure, as ``python -m paper --scale SCALE`` writes them."""
    figures = Path(__file__).resolve().parents[1] / "paper" / "figures_out" / scale
    relative = Path(os.path.relpath(figures, Path(output_dir).resolve()))
    studies = sorted({row["study"] for row in rows})
    lines = ["## Figures", "", f"Drawn from the same tables by `python -m paper --scale "
             f"{scale}` (one script per figure, `paper/figures/<study>.py`).", ""]
    from simulations import available_studies

    others = set(available_studies())  # copying_sweep.png is its own study's figure
    links = []
    for study in studies:  # study.png, or one figure per setting (study_<setting>.png)
        found = sorted(figures.glob(f"{study}.png")) + sorted(figures.glob(f"{study}_*.png"))
        found = [f for f in found if f.stem == study or f.stem not in others]
        links.append(f"- `{study}`: " + (", ".join(
            f"![{f.stem}]({(relative / f.name).as_posix()})" for f in found) if found else
            f"no figure in `paper/figures_out/{scale}/`" + (
                " (the `full` figures are drawn by `python -m paper --scale full` and not "
                "committed)" if scale == "full" else "")))
    return "\n".join(lines + links)


def _headline(meta, rows):
    theory, identity = meta["theory"], meta["identity"]
    text = (f"**Theory checks (statistical evidence): {theory['pass']} pass, "
            f"{theory['inconclusive']} inconclusive, {theory['fail']} fail, of "
            f"{theory['total']}.** **Identity checks (exact facts of the code, unit-test "
            f"grade): {identity['pass']} of {identity['total']} pass.** "
            f"{meta.get('n_known_failures', 0)} failures are documented (a claim shown "
            f"false, evidence in `validation/README.md`); "
            f"{len(meta.get('blocking', []))} block (unexplained failure or error).")
    if meta.get("stale_known_failures"):
        text += (" Documented failures not confirmed by this run (passing: a stale tag; "
                 "inconclusive: not decided at this scale): "
                 + ", ".join(meta["stale_known_failures"]) + ".")
    if meta.get("control"):
        missed = meta.get("control_targets_not_failing", [])
        text += (f"\n\n**Negative control `{meta['control']}`**: {meta['control_description']}."
                 f" Targeted checks: {', '.join(meta['control_targets'])}; "
                 + (f"NOT failing: {', '.join(missed)}." if missed
                    else "every one fails, as it must."))
    return text


def write_report(rows, meta, output_dir):
    """Write ``report.json`` and ``REPORT.md`` into ``output_dir``; return both paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / "report.json", output_dir / "REPORT.md"
    json_path.write_text(json.dumps({"meta": meta, "checks": rows}, indent=2,
                                    default=str) + "\n")
    title = f"# Validation report ({meta['scale']} scale"
    title += f", negative control `{meta['control']}`)" if meta.get("control") else ")"
    compute = sum(meta.get("replicate_seconds", {}).values())
    header = [title, "",
              f"Generated by `{meta.get('command', 'python -m validation')}` with clairstat "
              f"{meta['clairstat_version']} (commit {meta.get('commit', 'unknown')}) in "
              f"{meta['wall_time_s']:.0f} s ({meta['started']}); the tables (rows written by "
              f"clairstat {', '.join(meta.get('table_versions', [])) or 'unknown'}) hold "
              f"{compute:.0f} replicate-seconds of compute. Replicates per study: "
              + ", ".join(f"{k} {v}" for k, v in meta["replicates"].items()) + ".",
              "", _headline(meta, rows), "",
              "Verdict rule (`validation/_core.py:decide`, fixed before the data): a theory "
              "check passes only when its whole 95% interval lies inside its margin, fails "
              "when the interval lies wholly outside, and is inconclusive otherwise. The "
              "claims, with their models and sources, are in `docs/theory.md`.", ""]
    theory = [row for row in rows if row.get("kind") == "theory"]
    identity = [row for row in rows if row.get("kind") != "theory"]
    body = ["## Theory checks", "", markdown_table(theory), "",
            "## Identity checks", "", markdown_table(identity), "",
            "## Claims and details", "", _details(rows), "",
            _figures(rows, meta["scale"], output_dir), ""]
    md_path.write_text("\n".join(header + body))
    return json_path, md_path

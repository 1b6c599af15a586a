"""The verdict tables: printed, and written as JSON and Markdown.

Theory checks (statistical evidence, verdict from a pre-registered margin) and identity
checks (exact facts of the code, unit-test grade) are tabled and counted apart.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

__all__ = ["format_value", "format_margin", "format_interval", "markdown_table",
           "write_report"]

_COLUMNS = ("check", "kind", "study", "statistic", "expected", "observed", "95% interval",
            "margin", "verdict")


_MAX_DIGITS = 10  # significant digits a value is given at most before its full repr


def _order(a, b):
    return (a > b) - (a < b)


def format_value(value, digits=3, against=()):
    """Short text for a number (or pass other values through ``str``).

    Parameters
    ----------
    value : object
    digits : int, default=3
        Significant digits, unless more are needed to keep the order with ``against``.
    against : iterable of float, default=()
        Numbers (a margin's ends) the text must not seem equal to, or on the other side
        of, when the value is not: more digits are printed, up to ten, then the value's
        full ``repr``.

    Examples
    --------
    >>> format_value(0.123456), format_value(None), format_value("<= 1")
    ('0.123', '', '<= 1')
    >>> format_value(1.0000587), format_value(1.0000587, against=[1.0])
    ('1', '1.0001')
    >>> format_value(0.9999986, against=[0.999999])
    '0.9999986'
    """
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    references = [float(r) for r in against if isinstance(r, (int, float))
                  and not isinstance(r, bool) and math.isfinite(r)]
    for width in range(digits, max(digits, _MAX_DIGITS) + 1):
        text = f"{value:.{width}g}"
        if all(_order(float(text), r) == _order(value, r) for r in references):
            return text
    return repr(float(value))


def _significant(text):
    """Significant digits of a number's text (``"0.075"``: 2, ``"2.22e-12"``: 3)."""
    return len(text.lstrip("+-").split("e")[0].replace(".", "").lstrip("0"))


def _exact(value):
    """A margin's end: three significant digits, unless they make it look rounder than it
    is (``%g`` drops trailing zeros: 1 - 1e-6 would read 1), then as many as tell it
    from that round number (0.999999), ten at most. 0.075 (1.5 * 0.05 in floating point)
    is 0.075; 10 eps is 2.22e-12."""
    for width in range(3, _MAX_DIGITS + 1):
        text = f"{value:.{width}g}"
        if _significant(text) == width or math.isclose(float(text), value,
                                                        rel_tol=1e-12, abs_tol=0.0):
            return text
    return f"{value:.{_MAX_DIGITS}g}"


def format_margin(margin):
    """A margin as text: ``[a, b]``, ``>= a`` or ``<= b`` for a one-sided claim.

    An end that three significant digits would round to a rounder number (1 - 1e-6 to
    1) is given with the digits that tell it from that number.

    Examples
    --------
    >>> format_margin([0.9, 1.1]), format_margin([0.9, math.inf])
    ('[0.9, 1.1]', '>= 0.9')
    >>> format_margin([-math.inf, 0.05]), format_margin([-math.inf, 1 - 1e-6])
    ('<= 0.05', '<= 0.999999')
    """
    if not margin:
        return ""
    low, high = margin
    if math.isinf(high):
        return f">= {_exact(low)}"
    if math.isinf(low):
        return f"<= {_exact(high)}"
    return f"[{_exact(low)}, {_exact(high)}]"


def format_interval(interval, margin=None):
    """An interval as ``[low, high]``, each end with the digits it needs to keep its order
    with the margin's ends (:func:`format_value`), so that the verdict reads off the row.

    Examples
    --------
    >>> format_interval((0.998, 1.0000587))
    '[0.998, 1]'
    >>> format_interval((0.998, 1.0000587), margin=(-math.inf, 1))
    '[0.998, 1.0001]'
    """
    if not interval:
        return ""
    ends = list(margin) if margin else []
    low, high = (format_value(end, against=ends) for end in interval)
    return f"[{low}, {high}]"


def _cells(row):
    shown = format_interval(row.get("interval"), row.get("margin"))
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


def _commits_line(meta):
    """The ``code_commit`` values of each table's rows, and the warnings about them."""
    commits = meta.get("table_commits")
    if commits is None:
        return []
    named = lambda value: "not recorded" if value is None else f"`{value}`"  # noqa: E731
    shown = "; ".join(f"{name} " + (", ".join(map(named, values)) or "no rows")
                      for name, values in commits.items())
    lines = [f"Code that wrote the tables' rows (their `code_commit`): {shown}.", ""]
    lines += [f"- **Warning:** {warning}." for warning in meta.get("provenance_warnings", [])]
    return lines + ([""] if meta.get("provenance_warnings") else [])


def write_report(rows, meta, output_dir, written=None):
    """Write ``report.json`` and ``REPORT.md`` into ``output_dir``; return both paths.

    Both are written to temporary files first and moved into place together at the end
    (an interrupt while the figures were drawn left a new report.json beside an old or
    truncated REPORT.md; a review). ``written`` (a list) receives the two paths as soon
    as they are in place, so that an interrupt right after can say so."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / "report.json", output_dir / "REPORT.md"
    json_text = json.dumps({"meta": meta, "checks": rows}, indent=2, default=str) + "\n"
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
              "", *_commits_line(meta), _headline(meta, rows), "",
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
    staged = [(path.with_name(f".{path.name}.partial"), path, text) for path, text in
              ((json_path, json_text), (md_path, "\n".join(header + body)))]
    try:
        for partial, _, text in staged:
            partial.write_text(text)
        for partial, path, _ in staged:
            os.replace(partial, path)
    except PermissionError:  # a folder that takes no new file, with writable reports
        for _, path, text in staged:
            path.write_text(text)
    finally:
        for partial, _, _ in staged:
            try:
                partial.unlink(missing_ok=True)
            except OSError:
                pass
    if written is not None:
        written.extend((json_path, md_path))
    return json_path, md_path

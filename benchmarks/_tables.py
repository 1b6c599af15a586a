"""Resumable CSV tables of the benchmark scripts: the rows already written."""

from __future__ import annotations

import contextlib
import csv


def existing_rows(out, fields):
    """The rows of ``out`` (a list of dicts, empty when it does not exist); a table with
    other columns than ``fields`` is refused (``SystemExit``): write to a new file."""
    if not out.exists() or out.stat().st_size == 0:
        return []
    with out.open() as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames and list(reader.fieldnames) != list(fields):
            raise SystemExit(f"{out} has the columns {reader.fieldnames}, this run writes "
                             f"{list(fields)}: write to a new file.")
        return list(reader)


@contextlib.contextmanager
def appending(out, fields):
    """``(writer, handle)`` appending rows to ``out`` (its folder made, the header
    written when the file is new); flush ``handle`` after each row for resumability."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # an empty file (a run killed before its first row) still needs the header
    new_file = not out.exists() or out.stat().st_size == 0
    with out.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        if new_file:
            writer.writeheader()
        yield writer, handle

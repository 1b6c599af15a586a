"""Before and after: two sets of real-data calibration tables on the same splits.

Reads tables written by ``benchmarks/real_data_calibration.py`` (one row per dataset,
split, corruption and path) and prints, per dataset and path, the share of the null
splits with any flag and the lowest power over the corruptions, before and after, and
whether each meets the criteria of that script (``MAX_NULL_SHARE``, ``MIN_POWER``). A
single-output dataset's reversed outputs are left out (reversing one output changes
nothing: no corruption, no criterion), as in the paper. Splits are matched by their
index: only splits present in both sets count.

    python benchmarks/calibration_compare.py --before A.csv B.csv --after C.csv D.csv
        [--path default|noise_cov]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_data_calibration import MAX_NULL_SHARE, MIN_POWER  # noqa: E402


def _read(files):
    return pd.concat([pd.read_csv(f) for f in files], ignore_index=True)


def _cells(table, path):
    """``{dataset: (null share, lowest power, splits)}`` of one path."""
    cells = {}
    for name, group in table[table.path == path].groupby("dataset", sort=False):
        null = group[group.corruption == "none"]
        kinds = ["scale", "flip"] + ([] if (group.q == 1).all() else ["replace"])
        powers = [part.victims_flagged.sum() / part.n_victims.sum()
                  for kind in kinds
                  if len(part := group[group.corruption == kind])]
        cells[name] = (null.any_flag.mean(), min(powers), len(null))
    return cells


def _met(cell):
    return cell[0] <= MAX_NULL_SHARE and cell[1] >= MIN_POWER


def compare(before, after, path):
    """The markdown table and the counts of datasets meeting the criteria."""
    key = ["dataset", "split", "corruption", "path"]
    common = before[key].merge(after[key], on=key)
    before, after = (t.merge(common, on=key) for t in (before, after))
    old, new = _cells(before, path), _cells(after, path)
    lines = [f"| dataset ({path}) | splits | null share before | after | lowest power "
             "before | after | met before | after |", "|---|---|---|---|---|---|---|---|"]
    for name in new:
        if name not in old:
            continue
        (n0, p0, _), (n1, p1, splits) = old[name], new[name]
        lines.append(f"| {name} | {splits} | {n0:.2f} | {n1:.2f} | {p0:.2f} | {p1:.2f} | "
                     f"{'yes' if _met(old[name]) else 'no'} | "
                     f"{'yes' if _met(new[name]) else 'no'} |")
    names = [name for name in new if name in old]
    counts = (sum(_met(old[n]) for n in names), sum(_met(new[n]) for n in names), len(names))
    return "\n".join(lines), counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", nargs="+", required=True)
    parser.add_argument("--after", nargs="+", required=True)
    parser.add_argument("--path", choices=["default", "noise_cov"], default="noise_cov")
    args = parser.parse_args(argv)
    table, (old, new, total) = compare(_read(args.before), _read(args.after), args.path)
    print(table)
    print(f"\ncriteria met: {old} of {total} before, {new} of {total} after")


if __name__ == "__main__":
    main()

"""CLAIR on many clients of a narrow module (K r > d): cost against the number of clients.

``benchmarks/lora_benchmark.py`` measures the regime K r <= d, where the reduction's
two QRs (the issue's yardstick) cost ``2 d (K r)^2`` and so grow as K^2 themselves. Once
the clients' ranks add up to more than the module's width, the reduced width is t = d
whatever K, the two QRs cost ``2 d^2 K r`` (linear in K), and an exact pipeline can be
linear in K per product and per statistic (what is formed once per fit, the clients'
cross-Gram and inner products, stays quadratic). This script times
:func:`clairstat.lora.refine_adapters` (per module, ``joint=False``, one thread) on the
LoRA benchmark's synthetic module (10% attackers) at d = 512, r = 8 and K = 128 ...
1024 (K r / d = 2 ... 16) as the package runs it (``FactoredBlocks._wide``: formed
combinations of the clients once K r > 2 t; at K r / d = 2 the stack is not wide, and
the robust start's half-sets of a wide stack may not be either) and, in the same run,
through the cross-Gram kernel alone (``_WIDE_FACTOR`` set so that no stack counts as
wide: (K r)^2 per product), up to ``--kernel-max`` clients. Columns: whether the whole
stack is wide, end to end per route (the faster of two runs of the package; one of the
kernel's), their ratio, the two QRs, recall and false flags, and whether both routes
gave the same recall and false-flag count. Then the least-squares slope of log(time)
on log(K) for the package (over every K, over the wide stacks only, and over the last
doubling), for the kernel and for the QRs; criterion as in the LoRA benchmark: a slope
of at most 1.15 counts as "no faster than K log K".

    OMP_NUM_THREADS=2 nice -n 10 python benchmarks/wide_lora_benchmark.py [--quick]
                                                      [--markdown FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

import clairstat
from clairstat import _reduced
from lora_benchmark import KEY, MAX_SLOPE, _adapters, _end_to_end, _slope, _two_qrs

WIDE, QUICK = (512, 8, (128, 256, 512, 1024)), (128, 4, (64, 128, 256))
KERNEL_MAX, QUICK_KERNEL_MAX = 512, 256


def _flags(states, bad):
    seconds, recall, false = _end_to_end(states, bad, n_jobs=1)
    return seconds, recall, false


def measure(dim, rank, counts, kernel_max):
    rows = []
    for n_clients in counts:
        states, bad = _adapters(dim, n_clients, rank)
        qr = min(_two_qrs(states, 1) for _ in range(2))
        wide = min(_flags(states, bad) for _ in range(2))
        factored = _reduced.factored_reduction(
            [(s[KEY.format("B")], s[KEY.format("A")]) for s in states]).updates
        row = {"d": dim, "K": n_clients, "r": rank, "qr": qr, "wide": wide[0],
               "recall": wide[1], "false": wide[2], "kernel": None, "same": None,
               "route": factored._wide()}
        if n_clients <= kernel_max:
            saved = _reduced._WIDE_FACTOR
            _reduced._WIDE_FACTOR = 10 ** 9  # no stack is wide: the cross-Gram kernel
            try:
                kernel = _flags(states, bad)
            finally:
                _reduced._WIDE_FACTOR = saved
            row["kernel"] = kernel[0]
            row["same"] = kernel[1:] == wide[1:]
        print(f"  K={n_clients} (wide: {row['route']}): package {row['wide']:.2f} s, kernel "
              f"{row['kernel'] if row['kernel'] is None else round(row['kernel'], 2)} s, "
              f"QRs {qr:.3f} s", flush=True)
        rows.append(row)
    return rows


def tables(rows):
    lines = ["| d | K | r | K r / d | the stack is wide | end to end, package (s) "
             "| end to end, kernel (s) | kernel / package | two QRs (s) | recall "
             "| false flags | same recall and false-flag count |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        kernel = "" if row["kernel"] is None else f"{row['kernel']:.2f}"
        ratio = "" if row["kernel"] is None else f"{row['kernel'] / row['wide']:.2f}"
        same = "" if row["same"] is None else ("yes" if row["same"] else "NO")
        lines.append(f"| {row['d']} | {row['K']} | {row['r']} | "
                     f"{row['K'] * row['r'] / row['d']:.0f} | "
                     f"{'yes' if row['route'] else 'no'} | {row['wide']:.2f} | {kernel} | "
                     f"{ratio} | {row['qr']:.3f} | {row['recall']:.2f} | {row['false']} | "
                     f"{same} |")
    counts = [row["K"] for row in rows]
    wide_rows = [row for row in rows if row["route"]]
    kernel_rows = [row for row in rows if row["kernel"] is not None]
    slopes = [("end to end, package", _slope(counts, [row["wide"] for row in rows]),
               f"K = {counts[0]}..{counts[-1]}")]
    if len(wide_rows) >= 2:
        wide_counts = [row["K"] for row in wide_rows]
        slopes.append(("end to end, package, wide stacks only",
                       _slope(wide_counts, [row["wide"] for row in wide_rows]),
                       f"K = {wide_counts[0]}..{wide_counts[-1]}"))
        last = wide_rows[-2:]
        slopes.append(("end to end, package, last doubling",
                       _slope([row["K"] for row in last], [row["wide"] for row in last]),
                       f"K = {last[0]['K']}..{last[1]['K']}"))
    if len(kernel_rows) >= 2:
        kernel_counts = [row["K"] for row in kernel_rows]
        slopes.append(("end to end, kernel", _slope(kernel_counts,
                                                    [row["kernel"] for row in kernel_rows]),
                       f"K = {kernel_counts[0]}..{kernel_counts[-1]}"))
    slopes.append(("two QRs", _slope(counts, [row["qr"] for row in rows]),
                   f"K = {counts[0]}..{counts[-1]}"))
    lines += ["", f"| log-log slope over K | value | over | K log K criterion (<= "
                  f"{MAX_SLOPE}) |", "|---|---|---|---|"]
    for name, value, over in slopes:
        verdict = ("met" if value <= MAX_SLOPE else "NOT met") if "QRs" not in name else ""
        lines.append(f"| {name} | {value:.2f} | {over} | {verdict} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--markdown", help="also write the tables to this file")
    parser.add_argument("--kernel-max", type=int, default=None,
                        help="largest K also run through the cross-Gram kernel")
    args = parser.parse_args(argv)
    dim, rank, counts = QUICK if args.quick else WIDE
    kernel_max = args.kernel_max if args.kernel_max is not None else (
        QUICK_KERNEL_MAX if args.quick else KERNEL_MAX)
    start = time.perf_counter()
    load = os.getloadavg()[0]
    rows = measure(dim, rank, counts, kernel_max)
    text = tables(rows)
    print(f"\nclairstat {clairstat.__version__}, {platform.processor() or platform.machine()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, one thread per fit\n")
    print(text)
    print(f"\nWall time {time.perf_counter() - start:.0f} s; load average {load:.2f} at the "
          f"start, {os.getloadavg()[0]:.2f} at the end.")
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()

"""CLAIR on LoRA adapters at LLM scale: end to end against the reduction's two QRs.

Builds ``n_clients`` rank-``r`` adapters of one ``d x d`` module (peft key layout; the
first 10% of clients have a random ``B``, the others ``B_k = U W_k + noise`` with U of
rank r/2) and times :func:`clairstat.lora.refine_adapters` per module
(``joint=False``) end to end: the exact reduction, the decomposition, the detection
(robust start, out-of-sample statistics, calibration, refinement) and the rank-r readout
of every client's adapter. Three parts, one run:

1. **Target** (d = 4096, K = 100, r = 16): the end-to-end time over the time of the
   issue's yardstick for the reduction, the two thin Householder QRs of the stacked
   factors (``[B_1, ..., B_K]``, 4096 x 1600, and ``[A_1; ...; A_K]^T``,
   ``scipy.linalg.qr``, economic), under the same thread count as the pipeline
   (``clairstat._threads.thread_limits`` with the run's ``n_jobs``). The package itself
   now computes these two bases by CholeskyQR where its checks pass
   (docs/method_notes.md, section 6): the column "the package's two bases" times what it
   runs (``clairstat._reduced._span_basis``), next to each QR timing. The QRs are
   timed three times (before, between and after two end-to-end runs); the ratio is
   taken of the medians and of the minima (on a shared machine the same QRs vary
   several-fold within one run, and the two ratios bracket that). Both
   the package's default thread policy (``n_jobs=None``) and one thread (``n_jobs=1``,
   the package's advice for a busy machine) are run. Target: ratio <= 6 (both ratios),
   every attacker flagged, no benign client flagged. A second table gives each
   stage's seconds (the stages of the scaling part below) in one more run under
   cProfile at each thread setting (the profiler slows the Python-heavy parts).
2. **Scaling in K** (d = 2048, r = 8, K = 25, 50, 100, 200: ``K r <= d``, the regime of
   the target; one thread, the faster of two runs and of two QR timings): the
   least-squares slope of log(time) on log(K), end to end and for
   the two QRs. Criterion used here: a slope of at most 1.15 over K = 25..200 counts as
   "no faster than K log K" (K log K itself has slope 1.3 at K = 25, falling to 1.2 at
   K = 200; 1.15 is the issue's threshold). The two QRs cost ``2 d (K r)^2`` flops, so
   their slope is near 2 in this regime: any exact method pays it, and the table says
   whether the end to end stays within a constant factor of it.
   A second table gives each stage's share of one more run under cProfile (the
   reduction, the decomposition, the robust start, the out-of-sample statistics with
   their leave-one-out refits, the readouts; the rest is calibration, refinement and
   bookkeeping), to show which stage sets the slope.
3. **numpy vs torch** (d = 4096, K = 100, r = 16, the target's module; one thread,
   the faster of two runs): the default (no device: the reduction, the readouts and the
   Gram matrices in numpy float64) against ``device="cpu"`` with ``dtype="float64"``
   and ``"float32"``, which run that d-sized work in torch (the same code a GPU runs)
   and the decomposition in that dtype. Columns: end to end, the two bases as each
   variant computes them (numpy: CholeskyQR where it certifies itself; torch:
   Householder), and each variant's end-to-end time over the default's. The detection
   and the rest of the reduced coordinates are numpy float64 in every row. Where torch
   sees a CUDA device, ``device="cuda"`` rows are added (``benchmarks/device_check.sh``,
   the run a session lent a GPU makes); "one thread" then holds for the host's part.

    OMP_NUM_THREADS=2 nice -n 10 python benchmarks/lora_benchmark.py [--quick]
                                                      [--markdown FILE] [--torch-only]

Since the thread policy gives a process run under ``nice`` one thread
(:func:`clairstat._threads.threads_for_size`), the ``n_jobs=None`` timings of this
command measure one thread; run it without ``nice`` to time the two-thread default.

``--quick`` shrinks every size (seconds; a smoke test of the script); ``--torch-only``
runs part 3 alone.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import scipy.linalg

import clairstat
from clairstat._threads import thread_limits
from clairstat.aggregation import modules_work
from clairstat.lora import module_factors, refine_adapters

KEY = "base_model.model.layers.0.q_proj.lora_{}.weight"
CONFIG = {"lora_alpha": 1}  # scaling 1 / r, r read from the factors (no "r": ranks vary)
TARGET, QUICK_TARGET = (4096, 100, 16), (512, 30, 8)
SCALING, QUICK_SCALING = (2048, 8, (25, 50, 100, 200)), (256, 4, (10, 20, 40))
TORCH, QUICK_TORCH = (4096, 100, 16), (256, 20, 4)
MAX_RATIO, MAX_SLOPE = 6.0, 1.15


def _adapters(dim, n_clients, rank, seed=0):
    """Benign clients: B_k = U W_k + noise (U of rank ``rank // 2``); 10% leave U."""
    rng = np.random.default_rng(seed)
    shared = np.linalg.qr(rng.standard_normal((dim, max(rank // 2, 1))))[0]
    n_bad = max(1, n_clients // 10)
    states = []
    for client in range(n_clients):
        b_mat = shared @ rng.standard_normal((shared.shape[1], rank))
        b_mat += 0.1 * rng.standard_normal((dim, rank)) / np.sqrt(dim) * np.sqrt(rank)
        if client < n_bad:
            b_mat = rng.standard_normal((dim, rank)) / np.sqrt(dim) * np.sqrt(rank)
        a_mat = rng.standard_normal((rank, dim)) / np.sqrt(dim)
        states.append({KEY.format("A"): a_mat, KEY.format("B"): b_mat})
    return states, np.arange(n_clients) < n_bad


def _two_qrs(states, n_jobs=None):
    """Seconds for the thin QRs of the stacked B's and of the stacked A's transposed,
    under the thread count refine_adapters(n_jobs=n_jobs) uses for the same module."""
    return _time_bases(states, n_jobs, lambda m: scipy.linalg.qr(m, mode="economic"))


def _package_bases(states, n_jobs=None):
    """Seconds for the same two bases as the package's reduction computes them
    (``clairstat._reduced._span_basis``: CholeskyQR where its checks pass)."""
    from clairstat._reduced import _span_basis

    return _time_bases(states, n_jobs, _span_basis)


def _time_bases(states, n_jobs, basis):
    lefts = np.hstack([s[KEY.format("B")] for s in states])
    rights = np.vstack([s[KEY.format("A")] for s in states]).T
    factor_lists = module_factors(states, CONFIG)
    with thread_limits(n_jobs, modules_work(factor_lists)):
        start = time.perf_counter()
        basis(lefts)
        basis(rights)
        return time.perf_counter() - start


def _end_to_end(states, bad, **options):
    """Seconds, recall and false flags of one per-module refine_adapters run."""
    start = time.perf_counter()
    fit = refine_adapters(states, CONFIG, joint=False, random_state=0, **options)
    seconds = time.perf_counter() - start
    flagged = np.asarray(fit.flagged)
    return seconds, float(flagged[bad].mean()), int(flagged[~bad].sum())


def target(dim, n_clients, rank, n_jobs=None):
    states, bad = _adapters(dim, n_clients, rank)
    qrs, runs = [_two_qrs(states, n_jobs)], []
    bases = [_package_bases(states, n_jobs)]
    for _ in range(2):
        runs.append(_end_to_end(states, bad, n_jobs=n_jobs))
        qrs.append(_two_qrs(states, n_jobs))
        bases.append(_package_bases(states, n_jobs))
    seconds = float(np.median([r[0] for r in runs]))
    stages, profiled = stage_seconds(states, n_jobs=n_jobs)
    row = {"d": dim, "K": n_clients, "r": rank, "n_jobs": n_jobs,
           "stages": stages, "profiled": profiled,
           "qr": float(np.median(qrs)), "qr_all": qrs, "runs": [r[0] for r in runs],
           "bases": float(np.median(bases)),
           "seconds": seconds, "recall": min(r[1] for r in runs),
           "false": max(r[2] for r in runs)}
    row["ratio"] = row["seconds"] / row["qr"]
    row["ratio_min"] = min(row["runs"]) / min(qrs)
    print(f"  target d={dim} K={n_clients} r={rank} n_jobs={n_jobs}: {seconds:.1f} s end "
          f"to end, two QRs {row['qr']:.1f} s, ratio {row['ratio']:.2f}", flush=True)
    return row


def _slope(counts, seconds):
    return float(np.polyfit(np.log(counts), np.log(seconds), 1)[0])


def _best_of_two(states, bad, **options):
    """The faster of two runs (seconds, recall, false flags): the run least disturbed by
    other jobs on a shared machine."""
    return min(_end_to_end(states, bad, **options) for _ in range(2))


# The pipeline's stages, by the function that runs each (cumulative time under cProfile).
STAGES = [("reduction (bases and blocks)", "_reduced.py", "factored_reduction"),
          ("decomposition", "_decompose.py", "clair_decompose"),
          ("robust start", "_detection.py", "concentrate"),
          ("out-of-sample statistics", "_detection.py", "out_of_sample_statistics"),
          ("readouts", "_reduced.py", "readouts")]


def stage_seconds(states, **options):
    """Seconds per stage of one run under cProfile (which slows the Python-heavy parts:
    read the shares, not the totals) and the run's total under it."""
    import cProfile
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    refine_adapters(states, CONFIG, joint=False, random_state=0, **options)
    profile.disable()
    found = {(path.rsplit("/", 1)[-1], name): value[3]
             for (path, _, name), value in pstats.Stats(profile).stats.items()}
    total = max(value for (_, name), value in found.items() if name == "refine_adapters")
    return {label: found.get((path, name), 0.0) for label, path, name in STAGES}, total


def scaling(dim, rank, counts):
    rows = []
    for n_clients in counts:
        states, bad = _adapters(dim, n_clients, rank)
        qr = min(_two_qrs(states, 1) for _ in range(2))
        seconds, recall, false = _best_of_two(states, bad, n_jobs=1)
        stages, profiled = stage_seconds(states, n_jobs=1)
        rows.append({"d": dim, "K": n_clients, "r": rank, "seconds": seconds, "qr": qr,
                     "recall": recall, "false": false, "stages": stages,
                     "profiled": profiled})
        print(f"  scaling d={dim} K={n_clients} r={rank}: {seconds:.1f} s, two QRs "
              f"{qr:.2f} s", flush=True)
    slopes = {"end to end": _slope(counts, [r["seconds"] for r in rows]),
              "two QRs": _slope(counts, [r["qr"] for r in rows]),
              "end to end / two QRs": _slope(counts, [r["seconds"] / r["qr"] for r in rows])}
    return rows, slopes


def _device_bases(device, dtype):
    """The two bases as the torch path computes them (``_device_span_basis``)."""
    from clairstat._reduced import _device_span_basis

    def basis(matrix):
        found = _device_span_basis(matrix, device, dtype)
        if device.startswith("cuda"):
            import torch
            torch.cuda.synchronize()
        return found
    return basis


def torch_variants():
    """(name, refine_adapters options) of part 3: the numpy reference, torch on the CPU,
    and torch on the first CUDA device where torch sees one (the rows a GPU run adds,
    ``benchmarks/device_check.sh``)."""
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [("numpy (default)", {})] + [
        (f"torch {device} {dtype}", {"device": device, "dtype": dtype})
        for device in devices for dtype in ("float64", "float32")]


def torch_paths(dim, n_clients, rank):
    states, bad = _adapters(dim, n_clients, rank)
    rows = []
    for name, options in torch_variants():
        seconds, recall, false = _best_of_two(states, bad, n_jobs=1, **options)
        basis = (_device_bases(options["device"], options["dtype"]) if options else None)
        bases = min(_time_bases(states, 1, basis) if basis else _package_bases(states, 1)
                    for _ in range(2))
        rows.append({"variant": name, "seconds": seconds, "bases": bases, "recall": recall,
                     "false": false})
        print(f"  {name}: {seconds:.1f} s (bases {bases:.2f} s)", flush=True)
    return rows


def _verdict(ok):
    return "met" if ok else "NOT met"


def _tables(target_rows, scaling_rows, slopes, torch_rows, torch_size):
    lines = ["| d | K | r | n_jobs | two QRs (s, median of 3) | the package's two bases "
             "(s, median of 3) | end to end (s, median of 2) "
             f"| ratio | ratio of minima | <= {MAX_RATIO:g} | recall | false flags |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in target_rows:
        both = max(t["ratio"], t["ratio_min"]) <= MAX_RATIO
        lines.append(
            f"| {t['d']} | {t['K']} | {t['r']} | {t['n_jobs']} | {t['qr']:.2f} | "
            f"{t['bases']:.2f} | {t['seconds']:.2f} | {t['ratio']:.2f} | {t['ratio_min']:.2f} | "
            f"{_verdict(both)} | {t['recall']:.2f} | {t['false']} |")
    lines.append("")
    for t in target_rows:
        lines.append(f"(n_jobs={t['n_jobs']}: two QRs "
                     f"{', '.join(f'{q:.2f}' for q in t['qr_all'])} s; end to end "
                     f"{', '.join(f'{s:.2f}' for s in t['runs'])} s)")
    lines += ["", "| d | K | r | n_jobs | " + " | ".join(f"{label} (s)" for label, _, _ in STAGES)
              + " | total under the profiler (s) |",
              "|---|---|---|---|" + "---|" * (len(STAGES) + 1)]
    for t in target_rows:
        lines.append(f"| {t['d']} | {t['K']} | {t['r']} | {t['n_jobs']} | " + " | ".join(
            f"{t['stages'][label]:.2f}" for label, _, _ in STAGES)
            + f" | {t['profiled']:.2f} |")
    lines += ["", "| d | K | r | end to end (s) | two QRs (s) | ratio | recall | false flags |",
              "|---|---|---|---|---|---|---|---|"]
    for r in scaling_rows:
        lines.append(f"| {r['d']} | {r['K']} | {r['r']} | {r['seconds']:.2f} | {r['qr']:.2f} | "
                     f"{r['seconds'] / r['qr']:.2f} | {r['recall']:.2f} | {r['false']} |")
    lines += ["", "| d | K | r | " + " | ".join(label for label, _, _ in STAGES)
              + " | total under the profiler (s) |",
              "|---|---|---|" + "---|" * (len(STAGES) + 1)]
    for r in scaling_rows:  # shares of the profiled run's total, in %
        lines.append(f"| {r['d']} | {r['K']} | {r['r']} | " + " | ".join(
            f"{100 * r['stages'][label] / r['profiled']:.0f}%" for label, _, _ in STAGES)
            + f" | {r['profiled']:.2f} |")
    lines += ["", "| log-log slope over K | value | K log K criterion (<= "
              f"{MAX_SLOPE:g}) |", "|---|---|---|"]
    for name, value in slopes.items():
        verdict = _verdict(value <= MAX_SLOPE) if name == "end to end" else ""
        lines.append(f"| {name} | {value:.2f} | {verdict} |")
    dim, n_clients, rank = torch_size
    return "\n".join(lines + [""] + _torch_table(torch_rows, torch_size))


def _torch_table(torch_rows, torch_size):
    dim, n_clients, rank = torch_size
    lines = [f"| d = {dim}, K = {n_clients}, r = {rank}, one thread | end to end (s) | "
             "two bases (s) | end to end / default's | recall | false flags |",
             "|---|---|---|---|---|---|"]
    reference = torch_rows[0]["seconds"]
    for r in torch_rows:
        lines.append(f"| {r['variant']} | {r['seconds']:.2f} | {r['bases']:.2f} | "
                     f"{r['seconds'] / reference:.2f} | {r['recall']:.2f} | {r['false']} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--markdown", help="also write the tables to this file")
    parser.add_argument("--torch-only", action="store_true",
                        help="only part 3, numpy against the torch path")
    args = parser.parse_args(argv)
    import torch  # imported before timing: its first import takes seconds
    load_before = os.getloadavg()
    print(f"clairstat {clairstat.__version__}, torch {torch.__version__}, "
          f"{platform.machine()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"load average {load_before[0]:.2f} at the start")
    started = time.time()
    torch_size = QUICK_TORCH if args.quick else TORCH
    if args.torch_only:
        table = "\n".join(_torch_table(torch_paths(*torch_size), torch_size))
    else:
        size = QUICK_TARGET if args.quick else TARGET
        target_rows = [target(*size, n_jobs=n_jobs) for n_jobs in (None, 1)]
        scaling_rows, slopes = scaling(*(QUICK_SCALING if args.quick else SCALING))
        table = _tables(target_rows, scaling_rows, slopes, torch_paths(*torch_size),
                        torch_size)
    load_after = os.getloadavg()
    table += (f"\n\nWall time {time.time() - started:.0f} s; load average "
              f"{load_before[0]:.2f} at the start, {load_after[0]:.2f} at the end.")
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()

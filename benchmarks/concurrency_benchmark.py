"""A CLAIR fit alone and beside a second process running the same fit, with and without
the thread policy of :mod:`clairstat._threads`.

Four cells, measured in one run at (n_clients, p, q) = (50, 100, 10):

* ``policy``: the fit inside ``thread_limits(None, X.shape)`` (the size rule: one thread
  at this size), the second process doing the same;
* ``unpinned``: the fit inside ``thread_limits(-1)`` (every usable CPU in torch, OpenBLAS
  and OpenMP: what the libraries do when nobody sets them), the second process likewise;

each alone, while a second process runs the fit in a loop, and while a second thread of
this process does (as the threads of a Dask ``LocalCluster(processes=False)`` do, e.g.
``clairstat refine --scheduler local``: the two fits then share the process-wide BLAS
pools, which ``thread_limits`` counts together, and Python's GIL). The slowdown is the
median fit time beside the second fit over the median alone; on 2 cores a fair
share of the CPU implies about 1x (each fit has a core of its own) and at most 2x.
The machine's load average is printed before and after each cell: other jobs on the
machine slow every cell down, and only ratios from one run are compared.

``--crossover`` times ``clair_decompose`` alone on one thread and on all usable CPUs
over a range of sizes: the measurement behind :data:`clairstat._threads.GRAIN_FLOPS`.

    python benchmarks/concurrency_benchmark.py [--repeats N] [--budget S] [--crossover]
        [--crossover-only] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import time

SHAPE = (50, 100, 10)  # (n_clients, p, q)
CROSSOVER_SHAPES = [(50, 100, 10), (50, 200, 10), (50, 200, 20), (50, 300, 20),
                    (50, 400, 20), (100, 600, 10), (100, 800, 20)]
MODES = {"policy": None, "unpinned": -1}  # n_jobs given to thread_limits


def _data(shape, seed=0):
    from clairstat.datasets import make_low_rank_block_sparse

    n_clients, p, q = shape
    return make_low_rank_block_sparse(n_clients, p, q, rank=3, n_contaminated=n_clients // 5,
                                      noise_level=0.1, random_state=seed).local_estimates


def _fit(estimates, n_jobs):
    from clairstat import CLAIREstimator
    from clairstat._threads import thread_limits

    with thread_limits(n_jobs, estimates.shape) as n_threads:
        CLAIREstimator(solver="torch", random_state=0).fit(estimates)
    return n_threads


def _background(n_jobs, started, stop):
    """Second process: the same fit in a loop until told to stop."""
    estimates = _data(SHAPE)
    _fit(estimates, n_jobs)
    started.set()
    while not stop.is_set():
        _fit(estimates, n_jobs)


def _time_fits(estimates, n_jobs, repeats, budget_s):
    """Median and all times of ``repeats`` fits (fewer if ``budget_s`` runs out)."""
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() < deadline):
        start = time.perf_counter()
        _fit(estimates, n_jobs)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def _cell(mode, beside, repeats, budget_s):
    """``beside``: None (alone), "process" or "thread" (where the second fit runs)."""
    import threading

    n_jobs = MODES[mode]
    estimates = _data(SHAPE)
    n_threads = _fit(estimates, n_jobs)  # warm-up: imports, first torch call
    load_before = os.getloadavg()
    worker = None
    if beside == "process":
        context = multiprocessing.get_context("spawn")  # no fork after OpenMP started
        started, stop = context.Event(), context.Event()
        worker = context.Process(target=_background, args=(n_jobs, started, stop))
    elif beside == "thread":
        started, stop = threading.Event(), threading.Event()
        worker = threading.Thread(target=_background, args=(n_jobs, started, stop))
    if worker is not None:
        worker.start()
        started.wait(timeout=300)
    try:
        median, times = _time_fits(estimates, n_jobs, repeats, budget_s)
    finally:
        if worker is not None:
            stop.set()
            worker.join(timeout=600)
    return {"mode": mode, "beside": beside, "threads": n_threads, "median": median,
            "n": len(times), "min": min(times), "load_before": load_before,
            "load_after": os.getloadavg()}


def _concurrency(repeats, budget_s):
    rows = [_cell(mode, beside, repeats, budget_s)
            for mode in MODES for beside in (None, "process", "thread")]
    lines = [f"fit at (n_clients, p, q) = {SHAPE}, CLAIREstimator(solver='torch'), "
             f"{repeats} fits per cell (fewer past {budget_s:.0f} s)", "",
             "| setting | threads | second fit running | median s | min s | fits | "
             "load avg before | load avg after |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['mode']} | {row['threads']} | "
                     f"{'no' if row['beside'] is None else 'in another ' + row['beside']} "
                     f"| {row['median']:.3f} | {row['min']:.3f} | {row['n']} "
                     f"| {_load(row['load_before'])} | {_load(row['load_after'])} |")
    median = {(row["mode"], row["beside"]): row["median"] for row in rows}
    lines.append("")
    for mode in MODES:
        for where in ("process", "thread"):
            lines.append(f"- slowdown beside a second fit in another {where}, {mode}: "
                         f"{median[mode, where] / median[mode, None]:.1f}x")
    lines.append(f"- beside a second fit in another process, unpinned / policy: "
                 f"{median['unpinned', 'process'] / median['policy', 'process']:.1f}x")
    return lines


def _crossover(repeats):
    from clairstat import clair_decompose
    from clairstat._threads import svt_flops, thread_limits, threads_for_size, usable_cpus

    n_cpus = usable_cpus()
    lines = [f"clair_decompose(solver='torch') alone, {repeats} solves per thread count, "
             "the two counts alternating (load drifts alike for both)", "",
             f"| (n_clients, p, q) | svt flops | 1 thread: median s | min s | "
             f"{n_cpus} threads: median s | min s | speed-up (medians) | rule's threads |",
             "|---|---|---|---|---|---|---|---|"]
    for shape in CROSSOVER_SHAPES:
        estimates = _data(shape)
        times = {1: [], n_cpus: []}
        for repeat in range(repeats + 1):
            for n_jobs in times:
                with thread_limits(n_jobs):
                    start = time.perf_counter()
                    clair_decompose(estimates, solver="torch")
                    if repeat:  # the first round warms up
                        times[n_jobs].append(time.perf_counter() - start)
        one, many = (statistics.median(times[n]) for n in (1, n_cpus))
        lines.append(f"| {shape} | {svt_flops(shape):.1e} | {one:.3f} | {min(times[1]):.3f} "
                     f"| {many:.3f} | {min(times[n_cpus]):.3f} | {one / many:.2f}x | "
                     f"{threads_for_size(shape, n_cpus)} |")
    lines.append(f"\nload average after: {_load(os.getloadavg())}")
    return lines


def _load(load):
    return "/".join(f"{value:.2f}" for value in load)


def _header():
    import torch

    import clairstat
    return [f"clairstat {clairstat.__version__}, torch {torch.__version__}, "
            f"python {platform.python_version()}, {os.cpu_count()} CPUs "
            f"({len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'} "
            f"usable), load average (1/5/15 min) at start {_load(os.getloadavg())}",
            f"started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}", ""]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--budget", type=float, default=90.0,
                        help="seconds per cell after which fewer fits are timed")
    parser.add_argument("--crossover", action="store_true",
                        help="also time one thread against all CPUs over sizes")
    parser.add_argument("--crossover-only", action="store_true",
                        help="time only one thread against all CPUs over sizes")
    parser.add_argument("--markdown", help="also write the output to this file")
    args = parser.parse_args(argv)
    lines = _header()
    if not args.crossover_only:
        lines += _concurrency(args.repeats, args.budget)
    if args.crossover or args.crossover_only:
        lines += [""] + _crossover(max(3, args.repeats // 3))
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()

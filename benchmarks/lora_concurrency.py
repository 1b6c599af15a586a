"""The LoRA benchmark's target module alone and beside another process's numeric job.

:func:`clairstat.lora.refine_adapters` (``joint=False``) on the module of
``benchmarks/lora_benchmark.py`` (4096 x 4096, 100 rank-16 clients), at the thread
policy's default (``n_jobs=None``: two threads at this size on two cores) and on one
thread (``n_jobs=1``), each timed

* alone;
* beside a second process that multiplies 1000 x 1000 matrices on one BLAS thread in a
  loop (a neighbour's job), at the same scheduling priority;
* beside the same neighbour, the fits at a lower priority than it (as the benchmarks'
  own ``nice -n 10`` commands run): in a child process started with ``nice`` 10, so
  that every thread it starts (torch's and OpenBLAS's pools) has that priority (Linux
  sets a niceness per thread: ``os.nice`` in a running process would leave its pools'
  threads as they were).

On two cores a fair share leaves each job a core: a fit on one thread should then take
about its time alone, and a fit on two threads at most about twice that. The slowdown
columns are the medians over the median alone, in one run.

    OMP_NUM_THREADS=2 python benchmarks/lora_concurrency.py [--runs 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

import lora_benchmark

NEIGHBOUR = ("import numpy as np\n"
             "a = np.random.default_rng(0).random((1000, 1000))\n"
             "while True:\n"
             "    a @ a\n")
SETTINGS = [None, 1]  # n_jobs


PIDS = []  # the neighbours started, printed at the end (each killed and reaped)


def _neighbour():
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-c", NEIGHBOUR], env=env)
    PIDS.append(process.pid)
    time.sleep(1.0)  # its imports done, its loop running
    return process


def _times(states, bad, n_jobs, runs, beside):
    process = _neighbour() if beside else None
    try:
        return [lora_benchmark._end_to_end(states, bad, n_jobs=n_jobs)[0]
                for _ in range(runs)]
    finally:
        if process is not None:
            process.kill()
            process.wait()


def _niced_child(n_jobs, runs, quick):
    """The fits of one "niced" cell, in a child process started at niceness 10, the
    neighbour running (started here, at this process's priority)."""
    command = [sys.executable, os.path.abspath(__file__), "--child", str(n_jobs),
               "--runs", str(runs)] + (["--quick"] if quick else [])
    process = _neighbour()
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=True,
                             preexec_fn=lambda: os.nice(10)).stdout
    finally:
        process.kill()
        process.wait()
    return json.loads(out.strip().splitlines()[-1])


def _module(quick):
    dim, n_clients, rank = (256, 20, 4) if quick else lora_benchmark.TARGET
    states, bad = lora_benchmark._adapters(dim, n_clients, rank)
    lora_benchmark._end_to_end(states, bad)  # imports and first allocations, not timed
    return (dim, n_clients, rank), states, bad


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="fits per cell (median)")
    parser.add_argument("--quick", action="store_true", help="a small module (seconds)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # n_jobs of a niced cell
    args = parser.parse_args(argv)
    if args.child is not None:
        n_jobs = None if args.child == "None" else int(args.child)
        _, states, bad = _module(args.quick)
        print(json.dumps(_times(states, bad, n_jobs, args.runs, False)))
        return None
    (dim, n_clients, rank), states, bad = _module(args.quick)
    load = os.getloadavg()[0]
    cells = {}
    for place in ("alone", "beside"):
        for n_jobs in SETTINGS:
            cells[n_jobs, place] = _times(states, bad, n_jobs, args.runs, place == "beside")
    for n_jobs in SETTINGS:
        cells[n_jobs, "niced"] = _niced_child(n_jobs, args.runs, args.quick)
    print(f"d = {dim}, K = {n_clients}, r = {rank}; {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, load average "
          f"{load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; medians of "
          f"{args.runs} fits\n")
    print("| n_jobs | alone (s) | beside, same priority (s) | slowdown | beside, the fit "
          "niced 10 (s) | slowdown |")
    print("|---|---|---|---|---|---|")
    for n_jobs in SETTINGS:
        alone = statistics.median(cells[n_jobs, "alone"])
        beside = statistics.median(cells[n_jobs, "beside"])
        niced = statistics.median(cells[n_jobs, "niced"])
        print(f"| {n_jobs} | {alone:.2f} | {beside:.2f} | {beside / alone:.1f}x | "
              f"{niced:.2f} | {niced / alone:.1f}x |")
    print("\nEvery fit (s):", {f"{n}/{p}": [round(t, 2) for t in v]
                               for (n, p), v in cells.items()})
    print("Neighbour processes (ended):", PIDS)
    return np.asarray([[statistics.median(cells[n, p]) for p in ("alone", "beside", "niced")]
                       for n in SETTINGS])


if __name__ == "__main__":
    main()

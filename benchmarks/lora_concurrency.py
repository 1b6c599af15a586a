"""The LoRA benchmark's target module alone and beside another process's numeric job.

:func:`clairstat.lora.refine_adapters` (``joint=False``) on the module of
``benchmarks/lora_benchmark.py`` (4096 x 4096, 100 rank-16 clients), at the thread
policy's default (``n_jobs=None``) and on one thread (``n_jobs=1``), each timed

* alone;
* beside a second process that multiplies 1000 x 1000 matrices on one BLAS thread in a
  loop (a neighbour's job), at the same scheduling priority;
* beside the same neighbour, the fits at a lower priority than it (as the benchmarks'
  own ``nice -n 10`` commands run): in a child process started 10 steps nicer than this
  one, so that every thread it starts (torch's and OpenBLAS's pools) has that priority
  (Linux sets a niceness per thread: ``os.nice`` in a running process would leave its
  pools' threads as they were).

The table gives the threads each cell's fits ran on (the policy's count: since the
rule for niced processes, one in the niced cells) and each cell's median over the
median alone; on two cores a fair share leaves each job a core, so a fit on one thread
should take about its time alone beside the neighbour, and one on two threads at most
about twice that. The alone and same-priority cells alternate, one fit each per round
after a first fit left out; the niced cells run last, each child leaving out its own
first fit. The neighbour exits by itself when this process ends (it watches its parent),
so an interrupted run leaves none behind; the return code of each (-9: killed while
running) is printed at the end.

    OMP_NUM_THREADS=2 python benchmarks/lora_concurrency.py [--runs 2] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

import lora_benchmark

NEIGHBOUR = ("import os, sys\n"
             "import numpy as np\n"
             "parent = int(sys.argv[1])\n"
             "a = np.random.default_rng(0).random((1000, 1000))\n"
             "while os.getppid() == parent:  # ends with its parent, however that ends\n"
             "    a @ a\n")
SETTINGS = [None, 1]  # n_jobs
ENDED = []  # (pid, return code) of every neighbour, printed at the end


@contextlib.contextmanager
def _neighbour():
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-c", NEIGHBOUR, str(os.getpid())], env=env)
    try:
        time.sleep(1.0)  # its imports done, its loop running
        yield process
    finally:
        process.kill()
        ENDED.append((process.pid, process.wait()))


def _fit(states, bad, n_jobs, beside):
    with _neighbour() if beside else contextlib.nullcontext():
        return lora_benchmark._end_to_end(states, bad, n_jobs=n_jobs)[0]


def _threads(states, n_jobs):
    """The thread count the policy gives refine_adapters on this module, here."""
    from clairstat import _threads
    from clairstat.aggregation._modules import modules_work
    from clairstat.lora import module_factors

    work = modules_work(module_factors(states, lora_benchmark.CONFIG))
    return _threads.resolve_n_jobs(n_jobs, work)


def _niced_child(n_jobs, runs, quick):
    """The fits of one niced cell: (threads, niceness, seconds) from a child process
    started 10 steps nicer, the neighbour running (at this process's priority)."""
    command = [sys.executable, os.path.abspath(__file__), "--child", str(n_jobs),
               "--runs", str(runs)] + (["--quick"] if quick else [])
    with _neighbour():  # the child's errors go to this process's stderr
        out = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True,
                             preexec_fn=lambda: os.nice(10)).stdout
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
        seconds = [_fit(states, bad, n_jobs, False) for _ in range(args.runs)]
        print(json.dumps([_threads(states, n_jobs), os.getpriority(os.PRIO_PROCESS, 0),
                          seconds]))
        return None
    (dim, n_clients, rank), states, bad = _module(args.quick)
    load = os.getloadavg()[0]
    cells = {(n_jobs, place): [] for n_jobs in SETTINGS for place in ("alone", "beside")}
    for _ in range(args.runs):
        for (n_jobs, place), seconds in cells.items():
            seconds.append(_fit(states, bad, n_jobs, place == "beside"))
    niced = {n_jobs: _niced_child(n_jobs, args.runs, args.quick) for n_jobs in SETTINGS}
    own = os.getpriority(os.PRIO_PROCESS, 0)
    print(f"d = {dim}, K = {n_clients}, r = {rank}; {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, niceness {own} (niced "
          f"cells: {sorted({v[1] for v in niced.values()})}), load average {load:.2f} at "
          f"the start, {os.getloadavg()[0]:.2f} at the end; medians of {args.runs} fits\n")
    print("| n_jobs | threads | alone (s) | beside, same priority (s) | slowdown | threads, "
          "niced | beside, the fit niced 10 (s) | slowdown |")
    print("|---|---|---|---|---|---|---|---|")
    table = []
    for n_jobs in SETTINGS:
        alone = statistics.median(cells[n_jobs, "alone"])
        beside = statistics.median(cells[n_jobs, "beside"])
        threads, _, seconds = niced[n_jobs]
        slow = statistics.median(seconds)
        table.append([alone, beside, slow])
        print(f"| {n_jobs} | {_threads(states, n_jobs)} | {alone:.2f} | {beside:.2f} | "
              f"{beside / alone:.1f}x | {threads} | {slow:.2f} | {slow / alone:.1f}x |")
    every = {f"{n}/{p}": [round(t, 2) for t in v] for (n, p), v in cells.items()}
    every.update({f"{n}/niced": [round(t, 2) for t in v[2]] for n, v in niced.items()})
    print("\nEvery fit (s):", every)
    print("Neighbour processes (pid, return code):", ENDED)
    return np.asarray(table)


if __name__ == "__main__":
    main()

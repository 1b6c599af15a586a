"""Two checkouts of clairstat, stage by stage, on the LoRA benchmark's target module.

Times :func:`clairstat.lora.refine_adapters` (``joint=False``) on the 4096 x 4096 module
with 100 rank-16 clients of ``benchmarks/lora_benchmark.py`` and, by wall clock (no
profiler), the stages it calls: the reduction, the decomposition, the robust start,
the refits on the collaborative set (``_fit_on``), the out-of-sample statistics, the
readout of the mean (where it is computed) and the clients' readouts. Each checkout
runs in its own process, the checkouts alternating (``--rounds`` times), each process
making ``--runs`` fits of which the first is left out (imports, first allocations).
Prints one row per kept fit and the medians per checkout:

    OMP_NUM_THREADS=2 nice -n 10 python benchmarks/lora_stages_ab.py OLD_DIR NEW_DIR
        [--rounds 2] [--runs 3] [--n-jobs N] [--quick]

Since the thread policy gives a process run under ``nice`` one thread
(:func:`clairstat._threads.threads_for_size`), the ``n_jobs=None`` timings of this
command measure one thread; run it without ``nice`` to time the two-thread default.

OLD_DIR and NEW_DIR are checkouts of the repository (``git worktree add``); ``--quick``
takes the benchmark's small module (seconds; a smoke test of the script).
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time

import numpy as np

STAGES = [("clairstat.aggregation._clair", "factored_reduction", "reduction"),
          ("clairstat._estimator", "clair_decompose", "decomposition"),
          ("clairstat._inference", "concentrate", "robust start"),
          ("clairstat._inference", "_fit_on", "refits"),
          ("clairstat._inference", "out_of_sample_statistics", "out-of-sample"),
          ("clairstat.aggregation._clair", "truncated_svd", "mean readout"),
          ("clairstat.lora", "_readout_state_dicts", "client readouts")]


def _child(root, runs, n_jobs, quick=False):
    """In the child process: time ``runs`` fits with ``root`` first on the path."""
    import importlib

    sys.path[:0] = [root, root + "/benchmarks"]
    import clairstat
    import lora_benchmark

    assert clairstat.__file__.startswith(root), clairstat.__file__
    seconds = {}
    for module_name, name, label in STAGES:
        module = importlib.import_module(module_name)
        original = getattr(module, name)

        @functools.wraps(original)
        def timed(*args, _original=original, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                seconds[_label] = seconds.get(_label, 0.0) + time.perf_counter() - start

        setattr(module, name, timed)
    from clairstat.lora import refine_adapters

    size = lora_benchmark.QUICK_TARGET if quick else lora_benchmark.TARGET
    states, _ = lora_benchmark._adapters(*size)
    rows = []
    for _ in range(runs):
        seconds.clear()
        start = time.perf_counter()
        refine_adapters(states, lora_benchmark.CONFIG, joint=False, random_state=0,
                        n_jobs=n_jobs)
        rows.append({"total": time.perf_counter() - start, **seconds})
    print(json.dumps(rows[1:]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--n-jobs", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="small module (seconds)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child, args.runs, args.n_jobs, args.quick)
    labels = ["total"] + [label for _, _, label in STAGES]
    found = {root: [] for root in args.roots}
    print("| checkout | " + " | ".join(f"{label} (s)" for label in labels) + " |")
    print("|---|" + "---|" * len(labels))
    for _ in range(args.rounds):
        for root in args.roots:
            command = [sys.executable, __file__, "--child", root, "--runs", str(args.runs),
                       *(["--n-jobs", str(args.n_jobs)] if args.n_jobs else []),
                       *(["--quick"] if args.quick else []), *args.roots]
            rows = json.loads(subprocess.run(command, check=True, capture_output=True,
                                             text=True).stdout.strip().splitlines()[-1])
            found[root] += rows
            for row in rows:
                print(f"| {root} | " + " | ".join(f"{row.get(label, 0.0):.2f}"
                                                 for label in labels) + " |", flush=True)
    for root in args.roots:
        print(f"| {root} (median of {len(found[root])}) | " + " | ".join(
            f"{np.median([row.get(label, 0.0) for row in found[root]]):.2f}"
            for label in labels) + " |")


if __name__ == "__main__":
    main()

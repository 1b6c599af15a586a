"""Time ``clairstat refine`` spends in Python's cyclic garbage collector.

The command frees each module's memory with a full collection (``_release_memory``,
twice per module). A full collection traverses every tracked object, and the imports
(numpy, scipy, torch, statsmodels, clairstat) are about 250 000 of them; the command
freezes those (``gc.freeze``, ``clairstat._cli._imports_frozen``) for the run. This
script writes ``--layers`` layers of a 7B-shaped LoRA set (``whole_model_benchmark.py``'s
generator: 7 modules per layer, ``--clients`` clients of rank 16, bf16) and runs the
command on it in child processes, alternately with the freeze and without it (the
package's context manager replaced by a no-op), ``--repeats`` times each, with the
command's default thread policy (``OMP_NUM_THREADS=1`` in the environment; the command
sets its own threads by size: two on two cores here). Each child reports its wall time, its CPU time (user and system, the
process's whole life, imports included), the number of collections (automatic ones
included, counted by ``gc.callbacks``) and the seconds spent in them. Printed: one row
per run and the ratio of the medians of the collection seconds.

    python benchmarks/refine_gc_benchmark.py [--layers 1] [--clients 50] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

_CHILD = """
import contextlib, gc, json, sys, time
from clairstat import _cli
if sys.argv[1] == "without":
    _cli._imports_frozen = contextlib.nullcontext
spent, count, start = [0.0], [0], [0.0]
def callback(phase, info):
    if phase == "start":
        start[0] = time.perf_counter()
    else:
        spent[0] += time.perf_counter() - start[0]
        count[0] += 1
gc.callbacks.append(callback)
begin = time.perf_counter()
code = _cli.main(["refine", "--random-state", "0", "--out", sys.argv[2], *sys.argv[3:]])
import resource
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"code": code, "wall": time.perf_counter() - begin,
                  "cpu": usage.ru_utime + usage.ru_stime,
                  "collections": count[0], "gc_seconds": spent[0]}))
"""


def _run(mode, out, folders):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _CHILD, mode, str(out), *map(str, folders)],
                          capture_output=True, text=True, env=env, check=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    if row["code"] != 0:
        raise RuntimeError(f"clairstat refine exited {row['code']}: {done.stderr[-2000:]}")
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import whole_model_benchmark

    import clairstat

    print(f"clairstat {clairstat.__version__}, Python {platform.python_version()}, "
          f"{args.layers * 7} modules, {args.clients} clients, {os.cpu_count()} CPUs, "
          f"the command's thread policy")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "in").mkdir()
        folders = whole_model_benchmark.write_adapters(root / "in", args.layers,
                                                       args.clients, 16, 5, 0)
        for repeat in range(args.repeats):
            for mode in ("without", "with"):
                row = _run(mode, root / f"out-{mode}-{repeat}", folders)
                rows.append((mode, row))
    print("| imports frozen | wall (s) | CPU (s) | collections | in collections (s) |")
    print("|---|---|---|---|---|")
    for mode, row in rows:
        print(f"| {mode} | {row['wall']:.1f} | {row['cpu']:.1f} | {row['collections']} | "
              f"{row['gc_seconds']:.2f} |")
    medians = {mode: float(np.median([r["gc_seconds"] for m, r in rows if m == mode]))
               for mode in ("without", "with")}
    walls = {mode: float(np.median([r["wall"] for m, r in rows if m == mode]))
             for mode in ("without", "with")}
    cpus = {mode: float(np.median([r["cpu"] for m, r in rows if m == mode]))
            for mode in ("without", "with")}
    print(f"seconds in collections, medians: {medians['without']:.2f} without, "
          f"{medians['with']:.2f} with ({medians['without'] / medians['with']:.1f}x); "
          f"wall medians {walls['without']:.1f} and {walls['with']:.1f} s, "
          f"CPU medians {cpus['without']:.1f} and {cpus['with']:.1f} s")
    return rows


if __name__ == "__main__":
    main()

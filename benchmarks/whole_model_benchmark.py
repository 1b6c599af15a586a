"""``clairstat refine`` end to end on a synthetic 7B-shaped adapter set (streamed).

Writes ``--clients`` peft adapter folders shaped like a LoRA of a 7B Llama-type model to
a temporary folder: ``--layers`` decoder layers (32 by default), each adapting
``self_attn.{q,k,v,o}_proj`` (4096 x 4096) and ``mlp.{gate,up}_proj`` (4096 -> 11008)
and ``mlp.down_proj`` (11008 -> 4096), rank ``--rank`` (16), bf16, keys as peft's
``save_pretrained`` writes them (``base_model.model.model.layers.0.self_attn.q_proj.
lora_A.weight``). Benign clients of a module share the column space of ``lora_B``
(``B_k = U W_k`` + noise, U of rank r/2, one U per module); the first ``--attackers``
clients have a random ``lora_B`` in every module. Every tensor comes from a generator
seeded by (seed, module, client), so a client's file is written on its own, module by
module, and the set never has to be in memory.

It then runs the command (``clairstat._cli.main``, what ``clairstat refine`` runs) in a
child process and prints one table: modules, clients, rank, dtype, wall time of the
child (start-up, reading, fits, writing), that time per module, the child's peak
resident set size, bytes on disk in and out, and the client-level recall and false
flags. Peak RSS is the kernel's ``ru_maxrss`` of the child, read by the child itself at
its end (``resource.getrusage(RUSAGE_SELF)``): all of its memory, numpy's and torch's C
allocations included, not only Python objects (tracemalloc would see only those). The
same figure for a child that only imports clairstat, torch and safetensors is the
"import-only" column. ``--compare-whole`` also runs, in another child on the same files,
:func:`clairstat.lora.refine_adapters` on the whole adapters loaded in memory (the
command's former path) and prints its row, the ratio of the peaks and whether its
outputs equal the command's, tensor by tensor. Free disk in the temporary folder is
checked first (inputs, staged copies and outputs: about twice the input size, three
times with ``--compare-whole``); everything is deleted at the end.

    python benchmarks/whole_model_benchmark.py [--layers N] [--clients K] [--rank R]
        [--attackers A] [--seed S] [--n-jobs N] [--scheduler ADDR] [--compare-whole]
        [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HIDDEN, INTERMEDIATE = 4096, 11008
# (peft module path inside a layer, d_in, d_out)
MODULES = [(f"self_attn.{name}_proj", HIDDEN, HIDDEN) for name in "qkvo"] + [
    ("mlp.gate_proj", HIDDEN, INTERMEDIATE), ("mlp.up_proj", HIDDEN, INTERMEDIATE),
    ("mlp.down_proj", INTERMEDIATE, HIDDEN)]
PREFIX = "base_model.model.model.layers.{layer}.{module}"


def _modules(n_layers):
    """``(index, peft module name, d_in, d_out)`` of every adapted module."""
    names = [(PREFIX.format(layer=layer, module=module), d_in, d_out)
             for layer in range(n_layers) for module, d_in, d_out in MODULES]
    return [(index, *item) for index, item in enumerate(names)]


def _factors(seed, index, client, d_in, d_out, rank, attacker):
    """Client ``client``'s (A, B) of module ``index``, from its own seeded generators."""
    shared = np.random.default_rng([seed, index])  # the same U for every client
    basis = np.linalg.qr(shared.standard_normal((d_out, max(rank // 2, 1))))[0]
    rng = np.random.default_rng([seed, index, client])
    if attacker:
        b_mat = rng.standard_normal((d_out, rank)) * np.sqrt(rank / d_out)
    else:
        b_mat = basis @ rng.standard_normal((basis.shape[1], rank))
        b_mat += 0.1 * rng.standard_normal((d_out, rank)) * np.sqrt(rank / d_out)
    a_mat = rng.standard_normal((rank, d_in)) / np.sqrt(d_in)
    return a_mat, b_mat


def _config(rank):
    """An adapter_config.json as peft writes it (the fields clairstat reads among them)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
            "lora_dropout": 0.0, "use_rslora": False, "bias": "none",
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                               "up_proj", "down_proj"], "rank_pattern": {},
            "alpha_pattern": {}, "base_model_name_or_path": "synthetic-7b-shape"}


def write_adapters(root, n_layers, n_clients, rank, n_attackers, seed):
    """One folder per client; only one client's tensors are in memory at a time."""
    import torch
    from safetensors.torch import save_file

    modules = _modules(n_layers)
    folders = []
    for client in range(n_clients):
        state = {}
        for index, name, d_in, d_out in modules:
            a_mat, b_mat = _factors(seed, index, client, d_in, d_out, rank,
                                    client < n_attackers)
            state[f"{name}.lora_A.weight"] = torch.from_numpy(a_mat).to(torch.bfloat16)
            state[f"{name}.lora_B.weight"] = torch.from_numpy(b_mat).to(torch.bfloat16)
        folder = root / f"client{client:03d}"
        folder.mkdir()
        save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(json.dumps(_config(rank), indent=2))
        folders.append(folder)
    return folders


def _bytes(folders):
    return sum(path.stat().st_size for folder in folders for path in folder.iterdir())


# Each measured run is a child process that reports its own peak RSS (ru_maxrss of
# RUSAGE_SELF, KiB on Linux: all of its memory, numpy's and torch's C allocations
# included, not only Python objects) on its last line of stdout.
_CHILD = """
import json, resource, sys
mode, argv = sys.argv[1], sys.argv[2:]
if mode == "cli":
    from clairstat._cli import main
    code = main(argv)
elif mode == "whole":
    from safetensors.torch import load_file, save_file
    from clairstat.lora import refine_adapters
    import pathlib
    seed, out, folders = int(argv[0]), pathlib.Path(argv[1]), argv[2:]
    states = [load_file(f + "/adapter_model.safetensors") for f in folders]
    configs = [json.load(open(f + "/adapter_config.json")) for f in folders]
    fit = refine_adapters(states, configs, random_state=seed)
    for folder, state in zip(folders, fit.state_dicts):
        target = out / pathlib.Path(folder).name
        target.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()},
                  str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
    code = 0
else:
    import clairstat._cli, clairstat.lora, torch, safetensors.torch, tqdm
    code = 0
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
sys.exit(code)
"""


def _child(mode, argv):
    """Run one measured child; its wall time (s) and peak RSS (MiB)."""
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", _CHILD, mode, *argv], check=True,
                         stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    lines = run.stdout.strip().splitlines()
    print("\n".join(lines[:-1]), flush=True)
    return wall, float(lines[-1])


def _same_outputs(out_a, out_b, folders):
    """Whether two output trees hold equal tensors (keys, dtypes, values) per client."""
    import torch
    from safetensors.torch import load_file

    for folder in folders:
        a = load_file(str(out_a / folder.name / "adapter_model.safetensors"))
        b = load_file(str(out_b / folder.name / "adapter_model.safetensors"))
        if set(a) != set(b) or not all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])
                                       for k in a):
            return False
    return True


def _estimated_input_bytes(n_layers, n_clients, rank):
    per_layer = sum(d_in + d_out for _, d_in, d_out in MODULES) * rank * 2  # bf16
    return per_layer * n_layers * n_clients


def _check_disk(root, needed):
    free = shutil.disk_usage(root).free
    if free < needed * 1.1:
        raise SystemExit(f"{root}: {free / 1e9:.1f} GB free, about {needed / 1e9:.1f} GB "
                         "needed (inputs, staged copies and outputs)")
    return free


def run(args, root):
    _, baseline = _child("import", [])
    needed = (3 if args.compare_whole else 2) * _estimated_input_bytes(
        args.layers, args.clients, args.rank)
    free = _check_disk(root, needed)
    print(f"{root}: {free / 1e9:.1f} GB free, {needed / 1e9:.2f} GB needed", flush=True)
    start = time.perf_counter()
    (root / "in").mkdir()
    folders = write_adapters(root / "in", args.layers, args.clients, args.rank,
                             args.attackers, args.seed)
    generated = time.perf_counter() - start
    print(f"wrote {len(folders)} adapters in {generated:.1f} s", flush=True)
    out = root / "out"
    argv = ["refine", "--random-state", str(args.seed), "--out", str(out)]
    if args.n_jobs is not None:
        argv += ["--n-jobs", str(args.n_jobs)]
    if args.scheduler is not None:
        argv += ["--scheduler", args.scheduler]
    on_device = [f"--{name} {getattr(args, name)}" for name in ("device", "dtype")
                 if getattr(args, name) is not None]
    for option in on_device:
        argv += option.split()
    wall, peak = _child("cli", argv + [str(f) for f in folders])
    report = json.loads((out / "report.json").read_text())
    flagged = np.array([client["flagged"] for client in report["clients"]])
    attackers = np.arange(args.clients) < args.attackers
    n_modules = len(report["modules"])
    path = "clairstat refine (streamed" + "".join(", " + o for o in on_device) + ")"
    rows = [{"path": path, "modules": n_modules,
             "clients": args.clients, "rank": args.rank, "dtype": "bf16", "wall_s": wall,
             "per_module_s": wall / n_modules, "peak_rss_mib": peak,
             "baseline_rss_mib": baseline, "bytes_in": _bytes(folders),
             "bytes_out": _bytes([out / f.name for f in folders]),
             "recall": float(flagged[attackers].mean()) if args.attackers else float("nan"),
             "false_flags": int(flagged[~attackers].sum()), "generate_s": generated}]
    if args.compare_whole:  # the same fits on whole adapters held in memory
        whole = root / "whole"
        wall, peak = _child("whole", [str(args.seed), str(whole)] + [str(f) for f in folders])
        rows.append({**rows[0], "path": "refine_adapters on whole adapters",
                     "wall_s": wall, "per_module_s": wall / n_modules, "peak_rss_mib": peak,
                     "bytes_out": _bytes([whole / f.name for f in folders]),
                     "same": _same_outputs(out, whole, folders)})
    return rows


def table(rows):
    header = ("| path | modules | clients | rank | dtype | wall time (s) | per module (s) | "
              "peak RSS (MiB) | import-only RSS (MiB) | bytes in | bytes out | recall | "
              "false flags |")
    lines = [header, "|" + "---|" * 13]
    for row in rows:
        lines.append(
            f"| {row['path']} | {row['modules']} | {row['clients']} | {row['rank']} | "
            f"{row['dtype']} | {row['wall_s']:.1f} | {row['per_module_s']:.2f} | "
            f"{row['peak_rss_mib']:.0f} | {row['baseline_rss_mib']:.0f} | "
            f"{row['bytes_in']:,} | {row['bytes_out']:,} | {row['recall']:.2f} | "
            f"{row['false_flags']} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (7 modules each)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--attackers", type=int, default=5,
                        help="clients with a random lora_B (the first ones)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-jobs", type=int, default=None, help="passed to clairstat refine")
    parser.add_argument("--scheduler", default=None, help="passed to clairstat refine")
    parser.add_argument("--device", default=None, help="passed to clairstat refine")
    parser.add_argument("--dtype", default=None, help="passed to clairstat refine")
    parser.add_argument("--compare-whole", action="store_true",
                        help="also run clairstat.lora.refine_adapters on the whole "
                             "adapters in memory (the command's former path): its peak "
                             "RSS, time, and whether its outputs equal the command's")
    parser.add_argument("--dir", default=None,
                        help="parent of the temporary folder (default: the system's)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="clairstat-whole-model-", dir=args.dir))
    try:
        rows = run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    import clairstat
    import torch

    print(f"\nclairstat {clairstat.__version__}, torch {torch.__version__}, "
          f"Python {platform.python_version()}, {os.cpu_count()} CPUs; generating the "
          f"adapters took {rows[0]['generate_s']:.1f} s (not in the wall time)\n")
    print(table(rows))
    if len(rows) > 1:
        print(f"\nwhole / streamed peak RSS: "
              f"{rows[1]['peak_rss_mib'] / rows[0]['peak_rss_mib']:.2f}x; "
              f"outputs equal (every tensor): {rows[1]['same']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

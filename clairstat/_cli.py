"""The ``clairstat`` command line: ``clairstat refine`` on peft adapter folders.

::

    clairstat refine [--rank R] [--joint] [--test-level A] [--random-state S]
                     [--device D] [--n-jobs N] --out OUT ADAPTER_DIR...

Each ``ADAPTER_DIR`` is a folder as peft's ``save_pretrained`` writes it
(``adapter_config.json`` and ``adapter_model.safetensors``). The command runs
:func:`clairstat.lora.refine_adapters` on all of them and writes, for each,
``OUT/<folder name>/`` with the refined adapter (same keys, shapes, dtypes, safetensors
metadata, and the config copied unchanged), and ``OUT/report.json`` with every client's
flag and per-module p-values. Inputs are read with safetensors only (no pickle).
Exit status: 0 on success, 2 on a usage error or an unreadable input (one line on
stderr naming the folder, no traceback).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
REPORT_NAME = "report.json"


class InputError(Exception):
    """An input or option the command cannot use; its message is the one line shown."""


class Client(NamedTuple):
    """One adapter folder as read: tensors, config, safetensors metadata, module names."""

    state: dict
    config: dict
    metadata: dict | None
    modules: list


def _parser():
    parser = argparse.ArgumentParser(prog="clairstat", description="clairstat command line")
    commands = parser.add_subparsers(dest="command", required=True)
    refine = commands.add_parser(
        "refine", help="CLAIR on peft LoRA adapter folders: flag and refine",
        description="Fit CLAIR on the clients' LoRA adapters (clairstat.lora."
                    "refine_adapters), write each refined adapter to OUT/<folder name>/ "
                    "and a report to OUT/report.json.")
    refine.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR",
                        help="peft adapter folders (adapter_config.json + "
                             "adapter_model.safetensors), one per client")
    refine.add_argument("--out", required=True, metavar="OUT", help="output folder")
    refine.add_argument("--rank", type=int, default=None, metavar="R",
                        help="shared subspace dimension (default: chosen from the data)")
    refine.add_argument("--joint", action="store_true",
                        help="one fit over all modules instead of one per module")
    refine.add_argument("--test-level", type=float, default=0.05, metavar="A",
                        help="level of the per-client tests (default 0.05)")
    refine.add_argument("--random-state", type=int, default=None, metavar="S",
                        help="seed of the robust start (reproducible flags)")
    refine.add_argument("--device", default="cpu", metavar="D",
                        help="torch device of the solver (default cpu)")
    refine.add_argument("--n-jobs", type=int, default=None, metavar="N",
                        help="threads (default: from the problem size; -1: all CPUs)")
    return parser


# -- reading ------------------------------------------------------------------------------
def _read_config(folder):
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise InputError(f"{folder}: {CONFIG_NAME} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:  # JSONDecodeError and UnicodeDecodeError
        raise InputError(f"{folder}: {CONFIG_NAME} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise InputError(f"{folder}: {CONFIG_NAME} does not hold a JSON object")
    return config


def _read_weights(folder):
    """Tensors and safetensors metadata (read through ``safe_open``: no pickle)."""
    from safetensors import SafetensorError, safe_open

    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise InputError(f"{folder}: {WEIGHTS_NAME} is missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(f"{folder}: {WEIGHTS_NAME} is unreadable ({first_line})") from None
    return tensors, metadata


def _read_adapter(folder):
    """One adapter folder as a :class:`Client`, its LoRA pairs checked."""
    from .lora import adapter_factors

    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    config = _read_config(folder)
    tensors, metadata = _read_weights(folder)
    try:
        modules = sorted(adapter_factors(tensors, config))
    except ValueError as error:
        raise InputError(f"{folder}: {error}") from None
    return Client(tensors, config, metadata, modules)


def _read_all(folders):
    names = [folder.name for folder in folders]
    for folder, name in zip(folders, names):
        if names.count(name) > 1:
            raise InputError(f"{folder}: another input folder has the same name {name!r} "
                             "(outputs are written to OUT/<folder name>)")
    clients = [_read_adapter(folder) for folder in folders]
    for folder, client in zip(folders[1:], clients[1:]):
        if client.modules != clients[0].modules:
            raise InputError(f"{folder}: adapts modules {client.modules}, but {folders[0]} "
                             f"adapts {clients[0].modules}")
    return clients


# -- running ------------------------------------------------------------------------------
def _progress():
    """``tqdm`` over modules if installed, else one plain line per module on stderr."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _plain_progress

    def bar(iterable, total):
        return tqdm(iterable, total=total, desc="modules", unit="module", file=sys.stderr)
    return bar


def _plain_progress(iterable, total):
    for index, item in enumerate(iterable, start=1):
        print(f"module {index}/{total}: {item[0]}", file=sys.stderr, flush=True)
        yield item


def _check_device(device):
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise InputError(f"--device {device}: {error}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: this torch build sees no CUDA device")


def _refine(clients, args):
    from .lora import refine_adapters

    _check_device(args.device)
    options = {"rank": args.rank, "test_level": args.test_level,
               "random_state": args.random_state, "device": args.device}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            refinement = refine_adapters([c.state for c in clients],
                                         [c.config for c in clients],
                                         joint=args.joint, n_jobs=args.n_jobs,
                                         progress=_progress(), **options)
    except ValueError as error:  # parameter checks (rank too large, level, n_jobs...)
        raise InputError(str(error).splitlines()[0]) from None
    # One line per distinct warning, after the progress bar, instead of Python's format.
    for message in dict.fromkeys(str(w.message) for w in caught):
        print(f"clairstat refine: warning: {message}", file=sys.stderr)
    return refinement


def _p_values(refinement, k):
    """Client k's p-value per module (``{"joint": p}`` for a joint fit; None: not fitted)."""
    return {name: None if est is None else float(est.p_values_[k])
            for name, est in refinement.estimators.items()}


def _report(folders, refinement, args):
    clients = []
    for k, folder in enumerate(folders):
        clients.append({
            "name": folder.name, "input": str(folder),
            "flagged": bool(refinement.flagged[k]),
            "p_values": _p_values(refinement, k),
            "module_flagged": {name: bool(flags[k])
                               for name, flags in refinement.module_flagged.items()}})
    from . import __version__
    return {"clairstat_version": __version__, "joint": bool(args.joint),
            "rank": args.rank, "test_level": args.test_level,
            "random_state": args.random_state,
            "modules": sorted(refinement.module_flagged), "clients": clients}


# -- writing ------------------------------------------------------------------------------
def _check_outputs(folders, out):
    for folder in folders:
        if (out / folder.name).resolve() == folder.resolve():
            raise InputError(f"{folder}: OUT/{folder.name} is the input folder itself; "
                             "choose another --out")


def _write(folders, clients, refinement, report, out):
    from safetensors.torch import save_file

    for folder, client, state in zip(folders, clients, refinement.state_dicts):
        target = out / folder.name
        target.mkdir(parents=True, exist_ok=True)
        save_file({key: value.contiguous() for key, value in state.items()},
                  str(target / WEIGHTS_NAME), metadata=client.metadata)
        shutil.copyfile(folder / CONFIG_NAME, target / CONFIG_NAME)
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def refine_command(args):
    """Run ``clairstat refine``; raises :class:`InputError` for a bad input."""
    folders = [Path(path) for path in args.adapters]
    out = Path(args.out)
    _check_outputs(folders, out)
    clients = _read_all(folders)
    refinement = _refine(clients, args)
    report = _report(folders, refinement, args)
    _write(folders, clients, refinement, report, out)
    flagged = [folder.name for folder, f in zip(folders, refinement.flagged) if f]
    print(f"refined {len(folders)} adapters into {out}; flagged: "
          f"{', '.join(flagged) if flagged else 'none'}")
    return 0


def main(argv=None):
    """Entry point of the ``clairstat`` console script and ``python -m clairstat``.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name (default ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status: 0, or 2 for a usage error or an unusable input.
    """
    parser = _parser()
    args = parser.parse_args(argv)  # exits 2 with argparse's usage message on bad usage
    try:
        return refine_command(args)
    except InputError as error:
        print(f"clairstat {args.command}: error: {error}", file=sys.stderr)
        return 2

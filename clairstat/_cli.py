"""The ``clairstat`` command line: ``clairstat refine`` on peft adapter folders.

::

    clairstat refine [--rank R] [--joint | --per-module] [--test-level A]
                     [--flagged-updates clip|quarantine]
                     [--random-state S] [--max-iter N] [--tol T]
                     [--device D] [--dtype T] [--n-jobs N]
                     [--scheduler ADDR|local [--workers W]] --out OUT ADAPTER_DIR...

Each ``ADAPTER_DIR`` is a folder as peft's ``save_pretrained`` writes it
(``adapter_config.json`` and ``adapter_model.safetensors``). The command computes what
:func:`clairstat.lora.refine_adapters` computes on the same adapters (CLAIR's tests on
every module; by default the joint refinement of the collaborative clients' whole
adapters, ``--per-module`` each module by its own fit) and writes, for each client,
``OUT/<folder name>/`` with the refined adapter (same keys, shapes, dtypes, safetensors
metadata, and the config copied unchanged; a flagged client's file is a byte copy of its
input; other files of the folder, such as the model card ``README.md`` peft writes, are
not copied) and ``OUT/report.json`` with every client's flag and per-module p-values (raw and
adjusted for the module's multiple testing), every module's fitted rank and whether
its detection converged (where it cycled a module flag may differ from its adjusted
p-value's verdict), and
its ``untested`` tensors: those that are not LoRA factors (``modules_to_save`` modules,
biases, trainable tokens), copied unchanged, neither tested nor refined (a warning on
stderr names them; so does one for adapters that name different base models). Inputs
are read with safetensors only (no pickle). Exit status: 0 on success, 2 on a usage
error or an unusable input (one line on stderr naming the folder, no traceback), 130 or
143 when SIGINT or SIGTERM interrupted the run (one line, after the cleanup below).
Unusable: besides unreadable files, a ``lora_alpha`` or ``alpha_pattern`` value that is
not a finite non-zero number, a path that is not valid UTF-8 (safetensors opens files by
a UTF-8 path), any tensor holding non-finite values (the untested ones included, read
one at a time in the first pass), and factors too large for float64
arithmetic (``scaling x lora_B``, ``lora_A`` or their product of a norm above 1e150:
the fits square the updates, and one such client made them overflow for every client);
such a client is refused, not flagged, and the run stops (the last two are found while
streaming, before anything is published). Warnings, the fits' included, are lines
``clairstat refine: warning: ...`` after the progress bars, naming clients by folder
and the modules they came from.

``OUT`` is created with its missing parents (removed again if the run fails). It may
not be, or lie inside, an input folder; an existing ``OUT/<folder name>`` must be a
folder inside ``OUT`` that is no input folder (a symbolic link elsewhere is refused, as
is a dangling one), and its files no input's own (hard links of the inputs, as ``cp
-al`` makes them, are refused). Existing outputs are replaced by renames, never
written through, all or nothing (if one rename fails, or the run is interrupted while
publishing, those made are undone and OUT
is as it was); other files in ``OUT`` are left as they are, and a warning names the
adapter folders there that are not among this run's clients (an earlier run's: the new
report does not list them).

Memory: the command never holds a whole adapter. It first reads only the safetensors
headers; every output file starts as a copy of its input in a staging folder under
``OUT`` (same header, so same keys, dtypes and byte offsets). Then, module by module, it
reads that module's ``lora_A`` and ``lora_B`` from every client
(``safetensors.safe_open``, memory-mapped, closed after the read) and fits it, keeping
only its flags, p-values and the (n_clients, n_clients) Gram matrix of its updates. The
client-level flags and the joint refinement's combinations follow from those
(:func:`clairstat.aggregation.joint_refinement`); a second pass reads every fitted
module again and overwrites the collaborative clients' refined factors in place at their
offsets (``os.pwrite``). With ``--per-module`` there is one pass, which writes every
client's refined factors as each module is fitted; a client flagged at the end has its
staged file copied from its input again. The peak is one module's inputs, its fit and
its outputs (with ``--scheduler``: at most ``2 x`` the cluster's worker threads modules
in flight), not the adapters' size; the price of the joint refinement is reading the
inputs twice. The staged files move into ``OUT/<folder name>/`` when every module is
done, by renames (nothing is left in ``OUT`` when a run fails).

With ``--scheduler ADDR`` the per-module work (fits, and the second pass's readouts)
runs on the Dask cluster whose scheduler is at ``ADDR`` (``dask.distributed``; its
workers need clairstat installed): the command reads each module, submits it and
collects the results in module order, so the outputs are the in-process ones.
``--scheduler local`` starts a :class:`distributed.LocalCluster` of ``--workers``
single-threaded workers in this process.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import ctypes
import ctypes.util
import functools
import gc
import json
import logging
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
REPORT_NAME = "report.json"


class InputError(Exception):
    """An input or option the command cannot use; its message is the one line shown."""


class Client(NamedTuple):
    """One adapter folder as read from its header: no tensor is loaded.

    ``keys`` maps each module to its ``{"A": key, "B": key}``; ``shapes`` maps every
    tensor key to its shape; ``offsets`` maps every tensor key to its ``(begin, end)``
    byte range in the file.
    """

    folder: Path
    config: dict
    metadata: dict | None
    keys: dict
    shapes: dict
    offsets: dict

    @property
    def weights(self):
        return self.folder / WEIGHTS_NAME

    @property
    def modules(self):
        return sorted(self.keys)


def _parser():
    parser = argparse.ArgumentParser(prog="clairstat", description="clairstat command line")
    # metavar: "required: {refine}", not the internal dest's name (a review)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{refine}")
    refine = commands.add_parser(
        "refine", help="CLAIR on peft LoRA adapter folders: flag and refine",
        description="Fit CLAIR on the clients' LoRA adapters (as clairstat.lora."
                    "refine_adapters), reading one module at a time, write each refined "
                    "adapter to OUT/<folder name>/ and a report to OUT/report.json. "
                    "A client whose factors are not finite, or too large for float64 "
                    "arithmetic (scaling x lora_B, lora_A or their product of a norm "
                    "above 1e150), stops the run with one line naming its folder "
                    "(exit 2), as an unreadable one does.")
    refine.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR",
                        help="peft adapter folders (adapter_config.json + "
                             "adapter_model.safetensors), one per client")
    refine.add_argument("--out", required=True, metavar="OUT",
                        help="output folder (created if missing; not inside an input "
                             "folder)")
    refine.add_argument("--rank", type=int, default=None, metavar="R",
                        help="shared subspace dimension: of the joint refinement, or of "
                             "each module's fit with --per-module (default: chosen from "
                             "the data)")
    # alternatives, as the synopsis shows them: both given was accepted, the last winning
    how = refine.add_mutually_exclusive_group()
    how.add_argument("--joint", dest="joint", action="store_true", default=True,
                        help="refine the collaborative clients' whole adapters together "
                             "(the default, as clairstat.lora.refine_adapters)")
    how.add_argument("--per-module", dest="joint", action="store_false",
                        help="refine each module by its own fit instead")
    refine.add_argument("--test-level", type=float, default=0.05, metavar="A",
                        help="level of the per-client tests (default 0.05)")
    refine.add_argument("--flagged-updates", default=None,
                        choices=("clip", "quarantine"),
                        help="joint refinement: what stands in for an update its "
                             "module's test flags in a client not flagged overall: the "
                             "update scaled down to the largest norm of the module's "
                             "unflagged clients (clip, the default) or their mean "
                             "(quarantine); as refine_adapters' flagged_updates; joint "
                             "refinement only")
    refine.add_argument("--rank-rule", default=None,
                        choices=("smallest-error", "one-standard-error"),
                        help="joint refinement without --rank: the joint rank of the "
                             "smallest cross-validated error (smallest-error, the "
                             "default) or the smallest within one standard error of it "
                             "(one-standard-error); as refine_adapters' rank_rule")
    refine.add_argument("--sample-weight", default=None, metavar="W1,W2,...",
                        help="client weights of the collaborative mean (e.g. each "
                             "client's number of training examples), one per ADAPTER_DIR "
                             "in their order, comma-separated (default: equal weights); "
                             "as refine_adapters' sample_weight")
    refine.add_argument("--random-state", type=int, default=None, metavar="S",
                        help="seed of the robust start (reproducible flags)")
    refine.add_argument("--max-iter", type=int, default=None, metavar="N",
                        help="iteration cap of each module's solver (default 2000, as "
                             "CLAIREstimator's max_iter): raise it where a fit warns "
                             "that the solver stopped at its cap")
    refine.add_argument("--tol", type=float, default=None, metavar="T",
                        help="relative duality gap at which each module's solver stops "
                             "(default 1e-6, as CLAIREstimator's tol)")
    refine.add_argument("--device", default=None, metavar="D",
                        help="torch device (cpu, cuda, cuda:1) of the solver and of the "
                             "module-sized work: the reduction's QRs, the Gram matrices, "
                             "the readouts (default: the solver on the CPU, the rest in "
                             "numpy)")
    refine.add_argument("--dtype", default=None, choices=("float64", "float32"),
                        help="precision of that torch work (default float64)")
    refine.add_argument("--n-jobs", type=int, default=None, metavar="N",
                        help="threads per fit (default: from the problem size, one "
                             "under nice; -1: all CPUs)")
    refine.add_argument("--scheduler", default=None, metavar="ADDR",
                        help="run the per-module fits on the Dask cluster at ADDR "
                             "(e.g. tcp://host:8786), or 'local' for a LocalCluster in "
                             "this process (needs the dask extra)")
    refine.add_argument("--workers", type=int, default=None, metavar="W",
                        help="workers of --scheduler local (default 2, one thread each); "
                             "with any other --scheduler the cluster's own workers run")
    return parser


# -- reading ------------------------------------------------------------------------------
def _read_config(folder):
    path = folder / CONFIG_NAME
    if not path.is_file():
        named = sorted(sub.name for sub in folder.iterdir()
                       if (sub / CONFIG_NAME).is_file()) if folder.is_dir() else []
        hint = (f" (peft saves an adapter named otherwise than 'default' in a subfolder: "
                f"pass {folder / named[0]})" if named else "")
        raise InputError(f"{folder}: {CONFIG_NAME} is missing{hint}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:  # JSONDecodeError and UnicodeDecodeError
        raise InputError(f"{folder}: {CONFIG_NAME} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise InputError(f"{folder}: {CONFIG_NAME} does not hold a JSON object")
    kind = config.get("peft_type")
    if kind is not None and str(kind).upper() != "LORA":
        raise InputError(f"{folder}: peft_type {kind}: only LoRA adapters are refined")
    return config


def _unreadable(folder, error):
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    return InputError(f"{folder}: {WEIGHTS_NAME} is unreadable ({first_line})")


_READ_ERRORS = (OSError, ValueError, RuntimeError)  # SafetensorError is an Exception


def _safetensors_errors():
    from safetensors import SafetensorError

    return (SafetensorError,) + _READ_ERRORS


def _byte_offsets(path):
    """Absolute ``(begin, end)`` of every tensor's bytes, from the safetensors header.

    The format (safetensors' documentation): an 8-byte little-endian header length N,
    N bytes of JSON (``data_offsets`` relative to the end of the header), the data.
    ``safe_open`` has already validated the file; this only locates the bytes.
    """
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    start = 8 + length
    return {key: (start + info["data_offsets"][0], start + info["data_offsets"][1])
            for key, info in header.items() if key != "__metadata__"}


def _read_header(folder):
    """Metadata, shapes and byte offsets of the weights file, without loading tensors."""
    from safetensors import safe_open

    path = folder / WEIGHTS_NAME
    if not path.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        raise InputError(f"{folder}: {WEIGHTS_NAME} is missing" + (
            " (adapter_model.bin is there, a pickle file, which is not read: save with "
            "save_pretrained(..., safe_serialization=True))" if pickled else ""))
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
            dtypes = {key: handle.get_slice(key).get_dtype() for key in handle.keys()}
        offsets = _byte_offsets(path)
    except _safetensors_errors() as error:
        raise _unreadable(folder, error) from None
    return metadata, shapes, offsets, dtypes


# The factor dtypes read and written back (safetensors' names): a refined factor in
# int8 or fp8 would be rounded beyond use, and fp8 tensors have no finiteness check.
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def _check_pairs(keys, shapes):
    """The checks of :func:`clairstat.lora.adapter_factors`, on the header's shapes."""
    for module, pair in keys.items():
        a_shape, b_shape = shapes[pair["A"]], shapes[pair["B"]]
        if len(a_shape) > 2 or len(b_shape) > 2:
            raise ValueError(f"{module}: lora_B {b_shape} and lora_A {a_shape}: LoRA on a "
                             "convolution is not supported (linear layers only).")
        if len(a_shape) != 2 or len(b_shape) != 2 or b_shape[1] != a_shape[0]:
            raise ValueError(f"{module}: lora_B {b_shape} and lora_A {a_shape}.")


def _read_adapter(folder):
    """One adapter folder as a :class:`Client`, its LoRA pairs, scalings and dtypes
    checked."""
    from .lora import check_config, check_rank, lora_pairs, lora_scaling

    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    try:
        str(folder.absolute()).encode("utf-8")
    except UnicodeEncodeError:  # safe_open takes a str path and needs it UTF-8
        raise InputError(f"{folder}: its path is not valid UTF-8, and safetensors opens "
                         "files by a UTF-8 path only: rename the folder") from None
    config = _read_config(folder)
    metadata, shapes, offsets, dtypes = _read_header(folder)
    try:
        check_config(config)
        keys = lora_pairs(shapes)
        _check_pairs(keys, shapes)
        for module, pair in keys.items():
            lora_scaling(config, module, shapes[pair["A"]][0])  # the alpha it uses
            check_rank(config, module, shapes[pair["A"]][0])  # the folder's own config
            rank, width = shapes[pair["A"]][0], min(shapes[pair["B"]][0], shapes[pair["A"]][1])
            if rank > width:  # peft allows it (rank_pattern); every rule refuses it later
                raise ValueError(f"module {module} has LoRA rank {rank}, above min(d_out, "
                                 f"d_in) = {width} (its update has rank at most {width}): "
                                 "refine adapters whose rank is at most the module's "
                                 "smaller side.")
            for key in pair.values():
                if dtypes[key] not in _FLOAT_DTYPES:
                    raise ValueError(f"{key} is {dtypes[key]}; LoRA factors are read "
                                     "and written in F16, BF16, F32 or F64.")
    except ValueError as error:
        raise InputError(f"{folder}: {str(error).splitlines()[0]}") from None
    return Client(folder, config, metadata, keys, shapes, offsets)


def _module_shape(client, module):
    """``(d_out, d_in)`` of one module of one client."""
    pair = client.keys[module]
    return client.shapes[pair["B"]][0], client.shapes[pair["A"]][1]


def _read_all(folders):
    if len(folders) < 2:
        raise InputError("at least two adapter folders are needed (the clients are "
                         "compared with each other)")
    places = [folder.resolve() for folder in folders]
    for folder, place in zip(folders, places):
        if places.count(place) > 1:
            raise InputError(f"{folder}: given more than once (as {place})")
    names = [folder.name for folder in folders]
    for folder, name in zip(folders, names):
        if name == REPORT_NAME or name.startswith(_STAGING_PREFIX):
            raise InputError(f"{folder}: its name {name!r} is the command's own "
                             f"({REPORT_NAME!r} is the report in OUT, {_STAGING_PREFIX!r}* "
                             "its staging folders): rename the folder")
        if names.count(name) > 1:
            raise InputError(f"{folder}: another input folder has the same name {name!r} "
                             "(outputs are written to OUT/<folder name>): give the inputs "
                             "distinct names, e.g. symbolic links (ln -s run0/"
                             f"{name} client0), which are read through")
    from .lora import module_difference

    clients = [_read_adapter(folder) for folder in folders]
    for client in clients:
        _check_untested_finite(client)
    first = clients[0]
    for client in clients[1:]:
        if client.modules != first.modules:
            raise InputError(f"{client.folder}: adapts modules other than {first.folder}: "
                             f"{module_difference(client.modules, first.modules)}")
        for module in first.modules:
            if _module_shape(client, module) != _module_shape(first, module):
                raise InputError(f"{client.folder}: {module} is (d_out, d_in) = "
                                 f"{_module_shape(client, module)}, but "
                                 f"{_module_shape(first, module)} in {first.folder}")
    return clients


#: Bytes of an untested tensor checked at a time (its rows in slices of about this size).
_CHECK_BYTES = 1 << 26


def _check_untested_finite(client):
    """An adapter whose untested tensors (``modules_to_save``, biases: copied unchanged)
    hold non-finite values is unusable: refused by folder and key (an ``inf`` in one
    client's ``lm_head.weight`` was copied to its output, the run's exit status 0, a
    review). Read in slices of rows of about ``_CHECK_BYTES`` (memory-mapped; the bytes
    are read again when the file is copied), float8 widened to float32 for the check
    (torch has no ``isfinite`` for it), complex tensors checked too, integer ones not
    (they hold no non-finite value)."""
    from safetensors import safe_open

    import torch

    from .lora import untested_keys

    keys = untested_keys(client.shapes)
    if not keys:
        return
    try:
        with safe_open(str(client.weights), framework="pt") as handle:
            for key in keys:
                piece = handle.get_slice(key)
                shape = piece.get_shape()
                if not shape:  # a scalar
                    chunks = [handle.get_tensor(key)]
                else:
                    row_bytes = max(1, math.prod(shape[1:])) * 8
                    step = max(1, _CHECK_BYTES // row_bytes)
                    chunks = (piece[start:start + step] for start in range(0, shape[0], step))
                for chunk in chunks:
                    if not (chunk.is_floating_point() or chunk.is_complex()):
                        break
                    if chunk.is_floating_point() and chunk.element_size() == 1:
                        chunk = chunk.to(torch.float32)  # float8
                    if not torch.isfinite(chunk).all():
                        raise InputError(f"{client.folder}: {key} (copied untested, not a "
                                         "LoRA factor) holds non-finite values")
    except _safetensors_errors() as error:
        raise _unreadable(client.folder, error) from None


def _read_module(client, module):
    """``{key: tensor}`` of one module's ``lora_A`` and ``lora_B`` (the file is mapped
    only during the read, so its pages do not stay in this process)."""
    from safetensors import safe_open

    import torch

    pair = client.keys[module]
    try:
        with safe_open(str(client.weights), framework="pt") as handle:
            tensors = {pair[w]: handle.get_tensor(pair[w]) for w in "AB"}
    except _safetensors_errors() as error:
        raise _unreadable(client.folder, error) from None
    for key, tensor in tensors.items():  # here the error can still name the folder
        if not torch.isfinite(tensor).all():
            raise InputError(f"{client.folder}: {key} holds non-finite values")
    from .lora import check_update_size, lora_scaling

    try:  # an update the fits' float64 would overflow on (their squares)
        b_mat, a_mat = (tensors[pair[w]].detach().double().numpy() for w in "BA")
        check_update_size(module, b_mat, a_mat,
                          lora_scaling(client.config, module, a_mat.shape[0]))
    except ValueError as error:
        raise InputError(f"{client.folder}: {error}") from None
    return tensors


# -- warnings -----------------------------------------------------------------------------
# Every warning raised during a run is recorded and shown as one line of the command's
# own, after the progress bars: the per-module fits' (with the module and the clients'
# folder names), the joint refinement's, numpy's floating-point ones. One process-wide
# hook does it, installed by the first recorder and removed by the last: each thread
# records into its own list (a Dask worker thread's fit returns its list), and a thread
# without one (a fit's pool) into the run's. ``warnings.catch_warnings`` per fit swapped
# the process-wide hook from several threads at once (``--scheduler local``): a fit
# could restore Python's printer while another still ran, whose warnings then came out
# raw as well (a review).
class _ThreadRecords(threading.local):
    records = None  # this thread's list of (category name, message), or None


_THREAD = _ThreadRecords()
_HOOK_LOCK = threading.Lock()
_HOOK = {"depth": 0, "runs": [], "showwarning": None, "filters": None}


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """``warnings.showwarning`` while recording: into the thread's list, else the run's,
    else Python's own display."""
    records = _THREAD.records
    if records is None and _HOOK["runs"]:
        records = _HOOK["runs"][-1]
    if records is not None:
        records.append((category.__name__, str(message)))
        return
    show = _HOOK["showwarning"]
    if show is None or show is _show_warning:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
    else:
        show(message, category, filename, lineno, file, line)


@contextlib.contextmanager
def recorded_warnings(run=False):
    """Record the warnings raised in this thread (``run``: and in threads that record
    none of their own) into the list it yields, as ``(category name, message)``.

    Every warning is recorded, each time it is raised (the ``default``, ``module`` and
    ``once`` filters act as ``always``; ``ignore`` and ``error`` filters stay). Safe to
    enter from several threads at once, and nested.
    """
    records = []
    with _HOOK_LOCK:
        if _HOOK["depth"] == 0:
            _HOOK["showwarning"], _HOOK["filters"] = warnings.showwarning, warnings.filters
            # "error" too: a run reports its warnings as lines, it does not die of
            # them (-W error made the command exit with a traceback, a review)
            warnings.filters = [("always",) + tuple(entry[1:])
                                if entry[0] in ("default", "module", "once", "error")
                                else entry for entry in warnings.filters]
            warnings.filters.append(("always", None, Warning, None, 0))
            _filters_mutated()  # forget what was shown once already
            warnings.showwarning = _show_warning
        _HOOK["depth"] += 1
        if run:
            _HOOK["runs"].append(records)
    previous, _THREAD.records = _THREAD.records, records
    try:
        yield records
    finally:
        _THREAD.records = previous
        with _HOOK_LOCK:
            if run:
                _HOOK["runs"] = [r for r in _HOOK["runs"] if r is not records]
            _HOOK["depth"] -= 1
            if _HOOK["depth"] == 0:
                if warnings.showwarning is _show_warning:
                    warnings.showwarning = _HOOK["showwarning"]
                warnings.filters = _HOOK["filters"]
                _filters_mutated()


def _filters_mutated():
    """Tell the warnings machinery its filters changed (so that a warning shown once
    before is shown again). A private hook of CPython's ``warnings`` module: where a
    version lacks it, warnings already shown once in the process may stay hidden."""
    getattr(warnings, "_filters_mutated", lambda: None)()


_CLIENTS = re.compile(r"\b(?P<lword>[Cc]lients) \[(?P<list>[0-9, ]*)\]"
                      r"|\b(?P<word>[Cc]lient) (?P<one>[0-9]+)\b")


def _named(message, names):
    """The clients a message names by position (``Clients [2, 5]``, ``client 3``) named
    by their folders (``Clients ['b', 'e']``, ``client 'c'``)."""
    def name(index):
        k = int(index)
        return repr(names[k]) if 0 <= k < len(names) else index.strip()

    def substitute(match):  # one pass: an inserted name is never read again
        if match["list"] is not None:
            return f"{match['lword']} [" + ", ".join(
                name(i) for i in match["list"].split(",") if i.strip()) + "]"
        return f"{match['word']} {name(match['one'])}"

    return _CLIENTS.sub(substitute, message)


def _warning_lines(records, names, n_modules):
    """One line per distinct warning of ``(module or None, category, message)``
    records: clients by folder name, and the modules it was raised in."""
    modules_of = {}
    for module, category, message in records:
        text = " ".join(part.strip() for part in _named(message, names).splitlines())
        if category != "UserWarning":
            text = f"{category}: {text}"
        modules = modules_of.setdefault(text, [])
        if module is not None and module not in modules:
            modules.append(module)
    for text, modules in modules_of.items():
        if not modules:
            yield text
        elif len(modules) == 1:
            yield f"{modules[0]}: {text}"
        elif len(modules) == n_modules:
            yield f"all {n_modules} modules: {text}"
        else:
            shown = ", ".join(modules[:3]) + (", ..." if len(modules) > 3 else "")
            yield f"{len(modules)} modules ({shown}): {text}"


#: ``\n``, ``\t``, ``\x1b``, ``\x85``, ``\u2028``... for the C0 and C1 control
#: characters, DEL and the Unicode line and paragraph separators (each ends a line).
_CONTROL_ESCAPES = {code: ascii(chr(code))[1:-1]
                    for code in (*range(32), *range(127, 160), 0x2028, 0x2029)}


def _say(line, file=None):
    """Print a line; the bytes of a path that is not valid UTF-8 (held as surrogates)
    are written as they are where the stream writes them so, else as ``\\xff``
    escapes; control characters (a newline in a folder name) as escapes."""
    file = sys.stderr if file is None else file
    # one line: a folder name's control characters (a newline) escaped (a review)
    line = line.translate(_CONTROL_ESCAPES)
    if getattr(file, "errors", None) != "surrogateescape":
        try:
            line = line.encode("utf-8", "surrogateescape").decode("utf-8",
                                                                  "backslashreplace")
        except UnicodeEncodeError:  # a surrogate that stands for no byte
            line = line.encode("utf-8", "backslashreplace").decode("utf-8")
    print(line, file=file)


# -- fitting ------------------------------------------------------------------------------
class ModuleFit(NamedTuple):
    """What the command keeps of one module's fit (the first pass).

    ``flagged`` (n_clients,) bool; ``p_values`` one float per client, or None where the
    module was not fitted (every update zero); ``gram`` (n_clients, n_clients) the
    Gram matrix of its updates (joint refinement; else None); ``states`` per client
    ``{key: tensor}`` in the input's dtype (per-module refinement; else None);
    ``warnings`` the fit's warnings, ``(category name, message)`` (clients by position);
    ``adjusted_p_values`` the p-values after the multiple-testing correction across the
    module's clients (None where ``p_values`` is); ``rank`` the module's fitted rank
    (its own refinement's with ``--per-module``; None where it was not fitted);
    ``converged`` whether its detection ended on a set its own tests keep (False: it
    cycled, and a flag may differ from its adjusted p-value's verdict; None where it
    was not fitted).
    """

    flagged: list
    p_values: list | None
    gram: object
    states: list | None
    warnings: list
    adjusted_p_values: list | None = None
    rank: int | None = None
    converged: bool | None = None


def _factors(module, tensors, configs):
    from .lora import adapter_factors

    return [adapter_factors(state, config)[module] for state, config in zip(tensors, configs)]


class ClientError(ValueError):
    """A ValueError of client ``client`` (its position) met in a fit's readout: a refined
    factor its dtype cannot hold. The command names the client's folder."""

    def __init__(self, client, message):
        super().__init__(client, message)  # both in args: it pickles (Dask workers)
        self.client, self.message = client, message

    def __str__(self):
        return self.message


def _states(module, readouts, tensors, configs, clients):
    """Readouts ``(B, A)`` of ``clients`` as ``{key: tensor}`` in each input's dtype."""
    from .lora import factors_to_state_dict

    states = {}
    for k, factors in zip(clients, readouts):
        try:
            states[k] = factors_to_state_dict({module: factors}, tensors[k], configs[k])
        except ValueError as error:  # e.g. a refined lora_B beyond float16's range
            raise ClientError(k, str(error)) from None
    return states


def fit_module(module, tensors, configs, n_jobs, work, options, joint):
    """First pass: CLAIR on one module of every client (its tests, p-values, flags).

    Runs in this process or on a Dask worker: everything it needs is in its arguments,
    and it returns tensors of the inputs' dtypes, so the same bytes are written either way.

    Parameters
    ----------
    module : str
    tensors : list of dict, length n_clients
        Client k's ``{lora_A key: tensor (r_k, d_in), lora_B key: tensor (d_out, r_k)}``.
    configs : list of dict
        The clients' adapter configs (the scalings).
    n_jobs : int or None
        Threads of the fit (:func:`clairstat._threads.thread_limits`).
    work : float
        Flops of the largest module of the adapters (chooses the threads for ``None``).
    options : dict
        Keywords of :func:`clairstat.aggregation.clair_modules` for one module's fit.
    joint : bool
        ``True``: keep the module's Gram matrix for the joint refinement
        (:func:`refine_module` writes later). ``False``: read out every client's
        refined factors now (the module's own refinement).

    Returns
    -------
    ModuleFit
    """
    from ._estimator import refinement_replaced
    from ._threads import thread_limits
    from .aggregation import clair_modules, module_gram

    # Recorded here so that a Dask worker's warnings reach the command's stderr too;
    # with the joint refinement the module's own refinement is not written.
    with recorded_warnings() as caught, thread_limits(n_jobs, work), \
            (refinement_replaced() if joint else contextlib.nullcontext()):
        factors = _factors(module, tensors, configs)
        try:
            fit = clair_modules({module: factors}, joint=False, **options)
        except ValueError as error:
            rank = options.get("rank")
            if rank is not None and str(error).startswith(f"rank={rank} exceeds"):
                # in the command line's words, naming the module (a review)
                bound = str(error).split(" = ", 1)[1].split(";")[0]
                raise ValueError(f"--rank {rank}: exceeds what module {module} supports "
                                 f"(at most {bound}: its reduced size and clients); "
                                 "give a smaller --rank") from None
            raise
        flagged = fit.module_flagged[module].tolist()
        estimator = fit.estimators[module]
        p_values, adjusted, gram, states = None, None, None, None
        if estimator is not None:  # None: every update is zero, nothing was fitted
            p_values = [float(p) for p in estimator.p_values_]
            adjusted = [float(p) for p in estimator.adjusted_p_values_]
            if joint:
                gram = module_gram(factors, **_on_device(options))
            else:
                everyone = range(len(factors))
                readouts = fit.per_client[module].readouts(
                    everyone, [a.shape[0] for _, a in factors])
                states = list(_states(module, readouts, tensors, configs,
                                      everyone).values())
    return ModuleFit(flagged, p_values, gram, states, list(dict.fromkeys(caught)),
                     adjusted, None if estimator is None else int(estimator.rank_),
                     None if estimator is None else bool(estimator.detection_converged_))


def _on_device(options):
    """``device`` and ``dtype`` of the fit options where a device was given, else {}."""
    if options.get("device") is None:
        return {}
    return {"device": options["device"], "dtype": options.get("dtype")}


def refine_module(module, tensors, configs, n_jobs, work, coef, kept, on_device=None):
    """Second pass of the joint refinement: the collaborative clients' refined factors.

    Client k's refined update is ``sum_j coef[k, j] B_j A_j`` in this module
    (:func:`clairstat.aggregation.joint_refinement`'s combination for it), read out at
    its rank in the module's reduced coordinates as
    :func:`clairstat.lora.refine_adapters` does.

    Parameters
    ----------
    module, tensors, configs, n_jobs, work
        As in :func:`fit_module`.
    coef : ndarray of shape (n_clients, n_clients)
    kept : list of int
        The clients to read out (the collaborative ones).
    on_device : dict, optional
        ``device`` and ``dtype`` of the reduction and the readouts (as the first pass).

    Returns
    -------
    states : dict of int to dict
        Client k's ``{key: tensor}`` in its input's dtype.
    warnings : list of tuple
        The readouts' warnings, as :class:`ModuleFit`'s.
    """
    from ._reduced import CombinedUpdates
    from ._threads import thread_limits
    from .aggregation import ReducedStack, factored_reduction

    with recorded_warnings() as caught, thread_limits(n_jobs, work):
        factors = _factors(module, tensors, configs)
        # The bases of the first pass's fit (the same exact reduction, recomputed).
        reduction = factored_reduction(factors, **(on_device or {}))
        left, right = reduction.left_basis, reduction.right_basis
        stack = ReducedStack(left, CombinedUpdates(factors, coef, left, right), right)
        readouts = stack.readouts(kept, [factors[k][1].shape[0] for k in kept])
        states = _states(module, readouts, tensors, configs, kept)
    return states, list(dict.fromkeys(caught))


def _work(clients):
    """:func:`clairstat.aggregation.modules_work` from the headers' shapes alone."""
    import numpy as np

    from .aggregation import modules_work

    def placeholder(shape):  # an array of that shape that allocates nothing
        return np.broadcast_to(np.float64(0.0), shape)

    return modules_work({module: [(placeholder(c.shapes[c.keys[module]["B"]]),
                                   placeholder(c.shapes[c.keys[module]["A"]]))
                                  for c in clients]
                         for module in clients[0].modules})


class _Packed(NamedTuple):
    """A torch tensor as safetensors bytes, for a Dask cluster's workers.

    distributed serializes torch tensors through ``Tensor.numpy()``, which bfloat16
    tensors refuse: with worker processes (not threads) a bf16 client ended the command
    with a traceback ("unsupported ScalarType BFloat16"; a review). safetensors keeps
    every dtype exactly and loads no pickle."""

    data: bytes


def _walk(value, convert):
    """``value`` with ``convert`` applied where it returns something other than None,
    lists, tuples, NamedTuples and dicts walked otherwise."""
    converted = convert(value)
    if converted is not None:
        return converted
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_walk(item, convert) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_walk(item, convert) for item in value)
    if isinstance(value, dict):
        return {key: _walk(item, convert) for key, item in value.items()}
    return value


def _pack(value):
    """``value`` with every torch tensor in it replaced by a :class:`_Packed` (each on
    its own, wherever it is: dicts keep their keys and order)."""
    import torch

    def pack(item):
        if isinstance(item, torch.Tensor):
            from safetensors.torch import save

            return _Packed(save({"tensor": item.detach().contiguous().clone()}))
        return None

    return _walk(value, pack)


def _unpack(value):
    """The inverse of :func:`_pack`."""
    def unpack(item):
        if isinstance(item, _Packed):
            from safetensors.torch import load

            return load(item.data)["tensor"]
        return None

    return _walk(value, unpack)


def _remote(function, module, *args):
    """``function(module, *args)`` on a worker, tensors packed both ways."""
    return _pack(function(module, *_unpack(args)))


def _run(function, jobs, cluster):
    """``(module, function(module, *args))`` for ``(module, args)`` in ``jobs``, in
    order: in this process, or on the Dask ``cluster`` with at most ``2 x`` its threads
    in flight (the reading runs ahead of the cluster only that far), tensors sent and
    received as safetensors bytes (:class:`_Packed`)."""
    if cluster is None:
        for module, args in jobs:
            yield module, function(module, *args)
        return
    window = max(2, 2 * sum(cluster.nthreads().values()))
    pending = collections.deque()
    for module, args in jobs:
        pending.append((module, cluster.submit(_remote, function, module, *_pack(args),
                                               pure=False)))
        if len(pending) >= window:
            name, future = pending.popleft()
            yield name, _unpack(future.result())
    while pending:
        name, future = pending.popleft()
        yield name, _unpack(future.result())


# Seconds a Dask scheduler has to accept the connection and answer its handshake (the
# thread that connects gets CONNECT_MARGIN more before the command gives up on it).
CONNECT_TIMEOUT, CONNECT_MARGIN = 30, 10


class _Cluster:
    """A ``distributed.Client`` on ``--scheduler``'s cluster (None: no cluster)."""

    def __init__(self, scheduler, workers):
        self.scheduler = scheduler
        self.workers = 2 if workers is None else workers
        self.stack = None

    def __enter__(self):
        if self.scheduler is None:
            return None
        import contextlib

        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise InputError("--scheduler needs dask.distributed: pip install "
                             "clairstat[dask]") from None
        self.stack = contextlib.ExitStack()
        try:
            if self.scheduler == "local":
                if self.workers < 1:
                    raise InputError(f"--workers {self.workers}: must be at least 1")
                # silence_logs: a fit's error (an unusable option, a client's refined
                # factors) is the command's one line, not also distributed's "Compute
                # Failed" log with its traceback (a review)
                cluster = self.stack.enter_context(LocalCluster(
                    n_workers=self.workers, threads_per_worker=1, processes=False,
                    dashboard_address=None, silence_logs=logging.CRITICAL))
                return self.stack.enter_context(Client(cluster))
            return self.stack.enter_context(self._connect(Client))
        except (OSError, ValueError, TimeoutError) as error:
            self.stack.close()
            raise InputError(f"--scheduler {self.scheduler}: {error}") from None

    def _connect(self, client_type):
        """``Client(ADDR)``, bounded: ``Client``'s own timeout bounds the connection but
        not the handshake's read, so a server that accepts and never answers (an HTTP
        server, the dashboard's port given by mistake) hung the command, and one that
        sends a banner first (an SSH server) had its bytes read as a frame length (a
        MemoryError for exabytes, with a traceback; a review). The connection runs in a
        daemon thread given ``CONNECT_TIMEOUT`` seconds and a margin; whatever it
        raises is the command's one line."""
        import threading

        outcome = {}

        def connect():
            try:
                outcome["client"] = client_type(self.scheduler,
                                                timeout=f"{CONNECT_TIMEOUT}s")
            except BaseException as error:  # noqa: BLE001 -- reported as one line below
                outcome["error"] = error

        thread = threading.Thread(target=connect, name="clairstat-dask-connect",
                                  daemon=True)
        thread.start()
        thread.join(CONNECT_TIMEOUT + CONNECT_MARGIN)
        if thread.is_alive():
            raise InputError(f"--scheduler {self.scheduler}: no Dask scheduler answered "
                             f"within {CONNECT_TIMEOUT + CONNECT_MARGIN} s (a scheduler "
                             "listens on "
                             "tcp://HOST:8786 by default; the dashboard's port is not "
                             "it)")
        if "error" in outcome:
            error = outcome["error"]
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise error
            text = ("its reply is not Dask's protocol" if isinstance(error, MemoryError)
                    else f"{type(error).__name__}: {' '.join(str(error).split())[:160]}")
            raise InputError(f"--scheduler {self.scheduler}: no Dask scheduler there "
                             f"({text})")
        return outcome["client"]

    def __exit__(self, *exc):
        if self.stack is None:
            return
        # A cluster closed on a loaded machine can leave an asyncio future holding a
        # TimeoutError nobody retrieves; when it is collected asyncio logs "Future
        # exception was never retrieved" with its traceback, which reached stderr
        # after the command's one-line error (a test run beside other jobs); so did
        # distributed's "Batched Comm Closed" with a CommClosedError traceback, logged at
        # INFO by a comm closed mid-send (a CI run beside other jobs: silence_logs had
        # been restored by then). The shutdown's leftovers are the cluster's, not the
        # command's: silenced while it closes and its garbage is collected.
        logs = [logging.getLogger(name) for name in ("asyncio", "distributed")]
        levels = [log.level for log in logs]
        for log in logs:
            log.setLevel(logging.CRITICAL)
        try:
            self.stack.close()
            gc.collect()
        finally:
            for log, level in zip(logs, levels):
                log.setLevel(level)
            # a leftover still held by the cluster's loop thread is collected at the
            # interpreter's exit, after the window above (the same line reached stderr
            # once more in a loaded test run, 2026-12-08): silenced there too
            atexit.unregister(_silence_asyncio)  # once per process, however many runs
            atexit.register(_silence_asyncio)


def _silence_asyncio():
    """At exit: asyncio's log of futures a closed cluster left unretrieved is not the
    command's (:meth:`_Cluster.__exit__`)."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def _fit_options(args):
    """Keywords of one module's fit; with the joint refinement ``--rank`` is the joint
    subspace's rank, not the modules' (as in :func:`clairstat.lora.refine_adapters`)."""
    options = {"test_level": args.test_level, "random_state": args.random_state,
               "device": args.device, "dtype": args.dtype, "weights": args.sample_weight,
               **{name: value for name, value in (("max_iter", args.max_iter),
                                                  ("tol", args.tol)) if value is not None}}
    return options if args.joint else {**options, "rank": args.rank}


def _solver_settings(args):
    """``{"max_iter", "tol"}`` every module's solver ran with: the options given, else
    the estimator's defaults (the tolerance of a float32 fit scaled to its precision,
    :func:`clairstat.aggregation._modules._with_device`). The report said ``null`` for
    a default, which did not say what ran (a review)."""
    from ._estimator import CLAIREstimator
    from .aggregation._modules import _with_device

    given = {name: value for name, value in (("max_iter", args.max_iter),
                                              ("tol", args.tol)) if value is not None}
    params = {**CLAIREstimator().get_params(), **_with_device(given, None, args.dtype)}
    return {"max_iter": int(params["max_iter"]), "tol": float(params["tol"])}


class Summary(NamedTuple):
    """For the report: ``flagged`` per client, ``module_flagged``, ``p_values`` and
    ``adjusted_p_values`` per module, ``joint_rank`` (None without the joint
    refinement), ``rank_rule`` (the rule of the cross-validation that chose the joint
    rank; None where none ran: ``--rank`` given, ``--per-module``, one fitted module,
    fewer than three collaborative clients), ``module_ranks`` each module's fitted
    rank and ``module_converged`` whether its detection converged (None where it was
    not fitted)."""

    flagged: list
    module_flagged: dict
    p_values: dict
    joint_rank: int | None
    adjusted_p_values: dict
    rank_rule: str | None = None
    module_ranks: dict | None = None
    module_converged: dict | None = None


def _release_memory():
    """Hand the memory of the module just finished back before the next one.

    Arrays caught in reference cycles wait for Python's cyclic collector, whose
    counters count objects, not bytes, and glibc keeps freed heap pages: over a
    224-module run the peak grew to 4.3 GB where one module needs under 1 GB (which of
    the two dominates was not separated). Measured on 4 layers (28 modules) of 50
    clients, first pass: resident anonymous memory 599 -> 682 MiB without this, 247-280
    MiB with it (``benchmarks/RESULTS.md``). A full collection takes under 1 ms with
    the imports frozen (:func:`_imports_frozen`), ``malloc_trim`` a few ms.
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def _modules_of(clients, modules, cluster, function, extra, progress, desc):
    """``function`` on every module in ``modules``, each read just before it is sent;
    ``extra``: its further arguments, a tuple, or a callable of the module's name that
    returns them (only that module's share is sent)."""
    configs = [client.config for client in clients]
    jobs = ((module, ([_read_module(c, module) for c in clients], configs,
                      *(extra(module) if callable(extra) else extra)))
            for module in modules)
    return progress(_run(function, jobs, cluster), total=len(modules), desc=desc)


def _stream(clients, writer, args, progress, cluster):
    """First pass: every module read, fitted and (per-module refinement) written before
    the next is read. Joint refinement: the flags and combinations from the modules'
    Gram matrices, then a second pass that reads and writes every fitted module again."""
    import numpy as np

    from .aggregation import client_flags, joint_refinement
    from .aggregation._modules import check_joint_rank

    work = _work(clients)
    if args.joint and args.rank is not None:  # before the first pass, not after it
        check_joint_rank(args.rank, len(clients))
    fits, messages = {}, []
    for module, fit in _modules_of(clients, clients[0].modules, cluster, fit_module,
                                   (args.n_jobs, work, _fit_options(args), args.joint),
                                   progress, "fits"):
        for k, state in enumerate(fit.states or ()):
            writer.write(k, state)
        fits[module] = fit._replace(states=None)  # keep flags, p-values, Gram matrices
        messages.extend((module, *caught) for caught in fit.warnings)
        del fit
        _release_memory()
    live = [module for module, fit in fits.items() if fit.p_values is not None]
    module_flags = np.reshape([fits[m].flagged for m in live], (len(live), len(clients)))
    joint_rank = rank_rule = None
    if not args.joint:
        flagged = client_flags(module_flags, args.test_level)
    elif not live:  # every module zero: nothing to refine, everyone keeps its own
        flagged = np.zeros(len(clients), dtype=bool)
    else:
        refinement = joint_refinement([fits[m].gram for m in live], module_flags,
                                      weights=args.sample_weight,
                                      rank=args.rank, level=args.test_level,
                                      flagged_updates=args.flagged_updates,
                                      rank_rule=args.rank_rule)
        flagged, joint_rank = refinement.flagged, refinement.rank
        rank_rule = None if refinement.selection is None else refinement.selection.rule
        kept = np.flatnonzero(~flagged).tolist()
        coef = dict(zip(live, refinement.coef))  # per module (flagged updates stood in for)
        if kept:
            for module, (states, caught) in _modules_of(
                    clients, live, cluster, refine_module,
                    lambda m: (args.n_jobs, work, coef[m], kept,
                               _on_device(_fit_options(args))),
                    progress, "refinement"):
                for k, state in states.items():
                    writer.write(k, state)
                messages.extend((module, *record) for record in caught)
                del states
                _release_memory()
    return Summary(np.asarray(flagged, dtype=bool).tolist(),
                   {m: fit.flagged for m, fit in fits.items()},
                   {m: fit.p_values for m, fit in fits.items()}, joint_rank,
                   {m: fit.adjusted_p_values for m, fit in fits.items()},
                   rank_rule, {m: fit.rank for m, fit in fits.items()},
                   {m: fit.converged for m, fit in fits.items()}), messages


# -- running ------------------------------------------------------------------------------
def _progress():
    """``tqdm`` over modules if installed, else one plain line per module on stderr."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _plain_progress

    def bar(iterable, total, desc):
        return tqdm(iterable, total=total, desc=desc, unit="module", file=sys.stderr)
    return bar


def _plain_progress(iterable, total, desc):
    for index, item in enumerate(iterable, start=1):
        print(f"{desc}: module {index}/{total}: {item[0]}", file=sys.stderr, flush=True)
        yield item


def _check_device(device):
    if device is None:
        return
    from ._validation import check_device

    try:
        check_device(device)
    except ValueError as error:  # "device='x': reason" in the command line's words
        reason = str(error).split(": ", 1)[-1].replace("device='cpu'", "--device cpu")
        raise InputError(f"--device {device}: {reason}") from None


def _check_sample_weight(args):
    """``--sample-weight``: one finite, non-negative number per adapter folder, at least
    two positive (the estimator's own check), read into ``args.sample_weight`` (a list of
    floats as given, or None)."""
    if args.sample_weight is None:
        return
    from ._validation import check_sample_weight

    raw = args.sample_weight
    try:
        values = [float(part) for part in raw.split(",")]
    except ValueError:
        raise InputError(f"--sample-weight {raw}: must be numbers separated by commas, "
                         "one per ADAPTER_DIR") from None
    if len(values) != len(args.adapters):
        raise InputError(f"--sample-weight {raw}: {len(values)} weights for "
                         f"{len(args.adapters)} adapter folders (one per ADAPTER_DIR, "
                         "in their order)")
    try:
        check_sample_weight(values, len(values))
    except ValueError as error:
        reason = str(error).replace("sample_weight", "the weights")
        raise InputError(f"--sample-weight {raw}: {reason}") from None
    # as given (the fits normalise them, as refine_adapters' do); the report shows them
    args.sample_weight = values


def _check_options(args):
    _check_device(args.device)
    _check_fit_options(args)
    _check_sample_weight(args)
    if args.workers is not None and args.scheduler != "local":
        # the in-process run (or a cluster's own workers) would ignore it silently
        raise InputError(f"--workers {args.workers}: applies to --scheduler local only")
    if not args.joint and args.flagged_updates is not None:
        raise InputError("--flagged-updates: applies to the joint refinement, not to "
                         "--per-module")
    if args.joint and args.flagged_updates is None:
        from .aggregation._modules import DEFAULT_FLAGGED_UPDATES

        args.flagged_updates = DEFAULT_FLAGGED_UPDATES
    if args.rank_rule is not None and not args.joint:
        raise InputError("--rank-rule: applies to the joint refinement, not to "
                         "--per-module")
    if args.rank_rule is not None and args.rank is not None:
        raise InputError("--rank-rule: chooses the joint rank, which --rank fixes; give "
                         "one of them")
    if args.joint and args.rank is None and args.rank_rule is None:
        from .aggregation._rank import DEFAULT_RANK_RULE

        args.rank_rule = DEFAULT_RANK_RULE


def _check_fit_options(args):
    """The fits' own checks of ``--test-level``, ``--random-state``, ``--rank``
    (``--per-module``) and ``--n-jobs``, run before any input is read or copied into OUT
    (in the fits they came after every adapter was staged) and naming the option. A
    ``--per-module`` rank too large for a module is known only from its shapes: its fit
    says so."""
    from sklearn.utils._param_validation import InvalidParameterError

    from ._estimator import CLAIREstimator
    from ._threads import resolve_n_jobs

    checks = [("--test-level", "test_level", args.test_level),
              ("--random-state", "random_state", args.random_state)]
    checks += [(option, name, value) for option, name, value in (
        ("--max-iter", "max_iter", args.max_iter), ("--tol", "tol", args.tol))
        if value is not None]
    if not args.joint:
        checks.append(("--rank", "rank", args.rank))
    elif args.rank is not None and args.rank < 0:
        raise InputError(f"--rank {args.rank}: must be a non-negative integer")
    for option, name, value in checks:
        try:
            CLAIREstimator(**{name: value})._validate_params()
        except InvalidParameterError as error:
            # sklearn's constraint text without the Python-only alternatives
            detail = str(error).splitlines()[0].split(" must be ", 1)[-1]
            detail = detail.split(", an instance of")[0].split(" or None")[0]
            detail = detail.split(". Got ")[0].rstrip(".")
            raise InputError(f"{option} {value}: must be {detail}") from None
    if args.n_jobs is not None:
        try:
            resolve_n_jobs(args.n_jobs)
        except (ValueError, TypeError) as error:
            raise InputError(f"--n-jobs {args.n_jobs}: {error}") from None


@contextlib.contextmanager
def _imports_frozen():
    """The objects alive before the modules are streamed (the imported modules: about
    250 000 with torch loaded) left out of the cyclic collector's passes until the end.

    :func:`_release_memory` runs a full collection twice per module; it traverses every
    tracked object, so it took 0.16 s with torch loaded (about 60 s of a 224-module run)
    and under 1 ms with them frozen (``gc.freeze``). What the fits allocate stays
    collectable. The modules the fits import are imported first, so that they are
    frozen too; at the end everything is unfrozen and collected once (the command may
    run inside a longer-lived process, as in the tests: a cycle of the caller's that
    became garbage during the run is freed then, not before). Where the process has
    frozen objects already (a caller's own ``gc.freeze``, or a concurrent run in
    another thread), nothing is frozen or unfrozen here: that freeze is the caller's.
    """
    if gc.get_freeze_count() > 0:
        yield
        return
    import importlib.util

    import scipy.sparse.linalg  # noqa: F401  (the fits' imports, frozen with the rest)
    import statsmodels.stats.multitest  # noqa: F401

    from . import aggregation, solvers  # noqa: F401

    if importlib.util.find_spec("torch") is not None:  # the default solver's
        import torch  # noqa: F401
    gc.collect()  # what is garbage now is not frozen
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.collect()


def _refine(clients, writer, args, cluster):
    """The two passes; returns the :class:`Summary` and the fits' warnings, as
    ``(module, category name, message)``."""
    try:
        with _imports_frozen():
            return _stream(clients, writer, args, _progress(), cluster)
    except ClientError as error:  # one client's refined factors: name its folder
        raise InputError(f"{clients[error.client].folder}: "
                         f"{error.message.splitlines()[0]}") from None
    except ValueError as error:  # parameter checks (rank too large, level, n_jobs...)
        message = str(error).splitlines()[0]
        if args.rank is not None and message.startswith("the joint rank"):
            message = f"--rank {args.rank}: {message}"  # the option that set it
        raise InputError(message) from None


def _input_warnings(clients):
    """What the inputs hold that the refinement does not check: tensors that are not
    LoRA factors (copied untested), adapters of different base models."""
    from .lora import untested_keys, untested_warning

    from .lora import init_warning

    names = [client.folder.name for client in clients]
    message = untested_warning([untested_keys(client.shapes) for client in clients], names)
    if message:
        yield message + " (report.json lists them per client)"
    message = init_warning([client.config for client in clients], names)
    if message:
        yield message
    bases = {}
    for client in clients:  # an adapter naming none may be of another model (a review)
        base = client.config.get("base_model_name_or_path")
        bases.setdefault("none named" if base is None else str(base),
                         []).append(client.folder.name)
    if len(bases) > 1:
        listed = "; ".join(f"{base}: {', '.join(folders[:3])}"
                           + (", ..." if len(folders) > 3 else "")
                           for base, folders in bases.items())
        yield (f"the adapters name {len(bases)} base models ({listed}): updates of "
               "different base weights are not comparable unless these name the same "
               "model")


def _report(clients, summary, args):
    from .lora import untested_keys

    entries = []
    for k, client in enumerate(clients):
        entries.append({
            "name": client.folder.name, "input": str(client.folder),
            "flagged": bool(summary.flagged[k]),
            "untested": untested_keys(client.shapes),
            "p_values": {name: None if p is None else p[k]
                         for name, p in summary.p_values.items()},
            # what a module flag compares with the level (a review: raw p-values of
            # 0.007 and 0.010 at level 0.05 beside module_flagged false read as a
            # contradiction); a flag can still differ where the detection cycled
            # (module_detection_converged false)
            "adjusted_p_values": {name: None if p is None else p[k]
                                  for name, p in summary.adjusted_p_values.items()},
            "module_flagged": {name: bool(flags[k])
                               for name, flags in summary.module_flagged.items()}})
    from . import __version__
    return {"clairstat_version": __version__, "joint": bool(args.joint),
            "rank": args.rank, "joint_rank": summary.joint_rank,
            "test_level": args.test_level,
            "flagged_updates": args.flagged_updates if args.joint else None,
            "rank_rule": summary.rank_rule,
            "random_state": args.random_state,
            **_solver_settings(args),  # the values the solvers used, defaults included
            "sample_weight": (None if args.sample_weight is None
                              else [float(w) for w in args.sample_weight]),
            "modules": sorted(summary.module_flagged),
            # each module's fitted rank: with --per-module the rank of its refinement
            "module_ranks": summary.module_ranks,
            # false: the module's detection cycled, and its flags are those of the set
            # it stopped on, not each adjusted p-value's verdict (a review)
            "module_detection_converged": summary.module_converged, "clients": entries}


# -- writing ------------------------------------------------------------------------------
def _check_out(out, raw):
    """``--out`` itself: a folder, or a path where one can be created."""
    if raw == "":
        raise InputError("--out: the path is empty (give . for the current folder)")
    if out.is_symlink() and not out.exists():
        raise InputError(f"--out {out}: a symbolic link to {os.readlink(out)}, which "
                         "does not exist")
    if out.exists():
        if not out.is_dir():
            raise InputError(f"--out {out}: exists and is not a folder")
        return
    ancestor = out.absolute().parent  # the nearest existing folder above it
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"--out {out}: cannot be created, {ancestor} is "
                         + ("a dangling symbolic link" if ancestor.is_symlink()
                            and not ancestor.exists() else "not a folder"))
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: cannot be created, {ancestor} is not writable")


def _check_outputs(folders, out, raw=None):
    """Before any work: every output path can take what will be moved there (so that
    publishing, the last step, does not fail half-way over an existing OUT), and none
    of them is, or leads into, an input.

    OUT may not be an input folder or lie inside one; an existing ``OUT/<name>`` must be
    a folder inside OUT, none an input folder and no two the same (a symbolic link may
    lead elsewhere: one to another client's input made the run overwrite it), its
    ``adapter_model.safetensors`` and ``adapter_config.json`` files, not folders, nor
    the inputs' own files (hard links, as ``cp -al`` makes them).
    """
    _check_out(out, str(out) if raw is None else raw)
    places = {folder.resolve(): folder for folder in folders}
    out_place = out.resolve()
    for place, folder in places.items():
        if place == out_place or place in out_place.parents:
            raise InputError(f"--out {out}: is {'' if place == out_place else 'inside '}"
                             f"the input folder {folder}; choose another --out")
    inputs = {}  # (device, inode) of every input file
    for folder in folders:
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            with contextlib.suppress(OSError):
                info = os.stat(folder / name)
                inputs[(info.st_dev, info.st_ino)] = folder / name
    report = out / REPORT_NAME
    if report.is_dir():  # the run's own output, not a client's (it was blamed on one)
        raise InputError(f"--out {out}: its report {report} exists and is a folder")
    targets = {}
    for folder in folders:
        target = out / folder.name
        blocked = [path for path in (target, target / WEIGHTS_NAME, target / CONFIG_NAME)
                   if path.exists() and path.is_dir() != (path == target)]
        if blocked:
            kind = "a folder" if blocked[0].is_dir() else "a file"
            raise InputError(f"{folder}: its output {blocked[0]} exists and is {kind}")
        if not os.path.lexists(target):
            continue
        if not target.exists():
            raise InputError(f"{folder}: its output {target} is a symbolic link to "
                             f"{os.readlink(target)}, which does not exist")
        place = target.resolve()
        if place == folder.resolve():
            raise InputError(f"{folder}: OUT/{folder.name} is the input folder itself; "
                             "choose another --out")
        inside = [other for other_place, other in places.items()
                  if place == other_place or other_place in place.parents]
        if inside:
            raise InputError(f"{folder}: its output {target} leads into the input folder "
                             f"{inside[0]}; choose another --out")
        if out_place not in place.parents:
            raise InputError(f"{folder}: its output {target} leads to {place}, outside "
                             "--out; remove the link or choose another --out")
        if place in targets:
            raise InputError(f"{folder}: its output {target} is the same folder as "
                             f"{targets[place]}")
        # Outputs are moved into place by renames from a staging folder under OUT: an
        # existing target on another filesystem (a mount point) or not writable would
        # fail after every fit, half-way through publishing (a review).
        if os.stat(target).st_dev != os.stat(out).st_dev:
            raise InputError(f"{folder}: its output {target} is on another filesystem "
                             "than --out (outputs are moved into place by renames)")
        if not os.access(target, os.W_OK | os.X_OK):
            raise InputError(f"{folder}: its output {target} is not writable")
        targets[place] = target
    outputs = [target / name for target in targets.values()
               for name in (WEIGHTS_NAME, CONFIG_NAME)]
    for path in outputs + [out / REPORT_NAME]:
        with contextlib.suppress(OSError):
            info = os.stat(path)
            if (info.st_dev, info.st_ino) in inputs:
                raise InputError(f"{path}: is the input {inputs[info.st_dev, info.st_ino]} "
                                 "itself (a hard or symbolic link to it); remove it or "
                                 "choose another --out")


def _stale_outputs(out, names, inputs=frozenset()):
    """Folders of OUT that hold an adapter but are not among this run's clients (an
    earlier run's), nor one of its inputs (``inputs``, resolved): report.json will not
    list them."""
    if not out.is_dir():
        return []
    return sorted(entry.name for entry in out.iterdir()
                  if entry.name not in names and entry.is_dir()
                  and entry.resolve() not in inputs
                  and not entry.name.startswith(_STAGING_PREFIX)
                  and any((entry / name).exists() for name in (WEIGHTS_NAME, CONFIG_NAME)))


class _Writer:
    """Staged output files: copies of the inputs, refined tensors written in place.

    Every output starts as a byte copy of its input (same header: keys, dtypes, shapes,
    metadata and offsets); :meth:`write` overwrites a tensor's bytes at its offset, so
    nothing but the tensors being written is held in memory.
    """

    def __init__(self, clients, staging):
        self.clients, self.staging = clients, staging
        self.paths = []
        for client in clients:
            target = staging / client.folder.name
            target.mkdir()
            shutil.copyfile(client.weights, target / WEIGHTS_NAME)
            self.paths.append(target / WEIGHTS_NAME)
        self.fds = [os.open(path, os.O_WRONLY) for path in self.paths]

    def write(self, k, state):
        """Write client k's tensors ``{key: tensor}`` (its own keys and dtypes)."""
        import torch

        client = self.clients[k]
        for key, tensor in state.items():
            begin, end = client.offsets[key]
            # The tensor's bytes as safetensors stores them (little-endian, row-major).
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            if tuple(tensor.shape) != client.shapes[key] or data.numel() != end - begin:
                raise RuntimeError(f"{key}: refined tensor {tuple(tensor.shape)} does not "
                                   f"fit {client.shapes[key]}")  # a bug, not an input error
            os.pwrite(self.fds[k], data.numpy().tobytes(), begin)

    def restore(self, k):
        """Client k's output becomes a copy of its input again (a flagged client)."""
        os.close(self.fds[k])
        shutil.copyfile(self.clients[k].weights, self.paths[k])
        self.fds[k] = os.open(self.paths[k], os.O_WRONLY)

    def close(self):
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _publish(clients, staging, report, out):
    """Move the staged files to ``OUT/<folder name>/`` with the configs and the report,
    all or nothing.

    Everything is written into the staging folder first; publishing only renames
    (``os.replace``): a new ``OUT/<name>`` is the staged folder moved, an existing one
    has its two files replaced. A file already at an output path is first moved aside
    into a folder of its own under OUT (a rename, never written through: a hard link to
    an input stays the input's), deleted once every rename has succeeded. If a rename
    fails, or the run is interrupted (Ctrl-C, SIGTERM) while publishing, the renames
    already made are undone in reverse order, so that OUT is as it was; if that undo
    fails too, the folder of the replaced files is kept (its path is in the message)
    and nothing of them is deleted. A failed rename raises :class:`_PublishError`.
    """
    for client in clients:
        shutil.copyfile(client.folder / CONFIG_NAME,
                        staging / client.folder.name / CONFIG_NAME)
    (staging / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n",
                                       encoding="utf-8")
    # its own folder, not one inside the staging folder, whose names are the clients'
    aside = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX + "replaced-", dir=out))
    moves = []  # (source, destination) of every rename made, to undo in reverse

    def move(source, destination):
        os.replace(source, destination)
        moves.append((source, destination))

    def replace(staged, target, slot):
        if os.path.lexists(target):
            slot.parent.mkdir(parents=True, exist_ok=True)
            move(target, slot)
        move(staged, target)

    try:
        for k, client in enumerate(clients):
            name = client.folder.name
            target = out / name
            if not os.path.lexists(target):
                move(staging / name, target)
            else:
                for file in (WEIGHTS_NAME, CONFIG_NAME):
                    replace(staging / name / file, target / file, aside / str(k) / file)
        replace(staging / REPORT_NAME, out / REPORT_NAME, aside / REPORT_NAME)
    except BaseException as error:  # an interrupt too: never leave a path emptied
        undone = True
        for source, destination in reversed(moves):
            try:
                os.replace(destination, source)
            except OSError:
                undone = False
        if undone:
            shutil.rmtree(aside, ignore_errors=True)
        if isinstance(error, OSError):
            raise _PublishError(error, undone, aside) from None
        raise
    shutil.rmtree(aside, ignore_errors=True)


class _PublishError(OSError):
    """A rename of :func:`_publish` failed; ``undone``: OUT was put back as it was;
    ``aside``: the folder of the outputs it replaced (kept when not ``undone``)."""

    def __init__(self, error, undone, aside):
        super().__init__(str(error))
        self.error, self.undone, self.aside = error, undone, aside


_STAGING_PREFIX = ".clairstat-staging-"


def _make_out(out):
    """Create OUT and its missing parents; returns the folders created, deepest first."""
    created, path = [], out.absolute()
    while not os.path.lexists(path):
        created.append(path)
        path = path.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        _remove_created(created)
        raise InputError(f"--out {out}: cannot be created "
                         f"({error.strerror or error})") from None
    return created


def _remove_created(created):
    """Remove what :func:`_make_out` created (OUT with what is in it, then its parents
    where empty)."""
    for k, path in enumerate(created):
        if path.name in (".", ".."):
            continue
        if k == 0:
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.rmdir()


def _stage_and_refine(clients, out, args, cluster):
    """Fit and write through a staging folder under ``out``; on failure nothing stays
    (neither the staging folder nor the OUT and parent folders the run created)."""
    created = _make_out(out)
    done = False
    staging = None
    try:
        try:
            staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=out))
            writer = _Writer(clients, staging)
        except OSError as error:
            raise InputError(f"--out {out}: cannot be written "
                             f"({error.strerror or error})") from None
        try:
            summary, messages = _refine(clients, writer, args, cluster)
            for k, flagged in enumerate(summary.flagged):
                if flagged:
                    writer.restore(k)
        finally:
            writer.close()
        try:
            _publish(clients, staging, _report(clients, summary, args), out)
        except _PublishError as failed:
            state = ("OUT is as it was before the run" if failed.undone else
                     "undoing the renames failed too: OUT may be incomplete, and the "
                     f"outputs it replaced are kept in {failed.aside}")
            raise InputError(f"--out {out}: the outputs could not be moved into place "
                             f"({failed.error}); {state}") from None
        except OSError as error:  # writing the report or a config into the staging
            raise InputError(f"--out {out}: the outputs could not be staged ({error}); "
                             "OUT is as it was before the run") from None
        done = True
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if not done:
            _remove_created(created)
    return summary, messages


def refine_command(args):
    """Run ``clairstat refine``; raises :class:`InputError` for a bad input."""
    # "." or "x/.." name no folder: the resolved path does (outputs go to OUT/<name>)
    folders = [Path(path).resolve() if Path(path).name in ("", ".", "..") else Path(path)
               for path in args.adapters]
    out = Path(args.out)
    # Every warning of the run is shown in the command's format, after the progress
    # bars (a failed run shows only its error).
    with recorded_warnings(run=True) as caught:
        _check_outputs(folders, out, args.out)
        _check_options(args)
        clients = _read_all(folders)
        names = [client.folder.name for client in clients]
        for message in _input_warnings(clients):
            _say(f"clairstat refine: warning: {message}")
        stale = _stale_outputs(out, set(names), {f.resolve() for f in folders})
        leftovers = sorted(p.name for p in out.glob(_STAGING_PREFIX + "*")) \
            if out.is_dir() else []
        if leftovers:
            _say(f"clairstat refine: warning: --out {out} holds {len(leftovers)} staging "
                 f"folder(s) of a run that was killed ({leftovers[0]}"
                 f"{', ...' if len(leftovers) > 1 else ''}): remove them")
        if stale:
            shown = ", ".join(stale[:3]) + (", ..." if len(stale) > 3 else "")
            _say(f"clairstat refine: warning: --out {out} holds {len(stale)} adapter "
                 f"folder(s) of no client of this run ({shown}), left as they are and not "
                 "in report.json (an earlier run's?)")
        with _Cluster(args.scheduler, args.workers) as cluster:  # before copying anything
            summary, messages = _stage_and_refine(clients, out, args, cluster)
    records = messages + [(None, *record) for record in caught]
    for line in _warning_lines(records, names, len(clients[0].modules)):
        _say(f"clairstat refine: warning: {line}")
    flagged = [name for name, f in zip(names, summary.flagged) if f]
    _say(f"refined {len(folders)} adapters into {out}; flagged: "
         f"{', '.join(flagged) if flagged else 'none'}", sys.stdout)
    return 0


#: The signal that interrupted the run (set by :func:`_interrupt`), else None.
_SIGNALLED = None


def _interrupt(signum, frame):
    """SIGINT (Ctrl-C) and SIGTERM (a job scheduler, ``docker stop``) as an interrupt,
    so that a run's cleanup (the staging folder, the folders it created) happens, with
    the signal recorded: torch turns an interrupt raised inside safetensors' reads into
    another error, which the run reported as an unreadable input (a review: 1 in 21
    SIGTERMs blamed a healthy client's file)."""
    global _SIGNALLED
    _SIGNALLED = signum
    raise KeyboardInterrupt


def main(argv=None):
    """Entry point of the ``clairstat`` console script and ``python -m clairstat``.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name (default ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status: 0, or 2 for a usage error or an unusable input, or 128 plus the
        signal's number (130, 143) when SIGINT or SIGTERM interrupted the run (one line
        on stderr, no traceback; the run's cleanup done).
    """
    parser = _parser()
    args = parser.parse_args(argv)  # exits 2 with argparse's usage message on bad usage
    import signal

    global _SIGNALLED
    _SIGNALLED = None
    installed = threading.current_thread() is threading.main_thread()
    # a signal the caller ignores stays ignored (a background job's SIGINT: a review)
    previous = ({number: signal.signal(number, _interrupt)
                 for number in (signal.SIGINT, signal.SIGTERM)
                 if signal.getsignal(number) is not signal.SIG_IGN} if installed else {})
    try:
        return refine_command(args)
    except (Exception, KeyboardInterrupt) as error:
        # an error raised while a signal was being handled is the interrupt's, not the
        # input's (nor a bug's); a KeyboardInterrupt without a signal (raised by hand)
        # is one too
        if _SIGNALLED is not None or isinstance(error, KeyboardInterrupt):
            number = signal.SIGINT if _SIGNALLED is None else _SIGNALLED
            _say(f"clairstat {args.command}: interrupted by {signal.Signals(number).name}")
            return 128 + int(number)  # the shells' status of a process ended by it
        if not isinstance(error, InputError):
            raise
        _say(f"clairstat {args.command}: error: {error}")
        return 2
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)

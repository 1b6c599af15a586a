"""How many threads a fit uses, and one context manager that applies it to every pool.

A CLAIR fit spends its time in torch (the solver's singular value thresholding) and in
numpy/scipy (detection, readouts), i.e. in three thread pools: torch's intra-op pool
(OpenMP + MKL), the OpenBLAS pools of numpy and scipy, and the OpenMP runtimes.
Left alone, each pool starts one thread per core, and their worker threads spin while
waiting: on a shared 2-core machine a small fit beside another numeric job became tens
of times slower on two threads than on one (``benchmarks/concurrency_benchmark.py``,
results in ``benchmarks/RESULTS.md``). Small problems gain nothing from a second thread
even alone (their operations are too short to split), so the policy is:

* ``n_jobs=None``: a size rule (:func:`threads_for_size`), one thread for small problems
  and in a process running below the default priority (``nice``);
* ``n_jobs=-1``: every CPU this process may run on (``os.sched_getaffinity``); ``-2`` all
  but one, and so on (joblib's convention);
* ``n_jobs=k > 0``: exactly ``k`` threads.

On a machine busy with other jobs, one thread was faster at every size measured (up to
svt_flops = 1.3e9): pass ``n_jobs=1`` there.

:func:`thread_limits` applies the choice to torch (``torch.set_num_threads``) and to the
BLAS/OpenMP pools (threadpoolctl) together, and restores both afterwards. Inside it,
:func:`map_in_threads` runs a fit's independent eigenproblems (concentration chains,
the readouts of a joint refinement) on that many Python threads with one BLAS thread
each, which neither spins nor synchronises: with two threads, 10.9 -> 8.4 s on one LoRA
module (benchmarks/RESULTS.md; the leave-one-out refits, also among them then, now run as one
batch of matrix products instead, :meth:`clairstat._reduced.FactoredBlocks.leave_one_out_fits`,
and the per-module readouts one after the other, their products too short to release
the GIL for long: :meth:`clairstat._reduced.FactoredRefined.truncated_svds`). The
environment variables ``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` select OpenBLAS's
kernels and blocking, not its thread count, so they do not interact with this policy.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import numbers
import os
import sys
import threading

__all__ = ["usable_cpus", "svt_flops", "threads_for_size", "resolve_n_jobs",
           "thread_limits", "map_in_threads", "GRAIN_FLOPS"]

#: Work per thread, in flops of one singular value thresholding of the stacked
#: p x (n_clients q) matrix (:func:`svt_flops`), below which a further thread costs more
#: in synchronisation than it saves. Measured on a 2-core machine at a load near 2
#: (``python benchmarks/concurrency_benchmark.py --crossover-only``, benchmarks/RESULTS.md):
#: a second thread slowed ``clair_decompose`` down at 4e7 flops and below, and sped it
#: up at 9e7 to 3.6e8, so two threads start at ``2 * GRAIN_FLOPS`` = 1e8.
GRAIN_FLOPS = 5e7

# The limit set by the innermost active ``thread_limits`` (None outside any).
_ACTIVE = contextvars.ContextVar("clairstat_thread_limit", default=None)
# threadpoolctl's controller costs milliseconds to build (it scans the loaded libraries);
# it is cached and rebuilt only when modules were imported since (new libraries).
_CONTROLLER = {"n_modules": -1, "controller": None}


def usable_cpus():
    """Number of CPUs this process may run on.

    Returns
    -------
    int
        ``len(os.sched_getaffinity(0))`` where available (it honours ``taskset`` and
        container CPU sets), else ``os.cpu_count()``; at least 1.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def _shape(size_hint):
    """``(n_clients, p, q)`` of a shape tuple, an array or a list of (p, q) arrays."""
    if hasattr(size_hint, "shape"):
        shape = tuple(size_hint.shape)
    elif (isinstance(size_hint, (tuple, list)) and size_hint
          and all(isinstance(v, numbers.Integral) for v in size_hint)):
        shape = tuple(int(v) for v in size_hint)
    elif isinstance(size_hint, (tuple, list)) and size_hint:
        first = size_hint[0]
        shape = (len(size_hint), *(first.shape if hasattr(first, "shape") else (len(first),)))
    else:
        raise TypeError(f"size_hint must be a shape (n_clients, p[, q]) or an array, "
                        f"got {type(size_hint).__name__}.")
    if len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) != 3 or min(shape) < 0:
        raise ValueError(f"size_hint must describe (n_clients, p[, q]), got {shape}.")
    return shape


def svt_flops(size_hint):
    """Flops of one singular value thresholding of the stacked p x (n_clients q) matrix.

    The solver's iterations each cost about one such decomposition, ``m n min(m, n)``
    for ``m = p`` and ``n = n_clients q`` (constant factors omitted).

    Parameters
    ----------
    size_hint : tuple of int, array or list of arrays
        Shape ``(n_clients, p, q)`` or ``(n_clients, p)`` of the stacked estimates, or
        the estimates themselves.

    Returns
    -------
    float

    Examples
    --------
    >>> svt_flops((50, 100, 10))  # a 100 x 500 matrix
    5000000.0
    """
    n_clients, p, q = _shape(size_hint)
    wide = n_clients * q
    return float(p) * wide * min(p, wide)


def _niced():
    """Whether the calling thread runs below the default scheduling priority."""
    try:
        return os.getpriority(os.PRIO_PROCESS, 0) > 0
    except (AttributeError, OSError):  # no getpriority (Windows)
        return False


def threads_for_size(size_hint, n_cpus=None):
    """Threads the size rule gives: one per ``GRAIN_FLOPS`` of work, within the CPUs.

    Parameters
    ----------
    size_hint : tuple of int, array, list of arrays, float or None
        A shape or the estimates (see :func:`svt_flops`), or the work in flops itself
        (a number); ``None`` (size unknown) gives one thread.
    n_cpus : int, optional
        Defaults to :func:`usable_cpus`, or 1 in a niced process (Notes).

    Returns
    -------
    int
        ``min(n_cpus, max(1, floor(work / GRAIN_FLOPS)))``.

    Notes
    -----
    A process that runs below the default priority (niceness above 0, e.g. under
    ``nice``) gets one thread whatever the size: it has said it yields to other jobs,
    and a synchronous pool whose threads yield waits for the slowest of them. On two
    cores, the LoRA benchmark's module beside another process's one-thread job took
    6.0 times its time alone on two threads at niceness 10 (61.9 s against 10.4 s) and
    1.2 times on one (``python benchmarks/lora_concurrency.py``, benchmarks/RESULTS.md);
    alone, one thread costs it 7%.

    Examples
    --------
    >>> threads_for_size((50, 100, 10), n_cpus=8)   # 5e6 flops: one thread
    1
    >>> threads_for_size((50, 400, 20), n_cpus=8)   # 1.6e8 flops: three threads
    3
    """
    n_cpus = (1 if _niced() else usable_cpus()) if n_cpus is None else int(n_cpus)
    if size_hint is None:
        return 1
    if isinstance(size_hint, numbers.Real) and not isinstance(size_hint, bool):
        work = float(size_hint)
    else:
        work = svt_flops(size_hint)
    return int(min(n_cpus, max(1, work // GRAIN_FLOPS)))


def resolve_n_jobs(n_jobs, size_hint=None):
    """The number of threads ``n_jobs`` asks for, the scikit-learn way.

    Parameters
    ----------
    n_jobs : int or None
        ``None``: the enclosing :func:`thread_limits`' count if inside one, else the size
        rule (:func:`threads_for_size`). ``-1``: all usable CPUs; ``-k``: all but
        ``k - 1`` (at least one must remain). ``k > 0``: ``k`` threads, at most the
        usable CPUs (more only contend: the pools spin against each other, and an
        OpenMP pool of 10**6 threads ran the process out of memory). ``0`` is invalid.
    size_hint : tuple of int, array, float or None
        Problem size for the rule (see :func:`threads_for_size`).

    Returns
    -------
    int
        At least 1.

    Examples
    --------
    >>> resolve_n_jobs(1)
    1
    >>> resolve_n_jobs(10**6) == usable_cpus()
    True
    >>> resolve_n_jobs(None, (50, 100, 10))
    1
    >>> resolve_n_jobs(-1) == usable_cpus()
    True
    """
    if n_jobs is None:
        active = _ACTIVE.get()
        return active if active is not None else threads_for_size(size_hint)
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, numbers.Integral):
        raise TypeError(f"n_jobs must be an int or None, got {n_jobs!r}.")
    n_jobs = int(n_jobs)
    if n_jobs == 0:
        raise ValueError("n_jobs=0 is invalid: use None, a positive int, or -1 for all CPUs.")
    if n_jobs > 0:
        return min(n_jobs, usable_cpus())
    resolved = usable_cpus() + 1 + n_jobs
    if resolved < 1:
        raise ValueError(f"n_jobs={n_jobs} leaves no CPU of the {usable_cpus()} usable.")
    return resolved


def _torch():
    """torch if installed (imported here, so that its pools exist before they are set).

    Always through ``import``, never ``sys.modules`` directly: a thread that finds torch
    there while another thread is still importing it would get a half-initialised
    module; the import statement waits for the import to finish.
    """
    if "torch" not in sys.modules and importlib.util.find_spec("torch") is None:
        return None
    import torch
    return torch


def _controller():
    """A cached ``threadpoolctl.ThreadpoolController`` over the loaded libraries."""
    from threadpoolctl import ThreadpoolController

    if _CONTROLLER["n_modules"] != len(sys.modules):
        _CONTROLLER["controller"] = ThreadpoolController()
        _CONTROLLER["n_modules"] = len(sys.modules)
    return _CONTROLLER["controller"]


# Some pools' counts belong to the calling thread: OpenMP's, a BLAS built on OpenMP, MKL
# (threadpoolctl sets it through its thread-local API) and torch's intra-op count (which
# also sets the default of threads started later). Others are process-wide: OpenBLAS on
# its own pthreads (the wheels' build) and BLIS. A Dask worker thread or a notebook's
# second thread may run a fit while another runs one. So each thread_limits block sets
# its own thread's pools (restored on exit, in the thread's own nesting order), and
# registers its count for the process-wide pools: these are at the smallest count among
# the threads' innermost blocks (two concurrent fits share the CPUs), and back at the
# counts they had before the first block when the last one exits, whatever the order in
# which blocks of different threads end. Torch's count goes back, when a thread leaves
# its outermost block, to the count found before the first block of any thread.
# Re-entrant: a generator left suspended inside a block may be finalised by the garbage
# collector in a thread that already holds the lock (threadpoolctl allocates under it).
_SHARED_LOCK = threading.RLock()
_BLOCKS = {}  # token -> (thread ident, count), in the order of entry
# Before the first block: each process-wide pool's count (by file) and torch's count.
_ORIGINAL = {"pools": {}, "torch": None}


def _process_wide(lib):
    """Whether a threadpoolctl library controller's count is process-wide."""
    if lib.internal_api == "openblas":
        return getattr(lib, "threading_layer", None) != "openmp"
    return lib.internal_api == "blis"


def _per_thread_pools():
    """The pools whose count is the calling thread's (every pool not process-wide)."""
    controller = _controller()
    return controller.select(filepath=[lib.filepath for lib in controller.lib_controllers
                                       if not _process_wide(lib)])


def _release_openblas():
    """Give up this thread's control of OpenBLAS's process-wide count, if it holds it.

    threadpoolctl (3.8 here) lets only one "controlling" thread change a process-wide
    OpenBLAS pool and silently ignores the others; a block's changes are made under
    ``_SHARED_LOCK`` and release the control after each change, so that the next change
    may come from another thread. Control held by another thread (a user's own
    ``threadpool_limits`` there) is left alone: that limit then stands.
    """
    import threadpoolctl

    release = getattr(getattr(threadpoolctl, "OpenBLASController", None),
                      "clear_controlling_thread", None)
    if release is not None:
        release()


def _wanted_count():
    """The smallest count among the threads' innermost blocks, or None without blocks."""
    innermost = {}
    for ident, count in list(_BLOCKS.values()):  # entry order: a thread's last is its
        innermost[ident] = count                 # innermost
    return min(innermost.values()) if innermost else None


def _enclosing_count(ident):
    """The count of this thread's innermost registered block, or None."""
    counts = [count for owner, count in list(_BLOCKS.values()) if owner == ident]
    return counts[-1] if counts else None


def _set_shared_pools():
    """Apply :func:`_wanted_count` to the process-wide pools (under ``_SHARED_LOCK``);
    their counts before the first change when no block is left.

    A pool's count is recorded only when a change of ours takes effect (re-read after
    setting): a change threadpoolctl ignores, because a user's ``threadpool_limits`` in
    another thread controls OpenBLAS, records nothing, so that the user's temporary
    count is never "restored" after the user's own block has ended. A library loaded
    while blocks run is recorded when first changed, and restored too.
    """
    wanted, originals = _wanted_count(), _ORIGINAL["pools"]
    try:
        for lib in _controller().lib_controllers:
            if not _process_wide(lib):
                continue
            if wanted is None:
                target = originals.get(lib.filepath)
            else:
                target = wanted
            current = lib.num_threads
            if target is None or current is None or current == target:
                continue
            lib.set_num_threads(target)
            if wanted is not None and lib.filepath not in originals \
                    and lib.num_threads == target:
                originals[lib.filepath] = current
    finally:
        _release_openblas()
    if wanted is None:
        originals.clear()


@contextlib.contextmanager
def thread_limits(n_jobs=None, size_hint=None):
    """Run a block with torch's intra-op pool and the BLAS/OpenMP pools at one count.

    Parameters
    ----------
    n_jobs : int or None, default=None
        See :func:`resolve_n_jobs`. ``None`` inside an enclosing ``thread_limits`` keeps
        the enclosing count (so a library call does not override its caller's choice).
    size_hint : tuple of int, array, float or None
        For ``n_jobs=None``: the shape ``(n_clients, p, q)`` of the stacked estimates,
        the estimates themselves, or the work in flops (see :func:`threads_for_size`).

    Yields
    ------
    int
        The number of threads asked for (the block's own count).

    Notes
    -----
    OpenMP's count, a BLAS built on OpenMP and MKL (threadpoolctl's thread-local API)
    belong to the calling thread: set for the block and restored on exit. OpenBLAS on
    pthreads (the wheels' build) and BLIS are process-wide: blocks entered from several
    Python threads at once (a Dask cluster of threads, ``clairstat refine --scheduler
    local``) are counted together, those pools set to the smallest count among the
    threads' innermost blocks, and their counts before the first block restored when
    the last one exits, in whatever order the blocks end, also after an exception or a
    generator closed from another thread (which unregisters the block and leaves the
    per-thread settings to the thread that entered it). A limit a user's own
    ``threadpoolctl.threadpool_limits`` holds in another thread stands (threadpoolctl
    lets only the thread that set OpenBLAS's count change it): the block's change is
    ignored, not retried when the user's block ends, and the user's temporary count is
    never restored as the original. Torch's intra-op count is set in the calling thread
    and is also the default of threads started later: a thread leaving its outermost
    block sets it back to the count found before the first block of any thread, also a
    thread that had a count of its own before its block. Where OpenMP alone was limited
    (by threadpoolctl), torch's default for later threads becomes the count torch read
    then, as torch cannot unset it. (An earlier version, each block restoring the
    counts it found on entry, left the pools at another block's count when two
    overlapping blocks ended out of order.) Torch's inter-op pool is left alone: it can
    be sized only once, before first use, and the fits run no inter-op parallel work.

    Examples
    --------
    >>> with thread_limits(None, (50, 100, 10)) as n_threads:
    ...     n_threads
    1
    """
    n_threads = resolve_n_jobs(n_jobs, size_hint)
    if _ACTIVE.get() == n_threads:
        # Already in force (an enclosing block, or the block a worker of
        # :func:`map_in_threads` runs in): the pools are not touched, so that workers
        # never change process-wide settings while another thread computes.
        yield n_threads
        return
    torch = _torch()
    ident, entered_in = threading.get_ident(), threading.current_thread()
    # Torch's count is read before threadpoolctl changes its OpenMP runtime (torch reads
    # its count from OpenMP; its MKL count follows torch.set_num_threads only), and in
    # every thread: torch initialises a thread's count from its process-wide default at
    # the thread's first query, which would undo a count set before it. threadpoolctl
    # records the pools before torch changes them; on the way out it restores them
    # first, and torch is set after it.
    current = torch.get_num_threads() if torch is not None else None
    own = contextlib.ExitStack()
    own.enter_context(_per_thread_pools().limit(limits=n_threads))
    block = object()
    try:
        with _SHARED_LOCK:
            if not _BLOCKS:
                _ORIGINAL["torch"] = current
            _BLOCKS[block] = (ident, n_threads)
            _set_shared_pools()
    except BaseException:
        with _SHARED_LOCK:
            _BLOCKS.pop(block, None)
        own.close()
        raise
    token = _ACTIVE.set(n_threads)
    try:
        if torch is not None:
            torch.set_num_threads(n_threads)
        yield n_threads
    finally:
        # The Thread object, not its ident: a thread's ident is reused once it has ended.
        here = threading.current_thread() is entered_in
        if here:
            with contextlib.suppress(ValueError):  # a token of another context
                _ACTIVE.reset(token)
        with _SHARED_LOCK:
            _BLOCKS.pop(block, None)
            back = _enclosing_count(ident)
            _set_shared_pools()
        if here:
            # This thread's own pools: threadpoolctl's first (OpenMP, MKL), then torch,
            # whose count reads OpenMP's and whose default threads started later take:
            # the enclosing block's count, else the one a map_in_threads worker
            # inherits, else the count before the first block of any thread.
            own.close()
            if torch is not None:
                for target in (back, _ACTIVE.get(), _ORIGINAL["torch"]):
                    if target is not None:
                        torch.set_num_threads(target)
                        break
        else:
            # Closed from another thread (a generator suspended in the block): only the
            # registry and the process-wide pools are that thread's business; the
            # per-thread settings belong to the thread that entered.
            own.pop_all()


def map_in_threads(function, items):
    """``[function(item) for item in items]`` on the threads the enclosing block allows.

    Inside :func:`thread_limits` with ``n`` threads, the calls run on ``n`` Python
    threads with one BLAS/torch thread each (set once, here, for the whole map: numpy
    and scipy release the GIL in their kernels); outside one, or with one thread,
    they run in order in the caller's thread. Results come back in the order of
    ``items``; the calls must be independent (no shared state they write). An error
    is raised when its call's turn in ``items`` comes, and the calls not started by
    then are cancelled. Used where a fit has many independent eigenproblems of the
    same size (the robust start's chains, each client's readout of a joint
    refinement), which one BLAS thread each runs faster than two threads one after
    the other, as long as each call spends most of its time in kernels that release
    the GIL.

    Parameters
    ----------
    function : callable
    items : iterable

    Returns
    -------
    list
    """
    from concurrent.futures import ThreadPoolExecutor

    items = list(items)
    n_threads = min(_ACTIVE.get() or 1, len(items))
    if n_threads <= 1:
        return [function(item) for item in items]
    with thread_limits(1):
        # The per-thread pools (OpenMP, MKL, a BLAS on OpenMP): each worker sets its own
        # (the process-wide ones were set just above; torch's process-wide default is 1
        # now, which a worker's first query takes).
        per_thread = _per_thread_pools()

        def run(item):
            with per_thread.limit(limits=1):
                return function(item)

        contexts = [contextvars.copy_context() for _ in items]  # each carries the limit 1
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            futures = [pool.submit(context.run, run, item)
                       for context, item in zip(contexts, items)]
            try:
                return [future.result() for future in futures]
            except BaseException:
                # The first error (in items' order) is raised as soon as it is reached;
                # the calls not yet started are cancelled rather than run for nothing.
                for future in futures:
                    future.cancel()
                raise

"""Tests of clairstat._threads: the thread-count rule and the context manager."""

import os
import threading

import numpy as np
import pytest

from clairstat import CLAIREstimator, clair_decompose
from clairstat._threads import (GRAIN_FLOPS, resolve_n_jobs, svt_flops, thread_limits,
                                threads_for_size, usable_cpus)
from clairstat.datasets import make_low_rank_block_sparse

torch = pytest.importorskip("torch")
threadpoolctl = pytest.importorskip("threadpoolctl")
from clairstat.solvers import TorchSolver  # noqa: E402  (needs torch)

EPS = np.finfo(np.float64).eps


def pool_counts():
    """Torch's intra-op count and the count of every BLAS/OpenMP pool threadpoolctl sees,
    except single-threaded builds (threading layer "disabled", e.g. the OpenBLAS that
    SCS bundles), which stay at 1 whatever is asked."""
    info = threadpoolctl.threadpool_info()
    return torch.get_num_threads(), [i["num_threads"] for i in info
                                     if i.get("threading_layer") != "disabled"]


@pytest.fixture(autouse=True)
def four_cpus(monkeypatch):
    """Four usable CPUs, so that the 3 threads the tests set are not capped to a 2-core
    machine's 2 (resolve_n_jobs never gives more threads than usable CPUs)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)


@pytest.fixture
def two_threads():
    """Every pool at 2 threads (a state distinct from the 1 and 3 set in the tests)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threadpoolctl.threadpool_limits(limits=2):
            yield
    finally:
        torch.set_num_threads(before)


# -- the rule ---------------------------------------------------------------------------
def test_usable_cpus_follows_the_affinity_mask():
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count())
    assert usable_cpus() == expected >= 1


def test_tiny_problems_get_one_thread_whatever_the_cpus():
    for shape in [(50, 100, 10), (5, 3, 2), (40, 30)]:
        assert threads_for_size(shape, n_cpus=64) == 1
    assert threads_for_size(None, n_cpus=64) == 1  # size unknown


def test_rule_gives_one_thread_per_grain_within_the_cpus():
    assert threads_for_size(2 * GRAIN_FLOPS, n_cpus=8) == 2
    assert threads_for_size(2 * GRAIN_FLOPS - 1, n_cpus=8) == 1
    assert threads_for_size(1e15, n_cpus=8) == 8
    assert threads_for_size(1e15, n_cpus=1) == 1


def test_size_hint_forms_agree():
    estimates = np.zeros((50, 400, 20))
    assert svt_flops((50, 400, 20)) == svt_flops(estimates) == svt_flops(list(estimates))
    assert svt_flops((50, 400, 20)) == 400 * 1000 * 400
    assert svt_flops((50, 400)) == svt_flops((50, 400, 1))
    with pytest.raises(ValueError):
        svt_flops((50, 400, 20, 3))
    with pytest.raises(TypeError):
        svt_flops("big")


def test_n_jobs_minus_one_is_every_usable_cpu(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 5}, raising=False)
    assert usable_cpus() == 5
    assert resolve_n_jobs(-1) == 5
    assert resolve_n_jobs(-2) == 4  # joblib's convention: all but one
    assert resolve_n_jobs(-5) == 1
    assert resolve_n_jobs(3) == 3
    assert resolve_n_jobs(6) == 5  # never more threads than usable CPUs
    assert resolve_n_jobs(10**6) == 5
    assert resolve_n_jobs(None, (50, 100, 10)) == 1
    with pytest.raises(ValueError, match="leaves no CPU"):
        resolve_n_jobs(-6)


@pytest.mark.parametrize("n_jobs, error", [(0, ValueError), (1.5, TypeError),
                                           (True, TypeError), ("2", TypeError)])
def test_invalid_n_jobs_raise(n_jobs, error):
    with pytest.raises(error):
        resolve_n_jobs(n_jobs)
    with pytest.raises(error):
        with thread_limits(n_jobs):
            pass


# -- the context manager ----------------------------------------------------------------
@pytest.mark.parametrize("n_jobs", [1, 3])
def test_context_sets_and_restores_torch_and_threadpoolctl(two_threads, n_jobs):
    torch_before, pools_before = pool_counts()
    assert torch_before == 2 and set(pools_before) == {2}
    with thread_limits(n_jobs) as n_threads:
        assert n_threads == n_jobs
        torch_inside, pools_inside = pool_counts()
        assert torch_inside == n_jobs and set(pools_inside) == {n_jobs}
    assert pool_counts() == (torch_before, pools_before)


def test_context_restores_after_an_exception(two_threads):
    before = pool_counts()
    with pytest.raises(RuntimeError):
        with thread_limits(1):
            raise RuntimeError("inside")
    assert pool_counts() == before


def test_none_inside_a_context_keeps_the_enclosing_count(two_threads):
    with thread_limits(3):
        with thread_limits(None, (50, 100, 10)) as inner:  # the rule alone would give 1
            assert inner == 3 and pool_counts()[0] == 3
        with thread_limits(1) as explicit:  # an explicit count still applies
            assert explicit == 1 and pool_counts()[0] == 1
        assert pool_counts()[0] == 3
    assert pool_counts()[0] == 2


class RecordingSolver(TorchSolver):
    """The torch solver, recording the pools' counts while it solves."""

    def solve(self, problem, init=None):
        self.counts = pool_counts()
        return super().solve(problem, init=init)


@pytest.mark.parametrize("n_jobs, expected", [(None, 1), (1, 1), (3, 3)])
def test_clair_decompose_solves_under_n_jobs(two_threads, n_jobs, expected):
    data = make_low_rank_block_sparse(20, 10, 3, 2, 3, noise_level=0.1, random_state=0)
    solver = RecordingSolver()
    clair_decompose(data.local_estimates, solver=solver, n_jobs=n_jobs)
    assert solver.counts[0] == expected and set(solver.counts[1]) == {expected}
    assert pool_counts()[0] == 2  # restored


def test_refine_adapters_rejects_invalid_n_jobs():
    from clairstat.lora import refine_adapters

    rng = np.random.default_rng(0)
    states = [{"m.lora_A.weight": rng.standard_normal((2, 6)),
               "m.lora_B.weight": rng.standard_normal((5, 2))} for _ in range(4)]
    with pytest.raises(ValueError, match="n_jobs=0"):
        refine_adapters(states, n_jobs=0)


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_fit_inside_equals_fit_outside(two_threads, n_jobs):
    """A thread count changes only the summation order inside BLAS/LAPACK calls.

    The solver's iterations compose backward-stable dense kernels (relative error at
    most about ``m eps`` for the m = max(p, q n_clients) terms of a product, Higham's
    gamma_m) with nonexpansive proximal steps, so two runs differ by at most about
    ``n_iter * m * eps`` of the arrays' scale while no discrete decision (restart, rank,
    flag) flips; the flags and iteration counts are checked equal. The objectives are
    compared through the solver's certificate: each is within its duality gap of the
    optimum, so they differ by at most the sum of the two gaps.
    """
    # (50, 100, 10): large enough that the BLAS/LAPACK kernels split work across threads
    # (the two fits differ in the last bits), small enough for a unit test.
    data = make_low_rank_block_sparse(50, 100, 10, 3, 10, noise_level=0.1, random_state=0)
    outside = CLAIREstimator(solver="torch", random_state=0).fit(data.local_estimates)
    with thread_limits(n_jobs):
        inside = CLAIREstimator(solver="torch", random_state=0).fit(data.local_estimates)
    assert inside.n_iter_ == outside.n_iter_
    np.testing.assert_array_equal(inside.contaminated_, outside.contaminated_)
    assert abs(inside.objective_ - outside.objective_) <= inside.dual_gap_ + outside.dual_gap_
    width = max(data.local_estimates.shape[1],
                data.local_estimates.shape[0] * data.local_estimates.shape[2])
    bound = outside.n_iter_ * width * EPS
    for name in ("low_rank_", "sparse_", "backbone_", "refined_", "p_values_"):
        expected = getattr(outside, name)
        scale = max(np.max(np.abs(expected)), 1.0)
        np.testing.assert_allclose(getattr(inside, name), expected, rtol=0,
                                   atol=bound * scale, err_msg=name)


# -- independent work on several threads -------------------------------------------------
def test_map_in_threads_keeps_order_and_leaves_the_pools_alone(two_threads):
    """Results in the items' order; inside the map every pool is at one thread and the
    workers' own thread_limits(1) blocks change nothing (no process-wide setting is
    touched while another worker computes); afterwards the enclosing count is back."""
    from clairstat._threads import map_in_threads

    seen = []

    def work(item):
        with thread_limits(1) as inner:
            seen.append((inner, pool_counts()))
        return item ** 2

    with thread_limits(2):
        assert map_in_threads(work, range(7)) == [i ** 2 for i in range(7)]
        assert pool_counts()[0] == 2 and set(pool_counts()[1]) == {2}
    assert all(inner == 1 and counts[0] == 1 and set(counts[1]) == {1}
               for inner, counts in seen)
    assert map_in_threads(work, []) == []  # outside any block: in order, in this thread


def test_lora_fit_on_two_threads_equals_one_thread():
    """The leave-one-out refits and concentration chains on two Python threads give the
    one-thread fit: same flags, p-values within the certified eigensolvers' round-off
    (each refit's basis is certified to ~1e3 eps over its eigengap; the statistics move
    by as little, 1e-8 relative is a wide margin)."""
    from clairstat.lora import refine_adapters

    rng = np.random.default_rng(3)
    shared = np.linalg.qr(rng.standard_normal((120, 2)))[0]
    states = []
    for client in range(24):
        b_mat = shared @ rng.standard_normal((2, 4)) + 0.05 * rng.standard_normal((120, 4))
        if client < 3:
            b_mat = rng.standard_normal((120, 4))
        states.append({"m.lora_A.weight": rng.standard_normal((4, 110)) / 10,
                       "m.lora_B.weight": b_mat})
    one = refine_adapters(states, joint=False, n_jobs=1, random_state=0)
    two = refine_adapters(states, joint=False, n_jobs=2, random_state=0)
    np.testing.assert_array_equal(np.asarray(one.flagged), np.asarray(two.flagged))
    assert np.asarray(one.flagged)[:3].all()
    p_one, p_two = (fit.estimators["m"].p_values_ for fit in (one, two))
    np.testing.assert_allclose(p_two, p_one, rtol=1e-8, atol=1e-300)


def _overlapping(first_count, second_count):
    """Two threads' blocks that overlap and end out of order: the first enters first and
    leaves first. Returns each thread's pool_counts() while both run (first) and while
    the second runs alone."""
    entered_a, entered_b, a_done = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with thread_limits(first_count):
            entered_a.set()
            entered_b.wait(10)
            seen["both"] = pool_counts()
        a_done.set()

    def second():
        entered_a.wait(10)
        with thread_limits(second_count):
            entered_b.set()
            a_done.wait(10)
            seen["alone"] = pool_counts()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    return seen


def test_overlapping_blocks_of_two_threads_share_and_restore_the_pools():
    """Two threads' blocks that overlap and end out of order (a Dask cluster of threads
    running two fits): while both run, every pool the first thread sees is at the
    smaller count; the second, alone, sees its own; after the last ends, the counts
    found before. (The earlier implementation, each block setting and restoring the
    pools on its own, fails it: threadpoolctl ignored the second thread's OpenBLAS
    change, and the restores crossed.) No fixture: a threadpool_limits context held by
    this thread would keep OpenBLAS's count (the next test)."""
    before = pool_counts()
    seen = _overlapping(1, 3)
    assert seen["both"][0] == 1 and set(seen["both"][1]) == {1}
    assert seen["alone"][0] == 3 and set(seen["alone"][1]) == {3}
    assert pool_counts() == before
    # A thread started afterwards gets the torch count of before, not a block's.
    fresh = []
    thread = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert fresh == [before[0]]


def test_a_users_limit_held_in_another_thread_stands():
    """A user's threadpool_limits(1) in this thread while a fit's block asks for 3 in
    another: OpenBLAS stays at the user's 1 (threadpoolctl's controlling thread), and
    everything is as before afterwards."""
    before = pool_counts()
    seen = []
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        def fit():
            with thread_limits(3):
                seen.append(threadpoolctl.threadpool_info())
        thread = threading.Thread(target=fit)
        thread.start()
        thread.join(20)
        blas = [i["num_threads"] for i in seen[0] if i["internal_api"] == "openblas"
                and i.get("threading_layer") == "pthreads"]
        assert blas and set(blas) == {1}
    assert pool_counts() == before


def test_a_block_closed_from_another_thread_leaves_nothing_behind():
    """A generator suspended inside thread_limits and closed from another thread: the
    registry and the pools are restored although its context variable cannot be."""
    from clairstat import _threads

    before = pool_counts()

    def suspended():
        with thread_limits(1):
            yield

    generator = suspended()
    holder = threading.Thread(target=lambda: next(generator))
    holder.start()
    holder.join()
    closer = threading.Thread(target=generator.close)
    closer.start()
    closer.join()
    assert not _threads._BLOCKS
    assert pool_counts()[1] == before[1]


@pytest.mark.parametrize("joint", [False, True])
def test_readouts_on_two_threads_equal_one_thread(joint):
    """The clients' rank-r readouts (Lanczos per client, one BLAS thread each on two
    Python threads with n_jobs=2) give the one-thread adapters. Modules of 160 = 40 x 4
    reduced columns, so the readouts take the Lanczos route (dim >= 100); both runs
    converge to machine precision, so the refined updates B A agree to round-off (the
    top-4 values are separated from the 5th, so the rank-4 product is well defined;
    1e-9 relative leaves a wide margin over the ~1e-14 seen)."""
    from clairstat.lora import refine_adapters

    rng = np.random.default_rng(11)
    shared = np.linalg.qr(rng.standard_normal((150, 2)))[0]
    states = []
    for client in range(40):
        state = {}
        for module in ("a", "b"):
            b_mat = shared @ rng.standard_normal((2, 4)) + 0.05 * rng.standard_normal((150, 4))
            if client < 4:
                b_mat = rng.standard_normal((150, 4))
            state[f"{module}.lora_A.weight"] = rng.standard_normal((4, 140)) / 10
            state[f"{module}.lora_B.weight"] = b_mat
        states.append(state)
    one = refine_adapters(states, joint=joint, n_jobs=1, random_state=0)
    two = refine_adapters(states, joint=joint, n_jobs=2, random_state=0)
    np.testing.assert_array_equal(np.asarray(one.flagged), np.asarray(two.flagged))
    for first, second in zip(one.state_dicts, two.state_dicts):
        for module in ("a", "b"):
            update = [np.asarray(s[f"{module}.lora_B.weight"]) @ np.asarray(
                s[f"{module}.lora_A.weight"]) for s in (first, second)]
            assert np.linalg.norm(update[1] - update[0]) <= 1e-9 * np.linalg.norm(update[0])


def test_a_block_leaves_torchs_default_for_new_threads_as_it_was():
    """torch.set_num_threads also sets the count threads started later begin with: a
    block in this thread must leave that default as it found it. (A version that read
    torch's count after threadpoolctl had set OpenMP's recorded the block's own count
    as the one to restore, and new threads then started with 1.)"""
    def new_thread_count():
        out = []
        thread = threading.Thread(target=lambda: out.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        return out[0]

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        default = new_thread_count()
        with thread_limits(1):
            pass
        assert new_thread_count() == default == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_users_temporary_limit_is_not_restored_as_the_original():
    """A user's threadpool_limits(3) held in another thread when a block starts (the
    block's own change is then ignored) and ended before the block ends: afterwards
    OpenBLAS is at the count of before, not the user's temporary 3."""
    before = pool_counts()
    holding, block_started, user_done = (threading.Event(), threading.Event(),
                                         threading.Event())

    def user():
        with threadpoolctl.threadpool_limits(limits=3, user_api="blas"):
            holding.set()
            block_started.wait(10)
        user_done.set()

    thread = threading.Thread(target=user)
    thread.start()
    holding.wait(10)
    with thread_limits(1):
        block_started.set()
        user_done.wait(10)
    thread.join(10)
    assert pool_counts() == before


def test_a_block_finalised_while_the_registry_is_locked_does_not_deadlock():
    """A generator suspended inside a block and finalised (here: closed) by a thread
    that already holds the registry's lock, as the garbage collector may do while
    threadpoolctl allocates under it: the lock is re-entrant, the block unregisters."""
    from clairstat import _threads

    def suspended():
        with thread_limits(1):
            yield

    def run():
        generator = suspended()
        next(generator)
        with _threads._SHARED_LOCK:
            generator.close()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive()
    assert not _threads._BLOCKS


def test_map_in_threads_stops_starting_calls_after_an_error():
    """An error in one call is raised, and the calls not started yet are cancelled (the
    former map ran all of them first: 40 here)."""
    import time

    from clairstat._threads import map_in_threads

    started = []

    def work(item):
        started.append(item)
        if item == 0:
            raise RuntimeError("first")
        time.sleep(0.05)
        return item

    with thread_limits(2):
        with pytest.raises(RuntimeError, match="first"):
            map_in_threads(work, range(40))
    assert len(started) < 10


def test_a_niced_process_gets_one_thread_by_default(monkeypatch):
    """Below the default priority the size rule gives one thread (a pool whose threads
    yield to other jobs waits for the slowest); an explicit CPU count or n_jobs stands."""
    import clairstat._threads as threads

    big = 1e15
    monkeypatch.setattr(threads, "usable_cpus", lambda: 4)
    monkeypatch.setattr(threads.os, "PRIO_PROCESS", 0, raising=False)  # absent on Windows
    monkeypatch.setattr(threads.os, "getpriority", lambda which, who: 0, raising=False)
    assert threads_for_size(big) == 4 and resolve_n_jobs(None, big) == 4
    monkeypatch.setattr(threads.os, "getpriority", lambda which, who: 10, raising=False)
    assert threads_for_size(big) == 1 and resolve_n_jobs(None, big) == 1
    assert threads_for_size(big, n_cpus=4) == 4 and resolve_n_jobs(2) == 2

    def unavailable(which, who):
        raise OSError("no priority here")

    monkeypatch.setattr(threads.os, "getpriority", unavailable, raising=False)
    assert threads_for_size(big) == 4

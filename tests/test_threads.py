"""Determinism: 1 thread and 2 threads give bit-identical results (fixed partitions, fixed
reduction order), repeated calls are identical, and concurrent calls from Python threads (the GIL
is released) equal sequential ones."""

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fusedlstm
from helpers import make_problem


@pytest.fixture
def restore_threads():
    n = fusedlstm.get_num_threads()
    yield
    fusedlstm.set_num_threads(n)


def run(p, up):
    out, h, c, cache = fusedlstm.lstm_forward(**p)
    return (out, h, c) + tuple(fusedlstm.lstm_backward(cache, **up))


# Shapes big enough to split into several row tasks (whole sequences; R in L2, or beyond it
# with 4+ row blocks), unit tasks (per step: B <= 16 with H > 181) and GEMM tiles.
@pytest.mark.parametrize(
    "shape", [(4, 4, 64, 16), (9, 5, 300, 130), (260, 3, 20, 70), (40, 3, 8, 200), (16, 5, 30, 200)]
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_thread_count_does_not_change_results(rng, restore_threads, shape, dtype):
    p, up = make_problem(rng, *shape, dtype=dtype, lengths="random")
    fusedlstm.set_num_threads(1)
    one = run(p, up)
    fusedlstm.set_num_threads(2)
    two = run(p, up)
    again = run(p, up)
    for a, b, c in zip(one, two, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(b, c)


def test_results_do_not_depend_on_array_alignment(rng):
    """The same values at different byte offsets give bit-identical results."""
    p, up = make_problem(rng, 3, 5, 7, 19, dtype=np.float32, lengths="random")
    base = run(p, up)
    for offset in (1, 3, 5):
        q = {}
        for k, v in p.items():
            if isinstance(v, np.ndarray) and v.dtype.kind == "f":
                buf = np.empty(v.size + 16, v.dtype)
                w = buf[offset : offset + v.size].reshape(v.shape)
                w[...] = v
                v = w
            q[k] = v
        for a, b in zip(base, run(q, up)):
            np.testing.assert_array_equal(a, b)


def test_concurrent_calls_equal_sequential(rng, restore_threads):
    fusedlstm.set_num_threads(2)
    problems = [make_problem(rng, 6, 8, 10, 24, dtype=np.float32, lengths="random") for _ in range(8)]
    expected = [run(p, up) for p, up in problems]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda pu: run(*pu), problems * 3))
    for i, res in enumerate(got):
        for a, b in zip(res, expected[i % len(problems)]):
            np.testing.assert_array_equal(a, b)


def test_thread_setting(restore_threads):
    fusedlstm.set_num_threads(1)
    assert fusedlstm.get_num_threads() == 1
    assert fusedlstm.build_info()["num_threads"] == 1
    with pytest.raises(ValueError, match="n must be >= 1"):
        fusedlstm.set_num_threads(0)
    with pytest.raises(TypeError):
        fusedlstm.set_num_threads(1.5)


def test_build_info():
    info = fusedlstm.build_info()
    for key in ("version", "compiler", "simd", "openmp", "num_threads", "native"):
        assert key in info
    assert info["version"] == fusedlstm.__version__


def test_fma_peak_probe():
    """The benchmark's ceiling probe runs and checks its argument (its speed is not asserted)."""
    from fusedlstm import _core

    assert _core.fma_peak_gflops(1, 0.01) > 0
    with pytest.raises(ValueError, match="threads must be >= 1"):
        _core.fma_peak_gflops(0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_a_forked_child_runs_parallel_calls(rng, restore_threads):
    """The worker pool's threads do not survive fork(): a child forked after they started must
    still finish parallel calls (on a pool of its own), with the same results."""
    fusedlstm.set_num_threads(2)
    p, up = make_problem(rng, 64, 20, 30, 128, dtype=np.float32, lengths="random")
    want = run(p, up)
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 when its results are the parent's
        try:
            got = run(p, up)
            os._exit(0 if all(np.array_equal(a, b) for a, b in zip(want, got)) else 3)
        except BaseException:
            os._exit(4)
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            pytest.fail("the forked child hung")
        time.sleep(0.05)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


def _pool_workers_allowed_cpus():
    """{tid: allowed CPUs} of this process's kernel pool workers (threads named fusedlstm-pool)."""
    found = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() != "fusedlstm-pool":
                    continue
            found[int(tid)] = os.sched_getaffinity(int(tid))
        except OSError:  # the thread ended meanwhile
            continue
    return found


@pytest.mark.skipif(
    not os.path.isdir("/proc/self/task") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux's /proc and at least two allowed CPUs",
)
def test_pool_workers_stay_off_the_callers_core(rng, restore_threads):
    """Wherever the calling thread runs, the pool's workers are kept off its core (re-pinned when
    the caller moves): sharing it, a step's barrier waits on a time slice. The results stay the
    ones of one thread."""
    fusedlstm.set_num_threads(2)
    p, _ = make_problem(rng, 1, 30, 64, 256, dtype=np.float32)
    prep = fusedlstm.prepare(p["kernel"], p["recurrent_kernel"], p["bias"])
    want = prep.infer(p["x"])
    allowed = os.sched_getaffinity(0)
    try:
        for cpu in sorted(allowed)[:2]:
            os.sched_setaffinity(0, {cpu})  # this thread only
            got = prep.infer(p["x"])
            workers = _pool_workers_allowed_cpus()
            assert workers, "no fusedlstm-pool thread found"
            for tid, cpus in workers.items():
                assert cpu not in cpus and cpus, (tid, cpu, cpus)
            for a, b in zip(got, want):
                np.testing.assert_array_equal(a, b)
    finally:
        os.sched_setaffinity(0, allowed)

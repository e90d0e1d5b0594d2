"""How the benchmark times: calls per sample, interleaved samples whose order rotates every
repetition, waiting for a process's thread pools to go quiet, and the machine's float32 peaks
(register-only FMA loop, BLAS GEMM) measured in the same run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = [
    "MIN_SAMPLE_S",
    "SETTLE_S",
    "IDLE_WAIT_S",
    "calls_per_sample",
    "sample",
    "interleave",
    "summarize",
    "time_interleaved",
    "cpu_ticks",
    "wait_idle",
    "fma_peak",
    "gemm_rate",
]

MIN_SAMPLE_S = 0.005  # a sample repeats a fast call until it lasts this long (timer noise)
# After a sample its worker's thread pools go on spinning (libgomp for milliseconds, OpenBLAS
# for tens of them), stealing cores from whatever runs next: the parent waits until the worker
# uses no more CPU (its threads' clock ticks stand still for SETTLE_S), at most IDLE_WAIT_S.
SETTLE_S = 0.02
IDLE_WAIT_S = 1.0


def calls_per_sample(f: Callable[[], object], warmup: int) -> int:
    """Warm f up, then how many back-to-back calls make one sample last MIN_SAMPLE_S."""
    for _ in range(warmup):
        f()
    t0 = time.perf_counter()
    f()
    return max(1, int(MIN_SAMPLE_S / max(time.perf_counter() - t0, 1e-7)))


def sample(f: Callable[[], object], number: int) -> float:
    """Seconds per call over `number` back-to-back calls."""
    t0 = time.perf_counter()
    for _ in range(number):
        f()
    return (time.perf_counter() - t0) / number


def interleave(samplers: dict[str, Callable[[], float]], reps: int, budget_s: float) -> dict[str, list[float]]:
    """One sample of each sampler per repetition, the order rotating so that the machine's drift
    hits all alike; stops after `reps`, or once past `budget_s` with at least three each."""
    names = list(samplers)
    times: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(reps):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(samplers[n]())
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return times


def summarize(seconds: list[float], number: int) -> dict:
    return {
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "reps": len(seconds),
        "calls_per_sample": number,
    }


def time_interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int, budget_s: float) -> dict:
    """Median/min seconds per call for each in-process fn, samples interleaved (see interleave)."""
    number = {n: calls_per_sample(f, warmup) for n, f in fns.items()}
    times = interleave({n: (lambda f=f, k=number[n]: sample(f, k)) for n, f in fns.items()}, reps, budget_s)
    return {n: summarize(v, number[n]) for n, v in times.items()}


def cpu_ticks(pid: int) -> int:
    """CPU clock ticks used so far by all the threads of process `pid` (-1 without /proc)."""
    total = -1
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # a thread that just ended
            continue
        total = max(total, 0) + int(fields[11]) + int(fields[12])  # utime, stime
    return total


def wait_idle(pid: int) -> None:
    """Return once process `pid` has used no CPU for SETTLE_S (at most IDLE_WAIT_S)."""
    last = cpu_ticks(pid)
    if last < 0:  # no /proc: a fixed pause instead
        time.sleep(SETTLE_S)
        return
    deadline, quiet_since = time.perf_counter() + IDLE_WAIT_S, time.perf_counter()
    while time.perf_counter() < deadline:
        time.sleep(SETTLE_S / 4)
        now = cpu_ticks(pid)
        if now != last:
            last, quiet_since = now, time.perf_counter()
        elif time.perf_counter() - quiet_since >= SETTLE_S:
            return


def fma_peak(threads: int) -> float:
    """float32 GFLOP/s of a register-only FMA loop, one per thread (fusedlstm._core)."""
    from .. import _core

    return float(_core.fma_peak_gflops(threads))


def bf16_peaks(threads: int) -> dict:
    """bfloat16 GFLOP/s of register-only VDPBF16PS and AMX TDPBF16PS loops, one per thread, for
    the units this CPU has, and which one fusedlstm's bfloat16 products run on ("engine")."""
    from .. import _core

    out: dict = {"engine": None}
    engine = str(_core.bf16_engine())
    if engine == "none":
        return out
    out["engine"] = engine
    out["avx512_bf16"] = float(_core.bf16_peak_gflops(threads, 0.3, "avx512_bf16"))
    if engine == "amx":
        out["amx"] = float(_core.bf16_peak_gflops(threads, 0.3, "amx"))
    return out


def gemm_rate(n: int = 2048, reps: int = 5) -> float:
    """float32 GEMM GFLOP/s of NumPy's BLAS, on as many threads as the caller has limited it to."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.T.copy()
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9

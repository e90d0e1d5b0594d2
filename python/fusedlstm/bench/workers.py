"""The worker processes: every implementation runs in a process of its own, one set per thread
count (so that OpenMP, torch, onnxruntime and TensorFlow are configured before they start, and so
that one runtime's idle, spinning thread pool does not steal the cores of the next one). The
parent drives them over pipes, one JSON line per request and per answer:

    {"cmd": "ready"}                                   -> {}  (once its runtimes have started)
    {"cmd": "setup", "config": [B, T, E, H], "modes": [...], "warmup": n, "precision": "float32"}
                                                       -> {"number": {mode: calls per sample}}
    {"cmd": "sample", "mode": m}                       -> {"seconds": s}  (per call)
    {"cmd": "peaks"}                                   -> {"fma": GFLOP/s, "gemm": GFLOP/s,
                                                           "bf16": {unit: GFLOP/s}}
    {"cmd": "memory", "config": [B, T, E, H]}          -> fusedlstm's memory report

A worker is `python -m fusedlstm.bench.cli --worker IMPL --worker-threads N`; EOF on its stdin
ends it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence

from . import timing
from .implementations import (
    IMPL_MODES,
    IMPL_PRECISIONS,
    PRECISION,
    PlanRow,
    configure,
    impl_fns,
    is_big,
    make_inputs,
    memory_report,
    mode_flops,
)

__all__ = ["worker", "Worker", "run_threads"]


def worker(impl: str, threads: int) -> int:
    """The worker process's loop. It answers on the stdout it was started with; anything else
    that prints (runtimes' warnings) goes to its stderr."""
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    configure(impl, threads)
    fns: dict[str, object] = {}
    number: dict[str, int] = {}
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg["cmd"]
        if cmd == "setup":
            inp = make_inputs(*msg["config"])
            fns = impl_fns(impl, inp, msg.get("modes", IMPL_MODES[impl]), threads, msg.get("precision", PRECISION))
            number = {mode: timing.calls_per_sample(f, msg["warmup"]) for mode, f in fns.items()}
            out = {"number": number}
        elif cmd == "sample":
            out = {"seconds": timing.sample(fns[msg["mode"]], number[msg["mode"]])}
        elif cmd == "ready":
            out = {}
        elif cmd == "peaks":
            out = {"fma": timing.fma_peak(threads), "gemm": timing.gemm_rate(), "bf16": timing.bf16_peaks(threads)}
        elif cmd == "memory":
            out = memory_report(tuple(msg["config"]))
        else:
            break
        reply.write(json.dumps(out) + "\n")
    return 0


class Worker:
    """The parent's handle on one worker process."""

    def __init__(self, impl: str, threads: int):
        # The Keras columns are TensorFlow-backend steps (tf.function), whatever KERAS_BACKEND
        # the caller's shell exports (bench/bench_keras.py --backend torch measures torch's).
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
        self.impl = impl
        # The worker's stderr (TensorFlow's start-up chatter, warnings) is kept in a file and
        # shown only if the worker fails.
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fusedlstm.bench.cli", "--worker", impl, "--worker-threads", str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )

    def ask(self, **msg) -> dict:
        """Send one request, return its answer once the worker's threads have gone quiet."""
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:  # it died before reading this request
            line = ""
        if not line:
            code = self.proc.wait()
            self.log.seek(0)
            tail = self.log.read()[-4000:]
            raise RuntimeError(f"benchmark worker {self.impl!r} exited (code {code}); its stderr ends with:\n{tail}")
        out = json.loads(line)
        timing.wait_idle(self.proc.pid)
        return out

    def close(self) -> None:
        """End the worker (EOF on its stdin; killed if it does not exit within a minute) and
        close every pipe and the log, whether it is still running or died already."""
        try:
            if self.proc.poll() is None:
                try:
                    self.proc.stdin.close()
                except BrokenPipeError:
                    pass
                try:
                    self.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    f.close()
                except BrokenPipeError:
                    pass
            self.log.close()


def run_threads(
    plan: Sequence[PlanRow], threads: int, quick: bool, impls: list[str], memory: bool, precision: str = PRECISION
) -> dict:
    """One thread count: a worker per implementation, every row of the plan, the implementations'
    samples interleaved. With `memory`, fusedlstm's memory report is attached to the last result
    of every config that trains."""
    impls = [n for n in impls if precision in IMPL_PRECISIONS[n]]
    workers = {n: Worker(n, threads) for n in impls}
    try:
        for w in workers.values():  # every worker idle before anything is measured
            w.ask(cmd="ready")
        peaks = workers[impls[0]].ask(cmd="peaks")
        results = []
        for cfg, modes, skip in plan:
            first_row = len(results)
            big = is_big(cfg)
            active = [n for n in impls if set(modes) & set(IMPL_MODES[n]) and n not in skip]
            number = {
                n: workers[n].ask(
                    cmd="setup", config=list(cfg), modes=list(modes), warmup=1 if big else 3, precision=precision
                )["number"]
                for n in active
            }
            reps = 5 if quick else (11 if big else 31)
            budget = 3.0 if quick else 25.0
            for mode in modes:
                names = [n for n in active if mode in number[n]]
                if not names:
                    continue
                times = timing.interleave(
                    {n: (lambda w=workers[n], m=mode: w.ask(cmd="sample", mode=m)["seconds"]) for n in names},
                    reps,
                    budget,
                )
                flops = mode_flops(mode, cfg)
                stats = {}
                for n, v in times.items():
                    st = timing.summarize(v, number[n][mode])
                    st["gflops"] = flops / st["median_s"] / 1e9
                    st["pct_fma_peak"] = 100.0 * st["gflops"] / peaks["fma"]
                    unit = peaks["bf16"].get("engine")
                    if precision == "bfloat16" and unit and peaks["bf16"].get(unit):
                        st["pct_bf16_peak"] = 100.0 * st["gflops"] / peaks["bf16"][unit]
                    stats[n] = st
                results.append(
                    {"config": list(cfg), "threads": threads, "mode": mode, "precision": precision, "impls": stats}
                )
            if memory and "forward+backward" in modes and len(results) > first_row:
                mem_worker = workers.get("fusedlstm") or workers[impls[0]]
                results[-1]["memory"] = mem_worker.ask(cmd="memory", config=list(cfg))
    finally:
        for w in workers.values():
            w.close()
    return {
        "threads": threads,
        "fma_peak_gflops": peaks["fma"],
        "gemm_peak_gflops": peaks["gemm"],
        "bf16_peak_gflops": peaks["bf16"],
        "results": results,
    }

"""`fusedlstm bench`: one LSTM layer side by side — fusedlstm, the NumPy reference, torch.nn.LSTM,
keras.layers.LSTM and fusedlstm.keras.LSTM, whichever are installed — forward (inference) and
forward+backward (gradients for the weights and x), at the standard configs or user-given ones.

Every implementation runs in a worker process of its own, one set of workers per thread count
(so that OpenMP, torch and TensorFlow are configured before they start, and so that one
runtime's idle, spinning thread pool does not steal the cores of the next one), and the parent
interleaves their samples in every repetition, the order rotating, so the machine's drift hits
all alike. The float32 FMA peak (register-only loop) and the BLAS GEMM rate are measured in the
same run. Also reported per config: fusedlstm's cache (what a training
forward keeps for backward, in total and per step) and the peak memory of one training step.
Prints a table, writes JSON, and with --plot a PNG of the speed-ups over torch.

    fusedlstm bench [--quick] [--config B,T,E,H ...] [--threads 1,all] [--out FILE] [--plot PNG]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np

DEFAULT_CONFIGS = [(4, 4, 64, 16), (64, 50, 300, 128), (128, 100, 256, 512)]
IMPLS = ("fusedlstm", "numpy", "torch", "keras", "fusedlstm.keras")
MIN_SAMPLE_S = 0.005  # a sample repeats a fast call until it lasts this long (timer noise)
# After a sample its worker's thread pools go on spinning (libgomp for milliseconds, OpenBLAS
# for tens of them), stealing cores from whatever runs next: the parent waits until the worker
# uses no more CPU (its threads' clock ticks stand still for SETTLE_S), at most IDLE_WAIT_S.
SETTLE_S = 0.02
IDLE_WAIT_S = 1.0


def fwd_flops(B, T, E, H) -> float:
    return 2.0 * B * T * (E + H) * 4 * H


def make_inputs(B, T, E, H, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    s = float(1.0 / np.sqrt(H))
    return dict(x=rng.standard_normal((B, T, E), dtype=np.float32),
                kernel=rng.standard_normal((E, 4 * H), dtype=np.float32) * s,
                recurrent_kernel=rng.standard_normal((H, 4 * H), dtype=np.float32) * s,
                bias=rng.standard_normal(4 * H, dtype=np.float32) * 0.1,
                d_out=rng.standard_normal((B, T, H), dtype=np.float32))


def time_interleaved(fns: Dict[str, Callable], reps: int, warmup: int, budget_s: float) -> dict:
    """Median/min seconds per call for each fn: interleaved samples, the order rotating every
    repetition; a sample of a fast call times `number` back-to-back calls."""
    names = list(fns)
    number = {}
    for n in names:
        for _ in range(warmup):
            fns[n]()
        t0 = time.perf_counter()
        fns[n]()
        number[n] = max(1, int(MIN_SAMPLE_S / max(time.perf_counter() - t0, 1e-7)))
    times: Dict[str, List[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(reps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            f, k = fns[n], number[n]
            t0 = time.perf_counter()
            for _ in range(k):
                f()
            times[n].append((time.perf_counter() - t0) / k)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return {n: {"median_s": statistics.median(v), "min_s": min(v), "reps": len(v),
                "calls_per_sample": number[n]} for n, v in times.items()}


# -- implementations and the worker processes that run them --------------------------------

def _numpy_api(mod, inp) -> Tuple[Callable, Callable]:
    """fusedlstm and its NumPy reference share one API."""
    x, W, R, b, d_out = (inp[k] for k in ("x", "kernel", "recurrent_kernel", "bias", "d_out"))

    def fwd():
        mod.lstm_forward(x, W, R, b, training=False)

    def fwd_bwd():
        _, _, _, cache = mod.lstm_forward(x, W, R, b)
        mod.lstm_backward(cache, d_out)

    return fwd, fwd_bwd


def _torch_impl(inp) -> Tuple[Callable, Callable]:
    import torch

    x, W, R, b, d_out = (inp[k] for k in ("x", "kernel", "recurrent_kernel", "bias", "d_out"))
    E, H = W.shape[0], R.shape[0]
    lstm = torch.nn.LSTM(E, H, batch_first=True)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(torch.from_numpy(W.T.copy()))
        lstm.weight_hh_l0.copy_(torch.from_numpy(R.T.copy()))
        lstm.bias_ih_l0.copy_(torch.from_numpy(b))
        lstm.bias_hh_l0.zero_()
    tx, tdo = torch.from_numpy(x), torch.from_numpy(d_out)

    def fwd():
        with torch.no_grad():
            lstm(tx)

    def fwd_bwd():
        xg = tx.detach().requires_grad_(True)
        y, _ = lstm(xg)
        lstm.zero_grad(set_to_none=True)
        y.backward(tdo)

    return fwd, fwd_bwd


def _keras_impl(layer_cls, inp) -> Tuple[Callable, Callable]:
    """A Keras LSTM (return_sequences) in tf.function: inference, and the gradients of
    sum(outputs * d_out) for the weights and x (the same work as the other backwards)."""
    import tensorflow as tf

    x, W, R, b = (inp[k] for k in ("x", "kernel", "recurrent_kernel", "bias"))
    layer = layer_cls(R.shape[0], return_sequences=True)
    layer.build((None,) + x.shape[1:])
    layer.set_weights([W, R, b])
    tx, tdo = tf.constant(x), tf.constant(inp["d_out"])

    @tf.function(jit_compile=False)
    def infer():
        return layer(tx, training=False)

    @tf.function(jit_compile=False)
    def train():
        with tf.GradientTape() as tape:
            tape.watch(tx)
            loss = tf.reduce_sum(layer(tx, training=True) * tdo)
        return tape.gradient(loss, layer.trainable_weights + [tx])

    def fwd():
        infer().numpy()

    def fwd_bwd():
        for g in train():
            g.numpy()

    return fwd, fwd_bwd


def _available(quick: bool, wanted: List[str]) -> Tuple[List[str], List[str]]:
    """Implementations to run, and notes on the ones left out."""
    run, notes = [], []
    for name in wanted:
        if name in ("torch",) and importlib.util.find_spec("torch") is None:
            notes.append("torch: not installed (pip install torch)")
            continue
        if name in ("keras", "fusedlstm.keras") and importlib.util.find_spec("tensorflow") is None:
            notes.append(f"{name}: TensorFlow not installed (pip install 'fusedlstm[tf]')")
            continue
        if name == "fusedlstm.keras" and quick:
            from ..keras.build import op_library_path

            if not op_library_path().exists():
                notes.append("fusedlstm.keras: op library not built yet (fusedlstm build-tf-op; "
                             "--quick does not spend a minute compiling it)")
                continue
        run.append(name)
    return run, notes


def memory_report(cfg) -> dict:
    """fusedlstm's cache (total and per time step), and the peak of NumPy allocations during one
    training step (forward + backward, cold: no recycled buffer) beyond its inputs, by tracemalloc
    (NumPy reports its allocations to it)."""
    import tracemalloc

    import fusedlstm

    inp = make_inputs(*cfg)
    B, T, E, H = cfg
    fusedlstm.empty_cache()
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    out = fusedlstm.lstm_forward(inp["x"], inp["kernel"], inp["recurrent_kernel"], inp["bias"])
    cache_bytes = out[3].nbytes
    g = fusedlstm.lstm_backward(out[3], inp["d_out"])
    peak = tracemalloc.get_traced_memory()[1] - base
    del out, g
    fusedlstm.empty_cache()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    res = fusedlstm.lstm_forward(inp["x"], inp["kernel"], inp["recurrent_kernel"], inp["bias"],
                                 training=False)
    infer_peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    fusedlstm.empty_cache()
    return {"cache_bytes": cache_bytes, "cache_bytes_per_step": cache_bytes / max(T, 1),
            "cache_floats_per_step_per_row": cache_bytes / 4 / max(T * B, 1),
            "training_step_peak_bytes": peak, "inference_cache": res[3] is not None,
            "inference_peak_bytes": infer_peak}


def _configure(impl: str, threads: int) -> None:
    """A worker's runtimes, before any of them starts its threads."""
    if impl in ("keras", "fusedlstm.keras"):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    import fusedlstm

    fusedlstm.set_num_threads(threads)
    if impl == "torch":
        import torch

        torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=threads, user_api="blas")  # the NumPy reference's BLAS
    except ImportError:
        pass


def _impl_fns(impl: str, inp) -> Tuple[Callable, Callable]:
    import fusedlstm
    from fusedlstm import reference

    if impl == "fusedlstm":
        return _numpy_api(fusedlstm, inp)
    if impl == "numpy":
        return _numpy_api(reference, inp)
    if impl == "torch":
        return _torch_impl(inp)
    if impl == "keras":
        import keras
        return _keras_impl(keras.layers.LSTM, inp)
    import fusedlstm.keras as fk
    return _keras_impl(fk.LSTM, inp)


def worker(impl: str, threads: int) -> int:
    """A worker process: one implementation at one thread count, driven by JSON lines on stdin
    (setup a config, time one sample of a mode, measure the peaks or the memory), answering one
    JSON line each on the stdout it was started with (anything else printing goes to stderr)."""
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    _configure(impl, threads)
    fns, number = None, {}
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg["cmd"]
        if cmd == "setup":
            cfg = tuple(msg["config"])
            fns = dict(zip(("forward", "forward+backward"), _impl_fns(impl, make_inputs(*cfg))))
            for mode, f in fns.items():  # warm up, then calls per sample so a sample lasts
                for _ in range(msg["warmup"]):
                    f()
                t0 = time.perf_counter()
                f()
                number[mode] = max(1, int(MIN_SAMPLE_S / max(time.perf_counter() - t0, 1e-7)))
            out = {"number": number}
        elif cmd == "sample":
            f, k = fns[msg["mode"]], number[msg["mode"]]
            t0 = time.perf_counter()
            for _ in range(k):
                f()
            out = {"seconds": (time.perf_counter() - t0) / k}
        elif cmd == "ready":  # answered once the runtimes above have started
            out = {}
        elif cmd == "peaks":
            from fusedlstm import _core
            out = {"fma": _core.fma_peak_gflops(threads), "gemm": gemm_rate(threads)}
        elif cmd == "memory":
            out = memory_report(tuple(msg["config"]))
        else:
            break
        reply.write(json.dumps(out) + "\n")
    return 0


class _Worker:
    def __init__(self, impl: str, threads: int):
        # The Keras columns are TensorFlow-backend steps (tf.function), whatever KERAS_BACKEND
        # the caller's shell exports (bench/bench_keras.py --backend torch measures torch's).
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TF_CPP_MIN_LOG_LEVEL="3",
                   KERAS_BACKEND="tensorflow")
        self.impl = impl
        # The worker's stderr (TensorFlow's start-up chatter, warnings) is kept in a file and
        # shown only if the worker fails.
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "fusedlstm.bench.cli", "--worker", impl,
                                      "--worker-threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env)

    def cpu_ticks(self) -> int:
        """CPU clock ticks used so far by all the worker's threads (-1 without /proc)."""
        total = -1
        for stat in Path(f"/proc/{self.proc.pid}/task").glob("*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # a thread that just ended
                continue
            total = max(total, 0) + int(fields[11]) + int(fields[12])  # utime, stime
        return total

    def wait_idle(self) -> None:
        last = self.cpu_ticks()
        if last < 0:  # no /proc: a fixed pause instead
            time.sleep(SETTLE_S)
            return
        deadline, quiet_since = time.perf_counter() + IDLE_WAIT_S, time.perf_counter()
        while time.perf_counter() < deadline:
            time.sleep(SETTLE_S / 4)
            now = self.cpu_ticks()
            if now != last:
                last, quiet_since = now, time.perf_counter()
            elif time.perf_counter() - quiet_since >= SETTLE_S:
                return

    def ask(self, **msg) -> dict:
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
            raise RuntimeError(f"benchmark worker {self.impl!r} exited (code {code}); its "
                               f"stderr ends with:\n{tail}")
        out = json.loads(line)
        self.wait_idle()
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


def run_threads(configs, threads: int, quick: bool, impls: List[str], memory: bool) -> dict:
    """One thread count: a worker per implementation, every config, samples interleaved."""
    workers = {n: _Worker(n, threads) for n in impls}
    try:
        for w in workers.values():  # every worker idle before anything is measured
            w.ask(cmd="ready")
        peaks = workers[impls[0]].ask(cmd="peaks")
        results = []
        for cfg in configs:
            big = cfg[0] * cfg[1] * (cfg[2] + cfg[3]) * cfg[3] > 2e8
            # NumPy's reference takes a second per call at the largest size: not in --quick.
            active = [n for n in impls if not (n == "numpy" and quick and big)]
            number = {n: workers[n].ask(cmd="setup", config=list(cfg), warmup=1 if big else 3)["number"]
                      for n in active}
            reps = 5 if quick else (11 if big else 31)
            budget = 3.0 if quick else 25.0
            for mode, flops in (("forward", fwd_flops(*cfg)), ("forward+backward", 3 * fwd_flops(*cfg))):
                times: Dict[str, List[float]] = {n: [] for n in active}
                start = time.perf_counter()
                for r in range(reps):
                    for n in active[r % len(active):] + active[:r % len(active)]:
                        times[n].append(workers[n].ask(cmd="sample", mode=mode)["seconds"])
                    if r >= 2 and time.perf_counter() - start > budget:
                        break
                stats = {}
                for n, v in times.items():
                    med = statistics.median(v)
                    stats[n] = {"median_s": med, "min_s": min(v), "reps": len(v),
                                "calls_per_sample": number[n][mode], "gflops": flops / med / 1e9,
                                "pct_fma_peak": 100.0 * flops / med / 1e9 / peaks["fma"]}
                results.append({"config": list(cfg), "threads": threads, "mode": mode, "impls": stats})
            if memory:
                mem_worker = workers.get("fusedlstm") or workers[impls[0]]
                results[-1]["memory"] = mem_worker.ask(cmd="memory", config=list(cfg))
    finally:
        for w in workers.values():
            w.close()
    return {"threads": threads, "fma_peak_gflops": peaks["fma"], "gemm_peak_gflops": peaks["gemm"],
            "results": results}


def gemm_rate(threads: int, n: int = 2048, reps: int = 5) -> float:
    """float32 GEMM rate of NumPy's BLAS (already limited to `threads`)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.T.copy()
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


# -- the parent: report, table, plot ---------------------------------------------------------

def git_commit() -> str:
    """The checkout's commit: the working directory's, else the package source's."""
    for where in (Path.cwd(), Path(__file__).resolve().parent):
        try:
            return subprocess.run(["git", "rev-parse", "--short", "HEAD"], text=True, cwd=where,
                                  capture_output=True, check=True).stdout.strip()
        except Exception:
            continue
    return "unknown"


def run(configs, threads_list, quick: bool, impls: List[str]) -> dict:
    import fusedlstm

    runs = [run_threads(configs, threads, quick, impls, memory=threads == threads_list[-1])
            for threads in threads_list]
    return {
        "benchmark": "kernel",
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": sys.version.split()[0]},
        "build": fusedlstm.build_info(),
        "versions": _versions(impls),
        "gemm_peak_gflops": {str(r["threads"]): r["gemm_peak_gflops"] for r in runs},
        "gemm_peak_source": "NumPy float32 matmul 2048^3 (its BLAS), threadpoolctl-limited",
        "fma_peak_gflops": {str(r["threads"]): r["fma_peak_gflops"] for r in runs},
        "fma_peak_source": "register-only float32 FMA loop, one per thread (fusedlstm._core)",
        "results": [res for r in runs for res in r["results"]],
    }


def _versions(impls) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("fusedlstm", "numpy", "torch", "tensorflow-cpu", "tensorflow", "keras"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def format_table(report) -> str:
    lines = [f"commit {report['commit']}  float32  FMA peak (register loop): "
             + ", ".join(f"{v:.0f} GFLOP/s on {k} thread(s)" for k, v in report["fma_peak_gflops"].items())
             + "; BLAS sgemm 2048^3: " + ", ".join(f"{v:.0f}" for v in report["gemm_peak_gflops"].values())]
    head = (f"{'(B, T, E, H)':>22} {'thr':>3} {'mode':>16} {'impl':>15} {'median ms':>10} "
            f"{'min ms':>9} {'GFLOP/s':>8} {'%FMA':>6} {'vs torch':>8}")
    lines += [head, "-" * len(head)]
    for r in report["results"]:
        torch_med = r["impls"].get("torch", {}).get("median_s")
        for name, st in r["impls"].items():
            ratio = f"{torch_med / st['median_s']:.2f}x" if torch_med else "-"
            lines.append(f"{str(tuple(r['config'])):>22} {r['threads']:>3} {r['mode']:>16} {name:>15} "
                         f"{st['median_s'] * 1e3:>10.3f} {st['min_s'] * 1e3:>9.3f} "
                         f"{st['gflops']:>8.1f} {st['pct_fma_peak']:>6.1f} {ratio:>8}")
    mem = [r for r in report["results"] if "memory" in r]
    if mem:
        lines.append("")
        lines.append("fusedlstm memory (float32): cache kept by a training forward, per step, peak "
                     "of one training step; inference keeps no cache")
        for r in mem:
            m = r["memory"]
            lines.append(f"{str(tuple(r['config'])):>22}  cache {m['cache_bytes'] / 2**20:8.2f} MiB "
                         f"({m['cache_bytes_per_step'] / 2**10:8.1f} KiB/step)  training-step peak "
                         f"{m['training_step_peak_bytes'] / 2**20:8.2f} MiB  inference peak "
                         f"{m['inference_peak_bytes'] / 2**20:7.2f} MiB  inference cache: "
                         f"{'yes' if m['inference_cache'] else 'none'}")
    return "\n".join(lines)


def plot(report, path: Path) -> None:
    """Bars: speed-up over torch.nn.LSTM (same run) per config, one group per mode and thread
    count, one bar per implementation."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: --plot needs matplotlib: pip install 'fusedlstm[plot]'")
    rows = [r for r in report["results"] if "torch" in r["impls"]]
    if not rows:
        raise SystemExit("error: --plot shows speed-ups over torch, and torch was not measured")
    names = [n for n in IMPLS if n != "torch" and any(n in r["impls"] for r in rows)]
    groups = sorted({(r["mode"], r["threads"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.8), squeeze=False)
    for ax, (mode, thr) in zip(axes[0], groups):
        sub = [r for r in rows if r["mode"] == mode and r["threads"] == thr]
        xs = np.arange(len(sub))
        w = 0.8 / max(len(names), 1)
        for i, n in enumerate(names):
            vals = [r["impls"]["torch"]["median_s"] / r["impls"][n]["median_s"]
                    if n in r["impls"] else 0 for r in sub]
            ax.bar(xs + (i - (len(names) - 1) / 2) * w, vals, w, label=n)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(xs, ["x".join(map(str, r["config"])) for r in sub], rotation=20, fontsize=7)
        ax.set_title(f"{mode}, {thr} thread(s)", fontsize=9)
        ax.set_ylabel("speed-up over torch.nn.LSTM")
        ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"fusedlstm bench, commit {report['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_config(text: str):
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--config expects B,T,E,H integers, got {text!r}")
    if len(vals) != 4 or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"--config expects four positive integers B,T,E,H, got {text!r}")
    return vals


def parse_threads(text: str) -> List[int]:
    out = []
    for t in text.split(","):
        t = t.strip()
        n = (os.cpu_count() or 1) if t == "all" else int(t) if t.isdigit() else 0
        if n < 1:
            raise argparse.ArgumentTypeError(f"--threads: {t!r} is not a positive count or 'all'")
        if n not in out:
            out.append(n)
    return out


def build_parser(p=None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="fusedlstm bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=parse_config, action="append",
                   help="B,T,E,H (repeatable); default: (4,4,64,16) (64,50,300,128) (128,100,256,512)")
    p.add_argument("--threads", type=parse_threads, default=None,
                   help="comma-separated thread counts or 'all' (default: 1,all; --quick: all)")
    p.add_argument("--quick", action="store_true",
                   help="few repetitions, all cores only, no NumPy at the largest size: under a minute")
    p.add_argument("--impls", default=",".join(IMPLS),
                   help=f"comma-separated subset of {','.join(IMPLS)} (those installed run)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: bench/results/kernel.json from a checkout's root, "
                        "kernel_quick.json with --quick; ./fusedlstm-bench[-quick].json elsewhere)")
    p.add_argument("--plot", type=Path, default=None, help="also write a PNG of speed-ups over torch")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-threads", type=int, default=1, help=argparse.SUPPRESS)
    return p


def default_out(quick: bool) -> Path:
    """bench/results/kernel[_quick].json when run from a checkout's root, else ./fusedlstm-bench[-quick].json."""
    results = Path("bench") / "results"
    if results.is_dir() and (results / "kernel.json").exists():
        return results / ("kernel_quick.json" if quick else "kernel.json")
    return Path("fusedlstm-bench-quick.json" if quick else "fusedlstm-bench.json")


def main(argv=None) -> int:
    return run_args(build_parser().parse_args(argv))


def run_args(args) -> int:
    args.configs = args.config or DEFAULT_CONFIGS
    if args.worker is not None:  # a worker process (see run_threads)
        return worker(args.worker, args.worker_threads)
    wanted = [n.strip() for n in args.impls.split(",") if n.strip()]
    bad = [n for n in wanted if n not in IMPLS]
    if bad:
        raise SystemExit(f"error: --impls: unknown {bad}; choose from {list(IMPLS)}")
    impls, notes = _available(args.quick, wanted)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    threads = args.threads or parse_threads("all" if args.quick else "1,all")
    report = run(args.configs, threads, args.quick, impls)
    report["left_out"] = notes
    print(format_table(report))
    out = args.out or default_out(args.quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

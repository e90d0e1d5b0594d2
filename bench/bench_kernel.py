"""Side-by-side benchmark of one LSTM layer: fusedlstm vs the NumPy reference vs torch.nn.LSTM
(when installed), forward (inference) and forward+backward (gradients for weights and x), at the
issue's configs or user-given ones. Implementations are interleaved in every repetition so the
machine's drift hits all alike; the float32 GEMM peak (NumPy/OpenBLAS) is measured in the same run
for scale. Prints a table and writes JSON (sizes, threads, commit, medians and minima).

    python bench/bench_kernel.py [--quick] [--config B,T,E,H ...] [--threads 1,2] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import fusedlstm
from fusedlstm import _core, reference

DEFAULT_CONFIGS = [(4, 4, 64, 16), (64, 50, 300, 128), (128, 100, 256, 512)]
HERE = Path(__file__).resolve().parent


def fwd_flops(B, T, E, H):
    return 2.0 * B * T * (E + H) * 4 * H


def gemm_peak_gflops(threads: int, n: int = 2048, reps: int = 5) -> float:
    """float32 GEMM rate of NumPy's BLAS on `threads` threads: the machine's practical peak."""
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.T.copy()
    with threadpool_limits(limits=threads, user_api="blas"):
        a @ b
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / min(times) / 1e9


def make_inputs(B, T, E, H, seed=0):
    rng = np.random.default_rng(seed)
    s = float(1.0 / np.sqrt(H))
    return dict(
        x=rng.standard_normal((B, T, E), dtype=np.float32),
        kernel=(rng.standard_normal((E, 4 * H), dtype=np.float32) * s),
        recurrent_kernel=(rng.standard_normal((H, 4 * H), dtype=np.float32) * s),
        bias=(rng.standard_normal(4 * H, dtype=np.float32) * 0.1),
        d_out=rng.standard_normal((B, T, H), dtype=np.float32),
    )


def impls_for(inp, with_numpy: bool, with_torch: bool):
    """name -> (forward_fn, fwd_bwd_fn); each call does the whole job and returns nothing."""
    x, W, R, b, d_out = inp["x"], inp["kernel"], inp["recurrent_kernel"], inp["bias"], inp["d_out"]
    out = {}

    def pair(mod):  # fusedlstm and its NumPy reference share one API
        def fwd():
            mod.lstm_forward(x, W, R, b, training=False)

        def fwd_bwd():
            _, _, _, cache = mod.lstm_forward(x, W, R, b)
            mod.lstm_backward(cache, d_out)

        return fwd, fwd_bwd

    out["fusedlstm"] = pair(fusedlstm)
    if with_numpy:
        out["numpy"] = pair(reference)
    if with_torch:
        import torch

        B, T, E = x.shape
        H = R.shape[0]
        lstm = torch.nn.LSTM(E, H, batch_first=True)
        with torch.no_grad():
            lstm.weight_ih_l0.copy_(torch.from_numpy(W.T.copy()))
            lstm.weight_hh_l0.copy_(torch.from_numpy(R.T.copy()))
            lstm.bias_ih_l0.copy_(torch.from_numpy(b))
            lstm.bias_hh_l0.zero_()
        tx = torch.from_numpy(x)
        tdo = torch.from_numpy(d_out)

        def t_fwd():
            with torch.no_grad():
                lstm(tx)

        def t_fwd_bwd():
            xg = tx.detach().requires_grad_(True)
            y, _ = lstm(xg)
            lstm.zero_grad(set_to_none=True)
            y.backward(tdo)

        out["torch"] = (t_fwd, t_fwd_bwd)
    return out


MIN_SAMPLE_S = 0.005  # a sample repeats a fast call until it lasts this long (timer noise)


def time_interleaved(fns: dict, reps: int, warmup: int, budget_s: float):
    """Median/min seconds per call for each fn: interleaved samples, the order rotating every
    repetition; a sample of a fast call times `number` back-to-back calls."""
    names = list(fns)
    number = {}
    for n in names:
        for _ in range(warmup):
            fns[n]()
        t0 = time.perf_counter()
        fns[n]()
        one = time.perf_counter() - t0
        number[n] = max(1, int(MIN_SAMPLE_S / max(one, 1e-7)))
    times = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            f, k = fns[n], number[n]
            t0 = time.perf_counter()
            for _ in range(k):
                f()
            times[n].append((time.perf_counter() - t0) / k)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return {n: {"median_s": statistics.median(v), "min_s": min(v), "reps": len(v),
                "calls_per_sample": number[n]} for n, v in times.items()}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                              capture_output=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def set_threads(n: int):
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n, user_api="blas")  # the NumPy reference's BLAS
    fusedlstm.set_num_threads(n)
    try:
        import torch
        torch.set_num_threads(n)
    except ImportError:
        pass


def run(configs, threads_list, quick: bool, with_numpy: bool):
    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
    results = []
    peaks, fma_peaks = {}, {}
    for threads in threads_list:
        set_threads(threads)
        peaks[threads] = gemm_peak_gflops(threads)
        fma_peaks[threads] = _core.fma_peak_gflops(threads)
        for cfg in configs:
            B, T, E, H = cfg
            inp = make_inputs(*cfg)
            big = B * T * (E + H) * H > 2e8
            impls = impls_for(inp, with_numpy and not (quick and big), have_torch)
            reps = 5 if quick else (11 if big else 31)
            budget = 4.0 if quick else 25.0
            for mode, idx, flops in (("forward", 0, fwd_flops(*cfg)),
                                     ("forward+backward", 1, 3 * fwd_flops(*cfg))):
                fns = {name: pair[idx] for name, pair in impls.items()}
                stats = time_interleaved(fns, reps, warmup=1 if big else 3, budget_s=budget)
                for name, st in stats.items():
                    st["gflops"] = flops / st["median_s"] / 1e9
                    st["pct_gemm_peak"] = 100.0 * st["gflops"] / peaks[threads]
                    st["pct_fma_peak"] = 100.0 * st["gflops"] / fma_peaks[threads]
                results.append({"config": list(cfg), "threads": threads, "mode": mode,
                                "impls": stats})
    return {
        "benchmark": "kernel",
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": sys.version.split()[0]},
        "build": fusedlstm.build_info(),
        "gemm_peak_gflops": {str(k): v for k, v in peaks.items()},
        "gemm_peak_source": "NumPy float32 matmul 2048^3 (OpenBLAS), threadpoolctl-limited",
        "fma_peak_gflops": {str(k): v for k, v in fma_peaks.items()},
        "fma_peak_source": "register-only float32 FMA loop, one per thread (fusedlstm._core)",
        "results": results,
    }


def format_table(report) -> str:
    lines = []
    peaks = report["gemm_peak_gflops"]
    lines.append(f"commit {report['commit']}  float32  FMA peak (register loop): " +
                 ", ".join(f"{v:.0f} GFLOP/s on {k} thread(s)"
                           for k, v in report["fma_peak_gflops"].items()) +
                 "; NumPy sgemm 2048^3: " +
                 ", ".join(f"{v:.0f}" for v in peaks.values()))
    head = f"{'(B, T, E, H)':>22} {'thr':>3} {'mode':>16} {'impl':>10} {'median ms':>10} {'min ms':>9} {'GFLOP/s':>8} {'%FMA':>6} {'vs torch':>8}"
    lines.append(head)
    lines.append("-" * len(head))
    for r in report["results"]:
        torch_med = r["impls"].get("torch", {}).get("median_s")
        for name, st in r["impls"].items():
            ratio = f"{torch_med / st['median_s']:.2f}x" if torch_med else "-"
            lines.append(f"{str(tuple(r['config'])):>22} {r['threads']:>3} {r['mode']:>16} {name:>10} "
                         f"{st['median_s'] * 1e3:>10.3f} {st['min_s'] * 1e3:>9.3f} "
                         f"{st['gflops']:>8.1f} {st['pct_fma_peak']:>6.1f} {ratio:>8}")
    return "\n".join(lines)


def parse_config(text: str):
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--config expects B,T,E,H integers, got {text!r}")
    if len(vals) != 4 or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"--config expects four positive integers B,T,E,H, got {text!r}")
    return vals


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=parse_config, action="append",
                   help="B,T,E,H (repeatable); default: the three standard configs")
    p.add_argument("--threads", default=str(os.cpu_count() or 1),
                   help="comma-separated thread counts, e.g. 1,2 (default: all cores)")
    p.add_argument("--quick", action="store_true", help="few repetitions; under a minute")
    p.add_argument("--no-numpy", action="store_true", help="skip the NumPy reference")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: results/kernel.json; results/kernel_quick.json "
                        "with --quick, so a quick run never replaces the README's numbers)")
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    report = run(args.config or DEFAULT_CONFIGS, threads, args.quick, not args.no_numpy)
    print(format_table(report))
    if args.out is None:
        args.out = HERE / "results" / ("kernel_quick.json" if args.quick else "kernel.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

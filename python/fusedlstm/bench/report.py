"""What a run leaves: the report's metadata (commit, date, machine, build, versions), the speed-up
ratios, the terminal table, the README's Markdown tables, the JSON (written atomically) and the
plot. The renderers read reports of older runs too (rows without a precision or stored ratios)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .implementations import IMPLS, PRECISION

__all__ = [
    "BASELINES",
    "git_commit",
    "utc_date",
    "machine",
    "versions",
    "make_report",
    "speedup",
    "format_table",
    "markdown_tables",
    "compact_table",
    "write_atomic",
    "write_json",
    "plot",
]

# The ratios reported: baseline median over the implementation's (above 1: faster than it).
BASELINES = ("torch", "onnxruntime")
LABELS = {
    "fusedlstm": "fusedlstm",
    "fusedlstm.prepared": "fusedlstm prepared",
    "fusedlstm.1dir": "fusedlstm one direction",
    "fusedlstm.torch": "fusedlstm.torch.LSTM",
    "onnxruntime": "onnxruntime",
    "numpy": "NumPy",
    "torch": "torch",
    "keras": "keras LSTM",
    "fusedlstm.keras": "fusedlstm.keras",
}


def git_commit() -> str:
    """The checkout's commit: the working directory's, else the package source's."""
    for where in (Path.cwd(), Path(__file__).resolve().parent):
        try:
            return subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], text=True, cwd=where, capture_output=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            continue
    return "unknown"


def utc_date() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]}


def versions(
    dists: Iterable[str] = (
        "fusedlstm",
        "numpy",
        "torch",
        "tensorflow-cpu",
        "tensorflow",
        "keras",
        "onnxruntime",
        "onnx",
    ),
) -> dict[str, str]:
    """Installed versions of those distributions that are installed."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in dists:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def speedup(row: dict, impl: str, baseline: str) -> float | None:
    """baseline's median over impl's in one row, None when either was not measured."""
    im = row["impls"]
    if impl not in im or baseline not in im:
        return None
    return im[baseline]["median_s"] / im[impl]["median_s"]


def make_report(runs: list[dict], notes: list[str]) -> dict:
    """The JSON of a kernel run from run_threads's results (one per thread count)."""
    import fusedlstm

    results = [res for r in runs for res in r["results"]]
    for row in results:
        for name, st in row["impls"].items():
            for base in BASELINES:
                ratio = speedup(row, name, base)
                if ratio is not None and name != base:
                    st[f"speedup_vs_{base}"] = ratio
    return {
        "benchmark": "kernel",
        "commit": git_commit(),
        "date": utc_date(),
        "machine": machine(),
        "build": fusedlstm.build_info(),
        "versions": versions(),
        "gemm_peak_gflops": {str(r["threads"]): r["gemm_peak_gflops"] for r in runs},
        "gemm_peak_source": "NumPy float32 matmul 2048^3 (its BLAS), threadpoolctl-limited",
        "fma_peak_gflops": {str(r["threads"]): r["fma_peak_gflops"] for r in runs},
        "fma_peak_source": "register-only float32 FMA loop, one per thread (fusedlstm._core)",
        "bf16_peak_gflops": {str(r["threads"]): r["bf16_peak_gflops"] for r in runs if "bf16_peak_gflops" in r},
        "bf16_peak_source": "register-only VDPBF16PS (avx512_bf16) and AMX TDPBF16PS (amx) loops, one per "
        "thread; engine: the unit fusedlstm's bfloat16 products run on",
        "onnxruntime_input": "an ONNX graph of one LSTM node, weights as initializers, built in the benchmark; "
        "x goes in time-major [T, B, E], transposed once outside the timed call "
        "(onnxruntime's CPU LSTM refuses layout=1); infer-last-state returns Y_h, "
        "forward Y [T, 1, B, H]",
        "results": results,
        "left_out": notes,
    }


def _precisions(report: dict) -> str:
    return ",".join(sorted({r.get("precision", PRECISION) for r in report["results"]})) or PRECISION


def _peaks(report: dict) -> str:
    fma = ", ".join(f"{float(v):.0f} GFLOP/s on {k} thread(s)" for k, v in report["fma_peak_gflops"].items())
    sgemm = ", ".join(f"{float(v):.0f}" for v in report["gemm_peak_gflops"].values())
    out = f"register-only FMA peak {fma}; NumPy (BLAS) sgemm 2048³ {sgemm} GFLOP/s"
    if "bfloat16" in _precisions(report):
        bf = []
        for k, v in report.get("bf16_peak_gflops", {}).items():
            units = ", ".join(f"{u} {float(v[u]):.0f}" for u in ("avx512_bf16", "amx") if v.get(u))
            bf.append(f"{units} GFLOP/s on {k} thread(s)")
        if bf:
            out += "; bfloat16 peaks " + "; ".join(bf)
    return out


def _mode(row: dict, report: dict) -> str:
    """The row's mode, with its precision once a report holds more than one."""
    multi = "," in _precisions(report)
    return f"{row['mode']} {row.get('precision', PRECISION)}" if multi else row["mode"]


def _ratio(x: float | None) -> str:
    return f"{x:.2f}x" if x is not None else "-"


def format_table(report: dict) -> str:
    """The terminal table: one line per (config, threads, mode, implementation); %peak is of the
    FMA peak, or in bfloat16 rows of the bfloat16 unit fusedlstm ran on."""
    lines = [f"commit {report['commit']}  {_precisions(report)}  {_peaks(report)}"]
    head = (
        f"{'(B, T, E, H)':>22} {'thr':>3} {'mode':>16} {'impl':>18} {'median ms':>10} "
        f"{'min ms':>9} {'GFLOP/s':>8} {'%peak':>6} {'vs torch':>8} {'vs ORT':>7}"
    )
    lines += [head, "-" * len(head)]
    for r in report["results"]:
        for name, st in r["impls"].items():
            lines.append(
                f"{str(tuple(r['config'])):>22} {r['threads']:>3} {_mode(r, report):>16} {name:>18} "
                f"{st['median_s'] * 1e3:>10.3f} {st['min_s'] * 1e3:>9.3f} "
                f"{st['gflops']:>8.1f} {st.get('pct_bf16_peak', st['pct_fma_peak']):>6.1f} "
                f"{_ratio(speedup(r, name, 'torch')):>8} {_ratio(speedup(r, name, 'onnxruntime')):>7}"
            )
    mem = [r for r in report["results"] if "memory" in r]
    if mem:
        lines.append("")
        lines.append(
            "fusedlstm memory (float32): cache kept by a training forward, per step, peak "
            "of one training step; inference keeps no cache"
        )
        for r in mem:
            m = r["memory"]
            lines.append(
                f"{str(tuple(r['config'])):>22}  cache {m['cache_bytes'] / 2**20:8.2f} MiB "
                f"({m['cache_bytes_per_step'] / 2**10:8.1f} KiB/step)  training-step peak "
                f"{m['training_step_peak_bytes'] / 2**20:8.2f} MiB  inference peak "
                f"{m['inference_peak_bytes'] / 2**20:7.2f} MiB  inference cache: "
                f"{'yes' if m['inference_cache'] else 'none'}"
            )
    if report.get("left_out"):
        lines.append("")
        lines += [f"left out: {n}" for n in report["left_out"]]
    return "\n".join(lines)


def _markdown(report: dict, rows: list[dict], baseline: str) -> str:
    """One Markdown table: ms per implementation measured in any row, then fusedlstm's (and the
    prepared call's) speed-up over `baseline`, then fusedlstm's GFLOP/s as a share of the FMA
    peak (in bfloat16 rows: of the bfloat16 unit it ran on)."""
    names = [n for n in IMPLS if any(n in r["impls"] for r in rows)]
    ours = [n for n in ("fusedlstm", "fusedlstm.prepared") if n in names and n != baseline]
    base = LABELS.get(baseline, baseline)
    out = [
        "| (B, T, E, H) | threads | mode | "
        + " | ".join(f"{LABELS.get(n, n)} ms" for n in names)
        + "".join(f" | {LABELS[n]} vs {base}" for n in ours)
        + " | fusedlstm GFLOP/s (% of peak) |",
        "|---|---|---|" + "---|" * (len(names) + len(ours) + 1),
    ]
    for r in rows:
        im = r["impls"]
        ms = [f"{im[n]['median_s'] * 1e3:.3g}" if n in im else "–" for n in names]
        ratios = []
        for n in ours:
            x = speedup(r, n, baseline)
            ratios.append(f"**{x:.2f}×**" if x is not None else "–")
        f = im.get("fusedlstm")
        perf = f"{f['gflops']:.0f} ({f.get('pct_bf16_peak', f['pct_fma_peak']):.0f}%)" if f else "–"
        out.append(
            f"| {tuple(r['config'])} | {r['threads']} | {_mode(r, report)} | "
            + " | ".join(ms + ratios)
            + f" | {perf} |"
        )
    return "\n".join(out)


def compact_table(report: dict) -> str:
    """The README's table: the training-size and bidirectional rows, one line per config, mode and
    precision with the thread counts side by side: fusedlstm's milliseconds and its speed-up over
    torch (in bfloat16 rows: over torch under autocast), and the PyTorch drop-in's (the full
    tables: markdown_tables)."""
    rows = [r for r in report["results"] if r["mode"] != "infer-last-state" and "torch" in r["impls"]]
    threads = sorted({r["threads"] for r in rows})
    keys = list(dict.fromkeys((tuple(r["config"]), r["mode"], r.get("precision", PRECISION)) for r in rows))
    by = {(tuple(r["config"]), r["mode"], r.get("precision", PRECISION), r["threads"]): r for r in rows}
    per = " / ".join(str(t) for t in threads)
    out = [
        f"| (B, T, E, H) | mode | precision | fusedlstm ms ({per} threads) | fusedlstm vs torch "
        "| fusedlstm.torch.LSTM vs torch |",
        "|---|---|---|---|---|---|",
    ]

    def cell(key, fmt):
        vals = []
        for t in threads:
            r = by.get(key + (t,))
            v = fmt(r) if r is not None else None
            vals.append(v if v is not None else "–")
        return " / ".join(vals)

    for key in keys:
        ms = cell(key, lambda r: f"{r['impls']['fusedlstm']['median_s'] * 1e3:.3g}")
        ours = cell(key, lambda r: f"**{speedup(r, 'fusedlstm', 'torch'):.2f}×**")

        def drop_in(r):
            x = speedup(r, "fusedlstm.torch", "torch")
            return f"{x:.2f}×" if x is not None else None

        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {ms} | {ours} | {cell(key, drop_in)} |")
    return "\n".join(out) + "\n"


def markdown_tables(report: dict) -> str:
    """The README's performance tables: the training-size rows (vs torch), the small-batch
    inference rows (vs onnxruntime), a line on the run, and fusedlstm's memory table."""
    rows = report["results"]
    big = [r for r in rows if r["mode"] != "infer-last-state"]
    small = [r for r in rows if r["mode"] == "infer-last-state"]
    parts = []
    if big:
        parts.append(_markdown(report, big, "torch"))
    if small:
        parts.append(_markdown(report, small, "onnxruntime"))
    vers = ", ".join(f"{k} {v}" for k, v in report.get("versions", {}).items())
    parts.append(
        f"Medians, {_precisions(report)}, {report['date']}, "
        f"{report['machine']['cpu_count']} cores ({report['build']['simd'].split(',')[0]}); {vers}. "
        f"Measured in the same run: {_peaks(report)}."
    )
    mem = [r for r in rows if "memory" in r]
    if mem:
        t = [
            "| (B, T, E, H) | cache kept for backward | per step | peak of one training step | "
            "peak of inference | inference cache |",
            "|---|---|---|---|---|---|",
        ]
        for r in mem:
            m = r["memory"]
            t.append(
                f"| {tuple(r['config'])} | {m['cache_bytes'] / 2**20:.2f} MiB | "
                f"{m['cache_bytes_per_step'] / 2**10:.1f} KiB | {m['training_step_peak_bytes'] / 2**20:.2f} MiB | "
                f"{m['inference_peak_bytes'] / 2**20:.2f} MiB | {'yes' if m['inference_cache'] else 'none'} |"
            )
        parts.append("\n".join(t))
    return "\n\n".join(parts) + "\n"


def _umask() -> int:
    """The process umask, read without changing it (changing it races other threads' files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def write_atomic(path: Path, write) -> None:
    """Create `path` through a temporary file beside it, renamed over it once complete: a reader
    never sees half a file, and a failed run leaves the old one. `write(tmp_path)` fills it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 is for the temporary, not the result
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_json(path: Path, obj) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1)))


def plot(report: dict, path: Path) -> None:
    """Bars: speed-up over torch.nn.LSTM (same run) per config, one group per mode and thread
    count, one bar per implementation."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: --plot needs matplotlib: pip install 'fusedlstm[plot]'") from None
    rows = [r for r in report["results"] if "torch" in r["impls"]]
    if not rows:
        raise SystemExit("error: --plot shows speed-ups over torch, and torch was not measured")
    names = [n for n in IMPLS if n != "torch" and any(n in r["impls"] for r in rows)]
    groups = sorted({(_mode(r, report), r["threads"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.8), squeeze=False)
    for ax, (mode, thr) in zip(axes[0], groups, strict=True):
        sub = [r for r in rows if _mode(r, report) == mode and r["threads"] == thr]
        xs = np.arange(len(sub))
        w = 0.8 / max(len(names), 1)
        for i, n in enumerate(names):
            vals = [speedup(r, n, "torch") or 0 for r in sub]
            ax.bar(xs + (i - (len(names) - 1) / 2) * w, vals, w, label=LABELS.get(n, n))
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(xs, ["x".join(map(str, r["config"])) for r in sub], rotation=20, fontsize=7)
        ax.set_title(f"{mode}, {thr} thread(s)", fontsize=9)
        ax.set_ylabel("speed-up over torch.nn.LSTM")
        ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"fusedlstm bench, commit {report['commit']}", fontsize=9)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)

"""Render bench/results/kernel.json (written by `fusedlstm bench`) as the README's performance
tables (Markdown), so the README quotes measured numbers only: python bench/readme_table.py [FILE]."""
import json
import sys
from pathlib import Path

COLUMNS = [("fusedlstm", "fusedlstm"), ("torch", "torch"), ("numpy", "NumPy"),
           ("keras", "keras LSTM"), ("fusedlstm.keras", "fusedlstm.keras")]


def table(report) -> str:
    rows = ["| (B, T, E, H) | threads | mode | " + " | ".join(f"{t} ms" for _, t in COLUMNS)
            + " | fusedlstm vs torch | fusedlstm GFLOP/s (% of FMA peak) |",
            "|---|---|---|" + "---|" * len(COLUMNS) + "---|---|"]
    for r in report["results"]:
        im = r["impls"]
        f, t = im["fusedlstm"], im.get("torch")
        ms = lambda st: f"{st['median_s'] * 1e3:.3g}" if st else "–"  # noqa: E731
        ratio = f"**{t['median_s'] / f['median_s']:.2f}×**" if t else "–"
        rows.append(f"| {tuple(r['config'])} | {r['threads']} | {r['mode']} | "
                    + " | ".join(ms(im.get(k)) for k, _ in COLUMNS)
                    + f" | {ratio} | {f['gflops']:.0f} ({f['pct_fma_peak']:.0f}%) |")
    fma = ", ".join(f"{float(v):.0f} GFLOP/s on {k} thread(s)"
                    for k, v in report["fma_peak_gflops"].items())
    sgemm = ", ".join(f"{float(v):.0f}" for v in report["gemm_peak_gflops"].values())
    vers = ", ".join(f"{k} {v}" for k, v in report.get("versions", {}).items())
    foot = (f"\nMedians, float32, commit `{report['commit']}`, {report['date']}, "
            f"{report['machine']['cpu_count']} cores ({report['build']['simd'].split(',')[0]}); {vers}. "
            f"Measured in the same run: register-only FMA peak {fma}; NumPy (OpenBLAS) sgemm "
            f"2048³ {sgemm} GFLOP/s.")
    mem = [r for r in report["results"] if "memory" in r]
    if mem:
        foot += ("\n\n| (B, T, E, H) | cache kept for backward | per step | peak of one training "
                 "step | peak of inference | inference cache |\n|---|---|---|---|---|---|\n")
        for r in mem:
            m = r["memory"]
            foot += (f"| {tuple(r['config'])} | {m['cache_bytes'] / 2**20:.2f} MiB | "
                     f"{m['cache_bytes_per_step'] / 2**10:.1f} KiB | "
                     f"{m['training_step_peak_bytes'] / 2**20:.2f} MiB | "
                     f"{m['inference_peak_bytes'] / 2**20:.2f} MiB | "
                     f"{'yes' if m['inference_cache'] else 'none'} |\n")
    return "\n".join(rows) + "\n" + foot


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results" / "kernel.json"
    print(table(json.loads(path.read_text())))

"""Render bench/results/kernel.json as the README's performance table (Markdown), so the README
quotes measured numbers only: python bench/readme_table.py [FILE]."""
import json
import sys
from pathlib import Path


def table(report) -> str:
    rows = ["| (B, T, E, H) | threads | mode | fusedlstm ms | torch ms | NumPy ms | vs torch | fusedlstm GFLOP/s (% of FMA peak) |",
            "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        im = r["impls"]
        f = im["fusedlstm"]
        t = im.get("torch")
        n = im.get("numpy")
        ms = lambda st: f"{st['median_s'] * 1e3:.3g}" if st else "–"  # noqa: E731
        ratio = f"**{t['median_s'] / f['median_s']:.2f}×**" if t else "–"
        rows.append(f"| {tuple(r['config'])} | {r['threads']} | {r['mode']} | {ms(f)} | {ms(t)} | "
                    f"{ms(n)} | {ratio} | {f['gflops']:.0f} ({f['pct_fma_peak']:.0f}%) |")
    fma = ", ".join(f"{float(v):.0f} GFLOP/s on {k} thread(s)"
                    for k, v in report["fma_peak_gflops"].items())
    sgemm = ", ".join(f"{float(v):.0f}" for v in report["gemm_peak_gflops"].values())
    foot = (f"\nMedians, float32, commit `{report['commit']}`, {report['date']}, "
            f"{report['machine']['cpu_count']} cores ({report['build']['simd'].split(',')[0]}). "
            f"Measured in the same run: register-only FMA peak {fma}; NumPy (OpenBLAS) sgemm "
            f"2048³ {sgemm} GFLOP/s.")
    return "\n".join(rows) + "\n" + foot


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results" / "kernel.json"
    print(table(json.loads(path.read_text())))

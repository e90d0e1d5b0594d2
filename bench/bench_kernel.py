"""The kernel benchmark from a checkout: `fusedlstm bench` (python/fusedlstm/bench/), its
JSON written under bench/results/ (kernel.json; kernel_quick.json with --quick, so a quick run
never replaces the README's numbers).

    python bench/bench_kernel.py [--quick] [--config B,T,E,H ...] [--threads 1,all] [--plot PNG]
"""
import sys
from pathlib import Path

from fusedlstm.bench.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--out" or a.startswith("--out=") for a in argv):
        results = Path(__file__).resolve().parent / "results"
        argv += ["--out", str(results / ("kernel_quick.json" if "--quick" in argv else "kernel.json"))]
    sys.exit(main(argv))

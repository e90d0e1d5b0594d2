"""The full kernel benchmark from a checkout: `fusedlstm bench` (python/fusedlstm/bench/) at its
defaults, threads 1 and all. Like it, this writes a JSON report only where --out says; the
README's is bench/results/kernel.json, rendered by bench/readme_table.py:

    python bench/bench_kernel.py --out bench/results/kernel.json [--plot bench/results/kernel.png]
"""

import sys

from fusedlstm.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

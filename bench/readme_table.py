"""Render a kernel report (written by `fusedlstm bench --out FILE`) as the README's performance
tables in Markdown, so the README quotes measured numbers only:

    python bench/readme_table.py [FILE]    (default: bench/results/kernel.json)
"""

import json
import sys
from pathlib import Path

from fusedlstm.bench.report import markdown_tables

if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results" / "kernel.json"
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        sys.exit(f"error: {path}: {exc}")
    print(markdown_tables(report), end="")

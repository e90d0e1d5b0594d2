"""Render a kernel report (written by `fusedlstm bench --out FILE`) as performance tables in
Markdown, so the docs quote measured numbers only: the README's compact table, or with --full
the tables of docs/performance.md:

    python bench/readme_table.py [--full] [FILE]    (default: bench/results/kernel.json)
"""

import json
import sys
from pathlib import Path

from fusedlstm.bench.report import compact_table, markdown_tables

if __name__ == "__main__":
    args = sys.argv[1:]
    full = "--full" in args
    args = [a for a in args if a != "--full"]
    path = Path(args[0]) if args else Path(__file__).resolve().parent / "results" / "kernel.json"
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        sys.exit(f"error: {path}: {exc}")
    print(markdown_tables(report) if full else compact_table(report), end="")

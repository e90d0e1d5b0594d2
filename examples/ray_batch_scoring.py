"""Score a text file (one sentence per line) with a trained classifier on Ray Data.

    pip install 'fusedlstm[ray]'
    fusedlstm train --dataset sst2 --out model/
    python examples/ray_batch_scoring.py model/ sentences.txt --out scored/ [--actors N] [--address auto]

Each scoring actor builds one fusedlstm.BatchScorer (the model loaded and packed once) and scores
every batch it is given; the rows come back with `label` and `probability` columns. On a cluster
of several machines the model directory must be readable at the same path on each of them (a
shared file system, or copied there): BatchScorer ships as its path, never its weights. Without
--address the script starts a local cluster on this machine and stops it at the end.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import ray

import fusedlstm


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="model directory (fusedlstm train --out)")
    ap.add_argument("input", help="text file, one sentence per line (or a folder of them)")
    ap.add_argument("--out", help="write the scored rows here as JSON files (default: print the first 10)")
    ap.add_argument(
        "--actors",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="scoring actors, one CPU each (default: the CPUs but one, which reading the file needs)",
    )
    ap.add_argument("--batch-size", type=int, default=1024, help="rows per batch handed to an actor (default 1024)")
    ap.add_argument("--address", help="an existing Ray cluster (e.g. auto); default: start a local one")
    args = ap.parse_args(argv)

    model_dir = str(Path(args.model).resolve())  # the actors may run in other working directories
    fusedlstm.BatchScorer(model_dir)  # fail here, with a clear error, if the model does not load
    ray.init(address=args.address, include_dashboard=False)
    try:
        ds = ray.data.read_text(str(Path(args.input).resolve()))  # one row {"text": line} per line
        ds = ds.filter(lambda row: bool(row["text"].strip()))  # empty lines have nothing to classify
        scored = ds.map_batches(
            fusedlstm.BatchScorer,
            fn_constructor_args=(model_dir,),
            batch_size=args.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=args.actors),
            num_cpus=1,
        )
        if args.out:
            scored.write_json(args.out)
            print(f"scored rows written to {args.out}")
        else:
            for row in scored.take(10):
                print(f"{row['label']}\t{row['probability']:.4f}\t{row['text']}")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()

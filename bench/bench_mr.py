"""MR (Pang & Lee sentence polarity) 10-fold cross-validation with fusedlstm's default
classifier: for each fold, train on the other nine (10% of them held out as dev for early
stopping), test on the fold. Reports mean ± std accuracy and, with --out, writes JSON.

    python bench/bench_mr.py --dataset mr      # download rt-polaritydata into the cache
    python bench/bench_mr.py --data DIR        # a folder with rt-polarity.pos / rt-polarity.neg
        [--vectors glove-6b-50d] [--folds 10] [--epochs 20] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import fusedlstm
from fusedlstm import SentimentClassifier
from fusedlstm.sentiment import TrainOptions
from fusedlstm.sentiment.data import fetch, kfold, load_data


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--data", help="a folder of Pang & Lee *.pos / *.neg files")
    where.add_argument("--dataset", choices=["mr"], help="download MR (rt-polaritydata) into the cache; needs network")
    ap.add_argument("--vectors", default="glove-6b-50d")
    ap.add_argument("--folds", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--freeze-embeddings",
        action="store_true",
        help="the original model's frozen vectors (default: fine-tuned, as fusedlstm train)",
    )
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here (default: print only)")
    args = ap.parse_args(argv)
    path = args.data
    if path is None:
        try:
            path = fetch(args.dataset)
        except RuntimeError as exc:
            raise SystemExit(f"error: {exc}\nDownload it yourself and pass --data DIR.") from None
    splits = load_data(path)
    if "all" not in splits:
        raise SystemExit(f"error: {path}: expected Pang & Lee *.pos / *.neg files for cross-validation")
    data = splits["all"]
    accs, secs = [], []
    for fold, (tr, te) in enumerate(kfold(len(data), args.folds, args.seed)):
        perm = np.random.default_rng([args.seed, fold]).permutation(tr)
        k = len(perm) // 10
        dev, train = data.subset(perm[:k]), data.subset(perm[k:])
        model = SentimentClassifier.create(
            train,
            vectors=args.vectors,
            seed=args.seed + fold,
            train_embeddings=not args.freeze_embeddings,
            log=lambda *a: None,
        )
        t0 = time.perf_counter()
        model.fit(
            train, dev, TrainOptions(epochs=args.epochs, seed=args.seed + fold, progress=False), log=lambda *a: None
        )
        secs.append(time.perf_counter() - t0)
        accs.append(100 * model.evaluate(data.subset(te))["accuracy"])
        print(f"fold {fold}: test accuracy {accs[-1]:.2f}%  ({secs[-1]:.1f} s)", flush=True)
    mean, std = statistics.mean(accs), statistics.stdev(accs)
    print(
        f"MR {args.folds}-fold CV: {mean:.2f}% ± {std:.2f} ({args.vectors}, "
        f"{'frozen' if args.freeze_embeddings else 'fine-tuned'})"
    )
    if args.out is None:
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {
                "benchmark": "mr_cv",
                "args": {k: str(v) for k, v in vars(args).items()},
                "build": fusedlstm.build_info(),
                "fold_acc": accs,
                "fold_seconds": secs,
                "mean": mean,
                "std": std,
            },
            indent=1,
        )
    )
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The sentiment application's commands: `fusedlstm train | eval | predict`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

__all__ = ["add_commands"]


def _splits(args):
    from .data import fetch, kfold, load_data

    if args.data is None and getattr(args, "dataset", None) is None:
        raise SystemExit("error: give --data PATH (or --dataset sst2|mr|imdb to download)")
    path = args.data if args.data is not None else fetch(args.dataset)
    splits = load_data(path, args.text_column, args.label_column)
    report_skipped(splits)
    if "all" in splits:  # polarity files: k-fold cross-validation
        all_ = splits.pop("all")
        folds = kfold(len(all_), args.folds, args.seed)
        tr, te = folds[args.fold]
        splits = {"train": all_.subset(tr), "test": all_.subset(te)}
    return splits


def report_skipped(splits) -> None:
    """Say on stderr which rows a reader left out, and why (the first few of them)."""
    for name, split in splits.items():
        if split.skipped:
            print(f"warning: {name}: skipped {len(split.skipped)} unreadable row(s): "
                  + "; ".join(split.skipped[:5]) + (" ..." if len(split.skipped) > 5 else ""),
                  file=sys.stderr)


def _dev_from_train(train, seed: int, fraction: float = 0.1):
    perm = np.random.default_rng([seed, 7]).permutation(len(train))
    k = max(1, int(len(train) * fraction))
    return train.subset(perm[k:]), train.subset(perm[:k])


def cmd_train(args) -> int:
    from .model import SentimentClassifier, TrainOptions

    if args.embedding_dim is None and args.vectors is None:
        args.embedding_dim = 64

    splits = _splits(args)
    train, dev = splits["train"], splits.get("dev")
    if dev is None:
        train, dev = _dev_from_train(train, args.seed)
        print(f"no dev split: holding out {len(dev)} training sentences for early stopping")
    out = Path(args.out)
    if args.resume:
        model = SentimentClassifier.load(out)
    else:
        if (out / "state.npz").exists() and not args.overwrite:
            raise SystemExit(f"error: {out} already holds a training run; use --resume to "
                             "continue it or --overwrite to start again")
        model = SentimentClassifier.create(
            train, units=args.units, vectors=args.vectors, embedding_dim=args.embedding_dim,
            max_len=args.max_len, min_count=args.min_count, max_vocab=args.max_vocab,
            keep_prob=args.keep_prob, train_embeddings=args.train_embeddings, seed=args.seed)
    opts = TrainOptions(epochs=args.epochs, steps=args.steps, batch_size=args.batch_size,
                        lr=args.lr, clip_norm=args.clip_norm if args.clip_norm > 0 else None,
                        patience=args.patience, seed=args.seed, progress=not args.quiet,
                        average=args.average)
    metrics = model.fit(train, dev, opts, out_dir=out, resume=args.resume)
    if not metrics:  # nothing left to train (resumed a finished run)
        model.save(out)
    if args.plot:
        plot_metrics(metrics, Path(args.plot))
    if "test" in splits and not args.no_test:
        ev = model.evaluate(splits["test"])
        print(f"test accuracy {ev['accuracy']:.4f}  macro-F1 {ev['macro_f1']:.4f}")
    print(f"model saved to {out}")
    return 0


def plot_metrics(metrics: List[dict], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: --plot needs matplotlib: pip install 'fusedlstm[plot]'")
    ep = [m["epoch"] for m in metrics]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(ep, [m["train_loss"] for m in metrics], "o-", label="train")
    if metrics and "dev_loss" in metrics[0]:
        a.plot(ep, [m["dev_loss"] for m in metrics], "o-", label="dev")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend()
    b.plot(ep, [m["train_acc"] for m in metrics], "o-", label="train")
    if metrics and "dev_acc" in metrics[0]:
        b.plot(ep, [m["dev_acc"] for m in metrics], "o-", label="dev")
    b.set_xlabel("epoch"), b.set_ylabel("accuracy"), b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"learning curves written to {path}")


def cmd_eval(args) -> int:
    from .data import load_data
    from .model import SentimentClassifier

    model = SentimentClassifier.load(args.model)
    splits = load_data(args.data, args.text_column, args.label_column)
    report_skipped(splits)
    split = splits.get("test") or splits.get("all") or splits["train"]
    ev = model.evaluate(split)
    if args.json:
        print(json.dumps(ev))
    else:
        print(f"accuracy {ev['accuracy']:.4f}  macro-F1 {ev['macro_f1']:.4f}  (n={ev['n']})")
        print("confusion matrix (rows: true, columns: predicted), labels", ev["labels"])
        for row in ev["confusion_matrix"]:
            print("  " + " ".join(f"{v:6d}" for v in row))
    return 0


def cmd_predict(args) -> int:
    from .model import SentimentClassifier

    model = SentimentClassifier.load(args.model)
    if args.sentences:
        texts = args.sentences
    elif args.file:
        texts = Path(args.file).read_text(encoding="utf-8").splitlines()
    else:
        texts = sys.stdin.read().splitlines()
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise SystemExit("error: no sentences to predict")
    for r in model.predict(texts):
        print(json.dumps(r) if args.json else f"{r['label']}\t{r['probability']:.4f}\t{r['text']}")
    return 0


def _data_args(p):
    p.add_argument("--text-column", help="text column of a TSV/CSV (default: sentence/text/...)")
    p.add_argument("--label-column", help="label column of a TSV/CSV (default: label/...)")


def add_commands(sub) -> None:
    """Add train, eval and predict to an argparse subparsers object."""
    t = sub.add_parser("train", help="train a classifier")
    t.add_argument("--data", help="TSV/CSV file, GLUE dir (train/dev/test.tsv), *.pos/*.neg dir, or aclImdb dir")
    t.add_argument("--dataset", choices=["sst2", "mr", "imdb"], help="download a public data set (needs network)")
    t.add_argument("--out", required=True, help="model directory")
    t.add_argument("--vectors", help="word vectors: a .txt/.vec(.gz)/word2vec .bin file, or glove-6b-50d")
    t.add_argument("--embedding-dim", type=int, default=None, help="without --vectors: random embedding size (default 64)")
    emb = t.add_mutually_exclusive_group()
    emb.add_argument("--train-embeddings", dest="train_embeddings", action="store_true", default=True,
                     help="fine-tune the vectors with sparse (lazy Adam) updates (the default)")
    emb.add_argument("--freeze-embeddings", dest="train_embeddings", action="store_false",
                     help="keep the pre-trained vectors fixed, as the original model does")
    t.add_argument("--units", type=int, default=128, help="LSTM hidden units (default 128)")
    t.add_argument("--max-len", type=int, default=None, help="default: covers 95%% of training sentences")
    t.add_argument("--min-count", type=int, default=1,
                   help="keep words seen at least this often in train (default 1)")
    t.add_argument("--max-vocab", type=int, default=None,
                   help="keep at most this many of the most frequent words (default: all)")
    t.add_argument("--keep-prob", type=float, default=0.8, help="dropout keep probability (default 0.8)")
    t.add_argument("--epochs", type=int, default=20, help="at most this many epochs (default 20)")
    t.add_argument("--steps", type=int, default=None, help="stop after this many updates")
    t.add_argument("--batch-size", type=int, default=32, help="default 32")
    t.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    t.add_argument("--clip-norm", type=float, default=5.0, help="global gradient norm clip (default 5; 0: off)")
    t.add_argument("--average", type=float, default=0.999,
                   help="decay of the moving average of the weights that dev sees and that is kept "
                        "(default 0.999; 0: off)")
    t.add_argument("--patience", type=int, default=5, help="epochs without dev improvement before stopping (default 5)")
    t.add_argument("--seed", type=int, default=0, help="same seed, bit-identical run (default 0)")
    t.add_argument("--folds", type=int, default=10, help="k for *.pos/*.neg data (cross-validation; default 10)")
    t.add_argument("--fold", type=int, default=0, help="which fold is the test set (default 0)")
    t.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    t.add_argument("--overwrite", action="store_true", help="start again over an existing run in --out")
    t.add_argument("--plot", help="write learning curves to this PNG")
    t.add_argument("--no-test", action="store_true", help="do not report the test split at the end")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    _data_args(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="accuracy, macro-F1 and confusion matrix of a model")
    e.add_argument("model")
    e.add_argument("--data", required=True, help="a file, or a directory's test split")
    e.add_argument("--json", action="store_true")
    _data_args(e)
    e.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="label and probability per sentence")
    pr.add_argument("model")
    pr.add_argument("sentences", nargs="*")
    pr.add_argument("--file", help="one sentence per line")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_predict)

"""The sentiment application's commands: `fusedlstm train | eval | predict`."""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .data import Split

__all__ = ["add_commands"]


# Library arguments and the flags that set them: errors from the library name the argument, the
# CLI says the flag.
_FLAGS = {
    "text_column": "--text-column",
    "label_column": "--label-column",
    "embedding_dim": "--embedding-dim",
    "max_len": "--max-len",
    "keep_prob": "--keep-prob",
    "batch_size": "--batch-size",
    "clip_norm": "--clip-norm",
    "min_count": "--min-count",
    "max_size": "--max-vocab",
}


def _reword(exc: Exception, prefix: str = "") -> Exception:
    """The same exception type with flag names for argument names (and an optional prefix)."""
    msg = str(exc)
    for name, flag in _FLAGS.items():
        msg = re.sub(rf"\b{name}\b", flag, msg)
    return type(exc)(prefix + msg)


def _load(path, args) -> dict[str, Split]:
    from .data import load_data

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            splits = load_data(path, args.text_column, args.label_column)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"--data {exc}") from None
    except ValueError as exc:
        raise _reword(exc) from None
    for w in caught:
        print(f"note: {w.message}", file=sys.stderr)
    report_skipped(splits)
    return splits


def _splits(args) -> dict[str, Split]:
    from .data import ChecksumError, DownloadError, fetch, kfold

    if args.data is None and getattr(args, "dataset", None) is None:
        raise SystemExit("error: give --data PATH (or --dataset sst2|mr|imdb to download)")
    path = args.data
    if path is None:
        try:
            path = fetch(args.dataset)
        except (DownloadError, ChecksumError) as exc:
            raise type(exc)(f"--dataset {args.dataset}: {exc}; or pass --data PATH") from None
    splits = _load(path, args)
    if "all" in splits:  # polarity files: k-fold cross-validation
        all_ = splits.pop("all")
        folds = kfold(len(all_), args.folds, args.seed)
        tr, te = folds[args.fold]
        splits = {"train": all_.subset(tr), "test": all_.subset(te)}
    return splits


def report_skipped(splits: dict[str, Split]) -> None:
    """Say on stderr which rows a reader left out, and why (the first few of them)."""
    for name, split in splits.items():
        if split.skipped:
            print(
                f"warning: {name}: skipped {len(split.skipped)} unreadable row(s): "
                + "; ".join(split.skipped[:5])
                + (" ..." if len(split.skipped) > 5 else ""),
                file=sys.stderr,
            )


def _dev_from_train(train: Split, seed: int, fraction: float = 0.1) -> tuple[Split, Split]:
    perm = np.random.default_rng([seed, 7]).permutation(len(train))
    k = max(1, int(len(train) * fraction))
    return train.subset(perm[k:]), train.subset(perm[:k])


def cmd_train(args: argparse.Namespace) -> int:
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
        if args.precision is not None and args.precision != model.config.precision:
            raise SystemExit(
                f"error: --precision {args.precision}: the run in {out} trains in {model.config.precision}; "
                "a resumed run keeps its precision"
            )
    else:
        if (out / "state.npz").exists() and not args.overwrite:
            raise SystemExit(
                f"error: {out} already holds a training run; use --resume to continue it or --overwrite to start again"
            )
        try:
            model = SentimentClassifier.create(
                train,
                units=args.units,
                vectors=args.vectors,
                embedding_dim=args.embedding_dim,
                max_len=args.max_len,
                min_count=args.min_count,
                max_vocab=args.max_vocab,
                keep_prob=args.keep_prob,
                train_embeddings=args.train_embeddings,
                layers=args.layers,
                bidirectional=args.bidirectional,
                pooling=args.pooling,
                embedding_keep_prob=args.embedding_keep_prob,
                precision=args.precision or "float32",
                seed=args.seed,
            )
        except (ValueError, FileNotFoundError, ImportError, RuntimeError) as exc:
            raise _reword(exc) from None
    opts = TrainOptions(
        epochs=args.epochs,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        clip_norm=args.clip_norm if args.clip_norm > 0 else None,
        patience=args.patience,
        seed=args.seed,
        progress=not args.quiet,
        average=args.average,
    )
    try:
        metrics = model.fit(train, dev, opts, out_dir=out, resume=args.resume)
    except (ValueError, FileNotFoundError) as exc:
        if args.resume:
            raise _reword(exc, "--resume: ") from None
        raise _reword(exc) from None
    if not metrics:  # nothing left to train (resumed a finished run)
        model.save(out)
    if args.plot:
        plot_metrics(metrics, Path(args.plot))
    if "test" in splits and not args.no_test:
        ev = model.evaluate(splits["test"])
        print(f"test accuracy {ev['accuracy']:.4f}  macro-F1 {ev['macro_f1']:.4f}")
    print(f"model saved to {out}")
    return 0


def plot_metrics(metrics: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: --plot needs matplotlib: pip install 'fusedlstm[plot]'") from None
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


def cmd_eval(args: argparse.Namespace) -> int:
    from .model import SentimentClassifier

    model = SentimentClassifier.load(args.model)
    splits = _load(args.data, args)
    name = next(n for n in ("test", "dev", "all", "train") if n in splits)  # the most held-out one
    ev = model.evaluate(splits[name])
    if args.json:
        print(json.dumps(ev))
    else:
        print(f"{name} split of {args.data}")
        print(f"accuracy {ev['accuracy']:.4f}  macro-F1 {ev['macro_f1']:.4f}  (n={ev['n']})")
        print("confusion matrix (rows: true, columns: predicted), labels", ev["labels"])
        for row in ev["confusion_matrix"]:
            print("  " + " ".join(f"{v:6d}" for v in row))
    return 0


def _open_input(args: argparse.Namespace):
    """(binary stream, its name for errors, its size in bytes or None) of --file (or stdin)."""
    if args.file in (None, "-"):
        return sys.stdin.buffer, "<stdin>", None
    path = Path(args.file)
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"--file {path}: not found") from None
    except OSError as exc:
        raise FileNotFoundError(f"--file {path}: cannot be read ({exc.strerror})") from None
    try:
        size = path.stat().st_size if path.is_file() else None
    except OSError:
        size = None
    return f, str(path), size


def _format(r: dict, as_json: bool) -> str:
    if as_json:
        return json.dumps(r)
    if r["label"] is None:  # an empty line: an empty label field, in its place
        return f"\t\t{r['text']}"
    return f"{r['label']}\t{r['probability']:.4f}\t{r['text']}"


def cmd_predict(args: argparse.Namespace) -> int:
    from .model import SentimentClassifier
    from .serving import predict_stream, read_lines

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.sentences and args.file is not None:
        raise SystemExit("error: give sentences as arguments or --file, not both")
    model = SentimentClassifier.load(args.model)
    stream, size, source = None, None, "arguments"
    if args.sentences:
        lines = iter(args.sentences)
    else:
        stream, source, size = _open_input(args)
        lines = read_lines(stream, source)
    bar = None
    if not args.no_progress and sys.stderr.isatty() and not args.sentences:
        from tqdm import tqdm

        # A file's progress is its bytes (an ETA); a pipe's is the sentences answered so far.
        bar = tqdm(total=size, unit="B" if size else " sentences", unit_scale=True, file=sys.stderr, leave=False)
    out = sys.stdout
    n = empty = first_empty = 0
    pending: list[str] = []
    try:
        for r in predict_stream(model, lines, batch_size=args.batch_size):
            n += 1
            if r["label"] is None:
                empty += 1
                first_empty = first_empty or n
            pending.append(_format(r, args.json))
            if bar is not None:
                bar.update(len(r["text"].encode("utf-8")) + 1 if size else 1)
            if len(pending) >= 4096:  # write as we go, a bounded buffer at a time
                out.write("\n".join(pending) + "\n")
                out.flush()
                pending.clear()
        if pending:
            out.write("\n".join(pending) + "\n")
        out.flush()
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly; point stdout at devnull so the
        # interpreter's final flush does not fail again.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if bar is not None:
            bar.close()
        if stream is not None and stream is not sys.stdin.buffer:
            stream.close()
    if n == 0:
        raise SystemExit(f"error: no sentences to predict in {source}")
    if empty:
        print(
            f"note: {empty} empty line(s) answered without a label (the first is line {first_empty})",
            file=sys.stderr,
        )
    return 0


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-column", help="text column of a TSV/CSV (default: sentence/text/...)")
    p.add_argument("--label-column", help="label column of a TSV/CSV (default: label/...)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add train, eval and predict to an argparse subparsers object."""
    t = sub.add_parser("train", help="train a classifier")
    t.add_argument("--data", help="TSV/CSV file, GLUE dir (train/dev/test.tsv), *.pos/*.neg dir, or aclImdb dir")
    t.add_argument("--dataset", choices=["sst2", "mr", "imdb"], help="download a public data set (needs network)")
    t.add_argument("--out", required=True, help="model directory")
    t.add_argument("--vectors", help="word vectors: a .txt/.vec(.gz)/word2vec .bin file, or glove-6b-50d")
    t.add_argument(
        "--embedding-dim", type=int, default=None, help="without --vectors: random embedding size (default 64)"
    )
    emb = t.add_mutually_exclusive_group()
    emb.add_argument(
        "--train-embeddings",
        dest="train_embeddings",
        action="store_true",
        default=True,
        help="fine-tune the vectors with sparse (lazy Adam) updates (the default)",
    )
    emb.add_argument(
        "--freeze-embeddings",
        dest="train_embeddings",
        action="store_false",
        help="keep the pre-trained vectors fixed, as the original model does",
    )
    t.add_argument("--units", type=int, default=128, help="LSTM hidden units per direction (default 128)")
    from .model import DEFAULT_ARCHITECTURE as arch

    t.add_argument(
        "--layers",
        type=int,
        default=arch["layers"],
        help=f"stacked LSTM layers (default {arch['layers']}; the original model: --layers 1 --no-bidirectional "
        "--pooling last --embedding-keep-prob 1)",
    )
    t.add_argument(
        "--bidirectional",
        action=argparse.BooleanOptionalAction,
        default=arch["bidirectional"],
        help=f"each layer reads the sentence both ways (default {'on' if arch['bidirectional'] else 'off'})",
    )
    t.add_argument(
        "--pooling",
        choices=["last", "max", "mean"],
        default=arch["pooling"],
        help=f"sentence vector: the last valid output, or the max or mean over the valid steps "
        f"(default {arch['pooling']})",
    )
    t.add_argument(
        "--precision",
        choices=["float32", "bfloat16"],
        default=None,
        help="the LSTM's products: float32 (default) or bfloat16 (AVX512_BF16 CPUs, AMX where present: "
        "faster, float32 weights and gradients); saved with the model, predict and eval use it",
    )
    t.add_argument("--max-len", type=int, default=None, help="default: covers 95%% of training sentences")
    t.add_argument("--min-count", type=int, default=1, help="keep words seen at least this often in train (default 1)")
    t.add_argument(
        "--max-vocab", type=int, default=None, help="keep at most this many of the most frequent words (default: all)"
    )
    t.add_argument("--keep-prob", type=float, default=0.8, help="dropout keep probability (default 0.8)")
    t.add_argument(
        "--embedding-keep-prob",
        type=float,
        default=arch["embedding_keep_prob"],
        help=f"dropout keep probability on the word vectors, in training (default {arch['embedding_keep_prob']}; "
        "1: none)",
    )
    t.add_argument("--epochs", type=int, default=20, help="at most this many epochs (default 20)")
    t.add_argument("--steps", type=int, default=None, help="stop after this many updates")
    t.add_argument("--batch-size", type=int, default=32, help="default 32")
    t.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    t.add_argument("--clip-norm", type=float, default=5.0, help="global gradient norm clip (default 5; 0: off)")
    t.add_argument(
        "--average",
        type=float,
        default=0.999,
        help="decay of the moving average of the weights that dev sees and that is kept (default 0.999; 0: off)",
    )
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
    e.add_argument("--data", required=True, help="a file, or a directory (its test split; else dev; else all of it)")
    e.add_argument("--json", action="store_true")
    _data_args(e)
    e.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="label and probability per sentence")
    pr.add_argument("model")
    pr.add_argument("sentences", nargs="*")
    pr.add_argument("--file", help="one sentence per line, read as it is scored ('-': standard input)")
    pr.add_argument("--batch-size", type=int, default=256, help="sentences per kernel call (default 256)")
    pr.add_argument("--json", action="store_true", help="JSON lines: text, label, probability (error: empty lines)")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar (shown only when stderr is a terminal)")
    pr.set_defaults(func=cmd_predict)

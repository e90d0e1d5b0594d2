"""End-to-end SST-2 benchmark: fusedlstm's SentimentClassifier vs the same model in PyTorch
(nn.Embedding from the same vectors, fine-tuned with a sparse gradient and SparseAdam = lazy Adam
as ours, or with --freeze-embeddings frozen -> nn.LSTM with the same layers and directions (a
packed batch when bidirectional) -> the same pooling over each sentence's valid steps -> dropout
-> nn.Linear, Adam, the same clipping and weight averaging, same hyper-parameters and the very
same batches), trained side by side
in one run over several seeds. Reports test accuracy at the dev-selected epoch (mean ± std) and
seconds per epoch, prints a table and, with --out, writes JSON.

    python bench/bench_sst2.py --dataset sst2        # download (GLUE SST-2) into the cache
    python bench/bench_sst2.py --data DIR            # a GLUE-style dir: train/dev[/test].tsv
        [--seeds 0,1,2] [--epochs 20] [--freeze-embeddings] [--no-torch]
        [--layers N] [--[no-]bidirectional] [--pooling last|max|mean] [--embedding-keep-prob P]
        [--keep-prob P] [--units H]     (the architecture defaults to the classifier's)
        [--torch-dense-embedding-adam] [--precision float32,bfloat16] [--out results.json]

--precision bfloat16 trains our model with bfloat16 products (fusedlstm train --precision
bfloat16) and the PyTorch twin under torch.autocast(dtype=torch.bfloat16); with both, each seed
trains both ways from the same initial weights (results keyed fusedlstm, torch and
fusedlstm.bfloat16, torch.bfloat16).

Without a labelled test split (GLUE's test labels are not public), the dev split is the test set
and a tenth of train is held out as dev.
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
from fusedlstm.sentiment.data import Split, fetch, load_data
from fusedlstm.sentiment.layers import dropout_mask
from fusedlstm.sentiment.model import DEFAULT_ARCHITECTURE
from fusedlstm.sentiment.training import Callback, TrainOptions, batches


def torch_run(
    model: SentimentClassifier,
    init,
    splits,
    opts: TrainOptions,
    epochs: int,
    result: dict,
    dense_embedding_adam: bool = False,
    precision: str = "float32",
):
    """The same network in PyTorch, initialised from `init` (our untrained weights), trained on
    the same batches and dropout masks. A generator: it yields after each epoch so the caller
    can interleave its epochs with ours; fills result with the test accuracy at the best dev
    epoch and the epoch seconds."""
    import torch
    from torch_twin import make_lstm, sentence_vectors

    torch.manual_seed(opts.seed)
    p = init
    V, E = p["embedding"].shape
    cfg = model.config
    H, C, D = cfg.units, cfg.num_classes, cfg.directions
    # Fine-tuned vectors: by default the same algorithm as ours, a sparse embedding gradient and
    # lazy Adam on its rows (torch.optim.SparseAdam); dense_embedding_adam: the plain PyTorch
    # way (dense gradient, Adam over the whole table every step).
    lazy = model.config.train_embeddings and not dense_embedding_adam
    emb = torch.nn.Embedding(V, E, padding_idx=0, sparse=lazy)
    emb.weight.data.copy_(torch.from_numpy(p["embedding"]))
    emb.weight.requires_grad_(model.config.train_embeddings)
    lstm = make_lstm(cfg, p)
    dense = torch.nn.Linear(D * H, C)
    dense.weight.data.copy_(torch.from_numpy(p["dense_w"].T.copy()))
    dense.bias.data.copy_(torch.from_numpy(p["dense_b"]))
    params = [q for m in ((lstm, dense) if lazy else (emb, lstm, dense)) for q in m.parameters() if q.requires_grad]
    opt = torch.optim.Adam(params, lr=opts.lr)
    sparse_opt = torch.optim.SparseAdam([emb.weight], lr=opts.lr) if lazy else None

    def clip_gradients():
        # Global-norm clipping over the dense gradients and the embedding's rows, as ours
        # (clip_grad_norm_ does not take sparse gradients).
        if lazy:
            emb.weight.grad = emb.weight.grad.coalesce()
        sq = sum(q.grad.pow(2).sum() for q in params)
        if lazy:
            sq = sq + emb.weight.grad._values().pow(2).sum()
        norm = float(sq.sqrt())
        if opts.clip_norm is not None and norm > opts.clip_norm:
            scale = opts.clip_norm / (norm + 1e-12)
            for q in params:
                q.grad.mul_(scale)
            if lazy:
                emb.weight.grad = emb.weight.grad * scale

    lm = model.label_map

    def encode(split):
        ids, lengths = model.encode(split.texts)
        return torch.from_numpy(ids.astype(np.int64)), lengths, torch.from_numpy(lm.encode(split.labels))

    tr_ids, tr_len, tr_y = encode(splits["train"])
    import contextlib

    def autocast():
        if precision == "bfloat16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def logits_of(ids, lengths, mask=None, emb_mask=None):
        T = int(lengths.max())
        x = emb(ids[:, :T])
        if emb_mask is not None:
            x = x * emb_mask
        with autocast():
            last = sentence_vectors(cfg, lstm, x, lengths).float()
        if mask is not None:
            last = last * mask
        return dense(last)

    def accuracy(split):
        ids, lengths, y = encode(split)
        with torch.no_grad():
            pred = torch.cat(
                [logits_of(ids[s : s + 256], lengths[s : s + 256]).argmax(1) for s in range(0, len(y), 256)]
            )
        return float((pred == y).float().mean())

    # The same weight averaging as fusedlstm's fit (TrainOptions.average): the LSTM's and the
    # dense layer's moving average is what dev and test see; the embedding is used as trained.
    averaged = [q for m in (lstm, dense) for q in m.parameters()]
    avg = [q.detach().clone() for q in averaged]
    step = 0

    def swap_in_average():
        with torch.no_grad():
            for a, q in zip(avg, averaged):
                tmp = q.detach().clone()
                q.copy_(a)
                a.copy_(tmp)

    best_dev, best_test, times = -1.0, 0.0, []
    for epoch in range(epochs):
        rng = np.random.default_rng([opts.seed, epoch])
        t0 = time.perf_counter()
        for b in batches(rng, tr_len, opts.batch_size, opts.bucket):
            mask = torch.from_numpy(dropout_mask(rng, (len(b), D * H), model.config.keep_prob, np.float32))
            emb_mask = None
            if cfg.embedding_keep_prob < 1:  # drawn as fusedlstm's fit draws it
                shape = (len(b), int(tr_len[b].max()), E)
                emb_mask = torch.from_numpy(dropout_mask(rng, shape, cfg.embedding_keep_prob, np.float32))
            bt = torch.from_numpy(b)
            loss = torch.nn.functional.cross_entropy(logits_of(tr_ids[bt], tr_len[b], mask, emb_mask), tr_y[bt])
            opt.zero_grad()
            if lazy:
                emb.weight.grad = None
            loss.backward()
            clip_gradients()
            opt.step()
            if lazy:
                sparse_opt.step()
            step += 1
            if opts.average > 0:
                keep = min(opts.average, (1 + step) / (10 + step))
                with torch.no_grad():
                    for a, q in zip(avg, averaged):
                        a.sub_((1 - keep) * (a - q))
        times.append(time.perf_counter() - t0)
        if opts.average > 0:
            swap_in_average()
        dev = accuracy(splits["dev"])
        if dev > best_dev:
            best_dev, best_test = dev, accuracy(splits["test"])
        if opts.average > 0:
            swap_in_average()  # back to the trained weights
        result.update(dev_acc=best_dev, test_acc=best_test, epoch_s=times)
        yield


def load_splits(data: str | None, dataset: str | None) -> dict[str, Split]:
    """train/dev/test from --data or the --dataset download; dev becomes test (and a tenth of
    train dev) when there is no labelled test split."""
    if data is None:
        try:
            data = fetch(dataset)
        except RuntimeError as exc:
            raise SystemExit(f"error: {exc}\nDownload it yourself and pass --data DIR.") from None
    splits = load_data(data)
    if "dev" not in splits:
        raise SystemExit(f"error: {data}: needs a dev split (dev.tsv) for model selection")
    if "test" not in splits:
        train = splits["train"]
        perm = np.random.default_rng(7).permutation(len(train))
        k = len(train) // 10
        splits = {"train": train.subset(perm[k:]), "dev": train.subset(perm[:k]), "test": splits["dev"]}
        print(
            f"no labelled test split: {data}'s dev split is the test set, {k} training sentences are held out as dev",
            flush=True,
        )
    return splits


def train_pair(args, splits, seed: int, precision: str, have_torch: bool) -> tuple[dict, dict]:
    """One seed at one precision: our model and (have_torch) its PyTorch twin from the same
    initial weights, their epochs interleaved so the machine's drift hits both alike."""
    model = SentimentClassifier.create(
        splits["train"],
        vectors=args.vectors,
        seed=seed,
        train_embeddings=not args.freeze_embeddings,
        units=args.units,
        layers=args.layers,
        bidirectional=args.bidirectional,
        pooling=args.pooling,
        embedding_keep_prob=args.embedding_keep_prob,
        keep_prob=args.keep_prob,
        precision=precision,
        log=lambda *a: None,
    )
    init = {k: v.copy() for k, v in model.params.items()}
    # patience=epochs: train every epoch in both, select on dev, like the torch run.
    opts = TrainOptions(epochs=args.epochs, seed=seed, progress=False, patience=args.epochs)
    theirs: dict = {}
    twin = (
        torch_run(model, init, splits, opts, args.epochs, theirs, args.torch_dense_embedding_adam, precision)
        if have_torch
        else iter(())
    )

    class Interleave(Callback):
        def on_epoch_end(self, epoch, logs, twin=twin):
            next(twin, None)

    metrics = model.fit(splits["train"], splits["dev"], opts, log=lambda *a: None, callbacks=[Interleave()])
    for _ in twin:  # any epochs left (none: both train every epoch)
        pass
    ours = {
        "dev_acc": max(m["dev_acc"] for m in metrics),
        "test_acc": model.evaluate(splits["test"])["accuracy"],
        "epoch_s": [m["seconds"] for m in metrics],
        "best_epoch": int(np.argmax([m["dev_acc"] for m in metrics])) + 1,
    }
    return ours, theirs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--data", help="a GLUE-style directory: train.tsv, dev.tsv and (labelled) test.tsv")
    where.add_argument("--dataset", choices=["sst2"], help="download SST-2 (GLUE) into the cache; needs network")
    ap.add_argument("--vectors", default="glove-6b-50d")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument(
        "--freeze-embeddings",
        action="store_true",
        help="the original model's frozen vectors (default: fine-tuned, as fusedlstm train)",
    )
    # The architecture defaults to the classifier's (DEFAULT_ARCHITECTURE); the original model:
    # --layers 1 --no-bidirectional --pooling last --embedding-keep-prob 1.
    arch = DEFAULT_ARCHITECTURE
    ap.add_argument("--units", type=int, default=128, help="LSTM units per direction (default 128)")
    ap.add_argument("--layers", type=int, default=arch["layers"])
    ap.add_argument("--bidirectional", action=argparse.BooleanOptionalAction, default=arch["bidirectional"])
    ap.add_argument("--pooling", choices=["last", "max", "mean"], default=arch["pooling"])
    ap.add_argument("--embedding-keep-prob", type=float, default=arch["embedding_keep_prob"])
    ap.add_argument("--keep-prob", type=float, default=0.8, help="dropout keep probability on the features")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument(
        "--torch-dense-embedding-adam",
        action="store_true",
        help="PyTorch twin: dense embedding gradient and Adam (default: sparse + SparseAdam, ours)",
    )
    ap.add_argument(
        "--precision",
        default="float32",
        help="comma-separated: float32 and/or bfloat16 (ours: bfloat16 products; torch: autocast)",
    )
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here (default: print only)")
    args = ap.parse_args(argv)
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    if not precisions or any(p not in ("float32", "bfloat16") for p in precisions):
        ap.error(f"--precision: expected float32 and/or bfloat16, got {args.precision!r}")
    splits = load_splits(args.data, args.dataset)
    have_torch = not args.no_torch
    if have_torch:
        try:
            import torch

            torch.set_num_threads(fusedlstm.get_num_threads())
        except ImportError:
            have_torch = False
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        row = {"seed": seed}
        for precision in precisions:
            sfx = "" if precision == "float32" else f".{precision}"
            ours, theirs = train_pair(args, splits, seed, precision, have_torch)
            row["fusedlstm" + sfx] = ours
            if have_torch:
                row["torch" + sfx] = theirs
        rows.append(row)
        print(
            json.dumps(
                {
                    k: (
                        v
                        if k == "seed"
                        else {
                            "dev_acc": round(v["dev_acc"], 4),
                            "test_acc": round(v["test_acc"], 4),
                            "median_epoch_s": round(statistics.median(v["epoch_s"]), 3),
                        }
                    )
                    for k, v in row.items()
                }
            ),
            flush=True,
        )
    summary = {}
    for impl in [k for k in rows[0] if k != "seed"]:
        accs = [100 * r[impl]["test_acc"] for r in rows]
        devs = [100 * r[impl]["dev_acc"] for r in rows]
        secs = [statistics.median(r[impl]["epoch_s"]) for r in rows]
        summary[impl] = {
            "dev_acc_mean": statistics.mean(devs),
            "dev_acc_std": statistics.stdev(devs) if len(devs) > 1 else 0.0,
            "test_acc_mean": statistics.mean(accs),
            "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "epoch_s_median": statistics.median(secs),
        }
    print(
        f"\nSST-2 test accuracy (dev-selected epoch), {len(rows)} seeds, vectors {args.vectors}, "
        f"{'frozen' if args.freeze_embeddings else 'fine-tuned'} embeddings, "
        f"{args.layers} layer(s), {'bidirectional' if args.bidirectional else 'forward'}, {args.pooling} pooling, "
        f"{args.units} units, {fusedlstm.get_num_threads()} threads"
    )
    for impl, s in summary.items():
        print(
            f"  {impl:>10}: test {s['test_acc_mean']:.1f}% ± {s['test_acc_std']:.1f}  "
            f"(dev {s['dev_acc_mean']:.1f} ± {s['dev_acc_std']:.1f})   {s['epoch_s_median']:.2f} s/epoch"
        )
    for sfx in ("", ".bfloat16"):
        if "torch" + sfx in summary and "fusedlstm" + sfx in summary:
            print(
                f"  epoch speed-up vs torch{sfx}: "
                f"{summary['torch' + sfx]['epoch_s_median'] / summary['fusedlstm' + sfx]['epoch_s_median']:.2f}x"
            )
    if args.out is None:
        return 0
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {
                "benchmark": "sst2",
                "args": vars(args) | {"out": str(out)},
                "build": fusedlstm.build_info(),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "rows": rows,
                "summary": summary,
            },
            indent=1,
        )
    )
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

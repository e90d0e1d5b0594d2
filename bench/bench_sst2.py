"""End-to-end SST-2 benchmark: fusedlstm's SentimentClassifier vs the same model in PyTorch
(nn.Embedding from the same vectors, fine-tuned or with --freeze-embeddings frozen -> nn.LSTM ->
dropout -> nn.Linear on each sentence's last valid output, Adam, the same weight averaging, same
hyper-parameters and the very same batches), trained side by side
in one run over several seeds. Reports test accuracy at the dev-selected epoch (mean ± std) and
seconds per epoch, prints a table and writes JSON.

    python bench/bench_sst2.py [--data ../shared/data/sst2] [--seeds 0,1,2] [--epochs 10]
                               [--freeze-embeddings] [--no-torch]
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
from fusedlstm.data import load_data
from fusedlstm.layers import dropout_mask
from fusedlstm.model import TrainOptions, _batches

HERE = Path(__file__).resolve().parent


def torch_run(model: SentimentClassifier, splits, opts: TrainOptions, epochs: int):
    """The same network in PyTorch, initialised from `model`'s (untrained) weights, trained on
    the same batches and dropout masks; returns (test acc at best dev epoch, epoch seconds)."""
    import torch
    from fusedlstm.convert import keras_to_torch

    torch.manual_seed(opts.seed)
    p = model.params
    V, E = p["embedding"].shape
    H, C = model.config.units, model.config.num_classes
    emb = torch.nn.Embedding(V, E, padding_idx=0)
    emb.weight.data.copy_(torch.from_numpy(p["embedding"]))
    emb.weight.requires_grad_(model.config.train_embeddings)
    lstm = torch.nn.LSTM(E, H, batch_first=True)
    wi, wh, bi, bh = keras_to_torch(p["kernel"], p["recurrent_kernel"], p["bias"])
    for name, v in zip(("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"), (wi, wh, bi, bh)):
        getattr(lstm, name).data.copy_(torch.from_numpy(v))
    dense = torch.nn.Linear(H, C)
    dense.weight.data.copy_(torch.from_numpy(p["dense_w"].T.copy()))
    dense.bias.data.copy_(torch.from_numpy(p["dense_b"]))
    params = [q for m in (emb, lstm, dense) for q in m.parameters() if q.requires_grad]
    opt = torch.optim.Adam(params, lr=opts.lr)
    lm = model.label_map

    def encode(split):
        ids, lengths = model.encode(split.texts)
        return torch.from_numpy(ids.astype(np.int64)), lengths, torch.from_numpy(lm.encode(split.labels))

    tr_ids, tr_len, tr_y = encode(splits["train"])

    def logits_of(ids, lengths, mask=None):
        T = int(lengths.max())
        out, _ = lstm(emb(ids[:, :T]))
        last = out[torch.arange(len(lengths)), torch.from_numpy(lengths.astype(np.int64) - 1)]
        if mask is not None:
            last = last * mask
        return dense(last)

    def accuracy(split):
        ids, lengths, y = encode(split)
        with torch.no_grad():
            pred = torch.cat([logits_of(ids[s:s + 256], lengths[s:s + 256]).argmax(1)
                              for s in range(0, len(y), 256)])
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
        for b in _batches(rng, tr_len, opts.batch_size, opts.bucket):
            mask = torch.from_numpy(dropout_mask(rng, (len(b), H), model.config.keep_prob, np.float32))
            bt = torch.from_numpy(b)
            loss = torch.nn.functional.cross_entropy(logits_of(tr_ids[bt], tr_len[b], mask), tr_y[bt])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, opts.clip_norm)
            opt.step()
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
    return best_test, times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "sst2"))
    ap.add_argument("--vectors", default="glove-6b-50d")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--freeze-embeddings", action="store_true",
                    help="the original model's frozen vectors (default: fine-tuned, as fusedlstm train)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    splits = load_data(args.data)
    have_torch = not args.no_torch
    if have_torch:
        try:
            import torch
            torch.set_num_threads(fusedlstm.get_num_threads())
        except ImportError:
            have_torch = False
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        model = SentimentClassifier.create(splits["train"], vectors=args.vectors, seed=seed,
                                           train_embeddings=not args.freeze_embeddings, log=lambda *a: None)
        init = {k: v.copy() for k, v in model.params.items()}
        # patience=epochs: train every epoch in both, select on dev, like the torch run.
        opts = TrainOptions(epochs=args.epochs, seed=seed, progress=False, patience=args.epochs)
        t_start = time.perf_counter()
        metrics = model.fit(splits["train"], splits["dev"], opts, log=lambda *a: None)
        ours = {"test_acc": model.evaluate(splits["test"])["accuracy"],
                "epoch_s": [m["seconds"] for m in metrics],
                "best_epoch": int(np.argmax([m["dev_acc"] for m in metrics])) + 1}
        row = {"seed": seed, "fusedlstm": ours}
        if have_torch:
            model.params = {k: v.copy() for k, v in init.items()}
            acc, times = torch_run(model, splits, opts, args.epochs)
            row["torch"] = {"test_acc": acc, "epoch_s": times}
        rows.append(row)
        print(json.dumps({k: (v if k == "seed" else {"test_acc": round(v["test_acc"], 4),
                                                      "median_epoch_s": round(statistics.median(v["epoch_s"]), 3)})
                          for k, v in row.items()}), flush=True)
    summary = {}
    for impl in ("fusedlstm", "torch"):
        if impl not in rows[0]:
            continue
        accs = [100 * r[impl]["test_acc"] for r in rows]
        secs = [statistics.median(r[impl]["epoch_s"]) for r in rows]
        summary[impl] = {"test_acc_mean": statistics.mean(accs),
                         "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                         "epoch_s_median": statistics.median(secs)}
    print(f"\nSST-2 test accuracy (dev-selected epoch), {len(rows)} seeds, vectors {args.vectors}, "
          f"{'frozen' if args.freeze_embeddings else 'fine-tuned'} embeddings, "
          f"{fusedlstm.get_num_threads()} threads")
    for impl, s in summary.items():
        print(f"  {impl:>10}: {s['test_acc_mean']:.1f}% ± {s['test_acc_std']:.1f}   "
              f"{s['epoch_s_median']:.2f} s/epoch")
    if "torch" in summary:
        print(f"  epoch speed-up vs torch: "
              f"{summary['torch']['epoch_s_median'] / summary['fusedlstm']['epoch_s_median']:.2f}x")
    out = args.out or HERE / "results" / ("sst2_frozen.json" if args.freeze_embeddings else "sst2.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"benchmark": "sst2", "args": vars(args) | {"out": str(out)},
                               "build": fusedlstm.build_info(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "rows": rows, "summary": summary}, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())

"""A sentiment classifier in plain PyTorch with fusedlstm.torch.LSTM in place of torch.nn.LSTM:
embedding -> LSTM over a PackedSequence -> the last valid output (h_n) -> dropout -> linear,
trained on SST-2 with Adam. ``--torch-lstm`` runs the same model with torch.nn.LSTM (same
initial weights: the two layers share parameter names and initialization) for comparison.

    python examples/torch_sst2.py --data DIR     # train.tsv, dev.tsv (GLUE SST-2 layout)
        [--epochs 3] [--max-steps N] [--torch-lstm] [--bidirectional] [--layers 1] [--threads N]

Needs the torch extra: pip install "fusedlstm[torch]".
"""

import argparse
import time
import warnings

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fusedlstm
from fusedlstm.sentiment.data import LabelMap, load_data
from fusedlstm.sentiment.text import Vocabulary, default_max_len, tokenize
from fusedlstm.torch import LSTM

ap = argparse.ArgumentParser(description="SST-2 in plain PyTorch with fusedlstm.torch.LSTM")
ap.add_argument("--data", required=True, help="a GLUE-style directory: train.tsv and dev.tsv")
ap.add_argument("--epochs", type=int, default=3)
ap.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many batches")
ap.add_argument("--batch-size", type=int, default=32)
ap.add_argument("--embed-dim", type=int, default=100)
ap.add_argument("--hidden", type=int, default=128)
ap.add_argument("--layers", type=int, default=1)
ap.add_argument("--bidirectional", action="store_true")
ap.add_argument("--dropout", type=float, default=0.2)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--threads", type=int, default=None, help="threads for both torch and fusedlstm")
ap.add_argument("--torch-lstm", action="store_true", help="use torch.nn.LSTM instead (for comparison)")
ap.add_argument("--seed", type=int, default=0)
args = ap.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)
    fusedlstm.set_num_threads(args.threads)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # GLUE's test.tsv has no labels: only train and dev are used
    splits = load_data(args.data)
if "dev" not in splits:
    raise SystemExit(f"{args.data}: needs train and dev splits (train.tsv, dev.tsv)")
train_tok = [tokenize(t) for t in splits["train"].texts]
vocab = Vocabulary.build(train_tok, min_count=1)
max_len = default_max_len([len(t) for t in train_tok], coverage=0.99)
labels = LabelMap.fit(splits["train"].labels)


def encode(split, tokenized=None):
    ids, lengths = vocab.encode(tokenized or [tokenize(t) for t in split.texts], max_len)
    keep = lengths > 0  # an empty sentence has nothing to read (packing refuses length 0)
    y = labels.encode(split.labels, split.origins)
    return torch.from_numpy(ids[keep]).long(), torch.from_numpy(lengths[keep]).long(), torch.from_numpy(y[keep])


train = encode(splits["train"], train_tok)
dev = encode(splits["dev"])


class Classifier(nn.Module):
    def __init__(self, lstm_class):
        super().__init__()
        self.embed = nn.Embedding(len(vocab), args.embed_dim, padding_idx=0)
        self.lstm = lstm_class(
            args.embed_dim,
            args.hidden,
            num_layers=args.layers,
            batch_first=True,
            bidirectional=args.bidirectional,
            dropout=args.dropout if args.layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(args.dropout)
        D = 2 if args.bidirectional else 1
        self.out = nn.Linear(D * args.hidden, len(labels.names))

    def forward(self, ids, lengths):
        packed = pack_padded_sequence(self.embed(ids), lengths, batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)
        # h_n holds each row's state at its last valid step: the last layer's one or two directions
        last = h_n[-2:].transpose(0, 1).flatten(1) if args.bidirectional else h_n[-1]
        return self.out(self.drop(last))


torch.manual_seed(args.seed)
model = Classifier(nn.LSTM if args.torch_lstm else LSTM)
opt = torch.optim.Adam(model.parameters(), lr=args.lr)
loss_fn = nn.CrossEntropyLoss()
which = "torch.nn.LSTM" if args.torch_lstm else "fusedlstm.torch.LSTM"
print(f"{which}, {len(train[0])} train / {len(dev[0])} dev sentences, max_len {max_len}")


def accuracy(data) -> float:
    model.eval()
    ids, lengths, y = data
    right = 0
    with torch.no_grad():
        for i in range(0, len(y), 256):
            right += int((model(ids[i : i + 256], lengths[i : i + 256]).argmax(1) == y[i : i + 256]).sum())
    return right / len(y)


rng = np.random.default_rng(args.seed)
for epoch in range(args.epochs):
    model.train()
    order = torch.from_numpy(rng.permutation(len(train[0])))
    start, total, steps = time.perf_counter(), 0.0, 0
    for i in range(0, len(order), args.batch_size):
        if args.max_steps is not None and steps >= args.max_steps:
            break
        rows = order[i : i + args.batch_size]
        opt.zero_grad()
        loss = loss_fn(model(train[0][rows], train[1][rows]), train[2][rows])
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        total += loss.item()
        steps += 1
    took = time.perf_counter() - start
    print(
        f"epoch {epoch + 1}: loss {total / max(steps, 1):.4f}, {steps} steps in {took:.1f} s, "
        f"dev accuracy {accuracy(dev):.4f}"
    )

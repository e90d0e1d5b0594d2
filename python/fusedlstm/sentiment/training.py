"""Training a SentimentClassifier: Adam on shuffled (length-bucketed) batches with inverted
dropout, global-norm gradient clipping, an exponential moving average of the LSTM and dense
weights, early stopping on dev accuracy, a checkpoint after every epoch and exact resumption.

Callbacks
---------
``fit(..., callbacks=[...])`` calls, on each callback, the methods it has of

- ``on_step_end(step, logs)`` after every update; ``step`` counts updates from 1 over the whole
  run (a resumed run continues the count); ``logs`` = {"epoch", "step", "loss", "batch_size"},
  ``epoch`` numbered from 1;
- ``on_epoch_end(epoch, logs)`` after every epoch, once its checkpoint (if any) is written;
  ``epoch`` numbered from 1; ``logs`` is that epoch's metrics row (the one ``fit`` returns):
  "epoch", "step", "train_loss", "train_acc", "seconds" (the training pass alone) and, with a
  dev split, "dev_acc" and "dev_loss".

A callback may be any object with one or both methods (``Callback`` is a base with no-op
methods to subclass). A method that returns True stops training after that step or epoch, as
early stopping would (the best weights so far are kept). Callbacks must not change the model's
weights; a run with callbacks is bit-identical to one without.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .checkpoint import atomic_write, read_training_state, remove_stale_temporaries, write_training_state
from .data import Split
from .layers import dropout_mask
from .optim import Adam

if TYPE_CHECKING:
    from .model import SentimentClassifier

__all__ = ["TrainOptions", "Callback", "fit", "batches", "clip_scale"]


def dense_trainable(model) -> list[str]:
    """The weights Adam updates densely: every one but the embedding table (sparse rows)."""
    return [k for k in model.config.weight_shapes() if k != "embedding"]


@dataclass
class TrainOptions:
    """How `fit` trains. steps: stop after this many updates in all (overrides epochs and
    early stopping). clip_norm: global L2 norm of all gradients (None: no clipping).
    patience: epochs without a better dev accuracy before stopping. bucket: batch sentences of
    similar length together (less padding work). average: decay of an exponential moving
    average of the LSTM and dense weights (the embedding is kept as trained), which is what dev
    sees and what is kept; 0 turns it off."""

    epochs: int = 20
    steps: int | None = None
    batch_size: int = 32
    lr: float = 1e-3
    clip_norm: float | None = 5.0
    patience: int = 5
    seed: int = 0
    progress: bool = True
    bucket: bool = True
    average: float = 0.999

    def validate(self) -> TrainOptions:
        if not 0 <= self.average < 1:
            raise ValueError(f"average must be in [0, 1), got {self.average}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.steps is not None and self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {self.clip_norm}")
        return self


class Callback:
    """Base for fit's callbacks: override either method (see the module docstring)."""

    def on_step_end(self, step: int, logs: dict[str, Any]) -> bool | None:
        return None

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> bool | None:
        return None


def batches(
    rng: np.random.Generator, lengths: np.ndarray, batch_size: int, bucket: bool = True, chunk_batches: int = 50
) -> list[np.ndarray]:
    """Index batches for one epoch, as fit draws them: a seeded shuffle; with `bucket`, each
    chunk of chunk_batches batches is sorted by length before it is cut into batches and the
    batch order is shuffled again, so a batch pads to about its own sentences' length. fit
    draws them from ``np.random.default_rng([seed, epoch])`` (epoch from 0) and then, from the
    same generator, each batch's dropout mask, in batch order."""
    perm = rng.permutation(len(lengths))
    if not bucket:
        return [perm[s : s + batch_size] for s in range(0, len(perm), batch_size)]
    out = []
    size = batch_size * chunk_batches
    for c in range(0, len(perm), size):
        idx = perm[c : c + size]
        idx = idx[np.argsort(lengths[idx], kind="stable")]
        out.extend(idx[s : s + batch_size] for s in range(0, len(idx), batch_size))
    return [out[i] for i in rng.permutation(len(out))]


def clip_scale(
    grads: dict[str, np.ndarray], sparse: tuple[np.ndarray, np.ndarray] | None, clip_norm: float | None
) -> tuple[float, float]:
    """(global L2 norm of all gradients, dense and the embedding rows; the factor that brings
    it down to clip_norm, 1.0 when it is within it or clipping is off)."""
    sq = sum(float(np.vdot(g, g)) for g in grads.values())
    if sparse is not None:
        sq += float(np.vdot(sparse[1], sparse[1]))
    norm = math.sqrt(sq)
    if clip_norm is not None and norm > clip_norm:
        return norm, clip_norm / (norm + 1e-12)
    return norm, 1.0


def _progress(it: Sequence, desc: str, enabled: bool) -> Iterable:
    if not enabled or not sys.stderr.isatty():
        return it
    try:
        from tqdm import tqdm
    except ImportError:
        return it
    return tqdm(it, desc=desc, leave=False, unit="batch")


def _notify(callbacks: Sequence[object], method: str, index: int, logs: dict[str, Any]) -> bool:
    """Call `method` on every callback that has it; True when one of them asks to stop."""
    stop = False
    for cb in callbacks:
        fn: Callable | None = getattr(cb, method, None)
        if fn is not None and fn(index, logs) is True:
            stop = True
    return stop


def fit(
    model: SentimentClassifier,
    train: Split,
    dev: Split | None,
    opts: TrainOptions,
    out_dir: Path | None = None,
    resume: bool = False,
    log: Callable[[str], Any] = print,
    callbacks: Sequence[object] = (),
) -> list[dict]:
    """Train `model` in place with Adam; evaluate on dev each epoch; keep the best-dev weights
    (early stopping); checkpoint atomically to out_dir after every epoch; with `resume`, continue
    the run checkpointed in out_dir to the very weights an uninterrupted run reaches. Returns
    the metrics, one row per epoch (a resumed run's rows include the earlier epochs')."""
    opts.validate()
    if out_dir is not None:
        out_dir = Path(out_dir)
    y = model.label_map.encode(train.labels, train.origins)
    ids, lengths = model.encode(train.texts)
    params = model.params
    trainable = dense_trainable(model) + (["embedding"] if model.config.train_embeddings else [])
    opt = Adam({k: params[k] for k in trainable}, lr=opts.lr)
    state = {"epoch": 0, "step": 0, "best_dev": -1.0, "bad_epochs": 0}
    metrics: list[dict] = []
    best = {k: v.copy() for k, v in params.items()}
    # Weight averaging (Polyak): the moving average of the LSTM and dense weights is what dev
    # sees and what is kept; the embedding (sparse updates) is used as trained.
    avg = {k: params[k].copy() for k in dense_trainable(model)} if opts.average > 0 else {}
    if out_dir is not None and out_dir.is_dir():
        stale = remove_stale_temporaries(out_dir)
        if stale:
            log(f"removed {len(stale)} temporary file(s) left by an interrupted run: " + ", ".join(stale))
    if resume:
        if out_dir is None:
            raise ValueError("resume needs the directory of the run to continue (out_dir)")
        saved, meta = read_training_state(out_dir)
        opt.load_state(saved["opt"])
        for k in params:
            if k not in saved["cur"] or k not in saved["best"]:
                raise ValueError(f"{out_dir / 'state.npz'}: no saved weights {k!r}")
            params[k][...] = saved["cur"][k]
            best[k] = saved["best"][k].copy()
        for k in avg:
            if k not in saved["avg"]:
                raise ValueError(
                    f"{out_dir / 'state.npz'} has no weight average: resume with the "
                    "options the run started with (average 0 if it had none)"
                )
            avg[k][...] = saved["avg"][k]
        # The metrics saved with the state: metrics.jsonl may be one epoch ahead if a crash fell
        # between the two writes.
        metrics = meta.pop("metrics")
        state = meta
        log(f"resuming after epoch {state['epoch']} (step {state['step']})")
    n = len(y)
    steps_per_epoch = math.ceil(n / opts.batch_size)
    total_epochs = opts.epochs if opts.steps is None else math.ceil(opts.steps / steps_per_epoch)
    features = model.config.features  # the dropout acts on the pooled features
    stop = False
    for epoch in range(state["epoch"], total_epochs):
        if stop or (opts.steps is None and state["bad_epochs"] >= opts.patience):
            break
        t0 = time.perf_counter()
        rng = np.random.default_rng([opts.seed, epoch])  # per epoch: resumable exactly
        order = batches(rng, lengths, opts.batch_size, opts.bucket)
        losses, correct, seen = [], 0, 0
        bar = _progress(order, f"epoch {epoch + 1}/{total_epochs}", opts.progress)
        for b in bar:
            if opts.steps is not None and state["step"] >= opts.steps:
                break
            mask = dropout_mask(rng, (len(b), features), model.config.keep_prob, np.float32)
            emb_mask = None
            if model.config.embedding_keep_prob < 1:  # drawn only then: other runs stay as they were
                shape = (len(b), int(lengths[b].max()), model.config.embedding_dim)
                emb_mask = dropout_mask(rng, shape, model.config.embedding_keep_prob, np.float32)
            loss, probs, grads, sparse = model.forward_backward(ids[b], lengths[b], y[b], mask, embedding_mask=emb_mask)
            _, scale = clip_scale(grads, sparse, opts.clip_norm)
            state["step"] += 1
            # The average's decay ramps up over the first steps (as
            # tf.train.ExponentialMovingAverage with num_updates), so it does not remember the
            # initial weights. Clipping and averaging run inside the optimizer's one pass.
            keep = min(opts.average, (1 + state["step"]) / (10 + state["step"]))
            opt.step(
                grads,
                {"embedding": sparse} if sparse is not None else None,
                scale=scale,
                average=(avg, keep) if avg else None,
            )
            losses.append(loss)
            correct += int((probs.argmax(1) == y[b]).sum())
            seen += len(b)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", acc=f"{correct / seen:.3f}")
            if callbacks and _notify(
                callbacks,
                "on_step_end",
                state["step"],
                {"epoch": epoch + 1, "step": state["step"], "loss": loss, "batch_size": len(b)},
            ):
                stop = True
                break
        row = {
            "epoch": epoch + 1,
            "step": state["step"],
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "train_acc": correct / max(seen, 1),
            "seconds": time.perf_counter() - t0,
        }
        current = {k: params[k].copy() for k in avg}
        for k, a in avg.items():  # evaluate and keep the averaged weights
            params[k][...] = a
        if dev is not None:
            ev = model.evaluate(dev)
            row.update(dev_acc=ev["accuracy"], dev_loss=ev["loss"])
            if ev["accuracy"] > state["best_dev"]:
                state["best_dev"], state["bad_epochs"] = ev["accuracy"], 0
                best = {k: v.copy() for k, v in params.items()}
            else:
                state["bad_epochs"] += 1
        else:
            best = {k: v.copy() for k, v in params.items()}
        for k in avg:
            params[k][...] = current[k]
        state["epoch"] = epoch + 1
        metrics.append(row)
        log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if out_dir is not None:
            _checkpoint(model, out_dir, best, opt, state, metrics, avg)
        if callbacks and _notify(callbacks, "on_epoch_end", epoch + 1, dict(row)):
            stop = True
    for k in params:
        params[k][...] = best[k]
    return metrics


def _checkpoint(
    model: SentimentClassifier,
    out_dir: Path,
    best: dict[str, np.ndarray],
    opt: Adam,
    state: dict,
    metrics: list[dict],
    avg: dict[str, np.ndarray],
) -> None:
    """The best weights as the model, and everything resuming needs; each file atomic, in this
    order: metrics.jsonl, the model files, state.npz (the commit point resuming reads). A crash
    between files leaves a loadable model and the previous consistent state; the model files
    are ahead of state.npz only if metrics.jsonl is too."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics).encode())
    model.save(out_dir, weights=best)
    write_training_state(out_dir, model.params, best, opt.state(), avg, dict(state, metrics=metrics))

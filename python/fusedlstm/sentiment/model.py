"""SentimentClassifier: word ids -> embedding (pre-trained vectors, frozen by default) -> fused
LSTM -> dropout (keep 0.8) on each sentence's last valid output -> dense (truncated-normal
weights, bias 0.1) -> softmax cross-entropy -> Adam. Training is seeded and bit-reproducible,
checkpoints after every epoch are written atomically, and a killed run resumes to the same
weights. A model directory holds config.json, vocab.json, weights.npz (and, while training,
state.npz and metrics.jsonl); loading never unpickles anything."""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .. import __version__
from .data import LabelMap, Split
from .layers import (dense_backward, dense_forward, dropout_mask, embedding_backward,
                     softmax_cross_entropy, truncated_normal)
from ..lstm import lstm_backward, lstm_forward
from .optim import Adam
from .text import Vocabulary, default_max_len, tokenize
from .vectors import embedding_from_vectors

__all__ = ["ModelConfig", "SentimentClassifier", "TrainOptions"]

WEIGHT_NAMES = ("embedding", "kernel", "recurrent_kernel", "bias", "dense_w", "dense_b")
# Sanity bounds checked before anything is allocated from a config file.
_LIMITS = {"units": 65536, "embedding_dim": 65536, "max_len": 1_000_000, "num_classes": 100_000,
           "vocab_size": 50_000_000}
_MAX_PARAMS = 2**31  # all weights together (8 GiB of float32)


@dataclass
class ModelConfig:
    units: int = 128
    embedding_dim: int = 50
    max_len: int = 0                 # 0: not chosen yet (set from the training data)
    num_classes: int = 2
    vocab_size: int = 0
    keep_prob: float = 0.8
    labels: List[str] = field(default_factory=lambda: ["0", "1"])
    train_embeddings: bool = False
    vectors: Optional[str] = None
    format_version: int = 1

    def validate(self, source: str = "config") -> "ModelConfig":
        for name, limit in _LIMITS.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= limit:
                raise ValueError(f"{source}: {name} must be an integer in 1..{limit}, got {v!r}")
        if not isinstance(self.keep_prob, (int, float)) or not 0 < self.keep_prob <= 1:
            raise ValueError(f"{source}: keep_prob must be in (0, 1], got {self.keep_prob!r}")
        if (not isinstance(self.labels, list) or len(self.labels) != self.num_classes
                or not all(isinstance(l, str) for l in self.labels)):
            raise ValueError(f"{source}: labels must be a list of {self.num_classes} strings")
        if not isinstance(self.train_embeddings, bool):
            raise ValueError(f"{source}: train_embeddings must be true or false")
        total = sum(math.prod(s) for s in self.weight_shapes().values())
        if total > _MAX_PARAMS:
            raise ValueError(f"{source}: the sizes ask for {total:,} parameters, more than the "
                             f"{_MAX_PARAMS:,} this loader accepts")
        return self

    def weight_shapes(self) -> Dict[str, tuple]:
        E, H, C, V = self.embedding_dim, self.units, self.num_classes, self.vocab_size
        return {"embedding": (V, E), "kernel": (E, 4 * H), "recurrent_kernel": (H, 4 * H),
                "bias": (4 * H,), "dense_w": (H, C), "dense_b": (C,)}

    @classmethod
    def from_json(cls, text: str, source: str) -> "ModelConfig":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{source}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{source}: unknown keys {sorted(unknown)}")
        return cls(**data).validate(source)


@dataclass
class TrainOptions:
    epochs: int = 20
    steps: Optional[int] = None      # stop after this many updates in all (the toy config)
    batch_size: int = 32
    lr: float = 1e-3
    clip_norm: Optional[float] = 5.0
    patience: int = 5                # early stopping on dev accuracy
    seed: int = 0
    progress: bool = True
    bucket: bool = True              # batch sentences of similar length (less padding work)
    average: float = 0.999           # >0: evaluate/keep an exponential moving average of the
                                     # dense weights with this decay (0: off)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is for the temporary, not the result
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


CHECKPOINT_FILES = ("config.json", "vocab.json", "weights.npz", "metrics.jsonl", "state.npz")


def _remove_stale_temporaries(out_dir: Path) -> List[str]:
    """Delete the hidden temporaries a killed run left next to its checkpoint files (only
    those named like ours: `.weights.npz.<random>.tmp`); returns their names."""
    removed = []
    for name in CHECKPOINT_FILES:
        for tmp in out_dir.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
    return removed


def _npz_bytes(arrays: Dict[str, np.ndarray]) -> bytes:
    import io
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _npz_headers(path: Path) -> Dict[str, tuple]:
    """{name: (shape, dtype)} of every member, from the .npy headers alone: nothing is
    allocated from a size the file claims before it is checked against what the file holds."""
    import zipfile

    out = {}
    fsize = os.path.getsize(path)
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                raise ValueError(f"member {info.filename!r} is not a .npy array")
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(f)
            name = info.filename[:-4]
            if dtype.hasobject:
                raise ValueError(f"array {name!r} holds Python objects (pickled data)")
            nbytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
            # A stored member's bytes are in the file; deflate expands them at most ~1032x.
            held = min(info.compress_size, fsize)
            if nbytes > (held if info.compress_type == zipfile.ZIP_STORED else 1100 * held):
                raise ValueError(f"array {name!r} claims shape {shape} ({nbytes} bytes), more "
                                 f"than its {held} bytes in the file can hold")
            out[name] = (tuple(shape), dtype)
    return out


def _load_npz(path: Path, expected: Optional[Dict[str, tuple]] = None) -> Dict[str, np.ndarray]:
    """All arrays of an .npz: headers checked first (no object arrays, sizes the file can hold,
    shapes as `expected` when given), then read with allow_pickle=False. The file is named in
    every error."""
    try:
        headers = _npz_headers(path)
        for name, shape in (expected or {}).items():
            if name not in headers:
                raise ValueError(f"missing array {name!r}")
            if headers[name][0] != shape:
                raise ValueError(f"weights[{name!r}]: shape {headers[name][0]}, expected {shape} "
                                 "from the config")
        if expected is not None and set(headers) - set(expected):
            raise ValueError(f"unexpected arrays {sorted(set(headers) - set(expected))}")
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing") from None
    except ValueError as exc:  # object arrays need pickle: refused
        raise ValueError(f"{path}: refused ({exc})") from None
    except Exception as exc:   # truncated or not a zip
        raise ValueError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None


class SentimentClassifier:
    """The classic many-to-one LSTM sentiment model over the fused kernel."""

    def __init__(self, config: ModelConfig, vocab: Vocabulary, weights: Dict[str, np.ndarray]):
        self.config = config
        self.vocab = vocab
        self.params = weights
        self.label_map = LabelMap(config.labels)
        self._check_weights()

    # -- construction -------------------------------------------------------------------
    @classmethod
    def create(cls, train: Split, *, units: int = 128, vectors: Optional[str] = None,
               embedding_dim: Optional[int] = None, max_len: Optional[int] = None,
               min_count: int = 1, max_vocab: Optional[int] = None, keep_prob: float = 0.8,
               train_embeddings: bool = True, num_classes: Optional[int] = None, seed: int = 0,
               log=print) -> "SentimentClassifier":
        """A fresh model whose vocabulary, labels and max_len come from the training split.
        Pre-trained vectors are fine-tuned unless train_embeddings=False (the original model's
        frozen table): chosen on the SST-2 dev set, where fine-tuning wins by about 1.5 points."""
        rng = np.random.default_rng([seed, 10**6])
        tokenized = [tokenize(t) for t in train.texts]
        vocab = Vocabulary.build(tokenized, min_count=min_count, max_size=max_vocab)
        labels = LabelMap.fit(train.labels, num_classes)
        if max_len is None:
            max_len = default_max_len([len(t) for t in tokenized])
        init = embedding_from_vectors(vocab, vectors, embedding_dim if vectors is None else None, rng)
        if vectors is None:
            train_embeddings = True  # random embeddings are always trained
        log(f"vocabulary {len(vocab)} words; embedding {init.matrix.shape[1]}-d from {init.source}"
            + (f", coverage {init.found}/{init.total} ({100 * init.coverage:.1f}%)" if vectors else "")
            + f"; max_len {max_len}; classes {labels.names}")
        E, H, C = init.matrix.shape[1], units, len(labels.names)
        s = 1.0 / math.sqrt(H)
        weights = {
            "embedding": init.matrix,
            "kernel": rng.uniform(-s, s, (E, 4 * H)).astype(np.float32),
            "recurrent_kernel": rng.uniform(-s, s, (H, 4 * H)).astype(np.float32),
            "bias": np.zeros(4 * H, np.float32),
            "dense_w": truncated_normal(rng, (H, C), 0.1, np.float32),
            "dense_b": np.full(C, 0.1, np.float32),
        }
        weights["bias"][H:2 * H] = 1.0  # forget-gate bias 1 (Jozefowicz et al. 2015; Keras default)
        cfg = ModelConfig(units=H, embedding_dim=E, max_len=int(max_len), num_classes=C,
                          vocab_size=len(vocab), keep_prob=keep_prob, labels=labels.names,
                          train_embeddings=bool(train_embeddings), vectors=vectors).validate()
        return cls(cfg, vocab, weights)

    def _check_weights(self) -> None:
        want = self.config.weight_shapes()
        if len(self.vocab) != self.config.vocab_size:
            raise ValueError(f"vocabulary has {len(self.vocab)} tokens, config says "
                             f"{self.config.vocab_size}")
        for k, shape in want.items():
            if k not in self.params:
                raise ValueError(f"weights: missing {k!r}")
            a = self.params[k]
            if a.shape != shape:
                raise ValueError(f"weights[{k!r}]: shape {a.shape}, expected {shape} from the config")
            if a.dtype.kind != "f":
                raise ValueError(f"weights[{k!r}]: dtype {a.dtype} is not floating point")

    # -- the math ----------------------------------------------------------------------
    def encode(self, texts: Sequence[str]):
        tokenized = [tokenize(t) for t in texts]
        for i, t in enumerate(tokenized):
            if not t:
                raise ValueError(f"sentence {i} is empty")
        return self.vocab.encode(tokenized, self.config.max_len)

    def forward_backward(self, ids, lengths, labels, mask=None, need_grads=True):
        """Loss (and gradients) of one batch. mask: the dropout multiplier [B, H] (None: no
        dropout). Returns loss, probabilities, dense grads dict, sparse embedding grad or None."""
        p = self.params
        T = int(lengths.max()) if len(lengths) else 1
        ids = ids[:, :T]  # a batch is only as long as its longest sentence
        x = np.take(p["embedding"], ids, axis=0)  # a row gather: twice as fast as p[ids]
        _, h_n, _, cache = lstm_forward(x, p["kernel"], p["recurrent_kernel"], p["bias"],
                                        lengths=lengths, training=need_grads,
                                        return_sequences=False)
        d = h_n * mask if mask is not None else h_n
        logits = dense_forward(d, p["dense_w"], p["dense_b"])
        loss, d_logits, probs = softmax_cross_entropy(logits, labels)
        if not need_grads:
            return loss, probs, None, None
        d_d, g_w, g_b = dense_backward(d, p["dense_w"], d_logits)
        d_h = d_d * mask if mask is not None else d_d
        # Frozen embeddings learn nothing from the input gradient: skip computing it.
        g = lstm_backward(cache, d_h_n=d_h, need_dx=self.config.train_embeddings)
        grads = {"kernel": g.kernel, "recurrent_kernel": g.recurrent_kernel, "bias": g.bias,
                 "dense_w": g_w, "dense_b": g_b}
        sparse = embedding_backward(ids, lengths, g.x) if self.config.train_embeddings else None
        return loss, probs, grads, sparse

    def predict_proba(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Class probabilities [N, C] (no dropout)."""
        ids, lengths = self.encode(texts)
        out = np.zeros((len(texts), self.config.num_classes), np.float32)
        for s in range(0, len(texts), batch_size):
            sl = slice(s, s + batch_size)
            no_labels = np.zeros(len(lengths[sl]), np.int64)  # the loss is not used here
            _, probs, _, _ = self.forward_backward(ids[sl], lengths[sl], no_labels,
                                                   need_grads=False)
            out[sl] = probs
        return out

    def predict(self, texts: Sequence[str]) -> List[dict]:
        probs = self.predict_proba(texts)
        k = probs.argmax(axis=1)
        return [{"text": t, "label": self.label_map.names[i], "probability": float(p[i])}
                for t, i, p in zip(texts, k, probs)]

    def evaluate(self, split: Split) -> dict:
        y = self.label_map.encode(split.labels, split.origins)
        probs = self.predict_proba(split.texts)
        pred = probs.argmax(axis=1)
        C = self.config.num_classes
        cm = np.zeros((C, C), np.int64)
        np.add.at(cm, (y, pred), 1)
        f1s = []
        for c in range(C):
            tp, fp, fn = cm[c, c], cm[:, c].sum() - cm[c, c], cm[c, :].sum() - cm[c, c]
            f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
        loss = float(np.mean(-np.log(np.maximum(probs[np.arange(len(y)), y], 1e-30))))
        return {"accuracy": float((pred == y).mean()), "macro_f1": float(np.mean(f1s)),
                "loss": loss, "n": int(len(y)), "labels": self.label_map.names,
                "confusion_matrix": cm.tolist()}

    # -- training ----------------------------------------------------------------------
    def fit(self, train: Split, dev: Optional[Split], opts: TrainOptions,
            out_dir: Optional[Path] = None, resume: bool = False, log=print) -> List[dict]:
        """Train with Adam; evaluate on dev each epoch; keep the best-dev weights (early
        stopping); checkpoint atomically to out_dir after every epoch. Returns the metrics."""
        y = self.label_map.encode(train.labels, train.origins)
        ids, lengths = self.encode(train.texts)
        trainable = ["kernel", "recurrent_kernel", "bias", "dense_w", "dense_b"]
        if self.config.train_embeddings:
            trainable.append("embedding")
        opt = Adam({k: self.params[k] for k in trainable}, lr=opts.lr)
        state = {"epoch": 0, "step": 0, "best_dev": -1.0, "bad_epochs": 0}
        metrics: List[dict] = []
        best = {k: v.copy() for k, v in self.params.items()}
        if not 0 <= opts.average < 1:
            raise ValueError(f"average must be in [0, 1), got {opts.average}")
        # Weight averaging (Polyak): the dense weights' moving average is what dev sees and what
        # is kept; the embedding (sparse updates) is used as trained.
        avg = ({k: self.params[k].copy() for k in trainable if k != "embedding"}
               if opts.average > 0 else {})
        if out_dir is not None and out_dir.is_dir():
            stale = _remove_stale_temporaries(out_dir)
            if stale:
                log(f"removed {len(stale)} temporary file(s) left by an interrupted run: "
                    + ", ".join(stale))
        if resume:
            if out_dir is None or not (out_dir / "state.npz").exists():
                raise FileNotFoundError(f"--resume: no checkpoint state in {out_dir}")
            st = _load_npz(out_dir / "state.npz")
            opt.load_state({k[4:]: v for k, v in st.items() if k.startswith("opt/")})
            for k in self.params:
                self.params[k][...] = st[f"cur/{k}"]
                best[k] = st[f"best/{k}"].copy()
            for k in avg:
                if f"avg/{k}" not in st:
                    raise ValueError(f"--resume: {out_dir / 'state.npz'} has no weight average; "
                                     "resume with the options the run started with")
                avg[k][...] = st[f"avg/{k}"]
            state = json.loads(str(st["meta"]))
            # The metrics saved with the state: metrics.jsonl may be one epoch ahead if a crash
            # fell between the two writes.
            metrics = state.pop("metrics")
            log(f"resuming after epoch {state['epoch']} (step {state['step']})")
        n = len(y)
        steps_per_epoch = math.ceil(n / opts.batch_size)
        total_epochs = opts.epochs if opts.steps is None else math.ceil(opts.steps / steps_per_epoch)
        H = self.config.units
        for epoch in range(state["epoch"], total_epochs):
            if opts.steps is None and state["bad_epochs"] >= opts.patience:
                break
            t0 = time.perf_counter()
            rng = np.random.default_rng([opts.seed, epoch])  # per epoch: resumable exactly
            batches = _batches(rng, lengths, opts.batch_size, opts.bucket)
            losses, correct, seen = [], 0, 0
            bar = _progress(batches, f"epoch {epoch + 1}/{total_epochs}", opts.progress)
            for b in bar:
                if opts.steps is not None and state["step"] >= opts.steps:
                    break
                mask = dropout_mask(rng, (len(b), H), self.config.keep_prob, np.float32)
                loss, probs, grads, sparse = self.forward_backward(ids[b], lengths[b], y[b], mask)
                _, scale = _clip_scale(grads, sparse, opts.clip_norm)
                state["step"] += 1
                # The average's decay ramps up over the first steps (as
                # tf.train.ExponentialMovingAverage with num_updates), so it does not remember the
                # initial weights. Clipping and averaging run inside the optimizer's one pass.
                keep = min(opts.average, (1 + state["step"]) / (10 + state["step"]))
                opt.step(grads, {"embedding": sparse} if sparse is not None else None,
                         scale=scale, average=(avg, keep) if avg else None)
                losses.append(loss)
                correct += int((probs.argmax(1) == y[b]).sum())
                seen += len(b)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", acc=f"{correct / seen:.3f}")
            row = {"epoch": epoch + 1, "step": state["step"], "train_loss": float(np.mean(losses)),
                   "train_acc": correct / max(seen, 1), "seconds": time.perf_counter() - t0}
            current = {k: self.params[k].copy() for k in avg}
            for k, a in avg.items():  # evaluate and keep the averaged weights
                self.params[k][...] = a
            if dev is not None:
                ev = self.evaluate(dev)
                row.update(dev_acc=ev["accuracy"], dev_loss=ev["loss"])
                if ev["accuracy"] > state["best_dev"]:
                    state["best_dev"], state["bad_epochs"] = ev["accuracy"], 0
                    best = {k: v.copy() for k, v in self.params.items()}
                else:
                    state["bad_epochs"] += 1
            else:
                best = {k: v.copy() for k, v in self.params.items()}
            for k in avg:
                self.params[k][...] = current[k]
            state["epoch"] = epoch + 1
            metrics.append(row)
            log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            if out_dir is not None:
                self._checkpoint(out_dir, best, opt, state, metrics, avg)
        for k in self.params:
            self.params[k][...] = best[k]
        return metrics

    def _checkpoint(self, out_dir: Path, best, opt: Adam, state: dict, metrics, avg) -> None:
        """The best weights as the model, and everything --resume needs; each file atomic, in
        this order: metrics.jsonl, the model files, state.npz (the commit point --resume reads).
        A crash between files leaves a loadable model and the previous consistent state; the
        model files are ahead of state.npz only if metrics.jsonl is too."""
        out_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(out_dir / "metrics.jsonl",
                      "".join(json.dumps(m) + "\n" for m in metrics).encode())
        self.save(out_dir, weights=best)
        arrays = {f"cur/{k}": v for k, v in self.params.items()}
        arrays.update({f"best/{k}": v for k, v in best.items()})
        arrays.update({f"opt/{k}": v for k, v in opt.state().items()})
        arrays.update({f"avg/{k}": v for k, v in avg.items()})
        arrays["meta"] = np.asarray(json.dumps(dict(state, metrics=metrics)))
        _atomic_write(out_dir / "state.npz", _npz_bytes(arrays))

    # -- persistence -------------------------------------------------------------------
    def save(self, path, weights: Optional[Dict[str, np.ndarray]] = None) -> None:
        """config.json, vocab.json and weights.npz, each written atomically."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        w = weights if weights is not None else self.params
        cfg = asdict(self.config)
        _atomic_write(path / "vocab.json", self.vocab.to_json().encode("utf-8"))
        _atomic_write(path / "weights.npz", _npz_bytes({k: w[k] for k in WEIGHT_NAMES}))
        _atomic_write(path / "config.json",
                      (json.dumps(dict(cfg, fusedlstm_version=__version__), indent=1) + "\n").encode())

    @classmethod
    def load(cls, path) -> "SentimentClassifier":
        """Load a model directory; validates everything before allocating; never unpickles."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"model directory not found: {path}")
        for f in ("config.json", "vocab.json", "weights.npz"):
            if not (path / f).is_file():
                raise FileNotFoundError(f"{path / f}: missing (not a complete model directory)")
        text = (path / "config.json").read_text(encoding="utf-8")
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{path / 'config.json'}: not valid JSON ({exc})") from None
        if isinstance(raw, dict):
            raw.pop("fusedlstm_version", None)
        cfg = ModelConfig.from_json(json.dumps(raw), str(path / "config.json"))
        vocab = Vocabulary.from_json((path / "vocab.json").read_text(encoding="utf-8"),
                                     str(path / "vocab.json"))
        weights = _load_npz(path / "weights.npz", cfg.weight_shapes())
        weights = {k: np.ascontiguousarray(v, dtype=np.float32) if v.dtype.kind == "f" else v
                   for k, v in weights.items()}
        try:
            return cls(cfg, vocab, weights)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


def _batches(rng: np.random.Generator, lengths: np.ndarray, batch_size: int, bucket: bool,
             chunk_batches: int = 50) -> List[np.ndarray]:
    """Index batches for one epoch: a seeded shuffle; with `bucket`, each chunk of
    chunk_batches batches is sorted by length before it is cut into batches and the batch
    order is shuffled again, so a batch pads to about its own sentences' length."""
    perm = rng.permutation(len(lengths))
    if not bucket:
        return [perm[s:s + batch_size] for s in range(0, len(perm), batch_size)]
    out = []
    size = batch_size * chunk_batches
    for c in range(0, len(perm), size):
        idx = perm[c:c + size]
        idx = idx[np.argsort(lengths[idx], kind="stable")]
        out.extend(idx[s:s + batch_size] for s in range(0, len(idx), batch_size))
    return [out[i] for i in rng.permutation(len(out))]


def _clip_scale(grads: Dict[str, np.ndarray], sparse, clip_norm: Optional[float]):
    """(global L2 norm of all gradients, dense and the embedding rows; the factor that brings
    it down to clip_norm, 1.0 when it is within it or clipping is off)."""
    sq = sum(float(np.vdot(g, g)) for g in grads.values())
    if sparse is not None:
        sq += float(np.vdot(sparse[1], sparse[1]))
    norm = math.sqrt(sq)
    if clip_norm is not None and norm > clip_norm:
        return norm, clip_norm / (norm + 1e-12)
    return norm, 1.0


def _progress(it, desc: str, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return it
    try:
        from tqdm import tqdm
    except ImportError:
        return it
    return tqdm(it, desc=desc, leave=False, unit="batch")

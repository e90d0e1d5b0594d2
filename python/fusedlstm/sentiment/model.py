"""SentimentClassifier: word ids -> embedding (random, or pre-trained vectors, fine-tuned unless
frozen on request) -> fused LSTM (one or more layers, one or two directions) -> pooling over
each sentence's valid steps (its last output, or the max or mean over time) -> dropout -> dense
(truncated-normal weights, bias 0.1) -> softmax. The defaults are the original model's: one
forward layer and its last valid output. Training (sentiment.training) is seeded and
bit-reproducible; a model directory (sentiment.checkpoint) holds config.json, vocab.json and
weights.npz, and loading never unpickles anything."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__, bf16_engine
from ..lstm import lstm_backward, lstm_forward
from ..prepared import PreparedLSTM, infer_bidirectional, prepare
from ..stack import lstm_stack_backward, lstm_stack_forward
from .checkpoint import MODEL_FILES, atomic_write, load_npz, npz_bytes
from .data import LabelMap, Split
from .layers import dense_backward, dense_forward, embedding_backward, softmax, softmax_cross_entropy, truncated_normal
from .text import Vocabulary, default_max_len, tokenize
from .training import TrainOptions
from .training import fit as _fit
from .vectors import embedding_from_vectors

__all__ = [
    "ModelConfig",
    "SentimentClassifier",
    "TrainOptions",
    "WEIGHT_NAMES",
    "POOLINGS",
    "DEFAULT_ARCHITECTURE",
    "ORIGINAL_ARCHITECTURE",
]

# The original architecture's weights; a deeper or bidirectional model adds one set of LSTM
# weights per layer and direction (ModelConfig.lstm_names) under torch-like suffixes.
WEIGHT_NAMES = ("embedding", "kernel", "recurrent_kernel", "bias", "dense_w", "dense_b")
POOLINGS = ("last", "max", "mean")
PRECISIONS = ("float32", "bfloat16")  # of the LSTM's products (fusedlstm.lstm_forward's precision)


def require_bf16(what: str) -> None:
    """RuntimeError naming what is missing when this CPU cannot compute in bfloat16."""
    if bf16_engine() is None:
        from .. import _core

        missing = _core.bf16_missing() or "AVX512_BF16 (switched off in this process)"
        raise RuntimeError(f"{what} needs {missing}; train with --precision float32 on this machine")


_MAX_LAYERS = 16
# The architecture `create` and `fusedlstm train` build unless told otherwise, chosen on the
# SST-2 dev set (docs/classifier.md). ModelConfig's own defaults stay the original model's (one
# forward layer, its last output, no word-vector dropout): model files saved before these
# fields existed describe that model. `ORIGINAL_ARCHITECTURE` is it, as create()'s keywords.
DEFAULT_ARCHITECTURE = {"layers": 2, "bidirectional": True, "pooling": "max", "embedding_keep_prob": 0.7}
ORIGINAL_ARCHITECTURE = {"layers": 1, "bidirectional": False, "pooling": "last", "embedding_keep_prob": 1.0}
# Sanity bounds checked before anything is allocated from a config file.
_LIMITS = {
    "units": 65536,
    "embedding_dim": 65536,
    "max_len": 1_000_000,
    "num_classes": 100_000,
    "vocab_size": 50_000_000,
}
_MAX_PARAMS = 2**31  # all weights together (8 GiB of float32)


@dataclass
class ModelConfig:
    """The sizes and options of a model, saved as its config.json. max_len 0 and vocab_size 0
    mean "not chosen yet" (set from the training data). train_embeddings: whether the embedding
    table is trained (pre-trained vectors are fine-tuned by default); vectors: where the initial
    table came from (informational)."""

    units: int = 128
    embedding_dim: int = 50
    max_len: int = 0
    num_classes: int = 2
    vocab_size: int = 0
    keep_prob: float = 0.8
    labels: list[str] = field(default_factory=lambda: ["0", "1"])
    train_embeddings: bool = False
    vectors: str | None = None
    format_version: int = 1
    layers: int = 1
    bidirectional: bool = False
    pooling: str = "last"
    embedding_keep_prob: float = 1.0
    precision: str = "float32"

    def validate(self, source: str = "config") -> ModelConfig:
        """Check every field (named, with `source`, in the error); returns self."""
        for name, limit in _LIMITS.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= limit:
                raise ValueError(f"{source}: {name} must be an integer in 1..{limit}, got {v!r}")
        for name in ("keep_prob", "embedding_keep_prob"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ValueError(f"{source}: {name} must be in (0, 1], got {v!r}")
        if (
            not isinstance(self.labels, list)
            or len(self.labels) != self.num_classes
            or not all(isinstance(name, str) for name in self.labels)
        ):
            raise ValueError(f"{source}: labels must be a list of {self.num_classes} strings")
        if not isinstance(self.train_embeddings, bool):
            raise ValueError(f"{source}: train_embeddings must be true or false")
        if isinstance(self.layers, bool) or not isinstance(self.layers, int) or not 1 <= self.layers <= _MAX_LAYERS:
            raise ValueError(f"{source}: layers must be an integer in 1..{_MAX_LAYERS}, got {self.layers!r}")
        if not isinstance(self.bidirectional, bool):
            raise ValueError(f"{source}: bidirectional must be true or false")
        if self.pooling not in POOLINGS:
            raise ValueError(f"{source}: pooling must be one of {list(POOLINGS)}, got {self.pooling!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"{source}: precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        total = sum(math.prod(s) for s in self.weight_shapes().values())
        if total > _MAX_PARAMS:
            raise ValueError(
                f"{source}: the sizes ask for {total:,} parameters, more than the {_MAX_PARAMS:,} this loader accepts"
            )
        return self

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    def lstm_names(self) -> list[list[tuple[str, str, str]]]:
        """Per layer, per direction (forward first): the names of (kernel, recurrent_kernel,
        bias). Layer 0's forward direction keeps the original names; others get the suffixes
        _l{layer} and _reverse."""
        out = []
        for layer in range(self.layers):
            dirs = []
            for d in range(self.directions):
                sfx = (f"_l{layer}" if layer else "") + ("_reverse" if d else "")
                dirs.append((f"kernel{sfx}", f"recurrent_kernel{sfx}", f"bias{sfx}"))
            out.append(dirs)
        return out

    @property
    def features(self) -> int:
        """Width of the pooled representation the dense layer reads (directions × units)."""
        return self.directions * self.units

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """{weight name: shape} for these sizes and this architecture."""
        E, H, C, V = self.embedding_dim, self.units, self.num_classes, self.vocab_size
        shapes: dict[str, tuple[int, ...]] = {"embedding": (V, E)}
        for layer, dirs in enumerate(self.lstm_names()):
            e = E if layer == 0 else self.features
            for k, r, b in dirs:
                shapes.update({k: (e, 4 * H), r: (H, 4 * H), b: (4 * H,)})
        shapes.update({"dense_w": (self.features, C), "dense_b": (C,)})
        return shapes

    @classmethod
    def from_json(cls, text: str, source: str) -> ModelConfig:
        """Parse and validate a config.json's text; unknown keys are refused."""
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


class SentimentClassifier:
    """The classic many-to-one LSTM sentiment model over the fused kernel. ``params`` holds the
    weights by name (WEIGHT_NAMES, shapes from ``config.weight_shapes()``), ``vocab`` the
    tokens, ``label_map`` the class names. Build one with ``create`` (from a training split) or
    ``load`` (a saved model directory)."""

    def __init__(self, config: ModelConfig, vocab: Vocabulary, weights: dict[str, np.ndarray]) -> None:
        self.config = config
        self.vocab = vocab
        self.params = weights
        self.label_map = LabelMap(config.labels)
        self._check_weights()

    # -- construction -------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        train: Split,
        *,
        units: int = 128,
        vectors: str | None = None,
        embedding_dim: int | None = None,
        max_len: int | None = None,
        min_count: int = 1,
        max_vocab: int | None = None,
        keep_prob: float = 0.8,
        train_embeddings: bool = True,
        num_classes: int | None = None,
        layers: int = DEFAULT_ARCHITECTURE["layers"],
        bidirectional: bool = DEFAULT_ARCHITECTURE["bidirectional"],
        pooling: str = DEFAULT_ARCHITECTURE["pooling"],
        embedding_keep_prob: float = DEFAULT_ARCHITECTURE["embedding_keep_prob"],
        precision: str = "float32",
        seed: int = 0,
        log: Callable[[str], Any] = print,
    ) -> SentimentClassifier:
        """A fresh, untrained model whose vocabulary, labels and max_len come from the training
        split. vectors: a word-vectors file or ``glove-6b-50d`` (see sentiment.vectors); without
        it a random embedding_dim-wide table. Pre-trained vectors are fine-tuned unless
        train_embeddings=False (the original model's frozen table); a random table is always
        trained. max_len None: the length that covers 95% of the training sentences. The
        architecture defaults to DEFAULT_ARCHITECTURE; **ORIGINAL_ARCHITECTURE gives the original
        one-layer forward model. precision: the LSTM's products, "float32" or "bfloat16" (needs
        AVX512_BF16 to train; saved, and used by predict and eval)."""
        if precision == "bfloat16":
            require_bf16("training with precision bfloat16")
        rng = np.random.default_rng([seed, 10**6])
        tokenized = [tokenize(t) for t in train.texts]
        vocab = Vocabulary.build(tokenized, min_count=min_count, max_size=max_vocab)
        labels = LabelMap.fit(train.labels, num_classes)
        if max_len is None:
            max_len = default_max_len([len(t) for t in tokenized])
        init = embedding_from_vectors(vocab, vectors, embedding_dim if vectors is None else None, rng)
        if vectors is None:
            train_embeddings = True  # random embeddings are always trained
        log(
            f"vocabulary {len(vocab)} words; embedding {init.matrix.shape[1]}-d from {init.source}"
            + (f", coverage {init.found}/{init.total} ({100 * init.coverage:.1f}%)" if vectors else "")
            + f"; max_len {max_len}; classes {labels.names}"
        )
        E, H, C = init.matrix.shape[1], units, len(labels.names)
        cfg = ModelConfig(
            units=H,
            embedding_dim=E,
            max_len=int(max_len),
            num_classes=C,
            vocab_size=len(vocab),
            keep_prob=keep_prob,
            labels=labels.names,
            train_embeddings=bool(train_embeddings),
            vectors=vectors,
            layers=layers,
            bidirectional=bool(bidirectional),
            pooling=pooling,
            embedding_keep_prob=embedding_keep_prob,
            precision=precision,
        ).validate()
        s = 1.0 / math.sqrt(H)
        shapes = cfg.weight_shapes()
        # The original model's weights are drawn first, in its order, so its runs reproduce.
        weights = {"embedding": init.matrix}
        for layer, dirs in enumerate(cfg.lstm_names()):
            for k, r, b in dirs:
                weights[k] = rng.uniform(-s, s, shapes[k]).astype(np.float32)
                weights[r] = rng.uniform(-s, s, shapes[r]).astype(np.float32)
                weights[b] = np.zeros(4 * H, np.float32)
                weights[b][H : 2 * H] = 1.0  # forget-gate bias 1 (Jozefowicz et al. 2015; Keras default)
                if layer == 0 and k == "kernel":
                    weights["dense_w"] = truncated_normal(rng, shapes["dense_w"], 0.1, np.float32)
        weights["dense_b"] = np.full(C, 0.1, np.float32)
        return cls(cfg, vocab, weights)

    def _check_weights(self) -> None:
        want = self.config.weight_shapes()
        if len(self.vocab) != self.config.vocab_size:
            raise ValueError(f"vocabulary has {len(self.vocab)} tokens, config says {self.config.vocab_size}")
        for k, shape in want.items():
            if k not in self.params:
                raise ValueError(f"weights: missing {k!r}")
            a = self.params[k]
            if a.shape != shape:
                raise ValueError(f"weights[{k!r}]: shape {a.shape}, expected {shape} from the config")
            if a.dtype.kind != "f":
                raise ValueError(f"weights[{k!r}]: dtype {a.dtype} is not floating point")

    # -- the math ----------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids [N, max_len] int32, lengths [N]) of the sentences; an empty sentence is an error."""
        tokenized = [tokenize(t) for t in texts]
        for i, t in enumerate(tokenized):
            if not t:
                raise ValueError(f"sentence {i} is empty")
        return self.vocab.encode(tokenized, self.config.max_len)

    def lstm_weights(self, params: dict[str, np.ndarray] | None = None) -> list[list[tuple[np.ndarray, ...]]]:
        """Per layer, per direction: (kernel, recurrent_kernel, bias) arrays (of ``params``,
        default the model's own)."""
        p = self.params if params is None else params
        return [[tuple(p[n] for n in names) for names in dirs] for dirs in self.config.lstm_names()]

    def forward_backward(
        self,
        ids: np.ndarray,
        lengths: np.ndarray,
        labels: np.ndarray,
        mask: np.ndarray | None = None,
        need_grads: bool = True,
        embedding_mask: np.ndarray | None = None,
    ) -> tuple[float, np.ndarray, dict[str, np.ndarray] | None, tuple[np.ndarray, np.ndarray] | None]:
        """Loss (and gradients) of one batch. mask: the dropout multiplier [B, features] (None:
        no dropout); embedding_mask: the word vectors' dropout multiplier [B, T, E] (T: the
        batch's longest sentence; None: none). Returns (loss, probabilities [B, C], the dense
        weights' gradients by name or None, the embedding's sparse gradient (rows, row grads) or
        None when it is frozen or need_grads is False)."""
        p, cfg = self.params, self.config
        T = int(lengths.max()) if len(lengths) else 1
        ids = ids[:, :T]  # a batch is only as long as its longest sentence
        x = np.take(p["embedding"], ids, axis=0)  # a row gather, cheaper than fancy indexing p[ids]
        if embedding_mask is not None:
            x = x * embedding_mask
        weights = self.lstm_weights()
        seq = cfg.pooling != "last"
        single = cfg.layers == 1 and not cfg.bidirectional
        prec = self.compute_precision()
        if single:
            out, top, _, cache = lstm_forward(
                x, *weights[0][0], lengths=lengths, training=need_grads, return_sequences=seq, precision=prec
            )
        else:
            layers = [tuple(d) if cfg.bidirectional else d[0] for d in weights]
            out, h_n, _, cache = lstm_stack_forward(
                x,
                layers,
                lengths=lengths,
                bidirectional=cfg.bidirectional,
                training=need_grads,
                return_sequences=seq,
                precision=prec,
            )
            top = _top_state(h_n, cfg.directions)
        feats, where = _pool(cfg.pooling, out, top, lengths)
        d = feats * mask if mask is not None else feats
        logits = dense_forward(d, p["dense_w"], p["dense_b"])
        loss, d_logits, probs = softmax_cross_entropy(logits, labels)
        if not need_grads:
            return loss, probs, None, None
        d_d, g_w, g_b = dense_backward(d, p["dense_w"], d_logits)
        d_feats = d_d * mask if mask is not None else d_d
        d_out, d_top = _pool_backward(cfg.pooling, d_feats, out, where, lengths)
        grads = {"dense_w": g_w, "dense_b": g_b}
        # Frozen embeddings learn nothing from the input gradient: skip computing it.
        if single:
            g = lstm_backward(cache, d_outputs=d_out, d_h_n=d_top, need_dx=cfg.train_embeddings)
            grads.update(kernel=g.kernel, recurrent_kernel=g.recurrent_kernel, bias=g.bias)
            dx = g.x
        else:
            L, D, H = cfg.layers, cfg.directions, cfg.units
            d_h_n = None
            if d_top is not None:
                d_h_n = np.zeros((L * D, len(lengths), H), d_top.dtype)
                d_h_n[-D:] = d_top.reshape(len(lengths), D, H).transpose(1, 0, 2)
            g = lstm_stack_backward(cache, d_out, d_h_n, None, need_dx=cfg.train_embeddings)
            for names, lg in zip(cfg.lstm_names(), g.layers):
                for dnames, dg in zip(names, lg if cfg.bidirectional else (lg,)):
                    grads.update(zip(dnames, dg))
            dx = g.x
        if dx is not None and embedding_mask is not None:
            dx = dx * embedding_mask
        sparse = embedding_backward(ids, lengths, dx) if cfg.train_embeddings else None
        return loss, probs, grads, sparse

    def predict_proba(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Class probabilities [N, C] (no dropout)."""
        ids, lengths = self.encode(texts)
        lstm = self.prepared_lstm()  # packed once for every batch
        out = np.zeros((len(texts), self.config.num_classes), np.float32)
        for s in range(0, len(texts), batch_size):
            sl = slice(s, s + batch_size)
            out[sl] = self.probabilities(ids[sl], lengths[sl], lstm)
        return out

    def compute_precision(self) -> str:
        """The precision the LSTM runs at: the config's; a bfloat16 model on a CPU without
        AVX512_BF16 predicts in float32 (warned once; its weights are float32 either way)."""
        if self.config.precision == "bfloat16" and bf16_engine() is None:
            if not getattr(self, "_warned_bf16", False):
                import warnings

                warnings.warn(
                    "this model was trained with bfloat16 products and this CPU lacks AVX512_BF16: "
                    "it runs in float32 here (results differ at bfloat16's precision)",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._warned_bf16 = True
            return "float32"
        return self.config.precision

    def prepared_lstm(self) -> PreparedLSTM | list[list[PreparedLSTM]]:
        """The LSTM's current weights packed for inference (fusedlstm.prepare): a snapshot, not
        updated by later training. One PreparedLSTM for the original one-layer forward model;
        else one per layer and direction."""
        prec = self.compute_precision()
        prepared = [[prepare(*w, precision=prec) for w in dirs] for dirs in self.lstm_weights()]
        if self.config.layers == 1 and not self.config.bidirectional:
            return prepared[0][0]
        return prepared

    def probabilities(
        self, ids: np.ndarray, lengths: np.ndarray, lstm: PreparedLSTM | list[list[PreparedLSTM]] | None = None
    ) -> np.ndarray:
        """Class probabilities [B, C] of encoded sentences (ids, lengths from ``encode``), no
        dropout. lstm: ``prepared_lstm()`` reused across batches (packed here when None)."""
        p, cfg = self.params, self.config
        T = int(lengths.max()) if len(lengths) else 1
        x = np.take(p["embedding"], ids[:, :T], axis=0)
        lstm = lstm if lstm is not None else self.prepared_lstm()
        seq = cfg.pooling != "last"
        if isinstance(lstm, PreparedLSTM):
            out, top, _ = lstm.infer(x, lengths=lengths, return_sequences=seq)
        else:
            out = x
            for layer, dirs in enumerate(lstm):
                keep = seq or layer < len(lstm) - 1
                if len(dirs) == 1:
                    out, top, _ = dirs[0].infer(out, lengths=lengths, return_sequences=keep)
                else:
                    out, h_n, _ = infer_bidirectional(*dirs, out, lengths=lengths, return_sequences=keep)
                    top = np.concatenate([h_n[0], h_n[1]], axis=1)
        feats = _pool_inference(cfg.pooling, out, top, lengths)
        return softmax(dense_forward(feats, p["dense_w"], p["dense_b"]))

    def predict(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """One {"text", "label", "probability"} per sentence: the most probable class."""
        probs = self.predict_proba(texts)
        k = probs.argmax(axis=1)
        return [
            {"text": t, "label": self.label_map.names[i], "probability": float(p[i])}
            for t, i, p in zip(texts, k, probs)
        ]

    def evaluate(self, split: Split) -> dict[str, Any]:
        """accuracy, macro_f1, loss (mean cross-entropy), n, labels and confusion_matrix (rows:
        true class, columns: predicted) on a labelled split."""
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
        return {
            "accuracy": float((pred == y).mean()),
            "macro_f1": float(np.mean(f1s)),
            "loss": loss,
            "n": int(len(y)),
            "labels": self.label_map.names,
            "confusion_matrix": cm.tolist(),
        }

    # -- training ----------------------------------------------------------------------
    def fit(
        self,
        train: Split,
        dev: Split | None,
        opts: TrainOptions,
        out_dir: Path | None = None,
        resume: bool = False,
        log: Callable[[str], Any] = print,
        callbacks: Sequence[object] = (),
    ) -> list[dict]:
        """Train with Adam; evaluate on dev each epoch; keep the best-dev weights (early
        stopping); checkpoint atomically to out_dir after every epoch; `resume` continues the
        run checkpointed there. callbacks: objects with on_step_end(step, logs) and/or
        on_epoch_end(epoch, logs) (see fusedlstm.sentiment.training). Returns the metrics, one
        row per epoch."""
        if self.config.precision == "bfloat16":
            require_bf16("training with precision bfloat16")
        return _fit(self, train, dev, opts, out_dir=out_dir, resume=resume, log=log, callbacks=callbacks)

    # -- persistence -------------------------------------------------------------------
    def save(self, path: str | Path, weights: dict[str, np.ndarray] | None = None) -> None:
        """config.json, vocab.json and weights.npz, each written atomically (weights: instead of
        self.params)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        w = weights if weights is not None else self.params
        cfg = asdict(self.config)
        atomic_write(path / "vocab.json", self.vocab.to_json().encode("utf-8"))
        atomic_write(path / "weights.npz", npz_bytes({k: w[k] for k in self.config.weight_shapes()}))
        atomic_write(
            path / "config.json", (json.dumps(dict(cfg, fusedlstm_version=__version__), indent=1) + "\n").encode()
        )

    @classmethod
    def load(cls, path: str | Path) -> SentimentClassifier:
        """Load a model directory; validates everything before allocating; never unpickles."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"model directory not found: {path}")
        for f in MODEL_FILES:
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
        vocab = Vocabulary.from_json((path / "vocab.json").read_text(encoding="utf-8"), str(path / "vocab.json"))
        weights = load_npz(path / "weights.npz", cfg.weight_shapes())
        weights = {
            k: np.ascontiguousarray(v, dtype=np.float32) if v.dtype.kind == "f" else v for k, v in weights.items()
        }
        try:
            return cls(cfg, vocab, weights)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


def _top_state(h_n: np.ndarray, directions: int) -> np.ndarray:
    """The last layer's final states [L·D, B, H] -> [B, D·H] (forward direction first)."""
    top = h_n[-directions:]
    return np.ascontiguousarray(top.transpose(1, 0, 2).reshape(top.shape[1], -1))


def _pool(pooling: str, out: np.ndarray | None, top: np.ndarray, lengths: np.ndarray):
    """Features [B, F] of each sentence and what the backward needs: the last valid output
    (the final state; for the reverse direction that is its state after reading the whole
    sentence), or the max (argmax kept) or mean over the valid steps only."""
    if pooling == "last":
        return top, None
    valid = (np.arange(out.shape[1])[None, :] < np.asarray(lengths)[:, None])[:, :, None]
    if pooling == "max":
        masked = np.where(valid, out, -np.inf)
        where = masked.argmax(axis=1)[:, None, :]  # [B, 1, F]
        feats = np.take_along_axis(out, where, axis=1)[:, 0]
        return np.where(np.asarray(lengths)[:, None] > 0, feats, 0).astype(out.dtype), where
    n = np.maximum(np.asarray(lengths), 1).astype(out.dtype)[:, None]
    return (out.sum(axis=1) / n).astype(out.dtype), None  # padded outputs are zero


def _pool_inference(pooling: str, out: np.ndarray | None, top: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """_pool's features without what a backward needs, overwriting `out` (a buffer of the
    caller's own): a max over steps is a reduction along T once the padded steps hold -inf,
    where the argmax _pool keeps is a strided pass several times slower."""
    if pooling != "max":
        return _pool(pooling, out, top, lengths)[0]
    lengths = np.asarray(lengths)
    np.copyto(out, -np.inf, where=(np.arange(out.shape[1])[None, :] >= lengths[:, None])[:, :, None])
    feats = out.max(axis=1)
    feats[lengths == 0] = 0
    return feats


def _pool_backward(pooling: str, d_feats: np.ndarray, out, where, lengths):
    """(d_outputs [B, T, F] or None, d_top [B, F] or None) from the features' gradient."""
    if pooling == "last":
        return None, d_feats
    B, T, F = out.shape
    d_out = np.zeros((B, T, F), d_feats.dtype)
    if pooling == "max":
        np.put_along_axis(d_out, where, d_feats[:, None, :], axis=1)
    else:
        n = np.maximum(np.asarray(lengths), 1).astype(d_feats.dtype)[:, None, None]
        valid = (np.arange(T)[None, :] < np.asarray(lengths)[:, None])[:, :, None]
        d_out[...] = np.where(valid, d_feats[:, None, :] / n, 0)
    return d_out, None

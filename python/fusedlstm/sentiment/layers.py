"""The classifier's layers as explicit forward/backward functions over NumPy arrays (no
autograd): embedding lookup with sparse row gradients, inverted dropout with an explicit mask,
dense, and softmax cross-entropy. The LSTM itself is fusedlstm.lstm_forward/backward."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .. import _core

__all__ = [
    "embedding_backward",
    "dropout_mask",
    "dense_forward",
    "dense_backward",
    "softmax_cross_entropy",
    "truncated_normal",
]


def embedding_backward(ids: np.ndarray, lengths: np.ndarray, d_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sparse gradient of table[ids]: (rows [R] int64, the distinct ids in increasing order;
    grads [R, D], each row's d_x summed over its valid positions in position order). Padded
    positions (t >= lengths[b]) contribute nothing. One compiled pass (sort, then sum runs)."""
    ids = np.asarray(ids)
    d_x = np.asarray(d_x)
    if ids.ndim != 2 or d_x.ndim != 3 or d_x.shape[:2] != ids.shape:
        raise ValueError(f"embedding_backward: ids {ids.shape} must be [B, T] and d_x {d_x.shape} [B, T, D]")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding_backward: ids must be integers, got {ids.dtype}")
    lengths = np.asarray(lengths)
    if lengths.shape != ids.shape[:1] or (lengths.size and lengths.dtype.kind not in "iu"):
        raise ValueError(
            f"embedding_backward: lengths must be {ids.shape[:1]} integers, got {lengths.shape} {lengths.dtype}"
        )
    if lengths.size and (lengths.min() < 0 or lengths.max() > ids.shape[1]):
        raise ValueError(f"embedding_backward: lengths must be in [0, {ids.shape[1]}]")
    if d_x.dtype not in (np.float32, np.float64):
        d_x = d_x.astype(np.float64)
    return _core.embedding_row_grads(
        np.ascontiguousarray(ids, np.int64), np.ascontiguousarray(lengths, np.int32), np.ascontiguousarray(d_x)
    )


def dropout_mask(rng: np.random.Generator, shape: int | Sequence[int], keep_prob: float, dtype: type) -> np.ndarray:
    """Inverted-dropout multiplier: 0 with probability 1-keep_prob, else 1/keep_prob."""
    if not 0.0 < keep_prob <= 1.0:
        raise ValueError(f"keep_prob must be in (0, 1], got {keep_prob}")
    if keep_prob == 1.0:
        return np.ones(shape, dtype)
    return (rng.random(shape) < keep_prob).astype(dtype) / dtype(keep_prob)


def dense_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    return x @ w + b


def dense_backward(x: np.ndarray, w: np.ndarray, d_y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d_x, d_w, d_b) of y = x·w + b."""
    return d_y @ w.T, x.T @ d_y, d_y.sum(axis=0)


def _shifted_exp(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z = logits - logits.max(axis=1, keepdims=True)  # max-shifted: exp never overflows
    e = np.exp(z)
    return z, e, e.sum(axis=1, keepdims=True)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise probabilities of logits [B, C]."""
    _, e, s = _shifted_exp(logits)
    return e / s


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(mean loss, d loss / d logits, probabilities) with a max-shifted, overflow-free softmax."""
    z, e, s = _shifted_exp(logits)
    probs = e / s
    n = logits.shape[0]
    loss = float(np.mean(np.log(s[:, 0]) - z[np.arange(n), labels]))
    d = probs.copy()
    d[np.arange(n), labels] -= 1
    return loss, d / n, probs


def truncated_normal(rng: np.random.Generator, shape: int | Sequence[int], stddev: float, dtype: type) -> np.ndarray:
    """Normal(0, stddev) redrawn outside ±2 stddev (TensorFlow's truncated_normal)."""
    out = rng.standard_normal(shape)
    bad = np.abs(out) > 2
    while bad.any():
        out[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(out) > 2
    return (out * stddev).astype(dtype)

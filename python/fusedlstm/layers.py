"""The classifier's layers as explicit forward/backward functions over NumPy arrays (no
autograd): embedding lookup with sparse row gradients, inverted dropout with an explicit mask,
dense, and softmax cross-entropy. The LSTM itself is fusedlstm.lstm_forward/backward."""
from __future__ import annotations

from typing import Tuple

import numpy as np

__all__ = ["embedding_backward", "dropout_mask", "dense_forward", "dense_backward",
           "softmax_cross_entropy", "truncated_normal"]


def embedding_backward(ids: np.ndarray, lengths: np.ndarray, d_x: np.ndarray
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """Sparse gradient of table[ids]: (rows [R] unique ids, grads [R, D]) summed over every
    valid (non-padded) position; padded positions contribute nothing."""
    B, T = ids.shape
    valid = np.arange(T)[None, :] < lengths[:, None]
    flat_ids = ids[valid]
    # Sort once and sum runs with reduceat: much faster than np.add.at, same order every time.
    order = np.argsort(flat_ids, kind="stable")
    sorted_ids = flat_ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    rows = sorted_ids[starts]
    grads = np.add.reduceat(d_x[valid][order], starts, axis=0) if len(starts) else \
        np.zeros((0, d_x.shape[-1]), d_x.dtype)
    return rows, grads


def dropout_mask(rng: np.random.Generator, shape, keep_prob: float, dtype) -> np.ndarray:
    """Inverted-dropout multiplier: 0 with probability 1-keep_prob, else 1/keep_prob."""
    if not 0.0 < keep_prob <= 1.0:
        raise ValueError(f"keep_prob must be in (0, 1], got {keep_prob}")
    if keep_prob == 1.0:
        return np.ones(shape, dtype)
    return (rng.random(shape) < keep_prob).astype(dtype) / dtype(keep_prob)


def dense_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    return x @ w + b


def dense_backward(x: np.ndarray, w: np.ndarray, d_y: np.ndarray):
    """(d_x, d_w, d_b) of y = x·w + b."""
    return d_y @ w.T, x.T @ d_y, d_y.sum(axis=0)


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray):
    """(mean loss, d loss / d logits, probabilities) with a max-shifted, overflow-free softmax."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    probs = e / s
    n = logits.shape[0]
    loss = float(np.mean(np.log(s[:, 0]) - z[np.arange(n), labels]))
    d = probs.copy()
    d[np.arange(n), labels] -= 1
    return loss, d / n, probs


def truncated_normal(rng: np.random.Generator, shape, stddev: float, dtype) -> np.ndarray:
    """Normal(0, stddev) redrawn outside ±2 stddev (TensorFlow's truncated_normal)."""
    out = rng.standard_normal(shape)
    bad = np.abs(out) > 2
    while bad.any():
        out[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(out) > 2
    return (out * stddev).astype(dtype)

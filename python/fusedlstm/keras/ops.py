"""The compiled TensorFlow ops and their registered gradient: FusedLstm's gradient is the
FusedLstmGrad op, fed the forward's cache."""

from __future__ import annotations

import threading

import tensorflow as tf

from .build import build_op

__all__ = ["load_ops", "fused_lstm"]

_lock = threading.Lock()
_lib = None


def load_ops():
    """Load the op library (building it on first use). Call this once before reloading a
    SavedModel that uses the layer in a fresh process: `fusedlstm.keras.load_ops()`."""
    global _lib
    with _lock:
        if _lib is None:
            _lib = tf.load_op_library(str(build_op()))
        return _lib


@tf.RegisterGradient("FusedLstm")
def _fused_lstm_grad(op, d_outputs, d_h_n, d_c_n, _d_cache):
    x, kernel, recurrent_kernel, bias, h0, c0, lengths = op.inputs
    reverse = op.get_attr("reverse")
    if op.get_attr("training"):
        cache = op.outputs[3]
    else:
        # An inference forward kept no cache (a layer called with training=False, then
        # differentiated: saliency maps, adversarial inputs). Run the forward again with one:
        # the kernel is deterministic, so its outputs are the ones being differentiated.
        cache = load_ops().fused_lstm(
            x, kernel, recurrent_kernel, bias, h0, c0, lengths, training=True, return_sequences=False, reverse=reverse
        )[3]

    def zeros_if_none(g, like):
        return tf.zeros_like(like) if g is None else g

    grads = load_ops().fused_lstm_grad(
        x,
        recurrent_kernel,
        lengths,
        cache,
        zeros_if_none(d_outputs, op.outputs[0]),
        zeros_if_none(d_h_n, h0),
        zeros_if_none(d_c_n, h0),
        reverse=reverse,  # the backward must walk the steps as the forward did
    )
    return list(grads) + [None]  # no gradient for lengths


def fused_lstm(x, kernel, recurrent_kernel, bias, h0, c0, lengths, training=True, return_sequences=True, reverse=False):
    """outputs [B,T,H], h_n, c_n, cache — the raw op (see fusedlstm.lstm_forward for semantics;
    reverse=True runs each row's valid steps last to first, outputs at their inputs' positions).
    training=False keeps no cache (the cache output is empty); its gradient, if one is taken
    anyway, runs the forward again with a cache first. return_sequences=False writes no outputs
    (they come back as an empty [B, 0, H] tensor)."""
    return load_ops().fused_lstm(
        x,
        kernel,
        recurrent_kernel,
        bias,
        h0,
        c0,
        lengths,
        training=training,
        return_sequences=return_sequences,
        reverse=reverse,
    )

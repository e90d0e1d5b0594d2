"""The compiled TensorFlow ops and their registered gradient: FusedLstm's gradient is the
FusedLstmGrad op, fed the forward's cache. Optional inputs of the raw ops (lengths, step_mask,
recurrent_masks) are empty [0] tensors when left out; the wrappers here take None. The ops'
attribute ``precision`` is an int code (0 float32, 1 bfloat16 products); the wrappers take the
names, as fusedlstm.lstm_forward does."""

from __future__ import annotations

import threading

import tensorflow as tf

from .._checks import precision_code
from .build import build_op

__all__ = ["load_ops", "fused_lstm", "fused_lstm_grad"]

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


def _or_empty(t, dtype):
    return tf.zeros((0,), dtype) if t is None else t


@tf.RegisterGradient("FusedLstm")
def _fused_lstm_grad(op, d_outputs, d_h_n, d_c_n, _d_cache):
    x, kernel, recurrent_kernel, bias, h0, c0, lengths, step_mask, recurrent_masks = op.inputs
    # The backward runs its products in the forward's precision too (precision), walks the steps
    # and differentiates the activations as the forward did.
    attrs = {k: op.get_attr(k) for k in ("reverse", "activation", "recurrent_activation", "precision")}
    attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
    if op.get_attr("training"):
        cache = op.outputs[3]
    else:
        # An inference forward kept no cache (a layer called with training=False, then
        # differentiated: saliency maps, adversarial inputs). Run the forward again with one:
        # the kernel is deterministic, so its outputs are the ones being differentiated (an
        # inference forward has no recurrent masks).
        cache = load_ops().fused_lstm(
            x,
            kernel,
            recurrent_kernel,
            bias,
            h0,
            c0,
            lengths,
            step_mask,
            recurrent_masks,
            training=True,
            return_sequences=False,
            **attrs,
        )[3]

    def zeros_if_none(g, like):
        return tf.zeros_like(like) if g is None else g

    grads = load_ops().fused_lstm_grad(
        x,
        recurrent_kernel,
        lengths,
        step_mask,
        recurrent_masks,
        cache,
        zeros_if_none(d_outputs, op.outputs[0]),
        zeros_if_none(d_h_n, h0),
        zeros_if_none(d_c_n, h0),
        **attrs,
    )
    return list(grads) + [None, None, None]  # none for lengths, step_mask, recurrent_masks


def fused_lstm(
    x,
    kernel,
    recurrent_kernel,
    bias,
    h0,
    c0,
    lengths=None,
    training=True,
    return_sequences=True,
    reverse=False,
    activation="tanh",
    recurrent_activation="sigmoid",
    step_mask=None,
    recurrent_masks=None,
    precision: str = "float32",
):
    """outputs [B,T,H], h_n, c_n, cache — the raw op (see fusedlstm.lstm_forward for semantics;
    reverse=True runs each row's valid steps last to first, outputs at their inputs' positions).
    lengths [B] int32, or step_mask [B, T] bool (valid steps anywhere; one that only pads on the
    right runs as lengths), or neither (every step valid). recurrent_masks [4, B, H]: Keras's
    recurrent dropout, one mask per gate (i, f, c, o) on h_{t-1}, training only. activation,
    recurrent_activation: Keras's names ("tanh", "relu", "linear", "sigmoid", "hard_sigmoid").
    training=False keeps no cache (the cache output is empty); its gradient, if one is taken
    anyway, runs the forward again with a cache first. return_sequences=False writes no outputs
    (they come back as an empty [B, 0, H] tensor). precision: "float32", or "bfloat16" (float32
    tensors, a CPU with AVX512_BF16: the products' operands rounded to bfloat16, sums, gates,
    states and gradients float32; the registered gradient runs its products so too)."""
    return load_ops().fused_lstm(
        x,
        kernel,
        recurrent_kernel,
        bias,
        h0,
        c0,
        _or_empty(lengths, tf.int32),
        _or_empty(step_mask, tf.bool),
        _or_empty(recurrent_masks, tf.as_dtype(x.dtype) if hasattr(x, "dtype") else tf.float32),
        training=training,
        return_sequences=return_sequences,
        reverse=reverse,
        activation=activation,
        recurrent_activation=recurrent_activation,
        precision=precision_code(precision),
    )


def fused_lstm_grad(
    x,
    recurrent_kernel,
    lengths,
    cache,
    d_outputs,
    d_h_n,
    d_c_n,
    step_mask=None,
    recurrent_masks=None,
    reverse=False,
    activation="tanh",
    recurrent_activation="sigmoid",
    precision: str = "float32",
):
    """dx, d_kernel, d_recurrent_kernel, d_bias, d_h0, d_c0 from a training forward's cache (the
    raw gradient op; lengths, step_mask, recurrent_masks and the attributes, precision included,
    as that forward had them; lengths may be None). The cache is consumed in place when nothing else holds it, else
    copied."""
    return load_ops().fused_lstm_grad(
        x,
        recurrent_kernel,
        _or_empty(lengths, tf.int32),
        _or_empty(step_mask, tf.bool),
        _or_empty(recurrent_masks, tf.as_dtype(x.dtype) if hasattr(x, "dtype") else tf.float32),
        cache,
        d_outputs,
        d_h_n,
        d_c_n,
        reverse=reverse,
        activation=activation,
        recurrent_activation=recurrent_activation,
        precision=precision_code(precision),
    )

"""One LSTM direction as ``torch.library`` custom ops, so autograd, ``torch.compile(fullgraph=True)``
and ``torch.export`` see a single opaque call each way.

``fusedlstm::lstm`` runs the kernel forward; ``fusedlstm::lstm_backward`` is its gradient. Weights
are in the kernel's (Keras) layout: kernel [E, 4H], recurrent_kernel [H, 4H], bias [4H], gates
i, f, c, o. CPU tensors go to the kernel as zero-copy NumPy views when contiguous, and the kernel's
arrays come back as tensors without a copy.

The kernel's training cache is a Python object, and a custom op can only return tensors. So the
forward, when asked to ``keep`` it, files the cache under a fresh integer and returns that integer
as a ``handle`` tensor that also owns the cache (an attribute of the tensor object): the cache
lives exactly as long as autograd keeps the handle. The backward op takes the handle and the
forward's inputs: it consumes the filed cache when it is there, and otherwise (the forward did not
keep one, a second backward with ``retain_graph``, a handle that did not survive a graph
transformation) runs the forward again with a cache first. The kernel is deterministic, so both
give the same gradients; the fallback costs one more forward.

Each op takes a ``precision``, "float32" (default) or "bfloat16": the products' precision of
``lstm_forward`` (float32 tensors only; the layer passes "bfloat16" under CPU autocast). The
backward consumes a cache that remembers it, and a forward run again for the backward uses it
too. On a CPU without AVX512_BF16, "bfloat16" runs as "float32" with one warning per process
(``kernel_precision``), so a model written for autocast still runs there.
"""

from __future__ import annotations

import itertools
import threading
import warnings
import weakref

import numpy as np
import torch

from .. import _core
from .._checks import LstmGrads, precision_code
from ..lstm import (
    BidirectionalCache,
    BidirectionalGrads,
    LstmCache,
    _consume,
    _recycle,
    lstm_backward,
    lstm_bidirectional_forward,
    lstm_forward,
)
from ..prepared import PreparedLSTM

__all__ = [
    "lstm",
    "lstm_backward_op",
    "lstm_bidirectional",
    "lstm_bidirectional_backward_op",
    "infer",
    "kernel_precision",
]

_ids = itertools.count(1)
_filed_lock = threading.Lock()


class _Filed:
    """A kept cache, owned by its handle tensor; _filed maps keys to these weakly."""

    __slots__ = ("cache", "__weakref__")

    def __init__(self, cache: LstmCache | BidirectionalCache):
        self.cache = cache


_filed: weakref.WeakValueDictionary[int, _Filed] = weakref.WeakValueDictionary()


_PRECISIONS = ("float32", "bfloat16")
_warned_no_bf16 = False


def kernel_precision(precision: str) -> str:
    """The precision the kernel runs for a requested one: "bfloat16" runs as "float32" on a CPU
    without AVX512_BF16 (or with bfloat16 switched off by ``_core.set_bf16_engine("none")``),
    with one warning per process naming what is missing."""
    global _warned_no_bf16
    if precision == "float32":
        return precision
    if precision not in _PRECISIONS:
        raise ValueError(f"precision: {precision!r} is not supported; choose 'float32' or 'bfloat16'")
    if str(_core.bf16_engine()) != "none":
        return precision
    if not _warned_no_bf16:
        _warned_no_bf16 = True
        missing = str(_core.bf16_missing()) or "AVX512_BF16 (switched off by set_bf16_engine('none'))"
        warnings.warn(
            f"fusedlstm: bfloat16 compute needs {missing}; the LSTM kernel computes in float32 instead "
            "(autocast's bfloat16 still applies to the other ops)",
            RuntimeWarning,
            stacklevel=3,
        )
    return "float32"


def _array(t: torch.Tensor | None, name: str) -> np.ndarray | None:
    if t is None:
        return None
    if t.device.type != "cpu":
        raise RuntimeError(f"fusedlstm runs on the CPU; {name} is on {t.device}")
    return t.detach().numpy()


_NAMES = ("x", "kernel", "recurrent_kernel", "bias", "h0", "c0", "lengths")


def _arrays(*tensors) -> list[np.ndarray | None]:
    return [_array(t, n) for t, n in zip(tensors, _NAMES)]


def _forward(
    x, kernel, recurrent_kernel, bias, h0, c0, lengths, reverse, training, return_sequences, precision="float32"
):
    """lstm_forward for one direction: ``reverse`` runs each row's valid steps last to first, the
    outputs (and, in the backward, dx) in x's layout; ``precision`` as the kernel runs it
    (``kernel_precision``)."""
    return lstm_forward(
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
        precision=precision,
    )


def infer(
    prepared: PreparedLSTM,
    x: torch.Tensor,
    h0: torch.Tensor | None,
    c0: torch.Tensor | None,
    lengths: torch.Tensor | None,
    reverse: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One direction on prepared weights (no autograd, eager only): outputs, h_n, c_n."""
    a = [_array(t, n) for t, n in zip((x, h0, c0, lengths), ("x", "h0", "c0", "lengths"))]
    outputs, h_n, c_n = prepared.infer(*a, reverse=reverse)
    return torch.from_numpy(outputs), torch.from_numpy(h_n), torch.from_numpy(c_n)


def _file(cache) -> torch.Tensor:
    """A fresh handle tensor that owns the kept cache (_filed only points at it)."""
    key = next(_ids)
    handle = torch.tensor(key, dtype=torch.int64)
    handle._fusedlstm_cache = filed = _Filed(cache)
    with _filed_lock:
        _filed[key] = filed
    return handle


def _take(handle: torch.Tensor):
    """The cache a handle filed, taken out; None when there is none or it was already consumed
    (a second backward through a retained graph)."""
    key = int(handle.item())
    with _filed_lock:
        filed = _filed.pop(key, None) if key else None
    cache = None if filed is None else filed.cache
    return None if cache is None or cache.used else cache


def _empty_outputs(x: torch.Tensor, H: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], 0, H))


@torch.library.custom_op("fusedlstm::lstm", mutates_args=())
def lstm(
    x: torch.Tensor,
    kernel: torch.Tensor,
    recurrent_kernel: torch.Tensor,
    bias: torch.Tensor | None,
    h0: torch.Tensor | None,
    c0: torch.Tensor | None,
    lengths: torch.Tensor | None,
    reverse: bool,
    return_sequences: bool,
    keep: bool,
    precision: str = "float32",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LSTM direction over right-padded x [B, T, E] -> (outputs [B, T, H] (or [B, 0, H]
    without return_sequences), h_n [B, H], c_n [B, H], handle). ``lengths`` int32 [B] or None;
    ``reverse`` runs each row's valid prefix backwards (outputs in the input's time order);
    ``keep`` files the training cache for the backward (see the module docstring); ``precision``
    "float32" or "bfloat16" (the products', float32 tensors only)."""
    a = _arrays(x, kernel, recurrent_kernel, bias, h0, c0, lengths)
    outputs, h_n, c_n, cache = _forward(
        *a,
        reverse=reverse,
        training=keep,
        return_sequences=return_sequences,
        precision=kernel_precision(precision),
    )
    out = _empty_outputs(x, h_n.shape[1]) if outputs is None else torch.from_numpy(outputs)
    handle = _file(cache) if cache is not None else torch.zeros((), dtype=torch.int64)
    return out, torch.from_numpy(h_n), torch.from_numpy(c_n), handle


@lstm.register_fake
def _(x, kernel, recurrent_kernel, bias, h0, c0, lengths, reverse, return_sequences, keep, precision="float32"):
    B, T, _ = x.shape
    H = recurrent_kernel.shape[0]
    out = x.new_empty((B, T if return_sequences else 0, H))
    return out, x.new_empty((B, H)), x.new_empty((B, H)), x.new_empty((), dtype=torch.int64)


@torch.library.custom_op("fusedlstm::lstm_backward", mutates_args=())
def lstm_backward_op(
    handle: torch.Tensor,
    x: torch.Tensor,
    kernel: torch.Tensor,
    recurrent_kernel: torch.Tensor,
    bias: torch.Tensor | None,
    h0: torch.Tensor | None,
    c0: torch.Tensor | None,
    lengths: torch.Tensor | None,
    reverse: bool,
    d_outputs: torch.Tensor | None,
    d_h_n: torch.Tensor | None,
    d_c_n: torch.Tensor | None,
    need_dx: bool,
    precision: str = "float32",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``fusedlstm::lstm``: (dx [B, T, E] (or [0] without need_dx), d_kernel,
    d_recurrent_kernel, d_bias [4H], d_h0 [B, H], d_c0 [B, H]); d_bias is returned even when the
    forward had no bias. None upstream gradients are zero. ``precision`` is the forward's: the
    kept cache carries it, and a forward run again uses it."""
    cache = _take(handle)
    a = _arrays(x, kernel, recurrent_kernel, bias, h0, c0, lengths)
    if cache is None:
        _, _, _, cache = _forward(
            *a, reverse=reverse, training=True, return_sequences=False, precision=kernel_precision(precision)
        )
    d_out = None if d_outputs is None or d_outputs.numel() == 0 else _array(d_outputs.contiguous(), "d_outputs")
    d_h = None if d_h_n is None else _array(d_h_n.contiguous(), "d_h_n")
    d_c = None if d_c_n is None else _array(d_c_n.contiguous(), "d_c_n")
    g = lstm_backward(cache, d_outputs=d_out, d_h_n=d_h, d_c_n=d_c, need_dx=need_dx)
    dx = torch.from_numpy(g.x) if g.x is not None else x.new_empty((0,))
    return dx, *(torch.from_numpy(v) for v in (g.kernel, g.recurrent_kernel, g.bias, g.h0, g.c0))


@lstm_backward_op.register_fake
def _(
    handle,
    x,
    kernel,
    recurrent_kernel,
    bias,
    h0,
    c0,
    lengths,
    reverse,
    d_outputs,
    d_h_n,
    d_c_n,
    need_dx,
    precision="float32",
):
    B = x.shape[0]
    H = recurrent_kernel.shape[0]
    dx = torch.empty_like(x) if need_dx else x.new_empty((0,))
    return (
        dx,
        torch.empty_like(kernel),
        torch.empty_like(recurrent_kernel),
        x.new_empty((4 * H,)),
        x.new_empty((B, H)),
        x.new_empty((B, H)),
    )


def _setup_context(ctx, inputs, output):
    x, kernel, recurrent_kernel, bias, h0, c0, lengths, reverse, _return_sequences, _keep, precision = inputs
    ctx.save_for_backward(x, kernel, recurrent_kernel, bias, h0, c0, lengths, output[3])
    ctx.reverse = reverse
    ctx.precision = precision


def _backward_formula(ctx, d_outputs, d_h_n, d_c_n, _d_handle):
    x, kernel, recurrent_kernel, bias, h0, c0, lengths, handle = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dk, drk, db, dh0, dc0 = lstm_backward_op(
        handle,
        x,
        kernel,
        recurrent_kernel,
        bias,
        h0,
        c0,
        lengths,
        ctx.reverse,
        d_outputs,
        d_h_n,
        d_c_n,
        need[0],
        ctx.precision,
    )
    return (
        dx if need[0] else None,
        dk if need[1] else None,
        drk if need[2] else None,
        db if bias is not None and need[3] else None,
        dh0 if h0 is not None and need[4] else None,
        dc0 if c0 is not None and need[5] else None,
        None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd("fusedlstm::lstm", _backward_formula, setup_context=_setup_context)


# -- both directions of a layer in one kernel call (lstm_bidirectional_forward) ----------------


def _bi_arrays(x, kf, rf, bf, kr, rr, br, h0, c0, lengths) -> list[np.ndarray | None]:
    a = _arrays(x, kf, rf, bf, h0, c0, lengths)
    b = _arrays(None, kr, rr, br)
    return [a[0], *a[1:4], *b[1:4], a[4], a[5], a[6]]


def _bi_forward(x, kf, rf, bf, kr, rr, br, h0, c0, lengths, precision, training):
    """lstm_bidirectional_forward on NumPy arrays (h0, c0 [2, B, H] or None, lengths int32 or
    None); ``precision`` as the kernel runs it. Straight into the compiled module, which checks
    every array itself; when it refuses, the public function converts what it can and words the
    error."""
    try:
        outputs, h_n, c_n, cf, cr = _core.forward_bidirectional(
            x, (kf, rf, bf, kr, rr, br), h0, c0, lengths, bool(training), True, 0, 3, precision_code(precision)
        )
    except (TypeError, ValueError):
        return lstm_bidirectional_forward(
            x, (kf, rf, bf), (kr, rr, br), h0, c0, lengths, training=training, precision=precision
        )
    return outputs, h_n, c_n, BidirectionalCache(LstmCache(cf), LstmCache(cr)) if training else None


def _backward(cache, d_outputs, d_h_n, d_c_n, need_dx):
    """lstm_backward with NumPy upstream gradients (or None), straight into the compiled module
    (which checks every array); the public function words any error."""
    if isinstance(cache, BidirectionalCache):
        with cache._lock:
            bufs = (cache.forward._buf, cache.reverse._buf)
            grads = None
            if bufs[0] is not None and bufs[1] is not None:
                try:
                    grads = _core.backward_bidirectional(
                        cache.forward._core, cache.reverse._core, d_outputs, d_h_n, d_c_n, bool(need_dx)
                    )
                except (TypeError, ValueError):
                    pass
        if grads is not None:
            for buf in bufs:
                _recycle(buf)
            dx, dk0, dr0, db0, dk1, dr1, db1, dh0, dc0 = grads
            return BidirectionalGrads(
                dx, LstmGrads(None, dk0, dr0, db0, dh0[0], dc0[0]), LstmGrads(None, dk1, dr1, db1, dh0[1], dc0[1])
            )
    elif type(cache) is LstmCache and cache.device == "cpu" and not cache.used:
        try:
            return _consume(cache, d_outputs, d_h_n, d_c_n, need_dx)
        except (TypeError, ValueError):
            pass
    return lstm_backward(cache, d_outputs=d_outputs, d_h_n=d_h_n, d_c_n=d_c_n, need_dx=need_dx)


@torch.library.custom_op("fusedlstm::lstm_bidirectional", mutates_args=())
def lstm_bidirectional(
    x: torch.Tensor,
    kernel: torch.Tensor,
    recurrent_kernel: torch.Tensor,
    bias: torch.Tensor | None,
    kernel_reverse: torch.Tensor,
    recurrent_kernel_reverse: torch.Tensor,
    bias_reverse: torch.Tensor | None,
    h0: torch.Tensor | None,
    c0: torch.Tensor | None,
    lengths: torch.Tensor | None,
    keep: bool,
    precision: str = "float32",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both directions of a bidirectional layer in one kernel call (the directions share the
    cores): (outputs [B, T, 2H], h_n [2, B, H], c_n [2, B, H], handle); h0, c0 [2, B, H] or None;
    ``precision`` as ``fusedlstm::lstm``."""
    outputs, h_n, c_n, cache = _bi_forward(
        *_bi_arrays(
            x, kernel, recurrent_kernel, bias, kernel_reverse, recurrent_kernel_reverse, bias_reverse, h0, c0, lengths
        ),
        kernel_precision(precision),
        keep,
    )
    handle = _file(cache) if cache is not None else torch.zeros((), dtype=torch.int64)
    return torch.from_numpy(outputs), torch.from_numpy(h_n), torch.from_numpy(c_n), handle


@lstm_bidirectional.register_fake
def _(
    x,
    kernel,
    recurrent_kernel,
    bias,
    kernel_reverse,
    recurrent_kernel_reverse,
    bias_reverse,
    h0,
    c0,
    lengths,
    keep,
    precision="float32",
):
    B, T, _ = x.shape
    H = recurrent_kernel.shape[0]
    return (
        x.new_empty((B, T, 2 * H)),
        x.new_empty((2, B, H)),
        x.new_empty((2, B, H)),
        x.new_empty((), dtype=torch.int64),
    )


@torch.library.custom_op("fusedlstm::lstm_bidirectional_backward", mutates_args=())
def lstm_bidirectional_backward_op(
    handle: torch.Tensor,
    x: torch.Tensor,
    kernel: torch.Tensor,
    recurrent_kernel: torch.Tensor,
    bias: torch.Tensor | None,
    kernel_reverse: torch.Tensor,
    recurrent_kernel_reverse: torch.Tensor,
    bias_reverse: torch.Tensor | None,
    h0: torch.Tensor | None,
    c0: torch.Tensor | None,
    lengths: torch.Tensor | None,
    d_outputs: torch.Tensor | None,
    d_h_n: torch.Tensor | None,
    d_c_n: torch.Tensor | None,
    need_dx: bool,
    precision: str = "float32",
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """Gradients of ``fusedlstm::lstm_bidirectional``: (dx (or [0]), d_kernel,
    d_recurrent_kernel, d_bias of each direction, d_h0 [2, B, H], d_c0 [2, B, H]); as the
    one-direction op, the forward runs again when its cache is gone."""
    cache = _take(handle)
    if cache is None:
        _, _, _, cache = _bi_forward(
            *_bi_arrays(
                x,
                kernel,
                recurrent_kernel,
                bias,
                kernel_reverse,
                recurrent_kernel_reverse,
                bias_reverse,
                h0,
                c0,
                lengths,
            ),
            kernel_precision(precision),
            True,
        )

    def arr(t, name):
        return None if t is None or t.numel() == 0 else _array(t.contiguous(), name)

    g = _backward(cache, arr(d_outputs, "d_outputs"), arr(d_h_n, "d_h_n"), arr(d_c_n, "d_c_n"), need_dx)
    dx = torch.from_numpy(g.x) if g.x is not None else x.new_empty((0,))
    f, r = g.forward, g.reverse
    return (
        dx,
        *(torch.from_numpy(v) for v in (f.kernel, f.recurrent_kernel, f.bias, r.kernel, r.recurrent_kernel, r.bias)),
        torch.from_numpy(np.stack([f.h0, r.h0])),
        torch.from_numpy(np.stack([f.c0, r.c0])),
    )


@lstm_bidirectional_backward_op.register_fake
def _(
    handle,
    x,
    kernel,
    recurrent_kernel,
    bias,
    kernel_reverse,
    recurrent_kernel_reverse,
    bias_reverse,
    h0,
    c0,
    lengths,
    d_outputs,
    d_h_n,
    d_c_n,
    need_dx,
    precision="float32",
):
    B = x.shape[0]
    H = recurrent_kernel.shape[0]
    return (
        torch.empty_like(x) if need_dx else x.new_empty((0,)),
        torch.empty_like(kernel),
        torch.empty_like(recurrent_kernel),
        x.new_empty((4 * H,)),
        torch.empty_like(kernel_reverse),
        torch.empty_like(recurrent_kernel_reverse),
        x.new_empty((4 * H,)),
        x.new_empty((2, B, H)),
        x.new_empty((2, B, H)),
    )


def _bi_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:10], output[3])
    ctx.precision = inputs[11]


def _bi_backward_formula(ctx, d_outputs, d_h_n, d_c_n, _d_handle):
    *saved, handle = ctx.saved_tensors
    x, kf, rf, bf, kr, rr, br, h0, c0, lengths = saved
    need = ctx.needs_input_grad
    grads = lstm_bidirectional_backward_op(
        handle, x, kf, rf, bf, kr, rr, br, h0, c0, lengths, d_outputs, d_h_n, d_c_n, need[0], ctx.precision
    )
    dx, dkf, drf, dbf, dkr, drr, dbr, dh0, dc0 = grads
    return (
        dx if need[0] else None,
        dkf if need[1] else None,
        drf if need[2] else None,
        dbf if bf is not None and need[3] else None,
        dkr if need[4] else None,
        drr if need[5] else None,
        dbr if br is not None and need[6] else None,
        dh0 if h0 is not None and need[7] else None,
        dc0 if c0 is not None and need[8] else None,
        None,
        None,
        None,
    )


torch.library.register_autograd("fusedlstm::lstm_bidirectional", _bi_backward_formula, setup_context=_bi_setup_context)

"""Stacked (optionally bidirectional) LSTMs from the fused single-layer calls: layer l reads
layer l-1's output sequence, with dropout between layers in training (not after the last, as
``torch.nn.LSTM(dropout=p)``). States are laid out as torch's: ``h0``/``h_n`` [L·D, B, H],
layer-major, the forward direction first. Each bidirectional layer is one
``lstm_bidirectional_forward`` call, so its two directions share the cores."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._checks import as_float_array, check_flag, check_forward, check_upstream
from .lstm import BidirectionalCache, LstmCache, LstmGrads, lstm_backward, lstm_bidirectional_forward, lstm_forward

__all__ = ["StackCache", "StackGrads", "lstm_stack_forward", "lstm_stack_backward"]


class StackCache:
    """What ``lstm_stack_backward`` needs from a training ``lstm_stack_forward``: each layer's
    cache and the dropout multipliers applied to each layer's outputs (good for one backward)."""

    __slots__ = ("caches", "masks", "bidirectional", "shape", "dtype")

    def __init__(self, caches, masks, bidirectional, shape, dtype):
        self.caches = caches
        self.masks = masks
        self.bidirectional = bidirectional
        self.shape = shape  # (B, T, E, H)
        self.dtype = dtype

    @property
    def used(self) -> bool:
        return any(c.used for c in self.caches)

    def __repr__(self) -> str:
        B, T, E, H = self.shape
        kind = "bidirectional" if self.bidirectional else "unidirectional"
        return f"StackCache({len(self.caches)} {kind} layers, B={B}, T={T}, E={E}, H={H}, used={self.used})"


class StackGrads(NamedTuple):
    """Gradients of a stack: ``x`` [B, T, E] (None when not asked for), ``layers`` (per layer, the
    weights' gradients in the structure they were given: (kernel, recurrent_kernel, bias), or a
    pair of such tuples for a bidirectional layer; a bias given as None still gets its
    gradient), ``h0`` and ``c0`` [L·D, B, H]."""

    x: np.ndarray | None
    layers: list
    h0: np.ndarray
    c0: np.ndarray


def _layer_weights(layers, bidirectional: bool):
    if not isinstance(layers, (list, tuple)) or not layers:
        raise TypeError("layers: expected a non-empty list of per-layer weights")
    out = []
    for i, w in enumerate(layers):
        if bidirectional:
            if not (isinstance(w, (list, tuple)) and len(w) == 2 and all(isinstance(d, (list, tuple)) for d in w)):
                raise TypeError(
                    f"layers[{i}]: a bidirectional layer takes ((kernel, recurrent_kernel, bias) forward, "
                    "(kernel, recurrent_kernel, bias) reverse)"
                )
            out.append(tuple(tuple(d) + (None,) * (3 - len(d)) for d in w))
        else:
            if not (isinstance(w, (list, tuple)) and len(w) in (2, 3)):
                raise TypeError(f"layers[{i}]: expected (kernel, recurrent_kernel, bias)")
            out.append(tuple(w) + (None,) * (3 - len(w)))
    return out


def lstm_stack_forward(
    x,
    layers,
    h0=None,
    c0=None,
    lengths=None,
    *,
    bidirectional: bool = False,
    dropout: float = 0.0,
    rng: np.random.Generator | None = None,
    training: bool = True,
    return_sequences: bool = True,
    precision: str = "float32",
):
    """Run L stacked LSTM layers (each one or two directions) over x.

    Parameters
    ----------
    x : array [B, T, E], float32 or float64
    layers : list of L per-layer weights, Keras layout: (kernel [E_l, 4H], recurrent_kernel
        [H, 4H], bias [4H] or None), or for ``bidirectional`` a pair of those (forward, reverse).
        E_0 = E; E_l = D·H above (D = 2 when bidirectional).
    h0, c0 : arrays [L·D, B, H] or None (zeros)
    lengths : as ``lstm_forward`` (every layer sees the same lengths)
    dropout : probability of zeroing each output element of every layer but the last, in
        training only (the rest scaled by 1/(1-p)); the multipliers come from ``rng``.
    rng : numpy Generator, required when dropout > 0 and training
    training, return_sequences : as ``lstm_forward`` (return_sequences concerns the last layer)
    precision : as ``lstm_forward``, for every layer (and their backward)

    Returns
    -------
    outputs [B, T, D·H] of the last layer (None without return_sequences), h_n and c_n
    [L·D, B, H], cache (``StackCache``, or None when not training)
    """
    bidirectional = check_flag("bidirectional", bidirectional)
    training = check_flag("training", training)
    weights = _layer_weights(layers, bidirectional)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
    use_dropout = training and dropout > 0 and len(weights) > 1
    if use_dropout and not isinstance(rng, np.random.Generator):
        raise TypeError("rng: dropout in training needs a numpy Generator (np.random.default_rng(seed))")
    first = weights[0][0] if bidirectional else weights[0]
    a = check_forward(x, *first, None, None, lengths)
    D, L, B, H, dt = (2 if bidirectional else 1), len(weights), a.B, a.H, a.x.dtype
    shape = (L * D, B, H)
    states = []
    for name, s in (("h0", h0), ("c0", c0)):
        if s is not None:
            s = as_float_array(name, s, dt, 3)
            if s.shape != shape:
                raise ValueError(f"{name}: expected shape {shape} ([layers·directions, B, H]), got {s.shape}")
        states.append(s)
    h0, c0 = states

    def state(s, layer):  # this layer's slice: [D, B, H] or [B, H]
        if s is None:
            return None
        return s[layer * D : (layer + 1) * D] if bidirectional else s[layer]

    h_n, c_n = np.empty(shape, dt), np.empty(shape, dt)
    caches, masks = [], []
    inp = a.x
    for layer, w in enumerate(weights):
        last = layer == L - 1
        keep_seq = return_sequences or not last
        if bidirectional:
            out, h, c, cache = lstm_bidirectional_forward(
                inp, w[0], w[1], state(h0, layer), state(c0, layer), a.lengths, training, keep_seq, precision=precision
            )
        else:
            out, h, c, cache = lstm_forward(
                inp,
                *w,
                state(h0, layer),
                state(c0, layer),
                a.lengths,
                training,
                return_sequences=keep_seq,
                precision=precision,
            )
        h_n[layer * D : (layer + 1) * D] = h.reshape(D, B, -1)
        c_n[layer * D : (layer + 1) * D] = c.reshape(D, B, -1)
        caches.append(cache)
        if use_dropout and not last:
            mask = (rng.random(out.shape) >= dropout).astype(dt) / dt.type(1 - dropout)
            out = out * mask
            masks.append(mask)
        else:
            masks.append(None)
        inp = out
    cache = StackCache(caches, masks, bidirectional, (a.B, a.T, a.E, H), dt) if training else None
    return inp, h_n, c_n, cache


def lstm_stack_backward(cache: StackCache, d_outputs=None, d_h_n=None, d_c_n=None, need_dx: bool = True) -> StackGrads:
    """Gradients of a training ``lstm_stack_forward`` (one backward per cache).

    d_outputs [B, T, D·H] (the last layer's outputs) or None; d_h_n, d_c_n [L·D, B, H] or None.
    """
    if not isinstance(cache, StackCache):
        raise TypeError(f"cache: expected the StackCache returned by lstm_stack_forward, got {type(cache).__name__}")
    B, T, _, H = cache.shape
    L, D, dt = len(cache.caches), (2 if cache.bidirectional else 1), cache.dtype
    d_outputs = check_upstream("d_outputs", d_outputs, dt, (B, T, D * H), "[B, T, D·H] like outputs")
    d_h_n = check_upstream("d_h_n", d_h_n, dt, (L * D, B, H), "[L·D, B, H] like h_n")
    d_c_n = check_upstream("d_c_n", d_c_n, dt, (L * D, B, H), "[L·D, B, H] like c_n")
    if cache.used:
        raise ValueError("cache was already used by lstm_stack_backward (one backward per forward)")
    dh0, dc0 = np.empty((L * D, B, H), dt), np.empty((L * D, B, H), dt)
    grads: list = [None] * L
    d_out = d_outputs
    for layer in reversed(range(L)):
        sl = slice(layer * D, (layer + 1) * D)
        dh = None if d_h_n is None else d_h_n[sl]
        dc = None if d_c_n is None else d_c_n[sl]
        want_dx = need_dx or layer > 0
        c = cache.caches[layer]
        if isinstance(c, BidirectionalCache):
            g = lstm_backward(c, d_out, dh, dc, need_dx=want_dx)
            grads[layer] = tuple((d.kernel, d.recurrent_kernel, d.bias) for d in (g.forward, g.reverse))
            dh0[sl] = np.stack([g.forward.h0, g.reverse.h0])
            dc0[sl] = np.stack([g.forward.c0, g.reverse.c0])
        else:
            assert isinstance(c, LstmCache)
            g: LstmGrads = lstm_backward(
                c, d_out, None if dh is None else dh[0], None if dc is None else dc[0], want_dx
            )
            grads[layer] = (g.kernel, g.recurrent_kernel, g.bias)
            dh0[sl], dc0[sl] = g.h0, g.c0
        d_out = g.x
        if layer > 0 and cache.masks[layer - 1] is not None:
            d_out = d_out * cache.masks[layer - 1]
    return StackGrads(d_out if need_dx else None, grads, dh0, dc0)

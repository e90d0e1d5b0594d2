"""The readable oracle: the same ``lstm_forward`` / ``lstm_backward`` as the compiled kernel,
written as a plain NumPy loop over time with the textbook BPTT equations. Tests hold the kernel to
it; nothing here is meant to be fast. Unlike the compiled cache, this one may be reused."""

from __future__ import annotations

import numpy as np

from ._checks import LstmGrads, activation_code, check_forward, check_step_mask, check_upstream, precision_code

__all__ = ["lstm_forward", "lstm_backward", "sigmoid", "flip_valid", "round_bf16"]


def round_bf16(a) -> np.ndarray:
    """a rounded to bfloat16 as the kernel rounds its products' operands, in a's dtype: through
    float32, to nearest even; float32 denormals become signed zeros and NaN stays NaN."""
    a = np.asarray(a)
    f = np.ascontiguousarray(a, np.float32)
    u = f.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    r = np.where((u & 0x7F800000) == 0, (u >> 16) & 0x8000, r)
    r = np.where(np.isnan(f), (u >> 16) | 0x40, r)
    return (r.astype(np.uint32) << 16).view(np.float32).astype(a.dtype)


def _products(precision: str):
    """The matrix product with the kernel's operand precision."""
    if precision_code(precision):
        return lambda a, b: round_bf16(a) @ round_bf16(b)
    return lambda a, b: a @ b


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)); exp overflows to inf for very negative z and the result is then 0."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-z))


def hard_sigmoid(z: np.ndarray) -> np.ndarray:
    """Keras 3's hard_sigmoid: relu6(z + 3) / 6."""
    return np.minimum(np.maximum(z + 3, 0), 6) / 6


# By lstm.h's code: the function, and its derivative written with its output y.
_ACTS = {
    0: (np.tanh, lambda y: 1 - y * y),
    1: (lambda z: np.maximum(z, 0), lambda y: (y > 0).astype(y.dtype)),
    2: (lambda z: z, lambda y: np.ones_like(y)),
    3: (sigmoid, lambda y: y * (1 - y)),
    4: (hard_sigmoid, lambda y: ((y > 0) & (y < 1)).astype(y.dtype) / 6),
}


def flip_valid(a: np.ndarray, lengths: np.ndarray | None) -> np.ndarray:
    """A copy of a [B, T, ...] with each row's valid prefix a[b, :lengths[b]] reversed (the rest
    as it is): a reverse pass is a forward pass over these steps, its outputs flipped back."""
    out = a.copy()
    for b in range(a.shape[0]):
        n = a.shape[1] if lengths is None else int(lengths[b])
        out[b, :n] = a[b, :n][::-1]
    return out


def lstm_forward(
    x,
    kernel,
    recurrent_kernel,
    bias=None,
    h0=None,
    c0=None,
    lengths=None,
    training: bool = True,
    return_sequences: bool = True,
    reverse: bool = False,
    activation: str = "tanh",
    recurrent_activation: str = "sigmoid",
    recurrent_masks=None,
    mask=None,
    step_valid=None,
    precision: str = "float32",
):
    """NumPy reference of :func:`fusedlstm.lstm_forward` (same arguments and results).
    (step_valid: internal, the [B, T] valid steps of a mask with holes.) With
    precision="bfloat16" every product's operands are rounded by ``round_bf16`` and the rest
    runs in the arrays' dtype: given float64 copies of float32 inputs, it is the kernel's
    rounding with exact sums, the oracle for its bfloat16 results."""
    mm = _products(precision)
    a = check_forward(x, kernel, recurrent_kernel, bias, h0, c0, lengths)
    if mask is not None:
        lengths, step_mask = check_step_mask(mask, a.lengths, a.B, a.T)
        if step_mask is not None:
            return _masked_forward(
                a,
                step_mask,
                training,
                return_sequences,
                reverse,
                activation,
                recurrent_activation,
                recurrent_masks,
                precision,
            )
        a = a._replace(lengths=lengths)
    acts = (activation_code("activation", activation), activation_code("recurrent_activation", recurrent_activation))
    if reverse:
        outputs, h, c, cache = lstm_forward(
            flip_valid(a.x, a.lengths),
            a.kernel,
            a.recurrent_kernel,
            a.bias,
            a.h0,
            a.c0,
            a.lengths,
            training,
            activation=activation,
            recurrent_activation=recurrent_activation,
            recurrent_masks=recurrent_masks,
            precision=precision,
        )
        if cache is not None:
            cache["reverse"] = a.lengths
        return (flip_valid(outputs, a.lengths) if return_sequences else None), h, c, cache
    B, T, H, dt = a.B, a.T, a.H, a.x.dtype
    W, R = a.kernel, a.recurrent_kernel
    b = a.bias if a.bias is not None else np.zeros(4 * H, dt)
    h = a.h0.copy() if a.h0 is not None else np.zeros((B, H), dt)
    c = a.c0.copy() if a.c0 is not None else np.zeros((B, H), dt)
    lengths = a.lengths if a.lengths is not None else np.full(B, T, np.int32)
    valid_steps = np.arange(T)[None, :] < lengths[:, None] if step_valid is None else step_valid
    act, rec = _ACTS[acts[0]][0], _ACTS[acts[1]][0]
    masks = None if recurrent_masks is None else np.asarray(recurrent_masks, dt)
    outputs = np.zeros((B, T, H), dt)
    steps = []
    for t in range(T):
        if masks is None:
            z = mm(a.x[:, t], W) + mm(h, R) + b
        else:  # gate k's product reads h ⊙ masks[k]
            z = (
                mm(a.x[:, t], W)
                + np.concatenate([mm(h * masks[k], R[:, k * H : (k + 1) * H]) for k in range(4)], 1)
                + b
            )
        i = rec(z[:, :H])
        f = rec(z[:, H : 2 * H])
        g = act(z[:, 2 * H : 3 * H])
        o = rec(z[:, 3 * H :])
        c_new = f * c + i * g
        h_new = o * act(c_new)
        valid = valid_steps[:, t][:, None]
        steps.append((h, c, i, f, g, o, c_new, valid))
        outputs[:, t] = np.where(valid, h_new, 0)
        h = np.where(valid, h_new, h)
        c = np.where(valid, c_new, c)
    cache = None
    if training:
        cache = {
            "x": a.x.copy(),
            "kernel": W.copy(),
            "recurrent_kernel": R.copy(),
            "steps": steps,
            "shape": (B, T, a.E, H),
            "dtype": dt,
            "acts": acts,
            "masks": masks,
            "precision": precision,
        }
    return (outputs if return_sequences else None), h, c, cache


def _masked_forward(
    a, step_mask, training, return_sequences, reverse, activation, recurrent_activation, masks, precision
):
    """A mask with holes: the forward pass over the valid steps (invalid ones carry the state);
    a reverse pass over the positions T-1 ... 0, its outputs flipped back."""
    valid = step_mask.astype(bool)
    x = a.x[:, ::-1] if reverse else a.x
    v = valid[:, ::-1] if reverse else valid
    outputs, h, c, cache = lstm_forward(
        np.ascontiguousarray(x),
        a.kernel,
        a.recurrent_kernel,
        a.bias,
        a.h0,
        a.c0,
        None,
        training,
        activation=activation,
        recurrent_activation=recurrent_activation,
        recurrent_masks=masks,
        step_valid=v,
        precision=precision,
    )
    if cache is not None and reverse:
        cache["flip_all"] = True
    if reverse:
        outputs = outputs[:, ::-1]
    return (np.ascontiguousarray(outputs) if return_sequences else None), h, c, cache


def lstm_backward(cache, d_outputs=None, d_h_n=None, d_c_n=None, need_dx: bool = True) -> LstmGrads:
    """NumPy reference of :func:`fusedlstm.lstm_backward`: BPTT, one step at a time."""
    if cache is None:
        raise ValueError("cache is None: the forward ran with training=False")
    B, T, E, H = cache["shape"]
    dt = cache["dtype"]
    d_outputs = check_upstream("d_outputs", d_outputs, dt, (B, T, H), "[B, T, H] like outputs")
    d_h_n = check_upstream("d_h_n", d_h_n, dt, (B, H), "[B, H] like h_n")
    d_c_n = check_upstream("d_c_n", d_c_n, dt, (B, H), "[B, H] like c_n")
    if cache.get("flip_all"):  # a reverse pass over a mask with holes: all positions flipped
        inner = {k: v for k, v in cache.items() if k != "flip_all"}
        d_out = None if d_outputs is None else np.ascontiguousarray(np.asarray(d_outputs)[:, ::-1])
        g = lstm_backward(inner, d_out, d_h_n, d_c_n, need_dx)
        return g._replace(x=None if g.x is None else np.ascontiguousarray(g.x[:, ::-1]))
    if "reverse" in cache:  # a reverse pass: the forward pass over flipped steps
        lengths = cache["reverse"]
        inner = {k: v for k, v in cache.items() if k != "reverse"}
        d_out = None if d_outputs is None else flip_valid(d_outputs, lengths)
        g = lstm_backward(inner, d_out, d_h_n, d_c_n, need_dx)
        return g._replace(x=None if g.x is None else flip_valid(g.x, lengths))
    x, W, R = cache["x"], cache["kernel"], cache["recurrent_kernel"]
    act, d_act = _ACTS[cache["acts"][0]]
    d_rec = _ACTS[cache["acts"][1]][1]
    masks = cache["masks"]
    mm = _products(cache.get("precision", "float32"))
    dh = d_h_n.copy() if d_h_n is not None else np.zeros((B, H), dt)
    dc = d_c_n.copy() if d_c_n is not None else np.zeros((B, H), dt)
    dx = np.zeros((B, T, E), dt)
    dW, dR, db = np.zeros_like(W), np.zeros_like(R), np.zeros(4 * H, dt)
    for t in reversed(range(T)):
        h_prev, c_prev, i, f, g, o, c_new, valid = cache["steps"][t]
        dh_t = dh + d_outputs[:, t] if d_outputs is not None else dh
        tc = act(c_new)
        dc_t = dc + dh_t * o * d_act(tc)
        dz = np.concatenate(
            [dc_t * g * d_rec(i), dc_t * c_prev * d_rec(f), dc_t * i * d_act(g), dh_t * tc * d_rec(o)],
            axis=1,
        )
        dz = np.where(valid, dz, 0)
        # Padded steps contribute exactly nothing, even where their data is NaN or Inf.
        dW += mm(np.where(valid, x[:, t], 0).T, dz)
        hp = np.where(valid, h_prev, 0)
        if masks is None:
            dR += mm(hp.T, dz)
            dh_prev = mm(dz, R.T)
        else:
            dh_prev = 0
            for k in range(4):
                cols = slice(k * H, (k + 1) * H)
                dR[:, cols] += mm((hp * masks[k]).T, dz[:, cols])
                dh_prev = dh_prev + mm(dz[:, cols], R[:, cols].T) * masks[k]
        db += dz.sum(axis=0)
        dx[:, t] = np.where(valid, mm(dz, W.T), 0)
        dh = np.where(valid, dh_prev, dh)
        dc = np.where(valid, dc_t * f, dc)
    return LstmGrads(dx if need_dx else None, dW, dR, db, dh, dc)

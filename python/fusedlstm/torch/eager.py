"""The layer in eager mode: each layer (one direction, or both directions of a bidirectional layer)
is one ``torch.autograd.Function`` that hands the kernel zero-copy NumPy views of the tensors.

The custom ops in ops.py are what ``torch.compile``, ``torch.export``, ``jit`` tracing and functorch
transforms see; in plain eager code their autograd wrapper (argument defaults filled on every call,
a dispatcher round trip each way, a handle tensor for the kernel's cache) cost more than a small
problem's whole kernel call. Here the cache stays on the autograd context, the parameters are
inputs (so their gradients arrive in torch's layout, the transpose done once by autograd's
accumulation) and the kernel-layout weights are fresh copies made from the parameters' current
values on every call: nothing is cached, so an in-place change by any means (an optimizer step,
``load_state_dict``, fused Adam, an edit through ``.data``, which move no version counter) is
always seen. The two paths give the same results: the same kernel calls on the same arrays.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import ops

try:
    from torch.utils._python_dispatch import _get_current_dispatch_mode
except ImportError:  # pragma: no cover - an older or newer torch without it: be conservative

    def _get_current_dispatch_mode():
        return True


__all__ = ["active", "plain", "kernel_weights", "Views", "Layer", "run_layer", "unpack"]

_PLAIN = (torch.Tensor, nn.Parameter)
# Above this many elements torch's blocked transpose beats NumPy's strided copy; below it NumPy
# has the smaller call overhead.
_TORCH_TRANSPOSE = 1 << 15


def active() -> bool:
    """Whether this call runs eagerly on real tensors: not traced by Dynamo, export, make_fx (a
    dispatch mode) or ``torch.jit.trace``, and outside functorch transforms. Anything else takes the
    custom ops, which those tools understand."""
    return (
        not torch.compiler.is_compiling()
        and _get_current_dispatch_mode() is None
        and not torch._C._are_functorch_transforms_active()
        and torch._C._get_tracing_state() is None
    )


def plain(tensors) -> bool:
    """Whether every tensor is a plain CPU-backed ``Tensor`` or ``Parameter`` (no subclass such as a
    fake or functional tensor, which has no NumPy view)."""
    return all(t is None or type(t) in _PLAIN for t in tensors)


def _transposed(w: torch.Tensor, view: np.ndarray) -> np.ndarray:
    if view.size > _TORCH_TRANSPOSE:
        return w.detach().t().contiguous().numpy()
    return np.ascontiguousarray(view.T)


def _torch_layout(a: np.ndarray) -> torch.Tensor:
    """A kernel-layout gradient [E, 4H] as torch's [4H, E]: small ones copied here (cheaper than
    autograd's copy of a strided tensor), large ones a transposed view that autograd's
    accumulation into .grad copies (torch's blocked transpose) or adds in place."""
    if a.size > _TORCH_TRANSPOSE:
        return torch.from_numpy(a.T)
    return torch.from_numpy(np.ascontiguousarray(a.T))


def kernel_weights(params, has_bias: bool, views=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One direction's nn.LSTM parameters (weight_ih [4H, E], weight_hh [4H, H], bias_ih, bias_hh) as
    the kernel's (kernel [E, 4H], recurrent_kernel [H, 4H], bias_ih + bias_hh): fresh arrays made
    from the parameters' current values, so a later change of the parameters cannot reach a
    forward that is run again for a backward. ``views``: the parameters' NumPy views, if at hand."""
    if views is None:
        views = [p.detach().numpy() for p in params]
    bias = np.add(views[2], views[3]) if has_bias else None
    return _transposed(params[0], views[0]), _transposed(params[1], views[1]), bias


class Views:
    """Zero-copy NumPy views of a module's parameters, valid while each parameter is the same object
    on the same storage with the same shape (a view sees every in-place change, however made).
    Holding the views keeps the old storages alive, so a replaced one cannot reappear at the same
    address while it is remembered."""

    __slots__ = ("entry",)

    def __init__(self):
        self.entry: tuple[list, list[int], list[np.ndarray]] = ([], [], [])  # replaced whole: thread-safe

    def get(self, params: list) -> list[np.ndarray]:
        old, ptrs, views = self.entry
        if len(old) == len(params):
            for p, q, ptr, v in zip(params, old, ptrs, views):
                if p is not q or p.data_ptr() != ptr or p.shape != v.shape:
                    break
            else:
                return views
        views = [p.detach().numpy() for p in params]
        self.entry = (list(params), [p.data_ptr() for p in params], views)
        return views


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().numpy()


def _kernel(x, weights, h0, c0, lengths, precision: str, training: bool):
    """One layer's kernel call on arrays: (outputs [B, T, D·H], h_n [D, B, H], c_n [D, B, H], cache)."""
    if len(weights) == 2:
        return ops._bi_forward(x, *weights[0], *weights[1], h0, c0, lengths, precision, training)
    out, h, c, cache = ops._forward(
        x,
        *weights[0],
        None if h0 is None else h0[0],
        None if c0 is None else c0[0],
        lengths,
        reverse=False,
        training=training,
        return_sequences=True,
        precision=precision,
    )
    return out, h[None], c[None], cache


class Layer(torch.autograd.Function):
    """One layer, forward and backward, as ``apply(spec, x, h0, c0, *params)``: spec = (directions,
    has_bias, lengths (int32 array or None), the kernel's precision, the parameters' NumPy views);
    x [B, T, E] contiguous, h0, c0 [D, B, H] contiguous or None, params each direction's nn.LSTM
    parameters in order. Returns (outputs [B, T, D·H], h_n [D, B, H], c_n [D, B, H])."""

    @staticmethod
    def forward(ctx, spec, x, h0, c0, *params):
        weights = _layer_weights(spec, params)
        out, h, c, cache = _kernel(_np(x), weights, _np(h0), _np(c0), spec[2], spec[3], True)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, h0, c0)  # read only to run the forward again (a retained graph)
        ctx.spec = spec
        ctx.weights = weights
        ctx.cache = cache
        return torch.from_numpy(out), torch.from_numpy(h), torch.from_numpy(c)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_h, d_c):
        D, has_bias, lengths, precision, _ = ctx.spec
        cache, ctx.cache = ctx.cache, None
        if cache is None or cache.used:  # a second backward through a retained graph
            x, h0, c0 = ctx.saved_tensors
            cache = _kernel(_np(x), ctx.weights, _np(h0), _np(c0), lengths, precision, True)[3]
        need = ctx.needs_input_grad
        d_out, d_h, d_c = (None if t is None else t.contiguous().numpy() for t in (d_out, d_h, d_c))
        if D == 1:
            g = ops._backward(
                cache,
                d_out,
                None if d_h is None else d_h[0],
                None if d_c is None else d_c[0],
                need[1],
            )
            per_dir, dh0, dc0 = (g,), g.h0[None], g.c0[None]
        else:
            g = ops._backward(cache, d_out, d_h, d_c, need[1])
            per_dir = (g.forward, g.reverse)
            dh0, dc0 = np.stack([g.forward.h0, g.reverse.h0]), np.stack([g.forward.c0, g.reverse.c0])
        grads = [
            None,
            torch.from_numpy(g.x) if need[1] and g.x is not None else None,
            torch.from_numpy(dh0) if need[2] else None,
            torch.from_numpy(dc0) if need[3] else None,
        ]
        for gd in per_dir:
            grads += [_torch_layout(gd.kernel), _torch_layout(gd.recurrent_kernel)]
            if has_bias:
                db = torch.from_numpy(gd.bias)
                grads += [db, db]  # bias_ih and bias_hh both get d(bias_ih + bias_hh), as autograd's add
        return tuple(grads)


def _layer_weights(spec, params) -> list[tuple]:
    D, has_bias, _, _, views = spec
    per = len(params) // D
    return [kernel_weights(params[d * per : (d + 1) * per], has_bias, views[d * per : (d + 1) * per]) for d in range(D)]


def run_layer(spec, x, h0, c0, params):
    """One layer: through ``Layer`` when a backward can follow (grad mode on and something requires
    grad), else the kernel alone with no cache kept. (outputs, h_n, c_n) as ``Layer``."""
    if torch.is_grad_enabled() and (
        x.requires_grad
        or (h0 is not None and (h0.requires_grad or c0.requires_grad))
        or any(p.requires_grad for p in params)
    ):
        return Layer.apply(spec, x, h0, c0, *params)
    out, h, c, _ = _kernel(_np(x), _layer_weights(spec, params), _np(h0), _np(c0), spec[2], spec[3], False)
    return torch.from_numpy(out), torch.from_numpy(h), torch.from_numpy(c)


def unpack(packed) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """A PackedSequence as a padded [B, T, E] batch in the original row order (zero past each row's
    length), its lengths (int32) and ``order``: for each packed row, its row of the padded
    [B·T, ·] layout (``out.view(B·T, F).index_select(0, order)`` packs a result back). The index
    arithmetic runs in NumPy on batch_sizes; the data moves in one index_copy."""
    data, sizes = packed.data, packed.batch_sizes
    sizes = sizes.numpy() if sizes.device.type == "cpu" else sizes.cpu().numpy()
    T = len(sizes)
    B = int(sizes[0]) if T else 0
    sorted_to_orig = np.arange(B) if packed.sorted_indices is None else packed.sorted_indices.cpu().numpy()
    # Packed row i is step t of sorted row b (time-major: each step's rows in sorted order).
    t_of = np.repeat(np.arange(T), sizes)
    starts = np.cumsum(sizes) - sizes
    b_sorted = np.arange(len(t_of)) - starts[t_of]
    order = torch.from_numpy(sorted_to_orig[b_sorted] * T + t_of)
    lens = np.empty(B, np.int32)
    lens[sorted_to_orig] = np.searchsorted(-sizes, -np.arange(B), side="left")  # rows longer than b: sizes > b
    # index_copy's gradient for the copied rows is one gather (index_select of the padded gradient).
    x = data.new_zeros((B * T,) + tuple(data.shape[1:])).index_copy(0, order, data).view(B, T, *data.shape[1:])
    return x, lens, order

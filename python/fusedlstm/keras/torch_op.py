"""The fused LSTM for Keras's torch backend: a torch.autograd.Function over fusedlstm's NumPy API
(zero-copy views of CPU tensors in, the kernel's arrays wrapped as tensors out). The forward
keeps the kernel's cache for exactly one backward, which runs its products in the forward's
precision (the cache remembers it)."""

from __future__ import annotations

import numpy as np
import torch

from ..lstm import lstm_backward, lstm_forward

__all__ = ["fused_lstm"]


def _array(t: torch.Tensor, name: str) -> np.ndarray:
    if t.device.type != "cpu":
        raise RuntimeError(
            f"fusedlstm.keras.LSTM on the torch backend runs on the CPU; {name} is "
            f"on {t.device} (move the model and its inputs to the CPU)"
        )
    return t.detach().numpy()


class _FusedLstm(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x, kernel, recurrent_kernel, bias, h0, c0, mask, recurrent_masks, return_sequences, training, opts
    ):
        names = ("inputs", "kernel", "recurrent_kernel", "bias", "initial h", "initial c")
        arrays = [_array(t, n) for t, n in zip((x, kernel, recurrent_kernel, bias, h0, c0), names)]
        outputs, h_n, c_n, cache = lstm_forward(
            *arrays,
            mask=None if mask is None else _array(mask, "mask"),  # a right-padded one runs as lengths
            recurrent_masks=None if recurrent_masks is None else _array(recurrent_masks, "recurrent dropout masks"),
            training=training,
            return_sequences=return_sequences,
            **opts,
        )
        ctx.cache = cache
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        if outputs is None:
            outputs = np.zeros((x.shape[0], 0, h_n.shape[1]), h_n.dtype)
        return torch.from_numpy(outputs), torch.from_numpy(h_n), torch.from_numpy(c_n)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_outputs, d_h_n, d_c_n):
        cache, ctx.cache = ctx.cache, None
        if cache is None:
            raise RuntimeError(
                "fusedlstm.keras.LSTM (torch backend): the forward's cache was "
                "already used; backward through it once (no retain_graph reuse)"
            )

        def arr(g):
            return None if g is None or g.numel() == 0 else _array(g.contiguous(), "gradient")

        g = lstm_backward(
            cache, d_outputs=arr(d_outputs), d_h_n=arr(d_h_n), d_c_n=arr(d_c_n), need_dx=ctx.needs_input_grad[0]
        )
        grads = [g.x, g.kernel, g.recurrent_kernel, g.bias, g.h0, g.c0]
        return (
            *(
                torch.from_numpy(a) if a is not None and need else None
                for a, need in zip(grads, ctx.needs_input_grad[:6])
            ),
            None,  # the mask
            None,  # the recurrent dropout masks: drawn, not learned
            None,
            None,
            None,
        )


def fused_lstm(
    x,
    kernel,
    recurrent_kernel,
    bias,
    h0,
    c0,
    mask=None,
    return_sequences=True,
    reverse=False,
    activation="tanh",
    recurrent_activation="sigmoid",
    recurrent_masks=None,
    precision: str = "float32",
):
    """outputs [B, T, H] ([B, 0, H] without return_sequences), h_n, c_n; differentiable in every
    float argument (see fusedlstm.lstm_forward for the semantics: mask [B, T] bool, valid steps
    anywhere, or None; reverse=True runs each row's valid steps last to first, outputs at their
    inputs' positions; recurrent_masks [4, B, H], Keras's recurrent dropout, needs a backward to
    follow; precision: "float32" or "bfloat16", as lstm_forward takes it)."""
    floats = (x, kernel, recurrent_kernel, bias, h0, c0)
    # The kernel keeps a cache only when a backward can follow: grad mode on and something to
    # differentiate (Keras's predict and evaluate run under torch.no_grad: no cache).
    # (ctx.needs_input_grad cannot tell: it ignores grad mode.)
    training = torch.is_grad_enabled() and any(t.requires_grad for t in floats)
    if recurrent_masks is not None and not training:
        # The kernel takes recurrent masks in training only; a training call with no graph to
        # differentiate (frozen weights under no_grad) still drops out, as Keras's would.
        training = True
    opts = {
        "reverse": reverse,
        "activation": activation,
        "recurrent_activation": recurrent_activation,
        "precision": precision,
    }
    return _FusedLstm.apply(*floats, mask, recurrent_masks, return_sequences, training, opts)

"""Weight converters between the Keras layout fusedlstm uses (kernel [E, 4H], recurrent_kernel
[H, 4H], one bias [4H]) and PyTorch ``nn.LSTM``'s (weight_ih [4H, E], weight_hh [4H, H], bias_ih
and bias_hh [4H]). Both use gate order i, f, c(g), o, so conversion is a transpose and a bias sum:
exact in both directions (torch -> keras -> torch returns the summed bias in bias_ih)."""

from __future__ import annotations

import numpy as np

__all__ = ["keras_to_torch", "torch_to_keras"]


def _np(a, name: str) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor, without importing torch
        a = a.detach().cpu().numpy()
    arr = np.asarray(a)
    if arr.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {arr.dtype}")
    return arr


def keras_to_torch(kernel, recurrent_kernel, bias=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(kernel [E,4H], recurrent_kernel [H,4H], bias [4H]) -> (weight_ih, weight_hh, bias_ih, bias_hh).

    The whole bias goes to bias_ih; bias_hh is zero.
    """
    k, r = _np(kernel, "kernel"), _np(recurrent_kernel, "recurrent_kernel")
    if r.ndim != 2 or r.shape[1] != 4 * r.shape[0]:
        raise ValueError(f"recurrent_kernel: expected shape (H, 4H), got {r.shape}")
    H = r.shape[0]
    if k.ndim != 2 or k.shape[1] != 4 * H:
        raise ValueError(f"kernel: expected shape (E, {4 * H}), got {k.shape}")
    b = np.zeros(4 * H, k.dtype) if bias is None else _np(bias, "bias")
    if b.shape != (4 * H,):
        raise ValueError(f"bias: expected shape ({4 * H},), got {b.shape}")
    return (np.ascontiguousarray(k.T), np.ascontiguousarray(r.T), b.copy(), np.zeros(4 * H, b.dtype))


def torch_to_keras(weight_ih, weight_hh, bias_ih=None, bias_hh=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weight_ih [4H,E], weight_hh [4H,H], bias_ih, bias_hh) -> (kernel, recurrent_kernel, bias)."""
    wi, wh = _np(weight_ih, "weight_ih"), _np(weight_hh, "weight_hh")
    if wh.ndim != 2 or wh.shape[0] != 4 * wh.shape[1]:
        raise ValueError(f"weight_hh: expected shape (4H, H), got {wh.shape}")
    H = wh.shape[1]
    if wi.ndim != 2 or wi.shape[0] != 4 * H:
        raise ValueError(f"weight_ih: expected shape ({4 * H}, E), got {wi.shape}")
    bias = np.zeros(4 * H, wi.dtype)
    for name, b in (("bias_ih", bias_ih), ("bias_hh", bias_hh)):
        if b is not None:
            b = _np(b, name)
            if b.shape != (4 * H,):
                raise ValueError(f"{name}: expected shape ({4 * H},), got {b.shape}")
            bias = bias + b
    return np.ascontiguousarray(wi.T), np.ascontiguousarray(wh.T), bias

"""Inference on weights packed once. ``prepare(kernel, recurrent_kernel, bias)`` copies and
packs the weights into the kernel's own layout and returns a ``PreparedLSTM``; its ``infer``
runs the forward pass (nothing stored for a backward) without re-packing them, which is what a
server answering small batches, or a stream fed one step at a time, pays for on every call of
``lstm_forward``. Results equal ``lstm_forward(..., training=False)`` bit for bit."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _core
from ._checks import (
    ACTIVATIONS,
    activation_code,
    as_float_array,
    check_flag,
    check_forward,
    check_step_mask,
    precision_code,
)
from .lstm import _pair, _recycle, _take  # the scratch buffers lstm_forward recycles: workspaces too

__all__ = ["PreparedLSTM", "prepare", "infer_bidirectional"]


def _frozen_copy(a: np.ndarray | None) -> np.ndarray | None:
    if a is None:
        return None
    out = np.array(a, copy=True, order="C")
    out.flags.writeable = False
    return out


class PreparedLSTM:
    """LSTM weights packed once for inference (see ``prepare``).

    Immutable: it keeps read-only copies of the weights it was built from (``kernel``,
    ``recurrent_kernel``, ``bias``), so changing the caller's arrays afterwards changes nothing.
    Thread-safe: any number of Python threads may call ``infer`` at once (the GIL is released
    while the kernel runs). Picklable: it pickles as its weights and packs them again on load.
    """

    __slots__ = ("_core", "_kernel", "_recurrent_kernel", "_bias", "_acts")

    def __init__(
        self,
        kernel,
        recurrent_kernel,
        bias=None,
        activation: str = "tanh",
        recurrent_activation: str = "sigmoid",
        precision: str = "float32",
    ) -> None:
        code = precision_code(precision)
        acts = (
            activation_code("activation", activation),
            activation_code("recurrent_activation", recurrent_activation),
        )
        k = as_float_array("kernel", kernel, None, 2)
        r = as_float_array("recurrent_kernel", recurrent_kernel, k.dtype, 2)
        b = None if bias is None else as_float_array("bias", bias, k.dtype, 1)
        H = r.shape[0]
        if r.shape != (H, 4 * H):
            raise ValueError(f"recurrent_kernel: expected shape (H, 4H), got {tuple(r.shape)}")
        if k.shape[1] != 4 * H:
            raise ValueError(
                f"kernel: expected shape (E, {4 * H}) to match recurrent_kernel {tuple(r.shape)}, got {tuple(k.shape)}"
            )
        if b is not None and b.shape != (4 * H,):
            raise ValueError(f"bias: expected shape ({4 * H},), got {tuple(b.shape)}")
        object.__setattr__(self, "_kernel", _frozen_copy(k))
        object.__setattr__(self, "_recurrent_kernel", _frozen_copy(r))
        object.__setattr__(self, "_bias", _frozen_copy(b))
        object.__setattr__(self, "_acts", acts)
        object.__setattr__(self, "_core", _core.prepare(self._kernel, self._recurrent_kernel, self._bias, code))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("PreparedLSTM is immutable: prepare new weights instead")

    def __reduce__(self):
        return (PreparedLSTM, (self._kernel, self._recurrent_kernel, self._bias, *self.activations, self.precision))

    @property
    def activations(self) -> tuple[str, str]:
        """(activation, recurrent_activation) by Keras's names."""
        names = {v: k for k, v in ACTIVATIONS.items()}
        return names[self._acts[0]], names[self._acts[1]]

    @property
    def precision(self) -> str:
        """The products' precision the weights were packed for ("float32" or "bfloat16")."""
        return str(self._core.precision)

    @property
    def kernel(self) -> np.ndarray:
        """[E, 4H], read-only."""
        return self._kernel

    @property
    def recurrent_kernel(self) -> np.ndarray:
        """[H, 4H], read-only."""
        return self._recurrent_kernel

    @property
    def bias(self) -> np.ndarray | None:
        """[4H] or None, read-only."""
        return self._bias

    @property
    def input_size(self) -> int:
        return int(self._kernel.shape[0])

    @property
    def units(self) -> int:
        return int(self._recurrent_kernel.shape[0])

    @property
    def dtype(self) -> np.dtype:
        return self._kernel.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weights (beside the read-only copies of the originals)."""
        return int(self._core.nbytes)

    def __repr__(self) -> str:
        extra = ", precision='bfloat16'" if self.precision == "bfloat16" else ""
        return f"PreparedLSTM(input_size={self.input_size}, units={self.units}, dtype={self.dtype}{extra})"

    def _checked_x(self, x) -> np.ndarray:
        """x as a [B, T, input_size] array of the prepared dtype, or an error naming both shapes."""
        if isinstance(x, np.ndarray) and x.dtype != self.dtype and x.dtype.kind == "f":
            raise TypeError(
                f"x: dtype {x.dtype} does not match the prepared weights' dtype "
                f"{self.dtype}; convert x or prepare weights of that dtype"
            )
        xa = as_float_array("x", x, self.dtype, 3)
        if xa.shape[2] != self.input_size:
            raise ValueError(
                f"x: expected shape (B, T, {self.input_size}) for weights prepared "
                f"with kernel {tuple(self._kernel.shape)}, got {tuple(xa.shape)}"
            )
        return xa

    def infer(
        self,
        x,
        h0=None,
        c0=None,
        lengths=None,
        return_sequences: bool = True,
        reverse: bool = False,
        mask=None,
    ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """Run the LSTM over x with the prepared weights; store nothing for a backward.

        Parameters
        ----------
        x : array [B, T, E] of the prepared dtype (E = ``input_size``)
        h0, c0 : arrays [B, H] or None (zeros). To stream a sequence in chunks (T = 1 for one
            step at a time), pass the previous call's ``h_n`` and ``c_n``: the result is the
            one call over the whole sequence would give.
        lengths : integer array [B] in 0..T, or None (all T); right padding as in
            ``lstm_forward``.
        return_sequences : bool
            False returns None for ``outputs`` and never writes them.
        reverse : bool
            Run each row's valid steps last to first, as ``lstm_forward(..., reverse=True)``.
        mask : array [B, T] of booleans or None: valid steps anywhere, as ``lstm_forward``'s.

        Returns
        -------
        outputs [B, T, H] (None without return_sequences), h_n [B, H], c_n [B, H]
        """
        reverse = check_flag("reverse", reverse)
        step_mask = None
        if mask is not None:
            B, T = np.shape(x)[:2] if np.ndim(x) == 3 else (-1, -1)
            lengths, step_mask = check_step_mask(mask, lengths, B, T)
        if type(x) is np.ndarray and (lengths is None or (type(lengths) is np.ndarray and lengths.dtype == np.int32)):
            spare = _take(self.dtype)
            try:  # already what the compiled call takes: skip the conversions
                outputs, h_n, c_n, work = self._core.infer(
                    x, h0, c0, lengths, bool(return_sequences), spare, reverse, *self._acts, step_mask
                )
                _recycle(work)
                return outputs, h_n, c_n
            except (TypeError, ValueError):
                _recycle(spare)
                # the checks below convert what they can and word the error
        xa = self._checked_x(x)
        a = check_forward(xa, self._kernel, self._recurrent_kernel, self._bias, h0, c0, lengths)
        spare = _take(self.dtype)
        try:
            outputs, h_n, c_n, work = self._core.infer(
                a.x, a.h0, a.c0, a.lengths, bool(return_sequences), spare, reverse, *self._acts, step_mask
            )
        except (TypeError, ValueError):
            _recycle(spare)
            raise
        _recycle(work)
        return outputs, h_n, c_n


def prepare(
    kernel,
    recurrent_kernel,
    bias=None,
    activation: str = "tanh",
    recurrent_activation: str = "sigmoid",
    precision: str = "float32",
) -> PreparedLSTM:
    """Pack LSTM weights once for fast repeated inference.

    Parameters
    ----------
    kernel : array [E, 4H]; recurrent_kernel : array [H, 4H]; bias : array [4H] or None
        Keras layout, gate order i, f, c, o (as ``lstm_forward``), float32 or float64.
    activation, recurrent_activation : the activations ``infer`` computes (as ``lstm_forward``)
    precision : "float32" or "bfloat16": the products' precision (as ``lstm_forward``); the
        weights are packed as bfloat16 once, half the bytes each step streams.

    Returns
    -------
    PreparedLSTM, whose ``infer(x, h0=None, c0=None, lengths=None, return_sequences=True)``
    returns ``(outputs, h_n, c_n)``.
    """
    return PreparedLSTM(kernel, recurrent_kernel, bias, activation, recurrent_activation, precision)


def infer_bidirectional(
    forward: PreparedLSTM,
    backward: PreparedLSTM,
    x,
    h0=None,
    c0=None,
    lengths=None,
    return_sequences: bool = True,
    mask=None,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Both directions of a bidirectional layer on prepared weights in one compiled call.

    The result equals ``forward.infer(x, ...)`` and ``backward.infer(x, ..., reverse=True)``
    bit for bit, with the outputs written side by side into one array (no concatenation) and,
    when one direction alone would leave threads idle (small batches), the two directions
    running at once, a thread each.

    Parameters
    ----------
    forward, backward : PreparedLSTM of the same input size, units, dtype, precision and
        activations (``backward`` reads each row's valid steps last to first)
    x : array [B, T, E] of the prepared dtype
    h0, c0 : arrays [2, B, H] (forward direction first) or None (zeros)
    lengths, mask, return_sequences : as ``PreparedLSTM.infer``

    Returns
    -------
    outputs [B, T, 2H] (the forward direction's H columns, then the backward's; None without
    return_sequences), h_n and c_n [2, B, H]
    """
    for name, p in (("forward", forward), ("backward", backward)):
        if not isinstance(p, PreparedLSTM):
            raise TypeError(f"{name}: expected a PreparedLSTM (fusedlstm.prepare), got {type(p).__name__}")
    if forward._acts != backward._acts:
        raise ValueError(f"backward: activations {backward.activations} differ from forward's {forward.activations}")
    step_mask = None
    if mask is not None:
        B, T = np.shape(x)[:2] if np.ndim(x) == 3 else (-1, -1)
        lengths, step_mask = check_step_mask(mask, lengths, B, T)
    x = forward._checked_x(x)
    if not (lengths is None or (type(lengths) is np.ndarray and lengths.dtype == np.int32)):
        lengths = check_forward(x, forward.kernel, forward.recurrent_kernel, forward.bias, None, None, lengths).lengths
    shape = (2, x.shape[0], forward.units)
    h0 = _pair("h0", h0, forward.dtype, shape)
    c0 = _pair("c0", c0, forward.dtype, shape)
    spares = tuple(b for b in (_take(forward.dtype), _take(forward.dtype)) if b is not None)
    try:
        outputs, h_n, c_n, wf, wb = _core.infer_bidirectional(
            forward._core, backward._core, x, h0, c0, lengths, bool(return_sequences), spares, *forward._acts, step_mask
        )
    except (TypeError, ValueError):
        for b in spares:
            _recycle(b)
        raise
    for b in (wf, wb) if wb is not None else (wf, *spares[1:]):  # one shared, or one each
        _recycle(b)
    return outputs, h_n, c_n

"""Argument checking shared by the compiled path (``lstm.py``) and the NumPy oracle
(``reference.py``): both accept exactly the same inputs and reject bad ones with the same
messages, so tests can hold them to one contract. Every message names the argument and the
shapes or dtypes involved."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class LstmGrads(NamedTuple):
    """Gradients of an LSTM call with respect to each input (NumPy arrays).

    x [B, T, E], kernel [E, 4H], recurrent_kernel [H, 4H], bias [4H], h0 [B, H], c0 [B, H].
    """

    x: np.ndarray
    kernel: np.ndarray
    recurrent_kernel: np.ndarray
    bias: np.ndarray
    h0: np.ndarray
    c0: np.ndarray


class ForwardInputs(NamedTuple):
    x: np.ndarray
    kernel: np.ndarray
    recurrent_kernel: np.ndarray
    bias: np.ndarray | None
    h0: np.ndarray | None
    c0: np.ndarray | None
    lengths: np.ndarray | None  # int32
    B: int
    T: int
    E: int
    H: int


def _shape(a) -> str:
    return str(tuple(int(d) for d in a.shape))


def as_float_array(name: str, value, dtype: np.dtype | None, ndim: int) -> np.ndarray:
    """C-contiguous float array of rank ``ndim``; ``dtype`` None means 'float32 or float64'."""
    if isinstance(value, np.ndarray):
        arr = value
    else:
        try:
            arr = np.asarray(value, dtype=dtype)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name}: cannot convert {type(value).__name__} to an array: {exc}") from None
    if arr.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype {arr.dtype} is not supported; use float32 or float64")
    if dtype is not None and arr.dtype != dtype:
        raise TypeError(f"{name}: dtype {arr.dtype} does not match x's dtype {dtype}; convert all arrays to one dtype")
    if arr.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d array, got shape {_shape(arr)}")
    return np.ascontiguousarray(arr)


def expect_shape(name: str, arr: np.ndarray, shape: tuple, what: str) -> None:
    if arr.shape != shape:
        raise ValueError(f"{name}: expected shape {shape} ({what}), got {_shape(arr)}")


def as_lengths(lengths, B: int, T: int) -> np.ndarray | None:
    if lengths is None:
        return None
    arr = lengths if isinstance(lengths, np.ndarray) else np.asarray(lengths)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"lengths: expected an integer array, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"lengths: expected a 1-d array of shape ({B},), got shape {_shape(arr)}")
    if arr.shape[0] != B:
        raise ValueError(f"lengths: expected shape ({B},) (one per batch row of x), got {_shape(arr)}")
    if B:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > T:
            bad = int(np.flatnonzero((arr < 0) | (arr > T))[0])
            raise ValueError(f"lengths[{bad}] = {int(arr[bad])} is outside [0, T={T}]")
    # A copy: a cache keeps these lengths until backward, and must not see the caller's array
    # change in between.
    return np.array(arr, dtype=np.int32, order="C", copy=True)


def check_forward(x, kernel, recurrent_kernel, bias, h0, c0, lengths) -> ForwardInputs:
    x = as_float_array("x", x, None, 3)
    dt = x.dtype
    B, T, E = (int(d) for d in x.shape)
    recurrent_kernel = as_float_array("recurrent_kernel", recurrent_kernel, dt, 2)
    H = int(recurrent_kernel.shape[0])
    expect_shape("recurrent_kernel", recurrent_kernel, (H, 4 * H), "[H, 4H]")
    kernel = as_float_array("kernel", kernel, dt, 2)
    expect_shape("kernel", kernel, (E, 4 * H), f"[E, 4H] with E={E} from x {_shape(x)} and H={H} from recurrent_kernel")
    if bias is not None:
        bias = as_float_array("bias", bias, dt, 1)
        expect_shape("bias", bias, (4 * H,), f"[4H] with H={H}")
    if h0 is not None:
        h0 = as_float_array("h0", h0, dt, 2)
        expect_shape("h0", h0, (B, H), f"[B, H] with B={B}, H={H}")
    if c0 is not None:
        c0 = as_float_array("c0", c0, dt, 2)
        expect_shape("c0", c0, (B, H), f"[B, H] with B={B}, H={H}")
    return ForwardInputs(x, kernel, recurrent_kernel, bias, h0, c0, as_lengths(lengths, B, T), B, T, E, H)


# The activations the kernel computes (codes of lstm.h's Activation); Keras's names.
ACTIVATIONS = {"tanh": 0, "relu": 1, "linear": 2, "sigmoid": 3, "hard_sigmoid": 4}


def activation_code(name: str, value) -> int:
    """The kernel's code of an activation given by Keras's name (None is Keras's linear)."""
    if value is None:
        value = "linear"
    if not isinstance(value, str) or value not in ACTIVATIONS:
        raise ValueError(f"{name}: {value!r} is not supported; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[value]


PRECISIONS = {"float32": 0, "bfloat16": 1}


def precision_code(value) -> int:
    """The kernel's code of a compute precision ("float32" or "bfloat16")."""
    if not isinstance(value, str) or value not in PRECISIONS:
        raise ValueError(f"precision: {value!r} is not supported; choose 'float32' or 'bfloat16'")
    return PRECISIONS[value]


def check_step_mask(mask, lengths, B: int, T: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(lengths, mask) for the kernel from a [B, T] step mask (Keras's: True where a step is
    valid). A mask whose valid steps are each row's first ones becomes lengths (the kernel's
    fast path); any other comes back as C-contiguous uint8. None: (lengths, None) unchanged."""
    if mask is None:
        return lengths, None
    if lengths is not None:
        raise ValueError("mask: give lengths or a mask, not both")
    m = np.asarray(mask)
    if m.dtype != np.bool_ and m.dtype.kind not in "iuf":
        raise TypeError(f"mask: expected booleans (or 0/1 numbers), got dtype {m.dtype}")
    if m.shape != (B, T):
        raise ValueError(f"mask: expected shape {(B, T)} ([B, T] like x's first two axes), got {tuple(m.shape)}")
    m = m != 0
    counts = m.sum(axis=1).astype(np.int32)
    if np.array_equal(m, np.arange(T)[None, :] < counts[:, None]):
        return counts, None  # right padding
    return None, np.ascontiguousarray(m, dtype=np.uint8)


def check_flag(name: str, value) -> bool:
    """A bool argument (NumPy's bool too); anything else is a TypeError naming it."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {type(value).__name__}")
    return bool(value)


def check_upstream(name: str, value, dtype: np.dtype, shape: tuple, what: str):
    if value is None:
        return None
    arr = as_float_array(name, value, dtype, len(shape))
    expect_shape(name, arr, shape, what)
    return arr

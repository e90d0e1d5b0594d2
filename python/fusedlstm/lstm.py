"""The compiled fused LSTM as two NumPy functions: ``lstm_forward`` runs a whole batch of
sequences in one C++ call and returns an opaque cache; ``lstm_backward`` consumes that cache and
returns every gradient (BPTT) in one more call. This module checks and converts arguments,
allocates nothing the kernel could overrun, and knows nothing about text or models."""

from __future__ import annotations

import threading
from typing import NamedTuple

import numpy as np

from . import _core
from ._checks import (
    LstmGrads,
    activation_code,
    as_float_array,
    check_flag,
    check_forward,
    check_step_mask,
    check_upstream,
    precision_code,
)

__all__ = [
    "LstmCache",
    "LstmGrads",
    "BidirectionalCache",
    "BidirectionalGrads",
    "lstm_forward",
    "lstm_backward",
    "lstm_bidirectional_forward",
    "empty_cache",
    "cuda_available",
]

# Up to two spare scratch buffers per dtype, the largest kept: caches a backward consumed, or
# inference workspaces. The next forward that needs at most that many elements uses a prefix of
# one instead of mapping (and zeroing) fresh pages: a steady training loop then allocates its big
# buffers once, whatever length each batch pads to (two: a bidirectional layer's directions).
# list.pop is atomic under the GIL, so two threads never get the same buffer.
_spare: dict = {}


def _take(dtype) -> np.ndarray | None:
    """A spare buffer of `dtype` (the largest), or None."""
    try:
        return _spare.get(np.dtype(dtype), []).pop(0)
    except IndexError:
        return None


def _recycle(buf: np.ndarray) -> None:
    if buf is None or not isinstance(buf, np.ndarray):
        return
    base = buf.base
    if type(base) is np.ndarray and base.ndim == 1 and base.dtype == buf.dtype:
        buf = base  # a prefix of an earlier spare: keep the whole of it
    if buf.nbytes >= (1 << 20):  # only big ones are worth keeping
        kept = _spare.setdefault(buf.dtype, [])
        kept.append(buf)
        kept.sort(key=lambda a: a.size, reverse=True)
        del kept[2:]


def empty_cache() -> None:
    """Free the scratch buffers kept for reuse between calls (like torch's empty_cache)."""
    _spare.clear()
    _core.release_workspaces()


_CUDA_BUILT = bool(_core.build_info()["cuda"])


def cuda_available() -> bool:
    """True when this build has the CUDA kernels (FUSEDLSTM_CUDA=ON) and a CUDA GPU is visible."""
    return _CUDA_BUILT and _core.cuda_device_count() > 0


def _check_device(device: str) -> str:
    if device == "cpu":
        return device
    if device != "cuda":
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    if not _CUDA_BUILT:
        raise RuntimeError(
            "device='cuda': this fusedlstm was built without CUDA; reinstall with "
            "pip install . -Ccmake.define.FUSEDLSTM_CUDA=ON (needs nvcc and cuBLAS)"
        )
    if _core.cuda_device_count() == 0:
        raise RuntimeError("device='cuda': no CUDA GPU is visible (no driver, or CUDA_VISIBLE_DEVICES hides them)")
    return device


class LstmCache:
    """What ``lstm_backward`` needs from a training forward: opaque, and good for one backward.

    It owns copies of x, the weights and the lengths, so the caller may change those arrays after
    the forward, and it records the shape and dtype it was written for, so a backward always reads
    it as exactly that. Backward overwrites it in place (to save memory) and then releases it.
    With ``device="cuda"`` it lives in GPU memory.
    """

    __slots__ = ("_core", "_lock", "device")

    def __init__(self, core_cache, device: str = "cpu"):
        self._core = core_cache  # _core.Cache or _core.CudaCache
        self._lock = threading.Lock()
        self.device = device

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, T, E, H) of the forward that wrote it."""
        return tuple(int(d) for d in self._core.shape)

    @property
    def dtype(self) -> np.dtype:
        return self._core.dtype

    @property
    def lengths(self) -> np.ndarray | None:
        """A copy of the lengths the forward ran with, or None (all T)."""
        return self._core.lengths

    @property
    def precision(self) -> str:
        """The products' precision the forward ran with ("float32" or "bfloat16")."""
        return str(getattr(self._core, "precision", "float32"))

    @property
    def reverse(self) -> bool:
        """Whether the forward ran each row's steps last to first."""
        return bool(getattr(self._core, "reverse", False))

    @property
    def _buf(self):
        """The memory a CPU backward will overwrite (recycled once it is consumed), or None once
        used; on the GPU the device cache itself."""
        if self._core.used:
            return None
        return self._core.buffer if self.device == "cpu" else self._core

    @property
    def used(self) -> bool:
        return bool(self._core.used)

    @property
    def nbytes(self) -> int:
        return int(self._core.nbytes)

    def __repr__(self) -> str:
        B, T, E, H = self.shape
        state = "used" if self.used else f"{self.nbytes} bytes"
        return f"LstmCache(B={B}, T={T}, E={E}, H={H}, dtype={self.dtype}, device={self.device}, {state})"


_DEFAULT_OPTS = (0, 3, None, None, 0)  # tanh, sigmoid, no recurrent masks, no step mask, float32


def _cpu_forward(
    x, kernel, recurrent_kernel, bias, h0, c0, lengths, training, return_sequences=True, reverse=False, opts=None
):
    """One compiled CPU forward, reusing the spare scratch buffer; the module checks every
    array itself before it runs (TypeError/ValueError, the spare put back). opts: the
    activation codes and the recurrent masks."""
    spare = _take(x.dtype)
    try:
        outputs, h_n, c_n, buf = _core.forward(
            x,
            kernel,
            recurrent_kernel,
            bias,
            h0,
            c0,
            lengths,
            bool(training),
            spare,
            bool(return_sequences),
            reverse,
            *(opts or _DEFAULT_OPTS),
        )
    except (TypeError, ValueError):
        _recycle(spare)
        raise
    if not training:
        _recycle(buf)  # the workspace
        return outputs, h_n, c_n, None
    return outputs, h_n, c_n, LstmCache(buf)  # a _core.Cache: the buffer with its shape


def _forward_fast(x, kernel, recurrent_kernel, bias, h0, c0, lengths, training, return_sequences, reverse, opts):
    """The call straight into the compiled module when every argument already is what it takes
    (NumPy arrays of one float dtype, C-contiguous, int32 lengths). None when it refuses: the
    caller then goes through check_forward, which converts what can be converted and words the
    errors for users."""
    if type(x) is not np.ndarray:
        return None
    if lengths is not None and (type(lengths) is not np.ndarray or lengths.dtype != np.int32):
        return None  # (the compiled cache keeps its own copy of the lengths)
    try:
        return _cpu_forward(
            x, kernel, recurrent_kernel, bias, h0, c0, lengths, training, return_sequences, reverse, opts
        )
    except (TypeError, ValueError):
        return None


def lstm_forward(
    x,
    kernel,
    recurrent_kernel,
    bias=None,
    h0=None,
    c0=None,
    lengths=None,
    training: bool = True,
    device: str = "cpu",
    return_sequences: bool = True,
    reverse: bool = False,
    activation: str = "tanh",
    recurrent_activation: str = "sigmoid",
    recurrent_masks=None,
    mask=None,
    precision: str = "float32",
):
    """Run a single-layer LSTM over whole sequences in one compiled call.

    Parameters
    ----------
    x : array [B, T, E], float32 or float64 (every float argument must share its dtype)
    kernel : array [E, 4H]; recurrent_kernel : array [H, 4H]; bias : array [4H] or None
        Keras layout, gate order i, f, c, o.
    h0, c0 : arrays [B, H] or None (zeros)
    lengths : integer array [B] with values in 0..T, or None (all T). Right padding: at steps
        ``t >= lengths[b]`` row b's state is carried and its output is zero.
    training : bool
        True stores what ``lstm_backward`` needs; False (inference) stores nothing.
    device : "cpu" (default) or "cuda"
        "cuda" runs the CUDA kernels (a FUSEDLSTM_CUDA=ON build and a GPU; see
        ``cuda_available()``): the arrays are copied to the GPU and the results back, and the
        training cache stays in GPU memory until ``lstm_backward``.
    return_sequences : bool
        False returns None for ``outputs``, which the CPU kernel then never writes (a
        many-to-one model needs only the final state: B·T·H fewer stores and no [B, T, H]
        allocation). The backward is the same either way, ``d_outputs`` included.
    reverse : bool
        True runs each row from its last valid step back to its first (row b reads steps
        ``lengths[b]-1, ..., 0``), the backward half of a bidirectional layer, and writes each
        output at the position of the input it read (zero past the length); h_n, c_n are the
        state after step 0. ``lstm_backward`` of its cache gives gradients in x's layout. No
        copies of x are flipped in Python.
    activation, recurrent_activation : str
        Keras's names: ``activation`` (candidate and cell output; default "tanh") and
        ``recurrent_activation`` (gates i, f, o; default "sigmoid"), each one of "tanh",
        "relu", "linear", "sigmoid", "hard_sigmoid" (Keras 3's relu6(x + 3) / 6).
    recurrent_masks : array [4, B, H] or None
        Training only: Keras's recurrent dropout. Gate g (i, f, c, o) multiplies h_{t-1} by
        ``recurrent_masks[g]`` (the caller draws them, scaled: 0 or 1/(1-p)) in its recurrent
        product, the same masks at every step; states and outputs stay unmasked. The backward
        uses the same masks (the cache keeps a copy).
    mask : array [B, T] of booleans, or None
        Instead of lengths: the valid steps of each row, anywhere (Keras's masks with holes,
        e.g. [1, 1, 0, 1, 0]). An invalid step is as a padded one: the state is carried through
        it, its output is zero, its x is never read. A reverse pass reads the positions T-1 ... 0.
        A mask that only pads on the right runs as lengths.
    precision : "float32" (default) or "bfloat16"
        The products' precision. "bfloat16" (float32 arrays only, CPU only) rounds x, h and the
        weights to bfloat16 as the kernel packs them for its GEMMs and sums the products in
        float32; gates, cell state, outputs and (in the backward, whose products are bfloat16
        too) every gradient stay float32. It needs AVX512_BF16 (AMX tiles are used where
        present; ``bf16_engine()`` says which) and raises RuntimeError on a CPU without it.

    Returns
    -------
    outputs [B, T, H] (None without return_sequences), h_n [B, H], c_n [B, H],
    cache (``LstmCache``, or None when not training)
    """
    device = _check_device(device)
    reverse = check_flag("reverse", reverse)
    opts = (
        activation_code("activation", activation),
        activation_code("recurrent_activation", recurrent_activation),
        recurrent_masks,
        None,
        precision_code(precision),
    )
    if mask is not None:
        B, T = np.shape(x)[:2] if np.ndim(x) == 3 else (-1, -1)
        lengths, step_mask = check_step_mask(mask, lengths, B, T)
        opts = opts[:3] + (step_mask, opts[4])
    if device == "cpu":
        fast = _forward_fast(
            x, kernel, recurrent_kernel, bias, h0, c0, lengths, training, return_sequences, reverse, opts
        )
        if fast is not None:
            return fast
    a = check_forward(x, kernel, recurrent_kernel, bias, h0, c0, lengths)
    if recurrent_masks is not None:
        if not training:
            raise ValueError("recurrent_masks: recurrent dropout applies in training only (training=False given)")
        masks = as_float_array("recurrent_masks", recurrent_masks, a.x.dtype, 3)
        if masks.shape != (4, a.B, a.H):
            raise ValueError(
                f"recurrent_masks: expected shape {(4, a.B, a.H)} ([4 gates, B, H]), got {tuple(masks.shape)}"
            )
        opts = opts[:2] + (masks,) + opts[3:]
    if device == "cuda":
        if opts[4]:
            raise ValueError("precision='bfloat16' runs on the CPU kernels only; use device='cpu' or float32")
        outputs, h_n, c_n, dbuf = _core.forward_cuda(
            a.x, a.kernel, a.recurrent_kernel, a.bias, a.h0, a.c0, a.lengths, bool(training), reverse, *opts[:4]
        )
        cache = LstmCache(dbuf, "cuda") if training else None
        return (outputs if return_sequences else None), h_n, c_n, cache
    return _cpu_forward(
        a.x, a.kernel, a.recurrent_kernel, a.bias, a.h0, a.c0, a.lengths, training, return_sequences, reverse, opts
    )


class BidirectionalCache:
    """What ``lstm_backward`` needs from a training ``lstm_bidirectional_forward``: the two
    directions' caches (``forward``, ``reverse``), good for one backward together."""

    __slots__ = ("forward", "reverse", "_lock")

    def __init__(self, forward: LstmCache, reverse: LstmCache):
        self.forward = forward
        self.reverse = reverse
        self._lock = threading.Lock()

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, T, E, H) of the forward that wrote it (H per direction)."""
        return self.forward.shape

    @property
    def dtype(self) -> np.dtype:
        return self.forward.dtype

    @property
    def used(self) -> bool:
        return self.forward.used

    def __repr__(self) -> str:
        B, T, E, H = self.shape
        return f"BidirectionalCache(B={B}, T={T}, E={E}, H={H}, dtype={self.dtype}, used={self.used})"


class BidirectionalGrads(NamedTuple):
    """Gradients of a bidirectional call: ``x`` [B, T, E] (both directions summed, or None) and
    each direction's ``LstmGrads`` (whose own ``x`` is None; ``h0``, ``c0`` [B, H])."""

    x: np.ndarray | None
    forward: LstmGrads
    reverse: LstmGrads


def _pair(name: str, value, dt, shape) -> np.ndarray | None:
    if value is None:
        return None
    a = as_float_array(name, value, dt, 3)
    if a.shape != shape:
        raise ValueError(f"{name}: expected shape {shape} ([2, B, H]: one state per direction), got {a.shape}")
    return a


def lstm_bidirectional_forward(
    x,
    forward_weights,
    reverse_weights,
    h0=None,
    c0=None,
    lengths=None,
    training: bool = True,
    return_sequences: bool = True,
    activation: str = "tanh",
    recurrent_activation: str = "sigmoid",
    precision: str = "float32",
):
    """Both directions of a bidirectional LSTM layer over x in one compiled call.

    The forward direction is ``lstm_forward(x, *forward_weights, ...)``, the other
    ``lstm_forward(x, *reverse_weights, ..., reverse=True)``; they run as one parallel region
    when one direction alone would leave threads idle (small batches), each direction's tasks
    unchanged, so the results equal the two separate calls bit for bit.

    Parameters
    ----------
    x : array [B, T, E], float32 or float64
    forward_weights, reverse_weights : (kernel [E, 4H], recurrent_kernel [H, 4H], bias [4H] or None)
    h0, c0 : arrays [2, B, H] (forward direction first) or None (zeros)
    lengths, training, return_sequences, activation, recurrent_activation, precision : as
        ``lstm_forward``

    Returns
    -------
    outputs [B, T, 2H] (the forward direction's H columns, then the reverse's, as Keras's
    ``Bidirectional(merge_mode="concat")`` and torch; None without return_sequences), h_n and
    c_n [2, B, H], cache (``BidirectionalCache``, or None when not training)
    """
    ws = []
    for name, w in (("forward_weights", forward_weights), ("reverse_weights", reverse_weights)):
        if not isinstance(w, (tuple, list)) or len(w) not in (2, 3):
            raise TypeError(f"{name}: expected (kernel, recurrent_kernel, bias), got {type(w).__name__}")
        ws.append(tuple(w) + (None,) * (3 - len(w)))
    training = check_flag("training", training)
    a = check_forward(x, *ws[0], None, None, lengths)
    b = check_forward(a.x, *ws[1], None, None, lengths)
    if b.H != a.H:
        raise ValueError(
            f"reverse_weights: {b.H} units, forward_weights {a.H}: the two directions must have the same units"
        )
    shape = (2, a.B, a.H)
    h0 = _pair("h0", h0, a.x.dtype, shape)
    c0 = _pair("c0", c0, a.x.dtype, shape)
    weights = (a.kernel, a.recurrent_kernel, a.bias, b.kernel, b.recurrent_kernel, b.bias)
    outputs, h_n, c_n, cf, cr = _core.forward_bidirectional(
        a.x,
        weights,
        h0,
        c0,
        a.lengths,
        training,
        bool(return_sequences),
        activation_code("activation", activation),
        activation_code("recurrent_activation", recurrent_activation),
        precision_code(precision),
        tuple(b for b in (_take(a.x.dtype), _take(a.x.dtype)) if b is not None),
    )
    if not training:  # the workspaces, for the next call
        _recycle(cf)
        _recycle(cr)
    cache = BidirectionalCache(LstmCache(cf), LstmCache(cr)) if training else None
    return outputs, h_n, c_n, cache


def lstm_backward(
    cache: LstmCache | BidirectionalCache, d_outputs=None, d_h_n=None, d_c_n=None, need_dx: bool = True
) -> LstmGrads | BidirectionalGrads:
    """Gradients of a training ``lstm_forward`` (BPTT over all steps in one compiled call).

    Given the ``BidirectionalCache`` of ``lstm_bidirectional_forward``, the upstream gradients
    are shaped like its results (d_outputs [B, T, 2H], d_h_n and d_c_n [2, B, H]) and it returns
    ``BidirectionalGrads``.

    Parameters
    ----------
    cache : the ``LstmCache`` a ``training=True`` forward returned; usable once.
    d_outputs : array [B, T, H] or None; d_h_n, d_c_n : arrays [B, H] or None.
        Upstream gradients in the cache's dtype; None means zero. Entries of d_outputs at padded
        steps are ignored (those outputs are constant zero).
    need_dx : bool
        False skips the input gradient (grads.x is None): about a ninth of the work at typical
        sizes, for an input nothing learns from (frozen embeddings).

    Returns
    -------
    LstmGrads(x [B,T,E], kernel [E,4H], recurrent_kernel [H,4H], bias [4H], h0 [B,H], c0 [B,H])
    """
    if cache is None:
        raise ValueError(
            "cache is None: the forward ran with training=False, which stores "
            "nothing; run lstm_forward(..., training=True) to get gradients"
        )
    if isinstance(cache, BidirectionalCache):
        return _bidirectional_backward(cache, d_outputs, d_h_n, d_c_n, need_dx)
    if not isinstance(cache, LstmCache):
        raise TypeError(f"cache: expected the LstmCache returned by lstm_forward, got {type(cache).__name__}")
    B, T, E, H = cache.shape
    dt = cache.dtype
    if cache.device == "cpu" and all(v is None or type(v) is np.ndarray for v in (d_outputs, d_h_n, d_c_n)):
        # Straight into the compiled module, which checks every array before it runs; if it
        # refuses, the checks below convert what they can and word the error.
        try:
            return _consume(cache, d_outputs, d_h_n, d_c_n, need_dx)
        except (TypeError, ValueError):
            pass
    d_outputs = check_upstream("d_outputs", d_outputs, dt, (B, T, H), "[B, T, H] like outputs")
    d_h_n = check_upstream("d_h_n", d_h_n, dt, (B, H), "[B, H] like h_n")
    d_c_n = check_upstream("d_c_n", d_c_n, dt, (B, H), "[B, H] like c_n")
    return _consume(cache, d_outputs, d_h_n, d_c_n, need_dx)


def _consume(cache: LstmCache, d_outputs, d_h_n, d_c_n, need_dx) -> LstmGrads:
    """The compiled backward on the cache's device; the cache is used up (one backward each,
    even from several threads) and a CPU buffer is recycled for the next forward. The compiled
    cache carries its own shape, dtype and lengths: nothing here can pair it with others."""
    with cache._lock:
        buf = cache._buf
        if buf is None:
            raise ValueError(
                "cache was already used by lstm_backward (a cache is good for one backward: run the forward again)"
            )
        run = _core.backward_cuda if cache.device == "cuda" else _core.backward
        grads = run(cache._core, d_outputs, d_h_n, d_c_n, bool(need_dx))
    if cache.device == "cpu":
        _recycle(buf)
    return LstmGrads(*grads)


def _bidirectional_backward(cache: BidirectionalCache, d_outputs, d_h_n, d_c_n, need_dx) -> BidirectionalGrads:
    B, T, E, H = cache.shape
    dt = cache.dtype
    d_outputs = check_upstream("d_outputs", d_outputs, dt, (B, T, 2 * H), "[B, T, 2H] like outputs")
    d_h_n = check_upstream("d_h_n", d_h_n, dt, (2, B, H), "[2, B, H] like h_n")
    d_c_n = check_upstream("d_c_n", d_c_n, dt, (2, B, H), "[2, B, H] like c_n")
    with cache._lock:
        bufs = (cache.forward._buf, cache.reverse._buf)
        if bufs[0] is None or bufs[1] is None:
            raise ValueError(
                "cache was already used by lstm_backward (a cache is good for one backward: run the forward again)"
            )
        dx, dk0, dr0, db0, dk1, dr1, db1, dh0, dc0 = _core.backward_bidirectional(
            cache.forward._core, cache.reverse._core, d_outputs, d_h_n, d_c_n, bool(need_dx)
        )
    for buf in bufs:
        _recycle(buf)
    return BidirectionalGrads(
        dx, LstmGrads(None, dk0, dr0, db0, dh0[0], dc0[0]), LstmGrads(None, dk1, dr1, db1, dh0[1], dc0[1])
    )

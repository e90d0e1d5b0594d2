"""Helpers the tests share (imported as `from helpers import ...`): random LSTM problems,
tolerance per dtype, optional-dependency markers, the Keras comparison helpers, and the location
of the real data sets."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

requires_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                    reason="torch is not installed (CI installs torch==2.13.0)")

TOL = {np.float64: dict(rtol=1e-10, atol=1e-12), np.float32: dict(rtol=1e-5, atol=0.0)}


def make_problem(rng, B, T, E, H, dtype=np.float64, lengths="none", state=True, bias=True,
                 scale=0.5):
    """Random inputs for lstm_forward plus upstream gradients."""
    def r(*shape, s=1.0):
        return (rng.standard_normal(shape) * s).astype(dtype)

    p = dict(x=r(B, T, E), kernel=r(E, 4 * H, s=scale), recurrent_kernel=r(H, 4 * H, s=scale),
             bias=r(4 * H, s=0.2) if bias else None,
             h0=r(B, H) if state else None, c0=r(B, H) if state else None)
    if lengths == "none":
        p["lengths"] = None
    elif lengths == "random":
        p["lengths"] = rng.integers(0, T + 1, size=B)
        if B >= 2:  # always include the extremes
            p["lengths"][0], p["lengths"][-1] = 0, T
    else:
        p["lengths"] = np.asarray(lengths)
    up = dict(d_outputs=r(B, T, H), d_h_n=r(B, H), d_c_n=r(B, H))
    return p, up


def assert_close(actual, expected, dtype, what=""):
    """Elementwise rtol plus an absolute floor relative to the array's largest magnitude: sums of
    K rounded terms have errors proportional to the magnitudes involved, not to the result."""
    tol = TOL[dtype]
    expected = np.asarray(expected)
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, err_msg=what, rtol=tol["rtol"],
                               atol=max(tol["atol"], tol["rtol"] * scale))


def as64(d):
    """The same problem in float64, for a float64 oracle of a float32 run."""
    return {k: (v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v)
            for k, v in d.items()}


# The Keras layer against keras.layers.LSTM (tests/test_keras.py on TensorFlow,
# tests/keras_torch_cases.py on the torch backend): small shapes, masks, a layer pair.
KERAS_SHAPE = (4, 6, 5, 7)  # B, T, E, H


def keras_masks():
    right = np.array([[1] * 6, [1] * 4 + [0] * 2, [1] + [0] * 5, [0] * 6], bool)
    return {"none": None, "right": right, "left": right[:, ::-1].copy()}


def keras_pair(rng, **kw):
    """keras.layers.LSTM and fusedlstm.keras.LSTM built alike (kw to both), with the same random,
    non-default weights (bias included) so every term is exercised."""
    import keras

    import fusedlstm.keras as fk

    _, T, E, H = KERAS_SHAPE
    ref, ours = keras.layers.LSTM(H, **kw), fk.LSTM(H, **kw)
    ref.build((None, T, E))
    ours.build((None, T, E))
    ref.set_weights([w + 0.3 * rng.standard_normal(w.shape).astype(w.dtype) for w in ref.get_weights()])
    ours.set_weights(ref.get_weights())
    return ref, ours


def assert_keras_results_match(want, got, tol=2e-5, grad_tol=1e-4):
    """(outputs, gradients) of keras.layers.LSTM (want) and of ours (got), as NumPy arrays."""
    (ya, ga), (yb, gb) = want, got
    assert len(ya) == len(yb) and len(ga) == len(gb)
    for a, b in zip(ya, yb):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(b, a, rtol=tol, atol=tol)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(b, a, rtol=grad_tol, atol=grad_tol)

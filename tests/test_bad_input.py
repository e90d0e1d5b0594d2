"""Bad input gives a ValueError/TypeError naming the argument and the shapes, never a crash; the
raw _core entry points check for themselves too."""

import numpy as np
import pytest

import fusedlstm
from fusedlstm import _core, reference
from helpers import make_problem


@pytest.fixture
def p(rng):
    return make_problem(rng, 3, 4, 5, 6)[0]


BAD = [
    (dict(x=np.zeros((3, 4))), ValueError, r"x: expected a 3-d array, got shape \(3, 4\)"),
    (dict(kernel=np.zeros((4, 24))), ValueError, r"kernel: expected shape \(5, 24\)"),
    (dict(kernel=np.zeros(24)), ValueError, r"kernel: expected a 2-d array"),
    (dict(recurrent_kernel=np.zeros((6, 20))), ValueError, r"recurrent_kernel: expected shape \(6, 24\)"),
    (dict(bias=np.zeros(23)), ValueError, r"bias: expected shape \(24,\)"),
    (dict(h0=np.zeros((2, 6))), ValueError, r"h0: expected shape \(3, 6\)"),
    (dict(c0=np.zeros((3, 6, 1))), ValueError, r"c0: expected a 2-d array"),
    (dict(lengths=[1, 2]), ValueError, r"lengths: expected shape \(3,\)"),
    (dict(lengths=[[1, 2, 3]]), ValueError, r"lengths: expected a 1-d array"),
    (dict(lengths=[1, 5, 2]), ValueError, r"lengths\[1\] = 5 is outside \[0, T=4\]"),
    (dict(lengths=[1, -1, 2]), ValueError, r"lengths\[1\] = -1 is outside"),
    (dict(lengths=[1.0, 2.0, 3.0]), TypeError, r"lengths: expected an integer array"),
    (dict(lengths=np.array([True, False, True])), TypeError, r"lengths: expected an integer"),
    (dict(x=np.zeros((3, 4, 5), np.int64)), TypeError, r"x: dtype int64 is not supported"),
    (dict(x=np.zeros((3, 4, 5), np.float16)), TypeError, r"x: dtype float16 is not supported"),
    (dict(kernel=np.zeros((5, 24), np.float32)), TypeError, r"kernel: dtype float32 does not match x's dtype float64"),
    (dict(x=np.zeros((3, 4, 5), np.complex128)), TypeError, r"x: dtype complex128"),
    (dict(x="hello"), TypeError, r"x: dtype <U5 is not supported"),
]


@pytest.mark.parametrize("mod", [fusedlstm, reference], ids=["kernel", "reference"])
@pytest.mark.parametrize("change,exc,msg", BAD, ids=[str(i) for i in range(len(BAD))])
def test_forward_rejects(p, mod, change, exc, msg):
    with pytest.raises(exc, match=msg):
        mod.lstm_forward(**dict(p, **change))


def test_backward_rejects(rng):
    p, up = make_problem(rng, 3, 4, 5, 6)
    _, _, _, cache = fusedlstm.lstm_forward(**p, training=False)
    with pytest.raises(ValueError, match="training=False"):
        fusedlstm.lstm_backward(cache, **up)
    with pytest.raises(TypeError, match="expected the LstmCache"):
        fusedlstm.lstm_backward({"not": "a cache"}, **up)
    _, _, _, cache = fusedlstm.lstm_forward(**p)
    with pytest.raises(ValueError, match=r"d_outputs: expected shape \(3, 4, 6\)"):
        fusedlstm.lstm_backward(cache, d_outputs=np.zeros((3, 4, 5)))
    with pytest.raises(ValueError, match=r"d_h_n: expected shape \(3, 6\)"):
        fusedlstm.lstm_backward(cache, d_h_n=np.zeros((6, 3)))
    with pytest.raises(TypeError, match=r"d_c_n: dtype float32 does not match"):
        fusedlstm.lstm_backward(cache, d_c_n=np.zeros((3, 6), np.float32))
    # Failed calls did not consume the cache; a good one does, once.
    assert not cache.used
    g = fusedlstm.lstm_backward(cache, **up)
    assert cache.used and g.x.shape == (3, 4, 5)
    with pytest.raises(ValueError, match="already used"):
        fusedlstm.lstm_backward(cache, **up)


def test_raw_core_checks_for_itself(p):
    x, k, r = p["x"], p["kernel"], p["recurrent_kernel"]
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.forward(np.asfortranarray(x), k, r, None, None, None, None, True)
    with pytest.raises(TypeError, match="expected dtype"):
        _core.forward(x, k.astype(np.float32), r, None, None, None, None, True)
    with pytest.raises(ValueError, match=r"kernel: expected shape \(5, 24\)"):
        _core.forward(x, k[:4].copy(), r, None, None, None, None, True)
    with pytest.raises(ValueError, match="outside"):
        _core.forward(x, k, r, None, None, None, np.array([9, 0, 0], np.int32), True)
    with pytest.raises(ValueError, match=r"recurrent_kernel: expected rank 2 \[H, 4H\], got shape \(3,\)"):
        _core.forward(x, k, np.zeros(3), None, None, None, None, True)
    _, _, _, cache = _core.forward(x, k, r, None, None, None, None, True)
    with pytest.raises(TypeError):  # a bare buffer is not a cache
        _core.backward(cache.buffer, None, None, None)
    with pytest.raises(ValueError, match=r"d_outputs: expected shape \(3, 4, 6\) \[N, T, H\], got \(4, 3, 6\)"):
        _core.backward(cache, np.zeros((4, 3, 6)), None, None)
    with pytest.raises(TypeError, match="d_h_n: expected dtype float64"):
        _core.backward(cache, None, np.zeros((3, 6), np.float32), None)
    assert not cache.used  # refused calls consume nothing
    _core.backward(cache, None, None, None)
    assert cache.used and cache.buffer is None and cache.nbytes == 0
    with pytest.raises(ValueError, match="already used"):
        _core.backward(cache, None, None, None)


@pytest.mark.parametrize(
    "change,msg",
    [
        (
            dict(kernel=np.zeros((4, 24))),
            r"kernel: expected shape \(5, 24\) \[C, 4H\], got \(4, 24\): dimension 0 \(C\) is 4, expected 5 = x's C",
        ),
        (
            dict(recurrent_kernel=np.zeros((6, 20))),
            r"recurrent_kernel: expected shape \(6, 24\) \[H, 4H\], got \(6, 20\): "
            r"dimension 1 \(4H\) is 20, expected 24",
        ),
        (
            dict(h0=np.zeros((2, 6))),
            r"h0: expected shape \(3, 6\) \[N, H\], got \(2, 6\): dimension 0 \(N\) is 2, expected 3",
        ),
        (
            dict(c0=np.zeros((3, 7))),
            r"c0: expected shape \(3, 6\) \[N, H\], got \(3, 7\): dimension 1 \(H\) is 7, expected 6",
        ),
        (dict(bias=np.zeros((24, 1))), r"bias: expected shape \(24,\) \[4H\], got \(24, 1\): rank 2, expected 1"),
        (
            dict(lengths=np.zeros(2, np.int32)),
            r"lengths: expected shape \(3,\) \[N\], got \(2,\): dimension 0 \(N\) is 2",
        ),
        (dict(lengths=np.array([1, 5, 2], np.int32)), r"lengths\[1\] = 5 is outside \[0, T=4\]"),
        (dict(x=np.zeros((3, 4))), r"x: expected rank 3 \[N, T, C\], got shape \(3, 4\)"),
    ],
)
def test_raw_core_messages_name_argument_dimension_and_both_values(p, change, msg):
    """The compiled module's own checks (fusedlstm/validate.h, shared with the TensorFlow op) say
    which argument, which dimension, what it is and what it should be."""
    a = {**p, "bias": None, "h0": None, "c0": None, "lengths": None, **change}
    with pytest.raises(ValueError, match=msg):
        _core.forward(a["x"], a["kernel"], a["recurrent_kernel"], a["bias"], a["h0"], a["c0"], a["lengths"], True)


def test_shapes_whose_buffers_overflow_are_rejected():
    """An empty x can have any dimensions; sizes computed from them must not wrap around."""
    x = np.zeros((1 << 29, 1 << 29, 0))
    k, r = np.zeros((0, 4)), np.zeros((1, 4))
    with pytest.raises(ValueError, match=r"shape: T=536870912, N=536870912, C=0, H=1 is too large"):
        _core.forward(x, k, r, None, None, None, None, True)
    with pytest.raises(ValueError, match="too large"):
        fusedlstm.lstm_forward(x, k, r, training=False)


def test_the_cache_carries_its_own_shape_and_a_forged_one_cannot_reach_the_kernel(rng):
    """N == T: a cache read with N and T swapped has the right size but gives wrong gradients.
    The compiled cache records the shape, dtype and lengths it was written with; backward takes
    only it, so there is no shape to hand in, and nothing of it can be changed from Python."""
    p, up = make_problem(rng, 4, 4, 3, 5, lengths=[4, 1, 0, 3])
    ref = reference.lstm_backward(reference.lstm_forward(**p)[3], **up)
    out = _core.forward(
        p["x"], p["kernel"], p["recurrent_kernel"], p["bias"], p["h0"], p["c0"], p["lengths"].astype(np.int32), True
    )
    cache = out[3]
    assert isinstance(cache, _core.Cache)
    assert cache.shape == (4, 4, 3, 5) and cache.dtype == np.float64
    np.testing.assert_array_equal(cache.lengths, [4, 1, 0, 3])
    # The old entry point's shape and lengths arguments are gone: nothing to forge.
    with pytest.raises(TypeError):
        _core.backward(cache, (4, 4, 3, 5), None, None, None, None, True)
    with pytest.raises(TypeError):  # not constructible from Python
        _core.Cache()
    for name, value in [("shape", (4, 4, 5, 3)), ("dtype", np.float32), ("lengths", None), ("buffer", None)]:
        with pytest.raises(AttributeError):
            setattr(cache, name, value)
    cache.lengths[:] = 0  # a copy: the backward still sees [4, 1, 0, 3]
    # The buffer is rechecked before the kernel writes to it.
    cache.buffer.flags.writeable = False
    with pytest.raises(ValueError, match="cache: array is read-only"):
        _core.backward(cache, up["d_outputs"], up["d_h_n"], up["d_c_n"])
    cache.buffer.flags.writeable = True
    got = _core.backward(cache, up["d_outputs"], up["d_h_n"], up["d_c_n"])
    for name, a, b in zip(ref._fields, got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9, err_msg=name)
    # Through the package: LstmCache's shape, dtype and lengths are the compiled cache's, read-only.
    lc = fusedlstm.lstm_forward(**p)[3]
    assert lc.shape == (4, 4, 3, 5)
    with pytest.raises(AttributeError):
        lc.shape = (4, 4, 5, 3)
    g = fusedlstm.lstm_backward(lc, **up)
    for name, a, b in zip(ref._fields, g, ref):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9, err_msg=name)


def test_weird_but_valid_inputs(rng):
    """Lists, scalars-as-bias shapes, read-only arrays all work."""
    p, _ = make_problem(rng, 2, 3, 2, 2)
    base = fusedlstm.lstm_forward(**p)[0]
    q = {k: (v.tolist() if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v) for k, v in p.items()}
    np.testing.assert_array_equal(fusedlstm.lstm_forward(**q)[0], base)
    ro = {k: v for k, v in p.items()}
    for v in ro.values():
        if isinstance(v, np.ndarray):
            v.flags.writeable = False
    np.testing.assert_array_equal(fusedlstm.lstm_forward(**ro)[0], base)

"""The reverse pass and the two-direction call: a bidirectional forward equals its two single
direction calls bit for bit (outputs concatenated, every gradient, dx summed), for any thread
count; the prepared path runs reverse too; bad arguments are named. The reverse pass itself is
held to the NumPy oracle in test_kernel_vs_reference.py and by central differences in
test_gradcheck.py."""

import numpy as np
import pytest

import fusedlstm
from fusedlstm import reference
from helpers import assert_close, make_problem

SHAPES = [(1, 6, 3, 5), (3, 7, 4, 16), (5, 5, 12, 70), (40, 9, 20, 33), (2, 4, 6, 200)]


def weights(rng, E, H, dtype, bias=True):
    def r(*shape):
        return (rng.standard_normal(shape) * 0.4).astype(dtype)

    return (r(E, 4 * H), r(H, 4 * H), r(4 * H) if bias else None)


def lengths_for(rng, B, T):
    lengths = rng.integers(0, T + 1, size=B).astype(np.int32)
    if B >= 2:
        lengths[0], lengths[-1] = 0, T
    return lengths


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%d_T%d_E%d_H%d" % s)
@pytest.mark.parametrize("state", [False, True])
def test_bidirectional_is_the_two_directions(rng, dtype, shape, state):
    B, T, E, H = shape
    x = rng.standard_normal((B, T, E)).astype(dtype)
    wf, wr = weights(rng, E, H, dtype), weights(rng, E, H, dtype, bias=False)
    lengths = lengths_for(rng, B, T)
    h0 = rng.standard_normal((2, B, H)).astype(dtype) if state else None
    c0 = rng.standard_normal((2, B, H)).astype(dtype) if state else None
    out, h_n, c_n, cache = fusedlstm.lstm_bidirectional_forward(x, wf, wr, h0, c0, lengths)
    assert out.shape == (B, T, 2 * H) and h_n.shape == c_n.shape == (2, B, H)
    f = fusedlstm.lstm_forward(x, *wf, h0[0] if state else None, c0[0] if state else None, lengths)
    r = fusedlstm.lstm_forward(x, *wr, h0[1] if state else None, c0[1] if state else None, lengths, reverse=True)
    np.testing.assert_array_equal(out, np.concatenate([f[0], r[0]], axis=2))
    np.testing.assert_array_equal(h_n, np.stack([f[1], r[1]]))
    np.testing.assert_array_equal(c_n, np.stack([f[2], r[2]]))
    # Inference gives the single-direction inference results too.
    oi, hi, ci, none = fusedlstm.lstm_bidirectional_forward(x, wf, wr, h0, c0, lengths, training=False)
    assert none is None
    fi = fusedlstm.lstm_forward(x, *wf, h0[0] if state else None, c0[0] if state else None, lengths, training=False)
    ri = fusedlstm.lstm_forward(
        x, *wr, h0[1] if state else None, c0[1] if state else None, lengths, training=False, reverse=True
    )
    np.testing.assert_array_equal(oi, np.concatenate([fi[0], ri[0]], axis=2))
    np.testing.assert_array_equal(hi, np.stack([fi[1], ri[1]]))

    d_out = rng.standard_normal(out.shape).astype(dtype)
    d_h = rng.standard_normal(h_n.shape).astype(dtype)
    d_c = rng.standard_normal(c_n.shape).astype(dtype)
    g = fusedlstm.lstm_backward(cache, d_out, d_h, d_c)
    gf = fusedlstm.lstm_backward(f[3], np.ascontiguousarray(d_out[..., :H]), d_h[0], d_c[0])
    gr = fusedlstm.lstm_backward(r[3], np.ascontiguousarray(d_out[..., H:]), d_h[1], d_c[1])
    np.testing.assert_array_equal(g.x, gf.x + gr.x)
    for name in ("kernel", "recurrent_kernel", "bias", "h0", "c0"):
        np.testing.assert_array_equal(getattr(g.forward, name), getattr(gf, name), err_msg=name)
        np.testing.assert_array_equal(getattr(g.reverse, name), getattr(gr, name), err_msg=name)
    assert g.forward.x is None and g.reverse.x is None
    assert cache.used


def test_bidirectional_against_the_reference(rng):
    B, T, E, H = 4, 6, 5, 7
    p, _ = make_problem(rng, B, T, E, H, lengths=[6, 3, 0, 1])
    wr = weights(rng, E, H, np.float64)
    out, h_n, _, cache = fusedlstm.lstm_bidirectional_forward(
        p["x"], (p["kernel"], p["recurrent_kernel"], p["bias"]), wr, lengths=p["lengths"]
    )
    f = reference.lstm_forward(p["x"], p["kernel"], p["recurrent_kernel"], p["bias"], lengths=p["lengths"])
    r = reference.lstm_forward(p["x"], *wr, lengths=p["lengths"], reverse=True)
    assert_close(out, np.concatenate([f[0], r[0]], axis=2), np.float64, "outputs")
    assert_close(h_n, np.stack([f[1], r[1]]), np.float64, "h_n")
    # The reverse direction's first output of each row is its state after every valid step.
    for b, n in enumerate(p["lengths"]):
        if n:
            np.testing.assert_array_equal(out[b, 0, H:], h_n[1, b])
        np.testing.assert_array_equal(out[b, n:], 0)
    d_out = rng.standard_normal(out.shape)
    g = fusedlstm.lstm_backward(cache, d_out)
    gf = reference.lstm_backward(f[3], d_out[..., :H])
    gr = reference.lstm_backward(r[3], d_out[..., H:])
    assert_close(g.x, gf.x + gr.x, np.float64, "dx")
    assert_close(g.reverse.recurrent_kernel, gr.recurrent_kernel, np.float64, "reverse d recurrent_kernel")


def test_bit_identical_across_threads(rng):
    before = fusedlstm.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            fusedlstm.set_num_threads(threads)
            local = np.random.default_rng(7)
            got = []
            for B in (1, 3, 40):
                x = local.standard_normal((B, 12, 10)).astype(np.float32)
                wf, wr = weights(local, 10, 48, np.float32), weights(local, 10, 48, np.float32)
                lengths = lengths_for(local, B, 12)
                out, h_n, c_n, cache = fusedlstm.lstm_bidirectional_forward(x, wf, wr, lengths=lengths)
                g = fusedlstm.lstm_backward(cache, np.ones_like(out))
                p = fusedlstm.prepare(*wr).infer(x, lengths=lengths, reverse=True)
                got += [out, h_n, c_n, g.x, g.forward.kernel, g.reverse.recurrent_kernel, p[0], p[1]]
            results.append(got)
    finally:
        fusedlstm.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_prepared_reverse_equals_forward_inference(rng, dtype):
    B, T, E, H = 5, 9, 7, 40
    p, _ = make_problem(rng, B, T, E, H, dtype=dtype, lengths="random")
    prepared = fusedlstm.prepare(p["kernel"], p["recurrent_kernel"], p["bias"])
    got = prepared.infer(p["x"], p["h0"], p["c0"], p["lengths"], reverse=True)
    want = fusedlstm.lstm_forward(**p, training=False, reverse=True)
    for a, b in zip(got, want[:3]):
        np.testing.assert_array_equal(a, b)


def test_bad_arguments_are_named(rng):
    x = rng.standard_normal((2, 3, 4))
    w4, w5 = weights(rng, 4, 5, np.float64), weights(rng, 4, 6, np.float64)
    with pytest.raises(ValueError, match="reverse_weights.*same units"):
        fusedlstm.lstm_bidirectional_forward(x, w4, w5)
    with pytest.raises(TypeError, match="forward_weights"):
        fusedlstm.lstm_bidirectional_forward(x, w4[0], w4)
    with pytest.raises(ValueError, match=r"h0: expected shape \(2, 2, 5\)"):
        fusedlstm.lstm_bidirectional_forward(x, w4, w4, h0=np.zeros((2, 5)).reshape(1, 2, 5))
    with pytest.raises(TypeError, match="reverse: expected True or False"):
        fusedlstm.lstm_forward(x, *w4, reverse="yes")
    with pytest.raises(TypeError, match="reverse: expected True or False"):
        fusedlstm.prepare(*w4).infer(x, reverse=1)
    out, _, _, cache = fusedlstm.lstm_bidirectional_forward(x, w4, w4)
    with pytest.raises(ValueError, match=r"d_outputs.*\[B, T, 2H\]"):
        fusedlstm.lstm_backward(cache, np.zeros((2, 3, 5)))
    fusedlstm.lstm_backward(cache, np.ones_like(out))
    with pytest.raises(ValueError, match="already used"):
        fusedlstm.lstm_backward(cache, np.ones_like(out))

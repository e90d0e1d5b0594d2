"""The compiled kernel against the NumPy oracle: forward values and all six gradients over a grid
of shapes (B = 1, T = 1, H not a multiple of the SIMD width, E != H, big enough to use several
tasks), with and without lengths (0 and T included), h0/c0 and bias, in float64 and float32,
forward and reverse."""

import numpy as np
import pytest

import fusedlstm
from fusedlstm import reference
from helpers import as64, assert_close, make_problem

SHAPES = [  # (B, T, E, H)
    (1, 1, 1, 1),
    (1, 7, 3, 5),
    (4, 1, 8, 16),
    (3, 6, 5, 17),
    (5, 4, 33, 9),
    (2, 9, 16, 64),
    (7, 5, 12, 70),
    (130, 3, 6, 8),
    (9, 4, 20, 129),
    # Too few rows for 4 row blocks and H > 181 (R over 512 KB): the kernel splits every step
    # by hidden units (one barrier per step) instead of giving row blocks whole sequences.
    (12, 3, 10, 190),
]


def run_both(p, up, reverse=False):
    """The kernel in the problem's dtype; the oracle always in float64 (the truth)."""
    out = fusedlstm.lstm_forward(**p, reverse=reverse)
    ref = reference.lstm_forward(**as64(p), reverse=reverse)
    g = fusedlstm.lstm_backward(out[3], **up)
    gr = reference.lstm_backward(ref[3], **as64(up))
    return out, ref, g, gr


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%d_T%d_E%d_H%d" % s)
@pytest.mark.parametrize("lengths", ["none", "random"])
@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_forward_backward_match_reference(rng, dtype, shape, lengths, state, reverse):
    p, up = make_problem(rng, *shape, dtype=dtype, lengths=lengths, state=state)
    out, ref, g, gr = run_both(p, up, reverse)
    assert out[3].reverse is reverse
    for name, a, b in zip(("outputs", "h_n", "c_n"), out[:3], ref[:3]):
        assert a.dtype == dtype and a.shape == b.shape
        assert_close(a, b, dtype, name)
    for name in g._fields:
        a, b = getattr(g, name), getattr(gr, name)
        assert a.dtype == dtype and a.shape == b.shape, name
        assert_close(a, b, dtype, "grad " + name)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_no_bias_and_partial_upstream(rng, dtype):
    p, up = make_problem(rng, 3, 5, 4, 6, dtype=dtype, lengths=[5, 2, 0], bias=False)
    for keep in (["d_outputs"], ["d_h_n"], ["d_c_n"], []):
        sub = {k: v for k, v in up.items() if k in keep}
        out, ref, g, gr = run_both(p, sub)
        for name in g._fields:
            assert_close(getattr(g, name), getattr(gr, name), dtype, f"{name} with {keep}")


def test_padding_semantics(rng):
    """Padded steps: zero output, state carried, h_n/c_n from the last valid step, and the input
    and d_outputs there have no effect."""
    p, up = make_problem(rng, 3, 6, 4, 5, lengths=[6, 3, 0])
    out, h_n, c_n, cache = fusedlstm.lstm_forward(**p)
    assert np.all(out[1, 3:] == 0) and np.all(out[2] == 0)
    np.testing.assert_array_equal(h_n[1], out[1, 2])
    np.testing.assert_array_equal(h_n[2], p["h0"][2])
    np.testing.assert_array_equal(c_n[2], p["c0"][2])
    # Changing x and d_outputs at padded steps changes nothing.
    p2 = dict(p, x=p["x"].copy())
    p2["x"][1, 3:] = 1e3
    up2 = dict(up, d_outputs=up["d_outputs"].copy())
    up2["d_outputs"][1, 3:] = 7.0
    g = fusedlstm.lstm_backward(cache, **up)
    out2, h2, c2, cache2 = fusedlstm.lstm_forward(**p2)
    g2 = fusedlstm.lstm_backward(cache2, **up2)
    np.testing.assert_array_equal(out, out2)
    np.testing.assert_array_equal(h_n, h2)
    for name in ("kernel", "recurrent_kernel", "bias", "h0", "c0"):
        np.testing.assert_allclose(getattr(g, name), getattr(g2, name), rtol=1e-12, atol=1e-12)
    assert np.all(g.x[1, 3:] == 0) and np.all(g.x[2] == 0)
    # Length 0 passes d_h_n / d_c_n straight through to h0 / c0.
    np.testing.assert_array_equal(g.h0[2], up["d_h_n"][2])
    np.testing.assert_array_equal(g.c0[2], up["d_c_n"][2])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B, H", [(67, 40), (15, 190)])  # whole-sequence row tasks; unit tasks
def test_padding_is_never_read_even_when_not_finite(rng, dtype, B, H):
    """NaN/Inf at padded steps (x, d_outputs) change no result; with a NaN or ±Inf in the
    recurrent kernel, length-0 rows still pass d_h_n/d_c_n through exactly (no 0 * NaN). Big enough for
    several row blocks, so the per-task row runs are exercised."""
    T, E = 7, 9
    lengths = rng.integers(0, T + 1, size=B)
    lengths[::5] = 0
    p, up = make_problem(rng, B, T, E, H, dtype=dtype, lengths=lengths.tolist())
    out, _, _, cache = fusedlstm.lstm_forward(**p)
    g = fusedlstm.lstm_backward(cache, **up)
    pad = np.arange(T)[None, :] >= lengths[:, None]
    p2 = dict(p, x=p["x"].copy())
    p2["x"][pad] = np.where(rng.random((pad.sum(), E)) < 0.5, np.nan, np.inf)
    up2 = dict(up, d_outputs=up["d_outputs"].copy())
    up2["d_outputs"][pad] = np.nan
    out2, _, _, cache2 = fusedlstm.lstm_forward(**p2)
    g2 = fusedlstm.lstm_backward(cache2, **up2)
    np.testing.assert_array_equal(out2, out)
    for name in g._fields:
        np.testing.assert_array_equal(getattr(g2, name), getattr(g, name), err_msg=name)
    zero = lengths == 0
    for special in (np.nan, np.inf, -np.inf):  # each must be detected as not finite
        r = p["recurrent_kernel"].copy()
        r[3, 5] = special
        _, _, _, cache3 = fusedlstm.lstm_forward(**dict(p, recurrent_kernel=r))
        g3 = fusedlstm.lstm_backward(cache3, **up)
        np.testing.assert_array_equal(g3.h0[zero], up["d_h_n"][zero])
        np.testing.assert_array_equal(g3.c0[zero], up["d_c_n"][zero])
        assert np.all(g3.x[pad] == 0)
        if np.isnan(special):
            assert np.isnan(g3.x[~pad]).all(axis=-1).any()


def test_inference_matches_training_and_stores_nothing(rng):
    # Not bit for bit: inference projects the inputs on W packed for its own GEMM.
    p, _ = make_problem(rng, 4, 5, 3, 7, lengths="random")
    a = fusedlstm.lstm_forward(**p, training=True)
    b = fusedlstm.lstm_forward(**p, training=False)
    assert b[3] is None
    for u, v in zip(a[:3], b[:3]):
        assert_close(v, u, np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B, H", [(67, 40), (12, 190)])  # whole-sequence row tasks; unit tasks
@pytest.mark.parametrize("training", [True, False])
def test_return_sequences_false_skips_outputs_only(rng, dtype, B, H, training):
    """Without return_sequences the outputs are None and everything else is bit-identical:
    final states, and the gradients from its cache (d_outputs still honoured)."""
    p, up = make_problem(rng, B, 6, 5, H, dtype=dtype, lengths="random")
    full = fusedlstm.lstm_forward(**p, training=training)
    last = fusedlstm.lstm_forward(**p, training=training, return_sequences=False)
    assert last[0] is None and reference.lstm_forward(**p, return_sequences=False)[0] is None
    np.testing.assert_array_equal(last[1], full[1])
    np.testing.assert_array_equal(last[2], full[2])
    if training:
        g_full = fusedlstm.lstm_backward(full[3], **up)
        g_last = fusedlstm.lstm_backward(last[3], **up)
        for name in g_full._fields:
            np.testing.assert_array_equal(getattr(g_last, name), getattr(g_full, name), name)
    else:
        assert last[3] is None


def test_cache_owns_its_inputs(rng):
    """Modifying x or the weights after forward does not change the gradients."""
    p, up = make_problem(rng, 2, 4, 3, 5)
    _, _, _, cache = fusedlstm.lstm_forward(**p)
    expected = reference.lstm_backward(reference.lstm_forward(**p)[3], **up)
    for k in ("x", "kernel", "recurrent_kernel"):
        p[k][...] = 0.0
    g = fusedlstm.lstm_backward(cache, **up)
    for name in g._fields:
        assert_close(getattr(g, name), getattr(expected, name), np.float64, name)


@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 0, 5), (2, 3, 4, 0), (0, 0, 0, 0)])
def test_empty_dimensions(rng, shape):
    B, T, E, H = shape
    p, up = make_problem(rng, B, T, E, H, lengths="none")
    out, h_n, c_n, cache = fusedlstm.lstm_forward(**p)
    ref = reference.lstm_forward(**p)
    assert out.shape == (B, T, H) and h_n.shape == (B, H) and c_n.shape == (B, H)
    for a, b in zip((out, h_n, c_n), ref[:3]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    g = fusedlstm.lstm_backward(cache, **up)
    gr = reference.lstm_backward(ref[3], **up)
    for name in g._fields:
        assert getattr(g, name).shape == getattr(gr, name).shape, name
        np.testing.assert_allclose(getattr(g, name), getattr(gr, name), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("order", ["F", "strided"])
def test_non_contiguous_inputs(rng, order):
    p, up = make_problem(rng, 3, 4, 5, 6, lengths="random")
    expected = reference.lstm_forward(**p)
    q = {}
    for k, v in p.items():
        if isinstance(v, np.ndarray) and v.dtype.kind == "f":
            if order == "F":
                v = np.asfortranarray(v)
            else:  # every other element of a twice-as-large array
                big = np.zeros(tuple(2 * d for d in v.shape), v.dtype)
                big[tuple(slice(None, None, 2) for _ in v.shape)] = v
                v = big[tuple(slice(None, None, 2) for _ in v.shape)]
            assert not v.flags.c_contiguous or v.ndim == 1 and order == "F"
        q[k] = v
    out = fusedlstm.lstm_forward(**q)
    for a, b in zip(out[:3], expected[:3]):
        assert_close(a, b, np.float64)
    upF = {k: np.asfortranarray(v) for k, v in up.items()}
    g = fusedlstm.lstm_backward(out[3], **upF)
    gr = reference.lstm_backward(expected[3], **up)
    for name in g._fields:
        assert_close(getattr(g, name), getattr(gr, name), np.float64, name)


def test_lengths_accept_any_integer_dtype(rng):
    p, _ = make_problem(rng, 3, 4, 2, 3, lengths=[4, 1, 0])
    base = fusedlstm.lstm_forward(**p)[0]
    for dt in (np.int8, np.uint16, np.int64):
        out = fusedlstm.lstm_forward(**dict(p, lengths=p["lengths"].astype(dt)))[0]
        np.testing.assert_array_equal(out, base)
    out = fusedlstm.lstm_forward(**dict(p, lengths=[4, 1, 0]))[0]
    np.testing.assert_array_equal(out, base)


def test_big_buffers_are_recycled_without_changing_results(rng):
    """A consumed cache (or an inference workspace) is reused by the next call that fits in it,
    whole or as a prefix (a shorter batch); results stay identical, even when the recycled
    memory is full of NaN, and empty_cache() frees the spare."""
    from fusedlstm import lstm as lstm_mod

    p, up = make_problem(rng, 8, 40, 64, 96, dtype=np.float32, lengths="random")  # > 1 MiB cache
    short, up_short = make_problem(rng, 8, 29, 64, 96, dtype=np.float32, lengths="random")
    fusedlstm.empty_cache()
    fresh = fusedlstm.lstm_forward(**short)
    want_short = fresh[:3] + tuple(fusedlstm.lstm_backward(fresh[3], **up_short))
    fusedlstm.empty_cache()
    runs = []
    for _ in range(3):
        out, h, c, cache = fusedlstm.lstm_forward(**p)
        kept = owner(cache._buf)
        g = fusedlstm.lstm_backward(cache, **up)
        spare = lstm_mod._spare[np.dtype(np.float32)][0]
        assert spare is kept  # kept for the next forward
        runs.append((out, h, c) + tuple(g))
        spare[...] = np.nan  # whatever the recycled memory holds must not leak into results
        o2, h2, c2, cache2 = fusedlstm.lstm_forward(**short)  # a prefix of the spare
        assert cache2._buf.base is spare
        got = (o2, h2, c2) + tuple(fusedlstm.lstm_backward(cache2, **up_short))
        for u, v in zip(got, want_short):
            np.testing.assert_array_equal(u, v)
        assert lstm_mod._spare[np.dtype(np.float32)][0] is spare  # the whole buffer came back
        inf = fusedlstm.lstm_forward(**p, training=False)  # its workspace is a prefix too
        for u, v in zip(inf[:3], (out, h, c)):
            np.testing.assert_array_equal(u, v)
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            np.testing.assert_array_equal(a, b)
    fusedlstm.empty_cache()
    assert not lstm_mod._spare


def owner(buf):
    """The array that owns a buffer's memory (the kernels get 64-byte-aligned views)."""
    return buf if buf.base is None else buf.base


def test_bidirectional_caches_and_workspaces_are_recycled(rng):
    """A bidirectional step's two caches come back after its backward, and the next step's two
    directions reuse them (as the inference workspaces do), with unchanged results."""
    from fusedlstm import lstm as lstm_mod

    B, T, E, H = 8, 40, 64, 96  # caches over 1 MiB each
    p, _ = make_problem(rng, B, T, E, H, dtype=np.float32, lengths="random", state=False)
    q, _ = make_problem(rng, B, T, E, H, dtype=np.float32, state=False)
    fw, rv = (p["kernel"], p["recurrent_kernel"], p["bias"]), (q["kernel"], q["recurrent_kernel"], q["bias"])
    d = rng.standard_normal((B, T, 2 * H)).astype(np.float32)
    fusedlstm.empty_cache()
    runs, kept = [], []
    for _ in range(3):
        out, h, c, cache = fusedlstm.lstm_bidirectional_forward(p["x"], fw, rv, lengths=p["lengths"])
        bufs = {id(owner(cache.forward._buf)), id(owner(cache.reverse._buf))}
        if kept:
            assert {id(b) for b in kept} == bufs  # both directions took a recycled buffer
        g = fusedlstm.lstm_backward(cache, d)
        kept = list(lstm_mod._spare[np.dtype(np.float32)])
        assert {id(b) for b in kept} == bufs and len(kept) == 2
        for b in kept:
            b[...] = np.nan  # what the recycled memory holds must not reach results
        runs.append((out, h, c, g.x, g.forward.kernel, g.reverse.recurrent_kernel))
        inf = fusedlstm.lstm_bidirectional_forward(p["x"], fw, rv, lengths=p["lengths"], training=False)
        np.testing.assert_array_equal(inf[0], out)
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            np.testing.assert_array_equal(a, b)
    fusedlstm.empty_cache()


@pytest.mark.parametrize("len_dtype", [np.int32, np.int64])
def test_cache_keeps_its_own_lengths(rng, len_dtype):
    """Changing the caller's lengths array after the forward changes nothing in the backward."""
    p, up = make_problem(rng, 5, 6, 4, 7, dtype=np.float64, lengths=[6, 3, 0, 5, 1])
    lengths = np.asarray(p["lengths"], dtype=len_dtype)
    expected = fusedlstm.lstm_backward(fusedlstm.lstm_forward(**dict(p, lengths=lengths))[3], **up)
    cache = fusedlstm.lstm_forward(**dict(p, lengths=lengths))[3]
    lengths[:] = 6
    got = fusedlstm.lstm_backward(cache, **up)
    for name in got._fields:
        np.testing.assert_array_equal(getattr(got, name), getattr(expected, name), err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_need_dx_false_skips_only_the_input_gradient(rng, dtype):
    p, up = make_problem(rng, 9, 7, 11, 13, dtype=dtype, lengths="random")
    full = fusedlstm.lstm_backward(fusedlstm.lstm_forward(**p)[3], **up)
    part = fusedlstm.lstm_backward(fusedlstm.lstm_forward(**p)[3], **up, need_dx=False)
    assert part.x is None
    assert reference.lstm_backward(reference.lstm_forward(**p)[3], **up, need_dx=False).x is None
    for name in ("kernel", "recurrent_kernel", "bias", "h0", "c0"):
        np.testing.assert_array_equal(getattr(part, name), getattr(full, name), err_msg=name)

"""Prepared-weights inference (fusedlstm.prepare / PreparedLSTM.infer) and the inference path of
lstm_forward that shares its kernel: against the NumPy reference and the training forward,
bit-identical to the plain call, across thread counts and repeated or concurrent calls;
streaming in chunks equals one call; pickling; immutability; bad input."""

import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fusedlstm
from fusedlstm import reference
from helpers import as64, assert_close, make_problem

# Shapes that take every grid: one row (B = 1), pipelined unit blocks on 2 threads (few rows,
# a step big enough to split), row blocks, H not a multiple of the unit group, E = 0.
SHAPES = [(1, 20, 50, 128), (1, 6, 7, 33), (9, 5, 30, 130), (40, 3, 8, 200), (3, 4, 0, 5), (16, 7, 12, 24)]


@pytest.fixture
def restore_threads():
    n = fusedlstm.get_num_threads()
    yield
    fusedlstm.set_num_threads(n)


def weights(p):
    return p["kernel"], p["recurrent_kernel"], p["bias"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lengths", ["none", "random"])
def test_prepared_equals_plain_training_and_reference(rng, dtype, shape, lengths):
    p, _ = make_problem(rng, *shape, dtype=dtype, lengths=lengths)
    prep = fusedlstm.prepare(*weights(p))
    got = prep.infer(p["x"], p["h0"], p["c0"], p["lengths"])
    plain = fusedlstm.lstm_forward(**p, training=False)
    train = fusedlstm.lstm_forward(**p, training=True)
    want = reference.lstm_forward(**as64(p), training=False)
    for g, a, b, w in zip(got, plain[:3], train[:3], want[:3]):
        np.testing.assert_array_equal(g, a)
        assert_close(g, b, dtype)  # inference's projection runs on packed W: other roundings
        assert_close(g, w, dtype)
    last = prep.infer(p["x"], p["h0"], p["c0"], p["lengths"], return_sequences=False)
    assert last[0] is None
    np.testing.assert_array_equal(last[1], got[1])
    np.testing.assert_array_equal(last[2], got[2])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1, 50, 128), (3, 2, 7, 33), (7, 1, 0, 20), (2, 2, 30, 100), (1, 2, 5, 300)])
@pytest.mark.parametrize("options", ["lengths", "reverse", "mask", "state"])
@pytest.mark.parametrize("threads", [1, 2])
def test_plain_call_reading_weights_in_place_equals_prepared(rng, restore_threads, dtype, shape, options, threads):
    """A plain inference call of a step or two on a small batch reads the weights in place (no
    packing): the same sums in the same order, so bit-identical to prepared weights, on every
    grid (2 threads split the units of the larger steps)."""
    fusedlstm.set_num_threads(threads)
    p, _ = make_problem(rng, *shape, dtype=dtype, lengths="random" if options == "lengths" else "none")
    if options != "state":
        p["h0"] = p["c0"] = None
    kw = {}
    if options == "reverse":
        kw["reverse"] = True
    if options == "mask":
        kw["mask"] = rng.random(shape[:2]) < 0.6
    got = fusedlstm.prepare(*weights(p)).infer(p["x"], p["h0"], p["c0"], p["lengths"], **kw)
    plain = fusedlstm.lstm_forward(**p, training=False, **kw)
    want = reference.lstm_forward(**as64(p), training=False, **kw)
    for g, a, w in zip(got, plain[:3], want[:3]):
        np.testing.assert_array_equal(a, g)
        assert_close(a, w, dtype)


def test_large_batch_projects_inside_the_step(rng):
    """Past the hoisting budget (N·T·4H > 16M elements) x_t·W runs inside each step: same
    results as the reference within float32 rounding."""
    p, _ = make_problem(rng, 256, 65, 8, 256, dtype=np.float32, lengths="random", scale=1 / 16)
    got = fusedlstm.prepare(*weights(p)).infer(p["x"], p["h0"], p["c0"], p["lengths"])
    plain = fusedlstm.lstm_forward(**p, training=False)
    want = reference.lstm_forward(**as64(p), training=False)
    for g, a, w in zip(got, plain[:3], want[:3]):
        np.testing.assert_array_equal(g, a)
        assert_close(g, w, np.float32)
    # Two halves of the steps each fit the budget, so they run hoisted: the same bits.
    prep = fusedlstm.prepare(*weights(p))
    first = prep.infer(p["x"][:, :32], p["h0"], p["c0"], np.minimum(p["lengths"], 32))
    second = prep.infer(p["x"][:, 32:], first[1], first[2], np.maximum(p["lengths"] - 32, 0))
    np.testing.assert_array_equal(np.concatenate([first[0], second[0]], axis=1), got[0])
    np.testing.assert_array_equal(second[1], got[1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES + [(2, 9, 40, 300)])
def test_thread_count_and_repeats_do_not_change_results(rng, restore_threads, dtype, shape):
    p, _ = make_problem(rng, *shape, dtype=dtype, lengths="random")
    prep = fusedlstm.prepare(*weights(p))
    results = []
    for threads in (1, 2, 2, 1):
        fusedlstm.set_num_threads(threads)
        results.append(prep.infer(p["x"], p["h0"], p["c0"], p["lengths"]))
        results.append(fusedlstm.lstm_forward(**p, training=False)[:3])
    for r in results[1:]:
        for a, b in zip(results[0], r):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("chunk", [1, 3])
def test_streaming_in_chunks_equals_one_call(rng, dtype, chunk):
    p, _ = make_problem(rng, 2, 10, 6, 40, dtype=dtype)
    prep = fusedlstm.prepare(*weights(p))
    out, h_n, c_n = prep.infer(p["x"], p["h0"], p["c0"])
    h, c, pieces = p["h0"], p["c0"], []
    for t in range(0, 10, chunk):
        o, h, c = prep.infer(p["x"][:, t : t + chunk], h, c)
        pieces.append(o)
    # Bit for bit: each step's arithmetic does not depend on how many steps a call holds.
    np.testing.assert_array_equal(np.concatenate(pieces, axis=1), out)
    np.testing.assert_array_equal(h, h_n)
    np.testing.assert_array_equal(c, c_n)
    h2, c2 = p["h0"], p["c0"]
    for t in range(0, 10, chunk):  # deterministic: the same stream twice, the same bits
        _, h2, c2 = prep.infer(p["x"][:, t : t + chunk], h2, c2)
    np.testing.assert_array_equal(h2, h)
    np.testing.assert_array_equal(c2, c)


def test_concurrent_infer_equals_sequential(rng):
    p, _ = make_problem(rng, 4, 12, 20, 64, dtype=np.float32, lengths="random")
    prep = fusedlstm.prepare(*weights(p))
    xs = [rng.standard_normal(p["x"].shape).astype(np.float32) for _ in range(8)]
    seq = [prep.infer(x, lengths=p["lengths"]) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        par = list(pool.map(lambda x: prep.infer(x, lengths=p["lengths"]), xs))
    for a, b in zip(seq, par):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)


def test_pickle_immutability_and_private_copies(rng):
    p, _ = make_problem(rng, 3, 5, 4, 9, dtype=np.float32)
    k, r, b = (a.copy() for a in weights(p))
    prep = fusedlstm.prepare(k, r, b)
    before = prep.infer(p["x"])
    k += 1.0  # the caller's arrays change; the prepared weights do not
    r[:] = 0.0
    for got, want in zip(prep.infer(p["x"]), before):
        np.testing.assert_array_equal(got, want)
    again = pickle.loads(pickle.dumps(prep))
    assert (again.input_size, again.units, again.dtype) == (4, 9, np.float32)
    for got, want in zip(again.infer(p["x"]), before):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(AttributeError, match="immutable"):
        prep.units = 3
    with pytest.raises(ValueError):
        prep.kernel[0, 0] = 1.0  # read-only
    assert "PreparedLSTM(input_size=4, units=9" in repr(prep)
    assert prep.nbytes > 0


def test_unpickled_arrays_are_accepted(rng):
    """An unpickled array's dtype is equal to float32 but not the same object: accepted."""
    p, _ = make_problem(rng, 2, 3, 4, 5, dtype=np.float32)
    q = pickle.loads(pickle.dumps(p))
    for a, b in zip(fusedlstm.lstm_forward(**q, training=False)[:3], fusedlstm.lstm_forward(**p, training=False)[:3]):
        np.testing.assert_array_equal(a, b)
    prep = fusedlstm.prepare(*weights(q))
    np.testing.assert_array_equal(prep.infer(q["x"])[1], fusedlstm.prepare(*weights(p)).infer(p["x"])[1])


def test_padded_steps_never_leak_nan(rng):
    p, _ = make_problem(rng, 3, 6, 5, 17, dtype=np.float32)
    lengths = np.array([6, 2, 0], np.int32)
    x = p["x"].copy()
    x[1, 2:] = np.nan
    x[2] = np.inf
    out, h_n, c_n = fusedlstm.prepare(*weights(p)).infer(x, p["h0"], p["c0"], lengths)
    assert np.isfinite(out).all() and np.isfinite(h_n).all() and np.isfinite(c_n).all()
    assert (out[1, 2:] == 0).all() and (out[2] == 0).all()
    np.testing.assert_array_equal(h_n[2], p["h0"][2])
    np.testing.assert_array_equal(c_n[2], p["c0"][2])


def test_non_finite_weights_propagate_as_in_lstm_forward(rng):
    p, _ = make_problem(rng, 2, 4, 3, 6, dtype=np.float64)
    p["recurrent_kernel"][1, 3] = np.nan
    got = fusedlstm.prepare(*weights(p)).infer(p["x"], p["h0"], p["c0"])
    want = fusedlstm.lstm_forward(**p, training=False)
    for g, w in zip(got, want[:3]):
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w))


def test_bad_input_names_the_problem(rng):
    p, _ = make_problem(rng, 2, 4, 3, 6, dtype=np.float32)
    prep = fusedlstm.prepare(*weights(p))
    with pytest.raises(ValueError, match=r"x: expected shape \(B, T, 3\).*kernel \(3, 24\).*\(2, 4, 5\)"):
        prep.infer(np.zeros((2, 4, 5), np.float32))
    with pytest.raises(TypeError, match="float64 does not match the prepared weights' dtype float32"):
        prep.infer(p["x"].astype(np.float64))
    with pytest.raises(ValueError, match="h0"):
        prep.infer(p["x"], h0=np.zeros((3, 6), np.float32))
    with pytest.raises(ValueError, match="lengths"):
        prep.infer(p["x"], lengths=np.array([5, 1]))
    with pytest.raises(ValueError, match="3-d"):
        prep.infer(np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match=r"recurrent_kernel: expected shape \(H, 4H\)"):
        fusedlstm.prepare(p["kernel"], np.zeros((6, 20), np.float32))
    with pytest.raises(ValueError, match="kernel: expected shape"):
        fusedlstm.prepare(np.zeros((3, 20), np.float32), p["recurrent_kernel"])
    with pytest.raises(ValueError, match="bias"):
        fusedlstm.prepare(p["kernel"], p["recurrent_kernel"], np.zeros(5, np.float32))
    with pytest.raises(TypeError, match="recurrent_kernel"):
        fusedlstm.prepare(p["kernel"], p["recurrent_kernel"].astype(np.float64))
    # Converted, not refused: lists, non-contiguous arrays, int64 lengths.
    x_list = p["x"].tolist()
    a = prep.infer(np.asarray(x_list, np.float32), lengths=np.array([4, 2], np.int64))
    b = prep.infer(np.asfortranarray(p["x"]), lengths=[4, 2])
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 20, 50, 128), (9, 5, 30, 130), (40, 3, 8, 24), (3, 4, 0, 5)])
@pytest.mark.parametrize("options", ["lengths", "mask", "last-state"])
def test_bidirectional_call_equals_the_two_directions(rng, restore_threads, dtype, shape, options):
    """infer_bidirectional = forward.infer and backward.infer(reverse=True), outputs side by
    side, bit for bit, on 1 and 2 threads (2: the directions run at once, a thread each)."""
    B, T, E, H = shape
    p, _ = make_problem(rng, B, T, E, H, dtype=dtype, lengths="random")
    q, _ = make_problem(rng, B, T, E, H, dtype=dtype)
    fwd, bwd = fusedlstm.prepare(*weights(p)), fusedlstm.prepare(*weights(q))
    h0, c0 = np.stack([p["h0"], q["h0"]]), np.stack([p["c0"], q["c0"]])
    kw = {"lengths": p["lengths"]}
    if options == "mask":
        kw = {"mask": rng.random((B, T)) < 0.7}
    seq = options != "last-state"
    want_f = fwd.infer(p["x"], h0[0], c0[0], return_sequences=seq, **kw)
    want_b = bwd.infer(p["x"], h0[1], c0[1], return_sequences=seq, reverse=True, **kw)
    for threads in (1, 2):
        fusedlstm.set_num_threads(threads)
        out, h_n, c_n = fusedlstm.infer_bidirectional(fwd, bwd, p["x"], h0, c0, return_sequences=seq, **kw)
        if seq:
            np.testing.assert_array_equal(out, np.concatenate([want_f[0], want_b[0]], axis=2))
        else:
            assert out is None
        np.testing.assert_array_equal(h_n, np.stack([want_f[1], want_b[1]]))
        np.testing.assert_array_equal(c_n, np.stack([want_f[2], want_b[2]]))


def test_bidirectional_call_bad_input_names_the_problem(rng):
    p, _ = make_problem(rng, 2, 4, 3, 6, dtype=np.float32)
    fwd = fusedlstm.prepare(*weights(p))
    bwd = fusedlstm.prepare(*weights(p))
    with pytest.raises(TypeError, match="backward: expected a PreparedLSTM"):
        fusedlstm.infer_bidirectional(fwd, weights(p), p["x"])
    other, _ = make_problem(rng, 2, 4, 3, 7, dtype=np.float32)
    with pytest.raises(ValueError, match=r"backward: the two directions .* kernels \(3, 24\).*\(3, 28\)"):
        fusedlstm.infer_bidirectional(fwd, fusedlstm.prepare(*weights(other)), p["x"])
    with pytest.raises(ValueError, match="backward: activations"):
        fusedlstm.infer_bidirectional(fwd, fusedlstm.prepare(*weights(p), activation="relu"), p["x"])
    with pytest.raises(ValueError, match=r"h0: expected a 3-d array, got shape \(2, 6\)"):
        fusedlstm.infer_bidirectional(fwd, bwd, p["x"], h0=p["h0"])
    with pytest.raises(ValueError, match=r"c0: expected shape \(2, 2, 6\)"):
        fusedlstm.infer_bidirectional(fwd, bwd, p["x"], c0=p["c0"][None])
    with pytest.raises(ValueError, match=r"x: expected shape \(B, T, 3\)"):
        fusedlstm.infer_bidirectional(fwd, bwd, np.zeros((2, 4, 5), np.float32))
    with pytest.raises(TypeError, match="float64 does not match"):
        fusedlstm.infer_bidirectional(fwd, bwd, p["x"].astype(np.float64))
    with pytest.raises(ValueError, match="lengths"):
        fusedlstm.infer_bidirectional(fwd, bwd, p["x"], lengths=np.array([5, 1]))

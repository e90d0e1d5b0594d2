"""Keras's other activations (activation= tanh|relu|linear|sigmoid|hard_sigmoid for the candidate
and cell output, recurrent_activation= the same set for the gates) and recurrent dropout masks
(one [B, H] mask per gate on h_{t-1}, fixed over the steps), in the compiled kernel: against the
NumPy reference, by central differences, on the prepared path, and bad arguments named."""

import numpy as np
import pytest

import fusedlstm
from fusedlstm import reference
from helpers import as64, assert_all_equal, assert_close, make_problem, results_across_threads

PAIRS = [("relu", "sigmoid"), ("linear", "hard_sigmoid"), ("tanh", "hard_sigmoid"), ("sigmoid", "tanh")]
SHAPES = [(3, 6, 5, 7), (5, 4, 12, 70), (40, 5, 9, 20), (6, 3, 10, 190)]


def masks_for(rng, B, H, dtype, p=0.3):
    return ((rng.random((4, B, H)) >= p) / (1 - p)).astype(dtype)


def compare(rng, shape, dtype, reverse=False, masks=False, **acts):
    B = shape[0]
    p, up = make_problem(rng, *shape, dtype=dtype, lengths="random", scale=0.3)
    m = masks_for(rng, B, shape[3], dtype) if masks else None
    out = fusedlstm.lstm_forward(**p, reverse=reverse, recurrent_masks=m, **acts)
    ref = reference.lstm_forward(**as64(p), reverse=reverse, recurrent_masks=m, **acts)
    for name, a, b in zip(("outputs", "h_n", "c_n"), out[:3], ref[:3]):
        assert_close(a, b, dtype, name)
    g = fusedlstm.lstm_backward(out[3], **up)
    gr = reference.lstm_backward(ref[3], **as64(up))
    for name in g._fields:
        assert_close(getattr(g, name), getattr(gr, name), dtype, "grad " + name)
    return p


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%d_T%d_E%d_H%d" % s)
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: "-".join(p))
def test_activations_match_reference(rng, dtype, shape, pair):
    acts = dict(activation=pair[0], recurrent_activation=pair[1])
    p = compare(rng, shape, dtype, reverse=shape[0] % 2 == 1, **acts)
    # Inference (training=False and prepared weights) computes the same activations.
    inf = fusedlstm.lstm_forward(**p, training=False, **acts)
    ref = reference.lstm_forward(**as64(p), training=False, **acts)
    assert_close(inf[0], ref[0], dtype, "inference outputs")
    prepared = fusedlstm.prepare(p["kernel"], p["recurrent_kernel"], p["bias"], **acts)
    assert prepared.activations == pair
    got = prepared.infer(p["x"], p["h0"], p["c0"], p["lengths"])
    for a, b in zip(got, inf[:3]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%d_T%d_E%d_H%d" % s)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_recurrent_masks_match_reference(rng, dtype, shape, reverse):
    compare(rng, shape, dtype, reverse=reverse, masks=True)
    compare(rng, shape, dtype, masks=True, activation="relu", recurrent_activation="hard_sigmoid")


def test_all_ones_masks_change_nothing(rng):
    p, up = make_problem(rng, 4, 5, 6, 9, lengths="random")
    a = fusedlstm.lstm_forward(**p)
    b = fusedlstm.lstm_forward(**p, recurrent_masks=np.ones((4, 4, 9)))
    assert_close(b[0], a[0], np.float64, "outputs")
    ga, gb = fusedlstm.lstm_backward(a[3], **up), fusedlstm.lstm_backward(b[3], **up)
    for name in ga._fields:
        assert_close(getattr(gb, name), getattr(ga, name), np.float64, name)


@pytest.mark.parametrize("case", ["masks", "relu-hard_sigmoid", "linear-sigmoid"])
def test_central_differences(rng, case):
    p, up = make_problem(rng, 3, 4, 3, 5, lengths=[4, 2, 0], scale=0.3)
    kw = {}
    if case == "masks":
        kw["recurrent_masks"] = masks_for(rng, 3, 5, np.float64, p=0.4)
    else:
        kw["activation"], kw["recurrent_activation"] = case.split("-")
    g = fusedlstm.lstm_backward(fusedlstm.lstm_forward(**p, **kw)[3], **up)

    def loss():
        out, h, c, _ = fusedlstm.lstm_forward(**p, **kw)
        return np.sum(out * up["d_outputs"]) + np.sum(h * up["d_h_n"]) + np.sum(c * up["d_c_n"])

    eps = 1e-6
    for name in ("x", "kernel", "recurrent_kernel", "bias", "h0", "c0"):
        arr, num = p[name], np.zeros_like(p[name])
        for idx in np.ndindex(arr.shape):
            orig = arr[idx]
            arr[idx] = orig + eps
            lp = loss()
            arr[idx] = orig - eps
            lm = loss()
            arr[idx] = orig
            num[idx] = (lp - lm) / (2 * eps)
        np.testing.assert_allclose(getattr(g, name), num, rtol=1e-6, atol=1e-8, err_msg=f"{case}: d/d {name}")


def test_masks_bit_identical_across_threads(rng):
    p, up = make_problem(rng, 40, 6, 8, 48, dtype=np.float32, lengths="random")
    m = masks_for(rng, 40, 48, np.float32)

    def run():
        out = fusedlstm.lstm_forward(**p, recurrent_masks=m, activation="relu")
        return (out[0], *fusedlstm.lstm_backward(out[3], **up))

    assert_all_equal(results_across_threads(run))


def test_bad_arguments_are_named(rng):
    p, _ = make_problem(rng, 2, 3, 4, 5)
    with pytest.raises(ValueError, match="activation: 'gelu' is not supported"):
        fusedlstm.lstm_forward(**p, activation="gelu")
    with pytest.raises(ValueError, match="recurrent_activation: 'softmax' is not supported"):
        fusedlstm.prepare(p["kernel"], p["recurrent_kernel"], recurrent_activation="softmax")
    with pytest.raises(ValueError, match="training only"):
        fusedlstm.lstm_forward(**p, training=False, recurrent_masks=np.ones((4, 2, 5)))
    with pytest.raises(ValueError, match=r"recurrent_masks: expected shape \(4, 2, 5\)"):
        fusedlstm.lstm_forward(**p, recurrent_masks=np.ones((2, 5)).reshape(1, 2, 5))
    with pytest.raises(TypeError, match="recurrent_masks: dtype float32 does not match"):
        fusedlstm.lstm_forward(**p, recurrent_masks=np.ones((4, 2, 5), np.float32))

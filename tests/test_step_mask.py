"""Masks with holes (lstm_forward(mask=[B, T])): any step may be invalid, its state carried, its
output zero, its x never read. Against the NumPy reference (forward and reverse, every gradient,
float64 and float32, inference and prepared weights), a right-padded mask equal to lengths bit
for bit, threads, and bad masks named."""

import numpy as np
import pytest

import fusedlstm
from fusedlstm import reference
from helpers import as64, assert_all_equal, assert_close, make_problem, results_across_threads

SHAPES = [(1, 7, 3, 5), (4, 6, 5, 7), (9, 5, 12, 70), (40, 6, 9, 20), (6, 4, 10, 190)]


def holes(rng, B, T):
    m = rng.random((B, T)) < 0.6
    m[0] = False  # a row with no valid step
    if B > 1:
        m[1] = True  # and one with all
    if B > 2:
        m[2] = np.arange(T) % 2 == 1  # starts with a hole
    return m


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%d_T%d_E%d_H%d" % s)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_mask_with_holes_matches_reference(rng, dtype, shape, reverse):
    p, up = make_problem(rng, *shape, dtype=dtype)
    mask = holes(rng, *shape[:2])
    p["x"][~mask] = np.nan  # never read
    p["lengths"] = None
    up["d_outputs"][~mask] = np.inf  # ignored
    out = fusedlstm.lstm_forward(**p, mask=mask, reverse=reverse)
    ref = reference.lstm_forward(**as64(p), mask=mask, reverse=reverse)
    for name, a, b in zip(("outputs", "h_n", "c_n"), out[:3], ref[:3]):
        assert np.all(np.isfinite(a)), name
        assert_close(a, b, dtype, name)
    assert np.all(out[0][~mask] == 0)
    np.testing.assert_array_equal(out[1][0], p["h0"][0])  # no valid step: h0 carried
    g = fusedlstm.lstm_backward(out[3], **up)
    gr = reference.lstm_backward(ref[3], **as64(up))
    for name in g._fields:
        assert_close(getattr(g, name), getattr(gr, name), dtype, "grad " + name)
    assert np.all(g.x[~mask] == 0)
    inf = fusedlstm.lstm_forward(**p, mask=mask, reverse=reverse, training=False)
    assert_close(inf[0], ref[0], dtype, "inference outputs")
    prepared = fusedlstm.prepare(p["kernel"], p["recurrent_kernel"], p["bias"])
    for a, b in zip(prepared.infer(p["x"], p["h0"], p["c0"], mask=mask, reverse=reverse), inf[:3]):
        np.testing.assert_array_equal(a, b)


def test_right_padded_mask_is_lengths(rng):
    p, up = make_problem(rng, 5, 6, 4, 8, lengths=[6, 3, 0, 1, 5], dtype=np.float32)
    lengths = p.pop("lengths")
    mask = np.arange(6)[None, :] < lengths[:, None]
    for reverse in (False, True):
        a = fusedlstm.lstm_forward(**p, lengths=lengths, reverse=reverse)
        b = fusedlstm.lstm_forward(**p, mask=mask, reverse=reverse)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(b[3].lengths, lengths)  # ran as lengths


def test_holes_bit_identical_across_threads(rng):
    p, up = make_problem(rng, 40, 8, 6, 48, dtype=np.float32)
    p["lengths"] = None
    mask = holes(rng, 40, 8)

    def run():
        out = fusedlstm.lstm_forward(**p, mask=mask)
        return (out[0], *fusedlstm.lstm_backward(out[3], **up))

    assert_all_equal(results_across_threads(run))


def test_bad_masks_are_named(rng):
    p, _ = make_problem(rng, 2, 3, 4, 5, lengths=[3, 1])
    with pytest.raises(ValueError, match="mask: give lengths or a mask, not both"):
        fusedlstm.lstm_forward(**p, mask=np.ones((2, 3), bool))
    p["lengths"] = None
    with pytest.raises(ValueError, match=r"mask: expected shape \(2, 3\)"):
        fusedlstm.lstm_forward(**p, mask=np.ones((3, 2), bool))
    with pytest.raises(TypeError, match="mask: expected booleans"):
        fusedlstm.lstm_forward(**p, mask=np.array([["a", "b", "c"]] * 2))

"""Adam, dense and lazy-sparse, against the textbook update written out here, and against
torch.optim.Adam / torch.optim.SparseAdam."""

import numpy as np
import pytest

from fusedlstm.sentiment.optim import Adam
from helpers import requires_torch


def textbook(p, grads, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return p


def test_dense_matches_textbook(rng):
    p0 = rng.standard_normal((4, 3))
    grads = [rng.standard_normal((4, 3)) for _ in range(5)]
    p = p0.copy()
    opt = Adam({"w": p}, lr=0.01)
    for g in grads:
        opt.step({"w": g.copy()})
    np.testing.assert_allclose(p, textbook(p0, grads, lr=0.01), rtol=1e-12, atol=1e-14)


def test_sparse_touches_only_present_rows(rng):
    p0 = rng.standard_normal((6, 2))
    p = p0.copy()
    opt = Adam({"e": p}, lr=0.01)
    steps = [(np.array([0, 2]), rng.standard_normal((2, 2))), (np.array([2, 5]), rng.standard_normal((2, 2)))]
    for rows, g in steps:
        opt.step({}, {"e": (rows, g)})
    np.testing.assert_array_equal(p[[1, 3, 4]], p0[[1, 3, 4]])
    # Row 2 saw gradients at both steps: the dense textbook update on that row alone.
    np.testing.assert_allclose(p[2], textbook(p0[2], [steps[0][1][1], steps[1][1][0]], lr=0.01), rtol=1e-12)
    # Row 0 saw one gradient at step 1 and none after: lazy, so unchanged by step 2.
    np.testing.assert_allclose(p[0], textbook(p0[0], [steps[0][1][0]], lr=0.01), rtol=1e-12)


def test_float32_matches_textbook_in_float64(rng):
    """The compiled pass in float32 (the model's dtype) over sizes that exercise the vector body
    and its tail, dense and by rows, against the float64 textbook update."""
    for n in (1, 15, 16, 17, 1000):
        p0 = rng.standard_normal((n, 3))
        grads = [rng.standard_normal((n, 3)) for _ in range(4)]
        p = p0.astype(np.float32)
        e = p0.astype(np.float32)
        opt = Adam({"w": p, "e": e}, lr=0.01)
        for g in grads:
            opt.step({"w": g.astype(np.float32)}, {"e": (np.arange(n), g.astype(np.float32))})
        want = textbook(p0, grads, lr=0.01)
        np.testing.assert_allclose(p, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(e, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scale_and_average_ride_in_the_same_pass(rng, dtype):
    """step(scale=, average=) is bit-identical to scaling the gradients in place, stepping, then
    updating the moving average with NumPy (the clip-then-average loop it replaces), dense and
    by rows, over lengths that exercise the vector body and its tail."""
    for n in (1, 17, 1000):
        w0, e0 = rng.standard_normal((n, 3)).astype(dtype), rng.standard_normal((6, 3)).astype(dtype)
        fused = {"w": w0.copy(), "e": e0.copy()}
        plain = {"w": w0.copy(), "e": e0.copy()}
        avg_f, avg_p = {"w": w0.copy()}, {"w": w0.copy()}
        of, op = Adam(dict(fused), lr=0.01), Adam(dict(plain), lr=0.01)
        for step, scale in enumerate((0.37, 1.0, 2.5e-3)):
            g = rng.standard_normal((n, 3)).astype(dtype)
            rows, rg = np.array([0, 4]), rng.standard_normal((2, 3)).astype(dtype)
            keep = min(0.999, (2 + step) / (11 + step))
            of.step({"w": g.copy()}, {"e": (rows, rg.copy())}, scale=scale, average=(avg_f, keep))
            gs, rgs = g.copy(), rg.copy()
            gs *= scale
            rgs *= scale
            op.step({"w": gs}, {"e": (rows, rgs)})
            avg_p["w"] -= (1 - keep) * (avg_p["w"] - plain["w"])
            for k in ("w", "e"):
                np.testing.assert_array_equal(fused[k], plain[k])
            np.testing.assert_array_equal(avg_f["w"], avg_p["w"])
        assert not np.array_equal(avg_f["w"], fused["w"])  # the average lags the weights
    with pytest.raises(ValueError, match="keep must be in"):
        of.step({"w": g}, average=(avg_f, 1.0))
    with pytest.raises(ValueError, match="average 'w' must be"):
        of.step({"w": g}, average=({"w": avg_f["w"].astype(np.float16)}, 0.5))
    with pytest.raises(KeyError, match="no dense gradient"):
        of.step({}, average=(avg_f, 0.5))
    with pytest.raises(ValueError, match="scale must be finite"):
        of.step({"w": g}, scale=float("nan"))


def test_bad_arguments_are_named():
    w = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match="'w' must be a writeable C-contiguous"):
        Adam({"w": np.zeros((2, 3), np.float32).T})
    with pytest.raises(ValueError, match="'w' must be"):
        Adam({"w": np.zeros((2, 3), np.int64)})
    ro = np.zeros(3, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="'w' must be"):
        Adam({"w": ro})
    opt = Adam({"w": w, "e": np.zeros((4, 2), np.float32)})
    with pytest.raises(ValueError, match=r"'w'.*grad: expected shape \(3, 2\)"):
        opt.step({"w": np.zeros((2, 3), np.float32)})
    with pytest.raises(ValueError, match=r"'e'.*rows\[1\] = 4 is outside \[0, 4\)"):
        opt.step({}, {"e": (np.array([0, 4]), np.zeros((2, 2), np.float32))})
    with pytest.raises(ValueError, match=r"'e'.*row grads: expected shape \(2, 2\)"):
        opt.step({}, {"e": (np.array([0, 1]), np.zeros((2, 3), np.float32))})
    with pytest.raises(ValueError, match=r"'e'.*rows\[0\] = -1"):  # w's update is not applied
        opt.step({"w": np.ones((3, 2), np.float32)}, {"e": (np.array([-1]), np.zeros((1, 2), np.float32))})
    assert not w.any() and opt.t == 0  # nothing was written by a rejected step


def test_state_roundtrip(rng):
    p = rng.standard_normal(3)
    a = Adam({"w": p})
    a.step({"w": np.ones(3)})
    b = Adam({"w": p.copy()})
    b.load_state(a.state())
    assert b.t == 1
    np.testing.assert_array_equal(b.m["w"], a.m["w"])
    with pytest.raises(ValueError, match="shape"):
        Adam({"w": np.zeros(4)}).load_state(a.state())


@requires_torch
def test_matches_torch(rng):
    import torch

    p0 = rng.standard_normal((5, 4))
    grads = [rng.standard_normal((5, 4)) for _ in range(6)]
    p = p0.copy()
    ours = Adam({"w": p}, lr=0.02)
    tp = torch.tensor(p0, requires_grad=True)
    theirs = torch.optim.Adam([tp], lr=0.02, betas=(0.9, 0.999), eps=1e-8)
    for g in grads:
        ours.step({"w": g.copy()})
        tp.grad = torch.tensor(g)
        theirs.step()
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-10, atol=1e-12)

    # Sparse: torch.optim.SparseAdam with sparse gradients of embedding rows. SparseAdam adds
    # eps after the bias correction ("epsilon hat", TensorFlow's convention) where Adam and we
    # use the textbook placement; with a negligible eps the two conventions coincide.
    e0 = rng.standard_normal((8, 3))
    e = e0.copy()
    ours = Adam({"e": e}, lr=0.05, eps=1e-30)
    te = torch.tensor(e0, requires_grad=True)
    theirs = torch.optim.SparseAdam([te], lr=0.05, eps=1e-30)
    for rows in ([0, 3], [3, 7], [1, 3, 5]):
        rows = np.array(rows)
        g = rng.standard_normal((len(rows), 3))
        ours.step({}, {"e": (rows, g.copy())})
        te.grad = torch.sparse_coo_tensor(torch.tensor(rows)[None], torch.tensor(g), (8, 3), check_invariants=True)
        theirs.step()
    np.testing.assert_allclose(e, te.detach().numpy(), rtol=1e-10, atol=1e-12)

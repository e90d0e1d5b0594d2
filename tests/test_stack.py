"""Stacked, optionally bidirectional LSTMs (fusedlstm.lstm_stack_forward/backward): against the
NumPy reference composed by hand (dropout multipliers drawn from the same seed), and against
torch.nn.LSTM(num_layers=2, bidirectional=True) with converted weights on packed sequences."""

import numpy as np
import pytest

import fusedlstm
from fusedlstm import reference
from helpers import assert_close


def make_layers(rng, L, E, H, bidirectional, dtype=np.float64):
    def one(e):
        return (
            (rng.standard_normal((e, 4 * H)) * 0.4).astype(dtype),
            (rng.standard_normal((H, 4 * H)) * 0.4).astype(dtype),
            (rng.standard_normal(4 * H) * 0.2).astype(dtype),
        )

    D = 2 if bidirectional else 1
    return [
        (one(E if li == 0 else D * H), one(E if li == 0 else D * H)) if bidirectional else one(E if li == 0 else H)
        for li in range(L)
    ]


def reference_stack(x, layers, h0, c0, lengths, bidirectional, masks):
    """The stack composed by hand from the reference's single-direction calls."""
    D = 2 if bidirectional else 1
    inp, hs, cs, caches = x, [], [], []
    for li, w in enumerate(layers):
        dirs = w if bidirectional else (w,)
        outs = []
        for d, wd in enumerate(dirs):
            i = li * D + d
            o, h, c, cache = reference.lstm_forward(inp, *wd, h0[i], c0[i], lengths, reverse=d == 1)
            outs.append(o)
            hs.append(h)
            cs.append(c)
            caches.append(cache)
        inp = np.concatenate(outs, axis=2)
        if li < len(layers) - 1 and masks[li] is not None:
            inp = inp * masks[li]
    return inp, np.stack(hs), np.stack(cs), caches


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("L", [1, 2, 3])
def test_stack_matches_reference(rng, bidirectional, L):
    B, T, E, H = 4, 6, 5, 7
    D = 2 if bidirectional else 1
    layers = make_layers(rng, L, E, H, bidirectional)
    x = rng.standard_normal((B, T, E))
    lengths = np.array([6, 3, 0, 1], np.int32)
    h0 = rng.standard_normal((L * D, B, H))
    c0 = rng.standard_normal((L * D, B, H))
    out, h_n, c_n, cache = fusedlstm.lstm_stack_forward(
        x, layers, h0, c0, lengths, bidirectional=bidirectional, dropout=0.3, rng=np.random.default_rng(5)
    )
    masks = cache.masks
    assert all(m is None for m in masks[-1:]) and (L == 1 or all(m is not None for m in masks[:-1]))
    ref_out, ref_h, ref_c, caches = reference_stack(x, layers, h0, c0, lengths, bidirectional, masks)
    assert_close(out, ref_out, np.float64, "outputs")
    assert_close(h_n, ref_h, np.float64, "h_n")
    assert_close(c_n, ref_c, np.float64, "c_n")

    d_out = rng.standard_normal(out.shape)
    d_h = rng.standard_normal(h_n.shape)
    g = fusedlstm.lstm_stack_backward(cache, d_out, d_h, None)
    # The reference's backward, layer by layer from the top.
    d = d_out
    dx = None
    for li in reversed(range(L)):
        dsum = 0
        for k in range(D):
            i = li * D + k
            part = d[..., k * H : (k + 1) * H]
            gr = reference.lstm_backward(caches[i], part, d_h[i], None)
            want = g.layers[li][k] if bidirectional else g.layers[li]
            for name, a in zip(("kernel", "recurrent_kernel", "bias"), want):
                assert_close(a, getattr(gr, name), np.float64, f"layer {li} dir {k} {name}")
            assert_close(g.h0[i], gr.h0, np.float64, f"h0[{i}]")
            dsum = dsum + gr.x
        dx = dsum
        if li > 0 and masks[li - 1] is not None:
            dx = dx * masks[li - 1]
        d = dx
    assert_close(g.x, dx, np.float64, "dx")
    with pytest.raises(ValueError, match="already used"):
        fusedlstm.lstm_stack_backward(cache, d_out)


def test_no_dropout_at_inference_and_bad_input(rng):
    layers = make_layers(rng, 2, 3, 4, True)
    x = rng.standard_normal((2, 5, 3))
    a = fusedlstm.lstm_stack_forward(x, layers, bidirectional=True, dropout=0.5, training=False)
    b = fusedlstm.lstm_stack_forward(x, layers, bidirectional=True, training=False)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[3] is None
    with pytest.raises(TypeError, match="rng"):
        fusedlstm.lstm_stack_forward(x, layers, bidirectional=True, dropout=0.5)
    with pytest.raises(ValueError, match="dropout"):
        fusedlstm.lstm_stack_forward(x, layers, bidirectional=True, dropout=1.0)
    with pytest.raises(TypeError, match=r"layers\[0\]: a bidirectional layer"):
        fusedlstm.lstm_stack_forward(x, layers[0][0:1], bidirectional=True)
    with pytest.raises(ValueError, match=r"h0: expected shape \(4, 2, 4\)"):
        fusedlstm.lstm_stack_forward(x, layers, np.zeros((2, 2, 4)), bidirectional=True)


def test_matches_torch_packed_bidirectional(rng):
    torch = pytest.importorskip("torch", reason="torch is not installed (the cross-check needs it)")
    B, T, E, H, L = 5, 8, 6, 9, 2
    net = torch.nn.LSTM(E, H, num_layers=L, bidirectional=True, batch_first=True, dtype=torch.float64)
    layers = []
    for li in range(L):
        dirs = []
        for suffix in ("", "_reverse"):
            w_ih = getattr(net, f"weight_ih_l{li}{suffix}").detach().numpy()
            w_hh = getattr(net, f"weight_hh_l{li}{suffix}").detach().numpy()
            b = (getattr(net, f"bias_ih_l{li}{suffix}") + getattr(net, f"bias_hh_l{li}{suffix}")).detach().numpy()
            # torch's gates i, f, g, o are ours i, f, c, o: the same order, transposed.
            dirs.append((w_ih.T.copy(), w_hh.T.copy(), b.copy()))
        layers.append(tuple(dirs))
    x = rng.standard_normal((B, T, E))
    lengths = np.array([8, 1, 5, 3, 7], np.int32)  # unsorted, a length-1 row
    h0 = rng.standard_normal((L * 2, B, H))
    c0 = rng.standard_normal((L * 2, B, H))
    out, h_n, c_n, cache = fusedlstm.lstm_stack_forward(x, layers, h0, c0, lengths, bidirectional=True)

    xt = torch.tensor(x, requires_grad=True)
    h0t, c0t = torch.tensor(h0, requires_grad=True), torch.tensor(c0, requires_grad=True)
    packed = torch.nn.utils.rnn.pack_padded_sequence(xt, torch.tensor(lengths), batch_first=True, enforce_sorted=False)
    yp, (ht, ct) = net(packed, (h0t, c0t))
    yt, _ = torch.nn.utils.rnn.pad_packed_sequence(yp, batch_first=True, total_length=T)
    np.testing.assert_allclose(out, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(h_n, ht.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(c_n, ct.detach().numpy(), rtol=1e-10, atol=1e-12)

    d_out = rng.standard_normal(out.shape)
    mask = (np.arange(T)[None, :] < lengths[:, None])[..., None]
    d_out = d_out * mask  # torch's padded outputs are constants: no gradient flows from them
    d_h = rng.standard_normal(h_n.shape)
    g = fusedlstm.lstm_stack_backward(cache, d_out, d_h, None)
    (yt * torch.tensor(d_out)).sum().add_((ht * torch.tensor(d_h)).sum()).backward()
    np.testing.assert_allclose(g.x, xt.grad.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(g.h0, h0t.grad.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(g.c0, c0t.grad.numpy(), rtol=1e-9, atol=1e-11)
    for li in range(L):
        for k, suffix in enumerate(("", "_reverse")):
            dk, dr, db = g.layers[li][k]
            np.testing.assert_allclose(
                dk.T, getattr(net, f"weight_ih_l{li}{suffix}").grad.numpy(), rtol=1e-9, atol=1e-11
            )
            np.testing.assert_allclose(
                dr.T, getattr(net, f"weight_hh_l{li}{suffix}").grad.numpy(), rtol=1e-9, atol=1e-11
            )
            np.testing.assert_allclose(db, getattr(net, f"bias_ih_l{li}{suffix}").grad.numpy(), rtol=1e-9, atol=1e-11)

"""fusedlstm.torch.LSTM under torch.autocast("cpu", dtype=torch.bfloat16): the kernel runs with
bfloat16 products (the results of fusedlstm.lstm_forward(..., precision="bfloat16") on the same
weights, measurably not the float32 ones), forward and backward, padded and packed, stacked and
bidirectional, eager, prepared (eval) and compiled; the dtypes returned are torch.nn.LSTM's under
autocast; float32 parameters train; outside autocast, for float64 and under float16 autocast the
float32 path runs; on a CPU without AVX512_BF16 it computes in float32 with one warning."""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch (the torch extra)")

from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence  # noqa: E402

import fusedlstm  # noqa: E402
from fusedlstm import _core, lstm_backward, lstm_bidirectional_forward, lstm_forward  # noqa: E402
from fusedlstm.torch import LSTM, module, ops  # noqa: E402

E, H, B, T = 24, 32, 6, 9
LENS = [9, 1, 5, 9, 3, 7]  # unsorted, one of length 1
NO_BF16 = "this CPU lacks AVX512_BF16, which bfloat16 compute needs"
needs_bf16 = pytest.mark.skipif(fusedlstm.bf16_engine() is None, reason=NO_BF16)
BF16 = torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.fixture
def no_bf16(monkeypatch):
    """The machine as one without AVX512_BF16, the one-time warning not yet given."""
    monkeypatch.setattr(ops, "_warned_no_bf16", False)
    _core.set_bf16_engine("none")
    yield
    _core.set_bf16_engine("auto")


def model(num_layers=1, bidirectional=False, batch_first=True, seed=0):
    torch.manual_seed(seed)
    return LSTM(E, H, num_layers, batch_first=batch_first, bidirectional=bidirectional)


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, E, generator=g)


def kernel_weights(m, layer, reverse=False):
    """One direction's weights in the kernel's layout, as NumPy."""
    s = f"_l{layer}" + ("_reverse" if reverse else "")
    p = {n: getattr(m, n + s).detach() for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    return (
        p["weight_ih"].t().contiguous().numpy(),
        p["weight_hh"].t().contiguous().numpy(),
        (p["bias_ih"] + p["bias_hh"]).numpy(),
    )


def kernel_stack(m, x, lens, precision):
    """The layer's result from fusedlstm.lstm_forward per direction and layer ([B, T, E] x, float32
    between layers, as the layer keeps it): outputs [B, T, D*H], h_n and c_n [L*D, B, H]."""
    D = 2 if m.bidirectional else 1
    layer_in, hs, cs = x.numpy(), [], []
    lens = None if lens is None else np.asarray(lens, np.int32)
    for layer in range(m.num_layers):
        outs = []
        for d in range(D):
            o, h, c, _ = lstm_forward(
                layer_in,
                *kernel_weights(m, layer, d == 1),
                lengths=lens,
                training=False,
                reverse=d == 1,
                precision=precision,
            )
            outs.append(o)
            hs.append(h)
            cs.append(c)
        layer_in = np.concatenate(outs, axis=2)
    return [torch.from_numpy(a) for a in (layer_in, np.stack(hs), np.stack(cs))]


def rounded_from(got, ref):
    """Whether each of got is ref rounded to bfloat16 (relative error within one bfloat16 step)."""
    got, ref = got.detach().float(), ref.detach().float()
    return bool(((got - ref).abs() <= 2**-7 * ref.abs() + 1e-6).all())


def assert_close(got, want, tol=1e-5):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape
    scale = max(float(want.abs().max()), 1e-3)
    err = float((got - want).abs().max())
    assert err <= tol * scale, f"max error {err:.3g} (scale {scale:.3g})"


def max_diff(a, b):
    return float((a.detach().double() - b.detach().double()).abs().max())


def unpack(out: PackedSequence):
    return torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True)[0]


def as_packed(x):
    return pack_padded_sequence(x, torch.tensor(LENS), batch_first=True, enforce_sorted=False)


@needs_bf16
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("grad", [True, False], ids=["train", "eval-no_grad"])
def test_padded_forward_is_the_bf16_kernel_rounded(num_layers, bidirectional, grad):
    """Padded input: bfloat16 output, h_n, c_n (nn.LSTM's dtypes under autocast), each the bf16
    kernel's float32 result rounded, and not the float32 kernel's. eval + no_grad runs the prepared
    path (weights packed for bfloat16)."""
    m = model(num_layers, bidirectional)
    x = inputs()
    want = kernel_stack(m, x, None, "bfloat16")
    f32 = kernel_stack(m, x, None, "float32")
    assert max_diff(want[0], f32[0]) > 1e-4  # the problem tells the two precisions apart
    if not grad:
        m.eval()
    with torch.set_grad_enabled(grad), BF16:
        out, (h, c) = m(x)
    if not grad:
        D = 2 if bidirectional else 1
        assert sorted(m._prepared) == [(i, "bfloat16") for i in range(num_layers * D)]
    for got, ref, ref32 in zip((out, h, c), want, f32):
        assert got.dtype == torch.bfloat16
        assert rounded_from(got, ref)
        assert not rounded_from(got, ref32)
    assert all(p.dtype == torch.float32 for p in m.parameters())


@needs_bf16
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_packed_forward_equals_the_bf16_kernel(bidirectional):
    """A PackedSequence under autocast: float32 output data, h_n, c_n (as nn.LSTM returns them
    for a packed input there), equal to the bf16 kernel's and measurably off the float32 one's."""
    m = model(2, bidirectional)
    x = inputs()
    want = kernel_stack(m, x, LENS, "bfloat16")
    f32 = kernel_stack(m, x, LENS, "float32")
    with BF16:
        out, (h, c) = m(as_packed(x))
    assert isinstance(out, PackedSequence)
    assert out.data.dtype == h.dtype == c.dtype == torch.float32
    for got, ref, ref32 in zip((unpack(out), h, c), want, f32):
        assert_close(got, ref)
        assert max_diff(got, ref32) > 1e-4


@needs_bf16
def test_returned_dtypes_are_nn_lstms_under_autocast():
    """Every input form under autocast: the dtypes nn.LSTM returns with the same weights, and values
    near its own bfloat16 results (oneDNN's; not the same rounding, so loosely)."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(E, H, 2, batch_first=True, bidirectional=True)
    ours = LSTM(E, H, 2, batch_first=True, bidirectional=True)
    ours.load_state_dict(ref.state_dict())
    x = inputs()
    hx32 = tuple(torch.randn(4, B, H) * 0.5 for _ in range(2))
    cases = {
        "padded": ((x,), (x,)),
        "bf16 input": ((x.bfloat16(),), (x.bfloat16(),)),
        "hx": ((x, hx32), (x, hx32)),
        "bf16 hx": ((x, tuple(t.bfloat16() for t in hx32)), (x, tuple(t.bfloat16() for t in hx32))),
        "unbatched": ((x[0],), (x[0],)),
        "packed": ((as_packed(x),), (as_packed(x),)),
    }
    with BF16:
        for name, (args_ref, args_ours) in cases.items():
            want, got = ref(*args_ref), ours(*args_ours)
            w = [want[0].data if name == "packed" else want[0], *want[1]]
            g = [got[0].data if name == "packed" else got[0], *got[1]]
            assert [t.dtype for t in g] == [t.dtype for t in w], name
            assert [t.shape for t in g] == [t.shape for t in w], name
            for a, b in zip(g, w):
                assert max_diff(a, b) < 0.05, name


@needs_bf16
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_backward_equals_the_bf16_kernel_backward(bidirectional):
    """Gradients of the input, the initial state and every float32 parameter are those of the
    kernel's backward of a bfloat16 forward (bfloat16 products), not of a float32 one."""
    m = model(1, bidirectional)
    D = 2 if bidirectional else 1
    g = torch.Generator().manual_seed(2)
    x = inputs().requires_grad_(True)
    h0, c0 = (torch.randn(D, B, H, generator=g).requires_grad_(True) for _ in range(2))
    # Upstream weights exact in bfloat16: the casts back from bfloat16 keep them unchanged.
    w_out, w_h, w_c = (torch.randn(*s, generator=g).bfloat16().float() for s in ((B, T, D * H), (D, B, H), (D, B, H)))
    with BF16:
        out, (h, c) = m(x, (h0, c0), lengths=torch.tensor(LENS))
        loss = (out.float() * w_out).sum() + (h.float() * w_h).sum() + (c.float() * w_c).sum()
    loss.backward()
    got = [x.grad, h0.grad, c0.grad] + [p.grad for p in m.parameters()]
    assert all(t.dtype == torch.float32 for t in got)

    def kernel_grads(precision):
        a = [t.detach().numpy() for t in (x, h0, c0, w_out, w_h, w_c)]
        lens = np.asarray(LENS, np.int32)
        if bidirectional:
            _, _, _, cache = lstm_bidirectional_forward(
                a[0], kernel_weights(m, 0), kernel_weights(m, 0, True), a[1], a[2], lens, precision=precision
            )
            gr = lstm_backward(cache, d_outputs=a[3], d_h_n=a[4], d_c_n=a[5])
            per_dir = [gr.forward, gr.reverse]
            dh0 = np.stack([d.h0 for d in per_dir])
            dc0 = np.stack([d.c0 for d in per_dir])
        else:
            _, _, _, cache = lstm_forward(a[0], *kernel_weights(m, 0), a[1][0], a[2][0], lens, precision=precision)
            assert cache.precision == precision
            gr = lstm_backward(cache, d_outputs=a[3], d_h_n=a[4][0], d_c_n=a[5][0])
            per_dir = [gr]
            dh0, dc0 = gr.h0[None], gr.c0[None]
        grads = [gr.x, dh0, dc0]
        for d in per_dir:  # nn.LSTM's parameters: weight_ih, weight_hh, bias_ih, bias_hh (each gets d_bias)
            grads += [d.kernel.T, d.recurrent_kernel.T, d.bias, d.bias]
        return [torch.from_numpy(np.ascontiguousarray(v)) for v in grads]

    want, f32 = kernel_grads("bfloat16"), kernel_grads("float32")
    for a, b in zip(got, want):
        assert_close(a, b)
    assert max(max_diff(a, b) for a, b in zip(got, f32)) > 1e-4


@needs_bf16
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_a_retained_graph_recomputes_in_bf16(bidirectional):
    """The second backward through a retained graph runs the forward again (its cache is used up):
    in bfloat16 too, so both backwards give the same gradients."""
    m = model(2, bidirectional)
    x = inputs().requires_grad_(True)
    with BF16:
        out, _ = m(as_packed(x))
    out.data.sum().backward(retain_graph=True)
    first = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    x.grad = None
    m.zero_grad()
    out.data.sum().backward()
    for a, b in zip(first, [x.grad] + [p.grad for p in m.parameters()]):
        assert torch.equal(a, b)


@needs_bf16
def test_training_under_autocast_lowers_the_loss():
    """A few Adam steps under autocast on a packed batch: the loss falls, the parameters stay float32."""
    torch.manual_seed(0)
    lstm = LSTM(E, H, 2, batch_first=True, bidirectional=True)
    head = torch.nn.Linear(2 * H, 1)
    params = list(lstm.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    x = inputs()
    target = torch.randn(B, 1, generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(15):
        opt.zero_grad()
        with BF16:
            _, (h, _) = lstm(as_packed(x))
            pred = head(torch.cat([h[-2], h[-1]], dim=1))
            loss = torch.nn.functional.mse_loss(pred.float(), target)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params)


def test_outside_autocast_nothing_changes(monkeypatch):
    """No autocast, autocast disabled inside autocast, and a float64 layer under autocast (autocast
    leaves float64 alone): the float32 (float64) path, results as without autocast."""
    seen = []
    real = ops.kernel_precision
    monkeypatch.setattr(ops, "kernel_precision", lambda p: seen.append(p) or real(p))
    m = model(2, True)
    x = inputs()
    out, (h, _) = m(x)
    assert out.dtype == torch.float32 and set(seen) == {"float32"}
    with BF16, torch.autocast("cpu", enabled=False):
        again, _ = m(x)
    assert torch.equal(again, out)
    m64 = model(2, True).double()
    want = m64(x.double())[0]
    seen.clear()
    with BF16:
        got = m64(x.double())[0]
    assert got.dtype == torch.float64 and torch.equal(got, want) and set(seen) == {"float32"}
    with pytest.raises(TypeError, match="got torch.bfloat16"):
        m(x.bfloat16())  # outside autocast low-precision input is refused, as before


def test_no_avx512_bf16_falls_back_to_float32_with_one_warning(no_bf16):
    """Without AVX512_BF16 autocast computes in float32: one warning naming the instruction set,
    the dtypes returned unchanged, the values and gradients of float32 compute."""
    m = model(2, True)
    x = inputs().requires_grad_(True)
    want = kernel_stack(m, x.detach(), None, "float32")
    with pytest.warns(RuntimeWarning, match="AVX512_BF16") as record, BF16:
        out, (h, c) = m(x)
    assert len([w for w in record if "AVX512_BF16" in str(w.message)]) == 1
    for got, ref in zip((out, h, c), want):
        assert got.dtype == torch.bfloat16
        assert rounded_from(got, ref)
    out.float().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    x.grad = None
    m.zero_grad()
    plain, _ = m(x)
    plain.bfloat16().float().sum().backward()  # the same upstream gradient, float32 compute
    for a, b in zip(grads, [x.grad] + [p.grad for p in m.parameters()]):
        assert_close(a, b)
    m.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once already: the prepared path stays quiet
        with torch.no_grad(), BF16:
            got = m(x)[0]
    assert rounded_from(got, want[0]) and sorted({p for _, p in m._prepared}) == ["float32"]


def test_float16_autocast_computes_in_float32(monkeypatch):
    """The kernel has no float16 compute: under autocast to float16 the layer computes in float32
    and returns float32 (one warning), taking float16 input."""
    monkeypatch.setattr(module, "_warned_autocast", set())
    m = model(1, True)
    x = inputs()
    want, (wh, _) = m(x)
    with pytest.warns(UserWarning, match="no torch.float16 compute"), torch.autocast("cpu", dtype=torch.float16):
        got, (h, _) = m(x)
    assert got.dtype == h.dtype == torch.float32
    assert torch.equal(got, want) and torch.equal(h, wh)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=torch.float16):
            half = m(x.half())[0]
    assert torch.equal(half, m(x.half().float())[0])


@needs_bf16
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_opcheck_with_bf16_precision(bidirectional):
    """torch.library.opcheck of the ops with precision="bfloat16": schema, fake, autograd, AOT.
    keep=False: a kept cache's handle is a fresh key per call, which opcheck's comparison of eager
    and traced outputs would flag; the compile test covers kept caches."""
    x = inputs()
    g = torch.Generator().manual_seed(4)
    k, r, b = (torch.randn(*s, generator=g) * 0.2 for s in ((E, 4 * H), (H, 4 * H), (4 * H,)))
    k.requires_grad_(True)
    r.requires_grad_(True)
    lens = torch.tensor(LENS, dtype=torch.int32)
    if bidirectional:
        op, args = torch.ops.fusedlstm.lstm_bidirectional.default, (x, k, r, b, k, r, b, None, None, lens, False)
    else:
        op, args = torch.ops.fusedlstm.lstm.default, (x, k, r, b, None, None, lens, True, True, False)
    torch.library.opcheck(op, args + ("bfloat16",))


@needs_bf16
@pytest.mark.slow
def test_torch_compile_fullgraph_under_autocast_matches_eager(monkeypatch):
    """torch.compile(fullgraph=True) under autocast: the bf16 kernel (cache kept for the backward),
    results and gradients as eager; outside autocast the compiled model runs float32 again."""
    torch.manual_seed(0)
    lstm = LSTM(E, H, 2, batch_first=True, bidirectional=True)
    head = torch.nn.Linear(2 * H, 1)
    net = torch.nn.ModuleDict({"lstm": lstm, "head": head})

    def f(x, lens):
        out, (h, _) = lstm(x, lengths=lens)
        return head(out).sum(dim=1) + h.float().sum()

    x, lens = inputs(), torch.tensor(LENS)
    with BF16:
        want = f(x, lens)
    want.float().sum().backward()
    want_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    calls = []
    real = ops._bi_forward
    monkeypatch.setattr(ops, "_bi_forward", lambda *a: calls.append(a[-2:]) or real(*a))
    compiled = torch.compile(f, fullgraph=True)
    with BF16:
        got = compiled(x, lens)
    got.float().sum().backward()
    assert calls == [("bfloat16", True)] * 2  # both layers in bf16, the caches consumed by the backward
    assert got.dtype == want.dtype == torch.bfloat16
    assert_close(got, want, 2**-7)  # the head's bfloat16 sums may round differently once compiled
    for a, b in zip([p.grad for p in net.parameters()], want_grads):
        assert_close(a, b)
    calls.clear()
    assert compiled(x, lens).dtype == torch.float32 and calls == [("float32", True)] * 2


@needs_bf16
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_eager_path_equals_the_custom_ops_under_autocast(bidirectional, monkeypatch):
    """Under autocast the eager autograd.Function and the custom ops (what torch.compile sees) run
    the same bfloat16 kernel calls: outputs and gradients equal bit for bit."""
    m = model(2, bidirectional)
    x = inputs()

    def results():
        xg = x.clone().requires_grad_(True)
        m.zero_grad()
        with BF16:
            out, (h, c) = m(xg, lengths=torch.tensor(LENS))
        (out.float().sin().sum() + h.float().sum()).backward()
        return [out, h, c, xg.grad] + [p.grad for p in m.parameters()]

    eager_results = results()
    monkeypatch.setattr("fusedlstm.torch.eager.active", lambda: False)
    op_results = results()
    for a, b in zip(eager_results, op_results):
        assert a.dtype == b.dtype and torch.equal(a, b)

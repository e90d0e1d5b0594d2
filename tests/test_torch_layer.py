"""fusedlstm.torch.LSTM against torch.nn.LSTM with the same weights: outputs, final states and the
gradients of the input, the initial state and every parameter, for padded and packed (unsorted,
lengths down to 1) input, 1-3 layers, both directions, batch_first both ways, float32 and
float64; gradcheck; state dicts both ways; dropout; the prepared inference path; errors;
torch.compile(fullgraph=True) and torch.export."""

import pickle

import pytest

torch = pytest.importorskip("torch", reason="needs torch (the torch extra)")

from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence  # noqa: E402

from fusedlstm.torch import LSTM, ops  # noqa: E402

E, H, B, T = 5, 7, 5, 6
LENS = [6, 1, 4, 6, 2]  # unsorted, one of length 1
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def pair(num_layers=1, bidirectional=False, batch_first=False, dtype=torch.float64, bias=True, seed=0):
    torch.manual_seed(seed)
    ref = torch.nn.LSTM(E, H, num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional)
    ref = ref.to(dtype)
    ours = LSTM(E, H, num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def run(model, x, mode, hx, batch_first):
    """Outputs and gradients of a loss that weighs every result differently."""
    x = x.clone().requires_grad_(True)
    hx = None if hx is None else tuple(t.clone().requires_grad_(True) for t in hx)
    lens = torch.tensor(LENS)
    if mode == "packed":
        out, (h, c) = model(pack_padded_sequence(x, lens, batch_first=batch_first, enforce_sorted=False), hx)
        assert isinstance(out, PackedSequence)
        parts = [out.data, out.batch_sizes.double(), out.sorted_indices.double(), out.unsorted_indices.double()]
    elif mode == "lengths":
        out, (h, c) = model(x, hx, lengths=lens)
        parts = [out]
    else:
        out, (h, c) = model(x, hx)
        parts = [out]
    y = parts[0]
    loss = torch.sin(y).sum() + (y * y).sum() * 0.1 + (h * 1.5).sum() + torch.cos(c).sum()
    loss.backward()
    grads = [x.grad] + ([] if hx is None else [t.grad for t in hx]) + [p.grad for p in model.parameters()]
    return parts + [h, c] + grads


def assert_match(want, got, tol):
    assert len(want) == len(got)
    for i, (w, g) in enumerate(zip(want, got)):
        w, g = w.detach(), g.detach()
        assert w.shape == g.shape, (i, w.shape, g.shape)
        scale = max(float(w.abs().max()), 1e-3)
        err = float((w.double() - g.double()).abs().max())
        assert err <= tol * scale, f"result {i}: max error {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["TBE", "BTE"])
@pytest.mark.parametrize("state", [False, True], ids=["zero-state", "hx"])
@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_matches_nn_lstm(dtype, num_layers, bidirectional, batch_first, state, mode):
    ref, ours = pair(num_layers, bidirectional, batch_first, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((B, T, E) if batch_first else (T, B, E), generator=g, dtype=dtype)
    D = 2 if bidirectional else 1
    hx = tuple(torch.randn(num_layers * D, B, H, generator=g, dtype=dtype) for _ in range(2)) if state else None
    assert_match(run(ref, x, mode, hx, batch_first), run(ours, x, mode, hx, batch_first), TOL[dtype])


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_lengths_equal_a_packed_sequence(bidirectional):
    """The lengths= extension on a padded tensor gives what nn.LSTM gives on the packed sequence
    (outputs zero past each row's length, h_n/c_n at its last step)."""
    ref, ours = pair(2, bidirectional, True)
    x = torch.randn(B, T, E, dtype=torch.float64)
    want = run(ref, x, "packed", None, True)
    got = run(ours, x, "lengths", None, True)
    padded = torch.nn.utils.rnn.pad_packed_sequence(
        PackedSequence(want[0], want[1].long(), want[2].long(), want[3].long()), batch_first=True
    )[0]
    assert_match([padded] + want[4:], got, 1e-10)


def test_bias_free_unbatched_and_length_zero():
    ref, ours = pair(2, True, bias=False)
    assert not any("bias" in n for n, _ in ours.named_parameters())
    x = torch.randn(T, E, dtype=torch.float64)
    hx = tuple(torch.randn(4, H, dtype=torch.float64) for _ in range(2))
    for h in (None, hx):
        want, got = ref(x, h), ours(x, h)
        assert_match([want[0], *want[1]], [got[0], *got[1]], 1e-10)
    # lengths 0 (an extension nn.LSTM has no form of): zero outputs, the initial state carried
    one = LSTM(E, H, batch_first=True, dtype=torch.float64)
    h0 = torch.randn(1, 2, H, dtype=torch.float64)
    with torch.no_grad():
        out, (h, c) = one(torch.randn(2, T, E, dtype=torch.float64), (h0, h0 * 2), lengths=[0, 3])
    assert float(out[0].abs().max()) == 0 and float(out[1, 3:].abs().max()) == 0
    assert torch.equal(h[0, 0], h0[0, 0]) and torch.equal(c[0, 0], 2 * h0[0, 0])


def test_gradcheck_float64():
    torch.manual_seed(3)
    m = LSTM(3, 2, num_layers=2, bidirectional=True, batch_first=True, dtype=torch.float64)
    x = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    lens = torch.tensor([4, 1, 3])
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in m.parameters()]

    def f(x, h0, c0, *ps):
        out, (h, c) = torch.func.functional_call(m, dict(zip(names, ps)), (x, (h0, c0)), {"lengths": lens})
        return out, h, c

    assert torch.autograd.gradcheck(f, (x, h0, c0, *params))


def test_state_dict_both_ways_and_constructor():
    ref = torch.nn.LSTM(E, H, 3, batch_first=True, bidirectional=True)
    ours = LSTM(E, H, 3, batch_first=True, bidirectional=True)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert ours.proj_size == 0 and repr(ours).endswith(repr(ref)[len("LSTM") :])
    bound = 1 / H**0.5
    assert all(float(p.abs().max()) <= bound for p in ours.parameters())
    assert all(float(p.std()) > bound / 4 for p in ours.parameters())  # uniform, not constant
    ours.load_state_dict(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters()))
    other = LSTM(E, H, 3, batch_first=True, bidirectional=True)
    ref.load_state_dict(other.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), ref.parameters()))
    x = torch.randn(B, T, E)
    assert_match(list(ref(x)[1]), list(other(x)[1]), 1e-5)
    assert pickle.loads(pickle.dumps(other)).state_dict().keys() == other.state_dict().keys()


def test_dropout_between_layers_only_in_training():
    torch.manual_seed(0)
    m = LSTM(E, H, num_layers=2, dropout=0.5, batch_first=True, dtype=torch.float64)
    x = torch.randn(B, T, E, dtype=torch.float64)
    # the same as layer 0, torch's dropout (same RNG draw), then layer 1
    l0, l1 = (LSTM(E if i == 0 else H, H, batch_first=True, dtype=torch.float64) for i in range(2))
    with torch.no_grad():
        for i, part in enumerate((l0, l1)):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(part, f"{name}_l0").copy_(getattr(m, f"{name}_l{i}"))
    torch.manual_seed(5)
    out, (h, c) = m(x)
    torch.manual_seed(5)
    y0, (h0, _) = l0(x)
    want, (h1, _) = l1(torch.nn.functional.dropout(y0, 0.5, training=True))
    assert_match([want, h0[0], h1[0]], [out, h[0], h[1]], 1e-12)
    m.eval()
    plain = m(x)[0]
    assert float((plain - out).abs().max()) > 1e-3  # dropout was on in training
    assert torch.equal(plain, m(x)[0])  # and is off in eval
    with pytest.warns(UserWarning, match="num_layers greater than 1"):
        LSTM(E, H, dropout=0.2)


def test_eval_inference_uses_prepared_weights_and_notices_changes(monkeypatch):
    m = LSTM(E, H, num_layers=2, bidirectional=True, batch_first=True, dtype=torch.float64)
    x = torch.randn(B, T, E, dtype=torch.float64)
    lens = torch.tensor(LENS)
    want = m(x, lengths=lens)  # the training path
    m.eval()
    with torch.no_grad():
        got = m(x, lengths=lens)
        assert len(m._prepared) == 4
        assert_match([want[0], *want[1]], [got[0], *got[1]], 1e-12)
        packs = []
        real = ops.PreparedLSTM
        monkeypatch.setattr("fusedlstm.torch.module.PreparedLSTM", lambda *a: packs.append(1) or real(*a))
        m(x, lengths=lens)
        assert packs == []  # nothing changed: nothing packed again
        m.weight_hh_l1.mul_(0.5)  # in place: one (layer, direction) is packed again
        changed = m(x, lengths=lens)
        assert packs == [1]
    m.train()
    assert_match([m(x, lengths=lens)[0]], [changed[0]], 1e-12)
    m.eval()
    m.load_state_dict(LSTM(E, H, 2, bidirectional=True, batch_first=True, dtype=torch.float64).state_dict())
    with torch.no_grad():
        fresh = m(x, lengths=lens)[0]
    m.train()
    assert_match([m(x, lengths=lens)[0]], [fresh], 1e-12)


def test_backward_consumes_the_kept_cache_and_a_retained_graph_recomputes(monkeypatch):
    calls = []
    for name in ("_forward", "_bi_forward"):  # one direction, and a bidirectional layer's one call
        real = getattr(ops, name)
        monkeypatch.setattr(
            ops,
            name,
            lambda *a, _real=real, _name=name, **kw: (
                calls.append((_name, a[-1] if not kw else kw["training"])) or _real(*a, **kw)
            ),
        )
    for bidirectional, op in ((True, "_bi_forward"), (False, "_forward")):
        calls.clear()
        m = LSTM(E, H, bidirectional=bidirectional, batch_first=True, dtype=torch.float64)
        x = torch.randn(B, T, E, dtype=torch.float64, requires_grad=True)
        out, _ = m(x, lengths=torch.tensor(LENS))
        # eager: the kernel's cache is kept on the layer's autograd node (no handle filed)
        assert calls == [(op, True)] and out.grad_fn.cache is not None and len(ops._filed) == 0
        out.sum().backward(retain_graph=True)
        assert calls == [(op, True)] and out.grad_fn.cache is None  # consumed; no forward ran again
        first = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
        x.grad = None
        m.zero_grad()
        out.sum().backward()  # the cache is used up: the backward runs the forward again
        assert calls == [(op, True), (op, True)]
        assert_match(first, [x.grad] + [p.grad for p in m.parameters()], 0)
        with torch.no_grad():
            m(x)
        assert calls[-1] == (op, False)  # no gradient wanted: no cache kept
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            out2, _ = m(x)
            out2.sum().backward()
            out2.sum().backward()  # graph freed: torch's own error, no silent recompute


def test_bad_input_is_refused_clearly():
    m = LSTM(E, H, num_layers=2, batch_first=True)
    x = torch.randn(B, T, E)
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size. Expected 5, got 4"):
        m(torch.randn(B, T, 4))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(2, 5, 7\), got \[1, 5, 7\]"):
        m(x, (torch.zeros(1, B, H), torch.zeros(1, B, H)))
    with pytest.raises(RuntimeError, match="hx and cx should also be 3-D"):
        m(x, (torch.zeros(2, H), torch.zeros(2, H)))
    with pytest.raises(ValueError, match="input must have the type torch.float32, got type torch.float64"):
        m(x.double())
    with pytest.raises(ValueError, match=r"hx\[0\]: dtype torch.float64"):
        m(x, (torch.zeros(2, B, H, dtype=torch.float64), torch.zeros(2, B, H)))
    with pytest.raises(TypeError, match="float32 and torch.float64, got torch.float16"):
        m(x.half())
    with pytest.raises(ValueError, match="Expected input to be 2D or 3D, got 4D"):
        m(x[None])
    with pytest.raises(RuntimeError, match="runs on the CPU; input is on meta"):
        m(x.to("meta"))
    with pytest.raises(ValueError, match=r"lengths\[1\] = 9 is outside \[0, T=6\]"):
        m(x, lengths=[6, 9, 1, 1, 1])
    with pytest.raises(ValueError, match=r"lengths: expected shape \(5,\)"):
        m(x, lengths=[6, 6])
    with pytest.raises(RuntimeError, match="Length of all samples has to be greater than 0"):
        m(pack_padded_sequence(x, torch.tensor([6, 0, 1, 1, 1]), batch_first=True, enforce_sorted=False))
    with pytest.raises(NotImplementedError, match="proj_size=3 is not supported"):
        LSTM(E, H, proj_size=3)
    with pytest.raises(TypeError, match="dtype"):
        LSTM(E, H, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="dropout should be a number"):
        LSTM(E, H, dropout=1.5)


class _Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = LSTM(E, H, num_layers=2, bidirectional=True, batch_first=True)
        self.head = torch.nn.Linear(2 * H, 1)

    def forward(self, x, lengths):
        out, (h, _) = self.lstm(x, lengths=lengths)
        return self.head(out).sum(dim=1) + h.sum()


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager(monkeypatch):
    torch.manual_seed(0)
    model = _Classifier()
    x, lens = torch.randn(B, T, E), torch.tensor(LENS)
    want = model(x, lens)
    want.sum().backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    calls = []
    real = ops._bi_forward  # each bidirectional layer: one two-direction call
    monkeypatch.setattr(ops, "_bi_forward", lambda *a: calls.append(a[-1]) or real(*a))
    compiled = torch.compile(model, fullgraph=True)
    got = compiled(x, lens)
    got.sum().backward()
    assert calls == [True] * 2  # the compiled backward consumed the kept caches too
    assert_match([want] + want_grads, [got] + [p.grad for p in model.parameters()], 1e-5)
    model.eval()
    with torch.no_grad():
        assert_match([model(x, lens)], [compiled(x, lens)], 1e-5)
        exported = torch.export.export(model, (x, lens))
        assert "fusedlstm.lstm" in exported.graph_module.code  # eval under no_grad: per direction
        assert_match([model(x, lens)], [exported.module()(x, lens)], 1e-6)


def _changes():
    """Ways a training loop changes parameters in place, each applied to (model, grads-ready model)."""

    def sgd(m):
        torch.optim.SGD(m.parameters(), lr=0.5).step()

    def fused_adam(m):  # moves no version counter (torch 2.13)
        torch.optim.Adam(m.parameters(), lr=0.1, fused=True).step()

    def through_data(m):  # moves no version counter either
        for p in m.parameters():
            p.data.mul_(0.5)

    def no_grad_edit(m):
        with torch.no_grad():
            m.weight_hh_l0.add_(0.25)

    def load(m):
        m.load_state_dict({k: v * -1 for k, v in m.state_dict().items()})

    def replace(m):
        m.weight_ih_l0 = torch.nn.Parameter(m.weight_ih_l0.detach() * 2)

    return [sgd, fused_adam, through_data, no_grad_edit, load, replace]


@pytest.mark.parametrize("change", _changes(), ids=lambda f: f.__name__)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("path", ["train", "eval-no_grad"])
def test_every_parameter_change_reaches_the_next_forward(change, bidirectional, path):
    """After a training step changes the parameters (by an optimizer, fused Adam and .data edits
    included, which move no version counter, load_state_dict, a no_grad edit, a replaced
    Parameter), the next forward and its gradients are nn.LSTM's with the changed weights, on the
    training path and on the prepared eval path (which packed the old weights before)."""
    ref, ours = pair(1, bidirectional, True)
    x = torch.randn(B, T, E, dtype=torch.float64)
    for m in (ref, ours):
        if path == "eval-no_grad":
            m.eval()
            with torch.no_grad():
                m(x)  # packs the weights as they were
            m.train()
        m(x)[0].sum().backward()
        change(m)
        m.zero_grad()
        if path == "eval-no_grad":
            m.eval()
    before = pair(1, bidirectional, True)[1]
    assert not all(torch.equal(a, b) for a, b in zip(ours.parameters(), before.parameters()))  # it did change
    if path == "eval-no_grad":
        with torch.no_grad():
            want, got = ref(x), ours(x)
        assert_match([want[0], *want[1]], [got[0], *got[1]], 1e-10)
    else:
        assert_match(run(ref, x, "padded", None, True), run(ours, x, "padded", None, True), 1e-10)


def test_eager_path_equals_the_custom_ops():
    """The eager autograd.Function and the custom ops (what torch.compile sees) give the same
    outputs and gradients bit for bit (the same kernel calls), both bias gradients their own
    tensors, and gradients accumulate over two backwards."""
    torch.manual_seed(0)
    m = LSTM(E, H, num_layers=2, bidirectional=True, batch_first=True, dtype=torch.float64)
    x = torch.randn(B, T, E, dtype=torch.float64)
    hx = tuple(torch.randn(4, B, H, dtype=torch.float64) for _ in range(2))
    lens = torch.tensor(LENS)

    def results(eager_path):
        xg = x.clone().requires_grad_(True)
        m.zero_grad()
        with pytest.MonkeyPatch.context() as mp:
            if not eager_path:
                mp.setattr("fusedlstm.torch.eager.active", lambda: False)
            out, (h, c) = m(xg, hx, lengths=lens)
            (out.sin().sum() + h.sum() + c.cos().sum()).backward()
        return [out, h, c, xg.grad] + [p.grad for p in m.parameters()]

    eager_results, op_results = results(True), results(False)
    assert_match(op_results, eager_results, 0)
    assert m.bias_ih_l0.grad.data_ptr() != m.bias_hh_l0.grad.data_ptr()
    assert all(p.grad.is_contiguous() for p in m.parameters())
    m.zero_grad(set_to_none=True)
    m(x, hx, lengths=lens)[0].sum().backward()
    first = [p.grad.clone() for p in m.parameters()]
    m(x, hx, lengths=lens)[0].sum().backward()  # accumulates into the existing .grad
    assert_match([2 * g for g in first], [p.grad for p in m.parameters()], 1e-12)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        xg = x.clone().requires_grad_(True)
        y = m(xg)[0]
        (g,) = torch.autograd.grad((y * y).sum(), xg, create_graph=True)  # no silent wrong 2nd derivative
        g.sum().backward()


def test_inputs_that_require_grad_under_no_grad():
    """Under no_grad an input or hx may still require grad: both the training-mode and the
    prepared eval path read it without a gradient (as nn.LSTM does)."""
    ref, ours = pair(2, True, True)
    x = torch.randn(B, T, E, dtype=torch.float64, requires_grad=True)
    hx = tuple(torch.randn(4, B, H, dtype=torch.float64, requires_grad=True) for _ in range(2))
    for mode in (True, False):
        ref.train(mode)
        ours.train(mode)
        with torch.no_grad():
            want, got = ref(x, hx), ours(x, hx)
        assert not got[0].requires_grad
        assert_match([want[0], *want[1]], [got[0], *got[1]], 1e-10)


def test_parametrized_weights_train_as_nn_lstm():
    """A parametrization (the weight a function of its original) is what the layer reads, and the
    gradient reaches the original, as with nn.LSTM."""
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    ref, ours = pair(1, True, True)
    for m in (ref, ours):
        parametrize.register_parametrization(m, "weight_hh_l0_reverse", Double())
    x = torch.randn(B, T, E, dtype=torch.float64)
    assert_match(run(ref, x, "padded", None, True), run(ours, x, "padded", None, True), 1e-10)

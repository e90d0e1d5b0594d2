"""The bfloat16 compute precision (precision="bfloat16"): the rounding; each engine's GEMM against
an exact oracle; the LSTM forward and backward against the NumPy reference with the same rounding
(its products' operands rounded, the rest exact); bit-identity across thread counts and repeated
calls; prepared weights, streaming, the bidirectional and stacked paths; the dispatch errors."""

import numpy as np
import pytest

import fusedlstm
from fusedlstm import _core, reference
from fusedlstm.reference import round_bf16
from helpers import as64, assert_all_equal, make_problem, results_across_threads

_ENGINES = {"amx": ["amx", "avx512_bf16"], "avx512_bf16": ["avx512_bf16"], "none": []}[_core.bf16_available()]
NO_BF16 = "this CPU lacks AVX512_BF16, which bfloat16 compute needs"


@pytest.fixture(params=_ENGINES or [None])
def engine(request):
    """Each engine this CPU has (AMX machines run both), restored afterwards."""
    if request.param is None:
        pytest.skip(NO_BF16)
    _core.set_bf16_engine(request.param)
    yield request.param
    _core.set_bf16_engine("auto")


@pytest.fixture
def no_bf16():
    """The machine as one without AVX512_BF16."""
    _core.set_bf16_engine("none")
    yield
    _core.set_bf16_engine("auto")


def bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def test_rounding_matches_the_kernel_and_ieee_ties():
    rng = np.random.default_rng(0)
    special = np.array(
        [1.0, 1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.4e38, -3.4e38, np.inf, -np.inf, 1e-39, -1e-39, 0.0, -0.0],
        np.float32,
    )
    x = np.concatenate(
        [special, (rng.standard_normal(20000) * 10.0 ** rng.integers(-30, 30, 20000)).astype(np.float32)]
    )
    ours, kernel = round_bf16(x), _core.round_bf16(x)
    np.testing.assert_array_equal(bits(ours), bits(kernel))
    # Ties to even, overflow to infinity, float32 denormals to signed zero.
    np.testing.assert_array_equal(ours[:4], np.array([1.0, 1.0, 1.015625, -1.0], np.float32))
    assert np.isinf(ours[4]) and np.isinf(ours[5]) and ours[5] < 0
    np.testing.assert_array_equal(bits(ours[8:12]), bits(np.array([0.0, -0.0, 0.0, -0.0], np.float32)))
    nan = round_bf16(np.array([np.nan], np.float32))
    assert np.isnan(nan[0]) and np.isnan(_core.round_bf16(np.array([np.nan], np.float32))[0])
    # Every result is a bfloat16: the low 16 bits are zero.
    assert not np.any(bits(ours[np.isfinite(ours)]) & 0xFFFF)


# (40, 5000, 70) and (300, 2000, 40): AMX sums carried across depth blocks (the second's depth
# shrinks with its rows), edges in rows and columns.
@pytest.mark.parametrize(
    "shape",
    [(1, 5, 7), (3, 33, 17), (16, 128, 512), (37, 300, 100), (100, 70, 33), (40, 5000, 70), (300, 2000, 40)],
)
@pytest.mark.parametrize("a_t", [False, True])
@pytest.mark.parametrize("b_t", [False, True])
def test_gemm_equals_exact_products_of_rounded_operands(engine, shape, a_t, b_t):
    M, K, N = shape
    rng = np.random.default_rng(M * K + N)
    A = rng.standard_normal((M, K)).astype(np.float32)
    B = rng.standard_normal((K, N)).astype(np.float32)
    got = _core.gemm_bf16(np.ascontiguousarray(A.T) if a_t else A, np.ascontiguousarray(B.T) if b_t else B, a_t, b_t)
    ra, rb = round_bf16(A).astype(np.float64), round_bf16(B).astype(np.float64)
    exact = ra @ rb
    # Float32 sums of exact products: at most K roundings of the running magnitude.
    bound = 2 * K * 2.0**-24 * (np.abs(ra) @ np.abs(rb)) + 1e-30
    assert np.all(np.abs(got - exact) <= bound), np.max(np.abs(got - exact) / bound)
    # ... and not the float32 product: the operands really were rounded.
    assert np.median(np.abs(got - A.astype(np.float64) @ B.astype(np.float64))) > 100 * np.median(bound) / K


def run_both(p, up, **kw):
    """The kernel's bfloat16 forward+backward, the reference with the same rounding (float64, so
    exact but for it), and the exact float64 reference: each (outputs, h_n, c_n, grads...)."""
    out = []
    for mod, prob, prec in (
        (fusedlstm, p, "bfloat16"),
        (reference, as64(p), "bfloat16"),
        (reference, as64(p), "float32"),
    ):
        o, h, c, cache = mod.lstm_forward(**prob, precision=prec, **kw)
        u = as64(up) if mod is reference else up
        g = mod.lstm_backward(cache, u["d_outputs"], u["d_h_n"], u["d_c_n"])
        out.append([o, h, c, *g])
    return out


def assert_matches_oracle(ours, oracle, exact):
    """Each result is far closer to the rounding oracle than to the exact result. Not elementwise:
    where float32's and float64's intermediate values round to different bfloat16 neighbours
    (rare, but one such operand reaches a whole row of the gradients it feeds), ours and the
    oracle part by about one bfloat16 step there; bfloat16's rounding error is that at every
    element, many times over, so in norm the oracle is still much the nearer."""
    for i, (a, o, e) in enumerate(zip(ours, oracle, exact)):
        scale = max(1.0, float(np.max(np.abs(o))))
        d_oracle, d_exact = np.abs(a - o) / scale, np.abs(a - e) / scale
        assert d_oracle.max() < 2e-2, f"result {i}: {d_oracle.max():.2e} from the oracle"
        live = e != 0  # (padded outputs and relu's zeros are exact either way)
        if np.count_nonzero(live) >= 16:
            d_oracle, d_exact = d_oracle[live], d_exact[live]
            assert np.mean(d_exact > 1e-5) >= 0.5, f"result {i}: no sign of bfloat16 rounding"
            ratio = np.linalg.norm(d_oracle) / np.linalg.norm(d_exact)
            assert ratio < 0.3, f"result {i}: only {1 / ratio:.1f}x nearer the oracle than the exact result"


CASES = {
    "plain": dict(shape=(3, 5, 7, 9), lengths="none", kw={}),
    "lengths_reverse": dict(shape=(16, 6, 30, 32), lengths="random", kw={"reverse": True}),
    "row_blocks": dict(shape=(40, 7, 33, 24), lengths="random", kw={}),
    "wide": dict(shape=(4, 3, 70, 140), lengths="none", kw={}),
    "activations": dict(
        shape=(5, 4, 6, 20), lengths="random", kw={"activation": "relu", "recurrent_activation": "hard_sigmoid"}
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_forward_backward_match_the_rounding_oracle(engine, rng, case):
    c = CASES[case]
    p, up = make_problem(rng, *c["shape"], dtype=np.float32, lengths=c["lengths"])
    assert_matches_oracle(*run_both(p, up, **c["kw"]))


def test_recurrent_masks_and_holes_match_the_oracle(engine, rng):
    B, T, E, H = 6, 5, 40, 48
    p, up = make_problem(rng, B, T, E, H, dtype=np.float32)
    masks = ((rng.random((4, B, H)) > 0.3) / 0.7).astype(np.float32)
    assert_matches_oracle(*run_both(p, up, recurrent_masks=masks, reverse=True))
    holes = rng.random((B, T)) > 0.3
    holes[:, 0] = True
    assert_matches_oracle(*run_both(p, up, mask=holes))


def test_cache_remembers_its_precision(engine, rng):
    p, up = make_problem(rng, 4, 3, 5, 6, dtype=np.float32)
    _, _, _, cache = fusedlstm.lstm_forward(**p, precision="bfloat16")
    assert cache.precision == "bfloat16"
    _, _, _, cache32 = fusedlstm.lstm_forward(**p)
    assert cache32.precision == "float32"


def test_bit_identical_across_threads_and_calls(engine, rng):
    p, up = make_problem(rng, 37, 9, 30, 70, dtype=np.float32, lengths="random")

    def run():
        o, h, c, cache = fusedlstm.lstm_forward(**p, precision="bfloat16")
        g = fusedlstm.lstm_backward(cache, **up)
        inf = fusedlstm.lstm_forward(**p, training=False, precision="bfloat16")
        return [o, h, c, *g, *inf[:3]]

    runs = results_across_threads(run) + [run()]
    assert_all_equal(runs)


@pytest.mark.parametrize("shape", [(1, 20, 50, 128), (9, 5, 30, 130), (40, 3, 8, 200), (3, 4, 0, 5)])
def test_prepared_equals_plain_and_streams(engine, rng, shape):
    p, _ = make_problem(rng, *shape, dtype=np.float32, lengths="random")
    prep = fusedlstm.prepare(p["kernel"], p["recurrent_kernel"], p["bias"], precision="bfloat16")
    assert prep.precision == "bfloat16" and "bfloat16" in repr(prep)
    got = prep.infer(p["x"], p["h0"], p["c0"], p["lengths"])
    plain = fusedlstm.lstm_forward(**p, training=False, precision="bfloat16")
    for a, b in zip(got, plain[:3]):
        np.testing.assert_array_equal(a, b)
    # Two chunks from the first one's state: the one call's results, bit for bit.
    T = shape[1]
    whole = prep.infer(p["x"], p["h0"], p["c0"])
    first = prep.infer(p["x"][:, : T // 2], p["h0"], p["c0"])
    second = prep.infer(p["x"][:, T // 2 :], first[1], first[2])
    np.testing.assert_array_equal(np.concatenate([first[0], second[0]], axis=1), whole[0])
    np.testing.assert_array_equal(second[1], whole[1])
    # Pickles as its weights and precision.
    import pickle

    again = pickle.loads(pickle.dumps(prep))
    assert again.precision == "bfloat16"
    np.testing.assert_array_equal(again.infer(p["x"])[1], prep.infer(p["x"])[1])


def test_bidirectional_equals_two_calls(engine, rng):
    B, T, E, H = 7, 6, 10, 12
    p, _ = make_problem(rng, B, T, E, H, dtype=np.float32, lengths="random", state=False)
    q, _ = make_problem(rng, B, T, E, H, dtype=np.float32, state=False)
    fw = (p["kernel"], p["recurrent_kernel"], p["bias"])
    rv = (q["kernel"], q["recurrent_kernel"], q["bias"])
    out, h, c, cache = fusedlstm.lstm_bidirectional_forward(p["x"], fw, rv, lengths=p["lengths"], precision="bfloat16")
    a = fusedlstm.lstm_forward(p["x"], *fw, lengths=p["lengths"], precision="bfloat16")
    b = fusedlstm.lstm_forward(p["x"], *rv, lengths=p["lengths"], reverse=True, precision="bfloat16")
    np.testing.assert_array_equal(out, np.concatenate([a[0], b[0]], axis=2))
    np.testing.assert_array_equal(h, np.stack([a[1], b[1]]))
    d = rng.standard_normal(out.shape).astype(np.float32)
    g = fusedlstm.lstm_backward(cache, d)
    ga = fusedlstm.lstm_backward(a[3], np.ascontiguousarray(d[..., :H]))
    gb = fusedlstm.lstm_backward(b[3], np.ascontiguousarray(d[..., H:]))
    np.testing.assert_array_equal(g.forward.recurrent_kernel, ga.recurrent_kernel)
    np.testing.assert_array_equal(g.reverse.kernel, gb.kernel)
    np.testing.assert_allclose(g.x, ga.x + gb.x, rtol=1e-6, atol=1e-6)


def test_stack_runs_every_layer_in_bfloat16(engine, rng):
    B, T, E, H = 5, 4, 6, 8
    layers = []
    for e in (E, 2 * H):
        pair = []
        for _ in range(2):
            p, _ = make_problem(rng, B, T, e, H, dtype=np.float32, state=False)
            pair.append((p["kernel"], p["recurrent_kernel"], p["bias"]))
        layers.append(pair)
    x = rng.standard_normal((B, T, E)).astype(np.float32)
    out, h, c, cache = fusedlstm.lstm_stack_forward(x, layers, bidirectional=True, precision="bfloat16")
    assert all(d.precision == "bfloat16" for lc in cache.caches for d in (lc.forward, lc.reverse))
    ref32 = fusedlstm.lstm_stack_forward(x, layers, bidirectional=True, training=False)[0]
    assert 0 < np.abs(out - ref32).max() < 3e-2
    g = fusedlstm.lstm_stack_backward(cache, np.ones_like(out))
    assert g.x.shape == x.shape and np.all(np.isfinite(g.x))


def test_accuracy_at_keras_initialisation(engine):
    """h_n after 100 steps (glorot-uniform kernel, orthogonal recurrent kernel, unit forget
    bias) stays within bfloat16's reach of the float64 result: the bound the benchmark's
    comparison with torch's autocast measures against."""
    rng = np.random.default_rng(0)
    B, T, E, H = 32, 100, 64, 128
    lim = np.sqrt(6 / (E + 4 * H))
    W = rng.uniform(-lim, lim, (E, 4 * H)).astype(np.float32)
    q, _ = np.linalg.qr(rng.standard_normal((4 * H, H)))
    R = q.T.astype(np.float32)
    b = np.zeros(4 * H, np.float32)
    b[H : 2 * H] = 1
    x = rng.standard_normal((B, T, E)).astype(np.float32)
    h = fusedlstm.lstm_forward(x, W, R, b, training=False, precision="bfloat16")[1]
    h64 = reference.lstm_forward(*(a.astype(np.float64) for a in (x, W, R, b)), training=False)[1]
    err = np.abs(h - h64).max()
    assert 1e-4 < err < 2e-2, err


def test_errors_name_the_problem(rng, no_bf16):
    p, _ = make_problem(rng, 2, 3, 4, 5, dtype=np.float32)
    with pytest.raises(RuntimeError, match="AVX512_BF16"):
        fusedlstm.lstm_forward(**p, precision="bfloat16")
    with pytest.raises(RuntimeError, match="AVX512_BF16"):
        fusedlstm.prepare(p["kernel"], p["recurrent_kernel"], precision="bfloat16")
    assert fusedlstm.bf16_engine() is None


def test_bad_precision_and_dtype(rng):
    p, _ = make_problem(rng, 2, 3, 4, 5, dtype=np.float64)
    with pytest.raises(ValueError, match="precision"):
        fusedlstm.lstm_forward(**p, precision="float16")
    if _ENGINES:
        with pytest.raises(TypeError, match="float32"):
            fusedlstm.lstm_forward(**p, precision="bfloat16")
    with pytest.raises(ValueError, match="precision"):
        fusedlstm.prepare(p["kernel"], p["recurrent_kernel"], precision=16)


# -- the classifier ------------------------------------------------------------------------------


def test_classifier_trains_saves_and_predicts_in_bfloat16(engine, tmp_path):
    from fusedlstm import SentimentClassifier
    from fusedlstm.sentiment.training import TrainOptions
    from helpers import tiny_split

    split = tiny_split(80)
    kw = dict(units=8, embedding_dim=6, seed=1, log=lambda *a: None, layers=2, bidirectional=True)
    model = SentimentClassifier.create(split, precision="bfloat16", **kw)
    twin = SentimentClassifier.create(split, **kw)  # the same weights, float32
    assert model.config.precision == "bfloat16" and twin.config.precision == "float32"
    p16, p32 = model.predict_proba(split.texts), twin.predict_proba(split.texts)
    assert 0 < np.abs(p16 - p32).max() < 2e-2  # bfloat16 products, not float32's
    assert all(d.precision == "bfloat16" for layer in model.prepared_lstm() for d in layer)
    rows = model.fit(split, split, TrainOptions(epochs=8, batch_size=16, lr=0.02), log=lambda *a: None)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    model.save(tmp_path / "m")
    again = SentimentClassifier.load(tmp_path / "m")
    assert again.config.precision == "bfloat16"
    np.testing.assert_array_equal(again.predict_proba(split.texts), model.predict_proba(split.texts))


def test_classifier_without_bf16_predicts_in_float32_and_refuses_to_train(tmp_path):
    from fusedlstm import SentimentClassifier
    from fusedlstm.sentiment.training import TrainOptions
    from helpers import tiny_split

    if not _ENGINES:
        pytest.skip(NO_BF16)
    split = tiny_split(20)
    model = SentimentClassifier.create(split, units=4, embedding_dim=4, log=lambda *a: None, precision="bfloat16")
    model.save(tmp_path / "m")
    _core.set_bf16_engine("none")
    try:
        loaded = SentimentClassifier.load(tmp_path / "m")
        with pytest.warns(RuntimeWarning, match="AVX512_BF16"):
            probs = loaded.predict_proba(split.texts)
        assert probs.shape == (20, 2) and np.all(np.isfinite(probs))
        with pytest.raises(RuntimeError, match="AVX512_BF16"):
            loaded.fit(split, None, TrainOptions(epochs=1), log=lambda *a: None)
        with pytest.raises(RuntimeError, match="AVX512_BF16"):
            SentimentClassifier.create(split, units=4, embedding_dim=4, log=lambda *a: None, precision="bfloat16")
    finally:
        _core.set_bf16_engine("auto")


@pytest.mark.skipif(not _ENGINES, reason=NO_BF16)
def test_cli_train_precision_flag(tmp_path):
    import json
    import subprocess
    import sys

    from helpers import write_synthetic_glue

    data = write_synthetic_glue(tmp_path / "glue")
    out = tmp_path / "model"
    fast = ("--units", "8", "--embedding-dim", "8", "--batch-size", "16", "--epochs", "2", "--quiet")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "fusedlstm", *args], capture_output=True, text=True, timeout=600)

    r = run("train", "--data", str(data), "--out", str(out), "--precision", "bfloat16", *fast)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["precision"] == "bfloat16"
    r = run("train", "--data", str(data), "--out", str(out), "--resume", "--precision", "float32", *fast)
    assert r.returncode != 0 and "keeps its precision" in r.stderr
    r = run("eval", str(out), "--data", str(data), "--json")
    assert r.returncode == 0 and 0 <= json.loads(r.stdout)["accuracy"] <= 1


def test_a_bfloat16_model_exports_to_onnx_in_float32(engine, tmp_path):
    """The ONNX graph computes in float32 (ONNX's LSTM): a bfloat16-trained model exports its
    weights, says so in the metadata, and onnxruntime agrees with its predictions at bfloat16's
    precision (exactly with the float32 twin's)."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (the bench extra)")
    pytest.importorskip("onnx", reason="onnx is not installed (the bench extra)")
    import onnx
    import onnxruntime as ort

    from fusedlstm import SentimentClassifier
    from fusedlstm.sentiment.export import export_onnx
    from helpers import tiny_split

    split = tiny_split(30)
    kw = dict(units=6, embedding_dim=5, seed=2, log=lambda *a: None, layers=1, bidirectional=True)
    model = SentimentClassifier.create(split, precision="bfloat16", **kw)
    path = export_onnx(model, tmp_path / "m.onnx")
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["trained_precision"] == "bfloat16" and props["compute_precision"] == "float32"
    ids, lengths = model.encode(split.texts)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"ids": ids.astype(np.int64), "lengths": lengths.astype(np.int32)})[0]
    twin = SentimentClassifier.create(split, **kw)  # the same weights, float32
    np.testing.assert_allclose(got, twin.predict_proba(split.texts), atol=1e-5)
    assert np.abs(got - model.predict_proba(split.texts)).max() < 2e-2


@pytest.mark.parametrize("B", [1, 5, 40])
def test_prepared_bidirectional_call_equals_the_two_directions(rng, engine, B):
    """fusedlstm.infer_bidirectional on weights prepared in bfloat16: the two directions' own
    infer calls bit for bit (one and two threads), and the plain bidirectional inference."""
    T, E, H = 9, 30, 64
    p, _ = make_problem(rng, B, T, E, H, dtype=np.float32, lengths="random", state=False)
    q, _ = make_problem(rng, B, T, E, H, dtype=np.float32, state=False)
    wf, wb = (p["kernel"], p["recurrent_kernel"], p["bias"]), (q["kernel"], q["recurrent_kernel"], q["bias"])
    fwd, bwd = fusedlstm.prepare(*wf, precision="bfloat16"), fusedlstm.prepare(*wb, precision="bfloat16")
    x, lengths = p["x"], p["lengths"]

    def call():
        return fusedlstm.infer_bidirectional(fwd, bwd, x, lengths=lengths)

    for got in results_across_threads(call):
        of, hf, _ = fwd.infer(x, lengths=lengths)
        ob, hb, _ = bwd.infer(x, lengths=lengths, reverse=True)
        np.testing.assert_array_equal(got[0], np.concatenate([of, ob], axis=2))
        np.testing.assert_array_equal(got[1], np.stack([hf, hb]))
    plain = fusedlstm.lstm_bidirectional_forward(x, wf, wb, lengths=lengths, training=False, precision="bfloat16")
    np.testing.assert_array_equal(call()[0], plain[0])


@pytest.mark.parametrize("B", [5, 40])
def test_inference_equals_the_training_forward(engine, rng, B):
    """From 16 rows inference sums each step's two products in one pass (AMX: in the tiles);
    below, it projects every step at once. Either way its results are the training forward's,
    which adds the recurrent product to the stored projection, bit for bit."""
    p, _ = make_problem(rng, B, 6, 30, 70, dtype=np.float32, lengths="random")
    train = fusedlstm.lstm_forward(**p, precision="bfloat16")
    infer = fusedlstm.lstm_forward(**p, training=False, precision="bfloat16")
    prep = fusedlstm.prepare(p["kernel"], p["recurrent_kernel"], p["bias"], precision="bfloat16")
    prepared = prep.infer(p["x"], p["h0"], p["c0"], p["lengths"])
    for a, b, c in zip(train[:3], infer[:3], prepared):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)

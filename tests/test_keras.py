"""fusedlstm.keras.LSTM against keras.layers.LSTM (outputs, states and gradients, with and
without right-/left-padded masks, go_backwards, Bidirectional, return_sequences/return_state,
initial state), tf.test's gradient checker on the raw op in float64 (with step masks with holes,
recurrent dropout masks and other activations too), raw-op input checks, masks with holes on
the op's step mask, tf.function / model.fit, .keras save/load, and every rejected argument
(masks with holes, activations and recurrent_dropout against Keras: test_keras_dropout_masks.py).
Skips without TensorFlow; CI installs tensorflow-cpu (extra [tf])."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import KERAS_SHAPE, assert_keras_results_match, keras_masks, keras_pair

pytestmark = [
    pytest.mark.heavy,
    pytest.mark.skipif(
        importlib.util.find_spec("tensorflow") is None,
        reason="TensorFlow is not installed (CI installs tensorflow-cpu)",
    ),
]

if importlib.util.find_spec("tensorflow") is not None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    import fusedlstm.keras as fk
    from fusedlstm.keras import ops as fk_ops  # the raw ops' wrappers: optional inputs as None

B, T, E, H = KERAS_SHAPE
pair, masks = keras_pair, keras_masks


def as_list(y):
    return list(y) if isinstance(y, (list, tuple)) else [y]


def compare(ref, ours, x, mask=None, initial_state=None, tol=2e-5):
    xv = tf.constant(x)
    kwargs = {}
    if mask is not None:
        kwargs["mask"] = tf.constant(mask)
    if initial_state is not None:
        kwargs["initial_state"] = [tf.constant(s) for s in initial_state]
    results = []
    for layer in (ref, ours):
        with tf.GradientTape() as tape:
            tape.watch(xv)
            ys = as_list(layer(xv, **kwargs))
            # A loss that weighs every returned tensor differently and non-linearly.
            loss = sum(tf.reduce_sum(y * (i + 1.0)) + tf.reduce_sum(tf.sin(y)) for i, y in enumerate(ys))
        grads = tape.gradient(loss, [xv] + layer.trainable_weights)
        results.append(([y.numpy() for y in ys], [g.numpy() for g in grads]))
    assert_keras_results_match(results[0], results[1], tol)


@pytest.mark.parametrize("mask_kind", ["none", "right", "left"])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"return_sequences": True},
        {"return_state": True},
        {"return_sequences": True, "return_state": True},
        {"go_backwards": True},
        {"go_backwards": True, "return_sequences": True},
        {"go_backwards": True, "return_sequences": True, "return_state": True},
        {"use_bias": False, "return_sequences": True},
        {"zero_output_for_mask": True},  # the last output: zeros where the last step is masked
        {"zero_output_for_mask": True, "go_backwards": True, "return_state": True},
        {"unroll": True, "return_sequences": True, "return_state": True},  # a speed hint: same results
    ],
    ids=lambda kw: "-".join(kw) or "default",
)
def test_matches_keras(kw, mask_kind):
    rng = np.random.default_rng(0)
    ref, ours = pair(rng, **kw)
    x = rng.standard_normal((B, T, E)).astype(np.float32)
    compare(ref, ours, x, mask=masks()[mask_kind])


def test_initial_state_matches_keras():
    rng = np.random.default_rng(1)
    ref, ours = pair(rng, return_sequences=True, return_state=True)
    x = rng.standard_normal((B, T, E)).astype(np.float32)
    state = [rng.standard_normal((B, H)).astype(np.float32) for _ in range(2)]
    compare(ref, ours, x, initial_state=state)
    compare(ref, ours, x, mask=masks()["right"], initial_state=state)


def test_bidirectional_over_masked_embedding():
    rng = np.random.default_rng(2)
    ids = np.array([[3, 5, 2, 0, 0, 0], [1, 2, 3, 4, 5, 6], [7, 0, 0, 0, 0, 0], [2, 2, 0, 0, 0, 0]])
    models = []
    for cls in (keras.layers.LSTM, fk.LSTM):
        inp = keras.Input((T,), dtype="int32")
        h = keras.layers.Embedding(10, E, mask_zero=True)(inp)
        h = keras.layers.Bidirectional(cls(H, return_sequences=True))(h)
        h = keras.layers.Bidirectional(cls(H))(h)
        out = keras.layers.Dense(2)(h)
        models.append(keras.Model(inp, out))
    ref, ours = models
    ref.set_weights([w + 0.2 * rng.standard_normal(w.shape).astype(w.dtype) for w in ref.get_weights()])
    ours.set_weights(ref.get_weights())
    res = []
    for m in models:
        with tf.GradientTape() as tape:
            y = m(ids)
            loss = tf.reduce_sum(tf.sin(y))
        grads = tape.gradient(loss, m.trainable_weights)  # the embedding: IndexedSlices
        res.append((y.numpy(), [tf.convert_to_tensor(g).numpy() for g in grads]))
    np.testing.assert_allclose(res[1][0], res[0][0], rtol=2e-5, atol=2e-5)
    for a, b in zip(res[0][1], res[1][1]):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mask_kind", ["none", "right", "left"])
@pytest.mark.parametrize("return_sequences", [True, False])
def test_bidirectional_matches_keras(mask_kind, return_sequences):
    rng = np.random.default_rng(8)
    layers = []
    for cls in (keras.layers.LSTM, fk.LSTM):
        layer = keras.layers.Bidirectional(cls(H, return_sequences=return_sequences, return_state=True))
        layer.build((None, T, E))
        layers.append(layer)
    ref, ours = layers
    ref.set_weights([w + 0.3 * rng.standard_normal(w.shape).astype(w.dtype) for w in ref.get_weights()])
    ours.set_weights(ref.get_weights())
    x = rng.standard_normal((B, T, E)).astype(np.float32)
    state = [rng.standard_normal((B, H)).astype(np.float32) for _ in range(4)]
    compare(ref, ours, x, mask=masks()[mask_kind], initial_state=state)


def test_go_backwards_is_the_kernels_reverse_pass():
    """go_backwards runs the op with reverse=True on x as it is: no flip of x or of its gradient
    in the graph (only the returned sequence is put in Keras's processing order, by one gather
    with a mask), right-padded or with holes."""
    x = tf.constant(np.random.default_rng(9).standard_normal((B, T, E)).astype(np.float32))
    holes = masks()["right"].copy()
    holes[0, 2] = False
    for mask, return_sequences in [(tf.constant(m), r) for m in (masks()["right"], holes) for r in (False, True)]:
        layer = fk.LSTM(H, go_backwards=True, return_sequences=return_sequences)
        layer.build((None, T, E))

        @tf.function
        def step(layer=layer, mask=mask):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(layer(x, mask=mask))
            return tape.gradient(loss, [x] + layer.trainable_weights)

        ops = step.get_concrete_function().graph.get_operations()
        fused = [op for op in ops if op.type == "FusedLstm"]
        assert len(fused) == 1 and fused[0].get_attr("reverse")
        assert [op.get_attr("reverse") for op in ops if op.type == "FusedLstmGrad"] == [True]
        assert not any(op.type == "ReverseV2" and op.inputs[0].dtype != tf.bool for op in ops)


def test_mask_with_holes_runs_on_the_ops_step_mask():
    """A mask with holes goes to the op as it is (its step_mask input; x is not gathered) and a
    right-padded step mask gives bit for bit what its lengths give (the op runs it as lengths)."""
    layer = fk.LSTM(H, return_sequences=True)
    layer.build((None, T, E))
    x = tf.constant(np.random.default_rng(3).standard_normal((B, T, E)).astype(np.float32))
    holes = np.ones((B, T), bool)
    holes[1, 2] = holes[3, 0] = False

    @tf.function
    def step(x, mask):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.sin(layer(x, mask=mask)))
        return tape.gradient(loss, [x] + layer.trainable_weights)

    graph = step.get_concrete_function(tf.TensorSpec((B, T, E)), tf.TensorSpec((B, T), tf.bool)).graph
    fused = [op for op in graph.get_operations() if op.type == "FusedLstm"]
    assert len(fused) == 1 and fused[0].inputs[0].op.type == "Placeholder"  # x as given
    assert fused[0].inputs[7].shape == (B, T)  # the step mask
    assert all(g is not None for g in step(x, tf.constant(holes)))

    rng = np.random.default_rng(4)
    args = [tf.constant(rng.standard_normal(s).astype(np.float32)) for s in [(B, T, E), (E, 4 * H), (H, 4 * H)]]
    args += [tf.zeros(4 * H), tf.zeros((B, H)), tf.zeros((B, H))]
    right = masks()["right"]
    lengths = right.sum(axis=1).astype(np.int32)
    d_out = tf.constant(rng.standard_normal((B, T, H)).astype(np.float32))
    results = []
    for steps in ({"lengths": lengths}, {"step_mask": right}):
        o, hn, cn, cache = fk_ops.fused_lstm(*args, **steps)
        grads = fk_ops.fused_lstm_grad(args[0], args[2], steps.pop("lengths", None), cache, d_out, hn, cn, **steps)
        results.append([t.numpy() for t in (o, hn, cn, *grads)])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(activation="selu"), "activation="),
        (dict(recurrent_activation="softmax"), "recurrent_activation="),
        (dict(recurrent_dropout=1.0), "recurrent_dropout must be"),
        (dict(dropout=1.5), "dropout must be"),
    ],
)
def test_rejected_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        fk.LSTM(H, **kw)


def test_gradient_checker_float64():
    lib = fk_ops
    rng = np.random.default_rng(4)
    args = [rng.standard_normal(s) * 0.5 for s in [(3, 4, 2), (2, 12), (3, 12), (12,), (3, 3), (3, 3)]]
    lengths = tf.constant([4, 2, 0], tf.int32)
    holes = tf.constant(np.array([[1, 0, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]], bool))
    drop = tf.constant((rng.random((4, 3, 3)) > 0.3) / 0.7)  # recurrent dropout masks [4, B, H]
    cases = [
        dict(lengths=lengths),
        dict(lengths=lengths, reverse=True),
        # Masks with holes, recurrent dropout and other activations: the gradient op must be given
        # the forward's step mask, masks and attributes.
        dict(step_mask=holes, recurrent_masks=drop, activation="sigmoid", recurrent_activation="tanh"),
        dict(step_mask=holes, recurrent_masks=drop, reverse=True, activation="linear"),
    ]
    for kw in cases:

        def f(x, k, r, b, h0, c0, kw=kw):
            o, h, c, _ = lib.fused_lstm(x, k, r, b, h0, c0, **kw)
            return tf.reduce_sum(o * o) + tf.reduce_sum(tf.sin(h)) + tf.reduce_sum(c)

        theoretical, numerical = tf.test.compute_gradient(f, [tf.constant(a) for a in args], delta=1e-5)
        for t_, n_ in zip(theoretical, numerical):
            np.testing.assert_allclose(t_, n_, rtol=1e-6, atol=1e-6)


def test_raw_op_input_checks():
    lib = fk_ops
    x = np.zeros((2, 3, 4), np.float32)
    k, r, b = np.zeros((4, 8), np.float32), np.zeros((2, 8), np.float32), np.zeros(8, np.float32)
    h = np.zeros((2, 2), np.float32)
    bad = [
        ((x, k, r, b, h, h, np.array([3, 4], np.int32)), "outside"),
        ((x[0], k, r, b, h, h, np.array([3, 3], np.int32)), "rank"),
        ((x, k[:3], r, b, h, h, np.array([3, 3], np.int32)), "kernel: expected shape"),
        ((x, k, r, b, h[:1], h, np.array([3, 3], np.int32)), "h0: expected shape"),
    ]
    for args, msg in bad:
        with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=msg):
            lib.fused_lstm(*args)
    m, drop = np.ones((2, 3), bool), np.ones((4, 2, 2), np.float32)
    bad_kw = [
        (dict(step_mask=m[:, :2]), "step_mask: expected shape"),
        (dict(step_mask=m, lengths=np.array([3, 3], np.int32)), "not both"),
        (dict(recurrent_masks=drop[:3]), "recurrent_masks: expected shape"),
        (dict(recurrent_masks=drop, training=False), "training only"),
    ]
    for kw, msg in bad_kw:
        with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=msg):
            lib.fused_lstm(x, k, r, b, h, h, **kw)
    # The same through a graph with unknown shapes: the shape functions cannot reject these, so
    # the kernels must (ranks checked before any dimension is read).
    any_f = tf.TensorSpec(None, tf.float32)
    fwd = tf.function(lambda *a: lib.fused_lstm(*a)[0], input_signature=[any_f] * 6 + [tf.TensorSpec(None, tf.int32)])
    with pytest.raises(tf.errors.InvalidArgumentError, match="recurrent_masks: expected shape"):
        tf.function(lambda m: lib.fused_lstm(x, k, r, b, h, h, recurrent_masks=m)[1])(tf.ones((4, 2, 3)))
    graph_bad = [
        ((np.zeros((2, 3, 4, 1), np.float32), k, r, b, h, h, [3, 3]), "x: expected rank 3"),
        ((x, k, np.zeros(8, np.float32), b, h, h, [3, 3]), "recurrent_kernel: expected rank"),
        ((x, k, np.zeros((2, 7), np.float32), b, h, h, [3, 3]), "recurrent_kernel: expected shape"),
        ((x, k, r, b, h, h, [[3, 3]]), "lengths: expected shape"),
        ((x, k, r, b, h, h, [-1, 3]), "outside"),
    ]
    for args, msg in graph_bad:
        with pytest.raises(tf.errors.InvalidArgumentError, match=msg):
            fwd(*[tf.constant(a, tf.int32 if i == 6 else tf.float32) for i, a in enumerate(args)])
    # The gradient op, fed directly: wrong cache size, upstream shapes, ranks and lengths.
    lengths = np.array([3, 2], np.int32)
    _, _, _, cache = lib.fused_lstm(x, k, r, b, h, h, lengths)
    d_out = np.zeros((2, 3, 2), np.float32)
    grad_bad = [
        ((x, r, lengths, cache[:-1], d_out, h, h), "cache"),
        ((x, r, lengths, cache, d_out[:, :2], h, h), "d_outputs: expected shape"),
        ((x, r, lengths, cache, d_out, h[:1], h), "d_h_n: expected shape"),
        ((x, r, lengths, cache, d_out, h, h.T[:1]), "d_c_n: expected shape"),
        ((x, r, np.array([3, 9], np.int32), cache, d_out, h, h), "outside"),
        ((x, r[0], lengths, cache, d_out, h, h), "rank"),
        ((x, r, None, cache, d_out, h, h, np.ones((2, 4), bool)), "step_mask: expected shape"),
    ]
    for args, msg in grad_bad:
        with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=msg):
            lib.fused_lstm_grad(*args)
    # Empty batch: correctly shaped empty results.
    o, hn, cn, _ = lib.fused_lstm(
        np.zeros((0, 3, 4), np.float32),
        k,
        r,
        b,
        np.zeros((0, 2), np.float32),
        np.zeros((0, 2), np.float32),
        np.zeros(0, np.int32),
    )
    assert o.shape == (0, 3, 2) and hn.shape == (0, 2)


def test_gradient_op_takes_over_or_copies_the_cache_consistently():
    """The gradient op consumes the cache in place when it holds the only reference (TensorFlow
    forwards the buffer) and copies it otherwise. Sole consumer in a graph, two consumers of one
    cache, and a persistent tape asked twice must all give the same gradients."""
    lib = fk_ops
    rng = np.random.default_rng(11)
    Bq, Tq, Eq, Hq = 5, 7, 3, 4
    x, k, r, b = (
        tf.constant(rng.standard_normal(s).astype(np.float32) * 0.5)
        for s in [(Bq, Tq, Eq), (Eq, 4 * Hq), (Hq, 4 * Hq), (4 * Hq,)]
    )
    h0 = tf.constant(rng.standard_normal((Bq, Hq)).astype(np.float32))
    lengths = tf.constant([7, 3, 0, 5, 1], tf.int32)
    d_out = tf.constant(rng.standard_normal((Bq, Tq, Hq)).astype(np.float32))

    @tf.function
    def sole():
        o, hn, cn, cache = lib.fused_lstm(x, k, r, b, h0, h0, lengths)
        return lib.fused_lstm_grad(x, r, lengths, cache, d_out, hn, cn)

    @tf.function
    def shared():
        o, hn, cn, cache = lib.fused_lstm(x, k, r, b, h0, h0, lengths)
        g1 = lib.fused_lstm_grad(x, r, lengths, cache, d_out, hn, cn)
        g2 = lib.fused_lstm_grad(x, r, lengths, cache, d_out, hn, cn)
        return g1, g2, cache

    o, hn, cn, cache = lib.fused_lstm(x, k, r, b, h0, h0, lengths)
    cache_before = cache.numpy().copy()
    eager = [g.numpy() for g in lib.fused_lstm_grad(x, r, lengths, cache, d_out, hn, cn)]
    np.testing.assert_array_equal(cache.numpy(), cache_before)  # an eager input stays intact
    g1, g2, cache2 = shared()
    np.testing.assert_array_equal(cache2.numpy(), cache_before)
    for results in ([g.numpy() for g in sole()], [g.numpy() for g in g1], [g.numpy() for g in g2]):
        for a, e in zip(results, eager):
            np.testing.assert_array_equal(a, e)
    layer = fk.LSTM(Hq, return_sequences=True)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        loss = tf.reduce_sum(tf.sin(layer(x, training=True)))
    first = [g.numpy() for g in tape.gradient(loss, [x] + layer.trainable_weights)]
    second = [g.numpy() for g in tape.gradient(loss, [x] + layer.trainable_weights)]
    for a, e in zip(second, first):
        np.testing.assert_array_equal(a, e)


def test_inference_keeps_no_cache_and_still_differentiates():
    """training=False runs the op without a cache (the predict path); a gradient taken through
    it anyway recomputes the forward with one, eagerly and in a tf.function, and matches the
    training call's gradient bit for bit."""
    lib = fk_ops
    rng = np.random.default_rng(12)
    x = tf.constant(rng.standard_normal((5, 7, 3)).astype(np.float32))
    mask = tf.constant(np.arange(7)[None, :] < np.array([7, 3, 0, 5, 1])[:, None])
    layer = fk.LSTM(4, return_sequences=True, return_state=True)
    layer.build((None, 7, 3))
    k, r, b = layer.kernel, layer.recurrent_kernel, layer.bias
    h0 = tf.zeros((5, 4))
    lengths = tf.constant([7, 3, 0, 5, 1], tf.int32)
    inf = lib.fused_lstm(x, k, r, b, h0, h0, lengths, training=False)
    trn = lib.fused_lstm(x, k, r, b, h0, h0, lengths, training=True)
    assert inf[3].shape == (0,) and trn[3].shape[0] > 0
    for a, e in zip(inf[:3], trn[:3]):
        np.testing.assert_array_equal(a.numpy(), e.numpy())

    def grads(training):
        with tf.GradientTape() as tape:
            tape.watch(x)
            ys = layer(x, mask=mask, training=training)
            loss = sum(tf.reduce_sum(tf.sin(y) * (i + 1.0)) for i, y in enumerate(ys))
        return [loss] + tape.gradient(loss, [x] + layer.trainable_weights)

    want = [g.numpy() for g in grads(True)]
    for got in (grads(False), tf.function(lambda: grads(False))()):
        for a, e in zip(got, want):
            np.testing.assert_array_equal(a.numpy(), e)


def test_plain_call_under_a_tape_runs_the_forward_once():
    """A custom loop's `layer(x)` (training not given) keeps the cache: the gradient graph has
    one FusedLstm op, not a second forward recomputing it. An explicit training=False
    (predict, evaluate) keeps none and recomputes only if differentiated."""
    x = tf.constant(np.random.default_rng(14).standard_normal((3, 5, 2)).astype(np.float32))
    layer = fk.LSTM(4)
    layer.build((None, 5, 2))

    def forwards(**kw):
        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(layer(x, **kw))
            return tape.gradient(loss, layer.trainable_weights)

        ops = step.get_concrete_function().graph.get_operations()
        return sum(op.type == "FusedLstm" for op in ops)

    assert forwards() == 1
    assert forwards(training=True) == 1
    assert forwards(training=False) == 2


def test_op_without_return_sequences_writes_no_outputs():
    """return_sequences=False (the layer's default): the op's outputs are an empty [B, 0, H]
    tensor, the state is bit-identical, and gradients through h_n and c_n are too, eagerly and
    in a tf.function."""
    lib = fk_ops
    rng = np.random.default_rng(13)
    x = tf.constant(rng.standard_normal((5, 7, 3)).astype(np.float32))
    k = tf.constant(rng.standard_normal((3, 16)).astype(np.float32) * 0.3)
    r = tf.constant(rng.standard_normal((4, 16)).astype(np.float32) * 0.3)
    b = tf.constant(rng.standard_normal(16).astype(np.float32) * 0.1)
    h0 = tf.zeros((5, 4))
    lengths = tf.constant([7, 3, 0, 5, 1], tf.int32)
    full = lib.fused_lstm(x, k, r, b, h0, h0, lengths)
    last = lib.fused_lstm(x, k, r, b, h0, h0, lengths, return_sequences=False)
    assert full[0].shape == (5, 7, 4) and last[0].shape == (5, 0, 4)
    for a, e in zip(last[1:3], full[1:3]):
        np.testing.assert_array_equal(a.numpy(), e.numpy())

    def grads(return_sequences):
        with tf.GradientTape() as tape:
            tape.watch([x, k, r, b])
            _, hn, cn, _ = lib.fused_lstm(x, k, r, b, h0, h0, lengths, return_sequences=return_sequences)
            loss = tf.reduce_sum(tf.sin(hn)) + 2.0 * tf.reduce_sum(tf.cos(cn))
        return tape.gradient(loss, [x, k, r, b])

    want = [g.numpy() for g in grads(True)]
    for got in (grads(False), tf.function(lambda: grads(False))()):
        for a, e in zip(got, want):
            np.testing.assert_array_equal(a.numpy(), e)


def test_concurrent_tf_function_calls_match_sequential():
    """The op under several Python threads calling one tf.function at once (each with its own
    data): every result equals the one from a sequential call."""
    from concurrent.futures import ThreadPoolExecutor

    layer = fk.LSTM(H, return_sequences=True)
    layer.build((None, T, E))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.sin(layer(x)))
        return [loss] + tape.gradient(loss, [x] + layer.trainable_weights)

    rng = np.random.default_rng(11)
    xs = [tf.constant(rng.standard_normal((B, T, E)).astype(np.float32)) for _ in range(12)]
    expected = [[t.numpy() for t in step(x)] for x in xs]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda x: [t.numpy() for t in step(x)], xs * 3))
    for i, res in enumerate(got):
        for a, b in zip(res, expected[i % len(xs)]):
            np.testing.assert_array_equal(a, b)


def test_fit_save_load_roundtrip(tmp_path):
    keras.utils.set_random_seed(5)  # initial weights and dropout: the same run every time
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, T, E)).astype(np.float32)
    y = (x[:, :, 0].sum(1) > 0).astype(np.int32)
    inp = keras.Input((T, E))
    h = fk.LSTM(H, dropout=0.1, seed=1)(inp)
    model = keras.Model(inp, keras.layers.Dense(2)(h))
    model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    hist = model.fit(x, y, epochs=10, batch_size=16, verbose=0)
    assert hist.history["loss"][-1] < 0.9 * hist.history["loss"][0]
    pred = model.predict(x, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    again = keras.models.load_model(path)
    assert isinstance(again.layers[1], fk.LSTM)
    np.testing.assert_allclose(again.predict(x, verbose=0), pred, rtol=1e-6, atol=1e-6)

    @tf.function
    def step(v):
        return again(v)

    np.testing.assert_allclose(step(tf.constant(x)).numpy(), pred, rtol=1e-6, atol=1e-6)


def run_py(code: str, timeout=600):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


MIRRORED = r"""
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, fusedlstm.keras as fk

def train(strategy):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 6, 5)).astype(np.float32)
    y = (x[:, :, 0].sum(1) > 0).astype(np.int32)
    with strategy.scope():
        inp = keras.Input((6, 5))
        model = keras.Model(inp, keras.layers.Dense(2)(fk.LSTM(7)(inp)))
        model.compile(keras.optimizers.SGD(0.1),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0)
    return model.get_weights()

one = train(tf.distribute.OneDeviceStrategy("/cpu:0"))
two = train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
print(max(float(np.abs(a - b).max()) for a, b in zip(one, two)))
"""


def test_mirrored_strategy_matches_one_device():
    diff = float(run_py(MIRRORED).strip().splitlines()[-1])
    assert diff < 1e-5, diff


SAVED = r"""
import sys, numpy as np, tensorflow as tf, keras, fusedlstm.keras as fk
rng = np.random.default_rng(0)
x = rng.standard_normal((3, 6, 5)).astype(np.float32)
inp = keras.Input((6, 5))
model = keras.Model(inp, fk.LSTM(7)(inp))
model.export(sys.argv[1] if len(sys.argv) > 1 else "{path}")
np.save("{path}.npy", model.predict(x, verbose=0))
"""

RELOAD = r"""
import numpy as np, tensorflow as tf
import fusedlstm.keras
fusedlstm.keras.load_ops()  # the one line a fresh process needs before loading
m = tf.saved_model.load("{path}")
x = np.random.default_rng(0).standard_normal((3, 6, 5)).astype(np.float32)
print(float(np.abs(m.serve(x).numpy() - np.load("{path}.npy")).max()))
"""


def test_saved_model_reloads_in_a_fresh_process(tmp_path):
    path = str(tmp_path / "exported")
    run_py(SAVED.replace("{path}", path))
    diff = float(run_py(RELOAD.replace("{path}", path)).strip().splitlines()[-1])
    assert diff < 1e-6


def test_op_library_cache_is_keyed_by_what_march_native_means(monkeypatch):
    # A home directory shared by different CPUs must not hand one of them a library compiled with
    # -march=native on another (it would die with an illegal instruction): the cache key holds the
    # instruction sets the flags select here, not only the flags' text.
    from fusedlstm.keras import build

    cxx = build._compiler()
    older = build._target_macros(cxx, ["-march=haswell"])
    newer = build._target_macros(cxx, ["-march=skylake-avx512"])
    assert "__AVX2__" in older and "__AVX512F__" not in older and "__AVX512F__" in newer
    here = build.op_library_path()
    assert build.op_library_path() == here  # stable on one machine
    if build._simd_flags(cxx):
        monkeypatch.setattr(build, "_target_macros", lambda c, f: older)
        as_haswell = build.op_library_path()
        monkeypatch.setattr(build, "_target_macros", lambda c, f: newer)
        assert as_haswell != build.op_library_path() and here.parent.parent == as_haswell.parent.parent


def _defines(cmd):
    return {a[2:] for a in cmd if a.startswith("-D")}


def test_op_is_compiled_from_the_build_definition_cmake_reads():
    # One build definition: csrc/build.json lists the sources and flags; the op's builder and
    # CMakeLists.txt both read it. TensorFlow's headers are system headers, no warning is muted.
    import json
    from pathlib import Path

    from fusedlstm.keras import build

    src = build.source_dir()
    manifest = json.loads((src / "build.json").read_text())
    _, cflags, _ = build._tf_flags()
    cmds = {rel: cmd for rel, _, cmd in build.compile_commands("c++", src, cflags, ["-march=native"], Path("/x"))}
    assert list(cmds) == manifest["lstm_sources"] + manifest["tf_op_sources"]
    assert "EIGEN_MPL2_ONLY" in manifest["definitions"]
    for rel, cmd in cmds.items():
        assert _defines(cmd) >= set(manifest["definitions"]), rel
        assert "-w" not in cmd and "-march=native" in cmd, rel
        assert not any(a.startswith("-I") and "tensorflow" in a for a in cmd), rel  # -isystem only
        assert (
            cmd.index("-ffp-contract=off") < max(i for i, a in enumerate(cmd) if a.startswith("-ffp-contract"))
            or rel not in manifest["source_options"]
        )
    gemm = cmds["cpu/gemm.cc"]
    assert gemm[max(i for i, a in enumerate(gemm) if a.startswith("-ffp-contract"))] == "-ffp-contract=fast"


def test_cmake_compiles_the_kernels_with_the_same_definition(tmp_path):
    # Configure only (seconds): CMake's compile commands for the LSTM kernels carry the same
    # definitions and per-file options as the op's.
    import json
    import shutil
    from pathlib import Path

    from fusedlstm.keras import build

    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not on PATH")
    pybind11 = pytest.importorskip("pybind11")
    root = Path(__file__).resolve().parents[1]
    if not (root / "CMakeLists.txt").is_file():
        pytest.skip("not a source checkout (no CMakeLists.txt)")
    args = [
        cmake,
        "-S",
        str(root),
        "-B",
        str(tmp_path),
        "-DCMAKE_BUILD_TYPE=Release",
        "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON",
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
    ]
    r = subprocess.run(args, capture_output=True, text=True, check=False)
    if r.returncode != 0 and "Eigen3" in r.stdout + r.stderr:
        pytest.skip("Eigen 3.4 is not installed for CMake (pip install cmeel-eigen)")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    units = {
        Path(u["file"]).resolve(): u["command"].split()
        for u in json.loads((tmp_path / "compile_commands.json").read_text())
    }
    src = build.source_dir()
    manifest = json.loads((src / "build.json").read_text())
    ours = {rel: cmd for rel, _, cmd in build.compile_commands("c++", src, [], [], tmp_path)}
    for rel in manifest["lstm_sources"]:
        theirs = units[(root / "csrc" / rel).resolve()]
        # CMake adds only what the Python module needs (OpenMP) and NDEBUG (its Release default).
        assert _defines(theirs) - {"FUSEDLSTM_WITH_OPENMP", "NDEBUG"} == _defines(ours[rel]), rel
        contract = [a for a in theirs if a.startswith("-ffp-contract")]
        assert contract == [a for a in ours[rel] if a.startswith("-ffp-contract")], rel
        assert set(manifest["release_options"]) <= set(theirs), rel


def test_an_installed_package_builds_from_its_own_manifest(tmp_path):
    # Installed, the sources and build.json sit in fusedlstm/csrc beside the package (CMake's
    # install rule); the builder reads that copy, and says what is missing when it is not there.
    import shutil

    from fusedlstm.keras import build

    pkg = tmp_path / "site" / "fusedlstm"
    (pkg / "keras").mkdir(parents=True)
    shutil.copy(build.__file__, pkg / "keras" / "build.py")
    shutil.copytree(build.source_dir(), pkg / "csrc", ignore=shutil.ignore_patterns("python", "cuda"))
    (pkg / "csrc" / "build.json").write_text(
        (pkg / "csrc" / "build.json")
        .read_text()
        .replace('"EIGEN_MPL2_ONLY"', '"EIGEN_MPL2_ONLY", "FUSEDLSTM_MANIFEST_PROBE"')
    )
    spec = importlib.util.spec_from_file_location("installed_build", pkg / "keras" / "build.py")
    installed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(installed)
    assert installed.source_dir() == pkg / "csrc"
    cmds = installed.compile_commands("c++", installed.source_dir(), [], [], tmp_path)
    assert all("FUSEDLSTM_MANIFEST_PROBE" in _defines(cmd) for _, _, cmd in cmds)
    assert all(str(pkg / "csrc") in cmd[cmd.index("-c") + 1] for _, _, cmd in cmds)
    (pkg / "csrc" / "build.json").unlink()  # an incomplete installation
    with pytest.raises(FileNotFoundError, match=r"build\.json"):
        installed.source_dir()


def test_an_unsupported_keras_backend_is_refused_at_construction(monkeypatch):
    # Under a backend with no fused op (jax, numpy, openvino) a result would sit outside that
    # backend's autodiff: a model would fit without ever training the LSTM (seen under the torch
    # backend before it had its own op). It must refuse instead, naming the backend. (No such
    # backend can run here: jax is not installed and Keras's numpy backend needs scipy.)
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(
        RuntimeError,
        match=r"this process uses the 'jax' backend\. Set "
        r"KERAS_BACKEND to tensorflow or torch",
    ):
        fk.LSTM(4)


@pytest.mark.parametrize("policy,tol", [("mixed_float16", 3e-3), ("mixed_bfloat16", 2e-2)])
def test_mixed_precision_policies_run_in_float32_and_return_the_compute_dtype(policy, tol):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((B, T, E)).astype(np.float32)
    mask = np.ones((B, T), bool)
    mask[1, 4:] = False
    h0 = rng.standard_normal((B, H)).astype(np.float32)
    keras.mixed_precision.set_global_policy(policy)
    try:
        ref, ours = pair(rng, return_sequences=True, return_state=True)
        assert ours.compute_dtype == ref.compute_dtype and ours.kernel.dtype == "float32"
        got = ours(x, mask=tf.constant(mask), initial_state=[tf.cast(h0, ours.compute_dtype)] * 2)
        want = ref(x, mask=tf.constant(mask), initial_state=[tf.cast(h0, ref.compute_dtype)] * 2)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype
            np.testing.assert_allclose(
                np.asarray(tf.cast(g, tf.float32)), np.asarray(tf.cast(w, tf.float32)), rtol=tol, atol=tol
            )
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.cast(ours(x)[0], tf.float32) ** 2)
        grads = tape.gradient(loss, ours.trainable_variables)
        assert all(g is not None and np.isfinite(g.numpy()).all() and np.abs(g.numpy()).max() > 0 for g in grads)
        model = keras.Sequential([keras.Input((T, E)), fk.LSTM(H), keras.layers.Dense(1)])
        model.compile(keras.optimizers.Adam(1e-2), "mse")  # a LossScaleOptimizer under float16
        before = [w.copy() for w in model.layers[0].get_weights()]
        model.fit(x, np.ones((B, 1), np.float32), epochs=2, verbose=0)
        assert all(np.abs(a - b).max() > 0 for a, b in zip(model.layers[0].get_weights(), before))
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("mask_kind", ["right", "left"])
@pytest.mark.parametrize(
    "kw", [{"return_sequences": True}, {"return_sequences": True, "go_backwards": True}], ids=lambda kw: "-".join(kw)
)
def test_zero_output_for_mask_matches_keras(kw, mask_kind):
    rng = np.random.default_rng(3)
    ref, ours = pair(rng, zero_output_for_mask=True, **kw)
    x = rng.standard_normal((B, T, E)).astype(np.float32)
    compare(ref, ours, x, mask=masks()[mask_kind])
    # and it changes something: masked steps are zeros, not the repeated last output
    m = masks()[mask_kind]
    y = ours(tf.constant(x), mask=tf.constant(m)).numpy()
    m = m[:, ::-1] if kw.get("go_backwards") else m  # outputs come in reversed time order
    assert (y[~m] == 0).all() and np.abs(y[m]).min() > 0


def test_configs_are_interchangeable_with_keras_lstm():
    # Swapping the import must keep working for code that rebuilds layers from configs, and
    # keras.layers.LSTM's own keywords (use_cudnn, zero_output_for_mask) must be accepted.
    ref = keras.layers.LSTM(
        8,
        return_sequences=True,
        dropout=0.25,
        seed=3,
        go_backwards=True,
        zero_output_for_mask=True,
        unroll=True,
        activation="relu",
        recurrent_activation="hard_sigmoid",
        recurrent_dropout=0.3,
        use_cudnn="auto",
        activity_regularizer="l2",
        kernel_regularizer="l1",
        name="lstm_x",
    )
    cfg = ref.get_config()
    ours = fk.LSTM.from_config(cfg)
    mine = ours.get_config()
    assert set(mine) == set(cfg)
    for k in cfg:
        assert mine[k] == cfg[k], k
    back = keras.layers.LSTM.from_config(mine)
    assert back.get_config() == cfg
    assert fk.LSTM(4, use_cudnn=False).get_config()["units"] == 4
    with pytest.raises(ValueError, match="use_cudnn=True"):
        fk.LSTM(4, use_cudnn=True)


# Keras's own tests of keras.layers.LSTM (shipped in the installed package), run unchanged with our
# layer in its place (test_basics: dropout and recurrent_dropout in training, regularizers).
KERAS_OWN_LSTM_TESTS = [
    "test_basics",
    "test_correctness",
    "test_statefulness",
    "test_pass_initial_state",
    "test_masking",
]


def test_keras_own_lstm_tests_pass_with_our_layer(monkeypatch):
    import io
    import unittest

    try:
        from keras.src.layers.rnn import lstm_test
    except ImportError as exc:  # a Keras build without its test modules
        pytest.skip(f"keras.src.layers.rnn.lstm_test is not installed ({exc})")
    import keras.src.layers

    monkeypatch.setattr(keras.src.layers, "LSTM", fk.LSTM)
    loader = unittest.defaultTestLoader
    suite = loader.loadTestsFromTestCase(lstm_test.LSTMTest)
    names = sorted({t._testMethodName.rstrip("0123456789") for t in suite})
    assert names == sorted(KERAS_OWN_LSTM_TESTS)
    result = unittest.TextTestRunner(stream=io.StringIO(), verbosity=0).run(suite)
    assert result.wasSuccessful(), [str(e[1])[-800:] for e in result.errors + result.failures]

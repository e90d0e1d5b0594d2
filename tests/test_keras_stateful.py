"""fusedlstm.keras.LSTM(stateful=True) against keras.layers.LSTM(stateful=True) with the same
weights over consecutive calls: outputs, the states kept between calls, gradients, reset_state
(zeros or given values), masks (holes too), go_backwards, return_state, recurrent_dropout and
activations in training, Bidirectional (each direction its own states), a fixed batch size,
model.fit, and .keras save/load (the states survive it). Written in
keras.ops so one file serves both backends: collected here on the TensorFlow backend, and run by
tests/test_keras_torch.py on the torch backend."""

import importlib.util
import os

import numpy as np
import pytest

from helpers import KERAS_SHAPE, assert_keras_results_match, keras_masks

_BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")
pytestmark = [
    pytest.mark.heavy,
    pytest.mark.skipif(
        importlib.util.find_spec(_BACKEND) is None or importlib.util.find_spec("keras") is None,
        reason=f"keras and its {_BACKEND} backend are not installed (CI installs tensorflow-cpu and torch)",
    ),
]

if importlib.util.find_spec(_BACKEND) is not None and importlib.util.find_spec("keras") is not None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    import fusedlstm.keras as fk

B, T, E, H = KERAS_SHAPE


def numpy(t):
    return np.asarray(keras.ops.convert_to_numpy(t))


def as_list(y):
    return list(y) if isinstance(y, (list, tuple)) else [y]


def masks():
    """keras_masks() and a mask with holes (a row with none valid, first and last steps masked)."""
    holes = np.array([[1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 1, 0], [0] * 6, [1, 0, 0, 0, 0, 1]], bool)
    return {**keras_masks(), "holes": holes}


def call_with_grads(layer, x, mask=None, initial_state=None, training=None):
    """The layer's outputs and the gradients (x, then the trainable weights) of a loss that weighs
    every returned tensor differently, on whichever backend runs."""

    def loss_of(ys):
        return sum(keras.ops.sum(y * (i + 1.0)) + keras.ops.sum(keras.ops.sin(y)) for i, y in enumerate(ys))

    kwargs = {"training": training}
    if mask is not None:
        kwargs["mask"] = keras.ops.convert_to_tensor(mask)
    if initial_state is not None:
        kwargs["initial_state"] = [keras.ops.convert_to_tensor(s) for s in initial_state]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        xv = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xv)
            ys = as_list(layer(xv, **kwargs))
            loss = loss_of(ys)
        grads = tape.gradient(loss, [xv] + layer.trainable_weights)
    else:
        import torch

        xv = torch.tensor(x, requires_grad=True)
        for w in layer.trainable_weights:
            w.value.grad = None
        ys = as_list(layer(xv, **kwargs))
        loss_of(ys).backward()
        grads = [xv.grad] + [w.value.grad for w in layer.trainable_weights]
    return [numpy(y) for y in ys], [numpy(g) for g in grads]


def forward_only(layer, x, mask=None, training=None):
    """Outputs without a gradient: Keras 3.15's stateful LSTM cannot be differentiated on the
    torch backend (its state update modifies a tensor its backward needs), so its gradients come
    from a layer that is not stateful, given the states as initial_state (what a stateful call
    is)."""
    kwargs = {"training": training}
    if mask is not None:
        kwargs["mask"] = keras.ops.convert_to_tensor(mask)
    if keras.backend.backend() == "torch":
        import torch

        with torch.no_grad():
            return [numpy(y) for y in as_list(layer(x, **kwargs))]
    return [numpy(y) for y in as_list(layer(x, **kwargs))]


def stateful_trio(rng, wrap=None, **kw):
    """keras.layers.LSTM and fusedlstm.keras.LSTM, stateful, built for batch B, and a Keras LSTM
    that is not stateful, all with the same random weights (wrap: e.g. keras.layers.Bidirectional
    around each)."""
    layers = []
    for cls, stateful in ((keras.layers.LSTM, True), (fk.LSTM, True), (keras.layers.LSTM, False)):
        layer = cls(H, stateful=stateful, **kw)
        layer = wrap(layer) if wrap else layer
        layer.build((B, T, E))
        layers.append(layer)
    ref = layers[0]
    ref.set_weights([w + 0.3 * rng.standard_normal(w.shape).astype(w.dtype) for w in ref.get_weights()])
    for layer in layers[1:]:
        layer.set_weights(ref.get_weights())
    return layers


def assert_states_match(ref, ours, tol=2e-5):
    assert len(ours.states) == len(ref.states)
    for a, b in zip(ref.states, ours.states):
        np.testing.assert_allclose(numpy(b), numpy(a), rtol=tol, atol=tol)


def run_calls(ref, ours, plain, rng, n, mask=None, training=None):
    for _ in range(n):
        x = rng.standard_normal((B, T, E)).astype(np.float32)
        before = [numpy(s) for s in ours.states]
        got = call_with_grads(ours, x, mask, training=training)
        assert_keras_results_match(call_with_grads(plain, x, mask, initial_state=before, training=training), got)
        want = forward_only(ref, x, mask, training=training)
        assert_keras_results_match((want, []), (got[0], []))
        assert_states_match(ref, ours)


@pytest.mark.parametrize("mask_kind", ["none", "right", "left", "holes"])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"return_sequences": True, "return_state": True},
        {"go_backwards": True, "return_sequences": True},
        {"go_backwards": True, "return_state": True},
    ],
    ids=lambda kw: "-".join(kw) or "default",
)
def test_consecutive_calls_and_reset_match_keras(kw, mask_kind):
    rng = np.random.default_rng(0)
    ref, ours, plain = stateful_trio(rng, **kw)
    assert len(ours.get_weights()) == 3  # the states are not weights
    mask = masks()[mask_kind]
    run_calls(ref, ours, plain, rng, 3, mask)
    assert np.abs(numpy(ours.states[0])).max() > 0.05  # the states did carry something
    ref.reset_states()
    ours.reset_states()
    assert all(np.abs(numpy(s)).max() == 0 for s in ours.states)
    run_calls(ref, ours, plain, rng, 2, mask)


def test_reset_state_to_given_values_and_explicit_initial_state():
    rng = np.random.default_rng(1)
    ref, ours, plain = stateful_trio(rng, return_sequences=True, return_state=True)
    h, c = (rng.standard_normal((B, H)).astype(np.float32) for _ in range(2))
    x = rng.standard_normal((B, T, E)).astype(np.float32)
    ours.reset_state([h, c])
    np.testing.assert_array_equal(numpy(ours.states[1]), c)
    got = ours(x)
    want = plain(x, initial_state=[h, c])
    for g, w in zip(got, want):
        np.testing.assert_allclose(numpy(g), numpy(w), rtol=2e-5, atol=2e-5)
    # An explicit initial_state wins over the kept states, and the final states are kept (Keras).
    got = ours(x, initial_state=[h, c])
    want = ref(x, initial_state=[h, c])
    for g, w in zip(got, want):
        np.testing.assert_allclose(numpy(g), numpy(w), rtol=2e-5, atol=2e-5)
    assert_states_match(ref, ours)
    np.testing.assert_allclose(numpy(ours.states[0]), numpy(got[1]), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"states \(c\): expected shape \(4, 7\)"):
        ours.reset_state([h, c[:2]])
    with pytest.raises(ValueError, match=r"must be \[h, c\]"):
        ours.reset_state([h])
    with pytest.raises(ValueError, match="not stateful"):
        fk.LSTM(H).reset_state([h, c])
    fk.LSTM(H).reset_state()  # nothing to zero: a no-op, as Keras's


def test_batch_size_is_fixed():
    layer = fk.LSTM(H, stateful=True)
    with pytest.raises(ValueError, match="batch size must be static"):
        layer.build((None, T, E))
    layer = fk.LSTM(H, stateful=True)
    layer(np.zeros((B, T, E), np.float32))
    assert [tuple(s.shape) for s in layer.states] == [(B, H), (B, H)]
    with pytest.raises(ValueError, match="Expected batch size: 4"):
        layer(np.zeros((B + 1, T, E), np.float32))


@pytest.mark.parametrize("mask_kind", ["right", "left", "holes"])
def test_bidirectional_keeps_a_state_per_direction(mask_kind):
    rng = np.random.default_rng(2)
    # (not return_state: Keras 3.15's Bidirectional.compute_mask fails on a stateful layer with it)
    ref, ours, plain = stateful_trio(rng, wrap=keras.layers.Bidirectional, return_sequences=True)
    assert len(ours.states) == 4
    run_calls(ref, ours, plain, rng, 3, masks()[mask_kind])
    forward, backward = (numpy(s) for s in ours.states[::2])
    assert np.abs(forward - backward).max() > 1e-3
    ref.reset_state()
    ours.reset_state()
    run_calls(ref, ours, plain, rng, 1, masks()[mask_kind])


def test_recurrent_dropout_and_activations_with_states():
    """A stateful layer with recurrent_dropout (all three layers seeded alike: the same masks)
    and other activations, in training, over a mask with holes: outputs, states and gradients
    call after call."""
    rng = np.random.default_rng(3)
    kw = dict(recurrent_dropout=0.3, dropout=0.2, seed=9, activation="relu", recurrent_activation="hard_sigmoid")
    ref, ours, plain = stateful_trio(rng, return_sequences=True, return_state=True, **kw)
    run_calls(ref, ours, plain, rng, 3, masks()["holes"], training=True)


def test_fit_then_save_and_load_keeps_the_states(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2 * B, T, E)).astype(np.float32)
    y = rng.standard_normal((2 * B, 1)).astype(np.float32)
    models = []
    for cls in (keras.layers.LSTM, fk.LSTM):
        inp = keras.Input(batch_shape=(B, T, E))
        h = cls(H, stateful=True, go_backwards=True, return_sequences=True)(inp)
        h = keras.layers.Bidirectional(cls(H, stateful=True))(h)
        models.append(keras.Model(inp, keras.layers.Dense(1)(h)))
    ref, ours = models
    ref.set_weights([w + 0.3 * rng.standard_normal(w.shape).astype(w.dtype) for w in ref.get_weights()])
    ours.set_weights(ref.get_weights())
    # Keras 3.15's stateful LSTM cannot train on the torch backend (see forward_only): there the
    # reference takes our trained weights.
    trained = models if keras.backend.backend() == "tensorflow" else [ours]
    for m in trained:
        m.compile(keras.optimizers.SGD(0.05), "mse")
        m.fit(x, y, batch_size=B, epochs=2, shuffle=False, verbose=0)  # states carried batch to batch
    assert min(np.abs(numpy(s)).max() for s in ours.layers[1].states) > 0.01
    if len(trained) == 2:
        for a, b in zip(ref.get_weights(), ours.get_weights()):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    else:
        ref.set_weights(ours.get_weights())
    for m in models:
        for layer in m.layers[1:3]:
            layer.reset_state()
    np.testing.assert_allclose(ours.predict(x[:B], verbose=0), ref.predict(x[:B], verbose=0), rtol=1e-4, atol=1e-4)
    states = [numpy(s) for layer in ours.layers[1:3] for s in layer.states]
    assert len(states) == 6 and min(np.abs(s).max() for s in states) > 0.01
    ours.save(tmp_path / "m.keras")
    back = keras.models.load_model(tmp_path / "m.keras")
    for s, t in zip(states, [numpy(s) for layer in back.layers[1:3] for s in layer.states]):
        np.testing.assert_array_equal(t, s)
    # It continues the stream where the saved model stopped, as the reference does.
    want = ref.predict(x[B:], verbose=0)
    np.testing.assert_allclose(back.predict(x[B:], verbose=0), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours.predict(x[B:], verbose=0), want, rtol=1e-4, atol=1e-4)
    # Weights-only files keep them too.
    ours.save_weights(tmp_path / "m.weights.h5")
    for layer in back.layers[1:3]:
        layer.reset_state()
    back.load_weights(tmp_path / "m.weights.h5")
    saved = [numpy(s) for layer in ours.layers[1:3] for s in layer.states]
    loaded = [numpy(s) for layer in back.layers[1:3] for s in layer.states]
    assert len(loaded) == 6 and min(np.abs(s).max() for s in loaded) > 0.01
    for a, b in zip(saved, loaded):
        np.testing.assert_array_equal(b, a)


def test_config_round_trip_keeps_stateful():
    ref = keras.layers.LSTM(H, stateful=True, go_backwards=True, unroll=True)
    cfg = ref.get_config()
    ours = fk.LSTM.from_config(cfg)
    assert ours.stateful and ours.get_config() == cfg
    assert keras.layers.LSTM.from_config(ours.get_config()).get_config() == cfg

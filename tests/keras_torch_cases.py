"""fusedlstm.keras.LSTM on Keras's torch backend against keras.layers.LSTM on the same backend:
outputs, states and gradients (inputs and weights) with and without right-/left-padded masks,
go_backwards, return_sequences/return_state, initial state, zero_output_for_mask, float64,
Bidirectional, dropout, model.fit/predict, .keras save/load and Keras's own LSTM tests (masks with
holes, activations and recurrent_dropout: test_keras_dropout_masks.py, run under torch too). Run by
tests/test_keras_torch.py in a process of its own (the backend is chosen when keras is first
imported); not collected by the main run (the file name does not start with test_)."""

import os

import numpy as np
import pytest

if os.environ.get("KERAS_BACKEND") != "torch":
    pytest.skip("run with KERAS_BACKEND=torch (tests/test_keras_torch.py does)", allow_module_level=True)

import keras  # noqa: E402
import torch  # noqa: E402

import fusedlstm.keras as fk  # noqa: E402
from helpers import KERAS_SHAPE, assert_keras_results_match, keras_masks, keras_pair  # noqa: E402

B, T, E, H = KERAS_SHAPE
pair, masks = keras_pair, keras_masks


def run(layer, x, mask=None, initial_state=None, training=None):
    """Outputs and the gradients of a loss that weighs every returned tensor differently."""
    xt = torch.tensor(x, requires_grad=True)
    kwargs = {} if mask is None else {"mask": torch.tensor(mask)}
    if initial_state is not None:
        kwargs["initial_state"] = [torch.tensor(s) for s in initial_state]
    ys = layer(xt, training=training, **kwargs)
    ys = list(ys) if isinstance(ys, (list, tuple)) else [ys]
    loss = sum((y * (i + 1.0)).sum() + torch.sin(y).sum() for i, y in enumerate(ys))
    loss.backward()
    grads = [xt.grad] + [w.value.grad for w in layer.trainable_weights]
    return [y.detach().numpy() for y in ys], [g.numpy() for g in grads]


def compare(ref, ours, x, tol=2e-5, **kw):
    assert_keras_results_match(run(ref, x, **kw), run(ours, x, **kw), tol)


@pytest.mark.parametrize("mask_kind", ["none", "right", "left"])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"return_sequences": True},
        {"return_state": True},
        {"return_sequences": True, "return_state": True},
        {"go_backwards": True, "return_sequences": True},
        {"go_backwards": True, "return_state": True},
        {"use_bias": False, "return_sequences": True},
        {"return_sequences": True, "zero_output_for_mask": True},
        {"go_backwards": True, "return_sequences": True, "zero_output_for_mask": True},
        {"zero_output_for_mask": True, "return_state": True},
        # unroll: a speed hint, same results (not with go_backwards here: Keras 3.15's own LSTM
        # fails on this backend with unroll, go_backwards and a mask together)
        {"unroll": True, "return_sequences": True, "return_state": True},
    ],
    ids=lambda kw: "-".join(kw) or "default",
)
def test_matches_keras(kw, mask_kind):
    rng = np.random.default_rng(0)
    ref, ours = pair(rng, **kw)
    compare(ref, ours, rng.standard_normal((B, T, E)).astype(np.float32), mask=masks()[mask_kind])


def test_initial_state_and_float64_match_keras():
    rng = np.random.default_rng(1)
    ref, ours = pair(rng, return_sequences=True, return_state=True)
    x = rng.standard_normal((B, T, E)).astype(np.float32)
    state = [rng.standard_normal((B, H)).astype(np.float32) for _ in range(2)]
    compare(ref, ours, x, initial_state=state, mask=masks()["right"])
    ref, ours = pair(rng, dtype="float64", return_sequences=True)
    compare(ref, ours, x.astype(np.float64), tol=1e-12)


@pytest.mark.parametrize("mask_kind", ["right", "left"])
@pytest.mark.parametrize("return_sequences", [True, False])
def test_bidirectional_matches_keras(mask_kind, return_sequences):
    rng = np.random.default_rng(2)
    kw = dict(return_sequences=return_sequences, return_state=True)
    ref = keras.layers.Bidirectional(keras.layers.LSTM(H, **kw))
    ours = keras.layers.Bidirectional(fk.LSTM(H, **kw))
    ref.build((None, T, E))
    ours.build((None, T, E))
    ref.set_weights([w + 0.3 * rng.standard_normal(w.shape).astype(w.dtype) for w in ref.get_weights()])
    ours.set_weights(ref.get_weights())
    state = [rng.standard_normal((B, H)).astype(np.float32) for _ in range(4)]
    x = rng.standard_normal((B, T, E)).astype(np.float32)
    compare(ref, ours, x, mask=masks()[mask_kind], initial_state=state)


def test_inference_keeps_no_cache_and_dropout_only_in_training(monkeypatch):
    from fusedlstm.keras import torch_op

    seen = []

    def spy(*args, **kw):
        seen.append(kw["training"])
        return real(*args, **kw)

    real = torch_op.lstm_forward
    monkeypatch.setattr(torch_op, "lstm_forward", spy)
    rng = np.random.default_rng(3)
    x = torch.tensor(rng.standard_normal((B, T, E)).astype(np.float32))
    layer = fk.LSTM(H, dropout=0.5, seed=1)
    plain = layer(x)  # the weights require grad: the kernel keeps its cache
    with torch.no_grad():
        again = layer(x, training=False)  # no graph: no cache
    model = keras.Sequential([keras.Input((T, E)), layer])
    predicted = model.predict(x.numpy(), verbose=0)  # Keras predicts without a graph
    assert seen == [True, False, False]
    np.testing.assert_array_equal(again.numpy(), plain.detach().numpy())
    np.testing.assert_allclose(predicted, plain.detach().numpy(), rtol=1e-6, atol=1e-6)
    dropped = layer(x, training=True)
    assert np.abs(dropped.detach().numpy() - plain.detach().numpy()).max() > 1e-3


def test_the_cache_serves_one_backward():
    layer = fk.LSTM(H)
    y = layer(torch.randn(B, T, E, requires_grad=True))
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cache was already used"):
        y.sum().backward()


def test_fit_predict_save_load(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((32, T, E)).astype(np.float32)
    y = (x[:, :, 0].sum(axis=1) > 0).astype(np.float32)[:, None]
    model = keras.Sequential([keras.Input((T, E)), fk.LSTM(H), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(keras.optimizers.Adam(1e-2), "binary_crossentropy")
    before = [w.copy() for w in model.layers[0].get_weights()]
    hist = model.fit(x, y, epochs=5, batch_size=8, verbose=0)
    assert hist.history["loss"][-1] < hist.history["loss"][0]
    assert all(np.abs(a - b).max() > 0 for a, b in zip(model.layers[0].get_weights(), before))
    pred = model.predict(x, verbose=0)
    model.save(tmp_path / "m.keras")
    back = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(back.layers[0], fk.LSTM)
    np.testing.assert_array_equal(back.predict(x, verbose=0), pred)


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

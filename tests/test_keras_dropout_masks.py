"""fusedlstm.keras.LSTM against keras.layers.LSTM with the same weights for what the kernel took on
from Keras's generic loop: masks with holes (state carried through masked steps; outputs as Keras
repeats or zeros them; go_backwards, return_state, initial states, Bidirectional), Keras's
activations (tanh, relu, linear, sigmoid, hard_sigmoid, by name, None or function), and
recurrent_dropout (with and without dropout). Dropout is compared with the masks both layers draw
from seed generators of the same seed (ours draws Keras's masks in Keras's order and shapes).
Outputs, states and gradients (inputs and weights). Written in keras.ops so one file serves both
backends: collected here on the TensorFlow backend, and run by tests/test_keras_torch.py on the
torch backend."""

import importlib.util
import os

import numpy as np
import pytest

from helpers import KERAS_SHAPE, assert_keras_results_match

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
# Holes: a row with a masked first and last step, a row with no valid step, isolated valid steps.
HOLES = np.array(
    [[1, 1, 0, 1, 0, 1], [0, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 1]],
    bool,
)


def numpy(t):
    return np.asarray(keras.ops.convert_to_numpy(t))


def as_list(y):
    return list(y) if isinstance(y, (list, tuple)) else [y]


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


def copy_weights(ref, ours, rng):
    ref.set_weights([w + 0.3 * rng.standard_normal(w.shape).astype(w.dtype) for w in ref.get_weights()])
    ours.set_weights(ref.get_weights())


def pair(rng, wrap=None, **kw):
    """keras.layers.LSTM and fusedlstm.keras.LSTM (each in `wrap`, e.g. Bidirectional, if given)
    built alike from kw, with the same random non-default weights."""
    ref, ours = keras.layers.LSTM(H, **kw), fk.LSTM(H, **kw)
    if wrap is not None:
        ref, ours = wrap(ref), wrap(ours)
    ref.build((None, T, E))
    ours.build((None, T, E))
    copy_weights(ref, ours, rng)
    return ref, ours


def compare(ref, ours, x, tol=2e-5, **kw):
    assert_keras_results_match(call_with_grads(ref, x, **kw), call_with_grads(ours, x, **kw), tol)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"return_sequences": True, "return_state": True},
        {"go_backwards": True, "return_sequences": True, "return_state": True},
        {"go_backwards": True},
        {"zero_output_for_mask": True, "return_sequences": True},
        {"zero_output_for_mask": True, "return_state": True},  # the last output: zeros, its step masked
        {"zero_output_for_mask": True, "go_backwards": True, "return_sequences": True},
        {"zero_output_for_mask": True, "go_backwards": True},
    ],
    ids=lambda kw: "-".join(kw) or "default",
)
def test_masks_with_holes_match_keras(kw):
    rng = np.random.default_rng(0)
    ref, ours = pair(rng, **kw)
    x = rng.standard_normal((B, T, E)).astype(np.float32)
    state = [rng.standard_normal((B, H)).astype(np.float32) for _ in range(2)]
    compare(ref, ours, x, mask=HOLES, initial_state=state)
    # Not the same as the mask's runs pushed together: the state is carried across each hole,
    # and the outputs sit at their steps.
    if kw.get("return_sequences") and not kw.get("go_backwards"):
        y = numpy(as_list(ours(x, mask=HOLES, initial_state=state))[0])
        if kw.get("zero_output_for_mask"):
            assert (y[~HOLES] == 0).all() and np.abs(y[HOLES]).min() > 0
        else:  # the previous output repeated at a masked step, zeros before the first valid one
            np.testing.assert_array_equal(y[0, 2], y[0, 1])
            np.testing.assert_array_equal(y[1, 0], np.zeros(H, np.float32))
            np.testing.assert_array_equal(y[2], np.zeros((T, H), np.float32))


@pytest.mark.parametrize("return_sequences", [True, False])
def test_bidirectional_with_holes_matches_keras(return_sequences):
    rng = np.random.default_rng(1)
    kw = dict(return_sequences=return_sequences, return_state=True)
    ref, ours = pair(rng, wrap=keras.layers.Bidirectional, **kw)
    state = [rng.standard_normal((B, H)).astype(np.float32) for _ in range(4)]
    x = rng.standard_normal((B, T, E)).astype(np.float32)
    compare(ref, ours, x, mask=HOLES, initial_state=state)


@pytest.mark.parametrize(
    "activation,recurrent_activation,kw",
    [
        ("relu", "hard_sigmoid", {"return_sequences": True, "return_state": True}),
        ("linear", "sigmoid", {"return_state": True}),
        (None, "tanh", {"go_backwards": True, "return_sequences": True}),
        ("sigmoid", "relu", {"return_sequences": True}),
        ("hard_sigmoid", "linear", {"return_state": True, "go_backwards": True}),
        ("tanh", "hard_sigmoid", {"return_sequences": True}),
    ],
    ids=lambda v: v if isinstance(v, str) else ("none" if v is None else "-".join(v) or "default"),
)
def test_activations_match_keras(activation, recurrent_activation, kw):
    rng = np.random.default_rng(2)
    ref, ours = pair(rng, activation=activation, recurrent_activation=recurrent_activation, **kw)
    x = rng.standard_normal((B, T, E)).astype(np.float32)
    compare(ref, ours, x)
    compare(ref, ours, x, mask=HOLES)
    # And it is not the classic LSTM: the same weights with tanh/sigmoid give other outputs.
    classic = fk.LSTM(H, **kw)
    classic.build((None, T, E))
    classic.set_weights(ours.get_weights())
    assert np.abs(numpy(as_list(classic(x))[0]) - numpy(as_list(ours(x))[0])).max() > 1e-3


def test_activations_given_as_functions():
    rng = np.random.default_rng(3)
    ref, ours = pair(rng, activation=keras.activations.relu, recurrent_activation=keras.activations.hard_sigmoid)
    assert ours.get_config()["activation"] == "relu"
    assert ours.get_config()["recurrent_activation"] == "hard_sigmoid"
    compare(ref, ours, rng.standard_normal((B, T, E)).astype(np.float32))


@pytest.mark.parametrize(
    "kw",
    [
        {"recurrent_dropout": 0.3, "return_sequences": True, "return_state": True},
        {"recurrent_dropout": 0.4, "dropout": 0.25, "go_backwards": True, "return_sequences": True},
        {"recurrent_dropout": 0.3, "activation": "relu", "return_state": True},
        {"dropout": 0.3, "return_sequences": True},  # one input mask
        # One input mask per gate without recurrent dropout (Keras 3.15 needs use_cudnn=False
        # for it: its "auto" path fails on either backend).
        {"dropout": 0.3, "implementation": 1, "use_cudnn": False, "return_state": True},
    ],
    ids=lambda kw: "-".join(kw),
)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "holes"])
def test_dropout_matches_keras_with_the_same_seed(kw, masked):
    """Both layers have seed generators of seed 7 and draw the same masks (Keras's input mask,
    or one per gate under implementation 1 or recurrent_dropout, then its four recurrent masks),
    in training only."""
    rng = np.random.default_rng(4)
    ref, ours = pair(rng, seed=7, **kw)
    x = rng.standard_normal((B, T, E)).astype(np.float32)
    mask = HOLES if masked else None
    dropped = call_with_grads(ours, x, mask=mask, training=True)
    ref_dropped = call_with_grads(ref, x, mask=mask, training=True)
    assert_keras_results_match(ref_dropped, dropped)
    # Training only: without it both are the plain LSTM, and it does change the result.
    plain = call_with_grads(ours, x, mask=mask, training=False)
    assert_keras_results_match(call_with_grads(ref, x, mask=mask, training=False), plain)
    assert np.abs(plain[0][0] - dropped[0][0]).max() > 1e-3
    # A second training call draws new masks (once per call, not once per layer), as Keras's,
    # whose generator moved on at the inference call too.
    again = call_with_grads(ours, x, mask=mask, training=True)
    assert np.abs(again[0][0] - dropped[0][0]).max() > 1e-3
    assert_keras_results_match(call_with_grads(ref, x, mask=mask, training=True), again)


def test_bidirectional_recurrent_dropout_matches_keras():
    rng = np.random.default_rng(5)
    ref, ours = pair(rng, wrap=keras.layers.Bidirectional, recurrent_dropout=0.3, seed=11, return_sequences=True)
    x = rng.standard_normal((B, T, E)).astype(np.float32)
    compare(ref, ours, x, mask=HOLES, training=True)


def test_fit_with_recurrent_dropout_and_holes():
    """model.fit with recurrent_dropout over an embedding whose mask has holes (a padding id in
    the middle): the weights move and the loss goes down; predict is deterministic."""
    rng = np.random.default_rng(6)
    ids = rng.integers(1, 9, (32, T))
    ids[rng.random((32, T)) < 0.3] = 0  # holes anywhere
    y = (ids[:, -1] > 4).astype(np.float32)[:, None]
    model = keras.Sequential(
        [
            keras.Input((T,), dtype="int32"),
            keras.layers.Embedding(9, E, mask_zero=True),
            fk.LSTM(H, recurrent_dropout=0.2, dropout=0.1, activation="relu", seed=1),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(keras.optimizers.Adam(2e-2), "binary_crossentropy")
    before = [w.copy() for w in model.layers[1].get_weights()]
    hist = model.fit(ids, y, epochs=6, batch_size=8, verbose=0)
    assert hist.history["loss"][-1] < hist.history["loss"][0]
    assert all(np.abs(a - b).max() > 0 for a, b in zip(model.layers[1].get_weights(), before))
    np.testing.assert_array_equal(model.predict(ids, verbose=0), model.predict(ids, verbose=0))


def test_config_round_trip_with_the_new_arguments():
    ref = keras.layers.LSTM(
        5,
        activation="relu",
        recurrent_activation=keras.activations.hard_sigmoid,
        recurrent_dropout=0.2,
        dropout=0.1,
        seed=4,
        return_sequences=True,
    )
    cfg = ref.get_config()
    assert cfg["activation"] == "relu" and cfg["recurrent_dropout"] == 0.2
    ours = fk.LSTM.from_config(cfg)
    assert ours.get_config() == cfg
    assert keras.layers.LSTM.from_config(ours.get_config()).get_config() == cfg
    none = fk.LSTM(3, activation=None).get_config()["activation"]
    assert none == keras.layers.LSTM(3, activation=None).get_config()["activation"] == "linear"


def _identity(z):
    return z


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(activation="selu"), "activation='selu'"),
        (dict(activation="relu6"), "activation='relu6'"),  # a Keras activation the kernel lacks
        (dict(recurrent_activation="softmax"), "recurrent_activation='softmax'"),
        # A function of one's own, even one that computes a supported activation.
        (dict(recurrent_activation=_identity), "recurrent_activation=<function _identity"),
        (dict(recurrent_dropout=1.0), "recurrent_dropout must be"),
        (dict(recurrent_dropout=-0.1), "recurrent_dropout must be"),
        (dict(dropout=1.5), "dropout must be"),
    ],
)
def test_refused_arguments_are_named(kw, msg):
    with pytest.raises(ValueError, match=msg):
        fk.LSTM(H, **kw)
    if "activation" in next(iter(kw)):  # and as Keras's own function object too
        fn = getattr(keras.activations, str(next(iter(kw.values()))), None)
        if fn is not None:
            with pytest.raises(ValueError, match="the fused kernel implements"):
                fk.LSTM(H, **{next(iter(kw)): fn})

"""fusedlstm.keras.LSTM under a bfloat16 compute dtype (the mixed_bfloat16 policy, global or the
layer's own): the kernel runs with bfloat16 products on float32 inputs and the float32 variables,
and the layer returns bfloat16. Its outputs equal fusedlstm.lstm_forward(..., precision="bfloat16")
on the same weights (rounded to bfloat16 as the layer returns them) and differ from the float32
kernel's; its gradients are lstm_backward's of that forward, float32 for the variables; a
mixed_bfloat16 model fits; without AVX512_BF16 (simulated: set_bf16_engine("none")) it runs float32
products with a one-time warning; mixed_float16 keeps float32 products. The TensorFlow op's
precision attribute is checked raw too. Written in keras.ops where it can be, so one file serves
both backends: on the TensorFlow backend it also runs itself under KERAS_BACKEND=torch in a
process of its own (the backend is fixed at Keras's first import)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fusedlstm
from fusedlstm import _core

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
    from fusedlstm.keras import layer as fk_layer

B, T, E, H = 5, 9, 7, 16
# A bfloat16 has 8 significant bits: one unit in its last place is 2^-8 to 2^-7 of the value.
ULP = 2**-7
NO_BF16 = "this CPU lacks AVX512_BF16, which bfloat16 compute needs"
HOLES = np.array([[1, 1, 0, 1, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 0, 0, 0]] + [[1] * T] * (B - 2), bool)


@pytest.fixture
def bf16():
    if fusedlstm.bf16_engine() is None:
        pytest.skip(NO_BF16)


@pytest.fixture
def no_bf16(monkeypatch):
    """The machine as one without AVX512_BF16 (for the Python module; the layer asks it), and the
    layer's one-time warning not given yet."""
    monkeypatch.setattr(fk_layer, "_bf16_fallback_warned", False)
    _core.set_bf16_engine("none")
    try:
        yield
    finally:
        _core.set_bf16_engine("auto")


@pytest.fixture
def policy():
    """Sets the global dtype policy; back to float32 afterwards."""
    try:
        yield keras.mixed_precision.set_global_policy
    finally:
        keras.mixed_precision.set_global_policy("float32")


def problem(seed=0):
    rng = np.random.default_rng(seed)
    return rng, rng.standard_normal((B, T, E)).astype(np.float32)


def make_layer(how, set_policy, **kw):
    """A layer computing in bfloat16: by the global mixed_bfloat16 policy, or by its own dtype."""
    keras.utils.set_random_seed(11)
    if how == "global":
        set_policy("mixed_bfloat16")
        layer = fk.LSTM(H, **kw)
    else:
        layer = fk.LSTM(H, dtype="mixed_bfloat16", **kw)
    layer.build((None, T, E))
    assert layer.compute_dtype == "bfloat16" and all(w.dtype == "float32" for w in layer.weights)
    return layer


def as_f32(t) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(t, "float32")))


def returned_as(a, dtype) -> np.ndarray:
    """a as the layer returns it: cast by the backend to `dtype`, read back as float32."""
    return as_f32(keras.ops.cast(keras.ops.convert_to_tensor(a), dtype))


def weights(layer):
    return [np.asarray(w) for w in layer.get_weights()]


def outputs_and_grads(layer, x, g, **kw):
    """The layer's first result and the gradients (x, then the trainable weights) of
    sum(float32(result) * g) on the backend's own autodiff."""
    if _BACKEND == "tensorflow":
        import tensorflow as tf

        xv = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xv)
            ys = layer(xv, **kw)
            y = ys[0] if isinstance(ys, list) else ys
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * g)
        grads = tape.gradient(loss, [xv] + layer.trainable_weights)
        return y, [np.asarray(t) for t in grads]
    import torch

    xt = torch.tensor(x, requires_grad=True)
    ys = layer(xt, **kw)
    y = ys[0] if isinstance(ys, list) else ys
    (y.float() * torch.from_numpy(g)).sum().backward()
    return y.detach(), [xt.grad.numpy()] + [w.value.grad.numpy() for w in layer.trainable_weights]


@pytest.mark.parametrize("how", ["global", "layer"])
def test_outputs_are_the_bfloat16_kernels_and_differ_from_float32(how, policy, bf16):
    _, x = problem()
    layer = make_layer(how, policy, return_sequences=True, return_state=True)
    y, h_n, c_n = layer(x)
    assert all(keras.backend.standardize_dtype(t.dtype) == "bfloat16" for t in (y, h_n, c_n))
    # The layer's input is x as the policy casts it; the kernel rounds it (and h, the weights)
    # for its products itself, so x or bfloat16(x) give the same results here.
    xb = returned_as(x, "bfloat16")
    want = fusedlstm.lstm_forward(xb, *weights(layer), training=False, precision="bfloat16")[:3]
    f32 = fusedlstm.lstm_forward(xb, *weights(layer), training=False)[:3]
    for got, w, f in zip((y, h_n, c_n), want, f32):
        got, w, f = as_f32(got), returned_as(w, "bfloat16"), returned_as(f, "bfloat16")
        # The kernel's results to bfloat16's rounding. (The TensorFlow op and the Python module
        # are compiled apart and their float32 gate math may differ in a last bit, which can turn
        # a bfloat16 rounding of h the other way: a unit in the last place, rarely.) ...
        np.testing.assert_allclose(got, w, rtol=ULP, atol=1e-6)
        # ... within bfloat16-level tolerance of the float32 kernel's, and measurably not them:
        # bfloat16 products move many results by a unit of the bfloat16 output or more.
        np.testing.assert_allclose(got, f, rtol=0, atol=3e-2)
        assert np.mean(got != f) > 0.05, np.mean(got != f)
        assert np.mean(got != w) < 0.02


def test_masks_reverse_and_initial_states_run_bfloat16_products(policy, bf16):
    rng, x = problem(1)
    h0, c0 = (rng.standard_normal((B, H)).astype(np.float32) for _ in range(2))
    layer = make_layer("global", policy, return_state=True, go_backwards=True)
    state = [keras.ops.cast(s, "bfloat16") for s in (h0, c0)]
    _, h_n, c_n = layer(x, mask=keras.ops.convert_to_tensor(HOLES), initial_state=state)
    args = (returned_as(x, "bfloat16"), *weights(layer), returned_as(h0, "bfloat16"), returned_as(c0, "bfloat16"))
    want = fusedlstm.lstm_forward(*args, mask=HOLES, reverse=True, training=False, precision="bfloat16")
    f32 = fusedlstm.lstm_forward(*args, mask=HOLES, reverse=True, training=False)
    for got, w, f in zip((h_n, c_n), want[1:3], f32[1:3]):
        got = as_f32(got)
        np.testing.assert_allclose(got, returned_as(w, "bfloat16"), rtol=ULP, atol=1e-6)
        assert np.mean(got != returned_as(f, "bfloat16")) > 0.05


@pytest.mark.parametrize("how", ["global", "layer"])
def test_gradients_are_the_bfloat16_backward_in_float32(how, policy, bf16):
    rng, x = problem(2)
    layer = make_layer(how, policy, return_sequences=True)
    # An upstream gradient bfloat16 holds exactly: the cast of the outputs passes it unchanged.
    g = _core.round_bf16(rng.standard_normal((B, T, H)).astype(np.float32))
    y, (dx, dk, dr, db) = outputs_and_grads(layer, x, g)
    assert all(a.dtype == np.float32 for a in (dk, dr, db))  # not rounded to the compute dtype
    xb = returned_as(x, "bfloat16")
    cache = fusedlstm.lstm_forward(xb, *weights(layer), precision="bfloat16")[3]
    want = fusedlstm.lstm_backward(cache, d_outputs=g)
    cache = fusedlstm.lstm_forward(xb, *weights(layer))[3]
    f32 = fusedlstm.lstm_backward(cache, d_outputs=g)
    # The input gradient reaches x through the policy's cast to bfloat16.
    pairs = {
        "kernel": (dk, want.kernel, f32.kernel),
        "recurrent_kernel": (dr, want.recurrent_kernel, f32.recurrent_kernel),
        "bias": (db, want.bias, f32.bias),
        "x": (dx, returned_as(want.x, "bfloat16"), returned_as(f32.x, "bfloat16")),
    }
    for name, (got, w, f) in pairs.items():
        # Equal up to summation order, or (on the TensorFlow op, compiled apart from the Python
        # module) a rare bfloat16 rounding of h turned the other way by a last-bit difference
        # in float32; the float32 kernel's gradients are ten times further off or more.
        scale = np.abs(w).max()
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=2e-4 * scale, err_msg=name)
        near, far = (np.linalg.norm(got - ref) / np.linalg.norm(ref) for ref in (w, f))
        assert near < 1e-4 and far > 3e-4, (name, near, far)


def test_a_mixed_bfloat16_model_fits(policy, bf16, monkeypatch):
    chosen = []
    real = fk_layer._kernel_precision

    def spy(compute_dtype):
        chosen.append(real(compute_dtype))
        return chosen[-1]

    monkeypatch.setattr(fk_layer, "_kernel_precision", spy)
    policy("mixed_bfloat16")
    keras.utils.set_random_seed(0)
    rng, _ = problem(3)
    x = rng.standard_normal((64, T, E)).astype(np.float32)
    target = np.tanh(x[:, :, :2].sum(axis=(1, 2)) / 3)[:, None].astype(np.float32)
    lstm = fk.LSTM(H, return_sequences=True)
    model = keras.Sequential([keras.Input((T, E)), keras.layers.Bidirectional(lstm), fk.LSTM(H), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    before = [w.copy() for w in lstm.get_weights()]
    loss = model.fit(x, target, batch_size=16, epochs=8, verbose=0).history["loss"]
    assert np.isfinite(loss).all() and loss[-1] < 0.7 * loss[0], loss
    assert all(np.abs(a - b).max() > 0 for a, b in zip(lstm.get_weights(), before))
    assert all(w.dtype == "float32" for w in model.weights)
    assert chosen and set(chosen) == {"bfloat16"}  # every fused layer ran bfloat16 products
    y = lstm(x[:4])
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    want = fusedlstm.lstm_forward(returned_as(x[:4], "bfloat16"), *weights(lstm), training=False, precision="bfloat16")
    np.testing.assert_allclose(as_f32(y), returned_as(want[0], "bfloat16"), rtol=ULP, atol=1e-6)


def test_without_avx512_bf16_it_runs_float32_products_and_warns_once(policy, no_bf16):
    assert fusedlstm.bf16_engine() is None
    _, x = problem(4)
    layer = make_layer("global", policy, return_sequences=True, return_state=True)
    with pytest.warns(RuntimeWarning, match=r"bfloat16 products need AVX512_BF16.*float32 products instead"):
        y, h_n, c_n = layer(x)
    assert all(keras.backend.standardize_dtype(t.dtype) == "bfloat16" for t in (y, h_n, c_n))
    want = fusedlstm.lstm_forward(returned_as(x, "bfloat16"), *weights(layer), training=False)[:3]
    for got, w in zip((y, h_n, c_n), want):
        np.testing.assert_allclose(as_f32(got), returned_as(w, "bfloat16"), rtol=ULP, atol=1e-6)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(x)
        # and a model written for mixed_bfloat16 trains
        model = keras.Sequential([keras.Input((T, E)), fk.LSTM(H), keras.layers.Dense(1)])
        model.compile(keras.optimizers.Adam(1e-2), "mse")
        before = [w.copy() for w in model.layers[0].get_weights()]
        loss = model.fit(x, np.ones((B, 1), np.float32), epochs=3, verbose=0).history["loss"]
    assert not [w for w in caught if "bfloat16 products need" in str(w.message)]  # once per process
    assert np.isfinite(loss).all()
    assert all(np.abs(a - b).max() > 0 for a, b in zip(model.layers[0].get_weights(), before))


def test_mixed_float16_keeps_float32_products_on_the_float32_weights(policy):
    _, x = problem(5)
    policy("mixed_float16")
    layer = fk.LSTM(H, return_state=True)
    _, h_n, c_n = layer(x)
    assert keras.backend.standardize_dtype(h_n.dtype) == "float16"
    # The kernel reads the float32 variables (not rounded to float16) and float16(x).
    want = fusedlstm.lstm_forward(returned_as(x, "float16"), *weights(layer), training=False)
    for got, w in zip((h_n, c_n), want[1:3]):
        np.testing.assert_allclose(as_f32(got), returned_as(w, "float16"), rtol=2**-11, atol=1e-7)


if _BACKEND == "tensorflow" and importlib.util.find_spec("tensorflow") is not None:
    import tensorflow as tf

    from fusedlstm.keras import ops as fk_ops

    def raw_problem(seed=6, dtype=np.float32):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((B, T, E)).astype(dtype)
        k = (rng.standard_normal((E, 4 * H)) * 0.3).astype(dtype)
        r = (rng.standard_normal((H, 4 * H)) * 0.3).astype(dtype)
        b = (rng.standard_normal(4 * H) * 0.1).astype(dtype)
        h0 = np.zeros((B, H), dtype)
        return x, k, r, b, h0, h0.copy()

    def test_the_ops_precision_attribute_runs_the_bfloat16_kernels(bf16):
        args = raw_problem()
        out = fk_ops.fused_lstm(*args, step_mask=HOLES, training=False, precision="bfloat16")
        want = fusedlstm.lstm_forward(*args, mask=HOLES, training=False, precision="bfloat16")
        f32 = fusedlstm.lstm_forward(*args, mask=HOLES, training=False)
        for got, w, f in zip(out[:3], want[:3], f32[:3]):
            # The op and the Python module are compiled apart: their float32 gate math may
            # differ in a last bit (it does in float32 too), and a bfloat16 rounding with it.
            np.testing.assert_allclose(got.numpy(), w, rtol=1e-3, atol=1e-4)
            near, far = (np.linalg.norm(got.numpy() - ref) / np.linalg.norm(ref) for ref in (w, f))
            assert near < 1e-4 and far > 3e-4, (near, far)

    @pytest.mark.parametrize("training", [True, False])
    def test_the_registered_gradient_runs_the_backward_in_the_forwards_precision(training, bf16):
        # training=False: the gradient runs the forward again, with a cache, in the same precision.
        x, k, r, b, h0, c0 = (tf.constant(a) for a in raw_problem(7))
        g = np.random.default_rng(8).standard_normal((B, T, H)).astype(np.float32)
        with tf.GradientTape() as tape:
            tape.watch([x, k, r, b, h0, c0])
            out = fk_ops.fused_lstm(x, k, r, b, h0, c0, training=training, reverse=True, precision="bfloat16")
            loss = tf.reduce_sum(out[0] * g) + tf.reduce_sum(out[2])
        got = tape.gradient(loss, [x, k, r, b, h0, c0])
        cache = fusedlstm.lstm_forward(*(a.numpy() for a in (x, k, r, b, h0, c0)), reverse=True, precision="bfloat16")[
            3
        ]
        want = fusedlstm.lstm_backward(cache, d_outputs=g, d_c_n=np.ones((B, H), np.float32))
        for a, w in zip(got, want):
            np.testing.assert_allclose(a.numpy(), w, rtol=1e-5, atol=1e-5 * np.abs(w).max())

    def test_the_op_refuses_bfloat16_on_float64_and_unknown_codes(bf16):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"float32 tensors.*got float64"):
            fk_ops.fused_lstm(*raw_problem(dtype=np.float64), precision="bfloat16")
        lib = fk_ops.load_ops()
        x, k, r, b, h0, c0 = raw_problem()
        empty = (tf.zeros((0,), tf.int32), tf.zeros((0,), tf.bool), tf.zeros((0,), tf.float32))
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"precision: 0 \(float32\) or 1 \(bfloat16\), got 2"):
            lib.fused_lstm(x, k, r, b, h0, c0, *empty, precision=2)
        with pytest.raises(ValueError, match="precision"):
            fk_ops.fused_lstm(x, k, r, b, h0, c0, precision="float16")

    @pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch (CI installs torch==2.13.0)")
    def test_the_torch_backend():
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(Path(__file__).resolve())],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=Path(__file__).resolve().parent,
            env=dict(os.environ, KERAS_BACKEND="torch"),
        )
        print(r.stdout[-3000:])
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
        last = r.stdout.strip().splitlines()[-1]
        assert " passed" in last
        if fusedlstm.bf16_engine() is not None:
            assert "skipped" not in last, last

"""fusedlstm.keras.LSTM under tf.distribute.MultiWorkerMirroredStrategy: two worker processes on
localhost (TF_CONFIG, free ports), each loading the compiled op itself, train a small model with a
custom loop over the same global batches as one process alone; both workers end with the weights
the single process ends with.

Tolerance 1e-5: each global batch's gradient is the sum of the two workers' halves (an all-reduce)
where the single process sums the batch in one reduction, so the float32 sums round in a different
order; nothing else differs (same seeded initial weights, same batches, plain SGD)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

pytestmark = [
    pytest.mark.heavy,
    pytest.mark.skipif(
        importlib.util.find_spec("tensorflow") is None,
        reason="TensorFlow is not installed (CI installs tensorflow-cpu)",
    ),
]

WORKER = r"""
import os, sys
import numpy as np
import tensorflow as tf
import keras
import fusedlstm.keras as fk

out = sys.argv[1]
multi = "TF_CONFIG" in os.environ
fk.load_ops()  # each worker process loads the op library itself (from the per-user cache)
strategy = tf.distribute.MultiWorkerMirroredStrategy() if multi else tf.distribute.OneDeviceStrategy("/cpu:0")
GB, STEPS, T, E, H = 16, 8, 6, 5, 7
rng = np.random.default_rng(0)
x = rng.standard_normal((GB * STEPS, T, E)).astype(np.float32)
y = (x[:, :, 0].sum(1) > 0).astype(np.int32)

def dataset(ctx):
    # Input pipeline i of n gets rows i*GB/n .. (i+1)*GB/n of every global batch, in order.
    n, i = ctx.num_input_pipelines, ctx.input_pipeline_id
    per = GB // n
    print("input pipelines", n, "per-replica batch", per)
    idx = np.concatenate([np.arange(s + i * per, s + (i + 1) * per) for s in range(0, GB * STEPS, GB)])
    return tf.data.Dataset.from_tensor_slices((x[idx], y[idx])).batch(per)

with strategy.scope():
    keras.utils.set_random_seed(0)
    inp = keras.Input((T, E))
    model = keras.Model(inp, keras.layers.Dense(2)(fk.LSTM(H)(inp)))
    opt = keras.optimizers.SGD(0.1)
np.savez(out + ".init.npz", *[np.asarray(w) for w in model.get_weights()])

@tf.function
def train_step(batch):
    def replica(xb, yb):
        with tf.GradientTape() as tape:
            logits = model(xb, training=True)
            per_example = keras.losses.sparse_categorical_crossentropy(yb, logits, from_logits=True)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=GB)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
    strategy.run(replica, args=batch)

for epoch in range(2):
    for batch in strategy.distribute_datasets_from_function(dataset):
        train_step(batch)
np.savez(out, *[np.asarray(w) for w in model.get_weights()])
print("steps", int(opt.iterations.numpy()))
"""


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def env_for(tf_config: dict | None) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


def test_two_workers_end_with_the_weights_of_one(tmp_path):
    one = subprocess.run(
        [sys.executable, "-c", WORKER, str(tmp_path / "one.npz")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env_for(None),
    )
    assert one.returncode == 0, one.stderr[-3000:]
    ports = free_ports(2)
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tmp_path / f"w{i}.npz")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env_for({"cluster": cluster, "task": {"type": "worker", "index": i}}),
        )
        for i in range(2)
    ]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:  # a worker left waiting for its peer is stopped, never left behind
            if p.poll() is None:
                p.kill()
                p.communicate()
    for rc, out, err in results:
        assert rc == 0, err[-3000:]
        assert "steps 16" in out, out  # 2 epochs x 8 global batches on each worker
        assert "input pipelines 2 per-replica batch 8" in out, out  # each worker read half of each batch
    assert "input pipelines 1 per-replica batch 16" in one.stdout, one.stdout
    want, init = np.load(tmp_path / "one.npz"), np.load(tmp_path / "one.npz.init.npz")
    # the weights moved: the comparison is not between two untrained models
    assert min(float(np.abs(want[k] - init[k]).max()) for k in want.files) > 1e-3
    for i in range(2):
        got = np.load(tmp_path / f"w{i}.npz")
        assert len(got.files) == len(want.files) == 5  # LSTM kernel, recurrent kernel, bias; dense w, b
        for k in want.files:
            np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-5, err_msg=f"worker {i} {k}")

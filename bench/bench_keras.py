"""A Keras training step, fusedlstm.keras.LSTM vs keras.layers.LSTM, side by side in one run:
loss on the last state, gradients for the weights and the inputs, at the kernel benchmark's
configs. On the TensorFlow backend (default) each step is a tf.function around a GradientTape;
with --backend torch it is an eager forward and loss.backward() on CPU tensors. Prints a table;
writes JSON only with --out (the README's are bench/results/keras.json and keras_torch.json).

    python bench/bench_keras.py [--backend tensorflow|torch] [--quick] [--config B,T,E,H ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Keras fixes its backend when first imported: read --backend before that.
BACKEND = (
    "torch"
    if "--backend=torch" in sys.argv
    or "torch" in (sys.argv[sys.argv.index("--backend") + 1 :][:1] if "--backend" in sys.argv else [])
    else "tensorflow"
)
os.environ["KERAS_BACKEND"] = BACKEND
import keras  # noqa: E402
import numpy as np  # noqa: E402

import fusedlstm  # noqa: E402
import fusedlstm.keras as fk  # noqa: E402
from fusedlstm.bench.cli import parse_config  # noqa: E402
from fusedlstm.bench.implementations import DEFAULT_CONFIGS, is_big, mode_flops  # noqa: E402
from fusedlstm.bench.report import git_commit, utc_date, write_json  # noqa: E402
from fusedlstm.bench.timing import time_interleaved  # noqa: E402


def step_fn(layer, x):
    if BACKEND == "torch":
        return torch_step_fn(layer, x)
    import tensorflow as tf

    weights = layer.trainable_weights

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            _, h, _ = layer(x)
            loss = tf.reduce_sum(h * h)
        return tape.gradient(loss, weights + [x])

    def run():
        for g in step():
            g.numpy()  # wait for the result

    return run


def torch_step_fn(layer, x):
    import torch

    xt = torch.tensor(x, requires_grad=True)
    params = [w.value for w in layer.trainable_weights]

    def run():
        for t in [xt] + params:
            t.grad = None
        _, h, _ = layer(xt)
        (h * h).sum().backward()

    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=parse_config, action="append")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON report there (default: none)")
    ap.add_argument(
        "--backend", choices=["tensorflow", "torch"], default="tensorflow", help="Keras backend (default tensorflow)"
    )
    args = ap.parse_args(argv)
    rows = []
    for cfg in args.config or DEFAULT_CONFIGS:
        B, T, E, H = cfg
        x = np.random.default_rng(0).standard_normal((B, T, E)).astype(np.float32)
        if BACKEND == "tensorflow":
            x = keras.ops.convert_to_tensor(x)
        ref, ours = keras.layers.LSTM(H, return_state=True), fk.LSTM(H, return_state=True)
        ref.build((None, T, E))
        ours.build((None, T, E))
        ours.set_weights(ref.get_weights())
        big = is_big(cfg)
        stats = time_interleaved(
            {"fusedlstm.keras": step_fn(ours, x), "keras": step_fn(ref, x)},
            reps=5 if args.quick else (9 if big else 31),
            warmup=2,
            budget_s=5 if args.quick else 30,
        )
        for st in stats.values():
            st["gflops"] = mode_flops("forward+backward", cfg) / st["median_s"] / 1e9
        rows.append({"config": list(cfg), "impls": stats})
        r = stats["keras"]["median_s"] / stats["fusedlstm.keras"]["median_s"]
        print(
            f"{str(cfg):>22}  fusedlstm.keras {stats['fusedlstm.keras']['median_s'] * 1e3:9.2f} ms   "
            f"keras.layers.LSTM {stats['keras']['median_s'] * 1e3:9.2f} ms   speed-up {r:.2f}x",
            flush=True,
        )
    if args.out is None:
        print("note: no JSON written (--out FILE writes one)", file=sys.stderr)
        return
    write_json(
        args.out,
        {
            "benchmark": "keras_train_step",
            "commit": git_commit(),
            "date": utc_date(),
            "backend": BACKEND,
            "keras": keras.__version__,
            BACKEND: importlib.import_module(BACKEND).__version__,
            "build": fusedlstm.build_info(),
            "results": rows,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

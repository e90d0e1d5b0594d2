"""A Keras training step, fusedlstm.keras.LSTM vs keras.layers.LSTM, side by side in one run:
loss on the last state, gradients for the weights and the inputs, at the kernel benchmark's
configs; and two variants at (64, 50, 300, 128) where Keras leaves its fast path:
`recurrent_dropout=0.2` (training) and a mask with holes (a third of the steps masked at random).
On the TensorFlow backend (default) each step is a tf.function around a GradientTape; with
--backend torch it is an eager forward and loss.backward() on CPU tensors. Prints a table;
writes JSON only with --out (the README's are bench/results/keras.json and keras_torch.json).

    python bench/bench_keras.py [--backend tensorflow|torch] [--quick] [--config B,T,E,H ...]
        [--variants plain,recurrent_dropout,holes] [--out FILE]
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

VARIANTS = {"plain": {}, "recurrent_dropout": {"recurrent_dropout": 0.2}, "holes": {}}
VARIANT_CONFIGS = [(64, 50, 300, 128)]  # where the variants run by default


def step_fn(layer, x, mask=None):
    if BACKEND == "torch":
        return torch_step_fn(layer, x, mask)
    import tensorflow as tf

    weights = layer.trainable_weights

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            _, h, _ = layer(x, mask=mask, training=True)
            loss = tf.reduce_sum(h * h)
        return tape.gradient(loss, weights + [x])

    def run():
        for g in step():
            g.numpy()  # wait for the result

    return run


def torch_step_fn(layer, x, mask=None):
    import torch

    xt = torch.tensor(x, requires_grad=True)
    mt = None if mask is None else torch.tensor(mask)
    params = [w.value for w in layer.trainable_weights]

    def run():
        for t in [xt] + params:
            t.grad = None
        _, h, _ = layer(xt, mask=mt, training=True)
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
    ap.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated subset of plain,recurrent_dropout,holes (the last two run at "
        f"{VARIANT_CONFIGS[0]} unless --config is given)",
    )
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"error: --variants: unknown {bad}; choose from {list(VARIANTS)}")
    plan = [(tuple(c), "plain") for c in (args.config or DEFAULT_CONFIGS) if "plain" in variants]
    plan += [(tuple(c), v) for v in variants if v != "plain" for c in (args.config or VARIANT_CONFIGS)]
    rows = []
    for cfg, variant in plan:
        B, T, E, H = cfg
        rng = np.random.default_rng(0)
        x = rng.standard_normal((B, T, E)).astype(np.float32)
        mask = None
        if variant == "holes":
            mask = rng.random((B, T)) >= 1 / 3
            mask[:, 0] = True
        if BACKEND == "tensorflow":
            x = keras.ops.convert_to_tensor(x)
            mask = None if mask is None else keras.ops.convert_to_tensor(mask)
        kw = VARIANTS[variant]
        ref, ours = keras.layers.LSTM(H, return_state=True, **kw), fk.LSTM(H, return_state=True, **kw)
        ref.build((None, T, E))
        ours.build((None, T, E))
        ours.set_weights(ref.get_weights())
        big = is_big(cfg)
        stats = time_interleaved(
            {"fusedlstm.keras": step_fn(ours, x, mask), "keras": step_fn(ref, x, mask)},
            reps=5 if args.quick else (9 if big else 31),
            warmup=2,
            budget_s=5 if args.quick else 30,
        )
        for st in stats.values():
            st["gflops"] = mode_flops("forward+backward", cfg) / st["median_s"] / 1e9
        rows.append({"config": list(cfg), "variant": variant, "impls": stats})
        r = stats["keras"]["median_s"] / stats["fusedlstm.keras"]["median_s"]
        print(
            f"{str(cfg):>22} {variant:>17}  fusedlstm.keras {stats['fusedlstm.keras']['median_s'] * 1e3:9.2f} ms   "
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

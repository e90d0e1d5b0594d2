"""How far bfloat16 compute lands from the exact result: h_n and the gradients of one LSTM layer
against a float64 oracle (fusedlstm.reference in float64), for fusedlstm's precision="bfloat16",
torch.nn.LSTM under torch.autocast(dtype=torch.bfloat16), and both in float32 for scale, on the
same inputs at Keras's default initialisation (glorot-uniform kernel, orthogonal recurrent
kernel, unit forget bias). Errors are max |a - oracle| / max |oracle| per array; the gradients
are those of sum(h_n * g) for a fixed random g.

    python bench/bench_bf16_accuracy.py [--config B,T,E,H ...] [--out bench/results/bf16_accuracy.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import fusedlstm
from fusedlstm import reference

CONFIGS = [(64, 50, 300, 128), (128, 100, 256, 512)]


def keras_init(rng, E: int, H: int):
    lim = np.sqrt(6 / (E + 4 * H))
    W = rng.uniform(-lim, lim, (E, 4 * H))
    q, r = np.linalg.qr(rng.standard_normal((4 * H, H)))
    R = (q * np.sign(np.diag(r))).T
    b = np.zeros(4 * H)
    b[H : 2 * H] = 1
    return W.astype(np.float32), R.astype(np.float32), b.astype(np.float32)


def rel(a, oracle) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - oracle)) / np.max(np.abs(oracle)))


def ours(x, W, R, b, g, precision):
    _, h, _, cache = fusedlstm.lstm_forward(x, W, R, b, return_sequences=False, precision=precision)
    gr = fusedlstm.lstm_backward(cache, None, g)
    return h, {"x": gr.x, "kernel": gr.kernel, "recurrent_kernel": gr.recurrent_kernel, "bias": gr.bias}


def torch_lstm(x, W, R, b, g, bf16: bool):
    import contextlib

    import torch

    E, H = W.shape[0], R.shape[0]
    lstm = torch.nn.LSTM(E, H, batch_first=True)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(torch.from_numpy(W.T.copy()))
        lstm.weight_hh_l0.copy_(torch.from_numpy(R.T.copy()))
        lstm.bias_ih_l0.copy_(torch.from_numpy(b))
        lstm.bias_hh_l0.zero_()
    tx = torch.from_numpy(x).requires_grad_(True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with ctx:
        _, (h, _) = lstm(tx)
    h = h[0].float()
    (h * torch.from_numpy(g)).sum().backward()
    grads = {
        "x": tx.grad.numpy(),
        "kernel": lstm.weight_ih_l0.grad.numpy().T,
        "recurrent_kernel": lstm.weight_hh_l0.grad.numpy().T,
        "bias": lstm.bias_ih_l0.grad.numpy(),
    }
    return h.detach().numpy(), grads


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", action="append", help="B,T,E,H (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if fusedlstm.bf16_engine() is None:
        print("error: this CPU lacks AVX512_BF16; nothing to measure", file=sys.stderr)
        return 1
    configs = [tuple(int(v) for v in c.split(",")) for c in args.config] if args.config else CONFIGS
    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False
    rows = []
    for B, T, E, H in configs:
        rng = np.random.default_rng([args.seed, B, T, E, H])
        W, R, b = keras_init(rng, E, H)
        x = rng.standard_normal((B, T, E)).astype(np.float32)
        g = rng.standard_normal((B, H)).astype(np.float32)
        x64, W64, R64, b64, g64 = (a.astype(np.float64) for a in (x, W, R, b, g))
        _, h64, _, cache = reference.lstm_forward(x64, W64, R64, b64, return_sequences=False)
        gr = reference.lstm_backward(cache, None, g64)
        oracle = {"x": gr.x, "kernel": gr.kernel, "recurrent_kernel": gr.recurrent_kernel, "bias": gr.bias}
        runs = {
            "fusedlstm bfloat16": ours(x, W, R, b, g, "bfloat16"),
            "fusedlstm float32": ours(x, W, R, b, g, "float32"),
        }
        if have_torch:
            runs["torch bfloat16 autocast"] = torch_lstm(x, W, R, b, g, True)
            runs["torch float32"] = torch_lstm(x, W, R, b, g, False)
        errs = {
            name: {"h_n": rel(h, h64), **{f"d_{k}": rel(v, oracle[k]) for k, v in grads.items()}}
            for name, (h, grads) in runs.items()
        }
        row = {"config": [B, T, E, H], "errors": errs}
        if have_torch:
            row["h_n_error_vs_torch_bf16"] = errs["fusedlstm bfloat16"]["h_n"] / errs["torch bfloat16 autocast"]["h_n"]
        rows.append(row)
        print(f"(B, T, E, H) = {(B, T, E, H)}: max |error| / max |float64 result|")
        keys = list(next(iter(errs.values())))
        print(f"  {'':>24} " + " ".join(f"{k:>18}" for k in keys))
        for name, e in errs.items():
            print(f"  {name:>24} " + " ".join(f"{e[k]:>18.2e}" for k in keys))
        if have_torch:
            print(f"  h_n error, fusedlstm bfloat16 / torch bfloat16: {row['h_n_error_vs_torch_bf16']:.2f}")
    if args.out:
        report = {
            "benchmark": "bf16_accuracy",
            "build": fusedlstm.build_info(),
            "init": "glorot-uniform kernel, orthogonal recurrent kernel, unit forget bias; x ~ N(0, 1)",
            "metric": "max |a - float64 oracle| / max |float64 oracle| per array; gradients of sum(h_n * g)",
            "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

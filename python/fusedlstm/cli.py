"""The `fusedlstm` command (also `python -m fusedlstm`): the sentiment application's
train | eval | predict, ONNX export, the benchmark, and the TensorFlow op builder. Each command's module is
imported only when the parser is built, never by `import fusedlstm`."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "build_parser"]


def _cmd_bench(args) -> int:
    from .bench.cli import run_args

    return run_args(args)


def _cmd_build_tf_op(args) -> int:
    from .keras.build import build_op

    path = build_op(force=args.force, verbose=args.verbose)
    print(f"TensorFlow op library: {path}")
    return 0


def _cmd_export(args) -> int:
    from .sentiment.export import export_onnx

    try:
        path = export_onnx(args.model, args.out, opset=args.opset)
    except OSError as exc:  # unwritable output (FileNotFoundError is reported by main as well)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"ONNX model written to {path} (inputs ids int64 [B, T], lengths int32 [B]; output probabilities [B, C])")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .bench.cli import build_parser as bench_parser
    from .sentiment.cli import add_commands

    ap = argparse.ArgumentParser(prog="fusedlstm", description="LSTM sentiment classifiers on the fused kernel")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_commands(sub)

    o = sub.add_parser("build-tf-op", help="compile the TensorFlow op for the installed TensorFlow")
    o.add_argument("--force", action="store_true", help="rebuild even if cached")
    o.add_argument("--verbose", action="store_true", help="print the compiler commands")
    o.set_defaults(func=_cmd_build_tf_op)

    x = sub.add_parser("export", help="write a trained classifier as an ONNX graph (needs the onnx package)")
    x.add_argument("model", help="model directory (config.json, vocab.json, weights.npz)")
    x.add_argument("out", help="the .onnx file to write (atomically)")
    x.add_argument("--opset", type=int, default=14, help="ONNX opset (default 14, the lowest this graph needs)")
    x.set_defaults(func=_cmd_export)

    b = sub.add_parser("bench", help="benchmark one LSTM layer vs NumPy, torch and Keras")
    bench_parser(b)
    b.set_defaults(func=_cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

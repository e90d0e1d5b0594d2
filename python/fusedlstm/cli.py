"""The `fusedlstm` command (also `python -m fusedlstm`): the sentiment application's
train | eval | predict, the benchmark, and the TensorFlow op builder. Each command's module is
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

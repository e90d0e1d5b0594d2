"""`fusedlstm bench`: one LSTM layer side by side: fusedlstm (plain and prepared), the NumPy
reference, onnxruntime's LSTM operator, torch.nn.LSTM, keras.layers.LSTM and fusedlstm.keras.LSTM,
whichever are installed: inference (whole sequence), forward+backward (gradients for the weights
and x) at the training-size configs, and last-state inference at small batches, or all three at
user-given configs.

Every implementation runs in a worker process of its own, one set of workers per thread count
(workers.py), and the parent interleaves their samples in every repetition, the order rotating,
so the machine's drift hits all alike (timing.py). The float32 FMA peak (register-only loop) and
the BLAS GEMM rate are measured in the same run. Also reported per training config: fusedlstm's
cache (what a training forward keeps for backward, in total and per step) and the peak memory of
one training step. Prints a table; writes JSON only where --out says, and with --plot a PNG of
the speed-ups over torch.

With --precision float32,bfloat16 every row also runs with bfloat16 products: fusedlstm's
precision="bfloat16" beside torch.nn.LSTM under torch.autocast(dtype=torch.bfloat16), and the
bfloat16 peaks (VDPBF16PS and, where present, AMX tiles) are measured beside the FMA peak.

    fusedlstm bench [--quick] [--config B,T,E,H ...] [--modes ...] [--threads 1,all]
                    [--precision float32,bfloat16] [--out FILE] [--plot PNG]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from .implementations import (
    DEFAULT_CONFIGS,
    IMPLS,
    MODES,
    PRECISIONS,
    SMALL_BATCH_CONFIGS,
    Config,
    available,
    make_plan,
)

__all__ = ["build_parser", "run_args", "main", "parse_config", "parse_threads", "parse_modes", "parse_precisions"]


def parse_config(text: str) -> Config:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--config expects B,T,E,H integers, got {text!r}") from None
    if len(vals) != 4 or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"--config expects four positive integers B,T,E,H, got {text!r}")
    return vals


def parse_threads(text: str) -> list[int]:
    out = []
    for t in text.split(","):
        t = t.strip()
        n = (os.cpu_count() or 1) if t == "all" else int(t) if t.isdigit() else 0
        if n < 1:
            raise argparse.ArgumentTypeError(f"--threads: {t!r} is not a positive count or 'all'")
        if n not in out:
            out.append(n)
    return out


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"--modes: unknown {bad}; choose from {list(MODES)}")
    return modes


def parse_precisions(text: str) -> list[str]:
    out = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in out if p not in PRECISIONS]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"--precision: unknown {bad}; choose from {list(PRECISIONS)}")
    return list(dict.fromkeys(out))


def _fmt(configs) -> str:
    return " ".join(f"({','.join(map(str, c))})" for c in configs)


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="fusedlstm bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config",
        type=parse_config,
        action="append",
        help=f"B,T,E,H (repeatable); default: {_fmt(DEFAULT_CONFIGS)} in forward and forward+backward, "
        f"and {_fmt(SMALL_BATCH_CONFIGS)} in infer-last-state",
    )
    p.add_argument(
        "--modes",
        type=parse_modes,
        default=None,
        help=f"comma-separated subset of {','.join(MODES)} (default: all for --config, "
        "each standard config's own otherwise)",
    )
    p.add_argument(
        "--threads",
        type=parse_threads,
        default=None,
        help="comma-separated thread counts or 'all' (default: 1,all; --quick: all)",
    )
    p.add_argument(
        "--precision",
        type=parse_precisions,
        default=["float32"],
        help="comma-separated products' precisions: float32 (default), bfloat16 (fusedlstm's "
        "precision='bfloat16' beside torch under autocast; needs AVX512_BF16)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="few repetitions, all cores only, no NumPy at the largest size, the small-batch rows "
        "against onnxruntime only: about a minute",
    )
    p.add_argument(
        "--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)} (those installed run)"
    )
    p.add_argument("--out", type=Path, default=None, help="write the JSON report there (default: none)")
    p.add_argument("--plot", type=Path, default=None, help="also write a PNG of speed-ups over torch")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-threads", type=int, default=1, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_args(build_parser().parse_args(argv))


def run_args(args: argparse.Namespace) -> int:
    if args.worker is not None:  # a worker process (workers.Worker starts it)
        from .workers import worker

        return worker(args.worker, args.worker_threads)
    from .report import format_table, make_report, plot, write_json
    from .workers import run_threads

    wanted = [n.strip() for n in args.impls.split(",") if n.strip()]
    bad = [n for n in wanted if n not in IMPLS]
    if bad:
        raise SystemExit(f"error: --impls: unknown {bad}; choose from {list(IMPLS)}")
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # before the run, not after it
        raise SystemExit("error: --plot needs matplotlib: pip install 'fusedlstm[plot]'")
    impls, notes = available(args.quick, wanted)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    if not impls:
        raise SystemExit("error: --impls: none of those asked for can run here (see the notes above)")
    plan = make_plan(args.config, args.modes, args.quick)
    threads = args.threads or parse_threads("all" if args.quick else "1,all")
    precisions = list(args.precision)
    if "bfloat16" in precisions:
        import fusedlstm

        if fusedlstm.bf16_engine() is None:
            precisions.remove("bfloat16")
            notes.append(f"bfloat16: {fusedlstm._core.bf16_missing() or 'switched off'}; its rows are left out")
            print(f"note: {notes[-1]}", file=sys.stderr)
    if not precisions:
        raise SystemExit("error: --precision: nothing this machine can run (see the note above)")
    runs = [
        run_threads(plan, t, args.quick, impls, memory=t == threads[-1] and p == precisions[0], precision=p)
        for t in threads
        for p in precisions
    ]
    report = make_report(runs, notes)
    print(format_table(report))
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    else:
        print("note: no JSON written (--out FILE writes one)", file=sys.stderr)
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

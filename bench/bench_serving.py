"""Serving benchmark of a trained classifier: streaming prediction over a file against the same model
in PyTorch, peak memory of `fusedlstm predict --file` at N and 2N lines, and the latency of one
sentence (B = 1) in onnxruntime (the exported graph) beside ours (prepared weights) and PyTorch.

    python bench/bench_serving.py --model MODEL_DIR --file sentences.txt [--lines 415000]
    python bench/bench_serving.py --model MODEL_DIR --data DIR_OR_TSV     (its sentences, all splits)
        [--threads 1] [--latency-sentences 500] [--no-torch] [--no-onnx] [--out results.json]

The input's non-empty lines are repeated (cyclically) to --lines lines for the throughput and the
memory runs. Throughput is measured in-process for both (read, tokenize, score: the same windowed
length sort, the same batch size; PyTorch gets the same ids) and end to end for the command
(process start and output writing included). Memory: the peak RSS of the whole `predict --file`
process, read from its own rusage. Writes JSON only with --out (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np

import fusedlstm
from fusedlstm import SentimentClassifier
from fusedlstm.sentiment.checkpoint import atomic_write
from fusedlstm.sentiment.serving import WINDOW_BATCHES, predict_stream, read_lines


def source_lines(args) -> list[str]:
    if args.file:
        with open(args.file, "rb") as f:
            return [t for t in read_lines(f, args.file) if t.strip()]
    from fusedlstm.sentiment.data import load_data

    return [t for split in load_data(args.data).values() for t in split.texts if t.strip()]


def write_repeated(lines: list[str], n: int, path: Path) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for i in range(0, n, len(lines)):
            f.write("\n".join(lines[: n - i]) + "\n")
    return path


def ours_stream(model: SentimentClassifier, path: Path, batch_size: int) -> float:
    """Sentences per second of predict_stream over the file (read, tokenize, score)."""
    t = time.perf_counter()
    with path.open("rb") as f:
        n = sum(1 for _ in predict_stream(model, read_lines(f, str(path)), batch_size=batch_size))
    return n / (time.perf_counter() - t)


def torch_twin(model: SentimentClassifier):
    """The same network in PyTorch from our weights (the twin of bench/bench_sst2.py: the same
    layers and directions, a packed batch when bidirectional, the same pooling), as a function of
    (ids, lengths) -> probabilities."""
    import torch
    from torch_twin import make_lstm, sentence_vectors

    cfg = model.config
    p = model.params
    V, E = p["embedding"].shape
    emb = torch.nn.Embedding(V, E, padding_idx=0)
    emb.weight.data.copy_(torch.from_numpy(p["embedding"]))
    lstm = make_lstm(cfg, p)
    dense = torch.nn.Linear(cfg.features, cfg.num_classes)
    dense.weight.data.copy_(torch.from_numpy(p["dense_w"].T.copy()))
    dense.bias.data.copy_(torch.from_numpy(p["dense_b"]))

    @torch.inference_mode()
    def probs(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        T = int(lengths.max())
        x = emb(torch.from_numpy(ids[:, :T].astype(np.int64)))
        last = sentence_vectors(cfg, lstm, x, lengths)
        return torch.softmax(dense(last), dim=1).numpy()

    return probs


def torch_stream(model: SentimentClassifier, probs, path: Path, batch_size: int) -> float:
    """Sentences per second of the twin over the file, windowed and sorted as ours."""
    t = time.perf_counter()
    n = 0
    with path.open("rb") as f:
        it = read_lines(f, str(path))
        while chunk := list(islice(it, WINDOW_BATCHES * batch_size)):
            ids, lengths = model.encode(chunk)
            order = np.argsort(lengths, kind="stable")
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                probs(ids[idx], lengths[idx]).argmax(1)
            n += len(chunk)
    return n / (time.perf_counter() - t)


# A child's peak RSS from our own rusage would include ours: Linux carries the high-water mark of
# the memory a process had before exec (ours, under fork or vfork) into it. A small wrapper process
# runs the command and reports its child's peak instead.
_WRAPPER = (
    "import resource, subprocess, sys\n"
    "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(r.returncode)\n"
)


def run_measured(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run cmd (its stdout discarded); (the completed wrapper, cmd's peak RSS in MiB)."""
    p = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, timeout=3600)
    unit = 2**20 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    peak = int(p.stdout.split()[-1]) / unit if p.stdout.strip() else float("nan")
    return p, peak


def cli_run(model_dir: str, path: Path, batch_size: int) -> dict:
    """`fusedlstm predict --file` end to end: seconds, sentences/s and the process's peak RSS."""
    t = time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "fusedlstm",
        "predict",
        model_dir,
        "--file",
        str(path),
        "--batch-size",
        str(batch_size),
    ]
    p, peak = run_measured(cmd)
    err = p.stderr.decode(errors="replace")
    seconds = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"predict --file failed ({p.returncode}): {err}")
    with path.open("rb") as f:
        n = sum(1 for _ in f)
    return {"lines": n, "seconds": seconds, "sentences_per_s": n / seconds, "peak_rss_mib": peak}


def latency_b1(model: SentimentClassifier, texts: list[str], torch_probs, onnx_path: Path | None, threads: int) -> dict:
    """Median and minimum seconds of one sentence's probabilities (encoded beforehand)."""
    encoded = [model.encode([t]) for t in texts]
    fns = {}
    lstm = model.prepared_lstm()
    fns["fusedlstm.prepared"] = lambda ids, n: model.probabilities(ids, n, lstm)
    if torch_probs is not None:
        fns["torch"] = torch_probs
    if onnx_path is not None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
        fns["onnxruntime"] = lambda ids, n: sess.run(None, {"ids": ids.astype(np.int64), "lengths": n})[0]
    out = {}
    for name, fn in fns.items():
        for ids, n in encoded[:20]:  # warm-up
            fn(ids, n)
        times = []
        for ids, n in encoded:
            t = time.perf_counter()
            fn(ids, n)
            times.append(time.perf_counter() - t)
        out[name] = {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "n": len(times)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model directory")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", help="sentences, one a line")
    src.add_argument("--data", help="a data set (file or directory) whose sentences are used")
    ap.add_argument("--lines", type=int, default=415_000, help="lines of the throughput file (2N for memory)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="kernel, torch and onnxruntime threads (default 1)")
    ap.add_argument("--latency-sentences", type=int, default=500, help="sentences timed one at a time")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--out", help="write the results here as JSON")
    args = ap.parse_args(argv)

    fusedlstm.set_num_threads(args.threads)
    model = SentimentClassifier.load(args.model)
    lines = source_lines(args)
    if not lines:
        raise SystemExit("error: no sentences in the input")
    torch_probs = None
    notes = []
    if not args.no_torch:
        try:
            import torch

            torch.set_num_threads(args.threads)
            torch_probs = torch_twin(model)
        except ImportError:
            notes.append("torch: not installed")
    result: dict = {
        "model": str(args.model),
        "config": {
            k: getattr(model.config, k)
            for k in ("units", "embedding_dim", "max_len", "vocab_size", "layers", "bidirectional", "pooling")
        },
        "threads": args.threads,
        "batch_size": args.batch_size,
        "build": fusedlstm.build_info(),
        "notes": notes,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = write_repeated(lines, args.lines, tmp / "n.txt")
        result["throughput"] = {
            "lines": args.lines,
            "fusedlstm_stream_sentences_per_s": ours_stream(model, n, args.batch_size),
        }
        if torch_probs is not None:
            # The twin is the same network: its probabilities on the first sentences, beside ours.
            ids, lengths = model.encode(lines[: args.batch_size])
            diff = np.abs(torch_probs(ids, lengths) - model.probabilities(ids, lengths)).max()
            result["torch_twin_max_abs_diff"] = float(diff)
            result["throughput"]["torch_stream_sentences_per_s"] = torch_stream(model, torch_probs, n, args.batch_size)
        env_threads = str(args.threads)
        os.environ["OMP_NUM_THREADS"] = env_threads  # the command's kernel threads
        result["cli"] = {"N": cli_run(args.model, n, args.batch_size)}
        n.unlink()
        n2 = write_repeated(lines, 2 * args.lines, tmp / "2n.txt")
        result["cli"]["2N"] = cli_run(args.model, n2, args.batch_size)
        n2.unlink()
        onnx_path = None
        if not args.no_onnx:
            try:
                from fusedlstm.sentiment.export import export_onnx

                onnx_path = export_onnx(model, tmp / "model.onnx")
            except ImportError as exc:
                notes.append(f"onnxruntime: {exc}")
        rng = np.random.default_rng(0)
        sample = [lines[i] for i in rng.integers(0, len(lines), args.latency_sentences)]
        result["latency_b1"] = latency_b1(model, sample, torch_probs, onnx_path, args.threads)
    rss = result["cli"]
    print(f"throughput over {args.lines} lines (sentences/s): ", json.dumps(result["throughput"]))
    print(
        f"predict --file: N {rss['N']['sentences_per_s']:.0f}/s peak {rss['N']['peak_rss_mib']:.1f} MiB; "
        f"2N {rss['2N']['sentences_per_s']:.0f}/s peak {rss['2N']['peak_rss_mib']:.1f} MiB"
    )
    for name, r in result["latency_b1"].items():
        print(f"B=1 latency {name:20s} median {r['median_ms']:.3f} ms  min {r['min_ms']:.3f} ms")
    for note in notes:
        print("note:", note)
    if args.out:
        atomic_write(Path(args.out), (json.dumps(result, indent=1) + "\n").encode())
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

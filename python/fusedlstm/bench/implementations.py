"""What the benchmark runs: the configs and modes, the inputs, and each implementation's timed
closures (fusedlstm plain and prepared, the NumPy reference, onnxruntime's LSTM operator,
torch.nn.LSTM, keras.layers.LSTM, fusedlstm.keras.LSTM), with how each runtime is told its
thread count, and fusedlstm's memory report.

Modes:
    forward           inference returning the whole output sequence (return_sequences=True)
    forward+backward  a training step: the forward kept for backward, then the gradients for
                      the weights and x of sum(outputs * d_out)
    infer-last-state  inference returning only the final state (return_sequences=False), the
                      serving case of small batches
    bidirectional     a training step of a bidirectional layer (outputs concatenated, [B, T, 2H])
                      over sentences of random lengths in 1..T (seeded): fusedlstm's two-direction
                      call; torch.nn.LSTM(bidirectional=True) on an unsorted PackedSequence, the
                      correct way over padding in torch; and fusedlstm.1dir, one direction on the
                      same lengths (what the two directions cost over one)

fusedlstm.torch is the PyTorch drop-in (fusedlstm.torch.LSTM) timed exactly as torch.nn.LSTM:
the same padded calls, the same packed bidirectional step.

Precisions: inputs are float32 arrays; a row's precision is that of the products. "bfloat16" rows
run fusedlstm with precision="bfloat16" (plain, prepared, bidirectional), and torch.nn.LSTM and
the drop-in fusedlstm.torch.LSTM under torch.autocast("cpu", dtype=torch.bfloat16), torch's
mixed-precision path (oneDNN bf16 for nn.LSTM); the others
have no bfloat16 path and are left out of those rows (IMPL_PRECISIONS)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "MODES",
    "IMPLS",
    "IMPL_MODES",
    "DEFAULT_CONFIGS",
    "SMALL_BATCH_CONFIGS",
    "BIDIRECTIONAL_CONFIGS",
    "PRECISION",
    "PRECISIONS",
    "IMPL_PRECISIONS",
    "Config",
    "PlanRow",
    "QUICK_SMALL_BATCH_IMPLS",
    "make_plan",
    "is_big",
    "fwd_flops",
    "mode_flops",
    "make_inputs",
    "onnx_weights",
    "onnx_lstm_model",
    "onnx_session",
    "available",
    "configure",
    "impl_fns",
    "memory_report",
]

Config = tuple[int, int, int, int]  # (B, T, E, H)

MODES = ("forward", "forward+backward", "infer-last-state", "bidirectional")
IMPLS = (
    "fusedlstm",
    "fusedlstm.prepared",
    "fusedlstm.1dir",
    "fusedlstm.torch",
    "onnxruntime",
    "torch",
    "numpy",
    "keras",
    "fusedlstm.keras",
)
# The Keras layers stay out of the small-batch rows: there tf.function's per-call overhead is all
# they would measure, and their workers would double --quick's time.
IMPL_MODES: dict[str, tuple[str, ...]] = {
    "fusedlstm": MODES,
    "fusedlstm.prepared": ("forward", "infer-last-state"),
    "fusedlstm.1dir": ("bidirectional",),
    "fusedlstm.torch": ("forward", "forward+backward", "bidirectional"),
    "onnxruntime": ("forward", "infer-last-state"),
    "numpy": ("forward", "forward+backward", "infer-last-state"),
    "torch": MODES,
    "keras": ("forward", "forward+backward"),
    "fusedlstm.keras": ("forward", "forward+backward"),
}
PRECISION = "float32"  # the default, and the inputs' dtype in every row
PRECISIONS = ("float32", "bfloat16")
IMPL_PRECISIONS: dict[str, tuple[str, ...]] = {
    name: PRECISIONS
    if name in ("fusedlstm", "fusedlstm.prepared", "fusedlstm.1dir", "fusedlstm.torch", "torch")
    else (PRECISION,)
    for name in IMPLS
}

DEFAULT_CONFIGS: list[Config] = [(4, 4, 64, 16), (64, 50, 300, 128), (128, 100, 256, 512)]
# Serving: one request or a few, inference of the last state only.
SMALL_BATCH_CONFIGS: list[Config] = [
    (1, 20, 50, 128),
    (1, 50, 300, 256),
    (1, 100, 300, 512),
    (4, 30, 100, 256),
    (16, 20, 50, 128),
    (32, 20, 50, 128),
]
# A bidirectional layer's training step at the classifier's size.
BIDIRECTIONAL_CONFIGS: list[Config] = [(64, 50, 300, 128)]


class PlanRow(NamedTuple):
    """One config of a run: the modes it is measured in, and implementations left out of it."""

    config: Config
    modes: tuple[str, ...]
    skip: tuple[str, ...] = ()


# --quick compares the small-batch rows with onnxruntime only (the prepared and plain calls).
QUICK_SMALL_BATCH_IMPLS = ("fusedlstm", "fusedlstm.prepared", "onnxruntime")
BIDIRECTIONAL_IMPLS = ("fusedlstm", "fusedlstm.1dir", "fusedlstm.torch", "torch")


def make_plan(
    configs: Sequence[Config] | None = None, modes: Sequence[str] | None = None, quick: bool = False
) -> list[PlanRow]:
    """The rows of a run. User configs run the modes asked for (default: all); without them the
    standard configs run their own modes (DEFAULT_CONFIGS forward and forward+backward,
    SMALL_BATCH_CONFIGS infer-last-state, BIDIRECTIONAL_CONFIGS bidirectional), filtered by
    `modes`. --quick leaves out NumPy at the big configs (a second per call) and, in the standard
    small-batch rows, all but QUICK_SMALL_BATCH_IMPLS."""

    def skip(cfg: Config, small) -> tuple[str, ...]:
        if small == "bi":
            return tuple(n for n in IMPLS if n not in BIDIRECTIONAL_IMPLS)
        if not quick:
            return ()
        if small:
            return tuple(n for n in IMPLS if n not in QUICK_SMALL_BATCH_IMPLS)
        return ("numpy",) if is_big(cfg) else ()

    if configs:
        return [PlanRow(tuple(c), tuple(modes or MODES), skip(tuple(c), False)) for c in configs]
    rows = []
    for cfgs, own, small in (
        (DEFAULT_CONFIGS, ("forward", "forward+backward"), False),
        (SMALL_BATCH_CONFIGS, ("infer-last-state",), True),
        (BIDIRECTIONAL_CONFIGS, ("bidirectional",), "bi"),
    ):
        keep = tuple(m for m in own if modes is None or m in modes)
        if keep:
            rows += [PlanRow(c, keep, skip(c, small)) for c in cfgs]
    return rows


def is_big(cfg: Config) -> bool:
    """A config whose calls take long enough to need fewer repetitions (and no NumPy in --quick)."""
    B, T, E, H = cfg
    return B * T * (E + H) * H > 2e8


def fwd_flops(B: int, T: int, E: int, H: int) -> float:
    return 2.0 * B * T * (E + H) * 4 * H


def mode_flops(mode: str, cfg: Config) -> float:
    """The matrix-multiply FLOPs of one call (a backward does twice a forward's; the
    bidirectional step: two directions over the valid steps of bench_lengths)."""
    if mode == "bidirectional":
        B, T, E, H = cfg
        return 2 * 3.0 * fwd_flops(*cfg) * float(bench_lengths(B, T).mean()) / T
    return (3.0 if mode == "forward+backward" else 1.0) * fwd_flops(*cfg)


def bench_lengths(B: int, T: int, seed: int = 0) -> np.ndarray:
    """The bidirectional mode's sentence lengths: uniform in 1..T, seeded."""
    return np.random.default_rng([seed, 1]).integers(1, T + 1, size=B).astype(np.int32)


def make_inputs(B: int, T: int, E: int, H: int, seed: int = 0, dtype: str = PRECISION) -> dict:
    rng = np.random.default_rng(seed)
    s = float(1.0 / np.sqrt(H))
    out = dict(
        x=rng.standard_normal((B, T, E), dtype=np.float32),
        kernel=rng.standard_normal((E, 4 * H), dtype=np.float32) * s,
        recurrent_kernel=rng.standard_normal((H, 4 * H), dtype=np.float32) * s,
        bias=rng.standard_normal(4 * H, dtype=np.float32) * 0.1,
        d_out=rng.standard_normal((B, T, H), dtype=np.float32),
        kernel_reverse=rng.standard_normal((E, 4 * H), dtype=np.float32) * s,
        recurrent_kernel_reverse=rng.standard_normal((H, 4 * H), dtype=np.float32) * s,
        bias_reverse=rng.standard_normal(4 * H, dtype=np.float32) * 0.1,
        d_out2=rng.standard_normal((B, T, 2 * H), dtype=np.float32),
    )
    out = {k: v.astype(dtype, copy=False) for k, v in out.items()}
    out["lengths"] = bench_lengths(B, T)
    return out


# -- fusedlstm and its NumPy reference (one API) -----------------------------------------------


def _lstm_api(mod, inp, precision: str = PRECISION) -> dict[str, Callable]:
    x, W, R, b, d_out = (inp[k] for k in ("x", "kernel", "recurrent_kernel", "bias", "d_out"))
    kw = {"precision": precision} if precision != PRECISION else {}

    def fwd_bwd():
        _, _, _, cache = mod.lstm_forward(x, W, R, b, **kw)
        mod.lstm_backward(cache, d_out)

    return {
        "forward": lambda: mod.lstm_forward(x, W, R, b, training=False, **kw),
        "forward+backward": fwd_bwd,
        "infer-last-state": lambda: mod.lstm_forward(x, W, R, b, training=False, return_sequences=False, **kw),
    }


def _bidirectional(inp, precision: str = PRECISION) -> dict[str, Callable]:
    import fusedlstm

    x, L = inp["x"], inp["lengths"]
    fw = (inp["kernel"], inp["recurrent_kernel"], inp["bias"])
    rv = (inp["kernel_reverse"], inp["recurrent_kernel_reverse"], inp["bias_reverse"])

    def step():
        _, _, _, cache = fusedlstm.lstm_bidirectional_forward(x, fw, rv, lengths=L, precision=precision)
        fusedlstm.lstm_backward(cache, inp["d_out2"])

    return {"bidirectional": step}


def _one_direction(inp, precision: str = PRECISION) -> dict[str, Callable]:
    import fusedlstm

    x, L, H = inp["x"], inp["lengths"], inp["recurrent_kernel"].shape[0]
    d_out = np.ascontiguousarray(inp["d_out2"][..., :H])

    def step():
        _, _, _, cache = fusedlstm.lstm_forward(
            x, inp["kernel"], inp["recurrent_kernel"], inp["bias"], lengths=L, precision=precision
        )
        fusedlstm.lstm_backward(cache, d_out)

    return {"bidirectional": step}


def _prepared(inp, precision: str = PRECISION) -> dict[str, Callable]:
    """fusedlstm.prepare: the weights packed once, outside the timed call."""
    import fusedlstm

    x = inp["x"]
    p = fusedlstm.prepare(inp["kernel"], inp["recurrent_kernel"], inp["bias"], precision=precision)
    return {"forward": lambda: p.infer(x), "infer-last-state": lambda: p.infer(x, return_sequences=False)}


# -- onnxruntime ---------------------------------------------------------------------------------


def onnx_weights(
    kernel: np.ndarray, recurrent_kernel: np.ndarray, bias: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Our weights (Keras layout, gates i, f, c, o) as the ONNX LSTM's W [1, 4H, E], R [1, 4H, H]
    and B [1, 8H] (gates i, o, f, c; B = our bias as the input half, zeros as the recurrent half)."""
    H = recurrent_kernel.shape[0]
    order = np.concatenate([np.arange(g * H, (g + 1) * H) for g in (0, 3, 1, 2)])  # i, o, f, c
    W = np.ascontiguousarray(kernel.T[order])[None]
    R = np.ascontiguousarray(recurrent_kernel.T[order])[None]
    B = np.concatenate([bias[order], np.zeros(4 * H, bias.dtype)])[None]
    return W, R, B


def onnx_lstm_model(
    kernel: np.ndarray, recurrent_kernel: np.ndarray, bias: np.ndarray, T: int, B: int, last_state_only: bool
) -> bytes:
    """A serialized ONNX model of one LSTM node, weights as initializers. Its input X is time-major
    [T, B, E]: onnxruntime's CPU LSTM refuses layout=1 (batch-major). Its output is Y_h [1, B, H]
    with `last_state_only`, else Y [T, 1, B, H]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    E, H = kernel.shape[0], recurrent_kernel.shape[0]
    W, R, Bias = onnx_weights(kernel, recurrent_kernel, bias)
    out, shape = ("Y_h", [1, B, H]) if last_state_only else ("Y", [T, 1, B, H])
    node = helper.make_node("LSTM", ["X", "W", "R", "B"], ["", "Y_h"] if last_state_only else ["Y"], hidden_size=H)
    graph = helper.make_graph(
        [node],
        "fusedlstm_bench_lstm",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [T, B, E])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape)],
        initializer=[
            numpy_helper.from_array(W, "W"),
            numpy_helper.from_array(R, "R"),
            numpy_helper.from_array(Bias, "B"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = min(model.ir_version, 8)  # readable by older onnxruntime releases too
    onnx.checker.check_model(model)
    return model.SerializeToString()


def onnx_session(model: bytes, threads: int):
    """An onnxruntime CPU session on `threads` intra-op threads, one inter-op, sequential."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])


def _onnxruntime(inp, modes: Iterable[str], threads: int) -> dict[str, Callable]:
    """Our batch-major x goes in time-major, transposed once outside the timed call (the model
    cannot take it batch-major, and our API takes x as given), so the timed call is the LSTM."""
    x, W, R, b = (inp[k] for k in ("x", "kernel", "recurrent_kernel", "bias"))
    B, T, _ = x.shape
    feed = {"X": np.ascontiguousarray(x.transpose(1, 0, 2))}
    fns = {}
    for mode in modes:
        last = mode == "infer-last-state"
        sess = onnx_session(onnx_lstm_model(W, R, b, T, B, last), threads)
        fns[mode] = lambda s=sess: s.run(None, feed)
    return fns


# -- torch and Keras -----------------------------------------------------------------------------


def _torch(inp, cls=None, precision: str = PRECISION) -> dict[str, Callable]:
    """torch.nn.LSTM, or `cls` (fusedlstm.torch.LSTM) with the same calls; bfloat16: every call
    under torch.autocast("cpu", dtype=torch.bfloat16)."""
    import contextlib

    import torch

    def autocast():
        if precision == "bfloat16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    cls = cls or torch.nn.LSTM
    x, W, R, b, d_out = (inp[k] for k in ("x", "kernel", "recurrent_kernel", "bias", "d_out"))
    E, H = W.shape[0], R.shape[0]
    lstm = cls(E, H, batch_first=True)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(torch.from_numpy(W.T.copy()))
        lstm.weight_hh_l0.copy_(torch.from_numpy(R.T.copy()))
        lstm.bias_ih_l0.copy_(torch.from_numpy(b))
        lstm.bias_hh_l0.zero_()
    tx, tdo = torch.from_numpy(x), torch.from_numpy(d_out)

    def fwd():  # nn.LSTM computes the sequence either way: the same call serves both inference modes
        with torch.no_grad(), autocast():
            lstm(tx)

    def fwd_bwd():
        xg = tx.detach().requires_grad_(True)
        with autocast():
            y, _ = lstm(xg)
        lstm.zero_grad(set_to_none=True)
        y.backward(tdo.to(y.dtype))

    bi = cls(E, H, batch_first=True, bidirectional=True)
    with torch.no_grad():
        for sfx, k in (("", ""), ("_reverse", "_reverse")):
            getattr(bi, "weight_ih_l0" + sfx).copy_(torch.from_numpy(inp["kernel" + k].T.copy()))
            getattr(bi, "weight_hh_l0" + sfx).copy_(torch.from_numpy(inp["recurrent_kernel" + k].T.copy()))
            getattr(bi, "bias_ih_l0" + sfx).copy_(torch.from_numpy(inp["bias" + k]))
            getattr(bi, "bias_hh_l0" + sfx).zero_()
    lengths = torch.from_numpy(inp["lengths"].astype(np.int64))
    tdo2 = torch.from_numpy(inp["d_out2"])
    T = x.shape[1]

    def bidirectional():
        xg = tx.detach().requires_grad_(True)
        with autocast():
            packed = torch.nn.utils.rnn.pack_padded_sequence(xg, lengths, batch_first=True, enforce_sorted=False)
            y, _ = bi(packed)
            y, _ = torch.nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=T)
        bi.zero_grad(set_to_none=True)
        y.backward(tdo2.to(y.dtype))

    return {"forward": fwd, "forward+backward": fwd_bwd, "infer-last-state": fwd, "bidirectional": bidirectional}


def _keras(layer_cls, inp) -> dict[str, Callable]:
    """A Keras LSTM (return_sequences) in tf.function: inference, and the gradients of
    sum(outputs * d_out) for the weights and x (the same work as the other backwards)."""
    import tensorflow as tf

    x, W, R, b = (inp[k] for k in ("x", "kernel", "recurrent_kernel", "bias"))
    layer = layer_cls(R.shape[0], return_sequences=True)
    layer.build((None,) + x.shape[1:])
    layer.set_weights([W, R, b])
    tx, tdo = tf.constant(x), tf.constant(inp["d_out"])

    @tf.function(jit_compile=False)
    def infer():
        return layer(tx, training=False)

    @tf.function(jit_compile=False)
    def train():
        with tf.GradientTape() as tape:
            tape.watch(tx)
            loss = tf.reduce_sum(layer(tx, training=True) * tdo)
        return tape.gradient(loss, layer.trainable_weights + [tx])

    def fwd():
        infer().numpy()

    def fwd_bwd():
        for g in train():
            g.numpy()

    return {"forward": fwd, "forward+backward": fwd_bwd}


def impl_fns(
    impl: str, inp: dict, modes: Sequence[str], threads: int, precision: str = PRECISION
) -> dict[str, Callable]:
    """The timed closures of `impl` for `modes` (those it runs: IMPL_MODES) at `precision` (one
    of IMPL_PRECISIONS[impl])."""
    modes = [m for m in modes if m in IMPL_MODES[impl]]
    if precision not in IMPL_PRECISIONS[impl]:
        raise ValueError(f"{impl} has no {precision} path")
    if impl == "fusedlstm":
        import fusedlstm

        fns = _lstm_api(fusedlstm, inp, precision) | _bidirectional(inp, precision)
    elif impl == "fusedlstm.1dir":
        fns = _one_direction(inp, precision)
    elif impl == "numpy":
        from fusedlstm import reference

        fns = _lstm_api(reference, inp)
    elif impl == "fusedlstm.prepared":
        fns = _prepared(inp, precision)
    elif impl == "onnxruntime":
        fns = _onnxruntime(inp, modes, threads)
    elif impl == "torch":
        fns = _torch(inp, precision=precision)
    elif impl == "fusedlstm.torch":
        from fusedlstm.torch import LSTM

        fns = _torch(inp, LSTM, precision)
    elif impl == "keras":
        import keras

        fns = _keras(keras.layers.LSTM, inp)
    elif impl == "fusedlstm.keras":
        import fusedlstm.keras as fk

        fns = _keras(fk.LSTM, inp)
    else:
        raise ValueError(f"impl: unknown {impl!r}; choose from {list(IMPLS)}")
    return {m: fns[m] for m in modes}


def configure(impl: str, threads: int) -> None:
    """A worker's runtimes, before any of them starts its threads (onnxruntime takes its count
    per session: onnx_session)."""
    if impl in ("keras", "fusedlstm.keras"):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    import fusedlstm

    fusedlstm.set_num_threads(threads)
    if impl in ("torch", "fusedlstm.torch"):
        import torch

        torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads, user_api="blas")  # the NumPy reference's BLAS
    except ImportError:
        pass


def available(quick: bool, wanted: list[str]) -> tuple[list[str], list[str]]:
    """Implementations to run, and notes on the ones left out."""
    run, notes = [], []
    for name in wanted:
        if name in ("torch", "fusedlstm.torch") and importlib.util.find_spec("torch") is None:
            notes.append(f"{name}: torch not installed (pip install torch)")
            continue
        if name == "onnxruntime":
            missing = [m for m in ("onnxruntime", "onnx") if importlib.util.find_spec(m) is None]
            if missing:
                notes.append(f"onnxruntime: {' and '.join(missing)} not installed (pip install 'fusedlstm[bench]')")
                continue
        if name == "fusedlstm.prepared":
            import fusedlstm

            if not hasattr(fusedlstm, "prepare"):
                notes.append("fusedlstm.prepared: this fusedlstm has no prepare() yet")
                continue
        if name in ("keras", "fusedlstm.keras") and importlib.util.find_spec("tensorflow") is None:
            notes.append(f"{name}: TensorFlow not installed (pip install 'fusedlstm[tf]')")
            continue
        if name == "fusedlstm.keras" and quick:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the op path asks TensorFlow in a subprocess
            from ..keras.build import op_library_path

            try:
                built = op_library_path().exists()
            except (RuntimeError, OSError) as exc:  # e.g. an installation without the op's sources
                notes.append(f"fusedlstm.keras: {exc}")
                continue
            if not built:
                notes.append(
                    "fusedlstm.keras: op library not built yet (fusedlstm build-tf-op; "
                    "--quick does not spend a minute compiling it)"
                )
                continue
        run.append(name)
    return run, notes


def memory_report(cfg: Config) -> dict:
    """fusedlstm's cache (total and per time step), and the peak of NumPy allocations during one
    training step (forward + backward, cold: no recycled buffer) beyond its inputs, by tracemalloc
    (NumPy reports its allocations to it)."""
    import tracemalloc

    import fusedlstm

    inp = make_inputs(*cfg)
    B, T = cfg[:2]
    fusedlstm.empty_cache()
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    out = fusedlstm.lstm_forward(inp["x"], inp["kernel"], inp["recurrent_kernel"], inp["bias"])
    cache_bytes = out[3].nbytes
    g = fusedlstm.lstm_backward(out[3], inp["d_out"])
    peak = tracemalloc.get_traced_memory()[1] - base
    del out, g
    fusedlstm.empty_cache()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    res = fusedlstm.lstm_forward(inp["x"], inp["kernel"], inp["recurrent_kernel"], inp["bias"], training=False)
    infer_peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    fusedlstm.empty_cache()
    return {
        "cache_bytes": cache_bytes,
        "cache_bytes_per_step": cache_bytes / max(T, 1),
        "cache_floats_per_step_per_row": cache_bytes / 4 / max(T * B, 1),
        "training_step_peak_bytes": peak,
        "inference_cache": res[3] is not None,
        "inference_peak_bytes": infer_peak,
    }

"""The classifier as a standard ONNX graph, for serving stacks that do not have fusedlstm:

    ids [B, T] int64 --Gather(embedding)--> [B, T, E] --Transpose--> [T, B, E]
      --LSTM(sequence_lens=lengths)--> Y_h: each sentence's last valid output [B, H]
      --Gemm(dense)--> logits [B, C] --Softmax--> probabilities [B, C]

Inputs ``ids`` (``SentimentClassifier.encode``'s ids as int64: right-padded with 0, at most
max_len per row) and ``lengths`` (int32 [B], each >= 1); output ``probabilities``. Tokenizing
stays outside the graph: the vocabulary (vocab.json) and the label names (config.json) are in the
model directory, and the labels, max_len and the padding/unknown ids are also copied into the
graph's metadata. ``fusedlstm export MODEL_DIR OUT.onnx`` is ``export_onnx``.

Stacked and bidirectional models: one LSTM node per layer (``_lstm_layer``, direction
"bidirectional" for two directions, their outputs side by side as the classifier concatenates
them); pooling "last" reads the top node's Y_h, "max" and "mean" reduce its Y over each sentence's
valid steps (a mask from ``lengths``). The exporter refuses by name every config field, value and
weight it does not map, so that no architecture is ever exported wrong."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .checkpoint import atomic_write

if TYPE_CHECKING:
    from .model import SentimentClassifier

__all__ = ["export_onnx", "onnx_model", "lstm_onnx_weights", "DEFAULT_OPSET", "INPUT_NAMES", "OUTPUT_NAME"]

DEFAULT_OPSET = 14
INPUT_NAMES = ("ids", "lengths")
OUTPUT_NAME = "probabilities"
_PROTOBUF_LIMIT = 2**31 - 2**20  # one serialized ModelProto; headroom for the graph itself

# Config fields the exporter knows: those that shape the graph are checked below, the others
# (training options and provenance) do not change inference.
# precision: the graph computes in float32 (ONNX's LSTM); a model trained with bfloat16 products
# exports the same weights, its results then differing at bfloat16's precision (metadata says so).
_INFERENCE_NEUTRAL = {"keep_prob", "embedding_keep_prob", "train_embeddings", "vectors", "precision"}
_SHAPE_FIELDS = {"units", "embedding_dim", "max_len", "num_classes", "vocab_size", "labels", "format_version"}
_ARCHITECTURE = {"layers": 1, "bidirectional": False, "pooling": "last"}  # field: its default
_POOLINGS = ("last", "max", "mean")


def _require_onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError(
            "export: ONNX export needs the onnx package: pip install 'fusedlstm[bench]' (or pip install onnx)"
        ) from None
    return onnx


def lstm_onnx_weights(
    kernel: np.ndarray, recurrent_kernel: np.ndarray, bias: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One direction's weights (Keras layout, gates i, f, c, o) as the ONNX LSTM wants them:
    W [4H, E], R [4H, H] and B [8H] in gate order i, o, f, c; B is our bias as the input half
    and zeros as the recurrent half (ONNX adds the two)."""
    H = recurrent_kernel.shape[0]
    order = np.concatenate([np.arange(g * H, (g + 1) * H) for g in (0, 3, 1, 2)])  # i, o, f, c
    b = np.zeros(4 * H, np.float32) if bias is None else np.asarray(bias, np.float32)
    W = np.ascontiguousarray(np.asarray(kernel, np.float32).T[order])
    R = np.ascontiguousarray(np.asarray(recurrent_kernel, np.float32).T[order])
    return W, R, np.concatenate([b[order], np.zeros(4 * H, np.float32)])


class _Graph:
    """Nodes and initializers being collected, with unique names."""

    def __init__(self, helper, numpy_helper) -> None:
        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: Sequence[str], outputs: Sequence[str], **attrs: Any) -> list[str]:
        self.nodes.append(
            self.helper.make_node(op, list(inputs), list(outputs), name=f"{op}_{len(self.nodes)}", **attrs)
        )
        return list(outputs)


def _lstm_layer(
    g: _Graph,
    x: str,
    lengths: str,
    directions: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    name: str,
    need_sequence: bool,
) -> tuple[str | None, str]:
    """One LSTM node over time-major x [T, B, In] with sequence_lens: one direction ("forward")
    or two ("bidirectional", forward first). Returns (the outputs as [T, B, D*H] for a layer
    above, or None when not needed; the last valid outputs as [B, D*H]: the forward direction's
    state at each sentence's last token, the backward one's at its first)."""
    if len(directions) not in (1, 2):
        raise ValueError(f"export: {name}: 1 or 2 directions, got {len(directions)}")
    packed = [lstm_onnx_weights(*d) for d in directions]
    H = packed[0][1].shape[1]
    W = g.const(f"{name}_W", np.stack([p[0] for p in packed]))
    R = g.const(f"{name}_R", np.stack([p[1] for p in packed]))
    B = g.const(f"{name}_B", np.stack([p[2] for p in packed]))
    direction = "forward" if len(directions) == 1 else "bidirectional"
    outs = [f"{name}_Y" if need_sequence else "", f"{name}_Y_h"]
    g.node("LSTM", [x, W, R, B, lengths], outs, hidden_size=H, direction=direction)
    # Y_h [D, B, H] -> [B, D, H] -> [B, D*H] (directions side by side, as Keras concatenates them)
    (h,) = g.node("Transpose", [f"{name}_Y_h"], [f"{name}_Y_h_bdh"], perm=[1, 0, 2])
    (last,) = g.node("Reshape", [h, g.const(f"{name}_shape_last", np.array([0, -1], np.int64))], [f"{name}_last"])
    if not need_sequence:
        return None, last
    # Y [T, D, B, H] -> [T, B, D, H] -> [T, B, D*H]
    (y,) = g.node("Transpose", [f"{name}_Y"], [f"{name}_Y_tbdh"], perm=[0, 2, 1, 3])
    (seq,) = g.node("Reshape", [y, g.const(f"{name}_shape_seq", np.array([0, 0, -1], np.int64))], [f"{name}_seq"])
    return seq, last


def _lstm_names(model: SentimentClassifier) -> list[list[tuple[str, str, str]]]:
    """Per layer, per direction (forward first): the weight names of (kernel, recurrent_kernel,
    bias)."""
    names = getattr(model.config, "lstm_names", None)
    return names() if names is not None else [[("kernel", "recurrent_kernel", "bias")]]


def _lstm_stack(model: SentimentClassifier) -> list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Per layer, per direction (forward first): (kernel, recurrent_kernel, bias) arrays."""
    p = model.params
    try:
        return [[tuple(p[n] for n in names) for names in dirs] for dirs in _lstm_names(model)]
    except KeyError as exc:
        cfg = model.config
        raise ValueError(
            f"export: the weights do not match layers={getattr(cfg, 'layers', 1)}, "
            f"bidirectional={getattr(cfg, 'bidirectional', False)} (no {exc.args[0]!r})"
        ) from None


def _check_exportable(model: SentimentClassifier) -> None:
    """Refuse, by name, every config field, value and weight the graph below does not map."""
    cfg = model.config
    for name in sorted(asdict(cfg)):
        if name not in _INFERENCE_NEUTRAL and name not in _SHAPE_FIELDS and name not in _ARCHITECTURE:
            raise ValueError(f"export: config field {name!r} is not known to the ONNX exporter")
    layers = getattr(cfg, "layers", 1)
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"export: layers={layers!r} is not supported (a positive integer is)")
    bidirectional = getattr(cfg, "bidirectional", False)
    if not isinstance(bidirectional, bool):
        raise ValueError(f"export: bidirectional={bidirectional!r} is not supported (true or false is)")
    pooling = getattr(cfg, "pooling", "last")
    if pooling not in _POOLINGS:
        raise ValueError(f"export: pooling={pooling!r} is not supported yet (the exporter maps {list(_POOLINGS)})")
    if cfg.format_version != 1:
        raise ValueError(f"export: model format_version {cfg.format_version} is not supported (1 is)")
    stack = _lstm_stack(model)
    if len(stack) != layers or any(len(dirs) != (2 if bidirectional else 1) for dirs in stack):
        raise ValueError(f"export: the weights do not match layers={layers}, bidirectional={bidirectional}")
    known = {"embedding", "dense_w", "dense_b"} | {n for dirs in _lstm_names(model) for d in dirs for n in d}
    unknown = sorted(set(model.params) - known)
    if unknown:
        raise ValueError(f"export: weights {unknown} are not known to the ONNX exporter")
    total = sum(int(np.asarray(v).size) * 4 for v in model.params.values())
    if total > _PROTOBUF_LIMIT:
        raise ValueError(
            f"export: the weights take {total:,} bytes as float32, more than one ONNX file holds "
            f"without external data ({_PROTOBUF_LIMIT:,})"
        )


def _pool(g: _Graph, pooling: str, seq: str, lengths: str, opset: int) -> str:
    """Max or mean over each sentence's valid steps of time-major outputs [T, B, F] -> [B, F]."""
    (shape,) = g.node("Shape", ["ids"], ["ids_shape"])
    (t,) = g.node("Gather", [shape, g.const("one", np.array(1, np.int64))], ["time_steps"], axis=0)
    (steps,) = g.node("Range", [g.const("zero", np.array(0, np.int64)), t, "one"], ["steps"])  # [T]
    (n,) = g.node("Cast", [lengths], ["lengths_i64"], to=7)  # INT64
    (st,) = g.node("Unsqueeze", [steps, g.const("axis_1", np.array([1], np.int64))], ["steps_t1"])  # [T, 1]
    (nb,) = g.node("Unsqueeze", [n, g.const("axis_0", np.array([0], np.int64))], ["lengths_1b"])  # [1, B]
    (valid,) = g.node("Less", [st, nb], ["valid_tb"])
    (valid,) = g.node("Unsqueeze", [valid, g.const("axis_2", np.array([2], np.int64))], ["valid_tb1"])
    axes = g.const("axes_time", np.array([0], np.int64))
    if pooling == "max":
        (masked,) = g.node("Where", [valid, seq, g.const("minus_inf", np.array(-np.inf, np.float32))], ["masked"])
        if opset >= 18:  # ReduceMax takes its axes as an input from opset 18, as an attribute before
            return g.node("ReduceMax", [masked, axes], ["pooled"], keepdims=0)[0]
        return g.node("ReduceMax", [masked], ["pooled"], axes=[0], keepdims=0)[0]
    (masked,) = g.node("Where", [valid, seq, g.const("zero_f", np.array(0, np.float32))], ["masked"])
    (total,) = g.node("ReduceSum", [masked, axes], ["summed"], keepdims=0)  # [B, F]
    (count,) = g.node("Cast", [lengths], ["lengths_f"], to=1)  # FLOAT
    (count,) = g.node("Max", [count, g.const("one_f", np.array(1, np.float32))], ["count"])
    (count,) = g.node("Unsqueeze", [count, g.const("axis_1b", np.array([1], np.int64))], ["count_b1"])
    return g.node("Div", [total, count], ["pooled"])[0]


def onnx_model(model: SentimentClassifier, opset: int = DEFAULT_OPSET) -> Any:
    """The classifier as an ``onnx.ModelProto`` (checked by onnx.checker); see the module doc."""
    onnx = _require_onnx()
    from onnx import TensorProto, helper, numpy_helper

    from .. import __version__

    if isinstance(opset, bool) or not isinstance(opset, int) or not 14 <= opset <= onnx.defs.onnx_opset_version():
        raise ValueError(f"export: opset must be an integer in 14..{onnx.defs.onnx_opset_version()}, got {opset!r}")
    _check_exportable(model)
    p = model.params
    cfg = model.config
    g = _Graph(helper, numpy_helper)
    emb = g.const("embedding", np.asarray(p["embedding"], np.float32))
    (x,) = g.node("Gather", [emb, "ids"], ["embedded"], axis=0)  # [B, T, E]
    (x,) = g.node("Transpose", [x], ["embedded_tbe"], perm=[1, 0, 2])  # onnxruntime's LSTM is time-major
    pooling = getattr(cfg, "pooling", "last")
    stack = _lstm_stack(model)
    last = x
    for i, directions in enumerate(stack):
        keep = pooling != "last" or i < len(stack) - 1
        seq, last = _lstm_layer(g, x, "lengths", directions, f"lstm{i}", need_sequence=keep)
        x = seq if seq is not None else x
    if pooling != "last":
        last = _pool(g, pooling, x, "lengths", opset)
    dw = g.const("dense_w", np.asarray(p["dense_w"], np.float32))
    db = g.const("dense_b", np.asarray(p["dense_b"], np.float32))
    (logits,) = g.node("Gemm", [last, dw, db], ["logits"])
    g.node("Softmax", [logits], [OUTPUT_NAME], axis=-1)
    graph = helper.make_graph(
        g.nodes,
        "fusedlstm_sentiment",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "time"]),
            helper.make_tensor_value_info("lengths", TensorProto.INT32, ["batch"]),
        ],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", cfg.num_classes])],
        initializer=g.initializers,
    )
    m = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="fusedlstm",
        producer_version=__version__,
        doc_string="fusedlstm SentimentClassifier: ids [B, T] int64 and lengths [B] int32 in, "
        "class probabilities [B, C] out; tokenize as fusedlstm.sentiment.text.tokenize, map with "
        "vocab.json (unknown: 1, padding: 0), truncate to max_len.",
    )
    m.ir_version = min(m.ir_version, 8)  # readable by older onnxruntime releases too
    helper.set_model_props(
        m,
        {
            "labels": json.dumps(cfg.labels),
            "max_len": str(cfg.max_len),
            "vocab_size": str(cfg.vocab_size),
            "padding_id": "0",
            "unknown_id": "1",
            "tokenizer": "fusedlstm.sentiment.text.tokenize",
            "trained_precision": str(getattr(cfg, "precision", "float32")),
            "compute_precision": "float32",
        },
    )
    onnx.checker.check_model(m)
    return m


def export_onnx(
    model: SentimentClassifier | str | os.PathLike, path: str | os.PathLike, opset: int = DEFAULT_OPSET
) -> Path:
    """Write the classifier (a SentimentClassifier or a model directory) to `path` as ONNX,
    atomically (a temporary beside it, renamed: nothing half-written on failure). Returns the
    path. Raises ImportError without the onnx package, ValueError for an architecture it does not
    map, FileNotFoundError/PermissionError (naming the path) when `path` cannot be written."""
    from .model import SentimentClassifier

    if not isinstance(model, SentimentClassifier):
        model = SentimentClassifier.load(model)
    out = Path(path)
    if out.is_dir():
        raise IsADirectoryError(f"export: output {out} is a directory; give a file name such as model.onnx")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"export: output directory {parent} does not exist")
    data = onnx_model(model, opset).SerializeToString()
    try:
        atomic_write(out, data)
    except PermissionError as exc:
        raise PermissionError(f"export: cannot write {out}: {exc.strerror or exc}") from None
    except OSError as exc:
        raise OSError(f"export: cannot write {out}: {exc.strerror or exc}") from None
    return out

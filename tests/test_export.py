"""ONNX export (fusedlstm.sentiment.export, `fusedlstm export`): onnxruntime's probabilities equal
predict_proba within 1e-5 with the same argmax, on a synthetic-trained model and on real SST-2
sentences when FUSEDLSTM_TEST_DATA is set; the graph's node list, inputs and outputs; the
per-layer LSTM builder in both directions and stacked, against our kernel; architectures and
weights the exporter does not map are refused by name; bad model directories, unwritable outputs
and a missing onnx package give clear errors, and a failed write leaves nothing behind."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from fusedlstm import SentimentClassifier, lstm_forward
from fusedlstm.sentiment import checkpoint
from fusedlstm.sentiment.data import Split
from fusedlstm.sentiment.model import ORIGINAL_ARCHITECTURE, ModelConfig, TrainOptions
from helpers import real_data, requires_data, synthetic_sentences

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install 'fusedlstm[bench]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'fusedlstm[bench]')")

from fusedlstm.sentiment.export import _Graph, _lstm_layer, export_onnx, onnx_model  # noqa: E402


def train_small(texts, labels, seed=0, units=12, epochs=4) -> SentimentClassifier:
    split = Split(list(texts), [str(y) for y in labels], [f"s:{i}" for i in range(len(texts))])
    m = SentimentClassifier.create(
        split, units=units, embedding_dim=10, seed=seed, log=lambda *a: None, **ORIGINAL_ARCHITECTURE
    )
    m.fit(split, None, TrainOptions(epochs=epochs, batch_size=16, lr=0.02, progress=False), log=lambda *a: None)
    return m


@pytest.fixture(scope="module")
def model() -> SentimentClassifier:
    rows = synthetic_sentences(400, 0)
    return train_small([t for t, _ in rows], [y for _, y in rows])


def session(path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def assert_same_as_ours(m: SentimentClassifier, path, texts, batch_size=64):
    sess = session(path)
    want = m.predict_proba(texts)
    ids, lengths = m.encode(texts)
    got = np.concatenate(
        [
            sess.run(None, {"ids": ids[s : s + batch_size].astype(np.int64), "lengths": lengths[s : s + batch_size]})[0]
            for s in range(0, len(texts), batch_size)
        ]
    )
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
    assert 0 < len(set(want.argmax(1).tolist()))  # the comparison covers real decisions
    return got


def test_onnxruntime_equals_predict_proba(model, tmp_path):
    path = export_onnx(model, tmp_path / "m.onnx")
    texts = [t for t, _ in synthetic_sentences(300, 7)] + ["zyzzyva unknown words only", "good " * 40]
    got = assert_same_as_ours(model, path, texts)
    assert len(set(got.argmax(1).tolist())) == 2  # both classes predicted: a trained model
    # B = 1, and the whole file at once (a long padded batch): the same
    ids, lengths = model.encode(texts[:1])
    one = session(path).run(None, {"ids": ids.astype(np.int64), "lengths": lengths})[0]
    np.testing.assert_allclose(one, model.predict_proba(texts[:1]), atol=1e-5, rtol=0)


def test_graph_nodes_inputs_outputs_and_metadata(model, tmp_path):
    path = export_onnx(model, tmp_path / "m.onnx")
    m = onnx.load(str(path))
    assert [n.op_type for n in m.graph.node] == [
        "Gather",
        "Transpose",
        "LSTM",
        "Transpose",
        "Reshape",
        "Gemm",
        "Softmax",
    ]
    lstm = next(n for n in m.graph.node if n.op_type == "LSTM")
    assert lstm.input[4] == "lengths"  # sequence_lens: the last valid output is Y_h
    assert m.opset_import[0].version >= 14
    ins = {i.name: i.type.tensor_type for i in m.graph.input}
    assert ins["ids"].elem_type == onnx.TensorProto.INT64 and len(ins["ids"].shape.dim) == 2
    assert ins["lengths"].elem_type == onnx.TensorProto.INT32 and len(ins["lengths"].shape.dim) == 1
    (out,) = m.graph.output
    assert out.name == "probabilities" and out.type.tensor_type.shape.dim[1].dim_value == model.config.num_classes
    meta = {p.key: p.value for p in m.metadata_props}
    assert json.loads(meta["labels"]) == model.config.labels and int(meta["max_len"]) == model.config.max_len
    assert onnx_model(model, opset=17).opset_import[0].version == 17
    with pytest.raises(ValueError, match="opset"):
        onnx_model(model, opset=13)


@pytest.mark.parametrize("layers,bidirectional", [(1, True), (2, False), (2, True)])
def test_lstm_layer_builder_matches_our_kernel(layers, bidirectional):
    """The per-layer builder that stacked and bidirectional models will use, on its own: time-major
    x, right-padded lengths; the backward direction runs each sentence from its last token to its
    first (our kernel on the per-sentence reversed input)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    T, B, E, H = 7, 5, 4, 6
    lengths = np.array([7, 3, 1, 5, 2], np.int32)
    x = rng.standard_normal((B, T, E)).astype(np.float32)
    D = 2 if bidirectional else 1

    def weights(n_in):
        return (
            (rng.standard_normal((n_in, 4 * H)) * 0.5).astype(np.float32),
            (rng.standard_normal((H, 4 * H)) * 0.5).astype(np.float32),
            (rng.standard_normal(4 * H) * 0.2).astype(np.float32),
        )

    stack = [[weights(E if i == 0 else D * H) for _ in range(D)] for i in range(layers)]

    def reverse_valid(a):  # reverse each row within its length
        out = a.copy()
        for b, n in enumerate(lengths):
            out[b, :n] = a[b, :n][::-1]
        return out

    inp, want_last = x, None
    for directions in stack:
        ys, lasts = [], []
        for d, (k, r, bias) in enumerate(directions):
            xin = inp if d == 0 else reverse_valid(inp)
            y, h, _, _ = lstm_forward(xin, k, r, bias, lengths=lengths)
            ys.append(y if d == 0 else reverse_valid(y))
            lasts.append(h)
        inp, want_last = np.concatenate(ys, axis=2), np.concatenate(lasts, axis=1)

    g = _Graph(helper, numpy_helper)
    cur, last = "X", None
    for i, directions in enumerate(stack):
        seq, last = _lstm_layer(g, cur, "lengths", directions, f"l{i}", need_sequence=True)
        cur = seq
    graph = helper.make_graph(
        g.nodes,
        "t",
        [
            helper.make_tensor_value_info("X", TensorProto.FLOAT, [T, B, E]),
            helper.make_tensor_value_info("lengths", TensorProto.INT32, [B]),
        ],
        [
            helper.make_tensor_value_info(last, TensorProto.FLOAT, None),
            helper.make_tensor_value_info(cur, TensorProto.FLOAT, None),
        ],
        initializer=g.initializers,
    )
    mp = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    mp.ir_version = 8
    got_last, got_seq = ort.InferenceSession(mp.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"X": np.ascontiguousarray(x.transpose(1, 0, 2)), "lengths": lengths}
    )
    np.testing.assert_allclose(got_last, want_last, atol=1e-5, rtol=0)
    valid = np.arange(T)[None, :] < lengths[:, None]  # padded steps: ONNX writes zeros, ours is unspecified
    np.testing.assert_allclose(got_seq.transpose(1, 0, 2)[valid], inp[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "layers,bidirectional,pooling",
    [(1, True, "last"), (2, False, "last"), (2, True, "last"), (1, False, "max"), (1, True, "mean"), (2, True, "max")],
)
@pytest.mark.parametrize("opset", [14, 18])
def test_every_architecture_exports(tmp_path, layers, bidirectional, pooling, opset):
    rows = synthetic_sentences(200, 4)
    split = Split([t for t, _ in rows], [str(y) for _, y in rows], [f"s:{i}" for i in range(len(rows))])
    m = SentimentClassifier.create(
        split,
        units=6,
        embedding_dim=5,
        seed=1,
        layers=layers,
        bidirectional=bidirectional,
        pooling=pooling,
        log=lambda *a: None,
    )
    m.fit(split, None, TrainOptions(epochs=1, batch_size=16, lr=0.02, progress=False), log=lambda *a: None)
    path = export_onnx(m, tmp_path / "m.onnx", opset=opset)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    lstm = [n for n in onnx.load(str(path)).graph.node if n.op_type == "LSTM"]
    assert len(lstm) == layers
    want_dir = b"bidirectional" if bidirectional else b"forward"
    assert all(a.s == want_dir for n in lstm for a in n.attribute if a.name == "direction")
    assert ("ReduceMax" in ops) == (pooling == "max") and ("ReduceSum" in ops) == (pooling == "mean")
    texts = [t for t, _ in synthetic_sentences(150, 12)] + ["good " * 30]  # lengths 1..max_len
    assert_same_as_ours(m, path, texts, batch_size=37)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("pooling", "attention", "pooling='attention' is not supported yet"),
        ("bidirectional", "yes", "bidirectional='yes' is not supported"),
        ("layers", 0, "layers=0 is not supported"),
        ("layers", 2, "the weights do not match layers=2"),
    ],
)
def test_unmapped_architecture_is_refused_by_name(model, tmp_path, field, value, message):
    m = SentimentClassifier(dataclasses.replace(model.config), model.vocab, dict(model.params))
    object.__setattr__(m.config, field, value)
    out = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match=f"export: {re.escape(message)}"):
        export_onnx(m, out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_unknown_config_field_or_weight_is_refused(model, tmp_path):
    Extended = dataclasses.make_dataclass("Extended", [("attention", bool, True)], bases=(ModelConfig,))
    m = SentimentClassifier(Extended(**dataclasses.asdict(model.config)), model.vocab, dict(model.params))
    with pytest.raises(ValueError, match="config field 'attention' is not known"):
        export_onnx(m, tmp_path / "m.onnx")
    m = SentimentClassifier(model.config, model.vocab, dict(model.params, kernel_1=model.params["kernel"]))
    with pytest.raises(ValueError, match=r"weights \['kernel_1'\] are not known"):
        export_onnx(m, tmp_path / "m.onnx")


def test_unwritable_output_and_atomic_write(model, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="output directory .*nope.* does not exist"):
        export_onnx(model, tmp_path / "nope" / "m.onnx")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        export_onnx(model, tmp_path)
    real_open = checkpoint.os.open

    def refuse(path, *a, **kw):
        if str(path).endswith(".tmp"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(checkpoint.os, "open", refuse)
    with pytest.raises(PermissionError, match=r"export: cannot write .*m\.onnx: Permission denied"):
        export_onnx(model, tmp_path / "m.onnx")
    monkeypatch.undo()
    # A write that fails halfway leaves the previous file as it was and no temporary behind.
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous")

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", fail)
    with pytest.raises(OSError, match="No space left on device"):
        export_onnx(model, out)
    assert out.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_missing_onnx_package_names_the_extra(model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(ImportError, match=r"fusedlstm\[bench\].*pip install onnx"):
        export_onnx(model, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fusedlstm", *args], capture_output=True, text=True, timeout=300)


def test_cli_export(model, tmp_path):
    d = tmp_path / "model"
    model.save(d)
    r = run_cli("export", str(d), str(tmp_path / "m.onnx"))
    assert r.returncode == 0, r.stderr
    texts = [t for t, _ in synthetic_sentences(50, 8)]
    assert_same_as_ours(model, tmp_path / "m.onnx", texts)
    # a model directory that does not validate: the file and the field named, nothing written
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, units=0)))
    r = run_cli("export", str(d), str(tmp_path / "bad.onnx"))
    assert r.returncode == 2 and "config.json" in r.stderr and "units" in r.stderr, r.stderr
    r = run_cli("export", str(tmp_path / "missing"), str(tmp_path / "bad.onnx"))
    assert r.returncode == 2 and "model directory not found" in r.stderr
    r = run_cli("export", str(d.parent / "m.onnx"), str(tmp_path / "x" / "y.onnx"))  # a file, not a model dir
    assert r.returncode == 2
    (d / "config.json").write_text(json.dumps(cfg))
    r = run_cli("export", str(d), str(tmp_path / "x" / "y.onnx"))
    assert r.returncode == 2 and "output directory" in r.stderr and "does not exist" in r.stderr
    assert not (tmp_path / "bad.onnx").exists() and not (tmp_path / "x").exists()


@requires_data
def test_onnxruntime_equals_predict_proba_on_real_sst2(tmp_path):
    from fusedlstm.sentiment.data import load_data

    splits = load_data(real_data("sst2"))
    train, dev = splits["train"], splits["dev"]
    m = train_small(train.texts[:3000], train.labels[:3000], units=16, epochs=2)
    path = export_onnx(m, tmp_path / "sst2.onnx")
    assert_same_as_ours(m, path, dev.texts)

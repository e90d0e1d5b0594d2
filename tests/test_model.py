"""The whole classifier: float64 gradient check of every parameter (embedding, LSTM, dropout
with a fixed mask, dense, loss) against central differences; seeded reproducibility; save/load
round trip; checkpoint resume; hostile model directories; the CLI end to end on a synthetic
corpus (and on the real data sets when FUSEDLSTM_TEST_DATA names them)."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from fusedlstm import SentimentClassifier
from fusedlstm.sentiment.layers import embedding_backward, softmax_cross_entropy
from fusedlstm.sentiment.model import TrainOptions
from helpers import make_model, real_data, requires_data, tiny_split, write_synthetic_glue, write_synthetic_polarity


def test_whole_model_gradient_check():
    m = make_model()
    for k in m.params:
        m.params[k] = m.params[k].astype(np.float64)
    split = tiny_split(6, seed=3)
    ids, lengths = m.encode(split.texts)
    y = m.label_map.encode(split.labels)
    mask = (np.random.default_rng(1).random((6, 5)) < 0.8) / 0.8  # fixed dropout mask
    loss, _, grads, (rows, sparse) = m.forward_backward(ids, lengths, y, mask)
    grads = dict(grads)
    dense_emb = np.zeros_like(m.params["embedding"])
    dense_emb[rows] = sparse
    grads["embedding"] = dense_emb
    eps = 1e-6
    for name, g in grads.items():
        p = m.params[name]
        num = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            if name == "embedding" and idx[0] not in rows:
                continue  # rows not in the batch: zero gradient, checked below
            orig = p[idx]
            p[idx] = orig + eps
            lp = m.forward_backward(ids, lengths, y, mask, need_grads=False)[0]
            p[idx] = orig - eps
            lm = m.forward_backward(ids, lengths, y, mask, need_grads=False)[0]
            p[idx] = orig
            num[idx] = (lp - lm) / (2 * eps)
        np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-8, err_msg=name)
    assert np.all(dense_emb[np.setdiff1d(np.arange(len(dense_emb)), rows)] == 0)


def test_softmax_cross_entropy_is_stable():
    loss, d, probs = softmax_cross_entropy(np.array([[1000.0, -1000.0], [0.0, 0.0]]), np.array([0, 1]))
    assert np.isfinite(loss) and abs(loss - np.log(2) / 2) < 1e-12
    np.testing.assert_allclose(probs.sum(1), 1)


def test_embedding_backward_ignores_padding():
    ids = np.array([[2, 3, 2], [4, 0, 0]])
    rows, g = embedding_backward(ids, np.array([3, 1]), np.ones((2, 3, 2)))
    np.testing.assert_array_equal(rows, [2, 3, 4])
    np.testing.assert_array_equal(g[:, 0], [2, 1, 1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_embedding_backward_matches_scatter_add(dtype):
    """Against np.add.at over the valid positions: repeated ids, NaN in padding (ignored),
    a length-0 row, int32 ids sliced non-contiguously as the model does."""
    rng = np.random.default_rng(5)
    B, T, D = 9, 11, 7
    ids = rng.integers(0, 13, size=(B, T + 3)).astype(np.int32)[:, :T]
    lengths = rng.integers(0, T + 1, size=B)
    lengths[2] = 0
    d_x = rng.standard_normal((B, T, D)).astype(dtype)
    pad = np.arange(T)[None, :] >= lengths[:, None]
    d_x[pad] = np.nan
    rows, g = embedding_backward(ids, lengths, d_x)
    want = np.zeros((13, D))
    np.add.at(want, ids[~pad], d_x[~pad].astype(np.float64))
    used = np.unique(ids[~pad])
    np.testing.assert_array_equal(rows, used)
    assert rows.dtype == np.int64 and g.dtype == dtype and g.flags.c_contiguous
    np.testing.assert_allclose(g, want[used], rtol=1e-5 if dtype == np.float32 else 1e-12)


def test_embedding_backward_bad_input():
    ids = np.zeros((2, 3), np.int64)
    with pytest.raises(ValueError, match="lengths"):
        embedding_backward(ids, np.array([4, 1]), np.ones((2, 3, 2)))
    with pytest.raises(ValueError, match=r"d_x"):
        embedding_backward(ids, np.array([3, 1]), np.ones((2, 4, 2)))
    with pytest.raises(TypeError, match="integers"):
        embedding_backward(ids.astype(float), np.array([3, 1]), np.ones((2, 3, 2)))


def test_same_seed_bit_identical_and_learns():
    opts = TrainOptions(epochs=4, batch_size=8, lr=0.05, seed=3, progress=False)
    a, b = make_model(seed=1), make_model(seed=1)
    ma = a.fit(tiny_split(), tiny_split(20, seed=9), opts, log=lambda *x: None)
    mb = b.fit(tiny_split(), tiny_split(20, seed=9), opts, log=lambda *x: None)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    assert [r["train_loss"] for r in ma] == [r["train_loss"] for r in mb]
    assert a.evaluate(tiny_split(20, seed=5))["accuracy"] > 0.9


def test_weight_average_matches_the_formula():
    """TrainOptions.average keeps a moving average of the dense weights, its decay ramping as
    min(decay, (1+t)/(10+t)); training itself is unchanged by it (the embedding is kept as
    trained). Checked against the trajectory of the same run without averaging."""
    n, decay = 7, 0.6
    base = dict(epochs=10, batch_size=8, lr=0.05, seed=5, progress=False)
    trajectory = [make_model(seed=2).params]
    for k in range(1, n + 1):
        m = make_model(seed=2)
        m.fit(tiny_split(), None, TrainOptions(steps=k, average=0.0, **base), log=lambda *x: None)
        trajectory.append(m.params)
    averaged = make_model(seed=2)
    averaged.fit(tiny_split(), None, TrainOptions(steps=n, average=decay, **base), log=lambda *x: None)
    np.testing.assert_array_equal(averaged.params["embedding"], trajectory[-1]["embedding"])
    for name in ("kernel", "recurrent_kernel", "bias", "dense_w", "dense_b"):
        a = trajectory[0][name].copy()
        for t in range(1, n + 1):
            keep = min(decay, (1 + t) / (10 + t))
            a -= (1 - keep) * (a - trajectory[t][name])
        np.testing.assert_allclose(averaged.params[name], a, rtol=1e-6, atol=1e-7)
        assert not np.allclose(a, trajectory[-1][name])  # the average is not the last step
    with pytest.raises(ValueError, match="average must be in"):
        make_model().fit(tiny_split(), None, TrainOptions(average=1.0, **base), log=lambda *x: None)


def test_save_load_predict_roundtrip(tmp_path):
    m = make_model()
    m.fit(tiny_split(), None, TrainOptions(epochs=2, batch_size=8, lr=0.05, progress=False), log=lambda *x: None)
    m.save(tmp_path / "m")
    r = SentimentClassifier.load(tmp_path / "m")
    texts = ["great fun film", "dull boring", "a film never seen words"]
    np.testing.assert_array_equal(r.predict_proba(texts), m.predict_proba(texts))
    assert [p["label"] for p in r.predict(texts[:2])] == ["positive", "negative"]
    with pytest.raises(ValueError, match="sentence 0 is empty"):
        r.predict(["   "])


def test_resume_equals_uninterrupted(tmp_path):
    opts = TrainOptions(epochs=4, batch_size=8, lr=0.05, seed=2, progress=False, patience=10)
    full = make_model(seed=4)
    full.fit(tiny_split(), tiny_split(20, 9), opts, out_dir=tmp_path / "full", log=lambda *x: None)
    part = make_model(seed=4)
    part.fit(
        tiny_split(),
        tiny_split(20, 9),
        TrainOptions(**dict(opts.__dict__, epochs=2)),
        out_dir=tmp_path / "part",
        log=lambda *x: None,
    )
    resumed = SentimentClassifier.load(tmp_path / "part")
    resumed.fit(tiny_split(), tiny_split(20, 9), opts, out_dir=tmp_path / "part", resume=True, log=lambda *x: None)
    for k in full.params:
        np.testing.assert_array_equal(resumed.params[k], full.params[k])
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]


def test_hostile_model_directories(tmp_path):
    m = make_model()
    d = tmp_path / "m"
    m.save(d)
    cfg = json.loads((d / "config.json").read_text())

    def write_cfg(**change):
        (d / "config.json").write_text(json.dumps(dict(cfg, **change)))

    for change, msg in [
        (dict(units=10**9), "units must be an integer in 1..65536"),
        (dict(vocab_size=10**12), "vocab_size must be an integer"),
        (dict(units="5"), "units must be an integer"),
        (dict(evil=1), "unknown keys"),
        (dict(labels=["a"]), "labels must be a list of 2 strings"),
    ]:
        write_cfg(**change)
        with pytest.raises(ValueError, match=msg):
            SentimentClassifier.load(d)
    write_cfg()
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        SentimentClassifier.load(d)
    write_cfg()
    w = dict(np.load(d / "weights.npz"))
    np.savez(d / "weights.npz", **dict(w, kernel=np.zeros((3, 3), np.float32)))
    with pytest.raises(ValueError, match=r"weights\['kernel'\]: shape \(3, 3\)"):
        SentimentClassifier.load(d)
    np.savez(d / "weights.npz", **dict(w, kernel=np.array([object()], dtype=object)))
    with pytest.raises(ValueError, match="weights.npz: refused"):
        SentimentClassifier.load(d)
    (d / "weights.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="weights.npz: not a readable .npz"):
        SentimentClassifier.load(d)
    (d / "weights.npz").unlink()
    with pytest.raises(FileNotFoundError, match="weights.npz: missing"):
        SentimentClassifier.load(d)


def run_cli(*args, input=None):
    return subprocess.run(
        [sys.executable, "-m", "fusedlstm", *args], capture_output=True, text=True, input=input, timeout=600
    )


# Small and fast on the synthetic corpus: a few hundred sentences, 16 units, a few epochs at a
# learning rate that suits so small a problem.
FAST = ("--units", "16", "--embedding-dim", "16", "--batch-size", "16", "--epochs", "6", "--lr", "0.01", "--quiet")


def test_cli_train_eval_predict(tmp_path):
    data = write_synthetic_glue(tmp_path / "glue")
    out = tmp_path / "model"
    r = run_cli("train", "--data", str(data), "--out", str(out), *FAST)
    assert r.returncode == 0, r.stderr
    acc = float(re.search(r"test accuracy (\S+)", r.stdout).group(1))
    assert acc >= 0.8, r.stdout  # chance is 0.5
    assert (out / "weights.npz").exists() and not list(out.glob(".*.tmp"))
    r = run_cli("eval", str(out), "--data", str(data), "--json")
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    assert ev["n"] == 120 and ev["accuracy"] == pytest.approx(acc, abs=1e-4)
    assert len(ev["confusion_matrix"]) == 2 and sum(map(sum, ev["confusion_matrix"])) == 120
    r = run_cli("predict", str(out), "--json", input="a wonderful film\nthe plot is terrible\n")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["label"] for x in rows] == ["1", "0"], rows
    assert all(0.5 <= x["probability"] <= 1 for x in rows)
    r = run_cli("train", "--data", str(data), "--out", str(out), "--steps", "5")
    assert r.returncode != 0 and "--resume" in (r.stderr + r.stdout)
    r = run_cli("eval", str(tmp_path / "nope"), "--data", str(data))
    assert r.returncode == 2 and "model directory not found" in r.stderr


@requires_data
def test_cli_train_eval_predict_real_sst2(tmp_path):
    data = real_data("sst2")
    out = tmp_path / "model"
    r = run_cli(
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--units",
        "16",
        "--max-len",
        "4",
        "--embedding-dim",
        "64",
        "--steps",
        "200",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout and (out / "weights.npz").exists()
    assert not list(out.glob(".*.tmp"))
    r = run_cli("eval", str(out), "--data", str(data), "--json")
    ev = json.loads(r.stdout)
    assert ev["n"] == 1821 and 0 <= ev["accuracy"] <= 1 and len(ev["confusion_matrix"]) == 2
    r = run_cli("predict", str(out), "--json", input="a gorgeous, witty film\nawful\n")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 2 and all(0.5 <= x["probability"] <= 1 for x in rows)


def test_cli_polarity_cross_validation_fold(tmp_path):
    """Pang & Lee files (Windows-1252 with 0x85 inside lines), one fold of 5-fold CV as test."""
    data = write_synthetic_polarity(tmp_path / "mr", n=500)
    r = run_cli("train", "--data", str(data), "--out", str(tmp_path / "mr_model"), "--folds", "5", "--fold", "3", *FAST)
    assert r.returncode == 0, r.stderr
    assert "holding out 40 training sentences" in r.stdout  # 10% of the 4 training folds
    assert float(re.search(r"test accuracy (\S+)", r.stdout).group(1)) >= 0.8, r.stdout
    labels = json.loads((tmp_path / "mr_model" / "config.json").read_text())["labels"]
    assert labels == ["negative", "positive"]


@requires_data
def test_cli_polarity_cross_validation_fold_real_mr(tmp_path):
    r = run_cli(
        "train",
        "--data",
        str(real_data("mr")),
        "--out",
        str(tmp_path / "mr"),
        "--folds",
        "10",
        "--fold",
        "3",
        "--units",
        "8",
        "--embedding-dim",
        "8",
        "--steps",
        "20",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout


def _vectors_file(path, words, dim=6):
    rows = {w: [((i * 7 + j) % 5) / 10 - 0.2 for j in range(dim)] for i, w in enumerate(words)}
    path.write_text("".join(f"{w} " + " ".join(f"{v:.1f}" for v in r) + "\n" for w, r in rows.items()))
    return rows


@pytest.mark.parametrize("source", ["synthetic", pytest.param("real", marks=requires_data)])
def test_cli_fine_tunes_vectors_by_default_and_freezes_on_request(tmp_path, source):
    data = write_synthetic_polarity(tmp_path / "mr") if source == "synthetic" else real_data("mr")
    vec = tmp_path / "tiny.vec"
    rows = _vectors_file(vec, ["great", "good", "dull", "boring", "film", "the"])
    for flags, trained in (([], True), (["--freeze-embeddings"], False)):
        out = tmp_path / ("frozen" if flags else "tuned")
        r = run_cli(
            "train",
            "--data",
            str(data),
            "--out",
            str(out),
            "--vectors",
            str(vec),
            "--units",
            "8",
            "--steps",
            "10",
            "--quiet",
            "--no-test",
            *flags,
        )
        assert r.returncode == 0, r.stderr
        assert json.loads((out / "config.json").read_text())["train_embeddings"] is trained
        tokens = json.loads((out / "vocab.json").read_text())["tokens"]
        with np.load(out / "weights.npz", allow_pickle=False) as z:
            emb = z["embedding"]
        got = np.stack([emb[tokens.index(w)] for w in rows])
        want = np.array(list(rows.values()), np.float32)
        if trained:  # the vectors' rows moved
            assert not np.allclose(got, want, atol=1e-6)
        else:  # the vectors' rows are exactly as read
            np.testing.assert_array_equal(got, want)
    r = run_cli("train", "--data", str(data), "--out", str(tmp_path / "x"), "--train-embeddings", "--freeze-embeddings")
    assert r.returncode == 2 and "not allowed with" in r.stderr


def test_cli_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib", reason="extra [plot] (CI installs it)")
    from fusedlstm.sentiment.cli import plot_metrics

    metrics = [
        {"epoch": 1, "train_loss": 0.7, "train_acc": 0.5, "dev_loss": 0.69, "dev_acc": 0.55},
        {"epoch": 2, "train_loss": 0.5, "train_acc": 0.7, "dev_loss": 0.6, "dev_acc": 0.65},
    ]
    plot_metrics(metrics, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_proba_on_prepared_weights_equals_the_training_forward():
    """predict_proba packs the LSTM once (fusedlstm.prepare) for all its batches; its
    probabilities equal the training path's forward (need_grads=False) within float32 rounding."""
    model, split = make_model(units=20), tiny_split()
    ids, lengths = model.encode(split.texts)
    _, want, _, _ = model.forward_backward(ids, lengths, np.zeros(len(lengths), np.int64), need_grads=False)
    got = model.predict_proba(split.texts, batch_size=3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.argmax(axis=1), want.argmax(axis=1))


def test_inference_pooling_equals_the_training_pooling():
    # The inference path pools by a reduction after masking the padded steps; training keeps
    # the argmax. Same features, including rows of length 0 and of full length.
    from fusedlstm.sentiment.model import _pool, _pool_inference

    rng = np.random.default_rng(3)
    out = rng.standard_normal((6, 5, 4)).astype(np.float32)
    out[1] -= 10.0  # all negative: a padded zero must not win the max
    top = rng.standard_normal((6, 4)).astype(np.float32)
    lengths = np.array([5, 3, 0, 1, 5, 2], np.int32)
    for pooling in ("max", "mean", "last"):
        want, _ = _pool(pooling, out.copy(), top, lengths)
        got = _pool_inference(pooling, out.copy(), top, lengths)
        np.testing.assert_array_equal(got, want, err_msg=pooling)

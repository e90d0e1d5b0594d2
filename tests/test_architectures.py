"""The classifier's architectures (--layers, --bidirectional, --pooling, --embedding-keep-prob): a
float64 gradient check of every parameter against central differences (with and without
dropout on the word vectors), inference on prepared weights equal to the
training forward, learning, save/load, and old model directories (no architecture fields)."""

import json

import numpy as np
import pytest

from fusedlstm import SentimentClassifier
from fusedlstm.sentiment.model import DEFAULT_ARCHITECTURE, ORIGINAL_ARCHITECTURE, TrainOptions
from helpers import tiny_split

ARCHS = [  # (layers, bidirectional, pooling)
    (1, False, "max"),
    (1, False, "mean"),
    (1, True, "last"),
    (1, True, "max"),
    (2, False, "last"),
    (2, True, "mean"),
]


def make(layers, bidirectional, pooling, units=4, seed=0, embedding_keep_prob=1.0):
    return SentimentClassifier.create(
        tiny_split(),
        units=units,
        embedding_dim=3,
        seed=seed,
        layers=layers,
        bidirectional=bidirectional,
        pooling=pooling,
        embedding_keep_prob=embedding_keep_prob,
        log=lambda *a: None,
    )


@pytest.mark.parametrize("word_dropout", [False, True], ids=["", "embedding_dropout"])
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: "L%d_%s_%s" % (a[0], "bi" if a[1] else "uni", a[2]))
def test_gradient_check(arch, word_dropout):
    m = make(*arch, units=3)
    for k in m.params:
        m.params[k] = m.params[k].astype(np.float64)
    split = tiny_split(5, seed=3)
    ids, lengths = m.encode(split.texts)
    y = m.label_map.encode(split.labels)
    rng = np.random.default_rng(1)
    mask = (rng.random((5, m.config.features)) < 0.8) / 0.8
    emb_mask = (rng.random((5, int(lengths.max()), 3)) < 0.7) / 0.7 if word_dropout else None
    _, _, grads, (rows, sparse) = m.forward_backward(ids, lengths, y, mask, embedding_mask=emb_mask)
    grads = dict(grads)
    emb = np.zeros_like(m.params["embedding"])
    emb[rows] = sparse
    grads["embedding"] = emb
    assert set(grads) == set(m.config.weight_shapes())
    eps = 1e-6
    for name, g in grads.items():
        p = m.params[name]
        num = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            if name == "embedding" and idx[0] not in rows:
                continue
            orig = p[idx]
            p[idx] = orig + eps
            lp = m.forward_backward(ids, lengths, y, mask, need_grads=False, embedding_mask=emb_mask)[0]
            p[idx] = orig - eps
            lm = m.forward_backward(ids, lengths, y, mask, need_grads=False, embedding_mask=emb_mask)[0]
            p[idx] = orig
            num[idx] = (lp - lm) / (2 * eps)
        np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: "L%d_%s_%s" % (a[0], "bi" if a[1] else "uni", a[2]))
def test_learns_and_round_trips(tmp_path, arch):
    m = make(*arch, units=8, embedding_keep_prob=0.9 if arch[1] else 1.0)
    opts = TrainOptions(epochs=5, batch_size=8, lr=0.05, seed=3, progress=False)
    m.fit(tiny_split(), None, opts, log=lambda *x: None)
    assert m.evaluate(tiny_split(20, seed=5))["accuracy"] > 0.9
    split = tiny_split(13, seed=7)
    ids, lengths = m.encode(split.texts)
    _, want, _, _ = m.forward_backward(ids, lengths, np.zeros(len(lengths), np.int64), need_grads=False)
    got = m.predict_proba(split.texts, batch_size=4)  # on prepared weights, per layer and direction
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    m.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (cfg["layers"], cfg["bidirectional"], cfg["pooling"]) == arch
    assert cfg["embedding_keep_prob"] == (0.9 if arch[1] else 1.0)
    r = SentimentClassifier.load(tmp_path / "m")
    np.testing.assert_array_equal(r.predict_proba(split.texts), got)


def test_defaults_the_original_architecture_and_old_directories_load(tmp_path):
    d = SentimentClassifier.create(tiny_split(), units=4, embedding_dim=3, log=lambda *a: None)
    assert {k: getattr(d.config, k) for k in DEFAULT_ARCHITECTURE} == DEFAULT_ARCHITECTURE
    m = SentimentClassifier.create(tiny_split(), units=4, embedding_dim=3, log=lambda *a: None, **ORIGINAL_ARCHITECTURE)
    assert (m.config.layers, m.config.bidirectional, m.config.pooling) == (1, False, "last")
    assert set(m.params) == {"embedding", "kernel", "recurrent_kernel", "bias", "dense_w", "dense_b"}
    m.save(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    cfg = json.loads(path.read_text())
    for k in ("layers", "bidirectional", "pooling", "embedding_keep_prob"):  # saved before these existed
        del cfg[k]
    path.write_text(json.dumps(cfg))
    r = SentimentClassifier.load(tmp_path / "m")
    texts = ["great fun", "dull flat film"]
    np.testing.assert_array_equal(r.predict_proba(texts), m.predict_proba(texts))


def test_bad_architecture_is_named(tmp_path):
    with pytest.raises(ValueError, match="pooling must be one of"):
        make(1, False, "attention")
    with pytest.raises(ValueError, match="layers must be an integer"):
        make(0, False, "last")
    m = make(2, True, "max")
    m.save(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["bidirectional"] = False  # weights.npz no longer matches the architecture
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="weights"):
        SentimentClassifier.load(tmp_path / "m")

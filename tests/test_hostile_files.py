"""Hostile and damaged files: model directories with pickled or lying .npz members and absurd
configs are refused before anything is executed or allocated; damaged vector files and dataset
files give clear errors naming the file (and line), or are read with the bad rows skipped and
reported."""

import gzip
import io
import json
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from fusedlstm import SentimentClassifier
from fusedlstm.sentiment.data import load_data, read_polarity, read_table
from fusedlstm.sentiment.vectors import read_vectors
from helpers import make_model


class Evil:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def saved(tmp_path):
    d = tmp_path / "m"
    make_model().save(d)
    return d, {k: v for k, v in np.load(d / "weights.npz").items()}


def write_npz(path, members):
    """A zip of raw members {name: bytes} (stored), like np.savez makes."""
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def npy_bytes(arr, allow_pickle=False):
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def test_pickled_weights_are_refused_without_running_them(tmp_path):
    d, w = saved(tmp_path)
    marker = tmp_path / "pwned"
    evil = np.empty(1, dtype=object)
    evil[0] = Evil(str(marker))
    members = {f"{k}.npy": npy_bytes(v) for k, v in w.items()}
    members["kernel.npy"] = npy_bytes(evil, allow_pickle=True)
    write_npz(d / "weights.npz", members)
    with pytest.raises(ValueError, match=r"weights.npz: refused .*Python objects"):
        SentimentClassifier.load(d)
    # A raw pickle smuggled in as a member.
    import pickle

    members["kernel.npy"] = npy_bytes(w["kernel"])
    members["payload.pkl"] = pickle.dumps(Evil(str(marker)))
    write_npz(d / "weights.npz", members)
    with pytest.raises(ValueError, match=r"weights.npz: refused .*payload.pkl.* not a .npy"):
        SentimentClassifier.load(d)
    assert not marker.exists()


def test_npz_member_claiming_a_huge_shape_is_refused_before_allocating(tmp_path):
    d, w = saved(tmp_path)
    buf = io.BytesIO()  # a valid .npy header for shape (10**12,), then 12 bytes of data
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
    lying = buf.getvalue() + b"\x00" * 12
    members = {f"{k}.npy": npy_bytes(v) for k, v in w.items()}
    members["bias.npy"] = lying
    write_npz(d / "weights.npz", members)
    with pytest.raises(ValueError, match=r"claims shape \(1000000000000,\)"):
        SentimentClassifier.load(d)


@pytest.mark.parametrize(
    "change,msg",
    [
        (dict(vocab_size=50_000_000, embedding_dim=65_536), "parameters, more than"),
        (dict(units=5.5), "units must be an integer"),
        (dict(units=True), "units must be an integer"),
        (dict(keep_prob="0.8"), "keep_prob must be in"),
        (dict(labels={"a": 1}), "labels must be a list"),
        (dict(train_embeddings="yes"), "train_embeddings must be true or false"),
        (dict(max_len=-3), "max_len must be an integer"),
    ],
)
def test_absurd_or_mistyped_configs(tmp_path, change, msg):
    d, _ = saved(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, **change)))
    with pytest.raises(ValueError, match=msg):
        SentimentClassifier.load(d)


@pytest.mark.parametrize("junk", [b"", b"\x00" * 100, b"PK\x05\x06" + b"\x00" * 18, bytes(range(256)) * 40])
def test_corrupt_npz(tmp_path, junk):
    d, _ = saved(tmp_path)
    (d / "weights.npz").write_bytes(junk)
    with pytest.raises(ValueError, match="weights.npz"):
        SentimentClassifier.load(d)


def test_damaged_vector_files(tmp_path):
    good = "the 0.1 0.2 0.3\nfilm 0.4 0.5 0.6\n"
    cases = []
    p = tmp_path / "trunc.txt.gz"
    p.write_bytes(gzip.compress(good.encode() * 50)[:-20])
    cases.append((p, "corrupt or truncated gzip"))
    p = tmp_path / "junk.txt"
    p.write_bytes(bytes(range(256)) * 10)
    cases.append((p, "junk.txt:1"))
    p = tmp_path / "nan.txt"
    p.write_text(good.replace("film 0.4", "film nan"))
    cases.append((p, r"nan.txt:2: non-finite"))
    p = tmp_path / "long.txt"
    p.write_text(good + "x " + " ".join(["0.5"] * 200_000) + "\n")  # one 1 MB line
    cases.append((p, r"long.txt:3: expected 3 values"))
    p = tmp_path / "huge_count.bin"
    p.write_bytes(b"1000000000000 3\nthe " + struct.pack("<3f", 1, 2, 3))
    cases.append((p, r"huge_count.bin:1: the header promises"))
    p = tmp_path / "huge_dim.bin"
    p.write_bytes(b"1 1000000000\nthe " + struct.pack("<3f", 1, 2, 3))
    cases.append((p, r"huge_dim.bin:1: vector dimension"))
    p = tmp_path / "short.bin"
    p.write_bytes(b"2 3\nthe " + struct.pack("<3f", 1, 2, 3) + b"a_long_word_here " + b"\x00\x00")
    cases.append((p, r"short.bin: truncated in the vector of word 2"))
    for path, msg in cases:
        with pytest.raises(ValueError, match=msg):
            read_vectors(str(path), {"the": 2, "film": 3})


def test_table_reader_survives_junk_long_lines_line_endings_and_boms(tmp_path):
    long_review = "a " * 500_000 + "fine film"  # a 1 MB sentence, one field
    body = (
        "sentence\tlabel\r\n"
        "good film\t1\n"
        "bad film\t0\r"
        f"{long_review}\t1\r\n"
        "\x00\x01\x02\x7f\x03garbage\t1\n"
        "only one column\n"
        "\t0\n"
        "dull\t0\n"
    )
    p = tmp_path / "t.tsv"
    p.write_bytes(codecs_bom(body))
    s = read_table(p)
    assert s.texts[:3] == ["good film", "bad film", long_review.strip()]
    assert s.texts[3:] == ["dull"] and s.labels == ["1", "0", "1", "0"]
    assert [o.rsplit(":", 1)[1] for o in s.origins] == ["2", "3", "4", "8"]
    assert len(s.skipped) == 3
    assert "t.tsv:5: binary data" in s.skipped[0]
    assert "t.tsv:6: expected at least 2 columns, got 1" in s.skipped[1]
    assert "t.tsv:7: empty sentence" in s.skipped[2]
    # UTF-16 with its BOM reads the same rows.
    p16 = tmp_path / "t16.tsv"
    p16.write_bytes("sentence\tlabel\r\nbon film\t1\r\nnul\t0\r\n".encode("utf-16"))
    assert read_table(p16).texts == ["bon film", "nul"]


def codecs_bom(text):
    return b"\xef\xbb\xbf" + text.encode("utf-8")


def test_files_that_are_mostly_junk_are_refused(tmp_path):
    p = tmp_path / "bin.tsv"
    p.write_bytes(b"sentence\tlabel\n" + bytes(range(256)) * 50)
    with pytest.raises(ValueError, match=r"bin.tsv: \d+ of \d+ rows unreadable"):
        read_table(p)
    p = tmp_path / "all.bin"
    p.write_bytes(bytes(range(256)) * 50)
    with pytest.raises(ValueError, match=r"all.bin:1: the header line holds binary data"):
        read_table(p)


def test_polarity_reader_skips_and_reports_junk(tmp_path):
    (tmp_path / "x.pos").write_bytes(b"a fine film\r\nwitty \x85 and warm\n\x00\x00\x00\ngreat\r")
    (tmp_path / "x.neg").write_bytes(b"dull\nflat\n")
    s = read_polarity(tmp_path)
    assert s.texts == ["dull", "flat", "a fine film", "witty \u2026 and warm", "great"]
    assert len(s.skipped) == 1 and "x.pos:3: binary data" in s.skipped[0]


def test_cli_reports_skipped_rows(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    rows = ["sentence\tlabel"] + [f"{w} film\t{i % 2}" for i, w in enumerate(["good", "bad"] * 20)]
    (d / "train.tsv").write_text("\n".join(rows + ["broken row without label"]) + "\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fusedlstm",
            "train",
            "--data",
            str(d),
            "--out",
            str(tmp_path / "m"),
            "--units",
            "4",
            "--embedding-dim",
            "4",
            "--steps",
            "3",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "skipped 1 unreadable row(s)" in r.stderr and "train.tsv:42" in r.stderr
    assert load_data(d)["train"].skipped

"""Streaming prediction (fusedlstm.sentiment.serving, `fusedlstm predict --file`): the answers equal
SentimentClassifier.predict on the same lines, in input order, across window and batch
boundaries; empty lines are answered in place, never dropped; stdin, \\r\\n and a BOM; a line that
is not UTF-8 is named; the progress bar only on a terminal; and peak memory that does not grow
with the input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fusedlstm import SentimentClassifier
from fusedlstm.sentiment.data import Split
from fusedlstm.sentiment.model import TrainOptions
from fusedlstm.sentiment.serving import EMPTY_LINE, predict_stream, read_lines, score_encoded
from helpers import synthetic_sentences


def train_small(seed: int = 0, n: int = 400, units: int = 8) -> SentimentClassifier:
    """A classifier trained for a few seconds on the synthetic corpus (well above chance)."""
    rows = synthetic_sentences(n, seed)
    split = Split([t for t, _ in rows], [str(y) for _, y in rows], [f"s:{i}" for i in range(n)])
    m = SentimentClassifier.create(split, units=units, embedding_dim=8, seed=seed, log=lambda *a: None)
    m.fit(split, None, TrainOptions(epochs=4, batch_size=16, lr=0.02, progress=False), log=lambda *a: None)
    return m


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serving") / "model"
    train_small().save(path)
    return path


def lines_with_empties(n: int, seed: int = 3) -> list[str]:
    lines = [t for t, _ in synthetic_sentences(n, seed)]
    for i in (0, 7, 8, n // 2, n - 1):
        lines[i] = "" if i % 2 else "  \t "
    # unknown words and sentences longer than max_len (truncated) too
    lines[5] = "zyzzyva quux " * 30
    return lines


def run_cli(*args, input=None, **kw):
    return subprocess.run(
        [sys.executable, "-m", "fusedlstm", *args], capture_output=True, input=input, timeout=300, **kw
    )


@pytest.mark.parametrize("batch_size,window", [(1, 3), (7, 20), (256, None)])
def test_stream_equals_predict_in_order(model_dir, batch_size, window):
    m = SentimentClassifier.load(model_dir)
    lines = lines_with_empties(301)
    got = list(predict_stream(m, iter(lines), batch_size=batch_size, window=window))
    assert [r["text"] for r in got] == lines  # every line answered, in its place
    empty = [i for i, t in enumerate(lines) if not t.strip()]
    assert [i for i, r in enumerate(got) if r.get("error") == EMPTY_LINE] == empty
    assert all(got[i]["label"] is None and got[i]["probability"] is None for i in empty)
    kept = [i for i in range(len(lines)) if i not in empty]
    assert [got[i] for i in kept] == m.predict([lines[i] for i in kept])  # equal, probabilities included


def test_stream_equals_predict_stacked_bidirectional_pooled():
    rows = synthetic_sentences(120, 2)
    split = Split([t for t, _ in rows], [str(y) for _, y in rows], [f"s:{i}" for i in range(len(rows))])
    m = SentimentClassifier.create(
        split, units=5, embedding_dim=4, layers=2, bidirectional=True, pooling="mean", log=lambda *a: None
    )
    lines = lines_with_empties(90)
    got = list(predict_stream(m, lines, batch_size=8, window=30))
    kept = [i for i, t in enumerate(lines) if t.strip()]
    assert [got[i] for i in kept] == m.predict([lines[i] for i in kept])


def test_score_encoded_restores_order(model_dir):
    m = SentimentClassifier.load(model_dir)
    texts = [t for t, _ in synthetic_sentences(50, 9)]
    ids, lengths = m.encode(texts)
    np.testing.assert_array_equal(score_encoded(m, ids, lengths, batch_size=4), m.predict_proba(texts))
    with pytest.raises(ValueError, match="batch_size"):
        score_encoded(m, ids, lengths, batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        list(predict_stream(m, texts, batch_size=-1))


def test_read_lines_endings_bom_and_bad_bytes(tmp_path):
    p = tmp_path / "x.txt"
    p.write_bytes(b"\xef\xbb\xbfgood film\r\nbad\n\nlast without newline")
    with p.open("rb") as f:
        assert list(read_lines(f, "x.txt")) == ["good film", "bad", "", "last without newline"]
    p.write_bytes(b"fine\nfine\ncaf\xe9\n")
    with p.open("rb") as f, pytest.raises(ValueError, match=r"x\.txt: line 3 is not UTF-8"):
        list(read_lines(f, "x.txt"))


def test_cli_file_and_stdin_equal_predict(model_dir, tmp_path):
    m = SentimentClassifier.load(model_dir)
    lines = lines_with_empties(700)
    f = tmp_path / "in.txt"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    r = run_cli("predict", str(model_dir), "--file", str(f), "--json", "--batch-size", "32")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.decode().splitlines()]
    assert [x["text"] for x in rows] == lines
    kept = [i for i, t in enumerate(lines) if t.strip()]
    assert [rows[i] for i in kept] == m.predict([lines[i] for i in kept])
    assert b"5 empty line(s)" in r.stderr and b"line 1)" in r.stderr
    # stdin ('-' and no --file alike), tab-separated output: an empty label field for empty lines
    for extra in (["--file", "-"], []):
        r2 = run_cli("predict", str(model_dir), *extra, input=f.read_bytes())
        assert r2.returncode == 0, r2.stderr
        out = r2.stdout.decode().split("\n")[:-1]
        assert len(out) == len(lines)
        for i, row in enumerate(out):
            label, prob, text = row.split("\t", 2)
            assert text == lines[i]
            if i in kept:
                assert label == rows[i]["label"] and float(prob) == pytest.approx(rows[i]["probability"], abs=5e-5)
            else:
                assert label == prob == ""


def test_cli_bad_input(model_dir, tmp_path):
    r = run_cli("predict", str(model_dir), "--file", str(tmp_path / "missing.txt"))
    assert r.returncode == 2 and b"--file" in r.stderr and b"missing.txt" in r.stderr
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good\n\xff\xfe bad\n")
    r = run_cli("predict", str(model_dir), "--file", str(bad))
    assert r.returncode == 2 and b"line 2 is not UTF-8" in r.stderr
    r = run_cli("predict", str(model_dir), "--file", str(bad), "--batch-size", "0")
    assert r.returncode == 2 and b"--batch-size" in r.stderr
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    r = run_cli("predict", str(model_dir), "--file", str(empty))
    assert r.returncode != 0 and b"no sentences" in r.stderr


def test_progress_bar_only_on_a_terminal(model_dir, tmp_path):
    pty = pytest.importorskip("pty")
    f = tmp_path / "in.txt"
    f.write_text("\n".join(t for t, _ in synthetic_sentences(300, 1)) + "\n", encoding="utf-8")
    r = run_cli("predict", str(model_dir), "--file", str(f))
    assert r.returncode == 0 and r.stderr == b""  # not a terminal: no bar
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    # A new pty is 0 columns wide, and tqdm draws nothing in no width: give it 80.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        p = subprocess.run(
            [sys.executable, "-m", "fusedlstm", "predict", str(model_dir), "--file", str(f)],
            stdout=subprocess.PIPE,
            stderr=slave,
            timeout=300,
        )
        os.close(slave)
        slave = -1
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the pty's writer side is closed
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert p.returncode == 0
    assert b"%|" in seen, seen  # the bar went to the terminal
    assert len(p.stdout.decode().splitlines()) == 300 and b"\r" not in p.stdout  # stdout stays clean


# Peak RSS of a child read from our own rusage (wait4) would include ours: Linux carries a
# process's pre-exec high-water mark (the parent's memory, under fork or vfork) into the exec'd
# program. A small wrapper runs the command and reports its own child's peak instead.
_WRAPPER = (
    "import resource, subprocess, sys\n"
    "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(r.returncode)\n"
)


def _peak_rss_mib(args: list[str]) -> float:
    p = subprocess.run(
        [sys.executable, "-c", _WRAPPER, sys.executable, "-m", "fusedlstm", *args], capture_output=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    return int(p.stdout.split()[-1]) / (2**20 if sys.platform == "darwin" else 1024)  # bytes there, KiB on Linux


def test_memory_does_not_grow_with_the_input(model_dir, tmp_path):
    """200k then 400k lines: the peak RSS of the whole process may not grow by more than 5% (the
    pre-streaming command grew by ~80% between these two sizes of the real data)."""
    import fusedlstm

    if fusedlstm.build_info()["sanitizers"]:
        # AddressSanitizer keeps freed memory in quarantine (up to 256 MiB): the RSS then grows
        # with what was allocated, not with what is held. The normal build measures this.
        pytest.skip("peak RSS under a sanitizer build measures its quarantine, not the program")
    base = [t for t, _ in synthetic_sentences(1000, 11)]
    sizes = (200_000, 400_000)
    peaks = []
    for n in sizes:
        f = tmp_path / f"{n}.txt"
        with f.open("w", encoding="utf-8") as out:
            for i in range(0, n, len(base)):
                out.write("\n".join(base[: n - i]) + "\n")
        peaks.append(_peak_rss_mib(["predict", str(model_dir), "--file", str(f), "--json"]))
        f.unlink()
    assert peaks[1] <= 1.05 * peaks[0], (
        f"peak RSS {peaks[0]:.1f} MiB for {sizes[0]} lines, {peaks[1]:.1f} for {sizes[1]}"
    )

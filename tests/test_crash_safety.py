"""Crash-safe training: `fusedlstm train` is killed with SIGKILL in the middle of an epoch; the
model directory must then hold the last complete checkpoint (it loads and predicts), no
temporary file may pass for a model file, and `--resume` must end with weights bit-identical to
an uninterrupted run with the same seed."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fusedlstm import SentimentClassifier
from fusedlstm.sentiment.checkpoint import CHECKPOINT_FILES

EPOCHS = 4


def write_glue_dir(path, rng):
    """A GLUE-layout directory of synthetic sentences whose label is carried by a few words."""
    good = ["great", "moving", "witty", "superb", "charming", "fresh"]
    bad = ["dull", "awful", "boring", "flat", "tedious", "stale"]
    filler = [f"w{i}" for i in range(300)]
    path.mkdir()
    for split, n in (("train", 6000), ("dev", 300), ("test", 300)):
        rows = ["sentence\tlabel"]
        for _ in range(n):
            y = int(rng.integers(2))
            words = list(rng.choice(filler, int(rng.integers(8, 24))))
            words[int(rng.integers(len(words)))] = str(rng.choice(good if y else bad))
            rows.append(" ".join(words) + f"\t{y}")
        (path / f"{split}.tsv").write_text("\n".join(rows) + "\n")


def train_cmd(data, out, *extra):
    return [
        sys.executable,
        "-m",
        "fusedlstm",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        str(EPOCHS),
        "--seed",
        "7",
        "--units",
        "48",
        "--embedding-dim",
        "16",
        "--batch-size",
        "8",
        "--patience",
        "100",
        "--quiet",
        *extra,
    ]


def metrics_lines(out):
    try:
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def weights(out):
    with np.load(out / "weights.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


ENV = dict(os.environ, PYTHONHASHSEED="0")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The data and the run that is never killed."""
    tmp = tmp_path_factory.mktemp("crash")
    data = tmp / "data"
    write_glue_dir(data, np.random.default_rng(0))
    full = tmp / "full"
    r = subprocess.run(train_cmd(data, full), capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    assert [m["epoch"] for m in metrics_lines(full)] == list(range(1, EPOCHS + 1))
    return data, full


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
@pytest.mark.parametrize("when", [0.05, 0.5, 0.95])
def test_sigkill_mid_epoch_then_resume(tmp_path, uninterrupted, when):
    """Killed at `when` of the way through epoch 2 (0.95 lands near the checkpoint write)."""
    data, full = uninterrupted
    env = ENV
    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(data, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 300
        while not metrics_lines(killed) and time.monotonic() < deadline:
            assert proc.poll() is None, "training ended before its first checkpoint"
            time.sleep(0.01)
        first = metrics_lines(killed)
        assert first, "no checkpoint within 300 s"
        time.sleep(when * first[0]["seconds"])  # epoch 1 took this long
        assert proc.poll() is None, "training finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()

    # The directory is a complete checkpoint: it loads and predicts. state.npz (what --resume
    # reads) is the last complete checkpoint; a kill inside the next checkpoint may have left
    # metrics.jsonl (written first) and then the model files one epoch ahead of it, never more.
    done = metrics_lines(killed)
    assert 1 <= len(done) < EPOCHS
    model = SentimentClassifier.load(killed)
    probs = model.predict_proba(["a great and charming film", "dull , stale and tedious"])
    assert probs.shape == (2, 2) and np.allclose(probs.sum(1), 1)
    with np.load(killed / "state.npz", allow_pickle=False) as st:
        k = json.loads(str(st["meta"]))["epoch"]
        assert len(done) in (k, k + 1)
        if len(done) == k:  # not killed inside a checkpoint: the model is state's best
            for name, v in weights(killed).items():
                np.testing.assert_array_equal(st[f"best/{name}"], v)
    # Nothing else in the directory, and nothing that could pass for a model file: a temporary
    # a kill interrupted is hidden, named .<file>.<random>.tmp.
    for f in killed.iterdir():
        assert f.name in CHECKPOINT_FILES or (f.name.startswith(".") and f.name.endswith(".tmp")), f

    r = subprocess.run(train_cmd(data, killed, "--resume"), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert not list(killed.glob(".*.tmp"))
    assert [m["epoch"] for m in metrics_lines(killed)] == list(range(1, EPOCHS + 1))
    a, b = weights(full), weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    with np.load(full / "state.npz", allow_pickle=False) as sa, np.load(killed / "state.npz", allow_pickle=False) as sb:
        for k in sa.files:
            if k.startswith(("cur/", "opt/")):
                np.testing.assert_array_equal(sb[k], sa[k], err_msg=k)

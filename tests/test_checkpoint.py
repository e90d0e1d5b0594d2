"""Checkpoint files: atomic writes that honour the umask without changing it, no temporaries
left behind, stale temporaries of a killed run removed, and the training state round trip."""

import os
import stat
import threading

import numpy as np
import pytest

from fusedlstm import SentimentClassifier
from fusedlstm.sentiment.checkpoint import (
    CHECKPOINT_FILES,
    atomic_write,
    load_npz,
    npz_bytes,
    read_training_state,
    remove_stale_temporaries,
    write_training_state,
)
from helpers import make_model


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_applies_the_umask_without_changing_it(tmp_path, monkeypatch, umask):
    old = os.umask(umask)
    try:

        def no_umask(*_):  # another thread could create a file while the umask is changed
            raise AssertionError("atomic_write must not call os.umask")

        monkeypatch.setattr(os, "umask", no_umask)
        atomic_write(tmp_path / "a.json", b"{}")
        monkeypatch.undo()
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~umask
        assert (tmp_path / "a.json").read_bytes() == b"{}"
        assert os.umask(umask) == umask  # unchanged
    finally:
        os.umask(old)


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    f = tmp_path / "w.npz"
    atomic_write(f, b"old")
    with pytest.raises(TypeError):
        atomic_write(f, "not bytes")  # fails while writing the temporary
    assert f.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["w.npz"]
    atomic_write(f, b"new")
    assert f.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["w.npz"]


def test_concurrent_atomic_writes_leave_one_whole_file(tmp_path):
    f = tmp_path / "m.json"
    payloads = [bytes([65 + i]) * 100_000 for i in range(8)]
    threads = [threading.Thread(target=atomic_write, args=(f, p)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert f.read_bytes() in payloads and [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_remove_stale_temporaries_only_ours(tmp_path):
    for name in (".weights.npz.abc123.tmp", ".state.npz.x.tmp", ".other.txt.y.tmp", "notes.tmp"):
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == [".state.npz.x.tmp", ".weights.npz.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.txt.y.tmp", "notes.tmp"]
    assert "state.npz" in CHECKPOINT_FILES


def test_training_state_round_trip(tmp_path):
    a = {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}
    write_training_state(
        tmp_path,
        a,
        {"kernel": a["kernel"] + 1},
        {"t": np.asarray(3), "m/kernel": a["kernel"]},
        {},
        {"epoch": 2, "metrics": [{"epoch": 1}, {"epoch": 2}]},
    )
    groups, meta = read_training_state(tmp_path)
    np.testing.assert_array_equal(groups["best"]["kernel"], a["kernel"] + 1)
    assert int(groups["opt"]["t"]) == 3 and "m/kernel" in groups["opt"] and groups["avg"] == {}
    assert meta == {"epoch": 2, "metrics": [{"epoch": 1}, {"epoch": 2}]}
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        read_training_state(tmp_path / "elsewhere")


def test_load_npz_checks_expected_names(tmp_path):
    f = tmp_path / "x.npz"
    atomic_write(f, npz_bytes({"a": np.zeros(3), "b": np.ones((2, 2))}))
    assert set(load_npz(f)) == {"a", "b"}
    with pytest.raises(ValueError, match=r"x.npz: refused .*unexpected arrays \['b'\]"):
        load_npz(f, {"a": (3,)})
    with pytest.raises(ValueError, match=r"missing array 'c'"):
        load_npz(f, {"a": (3,), "b": (2, 2), "c": (1,)})


def test_saved_model_directory_format(tmp_path):
    """The files and names a model directory has always had: old directories keep loading."""
    m = make_model()
    m.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "vocab.json", "weights.npz"]
    with np.load(tmp_path / "m" / "weights.npz", allow_pickle=False) as z:
        assert sorted(z.files) == sorted(["embedding", "kernel", "recurrent_kernel", "bias", "dense_w", "dense_b"])
    r = SentimentClassifier.load(tmp_path / "m")
    assert r.config == m.config

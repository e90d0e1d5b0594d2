"""Downloads without a network: fetch against file:// archives (checksum match and mismatch,
an entry without a recorded digest, offline), safe unpacking with and without tarfile's data
filter (Python 3.10.0-3.10.11 has none), GLUE test files without labels, and the CLI's wording
of library errors."""

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import zipfile

import pytest

from fusedlstm.sentiment import data
from fusedlstm.sentiment.data import ChecksumError, Dataset, DownloadError, fetch, load_data, safe_extract_tar
from helpers import write_synthetic_glue, write_synthetic_polarity


def _tar_gz(members):
    """A .tar.gz of {name: bytes} regular files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            t.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


@pytest.fixture
def archive(tmp_path, monkeypatch):
    """A local rt-polaritydata.tar.gz served as file://, and the cache in tmp_path."""
    src = write_synthetic_polarity(tmp_path / "src", n=40)
    blob = _tar_gz({f"rt-polaritydata/{f.name}": f.read_bytes() for f in sorted(src.iterdir())})
    path = tmp_path / "rt-polaritydata.tar.gz"
    path.write_bytes(blob)
    monkeypatch.setenv("FUSEDLSTM_DATA", str(tmp_path / "cache"))
    return path, hashlib.sha256(blob).hexdigest()


def _register(monkeypatch, path, sha256):
    monkeypatch.setitem(data.DATASETS, "toy", Dataset(path.as_uri(), "rt-polaritydata", sha256))


def test_fetch_checks_the_digest_and_unpacks(archive, monkeypatch):
    path, digest = archive
    _register(monkeypatch, path, digest)
    out = fetch("toy", log=lambda *a: pytest.fail("no note expected with a recorded digest"))
    assert out.name == "rt-polaritydata" and len(load_data(out)["all"]) == 40
    path.unlink()  # cached: not downloaded again
    assert fetch("toy") == out


def test_fetch_refuses_a_mismatch_naming_file_and_digests(archive, monkeypatch, tmp_path):
    path, digest = archive
    wrong = "0" * 64
    _register(monkeypatch, path, wrong)
    with pytest.raises(ChecksumError) as err:
        fetch("toy")
    msg = str(err.value)
    assert "rt-polaritydata.tar.gz" in msg and digest in msg and wrong in msg
    assert not (tmp_path / "cache" / "toy" / "rt-polaritydata").exists()  # nothing unpacked


def test_fetch_without_a_recorded_digest_says_so(archive, monkeypatch):
    path, digest = archive
    _register(monkeypatch, path, None)
    notes = []
    fetch("toy", log=notes.append)
    assert len(notes) == 1 and "no recorded SHA-256" in notes[0] and digest in notes[0]


def test_known_digests_are_well_formed():
    for name, ds in data.DATASETS.items():
        assert ds.url.startswith("https://"), name
        assert ds.sha256 is None or (len(ds.sha256) == 64 and int(ds.sha256, 16) >= 0), name
    assert data.DATASETS["imdb"].sha256 is not None


def test_fetch_offline_raises_download_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEDLSTM_DATA", str(tmp_path / "cache"))
    _register(monkeypatch, tmp_path / "absent.tar.gz", None)
    with pytest.raises(DownloadError, match=r"could not download toy .*absent.tar.gz yourself") as err:
        fetch("toy")
    assert "--" not in str(err.value)  # the library names no command-line flags
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        fetch("nope")


def _hostile_tars():
    def one(name, **kw):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            info = tarfile.TarInfo(name)
            for k, v in kw.items():
                setattr(info, k, v)
            t.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
        return buf.getvalue()

    return {
        "dotdot": one("d/../../evil.txt", size=1),
        "absolute": one("/tmp/evil.txt", size=1),
        "symlink": one("d/link", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
        "hardlink": one("d/hard", type=tarfile.LNKTYPE, linkname="../../outside"),
        "device": one("d/dev", type=tarfile.CHRTYPE),
    }


@pytest.mark.parametrize("with_filter", [True, False], ids=["data_filter", "py3.10.0-3.10.11"])
@pytest.mark.parametrize("kind", sorted(_hostile_tars()))
def test_safe_extract_refuses_hostile_members(tmp_path, monkeypatch, with_filter, kind):
    if with_filter and not hasattr(tarfile, "data_filter"):
        pytest.skip("this Python's tarfile has no data filter")
    if not with_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    dest = tmp_path / "out"
    with tarfile.open(fileobj=io.BytesIO(_hostile_tars()[kind])) as t:
        with pytest.raises(ValueError, match="hostile.tar"):
            safe_extract_tar(t, dest, "hostile.tar")
    assert not (tmp_path / "evil.txt").exists() and not list(tmp_path.rglob("evil.txt"))
    assert not any(p.is_symlink() for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("with_filter", [True, False], ids=["data_filter", "py3.10.0-3.10.11"])
def test_safe_extract_unpacks_files_and_folders(tmp_path, monkeypatch, with_filter):
    if not with_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    blob = _tar_gz({"top/a.txt": b"alpha", "top/sub/b.txt": b"beta"})
    with tarfile.open(fileobj=io.BytesIO(blob)) as t:
        safe_extract_tar(t, tmp_path / "out", "ok.tar.gz")
    assert (tmp_path / "out" / "top" / "sub" / "b.txt").read_bytes() == b"beta"


def test_fetch_refuses_unsafe_zip_members(tmp_path, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("SST-2/train.tsv", "sentence\tlabel\nok\t1\n")
        z.writestr("../evil.txt", "x")
    path = tmp_path / "SST-2.zip"
    path.write_bytes(buf.getvalue())
    monkeypatch.setenv("FUSEDLSTM_DATA", str(tmp_path / "cache"))
    digest = hashlib.sha256(buf.getvalue()).hexdigest()
    monkeypatch.setitem(data.DATASETS, "toy", Dataset(path.as_uri(), "SST-2", digest))
    with pytest.raises(ValueError, match=r"SST-2.zip: unsafe member '../evil.txt'"):
        fetch("toy")
    assert not list(tmp_path.rglob("evil.txt"))


def test_glue_test_file_without_labels_is_left_out(tmp_path):
    d = write_synthetic_glue(tmp_path / "glue", sizes={"train": 20, "dev": 10})
    (d / "test.tsv").write_text("index\tsentence\n0\ta fine film\n1\tdull\n")
    with pytest.warns(UserWarning, match=r"test.tsv: no label column, so no test split"):
        splits = load_data(d)
    assert sorted(splits) == ["dev", "train"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fusedlstm", *args], capture_output=True, text=True, timeout=300)


def test_cli_words_library_errors_with_its_flags(tmp_path):
    d = write_synthetic_glue(tmp_path / "glue", sizes={"train": 40, "dev": 10})
    (d / "test.tsv").write_text("index\tsentence\n0\ta fine film\n")
    r = run_cli("train", "--data", str(d), "--out", str(tmp_path / "m"), "--embedding-dim", "0", "--quiet")
    assert r.returncode == 2 and "without vectors, --embedding-dim must be an integer >= 1, got 0" in r.stderr
    assert "no label column, so no test split" in r.stderr
    r = run_cli("train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "m"))
    assert r.returncode == 2 and "--data " in r.stderr and "no such file or directory" in r.stderr
    r = run_cli("train", "--data", str(d / "train.tsv"), "--out", str(tmp_path / "m"), "--text-column", "nope")
    assert r.returncode == 2 and "no column 'nope'" in r.stderr
    (tmp_path / "t.tsv").write_text("words\tlabel\ngood\t1\n")
    r = run_cli("train", "--data", str(tmp_path / "t.tsv"), "--out", str(tmp_path / "m"))
    assert r.returncode == 2 and "cannot find the text column" in r.stderr and "--text-column" in r.stderr
    # a model directory without training state: --resume says what is missing
    r = run_cli("train", "--data", str(d), "--out", str(tmp_path / "m2"), "--units", "4", "--steps", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    (tmp_path / "m2" / "state.npz").unlink()
    r = run_cli("train", "--data", str(d), "--out", str(tmp_path / "m2"), "--resume", "--quiet")
    assert r.returncode == 2 and "--resume: nothing to resume" in r.stderr
    # eval on a GLUE directory without test labels uses dev
    r = run_cli("eval", str(tmp_path / "m2"), "--data", str(d), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n"] == 10

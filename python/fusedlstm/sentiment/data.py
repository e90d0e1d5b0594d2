"""Labelled sentences from disk: TSV/CSV files with a header (columns configurable), GLUE-style
directories (train/dev/test.tsv, e.g. SST-2), Pang & Lee polarity files (*.pos / *.neg,
Windows-1252 bytes; k-fold cross-validation) and the aclImdb layout. Labels are integers
0..C-1 or strings (mapped in sorted order, the mapping kept). ``fetch`` downloads the public
data sets into a cache (checksummed, unpacked safely) when online and fails at once when not."""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import os
import re
import shutil
import tarfile
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "Split",
    "load_data",
    "read_table",
    "read_polarity",
    "read_imdb",
    "kfold",
    "LabelMap",
    "fetch",
    "DATASETS",
    "Dataset",
    "DownloadError",
    "ChecksumError",
    "cache_dir",
    "safe_extract_tar",
]

_TEXT_COLS = ("sentence", "text", "review", "sentence1", "content")
_LABEL_COLS = ("label", "labels", "sentiment", "polarity", "class", "y")


@dataclass
class Split:
    """Sentences, their raw labels (ints or strings) and where each came from (file:line)."""

    texts: list[str]
    labels: list[object]
    origins: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "file:line: why" for each row left out

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: Sequence[int]) -> Split:
        return Split(
            [self.texts[i] for i in idx],
            [self.labels[i] for i in idx],
            [self.origins[i] for i in idx] if self.origins else [],
        )

    def skip(self, where: str, why: str) -> None:
        self.skipped.append(f"{where}: {why}")

    def check_skipped(self, path: str, rows: int) -> Split:
        """Refuse a file where more rows were skipped than kept: it is probably not the format
        it was read as (wrong delimiter, a binary file), and training on the rest would be
        silently wrong."""
        if self.skipped and len(self.skipped) > max(rows - len(self.skipped), 0):
            raise ValueError(
                f"{path}: {len(self.skipped)} of {rows} rows unreadable, e.g. " + "; ".join(self.skipped[:3])
            )
        return self


class LabelMap:
    """Raw labels <-> class ids. Integer labels map to themselves (0..C-1); strings in sorted
    order. Saved with the model, so predictions come back with the user's names."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = [str(n) for n in names]
        self.index = {n: i for i, n in enumerate(self.names)}

    @classmethod
    def fit(cls, labels: Sequence[object], num_classes: int | None = None) -> LabelMap:
        raw = {str(lab).strip() for lab in labels}
        if raw and all(r.lstrip("-").isdigit() for r in raw):
            ints = sorted(int(r) for r in raw)
            c = num_classes or max(2, ints[-1] + 1)
            if ints[0] < 0 or ints[-1] >= c:
                raise ValueError(f"labels must be integers in 0..{c - 1}, found {ints[0]}..{ints[-1]}")
            return cls([str(i) for i in range(c)])
        names = sorted(raw)
        if num_classes is not None and len(names) != num_classes:
            raise ValueError(f"found {len(names)} distinct labels {names}, expected {num_classes}")
        if len(names) < 2:
            raise ValueError(f"need at least 2 classes, found {names}")
        return cls(names)

    def encode(self, labels: Sequence[object], origins: Sequence[str] = ()) -> np.ndarray:
        out = np.empty(len(labels), np.int64)
        for i, lab in enumerate(labels):
            key = str(lab).strip()
            if key not in self.index:
                where = f" at {origins[i]}" if i < len(origins) else ""
                raise ValueError(f"label {key!r}{where} is not one of {self.names}")
            out[i] = self.index[key]
        return out


def _decode(raw: bytes, path: str) -> tuple[str, str]:
    """UTF-16 when it starts with a UTF-16 byte-order mark; UTF-8 (BOM stripped) when valid;
    else Windows-1252 (what MR and many old corpora use; its BOM stripped too)."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16", errors="replace"), "utf-16"
    try:
        return raw.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        raw = raw[3:] if raw.startswith(codecs.BOM_UTF8) else raw
        return raw.decode("cp1252", errors="replace"), "cp1252"


# C0 control characters other than tab, CR and LF (and DEL): binary data, not text.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _binary(line: str) -> bool:
    return _CONTROL.search(line) is not None


def _split_lines(text: str) -> list[str]:
    """Lines ended by \\r\\n, \\n or a lone \\r, mixed freely. Not str.splitlines(), which also
    splits on U+0085 (an ellipsis in Windows-1252 text), U+2028 and friends."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _lines(raw: bytes, path: str) -> Iterator[tuple[int, str]]:
    text, _ = _decode(raw, path)
    yield from enumerate(_split_lines(text), 1)


def read_table(
    path: str | os.PathLike,
    text_column: str | None = None,
    label_column: str | None = None,
    delimiter: str | None = None,
) -> Split:
    """A delimited file with a header row (tab for .tsv, else sniffed comma/tab/semicolon)."""
    path = str(path)
    raw = Path(path).read_bytes()
    text, _ = _decode(raw, path)
    lines = _split_lines(text)
    if not any(line.strip() for line in lines):
        raise ValueError(f"{path}: empty file")
    if _binary(lines[0]):
        raise ValueError(f"{path}:1: the header line holds binary data; is this a text table?")
    if delimiter is None:
        delimiter = "\t" if path.endswith(".tsv") or "\t" in lines[0] else ","
    # A long review is one field: lift csv's 128 KiB field limit to this file's size.
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    reader = csv.reader(lines, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
    header = [h.strip() for h in next(reader)]
    lower = [h.lower() for h in header]

    def pick(wanted: str | None, defaults: Sequence[str], what: str) -> int:
        if wanted is not None:
            if wanted.lower() not in lower:
                raise ValueError(f"{path}: no column {wanted!r} (columns: {header})")
            return lower.index(wanted.lower())
        for d in defaults:
            if d in lower:
                return lower.index(d)
        raise ValueError(f"{path}: cannot find the {what} column among {header}; name it ({what}_column)")

    ti = pick(text_column, _TEXT_COLS, "text")
    li = pick(label_column, _LABEL_COLS, "label")
    out = Split([], [], [])
    rows = 0
    try:
        for row in reader:
            lineno = reader.line_num  # the row's last physical line (quoted fields may span lines)
            if not row or all(not c.strip() for c in row):
                continue  # blank line
            rows += 1
            where = f"{path}:{lineno}"
            if any(_binary(c) for c in row):
                out.skip(where, "binary data (control characters)")
            elif len(row) <= max(ti, li):
                out.skip(where, f"expected at least {max(ti, li) + 1} columns, got {len(row)}")
            elif not row[ti].strip():
                out.skip(where, "empty sentence")
            elif not row[li].strip():
                out.skip(where, "empty label")
            else:
                out.texts.append(row[ti].strip())
                out.labels.append(row[li].strip())
                out.origins.append(where)
    except csv.Error as exc:
        raise ValueError(f"{path}:{reader.line_num}: {exc}") from None
    if not rows:
        raise ValueError(f"{path}: no data rows (header only)")
    return out.check_skipped(path, rows)


def read_polarity(directory: str | os.PathLike) -> Split:
    """Pang & Lee sentence polarity: every *.pos and *.neg file in `directory`, one sentence a
    line, bytes decoded as Windows-1252 (0x85 is an ellipsis there, not a line break)."""
    d = Path(directory)
    out = Split([], [], [])
    files = sorted(d.glob("*.neg")) + sorted(d.glob("*.pos"))
    if not files:
        raise ValueError(f"{d}: no *.pos / *.neg files")
    rows = 0
    for f in files:
        label = "positive" if f.suffix == ".pos" else "negative"
        for lineno, line in _lines(f.read_bytes(), str(f)):
            if not line.strip():
                continue
            rows += 1
            if _binary(line):
                out.skip(f"{f}:{lineno}", "binary data (control characters)")
                continue
            out.texts.append(line.strip())
            out.labels.append(label)
            out.origins.append(f"{f}:{lineno}")
    return out.check_skipped(str(d), rows)


def read_imdb(root: str | os.PathLike) -> dict[str, Split]:
    """The aclImdb layout: root/{train,test}/{pos,neg}/*.txt."""
    root = Path(root)
    splits = {}
    for name in ("train", "test"):
        s = Split([], [], [])
        for label in ("neg", "pos"):
            for f in sorted((root / name / label).glob("*.txt")):
                text, _ = _decode(f.read_bytes(), str(f))
                text = text.replace("<br />", " ").strip()
                if _binary(text):
                    s.skip(str(f), "binary data (control characters)")
                elif text:
                    s.texts.append(text)
                    s.labels.append("positive" if label == "pos" else "negative")
                    s.origins.append(str(f))
        if s.texts:
            splits[name] = s
    if "train" not in splits:
        raise ValueError(f"{root}: no aclImdb train/pos, train/neg files")
    return splits


def load_data(
    path: str | os.PathLike, text_column: str | None = None, label_column: str | None = None
) -> dict[str, Split]:
    """Splits found at `path`: a file gives {'train': …}; a GLUE directory its train/dev/test
    files; a polarity directory {'all': …} (use kfold); an aclImdb directory train/test."""
    p = Path(path)
    if p.is_file():
        return {"train": read_table(p, text_column, label_column)}
    if not p.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    tables = {}
    for name in ("train", "dev", "validation", "test"):
        for ext in (".tsv", ".csv"):
            f = p / f"{name}{ext}"
            if f.is_file():
                if name == "test" and label_column is None and not _has_label_column(f):
                    # GLUE's test files carry no labels (they are kept for its leaderboard).
                    warnings.warn(
                        f"{f}: no label column, so no test split (GLUE's test labels are not public)", stacklevel=2
                    )
                    break
                tables["dev" if name == "validation" else name] = read_table(f, text_column, label_column)
                break
    if tables:
        if "train" not in tables:
            raise ValueError(f"{p}: has {sorted(tables)} but no train.tsv/train.csv")
        return tables
    if list(p.glob("*.pos")) or list(p.glob("*.neg")):
        return {"all": read_polarity(p)}
    if (p / "train" / "pos").is_dir():
        return read_imdb(p)
    if (p / "aclImdb").is_dir():
        return read_imdb(p / "aclImdb")
    raise ValueError(f"{p}: no train/dev/test .tsv/.csv files, *.pos/*.neg files or aclImdb layout")


def _has_label_column(path: Path) -> bool:
    with open(path, "rb") as f:
        head, _ = _decode(f.readline(65536), str(path))
    cells = re.split(r"[\t,;]", head.strip().lower())
    return any(c.strip().strip('"') in _LABEL_COLS for c in cells)


def kfold(n: int, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train_idx, test_idx) for k folds of a seeded permutation of range(n)."""
    if not 2 <= k <= n:
        raise ValueError(f"k-fold needs 2 <= k <= {n}, got k={k}")
    perm = np.random.default_rng(seed).permutation(n)
    folds = np.array_split(perm, k)
    return [(np.concatenate(folds[:i] + folds[i + 1 :]), folds[i]) for i in range(k)]


class Dataset(NamedTuple):
    """A public data set ``fetch`` knows: where the archive is, the folder inside it, and the
    SHA-256 of the archive when it is known (None: not recorded; the download is then not
    checked, and fetch says so)."""

    url: str
    folder: str
    sha256: str | None = None


# Canonical public sources. Names, not code: nothing here runs what it downloads. The IMDB digest
# is the one TensorFlow Datasets records for this archive; SST-2 (GLUE) and MR have none
# recorded yet (add them here once verified).
DATASETS: dict[str, Dataset] = {
    "sst2": Dataset("https://dl.fbaipublicfiles.com/glue/data/SST-2.zip", "SST-2"),
    "mr": Dataset("https://www.cs.cornell.edu/people/pabo/movie-review-data/rt-polaritydata.tar.gz", "rt-polaritydata"),
    "imdb": Dataset(
        "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",
        "aclImdb",
        "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe",
    ),
}


class DownloadError(RuntimeError):
    """A data set could not be downloaded (offline, server error)."""


class ChecksumError(ValueError):
    """A downloaded archive is not the one recorded: its SHA-256 differs."""


def cache_dir() -> Path:
    """Where fetch keeps downloads: $FUSEDLSTM_DATA, else ~/.cache/fusedlstm."""
    return Path(os.environ.get("FUSEDLSTM_DATA") or Path.home() / ".cache" / "fusedlstm")


def fetch(name: str, timeout: float = 15.0, log: Callable[[str], Any] = print) -> Path:
    """Download and unpack a public data set (a key of DATASETS) once; return its directory.
    The archive's SHA-256 is checked against the recorded one (ChecksumError on a mismatch,
    nothing unpacked); a data set without a recorded digest is unpacked unchecked, with a note
    through `log`. Archive members that would land outside the target (absolute paths, '..',
    links, devices) are refused. Raises DownloadError when offline."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    ds = DATASETS[name]
    dest = cache_dir() / name
    if (dest / ds.folder).exists():
        return dest / ds.folder
    dest.mkdir(parents=True, exist_ok=True)
    archive = ds.url.rsplit("/", 1)[-1]
    try:
        with urllib.request.urlopen(ds.url, timeout=timeout) as r:
            blob = r.read()
    except OSError as exc:
        raise DownloadError(
            f"could not download {name} from {ds.url} ({exc}); offline? Download "
            f"{archive} yourself, unpack it and load its folder by path"
        ) from None
    digest = hashlib.sha256(blob).hexdigest()
    if ds.sha256 is None:
        log(f"note: {archive} has no recorded SHA-256 to check; it is {digest}")
    elif digest != ds.sha256.lower():
        raise ChecksumError(
            f"{archive} from {ds.url}: SHA-256 {digest}, expected {ds.sha256}; "
            "the download is corrupt or not the published archive, nothing was unpacked"
        )
    tmp = dest / (ds.folder + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    if archive.endswith(".zip"):
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            for m in z.namelist():
                _check_member_name(m, archive)
            z.extractall(tmp)
    else:
        with tarfile.open(fileobj=io.BytesIO(blob)) as t:
            safe_extract_tar(t, tmp, archive)
    inner = tmp / ds.folder
    os.replace(inner if inner.exists() else tmp, dest / ds.folder)
    if tmp.exists():
        shutil.rmtree(tmp)
    return dest / ds.folder


def _check_member_name(member: str, archive: str) -> None:
    """Refuse absolute paths, drive letters and '..' components (either slash)."""
    parts = member.replace("\\", "/").split("/")
    if member.startswith(("/", "\\")) or (len(member) > 1 and member[1] == ":") or ".." in parts:
        raise ValueError(f"{archive}: unsafe member {member!r} (outside the target folder)")


def safe_extract_tar(tar: tarfile.TarFile, dest: Path, archive: str = "archive") -> None:
    """Extract an archive's members inside `dest`, refusing any absolute or '..' name. Uses
    tarfile's "data" filter where this Python has it (3.10.12+, 3.11.4+: links must stay inside,
    no special files); elsewhere (3.10.0-3.10.11, where extractall(filter=...) is a TypeError)
    checks every member itself first and extracts regular files and folders only."""
    members = tar.getmembers()
    for m in members:  # refused alike with or without the filter (which would strip a leading /)
        _check_member_name(m.name, archive)
    if hasattr(tarfile, "data_filter"):
        try:
            tar.extractall(dest, filter="data")
        except tarfile.FilterError as exc:
            raise ValueError(f"{archive}: unsafe member ({exc})") from None
        return
    for m in members:
        if not (m.isfile() or m.isdir()):
            raise ValueError(
                f"{archive}: member {m.name!r} is a link or special file; only files and folders are extracted"
            )
    for m in members:  # no set-uid bits or odd permissions from the archive
        m.mode = (0o755 if m.isdir() else 0o644) | (m.mode & 0o111 if m.isfile() else 0)
    tar.extractall(dest, members=members)

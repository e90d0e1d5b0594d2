"""Streaming prediction: sentences in, one answer per sentence out, in input order, in memory that
does not grow with the input. Lines are read lazily, a bounded window of them (``window``
sentences, 64 batches by default) is tokenized, sorted by length (batches of similar lengths run
fewer padded steps) and scored, and the window's answers are emitted in input order before the
next window is read. ``fusedlstm predict MODEL --file F`` is this module.

An empty (or all-whitespace) line has no words to classify: it is answered, in its place, with
``label`` and ``probability`` None and ``error`` "empty line", never dropped, so answer n is
always line n."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from .text import tokenize

if TYPE_CHECKING:
    from ..prepared import PreparedLSTM
    from .model import SentimentClassifier

__all__ = ["WINDOW_BATCHES", "EMPTY_LINE", "read_lines", "score_encoded", "predict_stream"]

WINDOW_BATCHES = 64  # batches held at once: bounds memory and gives the length sort room to work
EMPTY_LINE = "empty line"


def read_lines(stream: IO[bytes], source: str) -> Iterator[str]:
    """The lines of a binary stream as str, lazily, without their line ends (\\n, \\r\\n; a UTF-8
    byte-order mark at the start is dropped). Only \\n ends a line (not the other characters
    str.splitlines breaks at). Undecodable bytes are a ValueError naming `source` and the line."""
    for n, raw in enumerate(stream, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{source}: line {n} is not UTF-8 ({exc.reason} at byte {exc.start} of the line)"
            ) from None
        if n == 1 and line.startswith("\ufeff"):
            line = line[1:]
        yield line.rstrip("\r\n")


def score_encoded(
    model: SentimentClassifier,
    ids: np.ndarray,
    lengths: np.ndarray,
    batch_size: int = 256,
    lstm: PreparedLSTM | list[list[PreparedLSTM]] | None = None,
) -> np.ndarray:
    """Class probabilities [N, C] of encoded sentences, scored in batches of similar length
    (sorted within these N; results in the given order). lstm: ``model.prepared_lstm()`` reused
    across calls (packed here when None)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    lstm = lstm if lstm is not None else model.prepared_lstm()
    n = len(lengths)
    out = np.empty((n, model.config.num_classes), np.float32)
    order = np.argsort(lengths, kind="stable")
    for s in range(0, n, batch_size):
        idx = order[s : s + batch_size]
        out[idx] = model.probabilities(ids[idx], lengths[idx], lstm)
    return out


def predict_stream(
    model: SentimentClassifier,
    texts: Iterable[str],
    batch_size: int = 256,
    window: int | None = None,
) -> Iterator[dict[str, Any]]:
    """One {"text", "label", "probability"} per sentence of `texts` (any iterable, read lazily),
    in order, as ``model.predict`` gives them; an empty sentence gets label and probability None
    and "error": "empty line". At most `window` sentences (default WINDOW_BATCHES batches) are
    held at once."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    window = WINDOW_BATCHES * batch_size if window is None else window
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    lstm = model.prepared_lstm()  # packed once for the whole stream
    names = model.label_map.names
    max_len = model.config.max_len
    it = iter(texts)
    while True:
        chunk = list(islice(it, window))
        if not chunk:
            return
        tokenized = [tokenize(t) for t in chunk]
        ids, lengths = model.vocab.encode([t for t in tokenized if t], max_len)
        probs = score_encoded(model, ids, lengths, batch_size, lstm) if len(lengths) else None
        best = probs.argmax(axis=1) if probs is not None else None
        j = 0
        for text, toks in zip(chunk, tokenized):
            if toks:
                k = int(best[j])
                yield {"text": text, "label": names[k], "probability": float(probs[j, k])}
                j += 1
            else:
                yield {"text": text, "label": None, "probability": None, "error": EMPTY_LINE}

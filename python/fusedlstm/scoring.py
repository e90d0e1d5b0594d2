"""BatchScorer: a trained classifier as a callable for data engines that score batches on many
workers (Ray Data's ``map_batches``, Dask's ``map_partitions``, Spark's ``mapInPandas`` or a pandas
UDF). Each instance loads the model directory once (weights packed for inference) and then scores
every batch it is given; it pickles as its path and options only, never its weights, and loads
the model again where it is unpickled (each worker reads the directory itself, so the directory
must be reachable there: a shared file system, or copied to each node)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BatchScorer"]


class BatchScorer:
    """Score a batch of sentences with a saved SentimentClassifier.

    Parameters
    ----------
    model_dir : the model directory (config.json, vocab.json, weights.npz)
    text_column : the column holding the sentences (default "text")
    batch_size : sentences per kernel call (sorted by length within each incoming batch)

    Calling it on a dict of NumPy arrays (Ray's ``batch_format="numpy"``) or a pandas DataFrame
    returns the same kind, with every input column kept and two added: ``label`` (the most
    probable class name) and ``probability`` (its probability, float32); row order is kept.
    A row whose text is empty, blank or not a string is a ValueError naming the column and row.
    """

    def __init__(self, model_dir: str | os.PathLike, text_column: str = "text", batch_size: int = 256) -> None:
        if not isinstance(text_column, str) or not text_column:
            raise TypeError(f"BatchScorer: text_column must be a non-empty string, got {text_column!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"BatchScorer: batch_size must be a positive integer, got {batch_size!r}")
        from .sentiment.model import SentimentClassifier

        self.model_dir = Path(model_dir)
        self.text_column = text_column
        self.batch_size = batch_size
        self.model = SentimentClassifier.load(self.model_dir)
        self._lstm = self.model.prepared_lstm()  # packed once per instance (per worker)

    # Pickled as where to find the model, never the weights: a worker loads it from the path.
    def __getstate__(self) -> dict[str, Any]:
        return {"model_dir": str(self.model_dir), "text_column": self.text_column, "batch_size": self.batch_size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["model_dir"], text_column=state["text_column"], batch_size=state["batch_size"])

    def __repr__(self) -> str:
        return f"BatchScorer({str(self.model_dir)!r}, text_column={self.text_column!r}, batch_size={self.batch_size})"

    def _texts(self, column: Any, n: int) -> list[str]:
        texts = list(column)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(
                    f"BatchScorer: column {self.text_column!r}, row {i} of this batch: "
                    f"expected a string, got {type(t).__name__} {t!r}"
                )
            if not t.strip():
                raise ValueError(f"BatchScorer: column {self.text_column!r}, row {i} of this batch: empty sentence")
        return texts

    def score(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(label names as a str array [N], their probabilities float32 [N]) of sentences."""
        from .sentiment.serving import score_encoded

        names = np.asarray(self.model.label_map.names)
        if not texts:
            return names[:0], np.zeros(0, np.float32)
        ids, lengths = self.model.encode(texts)
        probs = score_encoded(self.model, ids, lengths, self.batch_size, self._lstm)
        best = probs.argmax(axis=1)
        return names[best], probs[np.arange(len(best)), best]

    def __call__(self, batch: Any) -> Any:
        """The batch with `label` and `probability` columns added (same kind as given)."""
        columns = _columns(batch)
        if columns is None:
            raise TypeError(
                f"BatchScorer: expected a dict of NumPy arrays or a pandas DataFrame, got {type(batch).__name__}"
            )
        if self.text_column not in columns:
            raise KeyError(
                f"BatchScorer: the batch has no text column {self.text_column!r}; its columns are {columns} "
                "(pass text_column=...)"
            )
        column = batch[self.text_column]
        labels, probs = self.score(self._texts(column, len(column)))
        if isinstance(batch, Mapping):
            out = dict(batch)
            out["label"], out["probability"] = labels, probs
            return out
        out = batch.copy(deep=False)
        out["label"], out["probability"] = labels, probs
        return out


def _columns(batch: Any) -> list[str] | None:
    """The column names of a dict of arrays or a DataFrame (None for anything else)."""
    if isinstance(batch, Mapping):
        return [str(k) for k in batch]
    cols = getattr(batch, "columns", None)
    if cols is not None and hasattr(batch, "copy"):  # a pandas DataFrame, without importing pandas
        return [str(c) for c in cols]
    return None

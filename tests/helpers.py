"""Helpers the tests share (imported as `from helpers import ...`): random LSTM problems,
tolerance per dtype, optional-dependency markers, the Keras comparison helpers, the location
of the real data sets (FUSEDLSTM_TEST_DATA) and a synthetic sentiment corpus that stands in for
them when they are absent."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# The real data sets are not in the repository: a folder with sst2/ (GLUE layout) and mr/
# (rt-polarity.pos/.neg) named by this variable. Unset: the tests that need them skip.
DATA_ENV = "FUSEDLSTM_TEST_DATA"
DATA: Path | None = Path(os.environ[DATA_ENV]) if os.environ.get(DATA_ENV) else None

requires_data = pytest.mark.skipif(
    DATA is None, reason=f"real data sets not available: set {DATA_ENV} to a folder with sst2/ and mr/"
)


def real_data(name: str) -> Path:
    """DATA / name, failing (not skipping) when the variable is set but the folder is missing:
    a wrong path is a mistake to report, not a reason to skip."""
    assert DATA is not None, f"{DATA_ENV} is not set (mark the test with requires_data)"
    path = DATA / name
    assert path.is_dir(), f"{DATA_ENV}={DATA}: no {name}/ folder there"
    return path


requires_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="torch is not installed (CI installs torch==2.13.0)"
)

TOL = {np.float64: dict(rtol=1e-10, atol=1e-12), np.float32: dict(rtol=1e-5, atol=0.0)}


def make_problem(rng, B, T, E, H, dtype=np.float64, lengths="none", state=True, bias=True, scale=0.5):
    """Random inputs for lstm_forward plus upstream gradients."""

    def r(*shape, s=1.0):
        return (rng.standard_normal(shape) * s).astype(dtype)

    p = dict(
        x=r(B, T, E),
        kernel=r(E, 4 * H, s=scale),
        recurrent_kernel=r(H, 4 * H, s=scale),
        bias=r(4 * H, s=0.2) if bias else None,
        h0=r(B, H) if state else None,
        c0=r(B, H) if state else None,
    )
    if lengths == "none":
        p["lengths"] = None
    elif lengths == "random":
        p["lengths"] = rng.integers(0, T + 1, size=B)
        if B >= 2:  # always include the extremes
            p["lengths"][0], p["lengths"][-1] = 0, T
    else:
        p["lengths"] = np.asarray(lengths)
    up = dict(d_outputs=r(B, T, H), d_h_n=r(B, H), d_c_n=r(B, H))
    return p, up


def assert_close(actual, expected, dtype, what=""):
    """Elementwise rtol plus an absolute floor relative to the array's largest magnitude: sums of
    K rounded terms have errors proportional to the magnitudes involved, not to the result."""
    tol = TOL[dtype]
    expected = np.asarray(expected)
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(
        actual, expected, err_msg=what, rtol=tol["rtol"], atol=max(tol["atol"], tol["rtol"] * scale)
    )


def as64(d):
    """The same problem in float64, for a float64 oracle of a float32 run."""
    return {k: (v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v) for k, v in d.items()}


# The Keras layer against keras.layers.LSTM (tests/test_keras.py on TensorFlow,
# tests/keras_torch_cases.py on the torch backend): small shapes, masks, a layer pair.
KERAS_SHAPE = (4, 6, 5, 7)  # B, T, E, H


def keras_masks():
    right = np.array([[1] * 6, [1] * 4 + [0] * 2, [1] + [0] * 5, [0] * 6], bool)
    return {"none": None, "right": right, "left": right[:, ::-1].copy()}


def keras_pair(rng, **kw):
    """keras.layers.LSTM and fusedlstm.keras.LSTM built alike (kw to both), with the same random,
    non-default weights (bias included) so every term is exercised."""
    import keras

    import fusedlstm.keras as fk

    _, T, E, H = KERAS_SHAPE
    ref, ours = keras.layers.LSTM(H, **kw), fk.LSTM(H, **kw)
    ref.build((None, T, E))
    ours.build((None, T, E))
    ref.set_weights([w + 0.3 * rng.standard_normal(w.shape).astype(w.dtype) for w in ref.get_weights()])
    ours.set_weights(ref.get_weights())
    return ref, ours


def assert_keras_results_match(want, got, tol=2e-5, grad_tol=1e-4):
    """(outputs, gradients) of keras.layers.LSTM (want) and of ours (got), as NumPy arrays."""
    (ya, ga), (yb, gb) = want, got
    assert len(ya) == len(yb) and len(ga) == len(gb)
    for a, b in zip(ya, yb):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(b, a, rtol=tol, atol=tol)
    for a, b in zip(ga, gb):
        # float32 sums of terms in the hundreds (unbounded activations) differ by order in the
        # last bits of the largest terms, so the absolute tolerance scales with the gradient.
        scale = max(1.0, float(np.abs(a).max())) if a.size else 1.0
        np.testing.assert_allclose(b, a, rtol=grad_tol, atol=grad_tol * scale)


# A synthetic sentiment corpus: sentences of neutral filler around one or two sentiment cues, a
# cue being a positive or negative word, sometimes negated ("not good" is negative). The label is
# carried by the cues alone, so a model that reads them (and their negation) scores far above
# chance; one that ignores word order cannot get the negated cues right.
POSITIVE = ["good", "great", "wonderful", "superb", "charming", "moving", "witty", "fresh", "brilliant", "delightful"]
NEGATIVE = ["bad", "awful", "dull", "boring", "tedious", "flat", "stale", "terrible", "clumsy", "lifeless"]
NEUTRAL = [
    "the",
    "film",
    "movie",
    "story",
    "plot",
    "cast",
    "a",
    "this",
    "is",
    "was",
    "and",
    "its",
    "director",
    "script",
    "scenes",
    "ending",
    "acting",
    "music",
    "quite",
    "really",
    "with",
    "of",
    "in",
    "it",
    "seems",
    "feels",
    "overall",
    "simply",
    "on",
    "screen",
]
NEGATORS = ["not", "never", "hardly"]


def synthetic_sentences(n: int, seed: int = 0, negate: float = 0.3) -> list[tuple[str, int]]:
    """n (sentence, label) pairs, labels 1 (positive) / 0 (negative) alternating, seeded."""
    rng = np.random.default_rng([seed, 2024])
    out = []
    for i in range(n):
        y = (i + seed) % 2
        words: list[str] = list(rng.choice(NEUTRAL, int(rng.integers(1, 5))))
        for _ in range(int(rng.integers(1, 3))):
            negated = rng.random() < negate
            polar = POSITIVE if (y == 1) != negated else NEGATIVE
            words += ([str(rng.choice(NEGATORS))] if negated else []) + [str(rng.choice(polar))]
            words += list(rng.choice(NEUTRAL, int(rng.integers(0, 4))))
        out.append((" ".join(words), y))
    return out


SYNTHETIC_SIZES = {"train": 400, "dev": 100, "test": 120}


def write_synthetic_glue(path: Path, seed: int = 0, sizes: dict | None = None) -> Path:
    """A GLUE-style directory: train/dev/test.tsv with the header `sentence<TAB>label`."""
    path.mkdir(parents=True, exist_ok=True)
    for k, (split, n) in enumerate((sizes or SYNTHETIC_SIZES).items()):
        rows = ["sentence\tlabel"] + [f"{t}\t{y}" for t, y in synthetic_sentences(n, seed + 97 * k)]
        (path / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def write_synthetic_polarity(path: Path, seed: int = 0, n: int = 500) -> Path:
    """Pang & Lee style rt-polarity.pos / rt-polarity.neg: one sentence a line, Windows-1252
    bytes. Some lines hold an ellipsis (byte 0x85, a line break to str.splitlines) or a right
    single quote (0x92) inside them, as the real files do."""
    path.mkdir(parents=True, exist_ok=True)
    lines: dict = {0: [], 1: []}
    for i, (text, y) in enumerate(synthetic_sentences(n, seed)):
        if i % 7 == 3:
            text = text.replace(" ", " \u2026 ", 1)
        elif i % 11 == 5:
            text = "it\u2019s " + text
        lines[y].append(text.encode("cp1252"))
    (path / "rt-polarity.pos").write_bytes(b"\n".join(lines[1]) + b"\n")
    (path / "rt-polarity.neg").write_bytes(b"\n".join(lines[0]) + b"\n")
    return path


def tiny_split(n: int = 40, seed: int = 0):
    """A few short sentences whose label one word decides, for the model's unit tests."""
    from fusedlstm.sentiment.data import Split

    rng = np.random.default_rng(seed)
    good, bad = ["great", "fun", "moving", "witty"], ["dull", "awful", "boring", "flat"]
    texts, labels = [], []
    for i in range(n):
        pos = i % 2 == 0
        words = list(rng.choice(good if pos else bad, 3)) + list(rng.choice(["the", "film", "a"], 2))
        rng.shuffle(words)
        texts.append(" ".join(words[: rng.integers(2, 6)]))
        labels.append("positive" if pos else "negative")
    return Split(texts, labels, [f"tiny:{i}" for i in range(n)])


def make_model(seed: int = 0, train_embeddings: bool = True, units: int = 5):
    """An untrained SentimentClassifier over tiny_split() (4-d random embedding), the original
    architecture (one forward layer, its last output)."""
    from fusedlstm import SentimentClassifier
    from fusedlstm.sentiment.model import ORIGINAL_ARCHITECTURE

    return SentimentClassifier.create(
        tiny_split(),
        units=units,
        embedding_dim=4,
        seed=seed,
        train_embeddings=train_embeddings,
        log=lambda *a: None,
        **ORIGINAL_ARCHITECTURE,
    )


def results_across_threads(run, threads=(1, 2, 3)):
    """run() at each fusedlstm thread count (restored after): the list of its results, for
    bit-identity checks."""
    import fusedlstm

    before = fusedlstm.get_num_threads()
    out = []
    try:
        for n in threads:
            fusedlstm.set_num_threads(n)
            out.append(run())
    finally:
        fusedlstm.set_num_threads(before)
    return out


def assert_all_equal(runs):
    """Every run's arrays equal the first run's, bit for bit."""
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(a, b)

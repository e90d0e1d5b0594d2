"""Text to ids: a tokenizer compatible with GloVe's (Stanford-tokenized, lower-cased) vocabulary
and with already-tokenized corpora such as SST (``does n't``, ``-lrb-``, ``'s``), and a
vocabulary built from the training split (id 0 = padding, 1 = out-of-vocabulary) that encodes
sentences as right-padded id matrices plus lengths for the kernel."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["tokenize", "Vocabulary", "PAD", "UNK", "default_max_len"]

PAD, UNK = "<pad>", "<unk>"
_L = r"[^\W_]"  # a letter or digit, any script
_TOKEN = re.compile(
    r"-[lr][rsc]b-"  # PTB brackets as SST spells them: -lrb- -rrb- ...
    rf"|{_L}+(?=n't\b)"  # "do" of "don't"
    r"|n't\b"  # ... and its "n't"
    rf"|'{_L}+"  # clitics: 's 're 'll 've 'd 'm
    rf"|\b{_L}(?:\.{_L})+\.?(?!{_L})"  # abbreviations as GloVe has them: u.s. e.g.
    rf"|{_L}+(?:[-.]{_L}+)*"  # words, with inner hyphens or dots (re-imagining, u.s)
    r"|\.\.\.|--|[^\s]"  # ellipsis, dash, any other single symbol
)


# PTB escapes (SST writes "-lrb-") become the characters GloVe's vocabulary has.
_BRACKETS = {"-lrb-": "(", "-rrb-": ")", "-lsb-": "[", "-rsb-": "]", "-lcb-": "{", "-rcb-": "}"}


def tokenize(text: str) -> list[str]:
    """Lower-case and split into GloVe-style tokens; idempotent on tokenized text."""
    return [_BRACKETS.get(t, t) for t in _TOKEN.findall(text.lower())]


def default_max_len(lengths: Sequence[int], coverage: float = 0.95) -> int:
    """Smallest length that covers `coverage` of the sentences (at least 1)."""
    if len(lengths) == 0:
        raise ValueError("default_max_len: no sentences")
    ordered = np.sort(np.asarray(lengths))
    return max(1, int(ordered[max(0, math.ceil(coverage * len(ordered)) - 1)]))


class Vocabulary:
    """Token <-> id map. ``tokens[0]`` is padding, ``tokens[1]`` the out-of-vocabulary token."""

    def __init__(self, tokens: Sequence[str]) -> None:
        tokens = list(tokens)
        if tokens[:2] != [PAD, UNK]:
            raise ValueError(f"vocabulary must start with {PAD!r}, {UNK!r}, got {tokens[:2]}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("vocabulary has duplicate tokens")
        self.tokens = tokens
        self.index = {t: i for i, t in enumerate(tokens)}

    @classmethod
    def build(cls, tokenized: Iterable[Sequence[str]], min_count: int = 1, max_size: int | None = None) -> Vocabulary:
        """From training sentences: tokens seen >= min_count times, most frequent first (ties
        alphabetical, so the result is deterministic), at most max_size in all."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        counts = Counter(t for sent in tokenized for t in sent)
        words = sorted(
            (w for w, c in counts.items() if c >= min_count and w not in (PAD, UNK)), key=lambda w: (-counts[w], w)
        )
        if max_size is not None:
            if max_size < 2:
                raise ValueError(f"max_size must be >= 2 (padding and unknown), got {max_size}")
            words = words[: max_size - 2]
        return cls([PAD, UNK] + words)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokenized: Sequence[Sequence[str]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """ids [N, max_len] int32 (right-padded with 0, truncated to max_len) and lengths [N]."""
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        ids = np.zeros((len(tokenized), max_len), np.int32)
        lengths = np.zeros(len(tokenized), np.int32)
        get = self.index.get
        for n, sent in enumerate(tokenized):
            row = [get(t, 1) for t in sent[:max_len]]
            ids[n, : len(row)] = row
            lengths[n] = len(row)
        return ids, lengths

    def to_json(self) -> str:
        return json.dumps({"tokens": self.tokens}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str, source: str = "vocabulary") -> Vocabulary:
        try:
            data = json.loads(text)
            tokens = data["tokens"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{source}: not a fusedlstm vocabulary ({exc})") from None
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ValueError(f"{source}: 'tokens' must be a list of strings")
        return cls(tokens)

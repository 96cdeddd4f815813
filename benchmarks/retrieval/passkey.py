"""Synthetic passkey documents for training, in the retrieval probe's needle format (`needle.py`).

A document is real text (a window of the training corpus) with a key/value line planted at
a random depth and the question at the end, followed by the value:

    haystack[:d]  NEEDLE  haystack[d:]  QUERY  VALUE

Mixed into the training data at a small fraction, they let a model that can retrieve learn
to do it at the lengths it trains on, so that the retrieval probe compares something the
dense control can do. Documents are shorter than the training samples, so whole documents
often land inside one sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .needle import NEEDLE, QUERY, fixed_tokens, random_key


@dataclass(frozen=True)
class Passkey:
    document: bytes
    word: str
    value: str
    needle_start: int  # document[needle_start:] begins with the needle
    value_start: int  # the value is document[value_start:]


def passkey_document(haystack: bytes, rng: np.random.Generator, digits: int = 6) -> Passkey:
    """`haystack` with a random key (a 6-letter word) and value (`digits` digits) planted at a
    uniformly random depth, and the question and value after it."""
    word, value = random_key(rng, digits)
    d = int(rng.integers(0, len(haystack) + 1))
    needle = NEEDLE.format(word=word, value=value).encode()
    query = QUERY.format(word=word).encode()
    doc = haystack[:d] + needle + haystack[d:] + query + value.encode()
    return Passkey(doc, word, value, d, len(doc) - len(value))


def passkey_documents(
    text: bytes, count: int, min_len: int, max_len: int, seed: int, digits: int = 6
) -> list[Passkey]:
    """`count` documents of min_len..max_len bytes (uniform), haystacks from random windows of `text`."""
    fixed = fixed_tokens(digits)
    if not fixed < min_len <= max_len <= len(text):
        raise ValueError(
            f"passkey documents: need {fixed} < min length {min_len} <= max length {max_len} "
            f"<= the text's {len(text)} bytes"
        )
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(count):
        room = int(rng.integers(min_len, max_len + 1)) - fixed
        start = int(rng.integers(0, len(text) - room + 1))
        docs.append(passkey_document(text[start : start + room], rng, digits))
    return docs

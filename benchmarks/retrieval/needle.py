"""The needle format the retrieval probe scores and the passkey training documents use (torch-free).

Each sample is byte tokens: text with a key/value line planted at a depth, a fraction of the
haystack (0: at the start, 1: right before the question), and the question at the end:

    haystack[:d]  NEEDLE  haystack[d:]  QUERY  VALUE
    NEEDLE = "# The secret key for <word> is <value>.\\n"
    QUERY  = "\\n# The secret key for <word> is "

with a random 6-letter word and a random value of `digits` digits. Nothing but the needle tells
the value: a model that does not retrieve it guesses digits at chance (CHANCE per digit).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEEDLE = "# The secret key for {word} is {value}.\n"
QUERY = "\n# The secret key for {word} is "
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"
CHANCE = 0.1  # one digit in ten
# "No worse than dense": the recovered model's mean token accuracy at most this far below.
TOLERANCE = 0.05
# The probe says something about retrieval only where the dense model retrieves: its token
# accuracy at least this far above chance.
RETRIEVES = 0.05


def retrieves(dense_token_accuracy: float) -> bool:
    """Whether the dense control retrieves at all: below this the probe is uninformative."""
    return dense_token_accuracy >= CHANCE + RETRIEVES


def encode(text: str) -> np.ndarray:
    """Byte tokens, as `prepare-data` writes them."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


def fixed_tokens(digits: int) -> int:
    """Tokens of a sample besides the haystack (the word is 6 letters)."""
    word, value = "x" * 6, "0" * digits
    texts = (NEEDLE.format(word=word, value=value), QUERY.format(word=word), value)
    return sum(len(encode(t)) for t in texts)


def random_key(rng: np.random.Generator, digits: int) -> tuple[str, str]:
    """A pronounceable 6-letter word and a value of `digits` random digits."""
    word = "".join(rng.choice(list(CONSONANTS)) + rng.choice(list(VOWELS)) for _ in range(3))
    value = "".join(str(d) for d in rng.integers(0, 10, size=digits))
    return word, value


@dataclass(frozen=True)
class Sample:
    tokens: np.ndarray  # [length] int64
    needle_start: int  # tokens[needle_start:] begins with the needle
    value_start: int  # the value is tokens[value_start:]
    word: str
    value: str


def plant(haystack: np.ndarray, depth: float, word: str, value: str) -> Sample:
    """The needle at round(depth * len(haystack)) of the haystack, the question and the value after it."""
    needle = encode(NEEDLE.format(word=word, value=value))
    query, val = encode(QUERY.format(word=word)), encode(value)
    d = round(depth * len(haystack))
    tokens = np.concatenate([haystack[:d], needle, haystack[d:], query, val])
    return Sample(tokens, d, len(tokens) - len(val), word, value)


def make_sample(text: np.ndarray, length: int, depth: float, trial: int, seed: int, digits: int) -> Sample:
    """Sample `trial` at (length, depth): a random word, value and window of `text`, seeded per
    length, depth and trial (the same samples for every model and run)."""
    rng = np.random.default_rng([seed, length, round(depth * 1_000_000), trial])
    word, value = random_key(rng, digits)
    room = length - fixed_tokens(digits)
    start = int(rng.integers(0, len(text) - room + 1))
    return plant(text[start:start + room], depth, word, value)

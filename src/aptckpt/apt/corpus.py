"""The default training text: templated English, generated in code.

A few tens of kilobytes of sentences about training runs, built from word lists
by a private ``random.Random(seed)`` -- never the global RNG, so building the
corpus does not disturb a run's random state, and the same arguments give the
same text on every machine (no download, no data file to package). The text
has enough structure (grammar, recurring phrases, numbers) for a tiny model's
loss to fall visibly within a few epochs.
"""

from __future__ import annotations

import hashlib
import random

__all__ = ["DEFAULT_CORPUS_CHARS", "corpus_digest", "default_corpus"]

DEFAULT_CORPUS_CHARS = 40_000

_SUBJECTS = (
    "the model",
    "the optimizer",
    "a small transformer",
    "the trainer",
    "our checkpoint",
    "the scheduler",
    "each worker",
    "the data loader",
    "a careful engineer",
    "the loss curve",
)
_VERBS = (
    "saves",
    "restores",
    "compresses",
    "verifies",
    "reads",
    "writes",
    "resumes",
    "measures",
    "shuffles",
    "copies",
)
_OBJECTS = (
    "the weights",
    "every tensor",
    "the random state",
    "a temporary checkpoint",
    "the learning rate",
    "the token embeddings",
    "the moments of adam",
    "the run directory",
    "the manifest",
    "the loss history",
)
_MANNERS = (
    "bit for bit",
    "without a pause",
    "after each epoch",
    "before the crash",
    "on another machine",
    "in a few seconds",
    "with great care",
    "one chunk at a time",
)
_CONNECTIVES = ("and then", "but first", "so that later", "while", "because")


def default_corpus(n_chars: int = DEFAULT_CORPUS_CHARS, *, seed: int = 1234) -> str:
    """About ``n_chars`` characters of templated sentences, identical for equal arguments.

    Args:
        n_chars: length to generate (the text ends at the first sentence end
            at or after it); must be positive.
        seed: seed of the private generator choosing the words.
    """
    if n_chars < 1:
        raise ValueError(f"n_chars must be positive, got {n_chars}")
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    step = 0
    while size < n_chars:
        step += 1
        first = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        kind = rng.randrange(4)
        if kind == 0:
            sentence = f"{first} {rng.choice(_MANNERS)}."
        elif kind == 1:
            second = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
            sentence = f"{first} {rng.choice(_CONNECTIVES)} {second}."
        elif kind == 2:
            sentence = f"at step {step * 10}, {first} {rng.choice(_MANNERS)}."
        else:
            subject, verb, obj = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)
            sentence = f"{subject} always {verb} {obj}, {rng.choice(_MANNERS)}."
        sentence = sentence[0].upper() + sentence[1:]
        sep = "\n" if rng.randrange(6) == 0 else " "
        parts.append(sentence + sep)
        size += len(sentence) + 1
    return "".join(parts)


def corpus_digest(text: str) -> str:
    """SHA-256 of the UTF-8 text, recorded in checkpoints to detect a changed corpus."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()

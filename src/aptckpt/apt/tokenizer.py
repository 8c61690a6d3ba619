"""A character-level tokenizer whose files travel inside checkpoints.

Token id 0 is ``<unk>`` (any character not in the vocabulary); ids ``1..n`` are
single characters in sorted order. The tokenizer is two small JSON files:

* ``vocab.json``: ``{token: id}``, ordered by id;
* ``config.json``: ``{"tokenizer_class": "CharTokenizer", "version": 1,
  "unk_token": "<unk>", "vocab_size": n}``.

:meth:`CharTokenizer.files` returns exactly those bytes (deterministic: the
same vocabulary always gives the same bytes), which a
:class:`~aptckpt.manager.CheckpointManager` writes to ``run_dir/tokenizer/`` and
embeds in every checkpoint, so a checkpoint alone is enough to use the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from aptckpt.errors import FormatError

__all__ = ["CharTokenizer"]

VOCAB_FILE = "vocab.json"
CONFIG_FILE = "config.json"
_CLASS = "CharTokenizer"
_VERSION = 1
UNK_TOKEN = "<unk>"
# What decode() prints for <unk>: the Unicode replacement character.
_UNK_TEXT = "\ufffd"


class CharTokenizer:
    """Maps each character of a fixed alphabet to an id; unknown characters to 0."""

    def __init__(self, chars: Iterable[str]) -> None:
        """Build a tokenizer over ``chars`` (single characters, no duplicates)."""
        alphabet = list(chars)
        for ch in alphabet:
            if not isinstance(ch, str) or len(ch) != 1:
                raise ValueError(f"CharTokenizer tokens must be single characters, got {ch!r}")
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("CharTokenizer alphabet has duplicate characters")
        self._itos: list[str] = [UNK_TOKEN, *alphabet]
        self._stoi: dict[str, int] = {ch: i for i, ch in enumerate(alphabet, start=1)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """A tokenizer over the distinct characters of ``text``, in sorted order."""
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        """Number of ids, ``<unk>`` included."""
        return len(self._itos)

    @property
    def unk_id(self) -> int:
        return 0

    def encode(self, text: str, *, errors: Literal["replace", "strict"] = "replace") -> list[int]:
        """Token ids of ``text``.

        Args:
            text: the string to encode.
            errors: ``"replace"`` maps unknown characters to ``<unk>`` (id 0);
                ``"strict"`` raises ``ValueError`` naming the first one.
        """
        if errors == "strict":
            for pos, ch in enumerate(text):
                if ch not in self._stoi:
                    raise ValueError(f"character {ch!r} at position {pos} is not in the vocabulary")
        elif errors != "replace":
            raise ValueError(f"errors must be 'replace' or 'strict', got {errors!r}")
        get = self._stoi.get
        return [get(ch, 0) for ch in text]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; ``<unk>`` becomes U+FFFD."""
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self._itos):
                raise ValueError(f"token id {i} is out of range [0, {len(self._itos)})")
            out.append(_UNK_TEXT if i == 0 else self._itos[i])
        return "".join(out)

    def files(self) -> dict[str, bytes]:
        """The tokenizer's files, name to bytes (deterministic)."""
        vocab = {tok: i for i, tok in enumerate(self._itos)}
        config = {
            "tokenizer_class": _CLASS,
            "version": _VERSION,
            "unk_token": UNK_TOKEN,
            "vocab_size": self.vocab_size,
        }
        return {VOCAB_FILE: _dump(vocab), CONFIG_FILE: _dump(config)}

    @classmethod
    def from_files(cls, files: Mapping[str, bytes]) -> CharTokenizer:
        """Rebuild a tokenizer from :meth:`files` output (e.g. a checkpoint's ``tokenizer``).

        Raises:
            FormatError: a file is missing, is not the JSON this class writes,
                or the vocabulary is not ``<unk>`` then distinct single characters.
        """
        for name in (VOCAB_FILE, CONFIG_FILE):
            if name not in files:
                raise FormatError(f"tokenizer file {name!r} is missing (have {sorted(files)})")
        config = _parse(files[CONFIG_FILE], CONFIG_FILE)
        vocab = _parse(files[VOCAB_FILE], VOCAB_FILE)
        if not isinstance(config, dict) or config.get("tokenizer_class") != _CLASS:
            found = config.get("tokenizer_class") if isinstance(config, dict) else config
            raise FormatError(f"{CONFIG_FILE}: tokenizer_class is {found!r}, expected {_CLASS!r}")
        if config.get("version") != _VERSION:
            raise FormatError(
                f"{CONFIG_FILE}: version {config.get('version')!r} is not supported "
                f"(this reader knows {_VERSION})"
            )
        if not isinstance(vocab, dict) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in vocab.values()
        ):
            raise FormatError(f"{VOCAB_FILE}: expected an object mapping tokens to int ids")
        by_id = sorted(vocab.items(), key=lambda kv: kv[1])
        if [i for _, i in by_id] != list(range(len(by_id))):
            raise FormatError(f"{VOCAB_FILE}: ids must be exactly 0..{len(by_id) - 1}")
        if not by_id or by_id[0][0] != UNK_TOKEN:
            raise FormatError(f"{VOCAB_FILE}: id 0 must be {UNK_TOKEN!r}")
        if config.get("vocab_size") != len(by_id):
            raise FormatError(
                f"{CONFIG_FILE}: vocab_size {config.get('vocab_size')!r} != "
                f"{len(by_id)} entries in {VOCAB_FILE}"
            )
        try:
            return cls(tok for tok, _ in by_id[1:])
        except ValueError as err:
            raise FormatError(f"{VOCAB_FILE}: {err}") from err

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``vocab.json`` and ``config.json`` into ``directory`` (created if needed)."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        for name, data in self.files().items():
            (root / name).write_bytes(data)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> CharTokenizer:
        """Read a tokenizer written by :meth:`save`."""
        root = Path(directory)
        files = {}
        for name in (VOCAB_FILE, CONFIG_FILE):
            try:
                files[name] = (root / name).read_bytes()
            except FileNotFoundError as err:
                raise FileNotFoundError(f"no tokenizer file {name!r} in '{root}'") from err
        return cls.from_files(files)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CharTokenizer):
            return NotImplemented
        return self._itos == other._itos

    def __hash__(self) -> int:
        return hash(tuple(self._itos))

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, indent=1) + "\n").encode("utf-8")


def _parse(data: bytes, name: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FormatError(f"tokenizer file {name!r} is not UTF-8 JSON: {err}") from err

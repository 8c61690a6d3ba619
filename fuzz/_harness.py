"""Shared setup of the atheris harnesses: pristine checkpoints and the property.

Every harness builds one small checkpoint per backend (``torch``, ``zstd``, and
``delta`` with its object store) in a scratch directory, lets the fuzzer's
input replace one file of a copy, and runs every reader on it. The property:
``load`` (verification on and off), ``inspect`` and ``verify`` return or raise
an :class:`aptckpt.errors.AptckptError` -- any other exception is a crash that
atheris reports with the input that caused it. Hangs are caught by libFuzzer's
``-timeout``; its ``-rss_limit_mb`` catches huge allocations.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import xxhash

import aptckpt
from aptckpt import manifest as mf
from aptckpt.errors import AptckptError
from aptckpt.testing.samples import small_state

BACKENDS = ("torch", "zstd", "delta")
MANIFEST = mf.MANIFEST_NAME


def _remove_stale(base: Path) -> None:
    """Scratch directories of harnesses that ended: libFuzzer leaves with exit(),
    which runs no Python cleanup."""
    for path in base.glob("aptckpt-fuzz-*-*"):
        pid = path.name.split("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True)


class Scratch:
    """Pristine checkpoints of every backend and a working copy to damage."""

    def __init__(self) -> None:
        base = Path(os.environ.get("APTCKPT_FUZZ_TMP") or "/dev/shm")  # tmpfs: no disk writes
        base = base if base.is_dir() else Path(tempfile.gettempdir())
        _remove_stale(base)
        self.dir = Path(tempfile.mkdtemp(prefix=f"aptckpt-fuzz-{os.getpid()}-", dir=base))
        self.pristine: dict[str, Path] = {}
        for backend in BACKENDS:
            root = self.dir / "pristine" / backend
            options: dict[str, Any] = {"chunk_size": 64}
            if backend == "zstd":
                options["shard_size"] = 256
            aptckpt.save(small_state(), root / "ckpt", backend=backend, **options)
            self.pristine[backend] = root

    def fresh(self, backend: str) -> Path:
        """A new working copy of ``backend``'s run directory; returns its checkpoint."""
        work = self.dir / "work"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(self.pristine[backend], work)
        return work / "ckpt"

    def manifest_doc(self, backend: str) -> dict[str, Any]:
        doc = msgpack.unpackb((self.pristine[backend] / "ckpt" / MANIFEST).read_bytes(), raw=False)
        assert isinstance(doc, dict)
        return doc


def digest(data: bytes) -> bytes:
    return xxhash.xxh3_128_digest(data)


def write_doc(ckpt: Path, doc: dict[str, Any]) -> None:
    """The manifest sealed with a valid checksum, as an attacker can write it."""
    (ckpt / MANIFEST).write_bytes(mf.pack_document(doc))


CALLS: tuple[Callable[[Path], Any], ...] = (
    aptckpt.load,
    lambda p: aptckpt.load(p, verify=False),
    aptckpt.inspect,
    aptckpt.verify,
)


#: Non-aptckpt exceptions already reported (in api.py, outside the readers fuzzed
#: here), tolerated with ``APTCKPT_FUZZ_KNOWN=1`` so a run goes on to find new ones:
#: (exception type, text in its message, the issue).
KNOWN: tuple[tuple[type[BaseException], str, str], ...] = ()
known_hits: dict[str, int] = {}


def probe(ckpt: Path) -> None:
    """Every reader returns or raises an AptckptError; anything else propagates."""
    tolerate = os.environ.get("APTCKPT_FUZZ_KNOWN") == "1"
    for call in CALLS:
        try:
            call(ckpt)
        except AptckptError:
            pass
        except Exception as err:
            issue = next((i for t, m, i in KNOWN if isinstance(err, t) and m in str(err)), None)
            if not (tolerate and issue):
                raise
            known_hits[issue] = known_hits.get(issue, 0) + 1
            if known_hits[issue] == 1:
                print(f"known issue hit (tolerated from now on): {issue}", file=sys.stderr)


def seed(corpus: Path, inputs: list[bytes]) -> None:
    """Put the starting inputs in an empty corpus directory."""
    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):
        for i, data in enumerate(inputs):
            (corpus / f"seed-{i}").write_bytes(data)

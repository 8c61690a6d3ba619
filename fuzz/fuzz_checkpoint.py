"""Coverage-guided fuzzing of the data readers behind valid digests.

The first input byte picks a backend and a file of its checkpoint -- a zstd
shard, ``state.pt``, a store object or the store marker -- and the rest
replaces that file's bytes. The manifest is then made to agree with them, as an
attacker would: file sizes, chunk stored-digests and ``state.pt``'s digests
recomputed, an object renamed to the digest of its new bytes. So the zstd frame
decoder, unshuffle and xor, the store marker reader, and torch.load's zip and
(weights-only) pickle readers see the fuzzed bytes, not just the digest checks.
Load, inspect and verify must return or raise an AptckptError.

Run (see fuzz/README.md)::

    .venv/bin/python fuzz/fuzz_checkpoint.py fuzz/corpus/checkpoint -max_total_time=300 -timeout=20
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import atheris

with atheris.instrument_imports(include=["aptckpt"]):
    import _harness
    import msgpack


def _targets(scratch: _harness.Scratch) -> list[tuple[str, str]]:
    """``(backend, file relative to the run directory)`` for every fuzzable file."""
    found = []
    for backend in _harness.BACKENDS:
        root = scratch.pristine[backend]
        for path in sorted(root.rglob("*")):
            rel = str(path.relative_to(root))
            if path.is_file() and path.name not in (_harness.MANIFEST, "LOCK"):
                found.append((backend, rel))
    return found


def _reseal(ckpt: Path, backend: str, rel: str, new: bytes) -> None:
    doc: dict[str, Any] = msgpack.unpackb((ckpt / _harness.MANIFEST).read_bytes())
    run = ckpt.parent
    if backend == "delta" and rel.startswith("aptckpt-store/objects/"):
        name = _harness.digest(new)
        (run / rel).unlink()
        (run / rel).with_name(name.hex()).write_bytes(new)
        for row in doc["payload"]["objects"]:
            if row[0] == bytes.fromhex(Path(rel).name):
                row[0], row[1] = name, len(new)
    elif backend == "zstd":
        files = [(ckpt / f["path"]).read_bytes() for f in doc["files"]]
        for f, data in zip(doc["files"], files, strict=True):
            f["size"] = len(data)
        for rows in doc["payload"]["chunks"]:
            for row in rows:
                if row[5] is not None:
                    row[5] = _harness.digest(files[row[0]][row[1] : row[1] + row[2]])
    elif backend == "torch":
        cs = doc["payload"]["chunk_size"]
        doc["files"][0]["size"] = len(new)
        doc["payload"]["digests"] = b"".join(
            _harness.digest(new[i : i + cs]) for i in range(0, len(new), cs)
        )
    _harness.write_doc(ckpt, doc)


def main() -> None:
    scratch = _harness.Scratch()
    targets = _targets(scratch)
    corpus = [a for a in sys.argv[1:] if not a.startswith("-")]
    if corpus:
        seeds = [
            bytes([i]) + (scratch.pristine[b] / rel).read_bytes()
            for i, (b, rel) in enumerate(targets)
        ]
        _harness.seed(Path(corpus[0]), seeds)

    def one_input(data: bytes) -> None:
        if not data:
            return
        backend, rel = targets[data[0] % len(targets)]
        ckpt = scratch.fresh(backend)
        new = data[1:]
        (ckpt.parent / rel).write_bytes(new)
        _reseal(ckpt, backend, rel, new)
        _harness.probe(ckpt)

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()  # never returns; the next run removes the scratch directory


if __name__ == "__main__":
    main()

"""Coverage-guided fuzzing of the manifest reader and everything it feeds.

An input is read in one of two ways, by its first byte:

* ``0``: the rest is a msgpack document. A map is sealed with a valid checksum
  (an attacker can compute it) and written as the manifest; other bytes are
  written as they are -- malformed msgpack, no checksum.
* otherwise: the bytes drive edits of a real manifest of a ``torch``, ``zstd``
  or ``delta`` checkpoint -- which field (nested ones included), and what goes
  there: a boundary or random integer, a string, bytes, a list, a map, or
  nothing (deleted). The result is sealed. Most inputs take this way, so the
  fuzzer spends its time in the validation of every field, the skeleton and
  the backend payloads rather than in msgpack's parser.

The manifest goes into a copy of a checkpoint of the backend it names (data
files and store intact). Then load, inspect and verify must return or raise an
AptckptError.

Run (see fuzz/README.md)::

    .venv/bin/python fuzz/fuzz_manifest.py /tmp/corpus/manifest -max_total_time=300 -timeout=20
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import atheris

with atheris.instrument_imports(include=["aptckpt", "msgpack"]):
    import _harness
    import msgpack

_INTS = [0, 1, -1, 15, 16, 17, 2**30, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
_STRINGS = ["", "..", "/etc/passwd", "a/../b", ".x", "float32", "bits1x8", "zstd", "xor"]
_STRINGS += ["shuffle", "tensor", "dict", "odict", "list", "size", "dtype", "device", "meta"]
_STRINGS += ["aptckpt-store", "shard-00000.bin", "state.pt", "cuda:0", "hpu", "itemsize", "id"]


def _paths(doc: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if path:
        yield path
    if isinstance(doc, dict):
        for key, value in doc.items():
            if path or key != "checksum":
                yield from _paths(value, (*path, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield from _paths(value, (*path, index))


_DELETE = object()


def _value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    kind = fdp.ConsumeIntInRange(0, 11)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return _INTS[fdp.ConsumeIntInRange(0, len(_INTS) - 1)]
    if kind == 3:
        return fdp.ConsumeIntInRange(-(2**63), 2**64 - 1)
    if kind == 4:
        return fdp.ConsumeRegularFloat()
    if kind == 5:
        return _STRINGS[fdp.ConsumeIntInRange(0, len(_STRINGS) - 1)]
    if kind == 6:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 24))
    if kind == 7:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 24))
    if kind == 8 and depth < 3:
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    if kind == 9 and depth < 3:
        keys = [_STRINGS[fdp.ConsumeIntInRange(0, len(_STRINGS) - 1)] for _ in range(3)]
        return {k: _value(fdp, depth + 1) for k in keys[: fdp.ConsumeIntInRange(0, 3)]}
    if kind == 10:
        return fdp.ConsumeIntInRange(0, 4096)  # small counts, sizes and offsets
    return _DELETE if depth == 0 else None


def _edited(docs: dict[str, dict[str, Any]], data: bytes) -> tuple[str, dict[str, Any]]:
    fdp = atheris.FuzzedDataProvider(data)
    backend = _harness.BACKENDS[fdp.ConsumeIntInRange(0, len(_harness.BACKENDS) - 1)]
    doc = copy.deepcopy(docs[backend])
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        places = list(_paths(doc))
        if not places:
            break
        path = places[fdp.ConsumeIntInRange(0, len(places) - 1)]
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        value = _value(fdp)
        if value is _DELETE:
            del parent[path[-1]]
        elif isinstance(parent, list) and fdp.ConsumeBool():
            parent.insert(path[-1], value)
        else:
            parent[path[-1]] = value
    return backend, doc


def main() -> None:
    scratch = _harness.Scratch()
    docs = {b: scratch.manifest_doc(b) for b in _harness.BACKENDS}
    corpus = [a for a in sys.argv[1:] if not a.startswith("-")]
    if corpus:
        raw = [b"\x00" + msgpack.packb(d, use_bin_type=True) for d in docs.values()]
        _harness.seed(Path(corpus[0]), [*raw, b"\x01\x00\x00\x00", b"\x01\x01\x00", b"\x01\x02"])

    def one_input(data: bytes) -> None:
        if not data:
            return
        doc: Any
        if data[0] == 0:
            try:
                doc = msgpack.unpackb(data[1:], raw=False, strict_map_key=False)
            except Exception:
                doc = None
            backend = doc.get("backend") if isinstance(doc, dict) else None
        else:
            backend, doc = _edited(docs, data[1:])
        ckpt = scratch.fresh(backend if backend in docs else "zstd")
        if isinstance(doc, dict) and all(isinstance(k, str) for k in doc):
            _harness.write_doc(ckpt, doc)
        else:
            (ckpt / _harness.MANIFEST).write_bytes(data[1:])
        _harness.probe(ckpt)

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()  # never returns; the next run removes the scratch directory


if __name__ == "__main__":
    main()

"""Committed golden checkpoints of every format version still load, bit for bit.

Also a drift detector: saving the golden state again must reproduce the
committed raw shard byte for byte and the committed manifest's structure.
(zstd-compressed bytes may legitimately change with the zstd library version,
so only their decoded content is compared.)
"""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

import aptckpt
from aptckpt.testing import assert_state_equal
from golden.make_golden import (
    DELTA_CHAIN,
    GOLDEN,
    PACKED_GOLDEN,
    PACKED_VERSION,
    SHARDED_GOLDEN,
    SHARDED_VERSION,
    SINGLE_PROCESS_VERSION,
    delta_state,
    golden_state,
    sharded_expected,
)

GOLDEN_DIR = Path(__file__).parent / "golden"
CASES = sorted(p for p in GOLDEN_DIR.glob("v*/*") if p.is_dir())


def test_every_current_golden_exists():
    assert aptckpt.FORMAT_VERSION == PACKED_VERSION
    names = {p.name for p in CASES if p.parent.name == f"v{SINGLE_PROCESS_VERSION}"}
    assert names == set(GOLDEN)
    names = {p.name for p in CASES if p.parent.name == f"v{SHARDED_VERSION}"}
    assert names == set(SHARDED_GOLDEN)
    names = {p.name for p in CASES if p.parent.name == f"v{PACKED_VERSION}"}
    assert names == set(PACKED_GOLDEN)


@pytest.mark.parametrize("path", CASES, ids=lambda p: f"{p.parent.name}-{p.name}")
def test_golden_loads_bit_exact(path):
    version = int(path.parent.name.removeprefix("v"))
    if version == SHARDED_VERSION:  # saved by two ranks: whole tensors, rank 0's values
        checkpoints = [(path, sharded_expected())]
        assert aptckpt.inspect(path).world_size == 2
    elif path.name == "delta":  # a run directory: a chain of checkpoints and their store
        state_version = SINGLE_PROCESS_VERSION if version == PACKED_VERSION else version
        checkpoints = [
            (path / name, delta_state(i, state_version)) for i, name in enumerate(DELTA_CHAIN)
        ]
        if version == PACKED_VERSION:  # the small objects really lie in packs
            assert any((path / "aptckpt-store" / "packs").iterdir())
        codecs = {c for t in aptckpt.inspect(path / DELTA_CHAIN[-1]).tensors for c in t.codecs}
        assert any(c.startswith("xor") for c in codecs)  # the chain really holds deltas
    else:
        checkpoints = [(path, golden_state(version))]
    for checkpoint, expected in checkpoints:
        assert_state_equal(expected, aptckpt.load(checkpoint))
        aptckpt.verify(checkpoint)
        assert aptckpt.inspect(checkpoint).metadata == {"golden": path.name}


def _manifest(path: Path) -> dict:
    doc = msgpack.unpackb((path / "manifest.msgpack").read_bytes(), raw=False)
    for volatile in ("created_at", "library_version", "torch_version", "checksum"):
        doc.pop(volatile)
    return doc


@pytest.mark.parametrize("name", ["zstd", "zstd-raw"])
def test_saving_again_reproduces_the_format(tmp_path, name):
    committed = GOLDEN_DIR / f"v{SINGLE_PROCESS_VERSION}" / name
    aptckpt.save(
        golden_state(), tmp_path / name, backend="zstd", metadata={"golden": name}, **GOLDEN[name]
    )
    fresh, old = _manifest(tmp_path / name), _manifest(committed)

    def packed(doc, key):  # bytes, because the tree holds a NaN and nan != nan
        return msgpack.packb(doc[key], use_bin_type=True)

    for key in ("format", "format_version", "backend", "options", "tree", "tensors", "metadata"):
        assert packed(fresh, key) == packed(old, key), key
    if name == "zstd-raw":
        assert packed(fresh, "payload") == packed(old, "payload")
        for f in old["files"]:
            assert (tmp_path / name / f["path"]).read_bytes() == (
                committed / f["path"]
            ).read_bytes()

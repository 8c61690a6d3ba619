"""Every built-in backend (and option set) passes the shipped conformance suite."""

from __future__ import annotations

from aptckpt.testing.conformance import BackendConformance


class TestTorchBackend(BackendConformance):
    backend = "torch"
    stores_empty_bytes = False


class TestZstdBackend(BackendConformance):
    backend = "zstd"


class TestZstdRaw(BackendConformance):
    backend = "zstd"
    options = {"codec": "none"}


class TestZstdTinyChunksAndShards(BackendConformance):
    """Chunks of 32 bytes and 100-byte shards: many chunks per tensor, many shards."""

    backend = "zstd"
    options = {"chunk_size": 32, "shard_size": 100, "level": 3}


class TestTorchTinyChunks(BackendConformance):
    backend = "torch"
    stores_empty_bytes = False
    options = {"chunk_size": 64}

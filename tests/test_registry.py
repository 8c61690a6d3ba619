"""registry: lazy built-ins, plugins, clobbering; a minimal plugin passes conformance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import aptckpt
from aptckpt import _dtypes, registry
from aptckpt.backends import _chunks
from aptckpt.backends.base import Backend, BackendOptions
from aptckpt.errors import BackendError, UnknownBackendError
from aptckpt.testing.conformance import BackendConformance


@dataclass(frozen=True)
class _RawOptions(BackendOptions):
    pass


class RawFilesBackend(Backend):
    """A tiny plugin: one raw file per tensor, no digests. Shows the plugin API: it writes
    through ``writer.open`` sinks and reads through ``reader.open_files``, so it works on
    every storage (local paths and URLs) unchanged."""

    name: ClassVar[str] = "rawfiles"
    Options = _RawOptions

    def write(self, flat, writer):
        for i, leaf in enumerate(flat.tensors):
            host = _chunks.host_tensor(leaf.tensor)
            with writer.open(f"t{i}.bin") as sink:
                sink.write(_dtypes.byte_view(host))
        return {"files": len(flat.tensors)}

    def read(self, reader, manifest, *, verify=True):
        out = _chunks.new_tensors(manifest)
        with reader.open_files(manifest.files) as files:
            for index, (t, record) in enumerate(zip(out, manifest.files, strict=True)):
                if index in files.failed:
                    raise files.failed[index].error
                view = _dtypes.byte_view(t)
                view[:] = files.read(index, 0, record.size)
        return out


@pytest.fixture
def rawfiles():
    registry.register_backend(RawFilesBackend)
    yield "rawfiles"
    registry.unregister_backend("rawfiles")


class TestPluginConformance(BackendConformance):
    backend = "rawfiles"

    @pytest.fixture(autouse=True)
    def _registered(self, rawfiles):
        return rawfiles


def test_builtins_are_listed_without_import():
    assert {"torch", "zstd"} <= set(aptckpt.available_backends())
    assert registry.registered()["zstd"].startswith("aptckpt.backends.zstd")


def test_taken_name_needs_clobber(rawfiles):
    with pytest.raises(BackendError, match="clobber=True"):
        registry.register_backend(RawFilesBackend)
    registry.register_backend(RawFilesBackend, clobber=True)
    with pytest.raises(BackendError, match="clobber=True"):
        registry.register_backend(RawFilesBackend, name="zstd")


def test_non_backend_classes_refused():
    with pytest.raises(BackendError, match="subclass"):
        registry.register_backend(dict, name="bad")  # type: ignore[arg-type]


def test_unknown_name():
    with pytest.raises(UnknownBackendError, match="available: "):
        registry.get_backend("nope")
    with pytest.raises(KeyError):  # also a KeyError, for code that expects one
        registry.get_backend("nope")


@pytest.fixture
def entry_points(monkeypatch):
    """Pretend the given (name, "module:attr") pairs are installed entry points."""
    added: list[str] = []

    def install(*pairs):
        fakes = [type("EP", (), {"name": n, "value": v})() for n, v in pairs]
        added.extend(n for n, _ in pairs)
        monkeypatch.setattr(registry, "_plugins_scanned", False)
        monkeypatch.setattr(registry, "entry_points", lambda group: fakes)

    yield install
    for name in added:
        registry.unregister_backend(name)


def test_entry_point_plugins_are_discovered(entry_points):
    entry_points(("viaep", "test_registry:RawFilesBackend"))
    assert "viaep" in aptckpt.available_backends()
    assert registry.get_backend("viaep") is RawFilesBackend


def test_broken_plugin_reports_itself(entry_points):
    entry_points(("broken", "no_such_module_xyz:Backend"))
    with pytest.raises(BackendError, match="failed to load"):
        aptckpt.save({"x": torch.ones(1)}, "unused", backend="broken")

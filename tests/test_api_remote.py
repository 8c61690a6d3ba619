"""The public API on object storage (memory:// and s3:// against the moto server):
save / load (also into=, blocking=False) / inspect / verify / delete / convert for the
zstd and torch backends, damage and deletion reported with URLs, and the shipped
conformance suite on memory://."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import aptckpt
from aptckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    IntegrityError,
)
from aptckpt.storage import resolve
from aptckpt.testing import assert_state_equal
from aptckpt.testing.conformance import BackendConformance
from conftest import S3_SECRET

pytest.importorskip("fsspec")

BACKENDS = ["zstd", "torch"]


@pytest.fixture(params=["memory", "s3"])
def where(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any] | None]:
    """(url, storage_options) of an empty place in each kind of store."""
    if request.param == "memory":
        return request.getfixturevalue("memory_url"), None
    return request.getfixturevalue("s3_url"), request.getfixturevalue("s3_options")


def sample() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 33, generator=g)
    return {
        "model": {"w": w, "tied": w, "b": torch.arange(7, dtype=torch.int16)},
        "opt": {"step": torch.tensor(3.0), "lr": 1e-3, "name": "adamw"},
        "big": torch.randn(200_000, generator=g).to(torch.bfloat16),  # several chunks
        "empty": torch.empty(0, 3),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_load_inspect_verify_delete(
    where: tuple[str, dict[str, Any] | None], backend: str
) -> None:
    url, options = where
    path = url + "/ck"
    state = sample()
    info = aptckpt.save(state, path, backend=backend, storage_options=options, chunk_size=1 << 16)
    assert info.path == path and all(f.startswith("data-") for f in info.files)
    loaded = aptckpt.load(path, storage_options=options)
    assert_state_equal(loaded, state)
    assert loaded["model"]["w"] is loaded["model"]["tied"]
    assert aptckpt.load(path, storage_options=options, verify=False)["opt"]["lr"] == 1e-3

    summary = aptckpt.inspect(path, storage_options=options)
    assert summary.backend == backend and summary.path == path
    report = aptckpt.verify(path, storage_options=options)
    assert report.tensors == len(summary.tensors) and report.path == path

    with pytest.raises(CheckpointExistsError):
        aptckpt.save(state, path, backend=backend, storage_options=options)
    state["opt"]["lr"] = 2e-3
    aptckpt.save(state, path, backend=backend, storage_options=options, overwrite=True)
    assert aptckpt.load(path, storage_options=options)["opt"]["lr"] == 2e-3

    aptckpt.delete(path, storage_options=options)
    with pytest.raises(CheckpointNotFoundError):
        aptckpt.load(path, storage_options=options)
    storage, root = resolve(url, options)
    assert list(storage.walk(root)) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_into_and_background_save(
    where: tuple[str, dict[str, Any] | None], backend: str
) -> None:
    url, options = where
    path = url + "/bg"
    model = torch.nn.Linear(16, 8)
    handle = aptckpt.save(
        {"model": model.state_dict()},
        path,
        backend=backend,
        storage_options=options,
        blocking=False,
    )
    handle.wait()
    fresh = torch.nn.Linear(16, 8)
    target = {"model": fresh.state_dict()}
    aptckpt.load(path, into=target, storage_options=options)
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)


def test_convert_between_local_and_object_storage(
    where: tuple[str, dict[str, Any] | None], tmp_path: Path
) -> None:
    url, options = where
    state = sample()
    local = tmp_path / "local"
    aptckpt.save(state, local, backend="torch")
    aptckpt.convert(local, url + "/up", backend="zstd", storage_options=options)
    aptckpt.convert(url + "/up", url + "/side", backend="torch", storage_options=options)
    aptckpt.convert(url + "/side", tmp_path / "down", backend="zstd", storage_options=options)
    assert_state_equal(aptckpt.load(tmp_path / "down"), state)
    assert_state_equal(aptckpt.load(url + "/side", storage_options=options), state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_damage_is_named_by_url(where: tuple[str, dict[str, Any] | None], backend: str) -> None:
    url, options = where
    path = url + "/dmg"
    info = aptckpt.save(sample(), path, backend=backend, storage_options=options)
    storage, root = resolve(path, options)
    target = storage.join(root, info.files[0])
    data = bytearray(storage.read_file(target, limit=1 << 30))
    data[len(data) // 2] ^= 0xFF
    storage.write_file(target, bytes(data))
    with pytest.raises(IntegrityError) as damaged:
        aptckpt.load(path, storage_options=options)
    assert path in str(damaged.value) and info.files[0] in str(damaged.value)
    with pytest.raises(IntegrityError):
        aptckpt.verify(path, storage_options=options)

    storage.remove_file(target)
    with pytest.raises(IntegrityError, match="missing"):
        aptckpt.load(path, storage_options=options)


def test_a_checkpoint_copied_from_a_bucket_loads_locally(
    s3_url: str, s3_options: dict[str, Any], s3_admin: Any, tmp_path: Path
) -> None:
    state = sample()
    aptckpt.save(state, s3_url + "/ck", storage_options=s3_options)
    s3_admin.get(s3_url + "/ck/", str(tmp_path / "ck") + "/", recursive=True)
    assert_state_equal(aptckpt.load(tmp_path / "ck"), state)
    assert aptckpt.verify(tmp_path / "ck").tensors == 5


def test_credentials_stay_out_of_results_and_manifests(
    s3_url: str, s3_options: dict[str, Any]
) -> None:
    info = aptckpt.save(sample(), s3_url + "/c", storage_options=s3_options)
    storage, root = resolve(s3_url + "/c", s3_options)
    for rel, _ in storage.walk(root):
        assert S3_SECRET.encode() not in storage.read_file(storage.join(root, rel), limit=1 << 30)
    assert S3_SECRET not in repr(info)
    with pytest.raises(CheckpointExistsError) as exists:
        aptckpt.save(sample(), s3_url + "/c", storage_options=s3_options)
    assert S3_SECRET not in str(exists.value)


class TestZstdOnMemory(BackendConformance):
    backend = "zstd"
    root = "memory://aptckpt-conformance"


class TestTorchOnMemory(BackendConformance):
    backend = "torch"
    stores_empty_bytes = False
    root = "memory://aptckpt-conformance"


class TestDeltaOnMemory(BackendConformance):
    backend = "delta"
    root = "memory://aptckpt-conformance"


class _OnS3(BackendConformance):
    """The conformance suite against the S3 API server: a fresh bucket per test."""

    @pytest.fixture(autouse=True)
    def _on_s3(self, s3_url: str, s3_options: dict[str, Any]) -> None:
        self.root, self.storage_options = s3_url, s3_options


class TestZstdOnS3(_OnS3):
    backend = "zstd"


class TestZstdRawOnS3(_OnS3):
    backend = "zstd"
    options = {"codec": "none"}


class TestTorchOnS3(_OnS3):
    backend = "torch"
    stores_empty_bytes = False


class TestDeltaOnS3(_OnS3):
    backend = "delta"

"""api: errors, devices, integrity checks, safe loading."""

from __future__ import annotations

import os
import pickle

import msgpack
import pytest
import torch

import aptckpt
from aptckpt import manifest as mf
from aptckpt.errors import (
    BackendError,
    DeviceUnavailableError,
    FormatError,
    IntegrityError,
    UnknownBackendError,
    UnsupportedFormatVersionError,
    UnsupportedObjectError,
)


def rewrite_manifest(path, **changes):
    doc = msgpack.unpackb((path / mf.MANIFEST_NAME).read_bytes(), raw=False)
    doc.update(changes)
    (path / mf.MANIFEST_NAME).write_bytes(mf.pack_document(doc))
    return doc


def test_unknown_backend_lists_available(tmp_path):
    with pytest.raises(UnknownBackendError) as info:
        aptckpt.save({}, tmp_path / "c", backend="zstd2")
    assert str(info.value).startswith("unknown backend 'zstd2'; available: ")
    assert "'torch'" in str(info.value) and "'zstd'" in str(info.value)


def test_bad_options_name_the_allowed_ones(tmp_path):
    with pytest.raises(BackendError, match="its options are: chunk_size, codec, level"):
        aptckpt.save({}, tmp_path / "c", backend="zstd", compression=3)
    with pytest.raises(BackendError, match="codec 'lz4'"):
        aptckpt.save({}, tmp_path / "c", backend="zstd", codec="lz4")
    with pytest.raises(BackendError, match="chunk_size"):
        aptckpt.save({}, tmp_path / "c", backend="zstd", chunk_size=1000)
    assert not os.path.exists(tmp_path / "c")


def test_metadata_must_be_plain(tmp_path):
    with pytest.raises(UnsupportedObjectError, match="metadata"):
        aptckpt.save({}, tmp_path / "c", metadata={"t": torch.ones(1)})


def test_save_info(tmp_path):
    info = aptckpt.save({"w": torch.zeros(1000), "x": 3}, tmp_path / "c")
    assert info.backend == "zstd" and info.tensors == 1 and info.raw_bytes == 4000
    assert 0 < info.stored_bytes < 4000
    assert info.files == ("shard-00000.bin",)


def test_map_location_forms(tmp_path):
    aptckpt.save({"w": torch.ones(2)}, tmp_path / "c")
    for where in ("cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda saved: "cpu"):
        assert aptckpt.load(tmp_path / "c", map_location=where)["w"].device.type == "cpu"


def test_missing_device_needs_map_location(tmp_path):
    aptckpt.save({"w": torch.ones(2)}, tmp_path / "c")
    doc = msgpack.unpackb((tmp_path / "c" / mf.MANIFEST_NAME).read_bytes(), raw=False)
    doc["tensors"][0]["device"] = "cuda:7"
    rewrite_manifest(tmp_path / "c", tensors=doc["tensors"])
    if not torch.cuda.is_available() or torch.cuda.device_count() < 8:
        with pytest.raises(DeviceUnavailableError, match="map_location='cpu'"):
            aptckpt.load(tmp_path / "c")
    assert aptckpt.load(tmp_path / "c", map_location={"cuda:7": "cpu"})["w"].device.type == "cpu"


def test_newer_format_refused(tmp_path):
    aptckpt.save({"w": torch.ones(2)}, tmp_path / "c")
    rewrite_manifest(tmp_path / "c", format_version=99)
    with pytest.raises(UnsupportedFormatVersionError, match="upgrade aptckpt"):
        aptckpt.load(tmp_path / "c")


def test_unknown_backend_in_checkpoint(tmp_path):
    aptckpt.save({"w": torch.ones(2)}, tmp_path / "c")
    rewrite_manifest(tmp_path / "c", backend="fancy")
    with pytest.raises(FormatError, match="backend 'fancy', which is not installed"):
        aptckpt.load(tmp_path / "c")


@pytest.mark.parametrize("backend", ["zstd", "torch"])
def test_flipped_bits_named_by_file_and_tensor(tmp_path, backend):
    gen = torch.Generator().manual_seed(1)
    state = {"a": torch.randn(5000, generator=gen), "b": torch.randn(5000, generator=gen)}
    aptckpt.save(state, tmp_path / "c", backend=backend, chunk_size=4096)
    (name,) = aptckpt.inspect(tmp_path / "c").files
    data = bytearray((tmp_path / "c" / name.path).read_bytes())
    data[len(data) // 2] ^= 0x10
    (tmp_path / "c" / name.path).write_bytes(bytes(data))
    for call in (aptckpt.load, aptckpt.verify):
        with pytest.raises(IntegrityError) as info:
            call(tmp_path / "c")
        assert info.value.file == name.path
        assert name.path in str(info.value)
    if backend == "zstd":
        assert info.value.tensor in ("state['a']", "state['b']")


def test_verify_reports_every_damaged_chunk(tmp_path):
    aptckpt.save({"a": torch.randn(4096), "b": torch.randn(4096)}, tmp_path / "c",
                 codec="none", chunk_size=4096)  # fmt: skip
    shard = tmp_path / "c" / "shard-00000.bin"
    data = bytearray(shard.read_bytes())
    for offset in range(100, len(data), 4096):
        data[offset] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as info:
        aptckpt.verify(tmp_path / "c")
    assert len(info.value.problems) == 8
    assert "state['a']" in info.value.problems[0] and "state['b']" in info.value.problems[-1]
    report_ok = aptckpt.save({"x": torch.ones(3)}, tmp_path / "d")
    assert aptckpt.verify(report_ok.path).tensors == 1


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('APTCKPT_PWNED', '/tmp/aptckpt-pwned')}",))


@pytest.mark.parametrize("verify", [True, False])
def test_code_running_pickle_in_torch_file_is_refused(tmp_path, monkeypatch, verify):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("APTCKPT_PWNED", str(marker))
    aptckpt.save({"w": torch.ones(2)}, tmp_path / "c", backend="torch")
    evil = tmp_path / "c" / "state.pt"
    torch.save({"w": torch.ones(2), "x": _Exploit()}, evil, pickle_protocol=2)
    # Make the manifest agree with the evil file, as an attacker would.
    from aptckpt import _accel

    size = evil.stat().st_size
    doc = msgpack.unpackb((tmp_path / "c" / mf.MANIFEST_NAME).read_bytes(), raw=False)
    doc["files"][0]["size"] = size
    doc["payload"]["digests"] = _accel.hash_chunks(evil.read_bytes(), doc["payload"]["chunk_size"])
    rewrite_manifest(tmp_path / "c", files=doc["files"], payload=doc["payload"])
    with pytest.raises(FormatError, match="refused"):
        aptckpt.load(tmp_path / "c", verify=verify)
    assert not marker.exists()
    assert pickle.dumps(1)  # pickle itself untouched


def test_inspect_reads_no_tensor_data(tmp_path):
    aptckpt.save({"w": torch.ones(100, 10, dtype=torch.bfloat16)}, tmp_path / "c")
    (tmp_path / "c" / "shard-00000.bin").write_bytes(b"")  # data gone, manifest intact
    info = aptckpt.inspect(tmp_path / "c")
    assert info.tensors[0].shape == (100, 10) and info.tensors[0].dtype == "bfloat16"
    assert info.tensors[0].codecs == ("shuffle2+zstd",)
    assert info.raw_bytes == 2000


def test_native_flag_matches_environment():
    mode = os.environ.get("APTCKPT_NATIVE", "auto")
    if mode == "disable":
        assert aptckpt.NATIVE is False and aptckpt.IMPLEMENTATION == "python"
    elif mode == "require":
        assert aptckpt.NATIVE is True


@pytest.mark.parametrize("backend", ["zstd", "torch", "delta"])
@pytest.mark.parametrize("blocking", [True, False])
def test_conjugate_and_negative_views_beside_their_base_keep_their_values(
    tmp_path, backend, blocking
):
    x = torch.randn(4, dtype=torch.complex64)
    state = {"x": x, "xc": x.conj(), "xn": torch._neg_view(x), "xcn": x.conj().neg()}
    handle = aptckpt.save(state, tmp_path / "c", backend=backend, blocking=blocking)
    if not blocking:
        handle.wait()
    loaded = aptckpt.load(tmp_path / "c")
    for key, value in state.items():
        assert torch.equal(loaded[key], value.resolve_conj().resolve_neg()), key


def test_a_save_whose_manifest_no_reader_would_open_is_refused(tmp_path, monkeypatch):
    from aptckpt import _config

    state = {"losses": list(range(50_000)), "w": torch.ones(3)}
    aptckpt.save(state, tmp_path / "fits")
    monkeypatch.setattr(_config, "MAX_MANIFEST_BYTES", 100_000)
    with pytest.raises(aptckpt.UnsupportedObjectError, match="100000-byte limit") as info:
        aptckpt.save(state, tmp_path / "c")
    assert "torch.tensor(values)" in str(info.value)
    assert not (tmp_path / "c").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["fits"]


def test_large_plain_bytes_go_to_data_files_not_the_manifest(tmp_path):
    blob = os.urandom(3 << 20)  # a tokenizer file, a pickled config: megabytes of bytes
    aptckpt.save({"blob": blob}, tmp_path / "c")
    assert (tmp_path / "c" / "manifest.msgpack").stat().st_size < 4096
    assert aptckpt.load(tmp_path / "c")["blob"] == blob


@pytest.mark.parametrize("backend", ["zstd", "torch", "delta"])
def test_a_failed_load_leaves_no_descriptor_open(tmp_path, backend):
    """The error (and its traceback, which holds the reader's frame) may live long; the
    checkpoint's descriptors must not live with it until a garbage collection."""
    import gc

    path = tmp_path / "c"
    # delta: the tensor in the checkpoint's own shard file (local_below), a file to damage
    local = {"local_below": 16 << 10} if backend == "delta" else {}
    aptckpt.save({"w": torch.arange(1000.0)}, path, backend=backend, **local)
    info = aptckpt.inspect(path)
    data = path / info.files[-1].path
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))

    def open_into_checkpoint() -> list[str]:
        found = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith(str(path)):
                found.append(target)
        return found

    gc.disable()
    try:
        with pytest.raises(aptckpt.AptckptError) as failed:
            aptckpt.load(path)
        assert open_into_checkpoint() == [], failed.value
        with pytest.raises(aptckpt.AptckptError):
            aptckpt.verify(path)
        assert open_into_checkpoint() == []
    finally:
        gc.enable()

"""_foreign: a file passed where a checkpoint directory was expected is named, with what
opens it; unknown, unreadable and special files give None or a plain description."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import aptckpt
from aptckpt.storage.local._foreign import describe_foreign_file


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_safetensors_file_is_named_with_its_tensor_count(tmp_path):
    header = {
        "__metadata__": {"format": "pt"},
        "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
    }
    hint = describe_foreign_file(
        write(tmp_path / "m.safetensors", safetensors_bytes(header, bytes(12)))
    )
    assert hint is not None and hint.startswith("it is a safetensors file (2 tensors)")
    assert "safetensors.torch.load_file(path)" in hint and "torch.load(" not in hint
    assert "aptckpt.save(state, directory)" in hint


def test_safetensors_written_by_the_package_is_recognised(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    st.save_file({"w": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    hint = describe_foreign_file(tmp_path / "model.safetensors")
    assert hint is not None and hint.startswith("it is a safetensors file (1 tensor),")


def test_huge_safetensors_header_is_not_read(tmp_path):
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 3 << 30) + b'{"w": ')
        f.truncate(4 << 30)  # sparse: no 4 GiB written
    hint = describe_foreign_file(path)
    assert hint is not None and hint.startswith("it is a safetensors file, not an aptckpt")


@pytest.mark.parametrize(
    "data",
    [
        struct.pack("<Q", 1 << 40) + b"{}",  # header longer than the file
        struct.pack("<Q", 4) + b"[1] ",  # JSON, but not an object
        struct.pack("<Q", 4) + b"{\xff\xfe}",  # not UTF-8
        struct.pack("<Q", 2) + b"xx",
    ],
)
def test_what_only_looks_like_safetensors_is_not_called_so(tmp_path, data):
    hint = describe_foreign_file(write(tmp_path / "f", data))
    assert hint is None or "safetensors" not in hint


def test_torch_save_file_points_to_torch_load(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "model.pt")
    hint = describe_foreign_file(tmp_path / "model.pt")
    assert hint is not None and hint.startswith("it is a torch.save file, not an aptckpt")
    assert "torch.load(path, weights_only=True)" in hint


def test_legacy_torch_save_file_is_named(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    hint = describe_foreign_file(path)
    assert hint is not None and "legacy (before torch 1.6) format" in hint
    assert "torch.load(path, weights_only=True)" in hint


def test_torchscript_archive_points_to_jit_load(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:  # the members torch.jit.save writes
        for name in ("m/data.pkl", "m/constants.pkl", "m/code/__torch__/m.py", "m/version"):
            z.writestr(name, b"x")
    hint = describe_foreign_file(write(tmp_path / "script.pt", buf.getvalue()))
    assert hint is not None and "TorchScript" in hint and "torch.jit.load(path)" in hint


def test_numpy_files_point_to_numpy_load(tmp_path):
    np.save(tmp_path / "a.npy", np.ones(3))
    np.savez(tmp_path / "b.npz", x=np.ones(3))
    npy, npz = describe_foreign_file(tmp_path / "a.npy"), describe_foreign_file(tmp_path / "b.npz")
    assert npy is not None and npy.startswith("it is a NumPy .npy array") and "numpy.load" in npy
    assert npz is not None and npz.startswith("it is a NumPy .npz archive") and "numpy.load" in npz


def test_pickle_is_named_and_not_recommended(tmp_path):
    hint = describe_foreign_file(write(tmp_path / "s.pkl", pickle.dumps({"a": 1}, protocol=4)))
    assert hint is not None and hint.startswith("it is a Python pickle")
    assert "never loads pickles" in hint


def test_manifest_copied_out_of_its_directory(tmp_path):
    aptckpt.save({"w": torch.ones(2)}, tmp_path / "c")
    copied = write(
        tmp_path / "manifest-copy.msgpack", (tmp_path / "c" / "manifest.msgpack").read_bytes()
    )
    hint = describe_foreign_file(copied)
    assert hint is not None and "aptckpt manifest copied out of its checkpoint directory" in hint


@pytest.mark.parametrize(
    ("backend", "name"),
    [("zstd", "shard-00000.bin"), ("torch", "state.pt"), ("zstd", "manifest.msgpack")],
)
def test_file_inside_a_checkpoint_points_to_its_directory(tmp_path, backend, name):
    aptckpt.save({"w": torch.ones(2)}, tmp_path / "c", backend=backend)
    hint = describe_foreign_file(tmp_path / "c" / name)
    assert hint is not None and f"of the checkpoint '{tmp_path / 'c'}'" in hint
    assert f"pass '{tmp_path / 'c'}' instead" in hint
    assert ("torch.load" in hint) == (name == "state.pt")


def test_archives_say_to_extract(tmp_path):
    aptckpt.save({"w": torch.ones(2)}, tmp_path / "c")
    with tarfile.open(tmp_path / "c.tar", "w") as tar:
        tar.add(tmp_path / "c", arcname="c")
    write(tmp_path / "c.tar.gz", gzip.compress((tmp_path / "c.tar").read_bytes()))
    write(tmp_path / "c.tar.zst", b"\x28\xb5\x2f\xfd" + bytes(20))
    with zipfile.ZipFile(tmp_path / "c.zip", "w") as z:
        z.write(tmp_path / "c" / "manifest.msgpack", "c/manifest.msgpack")
    for name, kind in (
        ("c.tar", "tar"),
        ("c.tar.gz", "gzip"),
        ("c.tar.zst", "zstd"),
        ("c.zip", "zip"),
    ):
        hint = describe_foreign_file(tmp_path / name)
        assert hint is not None and kind in hint and "extract it" in hint, name


def test_damaged_zip_is_a_zip_archive(tmp_path):
    hint = describe_foreign_file(write(tmp_path / "broken.pt", b"PK\x03\x04" + bytes(100)))
    assert hint is not None and hint.startswith("it is a zip archive")


def test_gguf_and_empty_files(tmp_path):
    gguf = describe_foreign_file(write(tmp_path / "m.gguf", b"GGUF\x03\x00\x00\x00" + bytes(16)))
    assert gguf is not None and "GGUF" in gguf
    assert describe_foreign_file(write(tmp_path / "empty", b"")) == (
        "it is an empty file, not a checkpoint directory"
    )


def test_unknown_missing_and_directories_give_none(tmp_path):
    assert describe_foreign_file(write(tmp_path / "notes.txt", b"hello world\n")) is None
    assert describe_foreign_file(tmp_path / "missing") is None
    assert describe_foreign_file(tmp_path) is None
    assert describe_foreign_file("bad\0path") is None


def test_special_files_are_described_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result: list[str | None] = []
    worker = threading.Thread(
        target=lambda: result.append(describe_foreign_file(fifo)), daemon=True
    )
    worker.start()
    worker.join(10)
    assert result == ["it is a named pipe (FIFO), not a checkpoint directory"]
    assert (
        describe_foreign_file("/dev/null") == "it is a character device, not a checkpoint directory"
    )


def test_symlink_is_followed(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "model.pt")
    (tmp_path / "link").symlink_to(tmp_path / "model.pt")
    hint = describe_foreign_file(tmp_path / "link")
    assert hint is not None and "torch.save file" in hint


def test_unreadable_file_gives_none(tmp_path):
    if os.geteuid() != 0:
        path = write(tmp_path / "secret.safetensors", safetensors_bytes({}))
        path.chmod(0)
        assert describe_foreign_file(path) is None
        return
    # Root reads any file: ask as user nobody, in a directory nobody may enter.
    shared = Path(tempfile.mkdtemp(prefix="aptckpt-foreign-"))
    try:
        shared.chmod(0o755)
        path = write(shared / "secret.safetensors", safetensors_bytes({}))
        path.chmod(0o600)
        module = Path(aptckpt.__file__).parent / "storage" / "local" / "_foreign.py"  # no torch
        code = (
            "import importlib.util, os\n"
            f"spec = importlib.util.spec_from_file_location('_foreign', {str(module)!r})\n"
            "foreign = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(foreign)\n"
            "os.setgid(65534); os.setuid(65534)\n"
            f"print(repr(foreign.describe_foreign_file({str(path)!r})))\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "None"
    finally:
        shutil.rmtree(shared)


def test_a_safetensors_like_file_with_deeply_nested_json_is_described_or_not(tmp_path):
    header = b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(aptckpt.CheckpointNotFoundError):
        aptckpt.load(path)

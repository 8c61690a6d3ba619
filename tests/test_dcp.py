"""``aptckpt._dcp``: torch.distributed.checkpoint directories imported without running
their pickles -- real directories written by ``dcp.save``, checked against torch's own
``dcp_to_torch_save``, and hostile ones that must be refused before anything runs."""

from __future__ import annotations

import io
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import aptckpt
from aptckpt.testing import assert_state_equal

dcp = pytest.importorskip("torch.distributed.checkpoint")
from torch.distributed.checkpoint import metadata as dcp_md  # noqa: E402
from torch.distributed.checkpoint.filesystem import _StorageInfo  # noqa: E402
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save  # noqa: E402


def _state() -> dict[str, Any]:
    torch.manual_seed(0)
    return {
        "model": {
            "w": torch.randn(6, 4),
            "b": torch.randn(4).to(torch.bfloat16),
            "scale": torch.tensor(2.5),  # 0-d
            "empty": torch.empty(0, 3),
            "mask": torch.tensor([True, False]),
            "ids": torch.arange(5, dtype=torch.int64),
        },
        "optimizer": {
            "state": {"0": {"exp_avg": torch.ones(6, 4), "step": torch.tensor(3.0)}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0], "name": None}],
        },
        "epoch": 3,
        "note": "run-a",
        "blob": b"\x00\x01",
        "history": [torch.zeros(2), 1.5],
    }


def _save(state: Any, folder: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it saves in one process
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return folder


def _torch_view(folder: Path, tmp_path: Path) -> Any:
    """What torch's own converter makes of the directory (it trusts the pickles)."""
    out = tmp_path / "oracle.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(str(folder), str(out))
    return torch.load(out, weights_only=True)


def test_a_dcp_directory_imports_bit_exact(tmp_path: Path) -> None:
    state = _state()
    folder = _save(state, tmp_path / "dcp")
    aptckpt.convert(folder, tmp_path / "ck")
    loaded = aptckpt.load(tmp_path / "ck")
    assert_state_equal(state, loaded)  # nesting, dtypes, 0-d, empty, plain values
    assert_state_equal(_torch_view(folder, tmp_path), loaded)  # as torch reads it
    meta = aptckpt.inspect(tmp_path / "ck").metadata
    assert meta == {"imported_from": "torch.distributed.checkpoint", "dcp_version": "1.0.0"}


def test_int_keys_come_back_as_dcp_spells_them(tmp_path: Path) -> None:
    folder = _save({"opt": {"state": {0: {"m": torch.ones(2)}}}}, tmp_path / "dcp")
    aptckpt.convert(folder, tmp_path / "ck")
    loaded = aptckpt.load(tmp_path / "ck")
    assert list(loaded["opt"]["state"]) == ["0"]  # as dcp.load and dcp_to_torch_save give
    assert_state_equal(_torch_view(folder, tmp_path), loaded)


def _write_sharded(folder: Path, full: torch.Tensor, rows: list[int]) -> None:
    """A DCP directory as two ranks of FSDP write it: one tensor in row chunks spread over
    two data files, metadata in torch's own classes (only the pickling is done here)."""
    folder.mkdir()
    chunks, storage = [], {}
    start = 0
    files: dict[str, io.BytesIO] = {"__0_0.distcp": io.BytesIO(), "__1_0.distcp": io.BytesIO()}
    for i, n in enumerate(rows):
        offsets, sizes = torch.Size([start, 0]), torch.Size([n, full.shape[1]])
        chunks.append(dcp_md.ChunkStorageMetadata(offsets=offsets, sizes=sizes))
        name = f"__{i % 2}_0.distcp"
        stream = files[name]
        at = stream.tell()
        torch.save(full[start : start + n].clone(), stream)
        index = dcp_md.MetadataIndex(fqn="w", offset=offsets, index=i)
        storage[index] = _StorageInfo(name, at, stream.tell() - at)
        start += n
    props = dcp_md.TensorProperties(dtype=full.dtype)
    meta = dcp_md.Metadata(
        state_dict_metadata={"w": dcp_md.TensorStorageMetadata(props, full.shape, chunks)},
        storage_data=storage,
        planner_data={"w": ("w",)},
    )
    for name, stream in files.items():
        (folder / name).write_bytes(stream.getvalue())
    (folder / ".metadata").write_bytes(pickle.dumps(meta))


def test_a_sharded_tensor_comes_back_whole(tmp_path: Path) -> None:
    full = torch.arange(40, dtype=torch.float16).reshape(8, 5)
    _write_sharded(tmp_path / "dcp", full, [3, 0, 4, 1])  # uneven, one empty chunk
    aptckpt.convert(tmp_path / "dcp", tmp_path / "ck")
    loaded = aptckpt.load(tmp_path / "ck")
    assert torch.equal(loaded["w"], full) and loaded["w"].dtype == torch.float16
    assert torch.equal(_torch_view(tmp_path / "dcp", tmp_path)["w"], full)  # torch agrees


# ---------------------------------------------------------------- hostile directories


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


def _tamper(folder: Path, change: Any) -> None:
    """Rewrite ``.metadata`` after ``change(metadata)`` (a trusted pickle.load here: the
    test made the file)."""
    meta = pickle.loads((folder / ".metadata").read_bytes())
    change(meta)
    (folder / ".metadata").write_bytes(pickle.dumps(meta))


def test_a_metadata_pickle_that_would_run_code_is_refused_unrun(tmp_path: Path) -> None:
    folder = _save({"w": torch.ones(2)}, tmp_path / "dcp")
    marker = tmp_path / "pwned"
    _tamper(folder, lambda m: setattr(m, "planner_data", _RunsCode(marker)))
    with pytest.raises(aptckpt.FormatError, match=r"names posix\.system.*dcp_to_torch"):
        aptckpt.convert(folder, tmp_path / "ck")
    assert not marker.exists() and not (tmp_path / "ck").exists()
    (folder / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))  # the whole file
    with pytest.raises(aptckpt.FormatError, match=r"posix\.system"):
        aptckpt.convert(folder, tmp_path / "ck")
    assert not marker.exists()


def test_a_value_item_that_would_run_code_is_refused_unrun(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = _save({"w": torch.ones(2), "cfg": _RunsCode(marker)}, tmp_path / "dcp")
    assert not marker.exists()
    with pytest.raises(aptckpt.UnsupportedObjectError, match=r"'cfg'.*weights_only"):
        aptckpt.convert(folder, tmp_path / "ck")
    assert not marker.exists()


def _data(folder: Path) -> Path:
    return next(folder.glob("*.distcp"))


def test_a_truncated_data_file_is_refused(tmp_path: Path) -> None:
    folder = _save(_state(), tmp_path / "dcp")
    data = _data(folder)
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(aptckpt.FormatError, match="truncated or damaged"):
        aptckpt.convert(folder, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def _storage(meta: Any, fqn: str) -> Any:
    return next(k for k in meta.storage_data if k.fqn == fqn)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # the item of 'model.w' read at the place of another tensor's
        (
            lambda m: m.storage_data.__setitem__(
                _storage(m, "model.w"), m.storage_data[_storage(m, "model.b")]
            ),
            r"'model\.w'.*holds a torch\.bfloat16 tensor of shape \(4,\)",
        ),
        # an offset into the middle of an item
        (
            lambda m: setattr(m.storage_data[_storage(m, "model.w")], "offset", 7),
            "not a torch.save item",
        ),
        (
            lambda m: setattr(m.storage_data[_storage(m, "model.w")], "relative_path", "../x"),
            "not a plain name",
        ),
        (
            lambda m: setattr(m.storage_data[_storage(m, "model.w")], "length", 1 << 40),
            "truncated or damaged",
        ),
        (
            lambda m: setattr(m.storage_data[_storage(m, "model.w")], "length", 0),
            "more than its items hold|not a torch.save item",
        ),
        # a size lie: more elements than the items hold, refused before allocating
        (
            lambda m: setattr(m.state_dict_metadata["model.w"], "size", torch.Size([1 << 40])),
            "lies outside its shape|do not cover",
        ),
        (
            lambda m: (
                setattr(m.state_dict_metadata["model.w"], "size", torch.Size([1 << 20, 1 << 20])),
                setattr(
                    m.state_dict_metadata["model.w"].chunks[0],
                    "sizes",
                    torch.Size([1 << 20, 1 << 20]),
                ),
            ),
            "more than its items hold",
        ),
        # two chunks over the same rows
        (
            lambda m: m.state_dict_metadata["model.w"].chunks.append(
                m.state_dict_metadata["model.w"].chunks[0]
            ),
            "overlap",
        ),
        (
            lambda m: setattr(
                m.storage_data[_storage(m, "model.w")], "transform_descriptors", ["zstd"]
            ),
            "storage extensions",
        ),
        (lambda m: setattr(m, "planner_data", {"model.w": ("model", 10**9)}), "bad path"),
        (lambda m: setattr(m, "planner_data", {"model.w": ("a",) * 10_000}), "bad path"),
    ],
)
def test_lying_metadata_is_refused(tmp_path: Path, change: Any, message: str) -> None:
    folder = _save(_state(), tmp_path / "dcp")
    _tamper(folder, change)
    with pytest.raises(aptckpt.FormatError, match=message):
        aptckpt.convert(folder, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_a_field_posing_as_the_record_kind_changes_nothing(tmp_path: Path) -> None:
    state = _state()
    folder = _save(state, tmp_path / "dcp")
    _tamper(
        folder,
        lambda m: setattr(m.state_dict_metadata["model.w"], "_kind", "BytesStorageMetadata"),
    )
    aptckpt.convert(folder, tmp_path / "ck")
    assert torch.equal(aptckpt.load(tmp_path / "ck")["model"]["w"], state["model"]["w"])


def test_a_safetensors_serialized_dcp_is_refused_with_the_way_out(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.filesystem import FileSystemWriter, SerializationFormat

    writer = FileSystemWriter(
        str(tmp_path / "dcp"), serialization_format=SerializationFormat.SAFETENSORS
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(3)}, storage_writer=writer, no_dist=True)
    with pytest.raises(aptckpt.FormatError, match=r"SAFETENSORS.*dcp_to_torch"):
        aptckpt.convert(tmp_path / "dcp", tmp_path / "ck")

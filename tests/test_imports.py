"""``aptckpt.convert`` importing other libraries' checkpoints (``aptckpt._imports``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aptckpt
from aptckpt.testing import assert_state_equal

safetensors_torch = pytest.importorskip("safetensors.torch")


def _weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "emb.weight": torch.randn(50, 8),
        "norm.bias": torch.zeros(8, dtype=torch.bfloat16),
        "steps": torch.tensor(3, dtype=torch.int64),
    }


def _sorted(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors files keep their own order of tensors."""
    return dict(sorted(state.items()))


def test_a_torch_save_file_imports_with_ties_kept(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied
    state = {"model": model.state_dict(), "epoch": 2, "losses": [1.5, 1.25]}
    torch.save(state, tmp_path / "ckpt.pt")
    info = aptckpt.convert(tmp_path / "ckpt.pt", tmp_path / "ck")
    assert info.tensors == 1  # the tie is one tensor
    loaded = aptckpt.load(tmp_path / "ck")
    assert_state_equal(state, loaded)
    assert loaded["model"]["0.weight"] is loaded["model"]["1.weight"]
    assert aptckpt.inspect(tmp_path / "ck").metadata == {"imported_from": "torch.save"}


def test_a_torch_file_with_python_objects_is_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2), "cfg": Path("/x")}, tmp_path / "bad.pt")
    with pytest.raises(aptckpt.UnsupportedObjectError, match="weights_only"):
        aptckpt.convert(tmp_path / "bad.pt", tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_a_safetensors_file_imports_with_its_metadata(tmp_path: Path) -> None:
    weights = _weights()
    safetensors_torch.save_file(weights, tmp_path / "m.safetensors", metadata={"format": "pt"})
    aptckpt.convert(tmp_path / "m.safetensors", tmp_path / "ck", codec="none")
    assert_state_equal(_sorted(weights), _sorted(aptckpt.load(tmp_path / "ck")))
    assert aptckpt.inspect(tmp_path / "ck").metadata == {
        "imported_from": "safetensors",
        "safetensors_metadata": {"format": "pt"},
    }


def test_a_hugging_face_sharded_directory_imports(tmp_path: Path) -> None:
    weights = _weights()
    folder = tmp_path / "hf"
    folder.mkdir()
    shards = {"model-00001-of-00002.safetensors": ["emb.weight"]}
    shards["model-00002-of-00002.safetensors"] = ["norm.bias", "steps"]
    for name, keys in shards.items():
        safetensors_torch.save_file({k: weights[k] for k in keys}, folder / name)
    weight_map = {k: name for name, keys in shards.items() for k in keys}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    aptckpt.convert(folder, tmp_path / "ck", backend="torch")
    assert_state_equal(weights, aptckpt.load(tmp_path / "ck"))


def test_a_sharded_index_naming_a_file_outside_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    index = {"weight_map": {"w": "../elsewhere.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(aptckpt.FormatError):
        aptckpt.convert(folder, tmp_path / "ck")


def test_the_cli_imports(tmp_path: Path) -> None:
    safetensors_torch.save_file(_weights(), tmp_path / "m.safetensors")
    done = subprocess.run(
        [sys.executable, "-m", "aptckpt", "convert", str(tmp_path / "m.safetensors"),
         str(tmp_path / "ck")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("imported ")
    assert_state_equal(_sorted(_weights()), _sorted(aptckpt.load(tmp_path / "ck")))

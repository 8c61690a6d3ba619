"""``aptckpt._exports``: ``aptckpt.convert(src, dst, to=...)`` -- the conversion matrix
(every source format to every target, read back by the target's own library and by
aptckpt), ties, provenance, Hugging Face's layout and ``from_pretrained``, refusals."""

from __future__ import annotations

import copy
import json
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import aptckpt
from aptckpt.testing import assert_state_equal

st = pytest.importorskip("safetensors.torch")
dcp = pytest.importorskip("torch.distributed.checkpoint")

GOLDEN = Path(__file__).parent / "golden"


def _rich() -> dict[str, Any]:
    """A training state every target but safetensors holds whole (string keys: DCP's)."""
    torch.manual_seed(0)
    emb = torch.randn(11, 4)
    return {
        "model": {
            "emb.weight": emb,
            "head.weight": emb,  # tied
            "norm.bias": torch.randn(4).to(torch.bfloat16),
            "scale": torch.tensor(0.5),
            "empty": torch.empty(0, 4),
            "mask": torch.tensor([True, False, True]),
        },
        "optimizer": {
            "state": {"0": {"exp_avg": torch.randn(11, 4), "step": torch.tensor(7.0)}},
            "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "params": [0, 1]}],
        },
        "step": 7,
        "note": "run-a",
    }


def _weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {
        "a.weight": torch.randn(16, 8),
        "a.bias": torch.zeros(8, dtype=torch.float16),
        "b.weight": torch.randn(8, 8).to(torch.bfloat16),
        "b.step": torch.tensor(3, dtype=torch.int64),
    }


def _quiet(fn: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it saves in one process
        return fn()


# ------------------------------------------------------------------ sources


def _src_aptckpt(backend: str) -> Callable[[Path], tuple[Path, Any]]:
    def make(tmp: Path) -> tuple[Path, Any]:
        state = _rich()
        aptckpt.save(state, tmp / "src", backend=backend, metadata={"step": 7})
        return tmp / "src", state

    return make


def _src_torch(tmp: Path) -> tuple[Path, Any]:
    state = _rich()
    torch.save(state, tmp / "src.pt")
    return tmp / "src.pt", state


def _src_safetensors(tmp: Path) -> tuple[Path, Any]:
    st.save_file(_weights(), tmp / "src.safetensors", metadata={"format": "pt"})
    order = st.load_file(tmp / "src.safetensors")  # a file keeps tensors in its own order
    return tmp / "src.safetensors", {k: _weights()[k] for k in order}


def _src_hf(tmp: Path) -> tuple[Path, Any]:
    weights, folder = _weights(), tmp / "hf"
    folder.mkdir()
    shards = {"model-00001-of-00002.safetensors": ["a.weight", "a.bias"]}
    shards["model-00002-of-00002.safetensors"] = ["b.weight", "b.step"]
    for name, keys in shards.items():
        st.save_file({k: weights[k] for k in keys}, folder / name)
    index = {"weight_map": {k: name for name, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder, weights


def _src_dcp(tmp: Path) -> tuple[Path, Any]:
    state = _untied(_rich())  # DCP stores each name: what it holds has no ties
    _quiet(lambda: dcp.save(state, checkpoint_id=str(tmp / "dcp"), no_dist=True))
    return tmp / "dcp", state


SOURCES: dict[str, Callable[[Path], tuple[Path, Any]]] = {
    "zstd": _src_aptckpt("zstd"),
    "torch": _src_aptckpt("torch"),
    "delta": _src_aptckpt("delta"),
    "torch.save": _src_torch,
    "safetensors": _src_safetensors,
    "hf-sharded": _src_hf,
    "dcp": _src_dcp,
}


# ------------------------------------------------------------------ expectations


def _untied(state: Any) -> Any:
    """``state`` with every repeated tensor object replaced by a copy (what keeps no ties)."""
    seen: set[int] = set()

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            if id(x) in seen:
                return x.clone()
            seen.add(id(x))
            return x
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, tuple):
            return tuple(walk(v) for v in x)
        return x

    return walk(state)


def _flat_weights(state: Any) -> dict[str, torch.Tensor]:
    """What a safetensors export holds, read back with its ties: the ``model`` entry (or
    the state), dotted."""
    part = state.get("model", state)
    return dict(sorted(part.items()))


def _check_target(to: str, dst: Path, expected: Any, tmp: Path) -> None:
    if to == "checkpoint":
        assert_state_equal(expected, aptckpt.load(dst))
    elif to == "torch-file":
        assert_state_equal(expected, torch.load(dst, weights_only=True))
    elif to == "safetensors":
        weights = _flat_weights(expected)
        from_file = st.load_file(dst)
        kept = {id(t): k for k, t in reversed(list(_flat_weights(expected).items()))}
        assert sorted(from_file) == sorted(k for k, t in weights.items() if kept[id(t)] == k)
        for name, t in from_file.items():
            assert torch.equal(t, weights[name]) and t.dtype == weights[name].dtype
        aptckpt.convert(dst, tmp / "back")  # aptckpt's import ties the names again
        assert_state_equal(weights, dict(sorted(aptckpt.load(tmp / "back").items())))
    elif to == "dcp":
        untied = _untied(expected)
        aptckpt.convert(dst, tmp / "back")  # without unpickling
        assert_state_equal(untied, aptckpt.load(tmp / "back"))
        template = copy.deepcopy(untied)  # torch's own reader, into a template
        for v in _tensors(template):
            v.zero_() if v.numel() and v.dtype != torch.bool else None
        _quiet(lambda: dcp.load(template, checkpoint_id=str(dst), no_dist=True))
        assert_state_equal(untied, template)


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return []


TARGETS = {"checkpoint": "ck", "torch-file": "out.pt", "safetensors": "out.safetensors"}
TARGETS["dcp"] = "out-dcp"


@pytest.mark.parametrize("to", list(TARGETS))
@pytest.mark.parametrize("source", list(SOURCES))
def test_conversion_matrix_round_trips_bit_exact(tmp_path: Path, source: str, to: str) -> None:
    src, expected = SOURCES[source](tmp_path)
    dst = tmp_path / TARGETS[to]
    info = aptckpt.convert(src, dst, to=to)  # type: ignore[call-overload]
    assert Path(info.path) == dst
    _check_target(to, dst, expected, tmp_path)


def test_the_sharded_golden_exports(tmp_path: Path) -> None:
    """A checkpoint saved by a process group (format 4) exports whole tensors."""
    from golden.make_golden import sharded_expected

    src = GOLDEN / "v4" / "zstd"
    expected = sharded_expected()
    aptckpt.convert(src, tmp_path / "m.pt", to="torch-file", select="matrix")
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=True), expected["matrix"])
    aptckpt.convert(src, tmp_path / "m.safetensors", to="safetensors", select="matrix")
    assert torch.equal(st.load_file(tmp_path / "m.safetensors")["matrix"], expected["matrix"])
    aptckpt.convert(src, tmp_path / "t.safetensors", to="safetensors", select=("golden", "tied"))
    tied = st.load_file(tmp_path / "t.safetensors")
    assert list(tied) == ["a"] and torch.equal(tied["a"], expected["golden"]["tied"]["a"])
    # the whole golden state holds values no foreign format keeps: refused, by name
    with pytest.raises(aptckpt.UnsupportedObjectError, match="export to an aptckpt checkpoint"):
        aptckpt.convert(src, tmp_path / "g-dcp", to="dcp")
    assert not (tmp_path / "g-dcp").exists()


# ------------------------------------------------------------------ safetensors


def test_safetensors_metadata_carries_provenance(tmp_path: Path) -> None:
    aptckpt.save(_rich(), tmp_path / "ck", metadata={"step": 7, "lr": 0.1})
    aptckpt.convert(tmp_path / "ck", tmp_path / "m.safetensors", to="safetensors")
    from safetensors import safe_open

    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["head.weight"] == "emb.weight"
    assert meta["aptckpt.version"] == aptckpt.__version__
    assert meta["aptckpt.source"] == str(tmp_path / "ck")
    assert meta["aptckpt.backend"] == "zstd" and meta["aptckpt.step"] == "7"
    assert json.loads(meta["aptckpt.metadata"]) == {"step": 7, "lr": 0.1}
    digest = meta["aptckpt.manifest_sha256"]
    import hashlib

    assert digest == hashlib.sha256((tmp_path / "ck" / "manifest.msgpack").read_bytes()).hexdigest()
    assert all(isinstance(v, str) for v in meta.values())


def test_safetensors_shards_like_hugging_face(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = {f"layer.{i}.weight": torch.randn(64, 64) for i in range(5)}  # 16 KiB each
    aptckpt.save(weights, tmp_path / "ck")
    out = tmp_path / "hf"
    info = aptckpt.convert(tmp_path / "ck", out, to="safetensors", max_shard_size="40KB")
    names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert info.files == (*names, "model.safetensors.index.json")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 64 * 64 * 4
    assert [index["weight_map"][k] for k in weights] == [names[0]] * 2 + [names[1]] * 2 + [names[2]]
    aptckpt.convert(out, tmp_path / "back")  # imported back as a sharded HF directory
    assert_state_equal(weights, aptckpt.load(tmp_path / "back"))
    # again without sharding: refused without overwrite, then the old shards go
    with pytest.raises(aptckpt.CheckpointExistsError, match="overwrite"):
        aptckpt.convert(tmp_path / "ck", out, to="safetensors")
    aptckpt.convert(tmp_path / "ck", out, to="safetensors", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    with pytest.raises(aptckpt.UnsupportedPathError, match="name a directory"):
        aptckpt.convert(tmp_path / "ck", tmp_path / "x.safetensors", to="safetensors",
                        max_shard_size=1000)  # fmt: skip


def test_safetensors_refusals_name_the_value_and_the_fix(tmp_path: Path) -> None:
    aptckpt.save({"w": torch.ones(2), "c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "a")
    with pytest.raises(aptckpt.UnsupportedObjectError, match=r"'c' is a torch\.complex64 tensor"):
        aptckpt.convert(tmp_path / "a", tmp_path / "a.safetensors", to="safetensors")
    aptckpt.save({"w": torch.ones(2), "cfg": {"depth": 2}}, tmp_path / "b")
    with pytest.raises(aptckpt.UnsupportedObjectError, match=r"'cfg\.depth' is not a tensor"):
        aptckpt.convert(tmp_path / "b", tmp_path / "b.safetensors", to="safetensors")
    aptckpt.save({"a.b": torch.ones(1), "a": {"b": torch.ones(1)}}, tmp_path / "c")
    with pytest.raises(aptckpt.UnsupportedObjectError, match=r"two tensors are named 'a\.b'"):
        aptckpt.convert(tmp_path / "c", tmp_path / "c.safetensors", to="safetensors")
    base = torch.arange(10.0)
    torch.save({"all": base, "half": base[:5]}, tmp_path / "d.pt")  # overlap, not a tie
    info = aptckpt.convert(tmp_path / "d.pt", tmp_path / "d.safetensors", to="safetensors")
    assert any("overlaps 'all'" in n for n in info.notes)
    assert torch.equal(st.load_file(tmp_path / "d.safetensors")["half"], base[:5])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def _safetensors_bytes(header: dict[str, Any], data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize(
    "header",
    [
        {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}},  # past the data
        {"w": {"dtype": "F32", "shape": [8], "data_offsets": [0, 16]}},  # shape vs bytes
        {"w": {"dtype": "X99", "shape": [4], "data_offsets": [0, 16]}},
        {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
         "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},  # overlap
    ],
)  # fmt: skip
def test_a_safetensors_header_that_lies_is_refused(tmp_path: Path, header: Any) -> None:
    (tmp_path / "bad.safetensors").write_bytes(_safetensors_bytes(header, bytes(16)))
    with pytest.raises(aptckpt.FormatError, match="not a valid safetensors file"):
        aptckpt.convert(tmp_path / "bad.safetensors", tmp_path / "ck")
    with pytest.raises(aptckpt.FormatError):
        aptckpt.convert(tmp_path / "bad.safetensors", tmp_path / "o.pt", to="torch-file")
    assert not (tmp_path / "ck").exists() and not (tmp_path / "o.pt").exists()


def test_a_header_length_past_the_file_is_refused(tmp_path: Path) -> None:
    text = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", 4096) + text)
    with pytest.raises(aptckpt.FormatError):
        aptckpt.convert(tmp_path / "bad.safetensors", tmp_path / "ck")


# ------------------------------------------------------------------ DCP, torch file


def test_dcp_export_notes_what_it_cannot_keep(tmp_path: Path) -> None:
    w = torch.ones(3)
    aptckpt.save({"a": w, "b": w, "opt": {0: {"m": torch.zeros(2)}}}, tmp_path / "ck")
    info = aptckpt.convert(tmp_path / "ck", tmp_path / "d", to="dcp")
    assert info.format == "dcp" and info.tensors == 3 and ".metadata" in info.files
    assert any("DCP keeps no ties" in n for n in info.notes)
    assert any("non-string dict keys become strings" in n for n in info.notes)
    aptckpt.convert(tmp_path / "d", tmp_path / "back")
    back = aptckpt.load(tmp_path / "back")
    assert list(back["opt"]) == ["0"] and back["a"] is not back["b"]
    with pytest.raises(aptckpt.CheckpointExistsError, match="overwrite"):
        aptckpt.convert(tmp_path / "ck", tmp_path / "d", to="dcp")
    aptckpt.convert(tmp_path / "ck", tmp_path / "d", to="dcp", overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_export_arguments_are_checked(tmp_path: Path) -> None:
    aptckpt.save({"w": torch.ones(2)}, tmp_path / "ck")
    with pytest.raises(aptckpt.BackendError, match="to='checkpoint'"):
        aptckpt.convert(tmp_path / "ck", tmp_path / "o.pt", to="torch-file", level=3)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="unknown format"):
        aptckpt.convert(tmp_path / "ck", tmp_path / "o", to="onnx")  # type: ignore[call-overload]
    with pytest.raises(aptckpt.UnsupportedPathError, match="local path"):
        aptckpt.convert(tmp_path / "ck", "s3://bucket/o.pt", to="torch-file")
    with pytest.raises(ValueError, match="max_shard_size"):
        aptckpt.convert(tmp_path / "ck", tmp_path / "o.pt", to="torch-file", max_shard_size=10)
    with pytest.raises(KeyError, match="no 'nope'"):
        aptckpt.convert(tmp_path / "ck", tmp_path / "o.pt", to="torch-file", select="nope")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


# ------------------------------------------------------------------ Hugging Face


@pytest.mark.core_independent  # HF's loader, above the API; the export's reads run in both
def test_a_gpt2_exported_to_safetensors_loads_with_from_pretrained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=101, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    aptckpt.save({"model": model.state_dict(), "step": 3}, tmp_path / "ck")
    out = tmp_path / "hf"
    model.config.save_pretrained(out)  # config.json: the directory exists already
    info = aptckpt.convert(tmp_path / "ck", out, to="safetensors")
    assert info.files == ("model.safetensors",)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    ids = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    assert "lm_head.weight" not in st.load_file(out / "model.safetensors")  # HF's choice

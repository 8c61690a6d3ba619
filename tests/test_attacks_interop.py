"""Adversarial tests of issue 15's interop (imports, exports), lazy reads, run history,
plots, ``ls --json`` and progress: each one a promise that broke (now kept) or one that held
under a hostile input."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import aptckpt

# ------------------------------------------------------------------ lazy reads


def test_open_get_a_top_level_key_that_starts_with_state(tmp_path: Path) -> None:
    """Lightning's checkpoints keep the weights under "state_dict": a top-level key, not a
    key path, even though it starts with "state"."""
    state = {"state_dict": {"w": torch.arange(10.0)}, "states": torch.ones(3), "state": 1}
    aptckpt.save(state, tmp_path / "c")
    with aptckpt.open(tmp_path / "c") as view:
        assert torch.equal(view.get("state_dict")["w"], state["state_dict"]["w"])
        assert torch.equal(view.get("states"), state["states"])
        assert torch.equal(view.get_slice("states")[1:], torch.ones(2))
        assert torch.equal(view.get("state['state_dict']['w']"), state["state_dict"]["w"])
        assert "state_dict" in view and "state_dic" not in view
    loaded = aptckpt.load(tmp_path / "c", keys=["state_dict"])
    assert torch.equal(next(iter(loaded.values()))["w"], state["state_dict"]["w"])


# ------------------------------------------------------------------ run history


def test_history_survives_a_line_with_a_huge_int_or_deep_nesting(tmp_path: Path) -> None:
    with aptckpt.CheckpointManager(tmp_path / "run") as mgr:
        mgr.log_metrics(1, loss=1.0)
    folder = tmp_path / "run" / "history"
    (folder / "000099.jsonl").write_text(
        '{"step": 2, "time": 1.0, "metrics": {"x": 1' + "0" * 400 + ', "y": 2}}\n'
        '{"event": "save", "path": "p", "step": 2, "backend": "zstd", "bytes_written": 1, '
        '"blocked_s": 1'
        + "0" * 400
        + ', "save_s": 1, "blocking": false, "time": 1}\n'
        + "[" * 100_000
        + "\n"
    )
    history = aptckpt.CheckpointManager(tmp_path / "run", read_only=True).history()
    assert [p.step for p in history.points] == [1, 2]
    assert history.points[1].metrics == {"y": 2.0}
    assert history.saves == () and history.skipped == 2


@pytest.mark.parametrize(
    "value", [10**400, torch.ones(3), "1.0", None], ids=["huge-int", "3-elements", "str", "none"]
)
def test_log_metrics_refuses_what_is_not_one_float_with_a_type_error(
    tmp_path: Path, value: Any
) -> None:
    with (
        aptckpt.CheckpointManager(tmp_path / "run") as mgr,
        pytest.raises(TypeError, match="metric 'loss'"),
    ):
        mgr.log_metrics(1, loss=value)


# ------------------------------------------------------------------ exports


def test_a_tie_named_format_does_not_replace_the_format_entry(tmp_path: Path) -> None:
    from safetensors import safe_open

    t = torch.randn(4)
    aptckpt.save({"model": {"embed": t, "format": t}}, tmp_path / "c")
    info = aptckpt.convert(tmp_path / "c", tmp_path / "o.safetensors", to="safetensors")
    with safe_open(str(tmp_path / "o.safetensors"), "pt") as f:
        meta = f.metadata()
        assert meta["format"] == "pt"  # from_pretrained requires it
        assert sorted(f.keys()) == ["embed", "format"]
    assert any("copy" in note for note in info.notes)
    aptckpt.convert(tmp_path / "o.safetensors", tmp_path / "back")
    back = aptckpt.load(tmp_path / "back")
    assert torch.equal(back["format"], t) and torch.equal(back["embed"], t)


def test_a_tensor_named_like_a_metadata_value_is_not_tied_on_import(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"pt": torch.ones(2)}, str(tmp_path / "m.safetensors"), metadata={"format": "pt"})
    aptckpt.convert(tmp_path / "m.safetensors", tmp_path / "ck")
    assert list(aptckpt.load(tmp_path / "ck")) == ["pt"]


def test_a_sharded_export_refused_midway_leaves_nothing(tmp_path: Path) -> None:
    """A dtype safetensors cannot store in the second shard: no first shard left behind
    (it would make the retry fail with 'holds a model export already')."""
    bad = torch.zeros(100, dtype=torch.uint8).view(torch.bits8)
    aptckpt.save({"model": {"a": torch.randn(100), "b": bad}}, tmp_path / "c", backend="torch")
    with pytest.raises(aptckpt.errors.UnsupportedObjectError, match="bits8 of 'b'"):
        aptckpt.convert(tmp_path / "c", tmp_path / "out", to="safetensors", max_shard_size=100)
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_a_dcp_export_says_it_drops_empty_dicts(tmp_path: Path) -> None:
    """An optimizer before its first step has state {}: DCP stores no empty dict."""
    state = {"a": torch.ones(2), "opt": {"state": {}, "param_groups": [{"lr": 0.1}]}}
    aptckpt.save(state, tmp_path / "c")
    info = aptckpt.convert(tmp_path / "c", tmp_path / "dcp", to="dcp")
    assert any("'opt.state'" in note for note in info.notes)


# ------------------------------------------------------------------ DCP imports


def _dcp_dir(folder: Path, shape: tuple[int, ...], chunks: list[tuple[tuple[int, ...], Any]]):
    """A DCP directory of one tensor 'w' of ``shape`` made of ``(offsets, tensor)`` chunks,
    as DCP's classes pickle it (the items torch.save'd into one data file)."""
    import io
    import pickle

    from torch.distributed.checkpoint import metadata as md
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    folder.mkdir()
    data = bytearray()
    storage = {}
    boxes = []
    for offsets, part in chunks:
        buffer = io.BytesIO()
        torch.save(part, buffer)
        item = buffer.getvalue()
        key = md.MetadataIndex("w", torch.Size(offsets))
        storage[key] = _StorageInfo("__0_0.distcp", len(data), len(item))
        data += item
        boxes.append(md.ChunkStorageMetadata(torch.Size(offsets), torch.Size(part.shape)))
    props = md.TensorProperties(dtype=torch.float32)
    described = {"w": md.TensorStorageMetadata(props, torch.Size(shape), boxes)}
    meta = md.Metadata(state_dict_metadata=described, storage_data=storage)
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    (folder / "__0_0.distcp").write_bytes(bytes(data))
    return folder


def test_dcp_chunks_assemble_and_an_overlap_by_one_element_is_refused(tmp_path: Path) -> None:
    w = torch.arange(24.0).reshape(6, 4)
    good = _dcp_dir(tmp_path / "good", (6, 4), [((0, 0), w[:3]), ((3, 0), w[3:])])
    aptckpt.convert(good, tmp_path / "ck")
    assert torch.equal(aptckpt.load(tmp_path / "ck")["w"], w)
    # same total volume, one row overlapping and one row missing
    bad = _dcp_dir(tmp_path / "bad", (6, 4), [((0, 0), w[:3]), ((2, 0), w[2:5])])
    with pytest.raises(aptckpt.FormatError, match="overlap"):
        aptckpt.convert(bad, tmp_path / "ck2")
    # columns: overlapping by one element only
    cols = [((0, 0), w[:, :2]), ((0, 1), w[:, 1:3]), ((5, 3), w[5:, 3:]), ((0, 3), w[:4, 3:])]
    bad2 = _dcp_dir(tmp_path / "bad2", (6, 4), cols)
    with pytest.raises(aptckpt.FormatError, match="overlap"):
        aptckpt.convert(bad2, tmp_path / "ck3")
    assert not (tmp_path / "ck2").exists() and not (tmp_path / "ck3").exists()


def test_many_dcp_chunks_are_checked_in_linear_time(tmp_path: Path) -> None:
    """A tensor of thousands of chunks (a large world, or a 1 MB hostile .metadata) was
    checked pairwise before anything else: minutes for 8000 chunks."""
    import pickle
    import time

    from torch.distributed.checkpoint import metadata as md
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    n = 8000
    folder = tmp_path / "dcp"
    folder.mkdir()
    boxes = [md.ChunkStorageMetadata(torch.Size([i]), torch.Size([1])) for i in range(n)]
    props = md.TensorProperties(dtype=torch.float32)
    meta = md.Metadata(
        state_dict_metadata={"w": md.TensorStorageMetadata(props, torch.Size([n]), boxes)},
        storage_data={
            md.MetadataIndex("w", torch.Size([i])): _StorageInfo("__0_0.distcp", 0, 1)
            for i in range(n)
        },
    )
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    (folder / "__0_0.distcp").write_bytes(b"x")
    start = time.perf_counter()
    with pytest.raises(aptckpt.FormatError, match="more than its items hold"):
        aptckpt.convert(folder, tmp_path / "ck")
    assert time.perf_counter() - start < 20
    w = torch.arange(300.0)  # and many real chunks assemble
    good = _dcp_dir(tmp_path / "good", (300,), [((i,), w[i : i + 1].clone()) for i in range(300)])
    aptckpt.convert(good, tmp_path / "ck")
    assert torch.equal(aptckpt.load(tmp_path / "ck")["w"], w)


# ------------------------------------------------------------------ progress


def test_a_remote_read_does_not_fetch_ahead_what_large_reads_fetch_again(
    memory_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small chunk read through a window fetched the next windows ahead, over chunks too
    large for windows that were then fetched again by their own reads (chunks of half a
    part or more: ``chunk_size=16 MiB`` with the default 16 MiB parts, or as here)."""
    from aptckpt.storage.remote import FsspecStorage
    from aptckpt.storage.remote._reader import RemoteDataFiles

    real_init = FsspecStorage.__init__

    def small_parts(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["part_size"] = 1 << 20
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(FsspecStorage, "__init__", small_parts)
    torch.manual_seed(0)
    state = {"small": torch.zeros(1000), "big": torch.randn(1_500_000)}
    url = f"{memory_url}/ck"
    aptckpt.save(state, url, chunk_size=2 << 20)
    stored = aptckpt.inspect(url).stored_bytes
    fetched = []
    real = RemoteDataFiles._get

    def counted(self: Any, file: int, start: int, end: int) -> bytes:
        data = real(self, file, start, end)
        fetched.append(len(data))
        return data

    monkeypatch.setattr(RemoteDataFiles, "_get", counted)
    for call in (aptckpt.verify, aptckpt.load):
        fetched.clear()
        call(url)
        assert sum(fetched) <= stored * 1.02, (call.__name__, sum(fetched), stored)
    with aptckpt.open(url) as view:  # a slice still costs its own chunks only
        fetched.clear()
        assert torch.equal(view.get_slice("big")[10:20], state["big"][10:20])
        assert sum(fetched) <= (2 << 20)


# ------------------------------------------------------------------ plot


def test_the_moving_average_recovers_after_a_huge_finite_spike() -> None:
    """A loss spike of 1e20 (finite: not yet inf) made every later mean 0 (a running sum
    minus what left the window cancels the small values), and two of 1e308 made them NaN."""
    pytest.importorskip("matplotlib")
    import math

    from aptckpt.cli._plot import _smooth

    assert _smooth([1e20] + [1.0] * 30, 5)[-20:] == [1.0] * 20
    assert _smooth([1e308, 1e308] + [2.0] * 30, 5)[-20:] == [2.0] * 20
    values = [1.0, math.nan, 3.0, math.inf, 5.0, 7.0]
    assert _smooth(values, 2) == [1.0, 1.0, 3.0, 3.0, 5.0, 6.0]


def test_plot_to_a_directory_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    from aptckpt.cli import main

    with aptckpt.CheckpointManager(tmp_path / "run") as mgr:
        mgr.log_metrics(1, loss=1.0)
    (tmp_path / "out.png").mkdir()
    assert main(["plot", str(tmp_path / "run"), "-o", str(tmp_path / "out.png")]) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and ".out.png." not in err  # names -o, not a temp file
    assert os.listdir(tmp_path / "out.png") == []
    assert sorted(os.listdir(tmp_path)) == ["out.png", "run"]


# ------------------------------------------------------------------ held: history on S3


def test_history_on_s3_from_two_writers_keeps_every_line(
    s3_url: str, s3_options: dict[str, Any]
) -> None:
    """Two history writers of one run (a manager re-created while the first still holds
    lines) number their segments from the same listing: neither replaces the other's."""
    from aptckpt import _history, _rundir

    run = _rundir.Run.at(s3_url, s3_options)
    first, second = _history.HistoryWriter(run), _history.HistoryWriter(run)
    first.log_metrics(1, {"loss": 1.0})
    second.log_metrics(2, {"loss": 2.0})
    first.flush()
    second.flush()  # its number was taken: the next free one
    first.log_metrics(3, {"loss": float("nan")})
    first.flush()
    history = _history.read(run)
    assert [p.step for p in history.points] == [1, 2, 3]
    assert history.skipped == 0


@pytest.mark.parametrize("to", ["dcp", "safetensors", "torch-file"])
def test_an_export_onto_its_source_or_its_run_is_refused(tmp_path: Path, to: str) -> None:
    """``convert(ck, ck, to="dcp", overwrite=True)`` replaced the checkpoint by the export,
    and a destination holding the source (the run directory) was deleted with it."""
    run = tmp_path / "run"
    with aptckpt.CheckpointManager(run, keep=aptckpt.KeepAll()) as mgr:
        mgr.save(1, {"model": {"w": torch.ones(3)}})
        mgr.save(2, {"model": {"w": torch.zeros(3)}})
    src = next((run / "checkpoints").iterdir())
    for dst in (src, run, src / "export", tmp_path):
        with pytest.raises(aptckpt.CheckpointExistsError, match="being exported"):
            aptckpt.convert(src, dst, to=to, overwrite=True)
    assert len(aptckpt.CheckpointManager(run, read_only=True).checkpoints()) == 2
    assert sorted(os.listdir(src)) == ["manifest.msgpack", "shard-00000.bin"]
    aptckpt.verify(src)


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _unicode(text: str) -> bytes:
    data = text.encode()
    return b"X" + len(data).to_bytes(4, "little") + data


_EVIL = {
    "dotted-attribute": _global("torch.distributed.checkpoint.metadata", "os.system")
    + b"("
    + _unicode("touch PWNED")
    + b"tR.",
    "eval-by-other-path": _global("builtins", "eval") + b"(" + _unicode("1") + b"tR.",
    "torch-attribute": _global("torch", "load") + b"(" + _unicode("x") + b"tR.",
    "torch-module": _global("torch", "os.system") + b"(" + _unicode("touch PWNED") + b"tR.",
    "persistent-id": b"\x80\x02P" + b"0\n" + b".",
    "stack-global-p5": b"\x80\x05"
    + _unicode("os")
    + _unicode("system")
    + b"\x93"
    + b"("
    + _unicode("touch PWNED")
    + b"tR.",
    "build-class-dict": b"\x80\x02"
    + _global("torch.distributed.checkpoint.metadata", "Metadata")
    + b"N}"
    + _unicode("get")
    + _global("collections", "OrderedDict")
    + b"s\x86b.",
    "build-function-defaults": b"\x80\x02"
    + _global("torch", "Size")
    + b"N}"
    + _unicode("__defaults__")
    + b"("
    + _unicode("x")
    + b"ts\x86b.",
    "call-a-record": _global("torch.distributed.checkpoint.metadata", "Metadata") + b"(tR.",
}


@pytest.mark.parametrize("payload", list(_EVIL.values()), ids=list(_EVIL))
def test_hostile_dcp_metadata_pickles_are_refused_unrun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, payload: bytes
) -> None:
    import warnings

    dcp = pytest.importorskip("torch.distributed.checkpoint")
    good = tmp_path / "good"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(3)}, checkpoint_id=str(good), no_dist=True)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "__0_0.distcp").write_bytes((good / "__0_0.distcp").read_bytes())
    (bad / ".metadata").write_bytes(payload)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(aptckpt.FormatError):
        aptckpt.convert(bad, tmp_path / "ck")
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "ck").exists()
    aptckpt.convert(good, tmp_path / "ck2")  # and nothing of the importer was changed
    assert torch.equal(aptckpt.load(tmp_path / "ck2")["w"], torch.ones(3))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--to", "safetensors", "--max-shard-size", "abc"], "--max-shard-size: .*'abc'"),
        (["--to", "safetensors", "--max-shard-size", "0"], "at least 1 byte"),
        (["--to", "dcp", "--max-shard-size", "1KB"], "applies to --to safetensors"),
        (["--to", "safetensors", "--select", "nope"], "--select: .*'nope'"),
    ],
)
def test_cli_convert_bad_export_arguments_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    """They escaped as ValueError/KeyError tracebacks."""
    from aptckpt.cli import main

    aptckpt.save({"model": {"w": torch.ones(3)}}, tmp_path / "ck")
    import re

    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aptckpt convert: error:") and re.search(message, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("shard", [["x"], None, 5, {"a": 1}])
def test_an_hf_index_naming_a_shard_that_is_not_a_name_is_a_format_error(
    tmp_path: Path, shard: Any
) -> None:
    """A list value escaped as "TypeError: unhashable type", mixed types as a TypeError of
    sorted()."""
    from safetensors.torch import save_file

    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"a": torch.ones(2)}, str(folder / "model.safetensors"))
    weight_map = {"a": "model.safetensors", "b": shard}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(aptckpt.FormatError, match="weight_map names a shard"):
        aptckpt.convert(folder, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_a_sharded_export_overwritten_and_interrupted_never_leaves_a_lying_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Overwriting a sharded export replaces its shards one by one under the same names:
    the old index, still there, named tensors the new shards no longer hold."""
    from safetensors import safe_open

    from aptckpt import _exports

    def ck(name: str, sizes: list[int]) -> Path:
        state = {"model": {f"t{i}": torch.full((n,), float(i)) for i, n in enumerate(sizes)}}
        aptckpt.save(state, tmp_path / name)
        return tmp_path / name

    out = tmp_path / "out"
    aptckpt.convert(ck("one", [10, 10, 40]), out, to="safetensors", max_shard_size=100)
    real = _exports.publish_file
    calls = []

    def crash_on_the_second(dst: Path, write: Any, *, overwrite: bool) -> int:
        calls.append(dst.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(dst, write, overwrite=overwrite)

    monkeypatch.setattr(_exports, "publish_file", crash_on_the_second)
    with pytest.raises(OSError, match="No space"):
        aptckpt.convert(
            ck("two", [40, 10, 10]), out, to="safetensors", max_shard_size=100, overwrite=True
        )
    index = out / "model.safetensors.index.json"
    if index.exists():  # whatever the index names, its shard holds
        for name, shard in json.loads(index.read_text())["weight_map"].items():
            with safe_open(str(out / shard), "pt") as f:
                assert name in list(f.keys()), (name, shard)


def test_a_remote_slice_verifies_only_its_chunks(memory_url: str) -> None:
    """Held: damage in one chunk of an object fails the slices over it, not the others."""
    import fsspec

    w = torch.arange(4096.0)
    url = f"{memory_url}/ck"
    aptckpt.save({"w": w}, url, codec="none", chunk_size=1024)
    fs = fsspec.filesystem("memory")
    (shard,) = [p for p in fs.find(url.removeprefix("memory://")) if "shard" in p]
    data = bytearray(fs.cat(shard))
    data[-100] ^= 0xFF  # the last chunk
    fs.pipe(shard, bytes(data))
    with aptckpt.open(url) as view:
        assert torch.equal(view.get_slice("w")[:256], w[:256])
        assert torch.equal(view.get_slice("w")[3000:3840], w[3000:3840])
        with pytest.raises(aptckpt.IntegrityError):
            view.get_slice("w")[-1:]
    with aptckpt.open(url, verify=False) as view:
        assert view.get_slice("w")[-1:].shape == (1,)


@pytest.mark.parametrize(
    "value",
    [frozenset([1, 2]), __import__("collections").defaultdict(int, a=1)],
    ids=["frozenset", "defaultdict"],
)
def test_a_torch_file_export_notes_values_it_stores_in_another_form(
    tmp_path: Path, value: Any
) -> None:
    """The torch backend stores these in torch.load's form and its manifest restores them;
    an exported file has no manifest: they came back as tuple/dict with no note."""
    aptckpt.save({"v": value, "w": torch.ones(1)}, tmp_path / "ck")
    info = aptckpt.convert(tmp_path / "ck", tmp_path / "out.pt", to="torch-file")
    got = torch.load(tmp_path / "out.pt", weights_only=True)["v"]
    assert type(got) is not type(value)
    assert any("form torch.load" in note for note in info.notes)
    plain = aptckpt.convert(tmp_path / "ck", tmp_path / "plain.pt", to="torch-file", select="w")
    assert plain.notes == ()


def test_a_metric_named_step_can_be_logged(tmp_path: Path) -> None:
    """Trainers' log dicts may hold "step" (or "self"): ``log_metrics(10, **logs)`` raised
    "got multiple values for argument 'step'"."""
    with aptckpt.CheckpointManager(tmp_path / "run") as mgr:
        mgr.log_metrics(10, **{"step": 10.0, "self": 1.0, "loss": 0.5})
    (point,) = aptckpt.CheckpointManager(tmp_path / "run", read_only=True).history().points
    assert point.step == 10 and point.metrics == {"step": 10.0, "self": 1.0, "loss": 0.5}


def test_an_hf_import_reads_each_tensor_from_the_shard_its_index_names(tmp_path: Path) -> None:
    """A name held by two shards came from the shard sorting last, not the one the index
    gives it (which is the one Hugging Face reads)."""
    from safetensors.torch import save_file

    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"x": torch.ones(2)}, str(folder / "model-00001-of-00002.safetensors"))
    save_file(
        {"x": torch.zeros(2), "y": torch.ones(1)},
        str(folder / "model-00002-of-00002.safetensors"),
    )
    weight_map = {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    aptckpt.convert(folder, tmp_path / "ck")
    assert torch.equal(aptckpt.load(tmp_path / "ck")["x"], torch.ones(2))


def test_a_dcp_export_of_keys_that_join_alike_is_refused_by_name(tmp_path: Path) -> None:
    """``{"a.b": t, "a": {"b": t2}}``: DCP's names collide; torch's ValueError escaped."""
    aptckpt.save({"a.b": torch.ones(2), "a": {"b": torch.zeros(2)}}, tmp_path / "ck")
    with pytest.raises(aptckpt.UnsupportedObjectError, match=r"two values are named 'a\.b'"):
        aptckpt.convert(tmp_path / "ck", tmp_path / "dcp", to="dcp")
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_a_dcp_export_failing_to_write_raises_an_exception_not_a_base_exception(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DCP wraps failures in CheckpointException, a BaseException: it went past every
    ``except Exception`` (the CLI printed a traceback). The cause is raised instead."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    from aptckpt.cli import main

    def full(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", full)
    aptckpt.save({"w": torch.ones(2)}, tmp_path / "ck")
    with pytest.raises(OSError, match="No space"):
        aptckpt.convert(tmp_path / "ck", tmp_path / "dcp", to="dcp")
    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "dcp"), "--to", "dcp"]) != 0
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_plot_text_with_dollars_is_plain_text(tmp_path: Path) -> None:
    r"""A metric name, run path or title holding ``$...$`` was parsed as matplotlib math:
    ``$\bar{x$`` raised a ValueError traceback."""
    pytest.importorskip("matplotlib")
    from aptckpt.cli import main

    run = tmp_path / "run_$\\foo$"
    name = "loss_$\\bar{x$"
    with aptckpt.CheckpointManager(run) as mgr:
        mgr.log_metrics(1, **{name: 1.0})
        mgr.save(2, {"w": torch.ones(1)}, metrics={name: 0.5})
    out = tmp_path / "p.svg"
    assert main(["plot", str(run), "-o", str(out), "--title", "$\\nope$"]) == 0
    assert out.stat().st_size > 0

"""The edges of what a state may hold (format v3), found by an outside attack: values the
torch backend must never commit unloadable, non-contiguous sources written during a
blocking save, into= with overlapping or unwritable destinations, hostile composite nodes,
the CLI on every kind of value, map_location="meta", nested keys, lone surrogates, numpy
subclasses and broadcast arrays."""

from __future__ import annotations

import collections
import contextlib
import io
import os
import subprocess
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch

import aptckpt
from aptckpt import manifest as mf
from aptckpt.cli import main as cli_main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BACKENDS = [("zstd", {}), ("zstd", {"codec": "none"}), ("torch", {}), ("delta", {})]
_IDS = ["zstd", "zstd-raw", "torch", "delta"]
SRC = str(Path(aptckpt.__file__).resolve().parents[1])


def _quantized() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(torch.randn(4, 3), 0.1, 3, torch.quint8)


def _rewrite_tree(path: Path, edit: Any) -> None:
    """Apply ``edit`` to the manifest document and reseal its checksum (a hostile manifest)."""
    manifest = path / mf.MANIFEST_NAME
    doc = msgpack.unpackb(manifest.read_bytes(), raw=False)
    edit(doc)
    manifest.write_bytes(mf.pack_document(doc))


def _find(node: Any, tag: str) -> Any:
    if isinstance(node, list):
        if node and node[0] == tag:
            return node
        for child in node:
            found = _find(child, tag)
            if found is not None:
                return found
    return None


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the command line in this process (a crash of it would end the test run)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_main(list(args))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return subprocess.CompletedProcess(["aptckpt", *args], code, out.getvalue(), err.getvalue())


# ------------------------------------------------ the torch backend: saved, never loadable


def test_torch_backend_sparse_tensor_with_requires_grad_loads_back(tmp_path):
    # torch.save/torch.load drop requires_grad of a plain sparse tensor; the load then
    # compares skeletons and calls the intact file "modified after saving".
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.tensor([1.0, 2.0]), (3,))
    aptckpt.save({"s": sparse.requires_grad_()}, tmp_path / "c", backend="torch")
    loaded = aptckpt.load(tmp_path / "c")["s"]
    assert loaded.requires_grad
    assert torch.equal(loaded.detach().to_dense(), sparse.detach().to_dense())


@pytest.mark.parametrize(
    "state",
    [
        pytest.param({"b": np.bytes_(b"")}, id="empty-numpy-bytes-scalar"),
        pytest.param("odict-metadata", id="empty-bytes-in-OrderedDict-_metadata"),
    ],
)
def test_torch_backend_never_commits_a_file_torch_load_refuses(tmp_path, state):
    # Empty bytes are refused up front (weights_only cannot read b""), but the check misses
    # np.bytes_(b"") (its torch form is b"") and OrderedDict._metadata (not walked).
    if state == "odict-metadata":
        state = collections.OrderedDict(w=torch.ones(1))
        state._metadata = {"": b""}  # type: ignore[attr-defined]
    try:
        aptckpt.save(state, tmp_path / "c", backend="torch")
    except aptckpt.UnsupportedObjectError:
        return  # refused before anything was committed: fine
    aptckpt.load(tmp_path / "c")  # committed: it must load


# ------------------------------------------- StateChangedError and non-contiguous sources


def _race(make_source: Any, backend: str, tmp_path: Path, trials: int = 3) -> list[str]:
    """Save make_source(base) while another thread keeps filling ``base``; a save that
    commits must hold one state (all elements equal), else it must raise StateChangedError."""
    torn = []
    for trial in range(trials):
        base = torch.zeros(2048, 2048)
        source = make_source(base)
        stop = threading.Event()

        def writer(base: torch.Tensor = base, stop: threading.Event = stop) -> None:
            k = 0
            while not stop.is_set():
                k += 1
                base.fill_(float(k))

        thread = threading.Thread(target=writer)
        thread.start()
        time.sleep(0.02)
        path = tmp_path / f"{backend}-{trial}"
        try:
            aptckpt.save({"w": source}, path, backend=backend)
        except aptckpt.StateChangedError:
            continue
        finally:
            stop.set()
            thread.join()
        loaded = aptckpt.load(path)["w"]
        values = np.unique(np.asarray(loaded))
        if values.size > 1:
            torn.append(f"trial {trial}: committed a mix of {values.size} states")
    return torn


@pytest.mark.parametrize("backend", ["zstd", "delta"])
@pytest.mark.parametrize(
    "make_source",
    [
        pytest.param(lambda b: b.t(), id="transposed"),
        pytest.param(lambda b: b[::2], id="strided-rows"),
        pytest.param(lambda b: b[:, :1].expand(2048, 64), id="expanded-noncontiguous-base"),
        pytest.param(lambda b: b.numpy().T, id="numpy-F-order"),
        pytest.param(lambda b: b.numpy()[::-1], id="numpy-negative-stride"),
    ],
)
def test_blocking_save_of_a_non_contiguous_source_written_meanwhile_never_commits_a_mix(
    tmp_path, backend, make_source
):
    # Contiguous sources are re-hashed after the write (StateChangedError); a non-contiguous
    # one is copied (host_tensor, np.ascontiguousarray) without any check, so a concurrent
    # writer's half-done update is committed and verifies as intact.
    assert _race(make_source, backend, tmp_path) == []


# ---------------------------------------------------------------------------- into=


def test_load_into_overlapping_destinations_last_saved_wins(tmp_path):
    # _overlapping compares neighbours only: c (base[30:40]) overlaps a (base) but is not a
    # neighbour of it in the sorted spans, so it is decoded directly and a's later copy_
    # overwrites it, although c comes last in the checkpoint.
    aptckpt.save(
        {"a": torch.arange(100.0), "b": torch.full((10,), -1.0), "c": torch.full((10,), -2.0)},
        tmp_path / "c",
    )
    base = torch.zeros(100)
    aptckpt.load(tmp_path / "c", into={"a": base, "b": base[10:20], "c": base[30:40]})
    expected = torch.arange(100.0)
    expected[10:20] = -1.0
    expected[30:40] = -2.0
    assert torch.equal(base, expected)


@pytest.mark.parametrize(
    "make_destination",
    [
        pytest.param(lambda: torch.zeros(3).expand(4, 3), id="stride-0"),
        pytest.param(lambda: _inference_tensor().t(), id="inference-tensor-non-contiguous"),
    ],
)
def test_load_into_a_destination_that_cannot_be_written_is_an_into_mismatch(
    tmp_path, make_destination
):
    aptckpt.save({"a": torch.randn(4, 3)}, tmp_path / "c")
    with pytest.raises(aptckpt.IntoMismatchError):
        aptckpt.load(tmp_path / "c", into={"a": make_destination()})


def _inference_tensor() -> torch.Tensor:
    with torch.inference_mode():
        return torch.zeros(3, 4)


# ------------------------------------------------------------------ hostile manifests


def _set_defaultdict_factory(doc: Any) -> None:
    _find(doc["tree"], "defaultdict")[2] = ["list"]


def _set_sparse_layout(doc: Any) -> None:
    _find(doc["tree"], "sparse")[2]["layout"] = ["coo"]


def _set_quantized_scheme(doc: Any) -> None:
    _find(doc["tree"], "quantized")[2]["qscheme"] = {"a": 1}


def _sparse() -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.tensor([1.0, 2.0]), (3,))


@pytest.mark.parametrize(
    ("state", "edit"),
    [
        pytest.param(
            {"d": collections.defaultdict(list, {"a": [1]})},
            _set_defaultdict_factory,
            id="defaultdict-factory-unhashable",
        ),
        pytest.param({"s": "sparse"}, _set_sparse_layout, id="sparse-layout-unhashable"),
        pytest.param({"q": "quantized"}, _set_quantized_scheme, id="quantized-scheme-unhashable"),
    ],
)
@pytest.mark.parametrize(("backend", "options"), BACKENDS, ids=_IDS)
def test_hostile_unhashable_composite_meta_is_a_format_error_everywhere(
    tmp_path, state, edit, backend, options
):
    state = {
        k: _sparse() if v == "sparse" else _quantized() if v == "quantized" else v
        for k, v in state.items()
    }
    path = tmp_path / "c"
    aptckpt.save(state, path, backend=backend, **options)
    _rewrite_tree(path, edit)
    for call in (
        lambda: aptckpt.load(path),
        lambda: aptckpt.load(path, verify=False),
        lambda: aptckpt.verify(path),
        lambda: aptckpt.load(path, into={}, strict=False),
    ):
        with pytest.raises(aptckpt.AptckptError):
            call()
    # inspect reads no tensor and rebuilds nothing: it may summarise the manifest, but a
    # hostile node must never crash it with another exception
    with contextlib.suppress(aptckpt.AptckptError):
        aptckpt.inspect(path)


# --------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("quantized", id="quantized"),
        pytest.param("sparse", id="sparse-coo"),
        pytest.param("csr", id="sparse-csr"),
        pytest.param("ndarray", id="numpy-array"),
    ],
)
def test_cli_diff_of_identical_v3_checkpoints_says_identical(tmp_path, value):
    # quantized: segfault (a uint8 view of a quantized tensor); sparse: RuntimeError from
    # .contiguous(); ndarray: "truth value of an array is ambiguous". Each as a traceback
    # with exit status 1 ("they differ") or -11.
    made = {
        "quantized": _quantized,
        "sparse": _sparse,
        "csr": lambda: torch.eye(3).to_sparse_csr(),
        "ndarray": lambda: np.arange(4.0),
    }[value]()
    for name in ("a", "b"):
        aptckpt.save({"v": made, "w": torch.ones(2)}, tmp_path / name)
    result = _cli("diff", str(tmp_path / "a"), str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr[-500:]
    assert "Traceback" not in result.stderr


def test_cli_diff_of_identical_numpy_nan_scalars_says_identical(tmp_path):
    for name in ("a", "b"):
        aptckpt.save({"loss": np.float32("nan")}, tmp_path / name)
    result = _cli("diff", str(tmp_path / "a"), str(tmp_path / "b"))
    assert result.returncode == 0, result.stdout


def test_cli_convert_to_safetensors_refuses_sparse_tensors_cleanly(tmp_path):
    aptckpt.save({"s": _sparse(), "w": torch.ones(2)}, tmp_path / "c")
    result = _cli("convert", str(tmp_path / "c"), str(tmp_path / "out.st"), "--to", "safetensors")
    assert result.returncode == 2, result.stderr[-500:]
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------- values and loads


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("sparse", id="sparse"),
        pytest.param("ndarray", id="numpy-array"),
        pytest.param("bytes", id="large-bytes"),
        pytest.param("quantized", id="quantized"),
    ],
)
def test_map_location_meta_does_not_call_a_healthy_checkpoint_malformed(tmp_path, value):
    made = {
        "sparse": _sparse,
        "ndarray": lambda: np.arange(4.0),
        "bytes": lambda: os.urandom(70_000),
        "quantized": _quantized,
    }[value]()
    aptckpt.save({"v": made}, tmp_path / "c")
    try:
        aptckpt.load(tmp_path / "c", map_location="meta")
    except aptckpt.FormatError as err:
        pytest.fail(f"a healthy checkpoint reported as malformed: {err}")
    except aptckpt.AptckptError:
        pass  # a clear refusal of meta for this value is fine


@pytest.mark.parametrize(
    "state",
    [
        pytest.param({((1, 2), 3): 1}, id="tuple-of-tuple-dict-key"),
        pytest.param(collections.Counter({(("a", "b"), "c"): 3}), id="counter-of-nested-tuples"),
        pytest.param({"s": {((1, 2), 3)}}, id="set-of-nested-tuples"),
        pytest.param({(frozenset({1}),): 2}, id="tuple-key-holding-a-frozenset"),
    ],
)
def test_nested_tuple_keys_and_set_members_round_trip(tmp_path, state):
    # Keys are flattened at depth MAX_NESTING - 1, so any container inside a tuple key is
    # refused as "nesting deeper than 200 levels".
    aptckpt.save(state, tmp_path / "c")
    assert aptckpt.load(tmp_path / "c") == state


@pytest.mark.parametrize(("backend", "options"), BACKENDS, ids=_IDS)
@pytest.mark.parametrize(
    "state",
    [
        pytest.param({"s": "a\ud800b"}, id="small-str"),
        pytest.param({"s": "\ud800" * 70_000}, id="large-str"),
        pytest.param({"\udc80": 1}, id="dict-key"),
        pytest.param({"s": np.str_("\udc80")}, id="numpy-str"),
    ],
)
def test_lone_surrogates_are_an_unsupported_object_error(tmp_path, state, backend, options):
    with pytest.raises(aptckpt.UnsupportedObjectError):
        aptckpt.save(state, tmp_path / "c", backend=backend, **options)


def test_masked_numpy_array_is_refused_not_stored_without_its_mask(tmp_path):
    masked = np.ma.masked_array([1.0, 2.0, 3.0], mask=[0, 1, 0])
    try:
        aptckpt.save({"m": masked}, tmp_path / "c")
    except aptckpt.UnsupportedObjectError:
        return
    loaded = aptckpt.load(tmp_path / "c")["m"]
    assert isinstance(loaded, np.ma.MaskedArray)
    assert loaded.mask.tolist() == [False, True, False]


def test_huge_broadcast_numpy_array_is_stored_compact_or_refused(tmp_path):
    # A broadcast tensor of 10**13 elements is stored as its one element; the numpy
    # equivalent is materialised (np.ascontiguousarray) and numpy's MemoryError escapes.
    huge = np.broadcast_to(np.float64(1.0), (10**13,))
    try:
        aptckpt.save({"a": huge}, tmp_path / "c")
    except aptckpt.UnsupportedObjectError:
        return
    assert aptckpt.load(tmp_path / "c")["a"].shape == (10**13,)


def test_large_bytes_in_metadata_is_not_reported_as_a_tensor(tmp_path):
    message = ""
    try:
        aptckpt.save({"x": 1}, tmp_path / "c", metadata={"blob": os.urandom(70_000)})
    except aptckpt.UnsupportedObjectError as err:
        message = str(err)
    assert "is a tensor" not in message, message


def test_a_malformed_node_on_another_device_is_a_format_error_not_a_device_one(tmp_path):
    aptckpt.save({"e": torch.ones(1).expand(4)}, tmp_path / "c")
    _rewrite_tree(tmp_path / "c", lambda doc: _find(doc["tree"], "expand").__setitem__(2, [7, 7]))
    for location in (None, "meta"):
        with pytest.raises(aptckpt.FormatError, match="does not expand") as info:
            aptckpt.load(tmp_path / "c", map_location=location)
        assert str(info.value).count("malformed state skeleton") == 1


def test_a_tuple_key_holding_large_bytes_stays_a_key(tmp_path):
    key = ("a", b"x" * 70_000)
    aptckpt.save({key: 1, "s": {("b", "y" * 70_000)}}, tmp_path / "c")
    loaded = aptckpt.load(tmp_path / "c")
    assert loaded[key] == 1 and loaded["s"] == {("b", "y" * 70_000)}


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_into_a_sparse_destination(tmp_path, layout):
    dense = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    make = (lambda t: t.to_sparse()) if layout == "coo" else (lambda t: t.to_sparse_csr())
    aptckpt.save({"s": make(dense)}, tmp_path / "c")
    dest = make(torch.zeros(2, 2))
    try:
        aptckpt.load(tmp_path / "c", into={"s": dest})
    except aptckpt.IntoMismatchError:
        return  # refused with a clear error: fine (sparse copy_ is limited in torch)
    assert torch.equal(dest.to_dense(), dense)

"""CUDA: where loaded tensors go (map_location between cuda and cpu), asynchronous saves of
CUDA tensors (pinned staging, non-blocking copies ordered on the caller's stream), ``into=``
CUDA destinations, and the CUDA RNG states of a training state.

Two halves. The device logic (which device a saved tensor goes to, which devices exist, which
RNG states are restored) runs everywhere: against a checkpoint whose manifest names CUDA
devices, with ``meta`` standing in for a target device, and with ``torch.cuda``'s few queried
functions replaced by fakes. The rest needs a real device and skips without one, saying so;
``scripts/gpu_check.sh`` runs this file on a GPU machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch

import aptckpt
from aptckpt import _background, api, tree
from aptckpt import manifest as mf
from aptckpt.errors import DeviceUnavailableError, IntoMismatchError
from aptckpt.manager import CheckpointManager
from aptckpt.testing import assert_state_equal
from aptckpt.training_state import capture_rng, restore_rng

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (scripts/gpu_check.sh)")


def _set_devices(path: Path, devices: dict[int, str]) -> None:
    """Rewrite the manifest of the checkpoint at ``path`` so that tensor ``i`` says it was
    saved on ``devices[i]`` (as a save on a GPU machine records it)."""
    doc = msgpack.unpackb((path / mf.MANIFEST_NAME).read_bytes(), raw=False)
    for index, device in devices.items():
        doc["tensors"][index]["device"] = device
    (path / mf.MANIFEST_NAME).write_bytes(mf.pack_document(doc))


class FakeCuda:
    """``torch.cuda``'s availability, device count and RNG functions, replaced: what
    aptckpt asks of them, answered as a machine with ``count`` devices would."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int) -> None:
        self.count = count
        self.states = [torch.full((16,), 10 + i, dtype=torch.uint8) for i in range(count)]
        self.restored: list[list[torch.Tensor]] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: self.count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", self._states)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.restored.append)

    def _states(self) -> list[torch.Tensor]:
        return [s.clone() for s in self.states]


# ------------------------------------------------------------ everywhere: device logic


def test_device_available_counts_cuda_devices(monkeypatch):
    FakeCuda(monkeypatch, 2)
    for name in ("cuda", "cuda:0", "cuda:1"):
        assert api._device_available(torch.device(name), allow_meta=False), name
    assert not api._device_available(torch.device("cuda:2"), allow_meta=False)
    FakeCuda(monkeypatch, 0)
    assert not api._device_available(torch.device("cuda:0"), allow_meta=False)
    assert not api._device_available(torch.device("meta"), allow_meta=False)
    assert api._device_available(torch.device("meta"), allow_meta=True)


def test_map_location_targets_are_resolved_per_saved_device(monkeypatch):
    FakeCuda(monkeypatch, 2)
    key = lambda: "state['w']"  # noqa: E731
    assert api._resolve_device("cuda:1", None, key) == torch.device("cuda:1")
    assert api._resolve_device("cpu", "cuda", key) == torch.device("cuda")
    assert api._resolve_device("cpu", {"cpu": "cuda:1"}, key) == torch.device("cuda:1")
    assert api._resolve_device("cuda:0", {"cuda:1": "cpu"}, key) == torch.device("cuda:0")
    assert api._resolve_device("cuda:1", lambda saved: saved[:4], key) == torch.device("cuda")
    with pytest.raises(DeviceUnavailableError, match=r"state\['w'\] was saved on 'cpu'.*'cuda:2'"):
        api._resolve_device("cpu", torch.device("cuda:2"), key)
    with pytest.raises(DeviceUnavailableError, match="not a device"):
        api._resolve_device("cpu", "gpu0", key)


def test_checkpoint_saved_on_cuda_loads_on_a_cpu_machine_by_map_location(tmp_path, monkeypatch):
    FakeCuda(monkeypatch, 0)  # whatever this machine has
    state = {"a": torch.arange(4.0), "b": torch.ones(2, dtype=torch.bfloat16), "n": 3}
    aptckpt.save(state, tmp_path / "c")
    _set_devices(tmp_path / "c", {0: "cuda:0", 1: "cuda:1"})
    assert [t.device for t in aptckpt.inspect(tmp_path / "c").tensors] == ["cuda:0", "cuda:1"]
    with pytest.raises(DeviceUnavailableError, match=r"state\['a'\] was saved on 'cuda:0'") as e:
        aptckpt.load(tmp_path / "c")
    assert "map_location='cpu'" in str(e.value)
    # one saved device mapped, the other not: the error names the one left
    with pytest.raises(DeviceUnavailableError, match=r"state\['b'\] was saved on 'cuda:1'"):
        aptckpt.load(tmp_path / "c", map_location={"cuda:0": "cpu"})
    calls: list[str] = []

    def to_cpu(saved: str) -> str:
        calls.append(saved)
        return "cpu"

    for where in ("cpu", torch.device("cpu"), {"cuda:0": "cpu", "cuda:1": "cpu"}, to_cpu):
        loaded = aptckpt.load(tmp_path / "c", map_location=where)
        assert_state_equal(state, loaded)
    assert sorted(calls) == ["cuda:0", "cuda:1"]  # once per saved device, not per tensor


def test_meta_stands_in_for_a_target_device(tmp_path):
    """map_location to another device than the CPU, checked with ``meta``: every tensor moves
    and keeps its kind (Parameter, requires_grad), except the tensors behind host values
    (numpy arrays, large bytes), which no map_location moves."""
    weight = torch.nn.Parameter(torch.randn(3, 2))
    state = {
        "w": weight,
        "g": torch.ones(4, requires_grad=True),
        "arr": np.arange(6, dtype=np.int32).reshape(2, 3),
        "blob": bytes(range(256)) * 64,
        "step": 7,
    }
    aptckpt.save(state, tmp_path / "c")
    for where in ("meta", {"cpu": "meta"}, lambda saved: "meta"):
        loaded = aptckpt.load(tmp_path / "c", map_location=where)
        assert isinstance(loaded["w"], torch.nn.Parameter) and loaded["w"].is_meta
        assert loaded["w"].requires_grad and loaded["w"].shape == (3, 2)
        assert loaded["g"].is_meta and loaded["g"].requires_grad
        np.testing.assert_array_equal(loaded["arr"], state["arr"])
        assert loaded["blob"] == state["blob"] and loaded["step"] == 7
    view = aptckpt.load(tmp_path / "c", keys=["w", "arr"], map_location="meta")
    assert list(view) == ["state['w']", "state['arr']"]
    assert view["state['w']"].is_meta
    np.testing.assert_array_equal(view["state['arr']"], state["arr"])


def test_meta_mmap_load_moves_mapped_tensors(tmp_path):
    aptckpt.save({"w": torch.randn(1024)}, tmp_path / "c", codec="none")
    assert aptckpt.load(tmp_path / "c", mmap=True, map_location="meta")["w"].is_meta


def test_a_checkpoint_naming_meta_is_refused_without_map_location(tmp_path):
    aptckpt.save({"w": torch.ones(2)}, tmp_path / "c")
    _set_devices(tmp_path / "c", {0: "meta"})
    with pytest.raises(DeviceUnavailableError, match="saved on 'meta'"):
        aptckpt.load(tmp_path / "c")
    assert aptckpt.load(tmp_path / "c", map_location="cpu")["w"].tolist() == [1.0, 1.0]


def test_cuda_rng_states_are_captured_and_restored(monkeypatch, tmp_path):
    fake = FakeCuda(monkeypatch, 2)
    captured = capture_rng()
    assert [t.tolist() for t in captured["cuda"]] == [s.tolist() for s in fake.states]
    aptckpt.save({"rng": captured}, tmp_path / "c")
    loaded = aptckpt.load(tmp_path / "c")["rng"]
    restore_rng(loaded)
    assert len(fake.restored) == 1
    assert [t.tolist() for t in fake.restored[0]] == [s.tolist() for s in fake.states]
    assert all(t.device.type == "cpu" for t in fake.restored[0])
    # fewer devices now than when saved: the CUDA states are skipped, the rest restored
    fake.count = 1
    torch.manual_seed(5)
    restore_rng(loaded)
    assert len(fake.restored) == 1
    assert torch.equal(torch.get_rng_state(), captured["torch"])
    # more devices now: the saved ones are restored (set_rng_state_all sets the first ones)
    fake.count = 3
    restore_rng(loaded)
    assert len(fake.restored) == 2
    # no CUDA at all when saved
    fake.count = 0
    assert capture_rng()["cuda"] == []
    restore_rng(capture_rng())
    assert len(fake.restored) == 2


def test_manager_restores_cuda_rng_states(monkeypatch, tmp_path):
    fake = FakeCuda(monkeypatch, 1)
    manager = CheckpointManager(tmp_path / "run")
    manager.save(1, {"w": torch.ones(2)})
    fake.states = [torch.zeros(16, dtype=torch.uint8)]  # the generator moved on
    manager.restore({})
    assert [t.tolist() for t in fake.restored[0]] == [[10] * 16]
    manager.restore({}, restore_rng=False)
    assert len(fake.restored) == 1
    manager.close()


def test_cpu_staging_is_not_pinned_and_needs_no_event():
    staging = _background._Staging()
    flat = tree.flatten({"w": torch.randn(8), "b": torch.ones(3, dtype=torch.bfloat16)})
    staged, event = staging.snapshot(flat)
    assert event is None
    assert not any(b.is_pinned() for b in staging.buffers())
    copies = [leaf.tensor.tolist() for leaf in staged.tensors]
    assert copies == [leaf.tensor.tolist() for leaf in flat.tensors]


# ----------------------------------------------------------------- on a CUDA device


def _cuda_state() -> dict[str, Any]:
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(512, 256, device="cuda", generator=g)
    return {
        "w": torch.nn.Parameter(w),
        "t": w.t(),  # a strided view of w, stored apart
        "h": torch.randn(1000, device="cuda", generator=g).to(torch.bfloat16),
        "i": torch.arange(10, device="cuda", dtype=torch.int64),
        "e": torch.empty(0, 3, device="cuda"),
        "c": torch.randn(4, device="cuda", dtype=torch.complex64).conj(),  # lazy conjugate
        "cpu": torch.arange(5.0),
        "arr": np.arange(4),
        "step": 3,
    }


def _on_cpu(state: dict[str, Any]) -> dict[str, Any]:
    def move(v: Any) -> Any:
        if isinstance(v, torch.nn.Parameter):
            return torch.nn.Parameter(v.detach().cpu(), requires_grad=v.requires_grad)
        return v.cpu() if isinstance(v, torch.Tensor) else v

    return {k: move(v) for k, v in state.items()}


@needs_cuda
@pytest.mark.parametrize(
    ("backend", "options"),
    [("zstd", {}), ("zstd", {"codec": "none"}), ("torch", {}), ("delta", {})],
)
@pytest.mark.parametrize("blocking", [True, False])
def test_cuda_state_round_trip(tmp_path, backend, options, blocking):
    state = _cuda_state()
    saved = aptckpt.save(state, tmp_path / "c", backend=backend, blocking=blocking, **options)
    if not blocking:
        saved.wait()
    records = {r.key: r.device for r in aptckpt.inspect(tmp_path / "c").tensors}
    assert records["state['w']"].startswith("cuda") and records["state['cpu']"] == "cpu"
    loaded = aptckpt.load(tmp_path / "c")  # each tensor back on the device it was saved on
    assert_state_equal(state, loaded)
    assert_state_equal(_on_cpu(state), aptckpt.load(tmp_path / "c", map_location="cpu"))


@needs_cuda
def test_cpu_state_loads_onto_cuda(tmp_path):
    state = _on_cpu(_cuda_state())
    aptckpt.save(state, tmp_path / "c")
    for where in ("cuda", "cuda:0", {"cpu": "cuda:0"}, lambda saved: "cuda:0"):
        loaded = aptckpt.load(tmp_path / "c", map_location=where)
        assert loaded["w"].is_cuda and isinstance(loaded["w"], torch.nn.Parameter)
        assert loaded["cpu"].is_cuda and isinstance(loaded["arr"], np.ndarray)
        assert_state_equal(state, loaded, check_device=False)
    mapped = aptckpt.load(tmp_path / "c", mmap=True, map_location="cuda")
    assert mapped["w"].is_cuda
    assert_state_equal(state, mapped, check_device=False)
    subset = aptckpt.load(tmp_path / "c", keys=["w", "arr"], map_location="cuda")
    assert subset["state['w']"].is_cuda and isinstance(subset["state['arr']"], np.ndarray)
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(DeviceUnavailableError, match=missing):
        aptckpt.load(tmp_path / "c", map_location=missing)


@needs_cuda
def test_async_save_does_not_wait_for_the_stream_and_persists_what_it_held(tmp_path):
    """The snapshot's copies are enqueued on the caller's stream (non_blocking, into pinned
    buffers) and ``save`` returns with the stream still busy; the background thread waits
    for them, so the checkpoint holds the values as they were when ``save`` was called,
    though the caller wrote new ones at once."""
    x = torch.zeros(64, 1024, 1024, device="cuda")  # 256 MiB
    aptckpt.save({"x": x}, tmp_path / "warm", blocking=False).wait()  # allocates the buffers
    buffers = _background._get()._staging.buffers()
    assert all(b.is_pinned() for b in buffers)
    stream = torch.cuda.current_stream()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time ahead of the copies
    x.fill_(7.0)
    handle = aptckpt.save({"x": x}, tmp_path / "c", blocking=False)
    still_busy = not stream.query()
    x.fill_(8.0)  # after the save returned: must not reach the checkpoint
    handle.wait()
    assert still_busy, "save() waited for the stream: the device-to-host copies blocked it"
    assert [b.data_ptr() for b in _background._get()._staging.buffers()] == [
        b.data_ptr() for b in buffers
    ]  # reused
    loaded = aptckpt.load(tmp_path / "c", map_location="cpu")["x"]
    assert bool((loaded == 7.0).all())


@needs_cuda
def test_async_save_on_a_side_stream(tmp_path):
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x = torch.randn(1 << 20, device="cuda") * 3
        expected = x.cpu()
        handle = aptckpt.save({"x": x}, tmp_path / "c", blocking=False)
        x.mul_(0)
    handle.wait()
    assert torch.equal(aptckpt.load(tmp_path / "c", map_location="cpu")["x"], expected)


@needs_cuda
def test_staging_buffers_follow_the_source_device(tmp_path):
    """A slot whose tensor moves between the CPU and CUDA gets a pinned buffer only for CUDA."""
    for step, device in enumerate(("cpu", "cuda", "cuda", "cpu")):
        state = {"a": torch.full((1000,), float(step), device=device), "b": torch.ones(3)}
        aptckpt.save(state, tmp_path / f"c{step}", blocking=False).wait()
        pinned = [b.is_pinned() for b in _background._get()._staging.buffers()]
        assert pinned == [device == "cuda", False], (step, device)
        loaded = aptckpt.load(tmp_path / f"c{step}", map_location="cpu")
        assert_state_equal(_on_cpu(state), loaded)


@needs_cuda
def test_load_into_cuda_destinations(tmp_path):
    torch.manual_seed(0)
    source = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32))
    source[1].weight = torch.nn.Parameter(torch.randn(32))
    aptckpt.save({"model": source.state_dict(), "buf": torch.randn(8, 4)}, tmp_path / "c")
    target = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32)).cuda()
    buf = torch.zeros(4, 8, device="cuda").t()  # non-contiguous CUDA destination
    pointers = [p.data_ptr() for p in target.parameters()]
    result = aptckpt.load(tmp_path / "c", into={"model": target, "buf": buf})
    assert result.missing_keys == () and result.unexpected_keys == ()
    assert [p.data_ptr() for p in target.parameters()] == pointers  # filled in place
    assert result.state["model"]["0.weight"] is target[0].weight
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name].cpu(), value), name
    assert buf.is_cuda and torch.equal(buf.cpu(), aptckpt.load(tmp_path / "c")["buf"])
    wrong = torch.zeros(8, 4, device="cuda", dtype=torch.float16)
    with pytest.raises(IntoMismatchError, match="float16"):
        aptckpt.load(tmp_path / "c", into={"model": target, "buf": wrong})


@needs_cuda
def test_load_into_tied_cuda_weights(tmp_path):
    emb = torch.nn.Embedding(100, 16)
    head = torch.nn.Linear(16, 100, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    aptckpt.save(model.state_dict(), tmp_path / "c")
    target = torch.nn.ModuleDict(
        {"emb": torch.nn.Embedding(100, 16), "head": torch.nn.Linear(16, 100, bias=False)}
    ).cuda()
    target["head"].weight = target["emb"].weight
    aptckpt.load(tmp_path / "c", into=target)
    assert target["head"].weight is target["emb"].weight
    assert torch.equal(target["emb"].weight.cpu(), emb.weight.detach())


@needs_cuda
def test_cuda_rng_is_restored_bit_for_bit(tmp_path):
    torch.cuda.manual_seed_all(1234)
    torch.randn(10, device="cuda")
    manager = CheckpointManager(tmp_path / "run")
    manager.save(1, {"w": torch.ones(2, device="cuda")})
    expected = torch.randn(1000, device="cuda")
    torch.cuda.manual_seed_all(99)  # elsewhere, later
    state = manager.restore({})
    assert state["w"].device.type == "cpu"  # the manager loads to the CPU by default
    assert torch.equal(torch.randn(1000, device="cuda"), expected)
    rng = capture_rng()
    assert len(rng["cuda"]) == torch.cuda.device_count()
    manager.close()

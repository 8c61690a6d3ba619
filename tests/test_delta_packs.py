"""``delta`` packs: small objects of a save in one pack file; boundaries, deduplication across
saves, the copy-forward rule that bounds waste, garbage collection, verification naming the
packed object, crashes mid-pack, object stores (memory:// and S3 on loopback), old formats,
and keyframes that rewrite nothing unchanged."""

from __future__ import annotations

import datetime
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch

import aptckpt
from aptckpt import manifest as mf
from aptckpt.backends import delta
from aptckpt.errors import FormatError, IntegrityError, UnsupportedFormatVersionError
from aptckpt.testing import assert_state_equal

CHUNK = 4096


def save(state: Any, path: Any, **options: Any) -> aptckpt.SaveInfo:
    options.setdefault("chunk_size", CHUNK)
    return aptckpt.save(state, path, backend="delta", **options)


def parsed(path: Path) -> delta.DeltaPayload:
    with aptckpt.storage.LOCAL.open_checkpoint(str(path)) as reader:
        return delta.parse_payload(reader.read_manifest(), str(path))


def packs(run: Path) -> list[Path]:
    return sorted((run / "aptckpt-store" / "packs").iterdir())


def loose(run: Path) -> list[Path]:
    return sorted((run / "aptckpt-store" / "objects").iterdir())


def noise(n: int, seed: int) -> torch.Tensor:
    """``n`` incompressible bytes: stored raw, so an object's size is ``n`` exactly."""
    return torch.randint(
        0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def tiny_state(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(8, generator=gen) for i in range(n)}


# ------------------------------------------------------------------ boundaries


@pytest.mark.parametrize(("size", "packed"), [(1023, True), (1024, False), (1025, False)])
def test_an_object_exactly_at_the_threshold_is_loose(tmp_path, size, packed):
    state = {"x": noise(size, 1)}
    save(state, tmp_path / "c", pack_below=1024)
    assert (len(packs(tmp_path)), len(loose(tmp_path))) == ((1, 0) if packed else (0, 1))
    (obj,) = parsed(tmp_path / "c").objects
    assert (obj.pack is not None) == packed and obj.size == size
    assert_state_equal(state, aptckpt.load(tmp_path / "c"))


def test_zero_byte_tensors_need_no_pack_and_mix_with_packed_ones(tmp_path):
    empty = {"e": torch.empty(0), "z": torch.zeros(0, 3, dtype=torch.bfloat16)}
    save(empty, tmp_path / "a")
    assert packs(tmp_path) == [] and loose(tmp_path) == []
    assert aptckpt.inspect(tmp_path / "a").format_version < 5  # nothing packed: old readers read it
    mixed = {**empty, "one": torch.ones(1), "two": torch.arange(2.0)}
    save(mixed, tmp_path / "b")
    assert len(packs(tmp_path)) == 1 and aptckpt.inspect(tmp_path / "b").format_version == 5
    assert_state_equal(mixed, aptckpt.load(tmp_path / "b"))
    aptckpt.verify(tmp_path / "b")


def test_a_pack_of_one_object(tmp_path):
    state = {"w": torch.arange(10.0)}
    info = save(state, tmp_path / "c")
    (pack,) = packs(tmp_path)
    payload = parsed(tmp_path / "c")
    (obj,) = payload.objects
    assert obj.pack == bytes.fromhex(pack.name) and obj.offset == 0
    assert obj.pack_size == obj.size == pack.stat().st_size == info.stored_bytes
    assert_state_equal(state, aptckpt.load(tmp_path / "c"))


def test_many_small_tensors_make_one_pack_and_unchanged_ones_add_nothing(tmp_path):
    state = tiny_state(2000)
    state["big"] = torch.randn(3 * CHUNK // 4)  # 3 chunks of ~4 KiB stored: loose here
    first = save(state, tmp_path / "s0", pack_below=2048)
    assert len(packs(tmp_path)) == 1 and len(loose(tmp_path)) == 3
    assert loose(tmp_path)[0].stat().st_size >= 2048
    state["t7"] += 1
    second = save(state, tmp_path / "s1", pack_below=2048)
    assert len(packs(tmp_path)) == 2 and len(loose(tmp_path)) == 3
    assert 0 < second.stored_bytes <= 64  # the one changed tensor: 32 bytes at most, as a delta
    assert second.stored_bytes < first.stored_bytes // 1000
    third = save(state, tmp_path / "s2", pack_below=2048)
    assert third.stored_bytes == 0 and len(packs(tmp_path)) == 2  # nothing new: no pack
    for name in ("s0", "s1", "s2"):
        aptckpt.verify(tmp_path / name)
    assert_state_equal(state, aptckpt.load(tmp_path / "s2"))


def test_identical_objects_in_one_save_share_one_place(tmp_path):
    state = {f"t{i}": torch.ones(16) for i in range(5)}
    save(state, tmp_path / "c")
    (pack,) = packs(tmp_path)
    places = {(o.pack, o.offset) for row in parsed(tmp_path / "c").chunks for o in row}
    assert (
        len(places) == 1 and pack.stat().st_size == next(iter(parsed(tmp_path / "c").objects)).size
    )


# ------------------------------------------------- copy-forward, GC: bounded waste


def test_a_save_reaching_little_of_a_pack_copies_it_forward(tmp_path):
    state = {f"t{i}": noise(100, i) for i in range(10)}
    save(state, tmp_path / "s0")
    (old,) = packs(tmp_path)
    for i in range(9):  # 90% of the pack changes: s1 would reach 10% of it
        state[f"t{i}"] = noise(100, 100 + i)
    info = save(state, tmp_path / "s1")
    reached = {o.pack for o in parsed(tmp_path / "s1").objects}
    assert bytes.fromhex(old.name) not in reached and len(reached) == 1
    assert info.stored_bytes == 10 * 100  # 9 new objects + 1 copied forward
    aptckpt.delete(tmp_path / "s0")
    report = aptckpt.collect_garbage(tmp_path)
    assert (report.removed_packs, report.kept_packs) == (1, 1)
    assert report.removed_bytes == 1000 and old not in packs(tmp_path)
    assert_state_equal(state, aptckpt.load(tmp_path / "s1"))


def test_gc_keeps_a_pack_while_any_checkpoint_reaches_it(tmp_path):
    state = {f"t{i}": noise(100, i) for i in range(10)}
    save(state, tmp_path / "s0")
    (shared,) = packs(tmp_path)
    for i in range(4):  # s1 still reaches 60% of s0's pack: it shares it
        state[f"t{i}"] = noise(100, 100 + i)
    save(state, tmp_path / "s1")
    s1_packs = {o.pack for o in parsed(tmp_path / "s1").objects}
    assert bytes.fromhex(shared.name) in s1_packs and len(s1_packs) == 2
    aptckpt.delete(tmp_path / "s0")
    report = aptckpt.collect_garbage(tmp_path)
    assert (report.removed_packs, report.kept_packs, report.removed_bytes) == (0, 2, 0)
    aptckpt.verify(tmp_path / "s1")
    assert_state_equal(state, aptckpt.load(tmp_path / "s1"))
    aptckpt.delete(tmp_path / "s1")
    report = aptckpt.collect_garbage(tmp_path)
    assert report.removed_packs == 2 and packs(tmp_path) == []


def test_every_pack_a_checkpoint_reaches_is_at_least_half_live(tmp_path):
    gen = torch.Generator().manual_seed(3)
    state = {f"t{i}": noise(64 + 8 * i, i) for i in range(40)}
    for k in range(12):
        for i in torch.randperm(40, generator=gen)[:13].tolist():
            state[f"t{i}"] = noise(64 + 8 * i, 1000 * k + i)
        save(state, tmp_path / f"s{k}")
        payload = parsed(tmp_path / f"s{k}")
        used: dict[bytes, dict[int, int]] = {}
        for obj in payload.objects:
            assert obj.pack is not None
            used.setdefault(obj.pack, {})[obj.offset] = obj.size
        for pack, spans in used.items():
            size = next(o.pack_size for o in payload.objects if o.pack == pack)
            assert sum(spans.values()) >= size / 2
    assert_state_equal(state, aptckpt.load(tmp_path / "s11"))


# ------------------------------------------------------------- damage, verify


def test_verify_names_the_damaged_packed_object_and_its_tensor(tmp_path):
    state = tiny_state(20)
    save(state, tmp_path / "c")
    (pack,) = packs(tmp_path)
    obj = parsed(tmp_path / "c").chunks[5][0]  # tensor t5
    data = bytearray(pack.read_bytes())
    data[obj.offset] ^= 1
    pack.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as info:
        aptckpt.verify(tmp_path / "c")
    text = str(info.value)
    assert "state['t5']" in text and obj.name.hex() in text and pack.name in text
    assert f"offset {obj.offset}" in text and "state['t4']" not in text
    assert_state_equal(state["t4"], aptckpt.load(tmp_path / "c", verify=False)["t4"])


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_lost_or_cut_pack_is_named_before_anything_is_read(tmp_path, damage):
    save(tiny_state(3), tmp_path / "c")
    (pack,) = packs(tmp_path)
    if damage == "missing":
        pack.unlink()
    else:
        pack.write_bytes(pack.read_bytes()[:-1])
    why = "missing from the store" if damage == "missing" else "manifest says"
    with pytest.raises(IntegrityError, match=why) as info:
        aptckpt.load(tmp_path / "c")
    assert pack.name in str(info.value) and "state['t0']" in str(info.value)


@pytest.mark.parametrize(
    ("row_change", "match"),
    [
        (lambda row: [*row[:6], 1, 0], "missing pack"),
        (lambda row: [*row[:7], 1 << 40], "past the end of its pack"),
        (lambda row: row[:7], "6-item"),
        (lambda row: [*row[:6], 0, -1], "non-negative"),
    ],
)
def test_hostile_pack_rows_are_refused(tmp_path, row_change, match):
    save({"w": torch.arange(4.0)}, tmp_path / "c")
    path = tmp_path / "c" / mf.MANIFEST_NAME
    doc = msgpack.unpackb(path.read_bytes(), raw=False)
    doc["payload"]["objects"][0] = row_change(doc["payload"]["objects"][0])
    path.write_bytes(mf.pack_document(doc))
    with pytest.raises(FormatError, match=match):
        aptckpt.load(tmp_path / "c")


def test_hostile_pack_tables_are_refused(tmp_path):
    save({"w": torch.arange(4.0)}, tmp_path / "c")
    path = tmp_path / "c" / mf.MANIFEST_NAME
    good = msgpack.unpackb(path.read_bytes(), raw=False)
    for table in ([[b"x" * 15, 16]], [[good["payload"]["packs"][0][0], 0]], "packs"):
        doc = msgpack.unpackb(path.read_bytes(), raw=False)
        doc["payload"]["packs"] = table
        path.write_bytes(mf.pack_document(doc))
        with pytest.raises(FormatError, match="pack"):
            aptckpt.load(tmp_path / "c")


# ------------------------------------------------------------------ versions


def test_old_readers_refuse_a_packed_checkpoint_cleanly(tmp_path, monkeypatch):
    save({"w": torch.arange(4.0)}, tmp_path / "c")
    assert aptckpt.inspect(tmp_path / "c").format_version == 5
    monkeypatch.setattr(mf, "FORMAT_VERSION", 4)  # a reader of version 4
    with pytest.raises(UnsupportedFormatVersionError):
        aptckpt.load(tmp_path / "c")


def test_loose_and_local_checkpoints_of_older_writers_load_next_to_packed_ones(tmp_path):
    state = {"small": torch.arange(10.0), "big": torch.randn(3 * CHUNK)}
    save(state, tmp_path / "old", pack_below=0, local_below=16 << 10)  # as before packs
    assert aptckpt.inspect(tmp_path / "old").format_version == 3 and packs(tmp_path) == []
    state["big"][:4] += 1
    save(state, tmp_path / "new")  # deltas against the old one's loose objects
    assert aptckpt.inspect(tmp_path / "new").format_version == 5
    assert_state_equal(state, aptckpt.load(tmp_path / "new"))
    aptckpt.verify(tmp_path / "old")


# ------------------------------------------------------------------ keyframes


def test_a_keyframe_rewrites_no_unchanged_chunk(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(4 * CHUNK // 4, generator=gen), "v": torch.randn(CHUNK // 4)}
    save(state, tmp_path / "s0", keyframe_every=3)
    state["w"][::97] += 1e-3  # every chunk of w changes a little: stored as xor deltas
    save(state, tmp_path / "s1", keyframe_every=3)
    assert all(o.base is not None for o in parsed(tmp_path / "s1").chunks[0])
    save(state, tmp_path / "s2", keyframe_every=3)
    state["v"] += 1.0  # on the keyframe: v changed, w did not
    info = save(state, tmp_path / "s3", keyframe_every=3)
    payload = parsed(tmp_path / "s3")
    assert payload.since_keyframe == 0
    assert [o.depth for o in payload.chunks[0]] == [1, 1, 1, 1]  # w: reused as it was
    assert [o.depth for o in payload.chunks[1]] == [0]  # v: changed, stored whole
    assert info.stored_bytes == payload.chunks[1][0].size
    state["w"][::89] += 1e-3
    save(state, tmp_path / "s4", keyframe_every=3)
    assert max(o.depth for o in parsed(tmp_path / "s4").chunks[0]) == 2  # still < keyframe_every
    save(state, tmp_path / "s5", keyframe_every=2)  # a lower bound: depth 2 is not reused
    assert max(o.depth for row in parsed(tmp_path / "s5").chunks for o in row) <= 1
    assert_state_equal(state, aptckpt.load(tmp_path / "s5"))


# ------------------------------------------------------------------- crashes

_KILL_IN_PACK = textwrap.dedent(
    """
    import os, signal, sys, torch, aptckpt
    run = sys.argv[1]
    real = os.replace
    def replace(src, dst, *a, **k):
        if "/packs/" in str(dst) and os.path.exists(os.path.join(run, "s1")):
            os.kill(os.getpid(), signal.SIGKILL)  # the pack staged and fsynced, not renamed
        return real(src, dst, *a, **k)
    os.replace = replace
    state = {f"t{i}": torch.full((8,), float(i)) for i in range(500)}
    for k in range(3):
        aptckpt.save(state, f"{run}/s{k}", backend="delta")
        print(k, flush=True)
        for i in range(0, 500, 7):
            state[f"t{i}"] += 1000  # values no tensor held before
    """
)


def test_a_save_killed_mid_pack_harms_nothing(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_IN_PACK, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.split() == ["0", "1"]
    staged = list((tmp_path / "aptckpt-store" / "tmp").iterdir())
    assert staged  # the dead save's staged pack, under no name a reader uses
    expected = {f"t{i}": torch.full((8,), float(i)) for i in range(500)}
    assert_state_equal(expected, aptckpt.load(tmp_path / "s0"))
    before = {p.name for p in packs(tmp_path)}
    for i in range(0, 500, 7):
        expected[f"t{i}"] += 1000
    assert_state_equal(expected, aptckpt.load(tmp_path / "s1"))
    assert not (tmp_path / "s2").exists()
    save(expected, tmp_path / "after")  # the run goes on
    assert_state_equal(expected, aptckpt.load(tmp_path / "after"))
    report = aptckpt.collect_garbage(tmp_path)
    assert report.removed_packs == 0 and {p.name for p in packs(tmp_path)} == before
    assert list((tmp_path / "aptckpt-store" / "tmp").iterdir()) == []
    for name in ("s0", "s1", "after"):
        aptckpt.verify(tmp_path / name)


# -------------------------------------------------------------- object stores


def test_packs_on_memory_storage_and_the_age_rule(memory_url, monkeypatch):
    monkeypatch.setenv("APTCKPT_REMOTE_GRACE_S", "600")
    import fsspec

    run = f"{memory_url}/run"
    state = tiny_state(50)
    save(state, f"{run}/s0")
    state["t3"] += 1
    save(state, f"{run}/s1")
    fs = fsspec.filesystem("memory")
    listed = fs.ls(f"{memory_url.removeprefix('memory://')}/run/aptckpt-store/packs", detail=False)
    assert len(listed) == 2
    assert_state_equal(state, aptckpt.load(f"{run}/s1"))
    aptckpt.delete(f"{run}/s0")
    aptckpt.delete(f"{run}/s1")
    report = aptckpt.collect_garbage(run)
    assert (report.removed_packs, report.young_objects) == (0, 2)  # young: kept
    old = datetime.datetime.now(tz=datetime.timezone.utc) - datetime.timedelta(seconds=1200)
    for path in listed:
        found = fs.store["/" + path.lstrip("/")]
        found.created = old
        if hasattr(found, "modified"):
            found.modified = old
    assert aptckpt.collect_garbage(run).removed_packs == 2


def test_packs_round_trip_through_s3(s3_url, s3_options):
    run = f"{s3_url}/run"
    state = tiny_state(300)
    state["big"] = torch.randn(3 * CHUNK // 4)
    save(state, f"{run}/s0", storage_options=s3_options, pack_below=2048)
    state["t1"] += 1
    info = save(state, f"{run}/s1", storage_options=s3_options, pack_below=2048)
    assert 0 < info.stored_bytes <= 64
    for name in ("s0", "s1"):
        aptckpt.verify(f"{run}/{name}", storage_options=s3_options)
    assert_state_equal(state, aptckpt.load(f"{run}/s1", storage_options=s3_options))
    aptckpt.delete(f"{run}/s0", storage_options=s3_options)
    report = aptckpt.collect_garbage(run, storage_options=s3_options)
    assert report.removed_packs == 0 and report.kept_packs == 2  # s1 reaches s0's pack
    assert_state_equal(state, aptckpt.load(f"{run}/s1", storage_options=s3_options))

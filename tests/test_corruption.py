"""Damage to any file of a committed checkpoint is detected, never loaded, and named.

For a checkpoint of every backend -- ``torch``, ``zstd`` (several shards, raw and
compressed chunks) and a run of ``delta`` checkpoints sharing one object store
with xor chains -- every file (data file, store object, store marker, manifest)
is damaged in turn: bits flipped (first, last and other bytes), truncated (to 0,
to half, by one byte), deleted, bytes appended, and two files of a kind swapped
(two shards, two store objects). After each damage:

* ``aptckpt.load`` (verification on, the default) raises an ``AptckptError`` --
  no other exception, and never returns data;
* ``aptckpt verify`` exits 1;
* both messages name the damaged file and, when tensor bytes were hit, a tensor
  whose bytes were hit (by its key path in the state) -- never an intact one;
* a delta checkpoint of the run that does not reach a damaged object still loads.

What each byte of each file holds is worked out from the pristine files
independently of the library's reader: chunk rows read straight from the msgpack
manifest, torch storages located with :mod:`zipfile` and matched to the state's
tensors by their bytes, delta objects followed through their base chains.

Not damage, so not tried: swapping two whole manifests or checkpoint directories
(a checkpoint renamed is still valid, by design), and the store's ``LOCK`` file
(empty, only an flock target).

Every case restores the files it damaged. At the end of the module the counts are
written to the terminal, ``corruption sweep: <backend>: N tried, N detected``.
The default run damages a fixed sample of positions per file; ``-m slow`` flips
a bit in every 64-byte block of every file and swaps more pairs.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import random
import re
import struct
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch

import aptckpt
from aptckpt.cli import main as cli_main
from aptckpt.errors import AptckptError, CheckpointNotFoundError
from conftest import terminal_line

CHUNK = 256
MANIFEST = "manifest.msgpack"
BACKENDS = ("torch", "zstd", "delta")
#: Each damaged checkpoint must be refused by every way of loading it.
LOADS: dict[str, dict[str, Any]] = {"load": {}, "load(mmap=True)": {"mmap": True}}

# ----------------------------------------------------------------- states


def make_state(seed: int) -> dict[str, Any]:
    """A small training-like state; every tensor holds distinct bytes."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "embed.weight": torch.randn(24, 16, generator=gen),
            "head.weight": torch.randn(16, 24, generator=gen).to(torch.bfloat16),
            "norm.weight": torch.linspace(0.5, 1.5, 96),
            "codes": torch.randint(0, 256, (700,), dtype=torch.uint8, generator=gen),
            "empty": torch.empty(0),
        },
        "optim": {
            "state": {0: {"exp_avg": torch.randn(300, generator=gen), "step": torch.tensor(7.0)}},
            "param_groups": [{"lr": 1e-3, "params": [0]}],
        },
        "step": 7,
    }


def tensor_keys(state: Any, path: str = "state") -> Iterator[tuple[str, torch.Tensor]]:
    """``(key path, tensor)`` in the order a state is walked: insertion order, depth first."""
    if isinstance(state, torch.Tensor):
        yield path, state
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from tensor_keys(v, f"{path}[{k!r}]")
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from tensor_keys(v, f"{path}[{i}]")


def raw_manifest(ckpt: Path) -> dict[str, Any]:
    doc = msgpack.unpackb((ckpt / MANIFEST).read_bytes(), raw=False, strict_map_key=False)
    assert isinstance(doc, dict)
    return doc


# ----------------------------------------------------------------- the corpus


@dataclass
class Target:
    """The checkpoints of one backend and what every byte of their files holds."""

    backend: str
    root: Path
    checkpoints: list[Path]
    # Damage is located to within this many bytes: the torch backend's digests
    # cover fixed-size pieces of the file, which may hold bytes of two tensors.
    granule: int = 1
    kinds: dict[str, str] = field(default_factory=dict)  # file (relative to root) -> kind
    reach: dict[str, set[Path]] = field(default_factory=dict)  # file -> checkpoints reading it
    # file -> (start, stop, checkpoint, tensor key): bytes [start, stop) hold that tensor's data
    regions: dict[str, list[tuple[int, int, Path, str]]] = field(default_factory=dict)

    def add(self, rel: str, kind: str, readers: set[Path]) -> None:
        self.kinds[rel] = kind
        self.reach.setdefault(rel, set()).update(readers)
        self.regions.setdefault(rel, [])

    def hit(self, rel: str, ckpt: Path, spans: list[tuple[int, int]]) -> set[str]:
        """Key paths of the tensors of ``ckpt`` whose bytes in ``rel`` overlap ``spans``."""
        return {
            key
            for start, stop, owner, key in self.regions[rel]
            if owner == ckpt and any(a < stop and start < b for a, b in spans)
        }


def _add_manifest(target: Target, ckpt: Path) -> None:
    target.add(str((ckpt / MANIFEST).relative_to(target.root)), "manifest", {ckpt})


def build_zstd(root: Path) -> Target:
    ckpt = root / "ckpt"
    state = make_state(0)
    aptckpt.save(state, ckpt, backend="zstd", chunk_size=CHUNK, shard_size=1024)
    target = Target("zstd", root, [ckpt])
    doc = raw_manifest(ckpt)
    keys = [k for k, _ in tensor_keys(state)]
    names = [f["path"] for f in doc["files"]]
    for name in names:
        target.add(f"ckpt/{name}", "shard", {ckpt})
    codecs = Counter()
    for key, rows in zip(keys, doc["payload"]["chunks"], strict=True):
        for file, offset, length, codec, *_ in rows:
            target.regions[f"ckpt/{names[file]}"].append((offset, offset + length, ckpt, key))
            codecs[codec] += 1
    _add_manifest(target, ckpt)
    assert len(names) >= 4 and len(codecs) >= 2, "want several shards, raw and compressed chunks"
    mappable = [  # all chunks raw (codec 0), end to end in one file: load(mmap=True) maps them
        rows
        for rows in doc["payload"]["chunks"]
        if rows
        and all(r[3] == 0 and r[0] == rows[0][0] for r in rows)
        and all(b[1] == a[1] + a[2] for a, b in itertools.pairwise(rows))
    ]
    assert mappable, "want a tensor that load(mmap=True) maps"
    return target


def _zip_records(path: Path, *, whole: bool = False) -> dict[str, tuple[int, int]]:
    """Where each member's bytes lie in a (stored, uncompressed) zip file; with
    ``whole``, its whole record: local header, bytes and data descriptor."""
    spans = {}
    data = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
            start = info.header_offset + 30 + name_len + extra_len
            stop = start + info.file_size
            if whole:
                start, stop = info.header_offset, stop + (16 if info.flag_bits & 0x08 else 0)
            spans[info.filename] = (start, stop)
    return spans


def build_torch(root: Path) -> Target:
    ckpt = root / "ckpt"
    state = make_state(1)
    aptckpt.save(state, ckpt, backend="torch", chunk_size=CHUNK)
    target = Target("torch", root, [ckpt], granule=CHUNK)
    target.add("ckpt/state.pt", "state", {ckpt})
    # A tensor is lost when its storage's bytes or the zip record around them (header,
    # data descriptor) are damaged: torch.load cannot read it either way.
    data = (ckpt / "state.pt").read_bytes()
    spans = _zip_records(ckpt / "state.pt")
    records = _zip_records(ckpt / "state.pt", whole=True)
    for key, tensor in tensor_keys(state):
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        if not raw:
            continue
        (name,) = [n for n, s in spans.items() if "/data/" in n and data[s[0] : s[1]] == raw]
        target.regions["ckpt/state.pt"].append((*records[name], ckpt, key))
    _add_manifest(target, ckpt)
    return target


def build_delta(root: Path) -> Target:
    """Four saves of a training run: shared frozen chunks, xor chains, a keyframe."""
    state = make_state(2)
    checkpoints = []
    gen = torch.Generator().manual_seed(3)
    for step in range(4):
        ckpt = root / f"step-{step}"
        aptckpt.save(
            state,
            ckpt,
            backend="delta",
            chunk_size=CHUNK,
            keyframe_every=3,
            local_below=0,
            pack_below=0,  # loose objects: the damage map below is per object file
        )
        checkpoints.append(ckpt)
        emb = state["model"]["embed.weight"]
        emb += 1e-3 * torch.randn(emb.shape, generator=gen)
        state["optim"]["state"][0]["exp_avg"][::7] += 1
        state["step"] += 1
    target = Target("delta", root, checkpoints)
    store = root / "aptckpt-store"
    target.add("aptckpt-store/STORE", "marker", set(checkpoints))
    chained = 0
    for ckpt in checkpoints:
        _add_manifest(target, ckpt)
        payload = raw_manifest(ckpt)["payload"]
        rows = payload["objects"]
        keys = [k for k, _ in tensor_keys(state)]
        for key, refs in zip(keys, payload["chunks"], strict=True):
            for ref in refs:
                index: int | None = ref
                chained += rows[ref][5] is not None
                while index is not None:  # the object and every base of its xor chain
                    name, size = rows[index][0], rows[index][1]
                    rel = f"aptckpt-store/objects/{name.hex()}"
                    target.add(rel, "object", {ckpt})
                    target.regions[rel].append((0, size, ckpt, key))
                    index = rows[index][5]
    on_disk = {f"aptckpt-store/objects/{p.name}" for p in (store / "objects").iterdir()}
    assert on_disk == {r for r, k in target.kinds.items() if k == "object"}
    assert chained, "the run should hold xor chains"
    return target


BUILDERS: dict[str, Callable[[Path], Target]] = {
    "torch": build_torch,
    "zstd": build_zstd,
    "delta": build_delta,
}

# --------------------------------------------------------------- damage


@dataclass(frozen=True)
class Damage:
    """One corruption: what it does to which files, and the pristine bytes it hits."""

    label: str
    apply: Callable[[Path], None]
    hits: dict[str, list[tuple[int, int]]]  # file -> damaged byte ranges (pristine offsets)
    # Bytes appended: no pristine byte changed, but a reader refuses the whole file
    # (its size is wrong), so it may name any tensor stored in it -- or none.
    appended: bool = False


def _flip(rel: str, positions: list[int], rng: random.Random) -> Damage:
    bits = [1 << rng.randrange(8) for _ in positions]

    def apply(root: Path) -> None:
        data = bytearray((root / rel).read_bytes())
        for pos, bit in zip(positions, bits, strict=True):
            data[pos] ^= bit
        (root / rel).write_bytes(bytes(data))

    pairs = zip(positions, bits, strict=True)
    where = ", ".join(f"byte {p} bit {b.bit_length() - 1}" for p, b in pairs)
    return Damage(f"flip {where} of {rel}", apply, {rel: [(p, p + 1) for p in positions]})


def _truncate(rel: str, size: int, keep: int) -> Damage:
    def apply(root: Path) -> None:
        with open(root / rel, "r+b") as f:
            f.truncate(keep)

    return Damage(f"truncate {rel} to {keep} of {size} bytes", apply, {rel: [(keep, size)]})


def _delete(rel: str, size: int) -> Damage:
    return Damage(f"delete {rel}", lambda root: (root / rel).unlink(), {rel: [(0, size)]})


def _append(rel: str, extra: bytes) -> Damage:
    def apply(root: Path) -> None:
        with open(root / rel, "ab") as f:
            f.write(extra)

    return Damage(f"append {len(extra)} bytes to {rel}", apply, {rel: []}, appended=True)


def _swap(a: str, b: str, sizes: dict[str, int]) -> Damage:
    def apply(root: Path) -> None:
        da, db = (root / a).read_bytes(), (root / b).read_bytes()
        (root / a).write_bytes(db)
        (root / b).write_bytes(da)

    return Damage(f"swap {a} and {b}", apply, {a: [(0, sizes[a])], b: [(0, sizes[b])]})


def damages(target: Target, kind: str, *, thorough: bool) -> Iterator[Damage]:
    """The corruptions of one kind for every file of ``target``."""
    sizes = {rel: (target.root / rel).stat().st_size for rel in target.kinds}
    for rel in sorted(target.kinds):
        size = sizes[rel]
        rng = random.Random(f"{rel}-{kind}")
        if kind == "flip":
            positions = {0, size - 1}
            if thorough or target.kinds[rel] != "object":  # objects are small and many
                positions |= {size // 2, rng.randrange(size)}
            if thorough:  # one more in every 64-byte block
                positions |= {rng.randrange(s, min(s + 64, size)) for s in range(0, size, 64)}
            for pos in sorted(positions):
                yield _flip(rel, [pos], rng)
            yield _flip(rel, rng.sample(range(size), min(3, size)), rng)  # several at once
        elif kind == "truncate":
            for keep in sorted({0, size // 2, size - 1}):
                yield _truncate(rel, size, keep)
        elif kind == "delete":
            yield _delete(rel, size)
        elif kind == "append":
            yield _append(rel, rng.randbytes(16))
            if thorough:
                yield _append(rel, b"\0")
    if kind == "swap":
        for k in ("shard", "object"):
            files = sorted(r for r, v in target.kinds.items() if v == k)
            pairs = list(itertools.combinations(files, 2))
            if k == "object" and not thorough:  # every object once, with its neighbour
                pairs = list(zip(files, files[1:] + files[:1], strict=True))
            for a, b in pairs:
                yield _swap(a, b, sizes)


@contextlib.contextmanager
def damaged(root: Path, damage: Damage) -> Iterator[None]:
    """Apply ``damage`` under ``root``; restore every file it touched afterwards."""
    saved = {rel: (root / rel).read_bytes() for rel in damage.hits}
    damage.apply(root)
    try:
        yield
    finally:
        for rel, data in saved.items():
            (root / rel).write_bytes(data)


# --------------------------------------------------------------- checks


def _names_file(text: str, rels: list[str]) -> bool:
    return any(Path(rel).name in text for rel in rels)


def _run_cli(ckpt: Path) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(["verify", str(ckpt)])
    return code, out.getvalue() + err.getvalue()


def check_case(target: Target, damage: Damage) -> tuple[bool, list[str]]:
    """Whether ``damage`` was detected (every checkpoint reaching it refused to load
    and failed ``aptckpt verify``), and every way it was missed or misreported."""
    failures = []
    detected = True
    files = list(damage.hits)
    readers = set().union(*(target.reach[rel] for rel in files))
    for ckpt in target.checkpoints:
        name = ckpt.name
        if ckpt not in readers:  # damage elsewhere in the store must not spread
            try:
                aptckpt.load(ckpt)
            except Exception as err:  # any exception is the failure
                failures.append(f"{name}: does not reach it, yet load raised {err!r}")
            continue
        hit = set().union(*(target.hit(rel, ckpt, spans) for rel, spans in damage.hits.items()))
        g = target.granule
        blamable = set().union(
            *(
                target.hit(rel, ckpt, [(a // g * g, -(-b // g) * g) for a, b in spans])
                for rel, spans in damage.hits.items()
            )
        )
        if damage.appended:
            blamable |= set().union(*(target.hit(rel, ckpt, [(0, 1 << 62)]) for rel in damage.hits))
        refused = True
        for how, options in LOADS.items():  # a copying load and a memory-mapped one
            try:
                aptckpt.load(ckpt, **options)
            except AptckptError as err:
                text = str(err)
                named = getattr(err, "tensor", None)
                if not _names_file(text, files):
                    failures.append(f"{name}: {how} error does not name {files}: {text}")
                if hit and not any(k in text for k in hit):
                    failures.append(f"{name}: {how} error names none of {sorted(hit)}: {text}")
                if named is not None and named not in blamable:
                    failures.append(f"{name}: {how} error blames intact tensor {named!r}: {text}")
            except Exception as err:  # any other type is the failure
                failures.append(
                    f"{name}: {how} raised {type(err).__name__}, not AptckptError: {err}"
                )
                refused = False
            else:
                failures.append(f"{name}: {how} returned data")
                refused = False
        detected = detected and refused
        if not refused:
            continue
        code, text = _run_cli(ckpt)
        detected = detected and code != 0
        # With its manifest gone an empty directory (a delta checkpoint) is no longer
        # a checkpoint at all: "nothing to verify" is a usage error (2).
        emptied = not any(ckpt.iterdir())
        if code != (2 if emptied else 1):
            failures.append(f"{name}: aptckpt verify exited {code}: {text}")
        if "Traceback" in text:
            failures.append(f"{name}: aptckpt verify printed a traceback: {text}")
        if not _names_file(text, files):
            failures.append(f"{name}: aptckpt verify does not name {files}: {text}")
        if hit and not any(k in text for k in hit):
            failures.append(f"{name}: aptckpt verify names none of {sorted(hit)}: {text}")
    return detected, failures


# --------------------------------------------------------------- the sweep


@dataclass
class Tally:
    tried: Counter[str] = field(default_factory=Counter)
    detected: Counter[str] = field(default_factory=Counter)  # refused by load and verify
    named: Counter[str] = field(default_factory=Counter)  # ...and every check passed


@pytest.fixture(scope="module")
def tally(request: pytest.FixtureRequest) -> Iterator[Tally]:
    counts = Tally()
    yield counts
    for backend in BACKENDS:
        if counts.tried[backend]:
            terminal_line(
                request.config,
                f"corruption sweep: {backend}: {counts.tried[backend]} corruptions tried, "
                f"{counts.detected[backend]} detected, {counts.named[backend]} named correctly",
            )


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Target]:
    return {b: BUILDERS[b](tmp_path_factory.mktemp(b)) for b in BACKENDS}


def sweep(target: Target, kind: str, tally: Tally, *, thorough: bool) -> None:
    for ckpt in target.checkpoints:  # pristine before...
        aptckpt.verify(ckpt)
    failures = []
    for damage in damages(target, kind, thorough=thorough):
        with damaged(target.root, damage):
            detected, problems = check_case(target, damage)
        tally.tried[target.backend] += 1
        tally.detected[target.backend] += detected
        if problems:
            failures.append(f"{damage.label}:\n    " + "\n    ".join(problems))
        else:
            tally.named[target.backend] += 1
    for ckpt in target.checkpoints:  # ...and after: every damage was undone
        aptckpt.verify(ckpt)
    assert not failures, f"{len(failures)} corruption(s) missed or misreported:\n" + "\n".join(
        failures[:20]
    )


KINDS = ("flip", "truncate", "delete", "append", "swap")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_damage_is_detected_and_named(targets, tally, backend, kind):
    sweep(targets[backend], kind, tally, thorough=False)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_damage_is_detected_and_named_thorough(targets, tally, backend, kind):
    sweep(targets[backend], kind, tally, thorough=True)


def test_the_sweep_reaches_every_kind_of_file(targets):
    """The corpus is what the sweep claims: many shards and objects, data in each."""
    zstd, torch_, delta = targets["zstd"], targets["torch"], targets["delta"]
    assert Counter(zstd.kinds.values())["shard"] >= 4
    objects = [r for r, k in delta.kinds.items() if k == "object"]
    assert len(objects) >= 30 and all(delta.regions[r] for r in objects)
    shared = [r for r in objects if len(delta.reach[r]) > 1]
    assert shared and len(shared) < len(objects)  # some objects shared, some not
    assert len(torch_.regions["ckpt/state.pt"]) == 6  # the non-empty tensors


def test_flip_in_a_zip_header_blames_no_tensor(targets):
    """Damage outside tensor bytes (here: torch's pickle) names the file, not a tensor."""
    target = targets["torch"]
    pkl = next(s for n, s in _zip_records(target.root / "ckpt/state.pt").items() if "data.pkl" in n)
    rel = "ckpt/state.pt"
    damage = _flip(rel, [pkl[0] + 3], random.Random(0))
    assert not target.hit(rel, target.checkpoints[0], damage.hits[rel])
    with damaged(target.root, damage):
        assert check_case(target, damage) == (True, [])


def test_message_names_key_path_and_offset(targets):
    """The exact shape of a chunk-damage message: checkpoint, tensor, chunk, file, where."""
    target = targets["zstd"]
    rel, regions = next((r, g) for r, g in target.regions.items() if g)
    start, _, ckpt, key = regions[-1]
    flip = _flip(rel, [start], random.Random(0))
    with damaged(target.root, flip), pytest.raises(AptckptError) as info:
        aptckpt.load(ckpt)
    text = str(info.value)
    assert re.search(rf"tensor {re.escape(key)}, chunk \d+", text), text
    assert f"file '{Path(rel).name}', offset {start}" in text, text
    assert str(ckpt) in text


def test_deleted_manifest_is_not_a_checkpoint(targets):
    target = targets["zstd"]
    ckpt = target.checkpoints[0]
    with damaged(target.root, _delete("ckpt/manifest.msgpack", 1)):
        with pytest.raises(CheckpointNotFoundError, match=r"no manifest\.msgpack"):
            aptckpt.load(ckpt)
        code, text = _run_cli(ckpt)
    assert code == 1 and "manifest.msgpack" in text, text

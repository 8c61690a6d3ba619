"""Hostile checkpoints: only aptckpt errors come out; nothing runs, hangs or over-allocates.

An attacker controls every byte of a checkpoint and can compute every checksum
and digest, so hostile manifests here are built with the library's own encoder
(:func:`aptckpt.manifest.pack_document`, which seals them with a valid
checksum) and data files come with matching digests: they reach the deep
validation, not just the checksum. For each one ``load`` (verification on and
off), ``inspect``, ``verify`` and ``aptckpt verify`` must either succeed or
raise an :class:`~aptckpt.errors.AptckptError` -- no other exception, no crash,
and no hang: every call runs under a deadline.

What is covered: malformed msgpack; a wrong type in every field of every
backend's manifest; random mutations anywhere (hypothesis); huge and negative
sizes, counts, offsets, overlapping chunks; unknown dtypes and codecs; skeletons
nested as deep as msgpack allows; absolute and ``..`` paths; links, FIFOs and
directories where files belong; bogus store markers; random bytes behind valid
digests (zstd frames, store objects, ``state.pt``); claims of terabyte tensors
(refused before allocating, checked by spying on ``torch.empty`` and in a
subprocess under ``RLIMIT_AS``); code-running pickles in ``state.pt``.

At the end of the module the counts go to the terminal: ``fuzz: N hostile
checkpoints tried: N refused, N loaded``. ``-m slow`` runs many more examples.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aptckpt
from aptckpt import manifest as mf
from aptckpt.cli import main as cli_main
from aptckpt.errors import (
    AptckptError,
    FormatError,
    IntegrityError,
    UnsafePathError,
    UnsupportedObjectError,
)
from aptckpt.testing.samples import small_state
from aptckpt.testing.strategies import hostile_values, mutated
from conftest import terminal_line

BACKENDS = ("torch", "zstd", "delta")
DEADLINE = 20.0  # seconds per call; a hang fails the test instead of stalling it
MANIFEST = mf.MANIFEST_NAME
SLOW = settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))


# ------------------------------------------------------------------ harness


class Hang(BaseException):
    """A call ran past its deadline (a BaseException, so no ``except Exception``
    in the library can mistake it for a damaged file)."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _cli_verify(path: Path) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli_main(["verify", str(path)])
    assert code in (0, 1, 2), out.getvalue()
    assert "Traceback" not in out.getvalue()


CALLS: tuple[tuple[str, Callable[[Path], Any]], ...] = (
    ("load", aptckpt.load),
    ("load(verify=False)", lambda p: aptckpt.load(p, verify=False)),
    ("inspect", aptckpt.inspect),
    ("verify", aptckpt.verify),
    ("aptckpt verify", _cli_verify),
)

TALLY: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if TALLY["tried"]:
        terminal_line(
            request.config,
            f"fuzz: {TALLY['tried']} hostile checkpoints tried: {TALLY['refused']} refused "
            f"with an aptckpt error, {TALLY['loaded']} loaded (harmless changes)",
        )


def probe(ckpt: Path, *, seconds: float = DEADLINE) -> dict[str, str]:
    """Run every reader on ``ckpt``: each succeeds or raises an AptckptError (any
    other exception propagates and fails the test). Returns the outcome of each."""
    outcomes = {}
    for name, call in CALLS:
        with deadline(seconds):
            try:
                call(ckpt)
            except AptckptError as err:
                outcomes[name] = type(err).__name__
            else:
                outcomes[name] = "ok"
    TALLY["tried"] += 1
    refused = all(v != "ok" for k, v in outcomes.items() if k.startswith(("load", "verify")))
    TALLY["refused" if refused else "loaded"] += 1
    return outcomes


def refused(ckpt: Path, error: type[AptckptError] = AptckptError) -> dict[str, str]:
    """``probe`` where every loading call must fail, with ``error`` for ``load``."""
    outcomes = probe(ckpt)
    assert outcomes["load"] != "ok" and outcomes["load(verify=False)"] != "ok", outcomes
    assert outcomes["verify"] != "ok", outcomes
    with pytest.raises(error):
        aptckpt.load(ckpt)
    return outcomes


# ------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A run directory per backend holding a committed checkpoint ``ckpt``."""
    roots = {}
    for backend in BACKENDS:
        root = tmp_path_factory.mktemp(f"pristine-{backend}")
        options: dict[str, Any] = {"chunk_size": 64}
        if backend == "zstd":
            options["shard_size"] = 256
        if backend == "delta":  # the tensors under 100 bytes in its shard, the rest objects
            options["local_below"] = 100
            options["pack_below"] = 0  # loose object files (packs: tests/test_delta_packs.py)
        aptckpt.save(small_state(), root / "ckpt", backend=backend, **options)
        roots[backend] = root
    return roots


@contextlib.contextmanager
def copy_of(root: Path) -> Iterator[Path]:
    """A scratch copy of a pristine run directory; yields its checkpoint."""
    scratch = Path(tempfile.mkdtemp(prefix="aptckpt-fuzz-"))
    try:
        shutil.copytree(root, scratch / "run", symlinks=True)
        yield scratch / "run" / "ckpt"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def read_doc(ckpt: Path) -> dict[str, Any]:
    doc = msgpack.unpackb((ckpt / MANIFEST).read_bytes(), raw=False)
    assert isinstance(doc, dict)
    return doc


def write_doc(ckpt: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` as the manifest, sealed with a valid checksum (as an attacker can)."""
    (ckpt / MANIFEST).write_bytes(mf.pack_document(doc))


def write_doc_raw(ckpt: Path, doc: dict[str, Any], field: str, raw: bytes) -> None:
    """Like :func:`write_doc`, with the msgpack bytes of ``field`` spliced in as given
    (deeper than msgpack's packer nests), and the checksum recomputed over them."""
    marker = b"\x00splice-me\x00"
    sealed = mf.pack_document({**doc, field: marker})
    packed_marker = msgpack.packb(marker, use_bin_type=True)
    assert sealed.count(packed_marker) == 1
    body = sealed[:-16].replace(packed_marker, raw)
    (ckpt / MANIFEST).write_bytes(body + xxhash.xxh3_128_digest(body))


def test_sealed_manifests_pass_the_checksum(pristine):
    """The harness's premise: a rewritten manifest is not refused for its checksum."""
    with copy_of(pristine["zstd"]) as ckpt:
        doc = read_doc(ckpt)
        doc["metadata"] = "changed"
        write_doc(ckpt, doc)
        assert aptckpt.inspect(ckpt).metadata == "changed"
        write_doc_raw(ckpt, doc, "metadata", msgpack.packb("spliced"))
        assert aptckpt.inspect(ckpt).metadata == "spliced"
        aptckpt.verify(ckpt)


# ------------------------------------------------------------------ manifests


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"\x80",  # empty map
        b"\xdf\xff\xff\xff\xff",  # map claiming 4 billion entries
        b"\xdd\xff\xff\xff\xff",  # array claiming 4 billion items
        b"\xdb\xff\xff\xff\xff" + b"x",  # str claiming 4 GB
        b"\x91" * 5000 + b"\x00",  # nested past msgpack's stack
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"format": "aptckpt", "format_version": 2}),
        msgpack.packb({"format": "aptckpt", "format_version": 1}),
        msgpack.packb({"format": "aptckpt", "format_version": 2**64 - 1}),
        msgpack.packb({1: 2}),
    ],
)
def test_malformed_manifest_bytes(pristine, data):
    with copy_of(pristine["zstd"]) as ckpt:
        (ckpt / MANIFEST).write_bytes(data)
        refused(ckpt)


WRONG = [None, -1, 2**64 - 1, "x", b"\x00" * 16, [], {}, 1.5, True, [[]], {"": None}]


def _places(doc: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every field of a manifest, but only the first and last item of long lists."""
    if path:
        yield path
    if isinstance(doc, dict):
        for key, value in doc.items():
            if path or key != "checksum":
                yield from _places(value, (*path, key))
    elif isinstance(doc, list):
        indexes = range(len(doc)) if len(doc) <= 2 else (0, len(doc) - 1)
        for index in indexes:
            yield from _places(doc[index], (*path, index))


@pytest.mark.core_independent
@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_type_in_every_field(pristine, backend):
    """Every field, nested ones included, replaced by values of every wrong type."""
    with copy_of(pristine[backend]) as ckpt:
        doc = read_doc(ckpt)
        places = list(_places(doc))
        assert len(places) > 40
        for path in places:
            for value in WRONG:
                bad = copy.deepcopy(doc)
                parent = bad
                for step in path[:-1]:
                    parent = parent[step]
                parent[path[-1]] = value
                write_doc(ckpt, bad)
                try:
                    probe(ckpt)
                except BaseException as err:
                    raise AssertionError(f"field {path} = {value!r}: {err!r}") from err


def _fuzz_manifest(pristine: dict[str, Path], backend: str, data: st.DataObject) -> None:
    with copy_of(pristine[backend]) as ckpt:
        doc = data.draw(mutated(read_doc(ckpt)), label="manifest")
        write_doc(ckpt, doc)
        probe(ckpt)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_manifests(pristine, backend, data):
    _fuzz_manifest(pristine, backend, data)


@given(doc=st.dictionaries(st.text(max_size=15), hostile_values()))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_arbitrary_documents(pristine, doc):
    with copy_of(pristine["zstd"]) as ckpt:
        write_doc(ckpt, {"format": "aptckpt", "format_version": 2, **doc})
        probe(ckpt)


# ------------------------------------------------------------------ sizes, counts, offsets


def _set_tensor(doc: dict[str, Any], index: int, **fields: Any) -> None:
    doc["tensors"][index].update(fields)


def _only_tensor(doc: dict[str, Any], dtype: str, shape: list[int]) -> None:
    """Make the manifest describe a single tensor ``w``."""
    doc["tensors"] = [{"dtype": dtype, "shape": shape}]
    doc["tree"] = ["dict", ["w", ["tensor", 0]]]


def _huge_zstd(doc: dict[str, Any]) -> None:
    """One tensor of 2**40 bytes in 1024 chunks of 2**30, each row naming the same
    small zstd frame of the shard (shaped like a valid row)."""
    p = doc["payload"]
    frame = next(r for r in _rows(doc) if r[5] is not None)
    _only_tensor(doc, "float32", [2**38])
    p["chunk_size"] = 2**30
    p["chunks"] = [[list(frame) for _ in range(1024)]]


def _huge_zstd_raw(doc: dict[str, Any]) -> None:
    """As _huge_zstd, with every raw chunk of the shards, in file order, repeated."""
    p = doc["payload"]
    rows = [r for r in _rows(doc) if r[5] is None]
    _only_tensor(doc, "float32", [2**38])
    p["chunk_size"] = 2**30
    p["chunks"] = [[list(rows[i % len(rows)]) for i in range(1024)]]


def _huge_delta(doc: dict[str, Any]) -> None:
    """One tensor of 2**40 bytes whose 1024 chunks all name one zstd object that
    claims to decode to 2**30 bytes."""
    p = doc["payload"]
    obj = next(o for o in p["objects"] if o[1] < o[2])  # a compressed object
    _only_tensor(doc, "float32", [2**38])
    p["chunk_size"] = 2**30
    p["objects"] = [[obj[0], obj[1], 2**30, obj[3], obj[4], None]]
    p["chunks"] = [[0] * 1024]


def _huge_delta_plausible(doc: dict[str, Any]) -> None:
    """As _huge_delta, but the row is self-consistent -- 2**25 stored bytes, which a
    zstd frame can expand to 2**30 -- and the store's object is not that size."""
    _huge_delta(doc)
    doc["payload"]["objects"][0][1] = 2**25


def _small_chunks_huge_tensor(doc: dict[str, Any]) -> None:
    """2**66 bytes in 16-byte chunks: counting them must not enumerate them."""
    _only_tensor(doc, "complex128", [2**62])
    doc["payload"]["chunk_size"] = 16
    doc["payload"]["chunks"] = [[]]


def _huge_torch(doc: dict[str, Any]) -> None:
    _set_tensor(doc, 0, shape=[2**38], dtype="float32")


HUGE = {
    "zstd": [_huge_zstd, _huge_zstd_raw, _small_chunks_huge_tensor],
    "delta": [_huge_delta, _huge_delta_plausible, _small_chunks_huge_tensor],
    "torch": [_huge_torch],
}
HUGE_CASES = [(b, f) for b, fs in HUGE.items() for f in fs]


@pytest.mark.parametrize(("backend", "mutate"), HUGE_CASES, ids=lambda v: getattr(v, "__name__", v))
def test_huge_claims_fail_before_allocating(pristine, monkeypatch, backend, mutate):
    """A manifest claiming a terabyte tensor over a file of a few hundred bytes is
    refused before anything near that size is allocated."""
    allocated: list[int] = []
    empty = torch.empty

    def spy(*size: Any, dtype: torch.dtype | None = None, **kw: Any) -> torch.Tensor:
        shape = size[0] if len(size) == 1 and not isinstance(size[0], int) else size
        numel = 1
        for d in shape:
            numel *= int(d)
        allocated.append(numel * (dtype or torch.float32).itemsize)
        return empty(*size, dtype=dtype, **kw)

    with copy_of(pristine[backend]) as ckpt:
        doc = read_doc(ckpt)
        mutate(doc)
        write_doc(ckpt, doc)
        monkeypatch.setattr(torch, "empty", spy)
        refused(ckpt)
    assert max(allocated, default=0) < 1 << 20, f"allocated {max(allocated)} bytes"


def test_huge_claims_under_an_address_space_limit(pristine, tmp_path):
    """The same claims in a process whose address space cannot hold them: every call
    still ends in an aptckpt error (a 4 TiB allocation attempt would not)."""
    cases = []
    for backend, mutate in HUGE_CASES:
        dest = tmp_path / f"{backend}-{mutate.__name__}"
        shutil.copytree(pristine[backend], dest, symlinks=True)
        doc = read_doc(dest / "ckpt")
        mutate(doc)
        write_doc(dest / "ckpt", doc)
        cases.append(str(dest / "ckpt"))
    script = textwrap.dedent(
        """
        import json, resource, sys
        import aptckpt
        from aptckpt.errors import AptckptError
        with open("/proc/self/status") as f:
            vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), vm + (1 << 30)))
        out = {}
        for path in sys.argv[1:]:
            for verify in (True, False):
                try:
                    aptckpt.load(path, verify=verify)
                    out[f"{path} {verify}"] = "ok"
                except AptckptError as err:
                    out[f"{path} {verify}"] = type(err).__name__
        print(json.dumps(out))
        """
    )
    env = {**os.environ, "APTCKPT_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, "-c", script, *cases], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcomes = json.loads(proc.stdout)
    assert len(outcomes) == 2 * len(cases) and "ok" not in outcomes.values(), outcomes


def _rows(doc: dict[str, Any]) -> list[list[Any]]:
    return [r for t in doc["payload"]["chunks"] for r in t]


ZSTD_TABLE_ATTACKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "negative offset": lambda d: _rows(d)[0].__setitem__(1, -1),
    "offset past end": lambda d: _rows(d)[0].__setitem__(1, 2**63),
    "length past end": lambda d: _rows(d)[0].__setitem__(2, 2**40),
    "zero length": lambda d: _rows(d)[0].__setitem__(2, 0),
    "overlap": lambda d: _rows(d)[1].__setitem__(1, _rows(d)[0][1]),
    "out of order": lambda d: d["payload"]["chunks"].reverse(),
    "file index": lambda d: _rows(d)[0].__setitem__(0, 99),
    "negative file": lambda d: _rows(d)[0].__setitem__(0, -1),
    "codec index": lambda d: _rows(d)[0].__setitem__(3, 2**32),
    "short digest": lambda d: _rows(d)[0].__setitem__(4, b"x"),
    "too many chunks": lambda d: d["payload"]["chunks"][0].append(_rows(d)[0]),
    "too few chunks": lambda d: d["payload"]["chunks"][0].pop(),
    "file size": lambda d: d["files"][0].__setitem__("size", -5),
    "file size huge": lambda d: d["files"][0].__setitem__("size", 2**64 - 1),
    "file twice": lambda d: d["files"].append(dict(d["files"][0])),
    "no files": lambda d: d.__setitem__("files", []),
    "negative dim": lambda d: _set_tensor(d, 0, shape=[-1]),
    "65 dims": lambda d: _set_tensor(d, 0, shape=[1] * 65),
    "numel overflow": lambda d: _set_tensor(d, 0, shape=[2**62, 2**62]),
    "unknown dtype": lambda d: _set_tensor(d, 0, dtype="float128"),
    "dtype as int": lambda d: _set_tensor(d, 0, dtype=7),
    "unknown codec": lambda d: d["payload"]["codecs"].append([{"id": "lz4"}]),
    "xor codec": lambda d: d["payload"]["codecs"].__setitem__(0, [{"id": "xor"}]),
    "shuffle 0": lambda d: d["payload"]["codecs"].append([{"id": "shuffle", "itemsize": 0}]),
    "shuffle 17": lambda d: d["payload"]["codecs"].append([{"id": "shuffle", "itemsize": 17}]),
    "steps reversed": lambda d: d["payload"]["codecs"].append([{"id": "zstd"}, {"id": "xor"}]),
    "step twice": lambda d: d["payload"]["codecs"].append([{"id": "zstd"}, {"id": "zstd"}]),
    "chunk_size 0": lambda d: d["payload"].__setitem__("chunk_size", 0),
    "chunk_size odd": lambda d: d["payload"].__setitem__("chunk_size", 17),
    "chunk_size huge": lambda d: d["payload"].__setitem__("chunk_size", 2**62),
    "tensor never used": lambda d: d["tensors"].append(dict(d["tensors"][0])),
}


@pytest.mark.parametrize("attack", sorted(ZSTD_TABLE_ATTACKS))
def test_hostile_zstd_tables(pristine, attack):
    with copy_of(pristine["zstd"]) as ckpt:
        doc = read_doc(ckpt)
        ZSTD_TABLE_ATTACKS[attack](doc)
        write_doc(ckpt, doc)
        refused(ckpt)


@pytest.mark.parametrize(
    ("tensor", "fields"),
    [
        ("ids", {"device": "cuda:99"}),
        ("ids", {"device": "nonsense"}),
        ("ids", {"device": "x" * 64}),
        ("ids", {"device": "cuda:-1"}),
        ("ids", {"device": "meta"}),
        ("ids", {"device": "hpu"}),
        ("ids", {"parameter": True, "requires_grad": True}),
        ("ids", {"requires_grad": True}),
    ],
    ids=repr,
)
def test_hostile_tensor_records(pristine, tensor, fields):
    """Devices that do not exist or hold no data, and flags a dtype cannot have: load
    refuses them (verify checks bytes, not devices, and may pass)."""
    with copy_of(pristine["zstd"]) as ckpt:
        doc = read_doc(ckpt)
        index = ["w", "b", "ids", "zeros", "m"].index(tensor)
        _set_tensor(doc, index, **fields)
        write_doc(ckpt, doc)
        outcomes = probe(ckpt)
        assert outcomes["load"] != "ok" and outcomes["load(verify=False)"] != "ok", outcomes


# ------------------------------------------------------------------ skeletons


def _nested(depth: int, kind: str) -> Any:
    node: Any = ["tensor", 0] if kind != "metadata" else 1
    for i in range(depth):
        node = ["list", [node]] if i % 2 else ["dict", ["k", node]]
    return node


def _nested_raw(depth: int) -> bytes:
    """msgpack of ``["list", [["list", [... 1 ...]]]]``, ``depth`` containers deep."""
    return b"\x92\xa4list\x91" * depth + b"\x01"


@pytest.mark.parametrize("field", ["tree", "metadata"])
@pytest.mark.parametrize("depth", [201, 250, 505])
def test_deep_skeletons_are_refused_without_recursion(pristine, field, depth):
    """Nesting past the format's 200 levels, up to what msgpack itself decodes
    (about 510 containers of two msgpack levels each), is a FormatError, never a
    RecursionError -- also from a caller already deep in its own stack."""
    with copy_of(pristine["zstd"]) as ckpt:
        doc = read_doc(ckpt)
        if depth <= 250:
            doc[field] = _nested(depth, field)
            write_doc(ckpt, doc)
        else:
            write_doc_raw(ckpt, doc, field, _nested_raw(depth))

        def deep(n: int) -> dict[str, str]:
            return deep(n - 1) if n else probe(ckpt)

        outcomes = deep(sys.getrecursionlimit() // 2)  # half the stack already used
        assert outcomes["load" if field == "tree" else "inspect"] == "FormatError", outcomes


def test_skeleton_at_the_nesting_limit_loads(tmp_path):
    """The other side of the limit: the deepest state the writer accepts loads back."""
    state: Any = torch.ones(2)
    plain: Any = 1
    for i in range(200):
        state = [state] if i % 2 else {"k": state}
        plain = [plain] if i < 199 else plain  # under the metadata's own dict: 200 levels
    aptckpt.save(state, tmp_path / "c", metadata={"deep": plain})
    loaded = aptckpt.load(tmp_path / "c")
    for i in reversed(range(200)):
        loaded = loaded[0] if i % 2 else loaded["k"]
    assert torch.equal(loaded, torch.ones(2))
    assert aptckpt.inspect(tmp_path / "c").metadata == {"deep": plain}
    with pytest.raises(UnsupportedObjectError, match="nesting deeper than 200"):
        aptckpt.save([state], tmp_path / "d")


@pytest.mark.parametrize(
    "node",
    [
        ["size", [2**63]],
        ["size", [2**64 - 1]],
        ["size", "x"],
        ["int", "z" * 10],
        ["int", "f" * 300000],
        ["dtype", "float128"],
        ["device", "cuda:99999999999999999999"],
        ["device", "nonsense"],
        ["complex", 1, 2],
        ["tensor", 5],
        ["tensor", -1],
        ["dict", ["k"]],
        ["dict", [["list", []], 1]],
        ["odict", ["k", 1], ["tensor", 9]],
        ["frobnicate", 1],
        [],
        [1, 2],
    ],
    ids=repr,
)
def test_hostile_skeleton_nodes(pristine, node):
    for backend in ("zstd", "torch"):
        with copy_of(pristine[backend]) as ckpt:
            doc = read_doc(ckpt)
            write_doc(ckpt, {**doc, "tree": ["dict", ["x", node, "t", doc["tree"]]]})
            refused(ckpt)
            write_doc(ckpt, {**doc, "metadata": ["list", [node]]})
            assert probe(ckpt)["inspect"] == "FormatError"


# ------------------------------------------------------------------ paths and links


@pytest.mark.parametrize(
    "path",
    ["/etc/passwd", "../ckpt2/shard-00000.bin", "a/../../x", "sub/../shard", ".hidden", "a\\b", ""],
)
def test_data_file_paths_leaving_the_checkpoint(pristine, path):
    with copy_of(pristine["zstd"]) as ckpt:
        doc = read_doc(ckpt)
        doc["files"][0]["path"] = path
        write_doc(ckpt, doc)
        refused(ckpt, UnsafePathError)


@pytest.mark.parametrize(
    "store",
    [
        {"up": 1, "name": ".."},
        {"up": 1, "name": "../../etc"},
        {"up": 1, "name": "a/b"},
        {"up": 1, "name": "/"},
        {"up": 0, "name": "aptckpt-store"},
        {"up": 17, "name": "aptckpt-store"},
        {"up": -1, "name": "aptckpt-store"},
        {"up": 2**64 - 1, "name": "aptckpt-store"},
        {"up": 16, "name": "aptckpt-store"},  # above '/' or a directory that is no store
        {"up": 2, "name": "run"},  # a directory that is not a store
        {"up": 1, "name": "ckpt"},  # the checkpoint itself
        {"up": "1", "name": "aptckpt-store"},
        {},
    ],
    ids=repr,
)
def test_store_locations(pristine, store):
    with copy_of(pristine["delta"]) as ckpt:
        doc = read_doc(ckpt)
        doc["payload"]["store"] = store
        write_doc(ckpt, doc)
        refused(ckpt)


def _outside(ckpt: Path) -> Path:
    return ckpt.parent.parent / "outside"


def _link_data_file(ckpt: Path) -> None:
    """The shard, moved out of the run, replaced by a link to it (same bytes)."""
    shard = ckpt / "shard-00000.bin"
    _outside(ckpt).mkdir()
    shutil.move(shard, _outside(ckpt) / shard.name)
    shard.symlink_to(_outside(ckpt) / shard.name)


def _link_subdir(ckpt: Path) -> None:
    """Data in a subdirectory that is a link to a directory outside the run."""
    doc = read_doc(ckpt)
    _outside(ckpt).mkdir()
    shutil.move(ckpt / "shard-00000.bin", _outside(ckpt) / "shard-00000.bin")
    (ckpt / "sub").symlink_to(_outside(ckpt))
    doc["files"][0]["path"] = "sub/shard-00000.bin"
    write_doc(ckpt, doc)


def _link_state_file(ckpt: Path) -> None:
    state = ckpt / "state.pt"
    _outside(ckpt).mkdir()
    shutil.move(state, _outside(ckpt) / state.name)
    state.symlink_to(_outside(ckpt) / state.name)


def _objects(ckpt: Path) -> Path:
    return ckpt.parent / "aptckpt-store" / "objects"


def _link_object(ckpt: Path) -> None:
    obj = sorted(_objects(ckpt).iterdir())[0]
    _outside(ckpt).mkdir()
    shutil.move(obj, _outside(ckpt) / obj.name)
    obj.symlink_to(_outside(ckpt) / obj.name)


def _link_objects_dir(ckpt: Path) -> None:
    shutil.move(_objects(ckpt), _outside(ckpt))
    _objects(ckpt).symlink_to(_outside(ckpt))


def _link_marker(ckpt: Path) -> None:
    marker = ckpt.parent / "aptckpt-store" / "STORE"
    _outside(ckpt).mkdir()
    shutil.move(marker, _outside(ckpt) / "STORE")
    marker.symlink_to(_outside(ckpt) / "STORE")


def _link_store_to_a_non_store(ckpt: Path) -> None:
    store = ckpt.parent / "aptckpt-store"
    shutil.rmtree(store)
    _outside(ckpt).mkdir()
    (_outside(ckpt) / "objects").mkdir()
    store.symlink_to(_outside(ckpt))


LINKS = {
    "zstd": [_link_data_file, _link_subdir],
    "torch": [_link_state_file],
    "delta": [_link_object, _link_objects_dir, _link_marker, _link_store_to_a_non_store],
}


@pytest.mark.parametrize(
    ("backend", "attack"),
    [(b, f) for b, fs in LINKS.items() for f in fs],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_links_out_of_the_run_are_refused(pristine, backend, attack):
    with copy_of(pristine[backend]) as ckpt:
        attack(ckpt)
        refused(ckpt)


def test_subdirectory_without_link_loads(pristine):
    """The control for _link_subdir: a real subdirectory is fine."""
    with copy_of(pristine["zstd"]) as ckpt:
        doc = read_doc(ckpt)
        (ckpt / "sub").mkdir()
        shutil.move(ckpt / "shard-00000.bin", ckpt / "sub" / "shard-00000.bin")
        doc["files"][0]["path"] = "sub/shard-00000.bin"
        write_doc(ckpt, doc)
        assert probe(ckpt)["load"] == "ok"


@pytest.mark.parametrize("link", ["store", "objects"])
def test_gc_refuses_a_store_reached_through_a_link(tmp_path, link):
    """A hostile run directory whose store (or its objects/) links to another run's
    store: collecting garbage there would delete every object of the other run,
    since none of its checkpoints lies beneath the hostile directory."""
    state = {"w": torch.randn(1000)}
    aptckpt.save(state, tmp_path / "victim" / "s0", backend="delta")
    hostile = tmp_path / "hostile"
    store = tmp_path / "victim" / "aptckpt-store"
    if link == "store":
        hostile.mkdir()
        (hostile / "aptckpt-store").symlink_to(store)
    else:
        (hostile / "aptckpt-store").mkdir(parents=True)
        for name in ("STORE", "LOCK"):
            shutil.copy(store / name, hostile / "aptckpt-store" / name)
        (hostile / "aptckpt-store" / "objects").symlink_to(store / "objects")
    with pytest.raises(UnsafePathError, match="nothing was removed"):
        aptckpt.collect_garbage(hostile)
    assert torch.equal(aptckpt.load(tmp_path / "victim" / "s0")["w"], state["w"])


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


SPECIAL = {
    "zstd": lambda c: c / "shard-00000.bin",
    "torch": lambda c: c / "state.pt",
    "delta": lambda c: sorted(_objects(c).iterdir())[0],
}


_CHILD_PROBE = textwrap.dedent(
    """
    import json, sys
    import aptckpt
    from aptckpt.errors import AptckptError
    for path in sys.argv[1:]:
        out = {}
        for name, call in (
            ("load", aptckpt.load),
            ("load(verify=False)", lambda p: aptckpt.load(p, verify=False)),
            ("inspect", aptckpt.inspect),
            ("verify", aptckpt.verify),
        ):
            try:
                call(path)
                out[name] = "ok"
            except AptckptError as err:
                out[name] = type(err).__name__
        print(json.dumps([path, out]), flush=True)
    """
)


def test_fifos_and_directories_where_files_belong(pristine, tmp_path):
    """A FIFO where a data file or object belongs must not block the reader (open()
    of a FIFO waits for a writer) and a directory must not be read: both are refused
    as unsafe. Probed in a child process: a reader blocked in a worker thread cannot
    be interrupted, so a hang shows as cases the child never reported."""
    cases = {}
    for backend, where in SPECIAL.items():
        for make in (_fifo, _directory):
            dest = tmp_path / f"{backend}-{make.__name__}"
            shutil.copytree(pristine[backend], dest, symlinks=True)
            make(where(dest / "ckpt"))
            cases[str(dest / "ckpt")] = f"{backend} {make.__name__}"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD_PROBE, *cases],
            capture_output=True,
            text=True,
            timeout=120,
        )
        stdout = proc.stdout
    except subprocess.TimeoutExpired as err:
        stdout = (err.stdout or b"").decode()
    results = dict(json.loads(line) for line in stdout.splitlines())
    hung = [name for path, name in cases.items() if path not in results]
    assert not hung, f"readers blocked on: {hung}"
    for path, outcomes in results.items():
        expected = {"load": "UnsafePathError", "verify": "UnsafePathError", "inspect": "ok"}
        assert outcomes | expected == outcomes, (cases[path], outcomes)
        assert outcomes["load(verify=False)"] == "UnsafePathError", (cases[path], outcomes)


def test_fifo_as_store_marker(pristine):
    with copy_of(pristine["delta"]) as ckpt:
        _fifo(ckpt.parent / "aptckpt-store" / "STORE")
        with deadline(1), pytest.raises(AptckptError):  # refused, not blocked in open()
            aptckpt.load(ckpt)


@pytest.mark.parametrize(
    "marker",
    [
        b"",
        b"\xc1",
        msgpack.packb([]),
        msgpack.packb({"format": "aptckpt-store"}),
        msgpack.packb({"format": "aptckpt-store", "version": 0}),
        msgpack.packb({"format": "aptckpt-store", "version": 2}),
        msgpack.packb({"format": "aptckpt-store", "version": "1"}),
        msgpack.packb({"format": "aptckpt-store", "version": 2**64 - 1}),
        msgpack.packb({"format": "other", "version": 1}),
        msgpack.packb({"format": "aptckpt-store", "version": 1}) + b"\x00",
        b"\x81" + b"\xa1x" * 3000,
    ],
)
def test_bogus_store_markers(pristine, marker):
    with copy_of(pristine["delta"]) as ckpt:
        (ckpt.parent / "aptckpt-store" / "STORE").write_bytes(marker)
        refused(ckpt, FormatError)


def test_missing_store_marker(pristine):
    with copy_of(pristine["delta"]) as ckpt:
        (ckpt.parent / "aptckpt-store" / "STORE").unlink()
        refused(ckpt)


# ------------------------------------------------------------------ data behind valid digests


def _digest(data: bytes) -> bytes:
    return xxhash.xxh3_128_digest(data)


def _reseal_zstd(ckpt: Path, doc: dict[str, Any]) -> None:
    """Make every chunk's stored digest and every file size agree with the files."""
    files = [(ckpt / f["path"]).read_bytes() for f in doc["files"]]
    for f, data in zip(doc["files"], files, strict=True):
        f["size"] = len(data)
    for row in _rows(doc):
        file, offset, length = row[:3]
        if row[5] is not None:
            row[5] = _digest(files[file][offset : offset + length])
    write_doc(ckpt, doc)


def _reseal_torch(ckpt: Path, doc: dict[str, Any]) -> None:
    data = (ckpt / "state.pt").read_bytes()
    cs = doc["payload"]["chunk_size"]
    doc["files"][0]["size"] = len(data)
    doc["payload"]["digests"] = b"".join(_digest(data[i : i + cs]) for i in range(0, len(data), cs))
    write_doc(ckpt, doc)


def _fuzz_data(pristine: dict[str, Path], backend: str, data: st.DataObject) -> None:
    """Random bytes behind valid digests: the decoders (zstd frames, unshuffle, xor,
    torch.load's zip and pickle readers) see them, not just the digest checks."""
    with copy_of(pristine[backend]) as ckpt:
        doc = read_doc(ckpt)
        if backend == "delta":
            objects = sorted(_objects(ckpt).iterdir())
            target = data.draw(st.sampled_from(objects), label="object")
        elif backend == "zstd":
            target = ckpt / data.draw(st.sampled_from([f["path"] for f in doc["files"]]))
        else:
            target = ckpt / "state.pt"
        raw = bytearray(target.read_bytes())
        for _ in range(data.draw(st.integers(1, 8), label="edits")):
            at = data.draw(st.integers(0, max(0, len(raw) - 1)), label="at")
            action = data.draw(st.sampled_from(["flip", "set", "cut", "insert"]), label="edit")
            if action == "flip" and raw:
                raw[at] ^= 1 << data.draw(st.integers(0, 7))
            elif action == "set" and raw:
                raw[at] = data.draw(st.integers(0, 255))
            elif action == "cut":
                del raw[at : at + data.draw(st.integers(1, 64))]
            else:
                raw[at:at] = data.draw(st.binary(min_size=1, max_size=64))
        if backend == "delta":
            # The object renamed to the digest of its new bytes, the rows naming it updated.
            old = bytes.fromhex(target.name)
            new = _digest(bytes(raw))
            target.unlink()
            (target.parent / new.hex()).write_bytes(raw)
            for row in doc["payload"]["objects"]:
                if row[0] == old:
                    row[0], row[1] = new, len(raw)
            write_doc(ckpt, doc)
        else:
            target.write_bytes(raw)
            (_reseal_torch if backend == "torch" else _reseal_zstd)(ckpt, doc)
        probe(ckpt)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_bytes_behind_valid_digests(pristine, backend, data):
    _fuzz_data(pristine, backend, data)


@pytest.mark.parametrize("backend", ["zstd", "delta"])
def test_garbage_zstd_frames_are_codec_errors(pristine, backend):
    """Frames that are not zstd, declare the wrong size, or are cut short."""
    for garbage in (b"\x00" * 40, b"\x28\xb5\x2f\xfd" + b"\xff" * 40, b"\x28\xb5\x2f\xfd\x20"):
        with copy_of(pristine[backend]) as ckpt:
            doc = read_doc(ckpt)
            if backend == "zstd":
                row = next(r for r in _rows(doc) if r[5] is not None)
                shard = ckpt / doc["files"][row[0]]["path"]
                data = shard.read_bytes()
                stored = garbage[: row[2]].ljust(row[2], b"\x00")
                shard.write_bytes(data[: row[1]] + stored + data[row[1] + row[2] :])
                _reseal_zstd(ckpt, doc)
            else:
                p = doc["payload"]
                index = next(i for i, o in enumerate(p["objects"]) if o[1] < o[2])
                name = _digest(garbage)
                (_objects(ckpt) / p["objects"][index][0].hex()).unlink()
                (_objects(ckpt) / name.hex()).write_bytes(garbage)
                p["objects"][index][:2] = [name, len(garbage)]
                write_doc(ckpt, doc)
            with pytest.raises(IntegrityError, match="damaged"):
                aptckpt.load(ckpt, verify=False)
            probe(ckpt)


# ------------------------------------------------------------------ pickles


class _Call:
    """Pickles as a call of ``func(*args)``: what a malicious pickle does."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


def _global_call(module: str, name: str, arg: str, *, protocol: int) -> bytes:
    """A pickle that imports ``module.name`` and calls it with ``arg``, opcode by opcode."""
    text = arg.encode()
    if protocol >= 4:
        get = (
            b"\x8c" + bytes([len(module)]) + module.encode()
            + b"\x8c" + bytes([len(name)]) + name.encode() + b"\x93"
        )  # fmt: skip
        return b"\x80\x04" + get + b"X" + len(text).to_bytes(4, "little") + text + b"\x85R."
    if protocol == 0:
        return f"c{module}\n{name}\n(V{arg}\ntR.".encode()
    return (
        b"\x80\x02c" + f"{module}\n{name}\n".encode()
        + b"X" + len(text).to_bytes(4, "little") + text + b"\x85R."
    )  # fmt: skip


def _rewrite_member(path: Path, member: str, data: bytes) -> None:
    """Replace one member of the zip file at ``path``, keeping every other."""
    with zipfile.ZipFile(path) as zf:
        members = [(i, zf.read(i)) for i in zf.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for info, body in members:
            zf.writestr(info, data if info.filename.endswith(member) else body)


def _evil_torch_files(marker: Path) -> dict[str, Callable[[Path], None]]:
    touch = f"touch {marker}"
    pytouch = f"__import__('pathlib').Path({str(marker)!r}).touch()"

    def save(obj: Any) -> Callable[[Path], None]:
        return lambda path: torch.save(obj, path, pickle_protocol=2)

    def member(module: str, name: str, arg: str, protocol: int = 2) -> Callable[[Path], None]:
        def make(path: Path) -> None:
            torch.save({"w": torch.ones(2)}, path)
            _rewrite_member(path, "data.pkl", _global_call(module, name, arg, protocol=protocol))

        return make

    def legacy(path: Path) -> None:  # not a zip: the legacy torch.save format
        with open(path, "wb") as f:
            pickle.dump(_Call(os.system, touch), f, protocol=2)

    return {
        "top-level os.system": save(_Call(os.system, touch)),
        "nested os.system": save({"w": torch.ones(2), "x": [{"y": (1, _Call(os.system, touch))}]}),
        "nested eval": save({"opt": {"state": [_Call(eval, pytouch)]}}),
        "exec": save({"w": _Call(exec, pytouch)}),
        "subprocess": save([_Call(subprocess.call, ["touch", str(marker)])]),
        "GLOBAL os system": member("os", "system", touch),
        "GLOBAL posix system": member("posix", "system", touch),
        "GLOBAL builtins eval": member("builtins", "eval", pytouch),
        "GLOBAL builtins exec": member("builtins", "exec", pytouch),
        "GLOBAL __builtin__ eval": member("__builtin__", "eval", pytouch),
        "GLOBAL subprocess getoutput": member("subprocess", "getoutput", touch),
        "GLOBAL torch.serialization load": member("torch.serialization", "load", str(marker)),
        "STACK_GLOBAL builtins eval": member("builtins", "eval", pytouch, protocol=4),
        "protocol 0 os system": member("os", "system", touch, protocol=0),
        "legacy format": legacy,
    }


EVIL = sorted(_evil_torch_files(Path("/unused")))


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("variant", EVIL)
def test_code_running_pickles_are_refused(pristine, tmp_path, variant, verify):
    """A ``state.pt`` carrying code, with manifest size and digests made to match:
    refused with verification on and off, and the code never runs."""
    marker = tmp_path / "pwned"
    with copy_of(pristine["torch"]) as ckpt:
        _evil_torch_files(marker)[variant](ckpt / "state.pt")
        _reseal_torch(ckpt, read_doc(ckpt))
        with pytest.raises(AptckptError):
            aptckpt.load(ckpt, verify=verify)
        probe(ckpt)
    assert not marker.exists(), f"{variant}: the pickle ran code"


# ------------------------------------------------------------------ slow: many more examples


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@SLOW
@given(data=st.data())
def test_mutated_manifests_thorough(pristine, backend, data):
    _fuzz_manifest(pristine, backend, data)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@SLOW
@given(data=st.data())
def test_random_bytes_behind_valid_digests_thorough(pristine, backend, data):
    _fuzz_data(pristine, backend, data)

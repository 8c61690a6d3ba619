"""Chunk machinery shared by the chunked backends (``zstd``, ``delta``).

A tensor's bytes (contiguous, little-endian, C order) are cut into chunks of
``chunk_size`` bytes, the last one shorter. Each chunk is stored as one record
``[file, offset, length, codec, digest, stored_digest]``: the index of its data
file in the manifest's file list, where its stored bytes start and how many
there are, the index of its codec pipeline in the payload's codec table, the
XXH3-128 digest of its *raw* bytes (so a digest names content, whatever the
encoding), and for an encoded chunk the XXH3-128 of its stored bytes (nil for
a raw chunk, whose stored bytes are its raw bytes). The stored digest catches
damage that decodes to the same content -- a flipped bit that zstd ignores in a
frame header -- and is checked before any decompression.

This module parses and validates those records (every number is checked before
use, and no tensor is allocated that the stored bytes could not fill), opens the
data files -- naming, before anything is allocated, the chunks a missing or
truncated file loses -- and decodes chunks straight into their destination
tensors in parallel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import warnings
from collections import deque
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch

from aptckpt import _accel, _dtypes, _memory, tree
from aptckpt._config import MAX_CHUNK_SIZE
from aptckpt.codecs import MAX_ZSTD_RATIO, RAW, CodecError, Pipeline, scratch
from aptckpt.errors import (
    BackendError,
    FormatError,
    IntegrityError,
    StateChangedError,
)
from aptckpt.manifest import FileRecord, Manifest, TensorRecord
from aptckpt.storage.base import FileProblem, RawRead

if TYPE_CHECKING:
    from aptckpt.storage.base import DataFiles

__all__ = [
    "DIGEST_MISMATCH",
    "ChunkRecord",
    "FileProblem",
    "HostBytes",
    "RawPlace",
    "check_chunk_size",
    "check_common_options",
    "check_unchanged",
    "chunk_count",
    "chunk_damage",
    "chunk_spans",
    "combined",
    "decode_into",
    "file_problem",
    "fill_tensors",
    "host_bytes",
    "host_tensor",
    "locate_chunk",
    "ordered_map",
    "parse_chunk_table",
    "refuse_damaged_files",
    "refuse_unreadable",
    "state_changed",
]

DIGEST_SIZE = 16
T = TypeVar("T")
C = TypeVar("C")
R = TypeVar("R")


@dataclass(frozen=True)
class ChunkRecord:
    file: int
    offset: int
    length: int
    codec: int
    digest: bytes
    stored_digest: bytes | None = None

    def __init__(
        self,
        file: int,
        offset: int,
        length: int,
        codec: int,
        digest: bytes,
        stored_digest: bytes | None = None,
    ) -> None:
        # What the generated __init__ does, without its six object.__setattr__ calls: a load
        # makes one record per chunk (ten thousand for ten thousand small tensors).
        fields = self.__dict__
        fields["file"] = file
        fields["offset"] = offset
        fields["length"] = length
        fields["codec"] = codec
        fields["digest"] = digest
        fields["stored_digest"] = stored_digest

    def to_row(self) -> list[Any]:
        return [self.file, self.offset, self.length, self.codec, self.digest, self.stored_digest]


def check_chunk_size(value: object, *, where: str | None = None) -> int:
    if type(value) is not int or not 16 <= value <= MAX_CHUNK_SIZE or value % 16:
        raise FormatError(
            f"chunk_size {value!r} must be a multiple of 16 between 16 and {MAX_CHUNK_SIZE}",
            path=where,
        )
    return value


def check_common_options(level: object, chunk_size: object, threads: object) -> None:
    """Validate the options every chunked backend has; raise ``BackendError``."""
    if type(level) is not int or not -7 <= level <= 22:
        raise BackendError(f"zstd level {level!r} must be an int in -7..22")
    try:
        check_chunk_size(chunk_size)
    except FormatError as err:
        raise BackendError(str(err)) from None
    if threads is not None and (type(threads) is not int or threads < 1):
        raise BackendError(f"threads {threads!r} must be a positive int or None")


def chunk_spans(nbytes: int, chunk_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` byte ranges of the chunks of a buffer of ``nbytes``."""
    if nbytes <= chunk_size:  # most tensors of a large state are one chunk
        return [(0, nbytes)] if nbytes else []
    return [(s, min(s + chunk_size, nbytes)) for s in range(0, nbytes, chunk_size)]


def host_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor with the same values (no copy when already one).

    Conjugate and negative bits are resolved: they are lazy views whose stored
    bytes differ from their values.
    """
    t = tensor.detach()
    if t.is_cpu and _dtypes.holds_its_values(t):
        return t  # the common case, without the calls below
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t.to("cpu").contiguous()


@dataclass(frozen=True)
class HostBytes:
    """The bytes of a flat state's tensors on the host, for writers that store them as they
    are: ``hosts[i]`` holds the values of tensor ``i`` contiguously in CPU memory -- the
    caller's tensor itself wherever it already is such a tensor (``shared[i]``), else a copy
    (:func:`host_tensor`) -- and ``views[i]`` is a C-contiguous buffer of its ``nbytes[i]``
    bytes (a numpy array or a byte ``memoryview``; any buffer the core, ``bytes.join`` and
    the sinks take)."""

    hosts: list[torch.Tensor]
    views: list[Any]
    nbytes: list[int]
    #: The tensors whose view is the caller's memory, not empty, not made by a refresh: a
    #: check that nothing changed hashes those views again as they are.
    shared: list[int]
    #: The others (copies, refreshed, empty): the check looks at each as :func:`_live` says.
    others: list[int]


def host_bytes(flat: tree.FlatState) -> HostBytes:
    """:class:`HostBytes` of ``flat``'s tensors. This runs once per tensor of a save (ten
    thousand in a large optimizer state), so the common case -- a contiguous CPU tensor of a
    dtype numpy knows -- costs five attribute reads and one ``Tensor.numpy``."""
    hosts: list[torch.Tensor] = []
    views: list[Any] = []
    nbytes: list[int] = []
    shared: list[int] = []
    others: list[int] = []
    viewable = _dtypes.NUMPY_VIEWABLE
    for index, leaf in enumerate(flat.tensors):
        t = leaf.tensor
        if (
            t.is_cpu
            and t.dtype in viewable
            and t.is_contiguous()
            and not t.is_conj()
            and not t.is_neg()
        ):
            # force: detaches (numpy() refuses a tensor that requires grad); with no lazy bit
            # to resolve and nothing to move, it shares the tensor's memory
            view: Any = t.numpy(force=True)
            host, is_shared = t, True
        else:
            host = host_tensor(t)
            view = _dtypes.byte_view(host)
            is_shared = t.is_cpu and host.data_ptr() == t.data_ptr()
        size = view.nbytes
        hosts.append(host)
        views.append(view)
        nbytes.append(size)
        if is_shared and size and leaf.refresh is None:
            shared.append(index)
        else:
            others.append(index)
    return HostBytes(hosts, views, nbytes, shared, others)


def check_unchanged(
    flat: tree.FlatState,
    hosts: Sequence[torch.Tensor],
    digests: Sequence[bytes],
    chunk_size: int,
    threads: int,
    *,
    host_views: HostBytes | None = None,
) -> None:
    """Refuse a save whose source tensors changed while it read them.

    ``digests[i]`` are the chunk digests of ``hosts[i]`` (the bytes of ``flat.tensors[i]``)
    recorded *before* any of its bytes were written or encoded; they are what the manifest
    will say. Once everything is written, the caller's objects behind the tensors are read
    again -- a tensor that is the caller's memory is hashed as it is, one that was copied (a
    strided view, a numpy array in another order, a quantized tensor's representation) is
    copied again -- and must give the same digests. A difference means another thread wrote
    to them meanwhile (a blocking save racing an optimizer step): the stored bytes may be a
    mix of two states or not match their digests, so the save fails before its commit --
    cheaper than a snapshot of the whole state, and a clean save pays one more hashing pass
    (the digests themselves overlap the writes). Tensors on other devices are copied to the
    host once, at the start; they are not read again.

    With ``host_views`` (the :class:`HostBytes` the digests were taken from; ``hosts`` are
    then its hosts), a tensor that is the caller's memory is hashed again through the same
    view, without another view made per tensor.

    Raises:
        StateChangedError: naming every tensor that changed.
    """
    if flat.owned:
        return
    indexes: list[int] = []
    views: list[Any] = []
    if host_views is None:
        for i, (leaf, host) in enumerate(zip(flat.tensors, hosts, strict=True)):
            live = _live(leaf, host)
            if live is not None:
                indexes.append(i)
                views.append(_dtypes.byte_view(live))
    else:
        indexes = list(host_views.shared)
        views = [host_views.views[i] for i in indexes]
        for i in host_views.others:
            live = _live(flat.tensors[i], hosts[i])
            if live is not None:
                indexes.append(i)
                views.append(_dtypes.byte_view(live))
    if not indexes:
        return
    again = _accel.hash_chunks_many(views, chunk_size, threads)
    changed = [i for i, now in zip(indexes, again, strict=True) if now != digests[i]]
    if changed:
        raise state_changed(tuple(flat.tensors[i].key_path for i in sorted(changed)))


def _live(leaf: tree.TensorLeaf, host: torch.Tensor) -> torch.Tensor | None:
    """The bytes behind ``leaf`` as the caller's objects hold them now (contiguous, CPU), or
    None when no one else can change them."""
    t = leaf.tensor
    if t.numel() == 0:
        return None
    if leaf.refresh is not None:
        return host_tensor(leaf.refresh())
    if t.device.type != "cpu":
        return None
    if host.data_ptr() == t.data_ptr():
        return host
    return host_tensor(t)  # a strided or lazy view was copied: copy it again


def state_changed(changed: tuple[str, ...]) -> StateChangedError:
    """The error of a blocking save whose tensors ``changed`` (key paths) while it ran."""
    shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
    return StateChangedError(
        f"tensor(s) {shown} changed while this blocking save was reading them (another thread "
        "wrote to them); nothing was committed and earlier checkpoints are intact. Save when "
        "no other thread writes the state, or pass blocking=False, which copies the state "
        "first and lets training go on at once",
        tensors=changed,
    )


def chunk_count(nbytes: int, chunk_size: int) -> int:
    """How many chunks a tensor of ``nbytes`` has (computed, never enumerated: a
    hostile manifest may claim 2**66 bytes)."""
    return -(-nbytes // chunk_size)


def parse_chunk_table(
    manifest: Manifest,
    rows_per_tensor: object,
    chunk_size: int,
    pipelines: Sequence[Pipeline],
    *,
    where: str,
    only: frozenset[int] | None = None,
) -> list[list[ChunkRecord]]:
    """Validate the per-tensor chunk rows of a payload against the manifest.

    With ``only``, the rows cover those tensors; every other tensor's entry must be nil
    (its bytes are elsewhere: a ``delta`` store) and gets no chunks here.

    Besides types and ranges: an encoded chunk must carry the digest of its
    stored bytes; a chunk's stored bytes must be able to hold its raw bytes (a
    raw or shuffled chunk stores exactly them, a zstd frame at most
    ``MAX_ZSTD_RATIO`` times its length); and chunks lie in their files in
    tensor order without overlapping (writers append them: format 5.2). So
    every stored byte backs at most one chunk, and no tensor is allocated that
    the data files, whose sizes are checked before allocation, could not fill.
    """
    n_codecs = len(pipelines)
    if not isinstance(rows_per_tensor, list) or len(rows_per_tensor) != len(manifest.tensors):
        raise FormatError("payload has no chunk list for every tensor", path=where)
    sizes = [f.size for f in manifest.files]
    table: list[list[ChunkRecord]] = []
    end_file, end_offset = 0, 0  # where the previous chunk's stored bytes end
    is_raw = [p == RAW for p in pipelines]
    is_zstd = [p.zstd for p in pipelines]
    for index, (record, rows) in enumerate(zip(manifest.tensors, rows_per_tensor, strict=True)):
        if only is not None and index not in only:
            if rows is not None:
                raise FormatError(f"tensor {index} has chunk rows in two places", path=where)
            table.append([])
            continue
        nbytes = record.nbytes
        count = chunk_count(nbytes, chunk_size)
        if not isinstance(rows, list) or len(rows) != count:
            raise FormatError(
                f"tensor {index} needs {count} chunks, payload lists "
                f"{len(rows) if isinstance(rows, list) else rows!r}",
                path=where,
            )
        chunks = []
        for c_index, row in enumerate(rows):
            # (unpacked and tested field by field: this runs once per chunk)
            if not (isinstance(row, list) and len(row) == 6):
                raise FormatError(f"malformed chunk record {row!r} of tensor {index}", path=where)
            file, offset, length, codec, digest, stored_digest = row
            if not (
                type(file) is int
                and type(offset) is int
                and type(length) is int
                and type(codec) is int
                and file >= 0
                and offset >= 0
                and length >= 0
                and codec >= 0
                and isinstance(digest, bytes)
                and len(digest) == DIGEST_SIZE
                and (
                    stored_digest is None
                    or (isinstance(stored_digest, bytes) and len(stored_digest) == DIGEST_SIZE)
                )
            ):
                raise FormatError(f"malformed chunk record {row!r} of tensor {index}", path=where)
            if (
                file >= len(sizes)
                or codec >= n_codecs
                or (stored_digest is None and not is_raw[codec])
            ):
                raise FormatError(f"chunk record {row!r} names a missing file or codec", path=where)
            if offset + length > sizes[file]:
                raise FormatError(
                    f"chunk record {row!r} reaches past the end of its file", path=where
                )
            raw = min(chunk_size, nbytes - c_index * chunk_size)
            # (Pipeline.max_raw_size, without a call per chunk)
            if (raw > length * MAX_ZSTD_RATIO) if is_zstd[codec] else (raw != length):
                raise FormatError(
                    f"chunk record {row!r} of tensor {index} stores {length} bytes for "
                    f"{raw} raw bytes, which codec {pipelines[codec].describe()!r} cannot hold",
                    path=where,
                )
            if file < end_file or (file == end_file and offset < end_offset):
                raise FormatError(
                    f"chunk record {row!r} of tensor {index} overlaps or precedes the previous "
                    "chunk's bytes; chunks lie in their files in tensor order",
                    path=where,
                )
            end_file, end_offset = file, offset + length
            chunks.append(ChunkRecord(file, offset, length, codec, digest, stored_digest))
        table.append(chunks)
    return table


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], *, threads: int, window: int | None = None
) -> Generator[R, None, None]:
    """``map(fn, items)`` on a thread pool, results in order, at most ``window`` in flight.

    The window bounds memory when each result holds a buffer (an encoded chunk). The pool
    lives as long as the process (:func:`shared_pool`), so its threads' scratch buffers and
    zstd contexts are reused from one save or load to the next instead of faulted in anew.
    ``fn`` must not call :func:`ordered_map` itself (it would wait for its own pool).
    """
    if threads <= 1:
        yield from map(fn, items)
        return
    window = window or 2 * threads + 2
    pending: deque[Future[R]] = deque()
    pool = shared_pool(threads)
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        for future in pending:  # wait for the ones already running: they use the caller's
            if not future.cancelled():  # buffers, which it may free once this returns
                with contextlib.suppress(BaseException):
                    future.result()


def batched_map(
    fn: Callable[[T], R], items: Sequence[T], sizes: Sequence[int], *, threads: int
) -> Generator[R, None, None]:
    """:func:`ordered_map` of ``fn`` over ``items`` (of ``sizes`` bytes each), small items
    grouped into one task of about ``_BATCH_BYTES`` or ``_BATCH_SLOTS`` items: a task per
    100,000 tiny chunks costs more in the pool's queue and the GIL than their work."""
    groups = _groups(items, sizes)
    for results in ordered_map(lambda group: [fn(i) for i in group], groups, threads=threads):
        yield from results


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def shared_pool(threads: int) -> ThreadPoolExecutor:
    """The process's pool of ``threads`` worker threads for chunk work (created once)."""
    with _pools_lock:
        pool = _pools.get(threads)
        if pool is None:
            pool = _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="aptckpt")
        return pool


def _forget_pools() -> None:
    # A child of fork() has none of the parent's threads: it makes its own pools.
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def new_tensors(
    manifest: Manifest, into: Sequence[torch.Tensor | None] | None = None
) -> list[torch.Tensor]:
    """A tensor per record to decode into: ``into[i]`` where given (a contiguous
    CPU tensor of the record's dtype and shape, checked by the caller), else new."""
    out: list[torch.Tensor] = []
    with warnings.catch_warnings():
        # torch warns that complex32 is experimental on every allocation; the
        # user saved one, so telling them again on load is noise.
        warnings.filterwarnings("ignore", "ComplexHalf support is experimental")
        for index, record in enumerate(manifest.tensors):
            given = into[index] if into is not None else None
            if given is not None:
                out.append(given)
                continue
            dtype = _dtypes.dtype_from_name(record.dtype)
            assert dtype is not None  # validated by manifest.decode
            out.append(_memory.empty(record.shape, dtype))
    return out


@dataclass(frozen=True)
class _Slot(Generic[C]):
    tensor: int
    index: int
    chunk: C
    out: memoryview


def fill_tensors(
    manifest: Manifest,
    table: Sequence[Sequence[C]],
    chunk_size: int,
    decode: Callable[[C, memoryview], None],
    locate: Callable[[C], tuple[str, str]],
    *,
    threads: int,
    where: str,
    into: Sequence[torch.Tensor | None] | None = None,
    stored_raw: Callable[[C], RawPlace | None] | None = None,
    files: DataFiles | None = None,
    skip: frozenset[int] = frozenset(),
) -> list[torch.Tensor]:
    """Fill fresh tensors (or ``into``'s, see :func:`new_tensors`) chunk by chunk, in
    parallel, collecting every damaged chunk.

    ``decode(chunk, out)`` writes one chunk's raw bytes into ``out`` (verifying
    them if asked to) and raises ``IntegrityError`` (``CodecError``) or
    ``EOFError`` for damage. ``locate(chunk)`` gives ``(file, detail)`` for
    messages: the file it lives in and where in it.

    ``stored_raw(chunk)``, when given, says where a chunk stored as its raw bytes
    lies (:class:`RawPlace`, in ``files``); all such chunks are read straight into
    their destinations, and checked, by one call into the storage (locally, into the
    core: :func:`_read_raw`) instead of one ``decode`` each. Tensors whose index is in
    ``skip`` are taken from ``into`` as they are (already filled: memory-mapped).
    """
    outs = new_tensors(manifest, into)
    slots = []
    raw_slots = []
    for t_index, (out, chunks) in enumerate(zip(outs, table, strict=True)):
        if t_index in skip:
            continue
        view = _dtypes.byte_view(out)
        for c_index, ((start, stop), chunk) in enumerate(
            zip(chunk_spans(len(view), chunk_size), chunks, strict=True)
        ):
            slot = _Slot(t_index, c_index, chunk, view[start:stop])
            place = stored_raw(chunk) if stored_raw is not None else None
            if place is None:
                slots.append(slot)
            else:
                raw_slots.append((slot, place))

    fresh = [into is None or into[i] is None for i in range(len(outs))]

    def run(batch: list[_Slot[C]]) -> list[tuple[int, int, IntegrityError]]:
        found = []
        for slot in batch:
            if fresh[slot.tensor]:
                _memory.populate(slot.out)
            try:
                decode(slot.chunk, slot.out)
            except (IntegrityError, EOFError) as err:
                file, detail = locate(slot.chunk)
                damage = chunk_damage(where, slot.tensor, f"chunk {slot.index}", detail, file, err)
                found.append((slot.tensor, slot.index, damage))
        return found

    # Collect every damaged chunk rather than stopping at the first, so that
    # verify() reports all of them, in (tensor, chunk) order.
    problems = _read_raw(raw_slots, files, locate, threads=threads, where=where)
    batches = _batches(slots)
    problems += [
        e
        for found in ordered_map(run, batches, threads=threads, window=4 * threads + 4)
        for e in found
    ]
    if problems:
        problems.sort(key=lambda p: p[:2])
        raise combined([damage for _, _, damage in problems], manifest, where)
    return outs


@dataclass(frozen=True)
class RawPlace:
    """Where a chunk stored as its raw bytes lies: a data file (its index), an offset, and
    the digest to check it against (None: not checked)."""

    file: int
    offset: int
    digest: bytes | None


#: Why a chunk whose bytes differ from its digest is refused.
DIGEST_MISMATCH = "digest mismatch: the stored bytes changed after saving"

_RAW_DAMAGE = {"eof": "the file ends before the chunk does", "digest": DIGEST_MISMATCH}


def _read_raw(
    raw_slots: list[tuple[_Slot[C], RawPlace]],
    files: DataFiles | None,
    locate: Callable[[C], tuple[str, str]],
    *,
    threads: int,
    where: str,
) -> list[tuple[int, int, IntegrityError]]:
    """Read raw chunks into their slots and check them, in one parallel call into the
    storage (locally the core: adjacent chunks of one file share a system call; each is
    hashed right after its read). Returns ``(tensor, chunk, damage)`` per damaged chunk."""
    if not raw_slots:
        return []
    assert files is not None, "stored_raw() needs the data files"
    places = [place for _, place in raw_slots]
    check = places[0].digest is not None  # a load verifies every chunk or none
    assert all((p.digest is not None) == check for p in places)
    found = files.read_verify(
        [RawRead(p.file, p.offset, slot.out, p.digest) for slot, p in raw_slots], threads
    )
    problems = []
    for index, why in found:
        slot = raw_slots[index][0]
        file, detail = locate(slot.chunk)
        damage = chunk_damage(
            where, slot.tensor, f"chunk {slot.index}", detail, file, _RAW_DAMAGE[why]
        )
        problems.append((slot.tensor, slot.index, damage))
    return problems


#: Small chunks (small tensors) are decoded in batches of about this many bytes, one
#: thread-pool task each: a task per 4-byte scalar would cost more than its work.
_BATCH_BYTES = 1 << 20
_BATCH_SLOTS = 256


def _batches(slots: list[_Slot[C]]) -> list[list[_Slot[C]]]:
    """Consecutive slots grouped into tasks of about ``_BATCH_BYTES`` (a large chunk
    is a task of its own)."""
    return _groups(slots, [len(slot.out) for slot in slots])


def _groups(items: Sequence[T], sizes: Sequence[int]) -> list[list[T]]:
    """Consecutive ``items`` (of ``sizes`` bytes) grouped into runs of about
    ``_BATCH_BYTES`` or at most ``_BATCH_SLOTS`` items."""
    groups: list[list[T]] = []
    current: list[T] = []
    size = 0
    for item, nbytes in zip(items, sizes, strict=True):
        current.append(item)
        size += nbytes
        if size >= _BATCH_BYTES or len(current) >= _BATCH_SLOTS:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    return groups


def refuse_unreadable(
    manifest: Manifest,
    table: Sequence[Sequence[C]],
    problem: Callable[[C], tuple[str, str] | None],
    locate: Callable[[C], tuple[str, str]],
    *,
    where: str,
) -> None:
    """Raise ``IntegrityError`` naming every chunk whose stored bytes cannot be
    read at all -- ``problem(chunk)`` gives the file at fault and why: it is
    missing or has the wrong size -- before any tensor is allocated. Reported per
    (tensor, file), so a lost shard of a thousand chunks is one line per tensor
    it held, not a thousand."""
    groups: dict[tuple[int, str, str], list[int]] = {}
    details: dict[tuple[int, str, str], str] = {}
    for t_index, chunks in enumerate(table):
        for c_index, chunk in enumerate(chunks):
            found = problem(chunk)
            if found is None:
                continue
            file, why = found
            group = (t_index, file, why)
            groups.setdefault(group, []).append(c_index)
            details.setdefault(group, locate(chunk)[1])
    if not groups:
        return
    problems = []
    for (t_index, file, why), indexes in groups.items():
        which = (
            f"chunk {indexes[0]}"
            if len(indexes) == 1
            else f"{len(indexes)} chunks ({indexes[0]} to {indexes[-1]})"
        )
        detail = details[t_index, file, why] if len(indexes) == 1 else f"'{file}'"
        problems.append(chunk_damage(where, t_index, which, detail, file, why))
    raise combined(problems, manifest, where)


def chunk_damage(
    where: str, tensor: int, which: str, detail: str, file: str, why: object
) -> IntegrityError:
    # The tensor is named by index here; combined() puts in its key path, which is
    # computed only when something is damaged.
    return IntegrityError(
        f"checkpoint '{where}' is damaged: tensor #{tensor}, {which} ({detail}): {why}",
        path=where,
        file=file,
        tensor=str(tensor),
    )


def combined(problems: list[IntegrityError], manifest: Manifest, where: str) -> IntegrityError:
    keys = tree.key_paths(manifest.skeleton, len(manifest.tensors))
    named = [_named(p, keys) for p in problems]
    first = named[0]
    more = f" (and {len(named) - 1} more damaged chunk(s))" if len(named) > 1 else ""
    return IntegrityError(
        f"{first}{more}; restore the checkpoint from a copy",
        path=where,
        file=first.file,
        tensor=first.tensor,
        problems=tuple(str(p) for p in named),
    )


def refuse_damaged_files(
    manifest: Manifest,
    table: Sequence[Sequence[ChunkRecord]],
    failed: dict[int, FileProblem],
    where: str,
) -> None:
    """Data files are missing or have the wrong size (``failed``, from
    :meth:`~aptckpt.storage.base.CheckpointReader.open_files`): raise ``IntegrityError``
    naming the chunks lost, before anything is allocated; else (bytes appended) the first
    file's own error."""
    files = manifest.files

    def problem(chunk: ChunkRecord) -> tuple[str, str] | None:
        record = files[chunk.file]
        why = file_problem(record, failed.get(chunk.file), chunk.offset + chunk.length)
        return None if why is None else (record.path, why)

    refuse_unreadable(manifest, table, problem, partial(locate_chunk, manifest), where=where)
    index, first = next(iter(failed.items()))
    raise IntegrityError(
        f"{first.error}; restore the checkpoint from a copy",
        path=where,
        file=files[index].path,
        problems=tuple(f"{p.error}" for p in failed.values()),
    ) from first.error


def locate_chunk(manifest: Manifest, chunk: ChunkRecord) -> tuple[str, str]:
    """``(file, where in it)`` of a chunk, for messages."""
    file = manifest.files[chunk.file].path
    return file, f"file '{file}', offset {chunk.offset}, {chunk.length} bytes"


def file_problem(record: FileRecord, found: FileProblem | None, stop: int) -> str | None:
    """Why the bytes of data file ``record`` up to ``stop`` cannot be read, if they cannot."""
    if found is None:
        return None
    if found.size is None:
        return f"data file '{record.path}' is missing"
    if found.size < record.size and stop > found.size:
        return (
            f"data file '{record.path}' is truncated to {found.size} bytes "
            f"(manifest says {record.size})"
        )
    return None


def decode_into(
    manifest: Manifest,
    table: Sequence[Sequence[ChunkRecord]],
    pipelines: Sequence[Pipeline],
    chunk_size: int,
    files: DataFiles,
    *,
    verify: bool,
    threads: int,
    where: str,
    into: Sequence[torch.Tensor | None] | None = None,
    skip: frozenset[int] = frozenset(),
) -> list[torch.Tensor]:
    """Read, decode and (optionally) verify chunks of shard files into fresh tensors
    (or into ``into``'s; those in ``skip`` are left as they are)."""

    def decode(chunk: ChunkRecord, out: memoryview) -> None:
        pipeline = pipelines[chunk.codec]
        if pipeline.xor:
            raise CodecError("xor-delta chunks need a base; this backend stores none")
        # Raw chunks never get here: stored_raw() sends them to the storage in one call.
        # A split chunk's raw planes are read straight to where the unshuffle reads them;
        # its stored digest covers the zstd frame that follows them.
        head = pipeline.raw_prefix(len(out))
        if head >= chunk.length:
            raise CodecError(f"split chunk of {chunk.length} bytes has no zstd frame")
        planes = scratch("planes", len(out)) if head else None
        reads = [(chunk.offset + head, scratch("stored", chunk.length - head), verify)]
        if planes is not None:
            reads.append((chunk.offset, planes[:head], False))
        for offset, buffer, check in reads:
            why = files.read_into(
                chunk.file, offset, buffer, chunk.stored_digest if check else None
            )
            if why == "eof":
                raise EOFError("the file ends before the chunk does")
            if why is not None:
                raise CodecError("stored-bytes digest mismatch: the file changed after saving")
        found = pipeline.decode(reads[0][1], out, planes=planes, digest=verify)
        if verify and found != chunk.digest:
            raise CodecError("digest mismatch: the stored bytes changed after saving")

    locate = partial(locate_chunk, manifest)
    raw_codecs = {index for index, pipeline in enumerate(pipelines) if pipeline == RAW}

    def stored_raw(chunk: ChunkRecord) -> RawPlace | None:
        if chunk.codec not in raw_codecs:
            return None
        return RawPlace(chunk.file, chunk.offset, chunk.digest if verify else None)

    # What decode() will read, one small read per chunk: a storage reading ahead (object
    # stores) stays within these ranges (raw chunks go in one read_verify call).
    expected: dict[int, list[tuple[int, int]]] = {}
    for index, row in enumerate(table):
        if index not in skip:
            for chunk in row:
                if chunk.codec not in raw_codecs:
                    expected.setdefault(chunk.file, []).append(
                        (chunk.offset, chunk.offset + chunk.length)
                    )
    for file, ranges in expected.items():
        files.expect(file, ranges)

    return fill_tensors(
        manifest,
        table,
        chunk_size,
        decode,
        locate,
        threads=threads,
        where=where,
        into=into,
        stored_raw=stored_raw,
        files=files,
        skip=skip,
    )


def _named(problem: IntegrityError, keys: list[str]) -> IntegrityError:
    index = int(problem.tensor or 0)
    key = keys[index]
    message = str(problem).replace(f"tensor #{index},", f"tensor {key},", 1)
    return IntegrityError(message, path=problem.path, file=problem.file, tensor=key)


def region_manifest(
    manifest: Manifest, chunk_size: int, regions: Sequence[tuple[int, int, int]]
) -> tuple[Manifest, list[tuple[int, int]]]:
    """A manifest whose tensor ``k`` is the run of chunks of ``manifest``'s tensor that
    region ``k`` (``(index, start, stop)``, bytes) lies in, as ``uint8`` -- a backend reads
    it as any other and so reads and verifies those chunks only -- and where each region
    lies in its run. The payload's ``chunks`` table is the only thing that changes."""
    payload = dict(manifest.payload)
    rows = payload["chunks"]
    tensors, chunks, cuts = [], [], []
    for index, start, stop in regions:
        nbytes = manifest.tensors[index].nbytes
        if stop <= start:
            first = last = 0
            run: list[Any] = []
            size = 0
        else:
            first, last = start // chunk_size, (stop - 1) // chunk_size
            run = rows[index][first : last + 1]
            size = min(nbytes, (last + 1) * chunk_size) - first * chunk_size
        tensors.append(TensorRecord("uint8", (size,)))
        chunks.append(run)
        cuts.append((start - first * chunk_size, stop - first * chunk_size) if run else (0, 0))
    payload["chunks"] = chunks
    return dataclasses.replace(manifest, tensors=tuple(tensors), payload=payload), cuts

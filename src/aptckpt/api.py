"""The public API: ``save``, ``load``, ``inspect``, ``verify``.

What happens here, identically for every backend: the state is flattened
(refusing what cannot be stored, with its key path), the backend writes the
tensors, every file is made durable, the manifest is written last and the
checkpoint committed by the storage it lives in (:mod:`aptckpt.storage`: renamed into
place locally, created last and conditionally on object stores). Loading reads and
validates the manifest, lets the backend read (and verify) the tensors, then
restores devices, ``nn.Parameter`` and ``requires_grad`` and rebuilds the state,
with aliased tensors coming back as one object.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, overload

import torch

from aptckpt import (
    _background,
    _config,
    _dtypes,
    _exports,
    _gc,
    _imports,
    _into,
    _progress,
    registry,
    tree,
)
from aptckpt import manifest as mf
from aptckpt._background import SaveHandle
from aptckpt._exports import ExportInfo
from aptckpt._progress import ProgressCallback
from aptckpt._version import __version__
from aptckpt.backends.base import Backend
from aptckpt.distributed import _load as _sharded
from aptckpt.errors import (
    AptckptError,
    BackendError,
    CheckpointExistsError,
    DeviceUnavailableError,
    FormatError,
    IntegrityError,
    UnknownBackendError,
    UnsupportedObjectError,
    UnsupportedPathError,
)
from aptckpt.storage import StorageOptions, is_url, resolve
from aptckpt.storage.base import CheckpointReader, Storage
from aptckpt.storage.local._atomic import write_error

if TYPE_CHECKING:
    from aptckpt._view import CheckpointView

__all__ = [
    "CheckpointInfo",
    "ExportInfo",
    "IntoResult",
    "SaveHandle",
    "SaveInfo",
    "TensorInfo",
    "VerifyReport",
    "convert",
    "delete",
    "inspect",
    "load",
    "save",
    "verify",
]

log = logging.getLogger("aptckpt")
_CPU = torch.device("cpu")

PathLike: TypeAlias = "str | os.PathLike[str]"
DeviceLike: TypeAlias = "str | torch.device"
MapLocation: TypeAlias = (
    "DeviceLike | Mapping[str, DeviceLike] | Callable[[str], DeviceLike] | None"
)


@dataclass(frozen=True)
class SaveInfo:
    """What :func:`save` wrote.

    ``stored_bytes`` counts the data this save wrote: its data files, plus the
    new objects it added to a shared store (``delta``), so an incremental save
    reports only what it added. ``manifest_bytes`` is the size of the manifest,
    written besides. ``files`` are the data files inside the checkpoint.
    """

    path: str
    backend: str
    tensors: int
    raw_bytes: int
    stored_bytes: int
    files: tuple[str, ...]
    seconds: float
    manifest_bytes: int = 0


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint, as the manifest describes it."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    device: str
    nbytes: int
    stored_bytes: int | None
    codecs: tuple[str, ...]
    parameter: bool
    requires_grad: bool


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint's manifest, summarised; no tensor data is read.

    ``files`` are the files inside the checkpoint directory; ``store_bytes`` the
    bytes it reaches in a shared object store (``delta``; objects other
    checkpoints may share); ``stored_bytes`` the sum of both.
    """

    path: str
    backend: str
    options: Mapping[str, Any]
    format_version: int
    library_version: str
    torch_version: str
    created_at: str
    tensors: tuple[TensorInfo, ...]
    files: tuple[mf.FileRecord, ...]
    raw_bytes: int
    stored_bytes: int
    store_bytes: int
    metadata: Any
    #: How many ranks saved it (1: one process).
    world_size: int = 1


@dataclass(frozen=True)
class VerifyReport:
    """Result of a successful :func:`verify`."""

    path: str
    backend: str
    tensors: int
    raw_bytes: int
    stored_bytes: int
    seconds: float


def _backend(name: str, *, saved_by: str | None = None) -> type[Backend]:
    try:
        return registry.get_backend(name)
    except UnknownBackendError as err:
        if saved_by is None:
            raise
        raise FormatError(
            f"checkpoint was written by backend {name!r}, which is not installed here "
            f"(available: {', '.join(err.available)}); install the plugin that provides it",
            path=saved_by,
        ) from err


def _records(leaves: Sequence[tree.TensorLeaf]) -> tuple[mf.TensorRecord, ...]:
    """The manifest's record of each leaf. Records are immutable, so the leaves that agree in
    every field -- the many tensors of one shape in a model or its optimizer state -- share
    one: a state of ten thousand tensors builds a few dozen records, not ten thousand."""
    made: dict[tuple[Any, ...], mf.TensorRecord] = {}
    records = []
    for leaf in leaves:
        t = leaf.tensor
        # t.device builds a device object: only for tensors that are not on the CPU
        key = (t.dtype, t.shape, None if t.is_cpu else t.device, t.requires_grad, leaf.is_parameter)
        record = made.get(key)
        if record is None:
            record = made[key] = mf.TensorRecord(
                dtype=_dtypes.dtype_name(t.dtype),
                shape=tuple(t.shape),  # torch.Size holds ints
                device="cpu" if t.is_cpu else str(t.device),
                requires_grad=bool(t.requires_grad),
                parameter=leaf.is_parameter,
            )
        records.append(record)
    return tuple(records)


@overload
def save(
    state: Any,
    path: PathLike,
    *,
    backend: str = ...,
    metadata: Mapping[str, Any] | None = ...,
    overwrite: bool = ...,
    blocking: Literal[True] = ...,
    storage_options: StorageOptions | None = ...,
    process_group: Any = ...,
    **options: Any,
) -> SaveInfo: ...


@overload
def save(
    state: Any,
    path: PathLike,
    *,
    backend: str = ...,
    metadata: Mapping[str, Any] | None = ...,
    overwrite: bool = ...,
    blocking: Literal[False],
    storage_options: StorageOptions | None = ...,
    process_group: Any = ...,
    **options: Any,
) -> SaveHandle[SaveInfo]: ...


def save(
    state: Any,
    path: PathLike,
    *,
    backend: str = "zstd",
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    blocking: bool = True,
    storage_options: StorageOptions | None = None,
    process_group: Any = None,
    **options: Any,
) -> SaveInfo | SaveHandle[SaveInfo]:
    """Save ``state`` as a checkpoint at ``path``, atomically.

    Args:
        state: any nesting of dict / OrderedDict / list / tuple holding tensors,
            ``nn.Parameter`` and plain values (None, bool, int, float, complex,
            str, bytes, torch.dtype / device / Size).
        path: the checkpoint directory to create: a local path, or a URL fsspec
            knows (``s3://bucket/runs/a/step-500``, ``gs://``, ``az://``, ``memory://``).
        backend: a registered backend name (:func:`available_backends`).
        metadata: plain values stored in the manifest, shown by :func:`inspect`.
        overwrite: replace an existing checkpoint at ``path`` (atomically).
        blocking: ``False`` returns as soon as the state is copied into reusable
            host staging buffers (pinned for CUDA tensors) and persists it in the
            background: the caller may change the state at once. At most one
            background save is in flight; the next waits for it. See
            :class:`SaveHandle`.
        storage_options: for a URL, the options of its fsspec file system (credentials,
            ``endpoint_url``, ``client_kwargs``, ...), over the environment's defaults
            (``AWS_*``). Never written anywhere, never shown in a message.
        process_group: a ``torch.distributed`` process group (``group.WORLD`` for the
            whole job): a collective save. Every rank of it calls ``save`` with its own
            state (the same keys on every rank) and the same path; each writes its own
            shards (DTensors as their local boxes, replicated tensors once, spread over
            the ranks and compared by digest, :class:`~aptckpt.PerRank` values per rank),
            rank 0 commits, and every rank returns once the checkpoint is committed or
            raises :class:`~aptckpt.errors.CollectiveError` (naming the ranks that failed)
            when any rank failed or stopped answering (``APTCKPT_COLLECTIVE_TIMEOUT_S``,
            default 60 s). ``None``: one process (never "the default group").
        **options: backend options, e.g. ``level=3`` or ``codec="none"`` for ``zstd``.

    Returns:
        What was written; with ``blocking=False``, a :class:`SaveHandle` whose
        ``wait()`` returns it (or raises the save's error).

    Raises:
        UnsupportedObjectError: an object that cannot be stored, named by key path.
        UnknownBackendError, BackendError: bad backend name or options.
        CheckpointExistsError: ``path`` is taken and ``overwrite`` is false.
        WriteError: the disk failed (full, read-only); nothing was committed.
        (With ``blocking=False`` the errors of the persisting part come from ``wait()``.)
    """
    if process_group is not None:
        return _save_collective(
            state,
            path,
            process_group,
            backend=backend,
            metadata=metadata,
            overwrite=overwrite,
            blocking=blocking,
            storage_options=storage_options,
            options=options,
        )
    pending = prepare_save(
        state,
        path,
        backend=backend,
        metadata=metadata,
        overwrite=overwrite,
        storage_options=storage_options,
        **options,
    )
    if blocking:
        # The collector is paused while the caller waits anyway; a background persist
        # leaves it running, so that a long save never changes how the trainer collects.
        with _gc.paused():
            return pending.persist(pending.flat)
    return _background.submit(pending.flat, pending.location, pending.persist)


def _save_collective(
    state: Any,
    path: PathLike,
    process_group: Any,
    *,
    backend: str,
    metadata: Mapping[str, Any] | None,
    overwrite: bool,
    blocking: bool,
    storage_options: StorageOptions | None,
    options: dict[str, Any],
) -> SaveInfo | SaveHandle[SaveInfo]:
    """:func:`save` with ``process_group``: checks made on every rank, whose errors every
    rank must learn of (:mod:`aptckpt.distributed._save`)."""
    from aptckpt.distributed import _save

    start = time.perf_counter()
    storage, where = resolve(path, storage_options)
    impl: Backend | None = None
    error: BaseException | None = None
    encoded_metadata, metadata_version = None, 2
    try:
        impl = _backend(backend)(**options)
        if metadata:
            encoded_metadata, metadata_version = tree.encode_plain(dict(metadata), root="metadata")
    except Exception as err:
        error = err
    job = _save.Job(
        storage, where, backend, impl, encoded_metadata, metadata_version, overwrite, start
    )
    if not blocking:
        handle: SaveHandle[SaveInfo] = _save.save(
            state, job, process_group=process_group, error=error, blocking=False
        )
        return handle
    with _gc.paused():
        info: SaveInfo = _save.save(
            state, job, process_group=process_group, error=error, blocking=True
        )
    return info


@dataclass(frozen=True)
class PendingSave:
    """A save split at the snapshot: ``flat`` is the state as found (the caller's
    tensors); ``persist(snapshot)`` writes and commits a snapshot of it.
    :func:`save` and the :class:`~aptckpt.CheckpointManager` use it."""

    flat: tree.FlatState
    records: tuple[mf.TensorRecord, ...]
    metadata: Any
    #: Where it goes: the storage, and the checkpoint's path in it.
    storage: Storage
    path: str
    backend: str
    impl: Backend
    overwrite: bool
    start: float
    #: The lowest format version that reads the state's skeleton and metadata.
    format_version: int = 2

    @property
    def location(self) -> str:
        """The checkpoint as users name it (a path, or a URL without credentials)."""
        return self.storage.display(self.path)

    def persist(self, snapshot: tree.FlatState) -> SaveInfo:
        return _write(
            snapshot,
            self.records,
            self.metadata,
            self.storage,
            self.path,
            self.backend,
            self.impl,
            overwrite=self.overwrite,
            start=self.start,
            format_version=self.format_version,
        )


@_gc.pausing
def prepare_save(
    state: Any,
    path: PathLike,
    *,
    backend: str = "zstd",
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    storage_options: StorageOptions | None = None,
    **options: Any,
) -> PendingSave:
    """Everything of :func:`save` that must happen before the state may change:
    options checked, storage resolved, state flattened, tensor records taken from the
    originals."""
    start = time.perf_counter()
    storage, where = resolve(path, storage_options)
    impl = _backend(backend)(**options)
    flat = tree.flatten(state)
    manifest_metadata, metadata_version = (
        tree.encode_plain(dict(metadata), root="metadata") if metadata else (None, 2)
    )
    records = _records(flat.tensors)
    return PendingSave(
        flat,
        records,
        manifest_metadata,
        storage,
        where,
        backend,
        impl,
        overwrite=overwrite,
        start=start,
        format_version=max(flat.format_version, metadata_version),
    )


def _write(
    flat: tree.FlatState,
    records: tuple[mf.TensorRecord, ...],
    metadata: Any,
    storage: Storage,
    path: str,
    backend: str,
    impl: Backend,
    *,
    overwrite: bool,
    start: float,
    format_version: int,
) -> SaveInfo:
    """Write a flattened state with ``impl`` and commit it: the part of a save after flattening.

    The manifest gets the lowest format version whose readers read it (the skeleton's and
    metadata's ``format_version``, and the backend's for its payload), so that a state
    using nothing newer stays readable by older aptckpt releases."""
    with storage.create_checkpoint(path, overwrite=overwrite) as writer:
        try:
            payload = impl.write(flat, writer)
            writer.sync_files()
            files = tuple(writer.sizes())
            manifest = mf.Manifest(
                backend=backend,
                options=impl.options_record(),
                skeleton=flat.skeleton,
                tensors=records,
                files=files,
                payload=payload,
                metadata=metadata,
                created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                library_version=__version__,
                torch_version=torch.__version__,
                format_version=max(format_version, impl.format_version(payload)),
            )
            encoded = mf.encode(manifest)
            _refuse_unreadable_manifest(encoded, writer.location)
            writer.commit(encoded)
        except AptckptError:
            raise  # already says what went wrong (some of them are OSErrors too)
        except OSError as err:
            if writer.committed:  # only the final directory fsync failed
                raise write_error(
                    f"checkpoint '{writer.location}' was committed, but making its directory entry "
                    "durable",
                    err,
                    path=writer.location,
                ) from err
            raise write_error(
                f"saving checkpoint '{writer.location}' (nothing was committed; earlier "
                "checkpoints are intact)",
                err,
                path=writer.location,
            ) from err
    info = SaveInfo(
        path=writer.location,
        backend=backend,
        tensors=len(records),
        raw_bytes=mf.total_nbytes(records),
        stored_bytes=sum(f.size for f in files) + writer.external_bytes,
        files=tuple(f.path for f in files),
        seconds=time.perf_counter() - start,
        manifest_bytes=len(encoded),
    )
    log.info(
        "saved %s (%s, %d bytes) in %.3fs", info.path, backend, info.stored_bytes, info.seconds
    )
    return info


def _refuse_unreadable_manifest(encoded: bytes, final: str) -> None:
    """Never commit a checkpoint that no reader would open: its manifest (the state's
    structure and plain values, one record per tensor and chunk) must stay within the size
    every reader accepts."""
    limit = _config.MAX_MANIFEST_BYTES
    if len(encoded) > limit:
        raise UnsupportedObjectError(
            f"cannot save '{final}': its manifest would be {len(encoded)} bytes, over the "
            f"{limit}-byte limit every reader enforces (the state's structure and plain "
            "values are stored there: millions of Python numbers or strings, or millions of "
            "tiny tensors); store long lists of numbers as tensors (torch.tensor(values)), or "
            "pass a larger chunk_size. Nothing was committed",
            key_path="state",
            type_name="builtins.dict",
        )


# --------------------------------------------------------------------- loading


def _device_available(device: torch.device, *, allow_meta: bool) -> bool:
    """Whether tensors can be placed on ``device`` here. ``meta`` tensors hold no
    data: only a caller who asks for them by ``map_location`` gets them, never a
    checkpoint that names that device (it would load silently empty)."""
    if device.type == "cpu":
        return True
    if device.type == "meta":
        return allow_meta
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # some backends warn on first use
            torch.empty(0, device=device)
    except Exception:  # absent device modules raise ImportError, others RuntimeError
        return False
    return True


def _resolve_device(saved: str, map_location: MapLocation, key: Callable[[], str]) -> torch.device:
    """Where a tensor saved on ``saved`` goes; ``key()`` names it in the error."""
    target: Any
    if map_location is None:
        target = saved
    elif isinstance(map_location, Mapping):
        target = map_location.get(saved, saved)
    elif callable(map_location):
        target = map_location(saved)
    else:
        target = map_location
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # exotic device names warn; refused below if absent
            device = torch.device(target)
    except (RuntimeError, TypeError) as err:
        raise DeviceUnavailableError(f"map_location gave {target!r}, not a device") from err
    chosen = map_location is not None and not (
        isinstance(map_location, Mapping) and saved not in map_location
    )
    if not _device_available(device, allow_meta=chosen):
        raise DeviceUnavailableError(
            f"tensor {key()} was saved on {saved!r} and would load onto {str(device)!r}, which "
            "this machine lacks; pass map_location='cpu' (or a dict such as "
            "{'cuda:1': 'cuda:0'}) to load it elsewhere"
        )
    return device


class _KeyPaths:
    """The key paths of a manifest's tensors, computed when first needed (a message, or
    matching ``into=`` destinations): a load that goes well never walks the skeleton twice."""

    def __init__(self, manifest: mf.Manifest) -> None:
        self._manifest = manifest
        self._paths: list[str] | None = None

    def all(self) -> list[str]:
        if self._paths is None:
            self._paths = tree.key_paths(self._manifest.skeleton, len(self._manifest.tensors))
        return self._paths

    def __getitem__(self, index: int) -> str:
        return self.all()[index]


def _restore(
    tensor: torch.Tensor,
    record: mf.TensorRecord,
    device: torch.device,
    keys: _KeyPaths,
    index: int,
) -> torch.Tensor:
    if tensor.device != device:
        tensor = tensor.to(device)
    differentiable = tensor.is_floating_point() or tensor.is_complex()
    if record.requires_grad and not differentiable:
        raise FormatError(
            f"tensor {keys[index]} of dtype {record.dtype} is recorded with requires_grad, "
            "which only floating-point and complex tensors can have: the manifest is inconsistent"
        )
    if record.parameter:
        return torch.nn.Parameter(tensor, requires_grad=record.requires_grad)
    if record.requires_grad:
        tensor.requires_grad_(True)
    return tensor


@contextlib.contextmanager
def _opened(
    path: PathLike, storage_options: StorageOptions | None
) -> Iterator[tuple[CheckpointReader, mf.Manifest, Backend]]:
    """:func:`_open`, closing the reader when the block ends, error or not: a failed load
    never leaves the checkpoint's descriptors to the garbage collector (paused meanwhile)."""
    reader, manifest, impl = _open(path, storage_options)
    with reader:
        yield reader, manifest, impl


def _open(
    path: PathLike, storage_options: StorageOptions | None
) -> tuple[CheckpointReader, mf.Manifest, Backend]:
    """The checkpoint's reader (closed when the caller drops it), manifest and backend."""
    storage, where = resolve(path, storage_options)
    reader = storage.open_checkpoint(where)
    try:
        manifest = reader.read_manifest()
        return reader, manifest, _backend(manifest.backend, saved_by=reader.location)()
    except BaseException:
        reader.close()  # not left to the traceback's lifetime
        raise


def _read_tensors(
    reader: CheckpointReader,
    manifest: mf.Manifest,
    impl: Backend,
    *,
    verify: bool,
    targets: list[torch.Tensor | None] | None = None,
    mapped: bool = False,
) -> list[torch.Tensor]:
    if manifest.sharded:  # saved by a process group: whole tensors from their boxes
        return _sharded.read_whole(reader, manifest, impl, verify=verify)
    if mapped:
        tensors = impl.read_mapped(reader, manifest, verify=verify)
    elif targets is None:
        tensors = impl.read(reader, manifest, verify=verify)
    else:  # contiguous CPU destinations are decoded into directly
        direct = [
            t.detach() if t is not None and t.is_cpu and _dtypes.holds_its_values(t) else None
            for t in targets
        ]
        tensors = impl.read_into(reader, manifest, direct, verify=verify)
    if len(tensors) != len(manifest.tensors):
        raise FormatError(
            f"backend {manifest.backend!r} returned {len(tensors)} tensors for "
            f"{len(manifest.tensors)} records",
            path=reader.location,
        )
    names = _dtypes.DTYPE_NAMES
    for i, (t, r) in enumerate(zip(tensors, manifest.tensors, strict=True)):
        if names[t.dtype] != r.dtype or t.shape != r.shape:  # a torch.Size is a tuple
            raise FormatError(
                f"tensor {i}: backend returned {t.dtype} {tuple(t.shape)}, "
                f"manifest says {r.dtype} {r.shape}",
                path=reader.location,
            )
    return tensors


@dataclass(frozen=True)
class IntoResult:
    """What :func:`load` returns with ``into=``: the state, and the keys that did not match
    (always empty with ``strict=True``, which raises instead), as ``load_state_dict``
    reports them.

    Attributes:
        state: the whole saved state; its tensors that had a destination are the
            destination objects themselves.
        missing_keys: key paths of destinations no saved tensor filled.
        unexpected_keys: key paths of saved tensors no destination took.
    """

    state: Any
    missing_keys: tuple[str, ...]
    unexpected_keys: tuple[str, ...]


@overload
def load(
    path: PathLike,
    *,
    map_location: MapLocation = ...,
    verify: bool = ...,
    into: None = ...,
    strict: bool = ...,
    mmap: bool = ...,
    storage_options: StorageOptions | None = ...,
    process_group: Any = ...,
    rank: int | None = ...,
    keys: Sequence[Any] | None = ...,
    progress: ProgressCallback | None = ...,
) -> Any: ...


@overload
def load(
    path: PathLike,
    *,
    map_location: MapLocation = ...,
    verify: bool = ...,
    into: object,
    strict: bool = ...,
    mmap: bool = ...,
    storage_options: StorageOptions | None = ...,
    process_group: Any = ...,
    rank: int | None = ...,
    keys: Sequence[Any] | None = ...,
    progress: ProgressCallback | None = ...,
) -> IntoResult: ...


@_gc.pausing
def load(
    path: PathLike,
    *,
    map_location: MapLocation = None,
    verify: bool = True,
    into: Any = None,
    strict: bool = True,
    mmap: bool = False,
    storage_options: StorageOptions | None = None,
    process_group: Any = None,
    rank: int | None = None,
    keys: Sequence[Any] | None = None,
    progress: ProgressCallback | None = None,
) -> Any:
    """Load the state saved at ``path``, bit for bit.

    Args:
        path: a checkpoint written by :func:`save`: a local directory or a URL.
        map_location: where tensors go. ``None``: the device each was saved on;
            a device (``"cpu"``); a dict from saved to target device names; or a
            callable taking the saved device name (called once per saved device).
        verify: check every chunk's digest (default). ``False`` still checks
            sizes and structure, and never unpickles.
        into: existing tensors to fill in place, as ``Module.load_state_dict`` fills
            them: an ``nn.Module`` (its ``state_dict(keep_vars=True)``; the keys of a
            compiled or DDP wrapper match with or without its prefix), or a nesting of
            dicts/lists of tensors and numpy arrays, matched to the saved ones by key path.
            Contiguous CPU destinations are decoded into directly (no second copy), others
            copied into; tied weights are
            handled either way (see :mod:`aptckpt._into`). ``map_location`` does not apply
            to them. If the load fails part-way (damage), destinations may hold partial data.
        strict: with ``into``, refuse (before reading anything) when a saved tensor has
            no destination or a destination no saved tensor; ``False`` fills what matches
            and reports the rest in the result.
        mmap: return tensors stored uncompressed (``zstd`` with ``codec="none"``,
            and incompressible chunks) as copy-on-write memory maps of the
            checkpoint's files instead of reading them: nothing is copied or
            allocated up front, pages are shared with the page cache until written.
            ``verify`` still hashes every mapped byte before returning. As with
            ``torch.load(mmap=True)``, the files must not be truncated or rewritten
            while the tensors live (aptckpt never does; deleting the checkpoint is
            safe). Tensors mapped to another device are copied there. Not with ``into``.
            From object storage nothing can be mapped: tensors are read.
        storage_options: for a URL, as for :func:`save`.
        process_group: a collective load: every rank of the ``torch.distributed`` group
            calls it; each gets the state as its rank saved it (its own
            :class:`~aptckpt.PerRank` values) and fills the DTensors of ``into`` with the
            part its own placements give it, reading only the stored bytes it needs -- at
            any world size and mesh. An error on any rank is raised on every rank
            (:class:`~aptckpt.errors.CollectiveError`). A checkpoint saved by a process
            group loads without one too: whole tensors, rank 0's per-rank values.
        progress: ``progress(advance, total)`` as the data is read, as for :func:`verify`
            (a whole load in one process: not with ``keys`` or ``process_group``).

    Returns:
        The state; with ``into``, an :class:`IntoResult` holding it and the unmatched keys.

    Raises:
        CheckpointNotFoundError: ``path`` is not a committed checkpoint.
        IntegrityError: stored bytes differ from their digests; names file and tensor.
        FormatError: malformed manifest (UnsupportedFormatVersionError if newer).
        DeviceUnavailableError: a saved device is missing; pass ``map_location``.
        IntoMismatchError: (a ValueError) ``into`` does not match the checkpoint: keys
            (with ``strict``), kinds, dtypes or shapes, or ``meta`` destinations.
    """
    if mmap and into is not None:
        raise ValueError("load() takes mmap=True or into=, not both: into= already reuses memory")
    if progress is not None and (keys is not None or process_group is not None):
        raise ValueError("load(progress=...) reports whole loads; not with keys= or process_group=")
    if keys is not None:
        if into is not None or mmap or process_group is not None:
            raise ValueError(
                "load(keys=...) reads a subset; it takes no into=, mmap= or process_group="
            )
        with open(path, verify=verify, rank=rank or 0, storage_options=storage_options) as view:
            from aptckpt._view import subset

            found = subset(view, list(keys))
        if map_location is None:
            return found
        return {k: _moved(v, map_location) for k, v in found.items()}
    if process_group is not None:
        if rank is not None:
            raise ValueError("load() takes rank= only without process_group= (which sets it)")
        return _load_collective(
            path, process_group, map_location, verify, into, strict, storage_options
        )
    if rank is not None and (type(rank) is not int or rank < 0):
        raise ValueError(f"rank must be a non-negative int, got {rank!r}")
    with _opened(path, storage_options) as (reader, manifest, impl):
        reader = _counted(reader, manifest, impl, progress)
        if manifest.sharded:
            return _sharded.load(
                reader,
                manifest,
                impl,
                rank=rank or 0,
                map_location=map_location,
                verify=verify,
                into=into,
                strict=strict,
            )
        key_paths = _KeyPaths(manifest)
        plan = _into.plan(into, manifest, strict=strict) if into is not None else None
        tensors = _read_tensors(
            reader,
            manifest,
            impl,
            verify=verify,
            targets=plan.direct if plan is not None else None,
            mapped=mmap,
        )
        restored = []
        devices: dict[str, torch.device] = {}  # saved device -> target, resolved once each
        # numpy arrays and large bytes/str are host values: their tensors stay on the CPU
        moving = map_location is not None and map_location not in ("cpu", _CPU)
        on_host = tree.host_parts(manifest.skeleton, len(tensors)) if moving else frozenset()
        for index, (t, r) in enumerate(zip(tensors, manifest.tensors, strict=True)):
            if plan is not None:
                direct, copies = plan.direct[index], plan.copies[index]
                if direct is not None or copies:
                    # In the checkpoint's order, one after the other: several saved tensors
                    # aimed at one destination leave the last one there, never a mix.
                    with torch.no_grad():
                        for destination in copies:
                            destination.copy_(t)
                    restored.append(direct if direct is not None else copies[0])
                    continue
            if index in on_host:
                restored.append(t)
                continue
            device = devices.get(r.device)
            if device is None:
                device = devices[r.device] = _resolve_device(
                    r.device, map_location, functools.partial(key_paths.__getitem__, index)
                )
            restored.append(_restore(t, r, device, key_paths, index))
        state = tree.rebuild(manifest.skeleton, restored)
        if plan is None:
            return state
        _into.fill_composites(plan, state)
        return IntoResult(state, plan.missing, plan.unexpected)


def open(
    path: PathLike,
    *,
    verify: bool = True,
    rank: int = 0,
    storage_options: StorageOptions | None = None,
) -> CheckpointView:
    """Open the checkpoint at ``path`` for lazy, partial reads: ``keys()``, ``metadata``,
    ``get(key)`` (a tensor or any part of the state), ``get_slice(key)[...]`` (a box of a
    tensor: only the chunks it lies in are read and verified, locally and on object storage;
    the ``torch`` backend reads its whole file). ``rank``: whose per-rank values a checkpoint
    saved by a process group shows. Close it (or use ``with``) when done.

    Raises:
        As :func:`load` (the manifest is read and checked here).
    """
    from aptckpt._view import CheckpointView

    reader, manifest, impl = _open(path, storage_options)
    try:
        return CheckpointView(reader, manifest, impl, verify=verify, rank=rank)
    except BaseException:
        reader.close()
        raise


def _moved(value: Any, map_location: MapLocation) -> Any:
    """``value`` with its tensors moved as ``map_location`` says (``keys=`` loads)."""
    if isinstance(value, torch.Tensor):
        return value.to(_resolve_device("cpu", map_location, lambda: "a tensor"))
    if isinstance(value, dict):
        return type(value)({k: _moved(v, map_location) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return type(value)(_moved(v, map_location) for v in value)
    return value


def _load_collective(
    path: PathLike,
    process_group: Any,
    map_location: MapLocation,
    verify: bool,
    into: Any,
    strict: bool,
    storage_options: StorageOptions | None,
) -> Any:
    """:func:`load` with ``process_group``: every rank loads what it needs, then the ranks
    agree that every one of them succeeded."""
    from aptckpt.distributed import _comm

    with _comm.Comm(process_group, f"loading checkpoint '{path}'") as comm:
        result: Any = None
        error: BaseException | None = None
        try:
            with _opened(path, storage_options) as (reader, manifest, impl):
                result = _sharded.load(
                    reader,
                    manifest,
                    impl,
                    rank=comm.rank,
                    map_location=map_location,
                    verify=verify,
                    into=into,
                    strict=strict,
                )
        except Exception as err:
            error = err
        comm.agree(error, "load")
        return result


def inspect(path: PathLike, *, storage_options: StorageOptions | None = None) -> CheckpointInfo:
    """Summarise a checkpoint from its manifest, without reading tensor data
    (``storage_options`` for a URL, as for :func:`save`)."""
    with _opened(path, storage_options) as (reader, manifest, impl):
        if manifest.sharded:
            layouts, store_bytes = _sharded.describe(impl, manifest)
        else:
            layouts, store_bytes = impl.describe(manifest), impl.external_bytes(manifest)
        keys = tree.key_paths(manifest.skeleton, len(manifest.tensors))
        tensors = tuple(
            TensorInfo(
                key=k,
                dtype=r.dtype,
                shape=r.shape,
                device=r.device,
                nbytes=r.nbytes,
                stored_bytes=lay.stored_bytes,
                codecs=lay.codecs,
                parameter=r.parameter,
                requires_grad=r.requires_grad,
            )
            for k, r, lay in zip(keys, manifest.tensors, layouts, strict=True)
        )
        return CheckpointInfo(
            path=reader.location,
            backend=manifest.backend,
            options=dict(manifest.options),
            format_version=manifest.format_version,
            library_version=manifest.library_version,
            torch_version=manifest.torch_version,
            created_at=manifest.created_at,
            tensors=tensors,
            files=manifest.files,
            raw_bytes=sum(t.nbytes for t in tensors),
            stored_bytes=sum(f.size for f in manifest.files) + store_bytes,
            store_bytes=store_bytes,
            metadata=tree.rebuild(manifest.metadata, []) if manifest.metadata is not None else None,
            world_size=manifest.world_size,
        )


@_gc.pausing
def verify(
    path: PathLike,
    *,
    storage_options: StorageOptions | None = None,
    progress: ProgressCallback | None = None,
) -> VerifyReport:
    """Check every digest, size and structural rule of a checkpoint
    (``storage_options`` for a URL, as for :func:`save`).

    ``progress(advance, total)`` is called as the data is read: ``advance`` more bytes
    of ``total``, the checkpoint's stored bytes (its files and the ``delta`` objects
    it reaches); the advances add up to ``total``. Threads of the read may call it.

    Returns:
        A report when the checkpoint is intact.

    Raises:
        IntegrityError: damage, with ``.problems`` listing every damaged chunk
            found (file and tensor named).
        FormatError, CheckpointNotFoundError: as for :func:`load`.
    """
    start = time.perf_counter()
    with _opened(path, storage_options) as (reader, manifest, impl):
        external = _external_bytes(impl, manifest)
        reader = _counted(reader, manifest, impl, progress)
        tensors = _read_tensors(reader, manifest, impl, verify=True)
        try:
            if manifest.sharded:  # every rank's view of the state rebuilds
                used: set[int] = set()
                for rank in range(tree.rank_count(manifest.skeleton)):
                    selected, _ = tree.select_rank(manifest.skeleton, rank)
                    tree.rebuild(selected, tensors, every=False)
                    used.update(tree.referenced(selected, len(tensors)))
                if len(used) != len(tensors):
                    raise FormatError("malformed state skeleton: a tensor is never referenced")
            else:
                tree.rebuild(manifest.skeleton, tensors)
        except FormatError as err:
            raise IntegrityError(str(err), path=reader.location) from err
        return VerifyReport(
            path=reader.location,
            backend=manifest.backend,
            tensors=len(tensors),
            raw_bytes=mf.total_nbytes(manifest.tensors),
            stored_bytes=sum(f.size for f in manifest.files) + external,
            seconds=time.perf_counter() - start,
        )


@overload
def convert(
    src: PathLike,
    dst: PathLike,
    *,
    to: Literal["checkpoint"] = ...,
    backend: str | None = ...,
    overwrite: bool = ...,
    verify: bool = ...,
    storage_options: StorageOptions | None = ...,
    dst_storage_options: StorageOptions | None = ...,
    progress: ProgressCallback | None = ...,
    **options: Any,
) -> SaveInfo: ...


@overload
def convert(
    src: PathLike,
    dst: PathLike,
    *,
    to: Literal["torch-file", "safetensors", "dcp"],
    overwrite: bool = ...,
    verify: bool = ...,
    storage_options: StorageOptions | None = ...,
    select: str | tuple[Any, ...] | None = ...,
    max_shard_size: int | str | None = ...,
    progress: ProgressCallback | None = ...,
) -> ExportInfo: ...


def convert(
    src: PathLike,
    dst: PathLike,
    *,
    to: str = "checkpoint",
    backend: str | None = None,
    overwrite: bool = False,
    verify: bool = True,
    storage_options: StorageOptions | None = None,
    dst_storage_options: StorageOptions | None = None,
    select: str | tuple[Any, ...] | None = None,
    max_shard_size: int | str | None = None,
    progress: ProgressCallback | None = None,
    **options: Any,
) -> SaveInfo | ExportInfo:
    """Rewrite the checkpoint ``src`` as ``dst`` with another backend, or copy it between
    local disk and object storage (either may be a URL); or, with ``to=``, export it to
    another library's format.

    Tensors keep their recorded devices, ``nn.Parameter`` and ``requires_grad``
    flags, aliasing and metadata; nothing is moved to a device. The main use:
    turning a ``delta`` checkpoint, whose data lives in its run's object store,
    into a standalone ``zstd`` or ``torch`` checkpoint that can be shipped alone.

    Also imports another library's checkpoint (a local path): a ``torch.save`` file (read
    with ``weights_only=True``), a safetensors file, a Hugging Face sharded safetensors
    directory (``model.safetensors.index.json``), a torch.distributed.checkpoint directory
    (its ``.metadata`` pickle read through an allowlist of DCP's own classes, nothing run).
    See :mod:`aptckpt._imports` and :mod:`aptckpt._dcp`.

    Exports (``to="torch-file"``, ``"safetensors"``, ``"dcp"``) write a local file or
    directory from any of those sources; see :mod:`aptckpt._exports` for what each keeps.

    Args:
        src: a committed checkpoint (any backend), or a foreign checkpoint to import.
        dst: the new checkpoint directory, or the export's file or directory.
        to: ``"checkpoint"`` (default), ``"torch-file"``, ``"safetensors"`` or ``"dcp"``.
        backend, overwrite, **options: as for :func:`save` (``backend`` and options for
            ``to="checkpoint"`` only; default backend ``zstd``).
        select: an export of part of the state: a top-level key or a tuple of keys
            (safetensors exports the ``"model"`` entry by default, when there is one).
        max_shard_size: safetensors into a directory: shard past this size (``"5GB"``).
        verify: check every digest of ``src`` while reading it (default).
        storage_options: for whichever of ``src`` and ``dst`` is a URL (both, if both
            are, unless ``dst_storage_options`` is given).
        dst_storage_options: for ``dst`` when it needs other options than ``src``.
        progress: called as ``src`` is read, as for :func:`verify` (an aptckpt checkpoint;
            an import reports nothing).

    Raises:
        As :func:`load` for ``src`` and :func:`save` for ``dst``.
    """
    start = time.perf_counter()
    src_options = storage_options if is_url(src) else None
    if to != "checkpoint":
        if backend is not None or options or dst_storage_options is not None:
            raise BackendError(
                f"backend, dst_storage_options and backend options apply to "
                f"to='checkpoint', not to={to!r}"
            )
        if to not in _exports.FORMATS:
            raise ValueError(
                f"unknown format to={to!r}; choose 'checkpoint', "
                + ", ".join(repr(f) for f in _exports.FORMATS)
            )
        if is_url(dst):
            raise UnsupportedPathError(
                f"an export (to={to!r}) writes a local path, not {os.fspath(dst)!r}",
                path=os.fspath(dst),
            )
        if not is_url(src):
            _exports.check_apart(os.fspath(src), Path(os.fspath(dst)))
        state, provenance = _export_source(src, src_options, verify=verify, progress=progress)
        return _exports.export(
            state,
            Path(os.fspath(dst)),
            to=to,
            overwrite=overwrite,
            provenance=provenance,
            select=select,
            max_shard_size=max_shard_size,
        )
    if select is not None or max_shard_size is not None:
        raise BackendError("select and max_shard_size apply to exports (to=...), not checkpoints")
    backend = backend or "zstd"
    if dst_storage_options is None:
        dst_storage_options = storage_options if is_url(dst) else None
    dst_storage, dst_path = resolve(dst, dst_storage_options)
    impl = _backend(backend)(**options)

    def save_state(state: Any, metadata: Any) -> SaveInfo:
        """Save a state read whole (an import, or a checkpoint saved by a process group)."""
        pending = prepare_save(
            state,
            dst,
            backend=backend,
            metadata=metadata,
            overwrite=overwrite,
            storage_options=dst_storage_options,
            **options,
        )
        return pending.persist(pending.flat)

    foreign = None if is_url(src) else _imports.detect(src)
    if foreign is not None:
        return save_state(*_imports.read(src, foreign))
    with _opened(src, src_options) as (reader, manifest, src_impl):
        if reader.storage.same_checkpoint(reader.path, dst_storage, dst_path):
            raise CheckpointExistsError(
                dst_storage.display(dst_path),
                "it is the checkpoint being converted; choose another path",
            )
        reader = _counted(reader, manifest, src_impl, progress)
        if manifest.sharded:  # whole tensors, rank 0's per-rank values: one process's state
            state = _sharded.load(
                reader,
                manifest,
                src_impl,
                rank=0,
                map_location="cpu",
                verify=verify,
                into=None,
                strict=True,
            )
            metadata = (
                tree.rebuild(manifest.metadata, []) if manifest.metadata is not None else None
            )
            return save_state(state, metadata)
        tensors = _read_tensors(reader, manifest, src_impl, verify=verify)
        keys = tree.key_paths(manifest.skeleton, len(tensors))
        leaves = tuple(
            tree.TensorLeaf(t, k, r.parameter)
            for t, k, r in zip(tensors, keys, manifest.tensors, strict=True)
        )
        flat = tree.FlatState(manifest.skeleton, leaves, owned=True)
        version = max(
            tree.skeleton_version(manifest.skeleton), tree.skeleton_version(manifest.metadata)
        )
        return _write(
            flat,
            manifest.tensors,
            manifest.metadata,
            dst_storage,
            dst_path,
            backend,
            impl,
            format_version=version,
            overwrite=overwrite,
            start=start,
        )


def _export_source(
    src: PathLike,
    storage_options: StorageOptions | None,
    *,
    verify: bool,
    progress: ProgressCallback | None,
) -> tuple[Any, dict[str, str]]:
    """The state an export writes, and its provenance (strings, for safetensors'
    ``__metadata__``)."""
    provenance = {"aptckpt.version": __version__, "aptckpt.source": os.fspath(src)}
    foreign = None if is_url(src) else _imports.detect(src)
    if foreign is not None:
        state, recorded = _imports.read(src, foreign)
        provenance["aptckpt.source_format"] = foreign
        if recorded:
            provenance["aptckpt.metadata"] = json.dumps(recorded, default=repr)
        return state, provenance
    storage, where = resolve(src, storage_options)
    manifest_bytes = storage.read_file(storage.join(where, mf.MANIFEST_NAME), limit=1 << 30)
    with _opened(src, storage_options) as (_, manifest, _):
        provenance.update(
            {
                "aptckpt.source_format": "aptckpt",
                "aptckpt.backend": manifest.backend,
                "aptckpt.manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
                "aptckpt.created": manifest.created_at,
                "aptckpt.saved_by": manifest.library_version,
            }
        )
        metadata = tree.rebuild(manifest.metadata, []) if manifest.metadata is not None else None
    if metadata is not None:
        provenance["aptckpt.metadata"] = json.dumps(metadata, default=repr)
        if isinstance(metadata, Mapping):
            step = metadata.get("step", metadata.get("global_step"))
            if isinstance(step, int):
                provenance["aptckpt.step"] = str(step)
    state = load(
        src, map_location="cpu", verify=verify, storage_options=storage_options, progress=progress
    )
    return state, provenance


def _external_bytes(impl: Backend, manifest: mf.Manifest) -> int:
    """Bytes of store objects the checkpoint reaches outside its own files."""
    return (
        _sharded.describe(impl, manifest)[1] if manifest.sharded else impl.external_bytes(manifest)
    )


def _counted(
    reader: CheckpointReader,
    manifest: mf.Manifest,
    impl: Backend,
    progress: ProgressCallback | None,
) -> CheckpointReader:
    """``reader``, reporting the bytes read to ``progress`` (if given)."""
    if progress is None:
        return reader
    return _progress.counting(reader, manifest, _external_bytes(impl, manifest), progress)


def delete(path: PathLike, *, storage_options: StorageOptions | None = None) -> None:
    """Delete the checkpoint at ``path`` (``storage_options`` for a URL, as for :func:`save`).

    Locally the directory is first renamed to a hidden trash name (durably), so a
    crash part-way leaves hidden debris that the next save there removes, never a
    visible directory with some files missing. On object storage the manifest goes
    first (the name is gone at once), then the data objects.
    Objects a ``delta`` checkpoint reached stay in the store until
    :func:`collect_garbage`; other checkpoints never depend on this directory.

    Raises:
        CheckpointNotFoundError: ``path`` is not a committed checkpoint.
    """
    storage, where = resolve(path, storage_options)
    storage.delete_checkpoint(where)

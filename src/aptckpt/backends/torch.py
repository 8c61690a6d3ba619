"""``torch`` backend: one ``torch.save`` file, readable by plain ``torch.load``.

Layout inside the checkpoint directory::

    manifest.msgpack
    state.pt             torch.save of the state

``torch.load("ckpt/state.pt", weights_only=True)`` opens ``state.pt`` without
aptckpt. What goes into it is the state *as aptckpt normalises it* (only types
that ``weights_only`` loads: subclasses of int/float/str become their base
type; tensors are moved to the CPU, their devices kept in the manifest), so a
state that this backend saves is one that loads without pickle's arbitrary
code, and one that every other backend stores identically. The one value it
must refuse is empty ``bytes``: pickle protocol 2 (the only one ``weights_only``
reads) spells ``b""`` as a call that ``weights_only`` rejects.

Each tensor is written alone on a storage it covers exactly; any other tensor is
written as a compact copy. ``torch.save`` writes a tensor's whole storage, and
records its length in elements of the tensor's dtype, rounded down: a tensor that
views a storage whose size is not a whole number of its elements (``uint8`` bytes
viewed as ``int16``) gives a file that ``torch.load`` refuses, with or without
``weights_only``; two tensors of different dtypes on one storage (a state loaded
with ``mmap=True``) are refused by ``torch.save`` itself; and a small view of a
large storage would write all of it. Copies also make tensors that share memory
in the saved state load independent, as with every other backend.

Interruptions: an exception raised while writing (``KeyboardInterrupt``, a full
disk) reaches the caller as itself, not as the ``RuntimeError`` that torch's zip
writer raises when it then cannot finish the file.

Integrity: the payload holds the XXH3-128 digests of the file's chunks. A load
reads each chunk once, checking it as it comes in, and torch unpickles those bytes
only -- never the file again (:mod:`aptckpt.backends._torchread`: storages that hold
whole chunks are read straight into their own memory, the others are storages over
the buffer their chunks were read into). aptckpt always loads with torch's
``weights_only`` unpickler, so a file carrying a code-running pickle is refused
whether or not digests are verified. After loading, the state is flattened
again and its skeleton must equal the manifest's. When ``torch.load`` fails on a
file whose digests match, the file is as it was written -- torch cannot read it
(another torch version, or a file an older aptckpt wrote for a tensor like the
above) -- and the error says so (``FormatError``), not that it is damaged.

Payload::

    {"file": 0, "chunk_size": int, "digests": bytes (16 per chunk)}
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any, ClassVar, Protocol, cast

import msgpack
import torch

from aptckpt import _accel, _config, _dtypes, tree
from aptckpt.backends import _chunks, _torchfile, _torchread
from aptckpt.backends.base import Backend, BackendOptions, TensorLayout
from aptckpt.errors import FormatError, IntegrityError, UnsupportedObjectError
from aptckpt.manifest import Manifest
from aptckpt.storage.base import CheckpointReader, CheckpointWriter, DataFiles
from aptckpt.tree import FlatState

__all__ = ["TorchBackend", "TorchOptions", "write_torch_file"]

FILE_NAME = "state.pt"


@dataclass(frozen=True)
class TorchOptions(BackendOptions):
    """Options of the ``torch`` backend.

    Attributes:
        chunk_size: bytes per hashed chunk of the file.
    """

    chunk_size: int = _config.DEFAULT_CHUNK_SIZE


def _contents(files: DataFiles, size: int) -> Any:
    """The first ``size`` bytes of the data file as a buffer: a read-ahead memory map
    where the storage has one (nothing copied), else the bytes read."""
    if size == 0:
        return b""
    mapped = files.map_file(0, size, verify=True)
    if mapped is None:
        return files.read(0, 0, size)
    return torch.empty(0, dtype=torch.uint8).set_(mapped).numpy().data


def _file_digests(contents: Any, chunk_size: int) -> bytes:
    if not len(contents):
        return b""
    return _accel.hash_chunks(contents, chunk_size)  # type: ignore[no-any-return]


def _span(t: torch.Tensor) -> int:
    """Elements of its storage that ``t`` reaches, from its offset on."""
    if t.numel() == 0:
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))


def _alone(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor on a storage of its own that it covers exactly; a compact copy where not.

    Why: see the module docstring. Sharing is told by the storage's data pointer, which
    is what ``torch.save`` compares for its different-dtypes check (two storage objects
    over one mapping count as one).
    """
    out: list[torch.Tensor] = []
    taken: set[int] = set()
    for t in tensors:
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
        exact = t.storage_offset() == 0 and _span(t) * t.element_size() == nbytes
        if not exact or (nbytes and storage.data_ptr() in taken):
            t = _copy_bits(t)
        elif nbytes:
            taken.add(storage.data_ptr())
        out.append(t)
    return out


#: Integer dtypes by item size: copying through them copies bits, not values.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _copy_bits(t: torch.Tensor) -> torch.Tensor:
    """A compact copy of ``t`` with the same bytes (a value copy would make every nonzero
    byte of a bool tensor 1)."""
    bits = _BITS.get(t.element_size())
    if bits is None or t.is_conj() or t.is_neg():  # 16-byte complex; lazy bits are values
        return t.clone(memory_format=torch.contiguous_format)
    return t.view(bits).clone(memory_format=torch.contiguous_format).view(t.dtype)


def _saved_state(flat: FlatState) -> Any:
    """The object given to ``torch.save``: the state rebuilt from CPU tensors, each alone."""
    cpu = _alone([leaf.tensor.detach().to("cpu") for leaf in flat.tensors])
    saved: list[torch.Tensor] = []
    for leaf, t in zip(flat.tensors, cpu, strict=True):
        if leaf.is_parameter:
            saved.append(torch.nn.Parameter(t, requires_grad=leaf.tensor.requires_grad))
        else:
            saved.append(t.requires_grad_(leaf.tensor.requires_grad))
    # The file holds what torch.load(weights_only=True) reads: numpy values and arrays,
    # large bytes and defaultdicts in their torch-loadable form (the manifest keeps the exact
    # skeleton, which the load rebuilds).
    form = tree.torch_form(flat.skeleton)
    state = tree.rebuild(form, saved)
    if form is not flat.skeleton and not _same_skeleton(tree.flatten(state).skeleton, form):
        raise UnsupportedObjectError(
            "the torch backend cannot store this state: in the form torch.load reads (numpy "
            "values as Python values and tensors, frozensets as tuples) two of its values "
            "become one; use the zstd backend",
            key_path="state",
            type_name="builtins.object",
        )
    return state


class _Writable(Protocol):
    def write(self, data: Any, /) -> Any: ...
    def flush(self) -> Any: ...


class _Sink:
    """Passes ``torch.save``'s writes on and remembers the first exception one raised."""

    def __init__(self, f: _Writable) -> None:
        self._f = f
        self.error: BaseException | None = None

    def write(self, data: Any) -> Any:
        if self.error is not None:  # the file is already incomplete: write nothing more
            raise RuntimeError("an earlier write to this file failed")
        try:
            return self._f.write(data)
        except BaseException as err:
            self.error = err
            raise

    def flush(self) -> None:
        self._f.flush()


def _interruption(err: BaseException) -> BaseException | None:
    """A ``KeyboardInterrupt`` or ``SystemExit`` that ``err`` was raised while handling."""
    seen: set[int] = set()
    cause = err.__context__
    while cause is not None and id(cause) not in seen:
        if not isinstance(cause, Exception):
            return cause
        seen.add(id(cause))
        cause = cause.__context__
    return None


def write_torch_file(flat: FlatState, f: _Writable) -> None:
    """``torch.save`` the state of ``flat`` to ``f`` in the form the ``torch`` backend writes.

    Every tensor goes to the CPU, alone on a storage it covers exactly (see the module
    docstring), so the file loads with ``torch.load(path, weights_only=True)``. Also used
    by ``aptckpt convert --to torch-file``.

    Raises:
        UnsupportedObjectError: the state holds empty bytes (``b""``).
        BaseException: whatever ``f.write`` raised (``OSError``, ``KeyboardInterrupt``),
            as itself: torch's zip writer, unable to finish the file afterwards, raises a
            ``RuntimeError`` that would hide it.
    """
    _refuse_unloadable(flat)
    sink = _Sink(f)
    try:
        torch.save(_saved_state(flat), cast(IO[bytes], sink))  # it needs write() and flush()
    except BaseException as err:
        original = sink.error if sink.error is not None else _interruption(err)
        if original is None or original is err:
            raise
        # torch's follow-on error ("unexpected pos ...") says nothing the original does not.
        raise original from None


class TorchBackend(Backend):
    """Interop backend: a ``torch.save`` file; see the module docstring."""

    name: ClassVar[str] = "torch"
    Options = TorchOptions
    options: TorchOptions

    def write(self, flat: FlatState, writer: CheckpointWriter) -> Any:
        _refuse_unloadable(flat)  # before the file is created
        # torch.save reads the tensors' storages while it writes: those the caller may still
        # write are hashed before and after, so that a save racing another thread fails
        # instead of committing a mix of two states.
        sources = _caller_sources(flat)
        before = _accel.hash_chunks_many([now for _, now, _ in sources], self.options.chunk_size)
        # Direct writes, hashed on the way in: the file is not read back. A failed write
        # (disk full) arrives as its OSError, which the caller reports as a WriteError.
        with writer.open(FILE_NAME, digest_chunk_size=self.options.chunk_size) as f:
            write_torch_file(flat, f)
        after = _accel.hash_chunks_many([live() for _, _, live in sources], self.options.chunk_size)
        changed = tuple(
            key for (key, _, _), a, b in zip(sources, before, after, strict=True) if a != b
        )
        if changed:
            raise _chunks.state_changed(changed)
        digests = f.digests()
        return {"file": 0, "chunk_size": self.options.chunk_size, "digests": digests}

    def _parse(self, manifest: Manifest, where: str) -> tuple[int, int, bytes]:
        payload = manifest.payload
        if not isinstance(payload, dict) or len(manifest.files) != 1 or payload.get("file") != 0:
            raise FormatError("torch payload must name the one data file", path=where)
        chunk_size = _chunks.check_chunk_size(payload.get("chunk_size"), where=where)
        digests = payload.get("digests")
        size = manifest.files[0].size
        expected = -(-size // chunk_size) * _chunks.DIGEST_SIZE
        if not isinstance(digests, bytes) or len(digests) != expected:
            raise FormatError("torch payload digests do not cover the file", path=where)
        return size, chunk_size, digests

    def read(
        self, reader: CheckpointReader, manifest: Manifest, *, verify: bool = True
    ) -> list[torch.Tensor]:
        where = reader.location
        size, chunk_size, digests = self._parse(manifest, where)
        record = manifest.files[0]
        with reader.open_files(manifest.files) as files:
            damage = _Damage(where, files, manifest, chunk_size, digests)
            if files.failed:
                raise damage.error(files.failed[0])
            # One pass: every chunk read once, into the memory torch gets, and checked on
            # the way in; torch unpickles those bytes, never the file itself.
            contents = _torchread.read_file(files, 0, size, chunk_size, digests if verify else None)
            if isinstance(contents, list):  # chunks that failed their digests or were cut short
                raise damage.error(None)
            try:
                state = _unpickled(contents, where, record.path)
            except _Unreadable as err:
                # Damage, or a file torch cannot read as written: the digests tell.
                if not verify and _file_digests(_contents(files, size), chunk_size) != digests:
                    raise damage.error(None) from err.__cause__
                raise err.intact(manifest) from err.__cause__
        try:
            flat = tree.flatten(state)
        except Exception as err:
            raise FormatError(
                f"'{record.path}' holds objects aptckpt never saves: {err}", path=where
            ) from err
        if len(flat.tensors) != len(manifest.tensors) or not _same_skeleton(
            flat.skeleton, tree.torch_form(manifest.skeleton)
        ):
            raise IntegrityError(
                f"'{record.path}' does not hold the state its manifest describes; the checkpoint "
                "was modified after saving -- restore it from a copy",
                path=where,
                file=record.path,
            )
        return [leaf.tensor.detach() for leaf in flat.tensors]

    def describe(self, manifest: Manifest) -> list[TensorLayout]:
        return [TensorLayout(None, ("torch.save",), 0) for _ in manifest.tensors]


def _caller_sources(
    flat: FlatState,
) -> list[tuple[str, memoryview, Callable[[], memoryview]]]:
    """What a blocking save reads of the caller's objects: ``(key path, the bytes saved, a
    function giving those bytes as the caller's objects hold them now)`` for every distinct
    CPU storage of the caller's tensors (``torch.save`` writes whole storages), and for every
    tensor aptckpt copied from the caller's object (a numpy array in another order, a
    quantized representation). None for a snapshot aptckpt owns."""
    if flat.owned:
        return []
    found: dict[int, tuple[str, memoryview, Callable[[], memoryview]]] = {}
    copies = []
    for leaf in flat.tensors:
        t = leaf.tensor
        if leaf.refresh is not None:
            live = functools.partial(_fresh_bytes, leaf.refresh)
            copies.append((leaf.key_path, _dtypes.byte_view(_chunks.host_tensor(t)), live))
        elif t.device.type == "cpu":
            storage = t.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in found:
                view = _dtypes.byte_view(torch.empty(0, dtype=torch.uint8).set_(storage))
                found[storage.data_ptr()] = (leaf.key_path, view, functools.partial(_same, view))
    return [*found.values(), *copies]


def _fresh_bytes(refresh: Callable[[], torch.Tensor]) -> memoryview:
    return _dtypes.byte_view(_chunks.host_tensor(refresh()))


def _same(view: memoryview) -> memoryview:
    return view


def _refuse_unloadable(flat: FlatState) -> None:
    # weights_only reads pickle protocol 2 only, which spells b"" as a call of the
    # global `bytes` -- a global that weights_only refuses. Non-empty bytes are fine.
    paths = tree.find_plain(tree.torch_form(flat.skeleton), lambda v: v == b"")
    if paths:
        raise UnsupportedObjectError(
            f"cannot store empty bytes (b'') at {paths[0]} with the torch backend: "
            "torch.load(weights_only=True) refuses them; use the zstd backend, or store "
            "None or a non-empty value instead",
            key_path=paths[0],
            type_name="builtins.bytes",
        )


def _same_skeleton(loaded: Any, recorded: Any) -> bool:
    packed = msgpack.packb(loaded, use_bin_type=True)
    try:
        return packed == msgpack.packb(recorded, use_bin_type=True)  # type: ignore[no-any-return]
    except ValueError:  # nested deeper than msgpack packs: no state aptckpt saved
        return False


class _Damage:
    """Names what a damaged ``state.pt`` loses: the file, the chunks, the tensors."""

    def __init__(
        self, where: str, files: DataFiles, manifest: Manifest, chunk_size: int, digests: bytes
    ) -> None:
        self.where = where
        self.files, self.manifest = files, manifest
        self.record = manifest.files[0]
        self.chunk_size, self.digests = chunk_size, digests

    def error(self, problem: _chunks.FileProblem | None) -> IntegrityError:
        """The error for a file that is missing or of the wrong size (``problem``),
        or that differs from its digests (``None``)."""
        file, recorded = self.record.path, self.record.size
        nbytes = [r.nbytes for r in self.manifest.tensors]
        hit: list[int] | None
        if problem is not None and problem.size is None:
            what = f"data file '{file}' is missing"
            hit = [i for i, n in enumerate(nbytes) if n]
        elif problem is not None and problem.size is not None and problem.size > recorded:
            what = str(problem.error)  # bytes appended: no tensor byte is known to be lost
            hit = []
        else:
            what, hit = self._locate(nbytes)
        message = f"checkpoint '{self.where}' is damaged: {what}"
        keys = tree.key_paths(self.manifest.skeleton, len(nbytes)) if hit else []
        named = [keys[i] for i in hit or ()]
        if named:
            shown = ", ".join(named[:4]) + (f" and {len(named) - 4} more" if len(named) > 4 else "")
            message += f"; tensor(s) {shown} are stored in the damaged chunks"
        elif hit is not None:
            message += (
                "; the damaged bytes hold no tensor data (zip headers or the pickle), but "
                "torch.load cannot trust the file"
            )
        return IntegrityError(
            f"{message}; restore the checkpoint from a copy",
            path=self.where,
            file=file,
            tensor=named[0] if named else None,
        )

    def _locate(self, nbytes: list[int]) -> tuple[str, list[int] | None]:
        """Hash what is left of the file; which chunks differ, and which tensors they hold."""
        file, recorded, cs = self.record.path, self.record.size, self.chunk_size
        size = self.files.size(0)
        contents = _contents(self.files, size)
        complete = min(size, recorded) // cs
        found = _file_digests(memoryview(contents)[: complete * cs], cs)
        good = [
            found[16 * i : 16 * i + 16] == self.digests[16 * i : 16 * i + 16]
            for i in range(complete)
        ]
        bad = [(i * cs, (i + 1) * cs) for i, ok in enumerate(good) if not ok]
        if size < recorded:
            bad.append((size, recorded))
            what = f"data file '{file}' is truncated to {size} bytes (manifest says {recorded})"
        else:
            if size % cs:  # the last, shorter chunk
                tail = memoryview(contents)[complete * cs : size]
                good.append(_accel.xxh3_128(tail) == self.digests[-16:])
                if not good[-1]:
                    bad.append((complete * cs, size))
            what = (
                f"'{file}' differs from its digests in {len(bad)} chunk(s) of {cs} bytes "
                f"(first at offset {bad[0][0] if bad else '?'})"
            )
        verified = min(size, len(good) * cs)

        def intact(start: int, stop: int) -> bool:
            return stop <= verified and all(good[start // cs : -(-stop // cs)])

        if size == 0:
            return what, [i for i, n in enumerate(nbytes) if n]
        # the zip parser searches (find/rfind): bytes, on this rare path
        return what, _torchfile.damaged_tensors(bytes(contents), bad, intact, nbytes)


class _Unreadable(Exception):
    """``torch.load`` failed; whether the file is damaged is not known yet."""

    def __init__(self, message: str, where: str, name: str, *, pickle_refused: bool) -> None:
        super().__init__(message)
        self.where, self.name, self.pickle_refused = where, name, pickle_refused

    def intact(self, manifest: Manifest) -> FormatError:
        """The error for a file whose bytes are those written at save time."""
        if self.pickle_refused:
            return FormatError(
                f"'{self.name}' needs pickle beyond weights_only to load (it may carry code) "
                "and was refused; aptckpt never loads such files",
                path=self.where,
            )
        writer, this = manifest.torch_version, torch.__version__
        if writer != this:
            why = (
                f"torch {this} cannot read what torch {writer} wrote: load it with torch "
                f"{writer}, then save the state again"
            )
        else:
            why = (
                f"torch {this} cannot read it, although this same version wrote it: torch.save "
                "writes such a file for a tensor viewing a storage that is not a whole number "
                "of its elements, which older aptckpt versions passed on; save the state again "
                "from its source (this version writes a compact copy of such tensors)"
            )
        return FormatError(
            f"torch.load cannot read '{self.name}' ({self}). The file is not damaged -- every "
            f"chunk matches the digests recorded when it was saved -- but {why}",
            path=self.where,
        )


def _unpickled(contents: _torchread.Contents, where: str, name: str) -> Any:
    try:
        return _torchread.unpickle(contents)
    except pickle.UnpicklingError as err:
        raise _Unreadable(str(err), where, name, pickle_refused=True) from err
    except Exception as err:  # torch raises RuntimeError, EOFError, zipfile errors, ...
        raise _Unreadable(str(err), where, name, pickle_refused=False) from err

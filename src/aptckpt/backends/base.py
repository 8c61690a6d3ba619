"""The ``Backend`` interface every storage format implements.

A backend turns the flat tensor list of a state into data files inside a
checkpoint directory and back. Everything else -- the state skeleton, plain
values, aliasing, ``nn.Parameter``, devices, the manifest, the atomic commit --
is done by :mod:`aptckpt.api` around it, identically for every backend.

Call order, driven by :mod:`aptckpt.api`:

Saving
    1. ``Backend(**options)`` once per save; bad options raise ``BackendError``.
    2. :meth:`Backend.write` once, with the flattened state and a
       ``CheckpointWriter`` whose :meth:`~aptckpt.storage.local._atomic.CheckpointWriter.path`
       hands out file names inside the (temporary) checkpoint directory. It
       returns the backend's *payload*: msgpack-ready data stored in the manifest.
       A backend that keeps data outside the checkpoint (the ``delta`` object
       store) makes it durable itself before returning, adds the bytes it wrote
       to ``writer.external_bytes``, and may keep a lock until the commit with
       ``writer.hold(lock)``.
    3. The API fsyncs every file, writes the manifest and commits.

Loading
    1. ``Backend()`` with default options (a reader must never need the writer's
       options: whatever it needs is in the payload).
    2. :meth:`Backend.read` returns one CPU tensor per manifest tensor record,
       in order, as plain ``torch.Tensor`` of the recorded dtype and shape. It
       validates the payload, and with ``verify=True`` checks every digest.

Thread-safety: one backend instance serves one call on one thread; inside that
call it may use as many threads as it likes. Instances hold no state between
calls.

The class is an ABC with default methods so the interface can grow without
breaking plugins. A backend's module, registry key and entry point share one
name; plugins register through the entry-point group ``aptckpt.backends`` and
should pass :func:`aptckpt.testing.check_backend` (the tests of
:class:`aptckpt.testing.conformance.BackendConformance`).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from aptckpt.errors import BackendError

if TYPE_CHECKING:
    import torch

    from aptckpt.manifest import Manifest
    from aptckpt.storage.base import CheckpointReader, CheckpointWriter
    from aptckpt.tree import FlatState

__all__ = ["Backend", "BackendOptions", "InPlaceBackend", "TensorLayout"]


@dataclass(frozen=True)
class BackendOptions:
    """Base of every backend's options: a small frozen dataclass.

    Fields marked ``metadata={"record": False}`` (thread counts and other
    run-time tunables) are not written to the manifest.
    """

    def validate(self) -> None:
        """Raise ``BackendError`` naming a bad value and the allowed ones."""

    def record(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.metadata.get("record", True)
        }


@dataclass(frozen=True)
class TensorLayout:
    """How one tensor is stored, for :func:`aptckpt.inspect`."""

    stored_bytes: int | None
    codecs: tuple[str, ...]
    chunks: int


class Backend(ABC):
    """A storage format for the tensors of a checkpoint; see the module docstring."""

    #: Registry key, module name and entry-point name.
    name: ClassVar[str]
    #: The frozen dataclass of this backend's options.
    Options: ClassVar[type[BackendOptions]] = BackendOptions

    def __init__(self, **options: Any) -> None:
        valid = {f.name for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(options) - valid)
        if unknown:
            allowed = ", ".join(sorted(valid)) or "none"
            raise BackendError(
                f"backend {self.name!r} has no option {', '.join(map(repr, unknown))}; "
                f"its options are: {allowed}"
            )
        try:
            self.options = self.Options(**options)
        except TypeError as err:
            raise BackendError(f"bad options for backend {self.name!r}: {err}") from err
        self.options.validate()

    @abstractmethod
    def write(self, flat: FlatState, writer: CheckpointWriter) -> Any:
        """Write the tensors of ``flat`` into files from ``writer``; return the payload."""

    @abstractmethod
    def read(
        self, reader: CheckpointReader, manifest: Manifest, *, verify: bool = True
    ) -> list[torch.Tensor]:
        """Return one CPU tensor per ``manifest.tensors`` entry, in order."""

    def read_into(
        self,
        reader: CheckpointReader,
        manifest: Manifest,
        into: Sequence[torch.Tensor | None],
        *,
        verify: bool = True,
    ) -> list[torch.Tensor]:
        """Like :meth:`read`, but tensor ``i`` is decoded straight into ``into[i]``
        when that is given (a contiguous CPU tensor of the record's dtype and shape)
        and returned as it. Backends that can, override this to write no second
        copy; this default reads, then copies."""
        tensors = self.read(reader, manifest, verify=verify)
        return [t if d is None else d.copy_(t) for t, d in zip(tensors, into, strict=True)]

    def read_mapped(
        self, reader: CheckpointReader, manifest: Manifest, *, verify: bool = True
    ) -> list[torch.Tensor]:
        """Like :meth:`read`, but tensors stored as their raw bytes may be returned as
        copy-on-write memory maps of the checkpoint's files instead of copies (``load(...,
        mmap=True)``). Backends that store nothing mappable keep this default: :meth:`read`."""
        return self.read(reader, manifest, verify=verify)

    def read_regions(
        self,
        reader: CheckpointReader,
        manifest: Manifest,
        regions: Sequence[tuple[int, int, int]],
        *,
        verify: bool = True,
    ) -> list[torch.Tensor]:
        """The bytes ``[start, stop)`` of tensor ``index`` for each ``(index, start, stop)``,
        as one-dimensional ``uint8`` CPU tensors (a rank loading the part of a shard it
        needs). Backends that store tensors in independently readable chunks override this
        to read and verify only the chunks the regions lie in; this default reads every
        tensor."""
        import torch

        tensors = self.read(reader, manifest, verify=verify)
        return [
            tensors[index].contiguous().reshape(-1).view(torch.uint8)[start:stop]
            for index, start, stop in regions
        ]

    def describe(self, manifest: Manifest) -> list[TensorLayout]:
        """How each tensor is stored, from the manifest alone (no data read)."""
        return [TensorLayout(None, (), 0) for _ in manifest.tensors]

    def external_bytes(self, manifest: Manifest) -> int:
        """Bytes this checkpoint reaches outside its own directory (a shared object
        store), from the manifest alone; 0 for a self-contained checkpoint."""
        return 0

    def options_record(self) -> Mapping[str, Any]:
        """The options written to the manifest."""
        return self.options.record()

    def format_version(self, payload: Any) -> int:
        """The lowest manifest format version whose readers read ``payload`` (which
        :meth:`write` returned). A checkpoint is written with the lowest version its
        skeleton and payload need, so older readers read what they can."""
        return 2


class InPlaceBackend(Backend):
    """A backend that decodes straight into destination tensors: it implements
    :meth:`read_into`, and :meth:`read` is ``read_into`` with no destination given."""

    def read(
        self, reader: CheckpointReader, manifest: Manifest, *, verify: bool = True
    ) -> list[torch.Tensor]:
        return self.read_into(reader, manifest, [None] * len(manifest.tensors), verify=verify)

    @abstractmethod
    def read_into(
        self,
        reader: CheckpointReader,
        manifest: Manifest,
        into: Sequence[torch.Tensor | None],
        *,
        verify: bool = True,
    ) -> list[torch.Tensor]:
        """See :meth:`Backend.read_into`; ``into[i]`` is None for a fresh tensor."""

"""Exception hierarchy of aptckpt.

Every error the library raises derives from :class:`AptckptError`. Leaves also
subclass the builtin that fits (``ValueError``, ``FileNotFoundError``, ...), so
code that already catches builtins keeps working. Messages name the offending
value and the fix; attributes carry the same facts for programs.
"""

from __future__ import annotations

import errno
import os
from typing import Any

__all__ = [
    "AptckptError",
    "BackendError",
    "CheckpointDeletedError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "CollectiveError",
    "DeviceUnavailableError",
    "FormatError",
    "IntegrationError",
    "IntegrityError",
    "IntoMismatchError",
    "InvalidNameError",
    "NativeUnavailableError",
    "ReplicaDivergenceError",
    "RunBusyError",
    "StateChangedError",
    "StorageError",
    "StoreBusyError",
    "StoreNotFoundError",
    "UnknownBackendError",
    "UnreadableError",
    "UnsafePathError",
    "UnsupportedFormatVersionError",
    "UnsupportedObjectError",
    "UnsupportedPathError",
    "WriteError",
]


class AptckptError(Exception):
    """Root of every error raised by aptckpt."""


class NativeUnavailableError(AptckptError, ImportError):
    """``APTCKPT_NATIVE=require`` was set but the compiled core cannot be imported."""


class UnknownBackendError(AptckptError, KeyError):
    """A backend name that is not registered."""

    def __init__(self, name: str, available: list[str]) -> None:
        self.name = name
        self.available = available
        names = ", ".join(repr(n) for n in available) or "none"
        super().__init__(
            f"unknown backend {name!r}; available: {names}. Install the plugin that provides it "
            "or register it with aptckpt.register_backend()."
        )

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class BackendError(AptckptError, ValueError):
    """A backend was misconfigured (bad options, an invalid plugin class)."""


class UnsupportedObjectError(AptckptError, TypeError):
    """The state holds an object that cannot be stored without pickle."""

    def __init__(self, message: str, *, key_path: str, type_name: str) -> None:
        self.key_path = key_path
        self.type_name = type_name
        super().__init__(message)


class CheckpointNotFoundError(AptckptError, FileNotFoundError):
    """No committed checkpoint exists at a path."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        super().__init__(f"no checkpoint at '{self.path}': {reason}")

    def __str__(self) -> str:
        return str(self.args[0])


class CheckpointDeletedError(CheckpointNotFoundError):
    """A checkpoint was deleted (by retention, ``delete`` or another process) while
    it was being loaded; nothing wrong was returned. Load another one, or retry."""

    def __init__(self, path: str | os.PathLike[str], reason: str = "") -> None:
        self.path = os.fspath(path)
        why = f" ({reason})" if reason else ""
        # Not CheckpointNotFoundError's "no checkpoint at" wording: there was one.
        FileNotFoundError.__init__(
            self,
            f"checkpoint '{self.path}' was deleted while loading{why}; nothing was returned. "
            "Load another checkpoint (e.g. the run's latest again) or retry",
        )


class CheckpointExistsError(AptckptError, FileExistsError):
    """The target path of a save is already taken."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        super().__init__(f"cannot save to '{self.path}': {reason}")

    def __str__(self) -> str:
        return str(self.args[0])


class FormatError(AptckptError, ValueError):
    """A manifest or data file is malformed: wrong types, sizes, offsets or names."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(f"{message} (in '{path}')" if path else message)


class UnsupportedFormatVersionError(FormatError):
    """The checkpoint was written by a newer format version than this reader knows."""

    def __init__(self, found: Any, supported: int, *, path: str | None = None) -> None:
        self.found = found
        self.supported = supported
        super().__init__(
            f"checkpoint format version {found!r} is newer than this aptckpt reads "
            f"(up to {supported}); upgrade aptckpt to load it",
            path=path,
        )


class UnsupportedPathError(AptckptError, ValueError):
    """A path aptckpt cannot use as given: a URL (``s3://...``) where only local paths work."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(message)


class UnsafePathError(FormatError):
    """A path inside a checkpoint is absolute, leaves the checkpoint root, or is a link."""


class IntegrityError(AptckptError, ValueError):
    """Stored bytes do not match their recorded digest or size.

    The message always names the damaged file: when ``file`` is given and the
    message does not mention it, it is appended.

    Attributes:
        path: the checkpoint directory.
        file: the damaged data file, relative to the checkpoint root (if known).
        tensor: the key path of the tensor whose bytes are damaged (if known).
        problems: every problem found, when a whole checkpoint was verified.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        file: str | None = None,
        tensor: str | None = None,
        problems: tuple[str, ...] = (),
    ) -> None:
        self.path = path
        self.file = file
        self.tensor = tensor
        if file is not None and file not in message:
            if path is not None and path.endswith(file):
                message = f"{message} (in '{path}')"
            elif path is not None and path not in message:
                message = f"{message} (file '{file}' of '{path}')"
            else:
                message = f"{message} (file '{file}')"
        self.problems = problems or (message,)
        super().__init__(message)


class IntoMismatchError(AptckptError, ValueError):
    """``load(..., into=...)`` cannot fill the destinations as asked: keys that do not match
    (with ``strict=True``), or a destination of another kind, dtype or shape. Raised before
    anything is read, so the destinations are untouched.

    Attributes:
        missing_keys: destinations no saved tensor fills.
        unexpected_keys: saved tensors no destination takes.
    """

    def __init__(
        self, message: str, *, missing: tuple[str, ...], unexpected: tuple[str, ...]
    ) -> None:
        self.missing_keys = missing
        self.unexpected_keys = unexpected
        super().__init__(message)


class InvalidNameError(AptckptError, ValueError):
    """A checkpoint path that cannot be saved to: a name too long for the file
    system, or one of the names aptckpt gives its hidden temporary entries."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(message)


class UnreadableError(AptckptError, PermissionError):
    """A checkpoint, store or directory that this user may not read.

    Attributes:
        path: what could not be read.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(message)
        self.errno = errno.EACCES

    def __str__(self) -> str:
        return str(self.args[0])


class StorageError(AptckptError, OSError):
    """A request to a remote store failed for good while reading: the store refused it, or
    kept failing after every retry. The message names the URL (never credentials).

    Attributes:
        path: the URL the request was for.
    """

    def __init__(self, message: str, *, path: str | None = None, errno_: int | None = None) -> None:
        self.path = path
        super().__init__(message)
        self.errno = errno_

    def __str__(self) -> str:
        return str(self.args[0])


class DeviceUnavailableError(AptckptError, RuntimeError):
    """A tensor was saved on a device that this machine lacks."""


class StateChangedError(AptckptError, RuntimeError):
    """A tensor changed while a blocking save was reading it (another thread wrote to it):
    the bytes written would not be one state. Nothing was committed.

    Attributes:
        tensors: the key paths of the tensors that changed.
    """

    def __init__(self, message: str, *, tensors: tuple[str, ...]) -> None:
        self.tensors = tensors
        super().__init__(message)


class WriteError(AptckptError, OSError):
    """Writing a checkpoint failed (disk full, permissions); nothing was committed."""

    def __init__(self, message: str, *, path: str | None = None, errno_: int | None = None) -> None:
        self.path = path
        super().__init__(message)
        self.errno = errno_

    def __str__(self) -> str:
        return str(self.args[0])


class StoreBusyError(AptckptError, BlockingIOError):
    """An object store is locked by a save or a garbage collection in progress."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0])


class RunBusyError(AptckptError, BlockingIOError):
    """A run directory is already being written by another process.

    Attributes:
        path: the run directory.
        holder: what the lock file says about the process holding it
            (``{"pid": ..., "since": ...}``), or ``{}`` if it could not be read.
    """

    def __init__(self, message: str, *, path: str | None = None, holder: Any = None) -> None:
        self.path = path
        self.holder = holder or {}
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0])


class StoreNotFoundError(AptckptError, FileNotFoundError):
    """A path given as an object store is not one."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0])


class CollectiveError(AptckptError, RuntimeError):
    """A collective save or load (``process_group=``) failed on some rank, or a rank never
    arrived (killed, crashed, stuck past the timeout). Every rank of the group raises it;
    nothing was committed by a failed save.

    Attributes:
        failures: group rank -> what went wrong there (what each rank reported; a rank that
            never arrived is named by the message instead).
    """

    def __init__(self, message: str, *, failures: dict[int, str] | None = None) -> None:
        self.failures = dict(failures or {})
        super().__init__(message)


class ReplicaDivergenceError(CollectiveError):
    """A tensor every rank holds a replica of (a DDP parameter, a plain tensor) differs
    between ranks: the ranks diverged. Nothing was committed.

    Attributes:
        key_path: the tensor; groups: the ranks that agree with each other, one tuple per
            distinct value.
    """

    def __init__(self, message: str, *, key_path: str, groups: list[tuple[int, ...]]) -> None:
        self.key_path = key_path
        self.groups = groups
        super().__init__(message)


class IntegrationError(AptckptError, RuntimeError):
    """A trainer framework's version or set-up that an integration
    (:mod:`aptckpt.integrations`) cannot serve: the message names the framework,
    what was found and what to change.

    Attributes:
        framework: the framework's package name (``"transformers"``, ``"accelerate"``, ...).
    """

    def __init__(self, message: str, *, framework: str) -> None:
        self.framework = framework
        super().__init__(message)

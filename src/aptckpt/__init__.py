"""aptckpt: checkpoints for PyTorch training -- verified, atomic, portable, incremental.

>>> import aptckpt
>>> info = aptckpt.save(state, "runs/a/step-500", backend="zstd")   # doctest: +SKIP
>>> state = aptckpt.load("runs/a/step-500")                          # doctest: +SKIP

``NATIVE`` tells whether the compiled core is active (``APTCKPT_NATIVE=auto|require|disable``).
"""

from aptckpt._accel import IMPLEMENTATION, NATIVE
from aptckpt._version import __version__
from aptckpt._view import CheckpointView, TensorSlice
from aptckpt.api import (
    CheckpointInfo,
    ExportInfo,
    IntoResult,
    SaveHandle,
    SaveInfo,
    TensorInfo,
    VerifyReport,
    convert,
    delete,
    inspect,
    load,
    open,
    save,
    verify,
)
from aptckpt.backends.delta import GarbageReport, collect_garbage
from aptckpt.errors import (
    AptckptError,
    BackendError,
    CheckpointDeletedError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CollectiveError,
    DeviceUnavailableError,
    FormatError,
    IntegrationError,
    IntegrityError,
    IntoMismatchError,
    InvalidNameError,
    ReplicaDivergenceError,
    RunBusyError,
    StateChangedError,
    StorageError,
    StoreBusyError,
    StoreNotFoundError,
    UnknownBackendError,
    UnreadableError,
    UnsupportedFormatVersionError,
    UnsupportedObjectError,
    UnsupportedPathError,
    WriteError,
)
from aptckpt.manager import CheckpointManager, CheckpointRecord, ResumeInfo
from aptckpt.manifest import FORMAT_VERSION
from aptckpt.registry import available_backends, register_backend
from aptckpt.retention import KeepAll, KeepBest, KeepEvery, KeepLast, Metric, SaveEvery
from aptckpt.tree import PerRank, per_rank

__all__ = [
    "FORMAT_VERSION",
    "IMPLEMENTATION",
    "NATIVE",
    "AptckptError",
    "BackendError",
    "CheckpointDeletedError",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointRecord",
    "CheckpointView",
    "CollectiveError",
    "DeviceUnavailableError",
    "ExportInfo",
    "FormatError",
    "GarbageReport",
    "IntegrationError",
    "IntegrityError",
    "IntoMismatchError",
    "IntoResult",
    "InvalidNameError",
    "KeepAll",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "Metric",
    "PerRank",
    "ReplicaDivergenceError",
    "ResumeInfo",
    "RunBusyError",
    "SaveEvery",
    "SaveHandle",
    "SaveInfo",
    "StateChangedError",
    "StorageError",
    "StoreBusyError",
    "StoreNotFoundError",
    "TensorInfo",
    "TensorSlice",
    "UnknownBackendError",
    "UnreadableError",
    "UnsupportedFormatVersionError",
    "UnsupportedObjectError",
    "UnsupportedPathError",
    "VerifyReport",
    "WriteError",
    "__version__",
    "available_backends",
    "collect_garbage",
    "convert",
    "delete",
    "inspect",
    "load",
    "open",
    "per_rank",
    "register_backend",
    "save",
    "verify",
]

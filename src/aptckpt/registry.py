"""Backend registry: built-ins loaded lazily, plugins through entry points.

Names map to "module:attribute" specs until first use, so importing aptckpt
does not import every backend (or its dependencies). Third-party backends are
discovered through the entry-point group ``aptckpt.backends``; registering a
name that is taken needs ``clobber=True``.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping
from importlib.metadata import entry_points
from types import MappingProxyType

from aptckpt.backends.base import Backend
from aptckpt.errors import BackendError, UnknownBackendError

__all__ = ["available_backends", "get_backend", "register_backend", "registered"]

ENTRY_POINT_GROUP = "aptckpt.backends"

_BUILTINS = {
    "delta": "aptckpt.backends.delta:DeltaBackend",
    "torch": "aptckpt.backends.torch:TorchBackend",
    "zstd": "aptckpt.backends.zstd:ZstdBackend",
}
_specs: dict[str, str] = dict(_BUILTINS)  # name -> "module:attr", not imported yet
_classes: dict[str, type[Backend]] = {}
_lock = threading.Lock()
_plugins_scanned = False


def _scan_plugins() -> None:
    global _plugins_scanned
    if _plugins_scanned:
        return
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        _specs.setdefault(ep.name, ep.value)
    _plugins_scanned = True


def _check_class(cls: object, name: str) -> type[Backend]:
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise BackendError(
            f"backend {name!r} must be a subclass of aptckpt.backends.base.Backend, got {cls!r}"
        )
    return cls


def register_backend(
    cls: type[Backend], *, name: str | None = None, clobber: bool = False
) -> type[Backend]:
    """Register a backend class under ``name`` (default ``cls.name``).

    Usable as a decorator. Raises ``BackendError`` if the name is taken and
    ``clobber`` is false.
    """
    key = name or getattr(cls, "name", None)
    if not isinstance(key, str) or not key.isidentifier():
        raise BackendError(f"backend name {key!r} must be an identifier")
    _check_class(cls, key)
    with _lock:
        _scan_plugins()
        if not clobber and (key in _classes or key in _specs):
            raise BackendError(
                f"a backend named {key!r} is already registered; pass clobber=True to replace it"
            )
        _specs.pop(key, None)
        _classes[key] = cls
    return cls


def unregister_backend(name: str) -> None:
    """Remove a registered backend (mainly for tests of plugins)."""
    with _lock:
        _classes.pop(name, None)
        _specs.pop(name, None)
        if name in _BUILTINS:
            _specs[name] = _BUILTINS[name]


def get_backend(name: str) -> type[Backend]:
    """The backend class registered as ``name``, imported on first use."""
    with _lock:
        if name in _classes:
            return _classes[name]
        _scan_plugins()
        spec = _specs.get(name) if isinstance(name, str) else None
        if spec is None:
            raise UnknownBackendError(str(name), sorted(set(_specs) | set(_classes)))
        module_name, _, attr = spec.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except Exception as err:
            raise BackendError(f"backend {name!r} ({spec}) failed to load: {err}") from err
        _classes[name] = _check_class(cls, name)
        del _specs[name]
        return _classes[name]


def available_backends() -> tuple[str, ...]:
    """Names of every known backend, sorted (plugins are not imported)."""
    with _lock:
        _scan_plugins()
        return tuple(sorted(set(_specs) | set(_classes)))


def registered() -> Mapping[str, str]:
    """Read-only view: name -> where the backend comes from."""
    with _lock:
        _scan_plugins()
        view = {n: s for n, s in _specs.items()}
        view.update({n: f"{c.__module__}:{c.__qualname__}" for n, c in _classes.items()})
        return MappingProxyType(view)

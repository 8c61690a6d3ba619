"""The Python objects of a Lightning checkpoint, as plain data and back.

A Lightning checkpoint dict is mostly what :func:`aptckpt.save` stores as it is: tensors,
dicts of them, plain values. A few of its values are Python objects that only pickle
would keep: the hyper-parameters (an ``AttributeDict``, an ``argparse.Namespace``, an
OmegaConf ``DictConfig``/``ListConfig``, ``pathlib`` paths inside them) and
``hparams_type`` (a class object). :func:`encode` replaces each *known* one by plain data
and records where it was and what it was, in a table stored under the reserved top-level
key :data:`TABLE_KEY`; :func:`decode` pops the table and rebuilds the same objects. What
is neither storable nor known is left for :func:`aptckpt.save` to refuse, naming its key
path; :func:`refusal` turns that refusal into one that says how to fix it in Lightning.

Why a side table rather than a marker inside the converted value (``{"__type__": ...}``):
a user's own dict could hold such a marker key and be taken for a converted object; the
table lives at one key that Lightning never writes and the plugin refuses in user data.

Nothing is ever imported by name from a checkpoint: a class is restored only if it is one
of :data:`_TYPES` (a fixed list), so a hostile checkpoint cannot make a load run code.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from aptckpt.errors import FormatError, IntegrationError, UnsupportedObjectError

__all__ = ["TABLE_KEY", "decode", "encode", "refusal"]

#: The reserved top-level key of the stored state that holds the table of conversions.
TABLE_KEY = "aptckpt:lightning"
_TABLE_VERSION = 1

#: Classes a ``type`` value may name (``hparams_type``): only these are ever restored.
#: Module, class name, and the package to install when the module is missing.
_TYPES: dict[str, tuple[str, str, str | None]] = {
    "builtins.dict": ("builtins", "dict", None),
    "argparse.Namespace": ("argparse", "Namespace", None),
    "lightning.fabric.utilities.data.AttributeDict": (
        "lightning.fabric.utilities.data",
        "AttributeDict",
        "lightning",
    ),
    "omegaconf.dictconfig.DictConfig": ("omegaconf.dictconfig", "DictConfig", "omegaconf"),
    "omegaconf.listconfig.ListConfig": ("omegaconf.listconfig", "ListConfig", "omegaconf"),
}
#: pathlib classes stored as their string, by kind name.
_PATHS: dict[str, type[pathlib.PurePath]] = {
    "Path": pathlib.Path,
    "PurePosixPath": pathlib.PurePosixPath,
    "PureWindowsPath": pathlib.PureWindowsPath,
}
_HINT = (
    "a Lightning checkpoint is stored without pickle, so its values must be plain data "
    "(tensors, numbers, strings, lists, dicts, ...). Convert it to plain data, leave it out "
    "of the hyper-parameters (self.save_hyperparameters(ignore=[...])), or replace or remove "
    "it in LightningModule.on_save_checkpoint(checkpoint) / Callback.state_dict() (and "
    "rebuild it in on_load_checkpoint)"
)


def _qualname(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _attribute_dict() -> type | None:
    try:
        from lightning.fabric.utilities.data import AttributeDict
    except ImportError:  # only the values module without Lightning: nothing is one
        return None
    return AttributeDict


def _omegaconf() -> Any:
    """The ``omegaconf`` module if it is installed (Lightning does not need it)."""
    try:
        import omegaconf
    except ImportError:
        return None
    return omegaconf


class _Encoder:
    def __init__(self) -> None:
        self.table: list[list[Any]] = []
        self.attribute_dict = _attribute_dict()
        omegaconf = _omegaconf()
        self.containers: tuple[type, ...] = (
            (omegaconf.DictConfig, omegaconf.ListConfig) if omegaconf is not None else ()
        )
        self.to_container: Callable[..., Any] | None = (
            omegaconf.OmegaConf.to_container if omegaconf is not None else None
        )
        self._active: set[int] = set()

    def value(self, obj: Any, where: tuple[Any, ...]) -> Any:
        """``obj`` with every known object below it converted (a copy of each container
        on the way to one; everything else is ``obj``'s own)."""
        if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
            return obj  # the common leaves first: nothing to do
        if isinstance(obj, (torch.Tensor, np.ndarray, np.generic, torch.dtype, torch.device)):
            return obj
        kind = type(obj)
        if id(obj) in self._active:
            return obj  # a cycle: aptckpt refuses it, naming the key path
        if self.attribute_dict is not None and kind is self.attribute_dict:
            return self._record(where, "AttributeDict", self.inside(obj, dict(obj), where))
        if kind is argparse.Namespace:
            return self._record(where, "Namespace", self.inside(obj, dict(vars(obj)), where))
        if self.containers and isinstance(obj, self.containers):
            assert self.to_container is not None
            # resolve=False keeps interpolations ("${a.b}") as written: the same config back
            plain = self.to_container(obj, resolve=False)
            name = "DictConfig" if isinstance(obj, self.containers[0]) else "ListConfig"
            return self._record(where, name, self.value(plain, where))
        if isinstance(obj, type):
            name = _qualname(obj)
            if name in _TYPES:
                return self._record(where, "type", name)
            return obj  # aptckpt refuses it, naming the key path
        if isinstance(obj, pathlib.PurePath):
            for name, path_type in _PATHS.items():
                if kind is path_type or (name == "Path" and isinstance(obj, pathlib.Path)):
                    return self._record(where, name, str(obj))
            return obj
        if isinstance(obj, dict):
            return self.mapping(obj, where)
        if kind is list or kind is tuple:
            self._active.add(id(obj))
            try:
                items = [self.value(v, (*where, i)) for i, v in enumerate(obj)]
            finally:
                self._active.discard(id(obj))
            if all(a is b for a, b in zip(items, obj, strict=True)):
                return obj
            return items if kind is list else tuple(items)
        return obj  # storable as it is, or refused by aptckpt with its key path

    def inside(self, obj: Any, items: dict[Any, Any], where: tuple[Any, ...]) -> dict[Any, Any]:
        """The converted ``items`` of the object ``obj`` (an ``AttributeDict``, a
        ``Namespace``), with ``obj`` marked as being walked: a value that holds its own
        container is a cycle, left for aptckpt to refuse."""
        self._active.add(id(obj))
        try:
            return self.mapping(items, where)
        finally:
            self._active.discard(id(obj))

    def mapping(self, obj: dict[Any, Any], where: tuple[Any, ...]) -> dict[Any, Any]:
        self._active.add(id(obj))
        try:
            changed = {}
            for key, item in obj.items():
                new = self.value(item, (*where, key))
                if new is not item:
                    changed[key] = new
        finally:
            self._active.discard(id(obj))
        if not changed:
            return obj
        # A shallow copy keeps the mapping's own type (OrderedDict, defaultdict and its
        # factory) and its order; only the converted values differ.
        out = copy.copy(obj) if type(obj) is not dict else dict(obj)
        for key, new in changed.items():
            out[key] = new
        return out

    def _record(self, where: tuple[Any, ...], kind: str, plain: Any) -> Any:
        self.table.append([list(where), kind])
        return plain


def encode(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint`` with the known Python objects converted to plain data and, if any
    were, the table of conversions under :data:`TABLE_KEY`. The caller's dict and its
    contents are not changed.

    Raises:
        UnsupportedObjectError: ``checkpoint`` already holds the reserved key.
    """
    if TABLE_KEY in checkpoint:
        raise UnsupportedObjectError(
            f"checkpoint[{TABLE_KEY!r}] is a key aptckpt's Lightning plugin reserves for its "
            "own use; rename that key in on_save_checkpoint",
            key_path=f"checkpoint[{TABLE_KEY!r}]",
            type_name=type(checkpoint[TABLE_KEY]).__name__,
        )
    encoder = _Encoder()
    out = encoder.mapping(checkpoint, ())
    if not encoder.table:
        return out
    out = dict(out)
    out[TABLE_KEY] = {"version": _TABLE_VERSION, "types": encoder.table}
    return out


def _path_text(where: list[Any]) -> str:
    return "checkpoint" + "".join(f"[{k!r}]" for k in where)


def _load_type(name: str, where: str) -> type:
    found = _TYPES.get(name)
    if found is None:
        raise FormatError(
            f"{where} names the class {name!r}, which aptckpt's Lightning plugin never "
            "writes; the checkpoint was altered or written by something else"
        )
    module, attribute, package = found
    try:
        loaded: type = getattr(importlib.import_module(module), attribute)
    except ImportError as err:
        raise IntegrationError(
            f"{where} is a {attribute} of {package}, which is not installed; "
            f"pip install {package} to load this checkpoint",
            framework=package or module,
        ) from err
    return loaded


def _rebuild(kind: str, plain: Any, where: str) -> Any:
    if kind == "type":
        if not isinstance(plain, str):
            raise FormatError(f"{where}: a class is recorded by name, found {type(plain)}")
        return _load_type(plain, where)
    if kind in _PATHS:
        if not isinstance(plain, str):
            raise FormatError(f"{where}: a path is recorded as a string, found {type(plain)}")
        return _PATHS[kind](plain)
    if kind in ("AttributeDict", "Namespace"):
        if type(plain) is not dict:
            raise FormatError(f"{where}: a {kind} is recorded as a dict, found {type(plain)}")
        if kind == "Namespace":
            return argparse.Namespace(**{str(k): v for k, v in plain.items()})
        return _load_type("lightning.fabric.utilities.data.AttributeDict", where)(plain)
    if kind in ("DictConfig", "ListConfig"):
        expected = dict if kind == "DictConfig" else list
        if type(plain) is not expected:
            raise FormatError(f"{where}: a {kind} is recorded as a {expected.__name__}")
        omegaconf = _omegaconf()
        if omegaconf is None:
            raise IntegrationError(
                f"{where} is a {kind} of omegaconf, which is not installed; "
                "pip install omegaconf to load this checkpoint",
                framework="omegaconf",
            )
        return omegaconf.OmegaConf.create(plain)
    raise FormatError(f"{where} records an unknown kind {kind!r}")


def decode(state: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint :func:`encode` stored as ``state``, with its objects rebuilt (in
    place: ``state`` is a fresh load). A state without a table is returned as it is.

    Raises:
        FormatError: the table is malformed or names a class that is never written.
        IntegrationError: an OmegaConf config, without ``omegaconf`` installed.
    """
    if not isinstance(state, dict):
        raise FormatError(
            f"a Lightning checkpoint is a dict; this one holds a {type(state).__name__}: "
            "it was not saved by Lightning (load it with aptckpt.load)"
        )
    table = state.pop(TABLE_KEY, None)
    if table is None:
        return state
    if (
        type(table) is not dict
        or table.get("version") != _TABLE_VERSION
        or type(table.get("types")) is not list
    ):
        raise FormatError(
            f"checkpoint[{TABLE_KEY!r}] is not a conversion table of version {_TABLE_VERSION}; "
            "the checkpoint was written by a newer aptckpt or altered"
        )
    entries = table["types"]
    trie: _Node = _Node()
    for entry in entries:
        if (
            type(entry) is not list
            or len(entry) != 2
            or type(entry[0]) is not list
            or not entry[0]
            or type(entry[1]) is not str
        ):
            raise FormatError(f"checkpoint[{TABLE_KEY!r}] holds a malformed entry {entry!r}")
        node = trie
        for key in entry[0]:
            try:
                node = node.children.setdefault(key, _Node())
            except TypeError as err:  # an unhashable key: never written
                raise FormatError(f"checkpoint[{TABLE_KEY!r}] holds a malformed entry") from err
        node.kind = entry[1]
    out: dict[str, Any] = _apply(state, trie, [])
    return out


class _Node:
    """The conversions recorded below one place of the checkpoint."""

    __slots__ = ("children", "kind")

    def __init__(self) -> None:
        self.kind: str | None = None
        self.children: dict[Any, _Node] = {}


def _apply(value: Any, node: _Node, where: list[Any]) -> Any:
    """``value`` with the conversions of ``node`` undone, innermost first (a config's
    paths are rebuilt before the config around them)."""
    if node.children:
        if type(value) is tuple:
            items = list(value)
            for key, child in node.children.items():
                items[_index(items, key, where)] = _apply(items[key], child, [*where, key])
            value = tuple(items)
        elif isinstance(value, (dict, list)):
            for key, child in node.children.items():
                if isinstance(value, list):
                    _index(value, key, where)
                elif key not in value:
                    raise FormatError(
                        f"checkpoint[{TABLE_KEY!r}] names {_path_text([*where, key])}, "
                        "which is absent"
                    )
                value[key] = _apply(value[key], child, [*where, key])
        else:
            raise FormatError(
                f"checkpoint[{TABLE_KEY!r}] names a value inside {_path_text(where)}, "
                f"which is a {type(value).__name__}"
            )
    if node.kind is not None:
        value = _rebuild(node.kind, value, _path_text(where))
    return value


def _index(items: list[Any], key: Any, where: list[Any]) -> int:
    if type(key) is not int or not 0 <= key < len(items):
        raise FormatError(
            f"checkpoint[{TABLE_KEY!r}] names {_path_text([*where, key])}, which is absent"
        )
    return key


def refusal(err: UnsupportedObjectError) -> UnsupportedObjectError:
    """aptckpt's refusal of an object, said in Lightning's terms."""
    key_path = err.key_path.replace("state[", "checkpoint[", 1)
    return UnsupportedObjectError(
        f"cannot save {err.type_name} at {key_path} in a Lightning checkpoint: {_HINT}. ({err})",
        key_path=key_path,
        type_name=err.type_name,
    )

"""Lightning (``lightning`` 2.x): aptckpt as the ``CheckpointIO`` plugin of a ``Trainer``.

>>> from aptckpt.integrations.lightning import AptckptCheckpointIO    # doctest: +SKIP
>>> trainer = lightning.Trainer(plugins=[AptckptCheckpointIO(backend="delta")])  # doctest: +SKIP

Every checkpoint Lightning saves through its strategy -- ``ModelCheckpoint``'s top-k and
``last``, ``trainer.save_checkpoint`` -- becomes an aptckpt checkpoint: a directory named
like Lightning's file (``epoch=3-step=40.ckpt/``, or that prefix on an object store),
written atomically (an existing one, such as ``last.ckpt``, is swapped for the new one in
one step), verified on load, with any backend. ``trainer.fit(ckpt_path=...)`` and
``"last"`` load through the plugin, and ``ModelCheckpoint``'s top-k removals delete
through it. The checkpoint dict is stored without pickle: plain data as it is, Lightning's
known objects (``AttributeDict``, ``Namespace``, OmegaConf configs, ``pathlib`` paths,
``hparams_type``) converted and rebuilt (:mod:`._lightning_values`), anything else
refused with its key path and the fix.

What Lightning does around the plugin, and what that means (Lightning 2.6):

* DDP and other single-copy strategies call ``save_checkpoint`` and ``remove_checkpoint``
  on global rank 0 only, and ``load_checkpoint`` on every rank: supported. Sharded
  strategies (``FSDPStrategy``, ``ModelParallelStrategy``, DeepSpeed) do not use a
  ``CheckpointIO`` for their sharded saves; use :func:`aptckpt.save` with
  ``process_group=`` (``aptckpt.distributed``) there.
* ``LightningModule.load_from_checkpoint`` reads with ``torch.load`` and never asks the
  plugin: use :func:`load_from_checkpoint` here instead.
* ``ModelCheckpoint`` checks existence and lists ``dirpath`` with fsspec, without the
  plugin's ``storage_options``; ``ckpt_path="last"`` asks fsspec for modification times,
  which object-store prefixes do not have. On object stores give Lightning the
  credentials through the environment (``AWS_*``) and resume with
  ``ckpt_path=find_last_checkpoint(dirpath, storage_options=...)``.
* ``save_last="link"`` makes ``last.ckpt`` a symbolic link with ``os.symlink``, bypassing
  the plugin: it works on local disks (a load follows the link, removing the link removes
  only the link, a save replaces the link by a checkpoint); object stores have no links.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect as _inspect
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

import aptckpt
from aptckpt.errors import (
    AptckptError,
    CheckpointNotFoundError,
    StoreBusyError,
    StoreNotFoundError,
    UnsupportedObjectError,
)
from aptckpt.integrations import _lightning_values as values
from aptckpt.registry import get_backend
from aptckpt.storage import is_url, resolve


def _checkpoint_io_base() -> type:
    """Lightning's ``CheckpointIO`` -- of each package it ships as: ``lightning`` (its
    ``Trainer`` is ``lightning.Trainer``) and the standalone ``pytorch_lightning`` /
    ``lightning_fabric`` (``pytorch_lightning.Trainer``), whichever are installed. The two
    are distinct classes, and each Trainer accepts only plugins deriving from its own."""
    bases = []
    for module in (
        "lightning.fabric.plugins.io.checkpoint_io",
        "lightning_fabric.plugins.io.checkpoint_io",
    ):
        try:
            bases.append(importlib.import_module(module).CheckpointIO)
        except ImportError:
            continue
    if not bases:
        raise ImportError(
            "aptckpt.integrations.lightning needs Lightning 2.x: pip install 'aptckpt[lightning]'"
        )
    return bases[0] if len(bases) == 1 else type("CheckpointIO", tuple(bases), {})


if TYPE_CHECKING:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
else:
    CheckpointIO = _checkpoint_io_base()

__all__ = [
    "AptckptAsyncCheckpointIO",
    "AptckptCheckpointIO",
    "find_last_checkpoint",
    "load_from_checkpoint",
]

log = logging.getLogger("aptckpt")


#: Lightning's names of "last" checkpoints (``ModelCheckpoint.CHECKPOINT_NAME_LAST``).
def _last_names(name: str) -> re.Pattern[str]:
    """The names ``ModelCheckpoint`` gives its last checkpoint, ``CHECKPOINT_NAME_LAST``
    being ``name``: its ``{fields}`` formatted, a ``-vN`` version, ``.ckpt``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be the last checkpoint's name ('last'), got {name!r}")
    parts = re.split(r"(\{[^{}]*\})", name)
    body = "".join(".+?" if p.startswith("{") and p.endswith("}") else re.escape(p) for p in parts)
    return re.compile(rf"{body}(-v\d+)?\.ckpt")


def _available(name: str) -> str:
    """A saved device if this machine has it, else ``"cpu"`` (as Lightning's
    ``load_from_checkpoint`` maps storages of missing accelerators)."""
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError):
        return "cpu"
    return name


def _map_location(map_location: Any) -> Any:
    """``map_location`` as :func:`aptckpt.load` takes it: ``None`` keeps each tensor on
    its saved device when present here, else on the CPU."""
    if map_location is None:
        return _available
    if callable(map_location) and not isinstance(map_location, (str, torch.device)):
        try:
            arity = len(_inspect.signature(map_location).parameters)
        except (TypeError, ValueError):
            arity = 1
        if arity != 1:
            raise TypeError(
                "map_location as a function of (storage, location) is torch.load's; aptckpt "
                "never unpickles storages: pass a device, a dict {saved device: target} or a "
                "function of the saved device's name"
            )
    return map_location


class AptckptCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that saves, loads and removes aptckpt checkpoints.

    Args:
        backend: the aptckpt backend of every save (``"zstd"``, ``"torch"``, ``"delta"``,
            or a registered plugin). With ``"delta"`` the checkpoints of one ``dirpath``
            share ``<dirpath>/aptckpt-store`` (or ``store=``); removing one never breaks
            another, and the objects nothing reaches any more are collected.
        blocking: ``False`` saves in the background (:class:`AptckptAsyncCheckpointIO`).
        storage_options: fsspec options (credentials, ``endpoint_url``) for URL paths
            (``s3://...``); never used for local paths, never written anywhere.
        verify: check every chunk's digest on load (default).
        collect_garbage: with ``"delta"``, collect the store's unreachable objects after
            a removal (locally under the store's lock; object stores keep young objects).
        **options: backend options, e.g. ``level=9``, ``codec="none"``, ``keyframe_every=4``.

    ``trainer.save_checkpoint(path, storage_options=...)``: those are fsspec options too,
    over the plugin's, for that one save.
    """

    def __init__(
        self,
        backend: str = "zstd",
        *,
        blocking: bool = True,
        storage_options: Mapping[str, Any] | None = None,
        verify: bool = True,
        collect_garbage: bool = True,
        **options: Any,
    ) -> None:
        super().__init__()
        # Unknown names and bad options fail here, when the Trainer is built, not at the
        # end of the first epoch.
        get_backend(backend)(**options)
        self.backend = backend
        self.blocking = bool(blocking)
        self.storage_options = dict(storage_options) if storage_options is not None else None
        self.verify = bool(verify)
        self.collect_garbage = bool(collect_garbage)
        self.options = dict(options)
        self._lock = threading.Lock()
        self._handle: aptckpt.SaveHandle[aptckpt.SaveInfo] | None = None
        self._error: BaseException | None = None
        self._garbage: set[str] = set()  # store folders to collect once nothing is in flight

    def __getstate__(self) -> dict[str, Any]:
        """What ``ddp_spawn`` pickles to the processes it starts: the configuration, not
        the lock or a save in flight."""
        state = dict(self.__dict__)
        for name in ("_lock", "_handle", "_error"):
            del state[name]
        state["_garbage"] = set()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._handle = None
        self._error = None

    def __repr__(self) -> str:  # never the storage options: they may hold credentials
        mode = "" if self.blocking else ", blocking=False"
        return f"{type(self).__name__}(backend={self.backend!r}{mode})"

    # ------------------------------------------------------------------ paths

    def _options(self, path: str, extra: Any = None) -> dict[str, Any] | None:
        if extra is not None and not isinstance(extra, Mapping):
            raise TypeError(
                "storage_options of a save are fsspec options (a mapping such as "
                f"{{'endpoint_url': ...}}), got {type(extra).__name__}"
            )
        if not is_url(path):
            if extra:
                resolve(path, extra)  # raises UnsupportedPathError: options with a local path
            return None
        merged = {**(self.storage_options or {}), **(extra or {})}
        return merged or None

    def _drop_link(self, path: str) -> bool:
        """Remove ``path`` if it is a symbolic link (``save_last="link"``): only the link."""
        if is_url(path):
            return False
        storage, where = resolve(path)
        if storage.link_target(where) is None:
            return False
        storage.remove_file(where)
        return True

    # ----------------------------------------------------------- background

    def _settle(self) -> None:
        """Wait for the save in flight; raise an earlier background failure once."""
        handle = self._handle
        if handle is not None:
            try:
                handle.wait()
            except Exception as err:  # raised below, once (an interrupt propagates now)
                self._error = self._error or err
            self._handle = None
        self._collect()
        if self._error is not None:
            failure, self._error = self._error, None
            raise failure

    def _wait_for(self, path: str) -> None:
        """Wait for the save in flight if it writes ``path``."""
        handle = self._handle
        if handle is not None and _same_place(handle.path, path):
            try:
                handle.wait()
            except Exception as err:  # raised at the next save or teardown
                self._error = self._error or err
            self._handle = None

    def _collect(self) -> None:
        if self._handle is not None and not self._handle.done():
            return  # a save holds the store; postponed to the next settle
        while self._garbage:
            folder = self._garbage.pop()
            try:
                aptckpt.collect_garbage(folder, wait=False, storage_options=self._options(folder))
            except StoreNotFoundError:
                pass  # no delta checkpoint was ever saved there
            except StoreBusyError:
                log.info("delta store in %s busy; garbage collection postponed", folder)
                self._garbage.add(folder)
                return
            except (AptckptError, OSError) as err:
                log.warning("garbage collection in %s skipped: %s", folder, err)

    # ------------------------------------------------------------- the plugin

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        """Save Lightning's checkpoint dict as an aptckpt checkpoint at ``path``,
        replacing one already there atomically.

        Raises:
            UnsupportedObjectError: a value that would need pickle, named by key path.
            The error of an earlier background save (``blocking=False``), once.
        """
        where = os.fspath(path)
        options = self._options(where, storage_options)
        with self._lock:
            self._settle()
            state = values.encode(checkpoint)
            metadata = {
                k: checkpoint[k] for k in ("epoch", "global_step") if type(checkpoint.get(k)) is int
            }
            metadata["lightning"] = str(checkpoint.get("pytorch-lightning_version", ""))
            if not is_url(where):
                # The folder exists once this returns, as with Lightning's own plugin:
                # ModelCheckpoint links last.ckpt (save_last="link") right after, while
                # a background save may not have created the folder yet.
                # Best effort: what stands in the way is the save's to report, clearly.
                storage, place = resolve(where)
                with contextlib.suppress(OSError):
                    storage.makedirs(storage.parent(place))
            self._drop_link(where)
            try:
                if self.blocking:
                    aptckpt.save(
                        state,
                        where,
                        backend=self.backend,
                        metadata=metadata,
                        overwrite=True,
                        storage_options=options,
                        **self.options,
                    )
                else:
                    self._handle = aptckpt.save(
                        state,
                        where,
                        backend=self.backend,
                        metadata=metadata,
                        overwrite=True,
                        blocking=False,
                        storage_options=options,
                        **self.options,
                    )
            except UnsupportedObjectError as err:
                raise values.refusal(err) from err

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load the checkpoint at ``path`` as Lightning's dict, every chunk verified.

        ``map_location``: a device, a dict ``{saved: target}`` or a function of the saved
        device's name; ``None`` keeps tensors on their saved device if this machine has
        it, else on the CPU. ``weights_only`` changes nothing: aptckpt never unpickles,
        so every load is as safe as ``weights_only=True`` and as complete as ``False``.

        Raises:
            CheckpointNotFoundError: nothing committed at ``path`` (a ``FileNotFoundError``).
            IntegrityError: damaged data, naming the file and the tensor.
        """
        where = os.fspath(path)
        with self._lock:
            self._wait_for(where)
        try:
            state = aptckpt.load(
                where,
                map_location=_map_location(map_location),
                verify=self.verify,
                storage_options=self._options(where),
            )
        except CheckpointNotFoundError as err:
            raise _not_found(where, err) from err
        return values.decode(state)

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the checkpoint at ``path`` (after its save, if that is in flight);
        nothing if none is there. A symbolic link (``save_last="link"``) loses only
        itself."""
        where = os.fspath(path)
        with self._lock:
            self._wait_for(where)
            if self._drop_link(where):
                return
            try:
                aptckpt.delete(where, storage_options=self._options(where))
            except CheckpointNotFoundError:
                log.debug("remove_checkpoint: no checkpoint at %s", where)
                return
            if self.backend == "delta" and self.collect_garbage:
                store = self.options.get("store")
                self._garbage.add(os.fspath(store) if store else _parent(where))
                self._collect()

    def wait(self) -> None:
        """Block until the save in flight (if any) has committed; raise its error."""
        with self._lock:
            self._settle()

    def teardown(self) -> None:
        """Called by Lightning at the end of ``fit``/``validate``/...: waits for the save
        in flight and raises an error of the background saves not raised yet.

        Lightning also tears down while an exception of the run propagates (a failing
        ``training_step``, an interrupt): that exception is the one to see, so a
        background failure is then logged (at error level), not raised over it."""
        if sys.exc_info()[1] is None:
            self.wait()
            return
        try:
            self.wait()
        except Exception as err:
            log.error(
                "a background checkpoint save failed too (the run's own exception propagates): %s",
                err,
                exc_info=err,
            )


class AptckptAsyncCheckpointIO(AptckptCheckpointIO):
    """:class:`AptckptCheckpointIO` saving in the background (``blocking=False``).

    A save returns once the state is copied into host staging buffers; the write and
    commit go on while training continues. One save is in flight at a time (the next
    waits for it); a failure is raised at the next save or at ``teardown``; a removal
    or load of the path being written waits for it; ``teardown`` waits for the last.
    """

    def __init__(
        self,
        backend: str = "zstd",
        *,
        storage_options: Mapping[str, Any] | None = None,
        verify: bool = True,
        collect_garbage: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(
            backend,
            blocking=False,
            storage_options=storage_options,
            verify=verify,
            collect_garbage=collect_garbage,
            **options,
        )


def _same_place(a: str, b: str) -> bool:
    if is_url(a) or is_url(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.abspath(a) == os.path.abspath(b)


def _parent(path: str) -> str:
    if is_url(path):
        return path.rstrip("/").rpartition("/")[0]
    return os.path.dirname(os.path.abspath(path))


def _not_found(path: str, err: CheckpointNotFoundError) -> CheckpointNotFoundError:
    if is_url(path):
        return err
    storage, where = resolve(path)
    entry = storage.info(where)
    if entry is None or entry.kind != "file":
        return err
    return CheckpointNotFoundError(
        path,
        "it is a file, not an aptckpt checkpoint (a directory); Lightning's default "
        "TorchCheckpointIO probably wrote it. Import it once with "
        "aptckpt.convert(path, new_path) or load it without the plugin",
    )


def find_last_checkpoint(
    dirpath: str | os.PathLike[str],
    *,
    name: str = "last",
    storage_options: Mapping[str, Any] | None = None,
) -> str | None:
    """The newest committed ``last.ckpt`` / ``last-vN.ckpt`` checkpoint in ``dirpath`` (by
    the time its manifest records), or None: what ``ckpt_path="last"`` finds, also on
    object stores, where Lightning's own search cannot date a checkpoint prefix. A
    damaged one (an unreadable manifest) is skipped with a warning. ``name`` is
    ``ModelCheckpoint.CHECKPOINT_NAME_LAST`` when it was customised; a template such as
    ``"{epoch}-last"`` matches the names it formats to (``epoch=3-last.ckpt``).

    >>> trainer.fit(model, ckpt_path=find_last_checkpoint("s3://b/run/checkpoints",
    ...                                                   storage_options=opts))  # doctest: +SKIP
    """
    folder = os.fspath(dirpath)
    options = dict(storage_options) if storage_options and is_url(folder) else None
    storage, where = resolve(folder, options)
    pattern = _last_names(name)
    best: tuple[str, str] | None = None
    for entry in storage.list(where):
        if not pattern.fullmatch(entry.name) or entry.kind not in ("dir", "link"):
            continue
        candidate = (
            storage.display(storage.join(where, entry.name))
            if is_url(folder)
            else os.path.join(folder, entry.name)
        )
        try:
            created = aptckpt.inspect(candidate, storage_options=options).created_at
        except CheckpointNotFoundError:
            continue  # not committed (or a dangling link)
        except AptckptError as err:  # damaged: never the one to resume from
            log.warning("skipping %s: %s", candidate, err)
            continue
        if best is None or created > best[0]:
            best = (created, candidate)
    return None if best is None else best[1]


def load_from_checkpoint(
    cls: type[Any],
    checkpoint_path: str | os.PathLike[str],
    *,
    map_location: Any = None,
    hparams_file: str | os.PathLike[str] | None = None,
    strict: bool | None = None,
    verify: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """``cls.load_from_checkpoint(checkpoint_path, ...)`` for an aptckpt checkpoint:
    a ``LightningModule`` (or ``LightningDataModule``) subclass built from the saved
    hyper-parameters (``kwargs`` override them) with the saved weights.

    Lightning's own ``load_from_checkpoint`` reads with ``torch.load`` and cannot open
    an aptckpt checkpoint; this reads it with :func:`aptckpt.load` (verified) and hands
    the dict to Lightning's loader.
    """
    # the package cls comes from: lightning.pytorch, or the standalone pytorch_lightning
    root = next(
        (
            name
            for name in ("lightning.pytorch", "pytorch_lightning")
            for kind in cls.__mro__
            if kind.__module__.startswith(name + ".")
            and kind.__name__ in ("LightningModule", "LightningDataModule")
        ),
        "lightning.pytorch",
    )
    pl = importlib.import_module(root)
    saving = importlib.import_module(f"{root}.core.saving")
    migrate = importlib.import_module(f"{root}.utilities.migration.utils")._pl_migrate_checkpoint

    plugin = AptckptCheckpointIO(storage_options=storage_options, verify=verify)
    checkpoint = plugin.load_checkpoint(checkpoint_path, map_location=map_location)
    checkpoint = migrate(checkpoint, checkpoint_path=None)
    if hparams_file is not None:
        text = os.fspath(hparams_file)
        if text.lower().endswith(".csv"):
            hparams = saving.load_hparams_from_tags_csv(text)
        elif text.lower().endswith((".yml", ".yaml")):
            hparams = saving.load_hparams_from_yaml(text)
        else:
            raise ValueError(".csv, .yml or .yaml is required for `hparams_file`")
        checkpoint[cls.CHECKPOINT_HYPER_PARAMS_KEY] = hparams
    checkpoint.setdefault(cls.CHECKPOINT_HYPER_PARAMS_KEY, {})
    checkpoint[cls.CHECKPOINT_HYPER_PARAMS_KEY].update(kwargs)
    # Lightning's loader of a checkpoint dict (private, stable since 1.x): builds the
    # module from the hyper-parameters the way cls.load_from_checkpoint does.
    load_state: Callable[..., Any] = saving._load_state

    if issubclass(cls, pl.LightningDataModule):
        return load_state(cls, checkpoint, **kwargs)
    model = load_state(cls, checkpoint, strict=strict, **kwargs)
    tensors = [t for t in checkpoint.get("state_dict", {}).values() if isinstance(t, torch.Tensor)]
    return model.to(tensors[0].device) if tensors else model

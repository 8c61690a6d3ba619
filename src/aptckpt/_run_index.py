"""The records of a run's checkpoints, and the index ``metadata.json`` that lists them.

The checkpoints are the truth. Every fact a :class:`CheckpointRecord` holds is
read from its checkpoint's manifest: the manager writes the run's facts
(sequence number, kind, epoch, step, batch, metrics, best flag) into the
manifest metadata under ``"aptckpt_run"`` *before* the save commits, and the
rest (creation time, backend, size) is the manifest's own. So an index rebuilt
from the checkpoints equals the lost one entry by entry, and no decision of the
manager (latest, best, retention) depends on the index existing.

The index is a cache and a listing for people and tools. Each entry carries the
digest of the manifest it was made from (:func:`aptckpt._rundir.manifest_digest`)
and a digest over that and the entry's own facts; a reader uses an entry only
if both match the checkpoint now on disk and the entry, and every field
validates, and otherwise decodes the manifest. A checkpoint saved again under
the same name (a run resumed from an older checkpoint), a save killed before
the index was replaced, an entry edited by hand or damaged: each such entry is
stale, and ignored. (The digests detect mistakes, not forgery: whoever can
write the run can also write its checkpoints.) Entries of a version-1 index (aptckpt releases
whose manifests lacked the best flag) only fill in what their checkpoint's
manifest lacks, and only where they agree with it on kind, epoch, step, batch
and sequence.

Hostile or odd contents never stop a listing: the index is opened without
following links or blocking (a FIFO, ``/dev/zero``), size-capped, and parsed
with deep nesting caught; each malformed field is logged and the manifest used
instead; each malformed field of a manifest's run metadata is logged and
replaced by its default. A checkpoint this aptckpt cannot read because it is
*newer* (format or run-metadata version, or a backend not installed) stops the
listing with an error naming it: skipping it would make "latest" wrong, and a
later save could overwrite it or retention delete it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import aptckpt.api as api
from aptckpt import _rundir
from aptckpt.errors import (
    AptckptError,
    CheckpointNotFoundError,
    UnknownBackendError,
    UnsupportedFormatVersionError,
)
from aptckpt.manifest import FORMAT_VERSION
from aptckpt.training_state import MAX_COUNT, is_scalar

__all__ = [
    "INDEX_FORMAT",
    "INDEX_VERSION",
    "RUN_KEY",
    "RUN_VERSION",
    "CheckpointRecord",
    "Listing",
    "order",
    "run_metadata",
    "scan",
    "write_index",
]

log = logging.getLogger("aptckpt")

INDEX_FORMAT = "aptckpt-run"
#: 2: entries carry their manifest's digest and format version, and only repeat
#: what the manifest says (``bytes`` is the checkpoint's size, not what its save added).
INDEX_VERSION = 2
#: Where a manifest's metadata holds the run's facts, and the version of that record.
RUN_KEY = "aptckpt_run"
RUN_VERSION = 1

Kind = Literal["epoch", "temp"]
_KIND_OF_FOLDER: dict[str, Kind] = {_rundir.REGULAR: "epoch", _rundir.TEMP: "temp"}


@dataclass(frozen=True)
class CheckpointRecord:
    """One committed checkpoint of a run, as its manifest describes it.

    ``is_best`` records that the checkpoint was the best of the run *when it was
    saved*; the newest checkpoint so flagged is the run's best
    (:meth:`CheckpointManager.best`). ``bytes`` is what the checkpoint occupies:
    its files plus the store objects it reaches (for ``delta``, objects it may
    share with other checkpoints; what a save *added* is
    :attr:`CheckpointManager.last_save_info`). ``sequence`` numbers the run's
    saves (1, 2, ...): "newest" means the highest, so a run resumed from an older
    checkpoint continues from its own saves, not from those of the continuation
    it abandoned, whatever their global steps.
    """

    #: The checkpoint: a ``Path`` in a local run, a URL string (``s3://...``) in a remote one.
    path: Path | str
    rel_path: str
    kind: Kind
    epoch: int
    global_step: int
    batch_index: int | None
    is_best: bool
    created_at: str
    metrics: dict[str, Any] = field(default_factory=dict)
    backend: str = ""
    bytes: int = 0
    sequence: int = 0

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        del doc["path"]  # absolute: never written
        return {"path": doc.pop("rel_path"), **doc}


def order(record: CheckpointRecord) -> tuple[int, int, int]:
    """Oldest to newest: by save sequence, then global step (checkpoints without
    sequence numbers), then a regular checkpoint after a temporary one."""
    return (record.sequence, record.global_step, 1 if record.kind == "epoch" else 0)


def run_metadata(
    *,
    sequence: int,
    kind: Kind,
    epoch: int,
    global_step: int,
    batch_index: int | None,
    metrics: Mapping[str, Any],
    is_best: bool,
) -> dict[str, Any]:
    """The run's facts about a checkpoint, stored in its manifest under :data:`RUN_KEY`."""
    return {
        "version": RUN_VERSION,
        "sequence": sequence,
        "kind": kind,
        "epoch": epoch,
        "global_step": global_step,
        "batch_index": batch_index,
        "metrics": dict(metrics),
        "is_best": is_best,
    }


# ------------------------------------------------------------------ validation


def _count(value: Any, limit: int = MAX_COUNT) -> bool:
    return type(value) is int and 0 <= value <= limit


def _optional_count(value: Any) -> bool:
    return value is None or _count(value)


def _metrics(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        log.warning("%s: metrics %r are not a mapping; ignored", where, type(value).__name__)
        return {}
    out = {}
    for key, item in value.items():
        if isinstance(key, str) and is_scalar(item):
            out[key] = item
        else:
            log.warning("%s: metric %r is not a plain number or string; ignored", where, key)
    return out


_ENTRY_CHECKS: dict[str, Callable[[Any], bool]] = {
    "epoch": _count,
    "global_step": _count,
    "batch_index": _optional_count,
    "is_best": lambda v: type(v) is bool,
    "created_at": lambda v: isinstance(v, str),
    "metrics": lambda v: (
        isinstance(v, dict) and all(isinstance(k, str) and is_scalar(x) for k, x in v.items())
    ),
    "backend": lambda v: isinstance(v, str) and bool(v),
    "bytes": _count,
    "sequence": _count,
    "format_version": lambda v: type(v) is int and 1 <= v <= FORMAT_VERSION,
}


# ------------------------------------------------------------------ the index


#: The fields of an index entry that describe its checkpoint (besides "path").
_FACTS = ("path", "kind", *_ENTRY_CHECKS)


def _entry_digest(manifest_digest: str, facts: Mapping[str, Any]) -> str:
    """The digest of an entry: its manifest's digest and its facts, canonically."""
    text = json.dumps(
        {k: facts.get(k) for k in _FACTS}, sort_keys=True, allow_nan=True, separators=(",", ":")
    )
    data = f"{manifest_digest}\n{text}".encode()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class _Index:
    version: int | None = None
    created_at: str | None = None
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)


def _read_index(run: _rundir.Run) -> _Index:
    path = run.display(_rundir.INDEX_NAME)
    try:
        data = run.read(_rundir.INDEX_NAME, limit=_rundir.MAX_INDEX_BYTES)
    except FileNotFoundError:
        return _Index()
    except OSError as err:
        log.warning("%s is not readable (%s); listing the run from its checkpoints", path, err)
        return _Index()
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as err:
        log.warning("%s is not valid JSON (%s); listing the run from its checkpoints", path, err)
        return _Index()
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
        log.warning("%s is not an aptckpt run index; listing the run from its checkpoints", path)
        return _Index()
    version = doc.get("version")
    created = doc.get("created_at")
    index = _Index(created_at=created if isinstance(created, str) else None)
    if version not in (1, INDEX_VERSION) or type(version) is not int:
        log.warning(
            "%s has index version %r, which this aptckpt does not read (a newer one wrote it?); "
            "listing the run from its checkpoints",
            path,
            version,
        )
        return index
    index.version = version
    items = doc.get("checkpoints")
    if not isinstance(items, list):
        log.warning("%s lists no checkpoints; listing the run from its checkpoints", path)
        return index
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("path"), str):
            index.entries[item["path"]] = item
        else:
            log.warning("ignoring a malformed entry of %s: %.200r", path, item)
    return index


def write_index(
    run: _rundir.Run,
    records: list[CheckpointRecord],
    sources: Mapping[str, tuple[str | None, int]],
    run_info: Mapping[str, Any],
    created_at: str | None,
) -> None:
    """Replace the index with ``records`` (``sources``: rel path -> manifest digest
    and format version), atomically. ``metadata.json`` may be a link or a FIFO:
    it is replaced, never written through."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    entries = []
    for record in sorted(records, key=order):
        digest, format_version = sources.get(record.rel_path, (None, FORMAT_VERSION))
        facts = {**record.to_json(), "format_version": format_version}
        check = None if digest is None else _entry_digest(digest, facts)
        entries.append({**facts, "manifest": digest, "digest": check})
    doc = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        **run_info,
        "created_at": created_at or min((r.created_at for r in records), default=now),
        "last_updated": now,
        "checkpoints": entries,
    }
    text = json.dumps(doc, indent=2, allow_nan=True)  # NaN metrics are facts too
    run.storage.write_file(run.path(_rundir.INDEX_NAME), text.encode("utf-8") + b"\n")


# ------------------------------------------------------------------ listing


@dataclass
class Listing:
    """The committed checkpoints of a run, oldest first, and where each came from."""

    records: list[CheckpointRecord]
    #: rel path -> (manifest digest or None, manifest format version), for the index.
    sources: dict[str, tuple[str | None, int]]
    #: When the run began, as its index says (None without an index).
    created_at: str | None
    #: The rel paths whose index entry matched the checkpoint on disk (used as is).
    indexed: set[str] = field(default_factory=set)


def scan(run: _rundir.Run) -> Listing:
    """Every committed checkpoint of the run (see the module docstring).

    Raises:
        UnsupportedFormatVersionError, UnknownBackendError: a checkpoint of the run
            needs a newer aptckpt (or a backend plugin that is not installed).
    """
    index = _read_index(run)
    records, sources, indexed = [], {}, set()
    for folder, kind in _KIND_OF_FOLDER.items():
        try:
            entries = run.storage.list(run.path(folder))
        except OSError as err:
            log.warning("cannot list %s: %s", run.display(folder), err)
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue  # a save's temp or a delete's trash: never a checkpoint
            rel = f"{folder}/{entry.name}"
            path = run.user_path(rel)
            if entry.kind == "link":
                if run.storage.is_checkpoint(run.path(rel)):
                    log.warning("skipping %s: a symbolic link, not a checkpoint of this run", path)
                continue
            if not (entry.kind == "dir" and run.storage.is_checkpoint(run.path(rel))):
                continue
            digest = _rundir.manifest_digest(run, rel)
            item = index.entries.get(rel)
            found = None
            if (
                index.version == INDEX_VERSION
                and item is not None
                and digest is not None
                and item.get("manifest") == digest
            ):
                found = _from_entry(path, rel, kind, item)
                if found is not None:
                    indexed.add(rel)
            if found is None:
                legacy = item if index.version == 1 else None
                found = _from_manifest(run, path, rel, kind, legacy)
            if found is not None:
                records.append(found[0])
                sources[rel] = (digest, found[1])
    return Listing(sorted(records, key=order), sources, index.created_at, indexed)


def _from_entry(
    path: Path | str, rel: str, kind: Kind, item: dict[str, Any]
) -> tuple[CheckpointRecord, int] | None:
    """The record an index entry describes, if every field is valid."""
    for name, check in _ENTRY_CHECKS.items():
        if name not in item or not check(item[name]):
            log.warning(
                "index entry of %s has a bad %s (%.100r); reading its manifest instead",
                rel,
                name,
                item.get(name),
            )
            return None
    if item.get("kind") != kind:
        log.warning("index entry of %s has a bad kind; reading its manifest instead", rel)
        return None
    if item.get("digest") != _entry_digest(item["manifest"], item):
        log.warning("index entry of %s was altered; reading its manifest instead", rel)
        return None
    record = CheckpointRecord(
        path=path,
        rel_path=rel,
        kind=kind,
        epoch=item["epoch"],
        global_step=item["global_step"],
        batch_index=item["batch_index"],
        is_best=item["is_best"],
        created_at=item["created_at"],
        metrics=dict(item["metrics"]),
        backend=item["backend"],
        bytes=item["bytes"],
        sequence=item["sequence"],
    )
    return record, item["format_version"]


def _refuse(err: AptckptError, path: Path | str, fix: str) -> AptckptError:
    """``err`` with a message that names the checkpoint and says why the run stops."""
    err.args = (
        f"checkpoint '{path}' of this run cannot be read by this aptckpt: {err}. The manager "
        f"will not go on without it (it would be missing from 'latest' and could be "
        f"overwritten or pruned): {fix}",
    )
    return err


def _from_manifest(
    run: _rundir.Run, path: Path | str, rel: str, kind: Kind, legacy: dict[str, Any] | None
) -> tuple[CheckpointRecord, int] | None:
    """The record of a checkpoint, from its manifest (None: not one of the run's)."""
    try:
        info = api.inspect(run.display(rel), storage_options=run.options)
    except CheckpointNotFoundError:
        return None  # deleted while we listed
    except UnsupportedFormatVersionError as err:
        raise _refuse(err, path, "a newer aptckpt is needed") from None
    except UnknownBackendError as err:
        raise _refuse(
            err, path, "a newer aptckpt is needed, or the plugin that provides its backend"
        ) from None
    except (AptckptError, OSError) as err:
        log.warning("skipping unreadable checkpoint %s: %s", path, err)
        return None
    meta = info.metadata.get(RUN_KEY) if isinstance(info.metadata, dict) else None
    if not isinstance(meta, dict):
        log.debug("%s has no %r metadata: not saved by a CheckpointManager", path, RUN_KEY)
        return None
    where = f"run metadata of {path}"
    version = meta.get("version", 1)
    if type(version) is not int or version < 1:
        log.warning("%s: bad version %.100r; read as version 1", where, version)
    elif version > RUN_VERSION:
        newer = UnsupportedFormatVersionError(version, RUN_VERSION, path=str(path))
        raise _refuse(newer, path, "a newer aptckpt is needed")

    def get(name: str, check: Any, default: Any) -> Any:
        value = meta.get(name, default)
        if name in meta and not check(value):
            log.warning("%s: bad %s %.100r; using %r", where, name, value, default)
            return default
        return value

    if meta.get("kind", kind) != kind:
        log.warning("%s: kind %.100r, but it is in %s/; read as %r", where, meta["kind"], rel, kind)
    epoch = get("epoch", _count, 0)
    step = get("global_step", _count, 0)
    batch = get("batch_index", _optional_count, None)
    sequence = get("sequence", _count, 0)
    is_best = get("is_best", lambda v: type(v) is bool, False)
    metrics = _metrics(meta.get("metrics", {}), where)
    if legacy is not None:
        agrees = (
            legacy.get("kind") == kind
            and (legacy.get("epoch"), legacy.get("global_step")) == (epoch, step)
            and legacy.get("batch_index") == batch
            and ("sequence" not in meta or legacy.get("sequence") == sequence)
        )
        if agrees and "is_best" not in meta and type(legacy.get("is_best")) is bool:
            is_best = legacy["is_best"]
        if agrees and "sequence" not in meta and _count(legacy.get("sequence")):
            sequence = legacy["sequence"]
    record = CheckpointRecord(
        path=path,
        rel_path=rel,
        kind=kind,
        epoch=epoch,
        global_step=step,
        batch_index=batch,
        is_best=is_best and kind == "epoch",
        created_at=info.created_at,
        metrics=metrics,
        backend=info.backend,
        bytes=info.stored_bytes,
        sequence=sequence,
    )
    return record, info.format_version

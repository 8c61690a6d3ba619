"""Asynchronous saves: snapshot into reusable staging buffers, persist in the background.

``save(..., blocking=False)`` costs the caller one memory copy of the state:
every tensor is copied into a host staging buffer (pinned memory for CUDA
tensors, copied with ``non_blocking=True`` on the current stream), then the
save's encoding, writing and commit run on one background thread while the
caller goes on. The buffers are kept and reused by the next save whose tensors
have the same dtypes and shapes, so from the second save on the copy lands in
memory that is already mapped (first-touch page faults cost more than the copy).

Rules:

* At most one save is in flight per process: the next asynchronous save waits
  for it before copying (its buffers are the staging buffers), so extra host
  memory is bounded by one copy of the largest state saved.
* Errors surface through the :class:`SaveHandle` (``wait()`` re-raises) and are
  logged when the save fails; a process exiting normally first finishes the save
  in flight (``atexit``). A process killed mid-persist leaves what any
  interrupted save leaves: the previous checkpoints, intact.
* The state may change as soon as ``save`` returns: nothing refers to the
  caller's tensors any more (for CUDA tensors, kernels enqueued later on the
  same stream run after the copies).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import torch

from aptckpt import _dtypes, tree

__all__ = ["SaveHandle", "chain", "submit", "wait_all"]

log = logging.getLogger("aptckpt")
T = TypeVar("T")


class SaveHandle(Generic[T]):
    """A save persisting in the background.

    Attributes:
        path: where the checkpoint is being saved.
        snapshot_seconds: how long the caller was blocked (waiting for the
            previous save, plus copying the state).
    """

    def __init__(self, future: Future[T], path: str, snapshot_seconds: float) -> None:
        self._future = future
        self.path = path
        self.snapshot_seconds = snapshot_seconds

    def done(self) -> bool:
        """True once the save has committed or failed."""
        return self._future.done()

    def wait(self, timeout: float | None = None) -> T:
        """Block until the save has committed; return its result or raise its error.

        Raises:
            TimeoutError: not finished within ``timeout`` seconds.
            The save's own error (``WriteError``, ...), if it failed.
        """
        return self._future.result(timeout)

    result = wait

    def add_done_callback(self, fn: Callable[[SaveHandle[T]], object]) -> None:
        """Call ``fn(handle)`` when the save has committed or failed (at once if it
        has), on the thread that finished it."""
        self._future.add_done_callback(lambda _: fn(self))

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The save's error, or None if it succeeded (blocks like :meth:`wait`)."""
        return self._future.exception(timeout)

    def __repr__(self) -> str:
        state = "done" if self.done() else "in flight"
        return f"SaveHandle({self.path!r}, {state})"


class _Staging:
    """Host buffers a state is copied into, reused while dtypes and shapes repeat."""

    def __init__(self) -> None:
        # Per slot: the buffer, its flat byte view (the copy's destination) and whether it
        # is pinned -- kept so that a save of thousands of tensors pays no per-tensor
        # view or is_pinned() call once the buffers exist.
        self._buffers: list[tuple[torch.Tensor, torch.Tensor, bool]] = []

    def buffers(self) -> list[torch.Tensor]:
        """The staging buffers, one per tensor of the state copied last."""
        return [buf for buf, _, _ in self._buffers]

    def _buffer(self, index: int, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pinned = source.device.type == "cuda"
        if index < len(self._buffers):
            buf, view, was_pinned = self._buffers[index]
            if buf.dtype == source.dtype and buf.shape == source.shape and was_pinned == pinned:
                return buf, view
        buf = torch.empty(source.shape, dtype=source.dtype, pin_memory=pinned)
        slot = (buf, _dtypes.byte_tensor(buf), pinned)
        if index < len(self._buffers):
            self._buffers[index] = slot
        else:
            self._buffers.append(slot)
        return buf, slot[1]

    def snapshot(self, flat: tree.FlatState) -> tuple[tree.FlatState, torch.cuda.Event | None]:
        """Copy every tensor of ``flat`` into the staging buffers; return the state
        over those copies and, if CUDA copies were enqueued, an event marking their end."""
        del self._buffers[len(flat.tensors) :]
        by_device: dict[torch.device, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        leaves = []
        cuda = False
        for index, leaf in enumerate(flat.tensors):
            source = leaf.tensor.detach()
            buf, buf_bytes = self._buffer(index, source)
            cuda = cuda or source.is_cuda
            if _dtypes.holds_its_values(source):  # any dtype: copied as bytes, batched
                dst, src = by_device.setdefault(source.device, ([], []))
                dst.append(buf_bytes)
                src.append(_dtypes.byte_tensor(source))
            else:  # strided, conjugate or negative views: resolved, then copied
                resolved = source.resolve_conj().resolve_neg().contiguous()
                buf_bytes.copy_(_dtypes.byte_tensor(resolved))
            leaves.append(tree.TensorLeaf(buf, leaf.key_path, leaf.is_parameter))
        for device, (dst, src) in by_device.items():
            torch._foreach_copy_(dst, src, non_blocking=device.type == "cuda")
        event = None
        if cuda:
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()
        return tree.FlatState(flat.skeleton, tuple(leaves), owned=True), event


class _Saver:
    """The process's one background save thread and its staging buffers."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="aptckpt-save")
        self._staging = _Staging()
        self._in_flight: Future[Any] | None = None
        self._lock = threading.Lock()

    def submit(
        self, flat: tree.FlatState, path: str, persist: Callable[[tree.FlatState], T]
    ) -> SaveHandle[T]:
        start = time.perf_counter()
        with self._lock:  # callers from several threads take turns
            previous = self._in_flight
            if previous is not None:
                previous.exception()  # wait; its own handle reports its error
            staged, event = self._staging.snapshot(flat)

            def run() -> T:
                if event is not None:
                    event.synchronize()  # the device-to-host copies have landed
                try:
                    return persist(staged)
                except BaseException as err:
                    log.error("background save of '%s' failed: %s", path, err)
                    raise

            future = self._executor.submit(run)
            self._in_flight = future
        return SaveHandle(future, path, time.perf_counter() - start)

    def wait(self) -> None:
        future = self._in_flight
        if future is not None:
            future.exception()


_saver: _Saver | None = None
_saver_lock = threading.Lock()


def _get() -> _Saver:
    global _saver
    with _saver_lock:
        if _saver is None:
            _saver = _Saver()
        return _saver


def submit(
    flat: tree.FlatState, path: str, persist: Callable[[tree.FlatState], T]
) -> SaveHandle[T]:
    """Snapshot ``flat`` (blocking), then run ``persist`` on the snapshot in the
    background; see the module docstring."""
    return _get().submit(flat, path, persist)


def chain(handle: SaveHandle[Any], then: Callable[[Any], T]) -> SaveHandle[T]:
    """A handle whose result is ``then(result of handle)``, run on the thread that finished
    ``handle`` (the save thread) -- or ``handle``'s error."""
    future: Future[T] = Future()

    def done(finished: SaveHandle[Any]) -> None:
        error = finished.exception()
        if error is not None:
            future.set_exception(error)
            return
        try:
            future.set_result(then(finished.wait()))
        except BaseException as err:
            future.set_exception(err)

    handle.add_done_callback(done)
    return SaveHandle(future, handle.path, handle.snapshot_seconds)


def wait_all() -> None:
    """Block until the save in flight (if any) has finished, successfully or not."""
    if _saver is not None:
        _saver.wait()


def _forget_in_child() -> None:
    """A forked child has no background thread: it starts with a fresh saver."""
    global _saver, _saver_lock
    _saver, _saver_lock = None, threading.Lock()


def _register_exit_hook() -> None:
    """Finish the save in flight when the interpreter exits normally. It must run
    before ``concurrent.futures`` refuses new work at shutdown (the backends use
    thread pools), so it joins the hooks that run before thread joining; those
    run last-registered first, and concurrent.futures registered at import."""
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        register(wait_all)
    else:  # pragma: no cover - other Pythons
        atexit.register(wait_all)


_register_exit_hook()
os.register_at_fork(after_in_child=_forget_in_child)

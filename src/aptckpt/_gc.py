"""Pausing Python's cyclic garbage collector while a save or load builds its bookkeeping.

A state of ten thousand tensors makes tens of thousands of long-lived objects (records, chunk
rows, views) in a burst; each burst of allocations triggers collections that traverse all of
them again, which cost more than the work itself. Nothing a save or load creates forms cycles
that must be collected before it returns, so collection is paused while the caller waits for
one (a load, a verify, a save's flattening and a blocking save's persist; the way ``pickle``
users and msgpack's unpacker do it) and resumed after. A background persist does not pause it:
training goes on meanwhile and must collect as it always does. Nested and concurrent pauses
resume collection when the last one ends, and only if it was enabled before the first.
"""

from __future__ import annotations

import functools
import gc
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

__all__ = ["paused", "pausing"]

P = ParamSpec("P")
R = TypeVar("R")

_lock = threading.Lock()
_depth = 0
_was_enabled = False


def _after_fork_in_child() -> None:
    # Only the forking thread exists in the child (a DataLoader worker forked while a
    # background save was persisting): the pauses of the other threads are gone, so the
    # collector is turned back on if it was on before them. A pause of the forking thread
    # itself then ends with collection already on, which costs time, not correctness.
    global _lock, _depth
    _lock = threading.Lock()
    if _depth and _was_enabled:
        gc.enable()
    _depth = 0


os.register_at_fork(after_in_child=_after_fork_in_child)


@contextmanager
def paused() -> Iterator[None]:
    global _depth, _was_enabled
    entered = False
    try:
        with _lock:
            if _depth == 0:
                _was_enabled = gc.isenabled()
                gc.disable()
            _depth += 1
            entered = True
        yield
    finally:
        if entered:
            with _lock:
                # max(): a child forked inside this pause started again from zero
                _depth = max(0, _depth - 1)
                if _depth == 0 and _was_enabled:
                    gc.enable()


def pausing(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator: run ``fn`` inside :func:`paused`."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with paused():
            return fn(*args, **kwargs)

    return wrapper

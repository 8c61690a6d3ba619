"""Fresh memory for the tensors a load fills: transparent huge pages where the kernel offers them.

A load writes every byte of memory nobody has touched yet, and on Linux each first touch of a
4 KiB page is a page fault: on the reference machine faulting fresh memory in costs several times
the copy itself (64 MiB: 40 ms of faults for a 5 ms copy, ``shared/research/baselines.md``).
Asking for transparent huge pages (``madvise(MADV_HUGEPAGE)``) before the first touch makes that
one fault per 2 MiB, and populating a chunk's pages (``MADV_POPULATE_WRITE``) right before a
decoder writes it makes the faults one system call. Both are hints about memory, not its
contents: the tensors are ordinary ``torch.empty`` tensors, freed as any other. Where the
kernel has no transparent huge pages, or they are off
(``/sys/kernel/mm/transparent_hugepage/enabled`` says ``never``), or ``APTCKPT_HUGEPAGES=0``,
nothing is asked for (older kernels refuse ``MADV_POPULATE_WRITE``
(Linux 5.14): the pages then fault in as they are written, as without it).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable

import torch

__all__ = ["empty", "hugepages_enabled", "populate"]

_PAGE = 4096
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_MADV_POPULATE_WRITE = 23
#: Buffers smaller than this are not worth a system call.
_POPULATE_FROM = 64 << 10
_OFF_VALUES = {"0", "false", "no", "off"}


def _madvise() -> Callable[[int, int, int], None] | None:
    """``madvise(addr, length, advice)``, or None where it cannot help."""
    if not sys.platform.startswith("linux"):
        return None
    if os.environ.get("APTCKPT_HUGEPAGES", "1").strip().lower() in _OFF_VALUES:
        return None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return None
    except OSError:
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        call = libc.madvise
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    call.restype = ctypes.c_int

    def advise(address: int, length: int, advice: int) -> None:
        call(address, length, advice)  # a failure only means the hint was not taken

    return advise


_advise = _madvise()


def hugepages_enabled() -> bool:
    """Whether loads ask for transparent huge pages (see the module doc)."""
    return _advise is not None


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` whose whole 2 MiB pages are advised as huge
    before anything touches them."""
    tensor = torch.empty(shape, dtype=dtype)
    if _advise is not None:
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes >= 2 * _HUGE_PAGE:
            address = tensor.data_ptr()
            start = -(-address // _HUGE_PAGE) * _HUGE_PAGE
            stop = (address + nbytes) // _HUGE_PAGE * _HUGE_PAGE
            if stop > start:
                with contextlib.suppress(OSError):
                    _advise(start, stop - start, _MADV_HUGEPAGE)
    return tensor


def populate(buffer: memoryview) -> None:
    """Fault in the whole pages of writable ``buffer`` in one system call
    (``MADV_POPULATE_WRITE``), before a decoder writes it: one call instead of a fault per
    page. Call it from the thread that is about to write, so that faulting spreads over the
    decoding threads."""
    if _advise is None or len(buffer) < _POPULATE_FROM:
        return
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    start = -(-address // _PAGE) * _PAGE
    stop = (address + len(buffer)) // _PAGE * _PAGE
    if stop > start:
        _advise(start, stop - start, _MADV_POPULATE_WRITE)

"""Fresh memory for the tensors a load fills: transparent huge pages where the kernel offers them.

A load writes every byte of memory nobody has touched yet, and on Linux each first touch of a
4 KiB page is a page fault: on the reference machine faulting fresh memory in costs several times
the copy itself (64 MiB: 40 ms of faults for a 5 ms copy, ``shared/research/baselines.md``).
Asking for transparent huge pages (``madvise(MADV_HUGEPAGE)``) before the first touch makes that
one fault per 2 MiB. It is a hint about memory, not its contents: the tensors are ordinary
``torch.empty`` tensors, freed as any other. Where the kernel has no transparent huge pages, or
they are off (``/sys/kernel/mm/transparent_hugepage/enabled`` says ``never``), or
``APTCKPT_HUGEPAGES=0``, nothing is asked for.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable

import torch

__all__ = ["empty", "hugepages_enabled"]

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_OFF_VALUES = {"0", "false", "no", "off"}


def _madvise() -> Callable[[int, int], None] | None:
    """``madvise(addr, length, MADV_HUGEPAGE)``, or None where it cannot help."""
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

    def advise(address: int, length: int) -> None:
        call(address, length, _MADV_HUGEPAGE)  # a failure only means no huge pages

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
                    _advise(start, stop - start)
    return tensor

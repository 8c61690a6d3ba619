"""A minimal progress bar for terminals (training loop, command line).

Draws one line on stderr, at most ten times a second, only when stderr is a
terminal (or ``enabled=True``); otherwise every call is a no-op, so logs and
pipes stay clean.

>>> with Progress(total=100, desc="epoch 1") as bar:   # doctest: +SKIP
...     for _ in range(100):
...         bar.update(1, loss=2.5)
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

__all__ = ["Progress"]

_WIDTH = 24


class Progress:
    """``update(n, **fields)`` advances the bar; ``fields`` are shown after it."""

    def __init__(
        self,
        total: int | None,
        desc: str = "",
        *,
        unit: str = "it",
        enabled: bool | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.desc, self.unit = total, desc, unit
        self.done = 0
        self.fields: dict[str, object] = {}
        self._start = time.monotonic()
        self._last_draw = 0.0

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def update(self, n: int = 1, **fields: object) -> None:
        self.done += n
        self.fields.update(fields)
        now = time.monotonic()
        if self.enabled and (now - self._last_draw >= 0.1 or self.done == self.total):
            self._last_draw = now
            self._draw(now)

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
            self.enabled = False

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        if self.total:
            frac = min(1.0, self.done / self.total)
            filled = int(frac * _WIDTH)
            counts = f"{_fmt(self.done, self.unit)}/{_fmt(self.total, self.unit)}"
            bar = f"[{'#' * filled}{'.' * (_WIDTH - filled)}] {counts}"
        else:
            bar = _fmt(self.done, self.unit)
        rate = f"{_fmt(self.done / elapsed, self.unit)}/s"
        extra = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.fields.items()
        )
        line = " ".join(p for p in (self.desc, bar, rate, f"{elapsed:.1f}s", extra) if p)
        self.stream.write(f"\r{line}\x1b[K")
        self.stream.flush()


def _fmt(value: float, unit: str) -> str:
    if unit != "B":
        return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.1f}"
    for suffix in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or suffix == "TB":
            return f"{value:.0f} {suffix}" if suffix == "B" else f"{value:.1f} {suffix}"
        value /= 1000
    raise AssertionError("unreachable")

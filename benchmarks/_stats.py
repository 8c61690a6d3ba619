"""Small statistics and formatting helpers shared by the benchmark reports.

Role: turn lists of per-repetition timings into the figures the reports print -- medians,
min-max spread, throughput and *paired* ratios. A ratio is computed within each repetition
(contender and reference timed in the same round, minutes apart at most) and the median of those
per-round ratios is reported; on a shared, noisy machine that is steadier than a ratio of medians.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def median(xs: Sequence[float]) -> float:
    """Median, or NaN for an empty list."""
    return statistics.median(xs) if xs else math.nan


def paired_ratio(ref: Sequence[float], other: Sequence[float]) -> float:
    """Median over repetitions of ``ref[i] / other[i]`` (> 1: ``other`` is faster); NaN if none."""
    pairs = [r / o for r, o in zip(ref, other, strict=False) if o > 0 and r > 0]
    return median(pairs)


def fmt_s(xs: Sequence[float]) -> str:
    """``median [min-max]`` in seconds, with precision fitted to the magnitude."""
    if not xs:
        return "—"
    m, lo, hi = median(xs), min(xs), max(xs)
    digits = 3 if m < 1 else 2
    return f"{m:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"


def fmt_gbps(nbytes: int, xs: Sequence[float]) -> str:
    """Throughput of the median time in GB/s (10^9 bytes)."""
    if not xs:
        return "—"
    return f"{nbytes / median(xs) / 1e9:.2f}"


def fmt_ratio(x: float) -> str:
    """A speed ratio as ``1.23x``, or a dash when undefined."""
    return "—" if math.isnan(x) else f"{x:.2f}x"


def fmt_pct(x: float) -> str:
    """A fraction as a whole percentage, or a dash when undefined."""
    return "—" if math.isnan(x) else f"{100 * x:.0f}%"


def fmt_bytes(n: int | None) -> str:
    """Bytes as GB (10^9) with three decimals, or MB below 0.1 GB."""
    if n is None:
        return "—"
    if n < 100e6:
        return f"{n / 1e6:.2f} MB"
    return f"{n / 1e9:.3f} GB"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    """A markdown table; ``align`` has one char per column, ``l`` or ``r`` (default: first l)."""
    align = align or "l" + "r" * (len(header) - 1)
    marks = [":---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)

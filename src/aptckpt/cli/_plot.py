"""``aptckpt plot RUN_DIR -o run.png``: a picture of a training run.

Three panels over the global step, one x axis:

1. the run's metrics (``CheckpointManager.log_metrics``; by default those named
   ``*loss*``), long noisy curves drawn faint with a moving average over them, and
   every checkpoint marked along the top: regular ones as triangles, temporaries as
   small circles, the run's best as a gold star with a dotted line;
2. the bytes each save wrote, as bars coloured by backend (``delta`` writes only
   what changed); for checkpoints saved without a history, their size instead;
3. how long each save blocked the training loop, with the time until it committed
   behind it (background saves block only for a copy of the state).

It reads only (the run's checkpoints' manifests and ``history/``) through
:class:`aptckpt.CheckpointManager`, so a run on object storage plots as a local
one. matplotlib is an optional extra (``pip install aptckpt[plot]``), imported
here only, with the Agg backend (no display needed). The format follows the
file name: ``.png``, ``.svg``, ``.pdf``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aptckpt
from aptckpt import _history
from aptckpt._runlock import LOCK_NAME
from aptckpt.cli._common import UsageError, fmt_size
from aptckpt.storage import is_url, resolve
from aptckpt.storage.local._publish import publish_file

__all__ = ["add_parser", "cmd_plot"]

_FORMATS = (".png", ".svg", ".pdf")
_BACKEND_COLORS = {"zstd": "#4C72B0", "delta": "#55A868", "torch": "#C44E52"}
_OTHER_COLORS = ("#8172B2", "#CCB974", "#64B5CD", "#937860")
#: Legends right of their panel, never over a curve or a bar.
_OUTSIDE: dict[str, Any] = {
    "loc": "upper left",
    "bbox_to_anchor": (1.01, 1.0),
    "fontsize": 8,
    "frameon": False,
}


def add_parser(command: Any) -> None:
    """Add ``plot`` through the parser's ``command`` factory."""
    c = command(
        "plot",
        cmd_plot,
        "draw a run: metrics, checkpoints, bytes written, time blocked",
        js=False,
    )
    c.add_argument("run_dir", metavar="RUN_DIR")
    c.add_argument(
        "-o", "--output", required=True, metavar="FILE", help="the picture: .png, .svg or .pdf"
    )
    c.add_argument(
        "--metric",
        action="append",
        default=[],
        metavar="NAME",
        help="a metric to draw (repeatable; default: those named *loss*, else all)",
    )
    c.add_argument("--title", help="title of the picture (default: the run's path)")
    c.add_argument("--log-y", action="store_true", help="metrics on a logarithmic scale")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise UsageError(
            "aptckpt plot needs matplotlib, an optional extra: pip install 'aptckpt[plot]'"
        ) from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _load(args: argparse.Namespace) -> tuple[str, list[aptckpt.CheckpointRecord], Any, Any]:
    """The run's display name, its checkpoints, its best, and its history."""
    options = args.storage_options if is_url(args.run_dir) else None
    storage, root = resolve(args.run_dir, options)
    where = storage.display(root)
    if storage.is_checkpoint(root):
        raise UsageError(
            f"'{where}' is a single checkpoint, not a run; use: aptckpt inspect {where}"
        )
    if storage.local and not Path(root).is_dir():
        why = "is not a directory" if Path(root).exists() else "does not exist"
        raise UsageError(f"'{where}' {why}; pass the run directory of a training run")
    manager = aptckpt.CheckpointManager(where, read_only=True, storage_options=options)
    records = manager.checkpoints()
    history = manager.history()
    empty = not records and not history.points and not history.saves
    # A manager that opened the run left its index or its lock: a run, still empty.
    marks = ("metadata.json", LOCK_NAME)
    if empty and all(storage.info(storage.join(root, name)) is None for name in marks):
        raise UsageError(
            f"'{where}' holds no checkpoints, no metadata.json and no history/: not a run "
            "of aptckpt.CheckpointManager (check the path, and --storage-option for a URL)"
        )
    return where, records, manager.best(), history


def _metrics(history: Any, records: Sequence[Any], wanted: Sequence[str]) -> list[str]:
    names = list(history.metric_names())
    for r in records if not names or wanted else ():  # without history: the checkpoints'
        names += [k for k, v in r.metrics.items() if isinstance(v, (int, float)) and k not in names]
    if wanted:
        missing = [m for m in wanted if m not in names]
        if missing:
            have = ", ".join(repr(n) for n in names) or "none"
            raise UsageError(
                f"no metric {', '.join(map(repr, missing))} in the run; it has: {have}"
            )
        return list(wanted)
    losses = [n for n in names if "loss" in n]
    return losses or names


def _series(name: str, history: Any, records: Sequence[Any]) -> tuple[list[int], list[float]]:
    steps, values = history.series(name)
    if steps:
        return steps, values
    pairs = sorted(
        (r.global_step, float(r.metrics[name]))
        for r in records
        if isinstance(r.metrics.get(name), (int, float))
    )
    return [s for s, _ in pairs], [v for _, v in pairs]


def _smooth(values: list[float], window: int) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start);
    non-finite values (a diverged step) are left out of the means around them.

    The window's sum is kept without subtracting what leaves it (a queue of two stacks):
    a running sum minus the values that left loses the small values after a huge one
    (a loss spike of 1e20 made every later mean 0)."""
    out = []
    back: list[float] = []  # the newest values, and their sum and count of finite ones
    back_sum, back_count = 0.0, 0
    front: list[tuple[float, int]] = []  # older ones: (sum, count) of each and those after
    for v in values:
        finite = math.isfinite(v)
        back.append(v)
        back_sum += v if finite else 0.0
        back_count += finite
        if len(front) + len(back) > window:
            if not front:  # turn the newest values into the older ones, oldest on top
                total, count = 0.0, 0
                for old in reversed(back):
                    ok = math.isfinite(old)
                    total += old if ok else 0.0
                    count += ok
                    front.append((total, count))
                back, back_sum, back_count = [], 0.0, 0
            front.pop()
        total = (front[-1][0] if front else 0.0) + back_sum
        count = (front[-1][1] if front else 0) + back_count
        out.append(total / count if count else math.nan)
    return out


def _color(backend: str, seen: dict[str, str]) -> str:
    if backend not in seen:
        seen[backend] = (
            _BACKEND_COLORS.get(backend)
            or _OTHER_COLORS[
                len([b for b in seen if b not in _BACKEND_COLORS]) % len(_OTHER_COLORS)
            ]
        )
    return seen[backend]


def draw(
    where: str,
    records: Sequence[aptckpt.CheckpointRecord],
    best: aptckpt.CheckpointRecord | None,
    history: _history.History,
    metrics: Sequence[str],
    output: Path,
    title: str | None = None,
    *,
    log_y: bool = False,
) -> None:
    """Draw the run into ``output`` (format from its suffix). Text is plain: a ``$`` in a
    metric name, a path or a title is not matplotlib's math (which failed to parse)."""
    plt = _pyplot()
    with plt.rc_context({"text.parse_math": False}):
        _draw(plt, where, records, best, history, metrics, output, title, log_y=log_y)


def _draw(
    plt: Any,
    where: str,
    records: Sequence[aptckpt.CheckpointRecord],
    best: aptckpt.CheckpointRecord | None,
    history: _history.History,
    metrics: Sequence[str],
    output: Path,
    title: str | None,
    *,
    log_y: bool,
) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter

    fig, (ax_m, ax_b, ax_t) = plt.subplots(
        3, 1, figsize=(11, 8.2), sharex=True, gridspec_kw={"height_ratios": [2.3, 1, 1]}
    )
    best_txt = ""
    if best is not None:
        shown = {k: v for k, v in best.metrics.items() if isinstance(v, (int, float))}
        pick = ("loss", shown["loss"]) if "loss" in shown else next(iter(shown.items()), None)
        best_txt = f"; best: step {best.global_step}" + (
            f" ({pick[0]} {pick[1]:.4g})" if pick else ""
        )
    fig.suptitle(f"{title or where}\n{len(records)} checkpoint(s){best_txt}", fontsize=11, y=0.985)

    # --- metrics
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = 0
    for i, name in enumerate(metrics):
        steps, values = _series(name, history, records)
        if not steps:
            continue
        color = cycle[i % len(cycle)]
        drawn += 1
        if len(steps) > 200:
            window = max(5, len(steps) // 60)
            ax_m.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            ax_m.plot(
                steps,
                _smooth(values, window),
                color=color,
                linewidth=1.8,
                label=f"{name} (mean of {window})",
            )
        else:
            ax_m.plot(
                steps,
                values,
                color=color,
                linewidth=1.6,
                marker="o" if len(steps) <= 30 else None,
                markersize=4,
                label=name,
            )
    if not drawn:
        ax_m.text(
            0.5,
            0.5,
            "no metrics recorded (CheckpointManager.log_metrics)",
            ha="center",
            va="center",
            transform=ax_m.transAxes,
            color="gray",
        )
    ax_m.set_ylabel(", ".join(metrics) if 0 < len(metrics) <= 2 else "metrics")
    ax_m.grid(alpha=0.3)
    if log_y and drawn:
        ax_m.set_yscale("log")  # matplotlib masks values <= 0
    top = ax_m.get_xaxis_transform()  # x in steps, y in axes fractions
    regular = [r for r in records if r.kind == "epoch"]
    temps = [r for r in records if r.kind == "temp"]
    top_marks: list[tuple[list[aptckpt.CheckpointRecord], dict[str, Any]]] = [
        (temps, {"marker": "o", "s": 18, "facecolors": "white", "edgecolors": "gray"}),
        (regular, {"marker": "v", "s": 45, "color": "#333333"}),
    ]
    for marked, style in top_marks:
        if marked:
            steps = [r.global_step for r in marked]
            ax_m.scatter(
                steps, [0.97] * len(steps), transform=top, zorder=3, clip_on=False, **style
            )
    listed = {r.rel_path for r in records}
    pruned = [e.step for e in history.saves if e.path not in listed]
    if pruned:  # saves whose checkpoints retention has deleted since
        ax_m.scatter(
            pruned,
            [0.97] * len(pruned),
            transform=top,
            marker="x",
            s=14,
            color="#AAAAAA",
            zorder=2,
            clip_on=False,
        )
    if best is not None:
        ax_m.axvline(best.global_step, color="#D4A017", linestyle=":", linewidth=1.5)
        ax_m.scatter(
            [best.global_step],
            [0.97],
            transform=top,
            marker="*",
            s=220,
            color="#D4A017",
            edgecolors="black",
            linewidths=0.6,
            zorder=4,
            clip_on=False,
        )
    handles, _ = ax_m.get_legend_handles_labels()
    marks = [
        (regular, Line2D([], [], marker="v", color="#333333", linestyle="", label="checkpoint")),
        (
            temps,
            Line2D(
                [],
                [],
                marker="o",
                markerfacecolor="white",
                color="gray",
                linestyle="",
                label="temporary checkpoint",
            ),
        ),
        (
            pruned,
            Line2D([], [], marker="x", color="#AAAAAA", linestyle="", label="saved, since deleted"),
        ),
        (
            [best] if best else [],
            Line2D(
                [],
                [],
                marker="*",
                color="#D4A017",
                markersize=12,
                markeredgecolor="black",
                linestyle="",
                label="best",
            ),
        ),
    ]
    handles += [h for group, h in marks if group]
    if handles:
        ax_m.legend(handles=handles, **_OUTSIDE)

    # --- bytes written, by backend
    saves = list(history.saves)
    if saves:
        xs = [e.step for e in saves]
        heights = [e.bytes_written for e in saves]
        backends = [e.backend for e in saves]
        what = "bytes written per save"
    else:  # no history: what each checkpoint occupies
        xs = [r.global_step for r in records]
        heights = [r.bytes for r in records]
        backends = [r.backend for r in records]
        what = "checkpoint size (no save history)"
    gaps = [b - a for a, b in zip(sorted(set(xs)), sorted(set(xs))[1:], strict=False)]
    span = (max(xs) - min(xs)) if xs else 1
    width = max(min(gaps) * 0.7 if gaps else max(span, 1) * 0.02, max(span, 1) * 0.004)
    colors: dict[str, str] = {}
    bar_colors = [_color(b, colors) for b in backends]
    ax_b.bar(xs, heights, width=width, color=bar_colors, edgecolor="none")
    if saves:  # hatch the saves whose checkpoints retention has since deleted
        gone = [(e.step, e.bytes_written) for e in saves if e.path not in listed]
        if gone:
            ax_b.bar(
                [s for s, _ in gone],
                [h for _, h in gone],
                width=width,
                color="none",
                edgecolor="white",
                hatch="///",
                linewidth=0,
            )
    timed = {e.path for e in saves}
    untimed = [r for r in records if saves and r.rel_path not in timed]
    for r in untimed:  # saved by a process that died before it logged the save, or not logged
        ax_b.bar(
            [r.global_step],
            [r.bytes],
            width=width,
            color="none",
            edgecolor=_color(r.backend, colors),
            linestyle="--",
        )
    ax_b.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_size(v)))
    ax_b.set_ylabel("written")
    ax_b.set_title(what, fontsize=9, loc="left")
    ax_b.grid(axis="y", alpha=0.3)
    if colors:
        legend = [Patch(color=c, label=b) for b, c in colors.items()]
        if saves and any(e.path not in listed for e in saves):
            legend.append(
                Patch(facecolor="#999999", hatch="///", edgecolor="white", label="since deleted")
            )
        if untimed:
            legend.append(
                Patch(facecolor="none", edgecolor="#555555", linestyle="--", label="not logged")
            )
        ax_b.legend(handles=legend, **_OUTSIDE)
    if not xs:
        ax_b.text(
            0.5,
            0.5,
            "no checkpoints",
            ha="center",
            va="center",
            transform=ax_b.transAxes,
            color="gray",
        )

    # --- time blocked
    if saves:
        ax_t.bar(
            xs, [e.save_s for e in saves], width=width, color="#BBBBBB", label="until committed"
        )
        ax_t.bar(
            xs,
            [e.blocked_s for e in saves],
            width=width * 0.6,
            color="#DD8452",
            label="training blocked",
        )
        total_b = sum(e.blocked_s for e in saves)
        total_s = sum(e.save_s for e in saves)
        ax_t.set_title(
            f"time per save: blocked {total_b:.2f}s in all, {total_s:.2f}s until committed",
            fontsize=9,
            loc="left",
        )
        ax_t.legend(**_OUTSIDE)
    else:
        ax_t.text(
            0.5,
            0.5,
            "no save timings recorded (saved without a run history)",
            ha="center",
            va="center",
            transform=ax_t.transAxes,
            color="gray",
        )
    ax_t.set_ylabel("seconds")
    ax_t.set_xlabel("global step")
    ax_t.grid(axis="y", alpha=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    # a temporary file beside ``output``, then renamed: never half a picture under the name
    fmt = output.suffix[1:].lower()
    publish_file(output, lambda tmp: fig.savefig(tmp, dpi=90, format=fmt), overwrite=True)
    plt.close(fig)


def cmd_plot(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if output.suffix.lower() not in _FORMATS:
        raise UsageError(
            f"-o {output}: the format follows the file name; use one of {', '.join(_FORMATS)}"
        )
    if output.is_dir():
        raise UsageError(f"-o {output}: it is a directory; name the picture's file")
    if not output.parent.is_dir() and str(output.parent):
        raise UsageError(f"-o {output}: folder '{output.parent}' does not exist")
    _pyplot()  # the missing extra is reported before the run is read
    where, records, best, history = _load(args)
    metrics = _metrics(history, records, args.metric)
    draw(where, records, best, history, metrics, output, args.title, log_y=args.log_y)
    print(
        f"wrote {output}: {len(records)} checkpoint(s), {len(history.points)} step(s) of "
        f"{', '.join(metrics) or 'no metrics'}, {len(history.saves)} save(s) timed"
    )
    return 0

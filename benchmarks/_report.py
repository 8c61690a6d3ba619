"""Markdown and JSON rendering of ``bench_backends.py`` results.

Role: given the per-repetition timings collected by ``bench_backends.run_workload``, produce the
report written to ``benchmarks/RESULTS.md`` (machine, versions, command, workload, then per
workload the limits, save, load and compression tables) and the raw JSON dump. No measuring here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from _stats import fmt_bytes, fmt_gbps, fmt_pct, fmt_ratio, fmt_s, median, paired_ratio, table

RAW_READ = "raw read, buffered"
RAW_READ_DIRECT = "raw read, O_DIRECT"
RAW_READ_FRESH = "raw read, buffered, into fresh memory"
TORCH_LOAD = "torch.load(weights_only=True)"


def _save_s(results: dict[str, Any], key: str) -> list[float]:
    r = results.get(key)
    return r.save_s if r else []


def _load(results: dict[str, Any], key: str, loader: str, temp: str) -> list[float]:
    r = results.get(key)
    if not r or loader not in r.loads:
        return []
    lr = r.loads[loader]
    return lr.cold_s if temp == "cold" else lr.warm_s


def _cold_limit(results: dict[str, Any]) -> list[float]:
    """Per repetition, the faster of the buffered and O_DIRECT cold raw reads."""
    a = _load(results, "raw-buffered", RAW_READ, "cold")
    b = _load(results, "raw-direct", RAW_READ_DIRECT, "cold")
    if a and b:
        return [min(x, y) for x, y in zip(a, b, strict=False)]
    return a or b


def limits_table(results: dict[str, Any], nbytes: int) -> str:
    rows = [
        ("write, buffered + fsync", _save_s(results, "raw-buffered")),
        ("write, O_DIRECT + fsync (aligned reused 64 MiB buffer)", _save_s(results, "raw-direct")),
        ("read, cold, buffered (into pre-touched buffer)",
         _load(results, "raw-buffered", RAW_READ, "cold")),
        ("read, cold, O_DIRECT (into pre-touched buffer)",
         _load(results, "raw-direct", RAW_READ_DIRECT, "cold")),
        ("read, warm page cache (into pre-touched buffer)",
         _load(results, "raw-buffered", RAW_READ, "warm")),
        ("read, warm page cache, into fresh memory (torch.empty, 2 threads)",
         _load(results, "raw-buffered", RAW_READ_FRESH, "warm")),
        ("memcpy into pre-touched buffer (numpy, 1 thread)", _save_s(results, "memcpy")),
    ]  # fmt: skip
    return table(
        ["limit (same bytes, same run)", "seconds, median [min-max]", "GB/s"],
        [[name, fmt_s(xs), fmt_gbps(nbytes, xs)] for name, xs in rows],
    )


def save_table(results: dict[str, Any], nbytes: int) -> str:
    ts = _save_s(results, "torch.save")
    tsf = _save_s(results, "torch.save+fsync")
    direct = _save_s(results, "raw-direct")
    buffered = _save_s(results, "raw-buffered")
    rows = []
    for r in results.values():
        if r.group == "limit":
            continue
        xs = r.save_s
        rows.append([
            r.name + (" **(failed)**" if r.error else ""),
            fmt_bytes(r.disk_bytes),
            fmt_ratio(nbytes / r.disk_bytes) if r.disk_bytes else "—",
            fmt_s(xs),
            fmt_gbps(nbytes, xs),
            fmt_ratio(paired_ratio(ts, xs)),
            fmt_ratio(paired_ratio(tsf, xs)),
            fmt_pct(paired_ratio(direct, xs)),
            fmt_pct(paired_ratio(buffered, xs)),
        ])  # fmt: skip
    return table(
        ["save", "on disk", "raw/disk", "seconds, median [min-max]", "GB/s",
         "vs torch.save", "vs torch.save+fsync", "% of O_DIRECT write", "% of buffered write"],
        rows,
    )  # fmt: skip


def load_table(results: dict[str, Any], nbytes: int) -> str:
    tl_cold = _load(results, "torch.save+fsync", TORCH_LOAD, "cold")
    tl_warm = _load(results, "torch.save+fsync", TORCH_LOAD, "warm")
    lim_cold = _cold_limit(results)
    lim_warm = _load(results, "raw-buffered", RAW_READ, "warm")
    lim_fresh = _load(results, "raw-buffered", RAW_READ_FRESH, "warm")
    rows = []
    for r in results.values():
        if r.group == "limit":
            continue
        for name, lr in r.loads.items():
            rows.append([
                name + (" **(failed)**" if lr.error else ""),
                fmt_s(lr.cold_s),
                fmt_gbps(nbytes, lr.cold_s),
                fmt_ratio(paired_ratio(tl_cold, lr.cold_s)),
                fmt_pct(paired_ratio(lim_cold, lr.cold_s)),
                fmt_s(lr.warm_s),
                fmt_gbps(nbytes, lr.warm_s),
                fmt_ratio(paired_ratio(tl_warm, lr.warm_s)),
                fmt_pct(paired_ratio(lim_warm, lr.warm_s)),
                fmt_pct(paired_ratio(lim_fresh, lr.warm_s)),
                lr.ties,
            ])  # fmt: skip
    return table(
        ["load", "cold s, median [min-max]", "cold GB/s", "vs torch.load cold",
         "% of cold read limit", "warm s, median [min-max]", "warm GB/s", "vs torch.load warm",
         "% of warm read limit", "% of warm read into fresh memory", "tied weights"],
        rows,
    )  # fmt: skip


def compression_rows(label: str, results: dict[str, Any], nbytes: int) -> list[list[str]]:
    rows = []
    for key in ("apt-auto", "apt-zstd", "apt-zstd-none"):
        r = results.get(key)
        if not r or r.disk_bytes is None:
            continue
        info = r.info or {}
        raw, stored = info.get("raw_bytes"), info.get("stored_bytes")
        rows.append([
            label,
            r.name,
            fmt_bytes(nbytes),
            fmt_bytes(raw),
            fmt_bytes(stored),
            fmt_bytes(r.disk_bytes),
            fmt_ratio(raw / stored) if raw and stored else "—",
            fmt_ratio(nbytes / r.disk_bytes),
        ])  # fmt: skip
    return rows


COMPRESSION_HEADER = [
    "data", "backend", "tensor bytes", "info.raw_bytes", "info.stored_bytes",
    "on disk (all files)", "raw_bytes/stored_bytes", "tensor bytes/on disk",
]  # fmt: skip


def _residency_notes(runs: dict[str, Any]) -> list[str]:
    cold = [
        (x, lname)
        for run in runs.values()
        for r in run["results"].values()
        for lname, lr in r.loads.items()
        for x in lr.resident_before_cold
    ]
    warm = [
        x
        for run in runs.values()
        for r in run["results"].values()
        for lr in r.loads.values()
        for x in lr.resident_before_warm
    ]
    notes = []
    if cold:
        worst, who = max(cold)
        notes.append(
            f"Page cache check (mincore): before the {len(cold)} cold loads at most "
            f"{100 * worst:.2f}% of the checkpoint's pages were resident"
            + (f" (worst: {who})" if worst > 0 else "")
            + f"; before the {len(warm)} warm loads at least "
            f"{100 * min(warm, default=math.nan):.1f}% were."
        )
    return notes


def render(meta: dict[str, Any], runs: dict[str, Any], compression: dict[str, Any]) -> str:
    """The whole markdown report."""
    m, v = meta["machine"], meta["versions"]
    out = [
        "# aptckpt benchmark: backends vs peers vs the physical limits",
        "",
        "Generated by `benchmarks/bench_backends.py`; see `benchmarks/README.md` for the method "
        "and the meaning of each column. Absolute times on this shared 2-vCPU machine drift "
        "between runs; compare the ratios, which are taken within each repetition round.",
        "",
        f"- **Date**: {meta['date']} (run took {meta['duration_s'] / 60:.1f} min)",
        f"- **Command**: `{meta['command']}`",
        f"- **Machine**: {m['cpu']}; {m['cores']}; torch threads {m['torch_threads']}; "
        f"RAM {m['ram']}; Linux {m['kernel']}",
        f"- **Filesystem**: {m['filesystem']}",
        f"- **Load average** (1/5/15 min, from /proc/loadavg; > 0 means other work shared the "
        f"2 vCPUs): at start {meta['loadavg_start']}, at end {meta['loadavg_end']}",
        "- **Versions**: " + ", ".join(f"{k} {val}" for k, val in v.items() if k != "git"),
        f"- **Tree**: git {v['git']}",
        f"- **Repetitions**: {meta['reps']}, interleaved round-robin; cells are "
        "median [min-max] seconds; GB/s = tensor bytes / median time; ratios are medians of "
        "per-round ratios (> 1x = faster than the reference).",
        "",
        "## Workload",
        "",
        meta["workload"],
        "",
    ]
    skipped = {k: s for k, s in meta["apt_status"].items() if s != "ok"}
    if skipped:
        out += ["**aptckpt contenders skipped:**", ""]
        out += [f"- `{k}`: {s}" for k, s in skipped.items()]
        out.append("")

    comp_rows: list[list[str]] = []
    for run in runs.values():
        results, nbytes = run["results"], run["nbytes"]
        cpu = run.get("cpu", [])
        foreign = ", ".join(f"{100 * c['foreign']:.0f}%" for c in cpu)
        steal = ", ".join(f"{100 * c['steal']:.0f}%" for c in cpu)
        out += [
            f"## {run['title']} — {fmt_bytes(nbytes)}",
            "",
            f"CPU busy outside this process during each round (other processes and kernel "
            f"threads, as a share of all vCPUs): {foreign or '—'}; hypervisor steal: "
            f"{steal or '—'}.",
            "",
            "### Limits",
            "",
            limits_table(results, nbytes),
            "",
            "### Save",
            "",
            save_table(results, nbytes),
            "",
            "### Load",
            "",
            "Cold: after fsync + `posix_fadvise(DONTNEED)` of the checkpoint's files. Cold read "
            "limit: per round, the faster of the buffered and O_DIRECT cold raw reads.",
            "",
            load_table(results, nbytes),
            "",
        ]
        comp_rows += compression_rows(run["title"], results, nbytes)

    for label, c in compression.items():
        if "error" in c:
            comp_rows.append([label, "aptckpt zstd level=1", f"failed: {c['error']}"] + [""] * 5)
            continue
        nbytes = meta["tensor_bytes_fp32w"]
        raw, stored = c.get("raw_bytes"), c.get("stored_bytes")
        comp_rows.append([
            "fp32 weights alone (one extra save)", "aptckpt zstd level=1", fmt_bytes(nbytes),
            fmt_bytes(raw), fmt_bytes(stored), fmt_bytes(c["disk_bytes"]),
            fmt_ratio(raw / stored) if raw and stored else "—",
            fmt_ratio(nbytes / c["disk_bytes"]),
        ])  # fmt: skip
    if comp_rows:
        out += ["## Compression", "", table(COMPRESSION_HEADER, comp_rows, "ll" + "r" * 6), ""]

    notes = _residency_notes(runs) + list(meta.get("observed", []))
    for run in runs.values():
        for r in run["results"].values():
            if r.error:
                notes.append(f"{run['title']}: **{r.name} failed**: `{r.error}`")
            for lname, lr in r.loads.items():
                if lr.error:
                    notes.append(f"{run['title']}: **{lname} failed**: `{lr.error}`")
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


def to_json(meta: dict[str, Any], runs: dict[str, Any], compression: dict[str, Any]) -> Any:
    """Everything measured, per repetition, for later analysis."""
    return {
        "meta": meta,
        "runs": {
            label: {
                "title": run["title"],
                "nbytes": run["nbytes"],
                "results": {k: dataclasses.asdict(r) for k, r in run["results"].items()},
                "cpu_elsewhere_per_round": run.get("cpu", []),
            }
            for label, run in runs.items()
        },
        "compression": compression,
        "medians": {
            label: {k: median(r.save_s) for k, r in run["results"].items()}
            for label, run in runs.items()
        },
    }

"""Lazy partial reads: how many bytes ``aptckpt.open(path).get_slice(key)[...]`` and
``.get(key)`` read, against what they need and the checkpoint's size, locally and on S3.

Role: the figures behind ``benchmarks/RESULTS-lazy.md``. One state (``--mb`` MiB of fp32
tensors: four large matrices of ``--mb / 4`` MiB each, cut by the chunked backends into chunks
of ``--chunk-mb``, plus sixteen small ones) is saved with each backend (``zstd`` level 1,
``zstd`` with ``codec="none"``, ``delta``, ``torch``) on local disk and on a moto S3 server on
127.0.0.1 (``ThreadedMotoServer`` in this process, fake credentials, as ``tests/conftest.py``
starts it). Then, each from a freshly opened view, it reads:

* ``open``: ``aptckpt.open(path)`` alone (the manifest);
* ``row``: ``get_slice(big)[0]`` -- one row of a large matrix (4 KiB);
* ``box``: ``get_slice(big)[4096:4160, :64]`` -- a 64 x 64 box in the middle (16 KiB);
* ``small``: ``get(small)`` -- one whole small tensor (256 KiB);
* ``big``: ``get(big)`` -- one whole large matrix;
* ``load``: ``aptckpt.load(path)`` -- everything, for reference.

Bytes read are counted where the bytes arrive: locally the process's ``rchar`` from
``/proc/self/io`` (every byte ``read``/``pread`` returned to this process, page cache hits
included, native code included -- so the manifest and everything else the call read); on S3
the bytes of every GET answered at the storage seam (``Store.cat``, which every remote read
goes through), and the number of GETs. Times are medians of ``--reps`` runs, warm page cache
locally (the point here is bytes, not disk speed). Every value read is checked against the
saved state.

Usage::

    PYTHONPATH=src python benchmarks/bench_lazy.py                 # writes RESULTS-lazy.md
    PYTHONPATH=src python benchmarks/bench_lazy.py --mb 64 --reps 1 --out benchmarks/_work/lazy.md
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from any directory

import _sysutil
import aptckpt
from _stats import table
from aptckpt.storage.remote import _store

HERE = Path(__file__).resolve().parent
WORKDIR = HERE / "_work"
BACKENDS: dict[str, dict[str, Any]] = {
    "zstd": {"backend": "zstd", "codec": "zstd"},
    "zstd-raw": {"backend": "zstd", "codec": "none"},
    "delta": {"backend": "delta"},
    "torch": {"backend": "torch"},
}


def build_state(mb: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    rows = mb * (1 << 20) // 4 // 4 // 1024  # four matrices of 1024 columns
    big = {f"big.{i}": torch.randn(rows, 1024, generator=gen) for i in range(4)}
    small = {f"small.{i}": torch.randn(256, 256, generator=gen) for i in range(16)}
    return {"model": {**big, **small}, "step": 1}


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


# ------------------------------------------------------------------ counting


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


class RemoteCounter:
    """Counts the GETs and their bytes at the storage seam (``Store.cat``)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.gets = 0
        self._lock = threading.Lock()
        self._original = _store.Store.cat

    def __enter__(self) -> RemoteCounter:
        original, counter = self._original, self

        def cat(store: Any, path: str, start: int | None = None, end: int | None = None) -> bytes:
            data = original(store, path, start, end)
            with counter._lock:
                counter.bytes += len(data)
                counter.gets += 1
            return data

        _store.Store.cat = cat  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        _store.Store.cat = self._original  # type: ignore[method-assign]


@contextlib.contextmanager
def moto_server() -> Iterator[dict[str, Any]]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield {
            "key": "fake-key-id",
            "secret": "fake-secret",
            "endpoint_url": f"http://{host}:{port}",
            "client_kwargs": {"region_name": "us-east-1"},
        }
    finally:
        server.stop()


# ------------------------------------------------------------------ runs


def operations(state: dict[str, Any]) -> dict[str, tuple[Callable[[Any], Any], Any, int]]:
    """name -> (what it does with an open view, the expected value, bytes it needs)."""
    big, small = state["model"]["big.1"], state["model"]["small.3"]
    rows = big.shape[0]
    mid = rows // 2
    return {
        "row": (lambda v: v.get_slice(("model", "big.1"))[0], big[0], big[0].nbytes),
        "box": (
            lambda v: v.get_slice(("model", "big.1"))[mid : mid + 64, :64],
            big[mid : mid + 64, :64],
            64 * 64 * 4,
        ),
        "small": (lambda v: v.get(("model", "small.3")), small, small.nbytes),
        "big": (lambda v: v.get(("model", "big.1")), big, big.nbytes),
    }


def measure(
    path: str, options: dict[str, Any] | None, state: dict[str, Any], reps: int
) -> dict[str, dict[str, Any]]:
    remote = options is not None
    results: dict[str, dict[str, Any]] = {}

    def run(name: str, fn: Callable[[], Any], expected: Any, needed: int) -> None:
        seconds, read, gets = [], 0, 0
        for _ in range(reps):
            counter = RemoteCounter()
            before = _rchar()
            start = time.perf_counter()
            with counter:
                value = fn()
            seconds.append(time.perf_counter() - start)
            read = counter.bytes if remote else _rchar() - before
            gets = counter.gets
            if expected is not None:
                aptckpt.testing.assert_state_equal(expected, value)
        results[name] = {
            "seconds": statistics.median(seconds),
            "read": read,
            "gets": gets,
            "needed": needed,
        }

    def opened() -> Any:
        view = aptckpt.open(path, storage_options=options)
        view.close()
        return None

    run("open", opened, None, 0)
    for name, (op, expected, needed) in operations(state).items():

        def one(op: Callable[[Any], Any] = op) -> Any:
            with aptckpt.open(path, storage_options=options) as view:
                return op(view)

        run(name, one, expected, needed)
    total = sum(t.nbytes for t in state["model"].values())
    run("load", lambda: aptckpt.load(path, storage_options=options), state, total)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=128, help="MiB of large matrices (default 128)")
    parser.add_argument("--chunk-mb", type=int, default=4, help="chunk size of zstd/delta")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", default="", help="comma list of backends")
    parser.add_argument("--no-s3", action="store_true", help="local disk only")
    parser.add_argument("--out", default=str(HERE / "RESULTS-lazy.md"))
    args = parser.parse_args()
    import aptckpt.testing  # assert_state_equal

    state = build_state(args.mb)
    chosen = [b for b in BACKENDS if not args.only or b in args.only.split(",")]
    work = WORKDIR / f"lazy-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    rows: list[dict[str, Any]] = []
    try:
        with contextlib.ExitStack() as stack:
            s3 = None if args.no_s3 else stack.enter_context(moto_server())
            if s3 is not None:
                import s3fs

                fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
                fs.call_s3("create_bucket", Bucket="lazy")
            for name in chosen:
                kwargs = dict(BACKENDS[name])
                if kwargs["backend"] != "torch":
                    kwargs["chunk_size"] = args.chunk_mb << 20
                places: list[tuple[str, str, dict[str, Any] | None]] = [
                    ("local", str(work / name / "ck"), None)
                ]
                if s3 is not None:
                    places.append(("s3", f"s3://lazy/{name}/ck", s3))
                for where, path, options in places:
                    start = time.perf_counter()
                    info = aptckpt.save(state, path, storage_options=options, **kwargs)
                    saved = time.perf_counter() - start
                    size = info.stored_bytes + info.manifest_bytes
                    print(f"{name} {where}: saved {fmt_bytes(size)} in {saved:.2f}s", flush=True)
                    for op, found in measure(path, options, state, args.reps).items():
                        rows.append(
                            {"backend": name, "where": where, "op": op, "size": size, **found}
                        )
                        print(f"  {op}: {found}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(render(rows, args, state))
    print(f"wrote {args.out}")


NOTES = """Reading the table: the unit of a partial read is the chunk, the unit of compression
and verification -- a 4 KiB row costs the one chunk holding it (a 4 MiB chunk, 3.4 MiB once
compressed); a slice spanning several chunks costs those. `small` (one 256 KiB tensor) reads
its own bytes. `torch` keeps one `torch.save` file, read whole for any key. On S3 the GETs count
the manifest's (1) plus the data's; `delta` makes one GET per object (a chunk), so its full load
makes many more requests than the shard-based `zstd`.

Before the fix that came with this benchmark (same script, 32 MiB state): a `row` on S3 with `zstd`
fetched the whole 30.5 MiB shard (a 16 MiB read-ahead window plus two more ahead), and `delta`
read every object of the checkpoint for any `get`/`get_slice`, locally and on S3 (its backend had no
`read_regions`, so the default read everything). Now `delta` reads only the objects a region lies
in, and remote read-ahead stays within the byte ranges the backend says it will read
(`DataFiles.expect`)."""


def render(rows: list[dict[str, Any]], args: Any, state: dict[str, Any]) -> str:
    info = _sysutil.machine_info(WORKDIR)
    versions = _sysutil.versions(HERE.parent)
    total = sum(t.nbytes for t in state["model"].values())
    big = state["model"]["big.0"]
    lines = [
        "# Lazy partial reads: bytes read vs needed vs checkpoint size",
        "",
        f"Generated by `benchmarks/bench_lazy.py --mb {args.mb} --chunk-mb {args.chunk_mb} "
        f"--reps {args.reps}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"State: {fmt_bytes(total)} of fp32 tensors (four {fmt_bytes(big.nbytes)} matrices "
        f"`big.i` of shape {tuple(big.shape)}, sixteen 256 KiB "
        f"`small.i`); chunk size {args.chunk_mb} MiB (zstd, delta). Bytes read: local = "
        "`rchar` of `/proc/self/io` (all bytes the process read, manifest included); S3 = bytes "
        "of the GETs answered at the storage seam (`Store.cat`), moto server on 127.0.0.1. "
        "Times: median, warm page cache locally.",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "",
    ]
    header = ["backend", "where", "read", "needs", "bytes read", "of checkpoint", "GETs", "time"]
    body = []
    for r in rows:
        body.append(
            [
                r["backend"],
                r["where"],
                r["op"],
                fmt_bytes(r["needed"]) if r["needed"] else "-",
                fmt_bytes(r["read"]),
                f"{r['read'] / r['size']:.2%}",
                str(r["gets"]) if r["where"] == "s3" else "-",
                f"{r['seconds'] * 1e3:.1f} ms",
            ]
        )
    lines.append(table(header, body))
    lines += ["", NOTES, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

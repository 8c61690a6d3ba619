"""Object-storage benchmark: aptckpt on S3 vs the peers vs raw parallel transfer, on a moto server.

Role: the figures behind ``benchmarks/RESULTS-remote.md``. One moto S3 server on loopback, one
bucket, fake credentials; in the same run and on the same bytes (the standard workload's training
state, ``workload.py``) it times:

* limits: the state's distinct tensors' raw bytes, split into objects of ``--object-mb`` MiB,
  written with s3fs ``fs.pipe({path: bytes, ...})`` (fsspec runs the PUTs concurrently) and read
  back with ``fs.cat([...])``; and the same bytes as one object (``fs.pipe_file``: a multipart
  upload of 50 MiB parts, 10 at a time; ``fs.cat_file``: ranged GETs, 10 at a time);
* aptckpt: ``save``/``load`` with ``backend="zstd"`` (level 1), ``zstd`` with ``codec="none"``
  and ``torch``; ``load(into=...)``; and delta re-saves: the state saved with
  ``backend="delta"``, one training step taken (fine-tuning the last block, and dense), the new
  state saved again with ``backend="delta"`` against the first (bytes uploaded and time);
* peers: ``torch.distributed.checkpoint`` with ``FsspecWriter``/``FsspecReader`` (single
  process, ``no_dist=True``, the fs options passed through as keyword arguments), and
  ``torch.save`` into / ``torch.load(weights_only=True)`` from an s3fs file object.

Method (as ``bench_backends.py``): interleaved rounds, the starting contender rotating each round;
cells are median [min-max]; ratios are medians of per-round ratios; every load is verified bit
for bit outside the timed region; before every timed operation ``gc.collect()``, ``malloc_trim``
and ``os.sync()`` (untimed). The server runs in its own process by default (``--server
process``), so that its CPU work does not compete with the benchmark for this process's GIL; its
CPU time is read from ``/proc/<pid>/stat`` per timed operation and subtracted from the machine's
busy time when the CPU used elsewhere is reported. ``--compare-servers`` (default on) first times
the limits on an in-process ``ThreadedMotoServer`` and a server process side by side.

moto on loopback is a pure-Python server: it is CPU-bound and far slower than a real object
store, so the absolute MB/s say little; the ratios to the limits (same server, same round) are
what count.

Usage::

    python benchmarks/bench_remote.py --scale small --reps 3        # writes RESULTS-remote.md
    python benchmarks/bench_remote.py --scale full --reps 3 --out benchmarks/_work/remote-full.md
    python benchmarks/bench_remote.py --scale small --only zstd,dcp --no-compare-servers
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import dataclasses
import datetime
import gc
import json
import logging
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import traceback
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from any directory

import _sysutil
from _stats import fmt_bytes, fmt_ratio, fmt_s, median, paired_ratio, table
from bench_backends import OBSERVED, _log, _observe, _settle, check_nested, touch
from bench_delta import choose_trainable, fresh_model, installed_code, train
from workload import build_workload, describe, iter_tensors, tensor_bytes, unique_tensors

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKDIR = HERE / "_work"  # gitignored: every local file the benchmark writes goes here
_rel = _sysutil.repo_relative

BUCKET = "aptckpt-bench"
#: moto keeps an object in memory up to this size and spills larger ones to a temporary file
#: (its default is just under 5 MiB): set high so the server holds everything in memory and
#: the local disk stays out of the figures.
MOTO_BUFFER = 4 << 30
SINGLE_PART = 50 << 20  # s3fs pipe_file's part size (its default), for the report


# ---------------------------------------------------------------------------------------------
# the server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# werkzeug's request log line: ``127.0.0.1 - - [date] "GET /bucket/key?x HTTP/1.1" 206 -``
# (colored with ANSI escapes for some statuses). A GET with ``list-type=`` is a listing.
_REQUEST = re.compile(rb'"(?:\x1b\[[0-9;]*m)*(GET|PUT|POST|HEAD|DELETE) (\S*)')


class MotoServer:
    """A moto S3 server on 127.0.0.1: a separate process (``process``) or a thread here."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.proc: subprocess.Popen[bytes] | None = None
        self.thread: Any = None
        self.endpoint = ""
        self.log_path: Path | None = None

    def start(self) -> MotoServer:
        os.environ["MOTO_S3_DEFAULT_KEY_BUFFER_SIZE"] = str(MOTO_BUFFER)  # read per object
        if self.mode == "process":
            port = _free_port()
            # moto's own entry point; its request log (one line per request, on stderr) goes
            # to a file, where the requests of each operation are counted.
            self.log_path = WORKDIR / f"moto-server-{port}.log"
            log = open(self.log_path, "wb")  # noqa: SIM115 (the server's stderr while it runs)
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(os.environ),
            )
            atexit.register(self.stop)  # no server left behind, whatever ends the run
            self.endpoint = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=2).read()
                    break
                except OSError as err:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"moto server did not start (log: {log.name})") from err
                    time.sleep(0.2)
        else:
            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.ERROR)
            self.thread = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            self.thread.start()
            host, port = self.thread.get_host_and_port()
            self.endpoint = f"http://{host}:{port}"
        return self

    def log_mark(self) -> int:
        """Where the request log ends now (0 without one)."""
        return self.log_path.stat().st_size if self.log_path else 0

    def requests_since(self, mark: int) -> dict[str, int]:
        """Requests logged since ``mark``, by method (empty for the in-process server)."""
        if self.log_path is None:
            return {}
        with open(self.log_path, "rb") as f:
            f.seek(mark)
            found = _REQUEST.findall(f.read())
        out: dict[str, int] = {}
        for method, target in found:
            kind = "LIST" if b"list-type=" in target else method.decode()
            out[kind] = out.get(kind, 0) + 1
        return out

    def cpu_s(self) -> float:
        """CPU seconds the server process has used (0 for the in-process server: its CPU is
        this process's)."""
        if self.proc is None:
            return 0.0
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        if self.proc is None:
            return float("nan")
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.thread is not None:
            self.thread.stop()
            self.thread = None

    def options(self) -> dict[str, Any]:
        """storage_options for s3fs and aptckpt: fake credentials, this endpoint."""
        return {
            "key": "bench-key-id",
            "secret": "bench-secret-not-real",
            "endpoint_url": self.endpoint,
            "client_kwargs": {"region_name": "us-east-1"},
        }

    def fs(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.options())


class CpuMeter(_sysutil.CpuMeter):
    """``_sysutil.CpuMeter`` that also leaves out the server process's CPU time, and reports it
    apart as ``server``."""

    def __init__(self, server: MotoServer) -> None:
        self.server = server
        self._server0 = server.cpu_s()
        super().__init__()

    def read(self) -> dict[str, float]:
        out = super().read()
        _, _, _, w1 = self._read()
        capacity = max(w1 - self._start[3], 1e-9) * (os.cpu_count() or 1)
        server = (self.server.cpu_s() - self._server0) / capacity
        out["server"] = server
        out["foreign"] = max(0.0, out["foreign"] - server)
        return out


# ---------------------------------------------------------------------------------------------
# contenders


@dataclasses.dataclass(frozen=True)
class Loader:
    name: str
    load: Callable[[str, Any], Any]  # (url, ref) -> loaded (timed)
    check: Callable[[Any, Any], str]  # (loaded, ref) -> ties (untimed, raises on a difference)
    prepare: Callable[[], Any] | None = None  # untimed; its result is passed to load as ref


@dataclasses.dataclass(frozen=True)
class Contender:
    """One way of saving (timed) into a fresh prefix ``url``, and its loaders.

    ``obj`` is what the save writes and what loads are compared with; ``root`` is the prefix
    whose growth counts as uploaded (``url`` unless the contender keeps a store beside it);
    ``before`` runs untimed before the save and returns figures to record (the delta base save).
    """

    key: str
    name: str
    group: str  # "limit", "peer", "aptckpt", "delta"
    save: Callable[[str], Any]
    obj: Any
    loaders: tuple[Loader, ...] = ()
    before: Callable[[str], dict[str, Any]] | None = None
    root: Callable[[str], str] = lambda url: url


@dataclasses.dataclass
class Op:
    """Per-round figures of one timed operation."""

    seconds: list[float] = dataclasses.field(default_factory=list)
    client_cpu_s: list[float] = dataclasses.field(default_factory=list)
    server_cpu_s: list[float] = dataclasses.field(default_factory=list)
    requests: list[dict[str, int]] = dataclasses.field(default_factory=list)
    error: str | None = None
    ties: str = "—"


@dataclasses.dataclass
class Result:
    name: str
    group: str
    save: Op = dataclasses.field(default_factory=Op)
    loads: dict[str, Op] = dataclasses.field(default_factory=dict)
    uploaded_bytes: list[int] = dataclasses.field(default_factory=list)
    uploaded_objects: list[int] = dataclasses.field(default_factory=list)
    stored_bytes: list[int] = dataclasses.field(default_factory=list)  # under url alone
    info: dict[str, Any] | None = None
    before: list[dict[str, Any]] = dataclasses.field(default_factory=list)


class Limits:
    """The raw bytes of the state's distinct tensors, cut into objects, as bytes (prepared once,
    untimed: the limit is the transfer, not the copy out of tensor memory)."""

    def __init__(self, obj: Any, object_bytes: int) -> None:
        whole = bytearray()
        for t in unique_tensors(obj).values():
            whole += _sysutil.byte_view(t).tobytes()
        self.whole = bytes(whole)
        del whole
        self.parts = [
            self.whole[i : i + object_bytes] for i in range(0, len(self.whole), object_bytes)
        ]
        self.nbytes = len(self.whole)

    def pipe_many(self, fs: Any, url: str) -> None:
        fs.pipe({f"{url}/part-{i:05d}": p for i, p in enumerate(self.parts)})

    def cat_many(self, fs: Any, url: str) -> dict[str, bytes]:
        return fs.cat([f"{url}/part-{i:05d}" for i in range(len(self.parts))])

    def check_many(self, got: dict[str, bytes], url: str) -> str:
        for i, p in enumerate(self.parts):
            key = f"{url}/part-{i:05d}".removeprefix("s3://")
            data = got.get(key, got.get("s3://" + key))
            if data != p:
                raise AssertionError(f"object {i} differs or is missing")
        return "n/a"

    def pipe_one(self, fs: Any, url: str) -> None:
        fs.pipe_file(f"{url}/all.bin", self.whole)

    def cat_one(self, fs: Any, url: str) -> bytes:
        return fs.cat_file(f"{url}/all.bin")

    def check_one(self, got: bytes) -> str:
        if got != self.whole:
            raise AssertionError("single object differs")
        return "n/a"


def limit_contenders(fs: Any, lim: Limits, obj: Any, object_mb: float) -> list[Contender]:
    n = len(lim.parts)
    return [
        Contender(
            "limit-many",
            f"raw bytes as {n} objects of {object_mb:g} MiB: fs.pipe / fs.cat",
            "limit",
            lambda url: lim.pipe_many(fs, url),
            obj,
            (Loader("raw: fs.cat of the objects", lambda url, ref: lim.cat_many(fs, url),
                    lambda got, ref: lim.check_many(got, LAST_URL["limit-many"])),),
        ),
        Contender(
            "limit-one",
            "raw bytes as one object: fs.pipe_file / fs.cat_file",
            "limit",
            lambda url: lim.pipe_one(fs, url),
            obj,
            (Loader("raw: fs.cat_file of the one object", lambda url, ref: lim.cat_one(fs, url),
                    lambda got, ref: lim.check_one(got)),),
        ),
    ]  # fmt: skip


# The url a contender's save last wrote to (the raw checks need it to name the objects).
LAST_URL: dict[str, str] = {}


def peer_contenders(fs: Any, options: dict[str, Any], obj: Any) -> list[Contender]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    def torch_save(url: str) -> None:
        with fs.open(f"{url}/state.pt", "wb") as f:
            torch.save(obj, f)

    def torch_load(url: str, ref: Any) -> Any:
        with fs.open(f"{url}/state.pt", "rb") as f:
            return touch(torch.load(f, weights_only=True))

    def dcp_save(threads: int) -> Callable[[str], None]:
        def save(url: str) -> None:
            # sync_files=False: DCP's sync calls fileno() on the s3fs file, which has none, and
            # falls back to os.sync() of the local machine: nothing to do with the upload (an
            # S3 PUT is durable when it returns), so it is left out.
            writer = FsspecWriter(url, sync_files=False, thread_count=threads, **options)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                dcp.save(obj, storage_writer=writer, no_dist=True)
            _observe("dcp.save (FsspecWriter)", caught)

        return save

    def dcp_load(url: str, template: Any) -> Any:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dcp.load(template, storage_reader=FsspecReader(url, **options), no_dist=True)
        _observe("dcp.load (FsspecReader)", caught)
        return touch(template)

    into_template = Loader(
        "DCP load into existing tensors (FsspecReader)", dcp_load, check_in_place,
        prepare=lambda: _touched_template(obj),
    )  # fmt: skip
    return [
        Contender("torch.save", "torch.save into fs.open(url, 'wb')", "peer", torch_save, obj,
                  (Loader("torch.load(weights_only=True) from fs.open(url, 'rb')", torch_load,
                          check_nested),)),
        Contender("dcp-t1", "DCP save, FsspecWriter, 1 thread", "peer", dcp_save(1), obj,
                  (into_template,)),
        Contender("dcp-t2", "DCP save, FsspecWriter, 2 threads", "peer", dcp_save(2), obj),
    ]  # fmt: skip


def _touched_template(obj: Any) -> Any:
    """Fresh tensors shaped as ``obj``'s, every page written, tied tensors kept tied: the model
    and optimizer a resume loads into already exist (both in-place loaders, DCP and aptckpt
    ``into=``, get one)."""
    made: dict[tuple[int, int], torch.Tensor] = {}

    def build(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            key = (x.untyped_storage().data_ptr(), x.storage_offset())
            if key not in made:
                made[key] = torch.zeros_like(x)
            return made[key]
        if isinstance(x, dict):
            return {k: build(v) for k, v in x.items()}
        if isinstance(x, list):
            return [build(v) for v in x]
        if isinstance(x, tuple):
            return tuple(build(v) for v in x)
        return x

    return build(obj)


def check_in_place(loaded: Any, ref: Any) -> str:
    """``check_nested`` for in-place loads: ties are the destination's, not the loader's."""
    check_nested(loaded, ref)
    return "in place"


APT_CONTENDERS: dict[str, tuple[str, dict[str, Any]]] = {
    "apt-zstd": ("zstd", {"codec": "zstd", "level": 1}),
    "apt-zstd-none": ("zstd", {"codec": "none"}),
    # Shards of 16 MiB rather than 512 MiB: more, smaller objects (see the notes on moto's
    # ranged GETs, whose cost grows with the object's size).
    "apt-zstd-16m": ("zstd", {"codec": "zstd", "level": 1, "shard_size": 16 << 20}),
    "apt-torch": ("torch", {}),
}


def probe_aptckpt(server: MotoServer, fs: Any) -> tuple[Any, dict[str, str]]:
    """Import aptckpt and round-trip a tiny state per contender on the server (and delta with a
    base); map key -> 'ok' or why it is skipped."""
    keys = [*APT_CONTENDERS, "apt-into", "delta"]
    try:
        import aptckpt
    except Exception as err:
        return None, dict.fromkeys(keys, f"import aptckpt failed: {type(err).__name__}: {err}")
    opts = server.options()
    tiny = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "step": 3}
    status: dict[str, str] = {}

    def probe(key: str, fn: Callable[[str], None]) -> None:
        url = f"s3://{BUCKET}/probe-{key}"
        try:
            fn(url)
            status[key] = "ok"
        except Exception as err:
            status[key] = f"probe failed: {type(err).__name__}: {err}"
        finally:
            with contextlib.suppress(FileNotFoundError):
                fs.rm(url, recursive=True)

    for key, (backend, bopts) in APT_CONTENDERS.items():

        def rt(url: str, backend: str = backend, bopts: dict[str, Any] = bopts) -> None:
            aptckpt.save(tiny, f"{url}/c", backend=backend, storage_options=opts, **bopts)
            check_nested(aptckpt.load(f"{url}/c", storage_options=opts), tiny)

        probe(key, rt)

    def rt_into(url: str) -> None:
        aptckpt.save(tiny, f"{url}/c", backend="zstd", storage_options=opts)
        dest = _touched_template(tiny)
        aptckpt.load(f"{url}/c", into=dest, storage_options=opts)
        check_nested(dest, tiny)

    def rt_delta(url: str) -> None:
        aptckpt.save(tiny, f"{url}/a", backend="delta", storage_options=opts)
        tiny2 = {"w": tiny["w"] + 1, "step": 4}
        aptckpt.save(tiny2, f"{url}/b", backend="delta", base=f"{url}/a", storage_options=opts)
        check_nested(aptckpt.load(f"{url}/b", storage_options=opts), tiny2)

    probe("apt-into", rt_into)
    probe("delta", rt_delta)
    return aptckpt, status


def _opt(v: Any) -> str:
    return f"{v >> 20}MiB" if isinstance(v, int) and v >= 1 << 20 else str(v)


def apt_contenders(aptckpt: Any, options: dict[str, Any], obj: Any,
                   status: dict[str, str]) -> list[Contender]:  # fmt: skip
    def saver(backend: str, bopts: dict[str, Any]) -> Callable[[str], Any]:
        return lambda url: aptckpt.save(
            obj, url, backend=backend, overwrite=True, storage_options=options, **bopts
        )

    def load(url: str, ref: Any) -> Any:
        return touch(aptckpt.load(url, storage_options=options))

    def load_into(url: str, template: Any) -> Any:
        aptckpt.load(url, into=template, storage_options=options)
        return touch(template)

    out = []
    for key, (backend, bopts) in APT_CONTENDERS.items():
        if status.get(key) != "ok":
            continue
        label = f"aptckpt {backend}" + "".join(f" {k}={_opt(v)}" for k, v in bopts.items())
        loaders = [Loader(f"aptckpt.load ({label})", load, check_nested)]
        if status.get("apt-into") == "ok" and key != "apt-torch":
            loaders.append(
                Loader(
                    f"aptckpt.load into= existing tensors ({label})",
                    load_into,
                    check_in_place,
                    prepare=lambda: _touched_template(obj),
                )
            )
        out.append(Contender(key, label, "aptckpt", saver(backend, bopts), obj, tuple(loaders)))
    return out


# ---------------------------------------------------------------------------------------------
# delta: one training step between two saves


def stepped_states(wl: Any) -> dict[str, tuple[str, Any]]:
    """The workload state after one more optimizer step: fine-tuning (the last block or its MLP
    trainable, the rest frozen: AdamW skips parameters without gradients, so their weights and
    moments stay bit-identical) and dense (every parameter trained). The optimizer continues from
    the workload's, so the structure is the base state's."""
    cfg = wl.config
    out: dict[str, tuple[str, Any]] = {}
    for kind in ("finetune", "dense"):
        model = fresh_model(cfg, wl.state["model"])
        if kind == "finetune":
            model.requires_grad_(False)
            label, mods = choose_trainable(model)
            for m in mods:
                m.requires_grad_(True)
        else:
            label = "every parameter trainable"
            model.requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        # A copy: load_state_dict keeps tensors already of the right dtype and device, so the
        # step would otherwise update the workload's own moments in place (the base state).
        opt.load_state_dict(copy.deepcopy(wl.state["optimizer"]))
        gen = torch.Generator().manual_seed(cfg.seed + 29)
        train(model, opt, cfg, gen, 1)
        model.requires_grad_(False)
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "step": wl.state["step"] + 1,
            "config": wl.state["config"],
            "rng": wl.state["rng"],
        }
        out[kind] = (label, state)
    return out


def changed_fraction(base: Any, new: Any) -> float:
    """Share of the (distinct) tensor bytes whose value changed between two states of the same
    structure."""
    after = dict(iter_tensors(new))
    changed = total = 0
    for name, x in unique_tensors(base).items():
        y = after[name]
        n = x.numel() * x.element_size()
        total += n
        if not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            changed += n
    return changed / total if total else 0.0


def delta_contenders(aptckpt: Any, options: dict[str, Any], base_state: Any,
                     stepped: dict[str, tuple[str, Any]]) -> list[Contender]:  # fmt: skip
    """A delta re-save: the base state saved with delta at ``<run>/ckpt-0`` (untimed by the
    round, timed apart), then the stepped state with delta against it at ``<run>/ckpt-1``
    (timed). The url given is ``<run>/ckpt-1``; uploaded bytes count the whole run prefix, so
    the new objects in the shared ``aptckpt-store`` are included."""

    def run_of(url: str) -> str:
        return url.rsplit("/", 1)[0]

    def before(url: str) -> dict[str, Any]:
        _settle()
        t0 = time.perf_counter()
        info = aptckpt.save(base_state, f"{run_of(url)}/ckpt-0", backend="delta",
                            storage_options=options)  # fmt: skip
        return {"base_save_s": time.perf_counter() - t0, "base_stored_bytes": info.stored_bytes}

    def saver(state: Any) -> Callable[[str], Any]:
        return lambda url: aptckpt.save(
            state, url, backend="delta", base=f"{run_of(url)}/ckpt-0", storage_options=options
        )

    def load(url: str, ref: Any) -> Any:
        return touch(aptckpt.load(url, storage_options=options))

    out = []
    for kind, (label, state) in stepped.items():
        name = f"aptckpt delta re-save after 1 step, {kind} ({label})"
        out.append(Contender(
            f"delta-{kind}", name, "delta", saver(state), state,
            (Loader(f"aptckpt.load of the delta re-save, {kind}", load, check_nested),),
            before=before, root=run_of,
        ))  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# the run


def _prefix_usage(fs: Any, url: str) -> tuple[int, int]:
    """(bytes, objects) under a prefix."""
    fs.invalidate_cache()
    try:
        found = fs.find(url, detail=True)
    except FileNotFoundError:
        return 0, 0
    return sum(int(d.get("size") or 0) for d in found.values()), len(found)


def _timed_op(server: MotoServer, fn: Callable[[], Any], op: Op) -> Any:
    """Run ``fn`` after settling; record wall, this process's CPU and the server's CPU."""
    _settle()
    mark = server.log_mark()
    s0, c0 = server.cpu_s(), os.times()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    c1, s1 = os.times(), server.cpu_s()
    op.seconds.append(dt)
    op.client_cpu_s.append((c1.user + c1.system) - (c0.user + c0.system))
    op.server_cpu_s.append(s1 - s0)
    op.requests.append(server.requests_since(mark))
    return out


def run_rounds(server: MotoServer, fs: Any, contenders: list[Contender], reps: int,
               tag: str = "") -> tuple[dict[str, Result], list[dict[str, float]]]:  # fmt: skip
    results = {c.key: Result(c.name, c.group) for c in contenders}
    cpu: list[dict[str, float]] = []
    for rep in range(reps):
        meter = CpuMeter(server)
        k = rep % len(contenders)
        for c in contenders[k:] + contenders[:k]:
            res = results[c.key]
            if res.save.error:
                continue
            url = f"s3://{BUCKET}/{tag}r{rep}-{c.key}/ckpt-1"
            root = c.root(url)
            LAST_URL[c.key] = url
            try:
                if c.before:
                    res.before.append(c.before(url))
                up0, n0 = _prefix_usage(fs, root)
                fs.invalidate_cache()
                info = _timed_op(server, lambda c=c, url=url: c.save(url), res.save)
                up1, n1 = _prefix_usage(fs, root)
                res.uploaded_bytes.append(up1 - up0)
                res.uploaded_objects.append(n1 - n0)
                res.stored_bytes.append(_prefix_usage(fs, url)[0])
                if info is not None and dataclasses.is_dataclass(info):
                    res.info = {
                        f.name: getattr(info, f.name)
                        for f in dataclasses.fields(info)
                        if isinstance(getattr(info, f.name), (int, float, str, bool))
                    }
                _log(f"[{tag}rep {rep + 1}/{reps}] {c.name}: save {res.save.seconds[-1]:.2f} s, "
                     f"{(up1 - up0) / 1e6:.1f} MB in {n1 - n0} objects")  # fmt: skip
                for ld in c.loaders:
                    op = res.loads.setdefault(ld.name, Op())
                    if op.error:
                        continue
                    try:
                        ref = ld.prepare() if ld.prepare else c.obj
                        fs.invalidate_cache()
                        call = lambda ld=ld, url=url, ref=ref: ld.load(url, ref)  # noqa: E731
                        loaded = _timed_op(server, call, op)
                        op.ties = ld.check(loaded, c.obj)
                        del loaded, ref
                        _log(f"    {ld.name}: {op.seconds[-1]:.2f} s (verified)")
                    except Exception as err:
                        op.error = f"{type(err).__name__}: {err}"
                        _log(f"    {ld.name}: FAILED {op.error}\n{traceback.format_exc()}")
                    gc.collect()
            except Exception as err:
                res.save.error = f"{type(err).__name__}: {err}"
                _log(f"{c.name}: FAILED {res.save.error}\n{traceback.format_exc()}")
            finally:
                with contextlib.suppress(FileNotFoundError):
                    fs.rm(root, recursive=True)
                fs.invalidate_cache()
                gc.collect()
        cpu.append(meter.read())
        cpu[-1]["loadavg"] = float(_sysutil.loadavg().split(" / ")[0])
        _log(f"[{tag}rep {rep + 1}/{reps}] CPU: {cpu[-1]}")
    return results, cpu


def compare_servers(lim: Limits, obj: Any, object_mb: float, reps: int) -> dict[str, Any]:
    """The limits (many objects, one object) on an in-process threaded server and on a server
    process, alternating, in one run."""
    servers = {m: MotoServer(m).start() for m in ("thread", "process")}
    out: dict[str, Any] = {}
    try:
        fss = {m: s.fs() for m, s in servers.items()}
        for fs in fss.values():
            fs.call_s3("create_bucket", Bucket=BUCKET)  # us-east-1: no LocationConstraint
        per_mode: dict[str, dict[str, Result]] = {}
        for rep in range(reps):
            order = list(servers) if rep % 2 == 0 else list(servers)[::-1]
            for mode in order:
                res, _ = run_rounds(servers[mode], fss[mode],
                                    limit_contenders(fss[mode], lim, obj, object_mb), 1,
                                    tag=f"cmp-{mode}-{rep}-")  # fmt: skip
                acc = per_mode.setdefault(mode, res)
                if acc is not res:
                    for key, r in res.items():
                        _merge(acc[key], r)
        for mode, res in per_mode.items():
            out[mode] = res
    finally:
        for s in servers.values():
            s.stop()
    return out


def _merge(into: Result, other: Result) -> None:
    for a, b in [(into.save, other.save)] + [
        (into.loads.setdefault(k, Op()), v) for k, v in other.loads.items()
    ]:
        a.seconds += b.seconds
        a.client_cpu_s += b.client_cpu_s
        a.server_cpu_s += b.server_cpu_s
        a.error = a.error or b.error


# ---------------------------------------------------------------------------------------------
# report


def _mbps(nbytes: int, xs: list[float]) -> str:
    return f"{nbytes / median(xs) / 1e6:.0f}" if xs else "—"


def _requests(op: Op) -> str:
    """Requests of the last round, by method (the same every round for these operations)."""
    if not op.requests or not op.requests[-1]:
        return "—"
    last = op.requests[-1]
    detail = ", ".join(f"{n} {m}" for m, n in sorted(last.items(), key=lambda x: -x[1]))
    return f"{sum(last.values())} ({detail})"


def _cpu(op: Op) -> str:
    if not op.seconds:
        return "—"
    return f"{median(op.client_cpu_s):.1f} / {median(op.server_cpu_s):.1f}"


def _nb(xs: list[int]) -> str:
    return fmt_bytes(int(median(xs))) if xs else "—"


def _server_choice(servers: dict[str, Any], chosen: str) -> str:
    """One sentence comparing the two kinds of server on the limits (paired by round)."""
    parts = []
    for key, what in (("limit-many", "many objects"), ("limit-one", "one object")):
        t, p = servers["thread"][key], servers["process"][key]
        w = paired_ratio(t.save.seconds, p.save.seconds)
        r = paired_ratio(next(iter(t.loads.values())).seconds,
                         next(iter(p.loads.values())).seconds)  # fmt: skip
        parts.append(f"{what}: write {fmt_ratio(w)}, read {fmt_ratio(r)}")
    return (
        "Speed of the server process relative to the thread (> 1x: the process is faster), "
        + "; ".join(parts)
        + f". The main run used the **{chosen}** server: "
        + (
            "in its own process the server's CPU work (most of the CPU in these runs) neither "
            "holds this process's GIL while aptckpt's and the peers' Python threads run, nor "
            "hides in the client's CPU figures; it is measured apart (`/proc/<pid>/stat`) and "
            "left out of the CPU-elsewhere share. On the raw limits, where the client does "
            "little, the two kinds give about the same times."
            if chosen == "process"
            else "chosen with --server thread."
        )
    )


def _probe_lines(probe: dict[str, Any]) -> list[str]:
    if not probe:
        return []
    cells = ", ".join(
        f"{v['ms']:.0f} ms (server CPU {v['server_ms']:.0f} ms) from a {int(k) / 1e6:.0f} MB object"
        for k, v in sorted(probe.items(), key=lambda kv: int(kv[0]))
    )
    return [
        "## moto's ranged GETs",
        "",
        "moto copies the whole object for every GET with a `Range` (`FakeKey.value` reads and "
        "copies its full buffer), so on this server a ranged GET costs time in proportion to the "
        "size of the object, not of the range. Measured in this run, after the rounds, one "
        f"1 MiB ranged GET (median of 5): {cells}. Readers that issue many ranged GETs into large "
        "objects pay far more here than on S3, where a ranged GET costs its latency and its "
        "bytes: read the `requests` columns alongside the times.",
        "",
    ]


def ranged_get_probe(server: MotoServer, fs: Any, lim: Limits) -> dict[str, Any]:
    """Time 1 MiB ranged GETs from a 4 MiB object and from one as large as the state."""
    out: dict[str, Any] = {}
    for size in (4 << 20, lim.nbytes):
        path = f"{BUCKET}/range-probe/{size}"
        fs.pipe_file(path, lim.whole[:size])
        times, cpu = [], []
        for _ in range(5):
            c0, t0 = server.cpu_s(), time.perf_counter()
            fs.cat_file(path, 0, 1 << 20)
            times.append(time.perf_counter() - t0)
            cpu.append(server.cpu_s() - c0)
        fs.rm(path)
        out[str(size)] = {"ms": 1000 * median(times), "server_ms": 1000 * median(cpu)}
    return out


def render(meta: dict[str, Any], results: dict[str, Result], cpu: list[dict[str, float]],
           servers: dict[str, Any]) -> str:  # fmt: skip
    nbytes = meta["nbytes"]
    m, v = meta["machine"], meta["versions"]
    lim_w_many = results["limit-many"].save.seconds
    lim_w_one = results["limit-one"].save.seconds
    lim_r_many = next(iter(results["limit-many"].loads.values())).seconds
    lim_r_one = next(iter(results["limit-one"].loads.values())).seconds
    ts = results["torch.save"].save.seconds if "torch.save" in results else []
    tl = (next(iter(results["torch.save"].loads.values())).seconds
          if "torch.save" in results else [])  # fmt: skip
    zs = results["apt-zstd"].save.seconds if "apt-zstd" in results else []
    zs_up = results["apt-zstd"].uploaded_bytes if "apt-zstd" in results else []

    out = [
        "# aptckpt on object storage: save/load on a moto S3 server vs peers vs raw transfer",
        "",
        "Generated by `benchmarks/bench_remote.py`; see `benchmarks/README.md`. **moto on "
        "loopback is a pure-Python, CPU-bound server**, far slower than a real object store, "
        "and it shares the 2 vCPUs with the client: the absolute MB/s describe moto, not S3. "
        "What counts are the ratios to the raw-transfer limits, taken within each round on the "
        "same server and the same bytes.",
        "",
        f"- **Date**: {meta['date']} (run took {meta['duration_s'] / 60:.1f} min)",
        f"- **Command**: `{meta['command']}`",
        f"- **Machine**: {m['cpu']}; {m['cores']}; torch threads {m['torch_threads']}; "
        f"RAM {m['ram']}; Linux {m['kernel']}",
        f"- **Load average** (1/5/15 min): at start {meta['loadavg_start']}, at end "
        f"{meta['loadavg_end']}",
        "- **Versions**: " + ", ".join(f"{k} {val}" for k, val in v.items() if k != "git"),
        f"- **Tree**: git {v['git']}; aptckpt code measured: {meta['code']}",
        f"- **Server**: {meta['server_line']}",
        f"- **Repetitions**: {meta['reps']}, interleaved round-robin (the starting contender "
        "rotates); cells are median [min-max] seconds; MB/s = the state's tensor bytes (each "
        "distinct tensor once, 10^6 bytes per MB) / median time, the same numerator for every "
        "row; ratios are medians of per-round ratios; `vs limit` = t_limit / t_contender "
        "(1x: as fast as "
        "the raw transfer).",
        f"- **Scale**: `{meta['scale']}` -- {meta['workload']}",
        f"- **Data**: the full training state `{{model, optimizer, step, config, rng}}`, "
        f"{fmt_bytes(nbytes)} of tensor bytes.",
        "",
    ]
    skipped = {k: s for k, s in meta["apt_status"].items() if s != "ok"}
    if skipped:
        out += ["**aptckpt contenders skipped:**", ""]
        out += [f"- `{k}`: {s}" for k, s in skipped.items()]
        out.append("")

    foreign = ", ".join(f"{100 * c['foreign']:.0f}%" for c in cpu)
    srv = ", ".join(f"{100 * c['server']:.0f}%" for c in cpu)
    steal = ", ".join(f"{100 * c['steal']:.0f}%" for c in cpu)
    out += [
        "## CPU",
        "",
        f"Per round, as a share of all {os.cpu_count()} vCPUs: **CPU busy elsewhere** (other "
        f"processes and kernel threads; neither this process nor the server): {foreign}; the "
        f"moto server process: {srv}; hypervisor steal: {steal}. Columns `CPU s client / "
        "server` below: CPU seconds of this process (all threads) and of the server process "
        "during the operation, medians. `requests`: the requests the server logged during the "
        "operation, last round, by method.",
        "",
        "## Limits",
        "",
        table(
            [
                "limit (same bytes, same server, same run)",
                "seconds, median [min-max]",
                "MB/s",
                "CPU s client / server",
                "requests",
            ],
            [
                [
                    f"{results[key].name} ({what})",
                    fmt_s(op.seconds),
                    _mbps(nbytes, op.seconds),
                    _cpu(op),
                    _requests(op),
                ]
                for key in ("limit-many", "limit-one")
                for what, op in (
                    ("write", results[key].save),
                    ("read", next(iter(results[key].loads.values()))),
                )
            ],
        ),
        "",
        "## Save",
        "",
    ]
    rows = []
    for r in results.values():
        if r.group in ("limit", "delta"):
            continue
        xs = r.save.seconds
        rows.append([
            r.name + (f" **(failed: {r.save.error})**" if r.save.error else ""),
            _nb(r.uploaded_bytes),
            str(int(median(r.uploaded_objects))) if r.uploaded_objects else "—",
            fmt_s(xs), _mbps(nbytes, xs),
            fmt_ratio(paired_ratio(lim_w_many, xs)), fmt_ratio(paired_ratio(lim_w_one, xs)),
            fmt_ratio(paired_ratio(ts, xs)), _cpu(r.save), _requests(r.save),
        ])  # fmt: skip
    out += [
        table(["save", "uploaded", "objects", "seconds, median [min-max]", "MB/s",
               "vs limit, many objects", "vs limit, one object", "vs torch.save into s3fs file",
               "CPU s client / server", "requests"], rows),
        "",
        "## Load",
        "",
        "Every load ends by reading one byte per page of every tensor (inside the timing) and is "
        "compared bit for bit with the saved state afterwards (outside). In-place loaders (DCP, "
        "aptckpt `into=`) fill tensors allocated and zero-filled before the timing, as a resume "
        "into an existing model and optimizer does.",
        "",
    ]  # fmt: skip
    rows = []
    for r in results.values():
        if r.group in ("limit", "delta"):
            continue
        for name, op in r.loads.items():
            xs = op.seconds
            rows.append([
                name + (f" **(failed: {op.error})**" if op.error else ""),
                fmt_s(xs), _mbps(nbytes, xs),
                fmt_ratio(paired_ratio(lim_r_many, xs)), fmt_ratio(paired_ratio(lim_r_one, xs)),
                fmt_ratio(paired_ratio(tl, xs)), _cpu(op), _requests(op), op.ties,
            ])  # fmt: skip
    out += [
        table(["load", "seconds, median [min-max]", "MB/s", "vs limit, many objects",
               "vs limit, one object", "vs torch.load from s3fs file", "CPU s client / server",
               "requests",
               "tied weights"], rows),
        "",
    ]  # fmt: skip

    deltas = {k: r for k, r in results.items() if r.group == "delta"}
    if deltas:
        out += [
            "## Delta re-save after one training step",
            "",
            "Per round, in a fresh run prefix: the workload state saved with `backend='delta'` "
            "(`ckpt-0`, a keyframe; timed apart, column `first save`), one AdamW step taken, "
            "and the new state saved with `backend='delta', base=ckpt-0` (`ckpt-1`, the timed "
            "save). **Uploaded** = growth of the run prefix during the timed save (new objects "
            "in the shared `aptckpt-store` plus `ckpt-1`'s manifest and local shard), from a "
            "bucket listing. `vs zstd save` = the `aptckpt zstd level=1` save of the (unstepped) "
            "state in the same round, which is as large. Deltas are against the previous "
            "save of the same process (its chunks may be cached in memory, as in training).",
            "",
        ]
        rows = []
        for key, r in deltas.items():
            xs = r.save.seconds
            kind = key.removeprefix("delta-")
            up = [float(b) for b in r.uploaded_bytes]
            rows.append([
                r.name + (f" **(failed: {r.save.error})**" if r.save.error else ""),
                f"{100 * meta['changed'].get(kind, float('nan')):.1f}%",
                fmt_s([b["base_save_s"] for b in r.before]),
                fmt_s(xs),
                _nb(r.uploaded_bytes),
                fmt_ratio(paired_ratio(up, [float(b) for b in zs_up])),
                fmt_ratio(paired_ratio(zs, xs)),
                fmt_ratio(paired_ratio(lim_w_many, xs)),
                _cpu(r.save),
                _requests(r.save),
            ])  # fmt: skip
        out += [
            table(["delta re-save", "tensor bytes changed by the step", "first save (keyframe)",
                   "re-save seconds, median [min-max]", "uploaded", "uploaded / zstd uploaded",
                   "vs zstd save (time)", "vs limit, many objects (time)",
                   "CPU s client / server", "requests"], rows),
            "",
        ]  # fmt: skip
        rows = []
        for r in deltas.values():
            for name, op in r.loads.items():
                xs = op.seconds
                rows.append([
                    name + (f" **(failed: {op.error})**" if op.error else ""), fmt_s(xs),
                    _mbps(nbytes, xs), fmt_ratio(paired_ratio(lim_r_many, xs)), _cpu(op),
                    _requests(op),
                ])  # fmt: skip
        out += [table(["load", "seconds, median [min-max]", "MB/s", "vs limit, many objects",
                       "CPU s client / server", "requests"], rows), ""]  # fmt: skip

    if servers:
        out += [
            "## Server: in-process thread vs separate process",
            "",
            "The limits timed on both kinds of moto server, alternating, before the main run "
            f"({meta['compare_reps']} rounds each). `CPU s` for the thread server is all in the "
            "client column (the server runs in this process). "
            + _server_choice(servers, meta["server"]),
            "",
        ]
        rows = []
        for mode, res in servers.items():
            for key in ("limit-many", "limit-one"):
                r = res[key]
                ld = next(iter(r.loads.values()))
                rows.append([mode, r.name, fmt_s(r.save.seconds), _mbps(nbytes, r.save.seconds),
                             _cpu(r.save), fmt_s(ld.seconds), _mbps(nbytes, ld.seconds),
                             _cpu(ld)])  # fmt: skip
        out += [
            table(["server", "limit", "write s", "write MB/s", "write CPU s client / server",
                   "read s", "read MB/s", "read CPU s client / server"], rows, "ll" + "r" * 6),
            "",
        ]  # fmt: skip

    out += _probe_lines(meta.get("range_probe", {}))
    notes = list(meta.get("notes", [])) + list(meta.get("observed", []))
    for r in results.values():
        for name, op in [("save", r.save), *r.loads.items()]:
            if op.error:
                notes.append(f"**{r.name}: {name} failed**: `{op.error}`")
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# main

SELECTORS = {
    "torch": {"torch.save"},
    "dcp": {"dcp-t1", "dcp-t2"},
    "aptckpt": {*APT_CONTENDERS, "delta-finetune", "delta-dense"},
    "zstd": {"apt-zstd", "apt-zstd-none", "apt-zstd-16m"},
    "delta": {"delta-finetune", "delta-dense"},
    **{k: {k} for k in ("dcp-t1", "dcp-t2", *APT_CONTENDERS, "delta-finetune", "delta-dense")},
}
ALWAYS = {"limit-many", "limit-one", "torch.save"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=("full", "small"), default="small")
    parser.add_argument("--reps", type=int, default=3, help="interleaved rounds (>= 1)")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-remote.md")
    parser.add_argument(
        "--server",
        choices=("process", "thread"),
        default="process",
        help="moto server in its own process (default) or a thread here",
    )
    parser.add_argument(
        "--compare-servers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="first time the limits on both kinds of server",
    )
    parser.add_argument(
        "--object-mb",
        type=float,
        default=16,
        help="object size of the many-objects limit, MiB (default 16: the part "
        "size aptckpt uploads in parallel)",
    )
    parser.add_argument("--only", default="",
                        help="comma list besides the limits and torch.save: "
                             + ", ".join(sorted(SELECTORS)))  # fmt: skip
    parser.add_argument("--note", action="append", default=[], help="a line for the Notes")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="measure nothing: render the report again from a run's JSON dump "
                             "(with any --note lines added)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be >= 1")
    unknown = [x for x in args.only.split(",") if x and x not in SELECTORS]
    if unknown:
        parser.error(f"unknown --only {unknown}; choose from {sorted(SELECTORS)}")
    return args


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return repr(obj)


def _result_from(d: dict[str, Any]) -> Result:
    r = Result(d["name"], d["group"])
    for f in dataclasses.fields(Result):
        if f.name in ("name", "group"):
            continue
        v = d[f.name]
        if f.name == "save":
            v = Op(**v)
        elif f.name == "loads":
            v = {k: Op(**x) for k, x in v.items()}
        setattr(r, f.name, v)
    return r


def rerender(args: argparse.Namespace) -> None:
    """The report again from a JSON dump (figures unchanged), with --note lines added."""
    doc = json.loads(args.from_json.read_text())
    meta = doc["meta"]
    meta["notes"] = list(meta.get("notes", [])) + list(args.note)
    results = {k: _result_from(v) for k, v in doc["results"].items()}
    servers = {m: {k: _result_from(v) for k, v in res.items()}
               for m, res in doc.get("server_compare", {}).items()}  # fmt: skip
    report = render(meta, results, doc["cpu_per_round"], servers)
    args.out.write_text(report)
    _log(f"rendered {_rel(args.from_json)} into {_rel(args.out)}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.from_json:
        rerender(args)
        return
    WORKDIR.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    loadavg_start = _sysutil.loadavg()
    command = "python " + " ".join(shlex.quote(a) for a in [_rel(sys.argv[0]), *sys.argv[1:]])
    selected = set(ALWAYS)
    for item in filter(None, args.only.split(",")):
        selected |= SELECTORS[item]
    if not args.only:
        selected |= set().union(*SELECTORS.values())

    _log(f"building workload ({args.scale}) ...")
    wl = build_workload(args.scale)
    _log(describe(wl))
    obj = wl.state
    object_bytes = int(args.object_mb * (1 << 20))
    lim = Limits(obj, object_bytes)

    server_cmp: dict[str, Any] = {}
    cmp_reps = 2
    if args.compare_servers:
        _log("comparing server kinds on the limits ...")
        server_cmp = compare_servers(lim, obj, args.object_mb, cmp_reps)

    server = MotoServer(args.server).start()
    notes = list(args.note)
    try:
        fs = server.fs()
        fs.call_s3("create_bucket", Bucket=BUCKET)  # us-east-1: no LocationConstraint
        aptckpt, apt_status = probe_aptckpt(server, fs)
        for key, st in apt_status.items():
            _log(f"aptckpt {key}: {st}")
        versions = _sysutil.versions(REPO)
        code = "not imported"
        code_start = installed_code(aptckpt) if aptckpt is not None else None
        options = server.options()

        contenders = limit_contenders(fs, lim, obj, args.object_mb)
        contenders += peer_contenders(fs, options, obj)
        changed: dict[str, float] = {}
        if aptckpt is not None:
            contenders += apt_contenders(aptckpt, options, obj, apt_status)
            if apt_status.get("delta") == "ok" and selected & SELECTORS["delta"]:
                _log("one training step for the delta re-saves ...")
                stepped = stepped_states(wl)
                changed = {k: changed_fraction(obj, s) for k, (_, s) in stepped.items()}
                contenders += delta_contenders(aptckpt, options, obj, stepped)
        contenders = [c for c in contenders if c.key in selected]
        _log(f"contenders: {[c.key for c in contenders]}")
        results, cpu = run_rounds(server, fs, contenders, args.reps)
        server_rss = server.rss_mb()
        _log("ranged GET probe ...")
        range_probe = ranged_get_probe(server, fs, lim)
        if aptckpt is not None and code_start is not None:
            end = installed_code(aptckpt)
            differ = code_start["py_differ_from_head"]
        code = (
            f"fingerprint {code_start['fingerprint']}"
            + ("" if end["fingerprint"] == code_start["fingerprint"]
               else f" at the start, {end['fingerprint']} at the end (reinstalled!)")
            + (f", .py files differ from HEAD: {differ}" if differ else ", .py files = HEAD")
        )  # fmt: skip
    finally:
        server.stop()

    server_line = (
        f"moto {_sysutil._dist_version('moto')}, "
        + ("`python -m moto.server -H 127.0.0.1 -p <free port>` in its own process (its "
           "request log, one line per request, to a file: the `requests` columns)"
           if args.server == "process" else
           "`ThreadedMotoServer(ip_address='127.0.0.1', port=0)` in this process")
        + f"; objects held in memory (`MOTO_S3_DEFAULT_KEY_BUFFER_SIZE={MOTO_BUFFER}`); one "
        f"bucket; fake credentials passed as `storage_options` (`key`, `secret`, "
        f"`endpoint_url`, region us-east-1); s3fs {_sysutil._dist_version('s3fs')}, fsspec "
        f"{_sysutil._dist_version('fsspec')}. Server RSS at the end: {server_rss:.0f} MB."
    )  # fmt: skip
    meta = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
        "command": command,
        "machine": _sysutil.machine_info(WORKDIR),
        "versions": versions,
        "code": code,
        "loadavg_start": loadavg_start,
        "loadavg_end": _sysutil.loadavg(),
        "server": args.server,
        "server_line": server_line,
        "compare_reps": cmp_reps,
        "range_probe": range_probe,
        "object_bytes": object_bytes,
        "workload": describe(wl),
        "scale": args.scale,
        "reps": args.reps,
        "nbytes": tensor_bytes(obj),
        "apt_status": apt_status,
        "changed": changed,
        "notes": notes,
        "observed": list(OBSERVED),
    }
    stamp = started.strftime("%Y%m%d-%H%M%S")
    raw_json = WORKDIR / f"results-remote-{args.scale}-{stamp}.json"
    raw_json.write_text(json.dumps(_jsonable({
        "meta": meta, "results": results, "cpu_per_round": cpu, "server_compare": server_cmp,
    }), indent=1))  # fmt: skip
    report = render(meta, results, cpu, server_cmp)
    print(report)
    args.out.write_text(report)
    _log(f"wrote {_rel(args.out)} and {_rel(raw_json)}")


if __name__ == "__main__":
    main()

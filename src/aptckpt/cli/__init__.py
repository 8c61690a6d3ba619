"""The ``aptckpt`` command line: a thin layer over the public API.

``aptckpt info|ls|inspect|verify|diff|convert|gc|plot`` (also ``python -m aptckpt``).
Tables go to stdout, errors and progress bars to stderr; ``--json`` gives
machine-readable output for info, ls, inspect, verify, diff and gc.

Exit codes: 0 success; 1 damage (a checkpoint failed verification, or
:class:`~aptckpt.errors.IntegrityError` while reading one); 2 usage and every
other error, reported as one line naming the problem and the fix -- never a
traceback for an :class:`~aptckpt.errors.AptckptError` or an ``OSError``;
130 interrupted (Ctrl-C). ``diff`` follows diff(1) instead: 0 identical, 1
different, 2 any error, damage included.

This module holds the parser and :func:`main`, which maps errors to exit codes;
each subcommand lives in a private module (``_info``: info, inspect; ``_verify``;
``_diff``; ``_export``: convert; ``_runs``: ls, gc; ``_plot``), their shared output helpers in
``_common``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import aptckpt
from aptckpt.cli._common import UsageError, os_message, parse_storage_options
from aptckpt.cli._diff import cmd_diff
from aptckpt.cli._export import cmd_convert
from aptckpt.cli._info import cmd_info, cmd_inspect
from aptckpt.cli._plot import add_parser as add_plot_parser
from aptckpt.cli._runs import cmd_gc, cmd_ls
from aptckpt.cli._verify import cmd_verify
from aptckpt.errors import (
    AptckptError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    IntegrityError,
)
from aptckpt.storage import is_url

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aptckpt",
        description="Inspect, verify, compare and convert aptckpt checkpoints.",
        epilog="exit status: 0 success, 1 a damaged checkpoint (diff: the checkpoints "
        "differ), 2 usage or any other error (diff: damage too)",
    )
    p.add_argument("--version", action="version", version=f"aptckpt {aptckpt.__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, func: Callable[[argparse.Namespace], int], doc: str, *, js: bool = True
    ) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=doc, description=doc)
        c.set_defaults(func=func)
        c.add_argument(
            "--storage-option",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="an option of the fsspec file system of s3://, gs://, ... paths, e.g. "
            "endpoint_url=http://127.0.0.1:9000 (repeatable; over the AWS_* environment)",
        )
        if js:
            c.add_argument("--json", action="store_true", help="machine-readable output")
        return c

    command("info", cmd_info, "versions, native core, SIMD, threads, backends")
    c = command(
        "ls",
        cmd_ls,
        "list the checkpoints of a run directory (--json: a document of schema 1, "
        "described in docs/cli.md)",
    )
    c.add_argument("run_dir", metavar="RUN_DIR")
    c = command("inspect", cmd_inspect, "show a checkpoint's manifest and tensors (reads no data)")
    c.add_argument("checkpoint", metavar="CKPT")
    c = command(
        "verify", cmd_verify, "check every digest of a checkpoint or of all under a directory"
    )
    c.add_argument("path", metavar="CKPT|RUN_DIR")
    c = command(
        "diff",
        cmd_diff,
        "show which tensors and values differ between two checkpoints "
        "(exit 0 identical, 1 different, 2 error)",
    )
    c.add_argument("a", metavar="A")
    c.add_argument("b", metavar="B")
    c.add_argument("--all", action="store_true", help="list unchanged keys too")
    c = command(
        "convert", cmd_convert, "rewrite a checkpoint with another backend, or export it", js=False
    )
    c.add_argument("src", metavar="SRC")
    c.add_argument("dst", metavar="DST")
    c.add_argument(
        "--to",
        choices=("checkpoint", "torch-file", "safetensors", "dcp"),
        default="checkpoint",
        help="checkpoint (default): an aptckpt checkpoint directory; torch-file: one "
        "torch.save file; safetensors: the model weights (a .safetensors file, or a "
        "directory in Hugging Face's layout); dcp: a torch.distributed.checkpoint directory",
    )
    c.add_argument(
        "--select",
        metavar="KEY",
        help="export this top-level entry of the state only (safetensors: 'model' by default)",
    )
    c.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        help="--to safetensors into a directory: shard past SIZE (e.g. 5GB, 500MiB)",
    )
    c.add_argument("--backend", help="backend of the new checkpoint (default zstd)")
    c.add_argument("--level", type=int, help="zstd compression level (zstd, delta)")
    c.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another backend option, e.g. codec=none (repeatable)",
    )
    c.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    c = command("gc", cmd_gc, "remove store objects that no delta checkpoint of a run reaches")
    c.add_argument("run_dir", metavar="RUN_DIR")
    c.add_argument("--dry-run", action="store_true", help="report, remove nothing")
    c.add_argument("--no-wait", action="store_true", help="fail instead of waiting for a save")
    add_plot_parser(command)
    return p


def _hint(err: CheckpointNotFoundError) -> str:
    if is_url(err.path):
        return ""
    path = Path(err.path)
    if (path / "metadata.json").is_file():
        return f"; it is a run directory: list its checkpoints with aptckpt ls {path}"
    return ""


def _fail(command: str, message: str, code: int = 2) -> int:
    print(f"aptckpt {command}: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors (argparse printed them)
        return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 2
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    name = args.command
    try:
        args.storage_options = parse_storage_options(args.storage_option)
        code: int = args.func(args)
        return code
    except IntegrityError as err:
        problems = err.problems if len(err.problems) > 1 else (str(err),)
        # diff's 1 means "they differ", so damage there is trouble, as in diff(1).
        return _fail(name, "; ".join(problems), 2 if name == "diff" else 1)
    except CheckpointNotFoundError as err:
        return _fail(name, f"{err}{_hint(err)}")
    except CheckpointExistsError as err:
        return _fail(name, str(err).replace("overwrite=True", "--overwrite"))
    except (AptckptError, UsageError) as err:
        return _fail(name, str(err))
    except BrokenPipeError:  # `aptckpt ls run | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        # As if killed by SIGPIPE (what `diff a b | head` gives): not 1, which for diff
        # means "they differ", nor 2, since nothing went wrong.
        return 128 + signal.SIGPIPE
    except OSError as err:
        return _fail(name, f"{os_message(err)}; check the path and its permissions")
    except KeyboardInterrupt:
        print(f"aptckpt {name}: interrupted", file=sys.stderr)
        return 130

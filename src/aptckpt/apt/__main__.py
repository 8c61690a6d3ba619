"""Command line of the reference training loop: ``python -m aptckpt.apt``.

A thin layer over :func:`aptckpt.apt.train_model`: each flag is one of its
arguments. Prints one line per epoch (and per temporary checkpoint) on stdout,
a progress bar on stderr when it is a terminal, and a summary at the end.
Exit status: 0 on success, 1 when training fails on a checkpoint or argument
error (the message names it), 2 for bad flags, 130 when interrupted (Ctrl-C; the
message says how to resume).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from aptckpt.apt.corpus import default_corpus
from aptckpt.apt.model import APTConfig
from aptckpt.apt.tokenizer import CharTokenizer
from aptckpt.apt.train import train_model
from aptckpt.errors import AptckptError


def _parser() -> argparse.ArgumentParser:
    defaults = APTConfig()
    parser = argparse.ArgumentParser(
        prog="python -m aptckpt.apt",
        description="Train the APT reference model with resumable, portable checkpoints.",
    )
    run = parser.add_argument_group("training")
    run.add_argument("--epochs", type=int, default=3, help="passes over the data (default 3)")
    run.add_argument("--batch-size", type=int, default=16, help="sequences per step (default 16)")
    run.add_argument(
        "--learning-rate", type=float, default=3e-3, help="peak learning rate (default 3e-3)"
    )
    run.add_argument("--seed", type=int, default=0, help="seed of every RNG (default 0)")
    run.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap on steps per epoch")
    run.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: the reference model is too small to gain "
        "from more; a resumed run is bit-identical only with the same count)",
    )
    run.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="draw a progress bar (default: only on a terminal)",
    )
    ckpt = parser.add_argument_group("checkpoints")
    ckpt.add_argument("--checkpoint-dir", default=None, help="run directory (default ./outputs)")
    ckpt.add_argument(
        "--save-path",
        default=None,
        help="deprecated alias of --checkpoint-dir",
    )
    ckpt.add_argument(
        "--resume-from",
        default=None,
        metavar="auto|latest|best|PATH",
        help="auto: resume from the run's newest checkpoint if any, else start fresh; "
        "latest, best or a checkpoint path: resume from it (must exist)",
    )
    ckpt.add_argument(
        "--temp-checkpoint-freq",
        type=int,
        default=100,
        help="temporary checkpoint every N steps, 0 disables (default 100)",
    )
    ckpt.add_argument("--backend", default="zstd", help="zstd (default), torch, delta, or a plugin")
    ckpt.add_argument(
        "--keep-last", type=int, default=3, help="regular checkpoints kept (default 3)"
    )
    ckpt.add_argument(
        "--sync-checkpoints",
        action="store_true",
        help="save synchronously (default: in the background, training waits only for a "
        "copy of the state)",
    )
    run.add_argument(
        "--parallel",
        choices=("ddp", "fsdp"),
        default=None,
        help="train on every rank of a torchrun job with DDP or FSDP2 (torchrun "
        "--nproc-per-node N -m aptckpt.apt --parallel ddp ...); each rank writes its shards",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--d-model", type=int, default=defaults.d_model)
    model.add_argument("--n-layer", type=int, default=defaults.n_layer)
    model.add_argument("--n-head", type=int, default=defaults.n_head)
    model.add_argument("--context", type=int, default=defaults.context)
    model.add_argument("--dropout", type=float, default=defaults.dropout)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.save_path is not None and args.checkpoint_dir is not None:
        parser.error("pass --checkpoint-dir or the deprecated --save-path, not both")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    try:
        vocab = CharTokenizer.from_text(default_corpus()).vocab_size
        config = APTConfig(
            vocab_size=vocab,
            d_model=args.d_model,
            n_layer=args.n_layer,
            n_head=args.n_head,
            context=args.context,
            dropout=args.dropout,
        )
        result = train_model(
            args.epochs,
            args.batch_size,
            args.learning_rate,
            args.checkpoint_dir if args.checkpoint_dir is not None else "./outputs",
            args.resume_from,
            args.temp_checkpoint_freq,
            args.backend,
            model_config=config,
            seed=args.seed,
            keep_last=args.keep_last,
            save_path=args.save_path,
            max_steps_per_epoch=args.max_steps_per_epoch,
            progress=args.progress,
            log=lambda line: print(line, flush=True),
            async_checkpoints=not args.sync_checkpoints,
            parallel=args.parallel,
        )
    except (AptckptError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Committed checkpoints are whole, and a save in flight finishes at exit: say how
        # to go on rather than print a traceback of wherever the loop was.
        run_dir = args.checkpoint_dir or args.save_path or "./outputs"
        print(
            f"interrupted; to continue, run again with the same flags and --resume-from auto "
            f"(checkpoints in {run_dir})",
            file=sys.stderr,
        )
        return 130
    if args.parallel is not None:
        import torch.distributed as dist

        if dist.is_initialized():
            if dist.get_rank() != 0:
                dist.destroy_process_group()
                return 0
            dist.destroy_process_group()
    last = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    print(
        f"done: {result.global_step} steps, final train loss {last}; "
        f"blocked on checkpoints {result.checkpoint_seconds:.2f}s = "
        f"{100 * result.blocked_fraction:.2f}% of {result.wall_seconds:.2f}s wall",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

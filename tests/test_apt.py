"""The APT reference loop's pieces: tokenizer, model, corpus, data, CLI, train_model, load_model.

Resume bit-exactness is tested in ``test_apt_resume.py``.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import aptckpt
from aptckpt.apt import APTConfig, APTModel, CharTokenizer, TrainResult, load_model, train_model
from aptckpt.apt.corpus import corpus_digest, default_corpus
from aptckpt.apt.data import Batches, split_tokens
from aptckpt.manager import CheckpointManager
from aptckpt.testing import assert_state_equal

# above the API: its reads and hashes are covered in both runs by the API-level tests
pytestmark = pytest.mark.core_independent

VOCAB = CharTokenizer.from_text(default_corpus()).vocab_size
TINY = APTConfig(vocab_size=VOCAB, d_model=16, n_layer=1, n_head=2, context=16)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: the tiny model gains nothing from more, and the CLI runs use one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_run(run_dir: Path | str, **kwargs: object) -> TrainResult:
    args: dict[str, object] = {
        "epochs": 2,
        "batch_size": 4,
        "checkpoint_dir": run_dir,
        "temp_checkpoint_freq": 3,
        "model_config": TINY,
        "max_steps_per_epoch": 4,
        "log": None,
    }
    args.update(kwargs)
    return train_model(**args)  # type: ignore[arg-type]


# ------------------------------------------------------------------ tokenizer


def test_tokenizer_round_trip() -> None:
    tok = CharTokenizer.from_text("hello, world")
    text = "low hello"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == len(set("hello, world")) + 1
    assert tok.encode("hZ") == [tok.encode("h")[0], tok.unk_id]
    assert tok.decode(tok.encode("Z")) == "\ufffd"
    with pytest.raises(ValueError, match="'Z' at position 1"):
        tok.encode("hZ", errors="strict")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


def test_tokenizer_files_round_trip(tmp_path: Path) -> None:
    tok = CharTokenizer.from_text('unicode: "ü€漢", tabs\tand newlines\n')
    files = tok.files()
    assert sorted(files) == ["config.json", "vocab.json"]
    assert tok.files() == files  # deterministic bytes
    assert CharTokenizer.from_files(files) == tok
    tok.save(tmp_path / "tok")
    assert {p.name for p in (tmp_path / "tok").iterdir()} == {"config.json", "vocab.json"}
    loaded = CharTokenizer.load(tmp_path / "tok")
    assert loaded == tok
    assert loaded.decode(loaded.encode("ü€漢\t")) == "ü€漢\t"
    config = json.loads(files["config.json"])
    assert config["tokenizer_class"] == "CharTokenizer"
    assert config["vocab_size"] == tok.vocab_size


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({"vocab.json": b"{}"}, "config.json' is missing"),
        ({"vocab.json": b"{}", "config.json": b"\xff"}, "not UTF-8 JSON"),
        (
            {"vocab.json": b'{"<unk>": 0}', "config.json": b'{"tokenizer_class": "BPE"}'},
            "tokenizer_class is 'BPE'",
        ),
        (
            {
                "vocab.json": b'{"<unk>": 0, "a": 2}',
                "config.json": b'{"tokenizer_class": "CharTokenizer", "version": 1, '
                b'"vocab_size": 2}',
            },
            "ids must be exactly",
        ),
        (
            {
                "vocab.json": b'{"<unk>": 0, "ab": 1}',
                "config.json": b'{"tokenizer_class": "CharTokenizer", "version": 1, '
                b'"vocab_size": 2}',
            },
            "single characters",
        ),
        (
            {
                "vocab.json": b'{"<unk>": 0}',
                "config.json": b'{"tokenizer_class": "CharTokenizer", "version": 2}',
            },
            "version 2",
        ),
    ],
)
def test_tokenizer_rejects_bad_files(files: dict[str, bytes], match: str) -> None:
    with pytest.raises(aptckpt.FormatError, match=match):
        CharTokenizer.from_files(files)


# ------------------------------------------------------------------ model


def test_config_validation_and_dict_round_trip() -> None:
    config = APTConfig(vocab_size=10, d_model=8, n_layer=1, n_head=2, context=4, dropout=0.0)
    assert APTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="multiple of n_head"):
        APTConfig(d_model=10, n_head=4)
    with pytest.raises(ValueError, match="dropout"):
        APTConfig(dropout=1.0)
    with pytest.raises(ValueError, match="n_layer must be a positive int"):
        APTConfig(n_layer=0)
    with pytest.raises(ValueError, match="unknown APTConfig field"):
        APTConfig.from_dict({"d_model": 8, "width": 3})


def test_model_shapes_tied_weights_and_causality() -> None:
    torch.manual_seed(0)
    model = APTModel(TINY).eval()
    idx = torch.randint(0, VOCAB, (3, TINY.context))
    logits = model(idx)
    assert logits.shape == (3, TINY.context, VOCAB)
    assert model.head.weight is model.tok_emb.weight
    state = model.state_dict()
    assert state["head.weight"].data_ptr() == state["tok_emb.weight"].data_ptr()
    assert not any("mask" in key for key in state)  # derived buffer, not saved
    # Changing token t changes no logit before t, and does change logits at t.
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % VOCAB
    other = model(changed)
    assert torch.equal(other[:, :10], logits[:, :10])
    assert not torch.equal(other[:, 10], logits[:, 10])
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model(torch.zeros(1, TINY.context + 1, dtype=torch.long))


def test_dropout_draws_from_the_global_rng() -> None:
    model = APTModel(TINY).train()
    idx = torch.randint(0, VOCAB, (2, 8))
    torch.manual_seed(1)
    a = model(idx)
    b = model(idx)
    torch.manual_seed(1)
    assert not torch.equal(a, b)
    assert torch.equal(model(idx), a)
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_generate_greedy_and_sampled() -> None:
    model = APTModel(TINY).eval()
    start = torch.zeros(1, 1, dtype=torch.long)
    assert torch.equal(model.generate(start, 20), model.generate(start, 20))
    rng_before = torch.get_rng_state()
    out = model.generate(start, 20, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 21)
    assert torch.equal(torch.get_rng_state(), rng_before)


# ------------------------------------------------------------------ corpus and data


def test_default_corpus_is_deterministic_and_leaves_rngs_alone() -> None:
    random.seed(5)
    before = random.getstate()
    text = default_corpus()
    assert random.getstate() == before
    assert text == default_corpus()
    assert 40_000 <= len(text) < 41_000
    assert default_corpus(seed=1) != text
    assert corpus_digest(text) == corpus_digest(default_corpus())


def test_data_order_is_a_function_of_seed_and_epoch() -> None:
    tokens = torch.arange(1000)
    data = Batches(tokens, 8, 4, seed=3)
    assert data.steps_per_epoch == (999 // 8) // 4
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    first = list(data.epoch(0))
    assert torch.equal(torch.get_rng_state(), torch_state)  # no global RNG drawn
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    again = list(Batches(tokens, 8, 4, seed=3).epoch(0))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert not torch.equal(data.order(0), data.order(1))
    assert not torch.equal(data.order(0), Batches(tokens, 8, 4, seed=4).order(0))
    # Resuming at batch k yields exactly the tail of the epoch.
    tail = list(data.epoch(0, start=5))
    assert [b[0] for b in tail] == list(range(5, data.steps_per_epoch))
    for a, b in zip(first[5:], tail, strict=True):
        assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    # Targets are inputs shifted by one token.
    _, inputs, targets = first[0]
    assert inputs.shape == targets.shape == (4, 8)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert torch.equal(targets - inputs, torch.ones_like(inputs))


def test_data_limits() -> None:
    tokens = torch.arange(100)
    assert Batches(tokens, 8, 2, max_steps=3).steps_per_epoch == 3
    with pytest.raises(ValueError, match="not one batch"):
        Batches(tokens, 50, 2)
    with pytest.raises(ValueError, match="outside"):
        list(Batches(tokens, 8, 2).epoch(0, start=100))
    train, val = split_tokens(tokens, val_fraction=0.1)
    assert len(train) == 90 and torch.equal(val, tokens[90:])


# ------------------------------------------------------------------ command line


def test_cli_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "aptckpt.apt", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    for flag in (
        "--epochs",
        "--batch-size",
        "--learning-rate",
        "--checkpoint-dir",
        "--resume-from",
        "--temp-checkpoint-freq",
        "--backend",
        "--d-model",
        "--n-layer",
        "--n-head",
        "--context",
        "--seed",
        "--max-steps-per-epoch",
        "--save-path",
    ):
        assert flag in out


def test_cli_ctrl_c_says_how_to_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from aptckpt.apt import __main__ as cli

    def interrupted(*args: object, **kwargs: object) -> TrainResult:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "train_model", interrupted)
    before = torch.get_num_threads()
    try:
        code = cli.main(["--checkpoint-dir", str(tmp_path / "run")])
    finally:
        torch.set_num_threads(before)
    err = capsys.readouterr().err
    assert code == 130 and "--resume-from auto" in err and str(tmp_path / "run") in err
    assert "Traceback" not in err


# ------------------------------------------------------------------ train_model


def test_synchronous_and_asynchronous_runs_are_bit_identical(tmp_path: Path) -> None:
    sync = tiny_run(tmp_path / "sync", async_checkpoints=False)
    async_ = tiny_run(tmp_path / "async")
    assert_state_equal(
        aptckpt.load(sync.checkpoints[-1])["model"], aptckpt.load(async_.checkpoints[-1])["model"]
    )
    assert sync.losses == async_.losses
    assert [Path(p).name for p in sync.temp_checkpoints] == [
        Path(p).name for p in async_.temp_checkpoints
    ]


def test_asynchronous_reports_keep_lines_whole_and_come_before_the_summary(
    tmp_path: Path,
) -> None:
    written: list[str] = []

    def log(line: str) -> None:  # print(): the line, then its newline, in two writes
        written.append(line)
        time.sleep(0.005)  # a window in which an unserialised thread's line gets in
        written.append("\n")

    tiny_run(tmp_path / "run", log=log, async_checkpoints=True)
    lines = "".join(written).splitlines()
    starts = ("training APT", "  temp checkpoint", "epoch ", "blocked on checkpoints")
    assert all(line.startswith(starts) for line in lines), lines
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["1/2:", "2/2:"]
    assert lines[-1].startswith("blocked on checkpoints")


def test_train_model_tiny_run(tmp_path: Path) -> None:
    lines: list[str] = []
    result = tiny_run(tmp_path / "run", log=lines.append)
    assert result.global_step == 8 and len(result.losses) == 8
    assert all(np.isfinite(result.losses))
    assert len(result.epoch_losses) == 2 and len(result.checkpoints) == 2
    assert [Path(p).name for p in result.temp_checkpoints] == [
        "apt_model_epoch0_step3",
        "apt_model_epoch1_step6",
    ]
    assert result.resumed_from is None
    assert result.checkpoint_seconds > 0 and result.train_seconds > 0
    assert result.bytes_written > 0
    run = tmp_path / "run"
    assert (run / "metadata.json").is_file()
    assert CharTokenizer.load(run / "tokenizer") == result.tokenizer
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "apt_model_epoch0_step4",
        "apt_model_epoch1_step8",
    ]
    # Temporaries are gone once a later regular checkpoint committed.
    assert not any((run / "temp").iterdir())
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert len(epoch_lines) == 2
    assert "checkpoint " in epoch_lines[0] and "written" in epoch_lines[0]
    assert "committed" in epoch_lines[0]  # asynchronous by default: reported once committed
    (blocked,) = [line for line in lines if line.startswith("blocked on checkpoints")]
    assert "asynchronous saves" in blocked
    assert 0 < result.blocked_fraction < 1 and result.wall_seconds >= result.train_seconds
    state = aptckpt.load(result.checkpoints[-1])
    assert state["global_step"] == 8 and state["batch_index"] is None
    assert state["config"]["model"] == TINY.to_dict()
    assert state["config"]["training"]["batch_size"] == 4
    assert state["tokenizer"] == result.tokenizer.files()
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    assert_state_equal(result.model.state_dict(), state["model"])
    # The loop logs every step's loss and the validation loss into the run's history.
    history = CheckpointManager(run, read_only=True).history()
    steps, losses = history.series("train_loss")
    assert steps == list(range(1, 9)) and losses == pytest.approx(result.losses)
    assert history.series("val_loss")[0] == [4, 8]
    assert [e.step for e in history.saves] == [3, 4, 6, 8]  # temporaries included
    assert all(0 <= e.blocked_s <= e.save_s for e in history.saves)
    assert sum(e.bytes_written for e in history.saves) == result.bytes_written


def test_save_path_is_deprecated_but_works(tmp_path: Path) -> None:
    with pytest.warns(DeprecationWarning, match="checkpoint_dir"):
        result = tiny_run(None, save_path=tmp_path / "old", epochs=1, checkpoint_dir="./outputs")
    assert Path(result.checkpoints[0]).parent == (tmp_path / "old" / "checkpoints").absolute()
    with (
        pytest.warns(DeprecationWarning, match="save_path"),
        pytest.raises(ValueError, match="not both"),
    ):
        tiny_run(tmp_path / "new", save_path=tmp_path / "old")


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="epochs"):
        tiny_run(tmp_path, epochs=0)
    with pytest.raises(ValueError, match="temp_checkpoint_freq"):
        tiny_run(tmp_path, temp_checkpoint_freq=-1)
    with pytest.raises(aptckpt.UnknownBackendError, match="'zstd2'"):
        tiny_run(tmp_path, backend="zstd2")
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        tiny_run(tmp_path, model_config=APTConfig(vocab_size=3, d_model=8, n_head=2))


def test_resume_options_when_there_is_no_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(aptckpt.CheckpointNotFoundError):
        tiny_run(tmp_path / "empty", resume_from="latest")
    lines: list[str] = []
    result = tiny_run(tmp_path / "empty", resume_from="auto", epochs=1, log=lines.append)
    assert result.resumed_from is None
    assert "starting a fresh run" in lines[0]


def test_resume_refuses_other_settings(tmp_path: Path) -> None:
    tiny_run(tmp_path / "run", epochs=1)
    with pytest.raises(ValueError, match=r"batch_size 4 != 2.*learning_rate"):
        tiny_run(tmp_path / "run", resume_from="auto", batch_size=2, learning_rate=1e-3)
    with pytest.raises(ValueError, match="the corpus differs"):
        tiny_run(tmp_path / "run", resume_from="auto", corpus=default_corpus(seed=9))


def test_resume_with_another_thread_count_says_so(tmp_path: Path) -> None:
    tiny_run(tmp_path / "run", epochs=1)
    torch.set_num_threads(2)
    lines: list[str] = []
    tiny_run(tmp_path / "run", epochs=1, resume_from="auto", log=lines.append)
    assert "written with 1 torch threads, this process uses 2" in "\n".join(lines)


def test_load_model_from_a_moved_run_and_standalone_checkpoints(tmp_path: Path) -> None:
    result = tiny_run(tmp_path / "run", backend="delta")
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(tmp_path / "run", moved)
    shutil.rmtree(tmp_path / "run")
    rng_before = torch.get_rng_state()

    model, tokenizer, config = load_model(moved)  # a run directory: its best checkpoint
    assert torch.equal(torch.get_rng_state(), rng_before)  # loading drew no random numbers
    assert config == TINY and tokenizer == result.tokenizer
    assert not model.training
    assert next(model.parameters()).device.type == "cpu"
    assert model.head.weight is model.tok_emb.weight
    best = CheckpointManager(moved).best()
    assert best is not None
    assert_state_equal(model.state_dict(), aptckpt.load(best.path)["model"])

    final = moved / "checkpoints" / Path(result.checkpoints[-1]).name
    # A state_dict() holds tied weights as two views of one memory, a loaded
    # checkpoint as one tensor: the state_dict() goes first in assert_state_equal.
    expected = aptckpt.load(final)["model"]
    assert_state_equal(result.model.state_dict(), expected)
    assert_state_equal(load_model(final)[0].state_dict(), expected)
    for backend in ("zstd", "torch"):
        shipped = tmp_path / f"shipped-{backend}"
        aptckpt.convert(final, shipped, backend=backend)
        model, tokenizer, config = load_model(shipped)
        assert_state_equal(model.state_dict(), expected)
        assert tokenizer == result.tokenizer and config == TINY
        text = tokenizer.decode(model.generate(torch.tensor([tokenizer.encode("The")]), 8)[0])
        assert text.startswith("The") and len(text) == 11


def test_load_model_errors(tmp_path: Path) -> None:
    with pytest.raises(aptckpt.CheckpointNotFoundError, match="neither a checkpoint"):
        load_model(tmp_path)
    aptckpt.save({"weights": torch.zeros(2)}, tmp_path / "plain")
    with pytest.raises(aptckpt.FormatError, match="no model config"):
        load_model(tmp_path / "plain")

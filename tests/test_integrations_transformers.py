"""aptckpt.integrations.transformers: HF Trainer checkpoints through aptckpt.

A tiny GPT-2 (random weights from a small config, dropout on, tied lm_head/wte)
and a tokenizer built offline; nothing is downloaded. The kill test trains in a
subprocess that SIGKILLs itself once checkpoint-6 committed, resumes here with
``resume_from_checkpoint=True``, and compares with an uninterrupted run.

Run as a script (``python this_file.py train-and-die OUTPUT_DIR``) it is that subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

# Above the API: the reads and hashes it uses are covered in both runs elsewhere.
pytestmark = pytest.mark.core_independent

import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import aptckpt  # noqa: E402
from aptckpt.integrations import transformers as hf  # noqa: E402
from aptckpt.testing import assert_state_equal  # noqa: E402

VOCAB = 101
SEQ = 16
KILL_AFTER = 6  # 4 steps an epoch, 2 epochs: checkpoint-6 is mid-epoch 2


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[UNK]": 1} | {f"w{i}": i + 2 for i in range(VOCAB - 2)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def model() -> GPT2LMHeadModel:
    torch.manual_seed(1234)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=SEQ,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config)


def dataset(n: int = 16, seed: int = 7) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(2, VOCAB, (n, SEQ), generator=gen)
    return [
        {"input_ids": r, "labels": r.clone(), "attention_mask": torch.ones(SEQ, dtype=torch.long)}
        for r in rows
    ]


def arguments(output_dir: Path | str, **overrides: Any) -> TrainingArguments:
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 4,
        "num_train_epochs": 2,
        "learning_rate": 1e-3,
        "warmup_steps": 2,
        "save_strategy": "steps",
        "save_steps": 2,
        "save_total_limit": 2,
        "logging_steps": 1,
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def trainer(output_dir: Path | str, cls: type[Trainer] = hf.AptckptTrainer, **kw: Any) -> Trainer:
    extra = {
        k: kw.pop(k)
        for k in list(kw)
        if k.startswith("aptckpt_") or k in ("callbacks", "eval_dataset", "compute_metrics")
    }
    return cls(
        model=model(),
        args=arguments(output_dir, **kw),
        train_dataset=dataset(),
        processing_class=tokenizer(),
        **extra,
    )


class _DieAfter(TrainerCallback):
    """SIGKILL this process at the start of the step after checkpoint ``step`` committed."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _states(t: Trainer) -> dict[str, Any]:
    return {
        "model": t.model.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.lr_scheduler.state_dict(),
        "rng": torch.get_rng_state(),
    }


def _checkpoints(output_dir: Path) -> list[str]:
    return sorted(
        (p.name for p in output_dir.glob("checkpoint-*")), key=lambda n: int(n.split("-")[1])
    )


def _no_pickles(root: Path) -> None:
    """No file HF would write with torch.save or pickle (aptckpt's own shards aside)."""
    found = [
        p
        for p in root.rglob("*")
        if p.is_file()
        and "aptckpt" not in p.relative_to(root).parts[:-1]
        and p.suffix in (".bin", ".pt", ".pth", ".pkl", ".safetensors")
    ]
    assert found == []


# ----------------------------------------------------------------- kill + resume


@pytest.fixture(scope="module")
def uninterrupted(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, Any], list[Any]]:
    out = tmp_path_factory.mktemp("straight")
    t = trainer(out)
    t.train()
    losses = [(e["step"], e["loss"]) for e in t.state.log_history if "loss" in e]
    return out, _states(t), losses


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path: Path, uninterrupted: Any) -> None:
    straight_dir, straight, straight_losses = uninterrupted
    out = tmp_path / "run"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(aptckpt.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    }
    proc = subprocess.run(
        [sys.executable, __file__, "train-and-die", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert _checkpoints(out) == [f"checkpoint-{KILL_AFTER - 2}", f"checkpoint-{KILL_AFTER}"]
    assert hf.last_checkpoint(out) == str(out / f"checkpoint-{KILL_AFTER}")

    resumed = trainer(out)
    resumed.train(resume_from_checkpoint=True)

    assert_state_equal(_states(resumed), straight)
    # tied weights stay tied through save and load
    m = resumed.model
    assert m.lm_head.weight is m.transformer.wte.weight
    # the resumed run logged the same losses for the steps it trained
    losses = [(e["step"], e["loss"]) for e in resumed.state.log_history if "loss" in e]
    assert losses == straight_losses
    assert _checkpoints(out) == ["checkpoint-6", "checkpoint-8"] == _checkpoints(straight_dir)
    _no_pickles(out)


def test_the_comparison_is_sensitive_to_the_rng(
    tmp_path: Path, uninterrupted: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control: the same resume without restoring the RNG states ends elsewhere (dropout
    draws differ), so the equality above is not a foregone conclusion."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted[0], out)
    monkeypatch.setattr(hf, "restore_rng", lambda state: None)
    resumed = trainer(out)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-6"))
    final, straight = resumed.model.state_dict(), uninterrupted[1]["model"]
    assert not torch.equal(final["transformer.wte.weight"], straight["transformer.wte.weight"])


def test_checkpoint_layout_is_what_hf_tools_read(uninterrupted: Any) -> None:
    out = uninterrupted[0]
    ckpt = out / "checkpoint-8"
    assert hf.checkpoint_kind(ckpt) == "aptckpt"
    # config, generation config and tokenizer load with HF's Auto classes
    config = AutoConfig.from_pretrained(ckpt)
    assert config.model_type == "gpt2" and config.n_embd == 32
    assert config.architectures == ["GPT2LMHeadModel"]
    assert (ckpt / "generation_config.json").is_file()
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok("w3 w4 w5")["input_ids"] == [5, 6, 7]
    # trainer_state.json is HF's, and says where the run stood
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 8 and state["max_steps"] == 8
    args = json.loads((ckpt / "training_args.json").read_text())
    assert args["save_total_limit"] == 2 and args["seed"] == 0
    assert not (ckpt / "training_args.bin").exists()
    # the aptckpt checkpoint holds everything, tied weights stored once
    saved = aptckpt.load(ckpt / "aptckpt")
    assert set(saved) == {"model", "optimizer", "scheduler", "scaler", "rng"}
    assert saved["model"]["lm_head.weight"] is saved["model"]["transformer.wte.weight"]
    info = aptckpt.inspect(ckpt / "aptckpt")
    assert info.metadata["global_step"] == 8
    _no_pickles(out)


def test_export_pretrained_gives_a_from_pretrained_directory(
    tmp_path: Path, uninterrupted: Any
) -> None:
    ckpt = uninterrupted[0] / "checkpoint-8"
    target = hf.export_pretrained(ckpt, tmp_path / "export")
    loaded = GPT2LMHeadModel.from_pretrained(target)
    with aptckpt.open(ckpt / "aptckpt") as view:
        assert_state_equal(loaded.state_dict(), view.get("model"))
    assert AutoTokenizer.from_pretrained(target)("w3")["input_ids"] == [5]
    assert not (Path(target) / "trainer_state.json").exists()


def test_save_model_exports_without_pickles(tmp_path: Path, uninterrupted: Any) -> None:
    t = trainer(tmp_path / "run")
    t.save_model(str(tmp_path / "final"))
    final = tmp_path / "final"
    assert (final / "model.safetensors").is_file() and (final / "training_args.json").is_file()
    assert not (final / "training_args.bin").exists()
    loaded = GPT2LMHeadModel.from_pretrained(final)
    assert_state_equal(loaded.state_dict(), t.model.state_dict())


# ----------------------------------------------------------------- incomplete, damaged, foreign


def test_interrupted_save_is_skipped_refused_and_cleaned_up(
    tmp_path: Path, uninterrupted: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight_dir, straight, _ = uninterrupted
    out = tmp_path / "run"
    shutil.copytree(straight_dir, out)
    shutil.rmtree(out / "checkpoint-8")

    # the save of step 8 dies after HF's side files, before the aptckpt commit
    def dies(*args: Any, **kwargs: Any) -> Any:
        raise aptckpt.WriteError("disk gone")

    monkeypatch.setattr(aptckpt, "save", dies)
    with pytest.raises(aptckpt.WriteError):
        trainer(out).train(resume_from_checkpoint=str(out / "checkpoint-6"))
    monkeypatch.undo()
    partial = out / "checkpoint-8"
    assert (partial / "trainer_state.json").is_file() and (partial / "config.json").is_file()
    assert hf.checkpoint_kind(partial) is None
    assert hf.last_checkpoint(out) == str(out / "checkpoint-6")
    with pytest.raises(aptckpt.CheckpointNotFoundError, match="checkpoint-8") as err:
        trainer(out).train(resume_from_checkpoint=str(partial))
    assert "interrupted" in str(err.value)
    # a newer one, left by an older kill: HF's rotation alone would keep it and
    # delete complete checkpoints
    shutil.copytree(partial, out / "checkpoint-10")

    resumed = trainer(out, save_total_limit=1)
    resumed.train(resume_from_checkpoint=True)  # from checkpoint-6, the newest complete
    assert_state_equal(_states(resumed), straight)
    assert _checkpoints(out) == ["checkpoint-8"]
    assert hf.checkpoint_kind(out / "checkpoint-8") == "aptckpt"
    with pytest.raises(aptckpt.CheckpointNotFoundError, match="empty"):
        trainer(tmp_path / "empty").train(resume_from_checkpoint=True)


def test_directories_that_are_no_checkpoint_are_refused_naming_why(tmp_path: Path) -> None:
    t = trainer(tmp_path / "run")
    stateless = tmp_path / "run" / "checkpoint-2"
    stateless.mkdir(parents=True)
    (stateless / "model.safetensors").write_bytes(b"")
    with pytest.raises(aptckpt.CheckpointNotFoundError, match=r"no trainer_state\.json"):
        t.train(resume_from_checkpoint=str(stateless))
    (stateless / "model.safetensors").unlink()
    (stateless / "trainer_state.json").write_text("{}")
    with pytest.raises(aptckpt.CheckpointNotFoundError, match="neither an aptckpt checkpoint"):
        t.train(resume_from_checkpoint=str(stateless))
    with pytest.raises(aptckpt.CheckpointNotFoundError, match="no such directory"):
        t.train(resume_from_checkpoint=str(tmp_path / "absent"))


def test_damaged_checkpoint_raises_integrity_error_naming_it(
    tmp_path: Path, uninterrupted: Any
) -> None:
    out = tmp_path / "run"
    shutil.copytree(uninterrupted[0], out)
    state_dir = out / "checkpoint-8" / "aptckpt"
    data = max(
        (p for p in state_dir.rglob("*") if p.is_file() and p.name != "manifest.msgpack"),
        key=lambda p: p.stat().st_size,
    )
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(aptckpt.IntegrityError, match="checkpoint-8"):
        trainer(out, num_train_epochs=3).train(resume_from_checkpoint=True)


def test_altered_trainer_state_is_refused(tmp_path: Path, uninterrupted: Any) -> None:
    out = tmp_path / "run"
    shutil.copytree(uninterrupted[0], out)
    state_file = out / "checkpoint-8" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["global_step"] = 7
    state_file.write_text(json.dumps(state))
    with pytest.raises(aptckpt.FormatError, match="step 7"):
        trainer(out, num_train_epochs=3).train(resume_from_checkpoint=True)


def test_hf_checkpoint_resumes_through_hf_loaders(tmp_path: Path, uninterrupted: Any) -> None:
    """A run the plain Trainer began switches to aptckpt and ends where it would have."""
    out = tmp_path / "run"
    trainer(out, cls=Trainer, callbacks=[_Stop(KILL_AFTER)]).train()
    assert hf.checkpoint_kind(out / f"checkpoint-{KILL_AFTER}") == "hf"
    resumed = trainer(out)
    resumed.train(resume_from_checkpoint=True)
    assert_state_equal(_states(resumed), uninterrupted[1])
    assert hf.checkpoint_kind(out / "checkpoint-8") == "aptckpt"


class _Stop(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


# ----------------------------------------------------------------- best model, retention, delta


def test_best_model_is_kept_and_loaded_at_end_with_delta(tmp_path: Path) -> None:
    scores = iter([1.0, 3.0, 2.0, 0.0])  # the eval at step 4 is the best

    def compute_metrics(_: Any) -> dict[str, float]:
        return {"score": next(scores)}

    out = tmp_path / "run"
    t = trainer(
        out,
        eval_strategy="steps",
        eval_steps=2,
        metric_for_best_model="score",
        greater_is_better=True,
        load_best_model_at_end=True,
        eval_dataset=dataset(4, seed=9),
        compute_metrics=compute_metrics,
        aptckpt_backend="delta",
    )
    t.train()
    assert t.state.best_model_checkpoint == str(out / "checkpoint-4")
    # save_total_limit=2: the newest and the best remain
    assert _checkpoints(out) == ["checkpoint-4", "checkpoint-8"]
    best = aptckpt.load(out / "checkpoint-4" / "aptckpt")["model"]
    last = aptckpt.load(out / "checkpoint-8" / "aptckpt")["model"]
    assert_state_equal(t.model.state_dict(), best)
    assert not torch.equal(best["transformer.wte.weight"], last["transformer.wte.weight"])
    assert aptckpt.inspect(out / "checkpoint-8" / "aptckpt").backend == "delta"
    # the store is shared and holds only what live checkpoints reach
    assert (out / "aptckpt-store").is_dir()
    assert aptckpt.collect_garbage(out / "aptckpt-store", dry_run=True).removed_objects == 0
    _no_pickles(out)


# ----------------------------------------------------------------- refusals


def test_incompatible_transformers_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hf.transformers, "__version__", "4.40.0")
    with pytest.raises(aptckpt.IntegrationError, match=r"4\.40\.0.*transformers>=5"):
        trainer(tmp_path)
    monkeypatch.undo()
    monkeypatch.delattr(Trainer, "_load_scaler")
    with pytest.raises(aptckpt.IntegrationError, match="_load_scaler is gone"):
        trainer(tmp_path)


def test_unknown_backend_and_many_processes_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(aptckpt.UnknownBackendError, match="zstd2"):
        trainer(tmp_path, aptckpt_backend="zstd2")
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    with pytest.raises(aptckpt.IntegrationError, match="2 processes"):
        trainer(tmp_path)


if __name__ == "__main__":
    mode, where = sys.argv[1], sys.argv[2]
    assert mode == "train-and-die"
    trainer(where, callbacks=[_DieAfter(KILL_AFTER)]).train()
    sys.exit(3)  # not reached: the callback kills the process

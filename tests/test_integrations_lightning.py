"""The Lightning CheckpointIO plugin with a real ``lightning.Trainer`` on a tiny model (CPU):
top-k and last through the plugin, SIGKILL and resume from "last" bit for bit, the
hyper-parameter objects a checkpoint carries, refusals, the async variant, delta, s3,
damage."""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import pathlib
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

L = pytest.importorskip("lightning")

from lightning.fabric.utilities.data import AttributeDict  # noqa: E402

import aptckpt  # noqa: E402
from aptckpt.errors import (  # noqa: E402
    CheckpointNotFoundError,
    IntegrityError,
    UnsupportedObjectError,
    UnsupportedPathError,
)
from aptckpt.integrations import _lightning_values as values  # noqa: E402
from aptckpt.integrations.lightning import (  # noqa: E402
    AptckptAsyncCheckpointIO,
    AptckptCheckpointIO,
    find_last_checkpoint,
    load_from_checkpoint,
)
from aptckpt.testing import assert_state_equal  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_determinism() -> Any:
    """Trainer(deterministic=True) turns torch's deterministic algorithms on for the whole
    process; later tests then fail in torch.empty of dtypes it cannot fill (float4)."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


pytestmark = [
    pytest.mark.core_independent,
    # Lightning's own chatter on a CPU-only tiny run, none of it about the plugin
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*"),
    pytest.mark.filterwarnings("ignore:.*exists and is not empty:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*number of training batches.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*`weights_only` was not set.*"),
]

# The model and its run live in one script: the kill test runs it as a process, the
# other tests import it. The data loader shuffles, and the model keeps torch's RNG in
# its checkpoint (on_save_checkpoint), so a resumed run draws the same batches.
RUN = """
import os, signal, sys
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

class Tiny(L.LightningModule):
    def __init__(self, lr=0.05, width=8, extra=None):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 1))

    def training_step(self, batch, index):
        if os.environ.get("KILL_AT") == f"{self.current_epoch}:{index}":
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, index):
        x, y = batch
        # a score that is not monotone, so that top-k keeps and drops different epochs
        wobble = 0.05 * ((self.current_epoch * 7) % 3)
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y) + wobble)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.7)}

    def on_save_checkpoint(self, checkpoint):
        checkpoint["rng"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint):
        torch.set_rng_state(checkpoint["rng"])


def loaders():
    g = torch.Generator().manual_seed(1234)
    x, y = torch.randn(48, 4, generator=g), torch.randn(48, 1, generator=g)
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, batch_size=16)


#: ModelCheckpoint saving every epoch (the newest only) and last.ckpt each time
EVERY_EPOCH = {"monitor": None, "save_top_k": 1}


def trainer(epochs, plugin, **checkpoint):
    checkpoint.setdefault("monitor", "val_loss")
    checkpoint.setdefault("save_top_k", 2)
    checkpoint.setdefault("save_last", True)
    return L.Trainer(
        max_epochs=epochs, logger=False, enable_progress_bar=False,
        enable_model_summary=False, deterministic=True, num_sanity_val_steps=0,
        callbacks=[ModelCheckpoint(**checkpoint)], plugins=[plugin],
    )


def logged_plugin(log, **kwargs):
    # The plugin, appending "rank op path" lines to log (for runs in several processes).
    from aptckpt.integrations.lightning import AptckptCheckpointIO

    class Logged(AptckptCheckpointIO):
        def _note(self, op, path):
            rank = os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))
            with open(log, "a") as f:
                f.write(f"{rank} {op} {os.path.basename(os.fspath(path))}\\n")

        def save_checkpoint(self, checkpoint, path, storage_options=None):
            self._note("save", path)
            super().save_checkpoint(checkpoint, path, storage_options)

        def remove_checkpoint(self, path):
            self._note("remove", path)
            super().remove_checkpoint(path)

        def load_checkpoint(self, path, map_location=None, weights_only=None):
            self._note("load", path)
            return super().load_checkpoint(path, map_location, weights_only)

    return Logged(**kwargs)


def ddp(dirpath, log):
    # two fits in the same two processes: 2 epochs, then on to 3 from "last"
    for epochs, resume in ((2, None), (3, "last")):
        L.seed_everything(0, verbose=False)
        train, val = loaders()
        t = L.Trainer(
            max_epochs=epochs, logger=False, enable_progress_bar=False,
            enable_model_summary=False, accelerator="cpu", devices=2, strategy="ddp",
            num_sanity_val_steps=0,
            callbacks=[ModelCheckpoint(dirpath=dirpath, save_last=True, **EVERY_EPOCH)],
            plugins=[logged_plugin(log, backend="delta")],
        )
        t.fit(Tiny(), train, val, ckpt_path=resume)
    if t.is_global_zero:
        torch.save(t.lightning_module.state_dict(), os.path.join(dirpath, "..", "final.pt"))


if __name__ == "__main__" and sys.argv[1] == "ddp":
    ddp(sys.argv[2], sys.argv[3])
elif __name__ == "__main__":
    from aptckpt.integrations.lightning import AptckptCheckpointIO
    dirpath, epochs = sys.argv[1], int(sys.argv[2])
    L.seed_everything(0, verbose=False)
    train, val = loaders()
    trainer(epochs, AptckptCheckpointIO(), **EVERY_EPOCH, dirpath=dirpath).fit(Tiny(), train, val)
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """The script above, imported (and its path, ``run.__file__``, for processes)."""
    path = tmp_path_factory.mktemp("lightning") / "tiny_run.py"
    path.write_text(RUN)
    spec = importlib.util.spec_from_file_location("tiny_run", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["tiny_run"] = module  # Lightning inspects the module of the model's class
    spec.loader.exec_module(module)
    return module


class Spy(AptckptCheckpointIO):
    """The plugin, recording what Lightning asks of it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, str]] = []

    def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        self.calls.append(("save", os.fspath(path)))
        super().save_checkpoint(checkpoint, path, storage_options)

    def remove_checkpoint(self, path: Any) -> None:
        self.calls.append(("remove", os.fspath(path)))
        super().remove_checkpoint(path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None) -> Any:
        self.calls.append(("load", os.fspath(path)))
        return super().load_checkpoint(path, map_location, weights_only)


def _fit(run: ModuleType, epochs: int, plugin: Any, model: Any = None, **kw: Any) -> Any:
    L.seed_everything(0, verbose=False)
    model = model if model is not None else run.Tiny()
    ckpt_path = kw.pop("ckpt_path", None)
    trainer = run.trainer(epochs, plugin, **kw)
    trainer.fit(model, *run.loaders(), ckpt_path=ckpt_path)
    return trainer


def _checkpoints(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.endswith(".ckpt")}


# ------------------------------------------------------------------ top-k and last


def test_top_k_and_last_are_aptckpt_checkpoints_and_removals_go_through_the_plugin(
    run: ModuleType, tmp_path: Path
) -> None:
    plugin = Spy()
    trainer = _fit(run, 6, plugin, dirpath=tmp_path)
    callback = trainer.checkpoint_callback
    kept = {Path(p).name for p in callback.best_k_models}
    assert len(kept) == 2
    assert _checkpoints(tmp_path) == kept | {"last.ckpt"}
    saved = [p for op, p in plugin.calls if op == "save"]
    removed = [p for op, p in plugin.calls if op == "remove"]
    assert removed, "top-k never dropped a checkpoint: the scores did not vary"
    assert set(removed) == {p for p in saved if Path(p).name not in kept | {"last.ckpt"}}
    for name in kept:
        info = aptckpt.inspect(tmp_path / name)  # a committed aptckpt checkpoint
        assert info.backend == "zstd"
        assert f"step={info.metadata['global_step']}.ckpt" in name
        assert info.metadata["lightning"] == L.__version__
    # last.ckpt was saved again, over the previous one, in place
    assert sum(Path(p).name == "last.ckpt" for p in saved) > 1
    # Lightning saves last.ckpt after each top-k save: it holds the newest one's state
    newest = [p for p in saved if Path(p).name != "last.ckpt"][-1]
    loaded = plugin.load_checkpoint(tmp_path / "last.ckpt")
    assert f"epoch={loaded['epoch']}-" in newest
    assert_state_equal(loaded["state_dict"], plugin.load_checkpoint(newest)["state_dict"])
    state = loaded["callbacks"][callback.state_key]
    assert torch.equal(state["best_model_score"], callback.best_model_score)
    assert state["best_model_path"] == callback.best_model_path
    assert loaded["hyper_parameters"] == {"lr": 0.05, "width": 8, "extra": None}
    assert find_last_checkpoint(tmp_path) == str(tmp_path / "last.ckpt")
    assert find_last_checkpoint(tmp_path / "absent") is None
    assert "aptckpt:lightning" not in loaded


# ------------------------------------------------------------------ kill and resume


def _training_state(trainer: Any) -> dict[str, Any]:
    return {
        "model": trainer.lightning_module.state_dict(),
        "optimizer": trainer.optimizers[0].state_dict(),
        "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        "step": trainer.global_step,
    }


def test_sigkill_mid_epoch_then_resume_from_last_equals_an_uninterrupted_fit(
    run: ModuleType, tmp_path: Path
) -> None:
    epochs, kill_epoch = 4, 2
    dirpath = tmp_path / "killed"
    env = {**os.environ, "KILL_AT": f"{kill_epoch}:3", "PYTHONWARNINGS": "ignore"}
    src = str(Path(aptckpt.__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, run.__file__, str(dirpath), str(epochs)],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    # the checkpoint of the epoch before the kill is committed and is the last one
    with aptckpt.open(dirpath / "last.ckpt") as view:
        assert view.get("epoch") == kill_epoch - 1

    plugin = Spy()
    resumed = _fit(run, epochs, plugin, **run.EVERY_EPOCH, dirpath=dirpath, ckpt_path="last")
    assert ("load", str(dirpath / "last.ckpt")) in plugin.calls
    assert (
        "remove",
        str(dirpath / f"epoch={kill_epoch - 1}-step={kill_epoch * 6}.ckpt"),
    ) in plugin.calls
    reference = _fit(run, epochs, AptckptCheckpointIO(), **run.EVERY_EPOCH, dirpath=tmp_path / "b")
    got, want = _training_state(resumed), _training_state(reference)
    assert got["step"] == want["step"] == epochs * 6
    assert_state_equal(got, want)  # bit for bit: weights, Adam moments and steps, the LR


@pytest.mark.slow
def test_ddp_saves_and_removes_on_rank_zero_and_every_rank_loads(
    run: ModuleType, tmp_path: Path
) -> None:
    """Two CPU processes (gloo), Lightning's "ddp" strategy launching them: the plugin is
    asked to save and remove on global rank 0 only, and to load on both ranks."""
    dirpath, log = tmp_path / "ckpts", tmp_path / "calls.log"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    src = str(Path(aptckpt.__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, run.__file__, "ddp", str(dirpath), str(log)],
        env=env,
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    calls = [line.split(" ", 2) for line in log.read_text().splitlines()]
    assert {rank for rank, op, _ in calls if op in ("save", "remove")} == {"0"}
    assert any(op == "remove" for _, op, _ in calls)
    assert sorted(rank for rank, op, _ in calls if op == "load") == ["0", "1"]
    assert _checkpoints(dirpath) == {"epoch=2-step=9.ckpt", "last.ckpt"}
    # rank 0's final weights are what the last checkpoint holds
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    assert_state_equal(
        AptckptCheckpointIO().load_checkpoint(dirpath / "last.ckpt")["state_dict"], final
    )


# ------------------------------------------------------------------ hyper-parameters


class Namespaced(L.LightningModule):
    """A module whose hyper-parameters hold every container the plugin converts."""

    def __init__(self, config: Any, paths: Any, nested: Any) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(2, 2)


def _hparams() -> dict[str, Any]:
    return {
        "config": argparse.Namespace(depth=3, name="tiny", sub=AttributeDict(a=1)),
        "paths": (pathlib.Path("data/train"), pathlib.PurePosixPath("/srv/x")),
        "nested": collections.OrderedDict(
            [("z", AttributeDict(k=[pathlib.PureWindowsPath("C:/a"), 1.5])), ("a", {3: "int key"})]
        ),
    }


def _assert_same_objects(got: Any, want: Any) -> None:
    assert type(got) is type(want)
    if isinstance(want, argparse.Namespace):
        _assert_same_objects(vars(got), vars(want))
    elif isinstance(want, dict):
        assert list(got) == list(want)
        for key in want:
            _assert_same_objects(got[key], want[key])
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            _assert_same_objects(a, b)
    else:
        assert got == want


def test_values_convert_the_known_objects_and_rebuild_them_exactly(tmp_path: Path) -> None:
    checkpoint = {
        "state_dict": {"w": torch.ones(2)},
        "hyper_parameters": _hparams(),
        "hparams_type": AttributeDict,
        "datamodule_hparams_type": argparse.Namespace,
        "plain": [1, (2.0, "x"), {"k": None}],
    }
    before = repr(checkpoint)
    stored = values.encode(checkpoint)
    assert repr(checkpoint) == before  # the caller's dict is untouched
    assert stored["plain"] is checkpoint["plain"]  # nothing to convert: not copied
    assert stored["hparams_type"] == "lightning.fabric.utilities.data.AttributeDict"
    aptckpt.save(stored, tmp_path / "v")  # plain data now: aptckpt stores it as it is
    back = values.decode(aptckpt.load(tmp_path / "v"))
    _assert_same_objects(back["hyper_parameters"], checkpoint["hyper_parameters"])
    assert back["hparams_type"] is AttributeDict
    assert back["datamodule_hparams_type"] is argparse.Namespace
    assert "aptckpt:lightning" not in back


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ({"version": 1, "types": [[["t"], "type"]]}, "never writes"),  # t = "os.system"
        ({"version": 1, "types": [[["x"], "pickle"]]}, "unknown kind"),
        ({"version": 1, "types": [[["nope"], "Path"]]}, "absent"),
        ({"version": 1, "types": [[["x", 5], "Path"]]}, "inside"),
        ({"version": 1, "types": [[[], "AttributeDict"]]}, "malformed"),
        ({"version": 1, "types": [["x", "Path"]]}, "malformed"),
        ({"version": 1, "types": [[["l", 9], "Path"]]}, "absent"),
        ({"version": 1, "types": [[["x"], "AttributeDict"]]}, "recorded as a dict"),
        ({"version": 2, "types": []}, "version 1"),
        ("a string", "version 1"),
    ],
)
def test_hostile_conversion_tables_are_refused(table: Any, match: str) -> None:
    state = {"t": "os.system", "x": "text", "l": ["a"], "aptckpt:lightning": table}
    with pytest.raises(aptckpt.FormatError, match=match):
        values.decode(state)


def test_an_omegaconf_config_without_omegaconf_installed_names_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "omegaconf", None)  # import omegaconf fails
    table = {"version": 1, "types": [[["hyper_parameters"], "DictConfig"]]}
    with pytest.raises(aptckpt.IntegrationError, match="pip install omegaconf") as caught:
        values.decode({"hyper_parameters": {"lr": 1}, "aptckpt:lightning": table})
    assert caught.value.framework == "omegaconf"


def test_a_loaded_state_that_is_no_dict_is_refused() -> None:
    with pytest.raises(aptckpt.FormatError, match="not saved by Lightning"):
        values.decode([1, 2])  # type: ignore[arg-type]


def test_hyper_parameter_objects_round_trip_through_a_saved_checkpoint(
    tmp_path: Path,
) -> None:
    model = Namespaced(**_hparams())
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "hparams_name": "kwargs",
        "hparams_type": AttributeDict,
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": L.__version__,
    }
    plugin = AptckptCheckpointIO()
    plugin.save_checkpoint(checkpoint, tmp_path / "h.ckpt")
    loaded = plugin.load_checkpoint(tmp_path / "h.ckpt")
    _assert_same_objects(loaded["hyper_parameters"], checkpoint["hyper_parameters"])
    assert loaded["hparams_type"] is AttributeDict
    # and Lightning builds the module from it (its own load_from_checkpoint cannot read it)
    rebuilt = load_from_checkpoint(Namespaced, tmp_path / "h.ckpt")
    _assert_same_objects(rebuilt.hparams["config"], _hparams()["config"])
    assert_state_equal(rebuilt.state_dict(), model.state_dict())
    assert load_from_checkpoint(Namespaced, tmp_path / "h.ckpt", paths=("x",)).hparams.paths == (
        "x",
    )


def test_omegaconf_configs_round_trip_with_their_interpolations(tmp_path: Path) -> None:
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create(
        {"lr": 0.1, "opt": {"lr": "${lr}", "betas": [0.9, 0.99]}, "missing": "???"}
    )
    checkpoint = {
        "state_dict": {},
        "hyper_parameters": cfg,
        "hparams_type": type(cfg),
        "lists": omegaconf.OmegaConf.create([1, {"a": 2}]),
    }
    plugin = AptckptCheckpointIO()
    plugin.save_checkpoint(checkpoint, tmp_path / "o.ckpt")
    loaded = plugin.load_checkpoint(tmp_path / "o.ckpt")
    got = loaded["hyper_parameters"]
    assert type(got) is omegaconf.DictConfig
    assert loaded["hparams_type"] is omegaconf.DictConfig
    assert omegaconf.OmegaConf.to_container(got, resolve=False) == omegaconf.OmegaConf.to_container(
        cfg, resolve=False
    )
    assert got.opt.lr == 0.1  # the interpolation still resolves
    assert omegaconf.OmegaConf.is_missing(got, "missing")
    assert type(loaded["lists"]) is omegaconf.ListConfig


def test_objects_that_would_need_pickle_are_refused_naming_the_key_and_the_fix(
    tmp_path: Path,
) -> None:
    plugin = AptckptCheckpointIO()

    class Opaque:
        pass

    for value, key in (
        ({"activation": torch.nn.ReLU}, "activation"),  # a class that is not a known one
        ({"fn": Opaque()}, "fn"),
        ({"fn": lambda x: x}, "fn"),
    ):
        with pytest.raises(UnsupportedObjectError) as caught:
            plugin.save_checkpoint(
                {"state_dict": {}, "hyper_parameters": value}, tmp_path / "bad.ckpt"
            )
        message = str(caught.value)
        assert f"checkpoint['hyper_parameters']['{key}']" in message
        assert "save_hyperparameters(ignore=" in message and "on_save_checkpoint" in message
        assert caught.value.key_path == f"checkpoint['hyper_parameters']['{key}']"
        assert not (tmp_path / "bad.ckpt").exists()  # nothing written
    cyclic = AttributeDict(a=1)
    cyclic["self"] = cyclic
    with pytest.raises(
        UnsupportedObjectError, match=r"\['hyper_parameters'\]\['self'\]"
    ):  # no recursion
        plugin.save_checkpoint({"hyper_parameters": cyclic}, tmp_path / "bad.ckpt")
    with pytest.raises(UnsupportedObjectError, match="reserves"):
        plugin.save_checkpoint({"aptckpt:lightning": 1}, tmp_path / "bad.ckpt")


def test_fit_refuses_an_unstorable_hyper_parameter_at_its_first_checkpoint(
    run: ModuleType, tmp_path: Path
) -> None:
    # the first checkpoint of the fit fails, naming the hyper-parameter
    with pytest.raises(
        UnsupportedObjectError, match=r"checkpoint\['hyper_parameters'\]\['extra'\]"
    ):
        _fit(run, 1, AptckptCheckpointIO(), run.Tiny(extra=Path), dirpath=tmp_path / "c")
    assert not (tmp_path / "c").exists() or not _checkpoints(tmp_path / "c")


# ------------------------------------------------------------------ async


def test_async_plugin_fits_like_the_blocking_one(run: ModuleType, tmp_path: Path) -> None:
    plugin = AptckptAsyncCheckpointIO()
    trainer = _fit(run, 5, plugin, dirpath=tmp_path / "async")
    # teardown (end of fit) waited for the last save
    kept = {Path(p).name for p in trainer.checkpoint_callback.best_k_models}
    assert _checkpoints(tmp_path / "async") == kept | {"last.ckpt"}
    loaded = AptckptCheckpointIO().load_checkpoint(tmp_path / "async" / "last.ckpt")
    assert_state_equal(loaded["state_dict"], trainer.lightning_module.state_dict())
    assert loaded["epoch"] == 4


def test_async_remove_of_a_path_in_flight_waits_for_its_save(tmp_path: Path) -> None:
    plugin = AptckptAsyncCheckpointIO()
    big = {"state_dict": {"w": torch.randn(2_000_000)}, "epoch": 0}
    for i in range(3):
        path = tmp_path / f"x{i}.ckpt"
        plugin.save_checkpoint(big, path)
        plugin.remove_checkpoint(path)  # would run before the commit if it did not wait
        plugin.wait()
        assert not path.exists(), os.listdir(tmp_path)
    # a load of a path in flight also waits, and sees the new checkpoint
    plugin.save_checkpoint(big, tmp_path / "y.ckpt")
    assert torch.equal(
        plugin.load_checkpoint(tmp_path / "y.ckpt")["state_dict"]["w"], big["state_dict"]["w"]
    )
    plugin.teardown()


def test_async_failure_surfaces_at_the_next_save_and_at_teardown(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"not a folder")
    state = {"state_dict": {"w": torch.ones(3)}}
    for finish in ("save", "teardown"):
        plugin = AptckptAsyncCheckpointIO()
        plugin.save_checkpoint(state, blocker / "x.ckpt")  # fails in the background
        with pytest.raises(aptckpt.WriteError, match="in the way"):  # noqa: PT012
            if finish == "save":
                plugin.save_checkpoint(state, tmp_path / "ok.ckpt")
            else:
                plugin.teardown()
        plugin.teardown()  # raised once only
    assert not (tmp_path / "ok.ckpt").exists()


# ------------------------------------------------------------------ delta


def test_delta_checkpoints_share_a_store_and_removals_break_none(
    run: ModuleType, tmp_path: Path
) -> None:
    plugin = Spy("delta")
    trainer = _fit(run, 6, plugin, dirpath=tmp_path)
    assert any(op == "remove" for op, _ in plugin.calls)
    assert (tmp_path / "aptckpt-store").is_dir()
    kept = {Path(p).name for p in trainer.checkpoint_callback.best_k_models} | {"last.ckpt"}
    assert _checkpoints(tmp_path) == kept
    for name in kept:
        assert aptckpt.inspect(tmp_path / name).backend == "delta"
        aptckpt.verify(tmp_path / name)  # every object it reaches is there and intact
    # the removals collected what only the removed checkpoints reached
    report = aptckpt.collect_garbage(tmp_path, dry_run=True)
    assert report.removed_objects == 0 and report.checkpoints == len(kept)
    newest = [p for op, p in plugin.calls if op == "save" and not p.endswith("last.ckpt")][-1]
    loaded = plugin.load_checkpoint(tmp_path / "last.ckpt")
    assert_state_equal(loaded["state_dict"], plugin.load_checkpoint(newest)["state_dict"])


def test_bad_backend_or_options_fail_when_the_plugin_is_built() -> None:
    with pytest.raises(aptckpt.UnknownBackendError, match="available"):
        AptckptCheckpointIO("zstd2")
    with pytest.raises(aptckpt.BackendError):
        AptckptCheckpointIO("zstd", level=99)


# ------------------------------------------------------------------ links, paths, damage


def test_save_last_link_works_on_a_local_disk(run: ModuleType, tmp_path: Path) -> None:
    plugin = Spy()
    _fit(run, 3, plugin, dirpath=tmp_path, save_last="link")
    last = tmp_path / "last.ckpt"
    assert last.is_symlink() and last.resolve().parent == tmp_path.resolve()
    assert (tmp_path / os.readlink(last)).name in _checkpoints(tmp_path)
    # resume follows the link; a save to the link's name replaces the link, not its target
    target = last.resolve()
    resumed = _fit(run, 4, plugin, dirpath=tmp_path, ckpt_path="last")
    assert ("load", str(last)) in plugin.calls
    assert resumed.current_epoch == 4
    plugin.save_checkpoint({"epoch": 99}, last)
    assert not last.is_symlink() and aptckpt.load(last) == {"epoch": 99}
    assert target.exists() or target.name not in _checkpoints(tmp_path)
    os.replace(last, tmp_path / "moved")
    os.symlink(target.name, last)
    plugin.remove_checkpoint(last)  # the link goes, the checkpoint stays
    assert not last.exists() and not last.is_symlink()
    assert not target.exists() or aptckpt.inspect(target).backend == "zstd"


def test_damaged_missing_and_foreign_checkpoints_raise_naming_the_path(
    run: ModuleType, tmp_path: Path
) -> None:
    _fit(run, 2, AptckptCheckpointIO(), dirpath=tmp_path)
    last = tmp_path / "last.ckpt"
    shard = next(p for p in last.iterdir() if p.name != "manifest.msgpack")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=re.escape(str(last))):
        _fit(run, 3, AptckptCheckpointIO(), dirpath=tmp_path, ckpt_path=last)
    with pytest.raises(CheckpointNotFoundError, match=r"nope\.ckpt"):
        AptckptCheckpointIO().load_checkpoint(tmp_path / "nope.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "old.ckpt")
    with pytest.raises(CheckpointNotFoundError, match="TorchCheckpointIO"):
        AptckptCheckpointIO().load_checkpoint(tmp_path / "old.ckpt")
    # a removal of something absent is quiet, as Lightning's own
    AptckptCheckpointIO().remove_checkpoint(tmp_path / "nope.ckpt")


def test_storage_options_and_map_location_are_checked(tmp_path: Path) -> None:
    plugin = AptckptCheckpointIO()
    with pytest.raises(UnsupportedPathError):
        plugin.save_checkpoint({"a": 1}, tmp_path / "x.ckpt", storage_options={"key": "k"})
    with pytest.raises(TypeError, match="fsspec options"):
        plugin.save_checkpoint({"a": 1}, tmp_path / "x.ckpt", storage_options="s")
    # the plugin's own storage options are for URLs; local paths ignore them
    AptckptCheckpointIO(storage_options={"key": "k"}).save_checkpoint(
        {"w": torch.ones(1)}, tmp_path / "y.ckpt"
    )
    with pytest.raises(TypeError, match=r"torch\.load"):
        plugin.load_checkpoint(tmp_path / "y.ckpt", map_location=lambda storage, loc: storage)
    got = plugin.load_checkpoint(tmp_path / "y.ckpt", map_location="meta")
    assert got["w"].device.type == "meta"
    assert (
        plugin.load_checkpoint(tmp_path / "y.ckpt", map_location=lambda name: "cpu")[
            "w"
        ].device.type
        == "cpu"
    )
    assert "key" not in repr(AptckptCheckpointIO(storage_options={"key": "k"}))
    # ddp_spawn pickles the plugin into the processes it starts
    copy = pickle.loads(pickle.dumps(AptckptAsyncCheckpointIO("zstd", level=5)))
    copy.save_checkpoint({"w": torch.ones(2)}, tmp_path / "z.ckpt")
    copy.teardown()
    assert (copy.backend, copy.options, copy.blocking) == ("zstd", {"level": 5}, False)
    assert aptckpt.inspect(tmp_path / "z.ckpt").options["level"] == 5


# ------------------------------------------------------------------ s3


def test_s3_run_saves_removes_and_resumes(
    run: ModuleType,
    s3_url: str,
    s3_options: dict[str, Any],
    s3_admin: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Lightning's own fsspec calls (existence checks, listing dirpath) get no storage
    # options: a real run gives it credentials the way AWS tools take them.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_options["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_options["secret"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_options["endpoint_url"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    dirpath = f"{s3_url}/ckpts"
    plugin = Spy("delta", storage_options=s3_options)
    trainer = _fit(run, 4, plugin, dirpath=dirpath)
    kept = {Path(p).name for p in trainer.checkpoint_callback.best_k_models} | {"last.ckpt"}
    listed = {p.rsplit("/", 1)[1] for p in s3_admin.ls(dirpath.removeprefix("s3://"), refresh=True)}
    assert listed - {"aptckpt-store"} == kept
    assert any(op == "remove" for op, _ in plugin.calls)
    last = find_last_checkpoint(dirpath, storage_options=s3_options)
    assert last == f"{dirpath}/last.ckpt"
    resumed = _fit(run, 5, plugin, dirpath=dirpath, ckpt_path=last)
    assert resumed.current_epoch == 5 and resumed.global_step == 5 * 6
    with aptckpt.open(last, storage_options=s3_options) as view:
        assert view.get("epoch") == 4


def test_the_standalone_pytorch_lightning_package_takes_the_plugin_too(tmp_path: Path) -> None:
    pl = pytest.importorskip("pytorch_lightning")

    class Standalone(pl.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self, lr: float = 0.1) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.layer = torch.nn.Linear(3, 1)

        def training_step(self, batch: Any, index: int) -> Any:
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3)))
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        plugins=[AptckptCheckpointIO()],
    )
    trainer.fit(Standalone(lr=0.25), data)
    (path,) = (tmp_path / "checkpoints").iterdir()
    assert aptckpt.inspect(path).backend == "zstd"
    model = load_from_checkpoint(Standalone, path)
    assert isinstance(model, Standalone) and model.hparams.lr == 0.25
    assert_state_equal(model.state_dict(), trainer.lightning_module.state_dict())

"""The state zoo: states built by the libraries PyTorch users train with, through every backend.

Each state is saved with every backend (``torch``, ``zstd``, ``zstd`` with ``codec="none"``,
``delta`` as an incremental save over an earlier checkpoint), loaded back and compared bit for
bit -- container types, plain values' Python types, tied weights -- then loaded into fresh
objects (``into=`` a module, ``load_state_dict`` for the rest) and trained on: the resumed run
must match the uninterrupted one exactly (losses, parameters, optimizer, scheduler and scaler
states). The states are built in :mod:`zoo_states`.

``transformers`` and ``accelerate`` are test extras (``pip install .[test]``); their tests are
skipped when they are absent. Everything runs on the CPU from configs built in code: nothing is
downloaded.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never download

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import aptckpt
from aptckpt.testing import assert_state_equal
from aptckpt.training_state import capture_rng, restore_rng
from zoo_states import (
    BACKENDS,
    HF_MODELS,
    OPTIMIZERS,
    QUANTIZED_KINDS,
    SCHEDULERS,
    SPARSE_KINDS,
    Recipe,
    Run,
    assert_runs_equal,
    describe,
    hf_model,
    hf_recipe,
    mlp,
    quantized_tensor,
    roundtrip,
    save,
    sparse_tensor,
)

STEPS = 3

# torch's own warnings about what the zoo builds on purpose: the quantized dtypes and
# torch.ao.quantization are deprecated, compressed sparse layouts are beta, and the first
# torch.compile of a process imports a deprecated torch.jit.script_method.
QUANTIZE_DEPRECATED = pytest.mark.filterwarnings(
    "ignore:torch.quantize_per_tensor, torch.quantize_per_channel:UserWarning"
)
AO_DEPRECATED = pytest.mark.filterwarnings(
    "ignore:torch.ao.quantization is deprecated:DeprecationWarning"
)
SPARSE_WARNINGS = pytest.mark.filterwarnings(
    "ignore:Sparse (CSR|CSC|BSR|BSC) tensor support is in beta state:UserWarning"
)
COMPILE_WARNINGS = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Any:
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine their
    spinning made steps ten times slower. Both halves of a resumed run use the same count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=list(BACKENDS))
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def transformers() -> Any:
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def accelerate() -> Any:
    return pytest.importorskip("accelerate")


def _storage_groups(state: dict[str, torch.Tensor]) -> list[list[str]]:
    """The keys of ``state`` grouped by the tensor memory they share, in key order."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for key, t in state.items():
        # empty tensors may share a null data pointer without sharing anything
        memory = (t.data_ptr(), tuple(t.shape), t.stride()) if t.numel() else (key,)
        groups.setdefault(memory, []).append(key)
    return sorted(groups.values())


def assert_ties_kept(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    """Keys sharing memory in ``expected`` share it in ``actual``, and no others do."""
    assert _storage_groups(actual) == _storage_groups(expected)


# ------------------------------------------------------------------ resuming a training run


def resume(recipe: Recipe, tmp_path: Path, variant: str) -> tuple[Run, Run]:
    """Train, save (model and the rest as two checkpoints, as Accelerate lays them out),
    check the checkpoints load bit for bit, train on (the reference); then build fresh
    objects, load into them and train as many steps. Returns (reference, resumed)."""
    first = Run(recipe, seed=0)
    first.train(1)
    base: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    if variant == "delta":  # an earlier checkpoint in the same store: the next saves are deltas
        save(first.model.state_dict(), tmp_path / "model-1", variant)
        save(first.training_state(), tmp_path / "train-1", variant)
        base = {kind: {"base": tmp_path / f"{kind}-1"} for kind in base}
    first.train(STEPS - 1)
    model_state, training_state = first.model.state_dict(), first.training_state()
    save(model_state, tmp_path / "model", variant, **base["model"])
    save(training_state, tmp_path / "train", variant, **base["train"])
    loaded_model = aptckpt.load(tmp_path / "model")
    assert_state_equal(model_state, loaded_model)
    assert_ties_kept(model_state, loaded_model)
    assert_state_equal(training_state, aptckpt.load(tmp_path / "train"))
    first.train(STEPS)

    second = Run(recipe, seed=1)
    aptckpt.load(tmp_path / "model", into=second.model)
    second.load_training_state(aptckpt.load(tmp_path / "train"))
    second.train(STEPS)
    assert_runs_equal(first, second)
    return first, second


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_resumes_bit_identically(tmp_path, variant, name):
    resume(OPTIMIZERS[name], tmp_path, variant)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_and_the_grad_scaler_resume_bit_identically(tmp_path, variant, name):
    resume(SCHEDULERS[name], tmp_path, variant)


@pytest.mark.parametrize("name", HF_MODELS)
def test_hugging_face_training_resumes_bit_identically(tmp_path, variant, transformers, name):
    first, second = resume(hf_recipe(name), tmp_path, variant)
    assert_ties_kept(first.model.state_dict(), second.model.state_dict())


@pytest.mark.parametrize("name", ["mlp", "gpt2"])
def test_checkpoint_manager_resumes_training_bit_identically(tmp_path, variant, name):
    """The one-checkpoint route: ``CheckpointManager`` saves the full training state (RNG
    states included, captured by itself) and restores it into fresh objects."""
    if name == "gpt2":
        pytest.importorskip("transformers")
        recipe = hf_recipe("gpt2")
    else:
        recipe = Recipe(
            mlp,
            lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2),
            lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=20),
            scaler=True,
        )
    backend, options = BACKENDS[variant]
    first = Run(recipe, seed=0)
    first.train(STEPS)
    with aptckpt.CheckpointManager(tmp_path, backend=backend, backend_options=options) as mgr:
        mgr.save_checkpoint(
            first.model,
            first.optimizer,
            first.scheduler,
            epoch=0,
            global_step=STEPS,
            loss_history=first.losses,
            metrics={"loss": first.losses[-1]},
            scaler=first.scaler,
        )
    first.train(STEPS)

    second = Run(recipe, seed=1)
    with aptckpt.CheckpointManager(tmp_path, read_only=True) as mgr:
        _, step, losses, _ = mgr.load_checkpoint(
            second.model, second.optimizer, second.scheduler, scaler=second.scaler
        )
    assert step == STEPS
    second.losses = losses
    second.train(STEPS)
    assert_runs_equal(first, second)


# ------------------------------------------------------------------ Hugging Face: tied weights


@pytest.fixture(scope="module")
def hf_models(transformers: Any) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {name: hf_model(name) for name in HF_MODELS}


@pytest.mark.parametrize("name", HF_MODELS)
def test_tied_parameters_come_back_as_one_parameter(tmp_path, variant, hf_models, name):
    """``named_parameters(remove_duplicate=False)`` names a tied Parameter several times:
    it loads as one Parameter object under every name."""
    params = dict(hf_models[name].named_parameters(remove_duplicate=False))
    loaded = roundtrip(params, tmp_path / "c", variant)
    assert_state_equal(params, loaded)
    for key, p in params.items():
        for other, q in params.items():
            assert (loaded[key] is loaded[other]) == (p is q), (key, other)


def test_a_tied_model_loads_a_checkpoint_whose_ties_were_split(tmp_path, variant, transformers):
    """A checkpoint written with every tied tensor stored apart (as exporters that clone
    shared tensors write it) fills a tied model, which stays tied."""
    torch.manual_seed(0)
    saved = {k: v.clone() for k, v in hf_model("llama-tied").state_dict().items()}
    save(saved, tmp_path / "c", variant)
    torch.manual_seed(1)
    model = hf_model("llama-tied")
    aptckpt.load(tmp_path / "c", into=model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_state_equal(saved, {k: v.detach() for k, v in model.state_dict().items()})


def test_an_untied_model_loads_a_tied_checkpoint_into_every_destination(
    tmp_path, variant, transformers
):
    """The tied tensor is stored once; both of the untied model's tensors receive it."""
    torch.manual_seed(0)
    saved = hf_model("llama-tied").state_dict()
    save(saved, tmp_path / "c", variant)
    torch.manual_seed(1)
    model = hf_model("llama-untied")
    aptckpt.load(tmp_path / "c", into=model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), f"{key} was not filled"


def test_load_into_a_state_dict_fills_the_module_it_came_from(tmp_path, variant, transformers):
    """``into=model.state_dict()``: its tensors share the parameters' memory (tied ones
    twice), so the module is filled in place and stays tied."""
    torch.manual_seed(0)
    saved = hf_model("gpt2").state_dict()
    save(saved, tmp_path / "c", variant)
    torch.manual_seed(1)
    model = hf_model("gpt2")
    aptckpt.load(tmp_path / "c", into=model.state_dict())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert_state_equal(saved, model.state_dict())
    assert_ties_kept(saved, model.state_dict())


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_load_into_a_module_is_strict_by_default(tmp_path, transformers, change):
    """As ``load_state_dict``: a key of the module absent from the checkpoint, or a key of
    the checkpoint absent from the module, is an error naming it."""
    torch.manual_seed(0)
    state = dict(hf_model("gpt2").state_dict())
    if change == "missing":
        key = "transformer.h.1.mlp.c_fc.bias"
        del state[key]
    else:
        key = "transformer.h.2.mlp.c_fc.bias"
        state[key] = torch.zeros(3)
    aptckpt.save(state, tmp_path / "c")
    with pytest.raises((aptckpt.AptckptError, KeyError, ValueError, RuntimeError)) as err:
        aptckpt.load(tmp_path / "c", into=hf_model("gpt2"))
    assert key in str(err.value)


def test_load_into_a_module_with_strict_false_fills_what_matches(tmp_path, transformers):
    torch.manual_seed(0)
    state = dict(hf_model("gpt2").state_dict())
    del state["transformer.h.1.mlp.c_fc.bias"]
    state["extra.weight"] = torch.ones(2)
    aptckpt.save(state, tmp_path / "c")
    torch.manual_seed(1)
    model = hf_model("gpt2")
    untouched = model.transformer.h[1].mlp.c_fc.bias.detach().clone()
    aptckpt.load(tmp_path / "c", into=model, strict=False)
    for key, value in model.state_dict().items():
        expected = state.get(key, untouched)
        assert torch.equal(value, expected), key


# ------------------------------------------------------------------ torch.compile


def _compiled(seed: int, backend: str) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.compile(mlp().eval(), backend=backend)  # type: ignore[return-value]


@COMPILE_WARNINGS
def test_a_compiled_model_round_trips_and_loads_into_a_compiled_model(tmp_path, variant):
    model = _compiled(0, "aot_eager")
    x = torch.randn(5, 6)
    expected = model(x)
    state = model.state_dict()
    assert all(k.startswith("_orig_mod.") for k in state)
    assert_state_equal(state, roundtrip(state, tmp_path / "c", variant))
    fresh = _compiled(1, "aot_eager")
    aptckpt.load(tmp_path / "c", into=fresh)
    assert torch.equal(fresh(x), expected)


def _compiled_recipe(backend: str) -> Recipe:
    return Recipe(
        lambda: torch.compile(mlp(), backend=backend),
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5),
    )


@COMPILE_WARNINGS
def test_compiled_training_resumes_bit_identically(tmp_path, variant):
    resume(_compiled_recipe("aot_eager"), tmp_path, variant)


@pytest.mark.slow
@COMPILE_WARNINGS
def test_inductor_compiled_training_resumes_bit_identically(tmp_path, variant):
    resume(_compiled_recipe("inductor"), tmp_path, variant)


# ------------------------------------------------------------------ quantized and sparse


@pytest.mark.parametrize("kind", QUANTIZED_KINDS)
@QUANTIZE_DEPRECATED
def test_quantized_tensors_round_trip_exactly(tmp_path, variant, kind):
    tensor = quantized_tensor(kind)
    state = {"tensor": tensor, "again": [tensor]}
    loaded = roundtrip(state, tmp_path / "c", variant)
    assert_state_equal(describe(state), describe(loaded))
    assert loaded["again"][0] is loaded["tensor"]


@QUANTIZE_DEPRECATED
@AO_DEPRECATED
def test_a_dynamically_quantized_model_round_trips_and_reloads(tmp_path, variant):
    """``quantize_dynamic``'s state: packed (qint8 weight, bias) tuples and a dtype value."""

    def quantized(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = mlp().eval()
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, torch.qint8)

    model = quantized(0)
    state = model.state_dict()
    loaded = roundtrip(state, tmp_path / "c", variant)
    assert_state_equal(describe(state), describe(loaded))
    fresh = quantized(1)
    fresh.load_state_dict(loaded)
    x = torch.randn(5, 6)
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("kind", SPARSE_KINDS)
@SPARSE_WARNINGS
def test_sparse_tensors_round_trip_exactly(tmp_path, variant, kind):
    tensor = sparse_tensor(kind)
    state = {"tensor": tensor, "again": (tensor,)}
    loaded = roundtrip(state, tmp_path / "c", variant)
    assert_state_equal(describe(state), describe(loaded))
    assert loaded["again"][0] is loaded["tensor"]


def test_a_sparse_gradient_and_sparse_adam_state_round_trip(tmp_path, variant):
    """An ``nn.Embedding(sparse=True)`` after two backward passes: its gradient is an
    uncoalesced sparse COO tensor, saved with the weight and SparseAdam's state."""
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(20, 3, sparse=True)
    optimizer = torch.optim.SparseAdam(embedding.parameters(), lr=1e-2)
    for _ in range(2):
        embedding(torch.randint(0, 20, (6,))).sum().backward()
        optimizer.step()
    grad = embedding.weight.grad
    assert grad is not None and grad.is_sparse and not grad.is_coalesced()
    state = {"weight": embedding.weight, "grad": grad, "optimizer": optimizer.state_dict()}
    loaded = roundtrip(state, tmp_path / "c", variant)
    assert_state_equal(describe(state), describe(loaded))


# ------------------------------------------------------------------ RNG states and numpy values


def refused(state: Any, path: Path, variant: str) -> str | None:
    """Save ``state``; the message if it is refused as unsupported, else None."""
    try:
        save(state, path, variant)
    except aptckpt.UnsupportedObjectError as err:
        return str(err)
    return None


def _replay(states: dict[str, Any]) -> tuple[Any, ...]:
    """Draws from every generator set to ``states``."""
    torch.set_rng_state(states["torch"])
    generator = torch.Generator()
    generator.set_state(states["torch_generator"])
    bits = np.random.default_rng()
    bits.bit_generator.state = states["numpy_generator"]
    random.setstate(states["python"])
    draws = (torch.rand(3), torch.rand(3, generator=generator), bits.random(3).tolist())
    draws += (random.random(),)
    restore_rng(states["bundle"])
    return (*draws, torch.rand(3), np.random.random(3).tolist(), random.random())


def test_rng_states_round_trip_and_replay(tmp_path, variant):
    """torch's global and per-generator states, NumPy's ``Generator`` (a dict holding 128-bit
    ints), Python's ``random`` (a tuple of 625 ints) and ``capture_rng``'s bundle (how
    aptckpt stores NumPy's legacy state: its keys as a tensor) load equal and replay the
    same numbers."""
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    generator = torch.Generator().manual_seed(5)
    torch.randn(3, generator=generator)
    bits = np.random.default_rng(7)
    bits.random(3)
    state = {
        "torch": torch.get_rng_state(),
        "torch_generator": generator.get_state(),
        "numpy_generator": bits.bit_generator.state,
        "python": random.getstate(),
        "bundle": capture_rng(),
    }
    assert state["numpy_generator"]["state"]["state"] >= 2**64  # a 128-bit int
    loaded = roundtrip(state, tmp_path / "c", variant)
    assert_state_equal(state, loaded)
    assert_state_equal(_replay(state), _replay(loaded))


def test_numpy_legacy_rng_state_round_trips_or_is_refused_clearly(tmp_path, variant):
    """``np.random.get_state()`` holds an ndarray: it must come back as one (and replay), or
    be refused naming where it is -- never come back as something else."""
    np.random.seed(11)
    state = {"numpy": np.random.get_state()}
    refusal = refused(state, tmp_path / "c", variant)
    if refusal is not None:
        assert "state['numpy'][1]" in refusal and "numpy.ndarray" in refusal
        return
    loaded = aptckpt.load(tmp_path / "c")["numpy"]
    assert type(loaded) is tuple and type(loaded[1]) is np.ndarray
    assert loaded[1].dtype == state["numpy"][1].dtype
    assert np.array_equal(loaded[1], state["numpy"][1])
    expected = np.random.random(4)
    np.random.set_state(loaded)
    assert np.array_equal(np.random.random(4), expected)


@pytest.mark.parametrize(
    "value",
    [np.float64(0.1), np.float32(0.1), np.int64(-3), np.bool_(True)],
    ids=lambda v: type(v).__name__,
)
def test_numpy_scalar_metrics_keep_their_type_or_are_refused(tmp_path, variant, value):
    """A metric computed with NumPy (``np.mean(losses)`` is an ``np.float64``, a float
    subclass) either loads as the same type and value, or is refused naming its key --
    never silently turned into another type."""
    state = {"metrics": {"val_loss": value}}
    refusal = refused(state, tmp_path / "c", variant)
    if refusal is not None:
        assert "state['metrics']['val_loss']" in refusal
        return
    loaded = aptckpt.load(tmp_path / "c")["metrics"]["val_loss"]
    assert type(loaded) is type(value)
    assert loaded == value


# ------------------------------------------------------------------ Accelerate


def _accelerate_recipe() -> Recipe:
    return Recipe(
        mlp,
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2),
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
        accelerate=True,
    )


def _saved_state(directory: Path) -> dict[str, Any]:
    """What ``Accelerator.save_state`` wrote, read back the way ``load_state`` reads it."""
    from safetensors.torch import load_file

    return {
        "model": load_file(directory / "model.safetensors"),
        "optimizer": torch.load(directory / "optimizer.bin", weights_only=True),
        "scheduler": torch.load(directory / "scheduler.bin", weights_only=True),
        "random_states": torch.load(directory / "random_states_0.pkl", weights_only=False),
    }


def test_accelerate_save_state_contents_round_trip(tmp_path, variant, accelerate):
    """Every object ``save_state`` writes, through aptckpt. Its RNG file holds NumPy's legacy
    state (an ndarray): stored as it is, or refused naming it and stored as users do
    (the keys as a tensor) -- and then everything else must round-trip exactly."""
    run = Run(_accelerate_recipe(), seed=0)
    run.train(STEPS)
    run.accelerator.save_state(tmp_path / "accelerate")
    contents = _saved_state(tmp_path / "accelerate")
    assert type(contents["random_states"]["numpy_random_seed"][1]) is np.ndarray
    refusal = refused(contents, tmp_path / "as-is", variant)
    if refusal is not None:
        assert "['random_states']['numpy_random_seed'][1]" in refusal
        kind, keys, *rest = contents["random_states"]["numpy_random_seed"]
        contents["random_states"]["numpy_random_seed"] = (kind, torch.from_numpy(keys), *rest)
        save(contents, tmp_path / "converted", variant)
    loaded = aptckpt.load(tmp_path / ("as-is" if refusal is None else "converted"))
    assert_state_equal(contents, loaded)


def test_accelerate_training_resumes_from_aptckpt_checkpoints(tmp_path, variant, accelerate):
    resume(_accelerate_recipe(), tmp_path, variant)

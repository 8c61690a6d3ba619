"""The state zoo of tests/test_zoo.py: training states built by the libraries PyTorch users train
with, small enough to train on a CPU in milliseconds.

A :class:`Recipe` says how a run is built (model, optimizer, scheduler, grad scaler) and how
it takes one step; :class:`Run` trains it. Batches are drawn from the global torch and NumPy
generators and the models use dropout, so a resumed run matches the uninterrupted one only if
every tensor, every plain value and every RNG state came back exactly.

Hugging Face builders import ``transformers`` when called, so that this module (and the tests
that do not need it) work without the optional dependency.
"""

from __future__ import annotations

import collections
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim import lr_scheduler as sched

import aptckpt
from aptckpt.testing import assert_state_equal
from aptckpt.training_state import capture_rng, restore_rng

# ------------------------------------------------------------------ backends

#: Every backend and option set a state goes through: name -> (backend, options).
BACKENDS: dict[str, tuple[str, dict[str, Any]]] = {
    "torch": ("torch", {}),
    "zstd": ("zstd", {}),
    "zstd-raw": ("zstd", {"codec": "none"}),
    "delta": ("delta", {}),
}


def save(state: Any, path: Path, variant: str, **options: Any) -> aptckpt.SaveInfo:
    """Save ``state`` with one of :data:`BACKENDS`; ``delta`` uses the store next to ``path``."""
    backend, defaults = BACKENDS[variant]
    if backend == "delta":
        defaults = {**defaults, "store": path.parent / "aptckpt-store"}
    return aptckpt.save(state, path, backend=backend, **defaults, **options)


def roundtrip(state: Any, path: Path, variant: str) -> Any:
    save(state, path, variant)
    return aptckpt.load(path)


# ------------------------------------------------------------------ models and losses


def mlp(*, bias: bool = True) -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 16, bias=bias), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 3, bias=bias)
    )


def noise(*shape: int) -> torch.Tensor:
    """Targets get NumPy noise, so that the NumPy generator is part of the training state."""
    return torch.from_numpy(np.random.standard_normal(shape).astype(np.float32))


def mlp_loss(model: nn.Module) -> torch.Tensor:
    x = torch.randn(8, 6)
    return F.mse_loss(model(x), x[:, :3] + noise(8, 3))


def embedding_loss(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 20, (8,))
    return F.mse_loss(model(ids), noise(8, 3))


VOCAB = 64


def hf_model(name: str) -> nn.Module:
    """A tiny Hugging Face model built from a config in code (random weights, no download).

    Tied weights in several patterns: GPT-2 and Llama (``tied``) tie the LM head to the
    input embedding; BERT ties the decoder's weight *and* bias; T5 ties four names to one
    embedding; Llama (``untied``) and ViT tie nothing.
    """
    import transformers as tf

    small = {"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 32}
    tokens = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if name == "gpt2":
        config = tf.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, **tokens)
        return tf.GPT2LMHeadModel(config)
    if name == "bert":
        config = tf.BertConfig(intermediate_size=64, max_position_embeddings=16, **small, **tokens)
        return tf.BertForMaskedLM(config)
    if name in ("llama-tied", "llama-untied"):
        config = tf.LlamaConfig(
            intermediate_size=64,
            num_key_value_heads=1,
            max_position_embeddings=16,
            tie_word_embeddings=name == "llama-tied",
            attention_dropout=0.1,
            **small,
            **tokens,
        )
        return tf.LlamaForCausalLM(config)
    if name == "t5":
        config = tf.T5Config(
            num_layers=2,
            num_decoder_layers=2,
            num_heads=2,
            d_model=32,
            d_kv=16,
            d_ff=64,
            decoder_start_token_id=0,
            **tokens,
        )
        return tf.T5ForConditionalGeneration(config)
    if name == "vit":
        config = tf.ViTConfig(
            intermediate_size=64, image_size=16, patch_size=8, num_labels=3, **small
        )
        return tf.ViTForImageClassification(config)
    raise ValueError(name)


HF_MODELS = ["gpt2", "bert", "llama-tied", "llama-untied", "t5", "vit"]


def hf_loss(model: nn.Module) -> torch.Tensor:
    kind = model.config.model_type  # type: ignore[union-attr]
    if kind == "vit":
        pixels, labels = torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2,))
        return model(pixel_values=pixels, labels=labels).loss  # type: ignore[no-any-return]
    ids = torch.randint(3, VOCAB, (2, 8))
    if kind == "t5":
        labels = torch.randint(3, VOCAB, (2, 5))
        return model(input_ids=ids, labels=labels).loss  # type: ignore[no-any-return]
    return model(input_ids=ids, labels=ids).loss  # type: ignore[no-any-return]


def hf_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW with the Trainer's two parameter groups: no weight decay on biases and norms."""
    no_decay = re.compile(r"bias|norm|LayerNorm|layer_norm")
    decay = [p for n, p in model.named_parameters() if not no_decay.search(n)]
    rest = [p for n, p in model.named_parameters() if no_decay.search(n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
        lr=1e-3,
    )


def hf_scheduler(name: str) -> Callable[[torch.optim.Optimizer], Any]:
    """The schedule the Trainer would use (a ``LambdaLR`` over a ``functools.partial``)."""

    def build(optimizer: torch.optim.Optimizer) -> Any:
        import transformers as tf

        kind = {"gpt2": "linear", "bert": "cosine", "t5": "inverse_sqrt", "vit": "polynomial"}
        return tf.get_scheduler(
            kind.get(name, "cosine_with_restarts"),
            optimizer,
            num_warmup_steps=2,
            num_training_steps=20,
        )

    return build


# ------------------------------------------------------------------ recipes


@dataclass(frozen=True)
class Recipe:
    """How a training run is built and how it takes a step."""

    model: Callable[[], nn.Module]
    optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None
    loss: Callable[[nn.Module], torch.Tensor] = mlp_loss
    scaler: bool = False
    closure: bool = False  # LBFGS: the optimizer calls the loss itself
    plateau: bool = False  # ReduceLROnPlateau: stepped with the loss
    accelerate: bool = False  # prepared by an accelerate.Accelerator (CPU)


OPTIMIZERS: dict[str, Recipe] = {
    name: Recipe(mlp, make)
    for name, make in {
        "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.05),
        "sgd-nesterov-foreach": lambda m: torch.optim.SGD(
            m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, foreach=True
        ),
        "sgd-fused": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, fused=True),
        "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
        "adam-foreach": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, foreach=True),
        "adam-fused": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, fused=True),
        "adam-amsgrad": lambda m: torch.optim.Adam(
            m.parameters(), lr=1e-2, amsgrad=True, weight_decay=1e-3
        ),
        "adam-tensor-lr": lambda m: torch.optim.Adam(
            m.parameters(), lr=torch.tensor(1e-2), foreach=False
        ),
        "adamw-fused": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True),
        "adamw-amsgrad-foreach": lambda m: torch.optim.AdamW(
            m.parameters(), lr=1e-2, amsgrad=True, foreach=True
        ),
        "adamax": lambda m: torch.optim.Adamax(m.parameters(), lr=1e-2),
        "nadam-decoupled": lambda m: torch.optim.NAdam(
            m.parameters(), lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True
        ),
        "radam-decoupled": lambda m: torch.optim.RAdam(
            m.parameters(), lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True
        ),
        "adagrad": lambda m: torch.optim.Adagrad(m.parameters(), lr=0.1, lr_decay=1e-3),
        "adagrad-fused": lambda m: torch.optim.Adagrad(m.parameters(), lr=0.1, fused=True),
        "adadelta": lambda m: torch.optim.Adadelta(m.parameters()),
        "rmsprop-centered-momentum": lambda m: torch.optim.RMSprop(
            m.parameters(), lr=1e-2, momentum=0.9, centered=True
        ),
        "rprop": lambda m: torch.optim.Rprop(m.parameters(), lr=1e-2),
        "asgd": lambda m: torch.optim.ASGD(m.parameters(), lr=1e-2, t0=1),
        "adafactor": lambda m: torch.optim.Adafactor(m.parameters(), lr=1e-2),
    }.items()
} | {
    "muon": Recipe(lambda: mlp(bias=False), lambda m: torch.optim.Muon(m.parameters(), lr=0.02)),
    "lbfgs": Recipe(
        mlp, lambda m: torch.optim.LBFGS(m.parameters(), lr=0.5, max_iter=3), closure=True
    ),
    "lbfgs-strong-wolfe": Recipe(
        mlp,
        lambda m: torch.optim.LBFGS(
            m.parameters(), lr=0.5, max_iter=3, history_size=4, line_search_fn="strong_wolfe"
        ),
        closure=True,
    ),
    "sparse-adam": Recipe(
        lambda: nn.Embedding(20, 3, sparse=True),
        lambda m: torch.optim.SparseAdam(m.parameters(), lr=1e-2),
        loss=embedding_loss,
    ),
}


class WarmupFactor:
    """An LR factor with state of its own: ``LambdaLR`` stores a callable object's ``__dict__``."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.calls = 0

    def __call__(self, epoch: int) -> float:
        self.calls += 1
        return min(1.0, (epoch + 1) / self.warmup)


class HalvingScale:
    """A ``CyclicLR`` ``scale_fn`` object, stored as its ``__dict__`` too."""

    def __init__(self) -> None:
        self.base = 0.5

    def __call__(self, cycle: float) -> float:
        return float(self.base ** (cycle - 1))


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    # momentum: CyclicLR and OneCycleLR cycle it
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


_SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "lambda-function": lambda o: sched.LambdaLR(o, lambda epoch: 0.9**epoch),
    "lambda-callable": lambda o: sched.LambdaLR(o, WarmupFactor(3)),
    "multiplicative": lambda o: sched.MultiplicativeLR(o, lambda epoch: 0.95),
    "step": lambda o: sched.StepLR(o, step_size=2, gamma=0.5),
    "multistep": lambda o: sched.MultiStepLR(o, milestones=[2, 4, 4], gamma=0.5),
    "constant": lambda o: sched.ConstantLR(o, factor=0.5, total_iters=4),
    "linear": lambda o: sched.LinearLR(o, start_factor=0.2, total_iters=5),
    "exponential": lambda o: sched.ExponentialLR(o, gamma=0.9),
    "polynomial": lambda o: sched.PolynomialLR(o, total_iters=8, power=2.0),
    "cosine": lambda o: sched.CosineAnnealingLR(o, T_max=5, eta_min=1e-3),
    "cosine-warm-restarts": lambda o: sched.CosineAnnealingWarmRestarts(o, T_0=2, T_mult=2),
    "cyclic-triangular2": lambda o: sched.CyclicLR(
        o, 0.01, 0.1, step_size_up=2, mode="triangular2"
    ),
    "cyclic-exp-range": lambda o: sched.CyclicLR(
        o, 0.01, 0.1, step_size_up=2, mode="exp_range", gamma=0.9
    ),
    "cyclic-scale-fn-object": lambda o: sched.CyclicLR(
        o, 0.01, 0.1, step_size_up=2, scale_fn=HalvingScale(), scale_mode="cycle"
    ),
    "one-cycle-cos": lambda o: sched.OneCycleLR(o, max_lr=0.1, total_steps=20),
    "one-cycle-linear-three-phase": lambda o: sched.OneCycleLR(
        o, max_lr=0.1, total_steps=20, anneal_strategy="linear", three_phase=True
    ),
    "sequential": lambda o: sched.SequentialLR(
        o,
        [sched.LinearLR(o, start_factor=0.1, total_iters=2), sched.ExponentialLR(o, 0.9)],
        milestones=[2],
    ),
    "chained": lambda o: sched.ChainedScheduler(
        [sched.ConstantLR(o, factor=0.5, total_iters=3), sched.ExponentialLR(o, gamma=0.9)]
    ),
    "swa": lambda o: torch.optim.swa_utils.SWALR(o, swa_lr=0.02, anneal_epochs=3),
}

SCHEDULERS: dict[str, Recipe] = {
    name: Recipe(mlp, _sgd, make) for name, make in _SCHEDULERS.items()
} | {
    "reduce-on-plateau": Recipe(
        mlp,
        _sgd,
        lambda o: sched.ReduceLROnPlateau(o, mode="min", patience=0, threshold=0.5),
        plateau=True,
    ),
    "grad-scaler": Recipe(mlp, lambda m: torch.optim.Adam(m.parameters(), lr=1e-2), scaler=True),
}


def hf_recipe(name: str) -> Recipe:
    return Recipe(lambda: hf_model(name), hf_optimizer, hf_scheduler(name), loss=hf_loss)


# ------------------------------------------------------------------ training


class Run:
    """One training run of a :class:`Recipe`; ``seed`` decides the initial weights."""

    def __init__(self, recipe: Recipe, seed: int) -> None:
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        self.recipe = recipe
        self.model = recipe.model()
        self.model.train()
        self.optimizer = recipe.optimizer(self.model)
        self.scheduler = recipe.scheduler(self.optimizer) if recipe.scheduler else None
        self.scaler = (
            torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
            if recipe.scaler
            else None
        )
        self.accelerator: Any = None
        if recipe.accelerate:
            from accelerate import Accelerator

            self.accelerator = Accelerator(cpu=True)
            if self.scheduler is None:
                self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
            else:
                self.model, self.optimizer, self.scheduler = self.accelerator.prepare(
                    self.model, self.optimizer, self.scheduler
                )
        self.losses: list[float] = []

    def step(self) -> float:
        recipe, optimizer = self.recipe, self.optimizer

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = recipe.loss(self.model)
            scaled = self.scaler.scale(loss) if self.scaler else loss
            if self.accelerator is not None:
                self.accelerator.backward(scaled)
            else:
                scaled.backward()
            return loss

        if recipe.closure:
            loss = optimizer.step(closure)
        elif self.scaler:
            loss = closure()
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            loss = closure()
            optimizer.step()
        value = float(loss.detach())
        if self.scheduler is not None:
            if recipe.plateau:
                self.scheduler.step(value)
            else:
                self.scheduler.step()
        self.losses.append(value)
        return value

    def train(self, steps: int) -> list[float]:
        return [self.step() for _ in range(steps)]

    def training_state(self) -> dict[str, Any]:
        """Everything but the model, as a training loop saves it."""
        state: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict(),
            "step": len(self.losses),
            "losses": list(self.losses),
            "rng": capture_rng(),
        }
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_training_state(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.losses = list(state["losses"])
        restore_rng(state["rng"])


def assert_runs_equal(expected: Run, actual: Run) -> None:
    """Bit for bit: losses, every parameter and buffer, optimizer, scheduler and scaler."""
    assert actual.losses == expected.losses, "losses differ after resuming"
    for (name, e), (_, a) in zip(
        expected.model.state_dict().items(), actual.model.state_dict().items(), strict=True
    ):
        assert torch.equal(e, a), f"{name} differs after resuming"
    assert_state_equal(expected.optimizer.state_dict(), actual.optimizer.state_dict())
    if expected.scheduler is not None:
        assert actual.scheduler is not None
        assert_state_equal(expected.scheduler.state_dict(), actual.scheduler.state_dict())
    if expected.scaler is not None:
        assert actual.scaler is not None
        assert_state_equal(expected.scaler.state_dict(), actual.scaler.state_dict())


# ------------------------------------------------------------------ quantized and sparse


QUANTIZED_KINDS = (
    "per-tensor-quint8",
    "per-tensor-qint8",
    "per-tensor-qint32",
    "per-tensor-quint4x2",
    "per-channel-qint8-axis0",
    "per-channel-quint8-axis1",
    "per-channel-float-qparams",
)
SPARSE_KINDS = (
    "coo-coalesced",
    "coo-uncoalesced-float64",
    "coo-hybrid",
    "coo-int64",
    "csr",
    "csc",
    "bsr",
    "bsc",
)


def quantized_tensor(kind: str) -> torch.Tensor:
    """Per-tensor and per-channel quantized tensors of every quantized dtype."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g)
    rows, cols = torch.rand(4, generator=g) + 0.01, torch.rand(6, generator=g) + 0.01
    tensors = {
        "per-tensor-quint8": torch.quantize_per_tensor(x, 0.05, 7, torch.quint8),
        "per-tensor-qint8": torch.quantize_per_tensor(x, 0.02, -3, torch.qint8),
        "per-tensor-qint32": torch.quantize_per_tensor(x, 1e-4, 11, torch.qint32),
        "per-tensor-quint4x2": torch.quantize_per_tensor(x, 0.3, 2, torch.quint4x2),
        "per-channel-qint8-axis0": torch.quantize_per_channel(
            x, rows.double(), torch.tensor([0, 1, -2, 3]), 0, torch.qint8
        ),
        "per-channel-quint8-axis1": torch.quantize_per_channel(
            x, cols.double(), torch.arange(6), 1, torch.quint8
        ),
        # float zero points: the scheme of quantized embeddings
        "per-channel-float-qparams": torch.quantize_per_channel(
            x, rows, torch.rand(4, generator=g), 0, torch.quint8
        ),
    }
    assert tuple(tensors) == QUANTIZED_KINDS
    return tensors[kind]


def sparse_tensor(kind: str) -> torch.Tensor:
    """Sparse COO (coalesced or not, hybrid), CSR, CSC, BSR and BSC tensors."""
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(4, 6, generator=g) * (torch.rand(4, 6, generator=g) > 0.5)
    indices = torch.tensor([[0, 2, 0, 3], [1, 5, 1, 0]])  # (0, 1) twice: not coalesced
    coo = torch.sparse_coo_tensor(
        indices, torch.randn(4, generator=g), (4, 6), check_invariants=True
    )
    tensors = {
        "coo-coalesced": dense.to_sparse(),
        "coo-uncoalesced-float64": coo.double(),
        "coo-hybrid": torch.randn(4, 3, generator=g).to_sparse(sparse_dim=1),
        "coo-int64": (dense * 10).long().to_sparse(),
        "csr": dense.to_sparse_csr(),
        "csc": dense.to_sparse_csc(),
        "bsr": dense.to_sparse_bsr((2, 3)),
        "bsc": dense.to_sparse_bsc((2, 2)),
    }
    assert tuple(tensors) == SPARSE_KINDS
    return tensors[kind]


def _exotic_parts(t: torch.Tensor) -> dict[str, Any]:
    """A quantized or sparse tensor as plain values and dense tensors, to compare bit for bit."""
    parts: dict[str, Any] = {
        "type": type(t).__name__,
        "layout": str(t.layout),
        "dtype": t.dtype,
        "shape": tuple(t.shape),
        "requires_grad": t.requires_grad,
    }
    if t.is_quantized:
        scheme = t.qscheme()
        parts["qscheme"] = str(scheme)
        parts["int_repr"] = t.int_repr()
        if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            parts["scale"], parts["zero_point"] = t.q_scale(), t.q_zero_point()
        else:
            parts["scales"] = t.q_per_channel_scales()
            parts["zero_points"] = t.q_per_channel_zero_points()
            parts["axis"] = t.q_per_channel_axis()
    elif t.layout == torch.sparse_coo:
        parts.update(
            coalesced=t.is_coalesced(),
            sparse_dim=t.sparse_dim(),
            dense_dim=t.dense_dim(),
            indices=t._indices(),
            values=t._values().detach(),
        )
    elif t.layout in (torch.sparse_csr, torch.sparse_bsr):
        parts.update(crow=t.crow_indices(), col=t.col_indices(), values=t.values().detach())
    elif t.layout in (torch.sparse_csc, torch.sparse_bsc):
        parts.update(ccol=t.ccol_indices(), row=t.row_indices(), values=t.values().detach())
    return parts


def describe(state: Any) -> Any:
    """``state`` with every quantized or sparse tensor replaced by its parts (containers keep
    their exact types), for :func:`~aptckpt.testing.assert_state_equal`."""
    if isinstance(state, torch.Tensor):
        return (
            _exotic_parts(state) if state.layout != torch.strided or state.is_quantized else state
        )
    if type(state) in (dict, collections.OrderedDict):
        out = type(state)((k, describe(v)) for k, v in state.items())
        if hasattr(state, "_metadata"):
            out._metadata = state._metadata
        return out
    if type(state) in (list, tuple):
        return type(state)(describe(v) for v in state)
    return state

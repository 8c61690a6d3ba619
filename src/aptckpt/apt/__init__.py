"""APT: aptckpt's reference training loop, a small transformer with resumable checkpoints.

>>> from aptckpt.apt import train_model, load_model
>>> result = train_model(epochs=1, checkpoint_dir="runs/apt")            # doctest: +SKIP
>>> result = train_model(epochs=3, checkpoint_dir="runs/apt", resume_from="auto")  # doctest: +SKIP
>>> model, tokenizer, config = load_model("runs/apt")                      # doctest: +SKIP

A run killed at any point and resumed with ``resume_from="auto"`` ends bit for
bit where an uninterrupted run ends. Command line: ``python -m aptckpt.apt --help``.
"""

from aptckpt.apt.load import load_model
from aptckpt.apt.model import APTConfig, APTModel
from aptckpt.apt.tokenizer import CharTokenizer
from aptckpt.apt.train import TrainResult, train_model

__all__ = ["APTConfig", "APTModel", "CharTokenizer", "TrainResult", "load_model", "train_model"]

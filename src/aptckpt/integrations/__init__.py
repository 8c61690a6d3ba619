"""Trainer integrations: aptckpt inside the training frameworks users already run.

Each submodule imports its framework lazily, when it is itself imported, so
``import aptckpt`` never needs them:

* :mod:`aptckpt.integrations.lightning` -- a Lightning ``CheckpointIO`` plugin.
* :mod:`aptckpt.integrations.transformers` -- Hugging Face ``Trainer`` checkpoints.
* :mod:`aptckpt.integrations.accelerate` -- ``Accelerator`` state saves and loads.
"""

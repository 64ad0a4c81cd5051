"""Training: settings, the run folder, and one flat loop that yields events. Never prints.

- ``settings``: ``TrainSettings`` and recipes (``configs/recipes/``);
- ``setup``: ``prepare_run`` turns what ``gptcli train`` was asked (``RunRequest``) into a ``Run``:
  a new one (tokenizer, config, data tokenized and stored, seeded model) or a resumed one;
- ``loop``: ``Trainer``, the book's ``train_model_simple`` grown nanoGPT's options, yielding events;
- ``optimizer``: the learning-rate schedule and AdamW; ``state``: the resumable state file;
- ``run_folder``: what a run folder holds and the checks before writing one; ``distributed``: torchrun;
- ``tasks``: which task a run trains (``prepare_run``, ``trainer_for``): ``lm``, or ``classify``
  (``classify``: chapter 6); ``lora``: LoRA adapters for any task (appendix E).
- ``instruct``: ``--task instruct``, the book's chapter 7 (instruction data, its batches and masks).

The batches come from ``gptcli.training.data`` (the book's windows or nanoGPT's random ones), the training
kernels from ``gptcli.kernels.train``.

Importing this package loads none of them: each name below is imported from its module on first
use (PEP 562), so `gptcli train --help`, which reads the settings' defaults, stays quick.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "BEST_DIR": "gptcli.training.run_folder",
    "DATA_DIR": "gptcli.training.run_folder",
    "Dist": "gptcli.training.distributed",
    "LOG_FILE": "gptcli.training.run_folder",
    "PLOT_FILE": "gptcli.training.run_folder",
    "Position": "gptcli.training.state",
    "Recipe": "gptcli.training.settings",
    "Run": "gptcli.training.setup",
    "RunLog": "gptcli.training.run_folder",
    "RunRequest": "gptcli.training.setup",
    "STATE_FILE": "gptcli.training.state",
    "TrainSettings": "gptcli.training.settings",
    "Trainer": "gptcli.training.loop",
    "TrainingState": "gptcli.training.state",
    "autocast": "gptcli.training.loop",
    "available_memory": "gptcli.training.setup",
    "barrier": "gptcli.training.distributed",
    "batch_loss": "gptcli.training.loop",
    "check_data": "gptcli.training.setup",
    "check_out_dir": "gptcli.training.run_folder",
    "clear_run": "gptcli.training.run_folder",
    "dist_from_env": "gptcli.training.distributed",
    "encode_data": "gptcli.training.setup",
    "estimate_memory": "gptcli.training.setup",
    "finish_distributed": "gptcli.training.distributed",
    "init_distributed": "gptcli.training.distributed",
    "learning_rate": "gptcli.training.optimizer",
    "load_recipe": "gptcli.training.settings",
    "make_optimizer": "gptcli.training.optimizer",
    "model_from_state": "gptcli.training.state",
    "new_model": "gptcli.training.setup",
    "param_groups": "gptcli.training.optimizer",
    "prepare_run": "gptcli.training.tasks",
    "read_state": "gptcli.training.state",
    "recipe_names": "gptcli.training.settings",
    "recipes_dir": "gptcli.training.settings",
    "rewrite_log": "gptcli.training.run_folder",
    "set_dropout": "gptcli.training.setup",
    "store_data": "gptcli.training.run_folder",
    "trainer_for": "gptcli.training.tasks",
    "write_state": "gptcli.training.state",
}

__all__ = sorted(_WHERE)


_MODULES = ("classify", "distributed", "instruct", "loop", "lora", "optimizer", "run_folder", "settings", "setup", "state",
            "tasks")


def __getattr__(name: str) -> Any:
    if name in _MODULES:  # `training.setup` works before anything imported it
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _WHERE:
        raise AttributeError(f"module 'gptcli.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))

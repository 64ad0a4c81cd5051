"""Training: settings, the run folder, and one flat loop that yields events. Never prints.

- ``settings``: ``TrainSettings`` and recipes (``configs/recipes/``);
- ``setup``: ``prepare_run`` turns what ``gptcli train`` was asked (``RunRequest``) into a ``Run``:
  a new one (tokenizer, config, data tokenized and stored, seeded model) or a resumed one;
- ``loop``: ``Trainer``, the book's ``train_model_simple`` grown nanoGPT's options, yielding events;
- ``optimizer``: the learning-rate schedule and AdamW; ``state``: the resumable state file;
- ``run_folder``: what a run folder holds and the checks before writing one; ``distributed``: torchrun.

The batches come from ``gptcli.data`` (the book's windows or nanoGPT's random ones), the training
kernels from ``gptcli.train_kernels``.
"""

from gptcli.training.distributed import Dist, barrier, dist_from_env, finish_distributed, init_distributed
from gptcli.training.loop import Trainer, autocast, batch_loss
from gptcli.training.optimizer import learning_rate, make_optimizer, param_groups
from gptcli.training.run_folder import (
    BEST_DIR,
    DATA_DIR,
    LOG_FILE,
    PLOT_FILE,
    RunLog,
    check_out_dir,
    clear_run,
    rewrite_log,
    store_data,
)
from gptcli.training.settings import Recipe, TrainSettings, load_recipe, recipe_names, recipes_dir
from gptcli.training.setup import (
    Run,
    RunRequest,
    available_memory,
    check_data,
    encode_data,
    estimate_memory,
    new_model,
    prepare_run,
    set_dropout,
)
from gptcli.training.state import STATE_FILE, Position, TrainingState, model_from_state, read_state, write_state

__all__ = [
    "BEST_DIR", "DATA_DIR", "LOG_FILE", "PLOT_FILE", "STATE_FILE", "Dist", "Position", "Recipe", "Run", "RunLog",
    "RunRequest", "TrainSettings", "Trainer", "TrainingState", "autocast", "available_memory", "barrier",
    "batch_loss", "check_data", "check_out_dir", "clear_run", "dist_from_env", "encode_data", "estimate_memory",
    "finish_distributed", "init_distributed", "learning_rate", "load_recipe", "make_optimizer", "model_from_state",
    "new_model", "param_groups", "prepare_run", "read_state", "recipe_names", "recipes_dir", "rewrite_log",
    "set_dropout", "store_data", "write_state",
]

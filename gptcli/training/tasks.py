"""Which task a run trains, and the setup and trainer for it: ``lm`` (language modelling, the book's
chapter 5: ``gptcli.training.setup`` and ``Trainer``), ``instruct`` (chapter 7: the same setup and
trainer, on ``gptcli.training.instruct``'s examples, ``Run.task_data``) or ``classify`` (chapter 6:
``gptcli.training.classify``, its own setup and trainer). A new task adds its module and a branch here."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from gptcli.training.loop import Trainer
from gptcli.training.setup import Note, Run, RunRequest, Tokenizing, _ignore, _no_progress, new_run, resume_run
from gptcli.training.settings import load_recipe

if TYPE_CHECKING:
    from gptcli.kernels.train import TrainPlan


def requested_task(request: RunRequest) -> str:
    """The task a request trains: a resumed run's own (from its state file's header alone), else the
    flag's, else the recipe's, else ``lm``."""
    if request.resume is not None:
        from safetensors import safe_open

        from gptcli.training.state import STATE_FILE

        try:
            with safe_open(str(request.resume / STATE_FILE), framework="pt", device="cpu") as f:
                return json.loads((f.metadata() or {})["gptcli.settings"]).get("task", "lm")
        except Exception:  # noqa: BLE001 - missing or damaged: resume_run says what is wrong
            return "lm"
    if "task" in request.settings:
        return str(request.settings["task"])
    if request.recipe:
        return str(load_recipe(request.recipe).settings.get("task", "lm"))
    return "lm"


def prepare_run(request: RunRequest, *, note: Note = _ignore, tokenizing: Tokenizing = _no_progress) -> Run:
    """The run ``request`` asks for, new or resumed, for its task; UserError for what cannot be."""
    if requested_task(request) == "classify":
        from gptcli.training import classify

        if request.resume is not None:
            return classify.resume_classify_run(request, note=note)
        return classify.new_classify_run(request, note=note)
    if request.resume is not None:
        return resume_run(request, note=note)
    return new_run(request, note=note, tokenizing=tokenizing)


def trainer_for(run: Run, plan: "TrainPlan | None" = None) -> Trainer:
    """The trainer for a run's task."""
    if run.settings.task == "classify":
        from gptcli.training.classify import ClassifyTrainer

        return ClassifyTrainer(run, plan)
    return Trainer(run, plan)

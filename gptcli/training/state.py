"""What a run saves to resume bit for bit: ``state.safetensors`` (weights, AdamW moments, RNG states,
the place in the data; settings in its metadata). Safetensors only: never pickle."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gptcli.errors import UserError
from gptcli.run_layout import STATE_FILE  # noqa: F401 - the file this module reads and writes
from gptcli.training.settings import TrainSettings

# Metadata keys a task adds to the state (Trainer.state_extra), kept in TrainingState.extra.
EXTRA_KEYS = ("gptcli.base", "gptcli.classifier")

if TYPE_CHECKING:
    import torch

    from gptcli.config import GPTConfig
    from gptcli.training.data import Batches
    from gptcli.model.gpt import GPTModel
    from gptcli.tokenizer import Tokenizer


@dataclass
class Position:
    """Where a run is: optimizer steps done, the epoch of the next micro-batch (0-based), tokens seen,
    and the best validation loss so far."""

    step: int = 0
    epoch: int = 0
    tokens_seen: int = 0
    best_val: float = math.inf


@dataclass
class TrainingState:
    """A state file, read back: enough to rebuild the model, its optimizer and the run's place."""

    cfg: "GPTConfig"
    settings: TrainSettings
    tokenizer: "Tokenizer"
    model: dict[str, "torch.Tensor"]  # the model's state_dict (tied head left out)
    optim: dict[str, "torch.Tensor"]  # "optim.<param index>.<key>" -> AdamW's per-parameter state
    param_groups: list[dict]
    position: Position
    batch_in_epoch: int
    rng_cpu: "torch.Tensor"  # torch's global RNG
    data_generator: "torch.Tensor"  # the batches' generator
    epoch_rng: "torch.Tensor | None" = None  # the global RNG just before this epoch's shuffle
    weights_source: str = ""
    data_digest: str = ""
    threads: int | None = None  # torch's CPU threads when it was saved (None: a state from before they were kept)
    extra: dict[str, str] = field(default_factory=dict)


def write_state(path: Path, model: "GPTModel", optimizer: "torch.optim.Optimizer", *, settings: TrainSettings,
                tokenizer: "Tokenizer", position: Position, batches: "Batches", weights_source: str,
                data_digest: str, world_size: int, extra: dict[str, str] | None = None) -> None:
    """Weights, AdamW state, RNG states and the data position, as one safetensors file, atomically."""
    import torch

    from gptcli.files import save_safetensors
    from gptcli.tokenizer import to_metadata

    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name == "out_head.weight" and model.cfg.tie_weights:
            continue
        tensors[f"model.{name}"] = t.detach().to("cpu").contiguous()
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().to("cpu").contiguous()
    tensors["rng.cpu"] = torch.get_rng_state()
    tensors["rng.data"] = batches.generator.get_state()
    if batches.epoch_rng is not None:
        tensors["rng.epoch"] = batches.epoch_rng
    groups = [{k: v for k, v in g.items()} for g in opt["param_groups"]]
    meta = {
        "format": "pt",
        "gptcli.kind": "training-state",
        "gptcli.config": json.dumps({**model.cfg.to_dict(), "name": model.cfg.name}),
        "gptcli.settings": json.dumps(settings.to_dict()),
        "gptcli.param_groups": json.dumps(groups),
        "gptcli.position": json.dumps({"step": position.step, "epoch": position.epoch,
                                       "batch_in_epoch": batches.batch_in_epoch, "tokens_seen": position.tokens_seen,
                                       "best_val": None if math.isinf(position.best_val) else position.best_val}),
        "gptcli.weights_source": weights_source,
        "gptcli.data_digest": data_digest,
        "gptcli.world_size": str(world_size),
        # The sums' order depends on it: --resume reuses it, so the run continues bit for bit.
        "gptcli.threads": str(torch.get_num_threads()),
        **to_metadata(tokenizer),
        **(extra or {}),  # a task's own: a classifier's labels, a LoRA run's base weights
    }
    save_safetensors(tensors, path, meta)


def read_state(path: Path) -> TrainingState:
    """The state file; UserError if it is missing or unusable."""
    from gptcli.config import validate
    from gptcli.files import load_safetensors
    from gptcli.tokenizer import from_metadata

    if not path.is_file():
        raise UserError(f"{path.parent}: no {STATE_FILE} here, so there is no run to resume")
    try:
        meta, tensors = load_safetensors(path)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise UserError(f"{path}: corrupt training state ({type(exc).__name__}); it cannot be resumed") from None
    if meta.get("gptcli.kind") != "training-state":
        raise UserError(f"{path}: not a gptcli training state")
    try:
        raw_cfg = json.loads(meta["gptcli.config"])
        name = raw_cfg.pop("name", "custom")
        cfg = validate(raw_cfg, f"{path} config", name=name)
        settings_raw = json.loads(meta["gptcli.settings"])
        settings_raw["betas"] = tuple(settings_raw["betas"])
        settings = TrainSettings(**settings_raw)
        position = json.loads(meta["gptcli.position"])
        groups = json.loads(meta["gptcli.param_groups"])
        threads = int(meta["gptcli.threads"]) if "gptcli.threads" in meta else None
    except (KeyError, ValueError, TypeError) as exc:
        raise UserError(f"{path}: corrupt training state (metadata {exc})") from None
    return TrainingState(
        cfg=cfg, settings=settings, tokenizer=from_metadata(meta, str(path)),
        model={k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
        optim={k: v for k, v in tensors.items() if k.startswith("optim.")},
        param_groups=groups,
        position=Position(step=position["step"], epoch=position["epoch"], tokens_seen=position["tokens_seen"],
                          best_val=math.inf if position["best_val"] is None else position["best_val"]),
        batch_in_epoch=position["batch_in_epoch"],
        rng_cpu=tensors["rng.cpu"], data_generator=tensors["rng.data"], epoch_rng=tensors.get("rng.epoch"),
        weights_source=meta.get("gptcli.weights_source", ""), data_digest=meta.get("gptcli.data_digest", ""),
        threads=threads if threads is None or threads >= 1 else None,
        extra={k: v for k, v in meta.items() if k in EXTRA_KEYS},
    )


def restore_optimizer(optimizer: "torch.optim.Optimizer", state: TrainingState) -> None:
    per_param: dict[int, dict] = {}
    for key, value in state.optim.items():
        _, index, name = key.split(".", 2)
        per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state.param_groups})


def restore_position(state: TrainingState, batches: "Batches") -> Position:
    """Put the batches and torch's RNG where the saved run was; the run's Position."""
    import torch

    batches.generator.set_state(state.data_generator)
    batches.batch_in_epoch = state.batch_in_epoch
    batches.epoch_rng = state.epoch_rng
    torch.set_rng_state(state.rng_cpu)
    return Position(**vars(state.position))


def model_from_state(state: TrainingState, device: "torch.device") -> "GPTModel":
    """The model a state file holds, built on the meta device in the run's shape (a classifier's head,
    LoRA adapters) and filled with its tensors."""
    from gptcli.model.gpt import build_model

    cfg = state.cfg
    weights = dict(state.model)
    if cfg.tie_weights:
        weights["out_head.weight"] = weights["tok_emb.weight"]
    model = build_model(cfg, "meta")
    if state.settings.task == "classify" and "out_head.weight" in weights:
        from gptcli.classify import make_classifier

        make_classifier(model, weights["out_head.weight"].shape[0])
    if state.settings.lora:
        from gptcli.model.lora import add_lora

        add_lora(model, state.settings.lora, state.settings.lora_alpha)
    try:
        model.load_state_dict({k: v.to(device) for k, v in weights.items()}, strict=True, assign=True)
    except RuntimeError as exc:
        raise UserError(f"training state does not fit its config: {str(exc).splitlines()[0]}") from None
    model.tie_weights()
    for p in model.parameters():
        p.requires_grad_(True)
    return model

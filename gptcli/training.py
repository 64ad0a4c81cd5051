"""Training: settings, the run folder, and one flat loop that yields events. Never prints.

``Trainer.events()`` runs the loop and yields plain dicts, the same objects ``train.jsonl`` holds:
``start``, ``step`` (progress only, not logged), ``eval``, ``sample``, ``checkpoint`` and ``end``.
The CLI renders them (progress bar, book-style lines, JSON lines).

The loop is the book's ``train_model_simple`` (chapter 5) grown nanoGPT's options: gradient
accumulation, clipping, warm-up plus cosine learning rate, weight decay on 2-D weights only,
bfloat16 autocast, torch.compile and DistributedDataParallel under torchrun. With the book's recipe
it draws from the global RNG in the book's order (init, each DataLoader pass, dropout), so the
figures are the book's.

A run folder holds:
- ``model.safetensors`` + ``config.json``: the last weights, Hugging Face layout (``--weights DIR``);
- ``best/``: the same for the best validation loss so far;
- ``state.safetensors``: everything to resume bit for bit: weights, AdamW moments, step, RNG states,
  data position; settings in its metadata;
- ``data/train.bin``, ``data/val.bin``: the token ids (memory-mapped);
- ``train.jsonl`` (events) and ``loss.png`` (the book's loss plot).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from gptcli.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from gptcli.config import GPTConfig
    from gptcli.model import GPTModel
    from gptcli.train_kernels import TrainPlan as Plan
    from gptcli.tokenizer import Tokenizer

STATE_FILE = "state.safetensors"
LOG_FILE = "train.jsonl"
PLOT_FILE = "loss.png"
BEST_DIR = "best"
DATA_DIR = "data"
RUN_MARKERS = (STATE_FILE, LOG_FILE)  # a folder holding one of these is a training run


# --------------------------------------------------------------------------------------------
# Settings


@dataclass
class TrainSettings:
    """Hyperparameters of a run: a recipe's keys, each also a command-line flag."""

    tokenizer: str = "gpt2"  # gpt2 | char
    epochs: int | None = None  # passes over the training windows (sampling: windows)
    max_steps: int | None = None  # optimizer steps; with epochs, whichever ends first
    batch_size: int = 2  # rows per micro-batch, summed over processes
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 4e-4
    schedule: str = "constant"  # constant | cosine (linear warm-up, cosine decay to min_lr)
    warmup_steps: int = 0
    min_lr: float = 0.0
    decay_steps: int | None = None  # where cosine reaches min_lr; default: the last step
    weight_decay: float = 0.1
    decay: str = "all"  # all (the book: every parameter) | 2d (nanoGPT: matrices and embeddings only)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = None
    val_fraction: float = 0.1
    sampling: str = "windows"  # windows (the book's DataLoader) | random (nanoGPT's get_batch)
    stride: int | None = None  # windows: default context_length
    eval_every: int = 5
    eval_batches: int = 5
    sample_prompt: str | None = "Every effort moves you"
    sample_every: str | int = "epoch"  # "epoch", N steps, or 0 for never
    sample_tokens: int = 50
    save_every: int = 0  # steps between checkpoints; 0: only at the end and on Ctrl-C
    seed: int = 123
    init: str = "book"  # book (chapter 4's nn defaults) | gpt2 (N(0, 0.02), as GPT-2 and nanoGPT)
    dtype: str = "float32"  # float32 | bfloat16 (autocast: float32 weights and AdamW state) | float16
    compile: bool = False
    device: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    def validate(self) -> "TrainSettings":
        def positive(name: str, value: Any, zero_ok: bool = False) -> None:
            if value is None:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if zero_ok else 1):
                raise UserError(f"--{name.replace('_', '-')} must be a whole number {'>= 0' if zero_ok else '>= 1'}, "
                                f"got {value!r}")

        for name in ("batch_size", "grad_accum", "eval_every", "eval_batches", "epochs", "max_steps", "stride",
                     "decay_steps"):
            positive(name, getattr(self, name))
        for name in ("warmup_steps", "save_every", "sample_tokens", "seed"):
            positive(name, getattr(self, name), zero_ok=True)
        if self.epochs is None and self.max_steps is None:
            raise UserError("say how long to train: --epochs N or --max-steps N")
        if self.tokenizer not in ("gpt2", "char"):
            raise UserError(f"unknown tokenizer {self.tokenizer!r}; choose gpt2 or char")
        if self.schedule not in ("constant", "cosine"):
            raise UserError(f"unknown schedule {self.schedule!r}; choose constant or cosine")
        if self.decay not in ("all", "2d"):
            raise UserError(f"unknown weight-decay scope {self.decay!r}; choose all or 2d")
        if self.sampling not in ("windows", "random"):
            raise UserError(f"unknown sampling {self.sampling!r}; choose windows or random")
        if self.init not in ("book", "gpt2"):
            raise UserError(f"unknown init {self.init!r}; choose book or gpt2")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise UserError(f"--lr must be above 0, got {self.lr!r}")
        if not (isinstance(self.min_lr, (int, float)) and 0 <= self.min_lr <= self.lr):
            raise UserError(f"--min-lr must be in [0, lr], got {self.min_lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise UserError(f"--weight-decay must be 0 or more, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise UserError(f"betas must be two numbers in [0, 1), got {list(self.betas)!r}")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):
            raise UserError(f"--grad-clip must be above 0 (or null for none), got {self.grad_clip!r}")
        if not (isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1):
            raise UserError(f"--val-fraction must be in (0, 1), got {self.val_fraction!r}")
        if isinstance(self.sample_every, str) and self.sample_every != "epoch":
            raise UserError(f"--sample-every must be 'epoch' or a number of steps, got {self.sample_every!r}")
        if isinstance(self.sample_every, int):
            positive("sample_every", self.sample_every, zero_ok=True)
        if self.sample_every == "epoch" and self.sampling != "windows":
            raise UserError("--sample-every 'epoch' needs sampling: windows (random batches have no epochs); "
                            "give a number of steps")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"unknown training dtype {self.dtype!r}; choose float32, bfloat16 or float16")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        return self


SETTING_NAMES = {f.name for f in dataclasses.fields(TrainSettings)}
# Recipe keys that choose the model rather than how it trains.
MODEL_KEYS = ("size", "config", "model", "weights")
RECIPE_KEYS = {"description", *MODEL_KEYS, *SETTING_NAMES} - {"dtype", "compile", "device"}


@dataclass
class Recipe:
    name: str
    settings: dict[str, Any]  # TrainSettings keys
    size: str | None = None
    config: str | None = None
    model: dict[str, Any] = field(default_factory=dict)  # architecture overrides
    weights: str | None = None
    description: str = ""


def recipes_dir() -> Path:
    from gptcli.config import configs_dir

    return configs_dir() / "recipes"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def load_recipe(spec: str) -> Recipe:
    """A shipped recipe by name (``book-ch05``) or a YAML file of the same keys."""
    import yaml

    path = Path(spec).expanduser()
    if not path.is_file():
        shipped = recipes_dir() / f"{spec}.yaml"
        if not shipped.is_file():
            raise UserError(f"unknown recipe {spec!r}: not a file, and the shipped recipes are "
                            f"{', '.join(recipe_names())}")
        path = shipped
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read recipe: {exc}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if raw is None:
        raise UserError(f"{path}: the recipe file is empty")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of recipe keys")
    unknown = sorted(set(raw) - RECIPE_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown recipe key {unknown[0]!r} (allowed: {', '.join(sorted(RECIPE_KEYS))})")
    model = raw.get("model") or {}
    if not isinstance(model, dict):
        raise UserError(f"{path}: 'model' must be a mapping of config keys")
    settings = {k: v for k, v in raw.items() if k in SETTING_NAMES}
    if "betas" in settings and isinstance(settings["betas"], list):
        settings["betas"] = tuple(settings["betas"])
    return Recipe(name=path.stem, settings=settings, size=raw.get("size"), config=raw.get("config"), model=model,
                  weights=raw.get("weights"), description=str(raw.get("description", "")))


# --------------------------------------------------------------------------------------------
# Learning rate, parameters, memory


def learning_rate(step: int, s: TrainSettings, total_steps: int) -> float:
    """The lr for optimizer step ``step`` (0-based): constant, or nanoGPT's warm-up plus cosine decay."""
    if s.schedule == "constant":
        return s.lr
    if step < s.warmup_steps:
        return s.lr * (step + 1) / (s.warmup_steps + 1)
    decay_steps = s.decay_steps or total_steps
    if step > decay_steps:
        return s.min_lr
    ratio = (step - s.warmup_steps) / max(1, decay_steps - s.warmup_steps)
    return s.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (s.lr - s.min_lr)


def param_groups(model: "GPTModel", s: TrainSettings) -> list[dict]:
    """AdamW groups: every parameter decayed (the book), or only those with 2+ dimensions (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if s.decay == "all":
        return [{"params": params, "weight_decay": s.weight_decay}]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": s.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def init_gpt2(model: "GPTModel") -> None:
    """GPT-2's (and nanoGPT's) init: weights N(0, 0.02), biases zero, residual projections N(0, 0.02/sqrt(2L))."""
    import torch
    import torch.nn as nn

    std_proj = 0.02 / math.sqrt(2 * model.cfg.n_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("out_proj.weight", "ff.layers.2.weight")):
                nn.init.normal_(p, 0.0, std_proj)
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith(("scale",)):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)


def estimate_memory(cfg: "GPTConfig", micro_batch: int, autocast: bool) -> dict[str, int]:
    """Bytes a training step needs: float32 weights, gradients and AdamW's two moments (16 per parameter),
    activations kept for backward (Korthikanti et al. 2022, doubled for float32), and the logits."""
    from gptcli.params import count_params

    n = count_params(cfg).total
    T, d, L = cfg.context_length, cfg.emb_dim, cfg.n_layers
    act_bytes = 1 if autocast else 2  # the formula's 16-bit activations; float32 doubles them
    activations = micro_batch * T * L * (34 * d + 5 * cfg.n_heads * T) * act_bytes
    logits = micro_batch * T * cfg.vocab_size * 4 * 3  # logits, log-softmax, their gradient
    return {"weights": 4 * n, "gradients": 4 * n, "optimizer": 8 * n, "activations": activations + logits,
            "total": 16 * n + activations + logits}


def available_memory(device: "torch.device") -> int | None:
    """Bytes free for the run: MemAvailable on Linux for the CPU, the GPU's free memory for CUDA."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    from gptcli.devices import proc_kib

    return proc_kib("/proc/meminfo", "MemAvailable")


# --------------------------------------------------------------------------------------------
# Distributed


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    """The process's place under torchrun (RANK, WORLD_SIZE, LOCAL_RANK); one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(rank=int(os.environ.get("RANK", "0")), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def check_batch_split(s: TrainSettings, dist: Dist) -> None:
    """``--batch-size`` is the global micro-batch: every process takes an equal share of its rows."""
    if s.batch_size % dist.world:
        raise UserError(f"--batch-size {s.batch_size} does not split evenly over {dist.world} processes; "
                        f"use a multiple of {dist.world}")


def init_distributed(dist: Dist, device: "torch.device") -> "torch.device":
    """Join the process group (nccl on GPUs, gloo on the CPU); the device this process uses (its own GPU)."""
    import torch
    import torch.distributed as td

    if dist.world <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if not td.is_initialized():
        td.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def finish_distributed(dist: Dist) -> None:
    if dist.world > 1:
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class Run:
    """Everything a training run needs, prepared by ``gptcli.commands.train`` (or a test)."""

    out: Path
    settings: TrainSettings
    model: "GPTModel"
    tokenizer: "Tokenizer"
    train_ids: "np.ndarray"
    val_ids: "np.ndarray"
    device: "torch.device"
    weights_source: str  # "random (seed 123)", a path, a Hub id
    data_digest: str = ""
    dist: Dist = field(default_factory=Dist)
    resume_state: dict | None = None  # read_state() of the run folder when resuming


def plan_steps(s: TrainSettings, n_train_windows: int | None) -> tuple[int, int | None]:
    """(total optimizer steps, steps per epoch or None). Windows: epochs of len(loader) // grad_accum steps."""
    per_epoch = None
    if s.sampling == "windows":
        batches = n_train_windows // s.batch_size  # drop_last
        per_epoch = batches // s.grad_accum
        if per_epoch == 0:
            raise UserError(f"the training text makes {n_train_windows} window(s), fewer than one step "
                            f"(batch size {s.batch_size} x {s.grad_accum} accumulation)")
    totals = []
    if s.epochs is not None:
        if per_epoch is None:
            raise UserError("--epochs needs sampling: windows; with random batches give --max-steps")
        totals.append(s.epochs * per_epoch)
    if s.max_steps is not None:
        totals.append(s.max_steps)
    return min(totals), per_epoch


def autocast(device: "torch.device", dtype: str):
    """bfloat16/float16 autocast (float32 weights and AdamW state), or nothing for float32."""
    import torch

    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def batch_loss(model, x: "torch.Tensor", y: "torch.Tensor", *, device: "torch.device", dtype: str,
               plan: "Plan | None" = None, head_weight: "torch.Tensor | None" = None) -> "torch.Tensor":
    """The book's calc_loss_batch: mean cross-entropy over every position of the batch.

    ``model`` may be wrapped (torch.compile, DDP). When training with a plan whose ``head_loss`` is
    on, the output head (``head_weight``) and the cross-entropy run as one chunked function
    (``gptcli.train_kernels.head_loss``) after the model's blocks; evaluation (no grad) takes the plain route.
    """
    import torch
    import torch.nn.functional as F

    x, y = x.to(device), y.to(device)
    if plan is not None and plan.head_loss and head_weight is not None and torch.is_grad_enabled():
        from gptcli.train_kernels import head_loss

        with autocast(device, dtype):
            hidden = model(x, head=False)  # (B, T, emb_dim)
        return head_loss(hidden.flatten(0, 1).float(), head_weight, y.flatten(), dtype=getattr(torch, dtype))
    with autocast(device, dtype):
        logits = model(x)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def make_optimizer(model: "GPTModel", s: TrainSettings, plan: "Plan") -> "torch.optim.AdamW":
    """AdamW over ``param_groups``; fused (one kernel per tensor) where the plan says this torch has it."""
    import torch

    return torch.optim.AdamW(param_groups(model, s), lr=s.lr, betas=s.betas, weight_decay=s.weight_decay,
                             **({"fused": True} if plan.fused_adamw else {}))


class Trainer:
    """Runs ``run``; ``events()`` yields what happens. ``request_stop()`` (Ctrl-C) ends it after the
    current step with a checkpoint."""

    def __init__(self, run: Run):
        self.run = run
        self._stop = False

    def request_stop(self) -> None:
        self._stop = True

    # -- helpers -------------------------------------------------------------------------------

    def _loss(self, model, x: "torch.Tensor", y: "torch.Tensor") -> "torch.Tensor":
        return batch_loss(model, x, y, device=self.run.device, dtype=self.run.settings.dtype, plan=self.plan,
                          head_weight=self.run.model.out_head.weight)

    def _evaluate(self, model) -> tuple[float, float]:
        """Mean of per-batch losses over ``eval_batches`` batches of each split, in eval mode."""
        import torch

        s, run = self.run.settings, self.run
        model.eval()
        out = []
        with torch.no_grad():
            if s.sampling == "windows":
                for loader in (self.train_eval_loader, self.val_loader):
                    # The book's calc_loss_loader: iterate afresh (so the training loader reshuffles).
                    n = min(s.eval_batches, len(loader))
                    total = 0.0
                    for i, (x, y) in enumerate(loader):
                        if i >= n:
                            break
                        total += self._loss(model, x, y).item()
                    out.append(total / n)
            else:
                length = run.model.cfg.context_length
                for ids in (run.train_ids, run.val_ids):
                    losses = []
                    for _ in range(s.eval_batches):
                        x, y = self._random_batch(ids, length, whole=True)
                        losses.append(self._loss(model, x, y).item())
                    out.append(sum(losses) / len(losses))
        model.train()
        return out[0], out[1]

    def _random_batch(self, ids, length: int, whole: bool = False):
        """nanoGPT's get_batch from the data generator: this process's rows of a micro-batch, or (``whole``)
        an optimizer step's rows."""
        from gptcli.data import random_batch

        s = self.run.settings
        if whole:  # evaluation: an optimizer step's rows, all of them in every process
            return random_batch(ids, length, s.batch_size * s.grad_accum, self.data_generator)
        return random_batch(ids, length, s.batch_size, self.data_generator, rank=self.run.dist.rank,
                            world=self.run.dist.world)

    def _sample(self) -> dict:
        """Greedy continuation of the sample prompt, as the book's generate_and_print_sample."""
        from gptcli.generate import Decoder, Generation, SamplingOptions, prompt_ids

        run = self.run
        model = run.model
        model.eval()
        tok = run.tokenizer
        ids = prompt_ids(run.settings.sample_prompt or "", tok)
        options = SamplingOptions(max_new_tokens=run.settings.sample_tokens, ignore_eos=True)
        gen = Generation(Decoder(model, run.device, next(model.parameters()).dtype), ids, options,
                         eos_id=tok.eot_id, token_bytes=tok.token_bytes, context_length=model.cfg.context_length)
        gen.run()
        model.train()
        return {"prompt": run.settings.sample_prompt, "text": gen.text, "token_ids": gen.token_ids}

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self, step: int, epoch: int, tokens_seen: int, batch_in_epoch: int) -> Path:
        """Write state.safetensors (all that resuming needs), then the last weights' export."""
        from gptcli.export import save_pretrained

        run = self.run
        write_state(run.out / STATE_FILE, run, self.optimizer, step=step, epoch=epoch, tokens_seen=tokens_seen,
                    batch_in_epoch=batch_in_epoch, best_val=self.best_val, epoch_rng=self.epoch_rng,
                    data_generator=self.data_generator)
        save_pretrained(run.model, run.out, run.tokenizer)
        return run.out

    # -- the loop ------------------------------------------------------------------------------

    def events(self) -> Iterator[dict]:
        import torch

        from gptcli.data import WindowDataset, window_loader

        run, s = self.run, self.run.settings
        model, cfg = run.model, run.model.cfg
        length = cfg.context_length
        stride = s.stride or length
        self.best_val = math.inf
        self.epoch_rng: torch.Tensor | None = None
        self.data_generator = torch.Generator().manual_seed(s.seed)

        total_steps, per_epoch = check_data(run.train_ids, run.val_ids, s, length)
        if run.resume_state is not None and run.resume_state["step"] >= total_steps:
            done = run.resume_state["step"]
            raise UserError(f"the run in {run.out} already finished its {done} steps; pass --max-steps (or "
                            f"--epochs) beyond that to continue it")
        if s.sampling == "windows":
            train_set = WindowDataset(run.train_ids, length, stride)
            val_set = WindowDataset(run.val_ids, length, stride)
            self.train_loader = window_loader(train_set, s.batch_size, shuffle=True, drop_last=True,
                                              rank=run.dist.rank, world=run.dist.world)
            # Evaluation sees whole batches in every process (the same ones), so every process computes
            # the same losses as one process would, with no communication.
            # A batch here is an optimizer step's rows (batch size x accumulation).
            eval_rows = s.batch_size * s.grad_accum
            self.train_eval_loader = window_loader(train_set, eval_rows, shuffle=True, drop_last=True)
            self.val_loader = window_loader(val_set, eval_rows, shuffle=False, drop_last=False)

        from gptcli import train_kernels as speed

        self.plan = speed.plan(run.device)
        speed.prepare(model, self.plan)
        self.optimizer = make_optimizer(model, s, self.plan)
        step = 0  # optimizer steps done
        epoch = 0  # 0-based epoch of the next micro-batch
        batch_in_epoch = 0  # micro-batches of this epoch already consumed
        tokens_seen = 0
        if run.resume_state is not None:
            st = run.resume_state
            restore_optimizer(self.optimizer, st)
            step, epoch, batch_in_epoch, tokens_seen = st["step"], st["epoch"], st["batch_in_epoch"], st["tokens_seen"]
            self.best_val = st["best_val"]
            self.data_generator.set_state(st["data_generator"])
            self.epoch_rng = st["epoch_rng"]
            torch.set_rng_state(st["rng_cpu"])
        saved_step = step

        train_model = model
        if s.compile:
            train_model = speed.compile_for_training(model)
        if run.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            train_model = DistributedDataParallel(train_model, device_ids=[run.device.index] if run.device.type == "cuda" else None)

        yield {"event": "start", "step": step, "total_steps": total_steps, "steps_per_epoch": per_epoch,
               "train_tokens": len(run.train_ids), "val_tokens": len(run.val_ids),
               "params": sum(p.numel() for p in model.parameters()), "config": {**cfg.to_dict(), "bias": cfg.bias},
               "tokenizer": run.tokenizer.name, "vocab_size": run.tokenizer.vocab_size,
               "weights": run.weights_source, "device": str(run.device), "world_size": run.dist.world,
               "settings": s.to_dict(), "kernels": self.plan.to_dict(), "resumed": run.resume_state is not None}

        start_time = time.perf_counter()
        session_tokens = 0
        micro_tokens = s.batch_size * length  # tokens of one global micro-batch
        batches: Iterator | None = None
        model.train()
        reason = "done"
        while step < total_steps:
            if self._stop:
                reason = "interrupted"
                break
            # One optimizer step: grad_accum micro-batches, gradients averaged.
            lr = learning_rate(step, s, total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            epoch_of_step = epoch
            for micro in range(s.grad_accum):
                if s.sampling == "windows":
                    if batches is None:
                        # Each pass draws its shuffle seed from the global RNG: keep the RNG state from
                        # just before, so a resumed run can redraw the same order.
                        if batch_in_epoch == 0 or self.epoch_rng is None:
                            self.epoch_rng = torch.get_rng_state()
                            batches = iter(self.train_loader)
                        else:
                            now = torch.get_rng_state()
                            torch.set_rng_state(self.epoch_rng)
                            batches = iter(self.train_loader)
                            for _ in range(batch_in_epoch):
                                next(batches)
                            torch.set_rng_state(now)
                    x, y = next(batches)
                    batch_in_epoch += 1
                else:
                    x, y = self._random_batch(run.train_ids, length)
                sync = micro == s.grad_accum - 1 or run.dist.world == 1
                ctx = train_model.no_sync() if not sync else contextlib.nullcontext()
                with ctx:
                    loss = self._loss(train_model, x, y)
                    (loss / s.grad_accum).backward()
                step_loss += loss.item() / s.grad_accum
            if s.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            self.optimizer.step()
            tokens_seen += micro_tokens * s.grad_accum
            session_tokens += micro_tokens * s.grad_accum
            if run.dist.world > 1:
                step_loss = _mean_across(step_loss, run.device)
            done_step = step  # 0-based index of the step just taken
            step += 1
            epoch_end = False
            if per_epoch is not None and batch_in_epoch >= per_epoch * s.grad_accum:
                epoch_end = True
                epoch += 1
                batch_in_epoch = 0
                batches = None
            elapsed = time.perf_counter() - start_time
            shown_epoch = epoch_of_step + 1 if per_epoch is not None else tokens_seen // max(1, len(run.train_ids)) + 1
            yield {"event": "step", "step": done_step, "epoch": shown_epoch, "loss": step_loss, "lr": lr,
                   "tokens_seen": tokens_seen, "tokens_per_s": session_tokens / elapsed if elapsed > 0 else None,
                   "total_steps": total_steps}

            last = step == total_steps
            if done_step % s.eval_every == 0 or last:
                train_loss, val_loss = self._evaluate(model)
                improved = val_loss < self.best_val
                yield {"event": "eval", "step": done_step, "epoch": shown_epoch, "tokens_seen": tokens_seen,
                       "train_loss": train_loss, "val_loss": val_loss, "lr": lr}
                if improved:
                    self.best_val = val_loss
                    if run.dist.main:
                        from gptcli.export import save_pretrained

                        save_pretrained(model, run.out / BEST_DIR, run.tokenizer,
                                        {"gptcli.step": str(done_step), "gptcli.val_loss": repr(val_loss)})
            if s.sample_prompt is not None and s.sample_tokens > 0 and (
                    (s.sample_every == "epoch" and epoch_end)
                    or (isinstance(s.sample_every, int) and s.sample_every > 0 and
                        ((done_step and done_step % s.sample_every == 0) or last))):
                if run.dist.main:
                    yield {"event": "sample", "step": done_step, "epoch": shown_epoch, **self._sample()}
            if (s.save_every and done_step and done_step % s.save_every == 0) or last or self._stop:
                saved_step = step
                if run.dist.main:
                    path = self.save(step, epoch, tokens_seen, batch_in_epoch)
                    yield {"event": "checkpoint", "step": done_step, "path": str(path)}
                barrier(run.dist)
        if reason == "interrupted" and saved_step != step:  # stopped between a step's save check and the next
            if run.dist.main:
                path = self.save(step, epoch, tokens_seen, batch_in_epoch)
                yield {"event": "checkpoint", "step": step - 1, "path": str(path)}
            barrier(run.dist)
        wall = time.perf_counter() - start_time
        yield {"event": "end", "step": step - 1, "reason": reason, "wall_s": round(wall, 3),
               "tokens_per_s": round(session_tokens / wall, 1) if wall > 0 else None,
               "best_val_loss": None if math.isinf(self.best_val) else self.best_val}


def _mean_across(value: float, device: "torch.device") -> float:
    import torch
    import torch.distributed as td

    t = torch.tensor([value], dtype=torch.float64, device=device)
    td.all_reduce(t)
    return float(t.item()) / td.get_world_size()


def barrier(dist: Dist) -> None:
    if dist.world > 1:
        import torch.distributed as td

        td.barrier()


# --------------------------------------------------------------------------------------------
# The state file


def write_state(path: Path, run: Run, optimizer: "torch.optim.Optimizer", *, step: int, epoch: int,
                tokens_seen: int, batch_in_epoch: int, best_val: float, epoch_rng: "torch.Tensor | None",
                data_generator: "torch.Generator") -> None:
    """Weights, AdamW state, RNG states and the data position, as one safetensors file (never pickle)."""
    import torch

    from gptcli.export import save_safetensors
    from gptcli.tokenizer import to_metadata

    model = run.model
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
    tensors["rng.data"] = data_generator.get_state()
    if epoch_rng is not None:
        tensors["rng.epoch"] = epoch_rng
    groups = [{k: v for k, v in g.items()} for g in opt["param_groups"]]
    meta = {
        "format": "pt",
        "gptcli.kind": "training-state",
        "gptcli.config": json.dumps({**model.cfg.to_dict(), "bias": model.cfg.bias, "name": model.cfg.name}),
        "gptcli.settings": json.dumps(run.settings.to_dict()),
        "gptcli.param_groups": json.dumps(groups),
        "gptcli.position": json.dumps({"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                                       "tokens_seen": tokens_seen,
                                       "best_val": None if math.isinf(best_val) else best_val}),
        "gptcli.weights_source": run.weights_source,
        "gptcli.data_digest": run.data_digest,
        "gptcli.world_size": str(run.dist.world),
        **to_metadata(run.tokenizer),
    }
    save_safetensors(tensors, path, meta)


def read_state(path: Path) -> dict:
    """The state file as a dict: config, settings, tokenizer, weights and the rest; UserError if unusable."""
    from safetensors import safe_open

    from gptcli.config import validate
    from gptcli.tokenizer import from_metadata

    if not path.is_file():
        raise UserError(f"{path.parent}: no {STATE_FILE} here, so there is no run to resume")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
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
    except (KeyError, ValueError, TypeError) as exc:
        raise UserError(f"{path}: corrupt training state (metadata {exc})") from None
    return {
        "cfg": cfg, "settings": settings, "tokenizer": from_metadata(meta, str(path)),
        "model": {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
        "optim": {k: v for k, v in tensors.items() if k.startswith("optim.")},
        "param_groups": groups,
        "rng_cpu": tensors["rng.cpu"], "data_generator": tensors["rng.data"], "epoch_rng": tensors.get("rng.epoch"),
        "step": position["step"], "epoch": position["epoch"], "batch_in_epoch": position["batch_in_epoch"],
        "tokens_seen": position["tokens_seen"],
        "best_val": math.inf if position["best_val"] is None else position["best_val"],
        "weights_source": meta.get("gptcli.weights_source", ""), "data_digest": meta.get("gptcli.data_digest", ""),
    }


def restore_optimizer(optimizer: "torch.optim.Optimizer", state: dict) -> None:
    per_param: dict[int, dict] = {}
    for key, value in state["optim"].items():
        _, index, name = key.split(".", 2)
        per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})


def model_from_state(state: dict, device: "torch.device") -> "GPTModel":
    """The model a state file holds, built on the meta device and filled with its tensors."""
    from gptcli.model import build_model

    cfg = state["cfg"]
    weights = dict(state["model"])
    if cfg.tie_weights:
        weights["out_head.weight"] = weights["tok_emb.weight"]
    model = build_model(cfg, "meta")
    try:
        model.load_state_dict({k: v.to(device) for k, v in weights.items()}, strict=True, assign=True)
    except RuntimeError as exc:
        raise UserError(f"training state does not fit its config: {str(exc).splitlines()[0]}") from None
    model.tie_weights()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def rewrite_log(out: Path, up_to_step: int) -> None:
    """Drop logged events after ``up_to_step`` (and old ``end``/``start`` lines): a resumed run logs them anew."""
    from gptcli.export import atomic_write

    log = out / LOG_FILE
    if not log.exists():
        return
    kept = []
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("event") in ("end",):
            continue
        if ev.get("event") != "start" and ev.get("step", -1) >= up_to_step:
            continue
        kept.append(line)
    atomic_write(log, lambda tmp: tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# Preparing a run: the output folder, the data, the model


def check_out_dir(out: Path, *, resume: bool, force: bool) -> None:
    """Refuse to write into a folder that holds something else: another run (unless --force) or files."""
    if resume:
        if not out.is_dir():
            raise UserError(f"--resume {out}: no such folder")
        return
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    entries = [p.name for p in out.iterdir()]
    if not entries:
        return
    is_run = any(m in entries for m in RUN_MARKERS)
    if is_run and not force:
        if STATE_FILE not in entries:
            raise UserError(f"--out {out}: holds a training run that saved no checkpoint (nothing to resume); pass "
                            "--force to replace it, or another --out")
        raise UserError(f"--out {out}: holds another training run; pass --resume {out} to continue it, "
                        "--force to replace it, or another --out")
    if not is_run:
        raise UserError(f"--out {out}: the folder is not empty and is not a training run; choose an empty or new "
                        "folder")


def clear_run(out: Path) -> None:
    """--force: remove the files of the run in ``out`` (only those a run writes)."""
    import shutil

    for name in (STATE_FILE, LOG_FILE, PLOT_FILE, "model.safetensors", "config.json"):
        (out / name).unlink(missing_ok=True)
    for name in (BEST_DIR, DATA_DIR):
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def set_dropout(model: "GPTModel", p: float) -> None:
    """Change every dropout rate of a built model (the config's drop_rate)."""
    import torch.nn as nn

    from gptcli.model import MultiHeadAttention

    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        elif isinstance(m, MultiHeadAttention):
            m.dropout = p
    model.cfg = dataclasses.replace(model.cfg, drop_rate=p)


def encode_data(texts, tokenizer: "Tokenizer", s: TrainSettings, progress=None) -> tuple["np.ndarray", "np.ndarray"]:
    """Split and tokenize: (training ids, validation ids), in memory."""
    from gptcli import data

    text = data.join_texts(texts, tokenizer.name)
    train_text, val_text = data.split_text(text, s.val_fraction)
    total = len(text)

    def report(n: int, base: int) -> None:
        if progress is not None:
            progress(base + n, total)

    train = data.encode(train_text, tokenizer, lambda n, _: report(n, 0))
    val = data.encode(val_text, tokenizer, lambda n, _: report(n, len(train_text)))
    return train, val


def store_data(train: "np.ndarray", val: "np.ndarray", out: Path, vocab_size: int) -> tuple["np.ndarray", "np.ndarray"]:
    """Write the ids under ``out/data`` and map them back from there (they leave memory)."""
    from gptcli import data

    folder = out / DATA_DIR
    folder.mkdir(parents=True, exist_ok=True)
    data.save_ids(train, folder / "train.bin")
    data.save_ids(val, folder / "val.bin")
    return data.load_ids(folder / "train.bin", vocab_size), data.load_ids(folder / "val.bin", vocab_size)


def check_data(train_ids, val_ids, s: TrainSettings, context_length: int) -> tuple[int, int | None]:
    """Is there enough text for this run? (total steps, steps per epoch); UserError naming what is short."""
    from gptcli.data import n_windows

    stride = s.stride or context_length
    if s.sampling == "windows":
        if n_windows(len(val_ids), context_length, stride) == 0:
            raise UserError(f"the validation text has {len(val_ids)} tokens, too few for one window of "
                            f"{context_length} (+1); use more text or a larger --val-fraction")
        return plan_steps(s, n_windows(len(train_ids), context_length, stride))
    for name, ids in (("training", train_ids), ("validation", val_ids)):
        if len(ids) <= context_length:
            raise UserError(f"the {name} text has {len(ids)} tokens, too few for one window of {context_length} (+1)")
    return plan_steps(s, None)


def new_model(cfg: "GPTConfig", s: TrainSettings, device: "torch.device") -> "GPTModel":
    """A seeded model: torch.manual_seed(seed), then built in the book's draw order (then GPT-2's
    init, when asked), as the book's chapter 5 does before training."""
    import torch

    from gptcli.model import GPTModel

    torch.manual_seed(s.seed)
    with torch.device("cpu"):
        model = GPTModel(cfg)
    if s.init == "gpt2":
        init_gpt2(model)
    return model.to(device)


class RunLog:
    """train.jsonl and loss.png in the run folder: every event but progress ticks, and the plot redrawn at each eval."""

    def __init__(self, out: Path, plot: bool = True):
        self.out = out
        self.plot = plot
        self.evals: list[dict] = []
        log = out / LOG_FILE
        if log.exists():
            for line in log.read_text(encoding="utf-8").splitlines():
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if ev.get("event") == "eval":
                    self.evals.append(ev)

    def record(self, event: dict) -> None:
        if event["event"] == "step":
            return
        with open(self.out / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(event, ensure_ascii=False) + "\n")
        if event["event"] == "eval":
            self.evals.append(event)
            if self.plot:
                from gptcli.plot import plot_losses

                plot_losses(self.evals, self.out / PLOT_FILE)

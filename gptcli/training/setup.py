"""Assembling a run: from what ``gptcli train`` was asked (``RunRequest``) to a ``Run`` ready to train.

``prepare_run`` makes a new run (recipe and flags into settings, the tokenizer, the model's config,
distributed start, the data read, tokenized and stored, the model seeded) or resumes one from its
folder. Everything that can be refused is refused here, before the first step. Never prints: notes
and tokenizing progress go through callbacks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager

from gptcli.errors import UserError
from gptcli.training import run_folder
from gptcli.training.distributed import Dist, barrier, check_batch_split, dist_from_env, init_distributed
from gptcli.adapters import base_record
from gptcli.training.lora import apply_lora, check_lora, trainable_for
from gptcli.training.settings import TrainSettings, load_recipe
from gptcli.training.state import STATE_FILE, TrainingState, model_from_state, read_state

if TYPE_CHECKING:
    import numpy as np
    import torch

    from gptcli.config import GPTConfig
    from gptcli.training.data import Text
    from gptcli.training.instruct import Entry, InstructData
    from gptcli.model.gpt import GPTModel
    from gptcli.tokenizer import Tokenizer

Note = Callable[[str], None]
# Tokenizing progress: given the characters to tokenize, a context that yields a (done, total) callback or None.
Tokenizing = Callable[[int], ContextManager["Callable[[int, int], None] | None"]]


def _ignore(_message: str) -> None:
    pass


def _no_progress(_total: int) -> ContextManager[None]:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class RunRequest:
    """What ``gptcli train`` was asked, before any of it is checked. ``settings`` holds the flags that
    override the recipe's TrainSettings; ``arch`` the config overrides (--context-length, ...)."""

    data: tuple[str, ...] = ()
    out: Path | None = None
    recipe: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    arch: dict[str, Any] = field(default_factory=dict)
    beta1: float | None = None
    beta2: float | None = None
    size: str | None = None
    config: str | Path | None = None
    weights: str | None = None
    device: str = "auto"
    force: bool = False
    resume: Path | None = None
    threads: int | None = None  # --threads; None: a resumed run's own count, else configure_threads' choice


@dataclass
class Run:
    """Everything a training run needs, assembled by ``prepare_run`` (or a test)."""

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
    resume_state: TrainingState | None = None  # the run folder's state when resuming
    base: dict[str, Any] | None = None  # a --lora run's base weights (gptcli.adapters.base_record)
    # What a task other than lm trains on, which makes its own batches: gptcli.training.classify.ClassifyData,
    # gptcli.training.instruct.InstructData (train_ids/val_ids then hold its tokens end to end, for the figures).
    task_data: Any = None
    metadata: dict[str, str] = field(default_factory=dict)  # added to every checkpoint's metadata (the template)


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


def untie_head(model: "GPTModel") -> None:
    """Give a tied model its own output head, a copy of the token embedding that then trains apart from
    it: what the book's ``load_weights_into_gpt`` makes of GPT-2's weights (book-ch07 fine-tunes so)."""
    import torch.nn as nn

    model.out_head.weight = nn.Parameter(model.tok_emb.weight.detach().clone())
    model.cfg = dataclasses.replace(model.cfg, tie_weights=False)


def set_dropout(model: "GPTModel", p: float) -> None:
    """Change every dropout rate of a built model (the config's drop_rate)."""
    import torch.nn as nn

    from gptcli.model.gpt import MultiHeadAttention

    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        elif isinstance(m, MultiHeadAttention):
            m.dropout = p
    model.cfg = dataclasses.replace(model.cfg, drop_rate=p)


def encode_data(texts, tokenizer: "Tokenizer", s: TrainSettings, progress=None) -> tuple["np.ndarray", "np.ndarray"]:
    """Split and tokenize: (training ids, validation ids), in memory."""
    from gptcli.training import data

    text = data.join_texts(texts, tokenizer.name)
    train_text, val_text = data.split_text(text, s.val_fraction)
    total = len(text)

    def report(n: int, base: int) -> None:
        if progress is not None:
            progress(base + n, total)

    train = data.encode(train_text, tokenizer, lambda n, _: report(n, 0))
    val = data.encode(val_text, tokenizer, lambda n, _: report(n, len(train_text)))
    return train, val


def check_data(train_ids, val_ids, s: TrainSettings, context_length: int) -> tuple[int, int | None]:
    """Is there enough text for this run? (total steps, steps per epoch); UserError naming what is short."""
    from gptcli.training.data import n_windows

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


def choose_init(init: str, cfg: "GPTConfig") -> str:
    """The init a new model of ``cfg`` gets: ``auto`` is the book's for an untied head (the book's
    GPT_CONFIG_124M, so book-ch05 draws exactly as chapter 5) and GPT-2's for a tied one. The book's
    init with a tied head is refused: its N(0, 1) token embeddings, used as the output head too, make
    each token predict itself (a first loss near 230 on 124M, not ln(50257) = 10.8)."""
    if init == "auto":
        return "gpt2" if cfg.tie_weights else "book"
    if init == "book" and cfg.tie_weights:
        raise UserError(f"init 'book' needs an untied output head, and config {cfg.name!r} ties it to the token "
                        f"embedding (the book's N(0, 1) embeddings as the head start the loss far above "
                        f"ln({cfg.vocab_size}) = {math.log(cfg.vocab_size):.1f}); use --init gpt2 (auto's choice "
                        "here) or a config with tie_weights: false")
    return init


def new_model(cfg: "GPTConfig", s: TrainSettings, device: "torch.device") -> "GPTModel":
    """A seeded model: torch.manual_seed(seed), then built in the book's draw order (then GPT-2's
    init, when ``choose_init`` picks it), as the book's chapter 5 does before training."""
    import torch

    from gptcli.model.gpt import GPTModel

    init = choose_init(s.init, cfg)
    torch.manual_seed(s.seed)
    with torch.device("cpu"):
        model = GPTModel(cfg)
    if init == "gpt2":
        init_gpt2(model)
    return model.to(device)


# --------------------------------------------------------------------------------------------
# Checks before anything is written


def check_dtype(name: str, device: "torch.device") -> None:
    if name == "float16" and device.type == "cpu":
        raise UserError("--dtype float16 trains on GPUs only; on the CPU use bfloat16 or float32")


def resolve_dtype(settings: TrainSettings, cfg: "GPTConfig", device: "torch.device", dist: Dist) -> str | None:
    """Settle ``--dtype auto`` (in place): on the CPU bfloat16 autocast where its matmuls measured well
    ahead of float32's for this model (``gptcli.kernels.train.choose_dtype``), on a GPU bfloat16 where
    it has it; float32 otherwise. Returns why, for a note; None when the dtype was given."""
    if settings.dtype != "auto":
        return None
    import torch

    if device.type == "cpu":
        from gptcli.kernels.train import choose_dtype
        from gptcli.model.gpt import build_model

        rows = max(1, settings.batch_size // dist.world) * cfg.context_length
        settings.dtype, why = choose_dtype(build_model(cfg, "meta"), rows)
    elif device.type == "cuda" and torch.cuda.is_bf16_supported():
        settings.dtype, why = "bfloat16", "this GPU has bfloat16"
    else:
        settings.dtype, why = "float32", f"no bfloat16 measured on {device.type}"
    return f"--dtype auto: {settings.dtype}: {why}"


def check_memory(cfg: "GPTConfig", settings: TrainSettings, device: "torch.device", dist: Dist,
                 length: int | None = None) -> None:
    """Refuse a run that will not fit: estimate_memory per process against what the device has free.
    ``length``: the longest row a batch can have when shorter than the context (padded examples)."""
    from gptcli.params import human_bytes

    rows = cfg if length is None else dataclasses.replace(cfg, context_length=min(length, cfg.context_length))
    need = estimate_memory(rows, max(1, settings.batch_size // dist.world), settings.dtype != "float32")
    have = available_memory(device)
    # Processes on one CPU share its memory; each GPU has its own.
    total = need["total"] * (dist.world if device.type == "cpu" else 1)
    if have is not None and total > have:
        raise UserError(
            f"training {cfg.name} needs about {human_bytes(total)} (weights {human_bytes(need['weights'])}, gradients "
            f"{human_bytes(need['gradients'])}, AdamW {human_bytes(need['optimizer'])}, activations "
            f"{human_bytes(need['activations'])}) but {device} has {human_bytes(have)} free; use a smaller model or "
            "batch")


def check_sample_prompt(settings: TrainSettings, tok: "Tokenizer", note: Note) -> None:
    """A sample prompt the vocabulary cannot encode would fail after the first epoch's steps: such
    a run trains without samples, and says so now (``sample_prompt`` becomes None)."""
    if settings.sample_prompt is None or settings.sample_tokens == 0 or not settings.sample_prompt:
        return
    try:
        tok.encode(settings.sample_prompt)
    except UserError as exc:
        unknown = getattr(tok, "unknown", None)
        chars = unknown(settings.sample_prompt) if unknown is not None else []
        what = (f"has {', '.join(map(repr, chars[:8]))}, not in the vocabulary of {tok.vocab_size} characters"
                if chars else str(exc))
        note(f"the sample prompt {settings.sample_prompt!r} {what}; training without samples (give one made of "
             "the text's characters with --sample-prompt)")
        settings.sample_prompt = None


def check_folder_room(out: Path, cfg: "GPTConfig", n_tokens: int, vocab_size: int, resuming: bool = False) -> None:
    """The run folder's disk can take this run's checkpoints (``run_folder.folder_bytes``); a resumed
    run's folder holds them already and needs the room to rewrite one."""
    from gptcli.training.data import id_dtype
    from gptcli.params import count_params

    need = run_folder.folder_bytes(count_params(cfg).total, n_tokens, id_dtype(vocab_size).itemsize)
    run_folder.check_room(out, need, already=need["total"] - need["rewrite"] if resuming else 0, resume=resuming)


# --------------------------------------------------------------------------------------------
# New runs and resumed ones


def prepare_run(request: RunRequest, *, note: Note = _ignore, tokenizing: Tokenizing = _no_progress) -> Run:
    """The run ``request`` asks for, new or resumed (``request.resume``); UserError for what cannot be."""
    if request.resume is not None:
        return resume_run(request, note=note)
    return new_run(request, note=note, tokenizing=tokenizing)


def _settings(request: RunRequest, recipe_settings: dict[str, Any]) -> TrainSettings:
    from gptcli.devices import check_device_name

    settings = TrainSettings(**{**recipe_settings, **request.settings})
    settings.betas = (settings.betas[0] if request.beta1 is None else request.beta1,
                      settings.betas[1] if request.beta2 is None else request.beta2)
    settings.device = check_device_name(request.device)
    return settings.validate()


def _start_distributed(settings: TrainSettings) -> tuple["torch.device", Dist]:
    from gptcli.devices import resolve_device

    dist = dist_from_env()
    check_batch_split(settings, dist)
    return init_distributed(dist, resolve_device(settings.device)), dist


def _tokenizer(settings: TrainSettings, texts: "list[Text]") -> "Tokenizer":
    from gptcli.tokenizer import CharTokenizer, gpt2

    if settings.tokenizer == "char":
        return CharTokenizer.from_text("".join(t.text for t in texts))
    tok = gpt2()
    tok.encode("")  # load the BPE file now: a missing tokenizer fails before anything is built
    return tok


def _new_config(request: RunRequest, recipe, settings: TrainSettings, tok: "Tokenizer",
                note: Note = _ignore) -> "GPTConfig":
    """A new model's config: --size/--config or the recipe's, with the recipe's and the flags' changes (a
    note names what the recipe changed in a --size/--config the user gave)."""
    from gptcli.config import resolve_config
    from gptcli.weights import check_vocab

    size, config = request.size, request.config
    model_size = size if size is not None or config is not None else (recipe.size if recipe else None)
    model_config = config if config is not None else (recipe.config if recipe and size is None else None)
    recipe_model = recipe.model if recipe else {}
    overrides = {**recipe_model, **request.arch}
    cfg = resolve_config(model_size, model_config)
    changed = [f"{k} {v} (was {getattr(cfg, k)})" for k, v in recipe_model.items()
               if k not in request.arch and getattr(cfg, k, v) != v]
    if changed and (size or config):
        note(f"recipe {recipe.name} changes config {cfg.name!r}: {', '.join(changed)}; flags (--n-layers, ...) "
             "win over the recipe, or write your own recipe")
    if settings.tokenizer == "char":
        overrides["vocab_size"] = tok.vocab_size
    cfg = cfg.replace(**overrides) if overrides else cfg
    if recipe and not (size or config):
        cfg = dataclasses.replace(cfg, name=recipe.name)
    check_vocab(cfg, f"config {cfg.name!r}", tok)
    return cfg


def _fine_tuned(request: RunRequest, recipe, weights: str, settings: TrainSettings, tok: "Tokenizer",
                note: Note) -> tuple["GPTModel", "Tokenizer", str]:
    """The model to fine-tune (on the CPU, float32, trainable), the tokenizer to keep, and its source.
    A recipe's size (book-ch07: 355M) and drop_rate apply unless --size/--config/--drop-rate say otherwise."""
    import torch

    from gptcli.weights import load_model

    size = request.size if request.size or request.config or recipe is None else recipe.size
    loaded = load_model(size=size, config=request.config, weights=weights, device=torch.device("cpu"),
                        dtype=torch.float32, seed=settings.seed, note=note)
    if loaded.tokenizer.name != settings.tokenizer or loaded.tokenizer.vocab_size != tok.vocab_size:
        if settings.tokenizer == "char" and loaded.tokenizer.name == "char":
            tok = loaded.tokenizer  # fine-tuning a character model: keep its vocabulary
        else:
            raise UserError(f"{weights} was trained with the {loaded.tokenizer.name} tokenizer, not "
                            f"{settings.tokenizer}; pass --tokenizer {loaded.tokenizer.name}")
    model = loaded.model
    drop_rate = request.arch.get("drop_rate", recipe.model.get("drop_rate") if recipe else None)
    if drop_rate is not None:
        set_dropout(model, drop_rate)
    if recipe and recipe.model.get("tie_weights") is False and model.cfg.tie_weights:
        untie_head(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model, tok, loaded.source


def new_run(request: RunRequest, *, note: Note = _ignore, tokenizing: Tokenizing = _no_progress) -> Run:
    """A new run: settings from the recipe and flags, the data tokenized and stored in the run folder,
    a seeded new model (or the weights to fine-tune). Only rank 0 writes."""
    import torch

    from gptcli.training.data import digest, read_texts
    from gptcli.devices import configure_threads

    configure_threads(request.threads)  # first: the automatic count measures the load since startup
    recipe = load_recipe(request.recipe) if request.recipe else None
    settings = _settings(request, dict(recipe.settings) if recipe else {})
    if settings.task not in ("lm", "instruct"):
        raise UserError(f"task {settings.task!r} is neither language modelling nor instruct; "
                        "gptcli.training.tasks.prepare_run prepares it")
    data = request.data
    if not data and recipe is not None and recipe.data is not None:
        from gptcli.training.downloads import fetch

        data = (str(fetch(recipe.data, note=note)),)  # the recipe's own text, downloaded once and cached
    if not data:
        raise UserError("no training data: pass one or more text files, folders of *.txt, or - for stdin "
                        "(--recipe shakespeare-char or book-ch05 alone downloads its text; --resume DIR "
                        "continues a run)")
    out, device, dist, say, replace = open_new_run(request, recipe, data[0], settings, note)
    texts = read_texts(data, note=say)

    weights = request.weights or (recipe.weights if recipe else None)
    reshaped = bool(set(request.arch) - {"drop_rate"})
    # --weights random with architecture flags: GPT-2-style random weights of that shape (as classify takes them)
    random_shaped = reshaped and weights is not None and weights.strip().lower() == "random"
    if weights is not None and reshaped and not random_shaped:
        raise UserError("--weights fine-tunes a model as it is; architecture changes (--context-length, --n-layers, "
                        "--n-heads, --emb-dim) need --weights random or a new model (--size/--config)")
    if weights is not None and recipe and set(recipe.model) - {"drop_rate", "tie_weights"}:
        say(f"fine-tuning {weights}: the architecture in recipe {recipe.name!r} does not apply")
    check_dtype(settings.dtype, device)
    tok = _tokenizer(settings, texts)
    entries = _instruct_entries(texts, settings, request, recipe) if settings.task == "instruct" else None
    check_sample_prompt(settings, tok, say)
    model = None
    if weights is None:
        cfg = _new_config(request, recipe, settings, tok, say)
        settings.init = choose_init(settings.init, cfg)  # the state records the init drawn, not "auto"
        source = f"random ({settings.init} init, seed {settings.seed})"
    elif random_shaped:
        from gptcli.weights import random_model

        cfg = _new_config(request, recipe, settings, tok, say)
        model, source = random_model(cfg, settings.seed).train(), f"random (seed {settings.seed})"
    else:
        model, tok, source = _fine_tuned(request, recipe, weights, settings, tok, say)
        cfg = model.cfg
    why = resolve_dtype(settings, cfg, device, dist)  # the state records the dtype it settled on, not "auto"
    if why:
        say(why)
    check_lora(settings, cfg, has_base=weights is not None)
    task_data = None
    if entries is not None:
        task_data, train_ids, val_ids = _instruct_data(entries, tok, settings, cfg.context_length, say)
        check_memory(cfg, settings, device, dist, length=task_data.longest_row())
    else:
        check_memory(cfg, settings, device, dist)
        with tokenizing(sum(len(t.text) for t in texts) if dist.main else 0) as progress:
            train_ids, val_ids = encode_data(texts, tok, settings, progress)
        check_data(train_ids, val_ids, settings, cfg.context_length)  # before anything is written
    check_folder_room(out, cfg, len(train_ids) + len(val_ids), tok.vocab_size)
    if dist.main:
        if replace:
            run_folder.clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        train_ids, val_ids = run_folder.store_data(train_ids, val_ids, out, tok.vocab_size)
        if task_data is not None:
            task_data.save(out / run_folder.DATA_DIR)
    if model is None:
        model = new_model(cfg, settings, device)
    else:
        torch.manual_seed(settings.seed)
        model = model.to(device)
    base = None
    if settings.lora:
        base = base_record(source, model.cfg, settings.seed)
        apply_lora(model, settings)
    model.train()
    return Run(out=out, settings=settings, model=model, tokenizer=tok, train_ids=train_ids, val_ids=val_ids,
               device=device, weights_source=source, data_digest=digest(texts), dist=dist, base=base,
               task_data=task_data, metadata=task_metadata(settings))


def task_metadata(settings: TrainSettings) -> dict[str, str]:
    """What a task adds to the run's checkpoints: an instruction-tuned run's template."""
    if settings.task == "instruct":
        from gptcli.training.instruct import metadata

        return metadata()
    return {}


def _instruct_entries(texts: "list[Text]", settings: TrainSettings, request: RunRequest, recipe) -> "list[Entry]":
    """--task instruct: the entries of its JSON file (UserError naming a bad one). The progress samples
    prompt with the first validation entry, as the book, unless a flag or the recipe says otherwise."""
    from gptcli.training import instruct

    entries = instruct.read_entries(texts)
    if "sample_prompt" not in request.settings and not (recipe and "sample_prompt" in recipe.settings):
        settings.sample_prompt = instruct.sample_prompt(instruct.split_entries(entries)[1]) or None
    return entries


def _instruct_data(entries: "list[Entry]", tok: "Tokenizer", settings: TrainSettings, context_length: int,
                   note: Note) -> tuple["InstructData", "np.ndarray", "np.ndarray"]:
    """The split, tokenized examples (checked: enough for a step and a validation) and their ids end to end."""
    from gptcli.training import instruct

    if settings.max_length is None:
        settings.max_length = context_length  # the state records the length used
    elif settings.max_length > context_length:
        raise UserError(f"--max-length {settings.max_length} is longer than the model's context of {context_length} "
                        "tokens")
    data = instruct.prepare(entries, tok, max_length=settings.max_length, mask_prompt=settings.mask_prompt,
                            note=note)
    data.plan_steps(settings)
    return data, data.flat("train"), data.flat("val")


def _refuse_changes(request: RunRequest) -> None:
    """A resumed run keeps its setup: only --epochs and --max-steps may change."""
    clashing = [name for name, value in (("--recipe", request.recipe), ("--size", request.size),
                                         ("--config", request.config), ("--weights", request.weights),
                                         ("--out", request.out)) if value is not None]
    clashing += [f"--{k.replace('_', '-')}" for k in request.arch]
    clashing += [f"--{k.replace('_', '-')}" for k in request.settings
                 if k not in ("epochs", "max_steps", "decay_steps", "tokenizer")]
    if request.beta1 is not None or request.beta2 is not None:
        clashing.append("--beta1/--beta2")
    if request.force:
        clashing.append("--force")
    if clashing:
        raise UserError(f"--resume continues the run as it was set up; drop {', '.join(clashing)} (only --epochs, "
                        "--max-steps and --decay-steps may change)")


def keep_schedule(settings: TrainSettings, old_total: int, request: RunRequest, note: Note) -> None:
    """Resuming with a new length keeps the cosine decay the run was on: it still reaches --min-lr at
    the step it was heading for (later steps stay there), unless --decay-steps moves it."""
    if settings.schedule != "cosine" or settings.decay_steps is not None:
        return
    if not {"epochs", "max_steps"} & set(request.settings):
        return
    settings.decay_steps = old_total
    note(f"the learning rate keeps its schedule: cosine decay to --min-lr at step {old_total}, as before "
         "(--decay-steps N moves it)")


def resume_threads(requested: int | None, recorded: int | None, note: Note) -> int:
    """Set torch's thread count for a resumed run: the count the run recorded, so it continues bit for
    bit whatever the machine's load (or OMP_NUM_THREADS) now is; ``--threads`` overrides it, with a
    note when that changes the sums. A state without a record (older runs) gets the usual choice."""
    from gptcli.devices import available_cores, configure_threads

    if requested is None and recorded is not None:
        threads = configure_threads(recorded)
        if recorded > available_cores():
            note(f"resuming on the run's {recorded} threads, more than the {available_cores()} cores here: "
                 f"--threads {available_cores()} is faster, but no longer bit for bit the uninterrupted run")
        return threads
    threads = configure_threads(requested)
    if requested is not None and recorded is not None and requested != recorded:
        note(f"--threads {requested}: the run trained on {recorded} thread{'s' * (recorded != 1)} so far, so it "
             "will not end bit for bit as an uninterrupted run would (leave --threads out to keep "
             f"{recorded})")
    return threads


def open_new_run(request: RunRequest, recipe, first: str, settings: TrainSettings,
                 note: Note) -> tuple[Path, "torch.device", Dist, Note, bool]:
    """A new run's folder (``--out``, else runs/ the recipe or the first file's name), checked and writable,
    its device and processes; ``say`` (the notes of the main process) and whether an unsaved run there
    is replaced. Every process has looked before the first one writes. Any task."""
    out = request.out or Path("runs") / (recipe.name if recipe else Path(first).stem if first != "-" else "stdin")
    device, dist = _start_distributed(settings)
    say = note if dist.main else _ignore
    replace = run_folder.check_out_dir(out, resume=False, force=request.force)
    if replace and not request.force:
        say(f"{out} holds a run that saved no checkpoint (nothing to resume); replacing it")
    run_folder.check_writable(out)
    barrier(dist)
    return out, device, dist, say, replace


def open_resumed(request: RunRequest, note: Note) -> tuple[Path, TrainingState]:
    """The folder ``--resume`` names, checked, and its state; the thread count settled (any task)."""
    folder = request.resume
    run_folder.check_out_dir(folder, resume=True, force=False)
    _refuse_changes(request)
    state = read_state(folder / STATE_FILE)
    resume_threads(request.threads, state.threads, note)
    return folder, state


def resume_run(request: RunRequest, *, note: Note = _ignore) -> Run:
    """The run in ``request.resume``, from its state file and data/, to continue where it stopped."""
    from gptcli.training.data import digest, load_ids, read_texts
    from gptcli.devices import check_device_name

    folder, state = open_resumed(request, note)
    settings, tok = state.settings, state.tokenizer
    wanted = request.settings.get("tokenizer")
    if wanted is not None and wanted != tok.name:
        raise UserError(f"--resume {folder}: the run was trained with the {tok.name} tokenizer, not {wanted}")
    if request.data and digest(read_texts(request.data)) != state.data_digest:
        raise UserError(f"--resume {folder}: DATA differs from the text this run was trained on; resume "
                        "without DATA (the run keeps its tokens in data/)")
    try:
        train_ids = load_ids(folder / run_folder.DATA_DIR / "train.bin", tok.vocab_size)
        val_ids = load_ids(folder / run_folder.DATA_DIR / "val.bin", tok.vocab_size)
    except OSError:
        raise UserError(f"--resume {folder}: its data/ folder is missing; the run cannot continue") from None
    task_data = None
    if settings.task == "instruct":
        from gptcli.training import instruct

        task_data = instruct.load(folder / run_folder.DATA_DIR, train_ids, val_ids)
        old_total, _ = task_data.plan_steps(settings)
    else:
        old_total, _ = check_data(train_ids, val_ids, settings, state.cfg.context_length)
    for key in ("epochs", "max_steps", "decay_steps"):
        if key in request.settings:
            setattr(settings, key, request.settings[key])
    keep_schedule(settings, old_total, request, note)
    settings.device = check_device_name(request.device) if request.device != "auto" else settings.device
    settings.validate()
    check_sample_prompt(settings, tok, note)
    run_folder.check_writable(folder, resume=True)
    check_folder_room(folder, state.cfg, len(train_ids) + len(val_ids), tok.vocab_size, resuming=True)
    model, device, dist = resumed_model(folder, state, settings)
    return Run(out=folder, settings=settings, model=model, tokenizer=tok, train_ids=train_ids, val_ids=val_ids,
               device=device, weights_source=state.weights_source, data_digest=state.data_digest, dist=dist,
               resume_state=state, base=resumed_base(state), task_data=task_data, metadata=task_metadata(settings))


def resumed_model(folder: Path, state: TrainingState, settings: TrainSettings) -> tuple["GPTModel", "torch.device", Dist]:
    """A resumed run's processes and its model from the state, the weights that train marked, in train
    mode; the log cut back to the state's step. Any task."""
    device, dist = _start_distributed(settings)
    model = model_from_state(state, device)
    trainable_for(model, settings)
    model.train()
    if dist.main:
        run_folder.rewrite_log(folder, state.position.step)
    return model, device, dist


def resumed_base(state: TrainingState) -> dict[str, Any] | None:
    """The base weights a resumed --lora run recorded in its state."""
    import json

    from gptcli.adapters import BASE_KEY

    raw = state.extra.get(BASE_KEY)
    return json.loads(raw) if raw else None

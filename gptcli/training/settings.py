"""A run's settings: ``TrainSettings`` (every key also a ``gptcli train`` flag) and recipes, YAML files
of the same keys (``configs/recipes/``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptcli.errors import UserError
from gptcli.decoding.generate import check_seed

if TYPE_CHECKING:
    from gptcli.decoding.generate import SamplingOptions


@dataclass
class TrainSettings:
    """Hyperparameters of a run: a recipe's keys, each also a command-line flag."""

    # lm (language modelling, the book's ch. 5) | classify (ch. 6: gptcli.training.classify) | instruct
    # (ch. 7: gptcli.training.instruct)
    task: str = "lm"
    tokenizer: str = "gpt2"  # gpt2 | char
    mask_prompt: bool = False  # instruct: no loss on the prompt's tokens either (the book's exercise 7.2)
    max_length: int | None = None  # instruct: examples cut to this many tokens; None: the context length
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
    sample_temperature: float = 0.0  # 0: greedy, as the book's generate_and_print_sample
    sample_top_k: int | None = None
    sample_seed: int | None = None  # the samples' own generator (every sample the same seed); None: --seed
    save_every: int = 0  # steps between checkpoints; 0: only at the end and on Ctrl-C
    seed: int = 123
    # auto: book for an untied head, gpt2 for a tied one (setup.choose_init) | book (chapter 4's nn defaults)
    # | gpt2 (N(0, 0.02), as GPT-2 and nanoGPT)
    init: str = "auto"
    dtype: str = "float32"  # float32 | bfloat16 (autocast: float32 weights and AdamW state) | float16 | auto (resolved at start)
    compile: bool = False
    device: str = "auto"
    # classify: which weights train (last-block: the book's last block, final LayerNorm and head; all;
    # head), which position decides (last: the book's, padding included; last-real), the columns of
    # the data, the share held out for a test split, and undersampling every label to the rarest's count
    trainable: str | None = None  # None: last-block for classify (lm trains everything)
    label_token: str = "last"
    text_column: str | None = None
    label_column: str | None = None
    test_fraction: float = 0.0
    balance: bool = False
    # LoRA (appendix E): the adapters' rank (None: no LoRA) and alpha (the book: rank 16, alpha 16)
    lora: int | None = None
    lora_alpha: float = 16.0

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
                     "decay_steps", "max_length"):
            positive(name, getattr(self, name))
        for name in ("warmup_steps", "save_every", "sample_tokens", "seed", "sample_seed"):
            positive(name, getattr(self, name), zero_ok=True)
        positive("sample_top_k", self.sample_top_k)
        check_seed(self.seed, "--seed")  # torch's generators take 0 to 2**64 - 1: refused now, not at step 0
        if self.sample_seed is not None:
            check_seed(self.sample_seed, "--sample-seed")
        if not (isinstance(self.sample_temperature, (int, float)) and 0 <= self.sample_temperature < float("inf")):
            raise UserError(f"--sample-temperature must be 0 (greedy) or more, got {self.sample_temperature!r}")
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
        if self.init not in ("auto", "book", "gpt2"):
            raise UserError(f"unknown init {self.init!r}; choose auto, book or gpt2")
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
        self._validate_task()
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise UserError(f"unknown training dtype {self.dtype!r}; choose float32, bfloat16, float16 or auto")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        return self

    def _validate_task(self) -> None:
        if self.task not in TASKS:
            raise UserError(f"unknown task {self.task!r}; choose {', '.join(TASKS[:-1])} or {TASKS[-1]}")
        if self.task == "instruct":
            if self.tokenizer != "gpt2":
                raise UserError("--task instruct needs GPT-2's BPE (--tokenizer gpt2): its examples end and pad "
                                "with <|endoftext|>")
            if self.sampling != "windows":
                raise UserError("--task instruct batches whole examples, shuffled each epoch (the book's); "
                                "--sampling random does not apply")
        elif self.mask_prompt or self.max_length is not None:
            raise UserError(f"{'--mask-prompt' if self.mask_prompt else '--max-length'} is for --task instruct")
        if self.trainable is not None and self.trainable not in ("last-block", "all", "head"):
            raise UserError(f"unknown --trainable {self.trainable!r}; choose last-block, all or head")
        if self.trainable is not None and self.task != "classify":
            raise UserError("--trainable is for --task classify (language modelling trains every weight; "
                            "--lora trains adapters only)")
        if self.trainable is not None and self.lora:
            raise UserError("--lora trains the adapters (and a classifier's head) only; leave out --trainable")
        if self.label_token not in ("last", "last-real"):
            raise UserError(f"unknown --label-token {self.label_token!r}; choose last or last-real")
        if not (isinstance(self.test_fraction, (int, float)) and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise UserError(f"--test-fraction must be in [0, 1) and leave rows to train on with --val-fraction "
                            f"{self.val_fraction}, got {self.test_fraction!r}")
        if self.lora is not None and (not isinstance(self.lora, int) or isinstance(self.lora, bool) or self.lora < 1):
            raise UserError(f"--lora RANK must be a whole number of 1 or more (the book uses 16), got {self.lora!r}")
        if not (isinstance(self.lora_alpha, (int, float)) and 0 < self.lora_alpha < float("inf")):
            raise UserError(f"--lora-alpha must be above 0, got {self.lora_alpha!r}")

    def sampling_options(self) -> "SamplingOptions":
        """How the progress samples are drawn: the recipe's temperature and top-k, a fixed seed."""
        from gptcli.decoding.generate import SamplingOptions

        return SamplingOptions(max_new_tokens=self.sample_tokens, temperature=float(self.sample_temperature),
                               top_k=self.sample_top_k, seed=self.seed if self.sample_seed is None else self.sample_seed,
                               ignore_eos=True)


TASKS = ("lm", "classify", "instruct")
SETTING_NAMES = {f.name for f in dataclasses.fields(TrainSettings)}
# Recipe keys that choose the model rather than how it trains.
MODEL_KEYS = ("size", "config", "model", "weights")
# "data": the dataset (gptcli.training.downloads) a recipe trains on when no DATA is given.
# A recipe may say dtype "auto" (or a dtype), never how to compile or which device: those are the machine's.
RECIPE_KEYS = {"description", "data", *MODEL_KEYS, *SETTING_NAMES} - {"compile", "device"}


@dataclass
class Recipe:
    name: str
    settings: dict[str, Any]  # TrainSettings keys
    size: str | None = None
    config: str | None = None
    model: dict[str, Any] = field(default_factory=dict)  # architecture overrides
    weights: str | None = None
    description: str = ""
    data: str | None = None  # a gptcli.training.downloads name: what to train on without DATA


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
                  weights=raw.get("weights"), description=str(raw.get("description", "")),
                  data=None if raw.get("data") is None else str(raw["data"]))

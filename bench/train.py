"""Training speed: whole training steps of gptcli against transformers' ``GPT2LMHeadModel``, in one run.

    python bench/train.py                                  # every setting (~8 min on an idle 2-core machine)
    python bench/train.py --settings book-ch05 --rounds 5  # one setting, more rounds
    python bench/train.py --variants hf-fp32,gptcli-fp32   # only these variants (in every setting)
    python bench/train.py --quick                          # tiny shapes, 2 rounds: a smoke run
    python bench/train.py --output report.md               # also write the report to a file

The report (markdown) goes to stdout, progress to stderr; the exit status is 1 when a variant failed.
Run it on an otherwise idle machine: with 2 threads on 2 cores, any other busy process slows a step
several times over (the **spread** column and the load average in the header show it).

What a step is
--------------
A whole training step on one batch of random token ids (the same ids on both sides): forward, mean
cross-entropy over every position, backward, gradient clipping to norm 1.0, AdamW step, zero_grad
(set to None). Both sides use the same architecture, batch, AdamW settings (every parameter decayed)
and dtype:

- **transformers**: ``GPT2LMHeadModel(GPT2Config(...))`` in train mode, ``F.cross_entropy`` on its
  logits (upcast to float32) against the shifted ids (as gptcli; transformers' own ``labels=`` loss
  would drop one position per row), ``torch.optim.AdamW`` with torch's defaults for the CPU.
  bfloat16 is ``torch.autocast("cpu", torch.bfloat16)`` around forward and loss.
- **gptcli**: what ``gptcli train`` runs: ``gptcli.training.new_model`` (the recipe's init) in a
  ``training.Trainer`` (its training kernels, ``gptcli.kernels.train``: float32 matmuls through oneDNN,
  the chunked head and cross-entropy, fused AdamW; its optimizer and compile wrapper), timing
  ``Trainer.optimizer_step`` on random batches of the same random ids.
  ``-bf16`` is ``--dtype bfloat16``; ``-compile`` is ``--compile`` (``torch.compile`` of the model).
  ``-plain``, ``-onednn``, ``-onednn-head``, ``-onednn-head-fused``, ``-sdpa`` (not run by default)
  fix the plan to show what each part buys: ``-plain`` is gptcli before the plan existed (F.linear,
  F.cross_entropy, for-loop AdamW, torch's attention), each next one adds a part, and ``-sdpa`` is
  the whole plan but torch's attention.

Where the architectures cannot match, transformers keeps its own: GPT-2 always has biases in every
Linear and LayerNorm (the book's config has no QKV bias; shakespeare-char has no biases at all).

Settings
--------
- **book-ch05**: the book's ``GPT_CONFIG_124M`` (untied head, no QKV bias, dropout 0.1) at context
  256, batch 2, float32: the ``book-ch05`` recipe's model and batch.
- **shakespeare-char**: 4 layers, 4 heads, emb 128, context 64, vocab 65, batch 12, no dropout, tied,
  no biases: the ``shakespeare-char`` recipe.
- **124M-1024**: GPT-2 124M (tied, biases) at context 1024, batch 4, dropout 0.0 (nanoGPT's GPT-2
  pretraining setting; with dropout, attention on the CPU runs the unfused kernel and its 4 x 12 x
  1024 x 1024 matrices need several GB more), float32 and then bfloat16 autocast.

Every variant lives in its own worker process (``--worker``), so its peak RSS is its own. Workers
of a setting are started one after another; each builds its model and optimizer and warms up with
one step (two for ``-compile``: the first one compiles), then waits. The parent then asks them in turn for
one measurement per round (each round starts one worker further along), so machine drift falls on
every variant alike. A measurement is a fixed number of steps (``steps`` below); the figures are
medians over the rounds.

Columns
-------
- **tokens/s** and **ms/step**: batch x context tokens per step over the median step time (wall
  clock; with ``--clock cpu`` the worker's CPU time, which a busy neighbour does not inflate: use it
  with ``--threads 1`` on a shared machine, where two threads' spin-waits would count too).
- **spread**: (max - min) / median of the rounds' step times.
- **× hf fp32**: this variant's tokens/s over ``hf-fp32`` of the same setting; **× hf same dtype**:
  over transformers at this variant's dtype, where the run has it.
- **MFU**: model FLOPs per token (6N plus the attention term 12 L H Q T, as nanoGPT's
  ``estimate_mfu`` counts them; N without the position embedding) times tokens/s, over the peak of
  a large matmul of the same dtype measured in the same run (the faster of ``torch.mm`` and oneDNN's
  linear, 2048 x 2048 x 2048, median).
- **compile s**: the first step of a ``-compile`` variant minus a plain step (torch.compile of the
  forward and backward graphs, cold: every worker gets an empty ``TORCHINDUCTOR_CACHE_DIR``).
- **peak RSS MiB**: the worker's VmHWM at the end (Python, torch, model, AdamW, every step).

A last table times tokenizing a corpus: Tiny Shakespeare repeated 50 times (``--text``, else
``$GPTCLI_DATA_DIR/tinyshakespeare.txt`` or ``../shared/data/tinyshakespeare.txt``) through
``gptcli.training.data.encode`` with GPT-2's BPE (tiktoken's batch encoding on 2 threads) and with characters.
GPT-2's BPE needs tiktoken's cache: ``TIKTOKEN_CACHE_DIR``, or a copy of ``../shared/tiktoken-cache``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Sequence

if __package__ in (None, ""):  # run as `python bench/x.py`: put the repo root in place of bench/, so bench/'s
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # files import as bench.*, never hiding a package
from bench.report import command_line, fmt, git_commit, load_average, logger, markdown_table, utc_date, versions  # noqa: E402
from bench.workers import (  # noqa: E402
    Outcome, Worker, WorkerFailed, cpu_model, peak_rss_bytes, quiet_transformers, send, shared_text,
)

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20
PEAK_N = 2048  # the peak matmul: PEAK_N x PEAK_N x PEAK_N
TEXT_REPEAT = 50


log = logger("train bench")


# ---------------------------------------------------------------------------------------------
# What is measured


@dataclass(frozen=True)
class Setting:
    name: str
    base: str  # a shipped gptcli config
    arch: dict[str, Any]  # GPTConfig overrides
    batch: int
    recipe: str | None  # the gptcli recipe whose init and AdamW settings the gptcli side uses
    steps: int  # steps per measurement
    lr: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.999)

    def config(self):
        from gptcli.config import shipped_config

        return shipped_config(self.base).replace(**self.arch)


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("book-ch05", "book-124M", {"context_length": 256}, batch=2, recipe="book-ch05", steps=2),
    Setting("shakespeare-char", "124M", {"n_layers": 4, "n_heads": 4, "emb_dim": 128, "context_length": 64,
                                          "vocab_size": 65, "drop_rate": 0.0, "qkv_bias": False, "bias": False,
                                          "tie_weights": True, "gelu": "erf"},
            batch=12, recipe="shakespeare-char", steps=40, lr=1e-3, betas=(0.9, 0.99)),
    Setting("124M-1024", "124M", {"context_length": 1024, "drop_rate": 0.0}, batch=4, recipe=None, steps=1,
            lr=6e-4, betas=(0.9, 0.95)),
)}

# --quick: the same code paths on tiny shapes.
QUICK_ARCH = {"n_layers": 2, "n_heads": 2, "emb_dim": 64}
QUICK_SETTINGS: dict[str, Setting] = {
    "book-ch05": Setting("book-ch05", "book-124M", {**QUICK_ARCH, "context_length": 32}, 2, "book-ch05", 2),
    "shakespeare-char": Setting("shakespeare-char", "124M", {**SETTINGS["shakespeare-char"].arch, **QUICK_ARCH,
                                                             "context_length": 16}, 4, "shakespeare-char", 4,
                                lr=1e-3, betas=(0.9, 0.99)),
    "124M-1024": Setting("124M-1024", "124M", {**QUICK_ARCH, "context_length": 64, "drop_rate": 0.0}, 2, None, 2,
                         lr=6e-4, betas=(0.9, 0.95)),
}


@dataclass(frozen=True)
class Variant:
    name: str
    dtype: str  # float32 | bfloat16
    compile: bool = False
    kernels: tuple[str, bool, bool, bool] | None = None  # a fixed plan (linear, head_loss, fused_adamw, attention)

    @property
    def is_hf(self) -> bool:
        return self.name.startswith("hf-")


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("hf-fp32", "float32"),
    Variant("hf-bf16", "bfloat16"),
    Variant("gptcli-fp32", "float32"),
    Variant("gptcli-bf16", "bfloat16"),
    Variant("gptcli-fp32-compile", "float32", compile=True),
    Variant("gptcli-bf16-compile", "bfloat16", compile=True),
    # What each part of the speed plan buys (not run by default): "plain" is gptcli before it
    # (F.linear on MKL, F.cross_entropy on the whole logits, for-loop AdamW).
    Variant("gptcli-fp32-plain", "float32", kernels=("torch", False, False, False)),
    Variant("gptcli-fp32-onednn", "float32", kernels=("onednn", False, False, False)),
    Variant("gptcli-fp32-onednn-head", "float32", kernels=("onednn", True, False, False)),
    Variant("gptcli-fp32-onednn-head-fused", "float32", kernels=("onednn", True, True, False)),
    Variant("gptcli-bf16-plain", "bfloat16", kernels=("torch", False, False, False)),
    Variant("gptcli-bf16-sdpa", "bfloat16", kernels=("onednn", True, True, False)),
)}

# The variants each setting runs by default.
DEFAULT_VARIANTS: dict[str, list[str]] = {
    "book-ch05": ["hf-fp32", "gptcli-fp32", "gptcli-bf16", "gptcli-fp32-compile"],
    "shakespeare-char": ["hf-fp32", "gptcli-fp32", "gptcli-bf16", "gptcli-fp32-compile"],
    "124M-1024": ["hf-fp32", "hf-bf16", "gptcli-fp32", "gptcli-bf16"],
}
QUICK_EXCLUDED = ("-compile",)  # --quick leaves compiling out (a tiny compile still takes ~20 s)

PEAK = {"float32": "peak-fp32", "bfloat16": "peak-bf16"}
TOKENIZE = "tokenize"


def flops_per_token(cfg) -> float:
    """nanoGPT's estimate_mfu: 6N + 12 L H Q T, with N the parameters less the position embedding."""
    from gptcli.params import count_params

    n = count_params(cfg).total - cfg.context_length * cfg.emb_dim
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * cfg.context_length


# ---------------------------------------------------------------------------------------------
# Worker side


def batch_of(cfg, batch: int):
    """Random ids (seed 0) as inputs and their shift by one as targets, as a training window."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


class StepRunner:
    """One variant of one setting: build, then time ``setting.steps`` whole steps per measurement."""

    def __init__(self, setting: Setting, variant: Variant):
        self.setting, self.variant = setting, variant

    def setup(self) -> dict[str, Any]:
        import torch

        cfg = self.setting.config()
        self.cfg = cfg
        self.x, self.y = batch_of(cfg, self.setting.batch)
        start = time.perf_counter()
        if self.variant.is_hf:
            self._build_hf(cfg)
        else:
            self._build_gptcli(cfg)
        info: dict[str, Any] = {"build_s": time.perf_counter() - start}
        first = self._timed_step()  # the warm-up: AdamW's state is allocated, and -compile compiles
        if self.variant.compile:
            info["compile_s"] = max(0.0, first - self._timed_step())
        info["params"] = sum(p.numel() for p in self.model.parameters())
        info["threads"] = torch.get_num_threads()
        return info

    def _build_hf(self, cfg) -> None:
        import torch
        import torch.nn.functional as F

        transformers = quiet_transformers()
        hc = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim,
                                     n_layer=cfg.n_layers, n_head=cfg.n_heads, resid_pdrop=cfg.drop_rate,
                                     embd_pdrop=cfg.drop_rate, attn_pdrop=cfg.drop_rate,
                                     tie_word_embeddings=cfg.tie_weights, bos_token_id=0, eos_token_id=0,
                                     activation_function="gelu_new" if cfg.gelu == "tanh" else "gelu")
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(hc).train()
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=self.setting.lr, betas=self.setting.betas,
                                           weight_decay=0.1)
        autocast = self.variant.dtype == "bfloat16"

        def loss_fn():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = model(self.x).logits  # (B, T, V)
                return F.cross_entropy(logits.flatten(0, 1).float(), self.y.flatten())

        self.loss_fn = loss_fn

    def _build_gptcli(self, cfg) -> None:
        import numpy as np
        import torch

        from gptcli import training

        from gptcli.kernels import train as train_kernels
        from gptcli.tokenizer import gpt2

        settings = training.TrainSettings(max_steps=1_000_000, batch_size=self.setting.batch, lr=self.setting.lr,
                                          betas=self.setting.betas, weight_decay=0.1, decay="all", grad_clip=1.0,
                                          sampling="random", dtype=self.variant.dtype, compile=self.variant.compile,
                                          device="cpu", sample_prompt=None)
        # The recipe's init; GPT-2's N(0, 0.02) for the 124M rows (pretraining as nanoGPT does it).
        recipe = training.load_recipe(self.setting.recipe).settings if self.setting.recipe else {"init": "gpt2"}
        settings.init = recipe.get("init", "book")
        device = torch.device("cpu")
        model = training.new_model(cfg, settings, device).train()
        ids = np.concatenate([self.x.numpy().ravel(), self.y[:, -1].numpy()]).astype(np.uint16)  # the batch's tokens
        run = training.Run(out=Path("unused"), settings=settings, model=model, tokenizer=gpt2(), train_ids=ids,
                           val_ids=ids, device=device, weights_source="random")
        plan = None if self.variant.kernels is None else train_kernels.TrainPlan(*self.variant.kernels)
        # The Trainer gptcli train runs (its kernels, AdamW, compile wrapper), one optimizer step at a time.
        self.trainer = training.Trainer(run, plan=plan)
        self.model, self.plan = model, self.trainer.plan

    def step(self) -> float:
        if not self.variant.is_hf:
            return self.trainer.optimizer_step(self.setting.lr)
        return self._hf_step()

    def _hf_step(self) -> float:
        import torch

        loss = self.loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def _timed_step(self) -> float:
        start = time.perf_counter()
        self.step()
        return time.perf_counter() - start

    def measure(self) -> dict[str, Any]:
        start, cpu = time.perf_counter(), time.process_time()
        loss = 0.0
        for _ in range(self.setting.steps):
            loss = self.step()
        return {"step_s": (time.perf_counter() - start) / self.setting.steps,
                "cpu_s": (time.process_time() - cpu) / self.setting.steps, "loss": loss}


class PeakRunner:
    """The peak of a large matmul of one dtype: the faster of torch.mm and oneDNN's linear."""

    def __init__(self, dtype: str, n: int, clock: str = "wall"):
        self.dtype, self.n = dtype, n
        self.now = time.process_time if clock == "cpu" else time.perf_counter

    def setup(self) -> dict[str, Any]:
        import torch

        dt = getattr(torch, self.dtype)
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(self.n, self.n, generator=g).to(dt)
        self.b = torch.randn(self.n, self.n, generator=g).to(dt)
        self.onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        self.measure()
        return {}

    def _gflops(self, fn) -> float:
        times = []
        for _ in range(5):
            start = self.now()
            fn()
            times.append(self.now() - start)
        return 2 * self.n**3 / statistics.median(times) / 1e9

    def measure(self) -> dict[str, Any]:
        import torch

        out = {"mm_gflops": self._gflops(lambda: torch.mm(self.a, self.b))}
        if self.onednn:
            out["onednn_gflops"] = self._gflops(
                lambda: torch.ops.mkldnn._linear_pointwise(self.a, self.b, None, "none", [], ""))
        out["gflops"] = max(out.values())
        return out


class TokenizeRunner:
    """MB/s of gptcli.training.data.encode over Tiny Shakespeare x TEXT_REPEAT, GPT-2 BPE and characters."""

    def __init__(self, text_path: str, repeat: int):
        self.text_path, self.repeat = text_path, repeat

    def setup(self) -> dict[str, Any]:
        from gptcli.tokenizer import CharTokenizer, gpt2

        self.text = Path(self.text_path).read_text(encoding="utf-8") * self.repeat
        self.mb = len(self.text.encode("utf-8")) / 1e6
        self.tokenizers = {"gpt2": gpt2(), "char": CharTokenizer.from_text(self.text)}
        self.tokenizers["gpt2"].encode("")  # load the BPE file before timing
        info = {"mb": self.mb}
        info.update({f"{name}_tokens": int(n) for name, n in self._run().items()})
        return info

    def _run(self) -> dict[str, int]:
        from gptcli.training.data import encode

        return {name: len(encode(self.text, tok)) for name, tok in self.tokenizers.items()}

    def measure(self) -> dict[str, Any]:
        from gptcli.training.data import encode

        out = {}
        for name, tok in self.tokenizers.items():
            start = time.perf_counter()
            encode(self.text, tok)
            out[f"{name}_mb_s"] = self.mb / (time.perf_counter() - start)
        return out


def make_runner(args: argparse.Namespace):
    if args.worker in PEAK.values():
        return PeakRunner("float32" if args.worker == PEAK["float32"] else "bfloat16", args.peak_n, args.clock)
    if args.worker == TOKENIZE:
        return TokenizeRunner(str(args.text), args.text_repeat)
    setting = (QUICK_SETTINGS if args.quick else SETTINGS)[args.worker_setting]
    return StepRunner(setting, VARIANTS[args.worker])


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim), so that workers waiting
    for their turn hold their model and AdamW state but not the last step's activations: five 124M
    workers side by side fit in far less memory. Peak RSS (VmHWM) is unaffected."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def worker_main(args: argparse.Namespace) -> None:
    """Serve one variant: setup info first, one measurement per 'measure', peak RSS on 'finish'."""
    channel, sys.stdout = sys.stdout, sys.stderr  # stray prints must not corrupt the protocol
    import torch

    torch.set_num_threads(args.threads)
    runner = make_runner(args)
    info = runner.setup()
    release_free_memory()
    send(channel, info)
    for line in sys.stdin:
        if line.strip() == "measure":
            sample = runner.measure()
            release_free_memory()
            send(channel, sample)
        elif line.strip() == "finish":
            send(channel, {"peak_rss": peak_rss_bytes()})
            return


# ---------------------------------------------------------------------------------------------
# Parent side


def describe(sample: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sample.items())


class Pool:
    """Named workers asked in turn; a failing worker is dropped with its error."""

    def __init__(self, args: argparse.Namespace, scratch: Path):
        self.args, self.scratch = args, scratch
        self.workers: dict[str, Worker] = {}
        self.outcomes: dict[str, Outcome] = {}

    def start(self, key: str, worker: str, setting: str | None = None) -> None:
        args = self.args
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--threads", str(args.threads),
                "--peak-n", str(args.peak_n), "--text-repeat", str(args.text_repeat), "--clock", args.clock]
        if setting:
            argv += ["--worker-setting", setting]
        if args.text:
            argv += ["--text", str(args.text)]
        if args.quick:
            argv.append("--quick")
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(self.scratch / f"inductor-{key}"),
               "OMP_NUM_THREADS": str(args.threads)}
        log(f"starting {key}")
        self.outcomes[key] = Outcome()
        w = Worker(key, argv, env)
        try:
            self.outcomes[key].info.update(w.read())
            self.workers[key] = w
            log(f"{key} ready: {describe(self.outcomes[key].info)}")
        except WorkerFailed as exc:
            self.outcomes[key].error = str(exc)
            log(f"{key} failed: {exc}")
            w.close()

    def ask(self, keys: Sequence[str], command: str) -> None:
        for key in keys:
            if key not in self.workers:
                continue
            try:
                reply = self.workers[key].ask(command)
            except WorkerFailed as exc:
                self.outcomes[key].error = str(exc)
                log(f"{key} failed: {exc}")
                self.workers.pop(key).close()
                continue
            if command == "measure":
                self.outcomes[key].samples.append(reply)
            else:
                self.outcomes[key].info.update(reply)
            log(f"{key} {command}: {describe(reply)}")

    def rounds(self, keys: Sequence[str], rounds: int) -> None:
        for r in range(rounds):
            live = [k for k in keys if k in self.workers]
            log(f"round {r + 1} of {rounds}")
            shift = r % len(live) if live else 0
            self.ask(live[shift:] + live[:shift], "measure")

    def finish(self, keys: Sequence[str]) -> None:
        self.ask([k for k in keys if k in self.workers], "finish")
        for key in keys:
            worker = self.workers.pop(key, None)
            if worker is not None:
                worker.close()

    def close_all(self) -> None:
        for worker in self.workers.values():
            worker.close()
        self.workers.clear()


def run_all(args: argparse.Namespace, scratch: Path) -> Pool:
    """Peak workers live through the whole run and take a turn in every round of every setting."""
    pool = Pool(args, scratch)
    try:
        peaks = list(PEAK.values())
        for name in peaks:
            pool.start(name, name)
        for setting in args.setting_names:
            keys = [f"{setting}/{v}" for v in args.variants_of[setting]]
            for key, variant in zip(keys, args.variants_of[setting]):
                pool.start(key, variant, setting)
            pool.rounds(keys + peaks, args.rounds)
            pool.finish(keys)
        if args.text:
            pool.start(TOKENIZE, TOKENIZE)
            pool.rounds([TOKENIZE], args.rounds)
            pool.finish([TOKENIZE])
        pool.finish(peaks)
    finally:
        pool.close_all()
    return pool


# ---------------------------------------------------------------------------------------------
# The report


def cpu_info() -> tuple[str, set[str]]:
    """The CPU's name and its feature flags (avx512_bf16, amx_bf16, ...)."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return cpu_model(), flags


def header_lines(args: argparse.Namespace, load_before: str, started: datetime) -> list[str]:
    import torch

    model, flags = cpu_info()
    amx = "yes" if {"amx_bf16", "amx_tile"} & flags else "no"
    bf16 = "yes" if "avx512_bf16" in flags else "no"
    return [
        f"- Machine: {model}, {os.cpu_count()} logical CPUs, {args.threads} torch thread(s); AMX: {amx}; "
        f"AVX-512 BF16: {bf16}; oneDNN: {'yes' if torch.backends.mkldnn.is_available() else 'no'}",
        f"- Software: {versions(('torch', 'transformers', 'tiktoken'))}, Python {sys.version.split()[0]}; "
        f"gptcli commit {git_commit()}",
        f"- Date: {utc_date(started)}, {(datetime.now(timezone.utc) - started).seconds / 60:.1f} "
        f"min; load average (1, 5, 15 min) at the start: {load_before}, at the end: {load_average()}",
        command_line("bench/train.py"),
    ]


STEP_HEADER = ["setting", "variant", "tokens/s", "ms/step", "spread", "× hf fp32", "× hf same dtype", "MFU",
               "compile s", "peak RSS MiB"]


def step_rows(args: argparse.Namespace, pool: Pool, peaks: dict[str, float | None]) -> list[list[str]]:
    rows = []
    key = "cpu_s" if args.clock == "cpu" else "step_s"
    settings = QUICK_SETTINGS if args.quick else SETTINGS
    for name in args.setting_names:
        setting = settings[name]
        cfg = setting.config()
        tokens = setting.batch * cfg.context_length
        fpt = flops_per_token(cfg)

        def rate(variant: str) -> float | None:
            out = pool.outcomes.get(f"{name}/{variant}")
            step = out.median(key) if out else None
            return tokens / step if step else None

        for vname in args.variants_of[name]:
            v = VARIANTS[vname]
            out = pool.outcomes[f"{name}/{vname}"]
            if out.error and not out.samples:
                rows.append([name, vname, "failed", *["—"] * (len(STEP_HEADER) - 3)])
                continue
            tok_s = rate(vname)
            hf32 = rate("hf-fp32") if vname != "hf-fp32" else None
            same = rate("hf-bf16" if v.dtype == "bfloat16" else "hf-fp32") if not v.is_hf else None
            peak = peaks.get(v.dtype)
            mfu = tok_s * fpt / (peak * 1e9) if tok_s and peak else None
            rows.append([
                name, vname, fmt(tok_s, ",.0f"), fmt(out.median(key), ".0f", 1000),
                fmt(out.spread(key), ".0f", 100, "%"),
                fmt(tok_s / hf32 if tok_s and hf32 else None, ".2f", suffix="×"),
                fmt(tok_s / same if tok_s and same and v.dtype != "float32" else None, ".2f", suffix="×"),
                fmt(mfu, ".1f", 100, "%"), fmt(out.info.get("compile_s"), ".1f"),
                fmt(out.info.get("peak_rss"), ".0f", 1 / MIB),
            ])
    return rows


def report(args: argparse.Namespace, pool: Pool, load_before: str, started: datetime) -> str:
    peaks: dict[str, float | None] = {}
    peak_lines = []
    for dtype, key in PEAK.items():
        out = pool.outcomes.get(key, Outcome())
        peaks[dtype] = out.median("gflops")
        peak_lines.append(f"{dtype} {fmt(peaks[dtype], '.0f')} GFLOP/s (torch.mm {fmt(out.median('mm_gflops'), '.0f')}, "
                          f"oneDNN {fmt(out.median('onednn_gflops'), '.0f')}, spread "
                          f"{fmt(out.spread('gflops'), '.0f', 100, '%')})")
    settings = QUICK_SETTINGS if args.quick else SETTINGS
    shapes = []
    for name in args.setting_names:
        s = settings[name]
        c = s.config()
        shapes.append(f"{name}: {c.n_layers} layers, {c.n_heads} heads, emb {c.emb_dim}, context {c.context_length}, "
                      f"vocab {c.vocab_size}, batch {s.batch}, dropout {c.drop_rate}, "
                      f"{'tied' if c.tie_weights else 'untied'}, {s.steps} step(s) per measurement, "
                      f"{flops_per_token(c) / 1e6:.0f} MFLOP/token")
    lines = [
        "## Training steps on the CPU: gptcli vs transformers",
        "",
        *header_lines(args, load_before, started),
        f"- Setup: whole steps (forward, loss, backward, clip, AdamW, zero_grad), medians of {args.rounds} "
        "interleaved rounds after a warm-up, one worker process per variant; "
        + ("timed by the wall clock." if args.clock == "wall" else
           "timed by each worker's CPU time (`--clock cpu`), not the wall clock."),
        *[f"- {s}" for s in shapes],
        f"- Matmul peak ({args.peak_n}³, median): {'; '.join(peak_lines)}",
        "",
        markdown_table(STEP_HEADER, step_rows(args, pool, peaks), text_columns=(0, 1)),
        "",
        "tokens/s = batch × context ÷ median step time; spread = (max - min) ÷ median of the rounds; × hf = "
        "tokens/s ÷ transformers' in the same setting; MFU = tokens/s × FLOPs per token ÷ the matmul peak of "
        "the variant's dtype; compile s = first step - a later step; peak RSS = the worker's VmHWM.",
    ]
    tok = pool.outcomes.get(TOKENIZE)
    if tok is not None:
        if tok.error and not tok.samples:
            lines += ["", f"Tokenizing: failed ({tok.error})"]
        else:
            rows = [[name, fmt(tok.median(f"{name}_mb_s"), ".1f"), fmt(tok.spread(f"{name}_mb_s"), ".0f", 100, "%"),
                     fmt(tok.info.get(f"{name}_tokens"), ",.0f")] for name in ("gpt2", "char")]
            lines += ["", f"Tokenizing Tiny Shakespeare × {args.text_repeat} ({fmt(tok.info.get('mb'), '.1f')} MB) "
                      "with `gptcli.training.data.encode` (peak RSS "
                      f"{fmt(tok.info.get('peak_rss'), '.0f', 1 / MIB)} MiB):", "",
                      markdown_table(["tokenizer", "MB/s", "spread", "tokens"], rows)]
    elif not args.no_tokenize:
        lines += ["", "Tokenizing: skipped (no tinyshakespeare.txt found; pass --text FILE)."]
    failures = [f"- {n}: {o.error}" for n, o in pool.outcomes.items() if o.error]
    if failures:
        lines += ["", "Failures:", *failures]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Command line


def tiktoken_cache(scratch: Path) -> None:
    """Point tiktoken at a private copy of ../shared/tiktoken-cache when no cache is set (tiktoken
    deletes a cached file whose hash does not match, so never at the original)."""
    if os.environ.get("TIKTOKEN_CACHE_DIR"):
        return
    shared = REPO.parent / "shared" / "tiktoken-cache"
    if shared.is_dir():
        target = scratch / "tiktoken-cache"
        shutil.copytree(shared, target)
        os.environ["TIKTOKEN_CACHE_DIR"] = str(target)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, from: {', '.join(SETTINGS)}")
    p.add_argument("--variants", help=f"comma-separated, from: {', '.join(VARIANTS)} (default: each setting's own)")
    p.add_argument("--rounds", type=int, help="measurements per variant after the warm-up (default 3; --quick 2)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every worker (default 2)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="time steps by the wall clock (default) or by the worker's CPU time: with --threads 1 on "
                        "a shared machine, a busy neighbour takes wall time but not CPU time")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny shapes, no compiling, 2 rounds")
    p.add_argument("--text", type=Path, help="the corpus to tokenize (default: tinyshakespeare.txt, see above)")
    p.add_argument("--no-tokenize", action="store_true", help="skip the tokenizing table")
    p.add_argument("--text-repeat", type=int, help=f"times the corpus is repeated (default {TEXT_REPEAT}; --quick 2)")
    p.add_argument("--peak-n", type=int, help=f"size of the peak matmul (default {PEAK_N}; --quick 256)")
    p.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout: also run its Shakespeare recipe against gptcli "
                   "train as whole processes (bench/shakespeare_recipe.py, --recipe-rounds rounds, ~1.5 min each; "
                   "--quick: 20 steps)")
    p.add_argument("--recipe-rounds", type=int, default=3, help="with --nanogpt: interleaved rounds (default 3)")
    p.add_argument("--output", type=Path, help="also write the report to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-setting", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, (full, small) in {"rounds": (3, 2), "text_repeat": (TEXT_REPEAT, 2), "peak_n": (PEAK_N, 256)}.items():
        if getattr(args, key) is None:
            setattr(args, key, small if args.quick else full)
    if args.worker:
        return args
    args.setting_names = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = [n for n in args.setting_names if n not in SETTINGS]
    if unknown:
        p.error(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    wanted = [n.strip() for n in args.variants.split(",") if n.strip()] if args.variants else None
    if wanted is not None and [n for n in wanted if n not in VARIANTS]:
        p.error(f"unknown variant(s) {', '.join(n for n in wanted if n not in VARIANTS)}; choose from "
                f"{', '.join(VARIANTS)}")
    args.variants_of = {}
    for name in args.setting_names:
        names = wanted if wanted is not None else DEFAULT_VARIANTS[name]
        if args.quick and wanted is None:
            names = [n for n in names if not n.endswith(QUICK_EXCLUDED)]
        args.variants_of[name] = names
    if args.rounds < 1:
        p.error("--rounds must be 1 or more")
    args.text = None if args.no_tokenize else shared_text("tinyshakespeare.txt", args.text)
    if args.text is not None and not args.text.is_file():
        p.error(f"--text {args.text}: no such file")
    if args.nanogpt is not None:
        from bench import shakespeare_recipe

        if args.recipe_rounds < 1:
            p.error("--recipe-rounds must be 1 or more")
        args.recipe = shakespeare_recipe.parse_args(
            ["--nanogpt", str(args.nanogpt), "--rounds", str(args.recipe_rounds), "--threads", str(args.threads),
             *(["--max-steps", "20"] if args.quick else []), *(["--text", str(args.text)] if args.text else [])],
            prog=f"{p.prog} --nanogpt")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return
    load_before, started = load_average(), datetime.now(timezone.utc)
    scratch = Path(tempfile.mkdtemp(prefix="gptcli-train-bench-"))
    try:
        tiktoken_cache(scratch)
        pool = run_all(args, scratch)
        text = report(args, pool, load_before, started)
        if args.nanogpt is not None:
            from bench import shakespeare_recipe

            text += "\n" + "\n".join(shakespeare_recipe.run(args.recipe, "bench/train.py")) + "\n"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    sys.stdout.write(text)
    if args.output:
        args.output.write_text(text)
    if any(o.error for o in pool.outcomes.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Decoding speed: gptcli against transformers' ``GPT2LMHeadModel.generate``, side by side in one run.

    python bench/decode.py                                   # 124M, every variant, 5 rounds
    python bench/decode.py --variants hf-fp32,gptcli-fp32 --rounds 3
    python bench/decode.py --size 1558M --variants gptcli-fp32,gptcli-int8 --rounds 2 --no-processes
    python bench/decode.py --quick                           # a tiny GPT-2 and a few tokens: a smoke run
    python bench/decode.py --output report.md                # also write the report to a file

The report (markdown) goes to stdout, progress to stderr; the exit status is 1 when a variant failed.
A full run takes several minutes (five cold compiles among them). Run it on an otherwise idle machine:
with 2 threads on 2 cores, any other busy process slows a step many times over (the **spread**
column shows it).

Setup
-----
One checkpoint serves both sides: random GPT-2 weights drawn by transformers
(``GPT2LMHeadModel(GPT2Config(...))`` after ``torch.manual_seed(0)``) and written with
``save_pretrained`` to a temporary folder (``--checkpoint DIR`` reuses such a folder, ``--keep`` keeps
it). transformers loads it with ``from_pretrained``; gptcli with ``gptcli.runtime.load_for_inference``,
then ``make_decoder`` (or ``BatchDecoder``), as ``gptcli generate`` does.

Every variant lives in its own worker process (``bench/decode.py --worker VARIANT``), started one
after another and kept alive. Each loads the model, warms up (one full measurement, after the
compile for ``-compile`` variants) and then waits. The parent asks the workers in turn for one
measurement per round, so only one of them runs at a time and machine drift is spread over every
variant alike; each round starts one worker further along. A memory-bandwidth worker takes its turn
in the same rotation. Figures are medians over the rounds.

Variants: ``hf-fp32``, ``hf-bf16`` (transformers); ``gptcli-fp32``, ``gptcli-bf16`` (eager);
``gptcli-fp32-compile``, ``gptcli-bf16-compile`` (``make_decoder(compile=True)``); ``gptcli-int8`` and
``gptcli-int8-compile`` (``prepare_model(quantize="int8")``, bfloat16 activations); ``gptcli-int4`` and
``gptcli-int4-compile`` (``prepare_model(quantize="int4")``, the default group size, bfloat16
activations); ``gptcli-fp32-batch8`` (8 prompts through ``generate_batch``). A variant that fails
shows "failed" (its error is on stderr and under the table); the others go on.

Each measurement decodes greedily, batch 1, from an 8-token prompt ("Hello, I am a language model,")
for ``--new-tokens`` (128) tokens with EOS ignored (gptcli: ``SamplingOptions(ignore_eos=True)``;
transformers: ``min_new_tokens = max_new_tokens``, ``pad_token_id=50256``, its default attention
and cache), then runs a ``--prefill-tokens`` (512) token prompt for one new token.

Columns
-------
- **decode tok/s**: new tokens after the first, divided by the time they took (prompt excluded).
  gptcli: ``Timings.decode_tokens_per_s``. transformers: a logits processor records the time of each
  step; the rate is (N - 1) / (time of step N - time of step 1), the same span of N - 1 forward
  passes and picks. For ``-batch8`` it is the aggregate over 8 prompts (4 lengths, left-padded).
- **spread**: (max - min) / median of decode tok/s over the rounds; a large one means the machine
  was busy (rerun, or add rounds).
- **vs ref**: decode tok/s divided by the reference variant's (named in **ref**): transformers at
  the same dtype (float32 for int8 and int4, whose activations are bfloat16), and gptcli-fp32 for batch 8.
- **% limit** and **limit tok/s**: batch 1 decoding reads every weight once per token, so
  tok/s <= bandwidth / bytes read per token. Bytes per token = every Linear weight of the blocks
  plus the head matrix (the embedding lookups, biases, norms and the KV cache are left out) at the
  variant's bytes per element: 4 (fp32), 2 (bf16), 1 (int8; its per-row scales, 2 bytes per row,
  are left out), 0.5 + 4 / group for int4 (half a byte, plus a bfloat16 scale and zero per group:
  0.625 at group 32; the head's 15 padding rows are left out). Bandwidth is measured in the same run:
  the median time of ``t.sum()`` over a 1 GiB float32 tensor with ``--threads`` threads. For a
  batch of 8, one read serves 8 tokens, so its limit is 8 times higher.
- **prefill tok/s**: prompt tokens / the time to the first new token, on the 512-token prompt
  (gptcli: ``Timings.prefill_tokens_per_s``; transformers: from calling ``generate`` to its first
  logits processor call). Not measured for batch 8.
- **TTFT ms**: time to the first new token on the 8-token prompt, the same way (batch 8: the first
  token of all rows).
- **load s**: the worker's model load, after the imports: ``from_pretrained``; for gptcli
  ``load_for_inference`` (memory-mapped, int8/int4 quantizing, the kernel choice and the weights' new
  layouts included, as ``gptcli generate`` loads) + building the decoder.
- **tune s**: of load s, the time ``gptcli.kernels.decode.tune`` spent measuring kernels. All workers share
  one fresh ``GPTCLI_CACHE_DIR``: the first worker of a dtype and mode (eager or compiled) measures,
  the others read its choice (0.00). The **kernels** line under the table says what was chosen.
- **compile s**: ``CompiledDecoder.warm_up()``, torch.compile of the decode step, cold: every worker
  gets an empty ``TORCHINDUCTOR_CACHE_DIR`` (the cache table below shows the warm figure).
- **peak RSS MiB**: the worker's VmHWM at the end (Python, torch, the model, compile, every run).

Two more tables time whole ``gptcli`` processes (the venv's ``gptcli`` next to ``sys.executable``,
wall time, median of ``--process-runs``) and torch.compile's on-disk cache: ``gptcli generate
--compile --json`` twice in fresh processes sharing a fresh ``TORCHINDUCTOR_CACHE_DIR`` (cold, then
warm), reporting each process's wall time and its ``timings.compile_s`` when the CLI reports one.
``gptcli generate`` needs GPT-2's tokenizer: offline, point ``TIKTOKEN_CACHE_DIR`` at a copy of
tiktoken's cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

if __package__ in (None, ""):  # run as `python bench/x.py`: put the repo root in place of bench/, so bench/'s
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # files import as bench.*, never hiding a package
from bench.report import command_line, date_line, fmt, invocation, logger, machine_line, markdown_table  # noqa: E402
from bench.workers import (  # noqa: E402
    Outcome, Worker, WorkerFailed, gptcli_command, peak_rss_bytes, quiet_transformers, send,
)

if TYPE_CHECKING:
    from gptcli.decoding.generate import Timings

REPO = Path(__file__).resolve().parent.parent

PROMPT_TEXT = "Hello, I am a language model,"
SHORT_PROMPT = [15496, 11, 314, 716, 257, 3303, 2746, 11]  # PROMPT_TEXT in GPT-2's tokens
EOS_ID = 50256
BATCH_ROWS = 8
BANDWIDTH = "bandwidth"  # the worker that measures memory bandwidth
MIB = 2**20


# ---------------------------------------------------------------------------------------------
# What is measured


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that matter here; builds transformers' config and counts the bytes per token."""

    name: str
    vocab: int
    context: int
    emb: int
    heads: int
    layers: int

    def weights_read_per_token(self) -> int:
        """Elements of the matrices one decode step reads: the blocks' Linear weights and the head."""
        return self.layers * 12 * self.emb**2 + self.vocab * self.emb

    def hf_config(self) -> dict[str, int]:
        return {"vocab_size": self.vocab, "n_positions": self.context, "n_embd": self.emb,
                "n_head": self.heads, "n_layer": self.layers}


TINY = ModelShape("tiny", vocab=50257, context=1024, emb=64, heads=2, layers=2)


def model_shape(size: str) -> ModelShape:
    """``tiny`` or a shipped GPT-2 size (124M, 1558M, xl, ...)."""
    if size.lower() == "tiny":
        return TINY
    from gptcli.config import shipped_config

    cfg = shipped_config(size)
    return ModelShape(cfg.name, cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_heads, cfg.n_layers)


def checkpoint_shape(folder: Path) -> ModelShape:
    """The shape in a ``save_pretrained`` folder's config.json, named after the GPT-2 size it matches."""
    import dataclasses

    from gptcli.config import GPT2_SIZES

    c = json.loads((folder / "config.json").read_text())
    shape = ModelShape(str(folder), c["vocab_size"], c["n_positions"], c["n_embd"], c["n_head"], c["n_layer"])
    for size in ("tiny", *GPT2_SIZES):
        known = model_shape(size)
        if dataclasses.replace(shape, name=known.name) == known:
            return known
    return shape


@dataclass(frozen=True)
class Variant:
    name: str
    dtype: str  # of the activations, and of the weights unless quantized
    reference: str | None = None  # the variant "vs ref" divides by
    compile: bool = False
    quantize: str | None = None
    batch: int = 1

    @property
    def is_hf(self) -> bool:
        return self.name.startswith("hf-")

    @property
    def bytes_per_weight(self) -> float:
        if self.quantize == "int4":
            from gptcli.kernels.quantize import INT4_DEFAULT_GROUP_SIZE

            return 0.5 + 2 * 2 / INT4_DEFAULT_GROUP_SIZE  # a bfloat16 scale and zero per group
        return 1 if self.quantize == "int8" else {"float32": 4, "bfloat16": 2}[self.dtype]


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("hf-fp32", "float32"),
    Variant("hf-bf16", "bfloat16"),
    Variant("gptcli-fp32", "float32", "hf-fp32"),
    Variant("gptcli-bf16", "bfloat16", "hf-bf16"),
    Variant("gptcli-fp32-compile", "float32", "hf-fp32", compile=True),
    Variant("gptcli-bf16-compile", "bfloat16", "hf-bf16", compile=True),
    Variant("gptcli-int8", "bfloat16", "hf-fp32", quantize="int8"),
    Variant("gptcli-int8-compile", "bfloat16", "hf-fp32", compile=True, quantize="int8"),
    Variant("gptcli-int4", "bfloat16", "hf-fp32", quantize="int4"),
    Variant("gptcli-int4-compile", "bfloat16", "hf-fp32", compile=True, quantize="int4"),
    Variant("gptcli-fp32-batch8", "float32", "gptcli-fp32", batch=BATCH_ROWS),
)}
QUICK_VARIANTS = "hf-fp32,gptcli-fp32,gptcli-fp32-batch8"


def long_prompt(n: int) -> list[int]:
    """``n`` fixed, varied token ids."""
    return [(17 + 7919 * i) % 50000 for i in range(n)]


def batch_prompts() -> list[list[int]]:
    """8 prompts of 8, 7, 6 and 5 tokens (twice), so the batch is left-padded."""
    return [SHORT_PROMPT[i % 4 :] for i in range(BATCH_ROWS)]


log = logger("decode bench")


# ---------------------------------------------------------------------------------------------
# Worker side: one process per variant, JSON lines on stdin/stdout


@dataclass(frozen=True)
class Workload:
    checkpoint: str
    new_tokens: int
    prefill_tokens: int
    bandwidth_mib: int


def measurement(decode_tok_s: float | None, ttft_s: float | None, prefill_tok_s: float | None) -> dict[str, Any]:
    return {"decode_tok_s": decode_tok_s, "ttft_s": ttft_s, "prefill_tok_s": prefill_tok_s}


class Runner(Protocol):
    def setup(self) -> dict[str, float]: ...  # load (and compile), warm up; load_s and maybe compile_s

    def measure(self) -> dict[str, Any]: ...


class StepClock:
    """A transformers logits processor that only records when each step's logits are ready."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self.times.append(time.perf_counter())
        return scores


class VariantRunner:
    def __init__(self, variant: Variant, work: Workload):
        self.variant = variant
        self.work = work


class HFRunner(VariantRunner):
    def setup(self) -> dict[str, float]:
        import torch

        transformers = quiet_transformers()
        dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        start = time.perf_counter()
        self.model = transformers.GPT2LMHeadModel.from_pretrained(
            self.work.checkpoint, **{dtype_kw: getattr(torch, self.variant.dtype)}).eval()
        load_s = time.perf_counter() - start
        self.measure()
        return {"load_s": load_s}

    def _step_times(self, ids: list[int], new_tokens: int) -> list[float]:
        """Seconds from calling generate() to each step's logits."""
        import torch
        from transformers import LogitsProcessorList

        clock = StepClock()
        x = torch.tensor([ids])
        start = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, num_beams=1,
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=EOS_ID,
                                logits_processor=LogitsProcessorList([clock]))
        return [t - start for t in clock.times]

    def measure(self) -> dict[str, Any]:
        steps = self._step_times(SHORT_PROMPT, self.work.new_tokens)
        decode = (len(steps) - 1) / (steps[-1] - steps[0]) if len(steps) > 1 else None
        prefill_s = self._step_times(long_prompt(self.work.prefill_tokens), 1)[0]
        return measurement(decode, steps[0], self.work.prefill_tokens / prefill_s)


def no_text(_token_id: int) -> bytes:
    """Token bytes for gptcli's text streams: the workers need no tokenizer."""
    return b""


class GptcliRunner(VariantRunner):
    def setup(self) -> dict[str, float]:
        import torch

        from gptcli.decoding.batch import BatchDecoder
        from gptcli.decoding.generate import make_decoder
        from gptcli.runtime import InferenceOptions, load_for_inference

        v = self.variant
        start = time.perf_counter()
        # The front door generate uses; the worker keeps the thread count it was started with.
        runtime = load_for_inference(InferenceOptions(
            weights=self.work.checkpoint, device="cpu", dtype=v.dtype, seed=0, quantize=v.quantize,
            threads=torch.get_num_threads(), kernels="compiled" if v.compile else "eager"))
        model, cpu, dtype = runtime.model, runtime.device, runtime.dtype
        self.context_length = runtime.cfg.context_length
        self.decoder = BatchDecoder(model, cpu, dtype) if v.batch > 1 else make_decoder(model, cpu, dtype,
                                                                                         compile=v.compile)
        info = {"load_s": time.perf_counter() - start}
        if runtime.kernel_plan is not None:
            info["tune_s"] = runtime.tune_seconds or 0.0
            info["kernels"] = runtime.kernel_counts
        if v.compile:
            info["compile_s"] = self.decoder.warm_up()
        self.measure()
        # Mapped weights pack on a thread after the first forward (gptcli.kernels.decode.apply(lazy=True)):
        # the rounds time the packed kernels, the warm-up above decoded while packing.
        from gptcli.kernels.decode import wait_packed

        wait_packed(model)
        return info

    def _timings(self, ids: list[int], new_tokens: int) -> "Timings":
        from gptcli.decoding.generate import Generation, SamplingOptions

        options = SamplingOptions(max_new_tokens=new_tokens, ignore_eos=True)
        return Generation(self.decoder, ids, options, token_bytes=no_text,
                          context_length=self.context_length).run().timings

    def measure(self) -> dict[str, Any]:
        if self.variant.batch > 1:
            from gptcli.decoding.batch import generate_batch
            from gptcli.decoding.generate import SamplingOptions

            options = SamplingOptions(max_new_tokens=self.work.new_tokens, ignore_eos=True)
            _, t = generate_batch(self.decoder, batch_prompts(), options, token_bytes=no_text)
            return measurement(t.decode_tokens_per_s, t.prefill_s, None)
        t = self._timings(SHORT_PROMPT, self.work.new_tokens)
        prefill = self._timings(long_prompt(self.work.prefill_tokens), 1)
        return measurement(t.decode_tokens_per_s, t.prefill_s, prefill.prefill_tokens_per_s)


class BandwidthRunner:
    """Memory read bandwidth: the median time of summing a large float32 tensor."""

    def __init__(self, work: Workload):
        self.work = work

    def setup(self) -> dict[str, float]:
        import torch

        self.data = torch.ones(self.work.bandwidth_mib * MIB // 4)  # filled, so every page is touched
        self.measure()
        return {}

    def measure(self) -> dict[str, Any]:
        times = []
        for _ in range(11):
            start = time.perf_counter()
            self.data.sum()
            times.append(time.perf_counter() - start)
        return {"gb_s": self.data.numel() * 4 / statistics.median(times) / 1e9}


def make_runner(name: str, work: Workload) -> Runner:
    if name == BANDWIDTH:
        return BandwidthRunner(work)
    variant = VARIANTS[name]
    return HFRunner(variant, work) if variant.is_hf else GptcliRunner(variant, work)


def worker_main(name: str, work: Workload, threads: int) -> None:
    """Serve one variant: 'ready' after setup, one measurement per 'measure', peak RSS on 'finish'."""
    channel, sys.stdout = sys.stdout, sys.stderr  # stray prints must not corrupt the protocol
    import torch

    torch.set_num_threads(threads)
    runner = make_runner(name, work)
    send(channel, runner.setup())
    for line in sys.stdin:
        if line.strip() == "measure":
            send(channel, runner.measure())
        elif line.strip() == "finish":
            send(channel, {"peak_rss": peak_rss_bytes()})
            return


def write_checkpoint(folder: Path, shape: ModelShape) -> None:
    """Random GPT-2 weights from transformers (seed 0), saved as one safetensors file and config.json."""
    import torch

    transformers = quiet_transformers()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape.hf_config()))
    model.save_pretrained(folder, max_shard_size="1000GB")


# ---------------------------------------------------------------------------------------------
# Parent side: start the workers, interleave the rounds


def worker_argv(name: str, work: Workload, threads: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--checkpoint", work.checkpoint,
            "--new-tokens", str(work.new_tokens), "--prefill-tokens", str(work.prefill_tokens),
            "--bandwidth-mib", str(work.bandwidth_mib), "--threads", str(threads)]


def describe(sample: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, (int, float)) else f"{k} {v}"
                     for k, v in sample.items() if v is not None)


def start_workers(names: Sequence[str], work: Workload, threads: int, scratch: Path,
                  outcomes: dict[str, Outcome]) -> dict[str, Worker]:
    """One at a time, so no load or compile competes with another. Each gets an empty Inductor cache."""
    workers: dict[str, Worker] = {}
    for name in names:
        log(f"starting {name}")
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(scratch / f"inductor-{name}"),
               "GPTCLI_CACHE_DIR": str(scratch / "gptcli-cache")}  # kernel choices: measured by the first worker
        worker = Worker(name, worker_argv(name, work, threads), env)
        try:
            outcomes[name].info.update(worker.read())
            workers[name] = worker
            log(f"{name} ready: {describe(outcomes[name].info)}")
        except WorkerFailed as exc:
            outcomes[name].error = str(exc)
            log(f"{name} failed: {exc}")
            worker.close()
    return workers


def ask_each(workers: dict[str, Worker], outcomes: dict[str, Outcome], command: str, order: Sequence[str]) -> None:
    """Send ``command`` to each live worker in ``order``; a failing worker is dropped with its error."""
    for name in order:
        if name not in workers:
            continue
        try:
            reply = workers[name].ask(command)
        except WorkerFailed as exc:
            outcomes[name].error = str(exc)
            log(f"{name} failed: {exc}")
            workers.pop(name).close()
            continue
        if command == "measure":
            outcomes[name].samples.append(reply)
        else:
            outcomes[name].info.update(reply)
        log(f"{name} {command}: {describe(reply)}")


def run_rounds(names: Sequence[str], work: Workload, threads: int, rounds: int,
               scratch: Path) -> dict[str, Outcome]:
    """Start the workers, then ``rounds`` rounds of one measurement each; ``scratch`` holds their caches."""
    outcomes = {name: Outcome() for name in names}
    workers = start_workers(names, work, threads, scratch, outcomes)
    try:
        for r in range(rounds):
            log(f"round {r + 1} of {rounds}")
            live = list(workers)
            shift = r % len(live) if live else 0
            ask_each(workers, outcomes, "measure", live[shift:] + live[:shift])
        ask_each(workers, outcomes, "finish", list(workers))
    finally:
        for worker in workers.values():
            worker.close()
    return outcomes


# ---------------------------------------------------------------------------------------------
# Whole gptcli processes


@dataclass
class CliRun:
    wall_s: float
    returncode: int
    stdout: str
    stderr: str

    def failure(self) -> str | None:
        if self.returncode == 0:
            return None
        last = self.stderr.strip().splitlines()[-1:] or [""]
        return f"exit {self.returncode}: {last[0][:120]}"


def run_cli(args: Sequence[str], env: dict[str, str]) -> CliRun:
    start = time.perf_counter()
    proc = subprocess.run(gptcli_command() + list(args), capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL)
    return CliRun(time.perf_counter() - start, proc.returncode, proc.stdout, proc.stderr)


PROCESSES: list[list[str]] = [
    ["--help"],
    ["params", "--size", "xl"],
    ["generate", "-n", "1", "--weights", "random", PROMPT_TEXT],
]


def label(args: Sequence[str]) -> str:
    return "`" + shlex.join(["gptcli", *args]) + "`"


def process_rows(runs: int, env: dict[str, str]) -> list[list[str]]:
    rows = []
    for args in PROCESSES:
        results = [run_cli(args, env) for _ in range(runs)]
        walls = [r.wall_s for r in results]
        failure = next((r.failure() for r in results if r.failure()), None)
        log(f"{label(args)}: {', '.join(f'{w:.2f}' for w in walls)} s" + (f" ({failure})" if failure else ""))
        rows.append([label(args), f"{statistics.median(walls):.2f}", f"{min(walls):.2f}", failure or "ok"])
    return rows


def compile_s_of(run: CliRun) -> str:
    """``timings.compile_s`` from ``--json`` output, or why there is none."""
    if run.failure():
        return "—"
    try:
        value = json.loads(run.stdout).get("timings", {}).get("compile_s")
    except (json.JSONDecodeError, AttributeError):
        return "— (no JSON)"
    return "— (not reported)" if value is None else f"{value:.1f}"


def compile_cache_rows(checkpoint: str, new_tokens: int, env: dict[str, str]) -> list[list[str]]:
    """``gptcli generate --compile`` cold, then warm, sharing one fresh Inductor cache folder."""
    cache = tempfile.mkdtemp(prefix="gptcli-bench-inductor-")
    args = ["generate", "--compile", "--json", "-n", str(new_tokens), "--weights", checkpoint,
            "--dtype", "float32", "--device", "cpu", PROMPT_TEXT]
    rows = []
    try:
        for state in ("cold (empty cache)", "warm (same cache)"):
            run = run_cli(args, {**env, "TORCHINDUCTOR_CACHE_DIR": cache})
            log(f"compile cache {state}: {run.wall_s:.1f} s, compile_s {compile_s_of(run)}"
                + (f" ({run.failure()})" if run.failure() else ""))
            rows.append([state, f"{run.wall_s:.1f}", compile_s_of(run), run.failure() or "ok"])
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return rows


# ---------------------------------------------------------------------------------------------
# The report


VARIANT_HEADER = ["variant", "decode tok/s", "spread", "vs ref", "ref", "% limit", "limit tok/s", "prefill tok/s",
                  "TTFT ms", "load s", "tune s", "compile s", "peak RSS MiB"]


@dataclass(frozen=True)
class Figures:
    decode: float | None  # tok/s, median
    ratio: float | None  # decode / the reference's
    limit: float | None  # tok/s the bandwidth allows

    @property
    def of_limit(self) -> float | None:
        return self.decode / self.limit if self.decode and self.limit else None


def figures(variant: Variant, outcomes: dict[str, Outcome], gb_s: float | None, shape: ModelShape) -> Figures:
    decode = outcomes[variant.name].median("decode_tok_s") if variant.name in outcomes else None
    ref = outcomes.get(variant.reference or "")
    ref_decode = ref.median("decode_tok_s") if ref else None
    limit = None
    if gb_s:
        limit = variant.batch * gb_s * 1e9 / (shape.weights_read_per_token() * variant.bytes_per_weight)
    return Figures(decode, decode / ref_decode if decode and ref_decode else None, limit)


def variant_row(variant: Variant, outcomes: dict[str, Outcome], gb_s: float | None, shape: ModelShape) -> list[str]:
    out = outcomes[variant.name]
    if out.error and not out.samples:
        return [variant.name, "failed", *["—"] * (len(VARIANT_HEADER) - 2)]
    f = figures(variant, outcomes, gb_s, shape)
    decode, ratio, limit = f.decode, f.ratio, f.limit
    return [
        variant.name, fmt(decode, ".1f"), fmt(out.spread("decode_tok_s"), ".0f", 100, "%"),
        fmt(ratio, ".2f", suffix="×"), variant.reference or "—",
        fmt(decode / limit if decode and limit else None, ".0f", 100, "%"), fmt(limit, ".0f"),
        fmt(out.median("prefill_tok_s"), ".0f"), fmt(out.median("ttft_s"), ".0f", 1000),
        fmt(out.info.get("load_s"), ".2f"), fmt(out.info.get("tune_s"), ".2f"), fmt(out.info.get("compile_s"), ".1f"),
        fmt(out.info.get("peak_rss"), ".0f", 1 / MIB),
    ]


def targets_table(outcomes: dict[str, Outcome], gb_s: float | None, shape: ModelShape) -> str:
    """Issue 13's decode targets, from this run's variants ("not run" where a variant is missing)."""

    def get(name: str) -> Figures:
        return figures(VARIANTS[name], outcomes, gb_s, shape)

    def best(names: Sequence[str]) -> tuple[str, Figures] | None:
        runs = [(n, get(n)) for n in names if get(n).decode]
        return max(runs, key=lambda r: r[1].decode or 0) if runs else None

    rows = []

    def row(target: str, value: float | None, goal: float, shown: str) -> None:
        status = "not run" if value is None else ("met" if value >= goal else "**not met**")
        rows.append([target, shown if value is not None else "—", status])

    f = get("gptcli-fp32")
    row("eager float32 >= 1.2x transformers float32", f.ratio, 1.2, fmt(f.ratio, ".2f", suffix="×"))
    f = get("gptcli-fp32-compile")
    row("--compile float32 >= 85% of the limit", f.of_limit, 0.85, fmt(f.of_limit, ".0f", 100, "%"))
    f = get("gptcli-bf16-compile")
    row("--dtype bfloat16 --compile >= 75% of the bfloat16 limit", f.of_limit, 0.75, fmt(f.of_limit, ".0f", 100, "%"))
    int8 = best(["gptcli-int8", "gptcli-int8-compile"])
    row("the best int8 path >= 60% of the int8 limit", int8[1].of_limit if int8 else None, 0.6,
        f"{fmt(int8[1].of_limit, '.0f', 100, '%')} ({int8[0]})" if int8 else "")
    e8, c8 = get("gptcli-int8").decode, get("gptcli-int8-compile").decode
    row("int8 --compile >= int8 eager", c8 / e8 if c8 and e8 else None, 1.0,
        f"{fmt(c8, '.1f')} vs {fmt(e8, '.1f')} tok/s" if c8 and e8 else "")
    int4 = best(["gptcli-int4", "gptcli-int4-compile"])
    ratio4 = int4[1].decode / int8[1].decode if int4 and int8 and int8[1].decode else None
    row("int4 >= 1.6x the best int8 path", ratio4, 1.6,
        f"{fmt(ratio4, '.2f', suffix='×')} ({int4[0]} vs {int8[0]})" if ratio4 else "")
    b8 = get("gptcli-fp32-batch8")
    row("batch 8 >= 4x batch 1", b8.ratio, 4.0, fmt(b8.ratio, ".2f", suffix="×"))
    return (f"Issue 13's decode targets on this run ({shape.name}; the 1558M load and first token: "
            "`python bench/first_token.py`):\n\n" + markdown_table(["target", "measured", "status"], rows,
                                                                   text_columns=(0, 1, 2)))


def machine_lines(threads: int) -> list[str]:
    return [machine_line(threads, ("torch", "transformers")), date_line(), command_line("bench/decode.py")]


def report(args: argparse.Namespace, shape: ModelShape, outcomes: dict[str, Outcome],
           extra_tables: Sequence[str]) -> str:
    bw = outcomes.get(BANDWIDTH, Outcome())
    gb_s, gb_range = bw.median("gb_s"), bw.values("gb_s")
    spread = f" (rounds: {min(gb_range):.1f} to {max(gb_range):.1f})" if len(gb_range) > 1 else ""
    per_token = shape.weights_read_per_token()
    source = f"the checkpoint {args.checkpoint}" if args.checkpoint else "one random checkpoint (transformers, seed 0)"
    lines = [
        f"## Decoding GPT-2 {shape.name} on the CPU: gptcli vs transformers",
        "",
        *machine_lines(args.threads),
        f"- Setup: {source} loaded by both; greedy, batch 1 "
        f"(batch 8 for -batch8), an {len(SHORT_PROMPT)}-token prompt, {args.new_tokens} new tokens, EOS ignored; "
        f"prefill on a {args.prefill_tokens}-token prompt; medians of {args.rounds} interleaved rounds "
        "after a warm-up, one worker process per variant.",
        f"- Memory bandwidth (sum over {args.bandwidth_mib} MiB of float32, median): {fmt(gb_s, '.1f')} GB/s{spread}; "
        f"weights read per token: {per_token * 4 / 1e6:.0f} MB fp32, {per_token * 2 / 1e6:.0f} MB bf16, "
        f"{per_token / 1e6:.0f} MB int8, {per_token * VARIANTS['gptcli-int4'].bytes_per_weight / 1e6:.0f} MB int4.",
        "",
        markdown_table(VARIANT_HEADER, [variant_row(VARIANTS[n], outcomes, gb_s, shape)
                                        for n in args.variant_names], text_columns=(0, 4)),
        "",
        "decode tok/s excludes the prompt; spread = (max - min) ÷ median of decode tok/s over the rounds; "
        "vs ref = decode tok/s ÷ the ref's; % limit = decode tok/s ÷ (bandwidth ÷ bytes of weights per token, "
        "× 8 for batch 8); prefill tok/s on the long prompt; TTFT = time to the first new token on the short "
        "prompt; load s after imports; tune s = measuring kernels (first worker of a dtype and mode); compile s = "
        "warm-up compile of the decode step; peak RSS = the worker's VmHWM.",
    ]
    chosen = [f"{n}: {', '.join(f'{k} x{c}' for k, c in sorted(outcomes[n].info['kernels'].items()))}"
              for n in args.variant_names if outcomes[n].info.get("kernels")]
    if chosen:
        lines += ["", "Kernels (Linear layers per kernel, gptcli.kernels.decode): " + "; ".join(chosen) + "."]
    lines += ["", targets_table(outcomes, gb_s, shape)]
    failures = [f"- {n}: {o.error}" for n, o in outcomes.items() if o.error]
    if failures:
        lines += ["", "Failures:", *failures]
    for table in extra_tables:
        lines += ["", table]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", help=f"comma-separated, from: {', '.join(VARIANTS)} (default: all; "
                                      f"--quick: {QUICK_VARIANTS})")
    p.add_argument("--rounds", type=int, help="measurements per variant after the warm-up (default 5; --quick 2)")
    p.add_argument("--new-tokens", type=int, help="new tokens per decode (default 128; --quick 8)")
    p.add_argument("--prefill-tokens", type=int, default=512, help="length of the prefill prompt (default 512)")
    p.add_argument("--size", help="124M (default), 355M, 774M, 1558M (or xl), or tiny (the --quick default)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every worker (default 2)")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny model, few tokens, 2 rounds")
    p.add_argument("--checkpoint", type=Path, help="reuse a save_pretrained folder instead of writing one")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint written for this run")
    p.add_argument("--bandwidth-mib", type=int, help="size of the bandwidth probe (default 1024; --quick 256)")
    p.add_argument("--process-runs", type=int, help="runs per timed gptcli process (default 5; --quick 1)")
    p.add_argument("--no-processes", action="store_true", help="skip timing whole gptcli processes")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="skip the compile-cache runs (always skipped with --quick)")
    p.add_argument("--first-token", action="store_true",
                   help="also time load plus first token of whole gptcli and transformers processes on the same "
                        "checkpoint (bench/first_token.py; issue 13's 1558M target)")
    p.add_argument("--output", type=Path, help="also write the report to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--write-checkpoint", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"rounds": (5, 2), "new_tokens": (128, 8), "size": ("124M", "tiny"), "bandwidth_mib": (1024, 256),
                "process_runs": (5, 1), "variants": (",".join(VARIANTS), QUICK_VARIANTS)}
    for key, (full, small) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    args.variant_names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in args.variant_names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.rounds < 1 or args.new_tokens < 2:
        p.error("--rounds must be 1 or more and --new-tokens 2 or more")
    if args.checkpoint is not None and not args.worker and not (args.checkpoint / "config.json").is_file():
        p.error(f"--checkpoint {args.checkpoint} holds no config.json: give a save_pretrained folder (a run with "
                "--keep writes one and says where)")
    return args


def prepare_checkpoint(args: argparse.Namespace, scratch: Path) -> tuple[Path, ModelShape]:
    if args.checkpoint:
        return args.checkpoint, checkpoint_shape(args.checkpoint)
    folder = scratch / "checkpoint"
    shape = model_shape(args.size)
    log(f"writing a random {shape.name} checkpoint to {folder}")
    start = time.perf_counter()
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--write-checkpoint", str(folder),
                    "--size", args.size], check=True)
    log(f"checkpoint written in {time.perf_counter() - start:.1f} s")
    return folder, shape


def cli_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads)}


def cli_tables(args: argparse.Namespace, checkpoint: Path) -> list[str]:
    """The whole-process table and the compile-cache table, unless skipped."""
    env = cli_env(args.threads)
    tables = []
    if not args.no_processes:
        log("timing whole gptcli processes")
        tables.append(f"Whole processes (wall seconds over {args.process_runs} run(s) each):\n\n"
                      + markdown_table(["command", "median s", "min s", "status"],
                                       process_rows(args.process_runs, env), text_columns=(0, 3)))
    if not (args.quick or args.no_compile_cache):
        log("measuring the compile cache")
        tables.append("torch.compile's on-disk cache (`gptcli generate --compile`, two fresh processes sharing "
                      "one fresh TORCHINDUCTOR_CACHE_DIR):\n\n"
                      + markdown_table(["run", "process s", "compile s", "status"],
                                       compile_cache_rows(str(checkpoint), 16, env), text_columns=(0, 3)))
    return tables


def run_benchmark(args: argparse.Namespace) -> tuple[str, bool]:
    """Write (or reuse) the checkpoint, run the workers and the CLI timings; the report, and whether
    every worker succeeded."""
    scratch = Path(tempfile.mkdtemp(prefix="gptcli-bench-"))
    try:
        checkpoint, shape = prepare_checkpoint(args, scratch)
        work = Workload(str(checkpoint), args.new_tokens, args.prefill_tokens, args.bandwidth_mib)
        outcomes = run_rounds([*args.variant_names, BANDWIDTH], work, args.threads, args.rounds, scratch)
        ok = not any(o.error for o in outcomes.values())
        tables = cli_tables(args, checkpoint)
        if args.first_token:
            from bench.first_token import compare

            log("timing load plus first token, whole processes")
            tables.append("\n".join(compare(checkpoint, 3, args.threads, scratch,
                                             invocation("bench/decode.py")).lines))
        return report(args, shape, outcomes, tables), ok
    finally:
        if args.keep and not args.checkpoint:
            for path in scratch.glob("inductor-*"):
                shutil.rmtree(path, ignore_errors=True)
            log(f"kept the checkpoint in {scratch / 'checkpoint'}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.write_checkpoint:
        write_checkpoint(args.write_checkpoint, model_shape(args.size))
    elif args.worker:
        work = Workload(str(args.checkpoint), args.new_tokens, args.prefill_tokens, args.bandwidth_mib)
        worker_main(args.worker, work, args.threads)
    else:
        text, ok = run_benchmark(args)
        sys.stdout.write(text)
        if args.output:
            args.output.write_text(text)
        if not ok:
            sys.exit(1)


if __name__ == "__main__":
    main()

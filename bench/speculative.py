"""Speculative decoding (``generate --draft``, ``--lookup``) against plain decoding of the same model, in one run.

    python bench/speculative.py                      # train (once, cached) and measure everything
    python bench/speculative.py --quick              # tiny models trained for a few steps: a smoke run
    python bench/speculative.py --target DIR --draft DIR   # your own pair (e.g. gpt2-xl and gpt2 checkpoints)
    python bench/speculative.py --skip-xl --rounds 5 --output report.md

The report (markdown) goes to stdout (and ``--output``), progress to stderr. Random weights say nothing
about acceptance, so the pair is trained here with ``gptcli train`` (the same code, run as a command):

- **target**: the ``book-ch05`` recipe (GPT_CONFIG_124M at context 256, the book's chapter 5) on
  The Verdict (``$GPTCLI_DATA_DIR/the-verdict.txt``, else ``../shared/data``);
- **draft**: the same recipe with 2 layers, emb_dim 256 and 4 heads (27.4M parameters, 25.7M of them
  the token embedding and the untied head: a sixth of the target's bytes), trained for
  ``--draft-epochs`` epochs (default 60: the recipe's 10 leave it at a training loss of 5.4, and a
  half-trained target, at step 50, kept 6% of its guesses).

Both are cached in ``$GPTCLI_CACHE_DIR/bench-speculative`` (default ``~/.cache/gptcli/...``); the first
run trains them (minutes of CPU). Prompts come from The Verdict.

Rows
----
Every row decodes greedily (``--tokens`` new tokens from each prompt, median over ``--rounds``
interleaved rounds) and is compared with plain decoding of the same target in float32 **in the same
run**: eager (``plain``), and ``--compile`` (``plain-compiled``, the fastest plain float32 path;
``--no-compile`` skips it). Columns: **acceptance** (guesses kept / guesses checked), **tokens/forward**
(new tokens per forward pass of the target after the prefill), **tok/s** (new tokens after the first
over their decode time: the prompt's prefill, the draft's included, is left out, as in
bench/decode.py), **× plain** and **× best plain** (tok/s over eager plain decoding and over the faster
of eager and compiled), **draft share** (the draft's part of the decode time) and **ids identical**
(every run's ids equal plain decoding's).

- ``pair-kK``: the trained draft guesses K tokens (``-cC``: it stops guessing after a guess it gives
  less than probability C instead of ``DRAFT_CONFIDENCE``, 0.3; ``-bf16``: the draft runs in bfloat16, half its bytes);
- ``int8-kK``, ``int4-kK``: self-speculation, the target's own int8/int4 copy (bfloat16 activations) drafts;
- ``...-compiled``: ``generate --compile --draft``: the draft's one-token steps are one torch.compile'd
  graph (the model's checks stay eager, so the ids stay plain decoding's); not with ``--no-compile``;
- a **step costs** table: one step of the model (eager, compiled, a K+1-row check) and of each draft,
  in milliseconds and in best plain steps: with every guess kept, self-speculation's speed-up stays
  below (best plain step) / (draft step), whatever K;
- ``lookup-kK``: prompt lookup, on a greedy loop (GPT-2 124M with its own random init, which loops on a
  Verdict prompt: the trained target never does, it recites The Verdict), on a passage of The Verdict
  followed by its first tokens again (the trained target, which may or may not copy it), and on a
  Verdict prompt whose continuation does not repeat.

**xl shapes** (random weights, ``--skip-xl`` skips; 6.3 GB of memory): the 1558M target and a 124M draft,
float32. The costs that set the speed-up, each a median of ``--repeats`` timings after a 64-token prompt:
one cached forward of the target with 1 row and with K+1 = 5 rows, and one draft step. From them the
predicted speed-up at acceptance a: E / (K c_draft + c_5), where E = (1 - a^(K+1)) / (1 - a) is the
expected number of tokens a check yields (Leviathan et al., 2023) and the costs are in target steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):  # run as `python bench/x.py`: put the repo root in place of bench/, so bench/'s
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # files import as bench.*, never hiding a package
from bench.report import fmt, load_average, logger, markdown_table, utc_date  # noqa: E402 - what the benchmarks print
from bench.workers import cpu_model, shared_text  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DRAFT_ARCH = ["--n-layers", "2", "--emb-dim", "256", "--n-heads", "4"]
QUICK_TARGET = ["--n-layers", "2", "--emb-dim", "64", "--n-heads", "2", "--context-length", "64", "--max-steps", "3"]
QUICK_DRAFT = ["--n-layers", "1", "--emb-dim", "32", "--n-heads", "2", "--context-length", "64", "--max-steps", "3"]


log = logger(clock=True)


def verdict_path(given: str | None) -> Path:
    path = shared_text("the-verdict.txt", given)
    if path is None or not path.is_file():
        raise SystemExit("the-verdict.txt not found: pass --text or set GPTCLI_DATA_DIR")
    return path


def cache_root(given: str | None) -> Path:
    if given:
        return Path(given).expanduser()
    root = os.environ.get("GPTCLI_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "gptcli")
    return Path(root).expanduser() / "bench-speculative"


def train(folder: Path, text: Path, extra: Sequence[str]) -> float | None:
    """``gptcli train TEXT --recipe book-ch05 EXTRA`` into ``folder`` unless it is there; the seconds it took."""
    if (folder / "model.safetensors").is_file():
        return None
    scratch = folder.with_name(folder.name + "-partial")
    if scratch.exists():
        import shutil

        shutil.rmtree(scratch)
    folder.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "gptcli", "train", str(text), "--recipe", "book-ch05", *extra, "--out", str(scratch),
            "--json"]
    log(f"training {folder.name}: {' '.join(argv[1:])}")
    start = time.perf_counter()
    with open(folder.with_name(folder.name + ".log"), "w") as out:
        subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    scratch.rename(folder)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Loading and running


def load(weights: str, *, quantize: str | None = None, kernels: str = "eager", size: str | None = None,
         threads: int | None = None, dtype: str = "auto"):
    from gptcli.runtime import InferenceOptions, load_for_inference

    return load_for_inference(InferenceOptions(size=size, weights=weights, quantize=quantize, kernels=kernels,
                                               threads=threads, dtype=dtype))


def no_text(_token_id: int) -> bytes:
    return b""


@dataclass
class RunResult:
    ids: list[int]
    decode_tokens: int
    decode_s: float
    stats: Any = None  # SpeculativeStats


@dataclass
class Variant:
    name: str
    make: Callable[[list[int], int], Any]  # (prompt ids, new tokens) -> a Generation
    draft: str = "—"
    k: int | None = None
    runs: list[list[RunResult]] = field(default_factory=list)  # per round, per prompt

    def run_round(self, prompts: list[list[int]], tokens: int) -> None:
        results = []
        for prompt in prompts:
            generation = self.make(prompt, tokens).run()
            t = generation.timings
            results.append(RunResult(generation.token_ids, t.decode_tokens, t.decode_s, getattr(generation, "stats", None)))
        self.runs.append(results)

    def tok_s(self) -> float:
        return statistics.median(sum(r.decode_tokens for r in rnd) / sum(r.decode_s for r in rnd) for rnd in self.runs)

    def acceptance(self) -> float | None:
        stats = [r.stats for r in self.runs[0] if r.stats is not None]
        proposed = sum(s.proposed for s in stats)
        return sum(s.accepted for s in stats) / proposed if proposed else None

    def per_forward(self) -> float | None:
        stats = [(r.stats, r.decode_tokens) for r in self.runs[0] if r.stats is not None]
        forwards = sum(s.model_forwards for s, _ in stats)
        return sum(n for _, n in stats) / forwards if forwards else None

    def draft_share(self) -> float | None:
        rnd = self.runs[0]
        if rnd[0].stats is None:
            return None
        return sum(r.stats.draft_s for r in rnd) / sum(r.decode_s for r in rnd)

    def ids_identical(self, plain: "Variant") -> bool:
        return all(r.ids == p.ids for rnd in self.runs for r, p in zip(rnd, plain.runs[0]))


def plain_variant(name: str, runtime, compile: bool = False) -> Variant:
    from gptcli.decoding.generate import Generation, make_decoder

    decoder = make_decoder(runtime.model, runtime.device, runtime.dtype, compile=compile)

    def make(prompt: list[int], tokens: int):
        return Generation(decoder, prompt, options(tokens), eos_id=None, token_bytes=no_text,
                          context_length=runtime.cfg.context_length)

    return Variant(name, make)


def speculative_variant(name: str, target, draft, k: int, label: str, confidence: float | None = None,
                        compile: bool = False) -> Variant:
    """``generate --draft`` (``--lookup`` when ``draft`` is None; ``compile``: ``--compile --draft``)."""
    from gptcli.decoding.speculative import SpeculativeOptions, Speculator

    spec = SpeculativeOptions(draft=None if draft is None else label, lookup=draft is None, draft_tokens=k)
    speculator = Speculator(spec, target, draft, compile=compile, confidence=confidence)

    def make(prompt: list[int], tokens: int):
        return speculator.generation(prompt, options(tokens))

    return Variant(name, make, draft=label + (", compiled" if compile else ""), k=k)


def options(tokens: int):
    from gptcli.decoding.generate import SamplingOptions

    return SamplingOptions(max_new_tokens=tokens, ignore_eos=True)  # greedy


def measure(variants: list[Variant], prompts: list[list[int]], tokens: int, rounds: int) -> None:
    """Every variant once to warm up (compile included), then ``rounds`` rounds, each starting one variant later."""
    for v in variants:
        log(f"warm-up {v.name}")
        v.make(prompts[0], min(tokens, 8)).run()
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            v.run_round(prompts, tokens)
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{v.name} {v.runs[-1] and sum(x.decode_tokens for x in v.runs[-1]) / sum(x.decode_s for x in v.runs[-1]):.1f}" for v in variants))


def table(variants: list[Variant], plain: Variant, best: float) -> str:
    return markdown_table(HEADER, rows(variants, plain, best), text_columns=(0, 1))


def rows(variants: list[Variant], plain: Variant, best: float) -> list[list[str]]:
    out = []
    base = plain.tok_s()
    for v in variants:
        rate = v.tok_s()
        out.append([v.name, v.draft, "—" if v.k is None else str(v.k), fmt(v.acceptance(), ".2f"),
                    fmt(v.per_forward(), ".2f"), f"{rate:.1f}", f"{rate / base:.2f}×", f"{rate / best:.2f}×",
                    fmt(v.draft_share(), ".0f", 100, "%"), "yes" if v.ids_identical(plain) else "**no**"])
    return out


HEADER = ["variant", "draft", "K", "acceptance", "tokens/forward", "tok/s", "× plain", "× best plain", "draft share",
          "ids identical"]


# ---------------------------------------------------------------------------------------------
# Prompts from The Verdict


def verdict_prompts(tokenizer, text: str, context: int, tokens: int) -> dict[str, list[list[int]]]:
    ids = tokenizer.encode(text)
    length = max(8, min(32, context // 8))
    starts = [len(ids) // 10, len(ids) // 3, len(ids) // 2]  # inside the training split (the first 90%)
    passage = max(16, min(96, context - tokens - length - 8))
    repeat_start = len(ids) // 5
    body = ids[repeat_start : repeat_start + passage]
    return {
        "pair": [ids[s : s + length] for s in starts[:2]],
        "copy": [body + body[:length]],  # a passage, then its first tokens again
        "loop": [ids[starts[0] : starts[0] + length]],
        "non-repeating": [ids[starts[2] : starts[2] + length]],
    }


# ---------------------------------------------------------------------------------------------
# xl shapes


def median_time(fn: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_costs(runtime, rows_: int, repeats: int, prompt: int = 64) -> tuple[float, float]:
    """Seconds of one cached forward of 1 row and of ``rows_`` rows after a ``prompt``-token prefill."""
    from gptcli.decoding.generate import Decoder

    decoder = Decoder(runtime.model, runtime.device, runtime.dtype)
    decoder.prefill(list(range(1, prompt + 1)), max_new_tokens=rows_ + 8)

    def feed(n: int) -> Callable[[], None]:
        def go() -> None:
            decoder.feed([11] * n)
            decoder.rollback(n)
        return go

    feed(1)()
    feed(rows_)()
    return median_time(feed(1), repeats), median_time(feed(rows_), repeats)


def compiled_step_cost(runtime, repeats: int, prompt: int = 64) -> float:
    """Seconds of one compiled one-token step (``--compile``) after a ``prompt``-token prefill."""
    from gptcli.decoding.generate import CompiledDecoder

    decoder = CompiledDecoder(runtime.model, runtime.device, runtime.dtype)
    decoder.warm_up(prompt + repeats + 8)
    decoder.prefill(list(range(1, prompt + 1)), max_new_tokens=repeats + 8)
    return median_time(lambda: decoder.step(11), repeats)


def costs_section(target, compiled, drafts: dict, k: int, repeats: int) -> str:
    """What bounds self-speculation: the draft's step against the model's, in one table. With every
    guess kept a check yields K+1 tokens for K draft steps and one K+1-row check, so the speed-up over
    the best plain step can never pass (best plain step) / (draft step)."""
    prompt = min(64, target.cfg.context_length // 2)
    t1, tk = forward_costs(target, k + 1, repeats, prompt)
    measured = [("model float32, 1 row (eager)", t1), (f"model float32, K+1 = {k + 1} rows (eager: a check)", tk)]
    if compiled is not None:
        measured.append(("model float32, 1 row (compiled)", compiled_step_cost(compiled, repeats, prompt)))
    best = min(t for name, t in measured if "1 row" in name)
    for name, (runtime, compile) in drafts.items():
        cost = compiled_step_cost(runtime, repeats, prompt) if compile else forward_costs(runtime, 2, repeats, prompt)[0]
        measured.append((f"draft {name}, 1 row{' (compiled)' if compile else ''}", cost))
    rows = [[name, f"{1000 * t:.1f}", f"{t / best:.2f}×"] for name, t in measured]
    return markdown_table(["forward", "ms", "× best plain step"], rows)


def xl_section(quick: bool, repeats: int, k: int = 4) -> tuple[str, float | None]:
    if quick:
        folder = Path(tempfile.mkdtemp(prefix="spec-xl-"))
        target_cfg, draft_cfg = folder / "t.yaml", folder / "d.yaml"
        base = "vocab_size: 50257\ncontext_length: 128\nn_heads: 4\ndrop_rate: 0.0\nqkv_bias: true\ntie_weights: true\n"
        target_cfg.write_text(base + "emb_dim: 256\nn_layers: 4\n")
        draft_cfg.write_text(base + "emb_dim: 64\nn_layers: 1\n")
        from gptcli.runtime import InferenceOptions, load_for_inference

        target = load_for_inference(InferenceOptions(config=str(target_cfg), weights="random"))
        draft = load_for_inference(InferenceOptions(config=str(draft_cfg), weights="random"))
        names = ("tiny target (4 layers, emb 256)", "tiny draft (1 layer, emb 64)")
    else:
        log("xl: building the 1558M target (random weights)")
        target = load("random", size="1558M")
        log("xl: building the 124M draft (random weights)")
        draft = load("random", size="124M")
        names = ("1558M target", "124M draft")
    t1, t5 = forward_costs(target, k + 1, repeats)
    d1, _ = forward_costs(draft, 2, repeats)
    del target, draft
    table = markdown_table(["forward", "ms", "× target 1 row"], [
        [f"{names[0]}, 1 row", f"{1000 * t1:.1f}", "1.00×"],
        [f"{names[0]}, K+1 = {k + 1} rows", f"{1000 * t5:.1f}", f"{t5 / t1:.2f}×"],
        [f"{names[1]}, 1 row", f"{1000 * d1:.1f}", f"{d1 / t1:.3f}×"],
    ])
    predicted = []
    for a in (0.6, 0.7, 0.8):
        expected = (1 - a ** (k + 1)) / (1 - a)
        predicted.append([f"{a:.1f}", f"{expected:.2f}", f"{expected / ((k * d1 + t5) / t1):.2f}×"])
    table += "\n\n" + markdown_table(["acceptance", f"tokens per check (K = {k})", "predicted speed-up"], predicted)
    return table, t5 / t1


# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, a few tokens, one round: a smoke run")
    parser.add_argument("--target", help="the target checkpoint (default: book-ch05 on The Verdict, trained and cached)")
    parser.add_argument("--draft", help="the draft checkpoint (default: the 2-layer model, trained and cached)")
    parser.add_argument("--text", help="The Verdict (default: $GPTCLI_DATA_DIR/the-verdict.txt)")
    parser.add_argument("--cache", help="where trained models are kept (default: $GPTCLI_CACHE_DIR/bench-speculative)")
    parser.add_argument("--draft-epochs", type=int, default=60)
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per prompt (default 128; --quick 12)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; --quick 1)")
    parser.add_argument("--k", default=None, help="K values for the pair and int8 (default 2,4,6; --quick 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timings per xl cost (default 7; --quick 2)")
    parser.add_argument("--confidence", default="0", help="extra pair rows whose draft stops guessing below "
                        "this probability, not gptcli.decoding.speculative.DRAFT_CONFIDENCE (comma-separated; '' for none; 0: "
                        "never stops)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled plain baseline")
    parser.add_argument("--skip-xl", action="store_true", help="skip the xl shapes")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", help="also write the report here")
    args = parser.parse_args(argv)
    quick = args.quick
    tokens = args.tokens or (12 if quick else 128)
    rounds = args.rounds or (1 if quick else 3)
    ks = [int(k) for k in (args.k or ("2" if quick else "2,4,6")).split(",")]
    repeats = args.repeats or (2 if quick else 7)
    compile_baseline = not (args.no_compile or quick)
    confidences = [float(c) for c in args.confidence.split(",")] if args.confidence else []

    import torch

    from gptcli.devices import configure_threads

    threads = configure_threads(args.threads)
    load_before = load_average(" / ", "n/a")
    text_path = verdict_path(args.text)
    cache = cache_root(args.cache) / ("quick" if quick else "")
    trained = {}
    target_dir = Path(args.target) if args.target else cache / ("target" if quick else "book-ch05")
    draft_dir = Path(args.draft) if args.draft else cache / ("draft" if quick else
                                                             f"book-ch05-L2-E256-H4-ep{args.draft_epochs}")
    if not args.target:
        trained["target"] = train(target_dir, text_path, QUICK_TARGET if quick else [])
    if not args.draft:
        trained["draft"] = train(draft_dir, text_path, QUICK_DRAFT if quick else [*DRAFT_ARCH, "--epochs",
                                                                                  str(args.draft_epochs)])
    log("loading the target and its drafts")
    target = load(str(target_dir), threads=threads)
    draft = load(str(draft_dir), threads=threads)
    draft_bf16 = load(str(draft_dir), threads=threads, dtype="bfloat16")
    int8 = load(str(target_dir), quantize="int8", threads=threads)
    int4 = load(str(target_dir), quantize="int4", threads=threads)
    compiled = load(str(target_dir), kernels="compiled", threads=threads) if compile_baseline else None
    prompts = verdict_prompts(target.tokenizer, text_path.read_text(encoding="utf-8"), target.cfg.context_length,
                              tokens)

    plain = plain_variant("plain", target)
    main_variants = [plain]
    if compiled is not None:
        main_variants.append(plain_variant("plain-compiled", compiled, compile=True))
    main_variants += [speculative_variant(f"pair-k{k}", target, draft, k, "trained 2-layer") for k in ks]
    main_variants += [speculative_variant(f"pair-k{ks[-1]}-c{c}", target, draft, ks[-1], "trained 2-layer", c)
                      for c in confidences]
    main_variants.append(speculative_variant(f"pair-k{ks[0]}-bf16", target, draft_bf16, ks[0],
                                             "trained 2-layer, bfloat16"))
    main_variants += [speculative_variant(f"int8-k{k}", target, int8, k, "int8") for k in ks]
    main_variants += [speculative_variant(f"int4-k{k}", target, int4, k, "int4") for k in ks[len(ks) // 2 : len(ks) // 2 + 1]]
    if compile_baseline:  # --compile --draft: the draft's steps compiled, the model's checks eager
        draft_compiled = load(str(draft_dir), kernels="compiled", threads=threads)
        main_variants.append(speculative_variant(f"pair-k{ks[-1]}-compiled", target, draft_compiled, ks[-1],
                                                 "trained 2-layer", compile=True))
        main_variants += [speculative_variant(f"int8-k{k}-compiled", target, int8, k, "int8", compile=True)
                          for k in sorted({ks[-1], 12})]
        main_variants.append(speculative_variant(f"int4-k{ks[-1]}-compiled", target, int4, ks[-1], "int4",
                                                 compile=True))
    log(f"measuring the pair and self-speculation ({len(main_variants)} variants)")
    measure(main_variants, prompts["pair"], tokens, rounds)
    best = max(v.tok_s() for v in main_variants if v.name.startswith("plain"))

    lookup_tables = {}
    lookup_ratio = {}
    lookup_k = sorted({ks[-1], 8})
    # GPT-2's own init (random 124M) loops greedily; the memorising target recites The Verdict instead.
    looping = load("random", size="124M", threads=threads) if not quick else target
    for kind, model in (("loop", looping), ("copy", target), ("non-repeating", target)):
        plain_l = plain_variant("plain", model)
        variants = [plain_l, *[speculative_variant(f"lookup-k{k}", model, None, k, "lookup") for k in lookup_k]]
        log(f"measuring prompt lookup on the {kind} text")
        measure(variants, prompts[kind], tokens, rounds)
        lookup_tables[kind] = table(variants, plain_l, plain_l.tok_s())
        lookup_ratio[kind] = max(v.tok_s() for v in variants[1:]) / plain_l.tok_s()
        lookup_ratio[kind + "-ids"] = all(v.ids_identical(plain_l) for v in variants[1:])

    log("measuring the step costs")
    costs = costs_section(target, compiled, {"int8": (int8, False), "int8 compiled": (int8, True),
                                             "int4": (int4, False), "int4 compiled": (int4, True),
                                             "trained 2-layer": (draft, False)} if not quick else {},
                          ks[-1], repeats)
    xl_table, xl_ratio = (None, None) if args.skip_xl else xl_section(quick, repeats)
    load_after = load_average(" / ", "n/a")

    pair_best = max(v.tok_s() for v in main_variants if v.name.startswith("pair")) / best
    int8_best = max(v.tok_s() for v in main_variants if v.name.startswith("int8")) / best
    all_ids = all(v.ids_identical(plain) for v in main_variants) and all(
        lookup_ratio[kind + "-ids"] for kind in ("loop", "copy", "non-repeating"))

    def status(ok: bool) -> str:
        return "met" if ok else "**not met**"

    targets = [
        ["trained pair >= 1.5× the best plain", f"{pair_best:.2f}×", status(pair_best >= 1.5)],
        ["int8 self-speculation >= 1.5× the best plain float32", f"{int8_best:.2f}×", status(int8_best >= 1.5)],
        ["lookup >= 1.5× where the text repeats (a greedy loop)", f"{lookup_ratio['loop']:.2f}×",
         status(lookup_ratio["loop"] >= 1.5)],
        ["lookup >= 0.95× where it does not", f"{lookup_ratio['non-repeating']:.2f}×",
         status(lookup_ratio["non-repeating"] >= 0.95)],
        ["xl: K+1 = 5 rows <= 1.3× one row", "not run" if xl_ratio is None else f"{xl_ratio:.2f}×",
         "not run" if xl_ratio is None else status(xl_ratio <= 1.3)],
        ["greedy ids identical to plain decoding, every row", "yes" if all_ids else "no", status(all_ids)],
    ]
    trained_note = ", ".join(f"{k} trained now in {v:.0f} s" for k, v in trained.items() if v is not None) or \
        "both from the cache"
    lines = [
        "# Speculative decoding (bench/speculative.py)",
        "",
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores, {threads} thread{'s' * (threads != 1)}, torch "
        f"{torch.__version__}; load average (1/5/15 min) {load_before} before, {load_after} after",
        f"- Date: {utc_date()}",
        f"- Command: `python bench/speculative.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- Target: {target.source} ({target.cfg.n_layers} layer{'s' * (target.cfg.n_layers != 1)}, emb {target.cfg.emb_dim}, context "
        f"{target.cfg.context_length}); draft: {draft.source} ({draft.cfg.n_layers} layer{'s' * (draft.cfg.n_layers != 1)}, "
        f"emb {draft.cfg.emb_dim}); "
        f"{trained_note}",
        f"- Greedy, {tokens} new tokens per prompt, median of {rounds} interleaved round{'s' * (rounds != 1)}; "
        f"{len(prompts['pair'])} prompts of The Verdict for the pair and int8/int4",
        "",
        "## The trained pair and self-speculation (float32 target)",
        "",
        table(main_variants, plain, best),
        "",
        "Step costs (median of --repeats; what bounds self-speculation: with every guess kept, the speed-up over "
        "the best plain step stays below best plain step / draft step):",
        "",
        costs,
        "",
        "## Prompt lookup",
        "",
        "Where the text repeats: GPT-2 124M with its own random init (not trained), whose greedy continuation "
        "of a Verdict prompt loops (the trained target never loops: it recites The Verdict):",
        "",
        lookup_tables["loop"],
        "",
        "Where the prompt holds the text to copy (a passage of The Verdict, then its first tokens again; the "
        "trained target):",
        "",
        lookup_tables["copy"],
        "",
        "Where it does not (a prompt from The Verdict, continued):",
        "",
        lookup_tables["non-repeating"],
        "",
    ]
    if xl_table is not None:
        lines += ["## xl shapes (random weights, float32)", "", xl_table, ""]
    lines += ["## Targets", "", markdown_table(["target", "measured", "status"], targets), ""]
    report = "\n".join(lines)
    sys.stdout.write(report)
    if args.output:
        Path(args.output).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

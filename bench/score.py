"""Scoring speed: ``gptcli.scoring`` against transformers' documented sliding-window loop, same text and stride.

    python bench/score.py                                  # 124M, $GPTCLI_DATA_DIR/the-verdict.txt, ~2 min
    python bench/score.py --text ../shared/data/tinyshakespeare.txt --tokens 4096 --rounds 5
    python bench/score.py --quick --text some.txt          # a tiny GPT-2 and 3 rounds: a smoke run
    python bench/score.py --output report.md               # also write the report to a file

The report (markdown) goes to stdout, progress to stderr. Run it on an otherwise idle machine: the
report prints the load average (from /proc/loadavg) before and after, and the spread of the rounds.

Setup
-----
One checkpoint serves both sides: random GPT-2 weights drawn by transformers
(``GPT2LMHeadModel(GPT2Config(...))`` after ``torch.manual_seed(0)``; speed does not depend on the
values) written with ``save_pretrained`` to a temporary folder. transformers loads it with
``from_pretrained`` (its default attention, float32); gptcli with ``gptcli.runtime.load_for_inference``,
as ``gptcli score --weights DIR`` does. The text is the first ``--tokens`` GPT-2 tokens of ``--text``
(default: ``the-verdict.txt`` in ``$GPTCLI_DATA_DIR``).

- **transformers**: the loop of "Perplexity of fixed-length models" in transformers' docs, as printed
  there: one window at a time, ``model(input_ids, labels=target_ids)``, the loss weighted by the
  window's count minus one.
- **gptcli**: ``gptcli.scoring.score_ids`` (what ``gptcli score`` runs): ``--batch-size`` windows at
  once, the output head applied to the scored positions only.

Both score the same windows (context_length tokens, moving by ``--stride``, default context / 2).
tokens/s = tokens scored (every token from the second on) / wall time of the whole text. Each side runs
once to warm up, then the rounds alternate which side goes first; figures are medians. The loss
column shows both sides compute the same thing (transformers' documented weighting differs from the
exact per-token mean by a few parts in a thousand).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):  # run as `python bench/x.py`: put the repo root in place of bench/, so bench/'s
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # files import as bench.*, never hiding a package
from bench.report import command_line, date_line, load_average, logger, machine_line  # noqa: E402
from bench.workers import quiet_transformers  # noqa: E402 - shared by the benchmarks

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TEXT = "the-verdict.txt"
TINY = {"n_positions": 128, "n_embd": 64, "n_layer": 2, "n_head": 2}


log = logger()


def fail(message: str) -> None:
    log(f"error: {message}")
    sys.exit(2)


def text_path(arg: str | None) -> Path:
    """--text, else the-verdict.txt in $GPTCLI_DATA_DIR; exit 2 with a clear message when neither is there."""
    if arg:
        path = Path(arg).expanduser()
    elif os.environ.get("GPTCLI_DATA_DIR"):
        path = Path(os.environ["GPTCLI_DATA_DIR"]).expanduser() / DEFAULT_TEXT
    else:
        fail(f"no text to score: pass --text FILE, or set GPTCLI_DATA_DIR to a folder holding {DEFAULT_TEXT} "
             "(e.g. GPTCLI_DATA_DIR=../shared/data)")
    if not path.is_file():
        fail(f"{path}: no such file (pass --text FILE, or set GPTCLI_DATA_DIR to a folder holding {DEFAULT_TEXT})")
    return path


def write_checkpoint(folder: Path, quick: bool) -> int:
    """Random GPT-2 weights from transformers (seed 0), saved with save_pretrained; returns n_positions."""
    import torch

    transformers = quiet_transformers()
    torch.manual_seed(0)
    config = transformers.GPT2Config(**(TINY if quick else {}))  # GPT2Config() is GPT-2 124M
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return config.n_positions


def transformers_loop(model: Any, ids: Any, max_length: int, stride: int) -> float:
    """The docs' loop, verbatim apart from names: returns its average negative log-likelihood."""
    import torch

    seq_len = ids.size(1)
    nll_sum = 0.0
    n_tokens = 0
    prev_end_loc = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            outputs = model(input_ids, labels=target_ids)
            neg_log_likelihood = outputs.loss
        num_valid_tokens = (target_ids != -100).sum().item()
        batch_size = target_ids.size(0)
        num_loss_tokens = num_valid_tokens - batch_size
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return float(nll_sum / n_tokens)


def timed(fn: Callable[[], float]) -> tuple[float, float]:
    start = time.perf_counter()
    loss = fn()
    return time.perf_counter() - start, loss


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", help=f"the text to score (default: $GPTCLI_DATA_DIR/{DEFAULT_TEXT})")
    p.add_argument("--tokens", type=int, help="score the first N tokens of the text (default 2048; --quick 1024)")
    p.add_argument("--stride", type=int, help="window stride (default context / 2)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per side after a warm-up (default 3)")
    p.add_argument("--batch-size", type=int, default=8, help="gptcli's windows per batch (default 8)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all CPUs)")
    p.add_argument("--quick", action="store_true", help=f"a tiny GPT-2 ({TINY}), for a smoke run")
    p.add_argument("--output", help="also write the report to this file")
    args = p.parse_args(argv)
    args.tokens = args.tokens or (1024 if args.quick else 2048)
    if args.rounds < 1 or args.tokens < 2 or args.batch_size < 1 or (args.stride is not None and args.stride < 1):
        p.error("--rounds, --batch-size and --stride must be 1 or more, --tokens 2 or more")
    return args


def run(args: argparse.Namespace) -> str:
    path = text_path(args.text)  # before the slow imports

    import torch

    from gptcli.scoring import check_stride, count_predictions, score_ids
    from gptcli.runtime import InferenceOptions, load_for_inference
    from gptcli.tokenizer import encode

    load_before = load_average()
    torch.set_num_threads(args.threads)
    ids = encode(path.read_text(encoding="utf-8"))[: args.tokens]
    with tempfile.TemporaryDirectory(prefix="gptcli-bench-score-") as scratch:
        folder = Path(scratch)
        log(f"writing a random {'tiny' if args.quick else '124M'} checkpoint to {folder} ...")
        context = write_checkpoint(folder, args.quick)
        stride = check_stride(args.stride or context // 2, context)
        hf = quiet_transformers().GPT2LMHeadModel.from_pretrained(folder).eval()
        # The front door gptcli score loads through (memory-mapped, this CPU's kernels).
        loaded = load_for_inference(InferenceOptions(weights=str(folder), device="cpu", dtype="float32",
                                                     threads=args.threads))
    tokens = count_predictions(len(ids), context, stride)
    hf_ids = torch.tensor([ids])

    def gptcli_run() -> float:
        [(count, nats)] = score_ids(loaded.model, [ids], stride=stride, batch_size=args.batch_size)
        return nats / count

    sides: dict[str, Callable[[], float]] = {
        "transformers (docs' loop)": lambda: transformers_loop(hf, hf_ids, context, stride),
        f"gptcli score (batch {args.batch_size})": gptcli_run,
    }
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    losses: dict[str, float] = {}
    for name, fn in sides.items():
        log(f"warm-up: {name} ...")
        losses[name] = timed(fn)[1]
    names = list(sides)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            elapsed, losses[name] = timed(sides[name])
            seconds[name].append(elapsed)
            log(f"round {r + 1}/{args.rounds}: {name}: {elapsed:.2f} s ({tokens / elapsed:.0f} tok/s)")
    load_after = load_average()

    reference = statistics.median(seconds[names[0]])
    rows = []
    for name in names:
        median = statistics.median(seconds[name])
        spread = (max(seconds[name]) - min(seconds[name])) / median
        rows.append(f"| {name} | {tokens / median:.0f} | {median:.2f} | {spread:.0%} | {reference / median:.2f}× | "
                    f"{losses[name]:.4f} |")
    return "\n".join([
        f"## Scoring GPT-2 {'tiny' if args.quick else '124M'} on the CPU: gptcli score vs transformers' sliding window",
        "",
        machine_line(args.threads, ("torch", "transformers")),
        f"- Load average (1, 5, 15 min) before: {load_before}; after: {load_after}",
        date_line(),
        command_line("bench/score.py"),
        f"- Text: the first {len(ids)} tokens of {path.name}; windows of {context} tokens, stride {stride}: "
        f"{tokens} tokens scored; float32; medians of {args.rounds} interleaved rounds after a warm-up.",
        "",
        "| side | tokens/s | median s | spread | vs transformers | loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        "tokens/s = tokens scored ÷ wall time for the whole text; spread = (max - min) ÷ median over the rounds; "
        "loss: gptcli's is the exact mean over the scored tokens, transformers' weights each window by its count "
        "minus one, as its docs do.",
    ]) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    sys.stdout.write(report)
    if args.output:
        Path(args.output).write_text(report)


if __name__ == "__main__":
    main()

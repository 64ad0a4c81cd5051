"""`gptcli train`: pretrain or fine-tune on your own text. Parsing and rendering only: gptcli.training
assembles the run (``prepare_run``) and runs the loop (``Trainer``)."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Iterator, List, Optional

import typer

from gptcli.commands.common import ConfigOption, DeviceOption, SizeOption, ThreadsOption, err, note, user_errors
from gptcli.errors import UserError

if TYPE_CHECKING:
    from gptcli.training import Run

EXIT_INTERRUPTED = 130


def _opt(*names: str, help: str, metavar: str | None = None):
    return typer.Option(*names, help=help, metavar=metavar, show_default=False)


@user_errors
def train(
    data: Annotated[Optional[List[str]], typer.Argument(
        metavar="DATA...", help="UTF-8 text files, folders of *.txt, or - for stdin. Not needed with --resume.",
        show_default=False)] = None,
    out: Annotated[Optional[Path], _opt("--out", "-o", metavar="DIR", help="The run folder: weights (Hugging Face "
                   "layout + config.json), best/, state.safetensors, train.jsonl, loss.png. Default runs/NAME.")] = None,
    recipe: Annotated[Optional[str], _opt("--recipe", "-r", metavar="NAME|FILE", help="A recipe of settings: "
                      "book-ch05, shakespeare-char, or your YAML. Flags override it.")] = None,
    tokenizer: Annotated[Optional[str], _opt("--tokenizer", metavar="gpt2|char", help="gpt2 (GPT-2's BPE, the "
                         "default) or char (the sorted characters of the training text, as nanoGPT).")] = None,
    size: SizeOption = None,
    config: ConfigOption = None,
    weights: Annotated[Optional[str], _opt("--weights", "-w", metavar="SOURCE", help="Fine-tune these weights "
                       "(a .safetensors file or folder, a Hub id, a gptcli run folder) instead of a new model.")] = None,
    context_length: Annotated[Optional[int], _opt("--context-length", metavar="N", help="Change the config's "
                              "context_length (new models).")] = None,
    n_layers: Annotated[Optional[int], _opt("--n-layers", metavar="N", help="Change n_layers (new models).")] = None,
    n_heads: Annotated[Optional[int], _opt("--n-heads", metavar="N", help="Change n_heads (new models).")] = None,
    emb_dim: Annotated[Optional[int], _opt("--emb-dim", metavar="N", help="Change emb_dim (new models).")] = None,
    drop_rate: Annotated[Optional[float], _opt("--drop-rate", metavar="P", help="Change drop_rate (also when "
                         "fine-tuning).")] = None,
    epochs: Annotated[Optional[int], _opt("--epochs", metavar="N", help="Passes over the training windows.")] = None,
    max_steps: Annotated[Optional[int], _opt("--max-steps", metavar="N", help="Optimizer steps (with --epochs, "
                         "whichever ends first).")] = None,
    batch_size: Annotated[Optional[int], _opt("--batch-size", "-b", metavar="N", help="Sequences per micro-batch "
                          "(over all processes under torchrun).")] = None,
    grad_accum: Annotated[Optional[int], _opt("--grad-accum", metavar="N", help="Micro-batches per optimizer "
                          "step (gradient accumulation).")] = None,
    lr: Annotated[Optional[float], _opt("--lr", metavar="LR", help="Peak learning rate.")] = None,
    schedule: Annotated[Optional[str], _opt("--schedule", metavar="constant|cosine", help="constant, or linear "
                        "warm-up then cosine decay to --min-lr.")] = None,
    warmup_steps: Annotated[Optional[int], _opt("--warmup-steps", metavar="N", help="Warm-up steps (cosine).")] = None,
    min_lr: Annotated[Optional[float], _opt("--min-lr", metavar="LR", help="Where cosine decay ends.")] = None,
    decay_steps: Annotated[Optional[int], _opt("--decay-steps", metavar="N", help="The step where cosine decay "
                           "reaches --min-lr (default: the run's last step).")] = None,
    weight_decay: Annotated[Optional[float], _opt("--weight-decay", metavar="WD", help="AdamW weight decay.")] = None,
    decay: Annotated[Optional[str], _opt("--decay", metavar="all|2d", help="Decay every parameter (the book) or "
                     "only 2-D weights (nanoGPT).")] = None,
    beta1: Annotated[Optional[float], _opt("--beta1", metavar="B", help="AdamW beta1.")] = None,
    beta2: Annotated[Optional[float], _opt("--beta2", metavar="B", help="AdamW beta2.")] = None,
    grad_clip: Annotated[Optional[float], _opt("--grad-clip", metavar="NORM", help="Clip the gradient norm (0: "
                         "off).")] = None,
    sampling: Annotated[Optional[str], _opt("--sampling", metavar="windows|random", help="windows: the book's "
                        "fixed windows, shuffled each epoch; random: nanoGPT's windows at random offsets.")] = None,
    stride: Annotated[Optional[int], _opt("--stride", metavar="N", help="Tokens between windows (windows; default "
                      "the context length).")] = None,
    val_fraction: Annotated[Optional[float], _opt("--val-fraction", metavar="F", help="The last F of the text "
                            "validates (default 0.1).")] = None,
    eval_every: Annotated[Optional[int], _opt("--eval-every", metavar="N", help="Evaluate every N steps (and at "
                          "the end).")] = None,
    eval_batches: Annotated[Optional[int], _opt("--eval-batches", metavar="N", help="Batches per split in each "
                            "evaluation.")] = None,
    sample_prompt: Annotated[Optional[str], _opt("--sample-prompt", metavar="TEXT", help="Prompt of the greedy "
                             "samples shown while training.")] = None,
    sample_every: Annotated[Optional[str], _opt("--sample-every", metavar="epoch|N", help="Sample after each "
                            "epoch, every N steps, or 0 for never.")] = None,
    sample_tokens: Annotated[Optional[int], _opt("--sample-tokens", metavar="N", help="Tokens per sample.")] = None,
    save_every: Annotated[Optional[int], _opt("--save-every", metavar="N", help="Checkpoint every N steps (always "
                          "at the end and on Ctrl-C).")] = None,
    init: Annotated[Optional[str], _opt("--init", metavar="book|gpt2", help="A new model's init: the book's "
                    "(nn defaults, drawn in its order) or GPT-2's N(0, 0.02), as nanoGPT.")] = None,
    seed: Annotated[Optional[int], _opt("--seed", metavar="N", help="Seeds the init, the data order and dropout.")] = None,
    device: DeviceOption = "auto",
    dtype: Annotated[Optional[str], _opt("--dtype", metavar="float32|bfloat16|float16", help="float32, or bfloat16/float16 "
                     "autocast (weights and AdamW state stay float32).")] = None,
    compile_model: Annotated[bool, typer.Option("--compile", help="Compile the model with torch.compile.")] = False,
    threads: ThreadsOption = None,
    resume: Annotated[Optional[Path], _opt("--resume", metavar="DIR", help="Continue the run in DIR where it "
                      "stopped (bit for bit on the CPU).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the run already in --out.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="JSON Lines events on stdout (also what a pipe "
                           "gets).")] = False,
) -> None:
    """Pretrain or fine-tune GPT-2 on your own text.

    Recipes: book-ch05 is chapter 5 of the book (124M, context 256, The Verdict; prints the book's figures);
    shakespeare-char is nanoGPT's CPU recipe (a 0.8M-parameter character model). Flags override a recipe.

    On a terminal a progress bar shows step, epoch, loss, lr, tokens/s and ETA, with evaluations and samples
    above it. In a pipe or with --json, stdout gets one JSON event per line (start, eval, sample, checkpoint,
    end), the same lines as DIR/train.jsonl. Ctrl-C saves a checkpoint and exits 130; --resume continues.

    Examples:

    \b
      gptcli train the-verdict.txt --recipe book-ch05 --out runs/verdict
      gptcli train tinyshakespeare.txt --recipe shakespeare-char --out runs/shakespeare
      gptcli generate --weights runs/shakespeare "ROMEO:" -n 200 -t 0.8 --top-k 50
      gptcli train notes/ --weights gpt2 --epochs 2 --lr 5e-5 --out runs/notes
      gptcli train --resume runs/shakespeare --max-steps 3000
    """
    from gptcli import training
    from gptcli.devices import configure_threads

    configure_threads(threads)
    flags: dict[str, Any] = {
        "tokenizer": tokenizer, "epochs": epochs, "max_steps": max_steps, "batch_size": batch_size,
        "grad_accum": grad_accum, "lr": lr, "schedule": schedule, "warmup_steps": warmup_steps, "min_lr": min_lr,
        "decay_steps": decay_steps,
        "weight_decay": weight_decay, "decay": decay, "sampling": sampling, "stride": stride,
        "val_fraction": val_fraction, "eval_every": eval_every,
        "eval_batches": eval_batches, "sample_prompt": sample_prompt, "sample_tokens": sample_tokens,
        "save_every": save_every, "seed": seed, "init": init, "dtype": dtype,
    }
    flags = {k: v for k, v in flags.items() if v is not None}
    if grad_clip is not None:
        flags["grad_clip"] = grad_clip if grad_clip > 0 else None
    if sample_every is not None:
        flags["sample_every"] = _sample_every(sample_every)
    if compile_model:
        flags["compile"] = True
    arch = {k: v for k, v in {"context_length": context_length, "n_layers": n_layers, "n_heads": n_heads,
                               "emb_dim": emb_dim, "drop_rate": drop_rate}.items() if v is not None}
    json_mode = json_output or not sys.stdout.isatty()
    request = training.RunRequest(data=tuple(data or ()), out=out, recipe=recipe, settings=flags, arch=arch,
                                  beta1=beta1, beta2=beta2, size=size, config=config, weights=weights,
                                  device=device, force=force, resume=resume)
    run = training.prepare_run(request, note=note, tokenizing=_tokenizing_bar)
    try:
        _render(training.Trainer(run), run, json_mode)
    finally:
        training.finish_distributed(run.dist)


def _sample_every(value: str) -> str | int:
    if value.strip().lower() == "epoch":
        return "epoch"
    try:
        return int(value)
    except ValueError:
        raise UserError(f"--sample-every expects 'epoch' or a number of steps, got {value!r}") from None


@contextlib.contextmanager
def _tokenizing_bar(total_chars: int) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar for tokenizing on a terminal's stderr, for large texts; no callback otherwise."""
    if total_chars < 5_000_000 or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("tokenizing"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=True)
    task = bar.add_task("tokenize", total=total_chars)
    bar.start()
    try:
        yield lambda done, total: bar.update(task, completed=done)
    finally:
        bar.stop()


# --------------------------------------------------------------------------------------------
# Rendering


def book_line(ev: dict) -> str:
    """An eval event the way the book prints it."""
    return f"Ep {ev['epoch']} (Step {ev['step']:06d}): Train loss {ev['train_loss']:.3f}, Val loss {ev['val_loss']:.3f}"


def sample_line(ev: dict, tokenizer_name: str) -> str:
    """A sample the way the book prints it: prompt and continuation, newlines as spaces (GPT-2 BPE);
    a character model's sample keeps its lines."""
    text = (ev["prompt"] or "") + ev["text"]
    return text.replace("\n", " ") if tokenizer_name == "gpt2" else text


def _render(trainer, run: "Run", json_mode: bool) -> None:
    from gptcli.training import RunLog

    main = run.dist.main
    log = RunLog(run.out) if main else None
    interrupted = {"n": 0}

    def on_sigint(signum, frame):
        interrupted["n"] += 1
        if interrupted["n"] > 1:
            raise KeyboardInterrupt
        trainer.request_stop()
        if main:
            note("stopping after this step and saving a checkpoint (Ctrl-C again to quit without saving)")

    previous = signal.signal(signal.SIGINT, on_sigint)
    progress = None
    end: dict | None = None
    try:
        events = trainer.events()
        for ev in events:
            if not main:
                continue
            log.record(ev)
            kind = ev["event"]
            if kind == "start":
                progress = _start_progress(ev, json_mode)
                if ev["resumed"]:
                    note(f"resuming {run.out} after step {ev['step'] - 1}")
                else:
                    note(f"{ev['params']:,} parameters, {ev['train_tokens']:,} training and {ev['val_tokens']:,} "
                         f"validation tokens ({ev['tokenizer']}), {ev['total_steps']} steps on {ev['device']}; "
                         f"writing {run.out}")
            if kind == "step":
                if progress is not None:
                    progress.advance(ev)
                continue
            if json_mode:
                sys.stdout.write(json.dumps(ev, ensure_ascii=False) + "\n")
                sys.stdout.flush()
            else:
                line = {"eval": lambda: book_line(ev), "sample": lambda: sample_line(ev, run.tokenizer.name)}.get(kind)
                if line is not None:
                    _print_above(progress, line())
            if kind == "end":
                end = ev
    except KeyboardInterrupt:
        if progress is not None:
            progress.stop()
        from gptcli.training import STATE_FILE

        if (run.out / STATE_FILE).exists():
            err(f"error: interrupted without saving this step; the last checkpoint in {run.out} is intact "
                f"(gptcli train --resume {run.out})")
        else:
            err(f"error: interrupted before the first checkpoint; nothing to resume in {run.out}")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        signal.signal(signal.SIGINT, previous)
        if progress is not None:
            progress.stop()
    if main and end is not None:
        rate = f", {end['tokens_per_s']:,.0f} tokens/s" if end.get("tokens_per_s") else ""
        if end["reason"] == "interrupted":
            note(f"interrupted after step {end['step']}; saved {run.out}; continue with: gptcli train --resume "
                 f"{run.out}")
            raise typer.Exit(EXIT_INTERRUPTED)
        note(f"done: {end['step'] + 1} steps in {end['wall_s']:.1f} s{rate}; weights in {run.out} (best in "
             f"{run.out / 'best'}); try: gptcli generate --weights {run.out} \"...\"")


def _print_above(progress, text: str) -> None:
    if progress is not None:
        progress.print(text)
    else:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


class _Bar:
    """The Rich progress bar: step/total, epoch, loss, lr, tokens/s, ETA."""

    def __init__(self, start: dict, console, redirect: bool = True):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("step"), MofNCompleteColumn(), BarColumn(),
            TextColumn("ep {task.fields[epoch]}  loss {task.fields[loss]}  lr {task.fields[lr]}  "
                       "{task.fields[rate]} tok/s"), TimeRemainingColumn(), console=console,
            # On stderr, the bar must not capture stdout: that is where the JSON events go.
            redirect_stdout=redirect, redirect_stderr=redirect,
        )
        self.task = self.progress.add_task("train", total=start["total_steps"], completed=start["step"],
                                           epoch="-", loss="-", lr="-", rate="-")
        self.progress.start()

    def advance(self, ev: dict) -> None:
        rate = f"{ev['tokens_per_s']:,.0f}" if ev.get("tokens_per_s") else "-"
        self.progress.update(self.task, completed=ev["step"] + 1, epoch=ev["epoch"], loss=f"{ev['loss']:.3f}",
                             lr=f"{ev['lr']:.2e}", rate=rate)

    def print(self, text: str) -> None:
        from rich.text import Text

        self.progress.console.print(Text(text), soft_wrap=True)

    def stop(self) -> None:
        self.progress.stop()


def _start_progress(start: dict, json_mode: bool):
    """The bar on stdout on a terminal; on stderr when stdout carries JSON and stderr is a terminal."""
    from rich.console import Console

    if not json_mode:
        return _Bar(start, Console(highlight=False))
    if sys.stderr.isatty():
        return _Bar(start, Console(stderr=True, highlight=False), redirect=False)
    return None

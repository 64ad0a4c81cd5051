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

from gptcli.commands.common import THREADS_HELP, ConfigOption, DeviceOption, SizeOption, err, note, user_errors
from gptcli.errors import UserError
from gptcli.templates import TEMPLATE_METADATA_KEY

if TYPE_CHECKING:
    from gptcli.training import Run

EXIT_INTERRUPTED = 130  # 128 + SIGINT (Ctrl-C)
EXIT_TERMINATED = 143  # 128 + SIGTERM (timeout, docker stop, Slurm, Kubernetes)
STOP_SIGNALS = {signal.SIGINT: EXIT_INTERRUPTED, signal.SIGTERM: EXIT_TERMINATED}


def _opt(*names: str, help: str, metavar: str | None = None):
    return typer.Option(*names, help=help, metavar=metavar, show_default=False)


def _setting(name: str, *names: str, help: str, metavar: str | None = None):
    """An option for a TrainSettings key: its help ends with the default (a recipe may set another)."""
    import dataclasses

    from gptcli.training.settings import TrainSettings

    default = {f.name: f.default for f in dataclasses.fields(TrainSettings)}[name]
    shown = "none" if default is None else repr(default) if isinstance(default, str) else default
    return _opt(*names, help=f"{help} [default: {shown}]", metavar=metavar)


@user_errors
def train(
    data: Annotated[Optional[List[str]], typer.Argument(
        metavar="DATA...", help="UTF-8 text files, folders of *.txt, or - for stdin (--task classify: one TSV/CSV of "
        "text and label; --task instruct: one JSON list of {instruction, input, output}). Not needed with --resume, "
        "nor with --recipe shakespeare-char/book-ch05/book-ch06/book-ch07 (their data is downloaded once and cached).",
        show_default=False)] = None,
    out: Annotated[Optional[Path], _opt("--out", "-o", metavar="DIR", help="The run folder: weights (Hugging Face "
                   "layout + config.json), best/, state.safetensors, train.jsonl, loss.png. Default runs/NAME.")] = None,
    recipe: Annotated[Optional[str], _opt("--recipe", "-r", metavar="NAME|FILE", help="A recipe of settings: "
                      "book-ch05, book-ch06, book-ch07, shakespeare-char, or your YAML. Flags override it.")] = None,
    task: Annotated[Optional[str], _setting("task", "--task", metavar="lm|classify|instruct", help="lm: language "
                    "modelling on text (the book's chapter 5). classify: a TSV/CSV of text and label; the output head "
                    "becomes one row per label, the last token decides (chapter 6). instruct: the book's chapter 7, "
                    "prompt (Alpaca-style) plus response per JSON entry, padded with <|endoftext|>, the padding left "
                    "out of the loss.")] = None,
    trainable: Annotated[Optional[str], _opt("--trainable", metavar="last-block|all|head", help="classify: which "
                         "weights train: the last transformer block, the final LayerNorm and the head (the book's, "
                         "the default), all, or only the head.")] = None,
    label_token: Annotated[Optional[str], _setting("label_token", "--label-token", metavar="last|last-real",
                           help="classify: last: texts padded with <|endoftext|> to the longest training text, "
                           "the last position decides (the book); last-real: each text's last real token.")] = None,
    text_column: Annotated[Optional[str], _opt("--text-column", metavar="NAME|N", help="classify: the column of "
                           "the texts, by header name or number (1 is the first). Default: a header column named "
                           "text (or sms, message, ...), else of two columns the one with more distinct values.")] = None,
    label_column: Annotated[Optional[str], _opt("--label-column", metavar="NAME|N", help="classify: the column of "
                            "the labels (default: a header column named label, else of two columns the one with "
                            "fewer distinct values).")] = None,
    test_fraction: Annotated[Optional[float], _setting("test_fraction", "--test-fraction", metavar="F", help="classify: "
                             "rows held out for the test accuracy at the end (book-ch06: 0.2).")] = None,
    balance: Annotated[Optional[bool], typer.Option("--balance/--no-balance", show_default=False, help="classify: "
                       "undersample every label to the rarest label's count, as the book does with ham "
                       "(book-ch06: on). [default: off]")] = None,
    lora: Annotated[Optional[int], _opt("--lora", metavar="RANK", help="Train LoRA adapters of this rank instead "
                    "of the weights (appendix E; the book: 16); the run saves the adapters alone, and --weights RUN "
                    "loads them on their base.")] = None,
    lora_alpha: Annotated[Optional[float], _setting("lora_alpha", "--lora-alpha", metavar="ALPHA", help="LoRA's "
                          "scale: linear(x) + alpha * (x @ A @ B), as the book (which uses 16).")] = None,
    mask_prompt: Annotated[bool, typer.Option("--mask-prompt", help="instruct: no loss on the prompt either, only "
                           "on the response (the book's exercise 7.2).")] = False,
    max_length: Annotated[Optional[int], _setting("max_length", "--max-length", metavar="N", help="instruct: cut "
                          "examples to N tokens (a note says how many; none: the context length).")] = None,
    tokenizer: Annotated[Optional[str], _setting("tokenizer", "--tokenizer", metavar="gpt2|char", help="gpt2 (GPT-2's BPE, the "
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
    epochs: Annotated[Optional[int], _setting("epochs", "--epochs", metavar="N", help="Passes over the training windows.")] = None,
    max_steps: Annotated[Optional[int], _setting("max_steps", "--max-steps", metavar="N", help="Optimizer steps (with --epochs, "
                         "whichever ends first).")] = None,
    batch_size: Annotated[Optional[int], _setting("batch_size", "--batch-size", "-b", metavar="N", help="Sequences per micro-batch "
                          "(over all processes under torchrun).")] = None,
    grad_accum: Annotated[Optional[int], _setting("grad_accum", "--grad-accum", metavar="N", help="Micro-batches per optimizer "
                          "step (gradient accumulation).")] = None,
    lr: Annotated[Optional[float], _setting("lr", "--lr", metavar="LR", help="Peak learning rate.")] = None,
    schedule: Annotated[Optional[str], _setting("schedule", "--schedule", metavar="constant|cosine", help="constant, or linear "
                        "warm-up then cosine decay to --min-lr.")] = None,
    warmup_steps: Annotated[Optional[int], _setting("warmup_steps", "--warmup-steps", metavar="N", help="Warm-up steps (cosine).")] = None,
    min_lr: Annotated[Optional[float], _setting("min_lr", "--min-lr", metavar="LR", help="Where cosine decay ends.")] = None,
    decay_steps: Annotated[Optional[int], _setting("decay_steps", "--decay-steps", metavar="N", help="The step where cosine decay "
                           "reaches --min-lr (default: the run's last step).")] = None,
    weight_decay: Annotated[Optional[float], _setting("weight_decay", "--weight-decay", metavar="WD", help="AdamW weight decay.")] = None,
    decay: Annotated[Optional[str], _setting("decay", "--decay", metavar="all|2d", help="Decay every parameter (the book) or "
                     "only 2-D weights (nanoGPT).")] = None,
    beta1: Annotated[Optional[float], _opt("--beta1", metavar="B", help="AdamW beta1. [default: 0.9]")] = None,
    beta2: Annotated[Optional[float], _opt("--beta2", metavar="B", help="AdamW beta2. [default: 0.999]")] = None,
    grad_clip: Annotated[Optional[float], _setting("grad_clip", "--grad-clip", metavar="NORM", help="Clip the gradient norm (0: "
                         "off).")] = None,
    sampling: Annotated[Optional[str], _setting("sampling", "--sampling", metavar="windows|random", help="windows: the book's "
                        "fixed windows, shuffled each epoch; random: nanoGPT's windows at random offsets.")] = None,
    stride: Annotated[Optional[int], _setting("stride", "--stride", metavar="N", help="Tokens between windows (windows; default "
                      "the context length).")] = None,
    val_fraction: Annotated[Optional[float], _setting("val_fraction", "--val-fraction", metavar="F", help="The last F of the text "
                            "validates.")] = None,
    eval_every: Annotated[Optional[int], _setting("eval_every", "--eval-every", metavar="N", help="Evaluate every N steps (and "
                          "after the last one: in the JSON log and the summary).")] = None,
    eval_batches: Annotated[Optional[int], _setting("eval_batches", "--eval-batches", metavar="N", help="Batches per split in each "
                            "evaluation.")] = None,
    sample_prompt: Annotated[Optional[str], _setting("sample_prompt", "--sample-prompt", metavar="TEXT", help="Prompt of the "
                             "samples shown while training.")] = None,
    sample_every: Annotated[Optional[str], _setting("sample_every", "--sample-every", metavar="epoch|N", help="Sample after each "
                            "epoch, every N steps, or 0 for never.")] = None,
    sample_tokens: Annotated[Optional[int], _setting("sample_tokens", "--sample-tokens", metavar="N", help="Tokens per sample.")] = None,
    sample_temperature: Annotated[Optional[float], _setting("sample_temperature", "--sample-temperature", metavar="T",
                                  help="The samples' temperature: 0 is greedy (the book); shakespeare-char samples "
                                  "at 0.8 with top-k 200, as nanoGPT's sample.py.")] = None,
    sample_top_k: Annotated[Optional[int], _setting("sample_top_k", "--sample-top-k", metavar="K",
                            help="Sample among the K likeliest tokens.")] = None,
    sample_seed: Annotated[Optional[int], _setting("sample_seed", "--sample-seed", metavar="N",
                           help="The samples' seed, the same for every sample (none: --seed).")] = None,
    save_every: Annotated[Optional[int], _setting("save_every", "--save-every", metavar="N", help="Checkpoint every N steps (always "
                          "at the end, and on Ctrl-C or SIGTERM).")] = None,
    init: Annotated[Optional[str], _setting("init", "--init", metavar="auto|book|gpt2", help="A new model's init. "
                    "auto: book for an untied head (book-ch05), gpt2 for a tied one (GPT-2's configs, the default "
                    "124M), so the loss starts near ln(vocab). book: nn defaults, drawn in the book's order; untied "
                    "heads only (its N(0, 1) embeddings as a tied head start the loss near 230). gpt2: N(0, 0.02), "
                    "as nanoGPT.")] = None,
    seed: Annotated[Optional[int], _setting("seed", "--seed", metavar="N", help="Seeds the init, the data order and dropout.")] = None,
    device: DeviceOption = "auto",
    dtype: Annotated[Optional[str], _setting("dtype", "--dtype", metavar="float32|bfloat16|float16|auto", help="float32, or bfloat16/float16 "
                     "autocast (weights and AdamW state stay float32); auto: bfloat16 where one of the model's "
                     "transformer blocks trained at least 1.15x as fast in bfloat16 as in float32 on this machine (CPUs "
                     "with AMX; measured once, then cached), else float32 (the shakespeare-char recipe's choice).")] = None,
    compile_model: Annotated[bool, typer.Option("--compile", help="Compile the model with torch.compile.")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", metavar="N", min=1, show_default=False,
                       help=f"{THREADS_HELP} With --resume: the count the run recorded (so it stays bit for bit), "
                       "unless given.")] = None,
    resume: Annotated[Optional[Path], _opt("--resume", metavar="DIR", help="Continue the run in DIR where it "
                      "stopped (bit for bit on the CPU, on the run's own thread count).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the run already in --out.")] = False,
    json_output: Annotated[Optional[bool], typer.Option("--json/--plain", show_default=False, help="JSON Lines "
                           "events on stdout, or the plain lines a terminal shows (the book's evaluation lines and "
                           "the samples). Default: plain on a terminal, JSON in a pipe.")] = None,
) -> None:
    """Pretrain or fine-tune GPT-2 on your own text, to classify texts (--task classify) or to follow instructions (--task instruct).

    Recipes: book-ch05 is chapter 5 of the book (124M, context 256, The Verdict; prints the book's figures);
    book-ch06 is chapter 6 (GPT-2 124M fine-tuned on the SMS Spam Collection to tell spam from ham);
    book-ch07 is chapter 7 (instruction fine-tuning GPT-2 355M on the book's instruction data);
    shakespeare-char is nanoGPT's CPU recipe (a 0.8M-parameter character model). Flags override a recipe.
    A recipe without DATA trains on its own data, downloaded once and cached.

    --task classify reads a TSV or CSV of text and label (a header row naming text and label, or two
    columns; --text-column/--label-column otherwise), replaces the output head by one row per label,
    trains the last block, final LayerNorm and head, and prints accuracy beside the loss; use the run with
    gptcli classify. --lora RANK (appendix E) trains low-rank adapters instead of the weights, for either
    task; the run saves the adapters alone, --weights RUN loads them on their base, gptcli export merges them.

    On a terminal a progress bar shows step, epoch, loss, lr, tokens/s and ETA, with evaluations and samples
    above it. In a pipe or with --json, stdout gets one JSON event per line (start, eval, sample, checkpoint,
    end), the same lines as DIR/train.jsonl. Ctrl-C or SIGTERM saves a checkpoint, prints the resume command
    and exits 130 (143 for SIGTERM); --resume continues, bit for bit on the CPU (on the thread count
    the run recorded).

    Examples:

    \b
      gptcli train --recipe shakespeare-char          # downloads Tiny Shakespeare once
      gptcli train the-verdict.txt --recipe book-ch05 --out runs/verdict
      gptcli train tinyshakespeare.txt --recipe shakespeare-char --out runs/shakespeare
      gptcli generate --weights runs/shakespeare "ROMEO:" -n 200 -t 0.8 --top-k 50
      gptcli train notes/ --weights gpt2 --epochs 2 --lr 5e-5 --out runs/notes
      gptcli train --resume runs/shakespeare --max-steps 3000
      gptcli train --recipe book-ch06 --out runs/spam      # downloads the SMS Spam Collection once
      gptcli train reviews.csv --task classify --weights gpt2 --epochs 3 --out runs/reviews
      gptcli train notes/ --weights gpt2 --lora 16 --epochs 2 --lr 5e-4 --out runs/notes-lora
      gptcli train --recipe book-ch07 --out runs/ch07          # instruction-tune GPT-2 355M
      gptcli train pairs.json --task instruct --weights gpt2 --epochs 2 --mask-prompt --out runs/pairs
      gptcli generate --interactive --weights runs/ch07        # chat in the run's template
    """
    from gptcli import training

    flags: dict[str, Any] = {
        "tokenizer": tokenizer, "max_length": max_length, "epochs": epochs, "max_steps": max_steps,
        "batch_size": batch_size,
        "grad_accum": grad_accum, "lr": lr, "schedule": schedule, "warmup_steps": warmup_steps, "min_lr": min_lr,
        "decay_steps": decay_steps,
        "weight_decay": weight_decay, "decay": decay, "sampling": sampling, "stride": stride,
        "val_fraction": val_fraction, "eval_every": eval_every,
        "eval_batches": eval_batches, "sample_prompt": sample_prompt, "sample_tokens": sample_tokens,
        "sample_temperature": sample_temperature, "sample_top_k": sample_top_k, "sample_seed": sample_seed,
        "save_every": save_every, "seed": seed, "init": init, "dtype": dtype,
        "task": task, "trainable": trainable, "label_token": label_token, "text_column": text_column,
        "label_column": label_column, "test_fraction": test_fraction, "balance": balance, "lora": lora,
        "lora_alpha": lora_alpha,
    }
    flags = {k: v for k, v in flags.items() if v is not None}
    if grad_clip is not None:
        flags["grad_clip"] = grad_clip if grad_clip > 0 else None
    if sample_every is not None:
        flags["sample_every"] = _sample_every(sample_every)
    if compile_model:
        flags["compile"] = True
    if mask_prompt:
        flags["mask_prompt"] = True
    arch = {k: v for k, v in {"context_length": context_length, "n_layers": n_layers, "n_heads": n_heads,
                               "emb_dim": emb_dim, "drop_rate": drop_rate}.items() if v is not None}
    json_mode = json_output if json_output is not None else not sys.stdout.isatty()
    request = training.RunRequest(data=tuple(data or ()), out=out, recipe=recipe, settings=flags, arch=arch,
                                  beta1=beta1, beta2=beta2, size=size, config=config, weights=weights,
                                  device=device, force=force, resume=resume, threads=threads)
    try:
        with _stopped_before_training() as stopped:
            run = training.prepare_run(request, note=note, tokenizing=_tokenizing_bar)
    except UserError:
        if training.dist_from_env().main:
            raise
        raise typer.Exit(2) from None  # under torchrun every process fails alike: rank 0 says it, once
    except KeyboardInterrupt:
        err("error: stopped before training started; nothing was trained (the same command starts again)")
        raise typer.Exit(STOP_SIGNALS.get(stopped[0], EXIT_INTERRUPTED) if stopped else EXIT_INTERRUPTED) from None
    try:
        _render(training.trainer_for(run), run, json_mode)
    finally:
        training.finish_distributed(run.dist)


@contextlib.contextmanager
def _stopped_before_training() -> Iterator[list[int]]:
    """While the run is prepared, SIGTERM stops as Ctrl-C does (one line, not a bare kill); the list
    names the signal."""
    stopped: list[int] = []

    def handle(signum, frame):
        stopped.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield stopped
    finally:
        signal.signal(signal.SIGTERM, previous)


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


def sample_label(ev: dict) -> str:
    """What a sample is, for the note before it: when it was drawn and how."""
    how = "greedy" if not ev.get("temperature") else ", ".join(
        [f"temperature {ev['temperature']:g}"] + ([f"top-k {ev['top_k']}"] if ev.get("top_k") else [])
        + ([f"seed {ev['seed']}"] if ev.get("seed") is not None else []))
    return f"sample after step {ev['step']} ({how}):"


def accuracy_line(ev: dict) -> str:
    """The book's line after each epoch of chapter 6."""
    return f"Training accuracy: {ev['train_acc'] * 100:.2f}% | Validation accuracy: {ev['val_acc'] * 100:.2f}%"


def accuracy_summary(end: dict) -> str:
    """The accuracy on each whole split after the last step (the book's final figures)."""
    acc = end.get("accuracy") or {}
    parts = [f"{name} {acc[key] * 100:.2f}%" for key, name in (("train", "training"), ("val", "validation"),
                                                                ("test", "test")) if acc.get(key) is not None]
    return f"; accuracy: {', '.join(parts)}" if parts else ""


def classify_start_line(ev: dict, where: str, out) -> str:
    """What a classification run is about to do."""
    rows, cut = ev["rows"], sum(ev["truncated"].values())
    what = ("LoRA adapters" + (" and the head" if ev["task"] == "classify" else "")) if ev["trainable"] == "lora" \
        else {"last-block": "the last block, final LayerNorm and head", "all": "every weight",
              "head": "the head"}[ev["trainable"]]
    cuts = f"; {cut} text{'s' * (cut != 1)} longer than {ev['max_length']} tokens cut ({', '.join(f'{k} {v}' for k, v in ev['truncated'].items() if v)})" \
        if cut else ""
    return (f"{ev['params']:,} parameters, {ev['trainable_params']:,} trainable ({what}); labels "
            f"{', '.join(ev['labels'])}; {rows['train']} training, {rows['val']} validation and {rows['test']} test "
            f"rows, padded to {ev['max_length']} token{'s' * (ev['max_length'] != 1)}{cuts}; {ev['total_steps']} "
            f"step{'s' * (ev['total_steps'] != 1)} on {where}; writing {out}")


def final_summary(ev: dict | None) -> str:
    """The evaluation after the last step, when it was off the --eval-every schedule, for the summary."""
    if ev is None:
        return ""
    return f"; final train loss {ev['train_loss']:.3f}, val loss {ev['val_loss']:.3f}"


class Stopper:
    """SIGINT (Ctrl-C) and SIGTERM ask the trainer to stop after this step and save. A second signal
    quits at once, unless a checkpoint is being written: then the save finishes first (the files are
    whole either way; a run with no checkpoint yet keeps this one)."""

    def __init__(self, trainer, main: bool):
        self.trainer = trainer
        self.main = main
        self.signals: list[int] = []
        self.quit_after_save = False
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "Stopper":
        for signum in STOP_SIGNALS:
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    @property
    def exit_code(self) -> int:
        return STOP_SIGNALS[self.signals[0]] if self.signals else EXIT_INTERRUPTED

    def _handle(self, signum, frame) -> None:
        self.signals.append(signum)
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        if len(self.signals) == 1:
            self.trainer.request_stop()
            if self.main:
                note(f"{name}: stopping after this step and saving a checkpoint ({name} again to quit without "
                     "saving)")
            return
        if getattr(self.trainer, "saving", False):
            self.quit_after_save = True
            if self.main:
                note("writing the checkpoint; quitting once it is whole")
            return
        raise KeyboardInterrupt


def _render(trainer, run: "Run", json_mode: bool) -> None:
    from gptcli.training import RunLog

    main = run.dist.main
    log = RunLog(run.out) if main else None
    progress = None
    end: dict | None = None
    final: dict | None = None
    stopper = Stopper(trainer, main)
    try:
        with stopper:
            for ev in trainer.events():
                if not main:
                    continue
                log.record(ev)
                kind = ev["event"]
                if kind == "start":
                    progress = _start_progress(ev, json_mode)
                    where = f"{ev['device']} ({ev['threads']} thread{'s' * (ev['threads'] != 1)})" \
                        if ev["device"] == "cpu" else ev["device"]
                    if ev["resumed"]:
                        note(f"resuming {run.out} after step {ev['step'] - 1} on {where}")
                    elif ev.get("task") == "classify":
                        note(classify_start_line(ev, where, run.out))
                    else:
                        lora = f" ({ev['trainable_params']:,} trainable: LoRA adapters)" \
                            if ev.get("trainable_params") != ev["params"] else ""
                        note(f"{ev['params']:,} parameters{lora}, {_data_summary(ev)}, {ev['total_steps']} "
                             f"step{'s' * (ev['total_steps'] != 1)} on {where}; writing {run.out}")
                if kind == "step":
                    if progress is not None:
                        progress.advance(ev)
                    continue
                if json_mode:
                    sys.stdout.write(json.dumps(ev, ensure_ascii=False) + "\n")
                    sys.stdout.flush()
                elif kind == "eval" and ev.get("final"):
                    final = ev  # in the summary: the book's lines are the scheduled evaluations only
                elif kind == "eval":
                    _print_above(progress, book_line(ev))
                elif kind == "accuracy":
                    _print_above(progress, accuracy_line(ev))
                elif kind == "sample":
                    _print_above(progress, sample_line(ev, run.tokenizer.name), label=sample_label(ev))
                if kind == "end":
                    end = ev
                if kind == "checkpoint" and stopper.quit_after_save:
                    break  # the second signal's wish, now that the checkpoint is whole
    except KeyboardInterrupt:
        if progress is not None:
            progress.stop()
        from gptcli.training import STATE_FILE

        if (run.out / STATE_FILE).exists():
            err(f"error: interrupted without saving this step; the last checkpoint in {run.out} is intact "
                f"(gptcli train --resume {run.out})")
        else:
            err(f"error: interrupted before the first checkpoint; nothing to resume in {run.out}")
        raise typer.Exit(stopper.exit_code) from None
    finally:
        if progress is not None:
            progress.stop()
        if log is not None:
            log.close()  # an interrupted run's plot shows every evaluation it logged
    if main and stopper.quit_after_save:
        note(f"stopped; saved {run.out}; continue with: gptcli train --resume {run.out}")
        raise typer.Exit(stopper.exit_code)
    if main and end is not None:
        rate = f", {end['tokens_per_s']:,.0f} tokens/s" if end.get("tokens_per_s") else ""
        if end["reason"] == "interrupted":
            from gptcli.training import STATE_FILE

            if not (run.out / STATE_FILE).exists():  # stopped before the first step: nothing was trained
                err("error: stopped before the first step; nothing to resume (the same command starts again)")
            else:
                note(f"stopped after step {end['step']}; saved {run.out}; continue with: gptcli train --resume "
                     f"{run.out}")
            raise typer.Exit(stopper.exit_code)
        steps = f"{end['step'] + 1} step{'s' * (end['step'] != 0)}"
        if run.settings.task == "classify":
            note(f"done: {steps} in {end['wall_s']:.1f} s{final_summary(final)}{accuracy_summary(end)}; weights in "
                 f"{run.out}; try: gptcli classify --weights {run.out} \"...\"")
            return
        best = f" (best in {run.out / 'best'})"  # a --lora run keeps its best adapters there too
        try_it = (f"gptcli generate --interactive --weights {run.out} (a chat in its prompt template)"
                  if run.metadata.get(TEMPLATE_METADATA_KEY) else f"gptcli generate --weights {run.out} \"...\"")
        note(f"done: {steps} in {end['wall_s']:.1f} s{rate}{final_summary(final)}; weights in {run.out}{best}; try: "
             f"{try_it}")


def _data_summary(start: dict) -> str:
    """What the run trains on, for the start note: tokens, or an instruction run's examples."""
    examples = start.get("examples")
    if examples is None:
        return f"{start['train_tokens']:,} training and {start['val_tokens']:,} validation tokens ({start['tokenizer']})"
    masked = ", loss on the responses only" if start.get("mask_prompt") else ""
    return (f"{examples['train']:,} training, {examples['val']:,} validation and {examples['test']:,} test examples "
            f"({start['train_tokens']:,} training tokens, at most {start['max_length']} per example{masked})")


def _print_above(progress, text: str, label: str | None = None) -> None:
    """A line on stdout (above the bar); ``label`` first, as a note on stderr, so stdout keeps the
    book's lines exactly."""
    if label is not None:
        note(label)  # under a bar on stdout, Rich's redirect prints it above the bar too
    if progress is not None and progress.on_stdout:
        progress.print(text)
    else:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


class _Bar:
    """The Rich progress bar: step/total, epoch, loss, lr, tokens/s, ETA."""

    def __init__(self, start: dict, console, redirect: bool = True):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.on_stdout = redirect  # on stdout, lines go above it through its console

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
    """The bar on stdout on a terminal; on stderr when stdout is a pipe (JSON, or --plain lines) and stderr
    is a terminal; none otherwise."""
    from rich.console import Console

    if not json_mode and sys.stdout.isatty():
        return _Bar(start, Console(highlight=False))
    if sys.stderr.isatty():
        return _Bar(start, Console(stderr=True, highlight=False), redirect=False)
    return None

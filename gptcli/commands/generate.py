"""`gptcli generate`: stream a continuation of a prompt. Parsing and rendering only; decoding is gptcli.generate."""

from __future__ import annotations

import os
import sys
from typing import Annotated, List, Optional

import typer

from gptcli.commands.common import ConfigOption, SizeOption, err, note, print_json, stdout_is_terminal, user_errors
from gptcli.devices import check_device_name, check_dtype_name
from gptcli.errors import UserError
from gptcli.generate import FINISH_INTERRUPTED, SamplingOptions

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def _number(option: str, value: str, kind: type) -> int | float:
    """Parse an option's value ourselves, so a bad one gives our one-line error, not click's usage panel."""
    try:
        return kind(value)
    except (TypeError, ValueError):
        what = "a whole number" if kind is int else "a number"
        raise UserError(f"{option} expects {what}, got {value!r}") from None


def _usage_and_exit(ctx: typer.Context) -> None:
    err(ctx.get_usage())
    err("")
    err("No prompt: give one as an argument, or pipe one in, e.g.  echo 'Once upon a time' | gptcli generate")
    err(f"Try '{ctx.command_path} --help' for help.")
    raise typer.Exit(2)


def read_stdin_prompt() -> str:
    """All of stdin as UTF-8, with one trailing newline removed (the one `echo` adds)."""
    stream = sys.stdin
    if stream is None:
        raise UserError("no prompt: stdin is closed; give the prompt as an argument")
    raw = stream.buffer.read() if hasattr(stream, "buffer") else stream.read().encode("utf-8")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"stdin is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "convert it first, e.g. with iconv -t UTF-8"
        ) from None
    text = text.removeprefix("\ufeff")
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def _silence_stdout() -> None:
    """After EPIPE (`| head`), point stdout at /dev/null so the exit-time flush can't complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass  # not a real file (tests) or already gone: nothing will be flushed there


class TextOutput:
    """Where streamed text goes: plain writes to stdout, flushed per piece, never through Rich's wrapping."""

    def __init__(self, terminal: bool):
        self.terminal = terminal

    def prompt(self, text: str) -> None:
        if not text:
            return
        if self.terminal:
            # Dimmed via Rich on a terminal; soft_wrap so Rich doesn't insert line breaks,
            # no markup/emoji/highlighting so the prompt shows exactly as typed.
            from rich.console import Console
            from rich.text import Text

            console = Console(file=sys.stdout, soft_wrap=True, markup=False, emoji=False, highlight=False)
            console.print(Text(text, style="dim"), end="")
            sys.stdout.flush()
        else:
            self.write(text)

    def write(self, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    def end(self) -> None:
        self.write("\n")


def _fmt_rate(rate: float | None) -> str:
    return f"{rate:.1f} tok/s" if rate is not None else "n/a"


@user_errors
def generate(
    ctx: typer.Context,
    prompt: Annotated[
        Optional[str],
        typer.Argument(
            metavar="PROMPT",
            help="The text to continue. Omit it or pass '-' to read all of stdin (one trailing newline is dropped). "
            "An empty prompt starts from <|endoftext|>.",
            show_default=False,
        ),
    ] = None,
    size: SizeOption = None,
    config: ConfigOption = None,
    weights: Annotated[
        str,
        typer.Option(
            "--weights",
            "-w",
            metavar="SOURCE",
            help="Where the weights come from: auto, random (seeded init), a .safetensors file or folder, "
            "or a Hugging Face hub id.",
        ),
    ] = "auto",
    max_new_tokens: Annotated[
        str, typer.Option("--max-new-tokens", "-n", metavar="N", help="How many new tokens at most (0 or more).")
    ] = "50",
    temperature: Annotated[
        str,
        typer.Option("--temperature", "-t", metavar="T", help="0 picks the most likely token (greedy); above 0 samples, "
                     "higher is more random."),
    ] = "0",
    top_k: Annotated[
        Optional[str],
        typer.Option("--top-k", metavar="K", help="Sample only among the K most likely tokens (K >= 1).",
                     show_default=False),
    ] = None,
    top_p: Annotated[
        Optional[str],
        typer.Option("--top-p", metavar="P", help="Sample only among the most likely tokens whose probabilities add "
                     "up to P, in (0, 1].", show_default=False),
    ] = None,
    seed: Annotated[
        str, typer.Option("--seed", metavar="N", help="Seeds random weights and sampling: same seed, same text.")
    ] = "123",
    stop: Annotated[
        Optional[List[str]],
        typer.Option("--stop", metavar="STR", help="Stop before this text; it is not printed. Repeatable.",
                     show_default=False),
    ] = None,
    ignore_eos: Annotated[
        bool, typer.Option("--ignore-eos", help="Keep going past <|endoftext|> (printed as text) instead of stopping.")
    ] = False,
    echo: Annotated[
        Optional[bool],
        typer.Option("--echo/--no-echo", help="Print the prompt before the continuation. Default: dimmed on a "
                     "terminal, not in a pipe.", show_default=False),
    ] = None,
    device: Annotated[
        str, typer.Option("--device", "-d", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")
    ] = "auto",
    dtype: Annotated[
        str, typer.Option("--dtype", help="auto (bfloat16 on CUDA, float16 on MPS, float32 on CPU), float32, "
                          "bfloat16 or float16.")
    ] = "auto",
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object at the end (text, ids, finish reason, timings) "
                           "instead of streaming.")
    ] = False,
    stats: Annotated[bool, typer.Option("--stats", help="Print load, prefill and decode timings on stderr.")] = False,
) -> None:
    """Continue a prompt with GPT-2, streaming each token as soon as it is decoded.

    Greedy by default (--temperature 0), so the same command prints the same text; --seed makes sampling repeatable.

    Data goes to stdout; notes, stats and errors go to stderr. In a pipe, stdout is exactly the continuation and a newline (the prompt first only with --echo): no colours, no wrapping.

    Generation ends at <|endoftext|> (finish reason eos), at a --stop string (stop) or after -n tokens (length). Ctrl-C stops, keeps what was printed and exits 130.

    Examples:

      gptcli generate "Hello, I am" -n 20

      gptcli generate "Hello, I am" --config configs/book-124M.yaml --weights random -n 6   # the book's line

      gptcli generate "The meaning of life is" -t 0.8 --top-k 50 --top-p 0.95 --seed 7

      gptcli generate "Q: What is 2+2? A:" --stop "Q:" -n 30

      echo "Once upon a time" | gptcli generate -n 20

      gptcli generate -n 20 < story.txt > continuation.txt

      gptcli generate --json "Hello" -n 10 | jq -r .text

      gptcli generate "Hello" -n 100 --stats 2> stats.txt | head -c 80
    """
    options = SamplingOptions(
        max_new_tokens=int(_number("--max-new-tokens", max_new_tokens, int)),
        temperature=float(_number("--temperature", temperature, float)),
        top_k=None if top_k is None else int(_number("--top-k", top_k, int)),
        top_p=None if top_p is None else float(_number("--top-p", top_p, float)),
        seed=int(_number("--seed", seed, int)),
        stop=tuple(stop or ()),
        ignore_eos=ignore_eos,
    ).validate()
    if options.seed < 0:
        raise UserError(f"--seed must be 0 or more, got {options.seed}")
    device_name = check_device_name(device)
    dtype_name = check_dtype_name(dtype)

    if prompt is None or prompt == "-":
        if prompt is None and sys.stdin is not None and sys.stdin.isatty():
            _usage_and_exit(ctx)
        prompt_text = read_stdin_prompt()
    else:
        prompt_text = prompt

    try:
        _run(prompt_text, options, size=size, config=config, weights=weights, device_name=device_name,
             dtype_name=dtype_name, json_output=json_output, stats=stats, echo=echo)
    except KeyboardInterrupt:
        # Ctrl-C before generation started (while loading); nothing to keep.
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except BrokenPipeError:
        # The reader went away (`| head -c 5`): that is how pipelines end, not an error.
        _silence_stdout()
        raise typer.Exit(0) from None


def _run(prompt_text: str, options: SamplingOptions, *, size, config, weights: str, device_name: str,
         dtype_name: str, json_output: bool, stats: bool, echo: bool | None) -> None:
    from gptcli.devices import dtype_name as name_of, resolve_device, resolve_dtype
    from gptcli.generate import Decoder, Generation, crop_prompt, prompt_ids
    from gptcli.weights import load_model

    ids = prompt_ids(prompt_text)  # the tokenizer first: its error is quicker than loading a model
    if options.greedy and (options.top_k is not None or options.top_p is not None):
        note("--top-k and --top-p only apply when sampling (--temperature above 0); decoding greedily")
    torch_device = resolve_device(device_name)
    torch_dtype = resolve_dtype(dtype_name, torch_device)
    loaded = load_model(size=size, config=config, weights=weights, device=torch_device, dtype=torch_dtype,
                        seed=options.seed, note=note)
    cfg = loaded.cfg
    _, dropped = crop_prompt(ids, cfg.context_length)
    if dropped:
        note(f"the prompt has {len(ids)} tokens, more than the context of {cfg.context_length}; "
             f"dropped the first {dropped}")

    generation = Generation(Decoder(loaded.model, loaded.device, loaded.dtype), ids, options,
                            context_length=cfg.context_length)
    out = TextOutput(terminal=stdout_is_terminal())
    interrupted = False
    if not json_output and (echo or (echo is None and out.terminal)):
        out.prompt(prompt_text)
    try:
        for piece in generation:
            if not json_output:
                out.write(piece)
    except KeyboardInterrupt:
        interrupted = True
        generation.finish_reason = FINISH_INTERRUPTED
    if not json_output:
        out.end()

    t = generation.timings
    if json_output:
        print_json({
            "prompt": prompt_text,
            "text": generation.text,
            "prompt_token_ids": ids,
            "prompt_tokens_dropped": dropped,
            "token_ids": generation.token_ids,
            "finish_reason": generation.finish_reason,
            "config": cfg.name,
            "weights": loaded.source,
            "device": str(loaded.device),
            "dtype": name_of(loaded.dtype),
            "seed": options.seed,
            "sampling": {"temperature": options.temperature, "top_k": options.top_k, "top_p": options.top_p},
            "stop": list(options.stop),
            "timings": {
                "load_s": round(loaded.load_seconds, 6),
                "prefill_s": round(t.prefill_s, 6),
                "decode_s": round(t.decode_s, 6),
                "prefill_tokens": t.prefill_tokens,
                "decode_tokens": t.decode_tokens,
                "decode_tokens_per_s": None if t.decode_tokens_per_s is None else round(t.decode_tokens_per_s, 3),
            },
        })
    if stats:
        err(f"stats: load {loaded.load_seconds:.2f} s, prefill {t.prefill_tokens} tokens in {t.prefill_s:.3f} s, "
            f"decode {t.decode_tokens} tokens in {t.decode_s:.3f} s ({_fmt_rate(t.decode_tokens_per_s)}), "
            f"{name_of(loaded.dtype)} on {loaded.device}, finish {generation.finish_reason}")
    if interrupted:
        note(f"interrupted after {len(generation.token_ids)} new tokens")
        raise typer.Exit(EXIT_INTERRUPTED)

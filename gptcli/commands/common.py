"""What every command shares: option types, the stdout/stderr contract, error handling, tables.

Data goes to stdout; notes, progress and errors go to stderr. On a terminal stdout gets Rich
output; in a pipe it gets plain text (no ANSI codes, no wrapping) or JSON.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional, Sequence, TypeVar

import typer

from gptcli.errors import UserError

if TYPE_CHECKING:
    from gptcli.config import GPTConfig
    from gptcli.runtime import InferenceOptions, Runtime

F = TypeVar("F", bound=Callable[..., Any])

def _completer(values: Sequence[str]) -> Callable[[str], list[str]]:
    """Shell completion of an option's value: the ``values`` that start with what was typed."""

    def complete(incomplete: str) -> list[str]:
        return [v for v in values if v.lower().startswith(incomplete.lower())]

    return complete


def _size_names() -> list[str]:
    from gptcli.config import GPT2_SIZES, SIZES

    return [name for canonical, (_, aliases) in SIZES.items()
            for name in (canonical, *(aliases[:1] if canonical in GPT2_SIZES else ()))]


def complete_size(incomplete: str) -> list[str]:
    """--size values for shell completion: each size and its short alias (124M, small, ...)."""
    return _completer(_size_names())(incomplete)


complete_device = _completer(["auto", "cpu", "cuda", "mps"])
complete_dtype = _completer(["auto", "float32", "bfloat16", "float16"])

SizeOption = Annotated[
    Optional[str],
    typer.Option(
        "--size",
        "-s",
        metavar="SIZE",
        help="Model size: 124M/small, 355M/medium, 774M/large, 1558M/xl (case-insensitive), "
        "or 'book' for the book's GPT_CONFIG_124M. Default 124M.",
        show_default=False,
        autocompletion=complete_size,
    ),
]
ConfigOption = Annotated[
    Optional[Path],
    typer.Option(
        "--config",
        "-c",
        metavar="FILE",
        help="Your own YAML config with the book's keys (vocab_size, context_length, emb_dim, n_heads, "
        "n_layers, drop_rate, qkv_bias) plus tie_weights (default false: the book's separate output head), "
        "bias (default true) and gelu (tanh, the default, or erf: nanoGPT's exact GELU). "
        "Not with --size.",
        show_default=False,
    ),
]
DeviceOption = Annotated[
    str, typer.Option("--device", "-d", metavar="DEVICE", autocompletion=complete_device,
                      help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")
]
DtypeOption = Annotated[
    str, typer.Option("--dtype", metavar="DTYPE", autocompletion=complete_dtype,
                      help="auto (bfloat16 on CUDA, float16 on MPS, float32 on CPU), float32, bfloat16 or float16.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
WeightsOption = Annotated[
    str,
    typer.Option(
        "--weights",
        "-w",
        metavar="SOURCE",
        help="Where the weights come from: auto, random (seeded init), a .safetensors file or folder, "
        "or a Hugging Face hub id.",
    ),
]
NoTuneOption = Annotated[
    bool,
    typer.Option(
        "--no-tune",
        help="Skip measuring this CPU's matrix kernels (done once per model shape, 0.5-2.5 s, then cached in "
        "~/.cache/gptcli, or $GPTCLI_CACHE_DIR) and use the default, oneDNN's packed weights. GPTCLI_NO_TUNE=1 "
        "does the same.",
    ),
]
THREADS_HELP = ("CPU threads for torch. Default: OMP_NUM_THREADS if set, else the cores this process may use "
                "that other processes are not keeping busy (a busy core stalls every step).")
ThreadsOption = Annotated[
    Optional[int],
    typer.Option(
        "--threads",
        metavar="N",
        min=1,
        help=THREADS_HELP,
        show_default=False,
    ),
]


def stdout_is_terminal() -> bool:
    """Whether stdout is a terminal: decides content, such as echoing the prompt by default."""
    return sys.stdout.isatty()


def stdout_styled() -> bool:
    """Whether stdout gets Rich output (colours, tables, bars), decided as Rich decides it.

    TTY_COMPATIBLE=1/0 first, then FORCE_COLOR (set and not empty: yes, even in a pipe; set empty: no;
    see force-color.org), else a terminal. NO_COLOR keeps the layout and drops the colours (Rich).
    """
    import os

    tty_compatible = os.environ.get("TTY_COMPATIBLE", "")
    if tty_compatible in ("0", "1"):
        return tty_compatible == "1"
    force_color = os.environ.get("FORCE_COLOR")
    if force_color is not None:
        return force_color != ""
    return stdout_is_terminal()


def err(message: str) -> None:
    """A diagnostic line on stderr (never stdout)."""
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()


def note(message: str) -> None:
    err(f"note: {message}")


def user_errors(fn: F) -> F:
    """Turn a UserError into one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            err(f"error: {exc}")
            raise typer.Exit(exc.exit_code) from None
        except BrokenPipeError:
            # The reader went away (`| head`): how pipelines end, not an error.
            silence_stdout()
            raise typer.Exit(0) from None

    return wrapper  # type: ignore[return-value]


def parse_number(option: str, value: str, kind: type) -> int | float:
    """Parse an option's value ourselves, so a bad one gives our one-line error, not click's usage panel."""
    try:
        return kind(value)
    except (TypeError, ValueError):
        what = "a whole number" if kind is int else "a number"
        raise UserError(f"{option} expects {what}, got {value!r}") from None


def parse_seed(value: str, option: str = "--seed") -> int:
    """A seed option's value: a whole number that torch's generators take (0 to 2**64 - 1)."""
    from gptcli.decoding.generate import check_seed

    return check_seed(int(parse_number(option, value, int)), option)


def usage_and_exit(ctx: typer.Context, hint: str) -> None:
    """The usage, a hint and exit 2: for a command that would wait on a terminal for stdin."""
    err(ctx.get_usage())
    err("")
    err(hint)
    err(f"Try '{ctx.command_path} --help' for help.")
    raise typer.Exit(2)


def decode_utf8(raw: bytes, what: str) -> str:
    """``raw`` as UTF-8 without a leading byte-order mark; a UserError naming ``what`` and the offset otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{what} is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "convert it first, e.g. with iconv -t UTF-8"
        ) from None
    return text.removeprefix("\ufeff")


def read_stdin(strip_newline: bool = True, closed: str = "stdin is closed") -> str:
    """All of stdin as UTF-8, with one trailing newline removed (the one `echo` adds) unless told not to.

    ``closed``: the error when there is no stdin at all.
    """
    stream = sys.stdin
    if stream is None:
        raise UserError(closed)
    raw = stream.buffer.read() if hasattr(stream, "buffer") else stream.read().encode("utf-8")
    text = decode_utf8(raw, "stdin")
    if not strip_newline:
        return text
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def read_text_file(path: str) -> str:
    """A file's text as UTF-8 (a leading byte-order mark dropped); one-line UserErrors for what goes wrong."""
    try:
        raw = Path(path).expanduser().read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a file") from None
    except PermissionError:
        raise UserError(f"{path}: permission denied") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    return decode_utf8(raw, path)


def split_lines(text: str) -> list[str]:
    """One item per line; a final newline ends the last line rather than starting an empty one."""
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def escape_line(text: str) -> str:
    """Text on one line: backslash, newline and carriage return escaped, so each input line gets one output line."""
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def load_for_command(options: "InferenceOptions") -> "Runtime":
    """``gptcli.runtime.load_for_inference`` with the loader's notes on stderr and, on a terminal, a note
    while this CPU's kernels are measured (a script's stderr stays as it was; the JSON has tune_s)."""
    from gptcli.runtime import load_for_inference

    def measuring() -> None:
        if sys.stderr.isatty():
            note("measuring the matrix kernels of this CPU (once; cached for later runs, --no-tune skips it)...")

    return load_for_inference(options, note=note, on_measure=measuring)


def check_tokenizer_early(weights: str | None) -> None:
    """With auto/random weights the model speaks GPT-2's BPE: load it before the model, so a missing
    tokenizer fails fast. A checkpoint names its own tokenizer, known once its header is read."""
    if (weights or "auto").strip().lower() in {"auto", "random"}:
        from gptcli.tokenizer import get_tokenizer

        get_tokenizer()


def silence_stdout() -> None:
    """After EPIPE, point stdout at /dev/null so the exit-time flush can't complain."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass  # not a real file (tests) or already gone: nothing will be flushed there


def describe_config(cfg: "GPTConfig") -> str:
    """A config in one line, for table titles: ``124M: emb_dim 768, n_layers 12, ...``."""
    return (f"{cfg.name}: emb_dim {cfg.emb_dim}, n_layers {cfg.n_layers}, n_heads {cfg.n_heads}, "
            f"context {cfg.context_length}, vocab {cfg.vocab_size}, qkv_bias {cfg.qkv_bias}, "
            f"tie_weights {cfg.tie_weights}" + ("" if cfg.bias else ", bias False")
            + (f", gelu {cfg.gelu}" if cfg.gelu != "tanh" else ""))


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def stdout_console():
    from rich.console import Console

    return Console(highlight=False)


def print_table(
    title: str | None,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    right_align: Sequence[int] = (),
    footer_rows: int = 0,
) -> None:
    """A Rich table on a terminal; aligned plain-text columns in a pipe.

    ``footer_rows``: how many trailing rows are totals (drawn after a rule).
    """
    cells = [[str(c) for c in row] for row in rows]
    if stdout_styled():
        from rich.table import Table
        from rich.text import Text

        # Text, not markup: a file name or a line of input like "[/x]" is shown as typed, never parsed.
        table = Table(title=None if title is None else Text(title), title_justify="left", show_footer=False)
        for i, name in enumerate(columns):
            table.add_column(Text(name), justify="right" if i in right_align else "left")
        for n, row in enumerate(cells):
            table.add_row(*map(Text, row), end_section=(n == len(cells) - footer_rows - 1 and footer_rows > 0))
        stdout_console().print(table)
        return
    widths = [max(len(columns[i]), *(len(r[i]) for r in cells)) if cells else len(columns[i]) for i in range(len(columns))]

    def line(row: Sequence[str]) -> str:
        parts = [cell.rjust(widths[i]) if i in right_align else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        return "  ".join(parts).rstrip()

    out = []
    if title:
        out.append(title)
    out.append(line(columns))
    out.append("  ".join("-" * w for w in widths))
    for n, row in enumerate(cells):
        if footer_rows and n == len(cells) - footer_rows:
            out.append("  ".join("-" * w for w in widths))
        out.append(line(row))
    sys.stdout.write("\n".join(out) + "\n\n")
    sys.stdout.flush()


def check_quantize(quantize: str | None, dtype_name: str) -> str | None:
    """--quantize as a scheme of QUANTIZE_SCHEMES (None: off); UserError for an unknown one or float32
    activations (generate and serve share it)."""
    from gptcli.kernels.prepare import QUANTIZE_SCHEMES

    scheme = None if quantize is None else quantize.strip().lower()
    if scheme is not None and scheme not in QUANTIZE_SCHEMES:
        raise UserError(f"unknown --quantize {quantize!r}; the schemes are int8 and int4 "
                        "(int4-g64, -g128, -g256: larger groups)")
    if scheme is not None and dtype_name == "float32":
        raise UserError(f"--quantize {scheme} needs --dtype bfloat16 or float16 activations "
                        f"({scheme} kernels take those)")
    return scheme

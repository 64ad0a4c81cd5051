"""What every command shares: option types, the stdout/stderr contract, error handling, tables.

Data goes to stdout; notes, progress and errors go to stderr. On a terminal stdout gets Rich
output; in a pipe it gets plain text (no ANSI codes, no wrapping) or JSON.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, Sequence, TypeVar

import typer

from gptcli.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])

SizeOption = Annotated[
    Optional[str],
    typer.Option(
        "--size",
        "-s",
        help="Model size: 124M/small, 355M/medium, 774M/large, 1558M/xl (case-insensitive), "
        "or 'book' for the book's GPT_CONFIG_124M. Default 124M.",
        show_default=False,
    ),
]
ConfigOption = Annotated[
    Optional[Path],
    typer.Option(
        "--config",
        "-c",
        help="Your own YAML config with the book's keys (vocab_size, context_length, emb_dim, n_heads, "
        "n_layers, drop_rate, qkv_bias) plus tie_weights. Not with --size.",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
ThreadsOption = Annotated[
    Optional[int],
    typer.Option(
        "--threads",
        metavar="N",
        min=1,
        help="CPU threads for torch. Default: OMP_NUM_THREADS if set, else the cores this process may use "
        "that other processes are not keeping busy (a busy core stalls every step).",
        show_default=False,
    ),
]


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


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
    if stdout_is_terminal():
        from rich.table import Table

        table = Table(title=title, title_justify="left", show_footer=False)
        for i, name in enumerate(columns):
            table.add_column(name, justify="right" if i in right_align else "left")
        for n, row in enumerate(cells):
            table.add_row(*row, end_section=(n == len(cells) - footer_rows - 1 and footer_rows > 0))
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

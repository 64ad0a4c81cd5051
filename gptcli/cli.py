"""The `gptcli` Typer app. Commands live in gptcli/commands; torch is imported only where needed.

``app`` has every command. The console script builds an app with only the command it runs (its
module alone is imported), so a quick command such as ``tokenize`` or ``params`` does not pay for
importing the others; ``gptcli --help`` and shell completion get every command.
"""

from __future__ import annotations

import importlib
from typing import Annotated, Sequence

import typer

from gptcli import __version__
from gptcli.commands.common import err, silence_stdout

# Command name -> its module in gptcli.commands (the function has the command's name), in --help's order.
COMMANDS = ("params", "generate", "inspect", "train", "classify", "score", "tokenize", "serve", "export")


def build_app(names: Sequence[str] = COMMANDS) -> typer.Typer:
    """The Typer app with these commands."""
    app = typer.Typer(
        name="gptcli",
        help="Run, train and understand GPT-2 from the command line: generate text, count parameters, "
        "look inside models and checkpoints, score texts, pretrain or fine-tune (classify, follow instructions, "
        "LoRA), and serve OpenAI's API.",
        no_args_is_help=True,
        # --install-completion / --show-completion for bash, zsh and fish; values of --size, --device, --dtype.
        add_completion=True,
        # click's plain help: Rich's panels printed <bool> after every flag and re-wrapped the examples mid-command.
        rich_markup_mode=None,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_root)
    for name in names:
        app.command(name)(getattr(importlib.import_module(f"gptcli.commands.{name}"), name))
    return app


# An argument's help line is its name and help; Typer adds its Python type ("PROMPT <str>").
typer.core.TyperArgument.display_type_rich = lambda self, ctx: None  # type: ignore[method-assign]


def _version(value: bool) -> None:
    if value:
        print(f"gptcli {__version__}")
        raise typer.Exit()


def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Run and understand GPT-2 from the command line."""


def __getattr__(name: str):
    if name == "app":  # `from gptcli.cli import app`: every command (tests, python -m tooling)
        globals()["app"] = build_app()
        return globals()["app"]
    raise AttributeError(f"module 'gptcli.cli' has no attribute {name!r}")


def app_for(args: Sequence[str]) -> typer.Typer:
    """The app for a command line: only the command it names, else (help, completion, a typo) every one."""
    import os

    if args and args[0] in COMMANDS and "_GPTCLI_COMPLETE" not in os.environ:
        return build_app([args[0]])
    return build_app()


def _click_class(name: str) -> type:
    """A class of the click that Typer runs on (recent Typer vendors its own copy), found via typer.BadParameter."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)


def _command_path(ctx, args: list[str]) -> str:
    """``gptcli COMMAND`` for a usage error; click leaves out the context of some ("requires an argument")."""
    if ctx is not None:
        return ctx.command_path
    first = next((a for a in args if not a.startswith("-")), None)
    return f"gptcli {first}" if first in COMMANDS else "gptcli"


def main() -> None:
    """The console script: like ``app()``, but a mistyped option is one ``error:`` line and exit 2."""
    import sys

    usage_error, click_exception = _click_class("UsageError"), _click_class("ClickException")
    try:
        # prog_name: `python -m gptcli` is gptcli too, in usage lines and for shell completion (_GPTCLI_COMPLETE).
        code = app_for(sys.argv[1:])(standalone_mode=False, prog_name="gptcli")
    except usage_error as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `gptcli`: the help, not an error
            code = _print_help(exc.ctx.get_help())
        else:
            err(f"error: {exc.format_message()} (see '{_command_path(exc.ctx, sys.argv[1:])} --help')")
            code = 2
    except click_exception as exc:
        err(f"error: {exc.format_message()}")
        code = exc.exit_code
    except typer.Abort:
        code = 130
    except BrokenPipeError:  # `gptcli --help | head -1`: how pipelines end, not an error
        silence_stdout()
        code = 0
    sys.exit(code if isinstance(code, int) else 0)


def _print_help(text: str) -> int:
    try:
        print(text, flush=True)
    except BrokenPipeError:
        silence_stdout()
    return 0

"""The `gptcli` Typer app. Commands live in gptcli/commands; torch is imported only where needed."""

from __future__ import annotations

from typing import Annotated

import typer

from gptcli import __version__
from gptcli.commands.common import err
from gptcli.commands.generate import generate
from gptcli.commands.inspect import inspect
from gptcli.commands.params import params
from gptcli.commands.train import train
from gptcli.commands.score import score

app = typer.Typer(
    name="gptcli",
    help="Run and understand GPT-2 from the command line: generate text, count parameters, "
    "look inside models and checkpoints, score texts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"gptcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Run and understand GPT-2 from the command line."""


app.command("params")(params)
app.command("generate")(generate)
app.command("inspect")(inspect)
app.command("train")(train)
app.command("score")(score)


def _click_class(name: str) -> type:
    """A class of the click that Typer runs on (recent Typer vendors its own copy), found via typer.BadParameter."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)


def main() -> None:
    """The console script: like ``app()``, but a mistyped option is one ``error:`` line and exit 2."""
    import sys

    usage_error, click_exception = _click_class("UsageError"), _click_class("ClickException")
    try:
        code = app(standalone_mode=False)
    except usage_error as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `gptcli`: the help, not an error
            print(exc.ctx.get_help())
            sys.exit(0)
        command = exc.ctx.command_path if exc.ctx is not None else "gptcli"
        err(f"error: {exc.format_message()} (see '{command} --help')")
        code = 2
    except click_exception as exc:
        err(f"error: {exc.format_message()}")
        code = exc.exit_code
    except typer.Abort:
        code = 130
    sys.exit(code if isinstance(code, int) else 0)

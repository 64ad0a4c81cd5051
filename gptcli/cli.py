"""The `gptcli` Typer app. Commands live in gptcli/commands; torch is imported only where needed."""

from __future__ import annotations

from typing import Annotated

import typer

from gptcli import __version__
from gptcli.commands.generate import generate
from gptcli.commands.inspect import inspect
from gptcli.commands.params import params

app = typer.Typer(
    name="gptcli",
    help="Run and understand GPT-2 from the command line: generate text, count parameters, "
    "look inside models and checkpoints.",
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


def main() -> None:
    app()

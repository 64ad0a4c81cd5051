"""`gptcli export`: weights to a Hugging Face GPT-2 folder (a LoRA run's adapters merged into their base).
Parsing and rendering only: ``gptcli.export.export_weights`` does the work."""

from __future__ import annotations

from typing import Annotated

import typer

from gptcli.commands.common import note, print_json, user_errors


@user_errors
def export(
    source: Annotated[str, typer.Argument(metavar="WEIGHTS", show_default=False, help="What to export: a run "
                      "folder (a --lora run's adapters are merged into their base), a .safetensors file or "
                      "folder, or a Hub id.")],
    out: Annotated[str, typer.Argument(metavar="OUT", show_default=False, help="The folder to write: "
                   "model.safetensors and config.json.")],
    force: Annotated[bool, typer.Option("--force", help="Write into OUT even if it holds files.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print what was written as one JSON object.")] = False,
) -> None:
    """Write a model as a Hugging Face GPT-2 folder: model.safetensors (float32) and config.json.

    A --lora run is its base weights with every adapter merged in (W + alpha * (A @ B)^T): the folder
    loads in transformers' GPT2LMHeadModel.from_pretrained and in gptcli --weights, with the same
    logits as the base plus adapters. A classifier (--task classify) is not a language model and is refused.

    Examples:

    \b
      gptcli train notes.txt --weights gpt2 --lora 16 --epochs 2 --out runs/notes-lora
      gptcli export runs/notes-lora exported/
      python -c "import transformers; transformers.GPT2LMHeadModel.from_pretrained('exported')"
    """
    from gptcli.export import export_weights

    result = export_weights(source, out, force=force, note=note)
    if json_output:
        print_json(result)
    else:
        note(f"wrote {result['out']}/model.safetensors and config.json from {result['source']}")

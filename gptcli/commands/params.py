"""`gptcli params`: exact parameter counts and weight memory, by arithmetic alone (no torch)."""

from __future__ import annotations

from typing import Annotated

import typer

from gptcli.commands.common import ConfigOption, describe_config, JsonOption, SizeOption, print_json, print_table, user_errors
from gptcli.errors import UserError
from gptcli.config import GPTConfig, resolve_config, shipped_configs
from gptcli.params import ParamCount, count_params, human_bytes


def params_report(cfg: GPTConfig) -> dict:
    """The JSON object for one config."""
    return {"config": cfg.name, **cfg.to_dict(), **count_params(cfg).to_dict()}


def _render_one(cfg: GPTConfig, count: ParamCount) -> None:
    desc = describe_config(cfg)
    rows = [(label, f"{n:,}") for label, n in count.breakdown()]
    rows.append(("total", f"{count.total:,}"))
    print_table(f"Parameters of {desc}", ["part", "parameters"], rows, right_align=[1], footer_rows=1)
    summary = [
        ("total as built", f"{count.total:,}"),
        ("with a tied head (shares tok_emb)", f"{count.tied:,}"),
        ("with an untied head", f"{count.untied:,}"),
        ("non-embedding", f"{count.non_embedding:,}"),
        ("per transformer block", f"{count.block.total:,}"),
    ]
    print_table("Counts", ["count", "parameters"], summary, right_align=[1])
    memory = [(dtype, f"{n:,}", human_bytes(n)) for dtype, n in count.memory_bytes().items()]
    print_table("Weight memory (total as built)", ["dtype", "bytes", "size"], memory, right_align=[1, 2])


@user_errors
def params(
    size: SizeOption = None,
    config: ConfigOption = None,
    all_configs: Annotated[bool, typer.Option("--all", help="One table for every shipped config.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Count a model's parameters and weight memory, exactly and instantly.

    Pure arithmetic on the config: no model is built and torch is not imported.

    Examples:

    \b
      gptcli params --size xl
      gptcli params --config configs/book-124M.yaml   # the book's 163,009,536
      gptcli params --all --json | jq '.[] | {config, total}'
    """
    if all_configs:
        if size is not None or config is not None:
            raise UserError("--all shows every shipped config; don't combine it with --size or --config")
        configs = shipped_configs()
        if json_output:
            print_json([params_report(c) for c in configs])
            return
        rows = []
        for c in configs:
            n = count_params(c)
            rows.append((c.name, c.emb_dim, c.n_layers, c.n_heads, f"{n.total:,}", f"{n.tied:,}", f"{n.untied:,}",
                         human_bytes(n.memory_bytes()["float32"]), human_bytes(n.memory_bytes()["bfloat16"])))
        print_table("Shipped configs", ["config", "emb_dim", "n_layers", "n_heads", "total", "tied", "untied",
                                        "float32", "bf16/fp16"], rows, right_align=range(1, 9))
        return
    cfg = resolve_config(size, config)
    if json_output:
        print_json(params_report(cfg))
        return
    _render_one(cfg, count_params(cfg))

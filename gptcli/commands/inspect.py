"""`gptcli inspect`: the module tree, figures, a checkpoint's header and next tokens of a model.

The library is gptcli.inspection; this module parses options and renders. Without --prompt
nothing here imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from gptcli.commands.common import (
    ConfigOption,
    JsonOption,
    SizeOption,
    ThreadsOption,
    check_tokenizer_early,
    complete_device,
    complete_dtype,
    describe_config,
    load_for_command,
    note,
    print_json,
    print_table,
    stdout_console,
    stdout_styled,
    user_errors,
)
from gptcli import checkpoint as ckpt
from gptcli.config import GPTConfig, resolve_config
from gptcli.devices import check_device_name, check_dtype_name
from gptcli.errors import UserError
from gptcli.decoding.generate import check_seed
from gptcli.inspection import (
    Node,
    checkpoint_report,
    config_for_checkpoint,
    config_report,
    leaf_detail,
    locate,
    module_tree,
    show_token,
    walk,
)
from gptcli.params import human_bytes

if TYPE_CHECKING:
    import torch

NOT_A_CHECKPOINT = ("random", "auto")
DEFAULT_TOP = 10  # next tokens --prompt shows


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _n(value: int) -> str:
    return f"{value:,}"


def _label(node: Node) -> tuple[str, str, str, str]:
    """(name, type, detail, count) of one tree line."""
    if node.repeat > 1:
        first = int(node.name)
        name = f"{first}–{first + node.repeat - 1}"
        kind = f"{node.repeat} × {node.kind}"
        count = f"{_n(node.each)} each, {_n(node.total)}"
    else:
        name = node.name or "model"
        kind = node.kind
        count = _n(node.total)
    detail = leaf_detail(node)
    if node.params and all(p.shared_with for p in node.params):
        count += " (shared)"
    if node.hidden:
        detail = (detail + ", " if detail else "") + f"({node.hidden} submodule{'s' * (node.hidden != 1)} hidden by --depth)"
    return name, kind, detail, count


def render_tree(tree: Node, title: str) -> None:
    if stdout_styled():
        from rich.text import Text
        from rich.tree import Tree

        def text(node: Node) -> Text:
            name, kind, detail, count = _label(node)
            return Text.assemble((name, "bold"), " ", (kind, "cyan"), ("  " + detail if detail else "", "dim"),
                                 "  ", (count, "green"))

        def add(branch: Tree, node: Node) -> None:
            for child in node.children:
                add(branch.add(text(child)), child)

        root = Tree(text(tree))
        add(root, tree)
        console = stdout_console()
        console.print(Text(title, style="bold"))
        console.print(root)
        console.print()
        return
    # Plain text: two spaces of indent per level, counts right-aligned in one column.
    lines = []
    for depth, node in walk(tree):
        name, kind, detail, count = _label(node)
        lines.append(("  " * depth + f"{name}: {kind}" + (f"  {detail}" if detail else ""), count))
    width = max(len(left) for left, _ in lines)
    count_width = max(len(right) for _, right in lines)
    out = [title] + [f"{left.ljust(width)}  {right.rjust(count_width)}" for left, right in lines]
    typer.echo("\n".join(out) + "\n")


def render_figures(report: dict[str, Any]) -> None:
    p = report["parameters"]
    print_table("Parameters (as `gptcli params`)", ["count", "parameters"], [
        ("total as built", _n(p["total"])),
        ("with a tied head (shares tok_emb)", _n(p["tied"])),
        ("with an untied head", _n(p["untied"])),
        ("non-embedding (N)", _n(p["non_embedding"])),
    ], right_align=[1])

    kv = report["kv_cache_bytes"]
    ctx = kv["context_length"]
    rows = []
    for dtype, weights in report["memory_bytes"].items():
        per_token = kv["per_token"].get(dtype)
        full = kv["full_context"].get(dtype)
        rows.append((dtype, human_bytes(weights), _n(per_token) if per_token is not None else "-",
                     human_bytes(full) if full is not None else "-"))
    print_table(f"Memory (KV cache: {kv['formula']}, one sequence)",
                ["dtype", "weights", "KV cache bytes/token", f"KV cache at {ctx} tokens"], rows,
                right_align=[1, 2, 3])

    f = report["flops_per_token"]
    print_table(f"Forward FLOPs per token at n_ctx {f['n_ctx']} (Kaplan et al. 2020)",
                ["term", "FLOPs"], [
                    (f"2·N, N = {_n(f['non_embedding_params'])} non-embedding parameters", _n(f["dense"])),
                    ("attention 2·n_layers·n_ctx·emb_dim", _n(f["attention"])),
                    (f"total {f['formula']}", _n(f["total"])),
                    ("logits 2·emb_dim·vocab_size (not in the formula)", _n(f["logits"])),
                    ("total with logits", _n(f["total_with_logits"])),
                ], right_align=[1], footer_rows=2)


def render_checkpoint(c: dict[str, Any], cfg: GPTConfig) -> None:
    arch = c["architecture"]
    arch_text = "cannot tell" if arch is None else (
        f"emb_dim {arch['emb_dim']}, n_layers {arch['n_layers']}, "
        f"n_heads {arch['n_heads'] if arch['n_heads'] is not None else '? (not a GPT-2 size)'}, "
        f"context {arch['context_length']}, vocab {arch['vocab_size']}, qkv_bias {arch['qkv_bias']}, "
        f"tie_weights {arch['tie_weights']}")
    rows = [
        ("file", c["file"]),
        ("size", f"{human_bytes(c['file_bytes'])} ({_n(c['file_bytes'])} bytes, header {_n(c['header_bytes'])})"),
        ("layout", c["layout"]),
        ("head", "tied to the token embedding" if c["tied"] else "separate matrix (untied)"),
        (f"architecture (from {c['architecture_source']})", arch_text),
        ("tokenizer", c["tokenizer"]),
        ("tensors", f"{c['n_tensors']} ({human_bytes(c['tensor_bytes'])})"),
    ]
    run = c.get("run")
    if run is not None:
        rows.append(("training run", f"{run['steps'] if run['steps'] is not None else '?'} steps trained, best "
                     f"validation loss {'?' if run['best_val_loss'] is None else format(run['best_val_loss'], '.3f')}"))
    print_table("Checkpoint (header only)", ["property", "value"], rows)
    rows = [(t["name"], t["dtype"], "[" + ", ".join(map(str, t["shape"])) + "]", _n(t["bytes"])) for t in c["tensors"]]
    print_table("Tensors", ["name", "dtype", "shape", "bytes"], rows, right_align=[3])
    problems = [("missing", n, "in the config, not in the file") for n in c["missing"]]
    problems += [("unexpected", n, "in the file, not in the config") for n in c["unexpected"]]
    problems += [("mismatched", m["name"], f"checkpoint {m['checkpoint']} vs config {m['config']}")
                 for m in c["mismatched_shapes"]]
    problems += [("architecture", d["key"], f"checkpoint {d['checkpoint']} vs config {d['config']}")
                 for d in c["config_differences"]]
    title = f"Verdict against {cfg.name}: " + ("ok, every tensor matches" if c["ok"] else c["verdict"])
    if problems:
        print_table(title, ["problem", "tensor", "detail"], problems)
    else:
        typer.echo(title + "\n")


def _bar(prob: float, width: int = 20) -> str:
    eighths = round(prob * width * 8)
    return "█" * (eighths // 8) + ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")[eighths % 8]


def render_next_tokens(report: dict[str, Any]) -> None:
    prompt = report["prompt"]
    terminal = stdout_styled()
    rows = []
    for rank, t in enumerate(report["next_tokens"], 1):
        row = [rank, t["id"], show_token(t["token"]), f"{t['prob']:.4f}" if t['prob'] >= 1e-4 else f"{t['prob']:.1e}"]
        rows.append(row + [_bar(t["prob"])] if terminal else row)
    columns = ["#", "id", "token", "prob"] + ([""] if terminal else [])
    print_table(f"Next token after {show_token(prompt['text'])} ({len(prompt['token_ids'])} tokens, "
                f"weights {prompt['weights']})", columns, rows, right_align=[0, 1, 3])


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def predict(
    *, prompt: str, top: int, size: str | None, config: Any, weights: str | None, device: str, dtype: str, seed: int,
    threads: int | None = None,
) -> dict[str, Any]:
    """One forward pass: the prompt's ids and the top-``top`` next tokens, with the same weights as generate."""
    from gptcli.inspection import next_tokens
    from gptcli.runtime import InferenceOptions

    if not prompt:
        raise UserError("--prompt is empty: give at least one token of text")
    check_tokenizer_early(weights)
    # Plain layers, read into memory: one forward pass has nothing to gain from tuned kernels.
    loaded = load_for_command(InferenceOptions(size=size, config=config, weights=weights or "auto", device=device,
                                               dtype=dtype, seed=seed, threads=threads, kernels=None))
    ids = loaded.tokenizer.encode(prompt)
    if max(ids) >= loaded.cfg.vocab_size:
        raise UserError(f"the prompt has token id {max(ids)}, outside the model's vocabulary "
                        f"(vocab_size {loaded.cfg.vocab_size})")
    if len(ids) > loaded.cfg.context_length:
        note(f"the prompt has {len(ids)} tokens; only the last {loaded.cfg.context_length} (context_length) are used")
    return {
        "prompt": {"text": prompt, "token_ids": ids, "weights": loaded.source, "device": str(loaded.device),
                   "dtype": str(loaded.dtype).removeprefix("torch.")},
        "next_tokens": next_tokens(loaded.model, ids, top, loaded.tokenizer),
    }


def kernel_report(*, size: str | None, config: Any, weights: str | None, device: str, dtype: str, seed: int,
                  threads: int | None = None) -> dict[str, Any] | None:
    """The decode kernels generate takes for this model here: per weight shape the kernel chosen, what
    each candidate measured and whether it may serve eager decoding (gptcli.kernels.decode). None off the CPU."""
    from gptcli.runtime import InferenceOptions

    loaded = load_for_command(InferenceOptions(size=size, config=config, weights=weights or "auto", device=device,
                                               dtype=dtype, seed=seed, threads=threads, kernels="eager"))
    plan = loaded.kernel_plan
    return None if plan is None else {**plan.to_dict(), "explained": plan.explain()}


def render_kernels(report: dict[str, Any] | None) -> None:
    if report is None:
        typer.echo("No decode kernels to choose: they are tuned on the CPU only.")
        return
    from gptcli.kernels.decode import serves

    source = {"measured": "measured now", "cache": "read from the cache", "default": "the defaults, not measured"}
    rows = []
    for key, choice in sorted(report["choices"].items()):
        for i, (name, m) in enumerate(choice["measured"].items()):
            usable = serves(report["mode"], name, m)
            rows.append(["" if i else key, name, "yes" if name == choice["kernel"] else "",
                         f"{m['one']:.1f}", f"{m['batch']:.1f}", "yes" if usable else "no (rows depend on the batch)",
                         "yes" if m.get("same_unpacked") else ""])
    print_table(f"Decode kernels ({source.get(report['source'], report['source'])}, {report['mode']} decoding; "
                "cost = 1 row + 1/8 of 8 rows, among kernels whose rows cannot depend on the batch)",
                ["weight shape", "kernel", "chosen", "1 row us", "8 rows us", "for eager decoding", "same bits unpacked"],
                rows, right_align=[3, 4])


@user_errors
def inspect(
    size: SizeOption = None,
    config: ConfigOption = None,
    weights: Annotated[
        Optional[str],
        typer.Option("--weights", "-w", metavar="SOURCE", show_default=False,
                     help="A safetensors checkpoint to look into: FILE, a folder with model.safetensors, or a Hub id "
                     "(owner/name; downloaded into the Hugging Face cache when missing). Only its header is read. "
                     "Without --size/--config the config comes from it (config.json beside it, gptcli's metadata, "
                     "else its shapes). With --prompt these are the weights run, as in generate; there 'auto' "
                     "(the default: released GPT-2 weights for a shipped size, an error when they are neither cached nor "
                     "downloadable; random for other configs) and 'random' work too."),
    ] = None,
    depth: Annotated[
        Optional[int],
        typer.Option("--depth", metavar="N", show_default=False,
                     help="Show the module tree this many levels deep (0 = the model line only). Default: all."),
    ] = None,
    prompt: Annotated[
        Optional[str],
        typer.Option("--prompt", "-p", metavar="TEXT", show_default=False,
                     help="Run one forward pass on this text and show the most likely next tokens."),
    ] = None,
    top: Annotated[Optional[int], typer.Option("--top", "-k", metavar="N", show_default=False,
                                               help="How many next tokens --prompt shows. Default: 10.")] = None,
    device: Annotated[str, typer.Option("--device", metavar="DEVICE", autocompletion=complete_device,
                                        help="For --prompt: auto, cpu, cuda, cuda:1, mps.")] = "auto",
    dtype: Annotated[
        str, typer.Option("--dtype", metavar="DTYPE", autocompletion=complete_dtype,
                          help="For --prompt: auto, float32, bfloat16 or float16.")
    ] = "auto",
    seed: Annotated[int, typer.Option("--seed", metavar="N",
                                      help="For --prompt with random weights: the init seed.")] = 123,
    threads: ThreadsOption = None,
    details: Annotated[
        bool, typer.Option("--details", help="With --prompt: print the module tree and figures (and a checkpoint's "
                           "report) after the next-token table, which --prompt otherwise prints alone.")
    ] = False,
    kernels: Annotated[
        bool, typer.Option("--kernels", help="Load the model as generate does and show the decode kernel chosen for "
                           "each weight shape on this CPU, what every candidate measured (microseconds a call, one "
                           "row and eight) and why (measured once, then cached).")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Look inside a model: its modules, parameters, memory, FLOPs, a checkpoint, its next token.

    The tree and the figures are arithmetic on the config (no model is built, torch is not imported);
    a checkpoint is read header-only, so even the 6 GB xl file answers at once.

    With --prompt it runs the model once and prints the next-token table alone; --details (or --depth) adds the tree and figures after it.

    Examples:

    \b
      gptcli inspect --size xl                         # tree, memory, FLOPs, KV cache
      gptcli inspect --size small --depth 2            # the top of the tree
      gptcli inspect --weights ./gpt2/model.safetensors  # tensors, layout, verdict
      gptcli inspect --weights ./ckpt --size 124M      # does it fit 124M?
      gptcli inspect --prompt "The capital of France is" --top 5
      gptcli inspect --weights gpt2 --kernels          # the decode kernels chosen here, and why
      gptcli inspect --size xl --json | jq .kv_cache_bytes.full_context
    """
    if depth is not None and depth < 0:
        raise UserError(f"--depth must be 0 or more, got {depth}")
    if prompt == "":
        raise UserError("--prompt is empty: give at least one token of text")
    if prompt is None and (top is not None or details):
        given = " and ".join(name for name, used in (("--top", top is not None), ("--details", details)) if used)
        verb = "apply" if top is not None and details else "applies"
        raise UserError(f"{given} only {verb} with --prompt TEXT (the next-token table); without it inspect "
                        "prints the tree and figures already")
    top = DEFAULT_TOP if top is None else top
    if top < 1:
        raise UserError(f"--top must be 1 or more, got {top}")
    check_seed(seed)
    check_device_name(device)
    check_dtype_name(dtype)
    if size is not None and config is not None:
        raise UserError("--size and --config are mutually exclusive; pass one of them")

    header = None
    if weights is not None and weights.strip().lower() not in NOT_A_CHECKPOINT:
        located = locate(weights, note=note)
        header = ckpt.read_header(located.path)
        from gptcli.adapters import ADAPTERS_KIND, file_kind

        kind = file_kind(header.metadata)
        if kind is not None:
            what = "LoRA adapters alone" if kind == ADAPTERS_KIND else "a classifier (a head with a row per label)"
            note(f"{located.path.name} holds {what}, so its tensors are not a whole GPT-2; --prompt and --kernels "
                 "load it as generate and classify do")
        if size is None and config is None:
            cfg = config_for_checkpoint(header, located.config_json, note=note)
        else:
            cfg = resolve_config(size, config)
    else:
        cfg = resolve_config(size, config)

    report = config_report(cfg, depth)
    report["checkpoint"] = checkpoint_report(header, cfg, located.config_json) if header is not None else None
    report["prompt"] = report["next_tokens"] = None
    report["kernels"] = None
    if kernels:
        report["kernels"] = kernel_report(size=size, config=config, weights=weights, device=device, dtype=dtype,
                                          seed=seed, threads=threads)
    if prompt is not None:
        report.update(predict(prompt=prompt, top=top, size=size, config=config, weights=weights, device=device,
                              dtype=dtype, seed=seed, threads=threads))

    if json_output:
        print_json(report)
        return
    if kernels:
        render_kernels(report["kernels"])
        if report["next_tokens"] is None and not details and depth is None:
            return
    if report["next_tokens"] is not None:
        # The answer to --prompt first, and alone unless the rest is asked for (--details, or --depth).
        render_next_tokens(report)
        if not details and depth is None:
            return
    render_tree(module_tree(cfg, depth), f"Modules of {describe_config(cfg)}")
    render_figures(report)
    if report["checkpoint"] is not None:
        render_checkpoint(report["checkpoint"], cfg)

"""What `gptcli inspect` shows: the module tree, figures for a config, a checkpoint's header, next tokens.

Everything but ``next_tokens`` is arithmetic on a config or on a safetensors header, so it needs no
torch: ``describe`` mirrors the modules of ``gptcli.model.gpt`` by name and shape (a test checks it
against the model built on the meta device), and checkpoints are read through
``gptcli.checkpoint.read_header``, which never touches tensor data.
"""

from __future__ import annotations

import json

import math
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from gptcli import checkpoint as ckpt
from gptcli.config import GPT2_SIZES, SCHEMA, GPTConfig, shipped_config, validate
from gptcli.errors import UserError
from gptcli.params import count_params, weight_memory

if TYPE_CHECKING:
    from gptcli.model.gpt import GPTModel
    from gptcli.tokenizer import Tokenizer
    from gptcli.weights import Located

Note = Callable[[str], None]

# Bytes per element of activations (the KV cache); int8 weights exist, int8 caches are not what GPT-2 runs.
CACHE_DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}


def _ignore(_: str) -> None:
    pass


# --------------------------------------------------------------------------------------------
# The module tree
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    name: str  # the attribute: weight, bias, scale, shift
    shape: tuple[int, ...]
    shared_with: str | None = None  # dotted name of the parameter this one is (the tied head)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def counted(self) -> int:
        """What this parameter adds to a total: nothing when it is another module's matrix."""
        return 0 if self.shared_with else self.numel


@dataclass(frozen=True)
class Node:
    """One module. ``repeat`` > 1 stands for that many identical siblings named path, path+1, ..."""

    name: str  # attribute name in the parent ("" for the root, "0" for a block)
    path: str  # dotted name as in ``model.named_modules()`` (first copy when repeated)
    kind: str  # the class name: Linear, LayerNorm, TransformerBlock, ...
    params: tuple[Param, ...] = ()
    children: tuple["Node", ...] = ()
    each: int = 0  # parameters of one copy, itself and below (shared ones not counted)
    repeat: int = 1
    hidden: int = 0  # children left out by a depth limit (``each`` still counts them)

    @property
    def total(self) -> int:
        return self.each * self.repeat

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "type": self.kind,
            "repeat": self.repeat,
            "params": self.total,
            "params_each": self.each,
            "parameters": [
                {"name": p.name, "shape": list(p.shape), "numel": p.numel, "shared_with": p.shared_with}
                for p in self.params
            ],
            "children": [c.to_dict() for c in self.children],
            "children_hidden": self.hidden,
        }


def _module(name: str, parent: str, kind: str, params: tuple[Param, ...] = (), children: tuple[Node, ...] = ()) -> Node:
    path = f"{parent}.{name}" if parent and name else name
    # Children were built with their own paths already; only the totals are summed here.
    return Node(name=name, path=path, kind=kind, params=params, children=children,
                each=sum(p.counted for p in params) + sum(c.total for c in children))


def _linear(name: str, parent: str, d_in: int, d_out: int, bias: bool = True) -> Node:
    params = (Param("weight", (d_out, d_in)),) + ((Param("bias", (d_out,)),) if bias else ())  # nn.Linear: (out, in)
    return _module(name, parent, "Linear", params)


def _layer_norm(name: str, parent: str, d: int, bias: bool = True) -> Node:
    return _module(name, parent, "LayerNorm", (Param("scale", (d,)),) + ((Param("shift", (d,)),) if bias else ()))


def _block(i: int, cfg: GPTConfig) -> Node:
    d = cfg.emb_dim
    path = f"trf_blocks.{i}"
    att = f"{path}.att"
    ff = f"{path}.ff"
    layers = f"{ff}.layers"
    return _module(str(i), "trf_blocks", "TransformerBlock", children=(
        _module("att", path, "MultiHeadAttention", children=(
            _linear("W_qkv", att, d, 3 * d, bias=cfg.qkv_bias),  # Q, K, V stacked as rows
            _linear("out_proj", att, d, d, bias=cfg.bias),
        )),
        _module("ff", path, "FeedForward", children=(
            _module("layers", ff, "Sequential", children=(
                _linear("0", layers, d, 4 * d, bias=cfg.bias),
                _module("1", layers, "GELU"),
                _linear("2", layers, 4 * d, d, bias=cfg.bias),
            )),
        )),
        _layer_norm("norm1", path, d, cfg.bias),
        _layer_norm("norm2", path, d, cfg.bias),
        _module("drop_shortcut", path, "Dropout"),
    ))


def describe(cfg: GPTConfig) -> Node:
    """The full module tree of ``GPTModel(cfg)``, one node per module, in ``named_modules()`` order."""
    d, v = cfg.emb_dim, cfg.vocab_size
    head = Param("weight", (v, d), shared_with="tok_emb.weight" if cfg.tie_weights else None)
    return _module("", "", "GPTModel", children=(
        _module("tok_emb", "", "Embedding", (Param("weight", (v, d)),)),
        _module("pos_emb", "", "Embedding", (Param("weight", (cfg.context_length, d)),)),
        _module("drop_emb", "", "Dropout"),
        _module("trf_blocks", "", "Sequential", children=tuple(_block(i, cfg) for i in range(cfg.n_layers))),
        _layer_norm("final_norm", "", d, cfg.bias),
        _module("out_head", "", "Linear", (head,)),
    ))


def _signature(node: Node) -> tuple:
    """What makes two siblings identical, apart from their own name."""
    return (node.kind, node.repeat, node.params,
            tuple((c.name, _signature(c)) for c in node.children))


def collapse(node: Node) -> Node:
    """Merge runs of identical siblings with consecutive integer names (the blocks) into one node
    with ``repeat`` set: "12 × TransformerBlock" keeps one expanded example."""
    children = [collapse(c) for c in node.children]
    merged: list[Node] = []
    for child in children:
        last = merged[-1] if merged else None
        if (
            last is not None
            and last.name.isdigit()
            and child.name.isdigit()
            and int(child.name) == int(last.name) + last.repeat
            and _signature(dataclasses.replace(last, repeat=1)) == _signature(child)
        ):
            merged[-1] = dataclasses.replace(last, repeat=last.repeat + 1)
        else:
            merged.append(child)
    return dataclasses.replace(node, children=tuple(merged))


def limit_depth(node: Node, depth: int | None) -> Node:
    """Cut the tree below ``depth`` (the root is depth 0); cut nodes keep their totals."""
    if depth is None:
        return node
    if depth <= 0:
        return dataclasses.replace(node, children=(), hidden=node.hidden + len(node.children))
    return dataclasses.replace(node, children=tuple(limit_depth(c, depth - 1) for c in node.children))


def module_tree(cfg: GPTConfig, depth: int | None = None) -> Node:
    """The tree `inspect` shows: repeated blocks collapsed, cut at ``depth``."""
    if depth is not None and depth < 0:
        raise UserError(f"--depth must be 0 or more, got {depth}")
    return limit_depth(collapse(describe(cfg)), depth)


def walk(node: Node, depth: int = 0):
    """(depth, node) for the node and everything below it, parents first."""
    yield depth, node
    for child in node.children:
        yield from walk(child, depth + 1)


def leaf_detail(node: Node) -> str:
    """'weight [2304, 768], bias [2304]' for a module's own parameters; the tied head says whose it is."""
    parts = []
    for p in node.params:
        shape = "[" + ", ".join(str(d) for d in p.shape) + "]"
        parts.append(f"{p.name} {shape}" + (f" = {p.shared_with} (tied)" if p.shared_with else ""))
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# Figures: parameters, memory, FLOPs, KV cache
# --------------------------------------------------------------------------------------------

FLOPS_FORMULA = "2·N + 2·n_layers·n_ctx·emb_dim"


def flops_per_token(cfg: GPTConfig, n_ctx: int | None = None) -> dict[str, Any]:
    """Forward FLOPs per token, Kaplan et al. 2020 (Table 1): C_forward ≈ 2N + 2·n_layers·n_ctx·d_attn.

    N is the non-embedding parameter count (each weight does one multiply-add per token); the
    second term is attention's scores and weighted sum over n_ctx positions (d_attn = emb_dim here).
    The formula leaves out the output head's logits (2·emb_dim·vocab_size), which matter for small
    models, so that term is given next to it.
    """
    n_ctx = cfg.context_length if n_ctx is None else n_ctx
    n = count_params(cfg).non_embedding
    dense = 2 * n
    attention = 2 * cfg.n_layers * n_ctx * cfg.emb_dim
    logits = 2 * cfg.emb_dim * cfg.vocab_size
    return {
        "formula": FLOPS_FORMULA,
        "source": "Kaplan et al. 2020, Scaling Laws for Neural Language Models, Table 1",
        "n_ctx": n_ctx,
        "non_embedding_params": n,
        "dense": dense,
        "attention": attention,
        "total": dense + attention,
        "logits": logits,
        "total_with_logits": dense + attention + logits,
    }


KV_FORMULA = "2·n_layers·emb_dim·bytes_per_element"


def kv_cache_bytes(cfg: GPTConfig) -> dict[str, Any]:
    """Bytes of keys and values one sequence caches: per token, and at the full context, per dtype."""
    per_token = {dt: 2 * cfg.n_layers * cfg.emb_dim * b for dt, b in CACHE_DTYPE_BYTES.items()}
    return {
        "formula": KV_FORMULA,
        "context_length": cfg.context_length,
        "per_token": per_token,
        "full_context": {dt: n * cfg.context_length for dt, n in per_token.items()},
    }


def parameters_summary(cfg: GPTConfig) -> dict[str, Any]:
    """The same numbers as `gptcli params`."""
    count = count_params(cfg)
    return {"total": count.total, "tied": count.tied, "untied": count.untied,
            "non_embedding": count.non_embedding, "tie_weights": count.tie_weights}


def config_report(cfg: GPTConfig, depth: int | None = None) -> dict[str, Any]:
    """Everything `inspect` says about a config, as JSON-ready data."""
    tree = module_tree(cfg, depth)
    return {
        "config": {"name": cfg.name, **cfg.to_dict()},
        "parameters": parameters_summary(cfg),
        "memory_bytes": weight_memory(count_params(cfg).total),
        "flops_per_token": flops_per_token(cfg),
        "kv_cache_bytes": kv_cache_bytes(cfg),
        "tree": tree.to_dict(),
    }


# --------------------------------------------------------------------------------------------
# Checkpoints: header only
# --------------------------------------------------------------------------------------------

def locate(spec: str, note: Note = _ignore) -> "Located":
    """``--weights FILE|DIR|HUB_ID`` -> the local .safetensors file (and config.json beside it, if any).

    The same resolution as generate's (``gptcli.weights.locate``): a Hub id is looked up in the
    Hugging Face cache and downloaded when missing; pickles are refused.
    """
    from gptcli.weights import locate as locate_weights

    return locate_weights(spec, note)


def config_for_checkpoint(header: ckpt.Header, config_json: Path | None = None, note: Note = _ignore) -> GPTConfig:
    """The config a checkpoint implies (see ``checkpoint.implied_config``); nothing is refused for
    not fitting the tensors: the verdict reports that."""
    return ckpt.implied_config(header, config_json, note=note)


def checkpoint_report(header: ckpt.Header, cfg: GPTConfig, config_json: Path | None = None) -> dict[str, Any]:
    """Tensors, layout, tying, inferred architecture and the verdict against ``cfg``: its tensors, and the
    architecture keys (``gelu``, ``bias``, ...) where the checkpoint's config.json or metadata disagree."""
    verdict = ckpt.verify(header, cfg)
    hf_config = ckpt.read_json_file(config_json) if config_json is not None else None
    facts = ckpt.checkpoint_facts(header, hf_config)[0]
    differences = ckpt.differing_keys(cfg, facts)
    names = ckpt.normalized_names(header, verdict.layout)
    expected = ckpt.expected_tensors(cfg, verdict.layout)
    tensors = sorted(header.tensors.values(), key=lambda t: t.offsets)  # file order
    try:
        architecture: dict[str, Any] | None = ckpt.infer_architecture(header).to_dict()
    except UserError:
        architecture = None  # e.g. no embedding matrix: the verdict already says what is missing
    source = "tensor shapes"
    stored = ckpt.metadata_facts(header)
    if architecture is not None and stored:
        # gptcli's own record wins: shapes cannot tell n_heads, and its Hugging Face export carries
        # zero qkv biases (a tensor present) for a model without them.
        architecture.update({k: stored[k] for k in architecture if k in stored})
        source = "metadata"
    return {
        "file": str(header.path),
        "file_bytes": header.file_size,
        "header_bytes": header.data_offset,
        "layout": verdict.layout,
        "tied": verdict.tied,
        "architecture": architecture,
        "architecture_source": source,
        "tokenizer": tokenizer_description(header),
        "run": run_summary(header.path.parent),
        "metadata": header.metadata,
        "n_tensors": len(tensors),
        "tensor_bytes": sum(t.nbytes for t in tensors),
        "tensors": [t.to_dict() for t in tensors],
        "ok": verdict.ok and not differences,
        "config_differences": [{"key": k, "config": ours, "checkpoint": theirs} for k, ours, theirs in differences],
        "missing": verdict.missing,
        "unexpected": verdict.unexpected,
        "mismatched": verdict.mismatched_names,
        "mismatched_shapes": [
            {"name": n, "checkpoint": list(names[n].shape), "config": list(expected[n])} for n in verdict.mismatched_names
        ],
        "verdict": "; ".join(([verdict.summary()] if not verdict.ok else []) + ckpt.config_differences(cfg, facts)),
    }


def tokenizer_description(header: ckpt.Header) -> str:
    """What tokenizer the checkpoint's metadata names: ``gpt2`` or ``char (N characters)``."""
    from gptcli.tokenizer import CharTokenizer, from_metadata

    try:
        tokenizer = from_metadata(header.metadata, str(header.path))
    except UserError as exc:
        return f"unreadable ({exc})"
    if isinstance(tokenizer, CharTokenizer):
        return f"char ({len(tokenizer.chars)} characters)"
    return "gpt2"


def run_summary(folder: Path) -> dict[str, Any] | None:
    """For the weights of a training run (``folder`` holds its train.jsonl): the steps its last
    checkpoint holds and the best validation loss so far; None for any other folder."""
    from gptcli.run_layout import LOG_FILE

    log = folder / LOG_FILE
    if not log.is_file():
        return None
    steps = best = None
    try:
        lines = log.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if not isinstance(event, dict):
            continue
        if event.get("event") == "checkpoint" and isinstance(event.get("step"), int):
            steps = event["step"] + 1
        if event.get("event") == "eval" and isinstance(event.get("val_loss"), (int, float)):
            best = event["val_loss"] if best is None else min(best, event["val_loss"])
    return {"folder": str(folder), "steps": steps, "best_val_loss": best}


# --------------------------------------------------------------------------------------------
# Next tokens
# --------------------------------------------------------------------------------------------


def token_text(token_id: int, tokenizer: "Tokenizer | None" = None) -> str:
    """The token's text; bytes that are only part of a UTF-8 character come out as \\xNN."""
    if tokenizer is None:
        from gptcli.tokenizer import gpt2

        tokenizer = gpt2()
    try:
        raw = tokenizer.token_bytes(token_id)
    except (KeyError, IndexError):  # a config with a bigger vocabulary than the tokenizer knows
        return f"<id {token_id}>"
    return raw.decode("utf-8", errors="backslashreplace")


def show_token(text: str) -> str:
    """repr-like, so spaces, newlines and tabs are visible: ' the' -> "' the'", '\\n' -> "'\\\\n'"."""
    return repr(text)


def next_tokens(model: "GPTModel", ids: list[int], top: int, tokenizer: "Tokenizer | None" = None) -> list[dict[str, Any]]:
    """The ``top`` most likely next tokens after ``ids``: [{id, token, prob}], most likely first.

    One forward pass over the last ``context_length`` ids; probabilities are a float32 softmax over
    the whole vocabulary, so the ``top`` of them sum to at most 1.
    """
    import torch

    if not ids:
        raise UserError("--prompt is empty: give at least one token of text")
    context = model.cfg.context_length
    device = next(model.parameters()).device
    x = torch.tensor([ids[-context:]], dtype=torch.long, device=device)  # (1, T)
    with torch.inference_mode():
        logits = model(x, last_only=True)[0, -1].float()  # (vocab,)
        probs = torch.softmax(logits, dim=-1)
        values, indices = torch.topk(probs, k=min(top, probs.shape[0]))  # sorted, largest first
    return [
        {"id": int(i), "token": token_text(int(i), tokenizer), "prob": float(p)}
        for p, i in zip(values.tolist(), indices.tolist())
    ]

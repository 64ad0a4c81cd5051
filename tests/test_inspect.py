"""gptcli.inspection: the torch-free module tree against the real model, the figures, checkpoint reports."""

from __future__ import annotations

import json

import pytest

from gptcli import checkpoint as ckpt
from gptcli.config import SIZES, load_config_file, shipped_config
from gptcli.errors import UserError
from gptcli.inspection import (
    Node,
    Param,
    checkpoint_report,
    collapse,
    config_for_checkpoint,
    config_report,
    describe,
    flops_per_token,
    kv_cache_bytes,
    locate,
    module_tree,
    next_tokens,
    show_token,
    walk,
)
from gptcli.params import count_params


def _assert_matches_meta_model(cfg) -> None:
    from gptcli.model.gpt import build_model

    model = build_model(cfg)  # meta: shapes only, nothing allocated
    tree = describe(cfg)
    nodes = [node for _, node in walk(tree)]
    # Same modules, same class names, same order as named_modules().
    assert [(n.path, n.kind) for n in nodes] == [(name, type(m).__name__) for name, m in model.named_modules()]
    # Same parameters (the tied head included, as a second name for tok_emb.weight), same shapes.
    described = [(f"{n.path}.{p.name}", p.shape) for n in nodes for p in n.params]
    real = [(name, tuple(p.shape)) for name, p in model.named_parameters(remove_duplicate=False)]
    assert described == real
    # Same counts per module; named_parameters() lists a shared matrix once, under its first name.
    unique = dict(model.named_parameters())
    for node in nodes:
        prefix = f"{node.path}." if node.path else ""
        assert node.total == sum(p.numel() for name, p in unique.items() if name.startswith(prefix)), node.path
    assert tree.total == sum(p.numel() for p in model.parameters()) == count_params(cfg).total


@pytest.mark.parametrize("size", list(SIZES))
def test_tree_is_the_meta_model_for_every_shipped_config(size):
    _assert_matches_meta_model(shipped_config(size))


@pytest.mark.parametrize("tie,bias", [(True, True), (True, False), (False, True), (False, False)])
def test_tree_is_the_meta_model_for_tiny_variants(tiny_config_file, tie, bias):
    _assert_matches_meta_model(load_config_file(tiny_config_file(tie_weights=tie, qkv_bias=bias, n_layers=3)))


def test_tied_head_is_shown_but_not_counted():
    tree = describe(shipped_config("124M"))
    head = tree.children[-1]
    assert head.path == "out_head" and head.params[0].shared_with == "tok_emb.weight"
    assert head.total == 0
    untied = describe(shipped_config("book")).children[-1]
    assert untied.params[0].shared_with is None and untied.total == 50257 * 768


@pytest.mark.parametrize("size,layers", [("124M", 12), ("1558M", 48)])
def test_blocks_collapse_to_one_expanded_example(size, layers):
    cfg = shipped_config(size)
    tree = module_tree(cfg)
    blocks = next(c for c in tree.children if c.name == "trf_blocks")
    assert len(blocks.children) == 1
    block = blocks.children[0]
    assert (block.name, block.kind, block.repeat) == ("0", "TransformerBlock", layers)
    assert [c.name for c in block.children] == ["att", "ff", "norm1", "norm2", "drop_shortcut"]
    assert block.each == count_params(cfg).block.total
    assert blocks.total == block.total == layers * block.each
    # ff.layers 0, 1, 2 differ, so they stay apart.
    ff_layers = block.children[1].children[0]
    assert [(c.name, c.kind, c.repeat) for c in ff_layers.children] == [("0", "Linear", 1), ("1", "GELU", 1),
                                                                         ("2", "Linear", 1)]


def test_subtotals_add_up_at_every_branch():
    for cfg in (shipped_config("book"), shipped_config("355M")):
        for _, node in walk(module_tree(cfg)):
            assert node.each == sum(p.counted for p in node.params) + sum(c.total for c in node.children)
            assert node.total == node.each * node.repeat


def test_collapse_only_merges_identical_consecutive_siblings():
    def leaf(name: str, d: int) -> Node:
        return Node(name=name, path=f"s.{name}", kind="Linear", params=(Param("weight", (d, d)),), each=d * d)

    seq = Node(name="s", path="s", kind="Sequential", children=(leaf("0", 2), leaf("1", 2), leaf("2", 3),
                                                                  leaf("3", 2), leaf("4", 2), leaf("x", 2)), each=29)
    merged = collapse(seq)
    assert [(c.name, c.repeat) for c in merged.children] == [("0", 2), ("2", 1), ("3", 2), ("x", 1)]
    assert sum(c.total for c in merged.children) == seq.each


def test_depth_cuts_the_tree_but_keeps_totals():
    cfg = shipped_config("124M")
    full = module_tree(cfg)
    top = module_tree(cfg, depth=0)
    assert top.children == () and top.hidden == 6 and top.total == full.total
    one = module_tree(cfg, depth=1)
    assert [c.name for c in one.children] == ["tok_emb", "pos_emb", "drop_emb", "trf_blocks", "final_norm", "out_head"]
    assert all(c.children == () for c in one.children)
    assert next(c for c in one.children if c.name == "trf_blocks").hidden == 1
    assert max(d for d, _ in walk(module_tree(cfg, depth=3))) == 3
    assert module_tree(cfg, depth=99) == full
    with pytest.raises(UserError, match="--depth must be 0 or more"):
        module_tree(cfg, depth=-1)


def test_tree_json_is_nested_and_plain():
    tree = config_report(shipped_config("124M"))["tree"]
    json.dumps(tree)  # serialisable
    assert set(tree) == {"name", "path", "type", "repeat", "params", "params_each", "parameters", "children",
                         "children_hidden"}
    block = tree["children"][3]["children"][0]
    assert (block["path"], block["repeat"], block["type"]) == ("trf_blocks.0", 12, "TransformerBlock")
    qkv = block["children"][0]["children"][0]
    assert qkv["parameters"] == [
        {"name": "weight", "shape": [2304, 768], "numel": 2304 * 768, "shared_with": None},
        {"name": "bias", "shape": [2304], "numel": 2304, "shared_with": None},
    ]


def test_figures_for_124m():
    cfg = shipped_config("124M")
    report = config_report(cfg)
    assert report["parameters"] == {"total": 124_439_808, "tied": 124_439_808, "untied": 163_037_184,
                                    "non_embedding": 85_056_000, "tie_weights": True}
    assert report["memory_bytes"]["float32"] == 4 * 124_439_808
    flops = flops_per_token(cfg)
    assert flops["formula"] == "2·N + 2·n_layers·n_ctx·emb_dim"
    assert flops["dense"] == 2 * 85_056_000
    assert flops["attention"] == 2 * 12 * 1024 * 768
    assert flops["total"] == flops["dense"] + flops["attention"]
    assert flops["total_with_logits"] == flops["total"] + 2 * 768 * 50257
    assert flops_per_token(cfg, n_ctx=1)["attention"] == 2 * 12 * 768
    kv = kv_cache_bytes(cfg)
    assert kv["per_token"] == {"float32": 2 * 12 * 768 * 4, "bfloat16": 2 * 12 * 768 * 2, "float16": 2 * 12 * 768 * 2}
    assert kv["full_context"]["float32"] == 73_728 * 1024 == 72 * 1024**2


# ------------------------------------------------------------------ checkpoints (tiny, written here)


def _write_gptcli_checkpoint(path, cfg, drop=(), extra=None, metadata=None):
    """A checkpoint in this project's layout, from a real (tiny) model's state_dict."""
    import torch
    from safetensors.torch import save_file

    from gptcli.model.gpt import GPTModel

    torch.manual_seed(0)
    state = GPTModel(cfg).state_dict()
    if cfg.tie_weights:
        state.pop("out_head.weight")  # safetensors refuses shared tensors; a tied file has no head
    for name in drop:
        state.pop(name)
    state.update(extra or {})
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def test_report_on_our_own_layout(tmp_path, tiny_config_file):
    cfg = load_config_file(tiny_config_file(vocab_size=97))
    header = ckpt.read_header(_write_gptcli_checkpoint(tmp_path / "m.safetensors", cfg))
    report = checkpoint_report(header, cfg)
    assert (report["layout"], report["tied"], report["ok"]) == ("gptcli", True, True)
    assert report["missing"] == report["unexpected"] == report["mismatched"] == []
    assert report["architecture"] == {"vocab_size": 97, "context_length": 16, "emb_dim": 32, "n_heads": None,
                                      "n_layers": 2, "qkv_bias": True, "tie_weights": True, "bias": True}
    assert report["n_tensors"] == len(report["tensors"]) == len(ckpt.expected_tensors(cfg, "gptcli"))
    first = report["tensors"][0]
    assert set(first) == {"name", "dtype", "shape", "bytes"}
    assert sum(t["bytes"] for t in report["tensors"]) == report["tensor_bytes"] == 4 * count_params(cfg).total
    assert report["header_bytes"] + report["tensor_bytes"] == report["file_bytes"]


def test_verdict_lists_missing_unexpected_and_mismatched(tmp_path, tiny_config_file):
    import torch

    cfg = load_config_file(tiny_config_file(vocab_size=97, tie_weights=False))
    path = _write_gptcli_checkpoint(tmp_path / "m.safetensors", cfg, drop=["trf_blocks.1.norm2.shift"],
                                    extra={"extra.weight": torch.zeros(2)})
    other = load_config_file(tiny_config_file(vocab_size=97, tie_weights=False, context_length=8))
    report = checkpoint_report(ckpt.read_header(path), other)
    assert report["tied"] is False and report["ok"] is False
    assert report["missing"] == ["trf_blocks.1.norm2.shift"]
    assert report["unexpected"] == ["extra.weight"]
    assert report["mismatched"] == ["pos_emb.weight"]
    assert report["mismatched_shapes"] == [{"name": "pos_emb.weight", "checkpoint": [16, 32], "config": [8, 32]}]


def test_config_from_checkpoint_shapes_config_json_or_metadata(tmp_path, tiny_config_file):
    cfg = load_config_file(tiny_config_file(vocab_size=97, emb_dim=768, n_heads=12, n_layers=1))
    folder = tmp_path / "ckpt"
    folder.mkdir()
    header = ckpt.read_header(_write_gptcli_checkpoint(folder / "model.safetensors", cfg))
    notes: list[str] = []
    inferred = config_for_checkpoint(header, note=notes.append)
    assert (inferred.emb_dim, inferred.n_heads, inferred.n_layers, inferred.vocab_size) == (768, 12, 1, 97)
    assert inferred.name == "ckpt" and notes == ["config from tensor shapes"]
    # transformers' config.json wins over the shapes (n_heads cannot be read from them).
    (folder / "config.json").write_text(json.dumps({"n_embd": 768, "n_head": 6, "n_layer": 1, "n_positions": 16,
                                                    "vocab_size": 97, "model_type": "gpt2"}))
    assert config_for_checkpoint(header, folder / "config.json").n_heads == 6


def test_config_from_checkpoint_metadata_or_an_error_without_n_heads(tmp_path, tiny_config_file):
    cfg = load_config_file(tiny_config_file(vocab_size=97, emb_dim=32, n_heads=4))
    path = _write_gptcli_checkpoint(tmp_path / "odd.safetensors", cfg)
    with pytest.raises(UserError, match="cannot tell n_heads"):  # emb_dim 32 is no GPT-2 size
        config_for_checkpoint(ckpt.read_header(path))
    # gptcli's own files carry their config in the header's metadata, n_heads included.
    path = _write_gptcli_checkpoint(tmp_path / "ours.safetensors", cfg,
                                    metadata={ckpt.METADATA_CONFIG_KEY: json.dumps(cfg.to_dict())})
    notes: list[str] = []
    found = config_for_checkpoint(ckpt.read_header(path), note=notes.append)
    assert found.to_dict() == cfg.to_dict() and found.name == "ours"
    assert notes == ["config from ours.safetensors metadata"]


@pytest.mark.parametrize("content,message", [("{not json", "not valid JSON"), ("[1, 2]", "JSON object"),
                                             ('{"n_embd": 8}', "missing key 'vocab_size'")])
def test_bad_config_json(tmp_path, tiny_config_file, content, message):
    cfg = load_config_file(tiny_config_file(vocab_size=97, emb_dim=768, n_heads=12, n_layers=1))
    header = ckpt.read_header(_write_gptcli_checkpoint(tmp_path / "model.safetensors", cfg))
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        config_for_checkpoint(header, path)


def test_locate_uses_the_loaders_resolution(tmp_path, tiny_config_file):
    cfg = load_config_file(tiny_config_file(vocab_size=97))
    file = _write_gptcli_checkpoint(tmp_path / "model.safetensors", cfg)
    assert locate(str(file)).path == file
    assert locate(str(tmp_path)).path == file  # a folder with model.safetensors
    with pytest.raises(UserError, match="no such file"):
        locate(str(tmp_path / "nope.safetensors"))
    with pytest.raises(UserError, match="pickled checkpoints are refused"):
        locate(str(tmp_path / "pytorch_model.bin"))
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):  # tests run offline with an empty cache
        locate("openai-community/gpt2")


# ------------------------------------------------------------------ next tokens


def test_next_tokens_on_random_weights(tiny_config_file):
    import torch

    from gptcli.tokenizer import encode
    from gptcli.weights import random_model

    cfg = load_config_file(tiny_config_file())
    model = random_model(cfg, seed=123).eval()
    ids = encode("Hello, I am")
    rows = next_tokens(model, ids, top=7)
    assert len(rows) == 7
    probs = [r["prob"] for r in rows]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert len({r["id"] for r in rows}) == 7 and all(0 <= r["id"] < cfg.vocab_size for r in rows)
    # The top row is the argmax of the model's own last logits.
    with torch.no_grad():
        assert rows[0]["id"] == int(model(torch.tensor([ids]))[0, -1].argmax())
    # A prompt longer than the context uses its last context_length tokens.
    long = next_tokens(model, [11] * 40 + ids, top=3)
    assert [r["id"] for r in long] == [r["id"] for r in next_tokens(model, ([11] * 40 + ids)[-16:], top=3)]
    with pytest.raises(UserError, match="empty"):
        next_tokens(model, [], top=3)


def test_tokens_are_shown_with_visible_whitespace():
    assert show_token(" the") == "' the'"
    assert show_token("\n") == "'\\n'"
    assert show_token("\t ") == "'\\t '"

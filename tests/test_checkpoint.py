"""Checkpoint headers, layouts and architecture facts: everything that reads no tensor data.

Files are written by hand (header + sparse data) so shapes can be GPT-2 sized at no cost.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from gptcli import checkpoint as ckpt
from gptcli.config import load_config_file, shipped_config
from gptcli.errors import UserError

DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1}


def write_sparse(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]], metadata: dict | None = None,
                 cut: int = 0) -> Path:
    """A safetensors file whose data section is a hole (zeros); ``cut`` drops that many trailing bytes."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = DTYPE_BYTES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset - cut)
    return path


def hf_tensors(cfg, prefix: str = "", dtype: str = "F32", masks: bool = False) -> dict:
    out = {prefix + n: (dtype, s) for n, s in ckpt.expected_tensors(cfg, ckpt.HF).items()}
    if masks:
        for i in range(cfg.n_layers):
            out[f"{prefix}h.{i}.attn.bias"] = ("U8", (1, 1, cfg.context_length, cfg.context_length))
    return out


def test_read_header_of_a_gpt2_xl_shaped_file(tmp_path):
    cfg = shipped_config("1558M")
    path = write_sparse(tmp_path / "model.safetensors", hf_tensors(cfg, masks=True), metadata={"format": "pt"})
    header = ckpt.read_header(tmp_path)  # a folder finds model.safetensors
    assert header.path == path and header.metadata == {"format": "pt"}
    assert header.tensors["h.47.mlp.c_fc.weight"].shape == (1600, 6400)
    assert ckpt.detect_layout(header.tensors) == ckpt.HF
    verdict = ckpt.verify(header, cfg)
    assert verdict.ok and verdict.tied, verdict.summary()
    arch = ckpt.infer_architecture(header)
    assert arch.to_dict() == {k: v for k, v in cfg.to_dict().items() if k not in ("drop_rate", "gelu")}  # shapes can't tell
    assert ckpt.implied_config(header) == cfg  # a released size keeps its name


def test_prefixed_names_and_mask_buffers_are_normalised(tmp_path):
    cfg = load_config_file_from_dict(tmp_path, emb_dim=64, n_heads=4, context_length=32)
    path = write_sparse(tmp_path / "m.safetensors", hf_tensors(cfg, prefix="transformer.", masks=True))
    header = ckpt.read_header(path)
    names = ckpt.normalized_names(header, ckpt.HF)
    assert "wte.weight" in names and not any(n.endswith(".attn.bias") for n in names)
    assert ckpt.verify(header, cfg).ok
    assert ckpt.infer_architecture(header).n_heads is None  # 64 is no GPT-2 width


def load_config_file_from_dict(tmp_path: Path, **overrides):
    values = dict(vocab_size=50257, context_length=32, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.1,
                  qkv_bias=True, tie_weights=True)
    values.update(overrides)
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.yaml"
    path.write_text("".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}\n" for k, v in values.items()))
    return load_config_file(path)


def test_verify_names_missing_unexpected_and_mismatched(tmp_path):
    cfg = load_config_file_from_dict(tmp_path)
    tensors = hf_tensors(cfg)
    del tensors["h.1.mlp.c_fc.bias"]
    tensors["h.0.attn.extra"] = ("F32", (3,))
    tensors["wpe.weight"] = ("F32", (30, 64))
    verdict = ckpt.verify(ckpt.read_header(write_sparse(tmp_path / "m.safetensors", tensors)), cfg)
    summary = verdict.summary()
    assert "missing 1 tensor(s): h.1.mlp.c_fc.bias" in summary
    assert "unexpected 1 tensor(s): h.0.attn.extra" in summary
    assert "wpe.weight: checkpoint [30, 64] vs config [32, 64]" in summary


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "only 0 bytes"),
        (b"\x10\x00", "only 2 bytes"),
        (b"{\"not\": \"safetensors\"}", "not a safetensors file"),
        (struct.pack("<Q", 5) + b"nope!", "header is not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "header is not a JSON object"),
    ],
)
def test_not_safetensors(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        ckpt.read_header(path)


def test_truncated_file_names_the_tensor(tmp_path):
    cfg = load_config_file_from_dict(tmp_path)
    path = write_sparse(tmp_path / "m.safetensors", hf_tensors(cfg), cut=100)
    with pytest.raises(UserError, match=r"truncated file: tensor 'ln_f.bias'"):
        ckpt.read_header(path)


def test_corrupt_entry(tmp_path):
    raw = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))
    with pytest.raises(UserError, match="corrupt safetensors header: tensor 'w'"):
        ckpt.read_header(path)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pth", "weights.ckpt"])
def test_pickles_are_refused_without_being_opened(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"not even read")
    with pytest.raises(UserError, match="pickled checkpoints are refused.*safetensors"):
        ckpt.checkpoint_file(path)
    with pytest.raises(UserError, match=f"holds {name}.*safetensors"):
        ckpt.checkpoint_file(tmp_path)


def test_folder_messages(tmp_path):
    with pytest.raises(UserError, match="no model.safetensors in this folder$"):
        ckpt.checkpoint_file(tmp_path)
    (tmp_path / "gpt2.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="found gpt2.safetensors; pass the file itself"):
        ckpt.checkpoint_file(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(UserError, match="sharded checkpoint"):
        ckpt.checkpoint_file(tmp_path)
    with pytest.raises(UserError, match="no such file or folder"):
        ckpt.checkpoint_file(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    "name,layout,expected",
    [
        ("wte.weight", ckpt.HF, ("tok_emb.weight", False)),
        ("lm_head.weight", ckpt.HF, ("out_head.weight", False)),
        ("h.11.attn.c_attn.weight", ckpt.HF, ("trf_blocks.11.att.W_qkv.weight", True)),
        ("h.0.attn.c_proj.weight", ckpt.HF, ("trf_blocks.0.att.out_proj.weight", True)),
        ("h.3.mlp.c_fc.weight", ckpt.HF, ("trf_blocks.3.ff.layers.0.weight", True)),
        ("h.3.mlp.c_proj.weight", ckpt.HF, ("trf_blocks.3.ff.layers.2.weight", True)),
        ("h.3.mlp.c_proj.bias", ckpt.HF, ("trf_blocks.3.ff.layers.2.bias", False)),
        ("h.2.ln_2.bias", ckpt.HF, ("trf_blocks.2.norm2.shift", False)),
        ("ln_f.weight", ckpt.HF, ("final_norm.scale", False)),
        ("trf_blocks.0.att.W_qkv.weight", ckpt.GPTCLI, ("trf_blocks.0.att.W_qkv.weight", False)),
    ],
)
def test_gptcli_name(name, layout, expected):
    assert ckpt.gptcli_name(name, layout) == expected


def test_hf_names_map_onto_every_model_parameter(tmp_path):
    """Each HF tensor of a config lands on a distinct gptcli state_dict name, with the right shape."""
    cfg = load_config_file_from_dict(tmp_path, qkv_bias=True, tie_weights=False)
    ours = ckpt.expected_tensors(cfg, ckpt.GPTCLI)
    mapped = {}
    for name, shape in ckpt.expected_tensors(cfg, ckpt.HF).items():
        target, transpose = ckpt.gptcli_name(name, ckpt.HF)
        mapped[target] = tuple(reversed(shape)) if transpose else shape
    assert mapped == ours


HF_CONFIG = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_ctx": 1024, "n_embd": 768,
             "n_head": 12, "n_layer": 12, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-05,
             "resid_pdrop": 0.1, "n_inner": None}


def test_hf_config_facts():
    facts = ckpt.hf_config_facts(HF_CONFIG, "config.json")
    assert facts == {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
                     "tie_weights": True, "drop_rate": 0.1, "gelu": "tanh"}
    assert ckpt.hf_config_facts({**HF_CONFIG, "tie_word_embeddings": False}, "c")["tie_weights"] is False
    assert ckpt.hf_config_facts({**HF_CONFIG, "activation_function": "gelu"}, "c")["gelu"] == "erf"  # nn.GELU()
    old_style = {k: v for k, v in HF_CONFIG.items() if k != "n_positions"}
    assert ckpt.hf_config_facts(old_style, "c")["context_length"] == 1024


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model_type": "llama"}, "model_type 'llama' is not GPT-2"),
        ({"activation_function": "relu"}, "activation_function 'relu'"),
        ({"activation_function": ["gelu"]}, "activation_function \\['gelu'\\]"),
        ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
        ({"n_inner": 1000}, "n_inner 1000"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"n_embd": None, "n_head": None}, None),
    ],
)
def test_hf_config_variants_gptcli_cannot_run_are_refused(change, message):
    obj = {**HF_CONFIG, **change}
    if message is None:  # a missing key
        del obj["n_embd"]
        message = "missing key 'n_embd'"
    with pytest.raises(UserError, match=message):
        ckpt.hf_config_facts(obj, "config.json")


def test_checkpoint_facts_prefer_config_json_then_metadata_then_shapes(tmp_path):
    cfg = load_config_file_from_dict(tmp_path, emb_dim=64, n_heads=4)
    header = ckpt.read_header(write_sparse(tmp_path / "a.safetensors", hf_tensors(cfg)))
    facts, where = ckpt.checkpoint_facts(header)
    assert where == "tensor shapes" and facts["n_heads"] is None and facts["emb_dim"] == 64
    hf = {**HF_CONFIG, "n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 32}
    facts, where = ckpt.checkpoint_facts(header, hf, "dir/config.json")
    assert where == "dir/config.json" and facts["n_heads"] == 4 and facts["qkv_bias"] is True
    ours = {n: ("F32", s) for n, s in ckpt.expected_tensors(cfg, ckpt.GPTCLI).items()}
    stored = {ckpt.METADATA_CONFIG_KEY: json.dumps(cfg.to_dict())}
    header = ckpt.read_header(write_sparse(tmp_path / "b.safetensors", ours, metadata=stored))
    facts, where = ckpt.checkpoint_facts(header)
    assert where == "b.safetensors metadata" and facts["n_heads"] == 4


def test_config_differences():
    cfg = shipped_config("124M")
    assert ckpt.config_differences(cfg, {**cfg.to_dict(), "drop_rate": 0.0}) == []
    diffs = ckpt.config_differences(cfg, {**cfg.to_dict(), "emb_dim": 1024, "n_heads": None, "tie_weights": False})
    assert diffs == ["emb_dim (config 768, checkpoint 1024)", "tie_weights (config True, checkpoint False)"]


def test_non_float_tensors(tmp_path):
    cfg = load_config_file_from_dict(tmp_path)
    tensors = hf_tensors(cfg, masks=True)  # U8 masks are not weights: ignored
    assert ckpt.non_float_tensors(ckpt.read_header(write_sparse(tmp_path / "a.safetensors", tensors))) == []
    tensors["h.0.mlp.c_fc.weight"] = ("I8", (64, 256))
    header = ckpt.read_header(write_sparse(tmp_path / "b.safetensors", tensors))
    assert ckpt.non_float_tensors(header) == ["h.0.mlp.c_fc.weight (I8)"]


@pytest.mark.parametrize(
    "header,message",
    [
        ({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, "bad entry for tensor 'a'"),
        ({"__metadata__": "oops", "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, "__metadata__"),
        ({"a": {"dtype": "F32", "shape": "x", "data_offsets": [0, 4]}}, "bad entry for tensor 'a'"),
    ],
)
def test_crafted_headers_are_one_line_errors(tmp_path, header, message):
    import json
    import struct

    raw = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with pytest.raises(UserError, match=message):
        ckpt.read_header(path)


def test_a_runs_own_files_say_what_they_are_and_to_pass_the_folder(tmp_path):
    """``-w runs/x/data/train.bin`` is token ids and ``-w runs/x/state.safetensors`` the resume state: say so."""
    from gptcli.checkpoint import checkpoint_file
    from gptcli.errors import UserError

    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    for name in ("data/train.bin", "state.safetensors", "train.jsonl", "model.safetensors"):
        (run / name).write_bytes(b"x")
    with pytest.raises(UserError) as info:
        checkpoint_file(run / "data" / "train.bin")
    assert str(info.value) == (f"{run / 'data' / 'train.bin'}: this is the run's token ids (training data, not "
                               f"weights); pass the run folder to load its weights: --weights {run}")
    with pytest.raises(UserError) as info:
        checkpoint_file(run / "state.safetensors")
    assert str(info.value).startswith(f"{run / 'state.safetensors'}: this is the run's resume state")
    assert str(info.value).endswith(f"pass the run folder to load its weights: --weights {run}")
    assert checkpoint_file(run / "model.safetensors") == run / "model.safetensors"
    assert checkpoint_file(run) == run / "model.safetensors"
    (run / "train.jsonl").unlink()
    (run / "state.safetensors").unlink()  # not a run any more: a .bin is just a refused pickle
    with pytest.raises(UserError, match="pickled checkpoints are refused"):
        checkpoint_file(run / "data" / "train.bin")

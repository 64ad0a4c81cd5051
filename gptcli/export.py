"""Writing models: the Hugging Face GPT-2 layout with a transformers ``config.json``, atomically.

A folder written by ``save_pretrained`` loads in gptcli (``--weights DIR``) and, for a GPT-2 BPE
model, in transformers' ``GPT2LMHeadModel.from_pretrained(DIR)``. transformers' GPT-2 always has
every bias, so a model without some (``qkv_bias: false``, ``bias: false``) is exported with zeros
there, and gptcli's own config in the file's metadata says they are not part of the model.

Every file is written atomically (``gptcli.files``): a crash mid-write leaves the previous file whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from gptcli.files import save_safetensors, write_json

if TYPE_CHECKING:
    import torch

    from gptcli.model.gpt import GPTModel
    from gptcli.tokenizer import Tokenizer

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def hf_state_dict(model: "GPTModel") -> dict[str, "torch.Tensor"]:
    """The model's tensors under transformers' GPT-2 names (no ``transformer.`` prefix), on the CPU,
    Conv1D weights stored (in, out); zeros for biases the model does not have; no head when tied."""
    import torch

    from gptcli.checkpoint import HF, _HF_BLOCK, _HF_TOP, _layout_tensors

    cfg = model.cfg
    ours = {n: t.detach().to("cpu", torch.float32) for n, t in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for hf_name, (shape, _) in _layout_tensors(cfg, HF).items():
        if hf_name.startswith("h."):
            _, layer, rest = hf_name.split(".", 2)
            name, transpose = _HF_BLOCK[rest]
            name = f"trf_blocks.{layer}.{name}"
        else:
            name, transpose = _HF_TOP[hf_name]
        tensor = ours.get(name)
        if tensor is None:  # a bias the model does not have
            out[hf_name] = torch.zeros(shape)
        else:
            out[hf_name] = (tensor.t() if transpose else tensor).contiguous()
    return out


def hf_config(model: "GPTModel", tokenizer: "Tokenizer") -> dict:
    """transformers' GPT2Config for ``model``, as config.json."""
    cfg = model.cfg
    out = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None,
        "activation_function": "gelu_new" if cfg.gelu == "tanh" else "gelu",
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": cfg.tie_weights,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    # A character model has no end-of-text token: null, not transformers' default 50256 (outside its vocabulary).
    out["bos_token_id"] = out["eos_token_id"] = tokenizer.eot_id
    return out


def save_pretrained(model: "GPTModel", folder: str | Path, tokenizer: "Tokenizer",
                    metadata: dict[str, str] | None = None) -> Path:
    """Write ``folder/model.safetensors`` (Hugging Face layout, float32) and ``folder/config.json``.

    The safetensors metadata records gptcli's config and the tokenizer, so a character-level model
    loads with its own vocabulary. Returns the folder.
    """
    from gptcli.checkpoint import METADATA_CONFIG_KEY
    from gptcli.tokenizer import to_metadata

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    info = {"format": "pt", METADATA_CONFIG_KEY: json.dumps(model.cfg.to_dict()),
            **to_metadata(tokenizer), **(metadata or {})}
    save_safetensors(hf_state_dict(model), folder / MODEL_FILE, info)
    write_json(hf_config(model, tokenizer), folder / CONFIG_FILE)
    return folder


def export_weights(source: str, out: str | Path, *, force: bool = False,
                   note: "Callable[[str], None]" = lambda _: None) -> dict:
    """``gptcli export``: the model ``source`` names (anything ``--weights`` takes; a ``--lora`` run's
    adapters merged into their base, W + alpha * (A @ B)^T) written to ``out`` in the Hugging Face
    layout, so transformers' ``GPT2LMHeadModel.from_pretrained(out)`` loads it. What was written."""
    import torch

    from gptcli.errors import UserError
    from gptcli.weights import load_model

    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        raise UserError(f"{out}: exists and is not an empty folder; pass --force to write into it")
    loaded = load_model(size=None, config=None, weights=source, device=torch.device("cpu"), dtype=torch.float32,
                        note=note)
    from gptcli.checkpoint import read_header
    from gptcli.templates import TEMPLATE_METADATA_KEY

    # An instruct run's prompt template goes with it, so chat still works.
    template = read_header(loaded.checkpoint).metadata.get(TEMPLATE_METADATA_KEY) if loaded.checkpoint else None
    save_pretrained(loaded.model, out, loaded.tokenizer, {TEMPLATE_METADATA_KEY: template} if template else None)
    return {"source": loaded.source, "out": str(out), "config": loaded.cfg.to_dict(),
            "tokenizer": loaded.tokenizer.name, "files": [MODEL_FILE, CONFIG_FILE], "template": template}

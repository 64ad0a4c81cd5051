"""safetensors checkpoints: read the header, recognise the layout, check it against a config.

Nothing here reads tensor data or imports torch; loading lives in ``gptcli.weights``.

Two layouts are recognised by tensor names:
- ``huggingface``: GPT-2 as OpenAI released it and transformers saves it (``wte``, ``h.N.attn.c_attn``,
  ...), with or without a ``transformer.`` prefix. Its attention and MLP weights are Conv1D,
  stored (in, out), the transpose of ``nn.Linear``.
- ``gptcli``: this project's own ``state_dict`` names (``tok_emb``, ``trf_blocks.N.att.W_qkv``, ...).
"""

from __future__ import annotations

import math
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from gptcli.config import GPTConfig
from gptcli.errors import UserError

HF = "huggingface"
GPTCLI = "gptcli"
HF_PREFIX = "transformer."
# Causal-mask buffers some GPT-2 exports carry; they are not weights.
HF_IGNORED = re.compile(r"^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors' name: F32, BF16, F16, ...
    shape: tuple[int, ...]
    offsets: tuple[int, int]  # byte range inside the data section

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "bytes": self.nbytes}


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_offset: int  # where tensor data starts in the file
    file_size: int


PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}
# Refuse a pickle before touching it: unpickling runs arbitrary code.
PICKLE_REFUSAL = "pickled checkpoints are refused because loading them runs arbitrary code; use a .safetensors file"


def checkpoint_file(path: str | Path) -> Path:
    """The .safetensors file for a file or a folder that holds ``model.safetensors``. Refuses pickles."""
    path = Path(path).expanduser()
    if path.is_dir():
        candidate = path / "model.safetensors"
        if candidate.is_file():
            return candidate
        from gptcli.run_layout import ADAPTERS_FILE, CLASSIFIER_FILE

        for other in (ADAPTERS_FILE, CLASSIFIER_FILE):  # a LoRA or classifier run: its weights file
            if (path / other).is_file():
                return path / other
        if (path / "model.safetensors.index.json").is_file():
            raise UserError(f"{path}: holds a sharded checkpoint (model.safetensors.index.json); "
                            "gptcli loads a single model.safetensors")
        pickles = sorted(p.name for p in path.glob("*") if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise UserError(
                f"{path}: holds {pickles[0]} but no model.safetensors; pickled checkpoints are refused because "
                "loading them runs arbitrary code. Convert it to safetensors first"
            )
        others = sorted(p.name for p in path.glob("*.safetensors"))
        if others:
            raise UserError(f"{path}: no model.safetensors in this folder (found {', '.join(others[:3])}; "
                            "pass the file itself)")
        raise UserError(f"{path}: no model.safetensors in this folder")
    refuse_run_internals(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"{path}: {PICKLE_REFUSAL}")
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if not path.is_file():
        raise UserError(f"{path}: not a file")
    return path


def refuse_run_internals(path: Path) -> None:
    """A UserError that says what a training run's own file is, for ``--weights runs/x/data/train.bin``
    or ``runs/x/state.safetensors``: the run folder is what to pass."""
    from gptcli.run_layout import DATA_DIR, RUN_MARKERS, STATE_FILE

    run = path.parent.parent if path.parent.name == DATA_DIR else path.parent
    if path.name == "model.safetensors" or not any((run / marker).is_file() for marker in RUN_MARKERS):
        return
    if path.parent.name == DATA_DIR:
        what = "the run's token ids (training data, not weights)"
    elif path.name == STATE_FILE:
        what = "the run's resume state (weights with optimizer moments and RNG states, for --resume)"
    else:
        return
    raise UserError(f"{path}: this is {what}; pass the run folder to load its weights: --weights {run}")


def read_header(path: str | Path) -> Header:
    """Parse a safetensors header (8-byte little-endian length, then JSON) without touching tensor data."""
    path = checkpoint_file(path)
    try:
        with open(path, "rb") as f:
            size = path.stat().st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise UserError(f"{path}: not a safetensors file (only {len(prefix)} bytes)")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise UserError(f"{path}: not a safetensors file, or truncated (header length {n} > file size {size})")
            raw = f.read(n)
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        obj = json.loads(raw.decode("utf-8"))
        if not isinstance(obj, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path}: not a safetensors file (header is not valid JSON: {exc})") from None
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError(f"{path}: corrupt safetensors header: __metadata__ must map names to strings")
    tensors: dict[str, TensorInfo] = {}
    data_size = size - 8 - n
    for name, entry in obj.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
            if not isinstance(dtype, str):
                raise TypeError(dtype)
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: corrupt safetensors header: bad entry for tensor {name!r}") from None
        info = TensorInfo(name, dtype, shape, (int(start), int(end)))
        if dtype not in DTYPE_BYTES or info.nbytes != info.numel * DTYPE_BYTES[dtype] or start < 0:
            raise UserError(f"{path}: corrupt safetensors header: tensor {name!r} ({dtype}, {list(shape)}) "
                            f"has {info.nbytes} bytes")
        if end > data_size:
            raise UserError(f"{path}: truncated file: tensor {name!r} ends at byte {end} of a "
                            f"{data_size}-byte data section")
        tensors[name] = info
    return Header(path=path, tensors=tensors, metadata=dict(metadata), data_offset=8 + n, file_size=size)


def detect_layout(names: Iterable[str]) -> str:
    names = list(names)
    bare = {n[len(HF_PREFIX):] if n.startswith(HF_PREFIX) else n for n in names}
    if "wte.weight" in bare or any(n.startswith("h.") for n in bare):
        return HF
    if "tok_emb.weight" in bare or any(n.startswith("trf_blocks.") for n in bare):
        return GPTCLI
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    raise UserError(f"unrecognised checkpoint layout (tensors: {shown or 'none'}); "
                    "expected GPT-2's Hugging Face names (wte, h.N...) or gptcli's (tok_emb, trf_blocks.N...)")


def expected_tensors(cfg: GPTConfig, layout: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes (as stored) that a checkpoint of ``cfg`` in ``layout`` holds.

    Hugging Face names are given without the ``transformer.`` prefix; the head is listed only when untied.
    """
    return {n: shape for n, (shape, needed) in _layout_tensors(cfg, layout).items() if needed}


def optional_tensors(cfg: GPTConfig, layout: str) -> dict[str, tuple[int, ...]]:
    """Bias tensors a Hugging Face checkpoint of a bias-free ``cfg`` may carry as zeros (transformers' GPT-2
    always has them, so gptcli exports zeros); loading checks they are zero and drops them."""
    return {n: shape for n, (shape, needed) in _layout_tensors(cfg, layout).items() if not needed}


def _layout_tensors(cfg: GPTConfig, layout: str) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Every tensor name of ``cfg`` in ``layout``: (stored shape, whether the config needs it)."""
    d, v, c = cfg.emb_dim, cfg.vocab_size, cfg.context_length
    b, qb = cfg.bias, cfg.qkv_bias
    out: dict[str, tuple[tuple[int, ...], bool]] = {}
    if layout == HF:
        out["wte.weight"] = ((v, d), True)
        out["wpe.weight"] = ((c, d), True)
        for i in range(cfg.n_layers):
            p = f"h.{i}."
            out[p + "ln_1.weight"], out[p + "ln_1.bias"] = ((d,), True), ((d,), b)
            out[p + "attn.c_attn.weight"] = ((d, 3 * d), True)  # Conv1D: (in, out)
            out[p + "attn.c_attn.bias"] = ((3 * d,), qb)
            out[p + "attn.c_proj.weight"] = ((d, d), True)
            out[p + "attn.c_proj.bias"] = ((d,), b)
            out[p + "ln_2.weight"], out[p + "ln_2.bias"] = ((d,), True), ((d,), b)
            out[p + "mlp.c_fc.weight"] = ((d, 4 * d), True)
            out[p + "mlp.c_fc.bias"] = ((4 * d,), b)
            out[p + "mlp.c_proj.weight"] = ((4 * d, d), True)
            out[p + "mlp.c_proj.bias"] = ((d,), b)
        out["ln_f.weight"], out["ln_f.bias"] = ((d,), True), ((d,), b)
        if not cfg.tie_weights:
            out["lm_head.weight"] = ((v, d), True)
        return out
    if layout == GPTCLI:
        out["tok_emb.weight"] = ((v, d), True)
        out["pos_emb.weight"] = ((c, d), True)
        for i in range(cfg.n_layers):
            p = f"trf_blocks.{i}."
            out[p + "att.W_qkv.weight"] = ((3 * d, d), True)
            if qb:
                out[p + "att.W_qkv.bias"] = ((3 * d,), True)
            out[p + "att.out_proj.weight"] = ((d, d), True)
            out[p + "ff.layers.0.weight"] = ((4 * d, d), True)
            out[p + "ff.layers.2.weight"] = ((d, 4 * d), True)
            out[p + "norm1.scale"] = out[p + "norm2.scale"] = ((d,), True)
            if b:
                out[p + "att.out_proj.bias"] = ((d,), True)
                out[p + "ff.layers.0.bias"] = ((4 * d,), True)
                out[p + "ff.layers.2.bias"] = ((d,), True)
                out[p + "norm1.shift"] = out[p + "norm2.shift"] = ((d,), True)
        out["final_norm.scale"] = ((d,), True)
        if b:
            out["final_norm.shift"] = ((d,), True)
        if not cfg.tie_weights:
            out["out_head.weight"] = ((v, d), True)
        return out
    raise ValueError(f"unknown layout {layout!r}")


def head_name(layout: str) -> str:
    return "lm_head.weight" if layout == HF else "out_head.weight"


def normalized_names(header: Header, layout: str) -> dict[str, TensorInfo]:
    """Tensors keyed by their layout name: Hugging Face's without the prefix and without mask buffers."""
    if layout != HF:
        return dict(header.tensors)
    out = {}
    for name, info in header.tensors.items():
        if HF_IGNORED.match(name):
            continue
        out[name[len(HF_PREFIX):] if name.startswith(HF_PREFIX) else name] = info
    return out


def is_tied(header: Header, layout: str) -> bool:
    """A checkpoint without a separate head matrix shares the token embedding."""
    names = normalized_names(header, layout)
    return head_name(layout) not in names


@dataclass
class Verdict:
    layout: str
    tied: bool
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "name: checkpoint [a, b] vs config [c, d]"
    mismatched_names: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 3) -> str:
        """One line naming the first few problems of each kind."""

        def few(items: list[str]) -> str:
            return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")

        parts = []
        if self.missing:
            parts.append(f"missing {len(self.missing)} tensor(s): {few(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)} tensor(s): {few(self.unexpected)}")
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} shape mismatch(es): {few(self.mismatched)}")
        return "; ".join(parts) or "ok"


def verify(header: Header, cfg: GPTConfig) -> Verdict:
    """Compare a checkpoint's tensors with what ``cfg`` needs.

    A head matrix present in the file for a tied config is unexpected; one missing for an untied
    config is missing.
    """
    layout = detect_layout(header.tensors)
    names = normalized_names(header, layout)
    expected = expected_tensors(cfg, layout)
    optional = optional_tensors(cfg, layout)
    verdict = Verdict(layout=layout, tied=is_tied(header, layout))
    for name, shape in expected.items():
        info = names.get(name)
        if info is None:
            verdict.missing.append(name)
        elif info.shape != shape:
            verdict.mismatched.append(f"{name}: checkpoint {list(info.shape)} vs config {list(shape)}")
            verdict.mismatched_names.append(name)
    for name, shape in optional.items():
        info = names.get(name)
        if info is not None and info.shape != shape:
            verdict.mismatched.append(f"{name}: checkpoint {list(info.shape)} vs config {list(shape)}")
            verdict.mismatched_names.append(name)
    verdict.unexpected = [n for n in names if n not in expected and n not in optional]
    return verdict


# emb_dim -> n_heads of the four GPT-2 releases (configs/gpt2-*.yaml); n_heads cannot be read from shapes.
GPT2_HEADS = {768: 12, 1024: 16, 1280: 20, 1600: 25}


@dataclass(frozen=True)
class InferredArchitecture:
    """What a checkpoint's shapes say about its architecture. ``n_heads`` is None when emb_dim is not a GPT-2 size."""

    vocab_size: int
    context_length: int
    emb_dim: int
    n_layers: int
    n_heads: int | None
    qkv_bias: bool
    tie_weights: bool
    bias: bool = True

    def to_dict(self) -> dict:
        return {
            "vocab_size": self.vocab_size, "context_length": self.context_length, "emb_dim": self.emb_dim,
            "n_heads": self.n_heads, "n_layers": self.n_layers, "qkv_bias": self.qkv_bias,
            "tie_weights": self.tie_weights, "bias": self.bias,
        }


def infer_architecture(header: Header) -> InferredArchitecture:
    layout = detect_layout(header.tensors)
    names = normalized_names(header, layout)
    if layout == HF:
        tok, pos, block_re, bias = "wte.weight", "wpe.weight", re.compile(r"^h\.(\d+)\."), "h.0.attn.c_attn.bias"
        shift = None  # transformers' GPT-2 always has biases: a missing one is missing, not off
    else:
        tok, pos, block_re, bias = "tok_emb.weight", "pos_emb.weight", re.compile(r"^trf_blocks\.(\d+)\."), \
            "trf_blocks.0.att.W_qkv.bias"
        shift = "final_norm.shift"
    for needed in (tok, pos):
        if needed not in names or len(names[needed].shape) != 2:
            raise UserError(f"{header.path}: cannot infer the architecture: tensor {needed!r} is missing or not 2-D")
    vocab_size, emb_dim = names[tok].shape
    context_length = names[pos].shape[0]
    layers = {int(m.group(1)) for n in names if (m := block_re.match(n))}
    return InferredArchitecture(
        vocab_size=vocab_size,
        context_length=context_length,
        emb_dim=emb_dim,
        n_layers=max(layers) + 1 if layers else 0,
        n_heads=GPT2_HEADS.get(emb_dim),
        qkv_bias=bias in names,
        tie_weights=head_name(layout) not in names,
        bias=shift is None or shift in names,
    )


# --- From checkpoint names to gptcli's ---------------------------------------------------------------

# Hugging Face block tensor -> (gptcli name inside the block, stored as Conv1D (in, out) so transpose).
_HF_BLOCK: dict[str, tuple[str, bool]] = {
    "ln_1.weight": ("norm1.scale", False),
    "ln_1.bias": ("norm1.shift", False),
    "attn.c_attn.weight": ("att.W_qkv.weight", True),  # columns [q | k | v] -> rows [q; k; v]
    "attn.c_attn.bias": ("att.W_qkv.bias", False),
    "attn.c_proj.weight": ("att.out_proj.weight", True),
    "attn.c_proj.bias": ("att.out_proj.bias", False),
    "ln_2.weight": ("norm2.scale", False),
    "ln_2.bias": ("norm2.shift", False),
    "mlp.c_fc.weight": ("ff.layers.0.weight", True),
    "mlp.c_fc.bias": ("ff.layers.0.bias", False),
    "mlp.c_proj.weight": ("ff.layers.2.weight", True),
    "mlp.c_proj.bias": ("ff.layers.2.bias", False),
}
_HF_TOP: dict[str, tuple[str, bool]] = {
    "wte.weight": ("tok_emb.weight", False),
    "wpe.weight": ("pos_emb.weight", False),
    "ln_f.weight": ("final_norm.scale", False),
    "ln_f.bias": ("final_norm.shift", False),
    "lm_head.weight": ("out_head.weight", False),
}
_HF_BLOCK_NAME = re.compile(r"^h\.(\d+)\.(.+)$")


def gptcli_name(name: str, layout: str) -> tuple[str, bool]:
    """gptcli's state_dict name for a (prefix-free) checkpoint name, and whether it must be transposed.

    Only Hugging Face's Conv1D weights need the transpose: nn.Linear stores (out, in).
    """
    if layout == GPTCLI:
        return name, False
    if name in _HF_TOP:
        return _HF_TOP[name]
    m = _HF_BLOCK_NAME.match(name)
    if m and m.group(2) in _HF_BLOCK:
        ours, transpose = _HF_BLOCK[m.group(2)]
        return f"trf_blocks.{m.group(1)}.{ours}", transpose
    raise ValueError(f"no gptcli name for {name!r}")


# --- Architecture: config.json, our own metadata, or the shapes ---------------------------------------

HF_CONFIG_FILE = "config.json"
# gptcli stores the GPTConfig as JSON under this metadata key, so n_heads survives a round trip.
METADATA_CONFIG_KEY = "gptcli.config"
# Keys that decide the weights' shapes or the maths; drop_rate does neither at inference.
ARCH_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias", "tie_weights", "bias",
             "gelu")
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
# transformers' activation_function names -> gptcli's ``gelu``: the tanh approximation (GPT-2's), or
# the exact erf GELU (nanoGPT's nn.GELU()).
HF_GELUS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "erf", "gelu_python": "erf"}


def read_json_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object")
    return obj


def hf_config_facts(obj: dict, source: str) -> dict:
    """Architecture keys from a transformers GPT-2 ``config.json`` (n_embd, n_layer, n_head, n_positions, ...).

    Settings that would change the maths gptcli runs are refused rather than silently ignored.
    """
    model_type = obj.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise UserError(f"{source}: model_type {model_type!r} is not GPT-2")
    try:
        facts = {
            "vocab_size": obj["vocab_size"],
            "context_length": obj["n_positions"] if "n_positions" in obj else obj["n_ctx"],
            "emb_dim": obj["n_embd"],
            "n_heads": obj["n_head"],
            "n_layers": obj["n_layer"],
            "tie_weights": obj.get("tie_word_embeddings", True),
            "drop_rate": obj.get("resid_pdrop", 0.1),
        }
    except KeyError as exc:
        raise UserError(f"{source}: missing key {exc.args[0]!r}") from None
    problems = []
    activation = obj.get("activation_function", "gelu_new")
    facts["gelu"] = HF_GELUS.get(activation) if isinstance(activation, str) else None
    if facts["gelu"] is None:
        problems.append(f"activation_function {obj['activation_function']!r} (gptcli runs GELU: "
                        f"{', '.join(HF_GELUS)})")
    eps = obj.get("layer_norm_epsilon", 1e-5)
    if not isinstance(eps, (int, float)) or abs(eps - 1e-5) > 1e-12:
        problems.append(f"layer_norm_epsilon {eps!r} (gptcli uses 1e-5)")
    n_inner = obj.get("n_inner")
    if n_inner is not None and n_inner != 4 * facts["emb_dim"]:
        problems.append(f"n_inner {n_inner!r} (gptcli uses 4 * n_embd)")
    if obj.get("scale_attn_weights", True) is not True:
        problems.append("scale_attn_weights false")
    if obj.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx true")
    if problems:
        raise UserError(f"{source}: unsupported GPT-2 variant: {'; '.join(problems)}")
    return facts


def metadata_facts(header: Header) -> dict | None:
    """The config gptcli stored in the header, or None."""
    raw = header.metadata.get(METADATA_CONFIG_KEY)
    if raw is None:
        return None
    try:
        obj = json.loads(raw)
        if not isinstance(obj, dict):
            raise ValueError
    except ValueError:
        raise UserError(f"{header.path}: metadata {METADATA_CONFIG_KEY!r} is not a JSON object") from None
    return obj


def checkpoint_facts(header: Header, hf_config: dict | None = None, hf_config_source: str = HF_CONFIG_FILE) -> tuple[dict, str]:
    """What is known about a checkpoint's architecture, and from where.

    config.json wins, then gptcli's own metadata, then the tensor shapes (which cannot tell n_heads
    unless emb_dim is a GPT-2 size: then ``n_heads`` is None). transformers' config has no
    ``qkv_bias`` or ``bias``: they come from gptcli's metadata when the file has it (its Hugging Face
    export carries zero biases), else from the tensors.
    """
    stored = metadata_facts(header)
    if hf_config is not None:
        facts, where = hf_config_facts(hf_config, hf_config_source), hf_config_source
        facts["qkv_bias"] = stored["qkv_bias"] if stored and "qkv_bias" in stored else infer_architecture(header).qkv_bias
        facts["bias"] = stored.get("bias", True) if stored else True
        return facts, where
    if stored is not None:  # also a file without the model's tensors (LoRA adapters, a classifier)
        return {"bias": True, **stored}, f"{header.path.name} metadata"
    facts = infer_architecture(header).to_dict()
    facts["drop_rate"] = 0.1
    return facts, "tensor shapes"


def differing_keys(wanted: GPTConfig, facts: dict) -> list[tuple[str, Any, Any]]:
    """(key, config's value, checkpoint's value) for each architecture key on which the two disagree;
    keys the checkpoint cannot tell are skipped."""
    return [(key, getattr(wanted, key), facts[key]) for key in ARCH_KEYS
            if facts.get(key) is not None and facts[key] != getattr(wanted, key)]


def config_differences(wanted: GPTConfig, facts: dict) -> list[str]:
    """``key (config X, checkpoint Y)`` for each architecture key on which the two disagree; unknowns are skipped."""
    return [f"{key} (config {ours}, checkpoint {theirs})" for key, ours, theirs in differing_keys(wanted, facts)]


def non_float_tensors(header: Header) -> list[str]:
    """``name (DTYPE)`` for weights that are not floating point (quantised checkpoints are not supported)."""
    layout = detect_layout(header.tensors)
    return [f"{info.name} ({info.dtype})" for info in normalized_names(header, layout).values()
            if info.dtype not in FLOAT_DTYPES]


def implied_config(header: Header, config_json: Path | None = None, name: str | None = None,
                   note=lambda _: None) -> GPTConfig:
    """The config a checkpoint implies: its config.json, else gptcli's metadata in the header, else its shapes.

    Nothing is checked against the tensors here (``verify`` does that). A released GPT-2 size keeps
    its usual name ("1558M"). Raises UserError when n_heads cannot be known or a value is invalid.
    """
    from gptcli.config import GPT2_SIZES, SCHEMA, shipped_config, validate

    hf_config = read_json_file(config_json) if config_json is not None else None
    facts, where = checkpoint_facts(header, hf_config, str(config_json) if config_json else HF_CONFIG_FILE)
    if facts.get("n_heads") is None:
        raise UserError(
            f"{header.path}: cannot tell n_heads from the tensor shapes (emb_dim {facts.get('emb_dim')} is not a "
            f"GPT-2 size: {', '.join(map(str, GPT2_HEADS))}) and there is no config.json; pass --config with your "
            "model's YAML"
        )
    note(f"config from {where}")
    raw = {k: facts[k] for k in SCHEMA if facts.get(k) is not None}
    raw.setdefault("drop_rate", 0.1)
    default_name = header.path.parent.name if header.path.name == "model.safetensors" else header.path.stem
    cfg = validate(raw, f"{header.path} (architecture from {where})", name=name or default_name)
    for size in GPT2_SIZES:
        if shipped_config(size).to_dict() == {**cfg.to_dict(), "drop_rate": shipped_config(size).drop_rate}:
            return shipped_config(size)
    return cfg

"""Model configs: the book's keys, loaded from YAML and validated. No torch here.

A config is the book's dictionary (``GPT_CONFIG_124M``) as a frozen dataclass, plus
``tie_weights``: whether the output head shares the token-embedding matrix; ``bias``: biases outside
attention; ``gelu``: the feed-forward's GELU, the book's and GPT-2's tanh approximation or the exact
(erf) one of nanoGPT's ``nn.GELU()``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptcli.errors import UserError


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    context_length: int
    emb_dim: int
    n_heads: int
    n_layers: int
    drop_rate: float
    qkv_bias: bool
    tie_weights: bool
    bias: bool = True  # biases in the other Linear layers and LayerNorm shifts (nanoGPT's bias=False turns them off)
    gelu: str = "tanh"  # "tanh": the book's and GPT-2's approximation; "erf": the exact GELU (nanoGPT's nn.GELU())
    name: str = "custom"  # where the config came from; not a YAML key

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        """Every YAML key, in the book's order (no ``name``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}

    def replace(self, **changes: Any) -> "GPTConfig":
        """A copy with some keys changed, validated like a YAML file."""
        raw = {**self.to_dict(), **changes}
        return validate(raw, "config overrides", name=self.name)


# Key -> accepted Python types, in the book's order.
SCHEMA: dict[str, tuple[type, ...]] = {
    "vocab_size": (int,),
    "context_length": (int,),
    "emb_dim": (int,),
    "n_heads": (int,),
    "n_layers": (int,),
    "drop_rate": (float, int),
    "qkv_bias": (bool,),
    "tie_weights": (bool,),
    "bias": (bool,),
    "gelu": (str,),
}
# Keys a YAML file may leave out, and their values then. The book's GPT_CONFIG_124M has 7 keys and
# a separate output head (its GPTModel's out_head), so a config copied from it is untied.
OPTIONAL: dict[str, Any] = {"bias": True, "tie_weights": False, "gelu": "tanh"}
GELUS = ("tanh", "erf")

# Shipped configs: canonical size -> (file name, aliases). Aliases are matched case-insensitively.
SIZES: dict[str, tuple[str, tuple[str, ...]]] = {
    "124M": ("gpt2-124M.yaml", ("small", "gpt2")),
    "355M": ("gpt2-355M.yaml", ("medium", "gpt2-medium")),
    "774M": ("gpt2-774M.yaml", ("large", "gpt2-large")),
    "1558M": ("gpt2-1558M.yaml", ("xl", "gpt2-xl")),
    "book": ("book-124M.yaml", ("gpt_config_124m", "book-124m")),
}
DEFAULT_SIZE = "124M"
GPT2_SIZES = ("124M", "355M", "774M", "1558M")


def configs_dir() -> Path:
    """Where the shipped YAML files are: inside the package in a wheel, at the repo top in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if candidate.is_dir():
            return candidate
    raise UserError(f"shipped configs not found (looked in {here / 'configs'} and {here.parent / 'configs'})")


def canonical_size(size: str) -> str:
    """'xl', 'XL', '1558m', 'gpt2-xl' -> '1558M'. Raises UserError for an unknown size."""
    wanted = size.strip().lower()
    for canonical, (_, aliases) in SIZES.items():
        if wanted == canonical.lower() or wanted in aliases:
            return canonical
    choices = ", ".join(f"{c} ({'/'.join(a[:1])})" for c, (_, a) in SIZES.items())
    raise UserError(f"unknown size {size!r}; choose one of {choices}")


def validate(raw: Any, source: str, name: str = "custom") -> GPTConfig:
    """Check a parsed YAML mapping against the schema; errors name the source and the key."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of config keys, got {type(raw).__name__}")
    unknown = [k for k in raw if k not in SCHEMA]
    if unknown:
        raise UserError(f"{source}: unknown key {unknown[0]!r} (allowed: {', '.join(SCHEMA)})")
    raw = {**OPTIONAL, **raw}
    if raw["gelu"] not in GELUS:
        raise UserError(f"{source}: key 'gelu' must be {' or '.join(GELUS)}, got {raw['gelu']!r}")
    for key, types in SCHEMA.items():
        if key not in raw:
            raise UserError(f"{source}: missing key {key!r}")
        value = raw[key]
        # bool is an int in Python; don't let `emb_dim: true` through, nor `qkv_bias: 1`.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            want = " or ".join(t.__name__ for t in types)
            raise UserError(f"{source}: key {key!r} must be {want}, got {value!r}")
    for key in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
        if raw[key] <= 0:
            raise UserError(f"{source}: key {key!r} must be positive, got {raw[key]}")
    if not 0.0 <= raw["drop_rate"] < 1.0:
        raise UserError(f"{source}: key 'drop_rate' must be in [0, 1), got {raw['drop_rate']}")
    if raw["emb_dim"] % raw["n_heads"]:
        raise UserError(
            f"{source}: key 'emb_dim' ({raw['emb_dim']}) must be divisible by 'n_heads' ({raw['n_heads']})"
        )
    values = {k: raw[k] for k in SCHEMA}
    values["drop_rate"] = float(values["drop_rate"])
    return GPTConfig(**values, name=name)


def load_config_file(path: str | Path, name: str | None = None) -> GPTConfig:
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read config: {exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"{path}: invalid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    if raw is None:
        raise UserError(f"{path}: the file is empty (no config keys); see configs/ for examples")
    return validate(raw, str(path), name=name or path.stem)


def shipped_config(size: str) -> GPTConfig:
    canonical = canonical_size(size)
    return load_config_file(configs_dir() / SIZES[canonical][0], name=canonical)


def shipped_configs() -> list[GPTConfig]:
    return [shipped_config(size) for size in SIZES]


def resolve_config(size: str | None, config: str | Path | None) -> GPTConfig:
    """The config a command runs with: ``--size`` or ``--config``, never both; default 124M."""
    if size is not None and config is not None:
        raise UserError("--size and --config are mutually exclusive; pass one of them")
    if config is not None:
        return load_config_file(config)
    return shipped_config(size or DEFAULT_SIZE)

"""The weights files of fine-tuning runs that are not a whole GPT-2: LoRA adapters and text classifiers.

- ``adapters.safetensors`` (``gptcli train --lora RANK``): only the adapters (and a classifier's head),
  with what finds the base weights in the metadata (``gptcli.base``: the Hub id or absolute path the
  run started from, or ``random`` with its config and seed). Loading builds the base, adds the
  adapters and merges them (W + alpha * (A @ B)^T).
- ``classifier.safetensors`` (``gptcli train --task classify``): the whole model in gptcli's names, its
  head a Linear(emb_dim, number of labels), with the labels and how texts are padded.

Both record the tokenizer and the model's config. Reading and writing only: ``gptcli.weights`` loads
the base, ``gptcli.classify`` runs a classifier.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptcli.errors import UserError

if TYPE_CHECKING:
    import torch

    from gptcli.config import GPTConfig
    from gptcli.model.gpt import GPTModel
    from gptcli.tokenizer import Tokenizer

KIND_KEY = "gptcli.kind"
ADAPTERS_KIND = "lora-adapters"
CLASSIFIER_KIND = "classifier"
LORA_KEY = "gptcli.lora"  # {"rank", "alpha"}
BASE_KEY = "gptcli.base"  # {"weights": hub id | absolute path | "random", "config": {...}, "seed": N}
CLASSIFIER_KEY = "gptcli.classifier"  # {"labels", "max_length", "label_token"}


@dataclass
class ClassifierInfo:
    """What turns a classifier's logits into labels, and how its texts were padded in training."""

    labels: list[str]
    max_length: int  # texts are cut to, and (label_token "last") padded to, this many tokens
    label_token: str = "last"  # last: the last position, padding included (the book); last-real

    def to_json(self) -> str:
        return json.dumps({"labels": self.labels, "max_length": self.max_length, "label_token": self.label_token})

    @classmethod
    def from_json(cls, raw: str) -> "ClassifierInfo":
        obj = json.loads(raw)
        return cls(labels=[str(x) for x in obj["labels"]], max_length=int(obj["max_length"]),
                   label_token=str(obj.get("label_token", "last")))


@dataclass
class WeightsFile:
    """An adapters or classifier file, read back."""

    path: Path
    kind: str
    cfg: "GPTConfig"
    tensors: dict[str, "torch.Tensor"]
    tokenizer: "Tokenizer"
    classifier: ClassifierInfo | None = None
    lora: dict[str, Any] | None = None  # {"rank", "alpha"}
    base: dict[str, Any] | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def base_record(source: str, cfg: "GPTConfig", seed: int) -> dict[str, Any]:
    """How to find a run's base weights again: a Hub id as it is, a local path made absolute, random
    weights by their config and seed."""
    if source.startswith("random"):
        return {"weights": "random", "config": {**cfg.to_dict(), "name": cfg.name}, "seed": seed}
    path = Path(source).expanduser()
    where = str(path.resolve()) if path.exists() else source
    return {"weights": where, "config": {**cfg.to_dict(), "name": cfg.name}}


def _metadata(model: "GPTModel", tokenizer: "Tokenizer", kind: str, extra: dict[str, str]) -> dict[str, str]:
    from gptcli.checkpoint import METADATA_CONFIG_KEY
    from gptcli.tokenizer import to_metadata

    return {"format": "pt", KIND_KEY: kind, METADATA_CONFIG_KEY: json.dumps({**model.cfg.to_dict(),
                                                                              "name": model.cfg.name}),
            **to_metadata(tokenizer), **extra}


def save_adapters(model: "GPTModel", path: Path, tokenizer: "Tokenizer", *, rank: int, alpha: float,
                  base: dict[str, Any], classifier: ClassifierInfo | None = None,
                  metadata: dict[str, str] | None = None) -> Path:
    """The adapters of ``model`` alone (and a classifier's head), with the base it adapts, atomically."""
    from gptcli.files import save_safetensors
    from gptcli.model.lora import lora_tensors

    tensors = lora_tensors(model)
    if classifier is not None:
        tensors.update({f"out_head.{k}": v.detach().to("cpu").contiguous()
                        for k, v in model.out_head.state_dict().items()})
    extra = {LORA_KEY: json.dumps({"rank": rank, "alpha": alpha}), BASE_KEY: json.dumps(base), **(metadata or {})}
    if classifier is not None:
        extra[CLASSIFIER_KEY] = classifier.to_json()
    return save_safetensors(tensors, path, _metadata(model, tokenizer, ADAPTERS_KIND, extra))


def save_classifier(model: "GPTModel", path: Path, tokenizer: "Tokenizer", classifier: ClassifierInfo,
                    metadata: dict[str, str] | None = None) -> Path:
    """A whole classifier (its weights in gptcli's names), atomically."""
    from gptcli.files import save_safetensors

    tensors = {n: t.detach().to("cpu").contiguous() for n, t in model.state_dict().items()}
    extra = {CLASSIFIER_KEY: classifier.to_json(), **(metadata or {})}
    return save_safetensors(tensors, path, _metadata(model, tokenizer, CLASSIFIER_KIND, extra))


def file_kind(metadata: dict[str, str]) -> str | None:
    """``lora-adapters``, ``classifier`` or None (a plain checkpoint) from a safetensors header's metadata."""
    kind = (metadata or {}).get(KIND_KEY)
    return kind if kind in (ADAPTERS_KIND, CLASSIFIER_KIND) else None


def read_weights_file(path: str | Path) -> WeightsFile:
    """An adapters or classifier file; UserError when it is neither or is damaged."""
    from gptcli.checkpoint import METADATA_CONFIG_KEY
    from gptcli.config import validate
    from gptcli.files import load_safetensors
    from gptcli.tokenizer import from_metadata

    path = Path(path)
    try:
        meta, tensors = load_safetensors(path)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise UserError(f"{path}: corrupt or unreadable safetensors file ({type(exc).__name__})") from None
    kind = file_kind(meta)
    if kind is None:
        raise UserError(f"{path}: neither LoRA adapters nor a classifier written by gptcli train")
    try:
        raw = json.loads(meta[METADATA_CONFIG_KEY])
        cfg = validate({k: v for k, v in raw.items() if k != "name"}, f"{path} config", name=raw.get("name", "custom"))
        classifier = ClassifierInfo.from_json(meta[CLASSIFIER_KEY]) if CLASSIFIER_KEY in meta else None
        lora = json.loads(meta[LORA_KEY]) if kind == ADAPTERS_KIND else None
        base = json.loads(meta[BASE_KEY]) if kind == ADAPTERS_KIND else None
    except (KeyError, ValueError, TypeError) as exc:
        raise UserError(f"{path}: damaged gptcli metadata ({type(exc).__name__}: {exc})") from None
    return WeightsFile(path=path, kind=kind, cfg=cfg, tensors=tensors, tokenizer=from_metadata(meta, str(path)),
                       classifier=classifier, lora=lora, base=base, metadata=meta)


def attach_adapters(model: "GPTModel", adapters: WeightsFile) -> "GPTModel":
    """Wrap ``model``'s layers as the run did and fill the adapters (and a classifier's head) from the file."""
    import torch

    from gptcli.model.lora import add_lora

    add_lora(model, int(adapters.lora["rank"]), float(adapters.lora["alpha"]))
    device = next(model.parameters()).device
    wanted = {n for n in model.state_dict() if ".lora." in n or (adapters.classifier and n.startswith("out_head."))}
    if set(adapters.tensors) != wanted:
        missing, unexpected = sorted(wanted - set(adapters.tensors)), sorted(set(adapters.tensors) - wanted)
        raise UserError(f"{adapters.path}: the adapters do not fit the base model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    try:
        with torch.no_grad():
            state = model.state_dict()
            for name, tensor in adapters.tensors.items():
                state[name].copy_(tensor.to(device))
    except RuntimeError as exc:
        raise UserError(f"{adapters.path}: the adapters do not fit the base model: {str(exc).splitlines()[0]}") \
            from None
    return model

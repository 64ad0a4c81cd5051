"""Where a model's weights come from: ``--weights auto|random|FILE|DIR|HUB_ID``.

``load_model`` is the one entry point the commands use. It returns the model ready for inference
(eval mode, on the device, in the dtype) and reports notes through a callback instead of printing.
``locate_checkpoint`` turns FILE|DIR|HUB_ID into a local .safetensors path without loading tensors.

Hub files go to the standard Hugging Face cache (``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub``); ``HF_HUB_OFFLINE=1`` keeps every look-up on disk. Both are read
when called, not when huggingface_hub was imported.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from gptcli.config import GPT2_SIZES, GPTConfig, resolve_config
from gptcli.errors import UserError

if TYPE_CHECKING:
    import torch

    from gptcli.checkpoint import Header
    from gptcli.model import GPTModel

Note = Callable[[str], None]

# The releases ``auto`` loads for the shipped GPT-2 sizes.
HUB_IDS: dict[str, str] = {
    "124M": "openai-community/gpt2",
    "355M": "openai-community/gpt2-medium",
    "774M": "openai-community/gpt2-large",
    "1558M": "openai-community/gpt2-xl",
}
CHECKPOINT_NAME = "model.safetensors"
# owner/name, optionally @revision (a branch, tag or commit).
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


def _ignore(_: str) -> None:
    pass


@dataclass
class LoadedModel:
    model: "GPTModel"
    cfg: GPTConfig
    source: str  # what was loaded, for humans and JSON: "random (seed 123)", a path, a hub id
    device: "torch.device"
    dtype: "torch.dtype"
    load_seconds: float
    notes: list[str] = field(default_factory=list)
    checkpoint: Path | None = None  # the local .safetensors file, None for random weights


@dataclass(frozen=True)
class Located:
    """A checkpoint found on disk (perhaps just downloaded)."""

    path: Path  # the .safetensors file
    config_json: Path | None  # transformers' config.json next to it, when there is one
    source: str  # what the user named: a path or a Hub id
    hub_id: str | None = None


class HubUnavailable(UserError):
    """The Hub could not serve a file that is not cached. ``reason`` completes "... is not cached and <reason>"."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


# --- The Hugging Face cache and Hub --------------------------------------------------------------------


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), read now."""
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache, resolved from the environment now, the way huggingface_hub resolves it."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.path.expandvars(os.environ[name])).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
    )
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """``('owner/name', revision or None)`` when ``spec`` looks like a Hub repo id, else None."""
    m = _HUB_ID.match(spec.strip())
    return (m.group("repo"), m.group("revision")) if m else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _hub_error(exc: Exception, repo: str, revision: str | None) -> UserError:
    """One clear sentence for whatever huggingface_hub raised."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = hub_cache_dir()
    if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        if hub_offline() or isinstance(exc, OfflineModeIsEnabled):
            return HubUnavailable(
                f"{repo} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set; "
                "unset it to download, or pass a local file or folder", reason="HF_HUB_OFFLINE is set")
        return HubUnavailable(
            f"cannot reach the Hugging Face Hub to download {repo}, and it is not in the cache ({cache}); "
            "check your connection, or pass a local file or folder", reason="the Hugging Face Hub cannot be reached")
    if isinstance(exc, GatedRepoError):
        return UserError(f"{repo} is a gated repo on the Hugging Face Hub; accept its terms on the website and "
                         "log in with `hf auth login`")
    if isinstance(exc, RepositoryNotFoundError):
        return UserError(f"{repo}: no such local file or folder, and no such model on the Hugging Face Hub "
                         "(or it is private: log in with `hf auth login`)")
    if isinstance(exc, RevisionNotFoundError):
        return UserError(f"{repo}: no revision {revision!r} on the Hugging Face Hub")
    if isinstance(exc, EntryNotFoundError):
        return UserError(f"{repo} has no {CHECKPOINT_NAME} on the Hugging Face Hub; gptcli loads safetensors only "
                         "(pickled .bin checkpoints are refused because loading them runs arbitrary code)")
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return HubUnavailable(f"the Hugging Face Hub failed to serve {repo}: {_first_line(exc)}",
                              reason=f"the Hugging Face Hub answered with an error ({status or 'HTTP'})")
    if isinstance(exc, OSError) and not isinstance(exc, ConnectionError):
        return UserError(f"cannot download {repo} into {cache}: {exc.strerror or _first_line(exc)}")
    # httpx/requests connection errors and anything else the download raised mid-way.
    return HubUnavailable(f"cannot download {repo} from the Hugging Face Hub: {type(exc).__name__}: "
                          f"{_first_line(exc)}", reason=f"downloading it failed ({type(exc).__name__})")


def _hub_file(repo: str, filename: str, revision: str | None, *, local_only: bool) -> Path:
    """hf_hub_download with the cache, offline flag and endpoint read from the environment now."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(
        repo, filename, revision=revision, cache_dir=hub_cache_dir(),
        local_files_only=local_only or hub_offline(), endpoint=os.environ.get("HF_ENDPOINT") or None,
    ))


def _optional_config_json(repo: str, revision: str | None, *, local_only: bool) -> Path | None:
    try:
        return _hub_file(repo, "config.json", revision, local_only=local_only)
    except Exception:  # noqa: BLE001 - config.json is optional: shapes (or --size) describe the model too
        return None


def cached_checkpoint(repo: str, revision: str | None = None) -> Located | None:
    """The cached checkpoint of a Hub repo, without any network access; None when it is not cached."""
    try:
        path = _hub_file(repo, CHECKPOINT_NAME, revision, local_only=True)
    except Exception:  # noqa: BLE001 - anything short of a cached file means "not cached"
        return None
    source = repo if revision is None else f"{repo}@{revision}"
    return Located(path, _optional_config_json(repo, revision, local_only=True), source, hub_id=repo)


def fetch_checkpoint(repo: str, revision: str | None = None, note: Note = _ignore) -> Located:
    """A Hub repo's model.safetensors (and config.json), from the cache or downloaded into it.

    huggingface_hub draws its progress bar on stderr. Raises UserError (HubUnavailable when the Hub
    cannot be reached, or HF_HUB_OFFLINE is set, and nothing is cached).
    """
    source = repo if revision is None else f"{repo}@{revision}"
    if hub_offline():
        cached = cached_checkpoint(repo, revision)
        if cached is None:
            from huggingface_hub.errors import LocalEntryNotFoundError

            raise _hub_error(LocalEntryNotFoundError("not cached"), repo, revision)
        return cached
    if cached_checkpoint(repo, revision) is None:
        note(f"downloading {source} from the Hugging Face Hub into {hub_cache_dir()}")
    try:
        # This also checks that a cached copy is current; when the Hub is unreachable it falls back to the cache.
        path = _hub_file(repo, CHECKPOINT_NAME, revision, local_only=False)
    except Exception as exc:  # noqa: BLE001 - mapped to one clear sentence
        raise _hub_error(exc, repo, revision) from None
    return Located(path, _optional_config_json(repo, revision, local_only=False), source, hub_id=repo)


def _looks_local(spec: str) -> bool:
    path = Path(spec).expanduser()
    if path.exists() or parse_hub_id(spec) is None:
        return True
    # "./x/y", "x/model.safetensors", "runs/out.bin" are paths even when missing.
    from gptcli.checkpoint import PICKLE_SUFFIXES

    return spec.startswith((".", "/", "~")) or path.suffix.lower() in {".safetensors", ".json", *PICKLE_SUFFIXES}


def locate(spec: str, note: Note = _ignore) -> Located:
    """FILE | DIR | HUB_ID[@REVISION] -> the local checkpoint, downloading a Hub checkpoint if needed."""
    from gptcli.checkpoint import HF_CONFIG_FILE, checkpoint_file

    spec = str(spec).strip()
    if not spec:
        raise UserError("--weights: empty value; pass auto, random, a .safetensors file, a folder or a Hub id")
    if _looks_local(spec):
        path = Path(spec).expanduser()
        if not path.exists() and "/" not in spec and not path.suffix:
            raise UserError(f"{spec}: no such file or folder (a Hugging Face Hub id has the form owner/name, "
                            "e.g. openai-community/gpt2)")
        file = checkpoint_file(path)
        # config.json describes a folder's model.safetensors; for a file, only a sibling model.safetensors.
        config_json = file.parent / HF_CONFIG_FILE
        has_config = config_json.is_file() and (path.is_dir() or file.name == CHECKPOINT_NAME)
        return Located(file, config_json if has_config else None, spec)
    repo, revision = parse_hub_id(spec)  # type: ignore[misc]
    return fetch_checkpoint(repo, revision, note)


def locate_checkpoint(spec: str, note: Note = _ignore) -> Path:
    """FILE | DIR | HUB_ID -> a local .safetensors path, downloading if needed, without loading tensors.

    Raises UserError for a missing path, a pickle, an unknown Hub id or no network with nothing cached.
    """
    return locate(spec, note).path


# --- Loading -------------------------------------------------------------------------------------------


def random_model(cfg: GPTConfig, seed: int) -> "GPTModel":
    """Seeded random init on the CPU, drawing in the book's order (so seed 123 gives the book's numbers)."""
    import torch

    from gptcli.model import GPTModel

    torch.manual_seed(seed)
    with torch.device("cpu"):
        return GPTModel(cfg)


def load_model(
    *,
    size: str | None,
    config: str | Path | None,
    weights: str = "auto",
    device: "torch.device",
    dtype: "torch.dtype",
    seed: int = 123,
    note: Note = _ignore,
) -> LoadedModel:
    """Build the model for ``--size``/``--config`` and fill it from ``weights``.

    Raises UserError for anything the user can fix (bad config, bad checkpoint, unknown device).
    """
    start = time.perf_counter()
    notes: list[str] = []

    def say(message: str) -> None:
        notes.append(message)
        note(message)

    cfg = resolve_config(size, config)
    if weights == "auto":
        # Real checkpoints are not wired in yet: auto means random init, said out loud.
        say(f"using random weights (seed {seed}); pass --weights random to silence this note")
        weights = "random"
    if weights != "random":
        raise UserError(f"--weights {weights!r}: only 'random' and 'auto' are supported so far")
    model = random_model(cfg, seed)
    model = model.to(device=device, dtype=dtype).eval()
    return LoadedModel(
        model=model, cfg=cfg, source=f"random (seed {seed})", device=device, dtype=dtype,
        load_seconds=time.perf_counter() - start, notes=notes,
    )

"""Where a model's weights come from: ``--weights auto|random|FILE|DIR|HUB_ID``.

``load_model`` is the one entry point the commands use. It returns the model ready for inference
(eval mode, on the device, in the dtype) and reports notes through a callback instead of printing.
``locate`` turns FILE|DIR|HUB_ID into a local .safetensors path without loading tensors.

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

    from gptcli.checkpoint import Header, TensorInfo
    from gptcli.kernels.decode import DecodePlan
    from gptcli.model.gpt import GPTModel
    from gptcli.tokenizer import Tokenizer

Note = Callable[[str], None]

# The releases ``auto`` loads for the shipped GPT-2 sizes.
HUB_IDS: dict[str, str] = {
    "124M": "openai-community/gpt2",
    "355M": "openai-community/gpt2-medium",
    "774M": "openai-community/gpt2-large",
    "1558M": "openai-community/gpt2-xl",
}
# GPT-2's pre-2023 Hub names, which still redirect to openai-community.
LEGACY_HUB_IDS: dict[str, str] = {repo.split("/")[1]: repo for repo in HUB_IDS.values()}
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
    tokenizer: "Tokenizer | None" = None  # what the checkpoint was trained with (GPT-2's BPE unless it says)


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


def _is_network_error(exc: BaseException) -> bool:
    """Connection refused, DNS failure, timeout: from httpx (huggingface_hub >= 1), requests or the OS."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    module = type(exc).__module__.split(".")[0]
    return module in {"httpx", "httpx2", "httpcore", "requests", "urllib3"} and \
        any(word in type(exc).__name__ for word in ("Connect", "Timeout", "Network", "Proxy"))


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
    if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)) or _is_network_error(exc):
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


def _probe(repo: str, revision: str | None) -> None:
    """Raise what huggingface_hub raises when the Hub cannot serve the repo's checkpoint; fast when offline."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    endpoint = os.environ.get("HF_ENDPOINT") or None
    get_hf_file_metadata(hf_hub_url(repo, CHECKPOINT_NAME, revision=revision, endpoint=endpoint))


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
        try:
            # One HEAD request without retries: huggingface_hub retries a failing download of an uncached
            # file for about 20 s, a long silence when the machine is simply offline.
            _probe(repo, revision)
        except Exception as exc:  # noqa: BLE001 - mapped to one clear sentence
            raise _hub_error(exc, repo, revision) from None
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
    if spec in LEGACY_HUB_IDS and not Path(spec).exists():
        return fetch_checkpoint(LEGACY_HUB_IDS[spec], None, note)
    if _looks_local(spec):
        from gptcli.checkpoint import PICKLE_SUFFIXES

        path = Path(spec).expanduser()
        if not path.exists() and path.suffix.lower() not in PICKLE_SUFFIXES:  # a pickle is refused, there or not
            raise UserError(_missing_local(spec))
        file = checkpoint_file(path)
        # config.json describes a folder's model.safetensors; for a file, only a sibling model.safetensors.
        config_json = file.parent / HF_CONFIG_FILE
        has_config = config_json.is_file() and (path.is_dir() or file.name == CHECKPOINT_NAME)
        return Located(file, config_json if has_config else None, spec)
    repo, revision = parse_hub_id(spec)  # type: ignore[misc]
    try:
        return fetch_checkpoint(repo, revision, note)
    except HubUnavailable as exc:
        # owner/name is also how a relative folder looks (runs/x): say that neither was found.
        raise HubUnavailable(f"{spec}: no such local file or folder; as a Hugging Face Hub id, {exc}",
                             exc.reason) from None


def _missing_local(spec: str) -> str:
    """The error for a path that is not there, naming it as typed (``./my-gpt2``, not ``my-gpt2``)."""
    if spec.endswith(("/", "\\")):
        return f"{spec}: no such folder"
    if Path(spec).suffix.lower() == ".safetensors":
        return f"{spec}: no such file"
    if "/" not in spec and not spec.startswith((".", "~")):
        return (f"{spec}: no such file or folder, and not a Hugging Face Hub id (those have the form owner/name, "
                "e.g. openai-community/gpt2)")
    return f"{spec}: no such file or folder"


# --- Loading -------------------------------------------------------------------------------------------


def random_model(cfg: GPTConfig, seed: int) -> "GPTModel":
    """Seeded random init on the CPU, drawing in the book's order (so seed 123 gives the book's numbers),
    with the row-invariant CPU linear for inference (``gptcli.kernels.onednn.use_for_inference``), as loaded ones."""
    import torch

    from gptcli.model.gpt import GPTModel
    from gptcli.kernels.onednn import use_for_inference

    torch.manual_seed(seed)
    with torch.device("cpu"):
        return use_for_inference(GPTModel(cfg))


def check_vocab(cfg: GPTConfig, where: str, tokenizer: "Tokenizer | None" = None) -> None:
    """vocab_size must equal the tokenizer's size: a model with another vocabulary would emit ids it cannot decode."""
    from gptcli.tokenizer import gpt2

    tokenizer = tokenizer or gpt2()
    if cfg.vocab_size != tokenizer.vocab_size:
        what = "GPT-2's tokenizer" if tokenizer.name == "gpt2" else f"its {tokenizer.name} tokenizer"
        raise UserError(f"{where}: vocab_size {cfg.vocab_size} does not match {what} ({tokenizer.vocab_size} tokens)")


def checkpoint_config(header: "Header", wanted: GPTConfig | None = None, config_json: Path | None = None,
                      name: str | None = None, note: Note = _ignore) -> GPTConfig:
    """The config to build for a checkpoint: ``wanted`` (--size/--config) when given, checked against
    the checkpoint; else from config.json, gptcli's metadata or the tensor shapes. Then the tensors are
    verified against it. Raises UserError naming what disagrees.
    """
    from gptcli.checkpoint import (
        checkpoint_facts,
        config_differences,
        detect_layout,
        head_name,
        implied_config,
        non_float_tensors,
        normalized_names,
        read_json_file,
        verify,
    )

    try:
        detect_layout(header.tensors)
    except UserError as exc:
        raise UserError(f"{header.path}: {exc}") from None
    hf_config = read_json_file(config_json) if config_json is not None else None
    facts, where = checkpoint_facts(header, hf_config, str(config_json) if config_json else "config.json")
    where_said = f"{header.path}" if where == "tensor shapes" else f"{header.path} (architecture from {where})"
    if wanted is not None:
        diffs = config_differences(wanted, facts)
        if diffs:
            raise UserError(f"{where_said} does not match config {wanted.name!r}: {', '.join(diffs)}")
        cfg = wanted
    else:
        cfg = implied_config(header, config_json, name=name)
    from gptcli.tokenizer import from_metadata

    check_vocab(cfg, where_said, from_metadata(header.metadata, str(header.path)))
    verdict = verify(header, cfg)
    head = head_name(verdict.layout)
    if cfg.tie_weights and verdict.unexpected == [head] and \
            normalized_names(header, verdict.layout)[head].shape == (cfg.vocab_size, cfg.emb_dim):
        # A copy of the head in a checkpoint whose config ties it: transformers ties it to wte too.
        note(f"ignoring {head} in {header.path.name}: the config ties the output head to the token embedding")
        verdict.unexpected = []
    if not verdict.ok:
        raise UserError(f"{header.path} does not fit config {cfg.name!r}: {verdict.summary()}")
    bad = non_float_tensors(header)
    if bad:
        raise UserError(f"{header.path}: weights must be floating point (F32, F16, BF16); got "
                        f"{', '.join(bad[:3])}{' and more' if len(bad) > 3 else ''}")
    return cfg


def _open_for_reading(path: Path):
    """safe_open reading each tensor with pread(2) into its own buffer.

    With mmap, a tensor we convert (transpose, cast) would leave its file pages resident next to the
    copy, up to twice the weights' size at peak; pread keeps one tensor's worth of overhead.
    Older safetensors have no ``backend``: mmap it is.
    """
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu", backend="pread")
    except TypeError:
        return safe_open(str(path), framework="pt", device="cpu")


class MappedFile:
    """A safetensors file mapped into memory (copy-on-write, read lazily): tensors are views of it.

    For inference in the file's own dtype nothing is copied at load: a Hugging Face Conv1D weight,
    stored (in, out), becomes the (out, in) transposed view nn.Linear expects, which BLAS reads as
    it is (gptcli.kernels.decode' ``blas``). A kernel that copies a weight into its own layout calls
    ``release`` on the view, which gives its pages back (madvise), so memory holds one copy.
    """

    def __init__(self, path: Path, data_start: int):
        import torch

        self.path = path
        self.data_start = data_start
        self.bytes = torch.from_file(str(path), shared=False, size=path.stat().st_size, dtype=torch.uint8)

    def tensor(self, info: "TensorInfo", dtype: "torch.dtype") -> "torch.Tensor | None":
        """The tensor as a view of the mapping; None when it is stored in another dtype or at an
        offset that does not suit its dtype (the caller then reads a copy)."""
        import torch

        stored = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(info.dtype)
        begin, end = (self.data_start + o for o in info.offsets)
        if stored != dtype or begin % dtype.itemsize:
            return None
        return self.bytes[begin:end].view(dtype).view(info.shape)

    def release(self, tensor: "torch.Tensor") -> None:
        """Drop the resident pages under ``tensor`` (a view of this mapping); later reads fault them in again."""
        base = self.bytes.data_ptr()
        start = tensor.data_ptr()
        if not base <= start < base + self.bytes.numel():
            return
        _madvise_dontneed(start, tensor.numel() * tensor.element_size())


def _madvise_dontneed(address: int, length: int) -> None:
    import ctypes
    import mmap

    from gptcli.devices import libc

    page = mmap.PAGESIZE
    first = -(-address // page) * page  # whole pages inside the range only: neighbours may still be in use
    last = (address + length) // page * page
    c = libc()
    if last > first and c is not None:  # no glibc (not Linux): the pages just stay
        c.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED


def _place(tensor: "torch.Tensor", transpose: bool, device: "torch.device", dtype: "torch.dtype",
           keep_layout: bool = False) -> "torch.Tensor":
    """The tensor as the model wants it: transposed to (out, in), in ``dtype``, on ``device``, in one copy
    at most; with ``keep_layout`` a transposed view when nothing else needs changing (no copy)."""
    import torch

    if transpose and keep_layout and tensor.dtype == dtype and device.type == "cpu":
        return tensor.t()
    if transpose:
        tensor = tensor.t()
    elif tensor.dtype == dtype and device.type == "cpu":
        return tensor  # a fresh buffer already (pread): use it as is
    out = torch.empty(tensor.shape, dtype=dtype, device=device)
    out.copy_(tensor)
    return out


def load_checkpoint(
    path: str | Path,
    cfg: GPTConfig | None = None,
    *,
    device: "torch.device | str" = "cpu",
    dtype: "torch.dtype | None" = None,
    config_json: str | Path | None = None,
    name: str | None = None,
    note: Note = _ignore,
    mapped: bool = False,
    header: "Header | None" = None,
) -> "GPTModel":
    """A GPTModel (eval mode) filled from a .safetensors file in the Hugging Face or gptcli layout.

    ``header``: the file's header when the caller has read it already (it is read once per load).

    ``cfg`` is checked against the checkpoint; without it the architecture comes from ``config_json``,
    the file's metadata or its shapes. The model is built on the meta device and each tensor is read,
    converted and assigned once, so memory peaks at the weights plus one tensor. Raises UserError.

    ``mapped`` (inference on the CPU): tensors already in ``dtype`` are views of the memory-mapped
    file (``MappedFile``), Conv1D weights kept in the file's (in, out) orientation; nothing is read
    until used. The model's ``mapped_file`` attribute is then the mapping.
    """
    import torch

    from gptcli.checkpoint import (
        detect_layout,
        expected_tensors,
        gptcli_name,
        normalized_names,
        optional_tensors,
        read_header,
    )
    from gptcli.model.gpt import build_model

    device = torch.device(device)
    dtype = dtype or torch.float32
    header = header or read_header(path)
    cfg = checkpoint_config(header, cfg, Path(config_json) if config_json else None, name=name, note=note)
    layout = detect_layout(header.tensors)
    wanted = expected_tensors(cfg, layout)
    present = normalized_names(header, layout)
    tensors = {n: info for n, info in present.items() if n in wanted}
    zero_biases = [info for n, info in present.items() if n in optional_tensors(cfg, layout)]
    state: dict[str, torch.Tensor] = {}
    mapping = MappedFile(header.path, header.data_offset) if mapped and device.type == "cpu" else None
    try:
        with _open_for_reading(header.path) as f:
            for stored, info in sorted(tensors.items(), key=lambda item: item[1].offsets[0]):  # file order
                ours, transpose = gptcli_name(stored, layout)
                view = mapping.tensor(info, dtype) if mapping is not None else None
                if view is not None:
                    state[ours] = _place(view, transpose, device, dtype, keep_layout=True)
                else:
                    state[ours] = _place(f.get_tensor(info.name), transpose, device, dtype)
            for info in zero_biases:  # a bias-free model's export: dropping them must not change the maths
                if bool(f.get_tensor(info.name).any()):
                    raise UserError(f"{header.path}: config {cfg.name!r} has no {info.name} but the checkpoint's "
                                    "is not zero; load it with a config that has biases")
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors' own checks (overlapping offsets, bad header, I/O)
        raise UserError(f"{header.path}: corrupt or unreadable safetensors file: {_first_line(exc)}") from None
    if cfg.tie_weights:
        state["out_head.weight"] = state["tok_emb.weight"]
    model = build_model(cfg, "meta")
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign replaced tok_emb's tensor; point the head at the new one
    model.mapped_file = mapping
    return model.eval()


def checkpoint_tokenizer(path: str | Path) -> "Tokenizer":
    """The tokenizer a checkpoint records in its metadata; GPT-2's BPE when it records none."""
    from gptcli.checkpoint import read_header
    from gptcli.tokenizer import from_metadata

    header = read_header(path)
    return from_metadata(header.metadata, str(header.path))


def tokenizer_for_weights(spec: str | None) -> "Tokenizer":
    """The tokenizer ``--weights SPEC`` speaks, from the safetensors header only (no torch, no tensors).

    ``auto``/``random`` and a Hub id that is not cached speak GPT-2's BPE (every release does);
    nothing is downloaded just to learn that. A local file or folder, or a cached Hub checkpoint,
    says in its metadata (a character model, ``gptcli train --tokenizer char``).
    """
    from gptcli.tokenizer import gpt2

    spec = (spec or "auto").strip()
    if spec.lower() in {"auto", "random"}:
        return gpt2()
    if spec in LEGACY_HUB_IDS and not Path(spec).exists():
        spec = LEGACY_HUB_IDS[spec]
    elif _looks_local(spec):
        return checkpoint_tokenizer(locate(spec).path)
    hub = parse_hub_id(spec)
    cached = cached_checkpoint(*hub) if hub is not None else None
    return checkpoint_tokenizer(cached.path) if cached is not None else gpt2()


def no_released_weights(repo: str, size: str, reason: str) -> UserError:
    """``--weights auto`` for a released size with nothing cached and no download possible.

    Not random weights with a note: a new user reads an untrained model's output as a broken tool.
    """
    if reason == "HF_HUB_OFFLINE is set":
        fix = "unset HF_HUB_OFFLINE on a machine with network access and run again (gptcli downloads it once)"
    else:
        fix = "run again with network access (gptcli downloads it once)"
    return UserError(
        f"no GPT-2 {size} weights: {repo} is not in the Hugging Face cache ({hub_cache_dir()}) and {reason}. "
        f"For OpenAI's weights, {fix}, or pass --weights PATH (a .safetensors file or a folder). "
        "--weights random runs the untrained model on purpose (its output is noise); "
        "or train a small model in about a minute: gptcli train --recipe shakespeare-char --out runs/x (it "
        "downloads Tiny Shakespeare, 1.1 MB, once; or give any text file first), then --weights runs/x"
    )


def load_model(
    *,
    size: str | None,
    config: str | Path | None,
    weights: str = "auto",
    device: "torch.device",
    dtype: "torch.dtype",
    seed: int = 123,
    note: Note = _ignore,
    mapped: bool = False,
) -> LoadedModel:
    """Build the model for ``--size``/``--config`` and fill it from ``weights``.

    ``weights``: ``random`` (seeded init), ``auto`` (the released checkpoint of a shipped GPT-2 size:
    cached, else downloaded, else a UserError before any model is built, ``no_released_weights``;
    random with a note for a config that has no release), a .safetensors
    file, a folder holding model.safetensors (and maybe config.json), or a Hub id. With a checkpoint
    and no --size/--config the architecture comes from the checkpoint; with both they must agree.
    Raises UserError for anything the user can fix (bad config, bad checkpoint, unknown device).
    ``mapped``: for inference, memory-map the checkpoint instead of reading it (``load_checkpoint``).
    """
    import torch

    start = time.perf_counter()
    notes: list[str] = []

    def say(message: str) -> None:
        notes.append(message)
        note(message)

    spec = (weights or "auto").strip()
    located: Located | None = None
    wanted: GPTConfig | None = None
    if spec.lower() in {"auto", "random"}:
        cfg = resolve_config(size, config)
        check_vocab(cfg, str(config) if config is not None else f"config {cfg.name!r}")
        repo = HUB_IDS.get(cfg.name) if config is None else None
        if spec.lower() == "auto" and repo is None:
            say(f"no released weights for config {cfg.name!r}: using untrained random weights (seed {seed}), "
                "so the output is noise; pass --weights FILE|DIR|HUB_ID for trained ones, or --weights random "
                "to silence this note")
        elif spec.lower() == "auto":
            # Cache first without touching the network: GPT-2's releases do not change.
            located = cached_checkpoint(repo)
            if located is None:
                try:
                    located = fetch_checkpoint(repo, note=say)
                except HubUnavailable as exc:
                    raise no_released_weights(repo, cfg.name, exc.reason) from None
            wanted = cfg
    else:
        located = locate(spec, say)
        wanted = resolve_config(size, config) if (size is not None or config is not None) else None

    from gptcli.tokenizer import from_metadata, gpt2

    device = torch.device(device)
    if located is None:
        model = random_model(cfg, seed).to(device=device, dtype=dtype).eval()
        source, checkpoint, tokenizer = f"random (seed {seed})", None, gpt2()
    else:
        from gptcli.checkpoint import read_header

        from gptcli.adapters import file_kind

        header = read_header(located.path)
        if file_kind(header.metadata) is not None:  # a --lora run: its base with the adapters merged in
            model = load_adapted(located.path, device=device, dtype=dtype, note=say)
        else:
            model = load_checkpoint(located.path, wanted, device=device, dtype=dtype,
                                    config_json=located.config_json, name=located.hub_id or None, note=say,
                                    mapped=mapped, header=header)
        cfg, source, checkpoint = model.cfg, located.source, located.path
        tokenizer = from_metadata(header.metadata, str(header.path))
    from gptcli.kernels.onednn import use_for_inference

    use_for_inference(model)  # the row-invariant CPU linear; training swaps in its own kernels over it
    return LoadedModel(
        model=model, cfg=cfg, source=source, device=device, dtype=dtype,
        load_seconds=time.perf_counter() - start, notes=notes, checkpoint=checkpoint, tokenizer=tokenizer,
    )


def load_base(base: dict, note: Note = _ignore) -> "GPTModel":
    """The base weights a LoRA run recorded (``gptcli.adapters.base_record``), on the CPU in float32:
    random weights rebuilt from their config and seed, else the Hub id or path it started from."""
    import torch

    from gptcli.checkpoint import ARCH_KEYS
    from gptcli.config import validate

    raw = dict(base.get("config") or {})
    cfg = validate({k: v for k, v in raw.items() if k != "name"}, "the adapters' base config",
                   name=raw.get("name", "custom"))
    if base.get("weights") == "random":
        return random_model(cfg, int(base.get("seed", 123)))
    try:
        loaded = load_model(size=None, config=None, weights=str(base["weights"]), device=torch.device("cpu"),
                            dtype=torch.float32, note=note)
    except UserError as exc:
        raise UserError(f"cannot load the base weights these adapters were trained on, {base['weights']}: "
                        f"{exc}") from None
    differ = [k for k in ARCH_KEYS if getattr(loaded.cfg, k) != getattr(cfg, k)]
    if differ:
        raise UserError(f"the base weights {base['weights']} are not the model these adapters were trained on "
                        f"({', '.join(differ)} differ)")
    return loaded.model


def load_adapted(path: Path, *, device: "torch.device", dtype: "torch.dtype", note: Note = _ignore) -> "GPTModel":
    """A ``--lora`` run's language model: its base weights with the adapters merged in
    (W + alpha * (A @ B)^T), so every kernel and option works on it as on any checkpoint."""
    from gptcli.adapters import attach_adapters, read_weights_file
    from gptcli.model.lora import merge_lora

    found = read_weights_file(path)
    if found.classifier is not None:
        run = path.parent if path.parent.name else path
        raise UserError(f"{path} is a text classifier ({', '.join(found.classifier.labels)}), not a language model; "
                        f"use gptcli classify --weights {run}")
    model = load_base(found.base or {}, note)
    attach_adapters(model, found)
    return merge_lora(model).to(device=device, dtype=dtype).eval()

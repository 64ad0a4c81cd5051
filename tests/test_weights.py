"""``--weights``: resolving FILE|DIR|HUB_ID|auto|random, loading checkpoints, and every way a checkpoint can be bad.

Correctness of the Hugging Face mapping is proven against transformers in test_hf_oracle.py; here
HF-layout files come from a small converter, and the tests are about behaviour and errors.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptcli import checkpoint as ckpt
from helpers import locate_checkpoint, network_tests_enabled, save_checkpoint
from gptcli.config import load_config_file, shipped_config
from gptcli.errors import UserError
from gptcli.weights import (
    HUB_IDS,
    hub_cache_dir,
    load_checkpoint,
    load_model,
    locate,
    random_model,
)

CPU = torch.device("cpu")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def tiny_cfg(tiny_config_file):
    def make(**overrides):
        values = dict(context_length=32, emb_dim=64, n_heads=4, n_layers=2)
        values.update(overrides)
        return load_config_file(tiny_config_file(**values))

    return make


def tiny_model(cfg, seed=0):
    model = random_model(cfg, seed).eval()
    with torch.no_grad():  # make norms and biases non-trivial, so a mix-up would show
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_state(model, prefix: str = "") -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face GPT-2 names (Conv1D weights stored (in, out))."""
    cfg = model.cfg
    ours = model.state_dict()
    out = {}
    for name in ckpt.expected_tensors(cfg, ckpt.HF):
        target, transpose = ckpt.gptcli_name(name, ckpt.HF)
        t = ours[target]
        out[prefix + name] = (t.t() if transpose else t).contiguous().clone()
    return out


def save_hf(model, folder: Path, prefix: str = "", config_json: bool = True, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = hf_state(model, prefix)
    state.update(extra or {})
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if config_json:
        cfg = model.cfg
        (folder / "config.json").write_text(json.dumps({
            "model_type": "gpt2", "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length,
            "n_embd": cfg.emb_dim, "n_head": cfg.n_heads, "n_layer": cfg.n_layers,
            "tie_word_embeddings": cfg.tie_weights, "activation_function": "gelu_new",
        }))
    return folder


def logits(model, ids=None):
    ids = torch.arange(10).unsqueeze(0) * 97 if ids is None else ids
    with torch.no_grad():
        return model(ids)


def load(weights, size=None, config=None, dtype=torch.float32, notes=None):
    return load_model(size=size, config=config, weights=str(weights), device=CPU, dtype=dtype,
                      note=(notes.append if notes is not None else (lambda _: None)))


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def populate_hub_cache(repo: str, files: dict[str, Path]) -> Path:
    """Lay files out the way huggingface_hub caches them: blobs, a snapshot of symlinks, refs/main."""
    folder = hub_cache_dir() / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (folder / "blobs").mkdir()
    for name, src in files.items():
        blob = folder / "blobs" / f"blob-{name}"
        shutil.copy(src, blob)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    return snapshot


# --- our own layout ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie,qkv_bias", [(True, True), (False, False)])
def test_save_and_load_round_trip(tmp_path, tiny_cfg, tie, qkv_bias):
    model = tiny_model(tiny_cfg(tie_weights=tie, qkv_bias=qkv_bias))
    path = save_checkpoint(model, tmp_path / "ckpt")
    assert path == tmp_path / "ckpt" / "model.safetensors"
    header = ckpt.read_header(path)
    assert ("out_head.weight" in header.tensors) is not tie  # a tied head is stored once
    loaded = load(tmp_path / "ckpt")  # no --config: the header's metadata has n_heads
    assert loaded.cfg.to_dict() == model.cfg.to_dict() and loaded.cfg.name == "ckpt"
    assert loaded.source == str(tmp_path / "ckpt") and loaded.checkpoint == path and loaded.notes == []
    assert not loaded.model.training
    assert (loaded.model.out_head.weight is loaded.model.tok_emb.weight) is tie
    torch.testing.assert_close(logits(loaded.model), logits(model), rtol=0, atol=0)


def test_loaded_parameters_are_plain_contiguous_cpu_tensors(tmp_path, tiny_cfg):
    save_hf(tiny_model(tiny_cfg()), tmp_path / "hf")
    model = load(tmp_path / "hf").model
    for name, p in model.named_parameters():
        assert p.device == CPU and p.dtype == torch.float32 and p.is_contiguous(), name
        assert isinstance(p, torch.nn.Parameter)


def test_mapped_load_keeps_the_conv1d_orientation_without_copies_and_gives_the_same_logits(tmp_path, tiny_cfg):
    """For inference (``mapped``) a Conv1D weight is a transposed view of the mapped file: nothing is
    copied or transposed at load, and the kernels read (in, out) as it is."""
    from gptcli.kernels.prepare import prepare_model

    model = tiny_model(tiny_cfg())
    save_hf(model, tmp_path / "hf")
    mapped = load_model(size=None, config=None, weights=str(tmp_path / "hf"), device=CPU, dtype=torch.float32,
                        mapped=True).model
    mapping = mapped.mapped_file
    base, end = mapping.bytes.data_ptr(), mapping.bytes.data_ptr() + mapping.bytes.numel()
    w = mapped.trf_blocks[0].ff.layers[0].weight
    assert not w.is_contiguous() and w.t().is_contiguous()  # (out, in) seen through the file's (in, out)
    assert all(base <= p.data_ptr() < end for p in mapped.parameters())  # every tensor is the file's
    torch.testing.assert_close(logits(mapped), logits(model), rtol=1e-6, atol=1e-6)
    # The kernels that copy give the mapped pages back; the model still computes the same.
    prepared = prepare_model(mapped, CPU, torch.float32, kernels="eager")
    assert sum(prepared.counts.values()) == 2 * 4 + 1
    torch.testing.assert_close(logits(mapped), logits(model), rtol=1e-5, atol=1e-5)
    # In another dtype each tensor is read and converted: no mapping.
    bf16 = load_model(size=None, config=None, weights=str(tmp_path / "hf"), device=CPU, dtype=torch.bfloat16,
                      mapped=True).model
    assert all(not (base <= p.data_ptr() < end) for p in bf16.parameters())


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantizing_a_mapped_checkpoint_reads_float32_layer_by_layer(tmp_path, tiny_cfg, scheme):
    """--quantize loads float32 memory-mapped and gives each layer's pages back once it is quantized:
    the same layers as quantizing the model in memory, the rest in the activation dtype."""
    import copy

    from gptcli.kernels.prepare import prepare_model

    model = tiny_model(tiny_cfg(tie_weights=True))
    save_hf(model, tmp_path / "hf")
    mapped = load_model(size=None, config=None, weights=str(tmp_path / "hf"), device=CPU, dtype=torch.float32,
                        mapped=True).model
    released = []
    mapping = mapped.mapped_file
    give_back = mapping.release
    mapping.release = lambda t: (released.append(tuple(t.shape)), give_back(t))
    prepare_model(mapped, CPU, torch.bfloat16, quantize=scheme)
    in_memory = prepare_model(copy.deepcopy(model), CPU, torch.bfloat16, quantize=scheme).model
    assert len(released) == 2 * 4 + 1  # every block's Linear weight (not the tied head's embedding), then the file
    assert {p.dtype for p in mapped.parameters()} == {torch.bfloat16}
    ids = torch.arange(10).unsqueeze(0) * 97
    with torch.inference_mode():
        assert torch.equal(mapped(ids), in_memory(ids))


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("wanted", [torch.float32, torch.bfloat16])
def test_half_precision_checkpoints_load_and_cast(tmp_path, tiny_cfg, stored, wanted):
    model = tiny_model(tiny_cfg()).to(stored)
    save_hf(model, tmp_path / "hf")
    loaded = load(tmp_path / "hf", dtype=wanted).model
    assert {p.dtype for p in loaded.parameters()} == {wanted}
    expected = model.trf_blocks[1].ff.layers[0].weight.to(wanted)
    torch.testing.assert_close(loaded.trf_blocks[1].ff.layers[0].weight, expected, rtol=0, atol=0)


def test_a_file_path_works_and_a_sibling_config_json_is_read_only_for_model_safetensors(tmp_path, tiny_cfg):
    model = tiny_model(tiny_cfg())
    save_hf(model, tmp_path / "hf")
    assert load(tmp_path / "hf" / "model.safetensors").cfg.n_heads == 4  # from config.json
    shutil.copy(tmp_path / "hf" / "model.safetensors", tmp_path / "hf" / "other.safetensors")
    with pytest.raises(UserError, match="cannot tell n_heads"):
        load(tmp_path / "hf" / "other.safetensors")


# --- architecture: config.json, shapes, and --size/--config agreeing ------------------------------------


def test_without_config_json_a_non_gpt2_width_needs_config(tmp_path, tiny_cfg, tiny_config_file):
    model = tiny_model(tiny_cfg())
    save_hf(model, tmp_path / "hf", config_json=False)
    with pytest.raises(UserError) as excinfo:
        load(tmp_path / "hf")
    message = one_line_error(excinfo)
    assert "n_heads" in message and "emb_dim 64" in message and "--config" in message
    config = tiny_config_file(context_length=32, emb_dim=64, n_heads=4, n_layers=2)
    loaded = load(tmp_path / "hf", config=config)
    torch.testing.assert_close(logits(loaded.model), logits(model), rtol=0, atol=0)


def test_size_and_checkpoint_must_agree(tmp_path, tiny_cfg, tiny_config_file):
    save_hf(tiny_model(tiny_cfg()), tmp_path / "hf")
    with pytest.raises(UserError) as excinfo:
        load(tmp_path / "hf", size="124M")
    message = one_line_error(excinfo)
    assert "does not match config '124M'" in message
    assert "context_length (config 1024, checkpoint 32)" in message and "emb_dim (config 768, checkpoint 64)" in message
    other = tiny_config_file(context_length=32, emb_dim=64, n_heads=8, n_layers=2, tie_weights=False)
    with pytest.raises(UserError, match=r"n_heads \(config 8, checkpoint 4\), tie_weights \(config False"):
        load(tmp_path / "hf", config=other)


def test_gpt2_width_without_config_json_gets_n_heads_from_the_released_sizes(tmp_path):
    """Shapes alone: emb_dim 768 means 12 heads (GPT-2 small). A sparse all-zero file keeps this cheap."""
    from test_checkpoint import hf_tensors, write_sparse

    cfg = shipped_config("124M")
    (tmp_path / "z").mkdir()
    write_sparse(tmp_path / "z" / "model.safetensors", hf_tensors(cfg, dtype="BF16", masks=True))
    loaded = load(tmp_path / "z", dtype=torch.bfloat16)
    assert loaded.cfg.name == "124M" and loaded.cfg.to_dict() == cfg.to_dict()


# --- bad checkpoints ----------------------------------------------------------------------------------------


def test_missing_tensor(tmp_path, tiny_cfg):
    save_hf(tiny_model(tiny_cfg()), tmp_path / "hf")
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "hf" / "model.safetensors")
    del state["h.1.attn.c_proj.weight"], state["ln_f.bias"]
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(UserError) as excinfo:
        load(tmp_path / "hf")
    assert "missing 2 tensor(s): h.1.attn.c_proj.weight, ln_f.bias" in one_line_error(excinfo)


def test_unexpected_tensors_are_named_a_few_at_a_time(tmp_path, tiny_cfg):
    extra = {f"h.0.adapter.{i}": torch.zeros(2) for i in range(5)}
    save_hf(tiny_model(tiny_cfg()), tmp_path / "hf", extra=extra)
    with pytest.raises(UserError) as excinfo:
        load(tmp_path / "hf")
    message = one_line_error(excinfo)
    assert "unexpected 5 tensor(s): h.0.adapter.0, h.0.adapter.1, h.0.adapter.2 and 2 more" in message


def test_shape_mismatch_between_config_json_and_tensors(tmp_path, tiny_cfg):
    save_hf(tiny_model(tiny_cfg()), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "n_positions": 64}))
    with pytest.raises(UserError) as excinfo:
        load(tmp_path / "hf")
    assert "wpe.weight: checkpoint [32, 64] vs config [64, 64]" in one_line_error(excinfo)


def test_vocab_size_must_be_the_tokenizers(tmp_path, tiny_cfg):
    save_hf(tiny_model(tiny_cfg(vocab_size=1000)), tmp_path / "hf")
    with pytest.raises(UserError) as excinfo:
        load(tmp_path / "hf")
    assert "vocab_size 1000 does not match GPT-2's tokenizer (50257 tokens)" in one_line_error(excinfo)


def test_truncated_file(tmp_path, tiny_cfg):
    path = save_checkpoint(tiny_model(tiny_cfg()), tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as excinfo:
        load(path)
    assert "truncated file" in one_line_error(excinfo)


@pytest.mark.parametrize("content", [b"", b"hello world, not a checkpoint", os.urandom(4096)])
def test_not_a_safetensors_file(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(UserError) as excinfo:
        load(path)
    assert "not a safetensors file" in one_line_error(excinfo)


def test_overlapping_offsets_are_reported_as_corrupt(tmp_path, tiny_cfg):
    """A header our reader accepts but safetensors refuses (tensors sharing bytes)."""
    path = save_checkpoint(tiny_model(tiny_cfg()), tmp_path / "m.safetensors")
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["final_norm.shift"]["data_offsets"] = header["final_norm.scale"]["data_offsets"]
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    with pytest.raises(UserError) as excinfo:
        load(path)
    assert "corrupt or unreadable safetensors file" in one_line_error(excinfo)


def test_integer_weights_are_refused(tmp_path, tiny_cfg):
    model = tiny_model(tiny_cfg())
    save_hf(model, tmp_path / "hf")
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "hf" / "model.safetensors")
    state["h.0.mlp.c_fc.weight"] = state["h.0.mlp.c_fc.weight"].to(torch.int8)
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(UserError, match=r"floating point .*h\.0\.mlp\.c_fc\.weight \(I8\)"):
        load(tmp_path / "hf")


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["GPTCLI_PICKLE_MARKER"]),))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pth"])
def test_pickles_are_refused_and_never_unpickled(tmp_path, monkeypatch, name):
    marker = tmp_path / "unpickled"
    monkeypatch.setenv("GPTCLI_PICKLE_MARKER", str(marker))
    (tmp_path / "dir").mkdir()
    for path in (tmp_path / name, tmp_path / "dir" / name):
        path.write_bytes(pickle.dumps(_Boom()))
    for target in (tmp_path / name, tmp_path / "dir"):
        with pytest.raises(UserError) as excinfo:
            load(target)
        assert "safetensors" in one_line_error(excinfo) and "arbitrary code" in str(excinfo.value)
    assert not marker.exists()


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="nope.safetensors: no such file$"):
        load(tmp_path / "nope.safetensors")
    with pytest.raises(UserError, match=r"gpt3: no such file or folder, and not a Hugging Face Hub id \(those"):
        load("gpt3")


def test_legacy_gpt2_names_mean_the_openai_community_releases(tmp_path, tiny_cfg):
    path = save_checkpoint(tiny_model(tiny_cfg()), tmp_path / "c")
    snapshot = populate_hub_cache("openai-community/gpt2-medium", {"model.safetensors": path})
    located = locate("gpt2-medium")
    assert located.path == snapshot / "model.safetensors" and located.source == "openai-community/gpt2-medium"
    with pytest.raises(UserError, match="openai-community/gpt2 is not in the Hugging Face cache"):
        locate("gpt2")


def test_tied_config_ignores_a_stored_copy_of_the_head(tmp_path, tiny_cfg):
    model = tiny_model(tiny_cfg(tie_weights=True))
    save_hf(model, tmp_path / "hf", extra={"lm_head.weight": model.tok_emb.weight.detach().clone()})
    notes: list[str] = []
    loaded = load(tmp_path / "hf", notes=notes)
    assert loaded.model.out_head.weight is loaded.model.tok_emb.weight
    assert notes == ["ignoring lm_head.weight in model.safetensors: the config ties the output head to the token embedding"]


# --- Hub ids and the cache ------------------------------------------------------------------------------


def test_hub_id_from_a_prepopulated_cache_offline(tmp_path, tiny_cfg):
    model = tiny_model(tiny_cfg(tie_weights=False))
    save_hf(model, tmp_path / "hf", prefix="transformer.")
    snapshot = populate_hub_cache("someone/tiny-gpt2", {
        "model.safetensors": tmp_path / "hf" / "model.safetensors", "config.json": tmp_path / "hf" / "config.json"})
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert locate_checkpoint("someone/tiny-gpt2") == snapshot / "model.safetensors"
    located = locate("someone/tiny-gpt2")
    assert located.config_json == snapshot / "config.json" and located.hub_id == "someone/tiny-gpt2"
    loaded = load("someone/tiny-gpt2")
    assert loaded.source == "someone/tiny-gpt2" and loaded.cfg.name == "someone/tiny-gpt2"
    assert loaded.checkpoint == snapshot / "model.safetensors"
    torch.testing.assert_close(logits(loaded.model), logits(model), rtol=0, atol=0)
    assert load(f"someone/tiny-gpt2@{COMMIT}").source == f"someone/tiny-gpt2@{COMMIT}"


def test_hub_id_offline_and_not_cached(tmp_path):
    with pytest.raises(UserError) as excinfo:
        load("someone/not-cached")
    message = one_line_error(excinfo)
    assert message.startswith("someone/not-cached: no such local file or folder; as a Hugging Face Hub id, "
                              "someone/not-cached is not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE is set" in message
    assert str(hub_cache_dir()) in message and str(tmp_path / "hf-home") in message


@pytest.fixture
def unreachable_hub(monkeypatch):
    """Online mode, but the Hub endpoint refuses connections (nothing leaves this machine)."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")


def test_hub_id_unreachable_and_not_cached(unreachable_hub):
    notes: list[str] = []
    with pytest.raises(UserError) as excinfo:
        load("someone/not-cached", notes=notes)
    assert "cannot reach the Hugging Face Hub to download someone/not-cached" in one_line_error(excinfo)
    assert notes == []  # one quick look-up failed, so no "downloading" note (and no 20 s of retries)


def test_hub_id_unreachable_but_cached_uses_the_cache(tmp_path, tiny_cfg, unreachable_hub):
    save_hf(tiny_model(tiny_cfg()), tmp_path / "hf")
    populate_hub_cache("someone/tiny", {"model.safetensors": tmp_path / "hf" / "model.safetensors",
                                        "config.json": tmp_path / "hf" / "config.json"})
    notes: list[str] = []
    assert load("someone/tiny", notes=notes).source == "someone/tiny" and notes == []


# --- auto and random ----------------------------------------------------------------------------------------


def test_auto_offline_with_nothing_cached_is_an_error_before_any_model_is_built(monkeypatch):
    import gptcli.weights as weights_module

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(weights_module, "random_model", no_model)
    monkeypatch.setattr(weights_module, "load_checkpoint", no_model)
    notes: list[str] = []
    with pytest.raises(UserError) as excinfo:
        load("auto", size="xl", notes=notes)
    message = one_line_error(excinfo)
    assert message.startswith("no GPT-2 1558M weights: openai-community/gpt2-xl is not in the Hugging Face cache (")
    assert "and HF_HUB_OFFLINE is set" in message and "unset HF_HUB_OFFLINE" in message
    for hint in ("--weights PATH", "--weights random runs the untrained model on purpose",
                 "gptcli train --recipe shakespeare-char --out runs/x (it downloads Tiny Shakespeare", "--weights runs/x"):
        assert hint in message
    assert notes == []


def test_auto_unreachable_is_an_error_that_says_so(unreachable_hub):
    with pytest.raises(UserError) as excinfo:
        load("auto", size="small")
    message = one_line_error(excinfo)
    assert message.startswith("no GPT-2 124M weights: openai-community/gpt2 is not in the Hugging Face cache")
    assert "the Hugging Face Hub cannot be reached" in message and "run again with network access" in message
    assert "HF_HUB_OFFLINE is set" not in message


def test_auto_uses_the_cached_release_without_the_network(tmp_path):
    """A 124M-shaped (all-zero, sparse) checkpoint in the cache under openai-community/gpt2."""
    from test_checkpoint import hf_tensors, write_sparse

    cfg = shipped_config("124M")
    write_sparse(tmp_path / "model.safetensors", hf_tensors(cfg, dtype="BF16", masks=True), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024,
                                                      "n_embd": 768, "n_head": 12, "n_layer": 12}))
    populate_hub_cache(HUB_IDS["124M"], {"model.safetensors": tmp_path / "model.safetensors",
                                         "config.json": tmp_path / "config.json"})
    notes: list[str] = []
    loaded = load("auto", notes=notes, dtype=torch.bfloat16)  # no --size: 124M
    assert loaded.source == "openai-community/gpt2" and notes == [] and loaded.cfg.name == "124M"
    assert not loaded.model.tok_emb.weight.any()


def test_auto_for_other_configs_is_random_with_a_note(tiny_config_file):
    notes: list[str] = []
    loaded = load("auto", config=tiny_config_file(), notes=notes)
    assert loaded.source == "random (seed 123)"
    assert len(notes) == 1 and notes[0].startswith("no released weights for config 'tiny-0': using untrained random "
                                                   "weights (seed 123), so the output is noise")
    notes.clear()
    load("auto", size="book", notes=notes)  # the book's config has no release either
    assert "no released weights for config 'book'" in notes[0]


def test_explicit_random_says_nothing(tiny_config_file):
    notes: list[str] = []
    loaded = load("random", config=tiny_config_file(), notes=notes)
    assert notes == [] and loaded.source == "random (seed 123)"


def test_locate_does_not_import_torch(tmp_path, tiny_cfg):
    path = save_checkpoint(tiny_model(tiny_cfg()), tmp_path / "c")
    code = ("import sys; from gptcli.weights import locate; "
            f"print(locate({str(tmp_path / 'c')!r}).path); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.split()
    assert out == [str(path), "False"]


def test_load_checkpoint_directly(tmp_path, tiny_cfg):
    model = tiny_model(tiny_cfg())
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    loaded = load_checkpoint(path, dtype=torch.bfloat16)
    assert loaded.cfg.name == "m" and loaded.tok_emb.weight.dtype == torch.bfloat16


# --- the real Hub ---------------------------------------------------------------------------------------


@pytest.fixture
def online(monkeypatch):
    if not network_tests_enabled():
        pytest.skip("set GPTCLI_NETWORK_TESTS=1 to run tests that reach the Hugging Face Hub")
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.mark.network
def test_hub_id_that_does_not_exist(online):
    with pytest.raises(UserError) as excinfo:
        load("openai-community/no-such-gpt2-anywhere")
    assert "no such model on the Hugging Face Hub" in one_line_error(excinfo)


@pytest.mark.network
def test_hub_revision_that_does_not_exist(online):
    with pytest.raises(UserError) as excinfo:
        locate_checkpoint("openai-community/gpt2@no-such-revision")
    assert "no revision 'no-such-revision'" in one_line_error(excinfo)

"""Decode kernels chosen by measuring (gptcli.kernels.decode): every kernel computes the same layer, the
choice is cached per machine, and turning tuning off measures nothing. No test depends on which
kernel wins: the winner differs between CPUs."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from gptcli.kernels import decode as kernels
from gptcli.cli import app
from gptcli.decoding.generate import Decoder, Generation, SamplingOptions
from gptcli.kernels.prepare import prepare_model
from helpers import lively_model

CPU = torch.device("cpu")
runner = CliRunner()


def plan_of(name: str, model, mode: str = kernels.EAGER) -> kernels.DecodePlan:
    """Every layer of ``model`` on kernel ``name``."""
    keys = {kernels.shape_key(layer.weight) for layer in kernels.linear_layers(model)}
    return kernels.DecodePlan(mode, {key: kernels.Choice(name) for key in keys})


def _greedy(model, prompt, n=12):
    options = SamplingOptions(max_new_tokens=n, ignore_eos=True)
    return Generation(Decoder(model, CPU, next(model.parameters()).dtype), prompt, options,
                      token_bytes=lambda i: b"").run().token_ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["onednn", "blas", "blas-t"])
def test_every_kernel_computes_the_plain_layer(name, dtype):
    plain, fast = lively_model(7, tie=True).to(dtype), lively_model(7, tie=True).to(dtype)
    counts = kernels.apply(fast, plan_of(name, fast))
    assert counts == {name: 2 * 4 + 1}
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    with torch.inference_mode():
        torch.testing.assert_close(fast(ids), plain(ids), **tol)
        torch.testing.assert_close(fast(ids[:, :1]), plain(ids[:, :1]), **tol)  # one row
    assert fast.tok_emb.weight.device.type == "cpu"  # the tied head's embedding is kept for the lookup
    copies = name in ("onednn", "blas-t")
    assert fast.trf_blocks[0].ff.layers[0].weight.is_meta == copies  # a copied plain weight is released


def test_a_tuned_model_decodes_the_plain_models_greedy_ids():
    plain, tuned = lively_model(8), lively_model(8)
    plan = kernels.tune(tuned)
    assert plan.source == "measured" and set(plan.summary().values()) <= set(kernels.KERNELS)
    kernels.apply(tuned, plan)
    assert _greedy(tuned, [5, 6, 7]) == _greedy(plain, [5, 6, 7])


def test_the_choice_is_measured_once_then_read_from_the_cache(monkeypatch):
    model = lively_model(9)
    assert kernels.will_measure(model)
    first = kernels.tune(model)
    assert first.source == "measured" and first.tune_s > 0
    saved = json.loads(kernels.cache_path().read_text())
    (machine, entry), = saved["machines"].items()
    assert "threads" in machine and "torch" in machine
    assert set(entry) == set(first.choices)
    for key, measured in entry.items():
        assert first.choices[key].kernel in measured
        assert all({"one", "batch", "invariant"} <= set(m) for m in measured.values())

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(kernels, "measure", no_measuring)
    assert not kernels.will_measure(model)
    second = kernels.tune(model)
    assert second.source == "cache" and second.summary() == first.summary()
    assert kernels.tune(model, kernels.COMPILED).source == "cache"  # one measurement serves --compile too


def test_no_tune_measures_nothing_and_writes_nothing(monkeypatch):
    monkeypatch.setenv(kernels.NO_TUNE_ENV, "1")
    model = lively_model(10)
    plan = kernels.tune(model)
    assert plan.source == "default" and not kernels.cache_path().exists()
    assert kernels.apply(model, plan) == {kernels.DEFAULT_KERNEL: 9}
    monkeypatch.delenv(kernels.NO_TUNE_ENV)
    assert kernels.tune(lively_model(10), enabled=False).source == "default"
    assert not kernels.cache_path().exists()


def test_an_unreadable_cache_is_measured_again():
    path = kernels.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert kernels.tune(lively_model(11)).source == "measured"
    assert json.loads(path.read_text())["version"] == kernels.CACHE_VERSION


def test_eager_choice_takes_only_kernels_whose_rows_cannot_depend_on_the_batch():
    measured = {
        "onednn": {"one": 10.0, "batch": 20.0, "invariant": True},
        "blas": {"one": 5.0, "batch": 10.0, "invariant": False},  # fastest, but a row changes with the batch
        "blas-t": {"one": 6.0, "batch": 9.0, "invariant": True},  # matched on the inputs tried: not enough
    }
    assert kernels.choose(measured, kernels.EAGER) == "onednn"
    assert kernels.choose(measured, kernels.COMPILED) == "blas"  # one sequence: the fastest single row
    failed_here = {**measured, "onednn": {"one": 10.0, "batch": 20.0, "invariant": False}}
    assert kernels.choose(failed_here, kernels.EAGER) == "onednn"  # nothing qualifies: the default, first


def test_packed_weights_live_as_long_as_their_model():
    import gc

    def live_slots():
        return sum(p is not None for p in kernels._PACKED)

    gc.collect()
    before = live_slots()
    model = lively_model(13)
    kernels.apply(model, kernels.DecodePlan(kernels.EAGER, {}))
    assert live_slots() == before + 9
    del model
    gc.collect()
    assert live_slots() == before


@pytest.mark.parametrize("text", [
    '{"version": %d, "machines": []}',
    '{"version": %d, "machines": {"x": 1}}',
    None,  # an entry for this machine whose numbers are null
])
def test_a_cache_we_did_not_write_is_measured_again(text):
    model = lively_model(14)
    path = kernels.cache_path()
    path.parent.mkdir(parents=True)
    if text is None:
        kernels.tune(model)
        data = json.loads(path.read_text())
        for entry in next(iter(data["machines"].values())).values():
            for m in entry.values():
                m["one"] = None
        path.write_text(json.dumps(data))
    else:
        path.write_text(text % kernels.CACHE_VERSION)
    assert kernels.will_measure(model)
    assert kernels.tune(model).source == "measured"
    assert not kernels.will_measure(model)


def test_a_checkpoints_in_out_weight_costs_blas_no_copy():
    w = torch.randn(48, 32).t()  # (out, in) as a view of a Conv1D's (in, out), as a checkpoint stores it
    assert kernels.shape_key(w).endswith("in,out")
    assert kernels.Blas(w).weight.data_ptr() == w.data_ptr()
    assert "blas-t" not in kernels.candidates(w)  # it would be blas again


def test_prepare_model_reports_the_kernels():
    prepared = prepare_model(lively_model(12), CPU, torch.float32, kernels="eager")
    assert prepared.plan is not None and sum(prepared.counts.values()) == 9
    assert prepare_model(lively_model(12), CPU, torch.float32).plan is None  # kernels=None: plain layers


def test_cli_tunes_on_first_use_and_reports_it(tiny):
    args = ["generate", *tiny, "Hello", "-n", "3", "--json"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.stderr
    timings = json.loads(first.stdout)["timings"]
    assert timings["tune_s"] > 0 and sum(timings["kernels"].values()) == 9
    assert first.stderr == ""  # not a terminal: no progress note
    second = runner.invoke(app, args)
    assert json.loads(second.stdout)["timings"]["tune_s"] is None  # read from the cache
    assert "measuring" not in second.stderr
    assert json.loads(second.stdout)["token_ids"] == json.loads(first.stdout)["token_ids"]


def test_cli_no_tune(tiny):
    result = runner.invoke(app, ["generate", *tiny, "Hello", "-n", "3", "--json", "--no-tune"])
    assert result.exit_code == 0, result.stderr
    timings = json.loads(result.stdout)["timings"]
    assert timings["tune_s"] is None and timings["kernels"] == {kernels.DEFAULT_KERNEL: 9}
    assert "measuring" not in result.stderr and not kernels.cache_path().exists()
    assert "--no-tune" in runner.invoke(app, ["generate", "--help"]).stdout


# --- Packing behind the first tokens (apply(lazy=True)) ----------------------------------------------


def _as_checkpoint_views(model):
    """Every Linear weight a transposed view of an (in, out) tensor, as a memory-mapped Hugging Face
    checkpoint gives them (gptcli.weights.MappedFile)."""
    for layer in kernels.linear_layers(model):
        if layer.weight is not model.tok_emb.weight:
            layer.weight = torch.nn.Parameter(layer.weight.detach().t().contiguous().t(), requires_grad=False)
    return model


def test_the_tuner_checks_that_unpacked_weights_give_the_packed_bits():
    model = _as_checkpoint_views(lively_model(15))
    plan = kernels.tune(model, use_cache=False)
    for layer in kernels.linear_layers(model):
        measured = plan.choices[kernels.shape_key(layer.weight)].measured["onednn"]
        assert isinstance(measured["same_unpacked"], bool)
    bf16 = kernels.tune(_as_checkpoint_views(lively_model(15).to(torch.bfloat16)), use_cache=False)
    assert not any(c.measured["onednn"]["same_unpacked"] for c in bf16.choices.values())  # float32 only


def test_a_generation_that_switches_kernels_midway_decodes_the_same_ids(monkeypatch):
    """Layers start on their weights as stored and switch to packed ones between tokens (here two
    layers after each token, on the test's thread): the ids and every logit stay the packed model's.
    Relies on what the tuner checks on the CPU at hand; where it finds other bits, nothing is lazy."""
    monkeypatch.setattr(kernels.BackgroundPacker, "autostart", False)
    packed, switching = (_as_checkpoint_views(lively_model(16)) for _ in range(2))
    plan = kernels.tune(switching, use_cache=False)
    lazy_layers = sum(plan.same_unpacked(layer.weight) for layer in kernels.linear_layers(switching))
    kernels.apply(packed, plan)
    kernels.apply(switching, plan, lazy=True)
    packer = switching.packer
    assert (packer.total if packer else 0) == lazy_layers  # a shape whose bits differed was packed up front
    if lazy_layers < 9:
        pytest.skip(f"oneDNN gave other bits unpacked for {9 - lazy_layers} of 9 layers on this CPU")
    assert packer.packed == 0

    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.inference_mode():
        assert torch.equal(switching(ids), packed(ids))  # nothing packed yet
        options = SamplingOptions(max_new_tokens=10, ignore_eos=True)
        generation = Generation(Decoder(switching, CPU, torch.float32), [5, 6, 7], options, token_bytes=lambda i: b"x")
        for _ in generation:
            packer.pack_next()
            packer.pack_next()
        assert packer.done and packer.packed == 9
        assert torch.equal(switching(ids), packed(ids))
    assert generation.token_ids == _greedy(packed, [5, 6, 7], n=10)
    assert switching.trf_blocks[0].ff.layers[0].weight.is_meta  # a packed layer lets its plain weight go


def test_a_mapped_checkpoint_packs_on_a_thread_after_the_first_forward(tmp_path):
    from gptcli.weights import load_checkpoint

    from helpers import save_checkpoint

    path = save_checkpoint(lively_model(17, vocab_size=50257), tmp_path / "m.safetensors")
    eager = load_checkpoint(path, mapped=False)
    prepare_model(eager, CPU, torch.float32, kernels=kernels.EAGER)
    model = load_checkpoint(path, mapped=True)
    prepared = prepare_model(model, CPU, torch.float32, kernels=kernels.EAGER)
    if model.packer is None:
        pytest.skip("oneDNN gave other bits on unpacked weights on this CPU: everything was packed at load")
    assert not model.packer.done and model.packer.packed == 0  # nothing packs before the first forward
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.inference_mode():
        first = model(ids)
        assert kernels.wait_packed(model, timeout=60) and model.packer.error is None
        assert model.packer.packed == model.packer.total and model.packer.seconds is not None
        assert torch.equal(first, model(ids)) and torch.equal(first, eager(ids))
    assert prepared.counts == {"onednn": 9}


def test_inspect_and_json_show_what_the_tuner_chose_and_measured(tmp_path):
    from helpers import save_checkpoint

    path = save_checkpoint(lively_model(18, vocab_size=50257), tmp_path / "m.safetensors")
    shown = runner.invoke(app, ["inspect", "--weights", str(path), "--kernels"])
    assert shown.exit_code == 0, shown.stderr
    assert "Decode kernels (measured now, eager decoding" in shown.stdout
    for shape in ("192x64", "256x64", "64x256", "64x64", "50257x64"):  # one row each, the head's too
        assert f"{shape} float32 out,in" in shown.stdout
    assert "no (rows depend on the batch)" in shown.stdout  # why blas is never taken for eager decoding
    report = json.loads(runner.invoke(app, ["inspect", "--weights", str(path), "--kernels", "--json"]).stdout)
    assert report["kernels"]["source"] == "cache" and len(report["kernels"]["explained"]) == 5
    again = runner.invoke(app, ["generate", "Hello", "--weights", str(path), "-n", "2", "--json"])
    plan = json.loads(again.stdout)["timings"]["kernel_plan"]
    assert plan["source"] == "cache" and plan["mode"] == "eager" and len(plan["choices"]) == 5
    for choice in plan["choices"].values():
        assert choice["kernel"] in choice["measured"]
        assert {"one", "batch", "invariant", "same_unpacked"} <= set(choice["measured"]["onednn"])

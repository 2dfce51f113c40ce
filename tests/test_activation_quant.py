"""Per-token dynamic int8 activations (``compress --activations int8``, moepress.quantize.activations):
W8A8/W4A8 fake quantization stays within what int8 rounding can do, each token keeps its own scale,
the scheme is recorded in the checkpoint and applied again on load (reference and fast runtimes
alike), and what cannot be expressed is refused in one line.

The bound: a token's row ``x`` is rounded onto ``s * {-127..127}``, ``s = max|x| / 127``, so every
element moves by at most ``s / 2``; a linear ``y = W x`` then moves by at most ``s / 2 * sum_j |W_ij|``
in output ``i``. The module's output with quantized inputs is checked against that bound around the
same module with float inputs (and must differ from it: the quantization is there)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

import moepress
from moepress.compress import CompressConfig
from moepress.errors import MoepressError
from moepress.model import MoEView
from moepress.quantize.activations import fake_quantize, input_scheme, quantize_linear_inputs, token_scales
from moepress.runtime import PackedExperts, PackedLinear
from moepress.runtime.fast import FastExperts, FastLinear
from moepress.runtime.install import apply_activations

from .helpers import run_cli

SMALL = dict(calib_samples=4, seq_len=64, batch_size=4, progress=False)
SLACK = 1e-5  # float32 arithmetic on top of the bound (the products are summed in another order)


def _rows(n: int = 6, width: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g) * torch.logspace(-2, 1, n).unsqueeze(1)  # scales 0.01 .. 10
    x[1, 3] = 40.0  # an outlier channel in one token
    return x


def test_each_element_moves_by_at_most_half_a_step_onto_int8_codes():
    x = _rows()
    q, s = fake_quantize(x), token_scales(x)
    assert ((x - q).abs() <= s / 2 + 1e-6 * s).all()
    codes = q / s
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 127 + 1e-3
    assert (q.abs().amax(dim=1) == x.abs().amax(dim=1)).all()  # the largest element is a code (+-127) exactly
    assert not torch.equal(q, x)
    assert torch.equal(fake_quantize(torch.zeros(2, 8)), torch.zeros(2, 8))  # a zero token stays zero
    assert fake_quantize(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert fake_quantize(x, None) is x


def test_one_outlier_token_does_not_change_another_tokens_quantization():
    x = _rows()
    louder = x.clone()
    louder[1] *= 1000  # token 1 alone gets a huge outlier
    q, q_louder = fake_quantize(x), fake_quantize(louder)
    assert torch.equal(q[[0, 2, 3, 4, 5]], q_louder[[0, 2, 3, 4, 5]])
    # (one scale for the whole tensor would have rounded token 0 to zeros)
    whole = (louder.abs().max() / 127)
    assert torch.equal(torch.round(louder[0] / whole), torch.zeros(64))
    linear = torch.nn.Linear(64, 16)
    quantize_linear_inputs(linear, "int8")
    with torch.no_grad():
        assert torch.equal(linear(x)[0], linear(louder)[0])


def _linear_bound(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per output element, the most int8 rounding of ``x``'s rows can move ``x @ weight.T``."""
    return token_scales(x) / 2 * weight.abs().sum(dim=1)


@pytest.fixture(scope="module")
def w8a8(tiny_model_dir, tokenizer, calib_file):
    """tiny Mixtral compressed in memory to W8A8 (8-bit per channel, int8 activations)."""
    model = moepress.load(tiny_model_dir("mixtral"), runtime="reference")
    return moepress.compress(model, tokenizer, bits=8, group_size=None, activations="int8", calib=calib_file, **SMALL)


def test_w8a8_linears_match_the_float_input_forward_within_int8_rounding(w8a8):
    model = w8a8.model
    view = MoEView(model)
    x = _rows(width=view.model.config.hidden_size)
    units = [u for layer in range(view.num_layers) for u in view.linear_units(layer)]
    assert units and all(isinstance(model.get_submodule(u.module_path), PackedLinear) for u in units)
    for unit in units:
        module = model.get_submodule(unit.module_path)
        assert input_scheme(module) == "int8", unit.name
        inp = _rows(width=unit.in_features)
        weight = module.dequantize(torch.float32)
        with torch.no_grad():
            got, exact = module(inp), F.linear(inp, weight, module.bias)
        deviation = (got - exact).abs()
        assert (deviation <= _linear_bound(weight, inp) + SLACK).all(), unit.name
        assert deviation.max() > 0, unit.name
    del x


def test_w8a8_experts_quantize_gate_up_and_down_inputs_within_the_bound(w8a8):
    view = MoEView(w8a8.model)
    store = view.experts(0)
    experts = store.module
    assert isinstance(experts, PackedExperts) and experts.activations == "int8"
    x = _rows(width=store.hidden_size)
    for e in range(store.num_experts):
        w = {lin: experts.packed_weight(e, lin).dequantize(torch.float32) for lin in ("gate_proj", "up_proj", "down_proj")}
        gate, up = F.linear(fake_quantize(x), w["gate_proj"]), F.linear(fake_quantize(x), w["up_proj"])
        hidden = experts.act_fn(gate) * up
        with torch.no_grad():
            got = experts.expert_forward(e, x)
        # exactly: gate/up on the token's int8-rounded row, down on the int8-rounded act(gate) * up
        assert torch.equal(got, F.linear(fake_quantize(hidden), w["down_proj"]))
        assert not torch.equal(got, F.linear(hidden, w["down_proj"]))
        for lin in ("gate_proj", "up_proj"):
            assert ((F.linear(fake_quantize(x), w[lin]) - F.linear(x, w[lin])).abs()
                    <= _linear_bound(w[lin], x) + SLACK).all()
        assert ((got - F.linear(hidden, w["down_proj"])).abs() <= _linear_bound(w["down_proj"], hidden) + SLACK).all()
    # the router keeps float inputs
    assert input_scheme(view.router(0)) is None


def test_checkpoint_records_the_scheme_and_loading_applies_it(w8a8, tmp_path, tiny_model_dir, tokenizer, calib_file):
    from transformers import AutoModelForCausalLM

    model = moepress.load(tiny_model_dir("mixtral"), runtime="reference")
    out = str(tmp_path / "w4a8")
    result = moepress.compress(model, tokenizer, bits=4, group_size=32, activations="int8", calib=calib_file, out=out,
                               **SMALL)
    record = json.load(open(os.path.join(out, "moepress.json")))
    config = json.load(open(os.path.join(out, "config.json")))
    assert record["activations"] == "int8" and config["quantization_config"]["activations"] == "int8"
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = result.model(ids).logits
        fast = moepress.load(out)
        assert any(isinstance(m, FastExperts) and m.activations == "int8" for m in fast.modules())
        assert all(input_scheme(m) == "int8" for m in fast.modules() if isinstance(m, FastLinear))
        assert torch.equal(fast(ids).logits, expected)
        assert torch.equal(moepress.load(out, runtime="reference")(ids).logits, expected)
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(ids).logits, expected)
        # the metadata is what applies it: the same tensors without it give other logits
        del config["quantization_config"]["activations"]
        json.dump(config, open(os.path.join(out, "config.json"), "w"))
        assert not torch.allclose(moepress.load(out)(ids).logits, expected, atol=1e-4)
        config["quantization_config"]["activations"] = "int8"
        json.dump(config, open(os.path.join(out, "config.json"), "w"))
    # the exports write weight-only formats: they refuse rather than drop the activations
    for module, export in (("compressed_tensors", "export_compressed_tensors"), ("gguf", "export_gguf")):
        pytest.importorskip(module)
        exporter = getattr(__import__(f"moepress.export.{module}", fromlist=[export]), export)
        with pytest.raises(MoepressError, match="quantizes activations"):
            exporter(out, str(tmp_path / f"export-{module}"))
    config["quantization_config"]["activations"] = "int4"
    json.dump(config, open(os.path.join(out, "config.json"), "w"))
    with pytest.raises(MoepressError, match="quantization_config.activations must be one of int8"):
        moepress.load(out)


def test_float_experts_converted_for_w16a8_compute_the_same_without_quantization(tiny_model_dir):
    model = moepress.load(tiny_model_dir("qwen2_moe"), runtime="reference")
    ids = torch.randint(0, 500, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
        count = apply_activations(model, "int8", lambda name: ".experts." in name)
        view = MoEView(model)
        stores = [view.experts(i) for i in range(view.num_layers) if view.experts(i) is not None]
        assert stores and count == sum(3 * s.num_experts for s in stores)
        assert all(isinstance(s.module, PackedExperts) and s.module.activations == "int8" for s in stores)
        after = model(ids).logits
        assert not torch.allclose(after, before, atol=1e-5)
        for module in model.modules():
            if isinstance(module, PackedExperts):
                module.set_activations(None, ())
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
        shared = [u for i in range(view.num_layers) for u in view.mlp_units(i)]  # shared/dense MLP: float inputs
        assert shared and all(input_scheme(model.get_submodule(u.module_path)) is None for u in shared)


@pytest.mark.parametrize("options, message", [
    (dict(activations="int4"), "--activations must be one of int8"),
    (dict(activations="int8", target="llamacpp"), "--target llamacpp: --activations"),
    (dict(activations="int8", target="vllm"), "--target vllm: --activations"),
    (dict(activations="int8", bits=16), "--bits 16 quantizes none"),
])
def test_refusals(options, message):
    with pytest.raises(MoepressError, match=message):
        CompressConfig(**options)


def test_cli_refuses_before_work(capsys, tiny_model_dir, tmp_path):
    line = run_cli(capsys, "compress", "--model", tiny_model_dir("mixtral"), "--out", str(tmp_path / "o"),
                   "--bits", "16", "--activations", "int8")
    assert "--bits 16 quantizes none" in line and not (tmp_path / "o").exists()


def test_cli_w8a8_streamed_from_a_folder_loads_with_int8_inputs(tiny_model_dir, calib_file, tmp_path):
    from moepress.cli import main

    out = str(tmp_path / "w8a8")
    assert main(["compress", "--model", tiny_model_dir("qwen2_moe"), "--out", out, "--bits", "8", "--group-size", "0",
                 "--activations", "int8", "--calib", calib_file, "--calib-samples", "4", "--seq-len", "64",
                 "--quiet"]) == 0
    model = moepress.load(out)
    view = MoEView(model)
    experts = [view.experts(i).module for i in range(view.num_layers) if view.experts(i) is not None]
    assert experts and all(isinstance(m, FastExperts) and m.activations == "int8" for m in experts)
    units = [u for i in range(view.num_layers) for u in view.linear_units(i)]
    assert units and all(input_scheme(model.get_submodule(u.module_path)) == "int8" for u in units)
    assert input_scheme(view.router(1)) is None


def test_hessians_from_int8_inputs(tiny_model_dir, tokenizer, calib_file, monkeypatch):
    """With ``activations_hessian`` an attention projection's GPTQ Hessian is the Gram matrix of its
    int8-rounded inputs (without it, of the float ones)."""
    import importlib

    compress_module = importlib.import_module("moepress.compress")  # (moepress.compress is the function)
    hessians, inputs = {}, []
    treat = compress_module.treat_batch

    def recording(weight, hessian, treatment, name):
        hessians.setdefault(name, hessian.clone())
        return treat(weight, hessian, treatment, name)

    monkeypatch.setattr(compress_module, "treat_batch", recording)
    for rounded in (False, True):
        hessians.clear()
        inputs.clear()
        model = moepress.load(tiny_model_dir("mixtral"), runtime="reference")
        q_proj = MoEView(model).attention_units(0)[0]
        # registered before compress's own hooks: sees the float inputs
        model.get_submodule(q_proj.module_path).register_forward_pre_hook(
            lambda _m, args: inputs.append(args[0].reshape(-1, args[0].shape[-1]).float()))
        moepress.compress(model, tokenizer, bits=8, group_size=None, activations="int8", activations_hessian=rounded,
                          calib=calib_file, **SMALL)
        x = torch.cat(inputs)
        xq = fake_quantize(x)
        got = hessians[q_proj.name]
        want, other = (xq.T @ xq, x.T @ x) if rounded else (x.T @ x, xq.T @ xq)
        scale = want.abs().max()
        assert (got * x.shape[0] - want).abs().max() <= 1e-4 * scale
        assert (got * x.shape[0] - other).abs().max() > 1e-3 * (want - other).abs().max()


def test_the_triton_path_refuses_instead_of_skipping(w8a8, monkeypatch):
    from moepress.runtime import fast, triton_moe

    monkeypatch.setattr(fast, "_on_cpu", lambda model: False)
    monkeypatch.setattr(triton_moe, "triton_available", lambda: True)
    with pytest.raises(MoepressError, match="does not quantize activations"):
        fast.prepare(w8a8.model)

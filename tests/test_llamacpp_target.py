"""compress --target llamacpp: llama.cpp's block formats as treatments, checkpoints that compute with
the GGUF's values, and one-line refusals of what a GGUF cannot hold, before any work."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import yaml

import moepress
from moepress.errors import MoepressError
from moepress.loading import load_model
from moepress.model.view import EXPERT_LINEARS, MoEView
from moepress.runtime.block_weight import BlockLinear, BlockWeight
from moepress.treatment import Treatment

from .helpers import loads_the_same, run_cli

SMALL = {"calib_samples": 4, "seq_len": 64}


def test_format_treatments():
    t = Treatment.quantize(4, 32, format="q4_0")
    assert t.label == "q4_0" and t.bits == 4 and t.group_size == 32 and t.symmetric
    assert Treatment.parse("Q5_1") == Treatment.block_format("q5_1")
    assert Treatment.block_format("q5_1").bits == 5 and not Treatment.block_format("q5_1").symmetric
    for label in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0"):
        t = Treatment.parse(label, settings={"method": "rtn"})
        assert Treatment.from_unit_map(t.to_unit_map()) == t and t.act_order == "off"
    assert Treatment.block_format("q4_1").nbytes(256, 128) == 256 * 4 * 20
    assert Treatment.block_format("q8_0").nbytes(8, 64) == 8 * 2 * 34
    with pytest.raises(MoepressError, match="act-order must be off or static"):
        Treatment.block_format("q4_0", act_order="dynamic")
    with pytest.raises(MoepressError, match="q5_0 stores 5-bit codes"):
        Treatment.quantize(4, 32, format="q5_0")
    with pytest.raises(MoepressError, match="choose one of"):
        Treatment.block_format("q6_0")
    with pytest.raises(MoepressError, match="not a multiple of 32"):
        Treatment.block_format("q4_1").check_shape(8, 48, "layers.0.attn.q_proj")
    with pytest.raises(ValueError, match="llama.cpp block format"):
        Treatment.block_format("q4_1").spec()


def test_bits_choose_llamacpp_types():
    from moepress.compress import CompressConfig
    from moepress.export.llamacpp_target import block_type

    assert CompressConfig(target="llamacpp", bits=4).treatment().label == "q4_1"
    assert CompressConfig(target="llamacpp", bits=5).treatment().label == "q5_1"
    assert CompressConfig(target="llamacpp", bits=8).treatment().label == "q8_0"
    assert CompressConfig(target="llamacpp", bits=16).treatment().keep
    assert CompressConfig(target="llamacpp", ggml_type="q4_0").treatment().label == "q4_0"
    # the k-quant where a row is a multiple of 256 inputs, else the legacy type (llama-quantize's fallback)
    assert [block_type(b, None, 512) for b in (4, 5, 6, 8)] == ["q4_K", "q5_K", "q6_K", "q8_0"]
    assert [block_type(b, None, 384) for b in (4, 5, 6, 8)] == ["q4_1", "q5_1", "q8_0", "q8_0"]
    assert block_type(4, "q4_0", 512) == "q4_0"
    assert Treatment.parse("Q4_K").group_size == 256 and Treatment.parse("q6_K").symmetric
    with pytest.raises(MoepressError, match="not 7-bit"):
        CompressConfig(target="llamacpp", bits=7)
    with pytest.raises(MoepressError, match="needs --target llamacpp"):
        CompressConfig(ggml_type="q4_0")


@pytest.fixture(scope="module")
def compressed(tiny_model_dir, calib_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("llamacpp") / "q4")
    result = moepress.compress(tiny_model_dir("mixtral"), target="llamacpp", bits=4, calib=calib_file, out=out,
                               progress=False, **SMALL)
    return result, out


def test_checkpoint_holds_gguf_bytes_and_computes_with_them(compressed):
    gguf = pytest.importorskip("gguf", reason="the gguf package is an optional extra: pip install moepress[gguf]")
    result, out = compressed
    record = json.load(open(os.path.join(out, "moepress.json")))
    assert record["target"] == "llamacpp"
    assert {Treatment.from_unit_map(u).label for u in record["units"].values()} == {"q4_1"}
    model = load_model(out)  # the stored format as it is (no runtime conversion)
    view = MoEView(model)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    checked = 0
    for layer in range(view.num_layers):
        for unit in view.linear_units(layer):
            module = model.get_submodule(unit.module_path)
            assert isinstance(module, BlockLinear)
            theirs = gguf.quants.dequantize(module.blocks.numpy(), gguf.GGMLQuantizationType.Q4_1)
            # the module's forward is F.linear with exactly the values gguf reads
            assert torch.equal(module(x[:, : unit.in_features]), x[:, : unit.in_features] @ torch.from_numpy(theirs).T)
            checked += 1
        store = view.experts(layer)
        for e in range(store.num_experts):
            for linear in EXPERT_LINEARS:
                weight = store.module.packed_weight(e, linear)
                assert isinstance(weight, BlockWeight) and weight.format == "q4_1"
                theirs = gguf.quants.dequantize(weight.blocks.numpy(), gguf.GGMLQuantizationType.Q4_1)
                assert np.array_equal(weight.dequantize().numpy(), theirs)
                checked += 1
    assert checked == len(record["units"])
    loads_the_same(result, out, model)


def test_footprint_counts_the_block_bytes(compressed):
    result, out = compressed
    from moepress.evaluate.footprint import measure_footprint

    fp = measure_footprint(load_model(out))
    assert fp.bits_per_param == pytest.approx(5.0)  # q4_1: 20 bytes per 32 weights


def _plan(view, option, **overrides) -> dict:
    units = {}
    for layer in range(view.num_layers):
        for unit in view.linear_units(layer):
            units[unit.name] = option
        units.update({f"layers.{layer}.experts.{e}": option for e in range(view.experts(layer).num_experts)})
    units.update(overrides)
    return units


@pytest.mark.parametrize("flags, message", [
    (["--bits", "7"], "q4_K/q4_1, q5_K/q5_1, q6_K, q8_0; q4_0 where a 2/3-bit row is not a multiple of 256) or 16 "
                      "(f16), not 7-bit"),
    (["--ggml-type", "q4_K"], "q4_K stores blocks of 256 inputs; layers.0.attn.q_proj has 128 input features"),
    (["--prune", "50%"], "--target llamacpp: --prune 50%: llama.cpp stores no pruned weights"),
    (["--act-order", "dynamic"], "act-order dynamic"),
    (["--dynamic-pruning", "0.3"], "--dynamic-pruning"),
    (["--drop-moe-layers", "1"], "--drop-moe-layers"),
    (["--budget", "4bits"], "--others 4b-g128: layers.0.attn.q_proj is 4b-g128, which llama.cpp cannot store"),
])
def test_what_llamacpp_cannot_hold_is_refused_in_one_line(tiny_model_dir, calib_file, tmp_path, capsys, flags,
                                                          message):
    out = tmp_path / "out"
    line = run_cli(capsys, "compress", "--model", tiny_model_dir("mixtral"), "--calib", calib_file, "--out", str(out),
                   "--target", "llamacpp", "--quiet", *flags)
    assert message in line
    assert not out.exists()


def _refused_plan(tiny_model_dir, calib_file, tmp_path, capsys, plan: dict) -> str:
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump({"moepress_plan": 1, **plan}))
    out = tmp_path / "out"
    line = run_cli(capsys, "compress", "--model", tiny_model_dir("mixtral"), "--calib", calib_file, "--out", str(out),
                   "--target", "llamacpp", "--plan", str(tmp_path / "plan.yaml"), "--quiet")
    assert not out.exists()
    return line


def test_plans_the_target_cannot_express_are_refused(tiny_model_dir, calib_file, tmp_path, capsys):
    view = MoEView(moepress.load(tiny_model_dir("mixtral")))
    line = _refused_plan(tiny_model_dir, calib_file, tmp_path, capsys, {"units": _plan(view, "4b-g128")})
    assert "layers.0.attn.q_proj is 4b-g128, which llama.cpp cannot store" in line
    mixed = _plan(view, "q4_1", **{"layers.1.experts.2": "q8_0"})
    line = _refused_plan(tiny_model_dir, calib_file, tmp_path, capsys, {"units": mixed})
    assert "layers.1.experts.2.gate_proj is q8_0 but layers.1.experts.0.gate_proj is q4_1" in line
    pruned = _plan(view, "q4_1", **{"layers.0.experts.1": "2:4+4b-g128"})
    line = _refused_plan(tiny_model_dir, calib_file, tmp_path, capsys, {"units": pruned})
    assert "layers.0.experts.1.gate_proj is 2:4+4b-g128, which llama.cpp cannot store" in line
    uneven = {"units": _plan(view, "q4_1"), "trim": {"dropped_experts": {0: [3]}}}
    uneven["units"] = {k: v for k, v in uneven["units"].items() if k != "layers.0.experts.3"}
    line = _refused_plan(tiny_model_dir, calib_file, tmp_path, capsys, uneven)
    assert "layers.0 keeps 3 experts but layers.1 4" in line


def test_a_plan_in_llamacpp_types_per_projection(tiny_model_dir, calib_file, tmp_path):
    """Different types per layer and per linear are fine; the checkpoint follows the plan."""
    source = tiny_model_dir("mixtral")
    view = MoEView(moepress.load(source))
    units = _plan(view, "q4_0", **{f"layers.1.experts.{e}": "q8_0" for e in range(view.experts(1).num_experts)})
    units["layers.0.attn.o_proj"] = "16b"
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump({"moepress_plan": 1, "units": units}))
    out = str(tmp_path / "out")
    moepress.compress(source, plan=str(tmp_path / "plan.yaml"), target="llamacpp", calib=calib_file, out=out,
                      progress=False, **SMALL)
    record = json.load(open(os.path.join(out, "moepress.json")))["units"]
    labels = {name: Treatment.from_unit_map(u).label for name, u in record.items()}
    assert labels["layers.1.experts.3.down_proj"] == "q8_0" and labels["layers.0.experts.3.down_proj"] == "q4_0"
    assert labels["layers.0.attn.o_proj"] == "16b"
    model = load_model(out)
    assert model.get_submodule(MoEView(model).attention_units(0)[0].module_path).format == "q4_0"


@pytest.mark.parametrize("arch, why", [("phimoe", "phimoe: llama.cpp"), ("qwen3_moe", "dense")])
def test_a_model_the_export_cannot_write_is_refused_before_any_work(arch, why, tiny_model_dir, tmp_path, capsys):
    """PhiMoE (llama.cpp's router is not its sparsemixer) and the tiny Qwen3-MoE with a dense layer
    (llama.cpp's qwen3moe has none) cannot become a GGUF: --target llamacpp says so in one line,
    from the config, and writes nothing."""
    pytest.importorskip("gguf", reason="the gguf package is an optional extra: pip install moepress[gguf]")
    out = tmp_path / "out"
    line = run_cli(capsys, "compress", "--model", tiny_model_dir(arch), "--target", "llamacpp", "--bits", "4",
                   "--out", str(out), "--quiet")
    assert "--target llamacpp" in line and why in line, line
    assert not out.exists()

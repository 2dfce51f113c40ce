"""export --format compressed-tensors and compress --target vllm: llm-compressor's layout for the same
scheme, decompression (transformers' and compressed-tensors' own) to moepress's values, and one-line
refusals of what vLLM cannot load.

The reference layout is llm-compressor 0.14's own export of the same tiny models (recorded by
benchmarks/peers/llmcompressor_layout.py in tests/data/llmcompressor_layout.json: CI has no
llm-compressor). vLLM cannot serve int4 MoE on this CPU (issue 12), so these are the checks there are.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

pytest.importorskip("compressed_tensors", reason="the compressed-tensors export needs compressed-tensors "
                                                 "(pip install 'moepress[vllm]')")

from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # noqa: E402

from moepress.compress import compress  # noqa: E402
from moepress.errors import MoepressError  # noqa: E402
from moepress.export.compressed_tensors import export_compressed_tensors  # noqa: E402
from moepress.export.vllm_target import refusal, tied_units  # noqa: E402
from moepress.loading import load_model  # noqa: E402
from moepress.model.tiny import build_tiny_model, tiny_config  # noqa: E402
from moepress.model.view import MoEView  # noqa: E402
from moepress.treatment import Treatment  # noqa: E402

from .helpers import run_cli  # noqa: E402

REFERENCE = json.load(open(os.path.join(os.path.dirname(__file__), "data", "llmcompressor_layout.json")))
# llm-compressor's preset -> moepress's compress options for the same scheme (round to nearest: the
# layout does not depend on the algorithm; llm-compressor's QuantizationModifier rounds too)
SCHEMES = {"W4A16": dict(bits=4, symmetric=True), "W4A16_ASYM": dict(bits=4, symmetric=False),
           "W8A16": dict(bits=8, symmetric=True)}
SMALL = dict(method="rtn", group_size=128, calib_samples=2, seq_len=32, progress=False)
# What a scheme's weights record that loaders read (observer and its kwargs only say how llm-compressor
# calibrated, which moepress does not do)
WEIGHT_FIELDS = ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic", "actorder", "block_structure",
                 "scale_dtype", "zp_dtype")


@pytest.fixture(scope="module")
def source(tmp_path_factory, tokenizer):
    """source(model_type, dtype): the reference's tiny model (same config) saved with the tiny tokenizer."""
    made = {}

    def make(model_type: str, dtype: torch.dtype = torch.bfloat16) -> str:
        key = (model_type, dtype)
        if key not in made:
            path = str(tmp_path_factory.mktemp(f"{model_type}-{str(dtype)[6:]}"))
            build_tiny_model(model_type, **REFERENCE["models"][model_type]["config"]).to(dtype).save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[key] = path
        return made[key]

    return make


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    """exported(model_type, scheme, dtype): (moepress checkpoint, its compressed-tensors export)."""
    made = {}

    def make(model_type: str, scheme: str, dtype: torch.dtype = torch.bfloat16) -> tuple[str, str]:
        key = (model_type, scheme, dtype)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"{model_type}-{scheme}-{str(dtype)[6:]}")
            checkpoint, out = str(folder / "moepress"), str(folder / "ct")
            compress(source(model_type, dtype), out=checkpoint, **SCHEMES[scheme], **SMALL)
            export_compressed_tensors(checkpoint, out)
            made[key] = checkpoint, out
        return made[key]

    return make


def _tensors(folder: str) -> dict[str, list]:
    found = {}
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".safetensors")):
        with safe_open(os.path.join(folder, name), "pt") as f:
            for key in f.keys():
                part = f.get_slice(key)
                found[key] = [part.get_dtype(), list(part.get_shape())]
    return found


def _quantization_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)["quantization_config"]


@pytest.mark.parametrize("model_type, scheme", [("mixtral", "W4A16"), ("mixtral", "W4A16_ASYM"), ("mixtral", "W8A16"),
                                                ("qwen3_moe", "W4A16")])
def test_layout_matches_llmcompressor(exported, model_type, scheme):
    """Tensor names, dtypes, shapes and quantization_config equal llm-compressor's export of the same
    model at the same scheme."""
    reference = REFERENCE["models"][model_type]["schemes"][scheme]
    _, out = exported(model_type, scheme)
    ours = _tensors(out)
    assert sorted(ours) == sorted(reference["tensors"]), (
        f"only ours: {sorted(set(ours) - set(reference['tensors']))[:4]}, "
        f"only llm-compressor's: {sorted(set(reference['tensors']) - set(ours))[:4]}")
    differing = {k: (v, reference["tensors"][k]) for k, v in ours.items() if v != reference["tensors"][k]}
    assert not differing, f"{len(differing)} tensors differ in dtype or shape, e.g. {list(differing.items())[:3]}"

    config, expected = _quantization_config(out), reference["quantization_config"]
    for key in ("format", "quant_method", "quantization_status", "kv_cache_scheme"):
        assert config[key] == expected[key], key
    assert sorted(config["ignore"]) == sorted(expected["ignore"])
    (group,), (expected_group,) = config["config_groups"].values(), expected["config_groups"].values()
    assert group["targets"] == expected_group["targets"] and group["format"] == expected_group["format"]
    assert group["input_activations"] is None and group["output_activations"] is None
    weights, expected_weights = (QuantizationArgs.model_validate(g["weights"]) for g in (group, expected_group))
    for field in WEIGHT_FIELDS:
        assert getattr(weights, field) == getattr(expected_weights, field), field
    QuantizationConfig.model_validate(config)  # compressed-tensors itself reads it


def _linear_weights(model) -> dict[str, torch.Tensor]:
    """Every unit's weight in float32 by canonical name (fused 3-D experts or moepress's packed ones)."""
    view = MoEView(model)
    weights = {}
    for layer in range(view.num_layers):
        for unit in view.linear_units(layer):
            module = model.get_submodule(unit.module_path)
            weights[unit.name] = (module.dequantize() if hasattr(module, "dequantize") else module.weight).float()
        store = view.experts(layer)
        if store is not None:
            for linear in ("gate_proj", "up_proj", "down_proj"):
                stacked = store.weight(linear).float()
                weights.update({store.unit_name(e, linear): stacked[e] for e in range(store.num_experts)})
    return weights


def _logits(model, ids) -> torch.Tensor:
    """On one thread: with several, a float32 matmul's summation order depends on the weight's memory
    layout (decompressed weights and moepress's are equal but laid out differently), so equal
    weights would give logits differing in the last bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return model(ids).logits.float()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dequantize", [False, True])
@pytest.mark.parametrize("model_type, scheme", [("mixtral", "W4A16"), ("qwen3_moe", "W8A16")])
def test_transformers_loads_moepress_values_float32(exported, model_type, scheme, dequantize):
    """A float32 model's export holds float32 scales: from_pretrained (compressed-tensors decompression,
    either way transformers offers) gives exactly moepress's weights and logits."""
    checkpoint, out = exported(model_type, scheme, torch.float32)
    ours = load_model(checkpoint)
    quantization = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, **quantization)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(loaded, ids), _logits(ours, ids))  # (decompresses on the first forward)
    expected, got = _linear_weights(ours), _linear_weights(loaded)
    assert sorted(got) == sorted(expected)
    differing = [name for name in expected if not torch.equal(got[name], expected[name])]
    assert not differing, f"{len(differing)} weights differ, e.g. {differing[:3]}"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["olmoe", "deepseek_v2", "deepseek_v3", "phimoe"])
def test_every_architecture_exports_moepress_values(tiny_model_dir, calib_file, tmp_path, arch):
    """compress --target vllm then export, for the architectures the tests above do not cover
    (Mixtral, Qwen3-MoE, Qwen2-MoE): from_pretrained gives exactly moepress's logits (float32)."""
    checkpoint, out = str(tmp_path / "q"), str(tmp_path / "ct")
    compress(tiny_model_dir(arch), out=checkpoint, bits=4, target="vllm", calib=calib_file, **SMALL)
    export_compressed_tensors(checkpoint, out)
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(loaded, ids), _logits(load_model(checkpoint), ids))


def test_granitemoe_is_refused_before_any_work(tiny_model_dir, calib_file, tmp_path, capsys):
    """Granite-MoE's hub checkpoints store a layer's experts fused (input_linear), which
    compressed-tensors' per-expert layout cannot name."""
    out = tmp_path / "out"
    line = run_cli(capsys, "compress", "--model", tiny_model_dir("granitemoe"), "--calib", calib_file, "--out",
                   str(out), "--target", "vllm", "--quiet")
    assert "--target vllm: model.layers.0.block_sparse_moe.output_linear.weight: the hub layout stores" in line
    assert not out.exists()


def test_bfloat16_scales_change_weights_within_their_rounding(exported):
    """A bfloat16 model's scales are stored in bfloat16 (as llm-compressor and vLLM hold them): each
    decompressed weight is within bf16's rounding of the scale and of the product (2 * 2**-8
    relative: bf16 keeps 8 significant bits) of moepress's, and the logits are as far from
    moepress's float32 values as moepress's own bf16 runtimes are (mean absolute difference within
    2x theirs; single bf16 logits can jump where a near-tie routes a token elsewhere, in any of them)."""
    import moepress

    checkpoint, out = exported("mixtral", "W4A16")
    ours = load_model(checkpoint)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 500, (4, 32), generator=torch.Generator().manual_seed(0))
    got_logits = _logits(loaded, ids)
    expected, got = _linear_weights(ours), _linear_weights(loaded)
    worst = max(((got[n] - w).abs() / w.abs().clamp_min(1e-30)).max().item() for n, w in expected.items()
                if w.abs().max() > 0)
    assert 0 < worst <= 2 * 2 ** -8, worst  # not exact (bf16 scales), and no more than their rounding
    exact = _logits(load_model(checkpoint, dtype=torch.float32), ids)  # moepress's values, float32
    own = max((_logits(runtime, ids) - exact).abs().mean().item() for runtime in (ours, moepress.load(checkpoint)))
    assert (got_logits - exact).abs().mean().item() <= 2 * own


def _decompressed(out: str) -> dict[str, torch.Tensor]:
    """Every quantized module of an export decompressed by compressed-tensors' own compressor with
    its config group's scheme (by hub module name)."""
    config = QuantizationConfig.model_validate(_quantization_config(out))
    tensors = {}
    for name in (n for n in os.listdir(out) if n.endswith(".safetensors")):
        with safe_open(os.path.join(out, name), "pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    modules = {}
    for key, tensor in tensors.items():
        module, _, leaf = key.rpartition(".")
        modules.setdefault(module, {})[leaf] = tensor
    weights = {}
    for module, local in modules.items():
        if "weight_packed" not in local:
            continue
        (scheme,) = [g for g in config.config_groups.values() if g.targets == ["Linear"] or module in g.targets]
        compressor = BaseCompressor.get_value_from_registry(scheme.format or config.format)
        weights[module] = compressor.decompress({k: v for k, v in local.items() if k != "bias"}, scheme)["weight"]
    return weights


def _mixtral_hub_names(view) -> dict[str, str]:
    """Canonical unit name -> hub module name of a Mixtral (experts as w1/w3/w2 under block_sparse_moe)."""
    names = {u.name: u.module_path for layer in range(view.num_layers) for u in view.linear_units(layer)}
    names.update({f"layers.{layer}.experts.{e}.{lin}": f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}"
                  for layer in range(view.num_layers) for e in range(view.experts(layer).num_experts)
                  for lin, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))})
    return names


def test_zero_points_decompress_exactly_through_compressed_tensors(exported):
    """Asymmetric (W4A16_ASYM) zero points packed along the output dimension: compressed-tensors' own
    pack-quantized decompressor gives exactly moepress's weights (transformers 5.24 cannot load
    asymmetric experts: its fused-expert decompression drops zero points; vLLM's MoE is symmetric)."""
    checkpoint, out = exported("mixtral", "W4A16_ASYM", torch.float32)
    ours = load_model(checkpoint)
    expected, hub = _linear_weights(ours), _mixtral_hub_names(MoEView(ours))
    got = _decompressed(out)
    assert sorted(got) == sorted(hub.values())
    for name, weight in expected.items():
        assert torch.equal(got[hub[name]].float(), weight), name


def test_a_plan_mixing_layers_is_one_config_group_per_scheme(tiny_model_dir, calib_file, tmp_path):
    """--target vllm allows per-layer mixing: the export writes a group per scheme naming its modules
    (and vLLM's expert-0 gate/up/down probe names of each MoE layer), kept units in ignore; each
    module decompresses with its group's scheme to exactly moepress's weights."""
    source = tiny_model_dir("mixtral")
    view = MoEView(load_model(source))
    units = _plan(view, "4b-g128", **{f"layers.0.experts.{e}": "8b-ch" for e in range(view.experts(0).num_experts)},
                  **{"layers.0.attn.o_proj": "16b"})
    plan = {"moepress_plan": 1, "quantization": {"method": "rtn", "symmetric": True}, "units": units}
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    checkpoint, out = str(tmp_path / "q"), str(tmp_path / "ct")
    compress(source, out=checkpoint, plan=str(tmp_path / "plan.yaml"), target="vllm", calib=calib_file,
             calib_samples=2, seq_len=32, progress=False)
    with pytest.warns(UserWarning, match="transformers 5 decompresses every layer's experts with one scheme"):
        export_compressed_tensors(checkpoint, out)
    config = _quantization_config(out)
    groups = {(g["weights"]["num_bits"], g["weights"]["strategy"]): g["targets"] for g in config["config_groups"].values()}
    assert sorted(groups) == [(4, "group"), (8, "channel")]
    assert "model.layers.0.block_sparse_moe.experts.3.w2" in groups[(8, "channel")]
    assert "model.layers.0.block_sparse_moe.experts.0.gate_proj" in groups[(8, "channel")]  # vLLM's probe name
    assert "model.layers.1.block_sparse_moe.experts.0.w1" in groups[(4, "group")]
    assert "model.layers.0.self_attn.o_proj" in config["ignore"]
    ours = load_model(checkpoint)
    expected, hub = _linear_weights(ours), _mixtral_hub_names(MoEView(ours))
    got = _decompressed(out)
    for name, weight in expected.items():
        if name == "layers.0.attn.o_proj":
            assert hub[name] not in got
            continue
        assert torch.equal(got[hub[name]].float(), weight), name


def test_tied_units_and_refusals():
    """The groups vLLM stores with one scheme, and one unit's rules."""
    with torch.device("meta"):
        view = MoEView(AutoModelForCausalLM.from_config(tiny_config("mixtral")))
    groups = tied_units(view)
    assert ("layers.0.attn.q_proj", "layers.0.attn.k_proj", "layers.0.attn.v_proj") in groups
    experts = next(g for g in groups if "layers.1.experts.0.gate_proj" in g)
    assert len(experts) == 3 * view.experts(1).num_experts and "layers.1.experts.3.down_proj" in experts
    with torch.device("meta"):
        qwen2 = MoEView(AutoModelForCausalLM.from_config(tiny_config("qwen2_moe")))
        deepseek = MoEView(AutoModelForCausalLM.from_config(tiny_config("deepseek_v3")))
    assert ("layers.1.shared.gate_proj", "layers.1.shared.up_proj") in tied_units(qwen2)
    assert ("layers.0.mlp.gate_proj", "layers.0.mlp.up_proj") in tied_units(qwen2)
    assert ("layers.1.attn.q_a_proj", "layers.1.attn.kv_a_proj_with_mqa") in tied_units(deepseek)

    sym4, asym4, asym8 = (Treatment.quantize(b, 128, symmetric=s) for b, s in ((4, True), (4, False), (8, False)))
    assert refusal("layers.0.experts.1.up_proj", sym4, 128) is None
    assert refusal("layers.0.attn.q_proj", asym4, 128) is None  # vLLM's linear kernels take 4-bit zero points
    assert "symmetric only" in refusal("layers.0.experts.1.up_proj", asym4, 128)
    assert "zero points at 4 bits" in refusal("layers.0.attn.q_proj", asym8, 128)
    assert "4- or 8-bit" in refusal("layers.0.attn.q_proj", Treatment.quantize(3, 128, symmetric=True), 128)
    assert "do not divide" in refusal("layers.0.attn.q_proj", sym4, 192)
    assert "group index" in refusal("x", Treatment.quantize(4, 64, symmetric=True, act_order="dynamic"), 128)
    assert "pruned" in refusal("x", Treatment.parse("2:4+4b-g128"), 128)
    assert "block format" in refusal("x", Treatment.parse("q4_0"), 128)
    assert refusal("x", Treatment.keep_unit(), 100) is None


@pytest.mark.parametrize("flags, message", [
    (["--bits", "3"], "--target vllm: --bits 3: vLLM's compressed-tensors MoE kernels take 4- or 8-bit weights"),
    (["--bits", "4", "--act-order", "dynamic"], "--act-order dynamic"),
    (["--bits", "4", "--prune", "2:4"], "--prune 2:4"),
    (["--bits", "4", "--drop-experts", "1"], "trimmed model"),
])
def test_what_vllm_cannot_load_is_refused_in_one_line(tiny_model_dir, calib_file, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    line = run_cli(capsys, "compress", "--model", tiny_model_dir("mixtral"), "--calib", calib_file, "--out", str(out),
                   "--target", "vllm", "--quiet", *flags)
    assert message in line
    assert not out.exists()


def _plan(view, option, **overrides) -> dict:
    units = {}
    for layer in range(view.num_layers):
        units.update({unit.name: option for unit in view.linear_units(layer)})
        units.update({f"layers.{layer}.experts.{e}": option for e in range(view.experts(layer).num_experts)})
    return {**units, **overrides}


def test_plans_vllm_cannot_load_are_refused(tiny_model_dir, calib_file, tmp_path, capsys):
    """A 3-bit plan, per-expert mixing inside a layer and q/k/v that differ are refused in one line
    naming the unit, before any work; per-layer mixing is allowed."""
    view = MoEView(load_model(tiny_model_dir("mixtral")))

    def refused(units: dict) -> str:
        plan = {"moepress_plan": 1, "quantization": {"method": "rtn", "symmetric": True}, "units": units}
        (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
        out = tmp_path / "out"
        line = run_cli(capsys, "compress", "--model", tiny_model_dir("mixtral"), "--calib", calib_file, "--out",
                       str(out), "--target", "vllm", "--plan", str(tmp_path / "plan.yaml"), "--quiet")
        assert not out.exists()
        return line

    line = refused(_plan(view, "3b-g128"))
    assert "--target vllm: layers.0.attn.q_proj is 3b-g128: vLLM's compressed-tensors MoE kernels take 4- or 8-bit" \
        in line
    line = refused(_plan(view, "4b-g128", **{"layers.1.experts.2": "8b-g128"}))
    assert ("layers.1.experts.2.gate_proj is 8b-g128 symmetric but layers.1.experts.0.gate_proj is 4b-g128 symmetric; "
            "vLLM's MoE loader reads one scheme for all of a layer's experts") in line
    line = refused(_plan(view, "4b-g128", **{"layers.0.attn.v_proj": "8b-g128"}))
    assert "layers.0.attn.v_proj is 8b-g128 symmetric but layers.0.attn.q_proj is 4b-g128 symmetric; vLLM fuses" in line


def test_export_refuses_per_expert_mixing_and_trims_and_writes_nothing(tiny_model_dir, calib_file, tmp_path, capsys):
    """A checkpoint made without --target whose experts differ inside a layer cannot be written as
    compressed-tensors that transformers or vLLM load, nor (yet) a trimmed one: one line, nothing written."""
    view = MoEView(load_model(tiny_model_dir("mixtral")))
    plan = {"moepress_plan": 1, "quantization": {"method": "rtn"},
            "units": _plan(view, "4b-g128", **{"layers.0.experts.1": "8b-g128"})}
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    checkpoint = tmp_path / "moepress"
    compress(tiny_model_dir("mixtral"), out=str(checkpoint), plan=str(tmp_path / "plan.yaml"), calib=calib_file,
             calib_samples=2, seq_len=32, progress=False)
    out = tmp_path / "ct"
    line = run_cli(capsys, "export", "--model", str(checkpoint), "--format", "compressed-tensors", "--out", str(out))
    assert "layers.0.experts.1.gate_proj is 8b-g128 with zero points but layers.0.experts.0.gate_proj is 4b-g128" \
        in line
    assert not out.exists() and not any(p.name.startswith(".ct.tmp") for p in tmp_path.iterdir())
    with pytest.raises(MoepressError, match="already exists"):
        export_compressed_tensors(str(checkpoint), str(checkpoint))
    trimmed = tmp_path / "trimmed"
    compress(tiny_model_dir("mixtral"), out=str(trimmed), bits=4, method="rtn", drop_experts="1", calib=calib_file,
             calib_samples=2, seq_len=32, progress=False)
    line = run_cli(capsys, "export", "--model", str(trimmed), "--format", "compressed-tensors", "--out", str(out))
    assert "the checkpoint is trimmed (experts_kept)" in line and not out.exists()


def test_cli_compress_target_vllm_then_export(tiny_model_dir, calib_file, tmp_path):
    """The commands the README gives: compress --target vllm (GPTQ, static act-order), export, load."""
    from moepress.cli import main

    checkpoint, out = str(tmp_path / "q"), str(tmp_path / "ct")
    assert main(["compress", "--model", tiny_model_dir("qwen2_moe"), "--calib", calib_file, "--calib-samples", "4",
                 "--seq-len", "64", "--bits", "4", "--target", "vllm", "--out", checkpoint, "--quiet"]) == 0
    assert main(["export", "--model", checkpoint, "--format", "compressed-tensors", "--out", out]) == 0
    config = _quantization_config(out)
    (group,) = config["config_groups"].values()
    assert group["weights"]["symmetric"] and group["weights"]["actorder"] == "weight"
    assert {"lm_head", "model.layers.1.mlp.gate", "model.layers.1.mlp.shared_expert_gate"} <= set(config["ignore"])
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(loaded, ids), _logits(load_model(checkpoint), ids), rtol=0, atol=0)


def test_kept_attention_is_ignored_and_stored_as_it_was(tiny_model_dir, calib_file, tmp_path):
    """--keep-attention under --target vllm: the attention linears are 16-bit weights in ``ignore``."""
    checkpoint, out = str(tmp_path / "q"), str(tmp_path / "ct")
    compress(tiny_model_dir("mixtral"), out=checkpoint, bits=4, target="vllm", quantize_attention=False,
             calib=calib_file, **SMALL)
    export_compressed_tensors(checkpoint, out)
    assert {"model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.o_proj"} <= set(_quantization_config(out)["ignore"])
    assert _tensors(out)["model.layers.0.self_attn.q_proj.weight"][0] == "F32"
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(out), ids), _logits(load_model(checkpoint), ids))


def test_footprint_counts_an_exports_compressed_linears_as_held(exported):
    """moepress eval on an export: a compressed-tensors linear holds weight_packed/scale/shape (no
    .weight until its first forward); its bytes are those tensors', not a traceback."""
    from moepress.evaluate.footprint import measure_footprint

    _, out = exported("mixtral", "W4A16")
    model = AutoModelForCausalLM.from_pretrained(out)
    attention = [m for name, m in model.named_modules() if ".self_attn." in name and isinstance(m, torch.nn.Linear)]
    assert attention and all(getattr(m, "weight", None) is None for m in attention)  # still compressed
    held = sum(t.numel() * t.element_size() for m in attention for n, t in m.named_parameters() if n.startswith("weight"))
    footprint = measure_footprint(model)
    assert footprint.bytes_by_kind["attn"] == held
    assert 8 * held / footprint.params_by_kind["attn"] < 5  # int4 codes with bf16 scales per 128

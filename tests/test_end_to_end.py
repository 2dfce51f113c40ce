"""Load, calibrate, quantize, save, reload and evaluate every supported architecture end to end."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import moepress
from moepress.export.checkpoint import read_tensors
from moepress.pipeline.source import safetensors_files
from moepress.model import MoEView
from moepress.runtime import PackedExperts, PackedLinear

from moepress.model import ARCHITECTURES

SMALL = dict(calib_samples=8, seq_len=64, batch_size=4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_compress_save_reload_evaluate(arch, tiny_model_dir, calib_file, tmp_path):
    source = tiny_model_dir(arch)
    out = str(tmp_path / "out")
    result = moepress.compress(source, bits=3, group_size=128, calib=calib_file, out=out, progress=False, **SMALL)

    # Every compressible unit is packed; the routers are untouched.
    view = MoEView(result.model)
    assert set(result.units) == set(view.unit_shapes())
    for layer in range(view.num_layers):
        for unit in view.linear_units(layer):
            assert isinstance(result.model.get_submodule(unit.module_path), PackedLinear), unit.name
        store = view.experts(layer)
        if store is not None:
            assert isinstance(store.module, PackedExperts)
            assert isinstance(view.router(layer).weight, torch.nn.Parameter)

    # The checkpoint: config with the quantizer's unit map, tokenizer, safetensors, moepress.json.
    files = set(os.listdir(out))
    assert {"config.json", "moepress.json", "model.safetensors.index.json", "tokenizer.json"} <= files
    # One shard for the embeddings and head, then one per decoder layer.
    assert sorted(f for f in files if f.endswith(".safetensors")) == [
        f"model-{i:05d}-of-{view.num_layers + 1:05d}.safetensors" for i in range(1, view.num_layers + 2)]
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    record = json.load(open(os.path.join(out, "moepress.json")))
    assert record["bits"] == 3 and record["group_size"] == 128 and record["method"] == "gptq"
    assert record["calibration"]["tokens"] == 8 * 64
    assert set(record["units"]) == set(result.units)

    # Reloaded logits equal the in-memory quantized model's, through both loading paths.
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = result.model(ids).logits
        reloaded = moepress.load(out)
        assert torch.equal(reloaded(ids).logits, expected)
        via_transformers = AutoModelForCausalLM.from_pretrained(out)
        assert torch.equal(via_transformers(ids).logits, expected)

    report = moepress.evaluate(out, reference=source, text=calib_file, seq_len=64, samples=4, progress=False)
    assert report.tokens == 4 * 63
    assert 0 < report.kl_divergence < 1.0
    assert 0.2 < report.top1_agreement <= 1.0
    assert report.footprint["linear_bytes"] < report.reference_footprint["linear_bytes"] / 7


def test_quantized_is_closer_with_more_bits(tiny_model_dir, calib_file, tmp_path):
    """KL to the original falls as bits rise (2 > 3 > 4 > 8), on the same calibration."""
    source = tiny_model_dir("mixtral")
    kls = []
    for bits in (2, 3, 4, 8):
        result = moepress.compress(source, bits=bits, group_size=64, calib=calib_file, progress=False, **SMALL)
        report = moepress.evaluate(result.model, tokenizer=result.tokenizer, reference=source, text=calib_file,
                                   seq_len=64, samples=4, progress=False)
        kls.append(report.kl_divergence)
    assert kls == sorted(kls, reverse=True), kls


def test_bytes_on_disk_match_bits(tiny_model_dir, calib_file, tmp_path):
    """The safetensors file holds what the bits imply: codes at `bits` bits plus scales and zeros."""
    source = tiny_model_dir("qwen3_moe")
    original_bytes = os.path.getsize(os.path.join(source, "model.safetensors"))
    for bits, group in ((2, 128), (3, 128), (4, 64), (8, None)):
        out = str(tmp_path / f"q{bits}")
        result = moepress.compress(source, bits=bits, group_size=group, calib=calib_file, out=out, progress=False, **SMALL)
        fp = moepress.evaluate(result.model, tokenizer=result.tokenizer, text=calib_file, seq_len=64, samples=2,
                               progress=False).footprint
        groups_per_weight = 1 / (group or 128)  # per-channel: at most one group per 128-wide row here
        overhead = (16 + bits) * groups_per_weight  # fp16 scale + a zero point at `bits` bits per group
        assert bits <= fp["bits_per_param"] <= bits + overhead + 1e-9
        # The file holds the packed linears plus the untouched 32-bit tensors (embeddings, norms, routers).
        float_bytes = fp["model_bytes"] - fp["linear_bytes"]
        on_disk = sum(os.path.getsize(f) for f in safetensors_files(out))
        assert fp["linear_bytes"] + float_bytes <= on_disk <= fp["linear_bytes"] + float_bytes + 64_000  # json headers
        assert on_disk < original_bytes


def test_router_state_is_preserved_exactly(tiny_model_dir, calib_file):
    """DeepSeek-V3's e_score_correction_bias and group-limited routing survive compression bit for bit."""
    source = tiny_model_dir("deepseek_v3")
    original = moepress.load(source)
    result = moepress.compress(source, bits=4, group_size=128, calib=calib_file, progress=False, **SMALL)
    before = dict(original.named_buffers())
    after = dict(result.model.named_buffers())
    biases = [n for n in before if n.endswith("e_score_correction_bias")]
    assert biases and all(torch.equal(before[n], after[n]) for n in biases)
    assert any(before[n].abs().sum() > 0 for n in biases)
    x = torch.randn(32, original.config.hidden_size)
    view_a, view_b = MoEView(original), MoEView(result.model)
    for layer in range(view_a.num_layers):
        if view_a.router(layer) is not None:
            ra, rb = view_a.router(layer)(x), view_b.router(layer)(x)
            assert all(torch.equal(a, b) for a, b in zip(ra, rb))


def test_dtype_casts_leave_the_packed_format_alone(tiny_model_dir, calib_file, tmp_path):
    """model.to(bfloat16) casts activations' dtype, not the packed codes/scales (a lossy format change)."""
    source = tiny_model_dir("olmoe")
    out = str(tmp_path / "out")
    moepress.compress(source, bits=4, group_size=64, calib=calib_file, out=out, progress=False, **SMALL)
    model = moepress.load(out, dtype=torch.float32, runtime="reference")  # the stored format in memory
    ids = torch.randint(0, 512, (1, 32))
    with torch.no_grad():
        full = model(ids).logits
        model.to(torch.bfloat16)
        half = model(ids).logits.float()
    dtypes = {(type(m).__name__, b.dtype) for m in model.modules() for n, b in m.named_buffers(recurse=False)
              if n in ("qweight", "scales", "zeros")}
    assert dtypes == {("PackedWeight", torch.uint8), ("PackedWeight", torch.float16),
                      ("PackedLinear", torch.uint8), ("PackedLinear", torch.float16)}
    assert (half.argmax(-1) == full.argmax(-1)).float().mean() > 0.9


def test_act_order_modes_from_the_command_line(tiny_model_dir, calib_file, tmp_path):
    """Static act-order is the default and stores no group index; --act-order alone is dynamic (g_idx
    per input column); both reload through from_pretrained to the same logits as in memory."""
    from moepress.cli import main

    source = tiny_model_dir("mixtral")
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    for flags, mode, has_g_idx in (([], "static", False), (["--act-order"], "dynamic", True),
                                   (["--act-order", "off"], "off", False)):
        out = str(tmp_path / mode)
        assert main(["compress", "--model", source, "--out", out, "--calib", calib_file, "--calib-samples", "4",
                     "--seq-len", "64", "--bits", "3", "--group-size", "32", "--quiet", *flags]) == 0
        record = json.load(open(os.path.join(out, "moepress.json")))
        assert record["act_order"] == mode
        assert any(k.endswith("g_idx") for k in read_tensors(out)) == has_g_idx
        with torch.no_grad():
            torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(ids).logits,
                                       moepress.load(out)(ids).logits)

"""The fast CPU runtime (moepress.runtime.fast): a checkpoint prepared for the kernels computes what the
reference runtime computes, through the kernels it claims, in about the packed bytes.

Tolerances, and why: in float32 the fast runtime computes the reference's weights bit for bit (the
dequantize kernel uses the reference's arithmetic, in the same summation order), so its logits are
*equal* (tolerance 0). In bf16 the int4/int8 kernels take their scales (and the int4 kernel its float
zero point) rounded to bf16, and compute in their own order, so a module's outputs differ from the
reference's bf16 outputs; they must stay within 4x of the difference the reference itself makes by
computing in bf16 (its outputs against the same module in float32): the fast kernels add at most
about twice the reference's own bf16 rounding, both measured against float32. That bound is checked
module by module on the same inputs: a whole model's bf16 logits can move much further when a
rounding difference flips a near-tied router choice, which says nothing about the kernels.
"""

from __future__ import annotations

import pytest
import torch
import yaml

import moepress
from moepress.errors import MoepressError
from moepress.evaluate.footprint import measure_footprint
from moepress.model import MoEView
from moepress.runtime import PackedExperts
from moepress.runtime.fast import FastExperts, FastLinear, FastOptions, kernel_counts, prepare, resident_bytes

SMALL = dict(calib_samples=4, seq_len=64, batch_size=4, progress=False)

# name -> (architecture, compress options); plans are written by _plan below
CHECKPOINTS = {
    "4b": ("mixtral", dict(bits=4, group_size=32)),
    "3b": ("mixtral", dict(bits=3, group_size=64)),
    "2b": ("mixtral", dict(bits=2, group_size=32)),
    "8b-ch": ("mixtral", dict(bits=8, group_size=None)),
    "8b-g64": ("mixtral", dict(bits=8, group_size=64)),
    "4b-ch-sym": ("mixtral", dict(bits=4, group_size=None, symmetric=True)),
    "4b-act-order": ("mixtral", dict(bits=4, group_size=32, act_order="dynamic")),
    "4b-drop-experts": ("olmoe", dict(bits=4, group_size=64, drop_experts="25%", top_k=1)),
    "qwen3-3b": ("qwen3_moe", dict(bits=3, group_size=32)),
    "qwen2-4b": ("qwen2_moe", dict(bits=4, group_size=128)),
    "deepseek-mixed": ("deepseek_v3", "mixed"),
    "mixtral-mixed": ("mixtral", "mixed"),
}


def _plan(source: str, path) -> str:
    """A plan with a bit of everything: experts at 2/3/4/8/16 bits with their own group sizes, a
    per-channel one, act-order dynamic, two pruned (2:4 + 4 bits, 50% kept in float), one split into
    neuron groups of 2, 3, 16 and 4 bits; attention and shared experts at mixed widths."""
    view = MoEView(moepress.load(source, runtime="reference"))
    expert_options = ["2b-g32", "3b-g64", "8b-ch", "16b", "2:4+4b-g32", "50%",
                      {"bits": 4, "group_size": 32, "act_order": "dynamic"}, "4b-g128"]
    attention_options = ["3b-g32", "8b-g64", "4b-ch", "2b-g32", "4b-g32"]
    units = {}
    for layer in range(view.num_layers):
        for k, unit in enumerate(view.linear_units(layer)):
            units[unit.name] = attention_options[(k + layer) % len(attention_options)]
        store = view.experts(layer)
        if store is None:
            continue
        for e in range(store.num_experts):
            units[f"layers.{layer}.experts.{e}"] = expert_options[(e + layer) % len(expert_options)]
        for k, option in enumerate(["2b-g32", "3b-g32", "16b", "4b-g32"]):  # one split expert per layer
            units[f"layers.{layer}.experts.{(layer + 1) % store.num_experts}.channels.{k}"] = option
    with open(path, "w") as f:
        yaml.safe_dump({"moepress_plan": 1, "channel_group": 32, "units": units}, f)
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir, calib_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    made = {}

    def make(name: str) -> str:
        if name not in made:
            arch, options = CHECKPOINTS[name]
            source, out = tiny_model_dir(arch), str(root / name)
            if options == "mixed":
                moepress.compress(source, plan=_plan(source, root / f"{name}.yaml"), calib=calib_file, out=out, **SMALL)
            else:
                moepress.compress(source, calib=calib_file, out=out, **options, **SMALL)
            made[name] = out
        return made[name]

    return make


def _ids(batch: int, length: int) -> torch.Tensor:
    return torch.randint(1, 500, (batch, length), generator=torch.Generator().manual_seed(batch * 100 + length))


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_float32_logits_equal_the_reference_runtimes(checkpoints, name):
    out = checkpoints(name)
    reference, fast = moepress.load(out, runtime="reference"), moepress.load(out)
    counts = kernel_counts(fast)
    assert "unprepared" not in counts and counts["dequant"] > 0, counts
    assert set(counts) <= {"dequant", "dense", "reference"}, counts  # float32: the exact kernels only
    pruned = name.endswith("mixed")
    assert ("reference" in counts) == pruned  # pruned weights (only) keep the reference's dequantize
    with torch.no_grad():
        for ids in (_ids(2, 12), _ids(1, 1)):  # many tokens per expert, and one decoded token
            assert torch.equal(fast(ids).logits, reference(ids).logits)
        generated = [m.generate(_ids(1, 4), max_new_tokens=4, do_sample=False, pad_token_id=0)
                     for m in (reference, fast)]
    assert torch.equal(*generated)


def _bf16_within_rounding(fast_module, ref_module, *args):
    """``fast_module(*args)`` against ``ref_module``'s bf16 and float32 outputs (see the docstring)."""
    with torch.no_grad():
        got = fast_module(*args).float()
        ref = ref_module(*args).float()
        exact = ref_module(*(a.float() if a.is_floating_point() else a for a in args)).float()
    own = (ref - exact).abs().max()
    assert own > 0  # the reference does round in bf16: the bound below is not vacuous
    assert (got - ref).abs().max() <= 4 * own, f"{(got - ref).abs().max()} vs the reference's own {own}"


EXPECTED_BF16_KERNELS = {  # the kernels the weights of each checkpoint reach in a bf16 model
    "4b": {"int4"}, "3b": {"int4", "int4-planes"}, "2b": {"int4", "int4-planes"}, "8b-ch": {"int8"},
    "8b-g64": {"dequant"}, "4b-ch-sym": {"int4"}, "4b-act-order": {"int4"}, "qwen3-3b": {"int4", "int4-planes"},
    "qwen2-4b": {"int4"}, "4b-drop-experts": {"int4"},
}


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_bf16_kernels_stay_within_bf16_rounding_of_the_reference(checkpoints, name):
    out = checkpoints(name)
    reference = moepress.load(out, dtype=torch.bfloat16, runtime="reference")
    fast = moepress.load(out, dtype=torch.bfloat16)
    counts = kernel_counts(fast)
    if name in EXPECTED_BF16_KERNELS:
        assert set(counts) == EXPECTED_BF16_KERNELS[name], counts
    else:  # the mixed plans reach every kernel
        assert {"int4", "int4-planes", "int8", "dequant", "dense", "reference"} <= set(counts), counts
    g = torch.Generator().manual_seed(0)
    checked = 0
    for path, module in fast.named_modules():
        if isinstance(module, FastLinear):
            x = torch.randn(5, module.in_features, generator=g).bfloat16()
            _bf16_within_rounding(module, reference.get_submodule(path), x)
            checked += 1
        elif isinstance(module, FastExperts):
            ref_module = reference.get_submodule(path)
            assert isinstance(ref_module, PackedExperts)
            for tokens in (1, 9):
                hidden = torch.randn(tokens, module.hidden_size, generator=g).bfloat16()
                top_k = torch.stack([torch.randperm(module.num_experts, generator=g)[:2] for _ in range(tokens)])
                weights = torch.rand(tokens, 2, generator=g)
                _bf16_within_rounding(module, ref_module, hidden, top_k, weights)
            checked += 1
    assert checked > 0


def test_the_fast_path_never_dequantizes_a_packed_weight(checkpoints, monkeypatch):
    """Only pruned weights may still go through the reference's dequantize."""
    from moepress.quantize.packed import QuantizedWeight

    models = [moepress.load(checkpoints(n), dtype=dtype) for n in ("4b", "3b", "8b-ch", "4b-act-order")
              for dtype in (torch.float32, torch.bfloat16)]

    def refuse(*args, **kwargs):
        raise AssertionError("a packed weight was dequantized by the reference path")

    monkeypatch.setattr(QuantizedWeight, "dequantize", refuse)
    with torch.no_grad():
        for model in models:
            model(_ids(2, 8))
            model(_ids(1, 1))


@pytest.mark.parametrize("name", ["4b", "3b", "2b", "4b-ch-sym", "deepseek-mixed"])
def test_runtime_memory_stays_near_the_packed_bytes(checkpoints, name):
    """Tensor bytes after prepare against before (each storage counted once), as shares of the packed
    linear bytes. Float32 (the dequantize kernel) holds the stored bytes: the codes re-laid out in as
    many bytes, the very scale and zero tensors (a group index becomes an int32 column order: + 2
    bytes a column): within 1%. bf16's int4 kernel takes a (scale, zero) pair of bf16 for each group,
    4 bytes against the stored 2 + bits/8 (2 when symmetric): at most 2/32 byte more per weight at group
    32 (``widen="none"``; 17% of a 2-bit model's packed bytes, whose zero points take 2 bits). The
    default also holds the always-active linears' 2/3-bit codes as 4-bit ones: at most their share of
    the packed bytes more (a few percent of a real MoE's, 6-25% of these tiny models'); ``widen="all"``
    at most the packed bytes again."""
    out = checkpoints(name)
    for dtype in (torch.float32, torch.bfloat16):
        for widen in ("none", "dense", "all"):
            model = moepress.load(out, dtype=dtype, runtime="reference")
            footprint, before = measure_footprint(model), resident_bytes(model)
            packed = footprint.linear_bytes
            always_active = packed - footprint.bytes_by_kind.get("experts", 0)
            growth = resident_bytes(prepare(model, FastOptions(widen=widen))) - before
            if dtype == torch.float32:
                bound = 0.01 * packed
            else:
                bound = footprint.linear_params * 2 / 32 + {"none": 0, "dense": always_active, "all": packed}[widen]
            assert growth <= bound, (dtype, widen, growth, packed)
            if dtype == torch.bfloat16 and widen == "all" and name in ("2b", "3b"):
                assert growth > 0.3 * packed  # widening really holds them as 4-bit codes


@pytest.mark.parametrize("name", ["4b", "3b", "8b-ch", "deepseek-mixed"])
def test_exact_kernels_give_the_reference_bf16_logits(checkpoints, name):
    out = checkpoints(name)
    fast = moepress.load(out, dtype=torch.bfloat16, runtime=FastOptions(exact=True))
    assert not {"int4", "int4-planes", "int8", "unprepared"} & set(kernel_counts(fast))
    reference = moepress.load(out, dtype=torch.bfloat16, runtime="reference")
    with torch.no_grad():
        for ids in (_ids(2, 12), _ids(1, 1)):
            assert torch.equal(fast(ids).logits, reference(ids).logits)


def test_kernels_fall_back_when_torch_lacks_them(checkpoints, monkeypatch):
    """Without the int4/int8 ops (an older or different torch build) every weight gets the exact
    dequantize kernel: the bf16 logits then equal the reference's."""
    from moepress.runtime import kernels

    out = checkpoints("4b")
    monkeypatch.setattr(kernels, "_op", lambda name: None)
    kernels.int4_supported.cache_clear()
    kernels.int8_supported.cache_clear()
    try:
        fast = moepress.load(out, dtype=torch.bfloat16)
        assert set(kernel_counts(fast)) == {"dequant"}
        reference = moepress.load(out, dtype=torch.bfloat16, runtime="reference")
        with torch.no_grad():
            assert torch.equal(fast(_ids(2, 8)).logits, reference(_ids(2, 8)).logits)
    finally:
        kernels.int4_supported.cache_clear()
        kernels.int8_supported.cache_clear()


def test_dynamic_pruning_skips_the_same_slots(checkpoints):
    out = checkpoints("4b")
    reference = moepress.load(out, runtime="reference", dynamic_pruning="0.6")
    fast = moepress.load(out, dynamic_pruning="0.6")
    with torch.no_grad():
        assert torch.equal(fast(_ids(2, 12)).logits, reference(_ids(2, 12)).logits)


def test_runtime_choices(checkpoints, tiny_model_dir):
    out = checkpoints("4b")
    assert isinstance(MoEView(moepress.load(out, runtime="reference")).experts(0).module, PackedExperts)
    model = moepress.load(out)
    assert isinstance(MoEView(model).experts(0).module, FastExperts)  # the view still reads its layers
    assert prepare(model) is model and kernel_counts(prepare(model)) == kernel_counts(model)  # once is enough
    with pytest.raises(MoepressError, match="runtime must be one of fast, reference"):
        moepress.load(out, runtime="turbo")
    assert kernel_counts(moepress.load(tiny_model_dir("mixtral"))) == {}  # an uncompressed model is left alone
    with pytest.raises(RuntimeError, match="laid out for the CPU"):
        model.to("meta")

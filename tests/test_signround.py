"""SignRound refinement after GPTQ (moepress.quantize.signround, moepress.refine, ``--refine``)."""

import copy

import pytest
import torch

from moepress.compress import CompressConfig, quantize_model
from moepress.errors import MoepressError
from moepress.model.tiny import build_tiny_model
from moepress.model.view import MoEView
from moepress.pipeline.runner import LayerwiseRunner
from moepress.quantize import QuantizedWeight, QuantSpec, gptq_quantize
from moepress.quantize.signround import SCALE_RANGE, SignRoundWeight

SPECS = [
    QuantSpec(bits=2, group_size=32),
    QuantSpec(bits=3, group_size=None),
    QuantSpec(bits=4, group_size=64, symmetric=True),
    QuantSpec(bits=3, group_size=32, act_order=True, static_groups=True),
    QuantSpec(bits=2, group_size=32, act_order=True),  # dynamic: a g_idx per expert
]


def _gptq(spec, experts=3, out=16, inp=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(experts, out, inp, generator=g)
    x = torch.randn(experts, 256, inp, generator=g) * torch.linspace(0.2, 3, inp)
    h = x.transpose(1, 2) @ x / 256
    return w, h, gptq_quantize(w, h, spec).weight


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_start_is_gptq_bit_for_bit(spec):
    w, _, q = _gptq(spec)
    srw = SignRoundWeight(w, q)
    assert torch.equal(srw.dequantize(), q.dequantize())
    again = srw.quantized()
    for name, tensor in q.tensors().items():
        assert torch.equal(again.tensors()[name], tensor), name


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_refined_codes_stay_on_the_grid_and_round_trip(spec):
    w, _, q = _gptq(spec)
    srw = SignRoundWeight(w, q)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # any state the steps can reach, at the edges of the ranges too
        srw.round_offset.copy_(torch.rand(srw.round_offset.shape, generator=g) - 0.5)
        srw.scale_factor.copy_(SCALE_RANGE[0] + torch.rand(srw.scale_factor.shape, generator=g)
                               * (SCALE_RANGE[1] - SCALE_RANGE[0]))
        if srw.zero_shift is not None:
            srw.zero_shift.copy_(torch.rand(srw.zero_shift.shape, generator=g) * 2 - 1)
    refined = srw.quantized()
    codes = refined.codes()
    assert int(codes.max()) <= q.maxq and refined.bits == q.bits and refined.group_size == q.group_size
    assert not torch.equal(codes, q.codes())  # the state did change the codes
    if q.g_idx is None:
        assert refined.g_idx is None  # static act-order and plain groups: no group index appears
    else:
        assert torch.equal(refined.g_idx, q.g_idx)
    stored = QuantizedWeight.from_tensors(refined.tensors(), refined.meta())  # validates the format
    assert torch.equal(stored.dequantize(), srw.dequantize().detach())  # what is optimised is what is stored


def test_sign_steps_lower_the_output_error_of_a_linear():
    """Refinement on a linear's own output (the paper's setting) from GPTQ's start."""
    from moepress.quantize.signround import learning_rate

    spec = QuantSpec(bits=2, group_size=64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 128, generator=g) @ (torch.randn(128, 128, generator=g) * 0.3 + torch.eye(128))
    w = torch.randn(64, 128, generator=g) * 0.05
    q = gptq_quantize(w, x.T @ x / len(x), spec).weight
    srw = SignRoundWeight(w, q)

    def error():
        return ((x @ (w - srw.dequantize()).T) ** 2).mean()

    start, steps = error().item(), 100
    for step in range(steps):
        error().backward()
        srw.step(learning_rate(step, steps))
    assert error().item() < start


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_scale_refinement_holds_gptqs_codes(spec):
    """learn="scales": whatever the scale factors become, the stored codes, zeros and g_idx are GPTQ's
    and only the fp16 scales differ; what is optimised is what is stored."""
    w, _, q = _gptq(spec)
    srw = SignRoundWeight(w, q, learn="scales")
    assert torch.equal(srw.dequantize(), q.dequantize()) and srw.round_offset is None
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        srw.scale_factor.copy_(SCALE_RANGE[0] + torch.rand(srw.scale_factor.shape, generator=g)
                               * (SCALE_RANGE[1] - SCALE_RANGE[0]))
    refined = srw.quantized()
    assert torch.equal(refined.codes(), q.codes())
    for name in ("zeros", "g_idx"):
        a, b = getattr(refined, name), getattr(q, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert not torch.equal(refined.scales, q.scales)
    stored = QuantizedWeight.from_tensors(refined.tensors(), refined.meta())
    assert torch.equal(stored.dequantize(), srw.dequantize().detach())


def test_scale_steps_lower_a_linears_output_error_from_the_first_step():
    """With the codes held the loss is smooth in the scales: Adam's steps lower it monotonically on a
    fixed batch (SignRound's signed steps from GPTQ's codes first raise it)."""
    spec = QuantSpec(bits=2, group_size=64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 128, generator=g) @ (torch.randn(128, 128, generator=g) * 0.3 + torch.eye(128))
    w = torch.randn(64, 128, generator=g) * 0.05
    q = gptq_quantize(w, x.T @ x / len(x), spec).weight
    srw = SignRoundWeight(w, q, learn="scales")

    def error():
        return ((x @ (w - srw.dequantize()).T) ** 2).mean()

    losses = []
    for step in range(20):
        loss = error()
        losses.append(loss.item())
        loss.backward()
        srw.refine_step(step, 20)
    assert error().item() < 0.97 * losses[0]
    assert losses[1] < losses[0]
    with pytest.raises(ValueError, match="refine_step"):
        srw.step(0.01)


def _held_out_layer_error(reference, compressed, tokens, layer):
    """Mean squared difference between ``compressed``'s and ``reference``'s decoder layer ``layer`` on
    the unquantized model's inputs to that layer for ``tokens``."""
    runner = LayerwiseRunner(reference, MoEView(reference), tokens, torch.device("cpu"), batch_size=4)
    runner.capture_inputs()
    for earlier in range(layer):
        runner.run_layer(earlier, update=True)
    total = count = 0
    with torch.no_grad():
        for hidden, kwargs in zip(runner.hidden, runner.layer_kwargs):
            kwargs = dict(kwargs)
            want = MoEView(reference).layers[layer](hidden, **kwargs)
            got = MoEView(compressed).layers[layer](hidden, **kwargs)
            want, got = (t[0] if isinstance(t, tuple) else t for t in (want, got))
            total += float((got - want).square().sum())
            count += want.numel()
    return total / count


@pytest.mark.parametrize("arch,layer,options", [
    ("mixtral", 0, {}),
    ("mixtral", 0, {"expert_chunk": 2}),
    ("mixtral", 0, {"refine_frozen_routing": True}),
    ("mixtral", 0, {"refine_params": "rounding"}),
    ("mixtral", 0, {"refine_params": "rounding", "refine_from": "rtn"}),
    ("deepseek_v3", 1, {}),  # a shared expert and MLA attention beside the routed experts
])
def test_refinement_lowers_the_held_out_layer_error(arch, layer, options):
    reference = build_tiny_model(arch)
    g = torch.Generator().manual_seed(0)
    calibration = torch.randint(1, 512, (8, 32), generator=g)
    held_out = torch.randint(1, 512, (8, 32), generator=g)  # windows the refinement never saw
    errors = {}
    for steps in (0, 30):
        model = copy.deepcopy(reference)
        config = CompressConfig(bits=2, group_size=128, calib_samples=8, seq_len=32, batch_size=4, refine=steps,
                                **(options if steps else {}))
        _, _, profile = quantize_model(model, calibration, config, progress=False)
        errors[steps] = _held_out_layer_error(reference, model, held_out, layer)
        if steps:
            before, after = profile.tensors[f"layers.{layer}.refine.output_error"].tolist()
            assert after < before  # on the calibration windows
    assert errors[30] < 0.9 * errors[0], errors


def test_refine_zero_is_plain_gptq(monkeypatch):
    import moepress.refine

    def refuse(*_args, **_kwargs):
        raise AssertionError("--refine 0 must not refine")

    monkeypatch.setattr(moepress.refine, "begin", refuse)
    tokens = torch.randint(1, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    states, profiles = [], []
    for options in ({}, {"refine": 0}):
        model = build_tiny_model("mixtral")
        config = CompressConfig(bits=3, group_size=128, calib_samples=4, seq_len=32, **options)
        _, _, profile = quantize_model(model, tokens, config, progress=False)
        states.append(model.state_dict())
        profiles.append(profile)
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not any("refine" in k for k in profiles[1].tensors)


def test_refine_options_are_checked_up_front():
    with pytest.raises(MoepressError, match="--refine"):
        CompressConfig(bits=4, refine=-1)
    CompressConfig(bits=4, refine=10, target="llamacpp")  # the block formats' float16 scales
    with pytest.raises(MoepressError, match="llama.cpp"):
        CompressConfig(bits=4, refine=10, target="llamacpp", refine_params="rounding")
    with pytest.raises(MoepressError, match="--drop-experts"):
        CompressConfig(bits=4, refine=10, drop_experts="25%")
    with pytest.raises(MoepressError, match="refine-from"):
        CompressConfig(bits=4, refine=10, refine_from="hqq")
    with pytest.raises(MoepressError, match="act-order"):
        CompressConfig(bits=4, refine=10, refine_from="rtn", refine_params="rounding", act_order="dynamic")
    with pytest.raises(MoepressError, match="refine-params rounding"):
        CompressConfig(bits=4, refine=10, refine_from="rtn")
    with pytest.raises(MoepressError, match="refine-params"):
        CompressConfig(bits=4, refine=10, refine_params="codes")


def test_memory_formula_counts_the_refinement():
    from types import SimpleNamespace

    from moepress.pipeline.memory import estimate

    source = SimpleNamespace(model=build_tiny_model("mixtral"))
    plain = estimate(source, calib_samples=16, seq_len=64)
    refined = estimate(source, calib_samples=16, seq_len=64, refine=50)
    chunked = estimate(source, calib_samples=16, seq_len=64, refine=50, expert_chunk=1)
    assert plain.refinement == 0 and refined.peak == plain.peak + refined.refinement
    assert 0 < chunked.refinement < refined.refinement  # the chunk's share scales with --expert-chunk
    assert refined.refinement >= 4 * 16 * 64 * 128  # at least the unquantized layer's outputs


def test_compress_command_refines_by_default_where_refinement_applies(tiny_model_dir, calib_file, tmp_path):
    """``moepress compress`` without --refine refines (REFINE_STEPS; 2 in the tests, see conftest) and
    records it; where refinement does not apply yet the default is 0, never a refusal."""
    import json

    import moepress.refine
    from moepress.cli import main
    from moepress.refine import default_steps

    steps = moepress.refine.REFINE_STEPS
    assert default_steps(CompressConfig(bits=3)) == steps
    assert default_steps(CompressConfig(bits=4, target="llamacpp")) == steps
    assert default_steps(CompressConfig(bits=4, drop_experts="25%")) == 0
    assert default_steps(CompressConfig(bits=16, prune="2:4")) == 0
    assert default_steps(CompressConfig(bits=4), joint=True) == 0
    out = str(tmp_path / "out")
    assert main(["compress", "--model", tiny_model_dir("mixtral"), "--calib", calib_file, "--bits", "3",
                 "--calib-samples", "4", "--seq-len", "32", "--out", out, "--quiet"]) == 0
    record = json.load(open(f"{out}/moepress.json"))
    assert record["refine"]["steps"] == steps
    assert record["refine"]["params"] == "scales"

"""Channel-level mixed precision (001's neuron groups): an expert's intermediate neurons split into
groups with their own bit widths. GPTQ over column segments keeps error feedback across groups, the
cost table's per-neuron damage adds up to the whole expert's, a channel plan is applied exactly, its
bytes are the checkpoint's, and half the neurons at 2 bits and half at 3 is a 2.5-bit expert."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import moepress
from moepress.allocate import Budget, allocate, load_plan
from moepress.compress import CompressConfig, quantize_model
from moepress.costs import build_cost_table, channel_key, model_rows
from moepress.treatment import KEEP, Treatment
from moepress.errors import MoepressError
from moepress.model import MoEView
from moepress.model.tiny import build_tiny_model, unfuse_experts
from moepress.quantize import QuantSpec, gptq_quantize, gptq_quantize_segments, hessian_weighted_error
from moepress.runtime import SplitWeight

OPTIONS_G32 = [Treatment.quantize(b, 32) for b in (2, 3, 4, 8)] + [KEEP]


def _problem(out=48, cols=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3  # correlated inputs
    return torch.randn(out, cols, generator=g), x.T @ x / len(x)


def _dequant(piece):
    return piece.float() if isinstance(piece, torch.Tensor) else piece.dequantize(torch.float32)


def test_segments_of_one_spec_are_plain_gptq():
    w, h = _problem()
    spec = QuantSpec(3, 32)
    pieces, loss = gptq_quantize_segments(w, h, [(64, spec), (64, spec)])
    whole = gptq_quantize(w, h, spec)
    assert torch.equal(torch.cat([_dequant(p) for p in pieces], 1), whole.weight.dequantize())
    assert loss == pytest.approx(float(whole.loss), rel=1e-5)


def test_mixed_segments_sit_between_their_uniform_options_and_keep_error_feedback():
    w, h = _problem()
    low, high = QuantSpec(2, 32), QuantSpec(4, 32)

    def err(pieces):
        return float(hessian_weighted_error(w, torch.cat([_dequant(p) for p in pieces], 1), h))

    mixed = err(gptq_quantize_segments(w, h, [(64, low), (64, high)])[0])
    e_low = float(hessian_weighted_error(w, gptq_quantize(w, h, low).weight.dequantize(), h))
    e_high = float(hessian_weighted_error(w, gptq_quantize(w, h, high).weight.dequantize(), h))
    assert e_high < mixed < e_low
    # The first segment's error is compensated by the later columns: better than quantizing the two
    # segments on their own diagonal blocks of H.
    alone = [gptq_quantize(w[:, :64], h[:64, :64], low).weight, gptq_quantize(w[:, 64:], h[64:, 64:], high).weight]
    assert mixed < err(alone)
    # A kept (None) segment stores the error-updated float columns, and beats keeping the originals.
    pieces, _ = gptq_quantize_segments(w, h, [(64, low), (64, None)])
    assert isinstance(pieces[1], torch.Tensor) and pieces[1].shape == (48, 64)
    assert err(pieces) < err([pieces[0], w[:, 64:]])
    with pytest.raises(ValueError, match="segments cover"):
        gptq_quantize_segments(w, h, [(64, low)])


def test_split_weight_concatenates_its_pieces():
    w, h = _problem(out=64)
    top = gptq_quantize(w[:32], h, QuantSpec(2, 32)).weight
    bottom = w[32:].to(torch.bfloat16)
    split = SplitWeight([top, bottom], axis=0)
    assert torch.equal(split.dequantize(), torch.cat([top.dequantize(), bottom.float()]))
    assert split.nbytes() == top.nbytes() + bottom.numel() * 2
    assert split.out_features == 64 and split.in_features == 128 and split.bits == 16


@pytest.fixture(scope="module")
def table_and_tokens(tiny_model_dir, calib_file, tokenizer):
    from moepress.data import load_text, token_windows

    model = moepress.load(tiny_model_dir("mixtral"))
    tokens = token_windows(load_text(calib_file), tokenizer, 64, 4, seed=0)
    return build_cost_table(model, tokens, OPTIONS_G32, progress=False), tokens


def test_neuron_damage_adds_up_to_the_expert(table_and_tokens, tmp_path):
    table, _ = table_and_tokens
    experts = table.groups("expert", "gptq")
    channels = table.groups("channel", "gptq", channel_group=32)
    for name, damage, nbytes in zip(experts.names, experts.damage, experts.bytes):
        if ".experts." not in name:
            continue
        mine = [i for i, n in enumerate(channels.names) if n.startswith(name + ".channels.")]
        assert len(mine) == 4  # 128 neurons / 32
        np.testing.assert_allclose(channels.damage[mine].sum(0), damage, rtol=1e-4, atol=1e-9)
        assert np.array_equal(channels.bytes[mine].sum(0), nbytes)  # group-aligned pieces cost the same
    # Saved and loaded with the table.
    table.save(str(tmp_path / "t.safetensors"))
    again = type(table).load(str(tmp_path / "t.safetensors"))
    np.testing.assert_allclose(again.groups("channel", "hawq", channel_group=32).damage,
                               table.groups("channel", "hawq", channel_group=32).damage, rtol=1e-5)
    with pytest.raises(MoepressError, match="does not tile a channel group of 16"):
        table.groups("channel", "gptq", channel_group=16)
    with pytest.raises(MoepressError, match="does not divide"):
        table.groups("channel", "gptq", channel_group=96)


def test_channel_ilp_fits_and_is_at_least_as_good_as_expert_ilp(table_and_tokens):
    table, _ = table_and_tokens
    for bits in ("2.25bits", "2.5bits", "3bits"):
        budget = Budget.parse(bits)
        by_expert = allocate(table, budget, "ilp", granularity="expert", group_size=32)
        by_channel = allocate(table, budget, "ilp", granularity="channel", channel_group=32, group_size=32)
        assert by_channel.totals["budget_scope_bytes"] <= by_channel.budget["bytes"]
        # Every expert plan is also a channel plan (all groups alike), and damages add up (to the float32
        # rounding of the stored per-neuron damage).
        expert_damage = by_expert.totals["predicted_damage"]["value"]
        assert by_channel.totals["predicted_damage"]["value"] <= expert_damage * (1 + 1e-6)


def _channel_plan(table, path, group, options):
    """A hand-written channel plan: expert ``group``'s four neuron groups at ``options``, the rest 3 bits."""
    plan = allocate(table, Budget.parse("3bits"), "uniform", granularity="channel", channel_group=32, group_size=32)
    plan.save(path)
    text = open(path).read()
    for k, option in enumerate(options):
        key = channel_key(group, k)
        text = text.replace(f"  {key}: 3b-g32\n", f"  {key}: {option}\n")
    open(path, "w").write(text)
    return load_plan(path)


def test_channel_plan_is_applied_exactly_and_bytes_match_checkpoint(table_and_tokens, tiny_model_dir, calib_file,
                                                                     tmp_path):
    from moepress.export.checkpoint import read_tensors

    table, _ = table_and_tokens
    source = tiny_model_dir("mixtral")
    plan = _channel_plan(table, str(tmp_path / "plan.yaml"), "layers.1.experts.2", ["2b-g32", "2b-g32", "3b-g32", "16b"])
    out = str(tmp_path / "out")
    result = moepress.compress(source, plan=plan, calib=calib_file, out=out, progress=False,
                               calib_samples=4, seq_len=64, batch_size=4)
    record = json.load(open(os.path.join(out, "moepress.json")))
    for linear, axis in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
        unit = record["units"][f"layers.1.experts.2.{linear}"]
        assert unit["axis"] == axis and [p["bits"] for p in unit["pieces"]] == [2, 2, 3, 16]
    assert "pieces" not in record["units"]["layers.1.experts.1.down_proj"]  # 3 bits throughout: not split

    # The kept group really is the original weights (gate/up rows are never touched by GPTQ).
    original = MoEView(moepress.load(source)).experts(1).weight("gate_proj")[2]
    packed = MoEView(result.model).experts(1).module.packed_weight(2, "gate_proj")
    assert isinstance(packed, SplitWeight)
    assert torch.equal(packed.dequantize()[96:], original[96:].float())

    rows = model_rows(MoEView(moepress.load(source)))
    expert_bytes = sum(t.numel() * t.element_size() for k, t in read_tensors(out).items() if ".experts." in k)
    assert expert_bytes == plan.accounting(rows)["bytes_by_kind"]["expert"]

    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        expected = result.model(ids).logits
        assert torch.equal(moepress.load(out)(ids).logits, expected)
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(ids).logits.float(), expected.float(),
                                   rtol=1e-3, atol=1e-3)


def test_half_the_neurons_at_two_bits_and_half_at_three_is_a_two_and_a_half_bit_expert(table_and_tokens, tmp_path):
    table, _ = table_and_tokens
    plan = _channel_plan(table, str(tmp_path / "p.yaml"), "layers.0.experts.0", ["2b-g32", "3b-g32", "2b-g32", "3b-g32"])
    uniform = _channel_plan(table, str(tmp_path / "u.yaml"), "layers.0.experts.0", ["3b-g32"] * 4)
    rows = [r for r in table.rows if r.group == "layers.0.experts.0"]
    resolved = plan.resolve(table.rows)
    two, three = table.parse("2b-g32"), table.parse("3b-g32")
    assert resolved["layers.0.experts.0.up_proj"] == Treatment.split((two, three) * 2, axis=0)
    assert resolved["layers.0.experts.0.down_proj"] == Treatment.split((two, three) * 2, axis=1)
    at_three = sum(three.nbytes(r.out_features, r.in_features) for r in rows)
    expert_bytes = (plan.accounting(table.rows)["bytes"] - uniform.accounting(table.rows)["bytes"]) + at_three
    params = sum(r.params for r in rows)
    codes_bits = 8 * expert_bytes / params - (16 + 2.5) / 32  # fp16 scale + a 2/3-bit zero per 32 weights
    assert codes_bits == pytest.approx(2.5)


def test_channel_plans_that_do_not_fit_are_refused(table_and_tokens, tmp_path):
    table, _ = table_and_tokens
    plan = _channel_plan(table, str(tmp_path / "p.yaml"), "layers.0.experts.0", ["2b-g32"] * 4)
    text = open(tmp_path / "p.yaml").read()
    open(tmp_path / "missing.yaml", "w").write(text.replace("  layers.0.experts.1.channels.3: 3b-g32\n", ""))
    with pytest.raises(MoepressError, match="not layers.0.experts.1.channels.3"):
        load_plan(str(tmp_path / "missing.yaml")).resolve(table.rows)
    open(tmp_path / "nogroup.yaml", "w").write(text.replace("channel_group: 32\n", ""))
    with pytest.raises(MoepressError, match="no channel_group"):
        load_plan(str(tmp_path / "nogroup.yaml")).resolve(table.rows)
    open(tmp_path / "g128.yaml", "w").write(text.replace("layers.0.experts.0.channels.0: 2b-g32",
                                                         "layers.0.experts.0.channels.0: 2b-g128"))
    with pytest.raises(MoepressError, match="2b-g128 does not tile a channel group of 32"):
        load_plan(str(tmp_path / "g128.yaml")).resolve(table.rows)
    assert plan.resolve(table.rows)["layers.0.experts.0.down_proj"] == table.parse("2b-g32")  # equal groups: not split
    with pytest.raises(MoepressError, match="use ilp for channel plans"):
        allocate(table, Budget.parse("2.5bits"), "evolution", granularity="channel", channel_group=32,
                 group_size=32, evolution={"evaluate": None})


def test_per_expert_layout_takes_channel_plans_like_the_fused_one(table_and_tokens):
    table, tokens = table_and_tokens
    plan = allocate(table, Budget.parse("2.5bits"), "ilp", granularity="channel", channel_group=32, group_size=32)
    fused = build_tiny_model("mixtral")
    split = unfuse_experts(build_tiny_model("mixtral"))
    treatments = plan.resolve(model_rows(MoEView(fused)))
    assert any(t.kind == "split" for t in treatments.values())  # the ILP really splits some expert
    config = CompressConfig(group_size=32, calib_samples=4, seq_len=64)
    units_f, err_f, _ = quantize_model(fused, tokens, config, progress=False, treatments=treatments)
    units_s, err_s, _ = quantize_model(split, tokens, config, progress=False, treatments=treatments)
    assert units_f == units_s == treatments
    for name in err_f:
        assert err_s[name] == pytest.approx(err_f[name], rel=1e-3, abs=1e-6), name
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(split(ids).logits, fused(ids).logits, rtol=1e-4, atol=1e-4)


def test_plan_command_at_channel_granularity(tiny_model_dir, calib_file, tmp_path, capsys):
    from moepress.cli import main

    source = tiny_model_dir("mixtral")
    plan_path = str(tmp_path / "plan.yaml")
    common = ["plan", "--model", source, "--calib", calib_file, "--calib-samples", "4", "--seq-len", "64", "--quiet",
              "--budget", "2.5bits", "--granularity", "channel", "--group-size", "32", "-o", plan_path]
    assert main(common + ["--channel-group", "48"]) == 2  # refused before calibrating, nothing written
    assert "does not divide the experts' 128 intermediate neurons" in capsys.readouterr().err
    assert not os.path.exists(plan_path)
    assert main(common + ["--plot", str(tmp_path / "plan.png")]) == 0
    plan = load_plan(plan_path)
    assert main(["compress", "--model", source, "--plan", plan_path, "--keep-attention", "--out",
                 str(tmp_path / "no"), "--quiet"]) == 2
    assert "does not combine with --plan" in capsys.readouterr().err and not os.path.exists(tmp_path / "no")
    assert plan.channel_group == 32 and channel_key("layers.1.experts.3", 3) in plan.units
    out = str(tmp_path / "out")
    assert main(["compress", "--model", source, "--plan", plan_path, "--calib", calib_file, "--calib-samples", "4",
                 "--seq-len", "64", "--out", out, "--quiet"]) == 0
    record = json.load(open(os.path.join(out, "moepress.json")))
    resolved = plan.resolve(model_rows(MoEView(moepress.load(source))))
    for name, treatment in resolved.items():
        pieces = record["units"][name].get("pieces")
        assert Treatment.from_unit_map(record["units"][name]) == treatment, name
        if treatment.kind == "split":
            assert [(p["bits"], p.get("group_size")) for p in pieces] == \
                [(o.bits, o.group_size) for o in treatment.pieces]
        else:
            assert pieces is None and record["units"][name]["bits"] == treatment.bits

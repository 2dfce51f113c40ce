"""The layer-by-layer calibration engine and the Profile."""

from __future__ import annotations

import pytest
import torch

from moepress.calibrate import ExpertInputStats, Profile, calibrate
from moepress.compress import CompressConfig, quantize_model
from moepress.model import MoEView
from moepress.model.tiny import build_tiny_model

TOKENS = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))


def _routing_counts_full_forward(model):
    """Tokens per expert per layer from one ordinary full-model forward (hooks on the experts)."""
    view = MoEView(model)
    counts, handles = {}, []
    for layer in range(view.num_layers):
        store = view.experts(layer)
        if store is None:
            continue

        def hook(_m, args, layer=layer, E=store.num_experts):
            counts[layer] = counts.get(layer, 0) + torch.bincount(args[1].reshape(-1), minlength=E)

        handles.append(store.module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for batch in TOKENS.split(4):
            model(batch)
    for h in handles:
        h.remove()
    return counts


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "qwen2_moe"])
def test_layerwise_run_sees_what_the_full_model_sees(arch):
    model = build_tiny_model(arch)
    expected = _routing_counts_full_forward(model)
    profile = calibrate(model, TOKENS, batch_size=4, progress=False)
    assert profile.moe_layers() == sorted(expected)
    for layer, counts in expected.items():
        assert torch.equal(profile.tokens_per_expert(layer), counts)
        assert int(counts.sum()) == TOKENS.numel() * model.config.num_experts_per_tok
        assert profile.routing_mass(layer).sum() > 0


def test_expert_statistics_are_the_routed_grams():
    model = build_tiny_model("mixtral")
    store = MoEView(model).experts(0)
    E, H = store.num_experts, store.hidden_size
    x = torch.randn(50, H)
    index = torch.stack([torch.randperm(E)[:2] for _ in range(50)])
    weights = torch.rand(50, 2)
    stats = ExpertInputStats(store, torch.device("cpu"), rare={3})
    stats.add(x, index, weights)
    gate, up = store.weight("gate_proj").detach(), store.weight("up_proj").detach()
    for e in range(E):
        xe = x if e == 3 else x[(index == e).any(-1)]
        torch.testing.assert_close(stats.in_gram[e], xe.T @ xe, rtol=1e-5, atol=1e-4)
        mid = store.act_fn(xe @ gate[e].T) * (xe @ up[e].T)
        torch.testing.assert_close(stats.mid_gram[e], mid.T @ mid, rtol=1e-4, atol=1e-3)
        assert int(stats.tokens[e]) == int((index == e).sum())
        assert float(stats.routing_mass[e]) == pytest.approx(float(weights[index == e].sum()), rel=1e-6)
    assert int(stats.samples()[3]) == 50  # the rare expert saw every token


def test_rare_experts_are_calibrated_on_all_tokens():
    model = build_tiny_model("olmoe")
    config = CompressConfig(bits=4, group_size=128, calib_samples=8, seq_len=64, min_expert_tokens=10**9)
    _, _, profile = quantize_model(model, TOKENS, config, progress=False)
    for layer in profile.moe_layers():
        assert torch.all(profile.tensors[f"layers.{layer}.experts.calibration_samples"] == TOKENS.numel())
    table = profile.coverage_table()
    assert "below 1000000000 tokens" in table and "0, 1, 2" in table

    model = build_tiny_model("olmoe")
    config = CompressConfig(bits=4, group_size=128, calib_samples=8, seq_len=64, rare_experts="routed_only")
    _, _, profile = quantize_model(model, TOKENS, config, progress=False)
    for layer in profile.moe_layers():
        samples = profile.tensors[f"layers.{layer}.experts.calibration_samples"]
        assert torch.equal(samples, profile.tokens_per_expert(layer))


def test_profile_round_trips(tmp_path):
    model = build_tiny_model("qwen2_moe")
    profile = calibrate(model, TOKENS, progress=False)
    path = str(tmp_path / "profile.safetensors")
    profile.save(path)
    loaded = Profile.load(path)
    assert loaded.meta == profile.meta
    assert loaded.tensors.keys() == profile.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], profile.tensors[k]) for k in profile.tensors)
    assert "layers.0.mlp.down_proj.channel_norm" in loaded.tensors  # the dense first layer


def test_gptq_beats_rtn_inside_the_pipeline():
    """On the model's own activations, GPTQ's per-unit output error is below round-to-nearest's for
    the first layer's units (attention sees identical inputs in both runs, the experts nearly so)."""
    errors = {}
    for method in ("rtn", "gptq"):
        model = build_tiny_model("mixtral")
        config = CompressConfig(bits=3, group_size=128, method=method, calib_samples=8, seq_len=64)
        _, unit_errors, _ = quantize_model(model, TOKENS, config, progress=False)
        errors[method] = {n: e for n, e in unit_errors.items() if n.startswith("layers.0.")}
    for name in errors["gptq"]:
        if ".attn." in name or name.endswith(("gate_proj", "up_proj")):
            assert errors["gptq"][name] < errors["rtn"][name], name
    assert sum(errors["gptq"].values()) < 0.8 * sum(errors["rtn"].values())

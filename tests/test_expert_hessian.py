"""Routing-weighted expert Hessians (``--expert-hessian g|g2``, moepress.calibrate.ExpertInputStats)."""

from __future__ import annotations

import pytest
import torch

from moepress.calibrate import ExpertInputStats
from moepress.compress import CompressConfig, quantize_model
from moepress.errors import MoepressError
from moepress.model import MoEView
from moepress.model.tiny import build_tiny_model
from moepress.quantize import QuantSpec, gptq_quantize


@pytest.fixture(scope="module")
def store():
    return MoEView(build_tiny_model("mixtral")).experts(0)


def _routes(T, E, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, 128, generator=g)
    index = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)])
    return x, index


def _stats(store, weighting, x, index, weights, rare=()):
    stats = ExpertInputStats(store, torch.device("cpu"), rare=set(rare), token_weighting=weighting)
    stats.add(x, index, weights)
    return stats


@pytest.mark.parametrize("weighting", ["g", "g2"])
def test_equal_routing_weights_give_the_plain_hessians(store, weighting):
    """All weights 1/4 (a power of two, so every scaling is exact in float): the Gram matrices are the
    plain ones times w (1/4 or 1/16), the normalised Hessians and GPTQ's codes are the plain ones."""
    x, index = _routes(80, store.num_experts)
    plain = _stats(store, "plain", x, index, torch.full((80, 2), 0.5))
    weighted = _stats(store, weighting, x, index, torch.full((80, 2), 0.25))
    w = 0.25 if weighting == "g" else 0.0625
    assert torch.equal(weighted.in_gram, w * plain.in_gram)
    assert torch.equal(weighted.mid_gram, w * plain.mid_gram)
    assert torch.equal(weighted.in_sq_norm, plain.in_sq_norm)  # the profile's channel norms stay unweighted
    for h_plain, h_weighted in zip(plain.hessians(), weighted.hessians()):
        assert torch.equal(h_plain, h_weighted)
    spec = QuantSpec(bits=3, group_size=32, act_order=True, static_groups=True)
    gate = store.weight("gate_proj").detach().float()
    a = gptq_quantize(gate, plain.hessians()[0], spec).weight
    b = gptq_quantize(gate, weighted.hessians()[0], spec).weight
    assert torch.equal(a.dequantize(torch.float32), b.dequantize(torch.float32))


def test_any_equal_weight_is_a_scale_and_rare_experts_stay_plain(store):
    x, index = _routes(80, store.num_experts, seed=1)
    plain = _stats(store, "plain", x, index, torch.rand(80, 2), rare={2})
    weighted = _stats(store, "g2", x, index, torch.full((80, 2), 0.3), rare={2})
    routed = [e for e in range(store.num_experts) if e != 2]
    torch.testing.assert_close(weighted.in_gram[routed], 0.09 * plain.in_gram[routed], rtol=1e-5, atol=1e-5)
    for h_plain, h_weighted in zip(plain.hessians(), weighted.hessians()):
        torch.testing.assert_close(h_weighted, h_plain, rtol=1e-5, atol=1e-5)
    # the rare expert saw every token, most with g = 0: it is not weighted
    assert torch.equal(weighted.in_gram[2], plain.in_gram[2])


def test_weights_are_each_tokens_routing_weight_to_that_expert(store):
    x, index = _routes(40, store.num_experts, seed=2)
    weights = torch.rand(40, 2)
    stats = _stats(store, "g2", x, index, weights)
    for e in range(store.num_experts):
        g = (weights * (index == e)).sum(-1)  # 0 where the token was not routed to e
        torch.testing.assert_close(stats.in_gram[e], (x * g[:, None] ** 2).T @ x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats.hessian_mass[e].float(), (g**2).sum(), rtol=1e-6, atol=0)


def test_g2_lowers_the_routing_weighted_output_error(store):
    """Two kinds of tokens reach expert 0: many with routing weight 0.9 whose inputs are spread over
    all channels, and as many with weight 0.03 whose inputs are ten times larger on a few channels.
    Plain GPTQ spends its effort on the loud low-weight tokens; with g^2 weights it minimises the
    error the layer's output sees, sum_t g_t^2 ||(W - Q) x_t||^2, and must do better there."""
    g = torch.Generator().manual_seed(3)
    T, H = 400, store.hidden_size
    x = torch.randn(T, H, generator=g) @ (torch.randn(H, H, generator=g) / H**0.5 + torch.eye(H))
    quiet = torch.arange(T) >= T // 2
    loud = torch.zeros(H)
    loud[torch.randperm(H, generator=g)[:12]] = 10.0
    x[quiet] = x[quiet] * (1 + loud)
    gate = torch.where(quiet, 0.03, 0.9)
    index = torch.stack([torch.zeros(T, dtype=torch.long), torch.ones(T, dtype=torch.long)], -1)
    weights = torch.stack([gate, 1 - gate], -1)
    W = store.weight("gate_proj").detach().float()[0]
    spec = QuantSpec(bits=3, group_size=32)
    errors = {}
    for weighting in ("plain", "g", "g2"):
        H_in = _stats(store, weighting, x, index, weights).hessians()[0][0]
        Q = gptq_quantize(W, H_in, spec).weight.dequantize(torch.float32)
        errors[weighting] = float((gate[:, None] ** 2 * ((x @ (W - Q).T) ** 2)).sum())
    assert errors["g2"] < 0.8 * errors["plain"], errors
    assert errors["g2"] <= errors["g"] < errors["plain"], errors


def test_compress_records_the_weighting_and_refuses_unknown_ones():
    with pytest.raises(MoepressError, match="expert-hessian"):
        CompressConfig(expert_hessian="g3")
    assert CompressConfig().expert_hessian == "g2"  # the default, by measurement (benchmarks/grids.py)
    tokens = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    config = CompressConfig(bits=4, group_size=128, calib_samples=4, seq_len=32, expert_hessian="g2", expert_chunk=3)
    _, errors_g2, _ = quantize_model(build_tiny_model("mixtral"), tokens, config, progress=False)
    config = CompressConfig(bits=4, group_size=128, calib_samples=4, seq_len=32, expert_hessian="plain")
    _, errors_plain, _ = quantize_model(build_tiny_model("mixtral"), tokens, config, progress=False)
    expert = "layers.0.experts.0.down_proj"
    assert errors_g2[expert] != errors_plain[expert]  # weighted Hessians reached GPTQ (every chunk)
    assert errors_g2["layers.0.attn.q_proj"] == errors_plain["layers.0.attn.q_proj"]  # attention: unweighted
    assert errors_g2["layers.0.experts.3.up_proj"] != errors_plain["layers.0.experts.3.up_proj"]  # second chunk


def test_the_checkpoint_records_both_settings(tiny_model_dir, calib_file, tmp_path):
    import json

    from moepress.cli import main

    out = tmp_path / "out"
    assert main(["compress", "--model", tiny_model_dir("mixtral"), "--calib", calib_file, "--out", str(out),
                 "--bits", "4",
                 "--calib-samples", "2", "--seq-len", "32", "--expert-hessian", "g", "--clip-search", "--act-order", "off",
                 "--quiet"]) == 0
    record = json.load(open(out / "moepress.json"))
    assert record["calibration"]["expert_hessian"] == "g" and record["clip_search"] is True
    assert record["units"]["layers.0.experts.0.down_proj"]["clip_search"] is True

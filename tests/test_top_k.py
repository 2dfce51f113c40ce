"""Top-k reduction: a router routes each token to fewer experts, with its own weighting rule, and the
checkpoint carries the per-layer counts to every loader."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

import moepress
from moepress.errors import MoepressError
from moepress.model import MoEView
from moepress.model.tiny import build_tiny_model
from moepress.trim import set_top_k, top_k_counts

from .helpers import loads_the_same

SMALL = dict(calib_samples=4, seq_len=64)


def test_top_one_mixtral_is_its_best_expert_alone():
    """Mixtral renormalises the chosen experts' softmax weights: at top-1 a token's MoE output is
    exactly its highest-logit expert's output, weight 1."""
    torch.manual_seed(0)
    model = build_tiny_model("mixtral").eval()
    view = MoEView(model)
    set_top_k(model, 0, 1)
    store, router, block = view.experts(0), view.router(0), view.moe_block(0)
    x = torch.randn(1, 12, store.hidden_size)
    with torch.no_grad():
        got = block(x)
        got = got[0] if isinstance(got, tuple) else got
        best = F.linear(x.reshape(-1, store.hidden_size), router.weight).argmax(-1)
        w = {lin: store.weight(lin) for lin in ("gate_proj", "up_proj", "down_proj")}
        want = torch.stack([
            F.linear(store.act_fn(F.linear(t, w["gate_proj"][e])) * F.linear(t, w["up_proj"][e]), w["down_proj"][e])
            for t, e in zip(x.reshape(-1, store.hidden_size), best.tolist())])
    torch.testing.assert_close(got.reshape(-1, store.hidden_size), want, rtol=1e-5, atol=1e-6)
    assert top_k_counts(model)[0] == 1 and top_k_counts(model)[1] == 2  # one layer only


@pytest.mark.parametrize("arch, layer, k, message", [
    ("mixtral", 0, 0, "top-k must be a whole number from 1 to its current 2"),
    ("mixtral", 0, 3, "top-k must be a whole number from 1 to its current 2"),
    ("phimoe", 0, 1, "always routes to a fixed number of experts"),
    ("deepseek_v3", 0, 1, "not an MoE layer"),
])
def test_impossible_top_k_is_refused_in_one_line(arch, layer, k, message):
    model = build_tiny_model(arch)
    with pytest.raises(MoepressError, match=message) as info:
        set_top_k(model, layer, k)
    assert "\n" not in str(info.value)


def test_compress_with_top_k_records_and_restores_it(tiny_model_dir, calib_file, tmp_path):
    out = str(tmp_path / "out")
    result = moepress.compress(tiny_model_dir("qwen3_moe"), bits=4, top_k=1, calib=calib_file, out=out,
                               progress=False, **SMALL)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["num_experts_per_tok"] == 2  # the shared config is the source's
    assert set(config["quantization_config"]["top_k"].values()) == {1}
    loaded = moepress.load(out)
    assert set(top_k_counts(loaded).values()) == {1}
    routed = []
    view = MoEView(loaded)
    layer = next(l for l in range(view.num_layers) if view.experts(l) is not None)
    view.router(layer).register_forward_hook(lambda _m, _a, out: routed.append(out[2].shape[-1]))
    loads_the_same(result, out, loaded)
    assert routed[0] == 1  # the loaded model's router took one expert per token

"""Layer drop and block drop: the stand-ins compute exactly the model without the dropped part, the
similarity ranking picks what changes the hidden states least, and both loaders restore them."""

from __future__ import annotations

import json
import os

import pytest
import torch

import moepress
from moepress.errors import MoepressError
from moepress.model import MoEView
from moepress.model.tiny import build_tiny_model
from moepress.trim.layer_drop import DroppedBlock, DroppedMoE, drop_block, drop_moe_layer, dropped_parts

from .helpers import loads_the_same

SMALL = dict(calib_samples=4, seq_len=64)


def _run_layers(model, ids, skip_block=None, skip_moe=None):
    """The decoder by hand: embeddings, every layer but ``skip_block`` (with layer ``skip_moe``'s MoE
    block silenced), final norm and head."""
    handles = []
    view = MoEView(model)
    if skip_moe is not None:
        handles.append(view.moe_block(skip_moe).register_forward_hook(lambda _m, _a, out: torch.zeros_like(out)))
    if skip_block is not None:
        handles.append(view.layers[skip_block].register_forward_hook(lambda _m, args, _out: args[0]))
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "qwen2_moe"])
def test_dropped_parts_compute_the_model_without_them(arch):
    torch.manual_seed(0)
    model = build_tiny_model(arch).eval()
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(1))
    view = MoEView(model)
    moe_layer = next(l for l in range(view.num_layers) if view.experts(l) is not None)
    want_block = _run_layers(model, ids, skip_block=1)
    want_both = _run_layers(model, ids, skip_block=1, skip_moe=moe_layer if moe_layer != 1 else 2)
    before = _run_layers(model, ids)
    drop_block(model, 1)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want_block)
        assert not torch.equal(want_block, before)  # the block did something
    drop_moe_layer(model, moe_layer if moe_layer != 1 else 2)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want_both, rtol=0, atol=0)
    assert dropped_parts(model) == ([1], [moe_layer if moe_layer != 1 else 2])
    assert isinstance(MoEView(model).layers[1], DroppedBlock)


def test_refusals_are_one_line():
    model = build_tiny_model("mixtral")
    for make, message in ((lambda: drop_block(model, 0), "layers.0 cannot be dropped"),
                          (lambda: drop_block(model, 9), "no such layer"),
                          (lambda: drop_moe_layer(build_tiny_model("deepseek_v3"), 0), "not an MoE layer")):
        with pytest.raises(MoepressError, match=message) as info:
            make()
        assert "\n" not in str(info.value)


def test_compress_drops_the_most_similar_and_loads(tiny_model_dir, calib_file, tmp_path):
    out = str(tmp_path / "out")
    result = moepress.compress(tiny_model_dir("mixtral"), bits=4, drop_blocks=1, drop_moe_layers=1, calib=calib_file,
                               out=out, progress=False, **SMALL)
    blocks, moe = result.dropped("block"), result.dropped("moe")
    assert len(blocks) == 1 and len(moe) == 1 and blocks[0] != 0 and blocks[0] != moe[0]
    config = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert config["dropped_blocks"] == blocks and config["dropped_moe_layers"] == moe
    units = json.load(open(os.path.join(out, "moepress.json")))["units"]
    assert not any(k.startswith(f"layers.{blocks[0]}.") for k in units)
    assert not any(k.startswith(f"layers.{moe[0]}.experts.") for k in units)
    assert any(k.startswith(f"layers.{moe[0]}.attn.") for k in units)  # layer drop keeps attention
    loaded = moepress.load(out)
    assert dropped_parts(loaded) == (blocks, moe)
    assert isinstance(MoEView(loaded).moe_block(moe[0]), DroppedMoE)
    loads_the_same(result, out, loaded)


def test_a_block_dropped_model_generates_with_its_kv_cache(tiny_model_dir, calib_file, tmp_path):
    """Generation with the cache equals recomputing the whole sequence without it, token by token."""
    out = str(tmp_path / "out")
    moepress.compress(tiny_model_dir("qwen3_moe"), bits=4, drop_blocks=1, calib=calib_file, out=out, progress=False,
                      **SMALL)
    model = moepress.load(out).eval()
    ids = torch.randint(0, 500, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)

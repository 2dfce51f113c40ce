"""Online dynamic pruning: threshold 0 is the unpruned model exactly, threshold 1 is top-1 routing,
important tokens keep their experts, and the checkpoint's setting reaches both loaders."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import moepress
from moepress import DynamicPruning, MoepressError
from moepress.trim import set_top_k
from moepress.trim.dynamic import dynamic_pruning_stats, install_dynamic_pruning

SMALL = dict(calib_samples=4, seq_len=64)
IDS = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def packed(tiny_model_dir, calib_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("odp") / "out")
    moepress.compress(tiny_model_dir("mixtral"), bits=4, calib=calib_file, out=out, progress=False, **SMALL)
    return out


def test_threshold_zero_and_keeping_every_token_are_the_unpruned_model(packed):
    model = moepress.load(packed)
    plain = _logits(model)
    for settings in (DynamicPruning(0.0), DynamicPruning(1.0, keep_important=1.0)):
        install_dynamic_pruning(model, settings)
        assert torch.equal(_logits(model), plain)
        assert dynamic_pruning_stats(model)["skipped"] == 0
    install_dynamic_pruning(model, None)
    assert dynamic_pruning_stats(model) == {"installed": False}


@pytest.mark.parametrize("packed_model", [True, False])
def test_threshold_one_is_top_one_routing(packed, tiny_model_dir, packed_model):
    """Mixtral renormalises its top-k weights: skipping every secondary expert leaves the top one at
    weight 1, which is what routing to one expert computes (packed experts, and transformers' own)."""
    path = packed if packed_model else tiny_model_dir("mixtral")
    pruned = moepress.load(path, dynamic_pruning="1.0")
    top1 = moepress.load(path)
    view = moepress.MoEView(top1)
    for layer in range(view.num_layers):
        set_top_k(top1, layer, 1)
    torch.testing.assert_close(_logits(pruned), _logits(top1), rtol=1e-5, atol=1e-5)
    stats = dynamic_pruning_stats(pruned)
    assert stats["expert_compute_left"] == pytest.approx(0.5, abs=0.02)  # top-2: half the slots skipped


def test_important_tokens_keep_their_experts(packed):
    model = moepress.load(packed, dynamic_pruning=DynamicPruning(1.0, keep_important=0.25))
    _logits(model)
    stats = dynamic_pruning_stats(model)
    # a quarter of the tokens keep both experts: about 3/8 of the slots are skipped, not 1/2
    assert 0.30 < stats["skipped"] / stats["expert_slots"] < 0.45
    plain = _logits(moepress.load(packed))
    half = _logits(moepress.load(packed, dynamic_pruning="1.0"))
    kept = _logits(model)
    assert (kept - plain).abs().mean() < (half - plain).abs().mean()


def test_the_checkpoint_setting_reaches_both_loaders(tiny_model_dir, calib_file, tmp_path):
    out = str(tmp_path / "out")
    moepress.compress(tiny_model_dir("mixtral"), bits=4, dynamic_pruning="0.99,0.1", calib=calib_file, out=out,
                      progress=False, **SMALL)
    config = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert config["dynamic_pruning"] == {"threshold": 0.99, "keep_important": 0.1}
    for model in (moepress.load(out), AutoModelForCausalLM.from_pretrained(out)):
        _logits(model)
        stats = dynamic_pruning_stats(model)
        assert stats["installed"] and stats["threshold"] == 0.99 and stats["skipped"] > 0
    plain = moepress.load(out, dynamic_pruning=None)
    assert dynamic_pruning_stats(plain) == {"installed": False}


@pytest.mark.parametrize("value", ["1.5", "-0.1", "0.3,0.2,0.1", "lots", {"threshold": 0.3, "colour": 1}])
def test_bad_settings_are_one_line(value):
    with pytest.raises(MoepressError) as info:
        DynamicPruning.parse(value)
    assert "\n" not in str(info.value)


def test_decode_keeps_tokens_as_important_as_the_prompts_kept():
    """One decoded token is kept whole when its norm reaches the smallest one kept in the prompt."""
    from moepress.trim.dynamic import _LayerPruner

    pruner = _LayerPruner(DynamicPruning(1.0, keep_important=0.5))
    pruner.norms = torch.tensor([1.0, 5.0, 3.0, 2.0])
    assert pruner._important(4, "cpu").tolist() == [False, True, True, False] and pruner.cutoff == 3.0
    pruner.norms = torch.tensor([3.5])
    assert pruner._important(1, "cpu").tolist() == [True]
    pruner.norms = torch.tensor([2.5])
    assert pruner._important(1, "cpu").tolist() == [False]

"""Expert drop inside compress: the least important experts by the chosen criterion are gone from
the checkpoint, the config records the per-layer counts, and every loader restores them."""

from __future__ import annotations

import json
import os

import pytest

import moepress
from moepress.export.checkpoint import read_tensors
from moepress.model import MoEView
from moepress.trim import expert_counts, router_groups

from .helpers import loads_the_same, run_cli

SMALL = dict(calib_samples=4, seq_len=64)


def _moe_layers(model) -> list[int]:
    view = MoEView(model)
    return [layer for layer in range(view.num_layers) if view.experts(layer) is not None]


@pytest.mark.parametrize("arch, bits", [("mixtral", 4), ("qwen3_moe", 16), ("deepseek_v3", 4)])
def test_dropped_experts_are_gone_and_the_checkpoint_loads(tiny_model_dir, calib_file, tmp_path, arch, bits):
    source = tiny_model_dir(arch)
    original = moepress.load(source)
    layers = _moe_layers(original)
    before = {layer: MoEView(original).experts(layer).num_experts for layer in layers}
    out = str(tmp_path / "out")
    result = moepress.compress(source, bits=bits, drop_experts="2", drop_criterion="reap", calib=calib_file, out=out,
                               progress=False, **SMALL)
    kept = result.experts_kept()
    assert sorted(kept) == layers
    for layer in layers:
        assert len(kept[layer]) == before[layer] - 2
        # the dropped ones are the two lowest-scoring by the criterion, measured on this layer's inputs
        # (within each group of a group-limited router, which must keep as many experts in every group)
        scores = result.profile.tensors[f"layers.{layer}.experts.importance.reap"]
        groups = router_groups(original, layer) or 1
        size = before[layer] // groups
        for g in range(groups):
            members = set(range(g * size, (g + 1) * size))
            dropped, left = members - set(kept[layer]), members & set(kept[layer])
            assert len(dropped) == 2 // groups
            assert max(float(scores[e]) for e in dropped) <= min(float(scores[e]) for e in left)
    config = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert {int(k): v for k, v in config["expert_counts"].items()} == {l: before[l] - 2 for l in layers}
    units = json.load(open(os.path.join(out, "moepress.json")))["units"]
    for layer in layers:
        assert f"layers.{layer}.experts.{before[layer] - 3}.down_proj" in units
        assert not any(k.startswith(f"layers.{layer}.experts.{before[layer] - 2}.") for k in units)
    stored = read_tensors(out)
    assert not any(f".experts.{before[layers[0]] - 1}." in k for k in stored)  # no tensor of a dropped expert

    loaded = moepress.load(out)
    assert expert_counts(loaded) == {l: before[l] - 2 for l in layers}
    loads_the_same(result, out, loaded)


def test_criteria_rank_differently_and_are_all_recorded(tiny_model_dir, calib_file):
    result = moepress.compress(tiny_model_dir("mixtral"), bits=4, drop_experts="25%", drop_criterion="frequency",
                               calib=calib_file, progress=False, **SMALL)
    layer = _moe_layers(result.model)[0]
    tensors = result.profile.tensors
    for criterion in ("frequency", "mass", "router", "reap"):
        scores = tensors[f"layers.{layer}.experts.importance.{criterion}"]
        assert scores.shape == (len(result.experts_kept()[layer]) + 1,) and bool((scores >= 0).all())
    frequency = tensors[f"layers.{layer}.experts.importance.frequency"]
    top_k = 2  # the tiny mixtral routes each token to 2 experts: the frequencies add up to top-k
    assert float(frequency.sum()) == pytest.approx(top_k)
    assert float(tensors[f"layers.{layer}.experts.importance.router"].sum()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("amount, message", [
    ("3", "leaves fewer than the 2 each token is routed to"),
    ("0", "--drop-experts takes a share"),
    ("100%", "--drop-experts takes a share"),
    ("some", "--drop-experts takes a share"),
])
def test_bad_drops_are_refused_before_any_work(tiny_model_dir, calib_file, tmp_path, capsys, amount, message):
    out = str(tmp_path / "out")
    line = run_cli(capsys, "compress", "--model", tiny_model_dir("mixtral"), "--out", out, "--calib", calib_file,
                   "--calib-samples", "4", "--seq-len", "64", "--quiet", "--drop-experts", amount)
    assert message in line
    assert not os.path.exists(out)


def test_a_killed_trimming_run_resumes_to_the_same_checkpoint(tiny_model_dir, calib_file, tmp_path, monkeypatch):
    """Drops, top-k and pruning decided in the finished layers survive a kill: the resumed run writes
    the same tensors, unit map and expert counts as an uninterrupted one."""
    from .helpers import interrupt, same_checkpoint

    source = tiny_model_dir("mixtral")
    options = dict(bits=4, drop_experts="1", top_k=1, prune="2:4", calib=calib_file, progress=False, **SMALL)
    reference = str(tmp_path / "reference")
    moepress.compress(source, out=reference, **options)
    out = str(tmp_path / "out")
    interrupt(monkeypatch, "layer_committed:1", lambda: moepress.compress(source, out=out, **options))
    moepress.compress(source, out=out, **options)
    same_checkpoint(reference, out)
    config = lambda path: json.load(open(os.path.join(path, "config.json")))["quantization_config"]  # noqa: E731
    assert config(out)["expert_counts"] == config(reference)["expert_counts"]
    assert config(out)["experts_kept"] == config(reference)["experts_kept"]
    assert config(out)["top_k"] == config(reference)["top_k"]

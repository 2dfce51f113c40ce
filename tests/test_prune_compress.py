"""Pruning inside compress: exact patterns in the checkpoint, the unit map records them, the loader
rebuilds them, the bytes are the compressed ones, and SparseGPT beats Wanda beats magnitude on the
model's own activations."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

import moepress
from moepress.model import MoEView
from moepress.runtime import SparsePackedWeight
from moepress.treatment import Treatment

from .helpers import loads_the_same, run_cli

SMALL = dict(calib_samples=4, seq_len=64)


def _expert_weights(model) -> dict[str, torch.Tensor]:
    """Every routed expert linear's dense weight (dequantized)."""
    view = MoEView(model)
    out = {}
    for layer in range(view.num_layers):
        store = view.experts(layer)
        if store is None:
            continue
        for e in range(store.num_experts):
            for linear in ("gate_proj", "up_proj", "down_proj"):
                out[store.unit_name(e, linear)] = store.module.packed_weight(e, linear).dequantize(torch.float32)
    return out


@pytest.fixture(scope="module")
def pruned(tiny_model_dir, calib_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pruned") / "out")
    result = moepress.compress(tiny_model_dir("qwen3_moe"), bits=4, group_size=32, prune="2:4", calib=calib_file,
                               out=out, progress=False, **SMALL)
    return result, out


def test_every_expert_linear_is_exactly_two_of_four_and_the_rest_is_untouched(pruned):
    result, out = pruned
    model = moepress.load(out)
    weights = _expert_weights(model)
    assert weights
    for name, w in weights.items():
        groups = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert int(groups.max()) <= 2, name  # at most 2 of every 4 kept (a kept weight may round to 0)
        assert Treatment.from_unit_map(json.load(open(os.path.join(out, "moepress.json")))["units"][name]) == \
            Treatment.prune(nm=(2, 4), bits=4, group_size=32), name
    record = json.load(open(os.path.join(out, "moepress.json")))
    attention = Treatment.from_unit_map(record["units"]["layers.0.attn.q_proj"])
    assert attention == Treatment.quantize(4, 32) and not attention.pruned  # --prune-scope experts


def test_pruned_checkpoint_loads_the_same_everywhere(pruned):
    result, out = pruned
    loads_the_same(result, out)


def test_pruned_bytes_are_the_treatments_bytes(pruned):
    result, out = pruned
    model = moepress.load(out)
    view = MoEView(model)
    store = next(view.experts(layer) for layer in range(view.num_layers) if view.experts(layer) is not None)
    module = store.module.packed_weight(0, "down_proj")
    assert isinstance(module, SparsePackedWeight)
    treatment = Treatment.prune(nm=(2, 4), bits=4, group_size=32)
    assert module.nbytes() == treatment.nbytes(*store.shape("down_proj"))
    dense = Treatment.quantize(4, 32).nbytes(*store.shape("down_proj"))
    assert module.nbytes() < dense  # half the codes, plus a 1-bit mask


def test_prune_only_keeps_exact_sparsity_in_the_models_dtype(tiny_model_dir, calib_file, tmp_path):
    out = str(tmp_path / "out")
    moepress.compress(tiny_model_dir("mixtral"), bits=16, prune="50%", pruner="wanda", calib=calib_file, out=out,
                      progress=False, **SMALL)
    source = moepress.load(tiny_model_dir("mixtral"))
    model = moepress.load(out)
    original = MoEView(source).experts(0)
    for name, w in _expert_weights(model).items():
        assert int((w != 0).sum(-1).max()) <= w.shape[-1] // 2, name
        assert int((w == 0).sum()) >= w.numel() // 2, name
        expert, linear = int(name.split(".")[3]), name.split(".")[4]
        if name.startswith("layers.0."):  # the kept weights are the source's, bit for bit
            src = original.weight(linear)[expert].float()
            assert torch.equal(w[w != 0], src[w != 0]), name
    attention = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(attention, torch.nn.Linear)  # --bits 16: kept as it is


def test_sparsegpt_beats_wanda_beats_magnitude_in_the_pipeline(tiny_model_dir, calib_file, tmp_path):
    """The first layer's experts see the same inputs in all three runs (attention is treated alike),
    so their recorded output errors compare the pruners on the model's own activations."""
    errors = {}
    for pruner in ("sparsegpt", "wanda", "magnitude"):
        result = moepress.compress(tiny_model_dir("mixtral"), bits=16, prune="50%", pruner=pruner, calib=calib_file,
                                   progress=False, **SMALL)
        errors[pruner] = sum(v for k, v in result.errors.items() if k.startswith("layers.0.experts."))
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"]


def test_a_plan_may_prune_one_expert(tiny_model_dir, calib_file, tmp_path):
    source = tiny_model_dir("mixtral")
    view = MoEView(moepress.load(source))
    units = {}
    for layer in range(view.num_layers):
        for unit in view.linear_units(layer):
            units[unit.name] = "4b-g128"
        units.update({f"layers.{layer}.experts.{e}": "4b-g128" for e in range(view.experts(layer).num_experts)})
    units["layers.1.experts.2"] = "2:4+4b-g128"
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump({"moepress_plan": 1, "units": units}))
    out = str(tmp_path / "out")
    moepress.compress(source, plan=str(tmp_path / "plan.yaml"), calib=calib_file, out=out, progress=False, **SMALL)
    record = json.load(open(os.path.join(out, "moepress.json")))["units"]
    assert Treatment.from_unit_map(record["layers.1.experts.2.up_proj"]).label == "2:4+4b-g128"
    assert not Treatment.from_unit_map(record["layers.1.experts.1.up_proj"]).pruned
    weights = _expert_weights(moepress.load(out))
    assert int((weights["layers.1.experts.2.up_proj"] != 0).reshape(-1, 4).sum(-1).max()) <= 2


@pytest.mark.parametrize("args, message", [
    (["--prune", "150%"], "sparsity must be a fraction in [0, 1)"),
    (["--prune", "4:2"], "0 < N < M"),
    (["--prune", "3:7"], "7"),  # 7 does not divide the experts' inputs
    (["--prune", "lots"], "cannot read treatment"),
    (["--prune", "4b"], "--prune takes a sparsity or an N:M pattern"),
])
def test_bad_pruning_is_refused_before_any_work(tiny_model_dir, calib_file, tmp_path, capsys, args, message):
    out = str(tmp_path / "out")
    line = run_cli(capsys, "compress", "--model", tiny_model_dir("mixtral"), "--out", out, "--calib", calib_file,
                   "--calib-samples", "4", "--seq-len", "64", "--quiet", *args)
    assert message in line
    assert not os.path.exists(out)

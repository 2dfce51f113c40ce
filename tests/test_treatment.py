"""One Treatment type from the plan to the runtime: parsed once, written into the unit map, read back
equal, and honoured unit by unit by the compression."""

from __future__ import annotations

import json
import os

import pytest
import torch

import moepress
from moepress.allocate import load_plan
from moepress.errors import MoepressError
from moepress.export.checkpoint import read_tensors
from moepress.quantize import QuantSpec, rtn_quantize
from moepress.runtime.install import empty_weight
from moepress.runtime.packed_weight import PackedWeight
from moepress.runtime.sparse_weight import SparsePackedWeight
from moepress.runtime.split_weight import SplitWeight
from moepress.treatment import KEEP, Treatment

from .helpers import legacy_copy

SMALL = dict(calib_samples=4, seq_len=64)

EXAMPLES = [
    KEEP,
    Treatment.quantize(3, 128),
    Treatment.quantize(4, None, symmetric=True),
    Treatment.quantize(2, 32, act_order="dynamic", damp=0.05),
    Treatment.quantize(8, 64, method="rtn"),
    Treatment.split([Treatment.quantize(2, 32), KEEP, Treatment.quantize(3, 32)], axis=1),
    Treatment.prune(0.5),
    Treatment.prune(nm=(2, 4), pruner="wanda"),
    Treatment.prune(nm=(4, 8), bits=4, group_size=64),
    Treatment.prune(0.3, bits=3, group_size=None, symmetric=True, pruner="magnitude"),
]


@pytest.mark.parametrize("treatment", EXAMPLES, ids=lambda t: t.label)
def test_unit_map_entries_read_back_equal(treatment):
    entry = json.loads(json.dumps(treatment.to_unit_map()))
    assert Treatment.from_unit_map(entry) == treatment


def test_values_are_normalised_once():
    assert Treatment.quantize(4, 0) == Treatment.quantize(4, None) == Treatment.quantize(4, -1)
    assert Treatment.quantize(4, act_order=True).act_order == "dynamic"
    assert Treatment.quantize(4, act_order="dynamic", method="rtn").act_order == "off"  # RTN has no Hessian
    assert Treatment(kind="keep", bits=3, group_size=32, symmetric=True) == KEEP
    split = Treatment.split([Treatment.quantize(2, 32, act_order="dynamic"), Treatment.quantize(3, None,
                                                                                            act_order="dynamic")], 0)
    assert split.pieces[0].act_order == "off"  # a piece never stores a group index
    assert split.pieces[1].act_order == "dynamic"  # per-channel: no group index to store anyway
    assert split.bits == 3 and Treatment.split([KEEP, Treatment.quantize(2)], 0).bits == 16
    # pruned: N:M fixes the sparsity; no act-order; the pruner fixes the quantizer
    assert Treatment.prune(nm=(2, 4)).sparsity == 0.5 and Treatment.prune(nm=(2, 4), bits=4).act_order == "off"
    assert Treatment.prune(0.5, bits=4, pruner="wanda").method == "rtn"
    assert Treatment.prune(0.5, bits=4).method == "gptq"
    assert Treatment.quantize(4, pruner="wanda") == Treatment.quantize(4)  # not pruned: no pruner


@pytest.mark.parametrize("label", ["50%", "2:4", "2:4+4b-g128", "12.5%+3b-ch", "16b", "8b-g32"])
def test_labels_round_trip(label):
    assert Treatment.parse(label).label == label
    assert Treatment.parse(Treatment.parse(label).label) == Treatment.parse(label)


@pytest.mark.parametrize("make, message", [
    (lambda: Treatment.quantize(5), "bits must be one of 2, 3, 4, 8"),
    (lambda: Treatment.quantize(4, 100), "group size must be 32, 64, 128"),
    (lambda: Treatment.quantize(4, act_order="sometimes"), "act-order must be off, static or dynamic"),
    (lambda: Treatment.quantize(4, damp=-1), "damp must be"),
    (lambda: Treatment.quantize(4, method="awq"), "method must be 'gptq' or 'rtn'"),
    (lambda: Treatment.quantize(4, colour="red"), "unknown quantization setting"),
    (lambda: Treatment(kind="trim"), "unknown treatment 'trim'"),
    (lambda: Treatment.prune(), "needs a sparsity above 0"),
    (lambda: Treatment.prune(1.5), "sparsity must be a fraction in"),
    (lambda: Treatment.prune(nm=(4, 2)), "0 < N < M"),
    (lambda: Treatment.prune(0.5, pruner="random"), "pruner must be one of"),
    (lambda: Treatment.split([Treatment.prune(0.5, bits=2), KEEP], 0), "unpruned"),
    (lambda: Treatment.split([KEEP, KEEP], 0), "all kept is a kept unit"),
    (lambda: Treatment.split([Treatment.quantize(2)], 0), "at least two pieces"),
    (lambda: Treatment.split([Treatment.quantize(2), Treatment.quantize(2, method="rtn")], 0), "share one method"),
])
def test_bad_treatments_fail_in_one_line(make, message):
    with pytest.raises(MoepressError, match=message) as info:
        make()
    assert "\n" not in str(info.value)


def test_format_one_unit_map_entries_read():
    """Entries as format 1 (and early format 2) wrote them: no kind, act_order a bool saying whether a
    g_idx is stored, kept units as method keep, pieces with widths sharing the entry's symmetric."""
    assert Treatment.from_unit_map({"bits": 16, "group_size": None, "symmetric": False, "act_order": False,
                                    "method": "keep", "error": 0.0}) == KEEP
    assert Treatment.from_unit_map({"bits": 3, "group_size": 32, "symmetric": True, "act_order": True,
                                    "method": "gptq", "error": 1.5}) == \
        Treatment.quantize(3, 32, symmetric=True, act_order="dynamic")
    old_split = {"bits": 16, "group_size": 32, "symmetric": True, "act_order": False, "method": "gptq", "axis": 1,
                 "pieces": [{"bits": 2, "group_size": 32, "width": 64}, {"bits": 16, "group_size": None, "width": 64}]}
    assert Treatment.from_unit_map(old_split) == Treatment.split(
        [Treatment.quantize(2, 32, symmetric=True, act_order="off"), KEEP], axis=1)
    with pytest.raises(MoepressError, match="layers.0.x: 'bits' is missing"):
        Treatment.from_unit_map({"group_size": 32, "symmetric": False, "act_order": False}, "layers.0.x")
    with pytest.raises(MoepressError, match="unknown unit-map field"):
        Treatment.from_unit_map({**Treatment.quantize(3).to_unit_map(), "experts_kept": 6})


@pytest.mark.parametrize("treatment", EXAMPLES, ids=lambda t: t.label)
def test_bytes_are_the_bytes_of_the_weight_the_loader_builds(treatment):
    weight = empty_weight(treatment, 64, 256, torch.bfloat16)
    stored = weight.numel() * weight.element_size() if isinstance(weight, torch.Tensor) else weight.nbytes()
    assert treatment.nbytes(64, 256) == stored
    kind = "pruned" if treatment.pruned else treatment.kind
    assert isinstance(weight, {"keep": torch.Tensor, "quantize": PackedWeight, "split": SplitWeight,
                               "pruned": SparsePackedWeight}[kind])


def test_plan_entries_with_their_own_settings_round_trip(tmp_path):
    text = ("moepress_plan: 1\nquantization: {method: gptq, symmetric: false, act_order: static, damp: 0.01}\n"
            "units:\n  layers.0.attn.q_proj: {bits: 4, group_size: 128, method: rtn}\n"
            "  layers.0.attn.k_proj: 3b-g32\n  layers.0.attn.v_proj: 16b\n")
    (tmp_path / "p.yaml").write_text(text)
    plan = load_plan(str(tmp_path / "p.yaml"))
    assert plan.units["layers.0.attn.q_proj"] == Treatment.quantize(4, 128, method="rtn")
    assert plan.units["layers.0.attn.k_proj"] == Treatment.quantize(3, 32)
    assert plan.units["layers.0.attn.v_proj"] == KEEP
    plan.save(str(tmp_path / "again.yaml"))
    again = load_plan(str(tmp_path / "again.yaml"))
    assert again.units == plan.units
    assert again.to_dict()["units"]["layers.0.attn.k_proj"] == "3b-g32"  # the shared settings: a label


def test_compress_honours_each_units_own_treatment(tiny_model_dir, calib_file, tmp_path):
    """A plan entry with its own settings (RTN, symmetric) is what that unit gets: its codes are RTN's
    of the source weight (the first layer's attention sees the source weights: RTN needs no inputs),
    while the other units are GPTQ's."""
    source = tiny_model_dir("mixtral")
    model = moepress.load(source)
    view = moepress.MoEView(model)
    units = {}
    for layer in range(view.num_layers):
        for unit in view.linear_units(layer):
            units[unit.name] = "4b-g128"
        store = view.experts(layer)
        if store is not None:
            units.update({f"layers.{layer}.experts.{e}": "3b-g128" for e in range(store.num_experts)})
    plan_units = {**units, "layers.0.attn.q_proj": {"bits": 4, "group_size": 64, "method": "rtn", "symmetric": True}}
    import yaml

    (tmp_path / "plan.yaml").write_text(yaml.safe_dump({"moepress_plan": 1, "units": plan_units}))
    out = str(tmp_path / "out")
    moepress.compress(source, plan=str(tmp_path / "plan.yaml"), calib=calib_file, out=out, progress=False, **SMALL)
    record = json.load(open(os.path.join(out, "moepress.json")))
    q = Treatment.from_unit_map(record["units"]["layers.0.attn.q_proj"])
    assert q == Treatment.quantize(4, 64, method="rtn", symmetric=True)
    assert Treatment.from_unit_map(record["units"]["layers.0.attn.k_proj"]) == Treatment.quantize(4, 128)
    tensors = read_tensors(out)
    weight = model.get_submodule(view.attention_units(0)[0].module_path).weight
    want = rtn_quantize(weight.float(), QuantSpec(4, 64, symmetric=True, method="rtn"))
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.qweight"], want.qweight)
    assert "model.layers.0.self_attn.q_proj.zeros" not in tensors  # symmetric: no zero points
    loaded = moepress.load(out)
    assert loaded.get_submodule("model.layers.0.self_attn.q_proj").group_size == 64


def _legacy_entry(entry: dict) -> dict:
    """A unit-map entry as format 1 wrote it."""
    if entry["kind"] == "keep":
        return {"bits": 16, "group_size": None, "symmetric": False, "act_order": False, "method": "keep"}
    treatment = Treatment.from_unit_map(entry)
    return {"bits": treatment.bits, "group_size": treatment.group_size, "symmetric": treatment.symmetric,
            "act_order": treatment.stores_group_index, "method": treatment.method}


@pytest.mark.parametrize("act_order", ["static", "dynamic"])
def test_a_checkpoint_with_a_format_one_unit_map_loads_the_same(tiny_model_dir, calib_file, tmp_path, act_order):
    out = str(tmp_path / "out")
    moepress.compress(tiny_model_dir("qwen3_moe"), bits=3, group_size=32, act_order=act_order, calib=calib_file,
                      out=out, progress=False, **SMALL)
    ids = torch.randint(0, 500, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = moepress.load(out)(ids).logits
    out = legacy_copy(out, str(tmp_path / "v1"), version=1)  # format 1 stored one uint8 zero point per group
    config_path = os.path.join(out, "config.json")
    config = json.load(open(config_path))
    qc = config["quantization_config"]
    qc["units"] = {name: _legacy_entry(entry) for name, entry in qc["units"].items()}
    assert any(e["act_order"] for e in qc["units"].values()) == (act_order == "dynamic")
    json.dump(config, open(config_path, "w"))
    with torch.no_grad():
        assert torch.equal(moepress.load(out)(ids).logits, want)

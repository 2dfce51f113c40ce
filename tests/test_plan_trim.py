"""Plans that remove structure (moepress.trim.trimming, the plan's ``trim:`` section): the file
round-trips, ``compress --plan`` drops exactly what the plan says with every kept unit at the
treatment the plan gave its original name, the checkpoint loads to the same structure, and the
plan's bytes and active parameters are the compressed model's, measured."""

from __future__ import annotations

import json
import os
import re

import pytest

import moepress
from moepress.allocate import load_plan
from moepress.costs import model_rows
from moepress.errors import MoepressError
from moepress.evaluate import active_params, measure_footprint
from moepress.export.checkpoint import read_tensors
from moepress.model import MoEView
from moepress.model.tiny import build_tiny_model
from moepress.treatment import Treatment
from moepress.trim import Trimming, expert_counts, top_k_counts
from moepress.trim.layer_drop import dropped_parts

from .helpers import loads_the_same, run_cli

SMALL = dict(calib_samples=4, seq_len=64)

# (architecture, model overrides, trim, options of some experts (the rest 4b-g128), base top-k)
CASES = {
    # layer 1 keeps one expert, fewer than the original top-k: loading must reduce the top-k first
    "mixtral": ("mixtral", {"num_local_experts": 6},
                Trimming(dropped_experts={0: (1, 3), 1: (0, 2, 3, 4, 5)}, top_k={1: 1}, dropped_blocks=(2,)),
                {"layers.0.experts.0": "2b-g128", "layers.0.experts.2": "3b-g128",
                 "layers.0.experts.5": "2:4+4b-g128", "layers.1.experts.1": "3b-g128"}, 2),
    # group-limited routing (2 groups of 4): one expert from each group; a dropped MoE sublayer
    # takes the shared expert with it
    "deepseek_v3": ("deepseek_v3", {"num_hidden_layers": 4},
                    Trimming(dropped_experts={1: (1, 6)}, top_k={2: 1}, dropped_moe_layers=(3,)),
                    {"layers.1.experts.2": "3b-g128", "layers.1.experts.7": "2b-g128"}, 2),
}


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory, tokenizer):
    made: dict[str, str] = {}

    def make(case: str) -> str:
        if case not in made:
            arch, overrides = CASES[case][:2]
            path = tmp_path_factory.mktemp(f"trim-{case}")
            build_tiny_model(arch, vocab_size=len(tokenizer), **overrides).save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[case] = str(path)
        return made[case]

    return make


def _plan_text(model, trim: Trimming, options: dict, extra: str = "") -> str:
    """A plan file as a person writes it: the trim section, then one option per unit left."""
    units = {}
    for row in model_rows(MoEView(model)):
        if not trim.removes(row):
            units.setdefault(row.group, options.get(row.group, "4b-g128"))
    lines = ["moepress_plan: 1", "quantization: {method: gptq, symmetric: false, act_order: static, damp: 0.01}",
             "trim:"]
    lines += [f"  {key}: {json.dumps(value).replace(chr(34), '')}" for key, value in trim.to_dict().items()]
    lines += ["units:"] + [f"  {key}: {value}" for key, value in units.items()]
    return "\n".join(lines) + "\n" + extra


def _write(tmp_path, text: str) -> str:
    path = str(tmp_path / "plan.yaml")
    open(path, "w").write(text)
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_a_planned_trim_is_applied_exactly(case, source_dir, calib_file, tmp_path):
    _, _, trim, options, base_top_k = CASES[case]
    source = source_dir(case)
    original = moepress.load(source)
    view = MoEView(original)
    path = _write(tmp_path, _plan_text(original, trim, options))
    plan = load_plan(path)
    assert plan.trim == trim
    plan.save(str(tmp_path / "again.yaml"))  # the file round-trips
    again = load_plan(str(tmp_path / "again.yaml"))
    assert again.trim == trim and again.units == plan.units and again.to_dict() == plan.to_dict()

    out = str(tmp_path / "out")
    result = moepress.compress(source, plan=path, calib=calib_file, out=out, progress=False, **SMALL)
    rows = model_rows(view)
    resolved = plan.resolve(rows)
    moe_layers = [layer for layer in range(view.num_layers) if view.experts(layer) is not None]
    kept = {layer: trim.kept_experts(layer, view.experts(layer).num_experts) for layer in moe_layers
            if layer not in trim.dropped_blocks + trim.dropped_moe_layers}

    # The kept experts carry the treatments the plan gave their original indices, under their saved names.
    units = json.load(open(os.path.join(out, "moepress.json")))["units"]
    expected = {}
    for name, treatment in resolved.items():
        match = re.fullmatch(r"layers\.(\d+)\.experts\.(\d+)\.(\w+)", name)
        if match:
            layer, expert, linear = int(match[1]), int(match[2]), match[3]
            name = f"layers.{layer}.experts.{kept[layer].index(expert)}.{linear}"
        expected[name] = treatment
    assert {name: Treatment.from_unit_map(rec) for name, rec in units.items()} == expected
    layer, dropped = next(iter(trim.dropped_experts.items()))
    for new, old in enumerate(kept[layer]):
        assert units[f"layers.{layer}.experts.{new}.gate_proj"]["bits"] == resolved[
            f"layers.{layer}.experts.{old}.gate_proj"].bits

    # The dropped parts have no tensors in the files.
    stored = read_tensors(out)
    experts_stored = {(int(m[1]), int(m[2])) for k in stored for m in [re.search(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.", k)]
                      if m}
    assert {e for l, e in experts_stored if l == layer} == set(range(len(kept[layer])))
    for gone in trim.dropped_blocks:
        assert not any(f"layers.{gone}." in k for k in stored)
    for gone in trim.dropped_moe_layers:
        assert not any(f"layers.{gone}.mlp." in k for k in stored)

    # The checkpoint records the trim, and the loaders restore the plan's structure.
    config = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert config["experts_kept"] == {str(l): kept[l] for l in trim.dropped_experts}
    assert config["top_k"] == {str(l): k for l, k in trim.top_k.items()}
    assert json.load(open(os.path.join(out, "moepress.json")))["plan"]["trim"] == json.loads(
        json.dumps(trim.to_dict()))
    loaded = moepress.load(out)
    assert top_k_counts(loaded) == {l: trim.top_k.get(l, base_top_k) for l in kept}
    assert expert_counts(loaded) == {l: len(k) for l, k in kept.items()}
    assert dropped_parts(loaded) == (list(trim.dropped_blocks), list(trim.dropped_moe_layers))
    loads_the_same(result, out, loaded)

    # The plan's accounting is the compressed model's, measured.
    accounting = plan.accounting(rows, base_top_k={l: base_top_k for l in moe_layers})
    assert accounting["bytes"] == measure_footprint(loaded).linear_bytes
    assert accounting["active_params"] == active_params(loaded)["active"]
    assert accounting["active_share"] < 1
    assert accounting["removed_params"] == sum(r.params for r in rows if trim.removes(r))


@pytest.fixture(scope="module")
def models():
    return {arch: build_tiny_model(arch) for arch in ("mixtral", "deepseek_v3")}


@pytest.mark.parametrize("arch, trim, message", [
    ("mixtral", Trimming(dropped_experts={1: (0, 1, 2)}), "layers.1: keeping 1 experts but the router picks 2"),
    ("mixtral", Trimming(dropped_experts={1: (0, 1)}, top_k={1: 1}), None),  # a reduced top-k needs fewer
    ("mixtral", Trimming(dropped_experts={1: (9,)}), "layers.1: unknown experts [9]"),
    ("mixtral", Trimming(top_k={1: 0}), "layers.1: top-k must be a whole number from 1 to its current 2 (got 0)"),
    ("mixtral", Trimming(top_k={1: 3}), "layers.1: top-k must be a whole number from 1 to its current 2 (got 3)"),
    ("mixtral", Trimming(dropped_blocks=(0,)), "layers.0 cannot be dropped"),
    ("mixtral", Trimming(dropped_experts={7: (0,)}), "layers.7: no such layer"),
    ("mixtral", Trimming(top_k={7: 1}), "layers.7: no such layer"),
    ("mixtral", Trimming(dropped_blocks=(1,), top_k={1: 1}), "layers.1: the trim drops the whole block and also"),
    ("mixtral", Trimming(dropped_moe_layers=(1,), dropped_experts={1: (0,)}),
     "layers.1: the trim drops the MoE sublayer and also"),
    ("deepseek_v3", Trimming(dropped_moe_layers=(0,)), "layers.0: not an MoE layer"),
    ("deepseek_v3", Trimming(top_k={0: 1}), "layers.0: not an MoE layer"),
    ("deepseek_v3", Trimming(dropped_experts={0: (1,)}), "layers.0: not an MoE layer"),
    ("deepseek_v3", Trimming(dropped_experts={1: (0, 1)}), "layers.1: the router picks experts within 2 groups"),
])
def test_bad_trims_are_refused_in_one_line_naming_the_layer(models, arch, trim, message):
    if message is None:
        trim.check(models[arch])
        return
    with pytest.raises(MoepressError) as caught:
        trim.check(models[arch])
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("trim, message", [
    ("[1, 2]", "trim must be a mapping"),
    ("{drop_experts: {1: [0]}}", "trim.drop_experts is not a trim entry"),
    ("{top_k: {1: two}}", "trim.top_k.1 must be a whole number"),
    ("{top_k: [1]}", "trim.top_k must be a mapping"),
    ("{dropped_experts: {1: 3}}", "trim.dropped_experts.1 must be a list of expert indices"),
    ("{dropped_experts: {1: [2, 2]}}", "trim.dropped_experts.1 lists expert 2 more than once"),
    ("{dropped_blocks: 2}", "trim.dropped_blocks must be a list of layer indices"),
    ("{dropped_blocks: [-1]}", "trim.dropped_blocks must be a list of layer indices"),
])
def test_malformed_trim_sections_are_refused_naming_the_entry(tmp_path, trim, message):
    path = _write(tmp_path, f"moepress_plan: 1\ntrim: {trim}\nunits:\n  layers.0.attn.q_proj: 4b\n")
    with pytest.raises(MoepressError) as caught:
        load_plan(path)
    assert str(caught.value).startswith(f"plan {path}: ") and message in str(caught.value), caught.value
    assert "\n" not in str(caught.value)


def test_a_treatment_for_a_removed_unit_is_refused(models, tmp_path):
    model = models["mixtral"]
    trim = Trimming(dropped_experts={1: (3,)}, dropped_blocks=(2,))
    rows = model_rows(MoEView(model))
    base = _plan_text(model, trim, {})
    assert load_plan(_write(tmp_path, base)).resolve(rows)  # a key for every unit left: fine
    for extra, message in [("  layers.1.experts.3: 3b-g128\n", "drops layers.1.experts.3"),
                           ("  layers.1.experts.3.channels.0: 3b-g32\n", "drops layers.1.experts.3"),
                           ("  layers.2.attn.q_proj: 3b-g128\n", "drops block layers.2")]:
        plan = load_plan(_write(tmp_path, base + extra))
        with pytest.raises(MoepressError, match=f"plan gives {re.escape(extra.split(':')[0].strip())} a treatment "
                                                f"but its trim {message}; remove one of them"):
            plan.resolve(rows)


def test_compress_refuses_trimming_flags_with_a_plan_and_bad_trims_before_work(
        models, tiny_model_dir, calib_file, tmp_path, capsys):
    source = tiny_model_dir("mixtral")
    good = _write(tmp_path, _plan_text(models["mixtral"], Trimming(top_k={1: 1}), {}))
    out = str(tmp_path / "out")
    common = ["compress", "--model", source, "--out", out, "--calib", calib_file, "--calib-samples", "4",
              "--seq-len", "64", "--quiet"]
    line = run_cli(capsys, *common, "--plan", good, "--drop-experts", "1")
    assert "--drop-experts" in line and "--plan" in line and "trim" in line
    bad = str(tmp_path / "bad.yaml")
    open(bad, "w").write(_plan_text(models["mixtral"], Trimming(dropped_experts={0: (0, 1, 2)}), {}))
    line = run_cli(capsys, *common, "--plan", bad)
    assert "layers.0: keeping 1 experts" in line
    assert not os.path.exists(out)


def test_active_params_from_rows_match_the_trimmed_model(models):
    """Without quantizing: the count from the cost table is what evaluate measures after the surgery."""
    from moepress.trim import drop_experts, set_top_k
    from moepress.trim.layer_drop import drop_block

    model = build_tiny_model("mixtral")
    rows = model_rows(MoEView(model))
    trim = Trimming(dropped_experts={1: (0, 2)}, top_k={0: 1}, dropped_blocks=(2,))
    assert Trimming().active_params(rows, None, 2) == active_params(model)["active"]
    set_top_k(model, 0, 1)
    drop_experts(model, 1, trim.kept_experts(1, 4))
    drop_block(model, 2)
    assert trim.active_params(rows, None, {"0": 2, "1": 2, "2": 2}) == active_params(model)["active"]

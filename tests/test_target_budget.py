"""Budgets under a target (``plan/compress --target llamacpp --budget 4.5bits``): the allocator chooses
among the engine's own types, ties what the engine stores as one tensor, never gives a unit a type
the engine refuses for it, and the plan's bytes are the checkpoint's."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

import moepress
from moepress.allocate import Budget, allocate, load_plan
from moepress.costs import synthetic_table
from moepress.errors import MoepressError
from moepress.export import llamacpp_target
from moepress.model.view import EXPERT_LINEARS, MoEView
from moepress.treatment import KEEP, Treatment

from .helpers import run_cli

TYPES = [Treatment.block_format(t) for t in ("q2_K", "q4_K", "q6_K", "q4_0", "q8_0")] + [KEEP]


def _one_layer_table():
    """One layer, 4 experts; attention and gate/up take 256 inputs (any type), down 128 (no k-quant)."""
    table = synthetic_table(layers=1, experts=4, hidden=256, intermediate=128, options=TYPES, seed=3)
    tied = [tuple(f"layers.0.experts.{e}.{linear}" for e in range(4)) for linear in EXPERT_LINEARS]
    return table, tied


def test_the_ilp_is_optimal_among_what_llamacpp_holds():
    """Against every assignment of a type to each attention projection and each tied projection of
    the experts that llama.cpp can store: the ILP's plan has the least damage within the budget."""
    table, tied = _one_layer_table()
    budget = Budget.parse("4.5bits", scope="all")
    plan = allocate(table, budget, "ilp", granularity="linear", target="llamacpp", tied=tied)
    rows = {r.name: r for r in table.rows}
    labels = {name: t.label for name, t in plan.units.items()}
    for names in tied:  # one type per projection of the layer's experts
        assert len({labels[n] for n in names}) == 1
    for name, label in labels.items():  # down_proj's 128 inputs hold no k-quant
        assert llamacpp_target.refusal(name, plan.units[name], rows[name].in_features) is None
    params = sum(r.params for r in table.rows)
    assert plan.totals["bytes"] <= 4.5 * params / 8 == plan.budget["bytes"]
    # brute force over the 4 attention units and the 3 tied projections
    units = [[table.index[f"layers.0.attn.{p}"]] for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    units += [[table.index[n] for n in names] for names in tied]
    cost = np.array([table.bytes[u].sum(0) for u in units])
    damage = np.array([table.damage["gptq_routed"][u].sum(0) for u in units])
    ok = np.array([[all(llamacpp_target.refusal(table.rows[r].name, o, table.rows[r].in_features) is None for r in u)
                    for o in table.options] for u in units])
    best = min(sum(damage[g, c] for g, c in enumerate(choice)) for choice in
               itertools.product(range(len(table.options)), repeat=len(units))
               if all(ok[g, c] for g, c in enumerate(choice)) and
               sum(cost[g, c] for g, c in enumerate(choice)) <= plan.budget["bytes"])
    assert plan.totals["predicted_damage"]["value"] == pytest.approx(best, rel=1e-9)
    greedy = allocate(table, budget, "greedy", granularity="linear", target="llamacpp", tied=tied)
    assert greedy.totals["bytes"] <= plan.budget["bytes"]
    assert greedy.totals["predicted_damage"]["value"] >= best - 1e-12
    assert all(len({greedy.units[n].label for n in names}) == 1 for names in tied)


def test_a_unit_no_allowed_type_can_hold_is_refused():
    table, tied = _one_layer_table()
    only_k = [table.option_index(t) for t in TYPES[:3]]  # k-quants only: down_proj cannot take any of them
    with pytest.raises(MoepressError, match="no allowed option can store layers.0.experts.0.down_proj"):
        allocate(table, Budget.parse("5bits", scope="all"), "ilp", granularity="linear",
                 options=[table.options[i] for i in only_k], target="llamacpp", tied=tied)
    with pytest.raises(MoepressError, match="--target plans with --strategy ilp or greedy"):
        allocate(table, Budget.parse("5bits", scope="all"), "heuristic", granularity="linear", target="llamacpp",
                 tied=tied)


def test_tied_units_and_refusals_of_a_model():
    from moepress.model.tiny import build_tiny_model

    view = MoEView(build_tiny_model("mixtral"))
    tied = llamacpp_target.tied_units(view)
    assert len(tied) == view.num_layers * 3
    assert tied[0] == tuple(f"layers.0.experts.{e}.gate_proj" for e in range(4))
    assert llamacpp_target.refusal("x", Treatment.block_format("q4_K"), 128) is not None
    assert llamacpp_target.refusal("x", Treatment.block_format("q4_K"), 256) is None
    assert "cannot store" in llamacpp_target.refusal("x", Treatment.quantize(4), 256)
    assert llamacpp_target.refusal("x", KEEP, 100) is None


@pytest.fixture(scope="module")
def wide(tokenizer, tmp_path_factory):
    """A tiny Mixtral whose rows are 256 wide (k-quants apply), two layers."""
    from moepress.model.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("wide")
    build_tiny_model("mixtral", vocab_size=len(tokenizer), hidden_size=256, intermediate_size=256,
                     num_hidden_layers=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_compress_with_a_budget_under_the_target(wide, calib_file, tmp_path):
    """compress --budget --target llamacpp: llama.cpp types only, one per projection of a layer's
    experts, within the budget; the plan's bytes are the saved checkpoint's linear bytes."""
    from moepress.evaluate.footprint import measure_footprint
    from moepress.loading import load_model

    out = str(tmp_path / "out")
    small = {"calib_samples": 4, "seq_len": 64}
    moepress.compress(wide, budget="5bits", target="llamacpp", calib=calib_file, out=out, progress=False,
                      planning={"scope": "all", "options": "q2_K,q4_K,q6_K,q8_0,16", "calib": calib_file, **small},
                      **small)
    plan = load_plan(f"{out}/plan.yaml")
    assert plan.info["target"] == "llamacpp"
    assert {t.label for t in plan.units.values()} <= {"q2_K", "q4_K", "q6_K", "q8_0", "16b"}
    assert len({t.label for t in plan.units.values()}) > 1  # a mix, not one type
    for layer in range(2):
        for linear in EXPERT_LINEARS:
            assert len({plan.units[f"layers.{layer}.experts.{e}.{linear}"].label for e in range(4)}) == 1
    model = load_model(out)
    params = sum(u.in_features * u.out_features for layer in range(2) for u in MoEView(model).linear_units(layer))
    params += 2 * 4 * 3 * 256 * 256
    assert plan.totals["bytes"] <= 5 * params / 8
    assert plan.totals["bytes"] == measure_footprint(model).linear_bytes


def test_budget_under_the_target_needs_others_it_can_hold(wide, calib_file, tmp_path, capsys):
    line = run_cli(capsys, "compress", "--model", wide, "--calib", calib_file, "--out", str(tmp_path / "out"),
                   "--target", "llamacpp", "--budget", "4bits", "--quiet")
    assert "--others 4b-g128: layers.0.attn.q_proj is 4b-g128, which llama.cpp cannot store" in line
    assert os.listdir(tmp_path) == []  # refused before the costs folder: nothing to resume or discard


def _moepress_plan(view):
    """A plan llama.cpp cannot express: experts alternating 3- and 4-bit groups of 128, attention 4b-g128."""
    from moepress.allocate import Plan

    units = {}
    for layer in range(view.num_layers):
        for unit in view.linear_units(layer):
            units[unit.name] = Treatment.parse("4b-g128")
        for e in range(view.experts(layer).num_experts):
            units[f"layers.{layer}.experts.{e}"] = Treatment.parse("3b-g128" if e % 2 else "4b-g128")
    return Plan(units=units, info={"keep_element_size": 4})


def test_project_gives_each_tied_group_the_nearest_type_within_its_bytes(wide):
    from moepress.allocate.project import project
    from moepress.costs import model_rows
    from moepress.loading import load_model

    view = MoEView(load_model(wide))
    rows = model_rows(view)
    plan = _moepress_plan(view)
    projected, changes = project(plan, rows, "llamacpp", llamacpp_target.tied_units(view))
    resolved, planned = projected.resolve(rows), plan.resolve(rows)
    llamacpp_target.check_units(view, resolved.__getitem__)  # expressible: one type per tied group, all held
    types = [Treatment.parse(int(t) if t.isdigit() else t) for t in llamacpp_target.PLAN_OPTIONS.split(",")]
    by_name = {r.name: r for r in rows}
    for names in llamacpp_target.tied_units(view) + [(u.name,) for layer in range(2) for u in view.linear_units(layer)]:
        group = [by_name[n] for n in names]
        budget = sum(planned[r.name].nbytes(r.out_features, r.in_features, 4) for r in group)
        spent = sum(resolved[r.name].nbytes(r.out_features, r.in_features, 4) for r in group)
        best = max(sum(t.nbytes(r.out_features, r.in_features, 4) for r in group) for t in types
                   if all(llamacpp_target.refusal(r.name, t, r.in_features) is None for r in group)
                   and sum(t.nbytes(r.out_features, r.in_features, 4) for r in group) <= budget)
        assert spent == best
    assert projected.totals["bytes"] <= plan.accounting(rows, 4)["bytes"]
    assert len(changes) == 2 * 3 + 2 * 4  # every tied projection and every attention unit changed
    assert changes[0].startswith("layers.0.experts.0.gate_proj and 3 tied: 3b-g128/4b-g128")


def test_compress_projects_a_plan_or_refuses_it(wide, calib_file, tmp_path, capsys):
    import json

    import yaml

    from moepress.loading import load_model

    view = MoEView(load_model(wide))
    plan = _moepress_plan(view)
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan.to_dict()))
    args = ["compress", "--model", wide, "--calib", calib_file, "--target", "llamacpp", "--plan",
            str(tmp_path / "plan.yaml"), "--calib-samples", "4", "--seq-len", "64", "--quiet"]
    line = run_cli(capsys, *args, "--out", str(tmp_path / "refused"))
    assert "layers.0.attn.q_proj is 4b-g128, which llama.cpp cannot store" in line
    from moepress.cli import main

    assert main(args + ["--out", str(tmp_path / "out"), "--project"]) == 0
    err = capsys.readouterr().err
    assert "--project onto llamacpp: 14 group(s) changed" in err and "layers.1.experts.0.down_proj and 3 tied" in err
    record = json.load(open(tmp_path / "out" / "moepress.json"))
    labels = {name: Treatment.from_unit_map(u).label for name, u in record["units"].items()}
    assert set(labels.values()) <= set(llamacpp_target.PLAN_OPTIONS.replace("16", "16b").split(","))
    assert len({labels[f"layers.1.experts.{e}.down_proj"] for e in range(4)}) == 1


def test_a_vllm_plan_keeps_its_schemes_tied(wide):
    """The same allocator under --target vllm: symmetric 4/8-bit options (the target's own, not given),
    one scheme per layer's experts and per fused q/k/v, as vLLM's loader needs (its check_units passes)."""
    from moepress.allocate.command import PlanOptions, plan_model
    from moepress.costs import model_rows
    from moepress.export import vllm_target
    from moepress.loading import load_model

    plan, _ = plan_model(wide, PlanOptions(budget="5bits", scope="all", target="vllm", calib_samples=4, seq_len=64),
                         progress=False)
    view = MoEView(load_model(wide))
    resolved = plan.resolve(model_rows(view))
    vllm_target.check_units(view, resolved.__getitem__)
    assert {t.label for t in resolved.values()} <= {"4b-g128", "8b-g128", "16b"}
    assert plan.totals["bytes"] <= plan.budget["bytes"]
    for names in vllm_target.tied_units(view):
        assert len({resolved[n] for n in names}) == 1


def test_project_onto_vllm_gives_symmetric_tied_schemes(wide):
    """--project onto vLLM: each layer's experts (3/4-bit mixed, asymmetric) become one symmetric
    scheme, the smallest vLLM holds (4-bit: over the plan's bytes, which the change says); the
    asymmetric 4-bit attention, which vLLM holds, is left as planned."""
    from moepress.allocate.project import project
    from moepress.costs import model_rows
    from moepress.export import vllm_target
    from moepress.loading import load_model

    view = MoEView(load_model(wide))
    rows = model_rows(view)
    projected, changes = project(_moepress_plan(view), rows, "vllm", vllm_target.tied_units(view))
    resolved = projected.resolve(rows)
    vllm_target.check_units(view, resolved.__getitem__)
    experts = {t for n, t in resolved.items() if ".experts." in n}
    assert len(experts) == 1 and all(t.symmetric and t.bits == 4 for t in experts)
    assert all(resolved[u.name] == Treatment.parse("4b-g128") for layer in range(2) for u in view.linear_units(layer))
    assert len(changes) == 2 and all("over the plan: no type of the target is smaller" in c for c in changes)

"""The joint optimizer (moepress.allocate.joint): one program over treatments and removals, two budgets."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from moepress.allocate.joint import JointProblem
from moepress.allocate.trim_costs import MoEChoice, TrimCosts
from moepress.costs import synthetic_table
from moepress.errors import MoepressError
from moepress.treatment import Treatment

OPTIONS = [Treatment.quantize(2, None), Treatment.quantize(4, None), Treatment.prune(nm=(2, 4), bits=4, group_size=None)]


def _small(seed=0, layers=2, experts=4, removal_scale=1e-3):
    table = synthetic_table(layers=layers, experts=experts, hidden=32, intermediate=64, options=OPTIONS, seed=seed)
    rng = np.random.default_rng(seed)
    moe, damage = {}, {}
    for layer in range(layers):
        moe[layer] = [MoEChoice(2), MoEChoice(1), MoEChoice(2, (int(rng.integers(experts)),)), MoEChoice(0, removed=True)]
        damage[layer] = np.r_[0.0, rng.random(3) * removal_scale]
    costs = TrimCosts(moe=moe, moe_damage=damage, block_damage={1: 5e-3}, base_top_k={i: 2 for i in range(layers)},
                      num_experts={i: experts for i in range(layers)})
    return table, costs


def _problem(table, costs, budget_share=0.6, active=None):
    groups = table.groups("expert", "gptq_routed")
    allowed = list(range(len(table.options)))
    four = table.option_index(Treatment.quantize(4, None))
    full = sum(int(groups.bytes[g, four]) for g in range(len(groups.names)) if groups.kinds[g] == "expert")
    problem = JointProblem(table, groups, costs, scope_kinds=("expert",), allowed=allowed, others=four,
                           budget_bytes=int(budget_share * full), active_budget=None)
    if active is not None:
        problem.active_budget = active * problem.original_active
    return problem


def _brute_force(problem):
    """The optimum by enumeration: every removal combination, every column of every unit."""
    layers = sorted(problem.costs.moe)
    G = len(problem.groups.names)
    best = (np.inf, None)
    block_options = [()] + [(b,) for b in problem.block_damage]
    for blocks in block_options:
        for configs in itertools.product(*[range(len(problem.costs.moe[layer])) for layer in layers]):
            moe = {layer: c for layer, c in zip(layers, configs) if layer not in blocks}
            free = [g for g in range(G) if not problem.removed(g, moe, blocks)]
            for cols in itertools.product(*[problem.columns[g] for g in free]):
                columns = np.full(G, -1)
                columns[free] = cols
                damage, spent, active = problem.evaluate(columns, moe, blocks)
                if spent <= problem.budget_bytes and (problem.active_budget is None or active <= problem.active_budget):
                    if damage < best[0]:
                        best = (damage, (columns, moe, blocks))
    return best


@pytest.mark.parametrize("active,removal_scale", [(None, 1e-3), (0.7, 1e-3), (0.5, 1e-3), (0.7, 1e3)])
def test_joint_program_finds_the_enumerated_optimum_under_both_budgets(active, removal_scale):
    """Also with removals a million times dearer than a unit's damage (a dropped first MoE layer on
    a real model), where HiGHS on unscaled rows and objective returned plans far from the optimum."""
    table, costs = _small(seed=1, layers=2, experts=3, removal_scale=removal_scale)
    problem = _problem(table, costs, budget_share=0.7, active=active)
    solution = problem.solve()
    optimum, _ = _brute_force(problem)
    assert solution.predicted == pytest.approx(optimum, rel=1e-6)
    assert solution.bytes <= problem.budget_bytes
    if active is not None:
        assert solution.active <= problem.active_budget * (1 + 1e-9)
    # the hierarchy: a removed unit takes no column, a kept one exactly one
    for g in range(len(problem.groups.names)):
        assert (solution.columns[g] < 0) == problem.removed(g, solution.moe, solution.blocks)


def test_active_count_is_top_k_over_the_experts_left_times_their_kept_weights():
    table, costs = _small(seed=2, layers=2, experts=4)
    problem = _problem(table, costs)
    groups = problem.groups
    prune = table.option_index(OPTIONS[2])
    four = table.option_index(OPTIONS[1])
    columns = np.array([prune if k == "expert" else four for k in groups.kinds])
    dropped = costs.moe[0][2].dropped[0]
    columns[[g for g, n in enumerate(groups.names) if n == f"layers.0.experts.{dropped}"]] = -1
    _, _, active = problem.evaluate(columns, {0: 2, 1: 1}, ())
    attention = sum(int(groups.params[g]) for g, k in enumerate(groups.kinds) if k == "attn")
    expert = 3 * 32 * 64
    # layer 0: top-2 of the 3 experts left, each half kept (2:4); layer 1: top-1 of 4, half kept
    assert active == pytest.approx(attention + 2 * expert / 2 + 1 * expert / 2)


def test_an_active_budget_no_plan_can_meet_is_one_line():
    table, costs = _small(seed=0)
    for layer in costs.moe:  # nothing that removes active parameters but pruning
        costs.moe[layer] = costs.moe[layer][:1]
        costs.moe_damage[layer] = costs.moe_damage[layer][:1]
    costs.block_damage = {}
    problem = _problem(table, costs, budget_share=1.0, active=0.3)
    with pytest.raises(MoepressError) as info:
        problem.solve()
    message = str(info.value)
    assert "\n" not in message and "active budget of 0.3" in message and "--active" in message


# ------------------------------------------------------------------ the command, end to end

COMMON = ["--calib-samples", "8", "--seq-len", "64", "--batch-size", "4", "--group-size", "32", "--fitness-samples",
          "2", "--quiet"]


def test_compress_with_an_active_budget_saves_what_the_plan_counts(tiny_model_dir, calib_file, tmp_path):
    """compress --budget --active plans removals and treatments together and applies them: the
    saved model's linear bytes and active parameters are the plan's, both within their budgets."""
    import moepress
    from moepress.allocate import load_plan
    from moepress.cli import main
    from moepress.evaluate import active_params, measure_footprint

    out = str(tmp_path / "out")
    assert main(["compress", "--model", tiny_model_dir("mixtral"), "--calib", calib_file, "--budget", "3bits",
                 "--scope", "all", "--active", "0.7", "--out", out, *COMMON]) == 0
    plan = load_plan(f"{out}/plan.yaml")
    assert plan.strategy == "joint" and not plan.trim.empty  # 30% fewer active parameters needs a removal here
    assert plan.totals["active_share"] <= 0.7 + 1e-9
    assert plan.totals["budget_scope_bytes"] <= plan.budget["bytes"]
    assert plan.info["rounds"] and all(r["measured_kl"] >= 0 for r in plan.info["rounds"])
    model = moepress.load(out)
    assert active_params(model)["active"] == plan.totals["active_params"]
    assert measure_footprint(model, stored_dtype=None).linear_bytes == plan.totals["bytes"]


@pytest.mark.parametrize("extra, words", [
    (["--active", "1.5"], ["--active", "(0, 1]"]),
    (["--active", "0.8", "--strategy", "greedy"], ["--active", "greedy"]),
    (["--active", "0.8", "--trim", "experts,heads"], ["--trim", "heads"]),
    (["--active", "0.8", "--granularity", "channel"], ["--active", "channel"]),
])
def test_bad_joint_flags_are_one_line_before_any_work(extra, words, tiny_model_dir, calib_file, tmp_path, capsys):
    from moepress.cli import main

    out = str(tmp_path / "plan.yaml")
    code = main(["plan", "--model", tiny_model_dir("mixtral"), "--calib", calib_file, "--budget", "3bits", "-o", out,
                 *extra, *COMMON])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("moepress: error:")]
    assert len(lines) == 1 and all(w in lines[0] for w in words), err
    assert not os.path.exists(out)


def test_an_active_budget_the_model_cannot_reach_is_one_line(tiny_model_dir, calib_file, tmp_path, capsys):
    from moepress.cli import main

    out = str(tmp_path / "plan.yaml")
    code = main(["plan", "--model", tiny_model_dir("mixtral"), "--calib", calib_file, "--budget", "3bits", "-o", out,
                 "--active", "0.1", "--trim", "experts", *COMMON])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("moepress: error:")]
    assert len(lines) == 1 and "no plan meets an active budget of 0.1" in lines[0], err
    assert not os.path.exists(out)

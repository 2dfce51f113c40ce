"""The cost table, the allocation strategies and plans: budgets hold, the ILP is optimal against
simpler solvers, a plan is applied exactly as written, and its byte accounting is the checkpoint's."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from moepress.export.checkpoint import read_tensors

import moepress
from moepress.allocate import Budget, Problem, allocate, greedy, ilp, load_plan, random_split, uniform
from moepress.costs import DEFAULT_OPTIONS, CostTable, build_cost_table, model_rows, synthetic_table
from moepress.treatment import Treatment
from moepress.errors import MoepressError
from moepress.model import MoEView
from moepress.quantize import QuantSpec, rtn_quantize

SMALL = dict(calib_samples=4, seq_len=64, batch_size=4)


@pytest.fixture(scope="module")
def tiny_table(tiny_model_dir, calib_file, tokenizer):
    """A real cost table of a tiny random Mixtral (every option, every estimator)."""
    from moepress.data import load_text, token_windows

    model = moepress.load(tiny_model_dir("mixtral"))
    tokens = token_windows(load_text(calib_file), tokenizer, 64, 4, seed=0)
    return build_cost_table(model, tokens, progress=False)


# ------------------------------------------------------------------ cost table

def test_option_bytes_are_the_packed_bytes():
    w = torch.randn(3, 256, 384)
    for option in DEFAULT_OPTIONS:
        if option.keep:
            assert option.nbytes(256, 384) == 256 * 384 * 2
            continue
        for symmetric in (False, True):
            treatment = option.with_settings(symmetric=symmetric)
            packed = rtn_quantize(w, QuantSpec(option.bits, option.group_size, symmetric=symmetric, method="rtn"))
            assert treatment.nbytes(256, 384) == packed.select(0).nbytes()


def test_option_labels_round_trip_and_bad_ones_fail():
    for option in DEFAULT_OPTIONS + (Treatment.quantize(3, None), Treatment.quantize(4, 64)):
        assert Treatment.parse(option.label) == option
    assert Treatment.parse(3) == Treatment.quantize(3, 128) and Treatment.parse("4b") == Treatment.quantize(4, 128)
    for bad in ("5b", "3b-g100", "three", True):
        with pytest.raises(MoepressError):
            Treatment.parse(bad)


def test_cost_table_damage_falls_with_bits_and_saves(tiny_table, tmp_path):
    bits = [o.bits for o in tiny_table.options]
    assert bits == sorted(bits) and tiny_table.options[-1].keep
    for estimator, damage in tiny_table.damage.items():
        assert np.all(damage[:, -1] == 0), estimator  # keep costs nothing
        assert np.all(damage[:, :-1] > 0), estimator
        # 2 > 3 > 4 > 8 bits, for (nearly) every unit: GPTQ is not monotone by law, but on these weights it is.
        assert np.mean(np.diff(damage[:, :-1], axis=1) < 0) > 0.95, estimator
    assert np.all(np.diff(tiny_table.bytes, axis=1) > 0)  # more bits, more bytes
    rows = tiny_table.rows
    assert {r.kind for r in rows} == {"attn", "expert"}
    # Routing fractions of a layer's experts sum to top_k (every token picks top_k experts).
    fractions = tiny_table.stats["tokens_fraction"]
    layer0 = [i for i, r in enumerate(rows) if r.kind == "expert" and r.layer == 0 and r.linear == "down_proj"]
    assert fractions[layer0].sum() == pytest.approx(2.0)

    path = str(tmp_path / "table.safetensors")
    tiny_table.save(path)
    again = CostTable.load(path)
    assert again.options == tiny_table.options and again.rows == rows
    assert np.array_equal(again.bytes, tiny_table.bytes)
    for k in tiny_table.damage:
        assert np.array_equal(again.damage[k], tiny_table.damage[k])


def test_corrupt_cost_table_is_one_line_error(tmp_path):
    path = tmp_path / "table.safetensors"
    path.write_bytes(b"not a table")
    with pytest.raises(MoepressError, match="cannot read cost table"):
        CostTable.load(str(path))


# ------------------------------------------------------------------ solvers

def _problem(table, budget_bits, granularity="linear", estimator="gptq_routed"):
    budget = Budget.parse(f"{budget_bits}bits")
    groups = table.groups(granularity, estimator, budget.kinds)
    allowed = [table.option_index(o) for o in table.options if not o.keep]
    return Problem(groups, allowed, budget.to_bytes(table), table)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bits", [2.25, 2.5, 3.0, 3.5])
def test_ilp_fits_budget_and_beats_greedy_and_uniform(seed, bits):
    table = synthetic_table(layers=4, experts=8, hidden=256, intermediate=512, seed=seed)
    problem = _problem(table, bits)
    best = ilp(problem)
    assert problem.total_bytes(best) <= problem.budget_bytes
    for other in (greedy(problem), random_split(problem, 0, 1, seed), uniform(problem, 0)):
        assert problem.total_bytes(other) <= problem.budget_bytes
        assert problem.total_damage(best) <= problem.total_damage(other) * (1 + 1e-9)
    if bits == 3.0:
        assert problem.total_damage(best) <= problem.total_damage(uniform(problem, 1)) * (1 + 1e-9)


def test_ilp_matches_brute_force_on_a_small_problem():
    import itertools

    table = synthetic_table(layers=1, experts=2, hidden=128, intermediate=128, seed=3,
                            options=[Treatment.quantize(b) for b in (2, 3, 4)])
    problem = _problem(table, 2.6)
    G, A = problem.bytes.shape
    feasible = [c for c in itertools.product(range(A), repeat=G) if problem.total_bytes(np.array(c)) <= problem.budget_bytes]
    optimum = min(problem.total_damage(np.array(c)) for c in feasible)
    assert problem.total_damage(ilp(problem)) == pytest.approx(optimum, rel=1e-9)


def test_per_layer_ilp_respects_each_layer_share():
    table = synthetic_table(layers=3, experts=4, hidden=128, intermediate=256, seed=0)
    problem = _problem(table, 2.5)
    choice = ilp(problem, per_layer=True)
    params = problem.groups.params
    for layer in range(3):
        mask = problem.groups.layers == layer
        spent = problem.bytes[np.arange(len(choice)), choice][mask].sum()
        assert spent <= problem.budget_bytes * params[mask].sum() / params.sum() + 1e-6


def test_budget_parsing_and_refusals(tiny_table):
    assert Budget.parse("2.5bits").bits == 2.5 and Budget.parse("11GB").bytes == 11 * 10**9
    assert Budget.parse("1.5MiB").bytes == int(1.5 * 2**20)
    for bad in ("2.5", "lots", "3 bitz"):
        with pytest.raises(MoepressError, match="cannot read budget"):
            Budget.parse(bad)
    # 3 bits over the experts is exactly uniform 3-bit's bytes; 2.5 is half way to 2-bit's.
    b2, b3 = (tiny_table.uniform_bytes(tiny_table.column(b), ("expert",)) for b in (2, 3))
    assert Budget.parse("3bits").to_bytes(tiny_table) == b3
    assert Budget.parse("2.5bits").to_bytes(tiny_table) == round((b2 + b3) / 2)
    with pytest.raises(MoepressError, match="below the smallest option"):
        allocate(tiny_table, Budget.parse("1000B"), "ilp")


@pytest.mark.parametrize("strategy", ["uniform", "greedy", "heuristic", "ilp"])
@pytest.mark.parametrize("granularity", ["expert", "linear"])
def test_every_strategy_fits_its_budget(tiny_table, strategy, granularity):
    for bits in ("2.5bits", "3bits"):
        budget = Budget.parse(bits)
        plan = allocate(tiny_table, budget, strategy, granularity=granularity)
        assert plan.totals["budget_scope_bytes"] <= budget.to_bytes(tiny_table)
        resolved = plan.resolve(tiny_table.rows)
        assert all(resolved[r.name] == tiny_table.parse("4b") for r in tiny_table.rows if r.kind == "attn")  # others
    ilp_plan = allocate(tiny_table, Budget.parse("2.5bits"), "ilp", granularity=granularity)
    for other in ("uniform", "greedy", "heuristic"):
        plan = allocate(tiny_table, Budget.parse("2.5bits"), other, granularity=granularity)
        assert ilp_plan.totals["predicted_damage"]["value"] <= plan.totals["predicted_damage"]["value"] * (1 + 1e-9)


def test_heuristic_rules_move_bits_where_they_say(tiny_table):
    budget = Budget.parse("3.2bits", scope="all")
    three, four = tiny_table.parse("3b"), tiny_table.parse("4b")
    plan = allocate(tiny_table, budget, "heuristic", rules=("attention",), options=[three, four])
    resolved = plan.resolve(tiny_table.rows)
    assert all(resolved[r.name] == four for r in tiny_table.rows if r.kind == "attn")
    assert all(resolved[r.name] == three for r in tiny_table.rows if r.kind == "expert")
    plan = allocate(tiny_table, Budget.parse("2.5bits"), "heuristic", rules=("frequency",))
    fractions = tiny_table.stats["tokens_fraction"]
    resolved = plan.resolve(tiny_table.rows)
    up = [fractions[i] for i, r in enumerate(tiny_table.rows) if r.kind == "expert" and resolved[r.name].bits == 3]
    down = [fractions[i] for i, r in enumerate(tiny_table.rows) if r.kind == "expert" and resolved[r.name].bits == 2]
    assert up and down and min(up) >= max(down)


def test_ilp_plans_a_mixtral_8x7b_sized_table():
    table = synthetic_table(layers=32, experts=8, hidden=4096, intermediate=14336, seed=0)
    plan = allocate(table, Budget.parse("2.5bits"), "ilp", granularity="linear")
    assert plan.totals["budget_scope_bytes"] <= plan.budget["bytes"]
    assert len(plan.units) == 32 * (8 * 3 + 4)


# ------------------------------------------------------------------ plans on real checkpoints

def _hand_edited_plan(tiny_table, path):
    plan = allocate(tiny_table, Budget.parse("2.5bits"), "ilp")
    plan.save(path)
    text = open(path).read()
    # Edit the file by hand as a user would: keep one expert, an attention projection in 16 bits,
    # one expert's down projection at 8-bit per-channel, another attention projection at 2 bits.
    text = text.replace("  layers.0.experts.1: 2b-g128\n", "  layers.0.experts.1: 16b\n").replace(
        "  layers.0.experts.1: 3b-g128\n", "  layers.0.experts.1: 16b\n")
    text = text.replace("  layers.0.attn.q_proj: 4b-g128\n", "  layers.0.attn.q_proj: 16b\n")
    text = text.replace("  layers.1.attn.o_proj: 4b-g128\n", "  layers.1.attn.o_proj: 2b-ch\n")
    text += "  layers.1.experts.2.down_proj: 8b-ch\n"
    # and prune: one linear 2:4 and 4-bit in one pass, another 50% with its kept weights as they are
    text += "  layers.1.experts.3.up_proj: 2:4+4b-g128\n  layers.0.experts.2.down_proj: 50%\n"
    open(path, "w").write(text)
    return load_plan(path)


def test_hand_edited_plan_is_applied_exactly_and_bytes_match_checkpoint(tiny_table, tiny_model_dir, calib_file, tmp_path):
    source = tiny_model_dir("mixtral")
    plan = _hand_edited_plan(tiny_table, str(tmp_path / "plan.yaml"))
    out = str(tmp_path / "out")
    result = moepress.compress(source, plan=str(tmp_path / "plan.yaml"), calib=calib_file, out=out,
                               progress=False, **SMALL)
    rows = model_rows(MoEView(moepress.load(source)))
    resolved = plan.resolve(rows)
    assert resolved["layers.0.experts.1.gate_proj"].keep and resolved["layers.0.attn.q_proj"].keep
    assert resolved["layers.1.experts.2.down_proj"] == tiny_table.parse("8b-ch")
    assert resolved["layers.1.attn.o_proj"] == tiny_table.parse("2b-ch")

    # The checkpoint's unit map is the plan, unit by unit.
    record = json.load(open(os.path.join(out, "moepress.json")))
    for name, treatment in resolved.items():
        assert Treatment.from_unit_map(record["units"][name]) == treatment, name

    # Bytes: the plan's accounting equals the bytes of those units' tensors in the checkpoint.
    unit_bytes = 0
    view = MoEView(result.model)
    paths = {}
    for layer in range(view.num_layers):
        for unit in view.linear_units(layer):
            paths[unit.module_path + "."] = unit.name
        store = view.experts(layer)
        for e in range(store.num_experts):
            for linear in ("gate_proj", "up_proj", "down_proj"):
                paths[f"{store.module_path}.{e}.{linear}."] = store.unit_name(e, linear)
    seen = set()
    for key, t in read_tensors(out).items():
        prefix = next((p for p in paths if key.startswith(p)), None)
        if prefix is None or key.endswith(".bias"):
            continue
        seen.add(paths[prefix])
        unit_bytes += t.numel() * t.element_size()
    assert seen == set(resolved)
    assert unit_bytes == plan.accounting(rows)["bytes"]

    # It reloads (kept expert and all) to the same logits.
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(moepress.load(out)(ids).logits, result.model(ids).logits)
        # The kept expert really is the original weight.
        original = moepress.load(source)
        kept = view.experts(0).weight("gate_proj")[1]
        assert torch.equal(kept, MoEView(original).experts(0).weight("gate_proj")[1].float())


def test_plans_that_do_not_fit_are_refused(tiny_table, tiny_model_dir, tmp_path):
    rows = tiny_table.rows
    plan = allocate(tiny_table, Budget.parse("3bits"), "uniform")
    bad = load_plan_from(plan, tmp_path, extra="  layers.9.experts.0: 3b-g128\n")
    with pytest.raises(MoepressError, match="layers.9.experts.0.*does not exist"):
        bad.resolve(rows)
    with pytest.raises(MoepressError, match="layers.0.experts.0.*5b"):
        load_plan_from(plan, tmp_path, extra="  layers.0.experts.0: 5b\n")
    missing = load_plan_from(plan, tmp_path, drop="  layers.1.attn.k_proj: 4b-g128\n")
    with pytest.raises(MoepressError, match="no option for layers.1.attn.k_proj"):
        missing.resolve(rows)
    with pytest.raises(MoepressError, match="plan file not found"):
        load_plan(str(tmp_path / "nope.yaml"))
    (tmp_path / "broken.yaml").write_text("units: [1, 2\n")
    with pytest.raises(MoepressError, match="not valid YAML"):
        load_plan(str(tmp_path / "broken.yaml"))


def load_plan_from(plan, tmp_path, extra: str = "", drop: str = ""):
    path = str(tmp_path / "edited.yaml")
    plan.save(path)
    text = open(path).read().replace(drop, "") + extra
    open(path, "w").write(text)
    return load_plan(path)


# ------------------------------------------------------------------ the command line

def test_plan_command_then_compress_with_the_plan(tiny_model_dir, calib_file, tmp_path, capsys):
    from moepress.cli import main

    source = tiny_model_dir("qwen2_moe")  # shared experts: 'others' cover them
    plan_path, table_path = str(tmp_path / "plan.yaml"), str(tmp_path / "table.safetensors")
    common = ["plan", "--model", source, "--calib", calib_file, "--calib-samples", "4", "--seq-len", "64",
              "--quiet", "--table", table_path]
    assert main(common + ["--budget", "2.5bits", "--strategy", "ilp", "-o", plan_path, "--plot",
                          str(tmp_path / "plan.png")]) == 0
    assert os.path.getsize(tmp_path / "plan.png") > 1000 and os.path.exists(table_path)
    # Second plan re-uses the saved table; evolution on the same model (it builds its own variants).
    assert main(common + ["--budget", "3bits", "--strategy", "heuristic", "--rules", "frequency", "-o",
                          str(tmp_path / "h.yaml")]) == 0
    assert "cost table: read" in capsys.readouterr().err
    assert main(common + ["--budget", "2.5bits", "--strategy", "evolution", "--population", "4",
                          "--generations", "2", "--fitness-samples", "2", "-o", str(tmp_path / "evo.yaml")]) == 0
    evo = load_plan(str(tmp_path / "evo.yaml"))
    assert evo.info["best_fitness_kl"] <= evo.info["seed_fitness_kl"]

    out = str(tmp_path / "out")
    assert main(["compress", "--model", source, "--plan", plan_path, "--calib", calib_file, "--calib-samples", "4",
                 "--seq-len", "64", "--out", out, "--quiet"]) == 0
    record = json.load(open(os.path.join(out, "moepress.json")))
    plan = load_plan(plan_path)
    assert record["plan"]["strategy"] == "ilp" and record["bits"] is None
    resolved = plan.resolve(model_rows(MoEView(moepress.load(source))))
    assert {n: Treatment.from_unit_map(u) for n, u in record["units"].items()} == resolved

    # Refusals: one line, exit 2, nothing written.
    capsys.readouterr()
    bad = str(tmp_path / "bad.yaml")
    assert main(common + ["--budget", "10B", "-o", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after transformers' loading bar)
    assert err.startswith("moepress: error:") and "below the smallest option" in err
    assert not os.path.exists(bad)
    assert main(common + ["--budget", "1.5bits", "-o", bad]) == 2
    assert "below the smallest option (2 bits)" in capsys.readouterr().err


def test_evolution_fits_budget_and_never_loses_to_its_seed():
    from moepress.allocate.evolution import evolve

    table = synthetic_table(layers=3, experts=4, hidden=128, intermediate=256, seed=4)
    problem = _problem(table, 2.5, granularity="expert")
    seed_choice = ilp(problem)
    fixed = np.zeros(len(table.rows), dtype=np.int64)
    rng = np.random.default_rng(0)
    interaction = rng.random((len(table.rows), len(table.rows))) * 1e-3

    def fitness(row_options):  # additive damage plus a pairwise interaction the ILP cannot see
        d = table.damage["gptq_routed"][np.arange(len(row_options)), row_options]
        return float(d.sum() + d @ interaction @ d)

    best, info = evolve(problem, seed_choice, evaluate=fitness, fixed_rows=fixed, population=8, generations=5, seed=0)
    assert problem.total_bytes(best) <= problem.budget_bytes
    assert info["best_fitness_kl"] <= info["seed_fitness_kl"]
    assert info["evaluations"] > 8  # it explored
    assert info["history_kl"] == sorted(info["history_kl"], reverse=True)  # elitism: never gets worse

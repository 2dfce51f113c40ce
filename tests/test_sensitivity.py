"""The kl_scaled estimator: the table's damage rescaled per (layer, kind) by measured output KL."""

from __future__ import annotations

import numpy as np
import pytest

import moepress
from moepress.allocate import Budget, add_kl_scaled, allocate, load_plan
from moepress.allocate.sensitivity import ORIGINAL, blocks, probe_option_indices
from moepress.costs import CostTable, build_cost_table, synthetic_table


class _KnownSensitivity:
    """A stand-in for PlanEvaluator whose "KL" is each block's base damage times a known weight:
    the exchange rate add_kl_scaled has to recover."""

    def __init__(self, table, weight):
        self.table, self.weight, self.tokens = table, weight, np.zeros((3, 8))
        self.installed = np.full(len(table.rows), ORIGINAL)

    def install(self, row_options):
        self.installed = np.asarray(row_options).copy()

    def metrics(self, row_options):
        self.install(row_options)
        base = self.table.damage["gptq_routed"]
        kl = sum(self.weight[(r.layer, r.kind)] * base[i, o]
                 for i, (r, o) in enumerate(zip(self.table.rows, self.installed)) if o != ORIGINAL)
        return {"kl": float(kl)}


def test_kl_scaled_recovers_each_blocks_exchange_rate_and_fixes_the_ilp():
    table = synthetic_table(layers=4, experts=6, hidden=128, intermediate=256, seed=3, neurons=True)
    rng = np.random.default_rng(0)
    weight = {key: float(rng.choice([0.05, 1.0, 20.0])) for key in blocks(table)}
    info = add_kl_scaled(table, _KnownSensitivity(table, weight))
    assert info["probes"] == ["2b-g128", "3b-g128", "4b-g128"]
    assert len(info["blocks"]) == 3 * len(blocks(table))
    assert info["evaluations"] == 3 * len(blocks(table)) + 1  # unquantized, 2, 3 bits per block; the 4-bit background
    truth = table.damage["gptq_routed"] * np.array([weight[(r.layer, r.kind)] for r in table.rows])[:, None]
    np.testing.assert_allclose(table.damage["kl_scaled"], truth, rtol=1e-9)
    # Per-neuron damage is scaled with its row, so channel plans see the same exchange rate.
    expert_rows = table.neuron_rows
    np.testing.assert_allclose(table.neuron["kl_scaled"].sum(-1), truth[expert_rows], rtol=1e-4)

    # The ILP on the scaled table is optimal for the true damage; on the unscaled one it is not.
    budget = Budget.parse("2.5bits")
    true_damage = {}
    for estimator in ("gptq_routed", "kl_scaled"):
        plan = allocate(table, budget, "ilp", estimator=estimator)
        assert plan.totals["budget_scope_bytes"] <= plan.budget["bytes"]
        options = plan.resolve(table.rows)
        true_damage[estimator] = sum(truth[i, table.option_index(options[r.name])]
                                     for i, r in enumerate(table.rows) if r.kind == "expert")
    assert true_damage["kl_scaled"] < 0.9 * true_damage["gptq_routed"]


def test_kl_scaled_on_a_real_model_matches_what_it_measured(tiny_model_dir, calib_file, tokenizer, tmp_path):
    from moepress.allocate.evolution import PlanEvaluator
    from moepress.data import load_text, token_windows

    model = moepress.load(tiny_model_dir("qwen2_moe"))  # attention, routed and shared experts
    text = load_text(calib_file)
    table = build_cost_table(model, token_windows(text, tokenizer, 64, 4, seed=0), progress=False,
                             keep_variants=True)
    evaluator = PlanEvaluator(model, table, token_windows(text, tokenizer, 64, 2, seed=1))
    info = add_kl_scaled(table, evaluator)
    assert info["background"] == "4b-g128" and info["probes"] == ["2b-g128", "3b-g128", "4b-g128"]
    probes = probe_option_indices(table)
    scaled, base = table.damage["kl_scaled"], table.damage["gptq_routed"]
    four = table.option_index("4b-g128")
    for (layer, kind), rows in blocks(table).items():
        background = np.full(len(table.rows), four)
        background[rows] = ORIGINAL
        without = evaluator.metrics(background)["kl"]
        for probe in probes:
            # Each block's scaled damage at a probed option is the KL it adds to a 4-bit model (where
            # that is not positive, as can happen on random weights, the median exchange rate).
            candidate = background.copy()
            candidate[rows] = probe
            added = evaluator.metrics(candidate)["kl"] - without
            entry = next(b for b in info["blocks"] if (b["layer"], b["kind"], b["option"]) ==
                         (layer, kind, table.options[probe].label))
            assert entry["kl"] == pytest.approx(added, rel=1e-4, abs=1e-9)
            expected = added if added > 0 else entry["scale"] * base[rows, probe].sum()
            assert scaled[rows, probe].sum() == pytest.approx(expected, rel=1e-4, abs=1e-9)
            # Within a block and option the table's ranking is kept: one factor for every row.
            ratio = scaled[rows, probe] / base[rows, probe]
            np.testing.assert_allclose(ratio, ratio[0], rtol=1e-9)
        eight = table.option_index("8b-g128")  # not probed: the factor of the nearest probe (4 bits)
        np.testing.assert_allclose(scaled[rows, eight] / base[rows, eight],
                                   scaled[rows[0], probes[-1]] / base[rows[0], probes[-1]], rtol=1e-9)
    scales = [b["scale"] for b in info["blocks"]]
    assert max(scales) > 2 * min(scales)  # the blocks really are weighed differently

    # Measured in the original model instead, a block's damage is the KL of quantizing it alone.
    add_kl_scaled(table, evaluator, name="alone", background=None)
    rows = blocks(table)[(0, "expert")] if (0, "expert") in blocks(table) else next(iter(blocks(table).values()))
    candidate = np.full(len(table.rows), ORIGINAL)
    candidate[rows] = probes[0]
    assert table.damage["alone"][rows, probes[0]].sum() == pytest.approx(evaluator.metrics(candidate)["kl"], rel=1e-5)
    assert evaluator.metrics(np.full(len(table.rows), ORIGINAL))["kl"] == pytest.approx(0.0, abs=1e-9)

    path = str(tmp_path / "table.safetensors")
    table.save(path)
    loaded = CostTable.load(path)
    np.testing.assert_allclose(loaded.damage["kl_scaled"], scaled)
    assert loaded.meta["kl_scaled"]["probes"] == info["probes"]


def test_plan_command_with_kl_scaled_measures_once_then_reuses_the_table(tiny_model_dir, calib_file, tmp_path, capsys):
    from moepress.cli import main

    table_path = str(tmp_path / "table.safetensors")
    common = ["plan", "--model", tiny_model_dir("mixtral"), "--calib", calib_file, "--calib-samples", "4",
              "--seq-len", "64", "--fitness-samples", "2", "--quiet", "--table", table_path,
              "--estimator", "kl_scaled", "--budget", "2.5bits"]
    assert main(common + ["-o", str(tmp_path / "a.yaml")]) == 0
    assert "layer sensitivity:" in capsys.readouterr().err
    assert main(common + ["--strategy", "greedy", "-o", str(tmp_path / "b.yaml")]) == 0
    err = capsys.readouterr().err
    assert "cost table: read" in err and "layer sensitivity:" not in err
    plan = load_plan(str(tmp_path / "a.yaml"))
    assert plan.estimator == "kl_scaled" and plan.totals["budget_scope_bytes"] <= plan.budget["bytes"]


def test_auto_estimator_is_kl_scaled_where_the_model_fits_else_streamed_gptq_routed(monkeypatch, capsys):
    """``--estimator auto`` (the default): kl_scaled (it keeps the model in memory) when that fits, else
    gptq_routed, saying why; plans that do not read the damage, and targets, stay streamed."""
    from types import SimpleNamespace

    import moepress.pipeline.memory
    from moepress.allocate.command import PlanOptions, _default_estimator, _resident_bytes
    from moepress.model.tiny import build_tiny_model

    source = SimpleNamespace(model=build_tiny_model("mixtral"))
    needed = _resident_bytes(source)
    assert PlanOptions().estimator == "auto"
    monkeypatch.setattr(moepress.pipeline.memory, "memory_available", lambda: 10 * needed)
    assert _default_estimator(source, PlanOptions()) == "kl_scaled"
    assert _default_estimator(source, PlanOptions(strategy="heuristic")) == "gptq_routed"
    assert _default_estimator(source, PlanOptions(target="vllm")) == "gptq_routed"
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(moepress.pipeline.memory, "memory_available", lambda: needed // 2)
    assert _default_estimator(source, PlanOptions()) == "gptq_routed"
    line = capsys.readouterr().err.strip().splitlines()
    assert len(line) == 1 and "gptq_routed, streamed" in line[0] and "kl_scaled" in line[0]

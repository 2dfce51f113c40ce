"""Pruned options as columns of the cost table: bytes are the stored bytes, damage is that of the
weight compression would store, kl_scaled probes them on their own, and `moepress plan
--prune-options` lets the ILP choose them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moepress
from moepress.allocate import Budget, add_kl_scaled, load_plan
from moepress.allocate.sensitivity import ORIGINAL, blocks
from moepress.cli import main
from moepress.costs import CostTable, build_cost_table, synthetic_table
from moepress.errors import MoepressError
from moepress.model import MoEView
from moepress.treatment import Treatment

from .helpers import run_cli

OPTIONS = [Treatment.parse(label) for label in ("4b-g128", "2:4+4b", "2:4", "16b")]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return moepress.load(tiny_model_dir("mixtral"))


@pytest.fixture(scope="module")
def table(model, calib_file, tokenizer):
    from moepress.data import load_text, token_windows

    tokens = token_windows(load_text(calib_file), tokenizer, 64, 4, seed=0)
    return build_cost_table(model, tokens, OPTIONS, progress=False, keep_variants=True)


def _columns(table):
    return (table.option_index("4b-g128"), table.option_index("2:4+4b-g128"), table.option_index("2:4"),
            table.option_index("16b"))


def test_prune_columns_are_ordered_and_column_finds_only_quantize_options(table):
    assert [o.label for o in table.options] == ["2:4+4b-g128", "4b-g128", "2:4", "16b"]
    assert table.column(4, 128) == Treatment.quantize(4, 128, **table.settings) and not table.column(4).pruned
    assert table.column(16).keep and table.column(3) is None
    assert table.parse("2:4+4b-g128") in table.options


def test_prune_column_bytes_are_the_stored_bytes_and_kept_is_half(table):
    q4, p4, p16, keep = _columns(table)
    params = np.array([r.params for r in table.rows])
    for i, row in enumerate(table.rows):
        for o in (q4, p4, p16):
            assert table.bytes[i, o] == table.variants[i, o].nbytes(), (row.name, table.options[o])
    assert np.array_equal(table.kept[:, p4], params // 2) and np.array_equal(table.kept[:, p16], params // 2)
    assert np.array_equal(table.kept[:, q4], params) and np.array_equal(table.kept[:, keep], params)
    assert np.all(table.bytes[:, p4] < table.bytes[:, q4]) and np.all(table.bytes[:, p16] < table.bytes[:, keep])

    experts = table.groups("expert", kinds=("expert",))
    assert np.array_equal(experts.kept[:, p16], experts.params // 2)
    assert np.array_equal(experts.kept[:, q4], experts.params)
    assert np.array_equal(experts.kept, np.stack([table.kept[r].sum(0) for r in experts.rows]))
    # Neuron groups keep their share: half of their rows of gate/up and columns of down at 2:4.
    options = [Treatment.parse(label) for label in ("4b-ch", "2:4+4b-ch", "2:4", "16b")]
    synthetic = synthetic_table(layers=1, experts=2, hidden=128, intermediate=256, options=options, neurons=True)
    channels = synthetic.groups("channel", kinds=("expert",), channel_group=32)
    assert len(channels.names) == 2 * 256 // 32
    for o, option in enumerate(synthetic.options):
        assert np.array_equal(channels.kept[:, o], channels.params // (2 if option.pruned else 1)), option


def test_prune_damage_is_that_of_the_stored_weight(table, model):
    q4, p4, p16, keep = _columns(table)
    for estimator in ("gptq", "gptq_routed", "hawq"):
        damage = table.damage[estimator]
        # Pruning half the weights and quantizing the rest loses more than quantizing alone.
        assert np.all(damage[:, p4] >= damage[:, q4]), estimator
        assert np.all(damage[:, p16] > 0) and np.all(damage[:, keep] == 0), estimator
    # The gptq damage of a routed down projection is trace(D H D^T) of its kept variant.
    view = MoEView(model)
    for i, hessian in list(table.hessians.items())[:4]:
        row = table.rows[i]
        w = view.experts(row.layer).weight("down_proj")[row.expert].detach().float()
        for o in (q4, p4, p16):
            d = w - table.variants[i, o].dequantize(torch.float32)
            assert table.damage["gptq"][i, o] == pytest.approx(float(torch.trace(d @ hessian @ d.T)), rel=1e-4)
        # The per-neuron attributions of a prune column add up to its damage, as for the others.
        n = list(table.neuron_rows).index(i)
        assert table.neuron["gptq"][n, p4].sum() == pytest.approx(table.damage["gptq"][i, p4], rel=1e-4)


def test_prune_variants_have_the_2_4_pattern(table):
    q4, p4, p16, _ = _columns(table)
    for (i, o), variant in table.variants.items():
        if o not in (p4, p16):
            continue
        row = table.rows[i]
        dense = variant.dequantize(torch.float32)
        assert dense.shape == (row.out_features, row.in_features), row.name
        kept = variant.mask_bool().reshape(row.out_features, -1, 4)
        assert torch.all(kept.sum(-1) == 2), row.name
        assert torch.all(dense.reshape(kept.shape)[~kept] == 0), row.name
        if o == p16:  # the kept weights are the model's own: exactly two nonzeros in every four
            assert torch.all((dense.reshape(kept.shape) != 0).sum(-1) == 2), row.name


def test_table_with_prune_columns_saves_and_loads(table, tmp_path):
    path = str(tmp_path / "table.safetensors")
    table.save(path)
    again = CostTable.load(path)
    assert again.options == table.options and again.rows == table.rows
    assert np.array_equal(again.bytes, table.bytes) and np.array_equal(again.kept, table.kept)
    for k in table.damage:
        assert np.array_equal(again.damage[k], table.damage[k])
    for k in table.neuron:
        assert np.array_equal(again.neuron[k], table.neuron[k])

    # A column pruned by another pruner than SparseGPT keeps its pruner through the file.
    wanda = Treatment.parse("2:4+4b", settings={"pruner": "wanda"})
    synthetic = synthetic_table(layers=1, experts=2, hidden=128, intermediate=128,
                                options=[Treatment.quantize(4), wanda, Treatment.keep_unit()])
    synthetic.save(path)
    loaded = CostTable.load(path)
    assert loaded.options == synthetic.options and loaded.options[0].pruner == "wanda"
    assert loaded.option_index("2:4+4b-g128") == 0


def test_bits_budget_ignores_the_bits_of_pruned_options():
    options = [Treatment.parse(label) for label in ("2:4+2b", "3b", "4b", "16b")]
    table = synthetic_table(layers=1, experts=2, hidden=128, intermediate=128, options=options)
    with pytest.raises(MoepressError, match=r"below the smallest option \(3 bits\)"):
        Budget.parse("2.5bits").to_bytes(table)
    three, four = (table.uniform_bytes(o, ("expert",)) for o in options[1:3])
    assert Budget.parse("3.5bits").to_bytes(table) == int(round(three + 0.5 * (four - three)))


class _KnownSensitivity:
    """A stand-in evaluator whose "KL" is the base damage times a known weight per block and per
    kind of option (pruned or not): what add_kl_scaled must recover, option by option."""

    def __init__(self, table, weight):
        self.table, self.weight, self.tokens = table, weight, np.zeros((3, 8))
        self.installed = np.full(len(table.rows), ORIGINAL)

    def install(self, row_options):
        self.installed = np.asarray(row_options).copy()

    def metrics(self, row_options):
        self.install(row_options)
        base = self.table.damage["gptq_routed"]
        return {"kl": float(sum(self.weight[(r.layer, r.kind, self.table.options[o].pruned)] * base[i, o]
                                for i, (r, o) in enumerate(zip(self.table.rows, self.installed)) if o != ORIGINAL))}


def _pruned_synthetic_table():
    options = [Treatment.parse(label) for label in ("2b", "3b", "4b", "8b", "16b", "2:4+4b", "2:4")]
    table = synthetic_table(layers=3, experts=4, hidden=128, intermediate=256, seed=1, options=options)
    rng = np.random.default_rng(2)
    for k in table.damage:  # synthetic damage is 0 at 16 bits: give the pruned columns some
        for o, option in enumerate(table.options):
            if option.pruned:
                table.damage[k][:, o] = rng.lognormal(size=len(table.rows)) * 0.01
    return table


def test_kl_scaled_probes_pruned_options_and_never_mixes_kinds():
    table = _pruned_synthetic_table()
    rng = np.random.default_rng(0)
    weight = {(layer, kind, pruned): float(rng.choice([0.05, 1.0, 20.0]))
              for layer, kind in blocks(table) for pruned in (False, True)}
    truth = table.damage["gptq_routed"] * np.array(
        [[weight[(r.layer, r.kind, o.pruned)] for o in table.options] for r in table.rows])

    info = add_kl_scaled(table, _KnownSensitivity(table, weight))
    assert info["probes"] == ["2b-g128", "3b-g128", "2:4+4b-g128", "4b-g128", "2:4"]
    assert info["background"] == "4b-g128"
    np.testing.assert_allclose(table.damage["kl_scaled"], truth, rtol=1e-9)

    # Probing fewer: 8b (nearest in bits: 4b and 2:4+4b) takes 4b's factor, 2:4 takes 2:4+4b's.
    add_kl_scaled(table, _KnownSensitivity(table, weight), name="few", probes=["2b-g128", "4b-g128", "2:4+4b"])
    np.testing.assert_allclose(table.damage["few"], truth, rtol=1e-9)
    # Without a probe of its kind an option takes its kind's median factor, never a probe of the other kind.
    add_kl_scaled(table, _KnownSensitivity(table, weight), name="quantized", probes=["2b-g128", "4b-g128"])
    pruned = [o for o, option in enumerate(table.options) if option.pruned]
    unpruned = [o for o, option in enumerate(table.options) if not option.pruned]
    np.testing.assert_allclose(table.damage["quantized"][:, unpruned], truth[:, unpruned], rtol=1e-9)
    assert not np.allclose(table.damage["quantized"][:, pruned], truth[:, pruned])


def test_kl_scaled_without_pruned_options_is_unchanged():
    table = synthetic_table(layers=2, experts=4, hidden=128, intermediate=256, seed=3)
    weight = {key: w for key, w in zip(blocks(table), (0.1, 3.0, 7.0, 0.5))}

    class Evaluator(_KnownSensitivity):
        def metrics(self, row_options):
            self.install(row_options)
            base = self.table.damage["gptq_routed"]
            return {"kl": float(sum(self.weight[(r.layer, r.kind)] * base[i, o] * (1 + 0.1 * self.table.options[o].bits)
                                    for i, (r, o) in enumerate(zip(self.table.rows, self.installed)) if o != ORIGINAL))}

    info = add_kl_scaled(table, Evaluator(table, weight))
    assert info["probes"] == ["2b-g128", "3b-g128", "4b-g128"]
    eight = table.option_index("8b-g128")  # not probed: 4 bits' factor, as before
    four = table.option_index("4b-g128")
    np.testing.assert_allclose(table.damage["kl_scaled"][:, eight] / table.damage["gptq_routed"][:, eight],
                               table.damage["kl_scaled"][:, four] / table.damage["gptq_routed"][:, four], rtol=1e-9)


# ------------------------------------------------------------------ the command line

def test_plan_with_prune_options_end_to_end(tiny_model_dir, calib_file, tmp_path, capsys):
    source = tiny_model_dir("deepseek_v3")  # a dense first layer, shared and routed experts
    table_path = str(tmp_path / "table.safetensors")
    common = ["plan", "--model", source, "--calib", calib_file, "--calib-samples", "4", "--seq-len", "64",
              "--quiet", "--table", table_path, "--prune-options", "2:4+4b,2:4", "--budget", "3bits"]
    scaled = str(tmp_path / "scaled.yaml")
    assert main(common + ["--estimator", "kl_scaled", "--fitness-samples", "2", "-o", scaled]) == 0
    table = CostTable.load(table_path)
    assert {"2:4+4b-g128", "2:4"} <= {o.label for o in table.options}
    assert {"2:4+4b-g128", "2:4"} <= set(table.meta["kl_scaled"]["probes"])
    plan = load_plan(scaled)
    assert plan.totals["budget_scope_bytes"] <= plan.budget["bytes"]

    # Where pruning costs nothing, the ordinary ILP picks it: expert 0 of the first MoE layer.
    expert = next(r.group for r in table.rows if r.kind == "expert")
    rows = [i for i, r in enumerate(table.rows) if r.group == expert]
    pruned = table.option_index("2:4+4b-g128")
    for k in table.damage:
        table.damage[k][rows] = 1e3
        table.damage[k][rows, pruned] = 0.0
    table.save(table_path)
    out = str(tmp_path / "plan.yaml")
    assert main(common + ["-o", out]) == 0
    assert "cost table: read" in capsys.readouterr().err
    plan = load_plan(out)
    assert plan.units[expert] == table.options[pruned] and plan.units[expert].label == "2:4+4b-g128"
    assert plan.totals["budget_scope_bytes"] <= plan.budget["bytes"]
    resolved = plan.resolve(table.rows)
    assert resolved[f"{expert}.down_proj"].nm == (2, 4)

    # Without --prune-options the same table's pruned columns are not for the taking.
    plain = str(tmp_path / "plain.yaml")
    assert main(common[:-4] + ["--budget", "3bits", "-o", plain]) == 0
    assert not any(t.pruned for t in load_plan(plain).units.values())


@pytest.mark.parametrize("label, says", [("half", "--prune-options: cannot read treatment 'half'"),
                                         ("2:4+5b", "--prune-options: treatment '2:4+5b': bits must be"),
                                         ("4b", "--prune-options: '4b' prunes nothing"),
                                         ("2:3", "treatment 2:3 for layers.0.")])  # 3 does not divide 128 inputs
def test_bad_prune_option_is_one_line(tiny_model_dir, calib_file, tmp_path, capsys, label, says):
    out = tmp_path / "plan.yaml"
    line = run_cli(capsys, "plan", "--model", tiny_model_dir("mixtral"), "--calib", calib_file, "--budget", "3bits",
                   "--quiet", "--prune-options", f"2:4,{label}", "-o", str(out))
    assert says in line, line
    assert not out.exists()

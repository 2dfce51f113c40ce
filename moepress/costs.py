"""The cost table: for every compressible linear and every option, its exact bytes and its damage.

Every allocation strategy (uniform, the heuristics of Li et al., the ILP of MC-MoE / HAWQ, the
evolutionary search of the fine-grained paper) is a way of choosing one option per unit from this
table, so it is computed once, from one calibration pass over the *uncompressed* model, and saved.

Rows are the finest units moepress quantizes as a whole: every attention projection, every linear
(gate, up, down) of every routed expert, every shared-expert and dense-MLP linear. Coarser units (a
whole expert, a whole shared expert) are groups of rows that take one option together
(:meth:`CostTable.groups`); their bytes and damage are the sums over their rows.

Channel granularity (001's neuron groups) splits every routed expert into groups of ``c`` intermediate
neurons (a group owns rows of gate and up and columns of down). Its damage comes from per-neuron
attributions kept for every expert row (``CostTable.neuron``): with D = W - Q and the elementwise
product P = D * (D H), trace(D H D^T) = sum(P); a row of gate/up owns its row sum of P (exact: GPTQ
treats rows independently), a column of down its column sum (additive, cross terms split evenly).

Damage estimators (all in units of mean squared layer-output error per calibration token, so they
add up across units of a layer):

* ``gptq``: the GPTQ second-order loss trace((W-Q) H (W-Q)^T) of quantizing the unit with GPTQ at
  that option, H = X^T X / n over the tokens the unit sees (an expert: the tokens routed to it).
  This is the fitness of the fine-grained paper (001): every expert counts as if it saw every token.
* ``gptq_routed``: the same, times the expert's routing mass per token (sum over tokens of its
  routing weight, divided by all tokens): MC-MoE's (003) activation frequency x routing weight.
  Non-expert units see every token with weight 1.
* ``hawq``: HAWQ-V2's mean Hessian trace x ||W - RTN(W)||^2, times the fraction of tokens routed
  to the unit (the frequency a loss Hessian would carry). The baseline the reviewers of 001 asked for.

Pruned options (``2:4``, ``50%+4b-g128``) are columns like the others: Q is then the weight the
compression step would store (:func:`moepress.apply.treat_batch`: SparseGPT, jointly with GPTQ when
quantized, or a Wanda or magnitude mask), and HAWQ's RTN(W) is the magnitude-pruned weight, rounded
to nearest at the option's bits if it has any. ``CostTable.kept`` says how many weights each row
keeps at each option (its parameters unless pruned).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .apply import pruning_pattern, treat_batch
from .calibrate import collect_layer_stats
from .errors import MoepressError
from .model.view import EXPERT_LINEARS, MoEView
from .prune import magnitude_mask, sparsify
from .quantize import QuantSpec, gptq_quantize, rtn_quantize
from .quantize.spec import KEEP_BITS
from .treatment import DEFAULT_OPTIONS, DEFAULT_SETTINGS, Treatment

ESTIMATORS = ("gptq", "gptq_routed", "hawq")


@dataclass
class Row:
    """One linear of the model: what it is and where it lives."""

    name: str  # canonical unit name, e.g. layers.3.experts.5.down_proj
    kind: str  # attn | expert | shared | dense_mlp
    layer: int
    expert: int  # -1 outside the routed experts
    linear: str  # q_proj, gate_proj, ...
    out_features: int
    in_features: int

    @property
    def params(self) -> int:
        return self.out_features * self.in_features

    @property
    def group(self) -> str:
        """The unit this row belongs to at expert granularity."""
        if self.kind == "expert":
            return f"layers.{self.layer}.experts.{self.expert}"
        if self.kind == "shared":
            return f"layers.{self.layer}.shared"
        if self.kind == "dense_mlp":
            return f"layers.{self.layer}.mlp"
        return self.name


GRANULARITIES = ("linear", "expert", "channel")


def channel_key(group: str, k: int) -> str:
    """The plan key of neuron group ``k`` of an expert (``layers.3.experts.5`` -> ``...5.channels.k``)."""
    return f"{group}.channels.{k}"


def split_piece_bytes(option: Treatment, hidden: int, width: int, keep_element_size: int = 2) -> int:
    """Bytes of one neuron group of ``width`` neurons of an expert at ``option``: its rows of gate and
    up ([width, hidden] each) and its columns of down ([hidden, width]), each stored as its own piece."""
    piece = option.as_piece()
    return 2 * piece.nbytes(width, hidden, keep_element_size) + piece.nbytes(hidden, width, keep_element_size)


def check_channel_group(options, intermediate: int, hidden: int, width: int) -> None:
    """Refuse a neuron-group width the options cannot tile (one line, saying what to do)."""
    if width < 1 or intermediate % width:
        raise MoepressError(f"channel group of {width} neurons does not divide the experts' {intermediate} "
                            "intermediate neurons; pick a divisor (--channel-group)")
    for option in options:
        if option.keep:
            continue
        for n, what in ((hidden, "hidden size"), (width, "channel group")):
            try:
                option.check_shape(1, n, what)
            except MoepressError:
                raise MoepressError(f"option {option} does not tile a {what} of {n}; use a channel group that "
                                    "is a multiple of the group size, or per-channel options") from None


@dataclass
class Groups:
    """Units at one granularity, each a set of table rows taking one option together."""

    names: list[str]
    rows: list[list[int]]
    kinds: list[str]
    layers: np.ndarray  # [G]
    params: np.ndarray  # [G]
    bytes: np.ndarray  # [G, O]
    damage: np.ndarray  # [G, O] for the chosen estimator
    kept: np.ndarray  # [G, O] weights the unit keeps at each option (its params unless pruned)


class CostTable:
    """Bytes [rows, options] and damage {estimator: [rows, options]} for every linear of a model,
    plus the per-unit facts the heuristics rank by (routing frequency, outlier score, block score)."""

    def __init__(self, rows: list[Row], options: list[Treatment], bytes_: np.ndarray, damage: dict[str, np.ndarray],
                 stats: dict[str, np.ndarray], meta: dict, neuron: dict[str, np.ndarray] | None = None,
                 neuron_rows: np.ndarray | None = None):
        self.rows = rows
        self.options = list(options)
        self.bytes = np.asarray(bytes_, dtype=np.int64)
        self.damage = {k: np.asarray(v, dtype=np.float64) for k, v in damage.items()}
        self.stats = {k: np.asarray(v, dtype=np.float64) for k, v in stats.items()}
        self.meta = dict(meta)
        self.index = {row.name: i for i, row in enumerate(rows)}
        self.variants: dict[tuple[int, int], object] = {}  # (row, option) -> QuantizedWeight, if kept
        self.hessians: dict[int, torch.Tensor] = {}  # routed down rows -> calibration Hessian, if kept
        # Per-neuron damage of the routed experts' rows: {estimator: [len(neuron_rows), options, neurons]}.
        self.neuron = {k: np.asarray(v, dtype=np.float32) for k, v in (neuron or {}).items()}
        self.neuron_rows = np.asarray(neuron_rows if neuron_rows is not None else [], dtype=np.int64)
        self.kept = _kept_weights(rows, self.options)  # [rows, options]; recomputed, never saved

    # ------------------------------------------------------------------ queries
    @property
    def settings(self) -> dict:
        """The quantization settings every column shares (symmetric, act-order, damping; GPTQ)."""
        return {**DEFAULT_SETTINGS, **{k: self.meta[k] for k in ("symmetric", "act_order", "damp") if k in self.meta},
                "method": "gptq"}

    def parse(self, label, default_group: int | None = 128) -> Treatment:
        """A column's treatment from its label (``"3b-g128"``, ``"2:4+4b-g128"``), with the table's
        settings (a pruned label: the table's column of that label, whichever its pruner)."""
        option = Treatment.parse(label, default_group, self.settings)
        if option.pruned and option not in self.options:
            same = [o for o in self.options if o.label == option.label]
            if len(same) == 1:
                return same[0]
        return option

    def option_index(self, option: Treatment | str) -> int:
        """The column of ``option`` (a treatment or a label)."""
        if not isinstance(option, Treatment):
            option = self.parse(option)
        try:
            return self.options.index(option)
        except ValueError:
            raise MoepressError(
                f"option {option} is not in the cost table ({', '.join(map(str, self.options))}, "
                f"{'symmetric' if self.settings['symmetric'] else 'asymmetric'}, act-order "
                f"{self.settings['act_order']}); rebuild the table with it (--options)") from None

    def column(self, bits: int, group_size: int | None = 128) -> Treatment | None:
        """The table's (unpruned) option of ``bits`` at ``group_size``, if it has one."""
        want = Treatment.parse(bits, group_size, self.settings)
        return want if want in self.options else None

    def groups(self, granularity: str = "expert", estimator: str = "gptq_routed",
               kinds: tuple[str, ...] | None = None, channel_group: int | None = None) -> Groups:
        """Units at ``granularity`` ("linear", "expert" or "channel": groups of ``channel_group``
        neurons of every routed expert, other rows per linear), restricted to row ``kinds`` if given."""
        if granularity == "channel":
            return self._channel_groups(estimator, kinds, channel_group)
        if granularity not in GRANULARITIES:
            raise MoepressError(f"granularity must be one of {', '.join(GRANULARITIES)} (got {granularity!r})")
        if estimator not in self.damage:
            raise MoepressError(f"unknown damage estimator {estimator!r}; choose one of {', '.join(self.damage)}")
        order: dict[str, list[int]] = {}
        for i, row in enumerate(self.rows):
            if kinds is not None and row.kind not in kinds:
                continue
            key = row.name if granularity == "linear" else row.group
            order.setdefault(key, []).append(i)
        names = list(order)
        rows = [order[n] for n in names]
        damage = self.damage[estimator]
        empty = np.zeros((0, len(self.options)), np.int64)
        return Groups(
            names=names,
            rows=rows,
            kinds=[self.rows[r[0]].kind for r in rows],
            layers=np.array([self.rows[r[0]].layer for r in rows], dtype=np.int64),
            params=np.array([sum(self.rows[i].params for i in r) for r in rows], dtype=np.int64),
            bytes=np.stack([self.bytes[r].sum(0) for r in rows]) if rows else empty,
            damage=np.stack([damage[r].sum(0) for r in rows]) if rows else empty.astype(np.float64),
            kept=np.stack([self.kept[r].sum(0) for r in rows]) if rows else empty,
        )

    def _channel_groups(self, estimator: str, kinds, width: int | None) -> Groups:
        if estimator not in self.neuron:
            raise MoepressError(f"this cost table has no per-neuron damage for {estimator!r}; rebuild it with this "
                                "moepress version for channel granularity")
        if not width:
            raise MoepressError("channel granularity needs a channel group size (neurons per group), e.g. 32")
        linear = self.groups("linear", estimator, kinds)
        where = {int(r): i for i, r in enumerate(self.neuron_rows)}
        neuron = self.neuron[estimator]
        keep = int(self.meta.get("keep_element_size", 2))
        names, rows, kinds_, layers, params, bytes_, damage, kept = [], [], [], [], [], [], [], []
        experts: dict[str, list[int]] = {}
        for i, (name, r, kind) in enumerate(zip(linear.names, linear.rows, linear.kinds)):
            if kind == "expert":
                experts.setdefault(self.rows[r[0]].group, []).append(r[0])
                continue
            names.append(name), rows.append(r), kinds_.append(kind), layers.append(linear.layers[i])
            params.append(linear.params[i]), bytes_.append(linear.bytes[i]), damage.append(linear.damage[i])
            kept.append(linear.kept[i])
        for group, members in experts.items():
            gate = self.rows[members[0]]
            intermediate, hidden = gate.out_features, gate.in_features
            check_channel_group(self.options, intermediate, hidden, width)
            piece_bytes = np.array([split_piece_bytes(o, hidden, width, keep_element_size=keep) for o in self.options])
            # a group's rows of gate and up ([width, hidden] each) and its columns of down ([hidden, width])
            piece_kept = np.array([2 * width * o.kept_per_row(hidden) + hidden * o.kept_per_row(width)
                                   for o in self.options])
            for k in range(intermediate // width):
                names.append(channel_key(group, k))
                rows.append(list(members))
                kinds_.append("expert")
                layers.append(gate.layer)
                params.append(3 * width * hidden)
                bytes_.append(piece_bytes)
                kept.append(piece_kept)
                damage.append(sum(neuron[where[m], :, k * width:(k + 1) * width].sum(-1) for m in members))
        shape = (len(names), len(self.options))
        return Groups(names=names, rows=rows, kinds=kinds_, layers=np.array(layers, dtype=np.int64),
                      params=np.array(params, dtype=np.int64),
                      bytes=np.array(bytes_, dtype=np.int64).reshape(shape),
                      damage=np.array(damage, dtype=np.float64).reshape(shape),
                      kept=np.array(kept, dtype=np.int64).reshape(shape))

    def uniform_bytes(self, option: Treatment, kinds: tuple[str, ...] | None = None) -> int:
        o = self.option_index(option)
        return int(sum(self.bytes[i, o] for i, row in enumerate(self.rows) if kinds is None or row.kind in kinds))

    # ------------------------------------------------------------------ files
    def save(self, path: str) -> None:
        """One safetensors file: arrays as tensors, rows/options/meta as JSON metadata (no pickle)."""
        from safetensors.torch import save_file

        tensors = {"bytes": torch.from_numpy(self.bytes.copy())}
        tensors.update({f"damage.{k}": torch.from_numpy(v.copy()) for k, v in self.damage.items()})
        tensors.update({f"stats.{k}": torch.from_numpy(v.copy()) for k, v in self.stats.items()})
        tensors.update({f"neuron.{k}": torch.from_numpy(v.astype(np.float32)) for k, v in self.neuron.items()})
        if len(self.neuron_rows):
            tensors["neuron_rows"] = torch.from_numpy(self.neuron_rows.copy())
        # Labels do not say the pruner: a pruned column by another pruner than SparseGPT records it.
        pruners = {o.label: o.pruner for o in self.options if o.pruned and o.pruner != DEFAULT_SETTINGS["pruner"]}
        meta = {"rows": [asdict(r) for r in self.rows], "options": [o.label for o in self.options], "meta": self.meta,
                **({"pruners": pruners} if pruners else {})}
        tmp = f"{path}.tmp"
        save_file(tensors, tmp, metadata={"moepress_cost_table": json.dumps(meta)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "CostTable":
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise MoepressError(f"cost table not found: {path}; build it with 'moepress plan' (--save-table)")
        try:
            with safe_open(path, "pt") as f:
                info = json.loads((f.metadata() or {})["moepress_cost_table"])
                tensors = {k: f.get_tensor(k).numpy() for k in f.keys()}
        except Exception as exc:  # corrupt or foreign file
            raise MoepressError(f"cannot read cost table {path}: {exc}; rebuild it") from None
        settings = {**info["meta"], "method": "gptq"}
        pruners = info.get("pruners", {})
        return cls(
            rows=[Row(**r) for r in info["rows"]],
            options=[Treatment.parse(o, settings={**settings, "pruner": pruners.get(o, DEFAULT_SETTINGS["pruner"])})
                     for o in info["options"]],
            bytes_=tensors["bytes"],
            damage={k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("damage.")},
            stats={k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("stats.")},
            meta=info["meta"],
            neuron={k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("neuron.")},
            neuron_rows=tensors.get("neuron_rows"),
        )


def model_rows(view: MoEView) -> list[Row]:
    """Every linear of the model as a table row, in model order."""
    rows = []
    for layer in range(view.num_layers):
        for unit in view.attention_units(layer):
            rows.append(Row(unit.name, "attn", layer, -1, unit.name.rsplit(".", 1)[1], unit.out_features, unit.in_features))
        store = view.experts(layer)
        if store is not None:
            for e in range(store.num_experts):
                for linear in EXPERT_LINEARS:
                    rows.append(Row(store.unit_name(e, linear), "expert", layer, e, linear, *store.shape(linear)))
        for unit in view.mlp_units(layer):
            kind = "shared" if unit.kind == "shared" else "dense_mlp"
            rows.append(Row(unit.name, kind, layer, -1, unit.name.rsplit(".", 1)[1], unit.out_features, unit.in_features))
    return rows


def _outlier_score(weight: torch.Tensor) -> torch.Tensor:
    """Li et al.'s weight outlier score: max |w| over mean |w|, per matrix ([E, out, in] -> [E])."""
    a = weight.detach().float().abs().flatten(-2)
    return a.amax(-1) / a.mean(-1).clamp(min=1e-12)


def _kept_weights(rows: list[Row], options: list[Treatment]) -> np.ndarray:
    """Weights every row keeps at every option, int64 [rows, options] (out x kept per row)."""
    shapes = np.array([(r.out_features, r.in_features) for r in rows], dtype=np.int64).reshape(-1, 2)
    widths, where = np.unique(shapes[:, 1], return_inverse=True)  # a few distinct input widths
    per_row = np.array([[o.kept_per_row(int(n)) for o in options] for n in widths], dtype=np.int64)
    return shapes[:, :1] * per_row.reshape(len(widths), len(options))[where.reshape(-1)]


def _damage(weight, hessian, option: Treatment, name: str, neuron_axis: int | None = None):
    """(gptq loss, rtn perturbation ||W - RTN(W)||^2, the stored weight or None) per matrix, for a
    batch [E, out, in] or one [out, in]. With ``neuron_axis`` (-2: rows of gate/up, -1: columns of
    down) also both per neuron, [E, neurons] (see the module docstring); else None.

    The stored weight is GPTQ's packed weight, or for a pruned option what compression stores
    (:func:`~moepress.apply.treat_batch`, a ``SparseWeight``); RTN(W) of a pruned option is the
    magnitude-pruned weight, rounded to nearest at the option's bits if it has any."""
    if option.keep:
        lead = weight.shape[:-2]
        zeros = torch.zeros(lead)
        neurons = None if neuron_axis is None else torch.zeros(*lead, weight.shape[neuron_axis])
        return zeros.reshape(-1), zeros.reshape(-1), None, neurons, neurons
    w = weight.detach().float()
    if option.pruned:
        stored, _ = treat_batch(weight, hessian, option, name)
        mask = magnitude_mask(w, **pruning_pattern(option), name=name)
        r = sparsify(w, mask, option.spec(), name=name).dequantize(torch.float32)
    elif option.format is not None:  # a llama.cpp block format: GPTQ and RTN onto its own grid
        stored, _ = treat_batch(w, hessian, option, name)
        r = treat_batch(w, hessian, option.with_settings(method="rtn"), name)[0].dequantize(torch.float32)
    else:
        stored = gptq_quantize(w, hessian, option.spec(), name=name).weight
        r = rtn_quantize(w, option.with_settings(method="rtn").spec(), name=name).dequantize(torch.float32)
    d = w - stored.dequantize(torch.float32).to(w.device)
    p = (d @ hessian.float()) * d  # sums to trace(D H D^T)
    gptq_loss = p.sum(dim=(-1, -2)).reshape(-1).cpu()
    dr = (w - r.to(w.device)) ** 2
    perturbation = dr.sum(dim=(-1, -2)).reshape(-1).cpu()
    if neuron_axis is None:
        return gptq_loss, perturbation, stored.to("cpu"), None, None
    other = -1 if neuron_axis == -2 else -2
    return gptq_loss, perturbation, stored.to("cpu"), p.sum(other).cpu(), dr.sum(other).cpu()


def build_cost_table(
    model,
    tokens: torch.Tensor,
    options: list[Treatment] = DEFAULT_OPTIONS,
    *,
    symmetric: bool = False,
    act_order="static",
    damp: float = 0.01,
    device: str | None = None,
    batch_size: int = 8,
    min_expert_tokens: int = 16,
    rare_experts: str = "all_tokens",
    progress: bool = True,
    keep_variants: bool = False,
    work=None,
    trust_remote_code: bool = False,
    fits=None,
) -> CostTable:
    """One calibration pass over the uncompressed model, layer by layer; per layer, every unit is
    quantized (or pruned) with every option (GPTQ or SparseGPT for the loss, RTN or magnitude for
    HAWQ's perturbation) and forgotten, so memory stays at one layer's Hessians. The model is left
    unchanged.

    ``model`` is a model in memory, or a folder / hub id streamed one decoder layer at a time. With
    ``work`` (a :class:`~moepress.pipeline.resume.WorkFolder`) every finished layer's rows are kept
    there and a killed pass resumes after its last finished layer.

    ``keep_variants`` also keeps every GPTQ-quantized weight (packed, so about 1.1x the model's
    bf16 bytes for options 2/3/4/8; for a pruned option the ``SparseWeight`` compression would
    store) in ``table.variants[(row, option)]``: the evolutionary search evaluates plans end to end
    by swapping these in instead of quantizing again. It also keeps the routed down projections'
    Hessians (``table.hessians``), so channel plans, whose down columns are quantized in one GPTQ
    pass across groups of different widths, can be scored the same way.

    ``fits(row, option)`` (a target's rules: whether the engine can store ``option`` for ``row``)
    leaves the cells it refuses unmeasured, at 0 bytes and 0 damage; the planner never gives a unit
    such an option (:attr:`~moepress.allocate.solvers.Problem.mask`)."""
    from .pipeline.runner import LayerLoop
    from .pipeline.source import open_source

    try:
        act_mode = QuantSpec.act_order_mode(act_order)
    except ValueError as exc:
        raise MoepressError(str(exc)) from None
    # Every column shares the table's settings: the options say only bits and group size.
    settings = dict(symmetric=symmetric, act_order=act_mode, damp=damp, method="gptq")
    options = sorted({Treatment.parse(o).with_settings(**settings) for o in options}, key=Treatment.sort_key)
    source = open_source(model, trust_remote_code=trust_remote_code)
    view = MoEView(source.model)
    rows = model_rows(view)
    fits = fits or (lambda row, option: True)
    for row in rows:
        for option in options:
            if fits(row, option):
                option.check_shape(row.out_features, row.in_features, row.name)
    if keep_variants and work is not None:
        raise MoepressError("a cost table that keeps its quantized variants (evolution, kl_scaled) is built in memory "
                            "and cannot resume")
    index = {r.name: i for i, r in enumerate(rows)}
    R, O = len(rows), len(options)
    keep_size = next(source.model.parameters()).element_size()
    bytes_ = np.array([[o.nbytes(r.out_features, r.in_features, keep_size) if fits(r, o) else 0 for o in options]
                       for r in rows])
    variants: dict[tuple[int, int], object] = {}
    hessians: dict[int, torch.Tensor] = {}  # down rows -> their Hessian, with keep_variants
    n_tokens = int(tokens.numel())

    def step(layer: int, runner):
        """The rows of one layer: [r, O] damage arrays, per-row facts, per-neuron damage."""
        ids, gptq, perturbation, trace, seen, mass, outlier = [], [], [], [], [], [], []
        neuron: dict[str, torch.Tensor] = {}
        stats, handles = collect_layer_stats(view, layer, runner, min_expert_tokens, rare_experts)
        before = [h.clone() for h in runner.hidden]
        try:
            runner.run_layer(layer, update=True)
        finally:
            for h in handles:
                h.remove()
        cos = [torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean()
               for a, b in zip(before, runner.hidden)]
        block = 1.0 - float(torch.stack(cos).mean())
        del before
        for unit, s in stats["linear"].items():
            i = index[unit.name]
            weight = view.model.get_submodule(unit.module_path).weight.to(runner.device)
            hessian = s.hessian()
            g_row, p_row = np.zeros(O), np.zeros(O)
            for o, option in enumerate(options):
                if not fits(rows[i], option):
                    continue
                g, p, packed, _, _ = _damage(weight, hessian, option, unit.name)
                g_row[o], p_row[o] = float(g[0]), float(p[0])
                if keep_variants and packed is not None:
                    variants[i, o] = packed
            ids.append(i), gptq.append(g_row), perturbation.append(p_row)
            trace.append(float(hessian.diagonal().mean())), outlier.append(float(_outlier_score(weight)))
            seen.append(1.0), mass.append(1.0)
        es = stats["experts"]
        if es is not None:
            store = es.store
            in_h, mid_h = es.hessians()
            tokens_e = es.tokens.double().cpu().numpy()
            mass_e = es.routing_mass.double().cpu().numpy()
            for linear in EXPERT_LINEARS:
                weight = store.weight(linear).to(runner.device)
                hessian = mid_h if linear == "down_proj" else in_h
                lin_ids = [index[store.unit_name(e, linear)] for e in range(store.num_experts)]
                g_rows, p_rows = np.zeros((len(lin_ids), O)), np.zeros((len(lin_ids), O))
                axis = -1 if linear == "down_proj" else -2
                n_neurons = weight.shape[axis]
                ng = np.zeros((len(lin_ids), O, n_neurons))
                npert = np.zeros((len(lin_ids), O, n_neurons))
                for o, option in enumerate(options):
                    if not fits(rows[lin_ids[0]], option):  # (a layer's experts of one linear share a shape)
                        continue
                    g, p, packed, gn, pn = _damage(weight, hessian, option, f"layers.{layer}.experts.{linear}",
                                                   neuron_axis=axis)
                    g_rows[:, o], p_rows[:, o] = g.numpy(), p.numpy()
                    ng[:, o], npert[:, o] = gn.numpy(), pn.numpy()
                    if keep_variants and packed is not None:
                        for e, i in enumerate(lin_ids):
                            variants[i, o] = packed.select(e)
                if keep_variants and linear == "down_proj":  # to quantize neuron-group splits of down later
                    for e, i in enumerate(lin_ids):
                        hessians[i] = hessian[e].detach().cpu().clone()
                ids.extend(lin_ids), gptq.extend(g_rows), perturbation.extend(p_rows)
                trace.extend(hessian.diagonal(dim1=-2, dim2=-1).mean(-1).cpu().numpy())
                outlier.extend(_outlier_score(weight).cpu().numpy())
                seen.extend(tokens_e / n_tokens), mass.extend(mass_e / n_tokens)
                neuron[f"neuron_gptq.{linear}"] = torch.from_numpy(ng)
                neuron[f"neuron_pert.{linear}"] = torch.from_numpy(npert)
                neuron[f"neuron_rows.{linear}"] = torch.tensor(lin_ids, dtype=torch.int64)
        f64 = dict(dtype=torch.float64)
        tensors = {"rows": torch.tensor(ids, dtype=torch.int64), "block": torch.tensor([block], **f64),
                   "gptq": torch.tensor(np.array(gptq).reshape(-1, O), **f64),
                   "perturbation": torch.tensor(np.array(perturbation).reshape(-1, O), **f64),
                   "trace": torch.tensor(trace, **f64), "seen": torch.tensor(seen, **f64),
                   "mass": torch.tensor(mass, **f64), "outlier": torch.tensor(outlier, **f64), **neuron}
        return {}, tensors

    started = time.time()
    loop = LayerLoop(source, tokens, device=device, batch_size=batch_size, work=work, keep_layers=False,
                     progress=progress, desc="cost table")
    results = loop.run(step)
    gptq = np.zeros((R, O))
    perturbation = np.zeros((R, O))
    trace = np.zeros(R)  # mean diagonal of H
    seen = np.ones(R)  # fraction of tokens the unit sees
    mass = np.ones(R)  # routing mass per token
    outlier = np.zeros(R)
    block = np.zeros(view.num_layers)  # 1 - cos(layer input, layer output), mean over tokens
    neuron_gptq: dict[int, np.ndarray] = {}  # expert row -> [O, neurons]
    neuron_pert: dict[int, np.ndarray] = {}
    for layer, (_record, t) in enumerate(results):
        ids = t["rows"].numpy()
        gptq[ids], perturbation[ids] = t["gptq"].numpy(), t["perturbation"].numpy()
        trace[ids], seen[ids], mass[ids], outlier[ids] = (t[k].numpy() for k in ("trace", "seen", "mass", "outlier"))
        block[layer] = float(t["block"][0])
        for linear in EXPERT_LINEARS:
            if f"neuron_rows.{linear}" in t:
                for e, i in enumerate(t[f"neuron_rows.{linear}"].tolist()):
                    neuron_gptq[i] = t[f"neuron_gptq.{linear}"][e].numpy()
                    neuron_pert[i] = t[f"neuron_pert.{linear}"][e].numpy()
    model = source.model
    damage = {
        "gptq": gptq,
        "gptq_routed": gptq * mass[:, None],
        "hawq": trace[:, None] * perturbation * seen[:, None],
    }
    stats = {"tokens_fraction": seen, "routing_mass": mass, "outlier": outlier, "hessian_trace": trace,
             "block_score": block}
    neuron_rows = np.array(sorted(neuron_gptq), dtype=np.int64)
    neuron = {}
    if len(neuron_rows):
        ng = np.stack([neuron_gptq[i] for i in neuron_rows])  # [Re, O, I]
        npert = np.stack([neuron_pert[i] for i in neuron_rows])
        neuron = {"gptq": ng, "gptq_routed": ng * mass[neuron_rows, None, None],
                  "hawq": trace[neuron_rows, None, None] * npert * seen[neuron_rows, None, None]}
    meta = {
        "model_type": view.model_type,
        "source": getattr(model.config, "_name_or_path", ""),
        "calibration_tokens": n_tokens,
        "samples": int(tokens.shape[0]),
        "seq_len": int(tokens.shape[1]),
        "symmetric": symmetric,
        "act_order": act_mode,
        "damp": damp,
        "keep_element_size": keep_size,
        "seconds": round(time.time() - started, 2),
        "estimators": list(ESTIMATORS),
    }
    table = CostTable(rows, options, bytes_, damage, stats, meta, neuron=neuron, neuron_rows=neuron_rows)
    table.variants = variants
    table.hessians = hessians
    return table


def synthetic_table(layers: int, experts: int, hidden: int, intermediate: int,
                    options: list[Treatment] = DEFAULT_OPTIONS, seed: int = 0, neurons: bool = False) -> CostTable:
    """A table of the given shape with plausible random damage (decreasing in bits), for
    solver benchmarks at real model sizes (e.g. Mixtral-8x7B: 32 x 8 x 4096 x 14336). ``neurons``
    also spreads every expert row's damage over its neurons (for channel granularity)."""
    rng = np.random.default_rng(seed)
    rows = []
    for layer in range(layers):
        for name, out_f, in_f in (("q_proj", hidden, hidden), ("k_proj", hidden // 4, hidden),
                                  ("v_proj", hidden // 4, hidden), ("o_proj", hidden, hidden)):
            rows.append(Row(f"layers.{layer}.attn.{name}", "attn", layer, -1, name, out_f, in_f))
        for e in range(experts):
            for linear in EXPERT_LINEARS:
                shape = (hidden, intermediate) if linear == "down_proj" else (intermediate, hidden)
                rows.append(Row(f"layers.{layer}.experts.{e}.{linear}", "expert", layer, e, linear, *shape))
    options = sorted(set(options), key=Treatment.sort_key)

    def nbytes(option: Treatment, row: Row) -> int:  # 0 where a block format does not divide the row
        try:
            option.check_shape(row.out_features, row.in_features, row.name)
        except MoepressError:
            return 0
        return option.nbytes(row.out_features, row.in_features)

    bytes_ = np.array([[nbytes(o, r) for o in options] for r in rows])
    scale = rng.lognormal(0.0, 1.0, size=len(rows))
    bits = np.array([o.bits for o in options], dtype=float)
    damage = scale[:, None] * np.where(bits >= KEEP_BITS, 0.0, 4.0 ** (-bits))[None, :]
    mass = rng.dirichlet(np.ones(experts), size=layers)
    routed = np.array([mass[r.layer, r.expert] * 2 if r.kind == "expert" else 1.0 for r in rows])
    neuron, neuron_rows = None, None
    if neurons:
        neuron_rows = np.array([i for i, r in enumerate(rows) if r.kind == "expert"], dtype=np.int64)
        share = rng.gamma(1.0, size=(len(neuron_rows), 1, intermediate)).astype(np.float32)
        share /= share.sum(-1, keepdims=True)
        base = (damage * routed[:, None])[neuron_rows].astype(np.float32)[:, :, None] * share
        neuron = {"gptq": base, "gptq_routed": base, "hawq": base}
    return CostTable(rows, options, bytes_, {"gptq": damage, "gptq_routed": damage * routed[:, None],
                                              "hawq": damage * routed[:, None]},
                     {"tokens_fraction": routed, "routing_mass": routed, "outlier": scale,
                      "hessian_trace": scale, "block_score": rng.random(layers)},
                     {"synthetic": True, "seed": seed}, neuron=neuron, neuron_rows=neuron_rows)


__all__ = ["CostTable", "DEFAULT_OPTIONS", "ESTIMATORS", "GRANULARITIES", "Groups", "Row",
           "build_cost_table", "channel_key", "check_channel_group", "model_rows",
           "split_piece_bytes", "synthetic_table"]

"""The Plan: one treatment per unit (:class:`~moepress.treatment.Treatment`), in a plain YAML file a
person can read and edit.

    moepress_plan: 1
    strategy: ilp
    estimator: gptq_routed
    granularity: expert
    budget: {spec: 2.5bits, scope: experts, bytes: 1234567}
    quantization: {method: gptq, symmetric: false, act_order: static, damp: 0.01}
    totals: {...}                    # what the plan adds up to (informational, recomputed on load)
    trim:                            # structure the compression removes (optional; original indices)
      dropped_blocks: [2]            # whole decoder layers (never layer 0)
      dropped_moe_layers: [4]        # MoE sublayers: router, routed and shared experts (attention kept)
      top_k: {1: 1}                  # layer -> experts each token is routed to (a reduction)
      dropped_experts: {1: [3, 5]}   # layer -> routed experts removed (the rest renumbered 0..n-1)
    units:
      layers.0.attn.q_proj: 4b-g128
      layers.1.experts.3: 3b-g128    # a whole expert: its gate, up and down
      layers.1.experts.3.down_proj: 4b-g128   # a more specific key wins over a whole-expert one
      layers.2.experts.0.channels.0: 2b-g32   # neuron group 0 (channel granularity, channel_group: 32)
      layers.3.attn.q_proj: {bits: 4, group_size: 64, method: rtn}   # a unit with its own settings

Keys are canonical unit names: a linear (``layers.L.attn.q_proj``, ``layers.L.experts.E.up_proj``,
``layers.L.shared.down_proj``, ``layers.L.mlp.gate_proj``) or a group of linears
(``layers.L.experts.E``, ``layers.L.shared``, ``layers.L.mlp``), or a group of ``channel_group``
intermediate neurons of an expert (``layers.L.experts.E.channels.K``: rows K*c..(K+1)*c-1 of its gate
and up, the same columns of its down). Every linear of the model must get an option; ``16b`` keeps
it as it is. Precedence: a linear's own key, then its expert's channel keys, then the expert's key.
A label (``3b-g128``, ``4b-ch``, ``16b``) takes the plan's ``quantization`` settings; a mapping gives
a treatment's fields (bits, group_size, symmetric, act_order, method, damp) over those settings.

The ``trim`` section (a :class:`~moepress.trim.trimming.Trimming`) speaks of the original model:
its layer and expert indices are the source's, and so are the unit keys (``layers.1.experts.4``
is the source's expert 4 even when the drop of experts 3 and 5 saves it as expert 3; the
checkpoint's unit map uses the saved names). What the trim removes needs no option, and a key
naming only removed linears (a dropped expert, a linear or group of a dropped block, the shared
expert of a dropped MoE sublayer) is refused: the plan would say two things of one unit.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import yaml

from ..costs import KEEP_BITS, CostTable, Row, channel_key, check_channel_group
from ..errors import MoepressError
from ..treatment import DEFAULT_SETTINGS, SETTINGS, Treatment
from ..trim.trimming import Trimming
from .budget import Budget
from .heuristic import priority
from .solvers import Problem, greedy, ilp, random_split, split, uniform, upgrade_in_order

FORMAT_VERSION = 1


@dataclass
class Plan:
    """Every unit's :class:`~moepress.treatment.Treatment`, and how they were chosen. ``quantization``
    holds the settings the units share (a unit whose settings differ is written as a mapping)."""

    units: dict[str, Treatment]
    strategy: str = "manual"
    estimator: str | None = None
    granularity: str | None = None
    channel_group: int | None = None  # neurons per channel unit (channel granularity)
    budget: dict | None = None
    quantization: dict = field(default_factory=lambda: {"method": "gptq", "symmetric": False,
                                                         "act_order": "static", "damp": 0.01})
    totals: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    trim: Trimming = field(default_factory=Trimming)  # structure removed (original indices)

    # ------------------------------------------------------------- resolution
    def resolve(self, rows: list[Row]) -> dict[str, Treatment]:
        """The treatment of every linear of the model the trim leaves (an expert linear whose neuron
        groups differ: a split treatment of its groups' treatments); one-line errors name the
        offending unit. ``rows`` are the original model's; removed ones get no treatment."""
        removed = {}  # a removed row's name and its group -> what removes it
        for row in rows:
            why = self.trim.removal(row)
            if why is not None:
                removed[row.name] = removed[row.group] = why
        for key in self.units:
            why = removed.get(key.split(".channels.")[0])
            if why is not None:
                raise MoepressError(f"plan gives {key} a treatment but its trim {why}; remove one of them")
        rows = [r for r in rows if r.name not in removed]
        by_name = {r.name: r for r in rows}
        groups = {r.group for r in rows}
        channels = self._channel_options(rows)
        for key in self.units:
            if key not in by_name and key not in groups and key not in channels["keys"]:
                raise MoepressError(f"plan unit {key!r} does not exist in this model (e.g. {rows[0].name}); "
                                    "was the plan made for another model?")
        resolved = {}
        for row in rows:
            treatment = self.units.get(row.name)
            if treatment is None and row.group in channels["groups"]:
                given = channels["groups"][row.group]
                treatment = given if isinstance(given, Treatment) else \
                    Treatment.split(given, 1 if row.linear == "down_proj" else 0)
            if treatment is None:
                treatment = self.units.get(row.group)
            if treatment is None:
                raise MoepressError(f"plan gives no option for {row.name} (nor for {row.group}); add one "
                                    "(16b keeps it unquantized)")
            treatment.check_shape(row.out_features, row.in_features, row.name)
            resolved[row.name] = treatment
        return resolved

    def _channel_options(self, rows: list[Row]) -> dict:
        """Expert -> the treatments of its neuron groups (a tuple; one treatment when all groups agree)."""
        out: dict = {"keys": set(), "groups": {}}
        if not any(".channels." in k for k in self.units):
            return out
        if not self.channel_group:
            raise MoepressError("the plan has channel units (…channels.K) but no channel_group (neurons per "
                                "group); add e.g. 'channel_group: 32'")
        width = int(self.channel_group)
        for row in rows:
            if row.kind != "expert" or row.linear != "gate_proj":
                continue
            n = row.out_features // width
            keys = [channel_key(row.group, k) for k in range(n)]
            out["keys"].update(keys)
            given = [self.units.get(k) for k in keys]
            if all(g is None for g in given):
                continue
            if row.out_features % width:
                raise MoepressError(f"channel_group {width} does not divide the {row.out_features} neurons of "
                                    f"{row.group}; pick a divisor")
            missing = [k for k, g in zip(keys, given) if g is None]
            if missing:
                raise MoepressError(f"plan gives options for some neuron groups of {row.group} but not {missing[0]}; "
                                    "give every group one")
            check_channel_group([g for g in given], row.out_features, row.in_features, width)
            out["groups"][row.group] = given[0] if len(set(given)) == 1 else tuple(given)
        return out

    def accounting(self, rows: list[Row], keep_element_size: int | None = None, base_top_k=None) -> dict:
        """Bytes and average stored bits per parameter (scales and zeros included), by kind, of what
        the trim leaves (``rows``: the original model's; removed rows cost nothing).
        A kept (16b) unit costs ``keep_element_size`` bytes per parameter: the model's own dtype,
        recorded in ``info`` when the plan was made (2 for bf16/fp16 checkpoints).

        With ``base_top_k`` (the original model's top-k: layer -> k, or one k for every MoE layer;
        default ``info["top_k"]`` when the plan records it) also ``active_params``, the linear
        parameters a token passes through (:meth:`~moepress.trim.trimming.Trimming.active_params`),
        and ``active_share``, that over the original model's."""
        if keep_element_size is None:
            keep_element_size = int(self.info.get("keep_element_size", 2))
        if base_top_k is None:
            base_top_k = self.info.get("top_k")
        resolved = self.resolve(rows)
        by_kind: dict[str, list[int]] = {}
        histogram: dict[str, int] = {}
        for row in rows:
            treatment = resolved.get(row.name)
            if treatment is None:  # removed by the trim
                continue
            shape = (row.out_features, row.in_features)
            pieces = zip(treatment.pieces, treatment.piece_shapes(*shape)) if treatment.kind == "split" \
                else [(treatment, shape)]
            for piece, (out_f, in_f) in pieces:
                acc = by_kind.setdefault(row.kind, [0, 0])
                acc[0] += piece.nbytes(out_f, in_f, keep_element_size)
                acc[1] += out_f * in_f
                histogram[piece.label] = histogram.get(piece.label, 0) + out_f * in_f
        total_b = sum(v[0] for v in by_kind.values())
        total_p = sum(v[1] for v in by_kind.values())
        totals = {
            "bytes": total_b,
            "params": total_p,
            "average_bits": {"all": round(8 * total_b / total_p, 4),
                             **{k: round(8 * v[0] / v[1], 4) for k, v in sorted(by_kind.items())}},
            "bytes_by_kind": {k: v[0] for k, v in sorted(by_kind.items())},
            "params_by_option": dict(sorted(histogram.items())),
        }
        if not self.trim.empty:
            totals["removed_params"] = sum(r.params for r in rows if r.name not in resolved)
        if base_top_k is not None:
            active = self.trim.active_params(rows, resolved, base_top_k)
            original = Trimming().active_params(rows, None, base_top_k)
            totals["active_params"] = active
            totals["active_share"] = round(active / max(original, 1), 6)
        return totals

    @property
    def settings(self) -> dict:
        """The shared quantization settings, complete (a plan file may give only some)."""
        return {**DEFAULT_SETTINGS, **{k: v for k, v in self.quantization.items() if k in SETTINGS}}

    def entry(self, treatment: Treatment):
        """How the plan file writes ``treatment``: its label when it has the plan's shared settings,
        else a mapping of its fields."""
        if treatment.keep or treatment.settings == Treatment.parse(treatment.label, settings=self.settings).settings:
            return treatment.label
        return {k: v for k, v in treatment.to_unit_map().items() if k != "kind"}

    # ------------------------------------------------------------- files
    def to_dict(self) -> dict:
        return {
            "moepress_plan": FORMAT_VERSION,
            "strategy": self.strategy,
            "estimator": self.estimator,
            "granularity": self.granularity,
            **({"channel_group": self.channel_group} if self.channel_group else {}),
            "budget": self.budget,
            "quantization": self.quantization,
            "totals": self.totals,
            "info": self.info,
            **({"trim": self.trim.to_dict()} if not self.trim.empty else {}),
            "units": {k: self.entry(v) for k, v in self.units.items()},
        }

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False, width=120)
        os.replace(tmp, path)


def load_plan(path: str) -> Plan:
    """Read a plan file (YAML or JSON); one-line errors for a missing or malformed file."""
    if not os.path.isfile(path):
        raise MoepressError(f"plan file not found: {path}; make one with 'moepress plan'")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise MoepressError(f"cannot read plan {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\0" in text:  # a text file never holds NUL bytes; images and archives do
        raise MoepressError(f"plan {path} is not a text plan file; make one with moepress plan")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise MoepressError(f"plan {path} is not valid YAML{where}") from None
    if not isinstance(data, dict) or "units" not in data or not isinstance(data["units"], dict):
        raise MoepressError(f"plan {path} has no 'units' mapping; is it a moepress plan?")
    version = data.get("moepress_plan")
    if version != FORMAT_VERSION:
        raise MoepressError(f"plan {path}: format version {version!r} is not {FORMAT_VERSION}")
    quantization = dict(DEFAULT_SETTINGS)
    given = data.get("quantization") or {}
    if not isinstance(given, dict) or set(given) - set(SETTINGS):
        raise MoepressError(f"plan {path}: 'quantization' may set {', '.join(SETTINGS)} (got {given!r})")
    quantization.update(given)
    trim = Trimming.from_dict(data.get("trim"), where=f"plan {path}")
    units = {}
    for key, value in data["units"].items():
        try:
            units[str(key)] = Treatment.parse(value, settings=quantization)
        except MoepressError as exc:
            raise MoepressError(f"plan unit {key}: {exc}") from None
    return Plan(units=units, strategy=data.get("strategy", "manual"), estimator=data.get("estimator"),
                granularity=data.get("granularity"), channel_group=data.get("channel_group"),
                budget=data.get("budget"), quantization=quantization,
                totals=data.get("totals") or {}, info=data.get("info") or {}, trim=trim)


# ----------------------------------------------------------------- allocation

def allocate(
    table: CostTable,
    budget: Budget,
    strategy: str = "ilp",
    *,
    estimator: str = "gptq_routed",
    granularity: str = "expert",
    channel_group: int | None = None,
    options: list[Treatment] | None = None,
    others: Treatment = Treatment.quantize(4),
    group_size: int | None = 128,
    rules: tuple[str, ...] = ("attention", "shared", "first_k", "frequency", "outlier", "block"),
    first_k: int = 1,
    per_layer: bool = False,
    seed: int = 0,
    evolution: dict | None = None,
    target: str | None = None,
    tied: list[tuple[str, ...]] | None = None,
) -> Plan:
    """Choose an option for every unit of ``table`` within ``budget`` with ``strategy``.

    Units outside the budget's scope (with scope "experts": attention, shared experts, dense MLPs)
    take ``others``. ``options`` restricts what units in scope may take (default: every option of
    the table except 16-bit keep for scope "experts").

    With a ``target`` (an engine: :mod:`moepress.export.targets`), the units the engine stores as
    one tensor or one scheme (``tied``: its ``tied_units`` of the model) are one unit of the problem, their bytes and
    damage summed, and a unit never takes an option the engine refuses for it (its ``refusal``); a
    budget in bits is then bits per weight, as the engines count them (``3.5bits``: 3.5 / 8 bytes
    per parameter in scope, the blocks' scales included), since their types have no group size.
    """
    started = time.time()
    if options is None:
        options = [o for o in table.options if not (o.keep and budget.scope == "experts")]
    allowed = sorted({table.option_index(o) for o in options})
    groups = table.groups(granularity, estimator, budget.kinds, channel_group=channel_group)
    members, mask = None, None
    if target is not None:
        groups, members, mask = target_groups(table, groups, allowed, target, tied or [])
        budget_bytes = budget.bytes if budget.bytes is not None else int(budget.bits * int(groups.params.sum()) / 8)
        if strategy not in ("ilp", "greedy"):
            raise MoepressError(f"--target plans with --strategy ilp or greedy (got {strategy})")
    else:
        budget_bytes = budget.to_bytes(table, group_size)
    problem = Problem(groups, allowed, budget_bytes, table, mask=mask)
    problem.check_feasible()
    info: dict = {}
    if strategy == "uniform":
        choice = _uniform_choice(problem, budget, group_size, seed)
    elif strategy == "greedy":
        choice = greedy(problem)
    elif strategy == "ilp":
        choice = ilp(problem, per_layer=per_layer)
        info["per_layer"] = per_layer
    elif strategy == "heuristic":
        low, high = _bracket(problem, budget, group_size)
        order = np.argsort(-priority(table, groups, rules, first_k), kind="stable")
        choice = _two_level(problem, low, high, order)
        info.update(rules=list(rules), first_k=first_k, levels=[str(table.options[problem.allowed[c]]) for c in (low, high)])
    elif strategy == "evolution":
        from .evolution import evolve

        if granularity == "channel":
            raise MoepressError("evolution works at expert or linear granularity; use ilp for channel plans")
        if not evolution or "evaluate" not in evolution:
            raise MoepressError("evolution needs a fitness evaluator (moepress plan builds one from the model)")
        seed_choice = ilp(problem, per_layer=per_layer)
        fixed = np.full(len(table.rows), table.option_index(others))  # units outside the scope
        choice, info = evolve(problem, seed_choice, fixed_rows=fixed, seed=seed, **evolution)
    else:
        raise MoepressError(f"unknown strategy {strategy!r}; choose uniform, greedy, heuristic, ilp or evolution")

    chosen = {name: table.options[allowed[c]] for name, c in zip(groups.names, choice)}
    if members is not None:  # a tied group's choice is each of its units'
        chosen = {key: option for name, option in chosen.items() for key in members[name]}
    units: dict[str, Treatment] = {}  # in model order, as a person reads the file
    for row in table.rows:
        if granularity == "channel" and row.kind == "expert":
            keys = [channel_key(row.group, k) for k in range(row.out_features // channel_group)] \
                if row.linear == "gate_proj" else []
        else:
            keys = [row.group if granularity == "expert" else row.name]
        for key in keys:
            if key not in units:
                units[key] = chosen.get(key, others)
    plan = Plan(
        units=units,
        strategy=strategy,
        estimator=estimator,
        granularity=granularity,
        channel_group=channel_group if granularity == "channel" else None,
        budget={"spec": str(budget).split(" over ")[0], "scope": budget.scope, "bytes": problem.budget_bytes},
        quantization={k: table.settings[k] for k in ("method", "symmetric", "act_order", "damp")},
        info={**info, **({"target": target} if target else {}), "seed": seed,
              "planning_seconds": round(time.time() - started, 3),
              "keep_element_size": int(table.meta.get("keep_element_size", 2)),
              "others": others.label if budget.scope == "experts" else None},
    )
    plan.totals = plan.accounting(table.rows)
    plan.totals["budget_scope_bytes"] = problem.total_bytes(choice)
    plan.totals["predicted_damage"] = {"estimator": estimator, "value": problem.total_damage(choice)}
    return plan


def target_groups(table: CostTable, groups, allowed: list[int], target: str, tied: list[tuple[str, ...]]):
    """``groups`` as ``target`` constrains them: units ``tied`` (its ``tied_units``) ties merged into one (their
    rows, bytes and damage summed; named by their first unit), and a mask [G, A] of the columns the
    target can store for every row of a unit (its ``refusal``). Returns (groups, members: merged
    name -> the groups' names it stands for, mask)."""
    from ..costs import Groups
    from ..export.targets import target_rules

    rules = target_rules(target)
    # union-find over the groups: two groups are one when a tied set holds rows of both
    group_of_row = {r: g for g, rows in enumerate(groups.rows) for r in rows}
    parent = list(range(len(groups.names)))

    def find(g):
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    for names in tied:
        gs = [group_of_row[table.index[name]] for name in names if table.index.get(name) in group_of_row]
        for g in gs[1:]:
            parent[find(g)] = find(gs[0])
    order: dict[int, list[int]] = {}
    for g in range(len(groups.names)):
        order.setdefault(find(g), []).append(g)
    merged = list(order.values())
    names = [groups.names[gs[0]] for gs in merged]
    members = {groups.names[gs[0]]: [groups.names[g] for g in gs] for gs in merged}
    out = Groups(
        names=names,
        rows=[[r for g in gs for r in groups.rows[g]] for gs in merged],
        kinds=[groups.kinds[gs[0]] for gs in merged],
        layers=np.array([groups.layers[gs[0]] for gs in merged], dtype=np.int64),
        params=np.array([groups.params[gs].sum() for gs in merged], dtype=np.int64),
        bytes=np.stack([groups.bytes[gs].sum(0) for gs in merged]),
        damage=np.stack([groups.damage[gs].sum(0) for gs in merged]),
        kept=np.stack([groups.kept[gs].sum(0) for gs in merged]),
    )
    mask = np.array([[all(rules.refusal(table.rows[r].name, table.options[o], table.rows[r].in_features) is None
                          for r in rows) for o in allowed] for rows in out.rows], dtype=bool)
    return out, members, mask


def _largest_uniform(problem: Problem) -> int:
    """The column that, given to every unit, spends the most bytes within the budget."""
    totals = problem.bytes.sum(0)
    fits = np.nonzero(totals <= problem.budget_bytes)[0]
    if len(fits) == 0:
        return int(np.argmin(totals))
    return int(fits[np.argmax(totals[fits])])


def _bracket(problem: Problem, budget: Budget, group_size) -> tuple[int, int]:
    """The two options a heuristic splits units between (Li et al.): the bit widths just below and
    just above the budget (2.5 bits: 2 and 3; 3 bits: 2 and 4), so that even an integer budget
    moves bits from the least to the most important units."""
    totals = problem.bytes.sum(0)
    by_bytes = list(np.argsort(totals, kind="stable"))
    fits = [c for c in by_bytes if totals[c] <= problem.budget_bytes]
    if not fits:
        return by_bytes[0], by_bytes[0]
    low = fits[-1]
    if totals[low] == problem.budget_bytes and len(fits) > 1:
        low = fits[-2]  # exactly uniform: split one level below and one above
    above = [c for c in by_bytes if totals[c] > problem.budget_bytes]
    high = above[0] if above else low
    return low, high


def _two_level(problem: Problem, low: int, high: int, order) -> np.ndarray:
    """Everything at ``low``; units in priority ``order`` move to ``high`` while it fits; what is
    left is spent one step at a time, in the same order."""
    return upgrade_in_order(problem, split(problem, low, high, order), order)


def _uniform_choice(problem: Problem, budget: Budget, group_size, seed: int) -> np.ndarray:
    """Uniform at an integer bit budget; a random split of the two neighbouring options at a
    fractional one (the papers' baseline at, e.g., 2.5 bits)."""
    if budget.bits is not None and budget.bits != int(budget.bits):
        low = problem.column_of(problem.table.parse(int(np.floor(budget.bits)), group_size))
        high = problem.column_of(problem.table.parse(int(np.ceil(budget.bits)), group_size))
        return random_split(problem, low, high, seed)
    return uniform(problem, _largest_uniform(problem))


__all__ = ["KEEP_BITS", "Plan", "allocate", "load_plan"]

"""One optimizer over every treatment: quantize, prune, drop experts, reduce top-k, drop MoE sublayers
and blocks, within a byte budget *and* an active-parameter budget (``moepress plan --active``).

The problem is an integer program over the cost table (HiGHS, as the quantization ILP):

* ``x[g, a]`` = 1 when unit ``g`` (an expert, or a linear) takes table column ``a`` (keep,
  quantize, prune, prune+quantize);
* ``y[l, c]`` = 1 when MoE layer ``l`` becomes candidate ``c`` (:class:`~.trim_costs.MoEChoice`:
  a top-k over the experts left after a drop, or no MoE sublayer); ``c = 0`` is the layer as it is;
* ``z[l]`` = 1 when decoder layer ``l`` is dropped.

The unit hierarchy is one equality per unit: ``sum_a x[g, a] + (the y and z that remove g) = 1``,
so a removed unit takes no treatment and a kept one exactly one; ``sum_c y[l, c] + z[l] = 1`` per
MoE layer. Bytes (the budget's scope) are linear in ``x``. Active parameters per token are not: a
layer's routed experts count ``top_k / experts left`` times the weights its kept experts keep, a
product of ``y`` and ``x``. It is made linear exactly with one continuous ``w[l, c] >= s_c S_l -
M (1 - y[l, c])``, ``w >= 0`` per candidate (``s_c = top_k / experts left``, ``S_l`` the kept weights
of the layer's experts, ``M = s_c max S_l``): at the optimum ``sum_c w[l, c]`` is the layer's active
count. The objective adds the units' damage (kl_scaled, nats per token) and the candidates'
measured damage (:mod:`.trim_costs`).

Damages do not really add up. So the chosen plan is measured end to end (KL on held-out windows),
and then corrected by measurement: every removal the plan makes is measured again *in the plan*
(the plan with that one removal undone, its units back at the background option), its damage in
the program replaced by what it costs there, and the program solved again; the best measured plan
of these rounds is returned, with every round's predicted and measured KL in ``plan.info``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..costs import CostTable, Groups
from ..errors import MoepressError
from ..treatment import Treatment
from .budget import Budget
from .sensitivity import ORIGINAL, background_option_index
from .trim_costs import TrimCosts, trimmed


@dataclass
class JointSolution:
    """A point of the joint program: a table column per unit (-1: removed), a candidate per MoE
    layer, the dropped blocks, and what the program predicts for it."""

    columns: np.ndarray  # [G] table option index, -1 where the unit is removed
    moe: dict[int, int]  # MoE layer -> candidate index (0: unchanged)
    blocks: tuple[int, ...]
    predicted: float
    bytes: int
    active: float
    measured: float | None = None  # its KL on the held-out windows, once measured

    def key(self) -> tuple:
        return tuple(self.columns.tolist()), tuple(sorted(self.moe.items())), self.blocks


class JointProblem:
    """The program of the module docstring for ``table``'s units at ``groups``'s granularity."""

    def __init__(self, table: CostTable, groups: Groups, costs: TrimCosts, *, scope_kinds: tuple[str, ...],
                 allowed: list[int], others: int, budget_bytes: int, active_budget: float | None):
        self.table, self.groups, self.costs = table, groups, costs
        self.budget_bytes, self.active_budget = int(budget_bytes), active_budget
        G = len(groups.names)
        first = [table.rows[r[0]] for r in groups.rows]
        self.layer = np.array([row.layer for row in first])
        self.expert = np.array([row.expert for row in first])
        self.kind = [row.kind for row in first]
        self.in_scope = np.array([k in scope_kinds for k in self.kind])
        self.columns = [list(allowed) if self.in_scope[g] else [others] for g in range(G)]
        self.kept = groups.kept  # [G, O] weights a unit keeps at each column (pruning keeps fewer)
        # Damage overrides of removals, in the plan's context (set by correction rounds).
        self.moe_damage = {layer: d.copy() for layer, d in costs.moe_damage.items()}
        self.block_damage = dict(costs.block_damage)
        self.original_active = self._active_of_full()

    # ---------------------------------------------------------------- accounting
    def _share(self, layer: int, c: int) -> float:
        choice = self.costs.moe[layer][c]
        if choice.removed:
            return 0.0
        return choice.top_k / (self.costs.num_experts[layer] - len(choice.dropped))

    def _active_of_full(self) -> float:
        total = 0.0
        for g in range(len(self.groups.names)):
            p = float(self.groups.params[g])
            if self.kind[g] == "expert":
                layer = int(self.layer[g])
                p *= self.costs.base_top_k[layer] / self.costs.num_experts[layer]
            total += p
        return total

    def removed(self, g: int, moe: dict[int, int], blocks) -> bool:
        layer = int(self.layer[g])
        if layer in blocks:
            return True
        if layer not in moe or self.kind[g] not in ("expert", "shared"):
            return False
        choice = self.costs.moe[layer][moe[layer]]
        return choice.removed or (self.kind[g] == "expert" and int(self.expert[g]) in choice.dropped)

    def evaluate(self, columns: np.ndarray, moe: dict[int, int], blocks) -> tuple[float, int, float]:
        """(predicted damage, bytes in the budget's scope, active parameters) of a point."""
        damage = sum(float(self.moe_damage[layer][c]) for layer, c in moe.items()) + \
            sum(self.block_damage[b] for b in blocks)
        spent, active = 0, 0.0
        routed: dict[int, float] = {}
        for g, col in enumerate(columns):
            if col < 0:
                continue
            damage += float(self.groups.damage[g, col])
            if self.in_scope[g]:
                spent += int(self.groups.bytes[g, col])
            if self.kind[g] == "expert":
                routed[int(self.layer[g])] = routed.get(int(self.layer[g]), 0.0) + float(self.kept[g, col])
            else:
                active += float(self.kept[g, col])
        for layer, s in routed.items():
            active += self._share(layer, moe.get(layer, 0)) * s
        return damage, spent, active

    # ---------------------------------------------------------------- the program
    def solve(self, time_limit: float = 120.0) -> JointSolution:
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import coo_matrix

        G = len(self.groups.names)
        cost, var_x = [], []  # x variables: (g, column)
        for g in range(G):
            for col in self.columns[g]:
                var_x.append((g, col))
                cost.append(float(self.groups.damage[g, col]))
        n_x = len(var_x)
        var_y = [(layer, c) for layer in sorted(self.costs.moe) for c in range(len(self.costs.moe[layer]))]
        cost += [float(self.moe_damage[layer][c]) for layer, c in var_y]
        blocks = sorted(self.block_damage)
        cost += [float(self.block_damage[b]) for b in blocks]
        y_index = {v: n_x + i for i, v in enumerate(var_y)}
        z_index = {b: n_x + len(var_y) + i for i, b in enumerate(blocks)}
        var_w = [] if self.active_budget is None else [(layer, c) for layer, c in var_y if self._share(layer, c) > 0]
        w_index = {v: n_x + len(var_y) + len(blocks) + i for i, v in enumerate(var_w)}
        n = n_x + len(var_y) + len(blocks) + len(var_w)
        cost += [0.0] * len(var_w)
        rows, cols, vals, lower, upper = [], [], [], [], []
        r = 0

        def constraint(entries, lo, hi):
            nonlocal r
            for col, val in entries:
                rows.append(r), cols.append(col), vals.append(val)
            lower.append(lo), upper.append(hi)
            r += 1

        x_of: dict[int, list[int]] = {}
        for i, (g, _col) in enumerate(var_x):
            x_of.setdefault(g, []).append(i)
        for g in range(G):  # one treatment per unit, or a removal that takes it away
            layer = int(self.layer[g])
            entries = [(i, 1.0) for i in x_of[g]]
            if layer in z_index:
                entries.append((z_index[layer], 1.0))
            if layer in self.costs.moe and self.kind[g] in ("expert", "shared"):
                for c, choice in enumerate(self.costs.moe[layer]):
                    if choice.removed or (self.kind[g] == "expert" and int(self.expert[g]) in choice.dropped):
                        entries.append((y_index[layer, c], 1.0))
            constraint(entries, 1, 1)
        for layer, choices in self.costs.moe.items():  # one candidate per MoE layer unless its block goes
            entries = [(y_index[layer, c], 1.0) for c in range(len(choices))]
            if layer in z_index:
                entries.append((z_index[layer], 1.0))
            constraint(entries, 1, 1)
        # Every row in units near 1 (bytes over the budget, parameters over the original's active
        # count): with raw counts (1e5-1e9) HiGHS's presolve returned plans far from the optimum.
        per_byte = 1.0 / max(self.budget_bytes, 1)
        constraint([(i, float(self.groups.bytes[g, col]) * per_byte) for i, (g, col) in enumerate(var_x)
                    if self.in_scope[g]], -np.inf, self.budget_bytes * per_byte)
        if self.active_budget is not None:
            per_param = 1.0 / self.original_active
            entries = [(i, float(self.kept[g, col]) * per_param) for i, (g, col) in enumerate(var_x)
                       if self.kind[g] != "expert"]
            entries += [(w_index[v], 1.0) for v in var_w]
            constraint(entries, -np.inf, self.active_budget * per_param)
            routed_of: dict[int, list[tuple[int, int, int]]] = {}  # MoE layer -> its experts' x variables
            for i, (g, col) in enumerate(var_x):
                if self.kind[g] == "expert":
                    routed_of.setdefault(int(self.layer[g]), []).append((i, g, col))
            for layer, c in var_w:  # w >= share * S_l - M (1 - y), in shares of the original's active count
                share = self._share(layer, c) * per_param
                routed = routed_of.get(layer, [])
                big = share * sum(float(self.kept[g].max()) for g in {g for _, g, _ in routed})
                entries = [(w_index[layer, c], 1.0)] + [(i, -share * float(self.kept[g, col])) for i, g, col in routed]
                entries.append((y_index[layer, c], -big))
                constraint(entries, -big, np.inf)
        A = coo_matrix((vals, (rows, cols)), shape=(r, n)).tocsr()
        cost = np.asarray(cost)
        # Damage in units of the units' own worst case, so that a unit's choice is not lost in the
        # tolerances beside a removal that costs a thousand times more.
        worst = sum(max(float(self.groups.damage[g, col]) for col in self.columns[g]) for g in range(G))
        scale = worst if worst > 0 else (np.abs(cost).max() or 1.0)
        integrality = np.r_[np.ones(n - len(var_w)), np.zeros(len(var_w))]
        upper_bounds = np.r_[np.ones(n - len(var_w)), np.full(len(var_w), np.inf)]
        result = milp(cost / scale, constraints=[LinearConstraint(A, lower, upper)], integrality=integrality,
                      bounds=Bounds(np.zeros(n), upper_bounds), options={"time_limit": time_limit, "mip_rel_gap": 1e-7})
        if result.x is None:
            raise MoepressError(self._why_infeasible(result.message))
        x = result.x
        columns = np.full(G, -1, dtype=np.int64)
        for i, (g, col) in enumerate(var_x):
            if x[i] > 0.5:
                columns[g] = col
        moe = {layer: c for (layer, c) in var_y if x[y_index[layer, c]] > 0.5}
        dropped = tuple(b for b in blocks if x[z_index[b]] > 0.5)
        return self.solution(columns, moe, dropped)

    def solution(self, columns: np.ndarray, moe: dict[int, int], blocks) -> JointSolution:
        damage, spent, active = self.evaluate(columns, moe, blocks)
        if spent > self.budget_bytes or (self.active_budget is not None and active > self.active_budget * (1 + 1e-9)):
            raise MoepressError("the joint program's rounded plan exceeds its budget; report this with the cost table")
        return JointSolution(columns=columns, moe=dict(moe), blocks=tuple(sorted(blocks)), predicted=damage,
                             bytes=spent, active=active)

    def _why_infeasible(self, message: str) -> str:
        smallest_bytes = sum(min(int(self.groups.bytes[g, c]) for c in self.columns[g])
                             for g in range(len(self.groups.names)) if self.in_scope[g])
        if self.active_budget is None:
            return f"the joint program found no plan within the budget ({message})"
        share = self.active_budget / self.original_active
        return (f"no plan meets an active budget of {share:.3g} of the original's active parameters within "
                f"{self.budget_bytes:,} bytes (the removals and prune options allowed here cannot take it that low; "
                f"smallest bytes with every unit kept: {smallest_bytes:,}); raise --active or allow more trims "
                "(--trim experts,top_k,moe_layers,blocks) or prune options (--prune-options 2:4+4b)")


def _row_options(problem: JointProblem, columns: np.ndarray) -> np.ndarray:
    out = np.full(len(problem.table.rows), ORIGINAL)
    for g, col in enumerate(columns):
        if col >= 0:
            out[problem.groups.rows[g]] = col
    return out


def measure(problem: JointProblem, evaluator, columns: np.ndarray, moe: dict[int, int], blocks) -> float:
    """KL of the point on the evaluator's held-out windows: its units' variants installed, its
    removals made (and undone afterwards)."""
    import torch

    evaluator.install(_row_options(problem, columns))
    choices = {layer: problem.costs.moe[layer][c] for layer, c in moe.items() if c}
    with torch.no_grad(), trimmed(evaluator.model, choices, tuple(blocks)):
        return float(evaluator.score(evaluator.model)["kl"])


def solve_and_correct(problem: JointProblem, evaluator, rounds: int = 2, background="auto",
                      progress: bool = False) -> tuple[JointSolution, list[dict]]:
    """Solve, measure, re-measure each removal in the plan's context, re-solve; the best measured."""
    bg = background_option_index(problem.table, background)
    history, best, seen = [], None, set()
    solution = problem.solve()
    for round_ in range(rounds + 1):
        key = solution.key()
        if key in seen:
            break
        kl = measure(problem, evaluator, solution.columns, solution.moe, solution.blocks)
        seen.add(key)
        solution.measured = kl
        history.append({"round": round_, "predicted_kl": solution.predicted, "measured_kl": kl,
                        "bytes": solution.bytes, "active_share": solution.active / problem.original_active,
                        "removals": _describe(problem, solution)})
        if progress:
            import sys

            print(f"joint plan, round {round_}: predicted KL {solution.predicted:.5f}, measured {kl:.5f} "
                  f"({', '.join(history[-1]['removals']) or 'no removal'})", file=sys.stderr)
        if best is None or kl < best.measured:
            best = solution
        if round_ == rounds:
            break
        _rescore_removals(problem, evaluator, solution, kl, bg)
        solution = problem.solve()
    return best, history


def _rescore_removals(problem: JointProblem, evaluator, solution: JointSolution, kl: float, bg: int | None) -> None:
    """Each removal's damage, measured in ``solution``: KL(plan) - KL(plan without it, its units at
    the background option) + those units' background damage."""
    restore = bg if bg is not None else problem.table.option_index(Treatment.keep_unit())
    for layer, c in list(solution.moe.items()) + [(b, None) for b in solution.blocks]:
        if c == 0:
            continue
        moe = dict(solution.moe)
        blocks = tuple(b for b in solution.blocks if b != layer)
        if c is not None:
            moe[layer] = 0
        columns = solution.columns.copy()
        back = [g for g in range(len(columns)) if columns[g] < 0 and not problem.removed(g, moe, blocks)]
        for g in back:
            columns[g] = restore if problem.in_scope[g] else problem.columns[g][0]
        without = measure(problem, evaluator, columns, moe, blocks)
        damage = max(0.0, kl - without + float(sum(problem.groups.damage[g, columns[g]] for g in back)))
        if c is None:
            problem.block_damage[layer] = damage
        else:
            problem.moe_damage[layer][c] = damage


def _describe(problem: JointProblem, solution: JointSolution) -> list[str]:
    out = [f"layers.{b}: block dropped" for b in solution.blocks]
    out += [f"layers.{layer}: {problem.costs.moe[layer][c].label()}" for layer, c in sorted(solution.moe.items()) if c]
    return out


def allocate_joint(table: CostTable, budget: Budget, costs: TrimCosts, evaluator, *, active: float | None,
                   options: list[Treatment] | None = None, others: Treatment = Treatment.quantize(4),
                   estimator: str = "kl_scaled", granularity: str = "expert", group_size: int | None = 128,
                   rounds: int = 2, progress: bool = False):
    """The joint plan (see the module docstring): every unit's treatment and the model's removals
    within ``budget`` and ``active`` (a share of the original's active parameters per token)."""
    from ..trim.trimming import Trimming
    from .plan import Plan

    started = time.time()
    if granularity not in ("expert", "linear"):
        raise MoepressError("the joint optimizer works at expert or linear granularity (not channel)")
    if active is not None and not 0 < active <= 1:
        raise MoepressError(f"--active is a share of the original model's active parameters in (0, 1] (got {active})")
    if options is None:
        options = [o for o in table.options if not (o.keep and budget.scope == "experts")]
    allowed = sorted({table.option_index(o) for o in options})
    groups = table.groups(granularity, estimator)
    problem = JointProblem(table, groups, costs, scope_kinds=budget.kinds, allowed=allowed,
                           others=table.option_index(others), budget_bytes=budget.to_bytes(table, group_size),
                           active_budget=None)
    if active is not None:
        problem.active_budget = active * problem.original_active
    solution, history = solve_and_correct(problem, evaluator, rounds=rounds, progress=progress)

    units: dict[str, Treatment] = {}
    for g, name in enumerate(groups.names):
        if solution.columns[g] >= 0:
            units[name] = table.options[int(solution.columns[g])]
    moe = {layer: costs.moe[layer][c] for layer, c in solution.moe.items() if c}
    trim = Trimming(
        dropped_experts={layer: tuple(ch.dropped) for layer, ch in moe.items() if ch.dropped and not ch.removed},
        top_k={layer: ch.top_k for layer, ch in moe.items() if not ch.removed and ch.top_k != costs.base_top_k[layer]},
        dropped_blocks=tuple(solution.blocks),
        dropped_moe_layers=tuple(sorted(layer for layer, ch in moe.items() if ch.removed)),
    )
    plan = Plan(
        units=units,
        trim=trim,
        strategy="joint",
        estimator=estimator,
        granularity=granularity,
        budget={"spec": str(budget).split(" over ")[0], "scope": budget.scope, "bytes": problem.budget_bytes,
                **({"active": active} if active is not None else {})},
        quantization={k: table.settings[k] for k in ("method", "symmetric", "act_order", "damp")},
        info={"keep_element_size": int(table.meta.get("keep_element_size", 2)),
              "others": others.label if budget.scope == "experts" else None,
              "top_k": {int(k): int(v) for k, v in costs.base_top_k.items()},
              "trim_costs": costs.info, "rounds": history,
              "planning_seconds": round(time.time() - started, 3)},
    )
    plan.totals = plan.accounting(table.rows)
    plan.totals["budget_scope_bytes"] = solution.bytes
    plan.totals["predicted_damage"] = {"estimator": estimator, "value": solution.predicted}
    plan.totals["measured_kl"] = solution.measured
    return plan


__all__ = ["JointProblem", "JointSolution", "allocate_joint", "measure", "solve_and_correct"]

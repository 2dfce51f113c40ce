"""Solvers that turn a cost table and a byte budget into one option per unit.

They all work on a :class:`Problem`: units (groups of table rows at one granularity) in the
budget's scope, the option columns they may take, bytes [G, A] and damage [G, A] for those
columns, and the byte budget. A solution is an array ``choice[G]`` of column indices into
``Problem.allowed``. Everything here is pure numpy/scipy, so a Mixtral-8x7B-sized table solves
in seconds (see benchmarks/allocation.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..costs import CostTable, Groups
from ..errors import MoepressError


@dataclass
class Problem:
    groups: Groups
    allowed: list[int]  # column -> option index in the table
    budget_bytes: int
    table: CostTable
    # [G, A]: whether a unit may take a column (a target's rules: False where the engine cannot
    # store the option for that unit); None: every column
    mask: np.ndarray | None = None

    @property
    def bytes(self) -> np.ndarray:  # [G, A]
        return self.groups.bytes[:, self.allowed]

    @property
    def usable(self) -> np.ndarray:  # [G, A] bool
        return np.ones(self.bytes.shape, dtype=bool) if self.mask is None else self.mask

    @property
    def damage(self) -> np.ndarray:  # [G, A]
        return self.groups.damage[:, self.allowed]

    def total_bytes(self, choice: np.ndarray) -> int:
        return int(self.bytes[np.arange(len(choice)), choice].sum())

    def total_damage(self, choice: np.ndarray) -> float:
        return float(self.damage[np.arange(len(choice)), choice].sum())

    def check_feasible(self) -> None:
        usable = self.usable
        if not usable.any(axis=1).all():
            g = int(np.argmin(usable.any(axis=1)))
            raise MoepressError(f"no allowed option can store {self.groups.names[g]} under the target; allow one "
                                "that can (16b always can)")
        smallest = int(np.where(usable, self.bytes, np.iinfo(np.int64).max).min(axis=1).sum())
        if smallest > self.budget_bytes and self.mask is not None:
            raise MoepressError(f"budget of {self.budget_bytes:,} bytes is below the smallest plan the target holds: "
                                f"every unit at its cheapest option the target allows takes {smallest:,} bytes; "
                                "raise the budget or allow smaller options the target holds")
        if smallest > self.budget_bytes:
            cheapest = self.table.options[self.allowed[int(np.argmin(self.bytes.sum(0)))]]
            raise MoepressError(
                f"budget of {self.budget_bytes:,} bytes is below the smallest option: even every unit at "
                f"{cheapest} takes {smallest:,} bytes; raise the budget or allow a smaller option")

    def column_of(self, option) -> int:
        index = self.table.option_index(option)
        if index not in self.allowed:
            raise MoepressError(f"option {option} is not among the allowed options")
        return self.allowed.index(index)


def uniform(problem: Problem, column: int) -> np.ndarray:
    return np.full(len(problem.groups.names), column, dtype=np.int64)


def split(problem: Problem, low: int, high: int, order) -> np.ndarray:
    """Every unit at column ``low``, then units in ``order`` moved to ``high`` while the budget allows."""
    choice = uniform(problem, low)
    spent = problem.total_bytes(choice)
    extra = problem.bytes[:, high] - problem.bytes[:, low]
    for g in order:
        if spent + extra[g] <= problem.budget_bytes:
            choice[g] = high
            spent += extra[g]
    return choice


def random_split(problem: Problem, low: int, high: int, seed: int) -> np.ndarray:
    """A random order of :func:`split`: the baseline for fractional budgets (a random 2/3-bit
    split at the same bytes)."""
    return split(problem, low, high, np.random.default_rng(seed).permutation(len(problem.groups.names)))


def upgrade_in_order(problem: Problem, choice: np.ndarray, order) -> np.ndarray:
    """Move units, in ``order``, to their next more expensive column while the budget allows
    (one step per pass, repeated until nothing more fits)."""
    choice = choice.copy()
    by_cost = np.argsort(problem.bytes, axis=1, kind="stable")  # columns cheapest first, per unit
    rank = np.argsort(by_cost, axis=1)
    spent = problem.total_bytes(choice)
    moved = True
    while moved:
        moved = False
        for g in order:
            r = rank[g, choice[g]]
            if r + 1 >= by_cost.shape[1]:
                continue
            nxt = by_cost[g, r + 1]
            delta = problem.bytes[g, nxt] - problem.bytes[g, choice[g]]
            if spent + delta <= problem.budget_bytes:
                choice[g] = nxt
                spent += delta
                moved = True
    return choice


def cheapest(problem: Problem) -> np.ndarray:
    return np.where(problem.usable, problem.bytes, np.iinfo(np.int64).max).argmin(axis=1)


def greedy(problem: Problem) -> np.ndarray:
    """Start every unit at its cheapest column; repeatedly take the single upgrade with the most
    damage removed per extra byte that still fits. A baseline the ILP must never lose to."""
    problem.check_feasible()
    choice = cheapest(problem)
    B, D = problem.bytes.astype(float), problem.damage
    spent = problem.total_bytes(choice)
    rows = np.arange(len(choice))
    while True:
        extra = B - B[rows, choice][:, None]
        gain = D[rows, choice][:, None] - D
        ok = (extra > 0) & (gain > 0) & (spent + extra <= problem.budget_bytes) & problem.usable
        if not ok.any():
            break
        ratio = np.where(ok, gain / np.where(extra > 0, extra, 1), -np.inf)
        g, a = np.unravel_index(np.argmax(ratio), ratio.shape)
        spent += int(extra[g, a])
        choice[g] = a
    return choice


def ilp(problem: Problem, per_layer: bool = False, time_limit: float = 60.0) -> np.ndarray:
    """Exact multiple-choice knapsack with scipy's HiGHS: minimise total damage subject to the
    budget, one column per unit. ``per_layer`` splits the budget over layers in proportion to their
    parameters (MC-MoE allocates within each layer) instead of one global constraint."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    problem.check_feasible()
    G, A = problem.bytes.shape
    cost = problem.damage.reshape(-1)
    # Scale damage so HiGHS's tolerances are meaningful whatever the units of the estimator.
    scale = np.abs(cost).max() or 1.0
    var = np.arange(G * A)
    one_each = LinearConstraint(csr_matrix((np.ones(G * A), (var // A, var)), shape=(G, G * A)), 1, 1)
    constraints = [one_each]
    if per_layer:
        layers = problem.groups.layers
        params = problem.groups.params.astype(float)
        for layer in np.unique(layers):
            mask = layers == layer
            share = problem.budget_bytes * params[mask].sum() / params.sum()
            row = (problem.bytes * mask[:, None]).reshape(-1)
            if problem.bytes[mask].min(axis=1).sum() > share:
                raise MoepressError(f"per-layer budget of layer {layer} ({share:,.0f} bytes) is below its "
                                    "smallest option; use the global ILP or a larger budget")
            constraints.append(LinearConstraint(row[None, :], -np.inf, share))
    else:
        constraints.append(LinearConstraint(problem.bytes.reshape(1, -1).astype(float), -np.inf, problem.budget_bytes))
    upper = problem.usable.reshape(-1).astype(float)  # a column the target cannot store is never taken
    result = milp(cost / scale, constraints=constraints, integrality=np.ones(G * A), bounds=Bounds(0, upper),
                  options={"time_limit": time_limit, "mip_rel_gap": 1e-9})
    if result.x is None:
        raise MoepressError(f"the ILP found no plan within the budget ({result.message})")
    choice = result.x.reshape(G, A).argmax(axis=1)
    if problem.total_bytes(choice) > problem.budget_bytes:  # rounding of a near-integral solution
        raise MoepressError("the ILP's rounded plan exceeds the budget; report this with the cost table")
    return choice

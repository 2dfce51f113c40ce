"""Evolutionary search over plans (the fine-grained MoE quantization paper, 001), seeded with the ILP.

The ILP is optimal for the table's *additive* damage estimate; the real loss is not additive (errors
of different layers interact). The search measures each candidate end to end instead: the KL
divergence of the quantized model's next-token distribution from the uncompressed model's, on
held-out calibration windows. It stays cheap by never quantizing again: every (unit, option) was
already quantized once while the cost table was built (``keep_variants``), and a candidate is
evaluated by copying those dequantized weights into a float copy of the model (only the units
that differ from the last candidate).

Each generation keeps the best half (elitism), and refills the population with children: uniform
crossover of two survivors, then each gene moved one option up or down with probability
``mutation``, then repaired to the budget (downgrading the unit whose downgrade costs the least
table damage per byte saved). The seed plan is always in the population, so the search never
returns something worse than the ILP on its own fitness.
"""

from __future__ import annotations

import copy as _copy
import time

import numpy as np
import torch

from ..costs import CostTable
from ..errors import MoepressError
from ..evaluate.held_out import HeldOutKL
from ..model.view import MoEView
from .solvers import Problem


class PlanEvaluator:
    """KL(reference || candidate) per token on held-out windows, with cached quantized variants."""

    def __init__(self, model, table: CostTable, tokens: torch.Tensor, batch_size: int = 8, copy: bool = True):
        """``copy=False`` scores on ``model`` itself (turned to float32 and its weights swapped), for
        a model loaded only for this; by default the caller's model is left untouched."""
        if not table.variants:
            raise MoepressError("evolution needs the quantized variants of every unit: build the cost table "
                                "with keep_variants=True (moepress plan does this for --strategy evolution)")
        self.model = (_copy.deepcopy(model) if copy else model).float().eval()
        self.table = table
        self.tokens = tokens
        self.batch_size = batch_size
        self.view = MoEView(self.model)
        self.targets = [self._target(row) for row in table.rows]
        self.original = [t.detach().clone() for t in self.targets]
        self.current = {}  # row -> option index currently installed (absent: original weights)
        self._splits = {}  # (row, option indices) -> dequantized split down weight
        self.held_out = HeldOutKL(self.model, tokens, batch_size)
        self.evaluations = 0

    def _target(self, row):
        """The float tensor (a view into the model's parameter) holding ``row``'s weight."""
        if row.kind != "expert":
            prefix = {"attn": "attention_units", "shared": "mlp_units", "dense_mlp": "mlp_units"}[row.kind]
            unit = next(u for u in getattr(self.view, prefix)(row.layer) if u.name == row.name)
            return self.model.get_submodule(unit.module_path).weight.data
        store = self.view.experts(row.layer)
        if store.layout == "per_expert":
            return self.model.get_submodule(store.per_expert_linear_path(row.expert, row.linear)).weight.data
        return store.weight(row.linear).data[row.expert]

    @torch.no_grad()
    def install(self, row_options) -> None:
        """Install a table option index per row; a tuple of indices is a routed-expert row split into
        equal neuron groups (rows of gate/up, columns of down) with those options."""
        for i, o in enumerate(row_options):
            o = tuple(int(x) for x in o) if isinstance(o, (tuple, list)) else int(o)
            if self.current.get(i, -1) == o:
                continue
            self.targets[i].copy_(self._weight(i, o))
            self.current[i] = o

    def _weight(self, i: int, o) -> torch.Tensor:
        if isinstance(o, tuple) and self.table.rows[i].linear == "down_proj":
            return self._split_down(i, o)
        if isinstance(o, tuple):  # gate/up rows: GPTQ treats rows independently, so slices are exact
            return torch.cat([self._weight(i, g).chunk(len(o), dim=0)[k] for k, g in enumerate(o)], dim=0)
        variant = self.table.variants.get((i, o))
        return self.original[i] if variant is None else variant.dequantize(torch.float32)

    def _split_down(self, i: int, o: tuple) -> torch.Tensor:
        """Down columns in neuron groups of different options, quantized as compression does: one GPTQ
        pass over all columns (slices of uniform variants would lose the cross-group error feedback)."""
        from ..quantize import gptq_quantize_segments

        key = (i, o)
        if key not in self._splits:
            if i not in self.table.hessians:
                raise MoepressError("scoring a channel plan needs the down projections' Hessians: build the cost "
                                    "table with keep_variants=True")
            width = self.original[i].shape[1] // len(o)
            # segments are contiguous: no act-order across them (as compression quantizes them)
            segments = [(width, self.table.options[g].with_settings(act_order="off").spec()) for g in o]
            pieces, _ = gptq_quantize_segments(self.original[i], self.table.hessians[i], segments)
            self._splits[key] = torch.cat([p.float() if isinstance(p, torch.Tensor) else p.dequantize(torch.float32)
                                           for p in pieces], dim=1)
        return self._splits[key]

    def score(self, model) -> dict:
        """KL divergence, top-1 agreement and perplexity of ``model`` (the candidate, or a really
        compressed one) on the evaluator's windows, against the reference (:class:`HeldOutKL`)."""
        return self.held_out.score(model)

    def metrics(self, row_options) -> dict:
        """:meth:`score` of the candidate plan ``row_options`` (table option index per row)."""
        self.install(row_options)
        return self.score(self.model)

    def __call__(self, row_options: np.ndarray) -> float:
        """The search's fitness: the candidate's KL divergence."""
        self.evaluations += 1
        return self.metrics(row_options)["kl"]


def row_options(problem: Problem, choice: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """Table option index per row: the groups' choices over ``fixed`` (units outside the scope)."""
    out = fixed.copy()
    for g, rows in enumerate(problem.groups.rows):
        out[rows] = problem.allowed[int(choice[g])]
    return out


def _repair(problem: Problem, choice: np.ndarray, rng) -> np.ndarray:
    """Downgrade units until the plan fits, cheapest table damage per byte saved first."""
    B, D = problem.bytes.astype(float), problem.damage
    rows = np.arange(len(choice))
    while problem.total_bytes(choice) > problem.budget_bytes:
        saved = B[rows, choice][:, None] - B
        loss = D - D[rows, choice][:, None]
        ok = saved > 0
        ratio = np.where(ok, np.maximum(loss, 0) / np.where(ok, saved, 1), np.inf)
        g, a = np.unravel_index(np.argmin(ratio + rng.random(ratio.shape) * 1e-12), ratio.shape)
        if not np.isfinite(ratio[g, a]):
            raise MoepressError("evolution could not repair a plan to the budget")
        choice[g] = a
    return choice


def evolve(problem: Problem, seed_choice: np.ndarray, *, evaluate, fixed_rows: np.ndarray,
           population: int = 16, generations: int = 10, mutation: float = 0.05, seed: int = 0):
    """Returns (best choice, info with the fitness history, evaluations, seconds and the gain over
    the seed plan). ``evaluate(row_options) -> fitness`` (lower is better)."""
    if population < 2 or generations < 1:
        raise MoepressError("evolution needs a population of at least 2 and at least 1 generation")
    rng = np.random.default_rng(seed)
    started = time.time()
    order = np.argsort(problem.bytes, axis=1, kind="stable")
    rank = np.argsort(order, axis=1)
    A = problem.bytes.shape[1]
    cache: dict[tuple, float] = {}

    def fitness(choice):
        key = tuple(int(c) for c in choice)
        if key not in cache:
            cache[key] = evaluate(row_options(problem, choice, fixed_rows))
        return cache[key]

    rate = max(mutation, 2.0 / len(seed_choice))  # at least two genes move per child on average

    def mutate(choice):
        child = choice.copy()
        for g in np.nonzero(rng.random(len(child)) < rate)[0]:
            r = int(np.clip(rank[g, child[g]] + rng.choice((-1, 1)), 0, A - 1))
            child[g] = order[g, r]
        child = _repair(problem, child, rng)
        # Spend what a downgrade freed: random one-step upgrades that still fit.
        spent = problem.total_bytes(child)
        for g in rng.permutation(len(child)):
            r = rank[g, child[g]]
            if r + 1 < A:
                delta = problem.bytes[g, order[g, r + 1]] - problem.bytes[g, child[g]]
                if spent + delta <= problem.budget_bytes:
                    child[g] = order[g, r + 1]
                    spent += delta
        return child

    pop = [seed_choice.copy()] + [mutate(seed_choice) for _ in range(population - 1)]
    seed_fitness = fitness(seed_choice)
    history = []
    for _ in range(generations):
        scored = sorted(pop, key=fitness)
        history.append(fitness(scored[0]))
        survivors = scored[: max(2, population // 2)]
        children = []
        while len(survivors) + len(children) < population:
            a, b = rng.choice(len(survivors), 2, replace=False)
            mask = rng.random(len(seed_choice)) < 0.5
            children.append(mutate(np.where(mask, survivors[a], survivors[b])))
        pop = survivors + children
    best = min(pop, key=fitness)
    info = {
        "population": population,
        "generations": generations,
        "mutation": rate,
        "seed_fitness_kl": seed_fitness,
        "best_fitness_kl": fitness(best),
        "gain_over_seed": (seed_fitness - fitness(best)) / seed_fitness if seed_fitness > 0 else 0.0,
        "history_kl": history,
        "evaluations": len(cache),
        "search_seconds": round(time.time() - started, 2),
    }
    return best, info

"""What removing structure costs, measured: the drop and top-k columns of the joint optimizer.

The cost table prices a linear's quantization or pruning from its own layer's reconstruction error
(rescaled to KL per layer and kind by ``kl_scaled``). Removing structure has no such local proxy:
dropping an expert changes where tokens go, a top-k reduction changes every token's mix, a dropped
block changes everything after it. So these options are priced the way kl_scaled prices a layer,
by the model's output: the KL divergence (on held-out calibration windows) that the change adds to
a model whose every unit is at the background option (4 bits), one evaluation per candidate.

Candidates, per MoE layer (:class:`MoEChoice`): every top-k from the layer's own down to half of
it (1 for a top-2 layer; where its router allows), times dropping 0, 1/8, 1/4, 3/8 or 1/2 of its experts, the least important
first by an importance criterion (REAP by default, :mod:`moepress.trim.importance`) so that the
dropped sets are nested; and dropping the MoE sublayer. Per decoder layer after the first: dropping
the block. The ILP then picks at most one per layer.

Damage of a candidate = KL(background with the change) - KL(background) + the background damage of
the units the change removes: the ILP counts no quantization damage for a removed unit, while the
measurement started from a model in which that unit was already quantized.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..costs import CostTable
from ..errors import MoepressError
from ..model.view import MoEView
from ..trim.candidates import MoEChoice, trimmed
from ..trim.importance import expert_scores
from .sensitivity import ORIGINAL, background_option_index

DROP_SHARES = (0.125, 0.25, 0.375, 0.5)
TRIMS = ("experts", "top_k", "moe_layers", "blocks")


@dataclass
class TrimCosts:
    """Measured damage (nats per token, the unit of kl_scaled) of every candidate removal."""

    moe: dict[int, list[MoEChoice]]  # MoE layer -> its candidates; [0] is the layer as it is
    moe_damage: dict[int, np.ndarray]  # MoE layer -> damage per candidate ([0] = 0)
    block_damage: dict[int, float]  # decoder layer -> damage of dropping it
    base_top_k: dict[int, int]
    num_experts: dict[int, int]
    scores: dict[int, list[float]] = field(default_factory=dict)  # the importance the drops follow
    info: dict = field(default_factory=dict)


def moe_choices(model, layer: int, scores: torch.Tensor, trims=TRIMS, shares=DROP_SHARES) -> list[MoEChoice]:
    """The candidates of MoE layer ``layer`` that its router can express; the first is the layer unchanged."""
    from ..trim.expert_drop import check_drop, router_groups
    from ..trim.importance import least_important
    from ..trim.top_k import top_k_of_layer

    view = MoEView(model)
    E, k0 = view.experts(layer).num_experts, top_k_of_layer(model, layer)
    # top-k from the layer's own down to half of it (to 1 from 2): below half, a layer is better dropped
    ks = list(range(k0, max(1, k0 // 2) - 1, -1)) if "top_k" in trims and not view.spec.fixed_top_k else [k0]
    groups = router_groups(model, layer)
    counts = [0]
    if "experts" in trims:
        step = groups or 1
        counts += sorted({step * max(1, round(E * s / step)) for s in shares})
    choices, seen = [], set()
    for n in counts:
        dropped = tuple(least_important(scores, n, groups)) if n else ()
        keep = [e for e in range(E) if e not in dropped]
        for k in ks:
            if n:
                try:
                    check_drop(model, layer, keep, top_k=k)
                except MoepressError:
                    continue
            choice = MoEChoice(top_k=k, dropped=dropped)
            if choice not in seen:
                seen.add(choice), choices.append(choice)
    if "moe_layers" in trims:
        choices.append(MoEChoice(top_k=0, removed=True))
    return choices


def removed_rows(table: CostTable, layer: int, choice: MoEChoice | None = None, block: bool = False) -> list[int]:
    """Table rows of ``layer`` that ``choice`` (or dropping the block) removes."""
    return [i for i, row in enumerate(table.rows) if row.layer == layer and
            (block or (choice is not None and choice.removes(row)))]


def measure_trim_costs(evaluator, table: CostTable, tokens: torch.Tensor, *, estimator: str = "kl_scaled",
                       trims=TRIMS, criterion: str = "reap", background="auto", shares=DROP_SHARES,
                       progress: bool = False) -> TrimCosts:
    """Measure every candidate removal with ``evaluator`` (a PlanEvaluator on held-out windows);
    expert importance is scored on ``tokens`` (calibration windows) on the original model."""
    from ..trim.top_k import top_k_of_layer

    unknown = [t for t in trims if t not in TRIMS]
    if unknown:
        raise MoepressError(f"unknown trim {unknown[0]!r}; choose from {', '.join(TRIMS)}")
    if estimator not in table.damage:
        raise MoepressError(f"the cost table has no {estimator!r} damage to add drop costs to")
    started = time.time()
    model = evaluator.model
    view = MoEView(model)
    evaluator.install(np.full(len(table.rows), ORIGINAL))
    scores = expert_scores(model, tokens, criterion, evaluator.batch_size) if "experts" in trims else {}
    moe = {layer: moe_choices(model, layer, scores.get(layer, torch.zeros(view.experts(layer).num_experts)), trims,
                              shares)
           for layer in range(view.num_layers) if view.experts(layer) is not None}
    blocks = list(range(1, view.num_layers)) if "blocks" in trims else []
    bg = background_option_index(table, background)
    context = np.full(len(table.rows), ORIGINAL if bg is None else bg)
    evaluator.install(context)
    base = evaluator.score(model)["kl"]
    own = table.damage[estimator][:, bg] if bg is not None else np.zeros(len(table.rows))
    work = [(layer, c) for layer, cs in moe.items() for c in range(1, len(cs))] + [(layer, None) for layer in blocks]
    iterator = work
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(work, desc="drop costs", unit="eval")
    moe_damage = {layer: np.zeros(len(cs)) for layer, cs in moe.items()}
    block_damage: dict[int, float] = {}
    with torch.no_grad():
        for layer, c in iterator:
            if c is None:
                with trimmed(model, blocks=(layer,)):
                    kl = evaluator.score(model)["kl"]
                block_damage[layer] = kl - base + float(own[removed_rows(table, layer, block=True)].sum())
            else:
                choice = moe[layer][c]
                with trimmed(model, {layer: choice}):
                    kl = evaluator.score(model)["kl"]
                moe_damage[layer][c] = kl - base + float(own[removed_rows(table, layer, choice)].sum())
    evaluator.install(np.full(len(table.rows), ORIGINAL))
    info = {"background": None if bg is None else table.options[bg].label, "background_kl": base,
            "criterion": criterion, "trims": list(trims), "evaluations": len(work) + 1,
            "windows": int(len(evaluator.tokens)), "seconds": round(time.time() - started, 1)}
    return TrimCosts(moe=moe, moe_damage=moe_damage, block_damage=block_damage,
                     base_top_k={layer: top_k_of_layer(model, layer) for layer in moe},
                     num_experts={layer: view.experts(layer).num_experts for layer in moe},
                     scores={layer: [float(s) for s in v] for layer, v in scores.items()}, info=info)


__all__ = ["DROP_SHARES", "MoEChoice", "TRIMS", "TrimCosts", "measure_trim_costs", "moe_choices",
           "removed_rows", "trimmed"]

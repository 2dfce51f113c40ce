"""The ``kl`` expert-drop criterion: which experts to drop, chosen by the KL divergence the drop adds.

The scores of :mod:`moepress.trim.importance` rank experts by what they contribute on their own
(how often chosen, with what weight, with what output norm). What a drop costs also depends on
where the router sends the dropped expert's tokens instead, and on how much the layers after it
amplify the difference. This criterion measures that directly: for each MoE layer (the others as
they are), greedily, the expert whose removal adds the least KL divergence of the model's
next-token distribution from the original's, on calibration windows, is dropped, then the next
one given the first, up to the layer's drop count. With group-limited routing (DeepSeek) each
group gives up the same number of experts. Cost: about ``drop x experts`` evaluations per layer of
the whole model, which therefore has to be in memory.
"""

from __future__ import annotations

import torch

from ..errors import MoepressError
from ..model.view import MoEView


def kl_drop_choice(model, tokens: torch.Tensor, counts: dict[int, int], *, top_k: dict[int, int] | None = None,
                   batch_size: int = 8, progress: bool = False) -> dict[int, tuple[int, ...]]:
    """MoE layer -> the ``counts[layer]`` experts (original indices) to drop, greedy by measured KL,
    each layer with ``top_k[layer]`` experts per token if given (a drop after a top-k reduction).

    With group-limited routing every measured state must keep the groups equal, so the experts go
    in rounds of one per group: group by group, each candidate is measured together with the
    round's choices of the groups before it and, for the groups after it, their least important
    expert by REAP as a stand-in; the stand-ins are replaced as the round reaches their groups."""
    from ..evaluate.held_out import HeldOutKL
    from .candidates import MoEChoice, trimmed
    from .expert_drop import router_groups
    from .importance import expert_scores, least_important
    from .top_k import top_k_of_layer

    view = MoEView(model)
    for layer in counts:
        if view.experts(layer) is None:
            raise MoepressError(f"layers.{layer}: not an MoE layer; it has no experts to drop")
    scorer = HeldOutKL(model, tokens, batch_size)
    grouped = {layer for layer in counts if router_groups(model, layer)}
    proxy = expert_scores(model, tokens, "reap", batch_size) if grouped else {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(n * view.experts(layer).num_experts for layer, n in counts.items()),
                   desc="expert drop (kl)", unit="eval")

    def measured(layer: int, k: int, dropped) -> float:
        with trimmed(model, {layer: MoEChoice(top_k=k, dropped=tuple(sorted(dropped)))}):
            kl = scorer.score(model)["kl"]
        if bar is not None:
            bar.update(1)
        return kl

    chosen: dict[int, tuple[int, ...]] = {}
    with torch.no_grad():
        for layer, n in sorted(counts.items()):
            E = view.experts(layer).num_experts
            k = (top_k or {}).get(layer, top_k_of_layer(model, layer))
            groups = router_groups(model, layer) or 1
            if n % groups:
                raise MoepressError(f"layers.{layer}: its router picks experts in {groups} groups; drop a multiple of "
                                    f"{groups} experts so every group keeps as many")
            size = E // groups
            dropped: list[int] = []
            for _ in range(n // groups):
                this_round: list[int] = []
                for g in range(groups):
                    members = [e for e in range(g * size, (g + 1) * size) if e not in dropped]
                    stand_ins = []
                    for h in range(g + 1, groups):  # keep the groups equal while group g is measured
                        rest = [e for e in range(h * size, (h + 1) * size) if e not in dropped]
                        scores = proxy[layer][rest]
                        stand_ins.append(rest[least_important(scores, 1)[0]])
                    best = min(members, key=lambda e: measured(layer, k, dropped + this_round + [e] + stand_ins))
                    this_round.append(best)
                dropped += this_round
            chosen[layer] = tuple(sorted(dropped))
    if bar is not None:
        bar.close()
    return chosen


__all__ = ["kl_drop_choice"]

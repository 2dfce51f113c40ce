"""Trimming inside the compression pass: what ``compress --drop-experts / --top-k / --drop-blocks /
--drop-moe-layers`` check before the run, decide before it (layer and block drops, ranked on the
uncompressed model: with the top-k, a :class:`~.trimming.Trimming` like a plan's) and do inside each
layer's step (expert drops, scored on the layer's own inputs). ``config`` is a
:class:`~moepress.compress.CompressConfig`."""

from __future__ import annotations

import torch

from ..errors import MoepressError
from ..model.view import MoEView
from .trimming import Trimming


def check_trimming(view: MoEView, config) -> None:
    """A top-k reduction is one every MoE layer's router can make, and an expert drop leaves every
    MoE layer at least its top-k experts, and as many in every group of a group-limited router;
    checked before any work."""
    if config.top_k is not None:
        from .top_k import check_top_k

        for layer in range(view.num_layers):
            if view.experts(layer) is not None:
                check_top_k(view.model, layer, config.top_k)
    if config.drop_experts is None:
        return
    from .expert_drop import router_groups
    from .top_k import top_k_of_layer

    for layer in range(view.num_layers):
        store = view.experts(layer)
        if store is None:
            continue
        top_k = config.top_k or top_k_of_layer(view.model, layer)
        drop, groups = config.experts_to_drop(store.num_experts), router_groups(view.model, layer)
        if store.num_experts - drop < top_k:
            raise MoepressError(f"layers.{layer}: dropping {drop} of its {store.num_experts} experts leaves fewer "
                                f"than the {top_k} each token is routed to; drop at most {store.num_experts - top_k}")
        if groups and drop % groups:
            raise MoepressError(f"layers.{layer}: its router picks experts in {groups} groups; drop a multiple of "
                                f"{groups} experts so every group keeps as many")


def drop_experts_step(view: MoEView, layer: int, runner, config) -> dict:
    """Score the layer's experts on the calibration tokens (after its attention is compressed), drop
    the least important ones, and return the decision and the scores for the profile. The layer's
    experts are then calibrated and quantized as they are after the drop, and the layers after it
    see its output without them."""
    from .expert_drop import drop_experts, router_groups
    from .importance import ExpertImportance, least_important

    store = view.experts(layer)
    router = view.router(layer)
    importance = ExpertImportance(store, sigmoid_router=getattr(router, "e_score_correction_bias", None) is not None)
    handle = router.register_forward_hook(importance.hook)
    try:
        runner.run_layer(layer, update=False)
    finally:
        handle.remove()
    scores = importance.scores(config.drop_criterion)
    dropped = set(least_important(scores, config.experts_to_drop(store.num_experts), router_groups(view.model, layer)))
    keep = [e for e in range(store.num_experts) if e not in dropped]
    drop_experts(view.model, layer, keep)
    prefix = f"layers.{layer}.experts"
    return {f"{prefix}.kept": torch.tensor(keep, dtype=torch.int64), **importance.to_tensors(prefix)}


def choose_layer_drops(source, view: MoEView, tokens, config, device, progress: bool):
    """The blocks and MoE sublayers ``--drop-blocks`` / ``--drop-moe-layers`` remove: the ones that change
    the hidden states least on the calibration tokens, measured in one pass over the uncompressed
    model before the compression pass (He et al.; see moepress.trim.layer_drop)."""
    if not (config.drop_blocks or config.drop_moe_layers):
        return (), ()
    import sys

    from .layer_drop import most_similar, similarity_scores

    scores = similarity_scores(source, tokens, device=device, batch_size=config.batch_size, progress=progress)
    blocks = most_similar(scores["block"], config.drop_blocks, exclude=(0,), what="blocks") if config.drop_blocks \
        else []
    moe = most_similar(scores["moe"], config.drop_moe_layers, exclude=blocks, what="MoE sublayers") \
        if config.drop_moe_layers else []
    if progress:
        print(f"layer drop: blocks {blocks}, MoE sublayers {moe} (mean cosine similarity, block "
              f"{[round(float(s), 4) for s in scores['block']]}, MoE {[round(float(s), 4) for s in scores['moe']]})",
              file=sys.stderr)
    return blocks, moe


def flag_trimming(view: MoEView, config, dropped_blocks=(), dropped_moe=()) -> Trimming:
    """The trimming decided before the pass by the flags: the blocks and MoE sublayers
    :func:`choose_layer_drops` chose, and ``--top-k`` on every MoE layer left (an expert drop by
    ``--drop-experts`` is decided in each layer's step, :func:`drop_experts_step`)."""
    gone = set(dropped_blocks) | set(dropped_moe)
    top_k = {} if config.top_k is None else {layer: config.top_k for layer in range(view.num_layers)
                                             if layer not in gone and view.experts(layer) is not None}
    return Trimming(top_k=top_k, dropped_blocks=tuple(dropped_blocks), dropped_moe_layers=tuple(dropped_moe))


KL_WINDOWS = 16  # calibration windows the kl criterion measures on (each candidate is a whole-model pass)


def choose_kl_drops(source, view: MoEView, tokens, config, trimming, progress: bool, trust_remote_code: bool = False):
    """``--drop-criterion kl``: the experts ``--drop-experts`` removes, chosen before the pass by the
    KL divergence each drop adds to the uncompressed model's output (moepress.trim.kl_drop) on the
    first calibration windows; the model is loaded whole for it (refused when it cannot fit).
    Returns ``trimming`` with those drops; the layers' steps then drop exactly them."""
    import dataclasses
    import sys

    from .kl_drop import kl_drop_choice

    if not getattr(source, "streamed", False):
        import copy

        model = copy.deepcopy(source.model)  # the caller's model keeps its dtype
    else:
        from ..loading import load_model
        from ..pipeline.memory import memory_available

        needed = 4 * sum(p.numel() for p in source.model.parameters())
        available = memory_available()
        if available is not None and needed > available:
            raise MoepressError(f"--drop-criterion kl runs the whole model in memory (about {needed / 1e9:.1f} GB in "
                                f"float32) but {available / 1e9:.1f} GB are available; use reap (the default)")
        model = load_model(source.path, trust_remote_code=trust_remote_code)
    model = model.float().eval()
    gone = set(trimming.dropped_blocks) | set(trimming.dropped_moe_layers)
    counts = {layer: config.experts_to_drop(view.experts(layer).num_experts) for layer in range(view.num_layers)
              if view.experts(layer) is not None and layer not in gone}
    chosen = kl_drop_choice(model, tokens[:KL_WINDOWS], counts, top_k=dict(trimming.top_k),
                            batch_size=config.batch_size, progress=progress)
    if progress:
        print(f"expert drop (kl): {', '.join(f'layers.{k}: {list(v)}' for k, v in chosen.items())}", file=sys.stderr)
    return dataclasses.replace(trimming, dropped_experts=chosen)

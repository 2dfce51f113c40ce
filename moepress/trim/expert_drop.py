"""Expert dropping: remove whole routed experts from one MoE layer, in memory.

He et al. (2024), "Demystifying the Compression of Mixture-of-Experts Through a Unified
Framework", call this Expert Trimming / Expert Drop: the experts of a layer that matter least are
removed and the router chooses among the rest. This module does the surgery only; which experts
to keep is the caller's decision (a score, a plan, a person).

Every transformers MoE router computes a logit per expert with one weight row per expert and then
applies its rule (softmax then top-k, top-k then softmax, sparsemixer, DeepSeek's sigmoid with a
correction bias and group-limited top-k) to the logit vector as a whole. Removing an expert's rows
(weight, bias, ``e_score_correction_bias``) therefore *is* removing its logit before the rule: the
router renormalises over the remaining experts exactly as its architecture does, with no change to
its code. What must change are the expert counts the forwards read (``num_experts`` and friends,
``out_features`` of a router that is an ``nn.Linear``), on the modules of that layer only: the
config is shared by all layers, which may keep different counts.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MoepressError
from ..model.view import ExpertStore, MoEView

# Names under which transformers' MoE modules (block, router, experts) hold their expert count.
COUNT_ATTRIBUTES = ("num_experts", "n_routed_experts", "num_local_experts")


@dataclass(frozen=True)
class _MoEParts:
    """The three modules of one MoE layer that know how many experts it has."""

    block: nn.Module
    router: nn.Module
    store: ExpertStore


@dataclass(frozen=True)
class _Groups:
    """Group-limited routing: the scores are viewed as [tokens, count, E / count]; the router
    keeps the ``selected`` best groups and takes its top-k inside them."""

    count: int  # n_group
    selected: int  # topk_group
    min_per_group: int  # experts a group needs for its group score to be defined


def drop_experts(model: nn.Module, layer: int, keep: list[int]) -> None:
    """Keep only the routed experts ``keep`` of MoE layer ``layer`` (renumbered 0..len(keep)-1, in
    that order); the layer then computes what the original computes with the dropped experts'
    router logits removed before its softmax/sigmoid and top-k.

    The router's per-expert rows (weight, bias, DeepSeek-V3's ``e_score_correction_bias``) and the
    experts' tensors (fused ``gate_up_proj`` / ``down_proj``) or modules (one ``nn.Linear`` each)
    are sliced, and the counts on the block, router and experts modules updated. Shared experts
    are untouched. Everything is checked before anything changes: a refused call leaves the model
    as it was.

    Group-limited routers (DeepSeek-V2's ``group_limited_greedy``, DeepSeek-V3) view the scores as
    ``n_group`` consecutive groups of equal size, score each group (V2: its best expert; V3: the
    sum of its two best corrected scores), keep the ``topk_group`` best groups and pick the top-k
    inside them. For the trimmed router to keep each expert in its group, every group must keep
    the same number of experts ``m`` (so ``n_group`` stays and the new groups are again
    consecutive blocks of ``m``), ``keep`` must list each group's experts together, ``m`` must be at
    least the experts a group score needs (2 for V3), and ``topk_group * m`` at least top-k, or the
    router would pick experts outside its chosen groups. Removing a group entirely would change
    what ``topk_group`` means and is refused too.
    """
    parts = _moe_parts(model, layer)
    num_experts = parts.store.num_experts
    keep = check_drop(model, layer, keep)

    _take_rows(parts.router, keep, num_experts)
    if parts.store.layout == "fused":
        _take_rows(parts.store.module, keep, num_experts)
    else:
        _keep_modules(parts.store.module, keep)
    for module in (parts.block, parts.router, parts.store.module):
        _set_count(module, num_experts, len(keep))
    if isinstance(parts.router, nn.Linear):  # PhiMoE's router is an nn.Linear
        parts.router.out_features = len(keep)


def check_drop(model: nn.Module, layer: int, keep, top_k: int | None = None) -> list[int]:
    """What :func:`drop_experts` checks, without changing anything: ``keep`` (as a list of ints) when
    MoE layer ``layer`` can keep just those experts, else a one-line error naming the layer.
    ``top_k``: the experts the router will pick per token (default: what it picks now), for a drop
    that follows a top-k reduction."""
    parts = _moe_parts(model, layer)
    num_experts = parts.store.num_experts
    top_k = _top_k(model, parts) if top_k is None else top_k
    keep = _checked_keep(layer, keep, num_experts, top_k, _router_groups(parts.router))
    _check_layout(layer, parts, num_experts)
    return keep


def expert_counts(model: nn.Module) -> dict[int, int]:
    """Routed experts per MoE layer, as the modules hold them (not as the config says)."""
    view = MoEView(model)
    return {
        layer: view.experts(layer).num_experts for layer in range(view.num_layers) if view.is_moe_layer(layer)
    }


def restore_expert_counts(model: nn.Module, counts: dict[int, int]) -> None:
    """Shrink a freshly built model (all layers at the config's count, weights not loaded yet, e.g.
    on the meta device) so each listed layer holds ``counts[layer]`` experts, the shapes a
    checkpoint saved after :func:`drop_experts` has; its weights are loaded afterwards.

    Which experts are kept does not matter, only the shapes: the first ``count`` experts, or for a
    group-limited router the first ``count / n_group`` of each group (so the drop is consistent).
    Layer keys may be strings, as they come back from JSON.
    """
    for layer, count in sorted((int(layer), count) for layer, count in counts.items()):
        parts = _moe_parts(model, layer)
        current = parts.store.num_experts
        if count > current:
            raise MoepressError(
                f"layers.{layer}: the checkpoint has {count} experts but the model {current}; "
                "restore_expert_counts only shrinks a model built from the original config"
            )
        if count < current:
            drop_experts(model, layer, _first_experts(parts.router, current, count))


def router_groups(model: nn.Module, layer: int) -> int | None:
    """How many equal groups layer ``layer``'s router limits its top-k to (DeepSeek's
    group-limited routing), or None: a drop must then take as many experts from every group."""
    groups = _router_groups(MoEView(model).router(layer))
    return None if groups is None else groups.count


def _moe_parts(model: nn.Module, layer: int) -> _MoEParts:
    view = MoEView(model)
    if not 0 <= layer < view.num_layers:
        raise MoepressError(f"layers.{layer}: no such layer; the model has layers 0..{view.num_layers - 1}")
    store = view.experts(layer)
    if store is None:
        raise MoepressError(f"layers.{layer}: not an MoE layer (a dense MLP has no experts to drop)")
    if store.layout == "packed":
        raise MoepressError(
            f"layers.{layer}: the experts are already packed by moepress; drop experts before compressing"
        )
    router = view.router(layer)
    if router is None or not isinstance(getattr(router, "weight", None), torch.Tensor):
        raise MoepressError(f"layers.{layer}: no router with a per-expert weight at {view.spec.router}")
    block = model.get_submodule(f"{view.layer_path(layer)}.{view.spec.moe_block}")
    return _MoEParts(block=block, router=router, store=store)


def _top_k(model: nn.Module, parts: _MoEParts) -> int:
    for module in (parts.router, parts.block):
        if isinstance(getattr(module, "top_k", None), int):
            return module.top_k
    return model.config.num_experts_per_tok


def _router_groups(router: nn.Module) -> _Groups | None:
    """The group-limited routing of a DeepSeek router, or None when it routes over all experts."""
    count, selected = getattr(router, "num_group", None), getattr(router, "topk_group", None)
    if not count or not selected:
        return None
    if getattr(router, "topk_method", "group_limited_greedy") != "group_limited_greedy":
        return None  # DeepSeek-V2's "greedy" ignores its groups
    # DeepSeek-V3 (the router with a correction bias) scores a group by its two best experts.
    min_per_group = 2 if hasattr(router, "e_score_correction_bias") else 1
    return _Groups(count=count, selected=selected, min_per_group=min_per_group)


def _checked_keep(layer: int, keep, num_experts: int, top_k: int, groups: _Groups | None) -> list[int]:
    try:
        keep = [operator.index(e) for e in keep]
    except TypeError:
        raise MoepressError(f"layers.{layer}: keep must be a list of expert indices (integers), got {keep!r}") from None
    unknown = sorted({e for e in keep if not 0 <= e < num_experts})
    if unknown:
        raise MoepressError(f"layers.{layer}: unknown experts {unknown}; the layer has experts 0..{num_experts - 1}")
    duplicates = sorted(e for e, n in Counter(keep).items() if n > 1)
    if duplicates:
        raise MoepressError(f"layers.{layer}: experts {duplicates} are listed more than once in keep")
    if len(keep) < top_k:
        raise MoepressError(
            f"layers.{layer}: keeping {len(keep)} experts but the router picks {top_k} per token; keep at least {top_k}"
        )
    if groups is not None:
        _check_groups(layer, keep, num_experts, top_k, groups)
    return keep


def _check_groups(layer: int, keep: list[int], num_experts: int, top_k: int, groups: _Groups) -> None:
    size = num_experts // groups.count
    per_group = Counter(e // size for e in keep)
    kept = [per_group.get(g, 0) for g in range(groups.count)]
    where = f"layers.{layer}: the router picks experts within {groups.count} groups of {size}"
    if len(set(kept)) > 1:
        raise MoepressError(
            f"{where} and every group must keep the same number of experts; this keeps {kept} per group"
        )
    m = kept[0]
    if m < groups.min_per_group:
        raise MoepressError(
            f"{where} and scores a group by its {groups.min_per_group} best experts; keep at least "
            f"{groups.min_per_group} per group, not {m}"
        )
    if groups.selected * m < top_k:
        raise MoepressError(
            f"{where} and takes its {top_k} experts from the {groups.selected} best, so every group must keep "
            f"at least {-(-top_k // groups.selected)} experts, not {m}"
        )
    chunks = [keep[i:i + m] for i in range(0, len(keep), m)]
    if any(len({e // size for e in chunk}) > 1 for chunk in chunks):
        raise MoepressError(
            f"{where}; list each group's kept experts together in keep (the new groups are its consecutive runs of {m})"
        )


def _check_layout(layer: int, parts: _MoEParts, num_experts: int) -> None:
    """Refuse, before anything changes, tensors that are not indexed by expert on their first axis."""
    if parts.router.weight.shape[0] != num_experts:
        raise MoepressError(
            f"layers.{layer}: router weight is {tuple(parts.router.weight.shape)}, not [{num_experts}, hidden]"
        )
    if parts.store.layout == "fused":
        for name, tensor in _direct_tensors(parts.store.module):
            if tensor.dim() == 0 or tensor.shape[0] != num_experts:
                raise MoepressError(
                    f"layers.{layer}: fused experts tensor '{name}' is {tuple(tensor.shape)}, not [{num_experts}, ...]"
                )


def _direct_tensors(module: nn.Module):
    yield from module.named_parameters(recurse=False)
    yield from ((name, buf) for name, buf in module.named_buffers(recurse=False) if buf is not None)


def _take_rows(module: nn.Module, keep: list[int], num_experts: int) -> None:
    """Replace each tensor ``module`` holds itself whose first axis counts experts by its rows ``keep``.

    New tensors (not views) so the dropped rows' memory is freed; a buffer keeps its persistence.
    """
    for name, tensor in list(_direct_tensors(module)):
        if tensor.dim() == 0 or tensor.shape[0] != num_experts:
            continue
        rows = tensor.detach()[keep].clone()
        if isinstance(tensor, nn.Parameter):
            setattr(module, name, nn.Parameter(rows, requires_grad=tensor.requires_grad))
        else:
            module._buffers[name] = rows


def _keep_modules(experts: nn.ModuleList, keep: list[int]) -> None:
    """Renumber a per-expert ModuleList in place, so its class and forward stay what they were."""
    kept = [experts[e] for e in keep]
    experts._modules.clear()
    for index, expert in enumerate(kept):
        experts._modules[str(index)] = expert


def _set_count(module: nn.Module, old: int, new: int) -> None:
    for name in COUNT_ATTRIBUTES:
        value = getattr(module, name, None)
        if isinstance(value, int) and value == old:
            setattr(module, name, new)


def _first_experts(router: nn.Module, current: int, count: int) -> list[int]:
    """A keep list of ``count`` experts that :func:`drop_experts` accepts, for shapes only."""
    groups = _router_groups(router)
    if groups is None or count % groups.count:
        return list(range(count))  # drop_experts explains an inconsistent grouped count
    size, per_group = current // groups.count, count // groups.count
    return [g * size + i for g in range(groups.count) for i in range(per_group)]

"""Expert dropping: a trimmed layer routes exactly as the original would over the remaining experts.

The reference for every architecture is computed by hand from the ORIGINAL model's weights: its
router logits with the dropped experts' columns removed, that architecture's routing rule (written
out here), and the kept experts' outputs weighted.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM
from transformers.activations import ACT2FN

from moepress.errors import MoepressError
from moepress.model import ARCHITECTURES, MoEView
from moepress.model.tiny import build_tiny_model, tiny_config, unfuse_experts
from moepress.trim import drop_experts, expert_counts, restore_expert_counts

TOKENS = 48
# Architectures whose tiny config has 4 experts get 8, so every one drops from 8.
EIGHT_EXPERTS = {arch: dict(num_local_experts=8) for arch in ("mixtral", "granitemoe", "phimoe")}
CASES = {arch: (arch, EIGHT_EXPERTS.get(arch, {})) for arch in ARCHITECTURES}
CASES["qwen3_moe-norm_topk"] = ("qwen3_moe", dict(norm_topk_prob=True))
CASES["deepseek_v2-greedy"] = ("deepseek_v2", dict(topk_method="greedy"))  # groups ignored
GROUPED = ("deepseek_v2", "deepseek_v3")  # the tiny configs: 8 experts in 2 groups of 4, topk_group 1


def tiny(case: str, layout: str = "fused", seed: int = 0):
    arch, overrides = CASES[case]
    model = build_tiny_model(arch, seed=seed, **overrides)
    return unfuse_experts(model) if layout == "per_expert" else model


def is_grouped(model) -> bool:
    cfg = model.config
    return cfg.model_type in GROUPED and getattr(cfg, "topk_method", "noaux_tc") != "greedy"


def drop_plan(model) -> dict[int, list[int]]:
    """Two MoE layers trimmed differently (6 and 4 of 8), in shuffled orders; groups kept equal."""
    view = MoEView(model)
    first, second = [layer for layer in range(view.num_layers) if view.is_moe_layer(layer)][:2]
    if is_grouped(model):  # groups {0..3}, {4..7}: drop one (then two) from each, groups listed swapped
        return {first: [6, 4, 7, 2, 0, 3], second: [5, 4, 1, 3]}
    return {first: [5, 0, 7, 2, 3, 6], second: [1, 6, 4, 2]}


def block_of(model, layer: int):
    view = MoEView(model)
    return model.get_submodule(f"{view.layer_path(layer)}.{view.spec.moe_block}")


# The routing rules, written out: logits [T, K] over the kept experts -> (weights, indices) [T, k].

def route_softmax_topk(logits, top_k, norm):  # Mixtral (norm always), Qwen2/3-MoE, OLMoE
    weights, index = logits.softmax(-1).topk(top_k, dim=-1)
    return (weights / weights.sum(-1, keepdim=True) if norm else weights), index


def route_topk_softmax(logits, top_k):  # GraniteMoE: top-k logits, softmax over those
    values, index = logits.topk(top_k, dim=-1)
    return values.softmax(-1), index


def route_sparsemixer(logits, jitter_eps):
    """PhiMoE's sparsemixer in eval mode: the best expert, then the best of the rest, each
    weighted by a softmax over the logits within 2*jitter_eps (relative) of that best one."""
    weights, index, scores = [], [], logits
    for _ in range(2):
        best, best_index = scores.max(-1, keepdim=True)
        factor = logits.abs().clamp(min=best)
        far = ((best - logits) / factor) > 2 * jitter_eps
        gates = scores.masked_fill(far, float("-inf")).softmax(-1)
        weights.append(gates.gather(-1, best_index))
        index.append(best_index)
        scores = scores.scatter(-1, best_index, float("-inf"))
    return torch.cat(weights, -1), torch.cat(index, -1)


def group_mask(group_scores, groups_of, topk_group):
    """[T, K]: whether each kept expert lies in one of the token's topk_group best groups."""
    chosen = group_scores.topk(topk_group, dim=-1).indices  # [T, topk_group]
    return (groups_of[None, :, None] == chosen[:, None, :]).any(-1)


def per_group(scores, groups_of, score):
    return torch.stack([score(scores[:, groups_of == g]) for g in range(int(groups_of.max()) + 1)], -1)


def route_deepseek_v2(logits, cfg, groups_of):
    probs = logits.softmax(-1)
    if cfg.topk_method == "group_limited_greedy":
        group_scores = per_group(probs, groups_of, lambda s: s.max(-1).values)
        probs = probs.masked_fill(~group_mask(group_scores, groups_of, cfg.topk_group), 0.0)
    weights, index = probs.topk(cfg.num_experts_per_tok, dim=-1)
    return weights * cfg.routed_scaling_factor, index


def route_deepseek_v3(logits, cfg, groups_of, correction_bias):
    scores = logits.sigmoid()
    choice = scores + correction_bias
    group_scores = per_group(choice, groups_of, lambda s: s.topk(2, dim=-1).values.sum(-1))
    choice = choice.masked_fill(~group_mask(group_scores, groups_of, cfg.topk_group), float("-inf"))
    index = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
    weights = scores.gather(1, index)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, index


def reference_routing(model, layer, keep, hidden):
    """The original router's logits, dropped columns removed, then the architecture's rule."""
    cfg, router = model.config, MoEView(model).router(layer)
    logits = (hidden @ router.weight.float().T)[:, keep]
    arch, top_k = cfg.model_type, cfg.num_experts_per_tok
    if arch == "mixtral":
        return route_softmax_topk(logits, top_k, norm=True)
    if arch in ("qwen2_moe", "qwen3_moe", "olmoe"):
        return route_softmax_topk(logits, top_k, norm=cfg.norm_topk_prob)
    if arch == "granitemoe":
        return route_topk_softmax(logits, top_k)
    if arch == "phimoe":
        return route_sparsemixer(logits, cfg.router_jitter_noise)
    size = cfg.n_routed_experts // cfg.n_group
    groups_of = torch.tensor([e // size for e in keep])  # each kept expert's ORIGINAL group
    if arch == "deepseek_v2":
        return route_deepseek_v2(logits, cfg, groups_of)
    return route_deepseek_v3(logits, cfg, groups_of, router.e_score_correction_bias[keep])


def reference_block(model, layer, keep, hidden):
    """(output, chosen kept positions) of the original layer with only ``keep`` routable."""
    weights, index = reference_routing(model, layer, keep, hidden)
    store = MoEView(model).experts(layer)
    gate, up, down = (store.weight(lin)[keep] for lin in ("gate_proj", "up_proj", "down_proj"))
    act = ACT2FN[model.config.hidden_act]
    expert_out = torch.stack([act(hidden @ gate[j].T) * (hidden @ up[j].T) @ down[j].T for j in range(len(keep))])
    tokens = torch.arange(hidden.shape[0])[:, None]
    out = (weights[..., None] * expert_out[index, tokens]).sum(1)
    block = block_of(model, layer)
    if hasattr(block, "shared_expert_gate"):  # Qwen2-MoE
        out = out + torch.sigmoid(block.shared_expert_gate(hidden)) * block.shared_expert(hidden)
    elif hasattr(block, "shared_experts"):  # DeepSeek
        out = out + block.shared_experts(hidden)
    return out, index


def run_block(model, layer, hidden):
    """The layer's MoE block output on ``hidden`` [T, H], and the experts its router chose."""
    chosen = []
    handle = MoEView(model).router(layer).register_forward_hook(lambda m, i, out: chosen.append(out[-1]))
    try:
        out = block_of(model, layer)(hidden[None])[0]
    finally:
        handle.remove()
    return out, chosen[0]


def stale_counts(block, old: int) -> list[str]:
    """Integer attributes in a trimmed block still equal to the old expert count (the tiny models
    have no other 8: sizes are 128, top-k 2, groups 2)."""
    return [
        f"{path}.{attr}" for path, module in block.named_modules() for attr, value in vars(module).items()
        if type(value) is int and value == old
    ]


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
@pytest.mark.parametrize("case", CASES)
def test_dropped_layer_matches_router_over_remaining_experts(case, layout):
    original = tiny(case, layout)
    dropped = copy.deepcopy(original)
    plan = drop_plan(original)
    config_before = original.config.to_dict()
    for layer, keep in plan.items():
        drop_experts(dropped, layer, keep)

    assert dropped.config.to_dict() == config_before  # counts live on the modules, not the shared config
    assert expert_counts(dropped) == {**expert_counts(original), **{l: len(k) for l, k in plan.items()}}
    torch.manual_seed(1)
    hidden = torch.randn(TOKENS, original.config.hidden_size)
    with torch.no_grad():
        for layer, keep in plan.items():
            expected, expected_index = reference_block(original, layer, keep, hidden)
            out, index = run_block(dropped, layer, hidden)
            assert_close(out, expected, rtol=1e-5, atol=1e-5)
            assert not stale_counts(block_of(dropped, layer), old=8)
            # The same experts, in new numbering; so no dropped expert is ever selected.
            assert torch.equal(index.sort(-1).values, expected_index.sort(-1).values)
            assert index.max() < len(keep)
            # Not vacuous: the untrimmed router does pick the dropped experts on these tokens.
            _, original_index = run_block(original, layer, hidden)
            dropped_experts = sorted(set(range(8)) - set(keep))
            assert torch.isin(original_index, torch.tensor(dropped_experts)).any()
        logits = dropped(torch.randint(0, 512, (2, 12))).logits
    assert logits.shape == (2, 12, 512) and torch.isfinite(logits).all()


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_keeping_every_expert_changes_nothing(arch, layout):
    model = tiny(arch, layout)
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        before = model(ids).logits
        for layer, count in expert_counts(model).items():
            drop_experts(model, layer, list(range(count)))
        after = model(ids).logits
    assert torch.equal(before, after)


REFUSALS = [
    ("mixtral", 0, [3], "keep at least 2"),
    ("mixtral", 1, [0, 2, 2], "more than once"),
    ("mixtral", 0, [0, 8], "unknown experts [8]"),
    ("mixtral", 0, [-1, 0, 1], "unknown experts [-1]"),
    ("mixtral", 0, [0, 1.5], "integers"),
    ("mixtral", 7, [0, 1], "no such layer"),
    ("qwen3_moe", 0, [0, 1], "not an MoE layer"),
    ("deepseek_v3", 1, [0, 1, 2, 4, 5], "same number of experts"),
    ("deepseek_v3", 1, [0, 1, 2, 3], "same number of experts"),  # a whole group removed
    ("deepseek_v3", 1, [0, 4, 1, 5], "together"),  # groups interleaved: the new groups would mix them
    ("deepseek_v3", 1, [0, 4], "2 best experts"),  # V3 scores a group by its two best
    ("deepseek_v2", 1, [0, 1, 2, 4, 5], "same number of experts"),
    ("deepseek_v2", 1, [0, 4], "at least 2 experts"),  # topk_group 1 x 1 per group < top-k 2
]


@pytest.mark.parametrize("case, layer, keep, says", REFUSALS)
def test_refusals_are_one_line_and_change_nothing(case, layer, keep, says):
    model = tiny(case)
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    with pytest.raises(MoepressError) as info:
        drop_experts(model, layer, keep)
    message = str(info.value)
    assert f"layers.{layer}" in message and says in message and "\n" not in message
    assert {name: tensor.shape for name, tensor in model.state_dict().items()} == shapes


def test_greedy_deepseek_v2_ignores_groups():
    """With topk_method="greedy" the groups do not route, so an unequal drop is fine."""
    model = tiny("deepseek_v2-greedy")
    drop_experts(model, 1, [0, 1, 2, 4, 5])
    assert expert_counts(model)[1] == 5


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_restored_counts_load_a_dropped_checkpoint(arch, layout):
    dropped = tiny(arch, layout)
    for layer, keep in drop_plan(dropped).items():
        drop_experts(dropped, layer, keep)
    state = dropped.state_dict()
    counts = json.loads(json.dumps(expert_counts(dropped)))  # as a config would carry them: str keys

    fresh = tiny(arch, layout, seed=1)
    with pytest.raises(RuntimeError):  # the original shapes do not take the checkpoint
        fresh.load_state_dict(state, strict=True)
    restore_expert_counts(fresh, counts)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in state.items()}
    fresh.load_state_dict(state, strict=True)
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, dropped(ids).logits)


def test_restore_on_a_meta_skeleton():
    """A skeleton built without memory (how loaders build one) takes the dropped shapes too."""
    arch, overrides = CASES["deepseek_v3"]
    dropped = tiny("deepseek_v3")
    for layer, keep in drop_plan(dropped).items():
        drop_experts(dropped, layer, keep)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    restore_expert_counts(skeleton, expert_counts(dropped))
    assert {k: v.shape for k, v in skeleton.state_dict().items()} == {
        k: v.shape for k, v in dropped.state_dict().items()
    }
    assert expert_counts(skeleton) == expert_counts(dropped)


def test_restore_refuses_to_grow():
    model = tiny("mixtral")
    with pytest.raises(MoepressError, match=r"layers\.0: the checkpoint has 9 experts"):
        restore_expert_counts(model, {0: 9})

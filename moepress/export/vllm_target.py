"""What vLLM can serve from a compressed-tensors checkpoint: the rules ``compress --target vllm`` obeys.

``moepress export --format compressed-tensors`` writes compressed-tensors' ``pack-quantized``
layout (:mod:`moepress.export.compressed_tensors`). vLLM reads it with its WNA16 schemes, and its
code fixes what a moepress plan may hold under the target (vllm ``compressed_tensors_moe.py`` and
``schemes/compressed_tensors_wNa16.py``, read for this module; compressed-tensors 0.19/0.20):

* **4- or 8-bit integer weights, 16-bit activations.** compressed-tensors packs any width from 1
  to 8 bits densely into int32, but vLLM's MoE kernels take 4 and 8 (``WNA16_SUPPORTED_BITS`` as
  the MoE method reads it; ``packed_factor = 32 // num_bits``), so 2- and 3-bit are refused.
* **Routed experts are symmetric.** vLLM's MoE methods assert ``weight_quant.symmetric`` ("Only
  symmetric quantization is supported for MoE"), and transformers' fused-expert decompression
  drops zero points too; so ``--target vllm`` quantizes symmetrically. Attention and dense or
  shared MLP linears may carry zero points at 4 bits (``WNA16_ZP_SUPPORTED_TYPES_MAP``), through a
  plan.
* **Groups of 32, 64, 128 or per-channel**, dividing the unit's inputs (a group never straddles a
  row's end); per-channel rows a whole number of int32 words.
* **Act-order static or off.** Static act-order changes only the calibration order; nothing more
  is stored. Dynamic act-order needs a ``weight_g_idx``, which compressed-tensors 0.19 no longer
  reads (its "group" act-order is deprecated: decompression ignores the index, so transformers
  would load wrong weights) and vLLM's triton MoE refuses; it is refused.
* **No pruning, splits or llama.cpp block formats**, and no trimming yet (the export does not
  rewrite the model config for fewer experts or layers).
* **One linear per expert in the hub layout**, which compressed-tensors' per-expert tensors need
  (Granite-MoE's hub checkpoints store a layer's experts fused: refused).
* **One scheme per fused group** (:func:`tied_units`): vLLM's MoE loader reads the scheme of expert
  0's gate, up and down projections for the whole layer and requires them equal, so every routed
  expert of a layer, all three projections, shares one treatment (per-layer mixing loads,
  per-expert mixing does not); q/k/v are fused into one ``qkv_proj``, gate/up of a dense or shared
  MLP into one ``gate_up_proj``, and DeepSeek's ``q_a_proj``/``kv_a_proj_with_mqa`` into
  ``fused_qkv_a_proj``, each with one scheme.
"""

from __future__ import annotations

from ..errors import MoepressError
from ..model.view import EXPERT_LINEARS, MoEView
from .hub_names import hub_names

TARGET = "vllm"
BITS = (4, 8)  # vLLM's WNA16 MoE kernels
ZERO_POINT_BITS = (4,)  # asymmetric linears vLLM's WNA16 kernels take (never routed experts)
GROUP_SIZES = (32, 64, 128)
# What `plan/compress --target vllm --budget` chooses from (and `--project` projects onto): 4- and
# 8-bit at the plan's group size, or kept; every option symmetric (routed experts must be)
PLAN_OPTIONS = "4,8,16"
PLAN_SETTINGS = {"symmetric": True}
# Linears vLLM fuses into one module with one scheme, per attention or MLP block
FUSED = {
    "attn": (("q_proj", "k_proj", "v_proj"), ("q_a_proj", "kv_a_proj_with_mqa")),
    "mlp": (("gate_proj", "up_proj"),),
}
WHY_TIED = {
    "experts": "vLLM's MoE loader reads one scheme for all of a layer's experts, gate, up and down alike",
    "q_proj": "vLLM fuses q/k/v into one qkv_proj with one scheme",
    "q_a_proj": "vLLM fuses q_a_proj and kv_a_proj_with_mqa into one fused_qkv_a_proj with one scheme",
    "gate_proj": "vLLM fuses gate_proj and up_proj into one gate_up_proj with one scheme",
}


def check_config(config) -> None:
    """The flags of a :class:`~moepress.compress.CompressConfig` vLLM's compressed-tensors loader
    cannot express (``--symmetric`` is implied: the config sets it)."""
    refused = [
        (config.bits not in BITS, f"--bits {config.bits}: vLLM's compressed-tensors MoE kernels take 4- or 8-bit "
                                  "weights (W4A16, W8A16)" + ("; for 16 bits serve the original model"
                                                            if config.bits == 16 else "")),
        (config.prune is not None, f"--prune {config.prune}: pack-quantized stores every weight"),
        (config.act_order == "dynamic" and config.method == "gptq",
         "--act-order dynamic: compressed-tensors no longer reads a group index (weight_g_idx) and vLLM's MoE "
         "kernels refuse it; use static or off"),
        (config.dynamic_pruning is not None, "--dynamic-pruning: vLLM routes every token to its top-k experts"),
        (config.drop_experts is not None or config.top_k is not None or bool(config.drop_blocks)
         or bool(config.drop_moe_layers),
         "--drop-experts/--drop-blocks/--drop-moe-layers/--top-k: the compressed-tensors export does not rewrite "
         "the model config of a trimmed model yet"),
    ]
    for bad, why in refused:
        if bad:
            raise MoepressError(f"--target vllm: {why}")


def resolve(view: MoEView, config) -> dict:
    """Every unit's treatment under ``--bits`` without a plan: ``config``'s (symmetric) treatment, or
    kept where ``--keep-attention`` (``quantize_attention``/``quantize_mlp``) keeps it."""
    from ..treatment import KEEP

    treatment = config.treatment()
    kept = {"attn": not config.quantize_attention, "shared": not config.quantize_mlp, "mlp": not config.quantize_mlp}
    return {name: KEEP if kept.get(name.split(".")[2], False) else treatment for name in view.unit_shapes()}


def check_trimming(view: MoEView, trimming, config=None) -> None:
    """A plan's trims: none yet (the export keeps the source model's config)."""
    if trimming is not None and not trimming.empty:
        raise MoepressError("--target vllm: the plan trims the model (experts, blocks, MoE sublayers or top-k), "
                            "and the compressed-tensors export does not rewrite a trimmed model's config yet")


def refusal(name: str, treatment, in_features: int) -> str | None:
    """Why vLLM cannot hold ``treatment`` for unit ``name`` of ``in_features`` inputs (a sentence
    naming the unit), or None. The rules of one unit alone; :func:`tied_units` says which units
    must agree."""
    t = treatment
    if t.keep:
        return None
    if t.kind == "split":
        return f"{name} is split into neuron groups ({t.label}); compressed-tensors has one scheme per linear"
    if t.pruned or t.kind == "prune":
        return f"{name} is pruned ({t.label}); pack-quantized stores every weight"
    if t.format is not None:
        return f"{name} is {t.label}, a llama.cpp block format; compress for vLLM with moepress's own grid (4b-g128)"
    if t.bits not in BITS:
        return (f"{name} is {t.label}: vLLM's compressed-tensors MoE kernels take 4- or 8-bit weights "
                "(compressed-tensors packs 2/3-bit, vLLM cannot serve them)")
    if t.stores_group_index:
        return (f"{name} has dynamic act-order ({t.label}): compressed-tensors no longer reads a group index "
                "(weight_g_idx); use static act-order")
    if not t.symmetric and ".experts." in name:
        return f"{name} has zero points ({t.label}): vLLM's MoE kernels are symmetric only"
    if not t.symmetric and t.bits not in ZERO_POINT_BITS:
        return f"{name} has zero points at {t.bits} bits ({t.label}): vLLM's WNA16 kernels take zero points at 4 bits"
    if t.group_size is not None:
        if t.group_size not in GROUP_SIZES or in_features % t.group_size:
            return f"{name}: groups of {t.group_size} do not divide its {in_features} inputs, as vLLM's kernels need"
    elif in_features % (32 // t.bits):
        return f"{name}: {in_features} inputs are not a whole number of int32 words of {t.bits}-bit codes"
    return None


def _tied_groups(view: MoEView) -> list[tuple[tuple[str, ...], str]]:
    """(unit names, why they are tied) for every group vLLM stores with one scheme."""
    groups = []
    for layer in range(view.num_layers):
        by_kind = {"attn": view.attention_units(layer), "mlp": view.mlp_units(layer)}
        for kind, fused in FUSED.items():
            present = {unit.name.rsplit(".", 1)[1]: unit.name for unit in by_kind[kind]}
            for linears in fused:
                names = tuple(present[lin] for lin in linears if lin in present)
                if len(names) > 1:
                    groups.append((names, WHY_TIED[linears[0]]))
        store = view.experts(layer)
        if store is not None:
            names = tuple(store.unit_name(e, lin) for e in range(store.num_experts) for lin in EXPERT_LINEARS)
            groups.append((names, WHY_TIED["experts"]))
    return groups


def tied_units(view: MoEView) -> list[tuple[str, ...]]:
    """Groups of unit names that must share one treatment under the target: each MoE layer's
    routed experts (every expert, gate/up/down together), each layer's q/k/v (and DeepSeek's
    q_a/kv_a), each dense or shared MLP's gate/up."""
    return [names for names, _ in _tied_groups(view)]


def scheme_key(treatment) -> tuple:
    """What of a treatment the checkpoint's scheme records: tied units must agree on it."""
    if treatment.keep:
        return ("keep",)
    return (treatment.kind, treatment.bits, treatment.group_size, treatment.symmetric, treatment.act_order,
            treatment.format, treatment.sparsity, treatment.nm, treatment.pieces)


def describe(treatment) -> str:
    """A treatment's label with what the scheme records beyond it (symmetry, act-order)."""
    if treatment.keep or treatment.kind != "quantize":
        return treatment.label
    return (f"{treatment.label} {'symmetric' if treatment.symmetric else 'with zero points'}"
            f"{'' if treatment.act_order == 'off' else f', act-order {treatment.act_order}'}")


def check_units(view: MoEView, treatment_of, trimming=None) -> None:
    """Every unit's treatment is one vLLM holds (:func:`refusal`) and every tied group agrees
    (:func:`tied_units`); one line naming the first unit that breaks a rule."""
    check_trimming(view, trimming)
    try:  # the hub layout must hold one linear per expert (Granite-MoE's stores them fused)
        hub_names(view.model, view)
    except MoepressError as exc:
        raise MoepressError(f"--target vllm: {exc}") from None
    for name, (_, in_features) in view.unit_shapes().items():
        why = refusal(name, treatment_of(name), in_features)
        if why is not None:
            raise MoepressError(f"--target vllm: {why}")
    check_tied(view, treatment_of, "--target vllm")


def check_tied(view: MoEView, treatment_of, what: str, kinds=None) -> None:
    """Every tied group (or those whose reason is in ``kinds``) has one scheme; one line naming the
    first unit that differs from its group's first."""
    for names, why in _tied_groups(view):
        if kinds is not None and why not in kinds:
            continue
        first = treatment_of(names[0])
        for name in names[1:]:
            if scheme_key(treatment_of(name)) != scheme_key(first):
                raise MoepressError(f"{what}: {name} is {describe(treatment_of(name))} but {names[0]} is "
                                    f"{describe(first)}; {why}")


__all__ = ["BITS", "GROUP_SIZES", "PLAN_OPTIONS", "PLAN_SETTINGS", "TARGET", "WHY_TIED", "check_config", "check_tied", "check_trimming",
           "check_units", "describe", "refusal", "resolve", "scheme_key", "tied_units"]

"""What llama.cpp can serve: the rules ``compress --target llamacpp`` obeys, checked before any work.

A GGUF stores each projection of a layer's routed experts as one 3-D tensor with one ggml type
(``blk.N.ffn_gate_exps``), every layer with the same expert count and top-k (one
``expert_count`` and ``expert_used_count`` for the model), every linear either in a block format
or in float. So under the target:

* ``--bits N`` means llama.cpp's N-bit type, per tensor: the k-quant where a row is a multiple
  of 256 inputs (4 -> Q4_K, 5 -> Q5_K, 6 -> Q6_K), else the legacy type (4 -> Q4_1, 5 -> Q5_1,
  6 -> Q8_0, llama-quantize's own fallback); 8 -> Q8_0; 16 keeps every unit (an f16 GGUF).
  ``--ggml-type`` puts every unit in one type instead (q4_0, q5_0, ...). Of the legacy types the
  ``_1`` ones are the default because they had the lower layer error on every tensor we measured
  (the zoo's Mixtral: about 17% lower squared error than Q4_0 at 11% more bytes, 5.0 vs 4.5 bits
  per weight). 2 -> Q2_K and 3 -> Q3_K where a row is a multiple of 256, else Q4_0 as
  llama-quantize falls back for both: a bigger type (4.5 bits per weight against 2.625 and 3.4375).
* Every unit is quantized to that type with GPTQ (or RTN) onto llama.cpp's own grid
  (:mod:`moepress.quantize.ggml_blocks`), so the checkpoint already holds the GGUF's bytes.
* Refused, in one line naming the unit or layer: pruning, dynamic act-order, dynamic expert
  skipping, dropped MoE sublayers, a plan with moepress's own grids or per-expert mixed types in
  one projection, and expert drops or top-k reductions that leave layers unequal.
"""

from __future__ import annotations

from ..errors import MoepressError
from ..model.view import EXPERT_LINEARS, MoEView

TARGETS = ("llamacpp",)
# --bits N under --target llamacpp: llama.cpp's N-bit type for rows of 256 inputs, and where they are not
TYPES_BY_BITS = {2: ("q2_K", "q4_0"), 3: ("q3_K", "q4_0"), 4: ("q4_K", "q4_1"), 5: ("q5_K", "q5_1"),
                 6: ("q6_K", "q8_0"), 8: ("q8_0", "q8_0")}


def check_target_name(target: str | None) -> None:
    if target is not None and target not in TARGETS:
        raise MoepressError(f"unknown target {target!r}; choose {', '.join(TARGETS)} (or none: moepress's own runtime)")


def block_type(bits: int, ggml_type: str | None = None, in_features: int | None = None) -> str:
    """The llama.cpp type ``--bits`` (or ``--ggml-type``) gives a unit of ``in_features`` inputs under
    the target (None: the type of rows that are not a multiple of 256), or one line saying which exist."""
    from ..quantize.ggml_blocks import block_format

    if ggml_type is not None:
        try:
            return block_format(ggml_type).name
        except ValueError as exc:
            raise MoepressError(f"--ggml-type: {exc}") from None
    if bits not in TYPES_BY_BITS:
        raise MoepressError(f"--target llamacpp writes llama.cpp's 2-, 3-, 4-, 5-, 6- and 8-bit types (q2_K, q3_K, "
                            f"q4_K/q4_1, q5_K/q5_1, q6_K, q8_0; q4_0 where a 2/3-bit row is not a multiple of 256) or "
                            f"16 (f16), not {bits}-bit")
    k_quant, legacy = TYPES_BY_BITS[bits]
    return k_quant if in_features is not None and block_format(k_quant).fits(in_features) else legacy


def resolve(view: MoEView, config) -> dict:
    """Every unit's treatment under the target without a plan: ``--bits``' type for its row width
    (one for all experts of a projection: they share it), kept at 16 bits."""
    from ..treatment import KEEP, Treatment

    if config.bits == KEEP.bits and config.ggml_type is None:
        return {name: KEEP for name in view.unit_shapes()}
    settings = {"method": config.method, "act_order": config.act_order, "damp": config.damp}
    return {name: Treatment.block_format(block_type(config.bits, config.ggml_type, in_features), **settings)
            for name, (_, in_features) in view.unit_shapes().items()}


def check_config(config) -> None:
    """The flags of a :class:`~moepress.compress.CompressConfig` the target cannot express."""
    if config.target is None:
        if config.ggml_type is not None:
            raise MoepressError("--ggml-type names a llama.cpp type; it needs --target llamacpp")
        return
    refused = [
        (config.prune is not None, f"--prune {config.prune}: llama.cpp stores no pruned weights"),
        (config.act_order == "dynamic" and config.method == "gptq",
         "--act-order dynamic: llama.cpp's blocks are 32 consecutive inputs; use static or off"),
        (config.dynamic_pruning is not None, "--dynamic-pruning: llama.cpp routes every token to its top-k experts"),
        (bool(config.drop_moe_layers), "--drop-moe-layers: a llama.cpp layer cannot lose its MoE sublayer alone; "
                                       "drop whole blocks (--drop-blocks)"),
    ]
    for bad, why in refused:
        if bad:
            raise MoepressError(f"--target llamacpp: {why}")


def check_units(view: MoEView, treatment_of, trimming=None) -> None:
    """Every unit is kept or in a llama.cpp type, and each projection of a layer's routed experts has
    one treatment for all its experts (those a ``trimming`` keeps; ``treatment_of`` speaks the source
    model's names); one line naming the first unit that breaks a rule."""
    dropped_blocks = set(trimming.dropped_blocks) if trimming is not None else set()
    for layer in range(view.num_layers):
        if layer in dropped_blocks:
            continue
        for unit in view.linear_units(layer):
            _check_unit(unit.name, treatment_of(unit.name))
        store = view.experts(layer)
        if store is None:
            continue
        kept = trimming.kept_experts(layer, store.num_experts) if trimming is not None else range(store.num_experts)
        for linear in EXPERT_LINEARS:
            first = store.unit_name(kept[0], linear)
            for e in kept:
                name = store.unit_name(e, linear)
                _check_unit(name, treatment_of(name))
                if treatment_of(name) != treatment_of(first):
                    raise MoepressError(
                        f"--target llamacpp: {name} is {treatment_of(name).label} but {first} is "
                        f"{treatment_of(first).label}; llama.cpp stores a layer's experts of one projection as one "
                        "tensor of one type")


def _check_unit(name: str, treatment) -> None:
    if treatment.keep or (treatment.kind == "quantize" and treatment.format is not None):
        return
    raise MoepressError(f"--target llamacpp: {name} is {treatment.label}, which llama.cpp cannot store; write one of "
                        "q4_0, q4_1, q5_0, q5_1, q8_0 or 16b")


def check_trimming(view: MoEView, trimming, config=None) -> None:
    """Every MoE layer keeps the same number of experts and the same top-k (GGUF has one of each),
    and no MoE sublayer is dropped alone."""
    if trimming is not None and trimming.dropped_moe_layers:
        layer = trimming.dropped_moe_layers[0]
        raise MoepressError(f"--target llamacpp: the plan drops the MoE sublayer of layers.{layer} alone, which a "
                            "llama.cpp layer cannot express; drop the whole block instead")
    counts, top_ks = {}, {}
    dropped_blocks = set(trimming.dropped_blocks) if trimming is not None else set()
    for layer in range(view.num_layers):
        store = view.experts(layer)
        if store is None or layer in dropped_blocks:
            continue
        dropped = len(trimming.dropped_experts.get(layer, ())) if trimming is not None else 0
        if config is not None and config.drop_experts is not None:
            dropped = config.experts_to_drop(store.num_experts)
        counts[layer] = store.num_experts - dropped
        if trimming is not None and layer in trimming.top_k:
            top_ks[layer] = trimming.top_k[layer]
    for what, per_layer in (("experts", counts), ("top-k", top_ks)):
        if len(set(per_layer.values())) > 1:
            (a, na), (b, nb) = next(iter(per_layer.items())), next((k, v) for k, v in per_layer.items()
                                                                  if v != next(iter(per_layer.values())))
            raise MoepressError(f"--target llamacpp: layers.{a} keeps {na} {what} but layers.{b} {nb}; a GGUF has one "
                                f"{'expert count' if what == 'experts' else 'top-k'} for every layer")
    if top_ks and len(top_ks) != len(counts):
        layer = next(layer for layer in counts if layer not in top_ks)
        raise MoepressError(f"--target llamacpp: the plan reduces the top-k of some MoE layers but not of "
                            f"layers.{layer}; a GGUF has one top-k for every layer")


__all__ = ["TARGETS", "TYPES_BY_BITS", "block_type", "check_config", "check_target_name", "check_trimming",
           "check_units"]

"""What llama.cpp can serve: the rules ``compress --target llamacpp`` obeys, checked before any work.

A GGUF stores each projection of a layer's routed experts as one 3-D tensor with one ggml type
(``blk.N.ffn_gate_exps``), every layer with the same expert count and top-k (one
``expert_count`` and ``expert_used_count`` for the model), every linear either in a block format
or in float. So under the target:

* ``--bits N`` means llama.cpp's N-bit type, per tensor: the k-quant where a row is a multiple
  of 256 inputs (4 -> Q4_K, 5 -> Q5_K, 6 -> Q6_K), else the legacy type (4 -> Q4_1, 5 -> Q5_1,
  6 -> Q8_0, llama-quantize's own fallback); 8 -> Q8_0; 16 keeps every unit (an f16 GGUF).
  Of the legacy types the
  ``_1`` ones are the default because they had the lower layer error on every tensor we measured
  (the zoo's Mixtral: about 17% lower squared error than Q4_0 at 11% more bytes, 5.0 vs 4.5 bits
  per weight). 2 -> Q2_K and 3 -> Q3_K where a row is a multiple of 256, else Q4_0 as
  llama-quantize falls back for both: a bigger type (4.5 bits per weight against 2.625 and 3.4375).
* ``--ggml-type q4_K_M`` (any of llama-quantize's file types: q2_K, q3_K_S/M/L, q4_K_S/M,
  q5_K_S/M, q6_K, q4_0 ... q8_0) gives every tensor the type llama-quantize gives it in that mix
  (:mod:`.llamacpp_presets`, a port of its rules; :func:`gguf_layout` names a model's tensors as
  the converter does), the token embeddings and output head included (:func:`quantize_outer`:
  stored in the checkpoint as block weights, RTN), so a moepress GGUF has llama-quantize's types and
  file size; q3_K, q4_K and q5_K (which llama-quantize reads as the _M mixes) stay one type for
  every unit.
* ``--budget`` plans in llama.cpp's types (:data:`PLAN_OPTIONS`), one per :func:`tied_units` group,
  never one :func:`refusal` names; ``--project`` turns a plan in moepress's grids into the nearest
  one in llama.cpp's types (:mod:`moepress.allocate.project`).
* Every unit is quantized to that type with GPTQ (or RTN) onto llama.cpp's own grid
  (:mod:`moepress.quantize.ggml_blocks`), so the checkpoint already holds the GGUF's bytes.
* Refused, in one line naming the unit or layer: pruning, dynamic act-order, dynamic expert
  skipping, dropped MoE sublayers, a plan with moepress's own grids or per-expert mixed types in
  one projection, and expert drops or top-k reductions that leave layers unequal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MoepressError
from ..model.view import EXPERT_LINEARS, MoEView
from .llamacpp_presets import is_preset

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
        if is_preset(ggml_type):  # a llama-quantize mix: its default type (the fallback where rows are narrow)
            from .llamacpp_presets import FILE_TYPES, fallback, file_type

            default = FILE_TYPES[file_type(ggml_type)]
            return fallback(in_features if in_features is not None else block_format("q4_0").block, default)
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
    (one for all experts of a projection: they share it), kept at 16 bits; with a llama-quantize
    mix (``--ggml-type q4_K_M``) the type llama-quantize gives the unit's tensor
    (:func:`preset_treatments`)."""
    from ..treatment import KEEP, Treatment

    settings = {"method": config.method, "act_order": config.act_order, "damp": config.damp}
    if is_preset(config.ggml_type):
        if config.drop_blocks:
            raise MoepressError(f"--ggml-type {config.ggml_type}: llama-quantize's mixes give layers types by their "
                                "position, which --drop-blocks changes after calibration; use --bits or a plain type")
        drop = config.experts_to_drop
        return preset_treatments(view, config.ggml_type, settings, experts_dropped=drop)
    if config.bits == KEEP.bits and config.ggml_type is None:
        return {name: KEEP for name in view.unit_shapes()}
    treatments = {}
    for name, (out_features, in_features) in view.unit_shapes().items():
        treatments[name] = Treatment.block_format(block_type(config.bits, config.ggml_type, in_features), **settings)
        treatments[name].check_shape(out_features, in_features, name)
    return treatments


# ---------------------------------------------------------------------- the GGUF's tensors of a model

# a unit's linear -> its GGUF tensor (llama.cpp's names do not depend on the architecture)
_ATTENTION_TENSORS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                      "q_a_proj": "attn_q_a", "q_b_proj": "attn_q_b", "kv_a_proj_with_mqa": "attn_kv_a_mqa"}
_FFN = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


@dataclass
class GGUFLayout:
    """The GGUF tensors llama.cpp's converter writes for a model's weights, as llama-quantize's rules
    see them: hyperparameters, every tensor's name and row width, and which tensor holds each unit.

    ``units`` maps a unit to its tensor; DeepSeek's ``kv_b_proj`` is written as two (``attn_v_b``, its
    value rows, and ``attn_k_b``, its key rows transposed), and takes the type of ``attn_v_b``, whose rows
    are its own (the export writes ``attn_k_b`` from its values)."""

    hparams: object  # llamacpp_presets.Hparams
    tensors: list
    units: dict[str, str]


def gguf_layout(view: MoEView, experts_dropped=None) -> GGUFLayout:
    """The :class:`GGUFLayout` of ``view``'s model (``experts_dropped``: a function of a layer's expert
    count giving how many an expert drop removes, for the GGUF's expert count)."""
    from .llamacpp_presets import Hparams, TensorInfo

    model, config = view.model, view.model.config
    hidden = model.get_input_embeddings().weight.shape[1]
    tensors = [TensorInfo("token_embd.weight", hidden)]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        tensors.append(TensorInfo("output.weight", hidden))
    units, n_expert = {}, 0
    for layer in range(view.num_layers):
        blk = f"blk.{layer}."
        for unit in view.attention_units(layer):
            linear = unit.name.rsplit(".", 1)[1]
            if linear == "kv_b_proj":  # [n_head, rank, nope] and [n_head, v, rank]: 3-D, as the converter splits it
                tensors.append(TensorInfo(blk + "attn_k_b.weight", config.qk_nope_head_dim, 3))
                tensors.append(TensorInfo(blk + "attn_v_b.weight", unit.in_features, 3))
                units[unit.name] = blk + "attn_v_b.weight"
                continue
            units[unit.name] = blk + _ATTENTION_TENSORS[linear] + ".weight"
            tensors.append(TensorInfo(units[unit.name], unit.in_features))
        store = view.experts(layer)
        if store is not None:
            kept = store.num_experts - (experts_dropped(store.num_experts) if experts_dropped else 0)
            n_expert = n_expert or kept
            for linear in EXPERT_LINEARS:
                name = blk + _FFN[linear] + "_exps.weight"
                tensors.append(TensorInfo(name, store.shape(linear)[1], 3))
                units.update({store.unit_name(e, linear): name for e in range(store.num_experts)})
        for unit in view.mlp_units(layer):
            linear = unit.name.rsplit(".", 1)[1]
            name = blk + _FFN[linear] + ("_shexp" if unit.kind == "shared" else "") + ".weight"
            tensors.append(TensorInfo(name, unit.in_features))
            units[unit.name] = name
    from .gguf import ARCHITECTURES

    arch = ARCHITECTURES[view.model_type].gguf_arch.lower() if view.model_type in ARCHITECTURES else view.model_type
    n_head = config.num_attention_heads
    n_head_kv = getattr(config, "num_key_value_heads", None) or n_head
    hparams = Hparams(arch, view.num_layers, n_head, n_head_kv, n_expert)
    return GGUFLayout(hparams, tensors, units)


def preset_types(view: MoEView, ggml_type: str, experts_dropped=None) -> dict[str, str]:
    """GGUF tensor name -> the type llama-quantize gives it for the mix ``ggml_type`` (``q4_K_M``)."""
    from .llamacpp_presets import tensor_types

    layout = gguf_layout(view, experts_dropped)
    return tensor_types(layout.hparams, layout.tensors, ggml_type)


def preset_treatments(view: MoEView, ggml_type: str, settings: dict, experts_dropped=None) -> dict:
    """Every unit's treatment under the mix ``ggml_type``: its GGUF tensor's type (kept where
    llama-quantize falls back to F16), with the quantizer ``settings`` (method, act_order, damp)."""
    from ..treatment import KEEP, Treatment

    layout = gguf_layout(view, experts_dropped)
    from .llamacpp_presets import tensor_types

    types = tensor_types(layout.hparams, layout.tensors, ggml_type)
    return {unit: KEEP if types[tensor] == "f16" else Treatment.block_format(types[tensor], **settings)
            for unit, tensor in layout.units.items()}


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


def check_exportable(view: MoEView) -> None:
    """The model is one the GGUF export can write (an architecture llama.cpp runs as transformers
    does): asked from its config before any work, so a model llama.cpp would run differently does not
    cost a compression first. Skipped without the gguf package (the export itself then says so)."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        return
    from .gguf import architecture

    config = getattr(view.model, "config", None)
    if config is not None:
        try:
            architecture(config.to_dict())
        except MoepressError as exc:
            raise MoepressError(f"--target llamacpp: {exc}") from None


def check_units(view: MoEView, treatment_of, trimming=None) -> None:
    """Every unit is kept or in a llama.cpp type, and each projection of a layer's routed experts has
    one treatment for all its experts (those a ``trimming`` keeps; ``treatment_of`` speaks the source
    model's names); one line naming the first unit that breaks a rule. First, the model must be one
    the export can write (:func:`check_exportable`)."""
    check_exportable(view)
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
                        "q2_K..q6_K, q4_0, q4_1, q5_0, q5_1, q8_0 or 16b")


# ---------------------------------------------------------------------- token embeddings and output head

def outer_types(view: MoEView, config) -> dict[str, str]:
    """The llama.cpp types of the token embeddings and the output head under ``config``: with a
    llama-quantize mix, the types llama-quantize gives ``token_embd`` and ``output`` ({"token_embd":
    "q4_K", "output": "q6_K"}); a head tied to the embeddings reads their table (``"output":
    "token_embd"``; the tied table takes the head's rule, as in llama-quantize). F16 ones are left
    out, and so is everything without a mix (the GGUF then holds them in F16, as before)."""
    if config.target != "llamacpp" or not is_preset(config.ggml_type):
        return {}
    types = preset_types(view, config.ggml_type, config.experts_to_drop)
    out = {k: types[f"{k}.weight"] for k in ("token_embd", "output") if types.get(f"{k}.weight", "f16") != "f16"}
    if _tied(view.model) and "token_embd" in out:
        out["output"] = "token_embd"
    return out


def _tied(model) -> bool:
    head = model.get_output_embeddings()
    return head is None or head.weight is model.get_input_embeddings().weight


def _outer_paths(model) -> dict[str, str]:
    """token_embd/output -> the module path of the model's input embeddings / output head."""
    modules = {id(m): name for name, m in model.named_modules()}
    return {"token_embd": modules[id(model.get_input_embeddings())], "output": modules[id(model.get_output_embeddings())]}


def quantize_outer(model, config) -> dict:
    """Under a llama-quantize mix, replace the (loaded) token embeddings and output head of ``model``
    by their llama.cpp types (:func:`outer_types`), rounded to nearest onto the block grid (RTN:
    token_embd is read by row, no Hessian applies; the head's inputs, the final hidden states, are
    not kept by the layer-by-layer pass, so it is RTN too), each block's parameters searched for a
    lower squared error (``rtn_quantize_blocks(search=True)``, llama.cpp's formats unchanged), so that the checkpoint holds the GGUF's
    bytes and moepress computes with its values. Returns what ``moepress.json`` records of it
    (``ggml_type`` and ``embeddings``: name -> type), or {} when nothing is quantized."""
    from ..runtime.install import install_outer as install_module
    from ..quantize.ggml_blocks import block_format, rtn_quantize_blocks
    from ..runtime.block_weight import BlockEmbedding, BlockLinear, TiedBlockHead

    if config.target != "llamacpp" or not is_preset(config.ggml_type):
        return {}
    types = outer_types(MoEView(model), config)
    for key, path in _outer_paths(model).items():
        if key not in types:
            continue
        old = model.get_submodule(path)
        if types[key] == "token_embd":  # tied: the head reads the (already replaced) embeddings' table
            install_module(model, path, TiedBlockHead(model.get_input_embeddings()))
            model.config.tie_word_embeddings = False  # (the loader then builds a head of its own: this one)
            continue
        weight = old.weight.detach()
        quantized = rtn_quantize_blocks(weight.float(), block_format(types[key]), name=path, search=True)
        if key == "token_embd":
            new = BlockEmbedding(quantized, weight.dtype)
        else:
            new = BlockLinear(quantized, getattr(old, "bias", None))
        install_module(model, path, new)
    return {"ggml_type": config.ggml_type, **({"embeddings": types} if types else {})}


def install_outer(model, types: dict[str, str]) -> None:
    """Empty block modules for the token embeddings and head a checkpoint stores in llama.cpp types
    (``quantization_config.embeddings``), for loading to fill."""
    from ..runtime.install import install_outer as install_module
    from ..quantize.ggml_blocks import BlockQuantizedWeight, block_format
    from ..runtime.block_weight import BlockEmbedding, BlockLinear, TiedBlockHead

    for key, path in _outer_paths(model).items():
        if key not in types:
            continue
        old = model.get_submodule(path)
        if types[key] == "token_embd":  # a tied head: the embeddings' table (token_embd comes first)
            install_module(model, path, TiedBlockHead(model.get_input_embeddings()))
            continue
        rows, width = old.weight.shape
        fmt = block_format(types[key])
        empty = BlockQuantizedWeight(torch.zeros(rows, fmt.row_bytes(width), dtype=torch.uint8), fmt, width, rows)
        if key == "token_embd":
            new = BlockEmbedding(empty, old.weight.dtype)
        else:
            bias = getattr(old, "bias", None)
            new = BlockLinear(empty, None if bias is None else torch.zeros_like(bias, device="cpu"))
        install_module(model, path, new)


# What `moepress plan --target llamacpp` measures and chooses from by default: every type moepress writes.
PLAN_OPTIONS = "q2_K,q3_K,q4_K,q5_K,q6_K,q4_0,q4_1,q5_0,q5_1,q8_0,16"


def tied_units(view: MoEView) -> list[tuple[str, ...]]:
    """Groups of unit names that must share one treatment: each projection of a layer's routed
    experts (one ``blk.N.ffn_{gate,up,down}_exps`` tensor of one type); every other unit is a GGUF
    tensor of its own."""
    groups = []
    for layer in range(view.num_layers):
        store = view.experts(layer)
        if store is not None:
            groups += [tuple(store.unit_name(e, linear) for e in range(store.num_experts)) for linear in EXPERT_LINEARS]
    return groups


def refusal(name: str, treatment, in_features: int) -> str | None:
    """Why a GGUF cannot hold ``treatment`` for unit ``name`` of ``in_features`` inputs (a sentence
    naming the unit), or None; :func:`tied_units` says which units must agree."""
    if treatment.keep:
        return None
    if treatment.kind != "quantize" or treatment.format is None:
        return (f"{name} is {treatment.label}, which llama.cpp cannot store; write one of its types (q2_K..q6_K, "
                "q4_0, q4_1, q5_0, q5_1, q8_0) or 16b")
    from ..quantize.ggml_blocks import block_format

    fmt = block_format(treatment.format)
    if not fmt.fits(in_features):
        return f"{name} is {treatment.label}, whose blocks of {fmt.block} inputs do not divide its {in_features} inputs"
    return None


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


__all__ = ["PLAN_OPTIONS", "TARGETS", "TYPES_BY_BITS", "GGUFLayout", "block_type", "check_config", "check_target_name",
           "check_trimming", "check_units", "gguf_layout", "install_outer", "outer_types", "preset_treatments",
           "preset_types", "quantize_outer", "refusal", "resolve", "tied_units"]

"""compressed-tensors export: a moepress checkpoint in the ``pack-quantized`` layout vLLM loads.

:func:`export_compressed_tensors` (``moepress export --format compressed-tensors``) rewrites a
checkpoint's packed weights, shard by shard, as compressed-tensors stores them (its own
``pack_to_int32``, ``QuantizationArgs``/``QuantizationScheme``/``QuantizationConfig`` and
``ModelCompressor.update_config`` write the tensors and config.json), with the same codes and
scales moepress's runtime computes with. Per quantized linear ``L``:

    L.weight_packed      int32 [out, in * bits / 32]  codes minus 2**(bits-1), 32 codes in `bits` words
    L.weight_scale       the model's dtype [out, groups]  (per-channel: [out, 1])
    L.weight_zero_point  int32 [ceil(out * bits / 32), groups]  zero points minus 2**(bits-1), packed
                         along the output dimension (asymmetric only)
    L.weight_shape       int64 [2]  (out, in)

moepress's code ``q`` and zero ``z`` (uint8; symmetric: ``z = 2**(bits-1)``) become
compressed-tensors' signed ``q - 2**(bits-1)`` and ``z - 2**(bits-1)``, so ``(q - z) * scale`` is
unchanged and the integers are exact. The one change of value is the scale's dtype:
moepress keeps float16 scales; compressed-tensors stores them in the model's dtype, as
llm-compressor writes them and as vLLM holds them (its scale parameters are the model's dtype):
exact for a float32 or float16 model, rounded to bfloat16 for a bfloat16 one (a relative change
of at most 2**-8 per scale, bf16 keeping 8 significant bits; ``tests/test_compressed_tensors_export.py``
measures it).

Names are the hub's, as transformers' own ``save_pretrained`` writes them (its
``revert_weight_conversion``, asked once with tagged stand-in tensors): routed experts one linear
per expert (``block_sparse_moe.experts.N.w1`` for Mixtral, ``mlp.experts.N.gate_proj`` for
Qwen/DeepSeek/OLMoE), which is also what llm-compressor saves (recorded in
``tests/data/llmcompressor_layout.json``). Every architecture of moepress's registry whose hub
layout has one linear per expert exports (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, PhiMoE: each
tested to load back with moepress's exact logits); Granite-MoE, whose hub checkpoints store a
layer's experts fused, is refused. One scheme for every quantized linear is one config
group targeting ``Linear``, as llm-compressor writes it; several (a plan mixing layers) are one
group per scheme listing its modules (and, for a MoE layer, the ``experts.0.gate_proj/up_proj/
down_proj`` names under which vLLM looks a layer's expert scheme up). Linears left in 16 bits
(lm_head, the routers, kept units) are in ``ignore``.

What compressed-tensors cannot hold is refused in one line before anything is written: pruned or
split units, llama.cpp block formats, a group index (dynamic act-order), groups that do not divide
a row, per-expert mixed schemes inside a layer, trimmed models. What vLLM also needs
(4/8-bit, symmetric experts, fused q/k/v) is ``compress --target vllm``'s business
(:mod:`moepress.export.vllm_target`); an export of another checkpoint may hold schemes vLLM does
not serve (2/3-bit, asymmetric experts), which compressed-tensors itself decompresses.

Known limits of the loaders (transformers 5.24 with compressed-tensors 0.20): transformers
decompresses fused experts with one scheme for the whole model and without zero points, so it
loads symmetric experts of one scheme only (asymmetric experts fail to load; experts whose scheme
differs between layers load wrongly, measured: logits 0.09 off on a tiny Mixtral, so the export
warns); vLLM reads a scheme per MoE layer, symmetric.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass

import torch

from ..errors import MoepressError
from ..model.view import EXPERT_LINEARS, MoEView
from .hub_names import hub_names

FORMAT = "pack-quantized"
INDEX = "model.safetensors.index.json"
# Files of a moepress checkpoint that the export rewrites (or leaves out) rather than copies
NOT_COPIED = ("config.json", INDEX, "moepress.json")
TRIMMING_KEYS = ("experts_kept", "top_k", "dropped_blocks", "dropped_moe_layers", "dynamic_pruning")


def _check_installed() -> None:
    import importlib.util

    if importlib.util.find_spec("compressed_tensors") is None:
        raise MoepressError("the compressed-tensors export needs the compressed-tensors package: "
                            "pip install 'moepress[vllm]'")


@dataclass(frozen=True)
class _Unit:
    """One unit of the checkpoint as the export writes it."""

    name: str  # moepress's canonical name (layers.0.experts.3.up_proj)
    hub: str  # the module's name in the hub layout (model.layers.0.block_sparse_moe.experts.3.w3)
    treatment: object
    out_features: int
    in_features: int


def _skeleton(checkpoint: str):
    """The checkpoint's source model on the meta device (names and shapes, no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(checkpoint)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _units(view: MoEView, params: dict, experts: dict, treatments: dict) -> dict[str, _Unit]:
    """Module path in the checkpoint -> the unit stored there."""
    units = {}
    for layer in range(view.num_layers):
        for unit in view.linear_units(layer):
            hub = params[f"{unit.module_path}.weight"].removesuffix(".weight")
            units[unit.module_path] = _Unit(unit.name, hub, treatments[unit.name], unit.out_features, unit.in_features)
        store = view.experts(layer)
        if store is None:
            continue
        for e in range(store.num_experts):
            for linear in EXPERT_LINEARS:
                path = f"{store.module_path}.{e}.{linear}"
                hub = experts.get((store.module_path, e, linear)) or \
                    params[f"{store.per_expert_linear_path(e, linear)}.weight"].removesuffix(".weight")
                name = store.unit_name(e, linear)
                units[path] = _Unit(name, hub, treatments[name], *store.shape(linear))
    return units


def format_refusal(name: str, treatment, in_features: int) -> str | None:
    """Why compressed-tensors' pack-quantized layout cannot hold ``treatment`` for unit ``name``."""
    t = treatment
    if t.keep:
        return None
    if t.kind != "quantize" or t.pruned:
        return f"{name} is {t.label}; pack-quantized holds whole quantized or 16-bit linears (no pruning or splits)"
    if t.format is not None:
        return f"{name} is {t.label}, a llama.cpp block format; export it as GGUF (--format gguf)"
    if t.stores_group_index:
        return (f"{name} has dynamic act-order: compressed-tensors no longer reads a group index (weight_g_idx); "
                "compress with static act-order")
    if t.group_size is not None and in_features % t.group_size:
        return f"{name}: groups of {t.group_size} do not divide its {in_features} inputs"
    return None


def _check(view: MoEView, units: dict[str, _Unit]) -> None:
    """Everything the export cannot write, refused before anything is."""
    from .vllm_target import WHY_TIED, check_tied

    for unit in units.values():
        why = format_refusal(unit.name, unit.treatment, unit.in_features)
        if why is not None:
            raise MoepressError(f"--format compressed-tensors: {why}")
    treatment_of = {u.name: u.treatment for u in units.values()}.__getitem__
    # transformers and vLLM both read one scheme for all experts of a layer
    check_tied(view, treatment_of, "--format compressed-tensors", kinds=(WHY_TIED["experts"],))


def weight_args(treatment):
    """compressed-tensors' ``QuantizationArgs`` for a quantized treatment."""
    from compressed_tensors.quantization import QuantizationArgs

    grouped = treatment.group_size is not None
    return QuantizationArgs(num_bits=treatment.bits, type="int", symmetric=treatment.symmetric,
                            strategy="group" if grouped else "channel", group_size=treatment.group_size,
                            actorder="weight" if treatment.act_order == "static" else None)


def quantization_config(view: MoEView, model, units: dict[str, _Unit], params: dict):
    """compressed-tensors' ``QuantizationConfig``: a config group per scheme, every other linear ignored."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from torch import nn

    from .vllm_target import scheme_key

    quantized = [u for u in units.values() if not u.treatment.keep]
    if not quantized:
        raise MoepressError("nothing in the checkpoint is quantized; serve the original model instead")
    by_scheme: dict[tuple, list[_Unit]] = {}
    for unit in quantized:
        by_scheme.setdefault(scheme_key(unit.treatment), []).append(unit)
    groups = {}
    for i, members in enumerate(by_scheme.values()):
        if len(by_scheme) == 1:
            targets = ["Linear"]
        else:
            targets = [u.hub for u in members]
            for layer_experts in sorted({u.hub.rsplit(".", 2)[0] for u in members if ".experts." in u.name}):
                # vLLM looks a MoE layer's scheme up under expert 0's gate/up/down names (compressed_tensors_moe.py)
                targets += [f"{layer_experts}.0.{linear}" for linear in EXPERT_LINEARS
                            if f"{layer_experts}.0.{linear}" not in targets]
        groups[f"group_{i}"] = QuantizationScheme(targets=targets, weights=weight_args(members[0].treatment),
                                                  format=FORMAT)
    quantized_hubs = {u.hub for u in quantized}
    ignore = {u.hub for u in units.values() if u.treatment.keep}
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) and f"{path}.weight" in params:
            hub = params[f"{path}.weight"].removesuffix(".weight")
            if hub not in quantized_hubs:
                # transformers applies the config to its own module names: a linear it renames (PhiMoE's
                # router, an nn.Linear subclass at mlp.router) is ignored under both names
                ignore.update({hub, path})
    for layer in range(view.num_layers):  # routers: nn.Linear in vLLM and llm-compressor, not in transformers 5
        if view.is_moe_layer(layer):
            router = f"{view.layer_path(layer)}.{view.spec.moe_block}.{view.spec.router}.weight"
            if router in params:
                ignore.add(params[router].removesuffix(".weight"))
    return QuantizationConfig(config_groups=groups, format=FORMAT, quantization_status="compressed",
                              ignore=sorted(ignore, key=_natural))


def _natural(name: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def pack_unit(tensors: dict[str, torch.Tensor], unit: _Unit, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A unit's moepress tensors (qweight, scales, zeros) as compressed-tensors' (local names)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from ..quantize import QuantizedWeight

    t = unit.treatment
    meta = {"bits": t.bits, "group_size": t.group_size, "in_features": unit.in_features,
            "out_features": unit.out_features, "symmetric": t.symmetric}
    try:
        quantized = QuantizedWeight.from_tensors(tensors, meta, name=unit.name)
    except ValueError as exc:
        raise MoepressError(str(exc)) from None
    offset = 1 << (t.bits - 1)  # compressed-tensors' codes are signed: [-2**(b-1), 2**(b-1))
    codes = (quantized.codes().to(torch.int16) - offset).to(torch.int8)
    out = {"weight_packed": pack_to_int32(codes, t.bits),
           "weight_scale": quantized.scales.to(dtype),
           "weight_shape": torch.tensor([unit.out_features, unit.in_features], dtype=torch.int64)}
    if not t.symmetric:
        zeros = (quantized.zeros.to(torch.int16) - offset).to(torch.int8)
        out["weight_zero_point"] = pack_to_int32(zeros, t.bits, packed_dim=0).contiguous()
    return out


def _convert_shard(tensors: dict[str, torch.Tensor], units: dict[str, _Unit], params: dict,
                   fused_experts: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One checkpoint shard's tensors under the hub's names, quantized units packed."""
    out: dict[str, torch.Tensor] = {}
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if name in fused_experts:  # a layer whose experts were all kept: still the fused 3-D tensors
            store, linears = fused_experts[name]
            for i, linear in enumerate(linears):
                part = tensor.chunk(len(linears), dim=1)[i]
                for e in range(store.num_experts):
                    out[units[f"{store.module_path}.{e}.{linear}"].hub + ".weight"] = part[e].contiguous()
            continue
        module, _, leaf = name.rpartition(".")
        if module in units:
            by_module.setdefault(module, {})[leaf] = tensor
        elif name in params:
            out[params[name]] = tensor
        else:
            raise MoepressError(f"{name}: a tensor the model does not have; the checkpoint is not this model's")
    for module, parts in by_module.items():
        unit = units[module]
        if "bias" in parts:
            out[f"{unit.hub}.bias"] = parts.pop("bias")
        if unit.treatment.keep:
            if "weight" not in parts:
                raise MoepressError(f"{module}: the checkpoint holds {sorted(parts)} where a 16-bit weight belongs; "
                                    "its unit map and tensors do not agree")
            out[f"{unit.hub}.weight"] = parts["weight"]
        else:
            out.update({f"{unit.hub}.{k}": v for k, v in pack_unit(parts, unit, dtype).items()})
    return out


def _shards(checkpoint: str) -> list[str]:
    index = os.path.join(checkpoint, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    return ["model.safetensors"]


def export_compressed_tensors(checkpoint: str, out: str, overwrite: bool = False) -> str:
    """Write the moepress checkpoint folder ``checkpoint`` to the folder ``out`` in compressed-tensors'
    pack-quantized layout (safetensors, config.json with its ``quantization_config``, tokenizer and
    generation config), one shard at a time, through a temporary folder renamed when complete."""
    from safetensors.torch import load_file, save_file

    from ..treatment import KEEP, Treatment
    from .checkpoint import check_output_dir
    from .record import read_record
    from .vllm_target import scheme_key

    _check_installed()
    from compressed_tensors.compressors import ModelCompressor

    record = read_record(checkpoint)
    trimmed = [key for key in TRIMMING_KEYS if record.get(key)]
    if trimmed:
        raise MoepressError(f"the checkpoint is trimmed ({', '.join(trimmed)}); the compressed-tensors export does "
                            "not rewrite a trimmed model's config yet")
    if record.get("activations"):  # (moepress.quantize.activations) rather than serve it as weight-only
        raise MoepressError(f"the checkpoint quantizes activations ({record['activations']}, compress --activations); "
                            "the compressed-tensors export writes weight-only schemes: compress again without it")
    check_output_dir(out, overwrite)
    model = _skeleton(checkpoint)
    view = MoEView(model)
    params, experts = hub_names(model, view)
    # units the map leaves out (--keep-attention) are stored as they were
    treatments = {name: KEEP for name in view.unit_shapes()}
    treatments.update({name: Treatment.from_unit_map(entry, name) for name, entry in record["units"].items()})
    units = _units(view, params, experts, treatments)
    _check(view, units)
    qconfig = quantization_config(view, model, units, params)
    expert_schemes = {scheme_key(u.treatment) for u in units.values() if ".experts." in u.name}
    if len(expert_schemes) > 1:
        warnings.warn("the routed experts of different layers have different schemes: vLLM reads one per layer, "
                      "but transformers 5 decompresses every layer's experts with one scheme, so from_pretrained "
                      "of this export computes with wrong expert weights", stacklevel=2)
    fused = {}
    for layer in range(view.num_layers):
        store = view.experts(layer)
        if store is not None and store.layout == "fused":
            fused[f"{store.module_path}.gate_up_proj"] = (store, ("gate_proj", "up_proj"))
            fused[f"{store.module_path}.down_proj"] = (store, ("down_proj",))
    dtype = model.config.dtype if isinstance(model.config.dtype, torch.dtype) else torch.float32

    out = os.path.abspath(out)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    try:
        shards = _shards(checkpoint)
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = _convert_shard(load_file(os.path.join(checkpoint, shard)), units, params, fused, dtype)
            save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt"})
            weight_map.update({key: name for key in tensors})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
        if len(shards) > 1:
            with open(os.path.join(tmp, INDEX), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f,
                          indent=2)
        with open(os.path.join(checkpoint, "config.json")) as f:
            config = json.load(f)
        config.pop("quantization_config", None)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        ModelCompressor(quantization_config=qconfig).update_config(tmp)
        for file in os.listdir(checkpoint):  # tokenizer and generation config
            path = os.path.join(checkpoint, file)
            if os.path.isfile(path) and file not in NOT_COPIED and not file.endswith(".safetensors"):
                shutil.copy2(path, os.path.join(tmp, file))
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


__all__ = ["export_compressed_tensors", "format_refusal", "hub_names", "pack_unit", "quantization_config",
           "weight_args"]

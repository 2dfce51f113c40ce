"""Rebuild a compressed model's module tree from its unit map, before its weights are loaded."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MoepressError
from ..model.view import EXPERT_LINEARS, MoEView, set_submodule
from .packed_experts import PackedExperts
from .packed_linear import PackedLinear
from .packed_weight import PackedWeight
from .split_weight import SplitLinear, SplitWeight, split_meta

KEEP_BITS = 16  # a unit the plan keeps unquantized


def _kept(meta: dict) -> bool:
    return "pieces" not in meta and meta["bits"] == KEEP_BITS


def _meta(option: dict, out_features: int, in_features: int) -> dict:
    """Packed-module metadata of one unit from its unit-map entry; an entry with ``pieces`` is an
    expert linear split along its intermediate neurons (rows of gate/up: axis 0, columns of down: 1)."""
    if option.get("pieces"):
        axis = option["axis"]
        pieces = []
        for p in option["pieces"]:
            shape = (p["width"], in_features) if axis == 0 else (out_features, p["width"])
            pieces.append(_meta({"symmetric": option["symmetric"], "act_order": False, **p}, *shape))
        return split_meta(pieces, axis)
    return {
        "bits": option["bits"],
        "group_size": option["group_size"],
        "symmetric": option["symmetric"],
        "act_order": option["act_order"],
        "in_features": in_features,
        "out_features": out_features,
    }


def install_packed_skeleton(model: nn.Module, units: dict[str, dict]) -> nn.Module:
    """Replace every unit named in ``units`` with an empty packed module of the right shape.

    ``units`` maps canonical names to options (bits, group_size, symmetric, act_order). Loading the
    checkpoint's state dict then fills the packed buffers. A unit the model does not have is an error
    (the checkpoint does not belong to this architecture/config).
    """
    view = MoEView(model)
    remaining = set(units)
    for layer in range(view.num_layers):
        for unit in view.linear_units(layer):
            if unit.name in units and _kept(units[unit.name]):
                remaining.discard(unit.name)  # kept as the model's own nn.Linear
            elif unit.name in units:
                old = model.get_submodule(unit.module_path)
                meta = _meta(units[unit.name], unit.out_features, unit.in_features)
                bias = getattr(old, "bias", None)
                dtype = bias.dtype if bias is not None and bias.dtype.is_floating_point else torch.float32
                new = PackedLinear.empty(meta, has_bias=bias is not None, dtype=dtype)
                set_submodule(model, unit.module_path, new)
                remaining.discard(unit.name)
        store = view.experts(layer)
        if store is None:
            continue
        names = [store.unit_name(e, lin) for e in range(store.num_experts) for lin in EXPERT_LINEARS]
        present = [n for n in names if n in units]
        if not present:
            continue
        if len(present) != len(names):
            raise MoepressError(f"layers.{layer}: the checkpoint packs only some experts' linears; it is corrupt")
        metas = {
            lin: [_meta(units[store.unit_name(e, lin)], *store.shape(lin)) for e in range(store.num_experts)]
            for lin in EXPERT_LINEARS
        }
        remaining.difference_update(names)
        if all(_kept(m) for lin in EXPERT_LINEARS for m in metas[lin]):
            continue  # the whole layer's experts kept: nothing to replace
        if store.layout == "per_expert":
            for lin in EXPERT_LINEARS:
                for e in range(store.num_experts):
                    meta = metas[lin][e]
                    if "pieces" in meta:
                        kept_dtype = store.weight(lin).dtype
                        empty = SplitWeight.empty(meta, kept_dtype)
                        set_submodule(model, store.per_expert_linear_path(e, lin), SplitLinear(list(empty.pieces), meta["axis"]))
                    elif not _kept(meta):
                        set_submodule(model, store.per_expert_linear_path(e, lin), PackedLinear.empty(meta))
        else:
            kept_dtype = store.weight("down_proj").dtype
            module = PackedExperts.empty(
                store.num_experts, store.hidden_size, store.intermediate_size, store.act_fn, metas, kept_dtype
            )
            set_submodule(model, store.module_path, module)
    if remaining:
        example = sorted(remaining)[0]
        raise MoepressError(
            f"the checkpoint names {len(remaining)} unit(s) this model does not have (e.g. {example}); "
            "it was made for another architecture or config"
        )
    return model


def validate_packed(model: nn.Module) -> None:
    """Check every packed buffer against its metadata after loading (a corrupt file fails here)."""
    for name, module in model.named_modules():
        if isinstance(module, PackedWeight):
            try:
                module.validate(name)
            except ValueError as exc:
                raise MoepressError(str(exc)) from None


# safetensors' dtype names of the packed buffers' integer dtypes (float tensors are cast on load).
_SAFETENSORS_DTYPES = {torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
                       torch.int64: "I64", torch.bool: "BOOL"}
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# What a disagreement of each packed buffer says about the unit map (config.json's quantization_config).
_HINTS = {
    ("zeros", "unexpected"): "zero points are stored but the unit map says the unit is symmetric",
    ("zeros", "missing"): "the unit map says the unit stores zero points (symmetric: false)",
    ("g_idx", "unexpected"): "a group index is stored but the unit map says the unit has no dynamic act-order",
    ("g_idx", "missing"): "the unit map says the unit stores a group index (act_order: true)",
    ("qweight", "shape"): "the unit map's bits for the unit disagree with the stored codes",
    ("scales", "shape"): "the unit map's group size for the unit disagrees with the stored scales",
    ("zeros", "shape"): "the unit map's group size for the unit disagrees with the stored zero points",
}


def _problem(name: str, checkpoint: str, kind: str, detail: str, others: int) -> MoepressError:
    more = f" (and {others} more)" if others else ""
    hint = _HINTS.get((name.rpartition(".")[2], kind))
    if hint is not None:
        return MoepressError(f"moepress checkpoint {checkpoint}: tensor {name}{more} {detail}: {hint}; config.json "
                             "and the weights disagree (edited?): restore config.json or re-create the checkpoint "
                             "with moepress compress")
    return MoepressError(f"moepress checkpoint {checkpoint}: tensor {name}{more} {detail}; the checkpoint is "
                         "incomplete or corrupt: re-create it with moepress compress")


def check_stored_tensors(model: nn.Module, stored: dict[str, tuple[tuple[int, ...], str]], checkpoint: str) -> None:
    """Check a checkpoint's tensors (name -> (shape, safetensors dtype), from the shard headers)
    against the skeleton ``install_packed_skeleton`` built, before anything is loaded.

    Every tensor of the skeleton's state dict must be stored with its shape, and no other tensor:
    a missing one would be randomly initialised, an unexpected one silently ignored (zero points of
    a unit the unit map calls symmetric). Packed buffers must have their exact integer dtype; float
    tensors may be stored in any float dtype (they are cast to the loading dtype). Of tied weights
    (the head tied to the embeddings) one stored copy is enough. One line names the first offender.
    """
    expected = {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    partner = {**tied, **{source: target for target, source in tied.items()}}
    missing = sorted(n for n in expected if n not in stored and partner.get(n) not in stored)
    if missing:
        raise _problem(missing[0], checkpoint, "missing", "is missing from the weights", len(missing) - 1)
    unexpected = sorted(n for n in stored if n not in expected)
    if unexpected:
        raise _problem(unexpected[0], checkpoint, "unexpected", "is stored but this model has no such tensor",
                       len(unexpected) - 1)
    for name in sorted(n for n in stored if n in expected):
        (shape, stored_dtype), (want_shape, want_dtype) = stored[name], expected[name]
        want = _SAFETENSORS_DTYPES.get(want_dtype)
        dtype_ok = stored_dtype == want if want is not None else stored_dtype in _FLOAT_DTYPES
        if shape != want_shape or not dtype_ok:
            kind = "shape" if shape != want_shape else "dtype"
            detail = (f"is stored as {list(shape)} {stored_dtype}, the unit map and config imply "
                      f"{list(want_shape)} {want or 'float'}")
            raise _problem(name, checkpoint, kind, detail, 0)

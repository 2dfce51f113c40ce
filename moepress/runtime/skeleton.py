"""Checks of a compressed model's packed tensors: against the shards before loading, against their
metadata after (the module tree itself is rebuilt by :func:`moepress.runtime.install.install_skeleton`)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MoepressError
from .block_weight import BlockWeight
from .packed_weight import PackedWeight
from .sparse_weight import SparsePackedWeight


def validate_packed(model: nn.Module) -> None:
    """Check every packed buffer against its metadata after loading (a corrupt file fails here)."""
    for name, module in model.named_modules():
        if isinstance(module, (PackedWeight, SparsePackedWeight, BlockWeight)):
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
    ("g_idx", "missing"): "the unit map says the unit stores a group index (act_order: dynamic)",
    ("qweight", "shape"): "the unit map's bits for the unit disagree with the stored codes",
    ("scales", "shape"): "the unit map's group size for the unit disagrees with the stored scales",
    ("zeros", "shape"): "the unit map's bits or group size for the unit, or config.json's format_version (zero "
                        "points packed at the codes' width from format 3 on, one uint8 per group before), disagree "
                        "with the stored zero points",
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
    against the skeleton ``install_skeleton`` built, before anything is loaded.

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


def expect_stored_zeros(model: nn.Module, format_version: int) -> None:
    """Give the skeleton's zero-point buffers the layout a checkpoint of ``format_version`` stores:
    packed at the codes' width (format 3 on), or one uint8 per group (formats 1 and 2; packed after
    loading, by :func:`validate_packed`). Call after ``install_skeleton``, before the shapes are checked."""
    from ..export.format import packs_zeros

    if packs_zeros(format_version):
        return
    for module in model.modules():
        if isinstance(module, (PackedWeight, SparsePackedWeight)):
            module.expect_legacy_zeros()

"""Weight bytes measured from the tensors a model actually holds (never from a bits formula)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..model.view import EXPERT_LINEARS, MoEView
from ..runtime import PackedExperts, PackedWeight, SparsePackedWeight, SplitWeight
from ..runtime.fast import FastExperts, FastLinear
from ..runtime.kernels import Matmul, ReferenceMatmul, SplitMatmul
from ..runtime.block_weight import BlockWeight


@dataclass
class Footprint:
    """Bytes and parameter counts of the compressible linear weights, by kind of unit.

    ``linear_bytes`` counts every attention projection, routed expert, shared expert and dense MLP
    weight as stored (packed codes, scales, zeros, group indices, or the float tensor), biases
    excluded; ``model_bytes`` counts every tensor of the model once (embeddings, norms, router...).
    """

    bytes_by_kind: dict[str, int]
    params_by_kind: dict[str, int]
    model_bytes: int

    @property
    def linear_bytes(self) -> int:
        return sum(self.bytes_by_kind.values())

    @property
    def linear_params(self) -> int:
        return sum(self.params_by_kind.values())

    @property
    def bits_per_param(self) -> float:
        return 8 * self.linear_bytes / max(self.linear_params, 1)

    def bits_by_kind(self) -> dict[str, float]:
        return {k: 8 * self.bytes_by_kind[k] / max(self.params_by_kind[k], 1) for k in self.bytes_by_kind}

    def to_dict(self) -> dict:
        return {
            "linear_bytes": self.linear_bytes,
            "linear_params": self.linear_params,
            "bits_per_param": round(self.bits_per_param, 4),
            "model_bytes": self.model_bytes,
            "bytes_by_kind": self.bytes_by_kind,
            "bits_by_kind": {k: round(v, 4) for k, v in self.bits_by_kind().items()},
        }


def _tensor_bytes(tensor: torch.Tensor, stored_dtype: torch.dtype | None) -> int:
    """Bytes of ``tensor``; a floating tensor counts at ``stored_dtype`` when given (see below)."""
    if stored_dtype is not None and tensor.is_floating_point():
        return tensor.numel() * torch.empty(0, dtype=stored_dtype).element_size()
    return tensor.numel() * tensor.element_size()


def _held(module: nn.Module) -> nn.Module:
    """The weight module behind a fast-runtime wrapper (moepress.runtime.fast): a FastLinear's
    kernel, and the stored weight a reference-path kernel (pruned weights) dequantizes."""
    if isinstance(module, FastLinear):
        module = module.matmul
    return module.source if isinstance(module, ReferenceMatmul) else module


def _weight_bytes(module: nn.Module, stored_dtype: torch.dtype | None) -> int:
    module = _held(module)
    if isinstance(module, Matmul):  # a fast-runtime kernel: the bytes it holds
        return module.nbytes()
    if isinstance(module, SplitWeight):  # neuron-group pieces, each packed or kept
        return sum(_weight_bytes(piece, stored_dtype) for piece in module.pieces)
    if isinstance(module, (PackedWeight, SparsePackedWeight, BlockWeight)):  # the stored format's own dtypes, as held
        return sum(t.numel() * t.element_size() for n, t in module.named_buffers(recurse=False))
    if getattr(module, "weight", None) is None:  # compressed-tensors' linear before its first forward:
        # weight_packed, weight_scale, weight_zero_point, weight_shape as they are held
        return sum(t.numel() * t.element_size() for n, t in [*module.named_parameters(recurse=False),
                                                             *module.named_buffers(recurse=False)]
                   if n.startswith("weight"))
    return _tensor_bytes(module.weight, stored_dtype)


def model_bytes(model: nn.Module, stored_dtype: torch.dtype | None = None) -> int:
    """Bytes of every parameter and buffer, tied tensors counted once."""
    packed = {id(b) for m in model.modules() if isinstance(m, (PackedWeight, SparsePackedWeight, BlockWeight, Matmul))
              for b in m.buffers(recurse=False)}
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += _tensor_bytes(tensor, None if id(tensor) in packed else stored_dtype)
    return total


def _kept_params(module: nn.Module, out_features: int, in_features: int) -> int:
    """Non-zero weights a linear keeps: all of them, or a pruned weight's kept ones."""
    module = _held(module)
    if isinstance(module, (SplitWeight, SplitMatmul)):
        return sum(_kept_params(p, p.out_features, p.in_features) for p in module.pieces)
    kept = getattr(module, "kept_per_row", None) if isinstance(module, SparsePackedWeight) else None
    return out_features * (in_features if kept is None else kept)


def active_params(model: nn.Module) -> dict:
    """Linear parameters one token passes through, as the model computes: attention, shared experts
    and dense MLPs whole, and in each MoE layer top-k / experts of its routed experts' weights (its
    own top-k and expert count, after any top-k reduction or expert drop); a pruned linear counts
    its kept weights; dropped blocks and MoE sublayers count nothing. Embeddings and the head are
    not counted. Returns {"active": ..., "total": ...} (total: every linear's kept weights)."""
    from ..trim.top_k import top_k_of_layer

    view = MoEView(model)
    active = total = 0.0
    for layer in range(view.num_layers):
        for unit in view.linear_units(layer):
            kept = _kept_params(model.get_submodule(unit.module_path), unit.out_features, unit.in_features)
            active += kept
            total += kept
        store = view.experts(layer)
        if store is None:
            continue
        share = top_k_of_layer(model, layer) / store.num_experts
        for e in range(store.num_experts):
            for linear in EXPERT_LINEARS:
                out_features, in_features = store.shape(linear)
                if store.layout == "packed":
                    module = store.module.packed_weight(e, linear)
                elif store.layout == "per_expert":
                    module = model.get_submodule(store.per_expert_linear_path(e, linear))
                else:
                    module = None
                kept = _kept_params(module, out_features, in_features)
                active += kept * share
                total += kept
    return {"active": round(active), "total": round(total)}


def measure_footprint(model: nn.Module, stored_dtype: torch.dtype | None = None) -> Footprint:
    """Measure ``model``'s weight bytes from its tensors.

    ``stored_dtype`` counts float tensors (not packed ones) at that dtype's size: a bf16 checkpoint
    evaluated in float32 on the CPU still weighs what it holds in bf16. None counts them as held.
    """
    view = MoEView(model)
    nbytes: dict[str, int] = {}
    params: dict[str, int] = {}

    def add(kind: str, b: int, p: int) -> None:
        nbytes[kind] = nbytes.get(kind, 0) + b
        params[kind] = params.get(kind, 0) + p

    for layer in range(view.num_layers):
        for unit in view.linear_units(layer):
            module = model.get_submodule(unit.module_path)
            add(unit.kind, _weight_bytes(module, stored_dtype), unit.in_features * unit.out_features)
        store = view.experts(layer)
        if store is None:
            continue
        module = store.module
        for linear in EXPERT_LINEARS:
            out_features, in_features = store.shape(linear)
            p = store.num_experts * out_features * in_features
            if isinstance(module, FastExperts) or type(module).__name__ == "TritonExperts":  # kernels' layouts, as held
                # (TritonExperts by name: importing moepress.runtime.triton_moe imports triton, which
                # must not happen before a test can set TRITON_INTERPRET)
                b = sum(module.linear_bytes(e, linear) for e in range(store.num_experts))
            elif isinstance(module, PackedExperts):
                b = sum(_weight_bytes(module.packed_weight(e, linear), None) for e in range(store.num_experts))
            elif store.layout == "per_expert":
                b = sum(
                    _weight_bytes(model.get_submodule(store.per_expert_linear_path(e, linear)), stored_dtype)
                    for e in range(store.num_experts)
                )
            else:
                b = _tensor_bytes(store.weight(linear), stored_dtype)
            add("experts", b, p)
    return Footprint(nbytes, params, model_bytes(model, stored_dtype))

"""Weight bytes measured from the tensors a model actually holds (never from a bits formula)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..model.view import EXPERT_LINEARS, MoEView
from ..runtime import PackedExperts, PackedWeight


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


def _weight_bytes(module: nn.Module) -> int:
    if isinstance(module, PackedWeight):
        return sum(t.numel() * t.element_size() for n, t in module.named_buffers(recurse=False))
    weight = module.weight
    return weight.numel() * weight.element_size()


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, tied tensors counted once."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def measure_footprint(model: nn.Module) -> Footprint:
    view = MoEView(model)
    nbytes: dict[str, int] = {}
    params: dict[str, int] = {}

    def add(kind: str, b: int, p: int) -> None:
        nbytes[kind] = nbytes.get(kind, 0) + b
        params[kind] = params.get(kind, 0) + p

    for layer in range(view.num_layers):
        for unit in view.linear_units(layer):
            module = model.get_submodule(unit.module_path)
            add(unit.kind, _weight_bytes(module), unit.in_features * unit.out_features)
        store = view.experts(layer)
        if store is None:
            continue
        module = store.module
        for linear in EXPERT_LINEARS:
            out_features, in_features = store.shape(linear)
            p = store.num_experts * out_features * in_features
            if isinstance(module, PackedExperts):
                b = sum(_weight_bytes(module.packed_weight(e, linear)) for e in range(store.num_experts))
            elif store.layout == "per_expert":
                b = sum(_weight_bytes(model.get_submodule(store.per_expert_linear_path(e, linear))) for e in range(store.num_experts))
            else:
                w = store.weight(linear)
                b = w.numel() * w.element_size()
            add("experts", b, p)
    return Footprint(nbytes, params, model_bytes(model))

"""The one module swap: put packed weights into a model, for compression and loading alike.

Compression installs the weights it has just quantized; loading installs empty weights of the
shapes the checkpoint's unit map implies (:func:`install_skeleton`), which the state dict then
fills. Both go through :func:`install_linear` and :func:`install_experts`, so a checkpoint always
loads into exactly the module tree it was saved from.

A weight is a :class:`~moepress.quantize.QuantizedWeight` (or the :class:`PackedWeight` holding
one), a :class:`~moepress.prune.sparse.SparseWeight` (pruned, maybe quantized), a
:class:`SplitWeight` (neuron groups with their own options), or a plain tensor: a unit the plan
keeps in 16 bits.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import MoepressError
from ..model.view import EXPERT_LINEARS, ExpertStore, MoEView, set_submodule
from ..quantize import QuantizedWeight
from ..quantize.ggml_blocks import BlockQuantizedWeight
from ..treatment import Treatment
from .block_weight import BlockExperts, BlockLinear, BlockWeight, holds_blocks
from .kept_weight import KeptWeight
from .packed_experts import PackedExperts
from .packed_linear import PackedLinear
from .packed_weight import PackedWeight
from .sparse_weight import SparseLinear, SparsePackedWeight
from .split_weight import SplitLinear, SplitWeight



def _quantized(weight) -> QuantizedWeight:
    return weight.quantized() if isinstance(weight, PackedWeight) else weight


def install_linear(model: nn.Module, path: str, weight, bias: torch.Tensor | None = None) -> None:
    """Replace the ``nn.Linear`` at ``path`` by its packed form (a kept tensor leaves it as it is)."""
    from ..prune.sparse import SparseWeight

    if isinstance(weight, torch.Tensor):
        return
    if isinstance(weight, SplitWeight):
        set_submodule(model, path, SplitLinear(list(weight.pieces), weight.axis))
    elif isinstance(weight, (BlockQuantizedWeight, BlockWeight)):  # a llama.cpp block format
        set_submodule(model, path, BlockLinear(weight, bias))
    elif isinstance(weight, (SparseWeight, SparsePackedWeight)):
        sparse = weight.sparse() if isinstance(weight, SparsePackedWeight) else weight
        set_submodule(model, path, SparseLinear(sparse, bias))
    else:
        set_submodule(model, path, PackedLinear(_quantized(weight), bias))


def install_experts(store: ExpertStore, packed: dict[str, list]) -> None:
    """Replace one MoE layer's routed experts with ``packed[linear][expert]``.

    Fused experts become one :class:`PackedExperts` with the same forward signature; per-expert
    linears each become a :class:`PackedLinear`. When every weight is a kept tensor the layer stays
    as it is."""
    if all(isinstance(w, torch.Tensor) for linear in EXPERT_LINEARS for w in packed[linear]):
        return
    if store.layout == "per_expert":
        for linear, per_expert in packed.items():
            for e, weight in enumerate(per_expert):
                path = store.per_expert_linear_path(e, linear)
                install_linear(store.model, path, weight, getattr(store.model.get_submodule(path), "bias", None))
        return
    experts = BlockExperts if holds_blocks(packed) else PackedExperts  # (llama.cpp's block formats)
    module = experts(num_experts=store.num_experts, hidden_size=store.hidden_size,
                           intermediate_size=store.intermediate_size, act_fn=store.act_fn, packed=packed)
    set_submodule(store.model, store.module_path, module)


def swap_module(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``path`` and return the module that was there: a measurement that changes a
    layer on a copy and puts the original back (:func:`moepress.trim.candidates.trimmed`)."""
    previous = model.get_submodule(path)
    set_submodule(model, path, module)
    return previous


def install_stand_in(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` (a weightless stand-in for a dropped MoE block or decoder layer, see
    :mod:`moepress.trim.layer_drop`) at ``path``: the same routine for compression and loading."""
    set_submodule(model, path, module)


def install_outer(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` (the token embeddings or output head in a llama.cpp block format, see
    :func:`moepress.export.llamacpp_target.quantize_outer`) at ``path``: compression and loading alike."""
    set_submodule(model, path, module)


# ------------------------------------------------------------------ loading


def empty_weight(treatment: Treatment, out_features: int, in_features: int, kept_dtype: torch.dtype):
    """A zero-filled weight of the shapes ``treatment`` of an [out, in] weight implies, to load a
    checkpoint into: a tensor (kept), a :class:`PackedWeight` or a :class:`SplitWeight`."""
    if treatment.kind == "split":
        return SplitWeight.empty(treatment, out_features, in_features, kept_dtype)
    if treatment.format is not None:
        return BlockWeight.empty(treatment, out_features, in_features)
    if treatment.pruned:
        return SparsePackedWeight.empty(treatment, out_features, in_features, kept_dtype)
    if treatment.keep:
        return torch.zeros(out_features, in_features, dtype=kept_dtype)
    return PackedWeight.empty(treatment, out_features, in_features)


def install_skeleton(model: nn.Module, units: dict[str, Treatment], activations: str | None = None) -> nn.Module:
    """Replace every unit named in ``units`` with an empty packed module of the right shape.

    ``units`` maps canonical names to treatments (the checkpoint's unit map, read with
    :meth:`Treatment.from_unit_map`). Loading the
    checkpoint's state dict then fills the packed buffers. A unit the model does not have is an error
    (the checkpoint does not belong to this architecture/config). ``activations`` (the checkpoint's
    ``compress --activations`` scheme) quantizes the inputs of every quantized unit, as compression did.
    """
    view = MoEView(model)
    remaining = set(units)
    for layer in range(view.num_layers):
        for unit in view.linear_units(layer):
            if unit.name not in units:
                continue
            remaining.discard(unit.name)
            old = model.get_submodule(unit.module_path)
            treatment = units[unit.name]
            if treatment.keep:
                continue  # kept as the model's own nn.Linear
            bias = getattr(old, "bias", None)
            if bias is not None:
                dtype = bias.dtype if bias.dtype.is_floating_point else torch.float32
                bias = torch.zeros(unit.out_features, dtype=dtype)
            weight = empty_weight(treatment, unit.out_features, unit.in_features, torch.float32)
            install_linear(model, unit.module_path, weight, bias)
        store = view.experts(layer)
        if store is None:
            continue
        names = [store.unit_name(e, lin) for e in range(store.num_experts) for lin in EXPERT_LINEARS]
        present = [n for n in names if n in units]
        if not present:
            continue
        if len(present) != len(names):
            raise MoepressError(f"layers.{layer}: the checkpoint packs only some experts' linears; it is corrupt")
        remaining.difference_update(names)
        kept_dtype = store.weight("down_proj").dtype
        packed = {lin: [empty_weight(units[store.unit_name(e, lin)], *store.shape(lin), kept_dtype)
                        for e in range(store.num_experts)] for lin in EXPERT_LINEARS}
        install_experts(store, packed)
    if remaining:
        example = sorted(remaining)[0]
        raise MoepressError(
            f"the checkpoint names {len(remaining)} unit(s) this model does not have (e.g. {example}); "
            "it was made for another architecture or config"
        )
    if activations is not None:
        apply_activations(model, activations, quantized_units(units))
    return model


def apply_activations(model: nn.Module, scheme: str | None, select: Callable[[str], bool],
                      layers: range | None = None) -> int:
    """Quantize the inputs of every unit of ``model`` whose canonical name ``select`` accepts
    (``layers.3.attn.q_proj``, ``layers.3.experts.5.down_proj``, ...); returns how many units.

    Routed experts in a :class:`~moepress.runtime.packed_experts.PackedExperts` are told which of
    their linears take quantized inputs; a float model's fused experts module (transformers' own)
    is first replaced by a ``PackedExperts`` holding the same float weights (:class:`KeptWeight`:
    the same numbers), since its down projection's input is only reachable inside it. ``layers``
    limits the walk (compression applies each layer as it is done). ``scheme`` None does nothing.
    """
    from ..quantize.activations import check_scheme, quantize_linear_inputs

    if scheme is None:
        return 0
    check_scheme(scheme)
    view = MoEView(model)
    count = 0
    for layer in layers if layers is not None else range(view.num_layers):
        for unit in view.linear_units(layer):
            if select(unit.name):
                quantize_linear_inputs(model.get_submodule(unit.module_path), scheme)
                count += 1
        store = view.experts(layer)
        if store is None:
            continue
        chosen = {(e, lin) for e in range(store.num_experts) for lin in EXPERT_LINEARS
                  if select(store.unit_name(e, lin))}
        if not chosen:
            continue
        if store.layout == "per_expert":
            for e, lin in chosen:
                quantize_linear_inputs(model.get_submodule(store.per_expert_linear_path(e, lin)), scheme)
        else:
            module = store.module if store.layout == "packed" else _as_packed_experts(store)
            if not hasattr(module, "set_activations"):
                raise MoepressError(f"layers.{layer}: the experts module {type(module).__name__} cannot quantize its "
                                    f"inputs (--activations {scheme}); load the checkpoint with runtime='reference'")
            module.set_activations(scheme, chosen)
        count += len(chosen)
    return count


def _as_packed_experts(store) -> nn.Module:
    """A float (fused) experts module replaced by a :class:`PackedExperts` of the same float
    weights, which can quantize its linears' inputs; returns the new module."""
    packed = {lin: list(store.weight(lin).detach().unbind(0)) for lin in EXPERT_LINEARS}
    module = PackedExperts(store.num_experts, store.hidden_size, store.intermediate_size, store.act_fn, packed)
    swap_module(store.model, store.module_path, module)
    return module


def quantized_units(units: dict) -> Callable[[str], bool]:
    """``select`` for :func:`apply_activations` from a unit map (name -> Treatment): the units
    that are quantized (kept units stay in float, with float inputs)."""
    return lambda name: name in units and not units[name].keep


__all__ = ["KeptWeight", "apply_activations", "empty_weight", "install_experts", "install_linear", "install_skeleton",
           "install_stand_in", "quantized_units"]

"""Dynamic per-token int8 activations: the "A8" of W8A8 and W4A8 (``compress --activations int8``).

Li et al. ("Examining Post-Training Quantization for Mixture-of-Experts", arXiv 2406.08155) ask
which parts of an MoE tolerate quantized activations as well as quantized weights. moepress answers
with fake quantization: each token's input row ``x`` to a quantized linear is replaced by

    q(x) = clamp(round(x / s), -127, 127) * s,    s = max_j |x_j| / 127   (one scale per token)

before the matmul, computed in float32. That is exactly what an int8 kernel with dynamic
per-token symmetric scales computes (compressed-tensors' ``input_activations``: int, 8 bits,
strategy token, symmetric, dynamic), so the quality measured on the CPU is the quality such a
kernel gives; no int8 matmul is run here. Rounding moves each element by at most ``s / 2``.

Where: the inputs of every unit the checkpoint quantizes (attention projections, shared experts,
dense MLPs, and every routed expert's gate, up and down: down's input is ``act(gate) * up``,
inside the experts module). The router, norms, embeddings, head, and units kept in 16 bits see
float activations.

Linears (``nn.Linear`` and every packed stand-in) get a forward pre-hook; a routed experts module
(:class:`~moepress.runtime.packed_experts.PackedExperts` and the fast runtime's ``FastExperts``)
quantizes its own inputs, since down's input never leaves it. Nothing is stored in the state dict:
the checkpoint records the scheme (``activations`` in ``moepress.json`` and config.json), and
loading applies it again (:func:`apply_activations`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import MoepressError

ACTIVATION_SCHEMES = ("int8",)
INT8_MAX = 127
MIN_SCALE = 1e-12  # a token of zeros gets this scale: its codes are 0 and it is reproduced exactly


def check_scheme(scheme, what: str = "--activations") -> None:
    """None or a scheme moepress applies; anything else is a one-line error."""
    if scheme is not None and scheme not in ACTIVATION_SCHEMES:
        raise MoepressError(f"{what} must be one of {', '.join(ACTIVATION_SCHEMES)} (got {scheme!r}); "
                            "leave it out for 16-bit activations")


def token_scales(x: torch.Tensor) -> torch.Tensor:
    """Each token's (row's) int8 scale ``max|x| / 127`` in float32, shaped ``[..., 1]``."""
    return (x.detach().float().abs().amax(dim=-1, keepdim=True) / INT8_MAX).clamp_min(MIN_SCALE)


def fake_quantize(x: torch.Tensor, scheme: str | None = "int8") -> torch.Tensor:
    """``x`` with every row (token) rounded onto its own symmetric int8 grid, in ``x``'s dtype;
    ``scheme`` None returns ``x`` itself."""
    if scheme is None or x.numel() == 0:
        return x
    scale = token_scales(x)
    codes = torch.round(x.float() / scale).clamp_(-INT8_MAX, INT8_MAX)
    return (codes * scale).to(x.dtype)


# ------------------------------------------------------------------ linears: a forward pre-hook

_MARK = "_moepress_input_quantization"  # (scheme, hook handle) on a linear whose inputs are quantized


def quantize_linear_inputs(module: nn.Module, scheme: str) -> None:
    """Quantize the input of ``module`` (a linear) with ``scheme`` on every call; idempotent."""
    check_scheme(scheme)
    current = getattr(module, _MARK, None)
    if current is not None:
        if current[0] == scheme:
            return
        current[1].remove()

    def hook(_module, args):
        return (fake_quantize(args[0], scheme), *args[1:])

    setattr(module, _MARK, (scheme, module.register_forward_pre_hook(hook)))


def input_scheme(module: nn.Module) -> str | None:
    """The activation scheme ``module``'s inputs are quantized with (a linear's hook, or an experts
    module's own setting), or None."""
    mark = getattr(module, _MARK, None)
    if mark is not None:
        return mark[0]
    return getattr(module, "activations", None)


def carry_input_quantization(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` (a module replacing ``old``, e.g. the fast runtime's kernel module) the input
    quantization ``old`` had."""
    mark = getattr(old, _MARK, None)
    if mark is not None:
        quantize_linear_inputs(new, mark[0])


# ------------------------------------------------------------------ a model's units


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
    from ..model.view import EXPERT_LINEARS, MoEView

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
    from ..model.view import EXPERT_LINEARS
    from ..runtime.install import swap_module
    from ..runtime.packed_experts import PackedExperts

    packed = {lin: list(store.weight(lin).detach().unbind(0)) for lin in EXPERT_LINEARS}
    module = PackedExperts(store.num_experts, store.hidden_size, store.intermediate_size, store.act_fn, packed)
    swap_module(store.model, store.module_path, module)  # (every module swap goes through runtime/install.py)
    return module


def quantized_units(units: dict) -> Callable[[str], bool]:
    """``select`` for :func:`apply_activations` from a unit map (name -> Treatment): the units
    that are quantized (kept units stay in float, with float inputs)."""
    return lambda name: name in units and not units[name].keep


__all__ = ["ACTIVATION_SCHEMES", "apply_activations", "carry_input_quantization", "check_scheme", "fake_quantize",
           "input_scheme", "quantize_linear_inputs", "quantized_units", "token_scales"]

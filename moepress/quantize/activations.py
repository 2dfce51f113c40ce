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
loading applies it again (:func:`~moepress.runtime.install.apply_activations`).
"""

from __future__ import annotations

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


__all__ = ["ACTIVATION_SCHEMES", "carry_input_quantization", "check_scheme", "fake_quantize", "input_scheme",
           "quantize_linear_inputs", "token_scales"]

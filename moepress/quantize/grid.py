"""The uniform quantization grid shared by RTN and GPTQ.

One place for "given some weights, which (scale, zero) do we use" and "snap
weights to that grid", so that RTN and GPTQ produce codes that mean the same
thing and GPTQ's error feedback sees exactly the values that will be stored.

Grid (as in IST-DASLab/gptq `quant.Quantizer`, weight=True):
    q   = clamp(round(w / scale) + zero, 0, maxq)          codes
    w^  = scale * (q - zero)                               dequantized
Asymmetric: [xmin, xmax] = [min(w, 0), max(w, 0)], scale = (xmax - xmin)/maxq,
zero = round(-xmin/scale). Symmetric: scale = 2*absmax/maxq and the implicit
zero (maxq+1)/2. A group that is entirely zero uses [-1, 1] so scale > 0.

Scales are stored as float16, so they are rounded to float16 *here*, upwards
(never shrinking the range the grid must cover), and every code is computed
against the stored scale: the dequantized checkpoint is bit-for-bit what GPTQ
optimised, and |w - w^| <= scale/2 holds for the stored scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP16_MAX = 65504.0
FP16_MIN_SUBNORMAL = 2.0**-24


def round_scale_up_fp16(scale: torch.Tensor) -> torch.Tensor:
    """Smallest float16 value >= scale (clamped to the float16 range), returned as float32."""
    s = scale.clamp(FP16_MIN_SUBNORMAL, FP16_MAX)
    s16 = s.to(torch.float16)
    up = torch.nextafter(s16, torch.full_like(s16, float("inf")))
    s16 = torch.where(s16.float() < s, up, s16)
    return s16.float()


def symmetric_zero(bits: int) -> float:
    """Implicit zero point of the symmetric grid, (maxq+1)/2 (as in fasterquant)."""
    return float(2 ** (bits - 1))


def find_params(x: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of x [..., k], reducing over the last dim.

    Returns float32 tensors of shape [...]; scale is float16-representable,
    zero is an integer in [0, maxq].
    """
    maxq = 2**bits - 1
    x = x.float()
    # The grid always contains 0 exactly (xmin <= 0 <= xmax): zero-valued
    # weights, pruned weights and dead columns stay exactly zero.
    xmin = x.amin(dim=-1).clamp(max=0)
    xmax = x.amax(dim=-1).clamp(min=0)
    if symmetric:
        # fasterquant keeps xmin = 0 for all-nonnegative rows, which halves
        # the usable range on a symmetric grid; use the absmax both ways.
        amax = torch.maximum(-xmin, xmax)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        scale = round_scale_up_fp16(2 * amax / maxq)
        zero = torch.full_like(scale, symmetric_zero(bits))
    else:
        both0 = (xmin == 0) & (xmax == 0)
        xmin = torch.where(both0, -torch.ones_like(xmin), xmin)
        xmax = torch.where(both0, torch.ones_like(xmax), xmax)
        scale = round_scale_up_fp16((xmax - xmin) / maxq)
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes clamp(round(x/scale) + zero, 0, maxq) as float32 (scale/zero broadcast against x)."""
    maxq = 2**bits - 1
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """w^ = scale * (q - zero)."""
    return scale * (q - zero)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Snap x to the grid and return the dequantized values (float32)."""
    return dequantize_codes(quantize_codes(x, scale, zero, bits), scale, zero)


@dataclass(frozen=True)
class UniformGrid:
    """This module's grid as one value: the three formulas GPTQ's column loop asks of a grid
    (:class:`moepress.quantize.ggml_blocks.BlockFormat` is another)."""

    bits: int
    symmetric: bool

    def find_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return find_params(x, self.bits, self.symmetric)

    sub = None  # one (scale, zero) for all the grid's columns

    def effective(self, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return scale.unsqueeze(-1), zero.unsqueeze(-1)

    def quantize(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return quantize_codes(x, scale, zero, self.bits)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return dequantize_codes(q, scale, zero)

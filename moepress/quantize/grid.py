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

A clipping search (``clip_search``) may shrink that range instead: for each (row, group) it tries
the shrink factors ``CLIP_SHRINKS`` of [xmin, xmax] (1 first, so min/max is always a candidate)
and keeps the best. Outliers are then clamped, the rest rounded finer (GPTQModel's
``Quantizer.find_params(mse=True)``, AutoAWQ's clip search). :func:`search_params` scores a grid by
its rounding error sum_j h_j (w_j - w^_j)^2 (h_j = 1 for RTN, or the Hessian's diagonal); GPTQ
scores it by the loss its column loop will incur instead (``gptq._search_grid``).

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


# Shrink factors of the min/max range the clipping search tries: 1.0, 0.975, ..., 0.5 (21 grids).
CLIP_SHRINKS = tuple(1.0 - i / 40 for i in range(21))


def weighted_rounding_error(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                            importance: torch.Tensor | None = None) -> torch.Tensor:
    """sum_j h_j (x_j - w^_j)^2 over the last dim of x [..., k] on the grid (scale, zero) [...];
    ``importance`` h broadcasts against x (None: 1 for every column)."""
    err = (x - fake_quantize(x, scale.unsqueeze(-1), zero.unsqueeze(-1), bits)).square()
    return (err if importance is None else err * importance).sum(-1)


def search_params(x: torch.Tensor, bits: int, symmetric: bool, importance: torch.Tensor | None = None,
                  shrinks: tuple[float, ...] = CLIP_SHRINKS) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of x [..., k] as :func:`find_params`, but with the range shrunk by the
    factor of ``shrinks`` that minimises :func:`weighted_rounding_error` (the clipping search).

    The first factor should be 1: then no row's error is above min/max's (a tie keeps the earlier
    factor). A shrunk grid still contains 0 exactly (find_params of the shrunk weights)."""
    x = x.float()
    best_scale = best_zero = best_err = None
    for shrink in shrinks:  # one [..., k] candidate at a time: memory stays that of x
        scale, zero = find_params(x * shrink, bits, symmetric)
        err = weighted_rounding_error(x, scale, zero, bits, importance)
        if best_err is None:
            best_scale, best_zero, best_err = scale, zero, err
            continue
        better = err < best_err
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        best_err = torch.where(better, err, best_err)
    return best_scale, best_zero


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
    # GPTQ searches each group's range (gptq._search_grid, scored by its own loss) instead of min/max
    clip_search: bool = False

    def find_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Min/max (scale, zero) of each row of x [..., k] (the candidates of a clipping search too)."""
        return find_params(x, self.bits, self.symmetric)

    sub = None  # one (scale, zero) for all the grid's columns

    def effective(self, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return scale.unsqueeze(-1), zero.unsqueeze(-1)

    def quantize(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return quantize_codes(x, scale, zero, self.bits)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return dequantize_codes(q, scale, zero)

"""Round-to-nearest quantization: the calibration-free baseline GPTQ must beat.

Each (row, group) gets its own min/max (asymmetric) or absmax (symmetric)
grid from `grid.find_params` (or `grid.search_params` with ``clip_search``), and every weight is independently rounded to it.
No Hessian, no error feedback: cheap, and the reference point for
`hessian_weighted_error` comparisons.
"""

from __future__ import annotations

import torch

from .grid import find_params, quantize_codes, search_params
from .packed import QuantizedWeight
from .spec import QuantSpec


def rtn_quantize(weight: torch.Tensor, spec: QuantSpec, name: str = "weight") -> QuantizedWeight:
    """Quantize weight [*lead, out, in] by round to nearest, batched over all lead dims."""
    if weight.ndim < 2:
        raise ValueError(f"{name} must have shape [*lead, out, in] (got {tuple(weight.shape)})")
    *lead, out_f, in_f = weight.shape
    spec.check_in_features(in_f, name)
    w = weight.float()
    if not torch.isfinite(w).all():
        raise ValueError(f"{name} contains inf or nan; cannot quantize it")
    gs = in_f if spec.group_size is None else spec.group_size
    # [*lead, out, G, gs]: one grid per (row, group)
    wg = w.reshape(*lead, out_f, in_f // gs, gs)
    # [*lead, out, G]; with clip_search the range minimising the plain squared error (no Hessian here)
    scale, zero = (search_params if spec.clip_search else find_params)(wg, spec.bits, spec.symmetric)
    codes = quantize_codes(wg, scale.unsqueeze(-1), zero.unsqueeze(-1), spec.bits)
    codes = codes.reshape(*lead, out_f, in_f)
    return QuantizedWeight.from_codes(
        codes,
        scale,
        None if spec.symmetric else zero,
        bits=spec.bits,
        group_size=spec.group_size,
    )

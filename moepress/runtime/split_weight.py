"""An expert linear stored as pieces along the intermediate (neuron) dimension, each with its own
option: channel-level mixed precision (the fine-grained MoE quantization paper, 001).

An expert computes ``down @ (act(gate @ x) * (up @ x))``; neuron ``n`` owns row ``n`` of gate and
up and column ``n`` of down. Splitting the neurons into groups and giving each group its own bit
width is therefore exact to store as row blocks of gate/up (``axis=0``) and column blocks of down
(``axis=1``), each block an ordinary packed (or kept) weight. Half the groups at 2 bits and half at
3 is how a single expert gets 2.5 bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quantize import QuantizedWeight
from ..treatment import Treatment
from .kept_weight import KeptWeight
from .packed_weight import PackedWeight


def _piece_module(piece):
    if isinstance(piece, (PackedWeight, KeptWeight)):
        return piece
    if isinstance(piece, QuantizedWeight):
        return PackedWeight(piece)
    return KeptWeight(piece)


class SplitWeight(nn.Module):
    """Pieces of one [out, in] weight, concatenated along ``axis`` when dequantized.

    State-dict keys: ``pieces.{k}.qweight`` (or ``pieces.{k}.weight`` for a kept piece). It answers
    ``dequantize``/``nbytes`` and the shape attributes like :class:`PackedWeight`, so expert loops
    do not care.
    """

    def __init__(self, pieces: list, axis: int):
        super().__init__()
        if axis not in (0, 1):
            raise ValueError(f"axis must be 0 (rows) or 1 (columns), got {axis}")
        self.pieces = nn.ModuleList(_piece_module(p) for p in pieces)
        self.axis = axis
        other = "in_features" if axis == 0 else "out_features"
        along = "out_features" if axis == 0 else "in_features"
        shared = {getattr(p, other) for p in self.pieces}
        if len(shared) != 1:
            raise ValueError(f"pieces split along axis {axis} must share {other}; got {sorted(shared)}")
        setattr(self, other, shared.pop())
        setattr(self, along, sum(getattr(p, along) for p in self.pieces))
        # the widest piece, for displays (16 when a piece is kept, as the unit map writes it)
        self.bits = max(p.bits for p in self.pieces)

    @classmethod
    def empty(cls, treatment: Treatment, out_features: int, in_features: int,
              kept_dtype: torch.dtype = torch.bfloat16) -> "SplitWeight":
        """Zero-filled pieces of the shapes a split ``treatment`` of an [out, in] weight implies."""
        pieces = [KeptWeight.empty(*shape, kept_dtype) if piece.keep else PackedWeight.empty(piece, *shape)
                  for piece, shape in zip(treatment.pieces, treatment.piece_shapes(out_features, in_features))]
        return cls(pieces, treatment.axis)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.cat([p.dequantize(dtype) for p in self.pieces], dim=self.axis)

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.pieces)

    def extra_repr(self) -> str:
        bits = "/".join(str(p.bits) for p in self.pieces)
        return f"{self.out_features}x{self.in_features}, {len(self.pieces)} pieces along axis {self.axis}, bits={bits}"


class SplitLinear(SplitWeight):
    """A bias-free ``nn.Linear`` stand-in whose weight is a :class:`SplitWeight` (per-expert layouts)."""

    replaces_linear = True

    def __init__(self, pieces: list, axis: int):
        super().__init__(pieces, axis)
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype))

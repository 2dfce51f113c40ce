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
from ..quantize.spec import KEEP_BITS
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
    ``dequantize``/``meta``/``nbytes`` like :class:`PackedWeight`, so expert loops do not care.
    """

    def __init__(self, pieces: list, axis: int):
        super().__init__()
        if axis not in (0, 1):
            raise ValueError(f"axis must be 0 (rows) or 1 (columns), got {axis}")
        self.pieces = nn.ModuleList(_piece_module(p) for p in pieces)
        self.axis = axis
        metas = [p.meta for p in self.pieces]
        other = "in_features" if axis == 0 else "out_features"
        along = "out_features" if axis == 0 else "in_features"
        if len({m[other] for m in metas}) != 1:
            raise ValueError(f"pieces split along axis {axis} must share {other}; got {[m[other] for m in metas]}")
        self.meta = {
            "bits": max(m["bits"] for m in metas),  # the widest piece, for displays; pieces carry the truth
            "pieces": metas,
            "axis": axis,
            other: metas[0][other],
            along: sum(m[along] for m in metas),
        }

    @classmethod
    def empty(cls, meta: dict, kept_dtype: torch.dtype = torch.bfloat16) -> "SplitWeight":
        """Zero-filled pieces of the shapes ``meta`` (as :func:`split_meta` writes it) implies."""
        pieces = [KeptWeight.empty(m["out_features"], m["in_features"], kept_dtype) if m["bits"] == KEEP_BITS
                  else PackedWeight.empty(m) for m in meta["pieces"]]
        return cls(pieces, meta["axis"])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.cat([p.dequantize(dtype) for p in self.pieces], dim=self.axis)

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.pieces)

    def extra_repr(self) -> str:
        bits = "/".join(str(m["bits"]) for m in self.meta["pieces"])
        return f"{self.meta['out_features']}x{self.meta['in_features']}, {len(self.pieces)} pieces along axis " \
               f"{self.axis}, bits={bits}"


class SplitLinear(SplitWeight):
    """A bias-free ``nn.Linear`` stand-in whose weight is a :class:`SplitWeight` (per-expert layouts)."""

    replaces_linear = True

    def __init__(self, pieces: list, axis: int):
        super().__init__(pieces, axis)
        self.in_features = self.meta["in_features"]
        self.out_features = self.meta["out_features"]
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype))


def split_meta(pieces: list[dict], axis: int) -> dict:
    """The metadata of a split weight from its pieces' metadata (for building empty skeletons)."""
    other = "in_features" if axis == 0 else "out_features"
    along = "out_features" if axis == 0 else "in_features"
    return {"bits": max(m["bits"] for m in pieces), "pieces": pieces, "axis": axis,
            other: pieces[0][other], along: sum(m[along] for m in pieces)}

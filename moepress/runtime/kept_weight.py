"""A linear a plan keeps in 16 bits, held where packed weights are (inside packed experts, as a piece)."""

from __future__ import annotations

import torch
from torch import nn

from ..quantize.spec import KEEP_BITS


class KeptWeight(nn.Module):
    """An expert linear a plan keeps in 16 bits, inside an otherwise packed experts module.

    It answers the same ``dequantize``/``nbytes`` calls and shape attributes as :class:`PackedWeight`, so the
    expert loop does not care; its state-dict key is ``experts.{e}.{linear}.weight``.
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bits, self.group_size = KEEP_BITS, None
        self.out_features, self.in_features = weight.shape

    @classmethod
    def empty(cls, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16) -> "KeptWeight":
        return cls(torch.zeros(out_features, in_features, dtype=dtype))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype)

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def extra_repr(self) -> str:
        return f"{self.out_features}x{self.in_features}, kept in {self.weight.dtype}"

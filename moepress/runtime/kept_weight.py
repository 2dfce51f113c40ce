"""A linear a plan keeps in 16 bits, held where packed weights are (inside packed experts, as a piece)."""

from __future__ import annotations

import torch
from torch import nn


class KeptWeight(nn.Module):
    """An expert linear a plan keeps in 16 bits, inside an otherwise packed experts module.

    It answers the same ``dequantize``/``meta``/``nbytes`` calls as :class:`PackedWeight`, so the
    expert loop does not care; its state-dict key is ``experts.{e}.{linear}.weight``.
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.meta = {"bits": 16, "group_size": None, "out_features": weight.shape[0], "in_features": weight.shape[1]}

    @classmethod
    def empty(cls, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16) -> "KeptWeight":
        return cls(torch.zeros(out_features, in_features, dtype=dtype))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype)

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def extra_repr(self) -> str:
        return f"{self.meta['out_features']}x{self.meta['in_features']}, kept in {self.weight.dtype}"

"""``nn.Linear`` computed from packed low-bit weights (torch path; GPU kernels come later)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quantize import QuantizedWeight
from .packed_weight import PackedWeight


class PackedLinear(PackedWeight):

    """A drop-in for ``nn.Linear`` whose weight is stored packed (a 3-bit weight takes 3 bits).

    Its state dict holds ``qweight``, ``scales``, ``zeros``/``g_idx`` where present, and ``bias``.
    The forward dequantizes the weight to the activation dtype and calls ``F.linear``: correct and
    memory-honest on the CPU, where the packed bytes are what stays resident between calls.
    """

    replaces_linear = True  # a unit moepress.model.view treats as a linear, without importing this module

    def __init__(self, quantized: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__(quantized)
        self.in_features = quantized.in_features
        self.out_features = quantized.out_features
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantize(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bias={self.bias is not None}"

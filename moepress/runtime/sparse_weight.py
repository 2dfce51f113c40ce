"""Pruned weights in the model: a :class:`~moepress.prune.sparse.SparseWeight` held as buffers.

A pruned unit stores a 1-bit keep-mask per weight and only the kept values of each row (in the
model's dtype, or quantized codes with their group scales), so its bytes on disk and in memory are
the compressed ones. The forward scatters the kept values back into a dense matrix and calls
``F.linear``: correct on every device; no speed-up from sparsity is claimed on the CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..prune.sparse import SparseWeight
from ..quantize.packing import packed_width, unpack_matrix
from ..quantize.spec import KEEP_BITS
from ..treatment import Treatment

TENSOR_NAMES = ("mask", "values", "qvalues", "scales", "zeros")


class SparsePackedWeight(nn.Module):
    """The stored tensors of a :class:`SparseWeight` as buffers (``zeros`` packed at the codes'
    width, as :class:`~moepress.runtime.packed_weight.PackedWeight` holds them); answers
    ``dequantize``/``nbytes`` and the shape attributes like it, so expert loops and the footprint
    do not care."""

    def __init__(self, sparse: SparseWeight):
        super().__init__()
        self.bits = KEEP_BITS if sparse.values is not None else sparse.bits
        self.quant_bits = sparse.bits
        self.group_size = sparse.group_size
        self.in_features, self.out_features = sparse.in_features, sparse.out_features
        # From the unit map when built as a skeleton: a loaded mask is checked against it.
        self.kept_per_row = sparse.kept_per_row
        self.n_groups = None if sparse.scales is None else int(sparse.scales.shape[-1])
        self.legacy_zeros = False  # True while the buffer waits for format 1/2's zeros (expect_legacy_zeros)
        stored = sparse.tensors()
        for name in TENSOR_NAMES:
            self.register_buffer(name, stored.get(name))

    @classmethod
    def empty(cls, treatment: Treatment, out_features: int, in_features: int,
              kept_dtype: torch.dtype = torch.bfloat16) -> "SparsePackedWeight":
        """Zero-filled buffers of the shapes a pruned ``treatment`` of an [out, in] weight implies."""
        kept = treatment.kept_per_row(in_features)
        mask = torch.zeros(out_features, packed_width(in_features, 1), dtype=torch.uint8)
        if treatment.kind == "prune":
            return cls(SparseWeight(mask=mask, values=torch.zeros(out_features, kept, dtype=kept_dtype), qvalues=None,
                                    scales=None, zeros=None, bits=None, group_size=None,
                                    in_features=in_features, out_features=out_features, kept_per_row=kept))
        groups = 1 if treatment.group_size is None else -(-in_features // treatment.group_size)
        return cls(SparseWeight(
            mask=mask, values=None,
            qvalues=torch.zeros(out_features, packed_width(kept, treatment.bits), dtype=torch.uint8),
            scales=torch.zeros(out_features, groups, dtype=torch.float16),
            zeros=None if treatment.symmetric else torch.zeros(out_features, groups, dtype=torch.uint8),
            bits=treatment.bits, group_size=treatment.group_size, in_features=in_features, out_features=out_features,
            kept_per_row=kept))

    def _apply(self, fn, recurse=True):
        """Device moves apply to the buffers, dtype casts do not (as for packed weights): the kept
        values stay in the dtype they were saved in and are cast when dequantized."""
        kept = {n: self._buffers.pop(n) for n in TENSOR_NAMES if self._buffers.get(n) is not None}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in kept.items():
                device = fn(torch.empty(0, dtype=buf.dtype, device=buf.device)).device
                self._buffers[name] = buf.to(device)
        return self

    def sparse(self) -> SparseWeight:
        """The buffers as a :class:`SparseWeight` (zero points unpacked; no validation)."""
        zeros = self.zeros
        if zeros is not None and not self.legacy_zeros:
            zeros = unpack_matrix(zeros, self.quant_bits, self.out_features, self.n_groups)
        return SparseWeight(mask=self.mask, values=self.values, qvalues=self.qvalues, scales=self.scales,
                            zeros=zeros, bits=self.quant_bits, group_size=self.group_size,
                            in_features=self.in_features, out_features=self.out_features,
                            kept_per_row=self.kept_per_row)

    def expect_legacy_zeros(self) -> None:
        """Before loading a checkpoint of format 1 or 2: the ``zeros`` buffer takes their layout,
        one uint8 per group [out, groups]; :meth:`validate` packs what was loaded."""
        if self.zeros is not None:
            self.zeros = torch.zeros(self.out_features, self.n_groups, dtype=torch.uint8, device=self.zeros.device)
            self.legacy_zeros = True

    def validate(self, name: str) -> None:
        """Check the loaded buffers (mask counts included); one-line ValueError naming ``name``.
        Zero points loaded in format 1/2's layout are packed here."""
        tensors = {t: getattr(self, t) for t in TENSOR_NAMES if getattr(self, t) is not None}
        checked = SparseWeight.from_tensors(tensors, self.sparse().meta(), name=name)
        if self.legacy_zeros:
            self.zeros = checked.tensors()["zeros"]
            self.legacy_zeros = False

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.sparse().dequantize(dtype)

    def nbytes(self) -> int:
        return sum(buf.numel() * buf.element_size() for buf in self.buffers())

    def extra_repr(self) -> str:
        what = "kept values" if self.values is not None else f"{self.quant_bits}-bit values"
        return f"{self.out_features}x{self.in_features}, {what}, {self.kept_per_row} kept per row"


class SparseLinear(SparsePackedWeight):
    """A drop-in for ``nn.Linear`` whose weight is pruned (and possibly quantized)."""

    replaces_linear = True  # a unit moepress.model.view treats as a linear, without importing this module

    def __init__(self, sparse: SparseWeight, bias: torch.Tensor | None = None):
        super().__init__(sparse)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

"""A module that holds one packed weight as buffers, so it saves and loads with the state dict."""

from __future__ import annotations

import torch
from torch import nn

from ..quantize import QuantizedWeight
from ..quantize.packing import packed_width, unpack_matrix
from ..treatment import Treatment

TENSOR_NAMES = ("qweight", "scales", "zeros", "g_idx")


class PackedWeight(nn.Module):
    """The stored tensors of a :class:`QuantizedWeight` (``qweight``, ``scales``, optional ``zeros``,
    ``g_idx``) as buffers, exactly as :meth:`QuantizedWeight.tensors` gives them.

    Keeping them as buffers (not parameters) means ``state_dict()`` carries the packed bytes as they
    are, ``.to(device)`` moves them, and nothing tries to train or cast the integer codes. The
    ``zeros`` buffer is the packed form (``bits`` bits per group), in memory as on disk;
    :meth:`zero_points` and :meth:`quantized` unpack it per call (out*n_groups codes, 1/group_size
    of the codes a dequantization unpacks anyway).
    """

    def __init__(self, quantized: QuantizedWeight):
        super().__init__()
        self.bits, self.group_size = quantized.bits, quantized.group_size
        self.in_features, self.out_features = quantized.in_features, quantized.out_features
        self.n_groups = quantized.n_groups
        self.legacy_zeros = False  # True while the buffer waits for format 1/2's zeros (expect_legacy_zeros)
        stored = quantized.tensors()
        for name in TENSOR_NAMES:
            self.register_buffer(name, stored.get(name))

    @classmethod
    def empty(cls, treatment: Treatment, out_features: int, in_features: int) -> "PackedWeight":
        """Zero-filled buffers of the shapes a quantized ``treatment`` of an [out, in] weight implies,
        for loading a checkpoint into."""
        bits, group_size = treatment.bits, treatment.group_size
        n_groups = 1 if group_size is None else -(-in_features // group_size)
        return cls(
            QuantizedWeight(
                qweight=torch.zeros(out_features, packed_width(in_features, bits), dtype=torch.uint8),
                scales=torch.zeros(out_features, n_groups, dtype=torch.float16),
                zeros=None if treatment.symmetric else torch.zeros(out_features, n_groups, dtype=torch.uint8),
                g_idx=torch.zeros(in_features, dtype=torch.int16) if treatment.stores_group_index else None,
                bits=bits,
                group_size=group_size,
                in_features=in_features,
                out_features=out_features,
            )
        )

    def _apply(self, fn, recurse=True):
        """Device moves apply to the packed buffers, dtype casts do not.

        ``model.to(torch.bfloat16)`` or ``model.half()`` must not turn fp16 scales into bf16 (a lossy
        change of format); the codes, scales, zeros and group indices keep their dtypes, and only
        follow ``fn`` to its device. Parameters (a :class:`PackedLinear`'s bias) cast as usual.
        """
        packed = {n: self._buffers.pop(n) for n in TENSOR_NAMES if self._buffers.get(n) is not None}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in packed.items():
                device = fn(torch.empty(0, dtype=buf.dtype, device=buf.device)).device
                self._buffers[name] = buf.to(device)
        return self

    def zero_points(self) -> torch.Tensor | None:
        """The zero points unpacked, uint8 [out, n_groups] (None when symmetric)."""
        if self.zeros is None or self.legacy_zeros:
            return self.zeros
        return unpack_matrix(self.zeros, self.bits, self.out_features, self.n_groups)

    def quantized(self) -> QuantizedWeight:
        """The buffers as a :class:`QuantizedWeight` (no validation: this runs on every forward)."""
        return QuantizedWeight(self.qweight, self.scales, self.zero_points(), self.g_idx,
                               self.bits, self.group_size, self.in_features, self.out_features)

    def expect_legacy_zeros(self) -> None:
        """Before loading a checkpoint of format 1 or 2: the ``zeros`` buffer takes their layout,
        one uint8 per group [out, n_groups]; :meth:`validate` packs what was loaded."""
        if self.zeros is not None:
            self.zeros = torch.zeros(self.out_features, self.n_groups, dtype=torch.uint8, device=self.zeros.device)
            self.legacy_zeros = True

    def validate(self, name: str) -> None:
        """Check the loaded buffers against the metadata; one-line ValueError naming ``name`` if not.
        Zero points loaded in format 1/2's layout are packed here (a held weight is always packed)."""
        tensors = {t: getattr(self, t) for t in TENSOR_NAMES if getattr(self, t) is not None}
        checked = QuantizedWeight.from_tensors(tensors, self.quantized().meta(), name=name)
        if self.legacy_zeros:
            self.zeros = checked.stored_zeros()
            self.legacy_zeros = False

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized().dequantize(dtype)

    def nbytes(self) -> int:
        return sum(buf.numel() * buf.element_size() for buf in self.buffers())

    def extra_repr(self) -> str:
        group = self.group_size or "channel"
        return f"{self.out_features}x{self.in_features}, bits={self.bits}, group={group}"

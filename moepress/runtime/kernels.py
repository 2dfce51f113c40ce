"""The matmuls the fast CPU runtime computes with, each built ONCE from a stored weight.

Every kernel is a module with ``forward(x) -> x @ W.T`` for ``x`` [..., in] and the weight held in
the form its computation wants:

- :class:`Int4Matmul`: torch's CPU int4 kernel (``aten._weight_int4pack_mm_for_cpu``, the one
  gpt-fast and torchao use) for bf16/fp16 activations and codes of up to 4 bits in groups of 32,
  64, 128 or 256 columns (a per-channel weight becomes groups of one repeated scale; act-order
  columns are permuted so their groups are contiguous, and the input is permuted alike). 4-bit
  codes are held in the kernel's layout; 2- and 3-bit codes at their width, as nibble planes the
  layout is rebuilt from per call (``int4-planes``), or widened to 4 bits. The kernel takes its
  scales and float zero points as one tensor of the activation dtype, so they round to bf16.
- :class:`Int8Matmul`: ``aten._weight_int8pack_mm`` for 8-bit per-channel codes (int8 codes and
  one scale per row; an asymmetric zero point becomes a rank-1 correction from the input's sum).
- :class:`DequantMatmul`: everything else quantized, and every weight of a float32 model (where
  the int4/int8 kernels are slow): the codes at their width, re-laid out so unpacking is a
  byte-wide shift and mask per bit plane and the group scales broadcast (no per-column expansion);
  it computes exactly the reference runtime's weights.
- :class:`DenseMatmul` (a kept 16-bit weight), :class:`SplitMatmul` (pieces of a split weight,
  each its own kernel) and :class:`ReferenceMatmul` (anything else, e.g. pruned weights: the
  reference runtime's ``dequantize``).

The int4 and int8 ops are feature-detected (they exist on torch >= 2.6 CPU builds, and a build
may lack them or refuse a shape); when one is missing the weight gets the next kernel down.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..quantize.grid import symmetric_zero
from ..quantize.packing import unpack_bits, unpack_matrix

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the CPU int4 kernel accepts
INT4_ROW_MULTIPLE = 16  # its packing wants out_features divisible by this
INT8_COLUMN_MULTIPLE = 32  # see int8_supported
KERNEL_DTYPES = (torch.bfloat16, torch.float16)  # activations the int4/int8 kernels take (float32 is slow there)


def _op(name: str):
    return getattr(torch.ops.aten, name, None)


_INT4_MM = _op("_weight_int4pack_mm_for_cpu")
_INT8_MM = _op("_weight_int8pack_mm")


@functools.lru_cache(maxsize=None)
def int4_supported(dtype: torch.dtype) -> bool:
    """Whether this torch has the CPU int4 kernel and it computes ``dtype`` activations correctly
    (checked once on a tiny weight against the float formula)."""
    pack, mm = _op("_convert_weight_to_int4pack_for_cpu"), _op("_weight_int4pack_mm_for_cpu")
    if pack is None or mm is None:
        return False
    try:
        g = torch.Generator().manual_seed(0)
        codes = torch.randint(0, 16, (16, 64), generator=g, dtype=torch.int32)
        scale = torch.rand(16, 2, generator=g) + 0.5
        zero = torch.randint(0, 16, (16, 2), generator=g).float()
        x = torch.randn(2, 64, generator=g)
        weight = scale.repeat_interleave(32, 1) * (codes.float() - zero.repeat_interleave(32, 1))
        sz = torch.stack([scale, scale * (8 - zero)], -1).transpose(0, 1).contiguous().to(dtype)
        y = mm(x.to(dtype), pack(codes, 1), 32, sz).float()
        expected = x @ weight.T
        return bool((y - expected).abs().max() <= 2e-2 * expected.abs().max())
    except (RuntimeError, NotImplementedError):
        return False


@functools.lru_cache(maxsize=None)
def int8_supported(dtype: torch.dtype) -> bool:
    """Whether this torch has ``_weight_int8pack_mm`` for ``dtype`` activations on the CPU (probed
    at a shape it handles: with fewer than 16 input columns, or a count not a multiple of 16, the
    torch 2.13 bf16 kernel reads past its buffers, so :class:`Int8Matmul` asks for multiples of 32)."""
    mm = _op("_weight_int8pack_mm")
    if mm is None:
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randint(-128, 128, (16, 32), generator=g, dtype=torch.int8)
        x = torch.randn(3, 32, generator=g)
        scale = torch.rand(16, generator=g) + 0.5
        y = mm(x.to(dtype), w, scale.to(dtype)).float()
        expected = (x @ w.float().T) * scale
        return bool((y - expected).abs().max() <= 2e-2 * expected.abs().max())
    except (RuntimeError, NotImplementedError):
        return False


def contiguous_groups(g_idx: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor | None:
    """The column order that makes act-order groups contiguous (a stable sort by group), or None
    when sorting does not give ``group_size`` columns per group (then no kernel can use it)."""
    perm = torch.argsort(g_idx.long(), stable=True)
    want = torch.arange(in_features, device=g_idx.device) // group_size
    return perm if torch.equal(g_idx.long()[perm], want) else None


def _codes_and_params(weight):
    """(codes [out, in] uint8, scales [out, G] fp32, zeros [out, G] fp32, group size, input perm)
    of a PackedWeight, act-order columns permuted so groups are contiguous; None if they cannot be."""
    codes = unpack_bits(weight.qweight, weight.bits, weight.in_features)
    scales = weight.scales.float()
    if weight.zeros is None:
        zeros = torch.full_like(scales, symmetric_zero(weight.bits))
    else:  # (the kernels hold their own per-group copy; the stored zeros are packed)
        zeros = weight.zero_points().float()
    group_size = weight.group_size or weight.in_features
    perm = None
    if weight.g_idx is not None:
        perm = contiguous_groups(weight.g_idx, group_size, weight.in_features)
        if perm is None:
            return None
        codes = codes[:, perm]
        perm = perm.to(torch.int32)  # index_select takes int32: half the bytes of the sort's int64
    return codes, scales, zeros, group_size, perm


class Matmul(nn.Module):
    """A weight held for one computation; ``kind`` names it (counted by :func:`kernel_counts`)."""

    kind = "matmul"

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers()) + sum(
            p.numel() * p.element_size() for p in self.parameters())

    def _apply(self, fn, recurse=True):
        """Kernels hold CPU layouts in their own dtypes: a device move is refused (load the model
        with the reference runtime to move it), a dtype cast leaves them as they are (inputs are
        cast per call)."""
        for buf in list(self.buffers()) + list(self.parameters()):
            if fn(torch.empty(0, dtype=buf.dtype, device=buf.device)).device != buf.device:
                raise RuntimeError("moepress fast-runtime kernels are laid out for the CPU; load the model with "
                                   "runtime='reference' to move it to another device")
        return self


class Int4Matmul(Matmul):
    """Codes of up to 4 bits through ``aten._weight_int4pack_mm_for_cpu``.

    4-bit codes are held in the kernel's own packed layout (``weight``, half a byte per code).
    2- and 3-bit codes stay at their width (kind ``int4-planes``): the kernel layout holds each code
    as a nibble, whose top bit (3-bit codes) or top two bits (2-bit codes) are then zero, so the
    nibbles' low two bits are kept as one plane packing two bytes' worth per byte and (3-bit) their
    third bits as a plane packing four per byte; each call rebuilds the kernel layout from the
    planes with a few byte-wide ops into a transient buffer (freed after the call, never cached).
    ``widen`` holds them in the kernel layout instead (faster, 4 bits per code).

    The kernel's ``(q - 8) * scale + zero`` is accurate for codes centred on 8; 2- and 3-bit codes
    are therefore computed as ``q + 6`` and ``q + 4`` (added in the rebuild) with ``zero = scale *
    (8 - offset - z)``: the same weights, but the bf16 rounding of ``scale`` and ``zero`` then
    multiplies numbers no larger than for 4-bit codes (uncentred, 2-bit outputs were ~8x further
    from the float32 result than the reference's own bf16 rounding).
    """

    kind = "int4"

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 perm: torch.Tensor | None, dtype: torch.dtype, bits: int = 4, widen: bool = False):
        super().__init__()
        out_features, in_features = codes.shape
        kernel_group = group_size
        if kernel_group not in INT4_GROUP_SIZES:  # per-channel: split the row into equal groups
            kernel_group = next(g for g in reversed(INT4_GROUP_SIZES) if in_features % g == 0)
            repeat = group_size // kernel_group
            scales, zeros = scales.repeat_interleave(repeat, 1), zeros.repeat_interleave(repeat, 1)
        self.group_size, self.in_features, self.out_features = kernel_group, in_features, out_features
        self.dtype = dtype
        offset = CODE_OFFSETS[bits]
        self.bits = 4 if widen else bits
        pack = _op("_convert_weight_to_int4pack_for_cpu")
        if self.bits == 4:
            self.register_buffer("weight", pack(codes.to(torch.int32) + offset, 1))
        else:
            packed = pack(codes.to(torch.int32), 1)
            self.kind = "int4-planes"
            self.packed_shape = tuple(packed.shape)
            planes = _split_nibbles(packed, self.bits)
            self.register_buffer("low", planes[0])
            self.register_buffer("high", planes[1] if self.bits == 3 else None)
        # w = (q + offset - 8) * scale + zero with zero = scale * (8 - offset - z): scale * (q - z) in the
        # kernel's own form
        scale_zero = torch.stack([scales, scales * (8 - offset - zeros)], -1).transpose(0, 1).contiguous()
        self.register_buffer("scale_zero", scale_zero.to(dtype))
        self.register_buffer("perm", perm)

    @classmethod
    def eligible(cls, weight, dtype: torch.dtype) -> bool:
        if weight.bits > 4 or weight.out_features % INT4_ROW_MULTIPLE or not int4_supported(dtype):
            return False
        size = weight.group_size
        if size is None:
            return any(weight.in_features % g == 0 for g in INT4_GROUP_SIZES)
        return size in INT4_GROUP_SIZES and weight.in_features % size == 0

    def kernel_weight(self) -> torch.Tensor:
        """The weight in the kernel's layout: held (4-bit), or rebuilt from the planes."""
        if self.bits == 4:
            return self.weight
        return join_nibbles(self.low, self.high, self.bits).view(self.packed_shape)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T (+ bias)``; ``weight``: this kernel's layout already rebuilt (by a group of experts)."""
        weight = self.kernel_weight() if weight is None else weight
        if x.dtype == self.dtype and self.perm is None and bias is None and x.is_contiguous():  # the usual case
            if x.dim() == 2:
                return _INT4_MM(x, weight, self.group_size, self.scale_zero)
            y = _INT4_MM(x.view(-1, self.in_features), weight, self.group_size, self.scale_zero)
            return y.view(*x.shape[:-1], self.out_features)
        lead, dtype = x.shape[:-1], x.dtype
        x = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        y = _INT4_MM(x.to(self.dtype).contiguous(), weight, self.group_size, self.scale_zero)
        y = y.reshape(*lead, self.out_features).to(dtype)
        return y if bias is None else y + bias.to(dtype)


# shifts that take plane k of a byte to bit 0: 2-bit fields (low plane) and 1-bit fields (high plane)
_PLANE_SHIFTS = {2: torch.tensor([0, 2], dtype=torch.uint8).view(2, 1),
                 1: torch.tensor([0, 1, 2, 3], dtype=torch.uint8).view(4, 1)}
_LOW_MASK = torch.tensor(0x33, dtype=torch.uint8)
# Int4Matmul computes b-bit codes as q + CODE_OFFSETS[b] (centred on the kernel's 8); both nibbles of a
# byte at once, without carries (q + offset < 16)
CODE_OFFSETS = {2: 6, 3: 4, 4: 0}
_OFFSET_BYTES = {b: torch.tensor(o * 0x11, dtype=torch.uint8) for b, o in CODE_OFFSETS.items()}
_HIGH_MASK = torch.tensor(0x11, dtype=torch.uint8)


def join_nibbles(low: torch.Tensor, high: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Inverse of :func:`_split_nibbles` along the last dim (leading dims: several experts at once):
    uint8 [..., M/2] (and [..., M/4]) -> the kernel layout's bytes [..., M]. A few byte-wide ops,
    in place on the fresh tensors: their cost is what staying at 2 or 3 bits per code costs."""
    joined = low.unsqueeze(-2) >> _PLANE_SHIFTS[2]
    joined.bitwise_and_(_LOW_MASK)
    joined = joined.flatten(-2)
    if bits == 2:
        return joined.add_(_OFFSET_BYTES[2])
    third = high.unsqueeze(-2) >> _PLANE_SHIFTS[1]
    third.bitwise_and_(_HIGH_MASK)
    return joined.add_(third.flatten(-2), alpha=4).add_(_OFFSET_BYTES[bits])  # disjoint bits: + is |


class NotNibbles(ValueError):
    """The int4 kernel's layout does not hold each code as a nibble (another torch build)."""


def _split_nibbles(packed: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    """The int4 kernel layout of 2- or 3-bit codes as planes of ``bits`` bits per code in all:
    ``low`` (each byte's bits 0,1,4,5: the nibbles' two low bits) two bytes to a byte, the first
    half of the flat layout at bits 0,1,4,5, the second at 2,3,6,7; and for 3 bits ``high`` (the
    nibbles' third bits, moved to bits 0 and 4) four bytes to a byte, quarter k at bits k and 4+k."""
    flat = packed.reshape(-1)
    if bool((flat & (0xCC if bits == 2 else 0x88)).any()):
        raise NotNibbles("codes of fewer than 4 bits set high nibble bits in the int4 layout")
    low = flat & 0x33
    half = low.numel() // 2
    planes = [low[:half] | (low[half:] << 2)]
    if bits == 3:
        quarters = ((flat >> 2) & 0x11).view(4, -1)
        planes.append(quarters[0] | (quarters[1] << 1) | (quarters[2] << 2) | (quarters[3] << 3))
    return tuple(planes)


class Int8Matmul(Matmul):
    """8-bit per-channel codes through ``aten._weight_int8pack_mm``: ``W = s * (q - 128) + s * (128 - z)``."""

    kind = "int8"

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, perm: torch.Tensor | None,
                 dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.dtype = dtype
        self.register_buffer("weight", (codes.to(torch.int16) - 128).to(torch.int8))
        self.register_buffer("scale", scales[:, 0].to(dtype))
        offset = scales[:, 0] * (128 - zeros[:, 0])
        self.register_buffer("offset", offset if bool(offset.any()) else None)  # float32; None when symmetric
        self.register_buffer("perm", perm)

    @classmethod
    def eligible(cls, weight, dtype: torch.dtype) -> bool:
        return (weight.bits == 8 and weight.group_size is None and weight.in_features % INT8_COLUMN_MULTIPLE == 0
                and int8_supported(dtype))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        lead, dtype = x.shape[:-1], x.dtype
        x = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        x = x.to(self.dtype).contiguous()
        y = _INT8_MM(x, self.weight, self.scale)
        if self.offset is not None:
            y = y.float() + x.float().sum(-1, keepdim=True) * self.offset
        y = y.reshape(*lead, self.out_features).to(dtype)
        return y if bias is None else y + bias.to(dtype)


def _relayout(codes: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, ...]:
    """Codes [out, in] as bit planes that unpack with byte-wide shifts: for each plane of ``width``
    bits (4; 2; 2 then 1 for 3-bit codes; 8), a uint8 [out, G, 8 // width, group // (8 // width)]
    -shaped tensor stored as [out, G, group // (8 // width)] whose byte j holds, at bit ``width * k``,
    the plane's bits of column ``k * (group // (8 // width)) + j`` of the group. The bytes are as
    many as the packed codes'."""
    out_features, in_features = codes.shape
    groups = codes.reshape(out_features, in_features // group_size, group_size)
    planes, low = [], 0
    for width in {2: (2,), 3: (2, 1), 4: (4,), 8: (8,)}[bits]:
        per_byte = 8 // width
        part = (groups >> low) & (2**width - 1)
        part = part.reshape(out_features, groups.shape[1], per_byte, group_size // per_byte).to(torch.int32)
        shifts = (torch.arange(per_byte, dtype=torch.int32) * width).view(1, 1, per_byte, 1)
        planes.append((part << shifts).sum(2).to(torch.uint8))
        low += width
    return tuple(planes)


class DequantMatmul(Matmul):
    """Codes at their stored width, dequantized per call as ``(q - zero[g]) * scale[g]`` in float32
    with the group scales broadcast (the reference runtime's arithmetic, fewer and byte-wide ops).
    The scales and zero points are the stored tensors themselves (fp16; uint8 packed at the codes'
    width, unpacked per call: out*G codes beside the out*in the planes give), not copies."""

    kind = "dequant"

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                 group_size: int, perm: torch.Tensor | None):
        """``zeros``: the stored (packed) zero points of a PackedWeight, or None when symmetric."""
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.bits, self.group_size = bits, group_size
        self.widths = {2: (2,), 3: (2, 1), 4: (4,), 8: (8,)}[bits]
        for k, plane in enumerate(_relayout(codes, bits, group_size)):
            self.register_buffer(f"plane{k}", plane)
        self.register_buffer("scale", scales.unsqueeze(-1))  # [out, G, 1]
        self.register_buffer("zero", zeros)  # packed, [ceil(out*G/8)*bits] (QuantizedWeight's stored form)
        self.symmetric_zero = symmetric_zero(bits)
        # act-order: the codes are held with contiguous groups; the weight is put back in column order
        # (not the input permuted) so the products are summed in the reference's order
        self.register_buffer("unperm", None if perm is None else torch.argsort(perm).to(torch.int32))

    @classmethod
    def eligible(cls, weight) -> bool:
        size = weight.group_size or weight.in_features
        return weight.in_features % size == 0 and size % 8 == 0

    def codes(self) -> torch.Tensor:
        """uint8 [out, G, group]."""
        out_features, groups = self.scale.shape[:2]
        codes, low = None, 0
        for k, width in enumerate(self.widths):
            plane = getattr(self, f"plane{k}")
            per_byte = 8 // width
            if per_byte == 1:
                part = plane
            else:
                part = plane.unsqueeze(2) >> _shifts(width, per_byte)
                part.bitwise_and_(_MASKS[width])
                part = part.view(out_features, groups, self.group_size)
            codes = part if codes is None else codes.bitwise_or_(part << low)
            low += width
        return codes

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] in its original column order, the reference's values bit for bit."""
        out_features, groups = self.scale.shape[:2]
        zero = self.symmetric_zero if self.zero is None else \
            unpack_matrix(self.zero, self.bits, out_features, groups).unsqueeze(-1).float()
        weight = ((self.codes().float() - zero) * self.scale.float()).view(self.out_features, self.in_features)
        if self.unperm is not None:
            weight = weight.index_select(1, self.unperm)
        return weight.to(dtype)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))


@functools.lru_cache(maxsize=None)
def _shifts(width: int, per_byte: int) -> torch.Tensor:
    return (torch.arange(per_byte, dtype=torch.uint8) * width).view(1, 1, per_byte, 1)


_MASKS = {w: torch.tensor(2**w - 1, dtype=torch.uint8) for w in (1, 2, 4)}


class DenseMatmul(Matmul):
    """A weight the plan keeps in 16 bits (held as stored, cast per call like the reference)."""

    kind = "dense"

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach())

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


class ReferenceMatmul(Matmul):
    """Any other weight module (pruned weights): the reference runtime's dequantize per call."""

    kind = "reference"

    def __init__(self, module: nn.Module):
        super().__init__()
        self.source = module
        self.out_features, self.in_features = module.out_features, module.in_features

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.source.dequantize(dtype)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, self.source.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))


class SplitMatmul(Matmul):
    """A weight in pieces along its rows (axis 0: outputs concatenated) or its columns (axis 1:
    each piece takes its slice of the input, outputs summed), each piece its own kernel. When no
    piece has a kernel of its own (all dequantized or kept) the pieces' weights are joined and
    multiplied once, as the reference does."""

    kind = "split"

    def __init__(self, pieces: list[Matmul], axis: int):
        super().__init__()
        self.pieces = nn.ModuleList(pieces)
        self.axis = axis
        self.out_features = sum(p.out_features for p in pieces) if axis == 0 else pieces[0].out_features
        self.in_features = pieces[0].in_features if axis == 0 else sum(p.in_features for p in pieces)
        starts = [0]
        for p in pieces:
            starts.append(starts[-1] + p.in_features)
        self.bounds = list(zip(starts[:-1], starts[1:]))
        self.joined = all(hasattr(p, "dequantize") for p in pieces)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.cat([p.dequantize(dtype) for p in self.pieces], dim=self.axis)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.joined:
            return F.linear(x, self.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))
        if self.axis == 0:
            out = torch.cat([p(x) for p in self.pieces], dim=-1)
        else:
            out = None
            for piece, (start, end) in zip(self.pieces, self.bounds):
                y = piece(x[..., start:end])
                out = y if out is None else out + y
        return out if bias is None else out + bias.to(out.dtype)


def build_matmul(weight, dtype: torch.dtype, widen: bool = False, exact: bool = False) -> Matmul:
    """The fastest kernel for ``weight`` (a PackedWeight, KeptWeight, SplitWeight or anything with
    ``dequantize``) with ``dtype`` activations. ``widen`` lets 2- and 3-bit codes be held as 4-bit
    codes for the int4 kernel (more bytes: see :class:`moepress.runtime.fast.FastOptions`);
    ``exact`` keeps to the kernels that compute the reference runtime's results bit for bit."""
    from .kept_weight import KeptWeight
    from .packed_weight import PackedWeight
    from .split_weight import SplitWeight

    if isinstance(weight, SplitWeight):
        return SplitMatmul([build_matmul(p, dtype, widen, exact) for p in weight.pieces], weight.axis)
    if isinstance(weight, KeptWeight):
        return DenseMatmul(weight.weight)
    if not isinstance(weight, PackedWeight):
        return ReferenceMatmul(weight)
    fast_dtype = dtype in KERNEL_DTYPES and not exact
    int4 = fast_dtype and Int4Matmul.eligible(weight, dtype)
    int8 = fast_dtype and Int8Matmul.eligible(weight, dtype)
    parts = _codes_and_params(weight) if int4 or int8 or DequantMatmul.eligible(weight) else None
    if parts is None:  # a shape or act-order grouping no kernel takes
        return ReferenceMatmul(weight)
    codes, scales, zeros, group_size, perm = parts
    if int4:
        try:
            return Int4Matmul(codes, scales, zeros, group_size, perm, dtype, weight.bits, widen)
        except NotNibbles:
            pass
    if int8:
        return Int8Matmul(codes, scales, zeros, perm, dtype)
    if DequantMatmul.eligible(weight):
        return DequantMatmul(codes, weight.scales, weight.zeros, weight.bits, group_size, perm)
    return ReferenceMatmul(weight)


def build_fused(weights: list, dtype: torch.dtype, widen: bool = False, exact: bool = False) -> Matmul | None:
    """One int4 or int8 kernel over the rows of several packed weights that share their input and
    format (an expert's gate and up projections: one call instead of two), or None when they do
    not share it or would not reach those kernels (the dequantize kernel is kept per weight so its
    products stay the reference's)."""
    from ..quantize import QuantizedWeight
    from .packed_weight import PackedWeight

    first = weights[0]
    if not all(isinstance(w, PackedWeight) for w in weights):
        return None
    def same_groups(w) -> bool:
        return w.g_idx is None if first.g_idx is None else w.g_idx is not None and torch.equal(w.g_idx, first.g_idx)

    same = all(w.bits == first.bits and w.group_size == first.group_size and w.in_features == first.in_features
               and (w.zeros is None) == (first.zeros is None) and same_groups(w) for w in weights)
    if not same:
        return None

    def cat(name):
        return None if getattr(first, name) is None else torch.cat([getattr(w, name) for w in weights])

    zeros = None if first.zeros is None else torch.cat([w.zero_points() for w in weights])  # rows, unpacked
    joined = PackedWeight(QuantizedWeight(cat("qweight"), cat("scales"), zeros, first.g_idx, first.bits,
                                          first.group_size, first.in_features, sum(w.out_features for w in weights)))
    if exact:
        return None
    kernel = build_matmul(joined, dtype, widen)
    return kernel if kernel.kind in ("int4", "int4-planes", "int8") else None

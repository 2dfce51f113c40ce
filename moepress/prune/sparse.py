"""`SparseWeight`: the storable form of a pruned (and optionally quantized) weight.

A weight of shape [*lead, out, in] (lead = [] for an nn.Linear, [E] for fused experts) whose every
output row keeps the same number k of weights (`pattern.kept_per_row`) is stored as

    mask     uint8   [*lead, out, ceil(in/8)]       keep-mask, 1 bit per weight (1 = kept), packed
                                                    like `quantize.packing.pack_bits` at 1 bit:
                                                    bit b of byte j is column 8*j + b
and either the kept values in float (prune only)
    values   float   [*lead, out, k]                kept weights in column order, their own dtype
or their quantization codes (joint pruning and quantization)
    qvalues  uint8   [*lead, out, ceil(k/8)*bits]   codes of the kept weights, `pack_bits` layout
    scales   float16 [*lead, out, groups]           groups over the ORIGINAL input columns:
    zeros    uint8   [*lead, ceil(out*groups/8)*bits] | None
                                                    a kept value in column j uses group j // group_size
                                                    (one group per row when per-channel); the zero
                                                    points at `bits` bits, packed as a dense weight's
                                                    (`quantize.packed`; in memory, unpacked
                                                    [*lead, out, groups]); None = symmetric, zero (maxq+1)/2

Because k is the same in every row the kept values form a rectangle: no row offsets are stored,
and the i-th kept value of a row belongs to the i-th set bit of its mask. Groups keep their
original columns (rather than k // group_size kept values each) so that the grid of a weight is
the one SparseGPT chose while it still saw the dense row, and so that a pruned and a dense
checkpoint of the same recipe carry the same scales tensor shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..quantize.grid import find_params, quantize_codes, symmetric_zero
from ..quantize.packed import read_stored_zeros
from ..quantize.packing import pack_bits, pack_matrix, packed_width, unpack_bits
from ..quantize.spec import QuantSpec

MASK_BITS = 1
_TENSOR_NAMES = ("mask", "values", "qvalues", "scales", "zeros")


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean mask [..., n] into uint8 [..., ceil(n/8)], 1 bit per entry.

    The layout is what `pack_bits(codes, 1)` would write (8 codes to a word of `bits` bytes, little
    endian); `pack_bits` only accepts the quantization widths 2, 3, 4, 8, hence this 1-bit form.
    """
    if mask.dtype != torch.bool or mask.ndim == 0:
        raise ValueError(f"a keep-mask must be a boolean tensor with at least one dim (got {mask.dtype}, {mask.ndim}-D)")
    n = mask.shape[-1]
    pad = (-n) % 8
    bits = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).reshape(*mask.shape[:-1], (n + pad) // 8, 8)
    shifts = torch.arange(8, device=mask.device, dtype=torch.uint8)
    return (bits << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_mask`: uint8 [..., ceil(n/8)] -> bool [..., n]."""
    if packed.dtype != torch.uint8 or packed.ndim == 0 or packed.shape[-1] != packed_width(n, MASK_BITS):
        raise ValueError(
            f"a packed mask of {n} columns must be uint8 [..., {packed_width(n, MASK_BITS)}] "
            f"(got {packed.dtype} {tuple(packed.shape)})"
        )
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., :n].bool()


def kept_columns(keep: torch.Tensor, k: int) -> torch.Tensor:
    """Input column of every kept weight of a mask [..., out, in] keeping k per row: int64
    [..., out, k], increasing along a row (the order kept values are stored in)."""
    cols = torch.arange(keep.shape[-1], device=keep.device).expand(keep.shape)
    return cols[keep].reshape(*keep.shape[:-1], k)


def _row_count(mask: torch.Tensor, name: str) -> int:
    """The one kept count shared by every row of a boolean mask [..., out, in] (>= 1)."""
    counts = mask.sum(dim=-1)
    if counts.numel() == 0:
        raise ValueError(f"{name}: the mask is empty (shape {tuple(mask.shape)})")
    k = int(counts.flatten()[0])
    if not (counts == k).all():
        raise ValueError(
            f"{name}: every output row must keep the same number of weights (rows keep "
            f"{int(counts.min())} to {int(counts.max())}); build the mask with a pruning pattern"
        )
    if k == 0:
        raise ValueError(f"{name}: the mask keeps no weight; a sparsity below 1 keeps at least one per row")
    return k


@dataclass
class SparseWeight:
    mask: torch.Tensor
    values: torch.Tensor | None
    qvalues: torch.Tensor | None
    scales: torch.Tensor | None
    zeros: torch.Tensor | None
    bits: int | None
    group_size: int | None
    in_features: int
    out_features: int
    # None: read from the values' width, or from the first row of the mask (qvalues' packed width
    # cannot tell k apart within 8); `from_kept`/`from_tensors` always pass it. A quantized skeleton
    # on the meta device (buffers allocated before a checkpoint is loaded) has no mask to read: it
    # stays None there until rebuilt from the loaded tensors.
    kept_per_row: int | None = None

    def __post_init__(self) -> None:
        if self.kept_per_row is None:
            if self.values is not None:
                self.kept_per_row = int(self.values.shape[-1])
            elif not self.mask.is_meta:
                first_row = self.mask.reshape(-1, self.mask.shape[-1])[:1]
                self.kept_per_row = int(unpack_mask(first_row, self.in_features).sum())

    # ------------------------------------------------------------------ build
    @classmethod
    def from_kept(
        cls,
        keep: torch.Tensor,
        *,
        values: torch.Tensor | None = None,
        codes: torch.Tensor | None = None,
        scales: torch.Tensor | None = None,
        zeros: torch.Tensor | None = None,
        bits: int | None = None,
        group_size: int | None = None,
        name: str = "weight",
    ) -> "SparseWeight":
        """Pack a boolean keep-mask [*lead, out, in] with either the kept `values` [*lead, out, k]
        (float, stored as given) or their integer `codes` [*lead, out, k] plus per-group `scales`,
        `zeros` (None = symmetric) [*lead, out, groups] at `bits`."""
        if (values is None) == (codes is None):
            raise ValueError(f"{name}: give the kept values or their codes, exactly one of them")
        k = _row_count(keep, name)
        out_features, in_features = keep.shape[-2:]
        kept = values if values is not None else codes
        if tuple(kept.shape) != (*keep.shape[:-1], k):
            raise ValueError(f"{name}: kept values have shape {tuple(kept.shape)}, expected {(*keep.shape[:-1], k)}")
        return cls(
            mask=pack_mask(keep),
            values=values,
            qvalues=None if codes is None else pack_bits(codes.to(torch.uint8), bits),
            scales=None if codes is None else scales.to(torch.float16),
            zeros=None if codes is None or zeros is None else zeros.to(torch.uint8),
            bits=None if codes is None else bits,
            group_size=None if codes is None else group_size,
            in_features=int(in_features),
            out_features=int(out_features),
            kept_per_row=k,
        )

    # ------------------------------------------------------------ properties
    @property
    def quantized(self) -> bool:
        return self.qvalues is not None

    @property
    def symmetric(self) -> bool | None:
        """Whether the grid is symmetric; None when the kept values are stored in float."""
        return None if not self.quantized else self.zeros is None

    @property
    def lead_shape(self) -> tuple[int, ...]:
        return tuple(self.mask.shape[:-2])

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the dense weight."""
        return (*self.lead_shape, self.out_features, self.in_features)

    @property
    def sparsity(self) -> float:
        """Fraction of the weights pruned (the same in every row)."""
        return 1 - self.kept_per_row / self.in_features

    # ------------------------------------------------------------ dequantize
    def mask_bool(self) -> torch.Tensor:
        """The keep-mask, bool [*lead, out, in] (True = kept)."""
        return unpack_mask(self.mask, self.in_features)

    def kept_columns(self) -> torch.Tensor:
        """Input column of every kept value, int64 [*lead, out, k], increasing along a row."""
        return kept_columns(self.mask_bool(), self.kept_per_row)

    def codes(self) -> torch.Tensor:
        """Unpacked codes of the kept values, uint8 [*lead, out, k] (quantized weights only)."""
        if not self.quantized:
            raise ValueError("codes() needs a quantized sparse weight; this one stores float values")
        return unpack_bits(self.qvalues, self.bits, self.kept_per_row)

    def kept_values(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The kept weights [*lead, out, k] in column order (dequantized when quantized)."""
        if not self.quantized:
            return self.values.to(dtype)
        group = self.kept_columns() // (self.group_size or self.in_features)
        scale = self.scales.float().gather(-1, group)
        zero = symmetric_zero(self.bits) if self.zeros is None else self.zeros.float().gather(-1, group)
        # the very expression `grid.dequantize_codes` evaluates, so SparseGPT's choices come back bit for bit
        return (scale * (self.codes().float() - zero)).to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense weight [*lead, out, in], exactly 0 where pruned."""
        kept = self.values if not self.quantized else self.kept_values(torch.float32)
        dense = torch.zeros(self.shape, dtype=kept.dtype, device=kept.device)
        # masked_scatter fills the True positions in row-major order: row by row, columns
        # increasing, which is the order the kept values are stored in
        return dense.masked_scatter_(self.mask_bool(), kept).to(dtype)

    def select(self, index) -> "SparseWeight":
        """Index the first lead (expert) dim: an int drops it, a 1-D index tensor/list keeps it."""
        if not self.lead_shape:
            raise ValueError("select() needs a weight with a leading expert dimension; this one is a single matrix")
        if not isinstance(index, int):
            index = torch.as_tensor(index, dtype=torch.long, device=self.mask.device)
            if index.ndim != 1:
                raise ValueError(f"select() takes an int or a 1-D index (got shape {tuple(index.shape)})")
        return self._map(lambda t: t[index])

    def to(self, device) -> "SparseWeight":
        """Move every tensor to `device` (dtypes are part of the format and never change)."""
        return self._map(lambda t: t.to(device))

    def _map(self, fn) -> "SparseWeight":
        def apply(t):
            return None if t is None else fn(t)

        return SparseWeight(
            apply(self.mask), apply(self.values), apply(self.qvalues), apply(self.scales), apply(self.zeros),
            self.bits, self.group_size, self.in_features, self.out_features, self.kept_per_row,
        )

    # ---------------------------------------------------------------- storage
    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to save: "mask" and "values", or "mask", "qvalues", "scales" (and "zeros",
        packed at `bits` bits)."""
        out = {key: getattr(self, key) for key in _TENSOR_NAMES if getattr(self, key) is not None}
        if self.zeros is not None:
            out["zeros"] = pack_matrix(self.zeros, self.bits)
        return out

    def nbytes(self) -> int:
        """Bytes of the stored tensors, zero points packed at `bits` bits (the sizes `tensors()`
        gives, without packing the zeros to find out)."""
        held = [getattr(self, key) for key in _TENSOR_NAMES if key != "zeros" and getattr(self, key) is not None]
        total = sum(t.numel() * t.element_size() for t in held)
        if self.zeros is not None:
            *lead, out_f, n_groups = self.zeros.shape
            total += math.prod(lead) * packed_width(out_f * n_groups, self.bits)
        return total

    def meta(self) -> dict:
        """JSON-able metadata that, with `tensors()`, fully describes the weight."""
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "kept_per_row": self.kept_per_row,
        }

    @classmethod
    def from_tensors(cls, tensors: dict, meta: dict, name: str = "weight") -> "SparseWeight":
        """Rebuild from `tensors()` + `meta()`, validating everything a corrupt file could break.

        Raises ValueError with one line naming `name` and the offending tensor.
        """
        meta = _check_meta(meta, name)
        _check_tensor_set(tensors, meta, name)
        mask = tensors["mask"]
        if mask.ndim < 2:
            _corrupt(name, f"mask must have at least 2 dims (got shape {tuple(mask.shape)})")
        lead = tuple(mask.shape[:-2])
        rows = (*lead, meta["out_features"])
        in_f, k, bits, gs = meta["in_features"], meta["kept_per_row"], meta["bits"], meta["group_size"]
        _check_tensor(name, "mask", mask, torch.uint8, (*rows, packed_width(in_f, MASK_BITS)))
        _check_mask_bits(name, mask, in_f, k)
        if bits is None:
            values = tensors["values"]
            if not values.is_floating_point():
                _corrupt(name, f"values has dtype {values.dtype}, expected a floating point dtype")
            _check_tensor(name, "values", values, values.dtype, (*rows, k))
            if not torch.isfinite(values).all():
                _corrupt(name, "values contain inf or nan")
            return cls(mask, values, None, None, None, None, None, in_f, meta["out_features"], k)
        n_groups = 1 if gs is None else math.ceil(in_f / gs)
        qvalues, scales, zeros = tensors["qvalues"], tensors["scales"], tensors.get("zeros")
        _check_tensor(name, "qvalues", qvalues, torch.uint8, (*rows, packed_width(k, bits)))
        _check_tensor(name, "scales", scales, torch.float16, (*rows, n_groups))
        if not torch.isfinite(scales).all():
            _corrupt(name, "scales contain inf or nan")
        if zeros is not None:  # packed, or formats 1/2's one uint8 per group
            zeros = read_stored_zeros(zeros, lead, meta["out_features"], n_groups, bits, lambda msg: _corrupt(name, msg))
        return cls(mask, None, qvalues, scales, zeros, bits, gs, in_f, meta["out_features"], k)


# ------------------------------------------------------------- validation
def _corrupt(name: str, msg: str):
    raise ValueError(f"corrupt sparse weight {name}: {msg}")


def _check_meta(meta: dict, name: str) -> dict:
    for key in ("bits", "group_size", "symmetric", "in_features", "out_features", "kept_per_row"):
        if key not in meta:
            _corrupt(name, f"metadata is missing {key!r}")
    bits, gs, sym = meta["bits"], meta["group_size"], meta["symmetric"]
    in_f, out_f, k = meta["in_features"], meta["out_features"], meta["kept_per_row"]
    if bits not in (None, 2, 3, 4, 8) or isinstance(bits, bool):
        _corrupt(name, f"bits must be null (float values) or one of 2, 3, 4, 8 (got {bits!r})")
    if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0 or bits is None):
        _corrupt(name, f"group_size must be a positive int with quantized values, or null (got {gs!r})")
    if (bits is None) != (sym is None) or (sym is not None and not isinstance(sym, bool)):
        _corrupt(name, f"symmetric must be true/false with quantized values and null without (got {sym!r})")
    if any(isinstance(x, bool) or not isinstance(x, int) or x <= 0 for x in (in_f, out_f, k)) or k > in_f:
        _corrupt(name, f"in_features, out_features, kept_per_row must be positive ints, kept <= in (got {in_f!r}, {out_f!r}, {k!r})")
    return meta


def _check_tensor_set(tensors: dict, meta: dict, name: str) -> None:
    unknown = sorted(set(tensors) - set(_TENSOR_NAMES))
    if unknown:
        _corrupt(name, f"unexpected tensors {unknown}")
    if meta["bits"] is None:
        need, forbidden = ["mask", "values"], ["qvalues", "scales", "zeros"]
    else:
        need, forbidden = ["mask", "qvalues", "scales"], ["values"]
        (need if not meta["symmetric"] else forbidden).append("zeros")
    for key in need:
        if key not in tensors:
            _corrupt(name, f"missing tensor {key!r} (metadata: bits {meta['bits']}, symmetric {meta['symmetric']})")
    for key in forbidden:
        if key in tensors:
            _corrupt(name, f"tensor {key!r} does not belong here (metadata: bits {meta['bits']}, symmetric {meta['symmetric']})")


def _check_tensor(name: str, key: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple) -> None:
    if t.dtype != dtype:
        _corrupt(name, f"{key} has dtype {t.dtype}, expected {dtype}")
    if tuple(t.shape) != tuple(shape):
        _corrupt(name, f"{key} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def _check_mask_bits(name: str, mask: torch.Tensor, in_features: int, k: int) -> None:
    """Every row sets exactly k bits and no padding bit: otherwise the kept values would be
    scattered into the wrong columns without any error."""
    keep = unpack_mask(mask, in_features)
    if not torch.equal(pack_mask(keep), mask):
        _corrupt(name, f"mask sets padding bits beyond column {in_features}")
    counts = keep.sum(dim=-1)
    if counts.numel() and not (counts == k).all():
        _corrupt(name, f"mask rows keep {int(counts.min())} to {int(counts.max())} weights, metadata says {k} each")


# ---------------------------------------------------------------- sparsify
def sparsify(weight: torch.Tensor, mask: torch.Tensor, spec: QuantSpec | None = None, name: str = "weight") -> SparseWeight:
    """Store the weights `mask` [*lead, out, in] (True = kept) keeps, without updating any.

    Without a spec the kept weights are stored in the weight's own dtype (dequantize() gives back
    weight * mask exactly). With a spec each kept weight is rounded to nearest on its group's grid,
    whose min/max are taken over the group's KEPT weights only: pruned weights must not widen the
    range, they are exactly 0 anyway (the grid always contains 0). This is how a Wanda or magnitude
    mask is combined with quantization; act-order is meaningless here (no column order) and ignored.
    """
    if weight.ndim < 2 or tuple(mask.shape) != tuple(weight.shape) or mask.dtype != torch.bool:
        raise ValueError(
            f"{name}: the mask must be a boolean tensor shaped like the weight {tuple(weight.shape)} "
            f"(got {mask.dtype} {tuple(mask.shape)})"
        )
    if not weight.is_floating_point() or not torch.isfinite(weight).all():
        raise ValueError(f"{name} must be a finite floating point tensor to be sparsified")
    k = _row_count(mask, name)
    kept = weight[mask].reshape(*weight.shape[:-1], k)
    if spec is None:
        return SparseWeight.from_kept(mask, values=kept, name=name)
    *lead, out_f, in_f = weight.shape
    spec.check_in_features(in_f, name)
    gs = spec.group_size or in_f
    only_kept = torch.where(mask, weight.float(), 0.0).reshape(*lead, out_f, in_f // gs, gs)
    scale, zero = find_params(only_kept, spec.bits, spec.symmetric)  # [*lead, out, G]
    group = kept_columns(mask, k) // gs
    codes = quantize_codes(kept.float(), scale.gather(-1, group), zero.gather(-1, group), spec.bits)
    return SparseWeight.from_kept(mask, codes=codes, scales=scale, zeros=None if spec.symmetric else zero,
                                  bits=spec.bits, group_size=spec.group_size, name=name)

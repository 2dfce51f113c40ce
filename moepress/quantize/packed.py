"""`QuantizedWeight`: the packed, storable form of a quantized weight.

A weight of shape [*lead, out, in] (lead = [] for an nn.Linear, [E] for fused
experts) is stored as
    qweight  uint8   [*lead, out, ceil(in/8)*bits]     codes, see `packing`
    scales   float16 [*lead, out, n_groups]
    zeros    uint8   [*lead, ceil(out*n_groups/8)*bits] | None
                                                       zero points at the codes' own width: each
                                                       matrix's out*n_groups zeros, row-major, packed
                                                       as one run (`packing.pack_matrix`); None =
                                                       symmetric, zero (maxq+1)/2
    g_idx    int16   [*lead, in] | None                group of each input column;
                                                       None = column j in group j // group_size
and dequantizes as W[..., o, j] = scales[..., o, g(j)] * (q[..., o, j] - zero[..., o, g(j)]).
g_idx is only needed with GPTQ act_order, where groups are contiguous in the
permuted column order (IST-DASLab/gptq) and therefore scattered in the original one.

Zero points. A group's zero is an integer code in [0, 2**bits - 1], so it takes `bits` bits, as
llm-compressor and auto-round store it; moepress formats 1 and 2 stored one uint8 per group
((8 - bits)/group_size bits/param more: 0.047 at 2 bits, group 128). Each matrix's zeros are
packed as one run, padded once to a multiple of 8 zeros (none when out*n_groups is a multiple of
8, at most 7): padding each row's n_groups to 8 instead would give a per-channel weight 8 zeros
per row. `from_tensors` reads the packed layout and formats 1/2's [*lead, out, n_groups] (told
apart by their number of dimensions). In memory `QuantizedWeight.zeros` holds the zeros unpacked,
uint8 [*lead, out, n_groups], since dequantizing, the GPTQ/SignRound starts and the kernels read
them per group; `tensors()` and `nbytes()` are the packed, stored form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .grid import symmetric_zero
from .packing import pack_bits, pack_matrix, packed_width, unpack_bits


@dataclass
class QuantizedWeight:
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    g_idx: torch.Tensor | None
    bits: int
    group_size: int | None
    in_features: int
    out_features: int

    # ------------------------------------------------------------------ build
    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        bits: int,
        group_size: int | None,
        g_idx: torch.Tensor | None = None,
    ) -> "QuantizedWeight":
        """Pack integer codes [*lead, out, in] (any dtype holding integers in [0, maxq])."""
        out_features, in_features = codes.shape[-2:]
        return cls(
            qweight=pack_bits(codes.to(torch.uint8), bits),
            scales=scales.to(torch.float16),
            zeros=None if zeros is None else zeros.to(torch.uint8),
            g_idx=None if g_idx is None else g_idx.to(torch.int16),
            bits=bits,
            group_size=group_size,
            in_features=int(in_features),
            out_features=int(out_features),
        )

    # ------------------------------------------------------------ properties
    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def lead_shape(self) -> tuple[int, ...]:
        return tuple(self.qweight.shape[:-2])

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the dequantized weight."""
        return (*self.lead_shape, self.out_features, self.in_features)

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[-1])

    # ------------------------------------------------------------ dequantize
    def codes(self) -> torch.Tensor:
        """Unpacked codes, uint8 [*lead, out, in]."""
        return unpack_bits(self.qweight, self.bits, self.in_features)

    def _per_column(self, t: torch.Tensor) -> torch.Tensor:
        """Expand per-group params [*lead, out, G] to per-column [*lead, out, in]."""
        if self.g_idx is not None:
            idx = self.g_idx.long().unsqueeze(-2).expand(*self.lead_shape, self.out_features, self.in_features)
            return torch.gather(t, -1, idx)
        if self.group_size is None:
            return t.expand(*t.shape[:-1], self.in_features)
        return t.repeat_interleave(self.group_size, dim=-1)[..., : self.in_features]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W = scale[g] * (q - zero[g]), shape [*lead, out, in]; computed in float32, then cast."""
        q = self.codes().float()
        scale = self._per_column(self.scales.float())
        if self.zeros is None:
            zero = symmetric_zero(self.bits)
        else:
            zero = self._per_column(self.zeros.float())
        return (scale * (q - zero)).to(dtype)

    def select(self, index) -> "QuantizedWeight":
        """Index the first lead (expert) dim: an int drops it, a 1-D index tensor/list keeps it.

        Lets the runtime dequantize only the experts a token batch routes to.
        """
        if not self.lead_shape:
            raise ValueError("select() needs a weight with a leading expert dimension; this one is a single matrix")
        if not isinstance(index, int):
            index = torch.as_tensor(index, dtype=torch.long, device=self.qweight.device)
            if index.ndim != 1:
                raise ValueError(f"select() takes an int or a 1-D index (got shape {tuple(index.shape)})")

        def pick(t):
            return None if t is None else t[index]

        return QuantizedWeight(
            qweight=pick(self.qweight),
            scales=pick(self.scales),
            zeros=pick(self.zeros),
            g_idx=pick(self.g_idx),
            bits=self.bits,
            group_size=self.group_size,
            in_features=self.in_features,
            out_features=self.out_features,
        )

    def dequantize_expert(self, e: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize expert e only: [out, in]."""
        return self.select(e).dequantize(dtype)

    def to(self, device) -> "QuantizedWeight":
        """Move every tensor to `device` (dtypes are part of the format and never change)."""

        def mv(t):
            return None if t is None else t.to(device)

        return QuantizedWeight(
            mv(self.qweight), mv(self.scales), mv(self.zeros), mv(self.g_idx),
            self.bits, self.group_size, self.in_features, self.out_features,
        )

    # ---------------------------------------------------------------- storage
    def stored_zeros(self) -> torch.Tensor | None:
        """The zero points as stored: uint8 [*lead, ceil(out*n_groups/8)*bits] (see the module doc)."""
        return None if self.zeros is None else pack_matrix(self.zeros, self.bits)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to save, keyed "qweight", "scales" and, when present, "zeros" (packed at
        `bits` bits), "g_idx"."""
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.stored_zeros()
        if self.g_idx is not None:
            out["g_idx"] = self.g_idx
        return out

    def nbytes(self) -> int:
        """Bytes of the stored tensors, zero points packed at `bits` bits (the sizes of what
        `tensors()` returns, without packing the zeros to find out)."""
        held = [t for t in (self.qweight, self.scales, self.g_idx) if t is not None]
        total = sum(t.numel() * t.element_size() for t in held)
        if self.zeros is not None:
            total = total + math.prod(self.lead_shape) * packed_width(self.out_features * self.n_groups, self.bits)
        return total

    def meta(self) -> dict:
        """JSON-able metadata that, with `tensors()`, fully describes the weight."""
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "symmetric": self.symmetric,
        }

    @classmethod
    def from_tensors(cls, tensors: dict, meta: dict, name: str = "weight") -> "QuantizedWeight":
        """Rebuild from `tensors()` + `meta()`, validating everything a corrupt file could break.

        The zeros may be packed (this format) or one uint8 per group (moepress formats 1 and 2);
        the two layouts differ in their number of dimensions, so the shape says which, and a
        shape that is neither is refused. Raises ValueError with one line naming `name` and the
        offending tensor.
        """

        def bad(msg: str):
            raise ValueError(f"corrupt quantized weight {name}: {msg}")

        for key in ("bits", "group_size", "in_features", "out_features", "symmetric"):
            if key not in meta:
                bad(f"metadata is missing {key!r}")
        bits, gs = meta["bits"], meta["group_size"]
        in_f, out_f, sym = meta["in_features"], meta["out_features"], meta["symmetric"]
        if bits not in (2, 3, 4, 8):
            bad(f"bits must be one of 2, 3, 4, 8 (got {bits!r})")
        if gs is not None and (not isinstance(gs, int) or gs <= 0):
            bad(f"group_size must be a positive int or null (got {gs!r})")
        if not isinstance(in_f, int) or not isinstance(out_f, int) or in_f <= 0 or out_f <= 0:
            bad(f"in_features/out_features must be positive ints (got {in_f!r}, {out_f!r})")
        unknown = sorted(set(tensors) - {"qweight", "scales", "zeros", "g_idx"})
        if unknown:
            bad(f"unexpected tensors {unknown}")
        for key in ("qweight", "scales"):
            if key not in tensors:
                bad(f"missing tensor {key!r}")
        qweight, scales = tensors["qweight"], tensors["scales"]
        zeros, g_idx = tensors.get("zeros"), tensors.get("g_idx")

        def check(key, t, dtype, shape):
            if t.dtype != dtype:
                bad(f"{key} has dtype {t.dtype}, expected {dtype}")
            if tuple(t.shape) != tuple(shape):
                bad(f"{key} has shape {tuple(t.shape)}, expected {tuple(shape)}")

        if qweight.ndim < 2:
            bad(f"qweight must have at least 2 dims (got shape {tuple(qweight.shape)})")
        lead = tuple(qweight.shape[:-2])
        n_groups = 1 if gs is None else math.ceil(in_f / gs)
        check("qweight", qweight, torch.uint8, (*lead, out_f, packed_width(in_f, bits)))
        check("scales", scales, torch.float16, (*lead, out_f, n_groups))
        if sym and zeros is not None:
            bad("metadata says symmetric but a zeros tensor is present")
        if not sym:
            if zeros is None:
                bad("metadata says asymmetric but the zeros tensor is missing")
            zeros = read_stored_zeros(zeros, lead, out_f, n_groups, bits, bad)
        if g_idx is not None:
            if gs is None:
                bad("g_idx is present but group_size is null (per-channel)")
            check("g_idx", g_idx, torch.int16, (*lead, in_f))
            if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
                bad(f"g_idx values must lie in [0, {n_groups})")
        if not torch.isfinite(scales).all():
            bad("scales contain inf or nan")
        return cls(qweight, scales, zeros, g_idx, bits, gs, in_f, out_f)


def read_stored_zeros(zeros: torch.Tensor, lead: tuple, out_f: int, n_groups: int, bits: int, bad) -> torch.Tensor:
    """Stored zero points -> uint8 [*lead, out, n_groups], from the packed layout or format 1/2's
    (one uint8 per group), checked; `bad(message)` raises for anything else (dense and sparse
    weights share this layout)."""
    packed_shape = (*lead, packed_width(out_f * n_groups, bits))
    legacy_shape = (*lead, out_f, n_groups)
    if zeros.dtype != torch.uint8:
        bad(f"zeros has dtype {zeros.dtype}, expected {torch.uint8}")
    if tuple(zeros.shape) == legacy_shape:  # formats 1 and 2: one byte per group
        if zeros.numel() and int(zeros.max()) > 2**bits - 1:
            bad(f"zeros exceed the {bits}-bit range")
        return zeros
    if tuple(zeros.shape) != packed_shape:
        bad(f"zeros has shape {tuple(zeros.shape)}, expected {packed_shape} (zero points packed at {bits} bits) "
            f"or {legacy_shape} (one uint8 per group, moepress formats 1 and 2)")
    n = out_f * n_groups
    padded = unpack_bits(zeros, bits, packed_width(n, bits) // bits * 8)
    if padded[..., n:].any():  # the padding of a packed run is zero codes (pack_bits)
        bad("zeros' padding codes are not 0: the packed zero points are corrupt")
    return padded[..., :n].reshape(legacy_shape)

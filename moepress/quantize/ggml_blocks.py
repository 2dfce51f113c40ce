"""llama.cpp's block formats Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1, byte for byte as GGUF stores them.

Every format cuts a row into blocks of 32 consecutive inputs; a block stores a float16 scale ``d``
(and a float16 minimum ``m`` for the ``_1`` types) followed by its 32 codes (ggml-common.h's
``block_q4_0`` etc.; dequantization as in ggml-quants.c's ``dequantize_row_*``):

    type   bytes  layout                     value of code q
    q8_0   34     d, qs[32] int8             d * q                 q in [-128, 127]
    q4_0   18     d, qs[16]                  d * (q - 8)           q in [0, 15]
    q4_1   20     d, m, qs[16]               d * q + m             q in [0, 15]
    q5_0   22     d, qh[4], qs[16]           d * (q - 16)          q in [0, 31]
    q5_1   24     d, m, qh[4], qs[16]        d * q + m             q in [0, 31]

``qs[j]`` holds the low four bits of code j in its low nibble and those of code j + 16 in its high
nibble; ``qh`` is a little-endian uint32 whose bit j is bit 4 of code j. Scales follow llama.cpp's
reference quantizers (``quantize_row_*_ref``): q8_0 ``d = absmax / 127``; q4_0/q5_0 ``d = max / -8``
(``/ -16``) where ``max`` is the block's signed value of largest magnitude, so the extreme weight
lands exactly on code 0; q4_1/q5_1 ``d = (max - min) / 15`` (``/ 31``) and ``m = min``. ``d`` and
``m`` are rounded to float16 (to nearest, as ``GGML_FP32_TO_FP16``) *before* any code is chosen,
and codes are the nearest points of that stored grid, so the values GPTQ optimises are exactly the
ones llama.cpp reads. (llama.cpp picks codes against the unrounded ``d``; the stored grid is the
same, ours is never farther from the weights.)

:class:`BlockFormat` is also the grid GPTQ's column loop asks for (``find_params``, ``quantize``,
``dequantize``: see :mod:`moepress.quantize.gptq`); :class:`BlockQuantizedWeight` holds a
quantized weight as the GGUF bytes, which moepress's runtime dequantizes and the GGUF export
writes unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .gptq import GPTQResult, gptq_codes

BLOCK = 32  # inputs per block, every legacy format (ggml's QK4_0 = QK4_1 = QK5_0 = QK5_1 = QK8_0)


@dataclass(frozen=True)
class BlockFormat:
    """One llama.cpp block format.

    name:       "q4_0" etc. (the treatment label and ``GGMLQuantizationType[name.upper()]``)
    bits:       code width
    has_min:    whether a block stores a minimum ``m`` (the ``_1`` types) besides ``d``
    ggml_type:  the ``GGMLQuantizationType`` value GGUF writes for a tensor of this format
    block:      inputs per stored block (32; 256 for the k-quants of :mod:`.ggml_kquants`)
    sub:        inputs sharing one effective (scale, zero) inside a block (the block itself here)
    """

    name: str
    bits: int
    has_min: bool
    ggml_type: int
    block: int = BLOCK
    sub: int = BLOCK

    @property
    def n_sub(self) -> int:
        return self.block // self.sub

    # ------------------------------------------------------------------ layout
    @property
    def block_bytes(self) -> int:
        """Bytes of one block of 32 weights (ggml's ``type_size``)."""
        return 2 + (2 if self.has_min else 0) + (BLOCK if self.bits == 8 else BLOCK // 2 + (4 if self.bits == 5 else 0))

    @property
    def offset(self) -> int:
        """The code of weight zero in the ``_0`` types (8 for q4_0, 16 for q5_0; q8_0 stores signed)."""
        return 0 if self.has_min or self.bits == 8 else 2 ** (self.bits - 1)

    @property
    def qmin(self) -> int:
        return -128 if self.bits == 8 else 0

    @property
    def qmax(self) -> int:
        return 127 if self.bits == 8 else 2**self.bits - 1

    def row_bytes(self, in_features: int) -> int:
        """Bytes of one row of ``in_features`` weights."""
        self.check_in_features(in_features)
        return in_features // self.block * self.block_bytes

    def nbytes(self, out_features: int, in_features: int) -> int:
        return out_features * self.row_bytes(in_features)

    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block

    def fits(self, in_features: int) -> bool:
        return in_features > 0 and in_features % self.block == 0

    def check_in_features(self, in_features: int, name: str = "weight") -> None:
        if not self.fits(in_features):
            raise ValueError(
                f"{self.name} stores blocks of {self.block} inputs; {name} has {in_features} input features, "
                f"not a multiple of {self.block}"
            )

    # ------------------------------------------------------------------ the grid (GPTQ's interface)
    def find_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(d, m) of each block ``x[..., :]`` (the last dim is one block; any width is reduced the
        same way), float32 values that float16 holds exactly; ``m`` is 0 for the types without one."""
        x = x.float()
        if self.has_min:
            lo, hi = x.amin(dim=-1), x.amax(dim=-1)
            d = _fp16((hi - lo) / self.qmax)
            return d, _fp16(lo)
        if self.bits == 8:
            d = x.abs().amax(dim=-1) / 127
        else:
            # the signed value of largest magnitude, first one on ties (llama.cpp's loop, argmax)
            peak = x.gather(-1, x.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
            d = peak / -self.offset
        return _fp16(d), torch.zeros_like(d)

    def search_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(d, m) as :meth:`find_params`, chosen for the least squared rounding error of each block:
        :func:`least_squares_grid` over the stored (float16) grid, min/max's own (d, m) among its
        candidates, so no block's error is above :meth:`find_params`'s. For RTN only (the outer
        tensors): see :mod:`.ggml_kquants` on why GPTQ keeps min/max."""
        x = x.float()
        if self.has_min:
            return least_squares_grid(x, 0, self.qmax, True, _fp16, self.find_params(x))
        lo, hi = self.qmin - self.offset, self.qmax - self.offset
        return least_squares_grid(x, lo, hi, False, _fp16, self.find_params(x))

    def effective(self, d: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (scale, zero) of each sub-block, [..., n_sub], from a block's stored parameters: a
        block here is its own one sub-block (the k-quants derive eight or sixteen)."""
        return d.unsqueeze(-1), m.unsqueeze(-1)

    def quantize(self, x: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Codes (float32, as the block stores them) of the grid points nearest ``x``; ``d``/``m``
        broadcast against ``x``. A block with ``d == 0`` stores code 0 (llama.cpp's ``id = 0``)."""
        safe = torch.where(d == 0, torch.ones_like(d), d)
        q = torch.round((x.float() - m) / safe) + self.offset
        q = torch.where(d == 0, torch.full_like(q, float(self.offset)), q)
        return q.clamp(self.qmin, self.qmax)

    def dequantize(self, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Values of codes ``q``, computed as gguf's (and ggml's) dequantization does in float32."""
        if self.has_min:
            return d * q + m
        return d * (q - self.offset)

    # ------------------------------------------------------------------ bytes
    def pack(self, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
        """GGUF bytes of codes [..., in] with per-block d (and m) [..., in / 32]: uint8 [..., row_bytes]."""
        *lead, in_f = codes.shape
        self.check_in_features(in_f)
        nb = in_f // BLOCK
        q = codes.reshape(*lead, nb, BLOCK)
        parts = [_fp16_bytes(d)]
        if self.has_min:
            parts.append(_fp16_bytes(m))
        if self.bits == 8:
            parts.append(q.to(torch.int8).view(torch.uint8))
        else:
            q = q.to(torch.uint8)
            if self.bits == 5:
                high = ((q >> 4) & 1).reshape(*lead, nb, 4, 8).to(torch.int32)
                weights = torch.tensor([1 << b for b in range(8)], dtype=torch.int32, device=q.device)
                parts.append((high * weights).sum(-1).to(torch.uint8))  # qh: bit j of the uint32 = code j's bit 4
            low = q & 0x0F
            parts.append(low[..., : BLOCK // 2] | (low[..., BLOCK // 2 :] << 4))
        return torch.cat(parts, dim=-1).reshape(*lead, nb * self.block_bytes)

    def unpack(self, data: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes float32 [..., in], d float32 [..., in / 32], m float32 [..., in / 32]) of GGUF bytes."""
        *lead, width = data.shape
        nb = in_features // BLOCK
        if width != self.row_bytes(in_features):
            raise ValueError(f"{self.name}: {width} bytes per row, expected {self.row_bytes(in_features)}")
        blocks = data.reshape(*lead, nb, self.block_bytes)
        d = _fp16_from_bytes(blocks[..., 0:2])
        at = 2
        m = torch.zeros_like(d)
        if self.has_min:
            m = _fp16_from_bytes(blocks[..., 2:4])
            at = 4
        if self.bits == 8:
            q = blocks[..., at:].contiguous().view(torch.int8)
        else:
            high = None
            if self.bits == 5:
                qh = blocks[..., at : at + 4].to(torch.int32)
                shifts = torch.arange(8, dtype=torch.int32, device=data.device)
                high = ((qh.unsqueeze(-1) >> shifts) & 1).reshape(*lead, nb, BLOCK).to(torch.uint8)
                at += 4
            qs = blocks[..., at:]
            q = torch.cat([qs & 0x0F, qs >> 4], dim=-1)
            if high is not None:
                q = q | (high << 4)
        return q.float().reshape(*lead, in_features), d, m


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest float16 (GGML_FP32_TO_FP16; overflow saturates to +-inf as there), as float32."""
    return x.to(torch.float16).float()


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[...] -> uint8 [..., 2], little-endian float16 as GGUF stores it."""
    return x.to(torch.float16).unsqueeze(-1).contiguous().view(torch.uint8)


def _fp16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2] -> float32 [...]."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


# ggml's type ids (gguf.GGMLQuantizationType), spelled out so that the runtime needs no gguf import
Q8_0 = BlockFormat("q8_0", 8, has_min=False, ggml_type=8)
Q4_0 = BlockFormat("q4_0", 4, has_min=False, ggml_type=2)
Q4_1 = BlockFormat("q4_1", 4, has_min=True, ggml_type=3)
Q5_0 = BlockFormat("q5_0", 5, has_min=False, ggml_type=6)
Q5_1 = BlockFormat("q5_1", 5, has_min=True, ggml_type=7)
FORMATS = {f.name: f for f in (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)}


def block_format(name: str) -> BlockFormat:
    """The format called ``name`` ("q4_0", "Q4_0", "q4_K"), or a one-line ValueError listing them."""
    found = {k.lower(): f for k, f in FORMATS.items()}.get(str(name).lower())
    if found is None:
        raise ValueError(f"unknown llama.cpp block format {name!r}; choose one of {', '.join(FORMATS)}")
    return found


@dataclass
class BlockQuantizedWeight:
    """A weight [*lead, out, in] stored in a llama.cpp block format: ``blocks`` uint8
    [*lead, out, in / 32 * block_bytes], each row exactly the bytes of a GGUF tensor's row."""

    blocks: torch.Tensor
    format: BlockFormat
    in_features: int
    out_features: int

    @classmethod
    def from_codes(cls, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, fmt: BlockFormat):
        out_f, in_f = codes.shape[-2:]
        return cls(fmt.pack(codes, d, m), fmt, int(in_f), int(out_f))

    @property
    def lead_shape(self) -> tuple[int, ...]:
        return tuple(self.blocks.shape[:-2])

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.lead_shape, self.out_features, self.in_features)

    def unpack(self):
        """(codes, scale, zero) as :meth:`BlockFormat.unpack` gives them."""
        return self.format.unpack(self.blocks, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight llama.cpp reads from these bytes, [*lead, out, in] (float32, then cast)."""
        fmt = self.format
        q, scale, zero = self.unpack()
        s, z = fmt.effective(scale, zero)  # [..., blocks, n_sub]
        q = q.reshape(*q.shape[:-1], self.in_features // fmt.block, fmt.n_sub, fmt.sub)
        w = fmt.dequantize(q, s.unsqueeze(-1), z.unsqueeze(-1))
        return w.reshape(*self.shape).to(dtype)

    def select(self, index) -> "BlockQuantizedWeight":
        """Index the leading expert dim (an int drops it, a 1-D index keeps it)."""
        if not self.lead_shape:
            raise ValueError("select() needs a weight with a leading expert dimension; this one is a single matrix")
        if not isinstance(index, int):
            index = torch.as_tensor(index, dtype=torch.long, device=self.blocks.device)
        return BlockQuantizedWeight(self.blocks[index], self.format, self.in_features, self.out_features)

    def to(self, device) -> "BlockQuantizedWeight":
        return BlockQuantizedWeight(self.blocks.to(device), self.format, self.in_features, self.out_features)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"blocks": self.blocks}

    def nbytes(self) -> int:
        return self.blocks.numel()

    def meta(self) -> dict:
        return {"format": self.format.name, "in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def from_tensors(cls, tensors: dict, meta: dict, name: str = "weight") -> "BlockQuantizedWeight":
        """Rebuild from :meth:`tensors` + :meth:`meta`; one-line ValueError naming ``name`` if corrupt."""

        def bad(msg: str):
            raise ValueError(f"corrupt {meta.get('format', 'block')} weight {name}: {msg}")

        try:
            fmt = block_format(meta["format"])
        except (KeyError, ValueError) as exc:
            bad(str(exc))
        in_f, out_f = meta.get("in_features"), meta.get("out_features")
        if not isinstance(in_f, int) or not isinstance(out_f, int) or out_f <= 0 or not fmt.fits(in_f):
            bad(f"in_features/out_features must be positive ints, in a multiple of {fmt.block} (got {in_f!r}, "
                f"{out_f!r})")
        if set(tensors) != {"blocks"}:
            bad(f"expected one tensor 'blocks', got {sorted(tensors)}")
        blocks = tensors["blocks"]
        if blocks.dtype != torch.uint8 or blocks.ndim < 2 or tuple(blocks.shape[-2:]) != (out_f, fmt.row_bytes(in_f)):
            bad(f"blocks has dtype {blocks.dtype} and shape {tuple(blocks.shape)}, expected uint8 "
                f"[..., {out_f}, {fmt.row_bytes(in_f)}]")
        weight = cls(blocks, fmt, in_f, out_f)
        _, d, m = weight.unpack()
        if not (torch.isfinite(d).all() and torch.isfinite(m).all()):
            bad("a block's scale or minimum is inf or nan")
        return weight


# ---------------------------------------------------------------------- the searched grid

SEARCH_STEPS = torch.linspace(-1.0, 1.0, 21).tolist()  # end code moved by -1..1 in tenths (llama.cpp's range)


def least_squares_grid(x: torch.Tensor, lo: int, hi: int, has_min: bool, snap, start, *,
                       max_min: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, m) per group ``x[..., :]`` of the grid ``d * k + m`` (integer k in [lo, hi]; m = 0 unless
    ``has_min``) whose nearest rounding has the least squared error among candidates: ``start``
    (min/max's (d, m)), and for each of :data:`SEARCH_STEPS` the grid with its extreme weight on an
    end code moved by that step (``make_qx_quants``'/``make_qkx2_quants``' idea) and that grid refit
    by least squares to the codes it gave. ``snap`` maps a parameter to what the file stores (float16,
    or the identity where integer scales come later); ``max_min`` caps m (0 for the k-quants, which
    store minus a non-negative minimum)."""
    def clip_m(m):
        return m if max_min is None else m.clamp(max=max_min)

    def codes(d, m):
        safe = torch.where(d == 0, torch.ones_like(d), d)
        k = torch.round((x - m.unsqueeze(-1)) / safe.unsqueeze(-1)).clamp(lo, hi)
        return torch.where((d == 0).unsqueeze(-1), torch.zeros_like(k), k)

    def error(d, m):
        k = codes(d, m)
        return (d.unsqueeze(-1) * k + m.unsqueeze(-1) - x).square().sum(-1)

    best_d, best_m = start
    best_err = error(best_d, best_m)

    def consider(d, m):
        nonlocal best_d, best_m, best_err
        d, m = snap(torch.nan_to_num(d)), snap(clip_m(torch.nan_to_num(m)))
        err = error(d, m)
        better = err < best_err
        best_d, best_m = torch.where(better, d, best_d), torch.where(better, m, best_m)
        best_err = torch.where(better, err, best_err)

    n = x.shape[-1]
    if has_min:
        x_lo = clip_m(x.amin(-1))
        span = x.amax(-1) - x_lo
        for t in SEARCH_STEPS:
            d = span / (hi + t)
            consider(d, x_lo)
            k = codes(torch.where(span > 0, d, torch.zeros_like(d)), x_lo)
            sk, skk, sx, sxk = k.sum(-1), k.square().sum(-1), x.sum(-1), (x * k).sum(-1)
            det = n * skk - sk * sk
            ok = det > 0
            safe = torch.where(ok, det, torch.ones_like(det))
            d_fit = torch.where(ok, (n * sxk - sk * sx) / safe, d)
            m_fit = torch.where(ok, (skk * sx - sk * sxk) / safe, x_lo)
            if max_min is not None:  # m capped: refit d alone to the capped m
                capped = m_fit > max_min
                m_fit = clip_m(m_fit)
                d_cap = ((x - m_fit.unsqueeze(-1)) * k).sum(-1) / torch.where(skk > 0, skk, torch.ones_like(skk))
                d_fit = torch.where(capped & (skk > 0), d_cap, d_fit)
            consider(d_fit, m_fit)
        return best_d, best_m
    zero = torch.zeros(x.shape[:-1], device=x.device)
    peak = x.gather(-1, x.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
    for end in (lo, hi):  # the extreme weight towards either end code
        for t in SEARCH_STEPS:
            denom = end + t * (1 if end > 0 else -1)
            if denom == 0:
                continue
            d = peak / denom
            consider(d, zero)
            k = codes(snap(d), zero)
            skk = k.square().sum(-1)
            consider(torch.where(skk > 0, (x * k).sum(-1) / torch.where(skk > 0, skk, torch.ones_like(skk)), d), zero)
    return best_d, best_m


# ---------------------------------------------------------------------- quantizers


def rtn_quantize_blocks(weight: torch.Tensor, fmt: BlockFormat, name: str = "weight", *,
                        search: bool = False) -> BlockQuantizedWeight:
    """Round to nearest onto ``fmt``: each block's (d, m) from its own weights, every weight rounded
    to that grid independently (llama.cpp's reference quantizer without an importance matrix).
    ``search``: each block's parameters chosen for a lower squared error (``fmt.search_params``)
    instead of its min/max (``fmt.find_params``); the same bytes per block, the same format. It is
    for the token embeddings and output head only (GPTQ keeps min/max: :mod:`.ggml_kquants`). On the
    zoo's trained embeddings the squared error is 0.79-0.98x that of llama.cpp's quantizer without
    an importance matrix (what llama-quantize gives token_embd), and swapping only that tensor in a
    moepress GGUF (llama-perplexity's KL, same body) lowered KL 6-7% at q4_0 (tiny-mixtral 0.001284
    -> 0.001208), q5_0 (0.000574 -> 0.000536) and q4_K (tiny-qwen3moe 0.000672 -> 0.000630), but
    raised it at q3_K (0.001661 -> 0.001693, where min/max with ``refine`` gave 0.001596): the
    searched grids clip the extreme weights, so the 2-3-bit k-quants keep min/max and ``refine``."""
    *lead, out_f, in_f = weight.shape
    fmt.check_in_features(in_f, name)
    w = weight.float()
    if not torch.isfinite(w).all():
        raise ValueError(f"{name} contains inf or nan; cannot quantize it")
    blocks = w.reshape(*lead, out_f, in_f // fmt.block, fmt.block)
    scale, zero = fmt.search_params(blocks) if search else fmt.find_params(blocks)
    s, z = fmt.effective(scale, zero)
    subs = blocks.reshape(*blocks.shape[:-1], fmt.n_sub, fmt.sub)
    codes = fmt.quantize(subs, s.unsqueeze(-1), z.unsqueeze(-1)).reshape(*lead, out_f, in_f)
    return BlockQuantizedWeight.from_codes(codes, scale, zero, fmt)


def gptq_quantize_blocks(weight: torch.Tensor, hessian: torch.Tensor, fmt: BlockFormat, *, act_order: str = "off",
                         damp: float = 0.01, block_size: int = 128, name: str = "weight"):
    """GPTQ onto ``fmt`` (weight [E, out, in] or [out, in], Hessian [E, in, in] or [in, in]).

    The column loop is :mod:`moepress.quantize.gptq`'s, with ``fmt`` as the grid and groups of its
    block (32, or 256 for the k-quants): each block's parameters are found from the error-updated
    weights when GPTQ reaches the block, and every later column of the block is rounded to its
    sub-block's stored grid with its error fed forward.
    ``act_order`` is "off" or "static" (blocks fixed up front from the original weights, columns
    quantized in descending diag(H) order); "dynamic" would scatter a block's columns, which GGUF
    cannot store. Returns a :class:`~moepress.quantize.gptq.GPTQResult` whose ``weight`` is a
    :class:`BlockQuantizedWeight`.
    """
    if act_order not in ("off", "static"):
        raise ValueError(f"{name}: {fmt.name} stores blocks of consecutive inputs; act-order must be off or static "
                         f"(got {act_order!r})")
    fmt.check_in_features(weight.shape[-1], name)
    out = gptq_codes(weight, hessian, fmt, group_size=fmt.block, act_order=act_order != "off", static_groups=True,
                     damp=damp, block_size=block_size, name=name)
    weight = BlockQuantizedWeight.from_codes(out.codes, out.scales, out.zeros, fmt)
    if out.single:
        return GPTQResult(weight.select(0), out.loss[0], out.damp_used[0])
    return GPTQResult(weight, out.loss, out.damp_used)


__all__ = ["BLOCK", "FORMATS", "BlockFormat", "BlockQuantizedWeight", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
           "block_format", "gptq_quantize_blocks", "rtn_quantize_blocks"]

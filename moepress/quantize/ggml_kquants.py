"""llama.cpp's k-quants Q2_K..Q6_K: super-blocks of 256 inputs, byte for byte as GGUF stores them.

A super-block holds float16 super-scales and small integer scales of its sub-blocks
(ggml-common.h's ``block_q2_K`` etc.; values as ggml-quants.c's ``dequantize_row_*``):

    type   bytes  layout                                  value of code q in sub-block j
    q2_K    84    scales[16], qs[64], d, dmin             (d * sc_j) * q - (dmin * m_j)   16 x 16, q in [0, 3]
    q3_K   110    hmask[32], qs[64], scales[12], d        (d * sc_j) * (q - 4)            16 x 16, q in [0, 7]
    q4_K   144    d, dmin, scales[12], qs[128]            (d * sc_j) * q - (dmin * m_j)   8 x 32, q in [0, 15]
    q5_K   176    d, dmin, scales[12], qh[32], qs[128]    (d * sc_j) * q - (dmin * m_j)   8 x 32, q in [0, 31]
    q6_K   210    ql[128], qh[64], scales[16], d          (d * sc_j) * (q - 32)           16 x 16, q in [0, 63]

``sc_j``/``m_j`` are 6-bit (packed in 12 bytes, ggml's ``get_scale_min_k4``) for q4_K/q5_K, 4-bit
(``sc_j | m_j << 4``, one byte each) for q2_K, signed 6-bit (``sc_j + 32`` packed in 12 bytes) for
q3_K and signed int8 for q6_K. q2_K/q3_K keep their codes' low two bits in 2-bit planes (``qs``),
q3_K the third bit in ``hmask``. Bits per weight: 2.625, 3.4375, 4.5, 5.5, 6.5625.

Parameters are chosen from the super-block's weights: each sub-block's own grid from its min/max
(the extreme weight on an end code, as the ``_0``/``_1`` types do), then the integer scales against
the float16 super-scales (``d = max / 63``, ``/ 15`` for q2_K, ``-max / 128`` for q6_K, ``-max / 32``
for q3_K, as ``quantize_row_*_ref``), and codes are the nearest points of the stored grid. GPTQ
(:mod:`moepress.quantize.gptq`) asks these formats for a super-block's parameters when it reaches
it and rounds every column to the sub-block grid it falls in.

Why min/max and not a search for the grid of least squared error (as llama.cpp's
``make_qkx2_quants``/``make_qx_quants`` do): measured on tiny-qwen3moe (``--target llamacpp``, KL
against the bf16 model), grids chosen by squared error clip the extreme weights, and after GPTQ's
error feedback, which moves the not-yet-quantized weights of a super-block, those clip more: such
a search raised GPTQ's KL 1.7x at q2_K (0.00150 vs 0.00089) and 1.1x at q3_K, and RTN's at q2_K
was worse with it than with min/max and ``refine`` (0.00499 vs 0.00403). ``refine`` (each integer scale and
minimum moved by one step where its sub-block's squared error drops) helps rounding to nearest
(KL 0.77x at q2_K; squared error 0.89-0.91x llama.cpp's ``quantize_row_q2_K_ref`` on trained
weights, 0.97x q3_K, where min/max alone is 1.05-1.24x) but not GPTQ (1.1-1.2x KL at q2_K), so it
is off by default: ``dataclasses.replace(Q2_K, refine=True)`` for RTN. The token embeddings and
output head (RTN, no GPTQ) take :meth:`KQuantFormat.search_params` instead (``rtn_quantize_blocks(...,
search=True)``): a least-squares grid search per sub-block from q4_K up, ``refine`` alone for q2_K/q3_K.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ggml_blocks import FORMATS, BlockFormat, _fp16, _fp16_bytes, _fp16_from_bytes, least_squares_grid

SUPER = 256  # ggml's QK_K


@dataclass(frozen=True)
class KQuantFormat(BlockFormat):
    """A k-quant: ``block`` 256 inputs per stored super-block, ``sub`` inputs per sub-block grid."""

    block: int = SUPER
    sub: int = 32
    scale_bits: int = 6  # width of each sub-block's integer scale (and minimum): 4 for q2_K, 8 for q6_K
    # Move each integer scale (and minimum) by one step where its sub-block's squared rounding error
    # drops (find_params). Off by default: it lowers RTN's error but raises GPTQ's (see the module doc).
    refine: bool = False

    @property
    def n_sub(self) -> int:
        return self.block // self.sub

    @property
    def block_bytes(self) -> int:
        """Codes, the sub-blocks' integer scales (and minima), one or two float16 super-scales."""
        ints = self.n_sub * self.scale_bits * (2 if self.has_min else 1) // 8
        return SUPER * self.bits // 8 + ints + (4 if self.has_min else 2)

    @property
    def offset(self) -> int:
        """The code of weight zero in the types without minima (32 for q6_K, 4 for q3_K)."""
        return 0 if self.has_min else 2 ** (self.bits - 1)

    @property
    def qmin(self) -> int:
        return 0

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    # ------------------------------------------------------------------ the grid
    def find_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored parameters of each super-block ``x[..., 256]``: (scale, zero), each [..., 1 + n_sub]:
        ``[d, sc_0..]`` and ``[dmin, m_0..]`` (q6_K, q3_K: ``[d, sc_0..]`` with signed ``sc``, and
        zeros), float32 values the file holds exactly (d in float16, sc and m integers).

        Each sub-block's grid from its own min/max (the extreme weight on an end code), then the
        integer scales against the float16 super-scales; with ``refine`` each integer scale (and
        minimum) is moved by one step where that lowers its sub-block's squared error."""
        x = x.float()
        subs = x.reshape(*x.shape[:-1], self.n_sub, self.sub)
        if not self.has_min:
            peak = subs.gather(-1, subs.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
            return self._integer_params(subs, peak / -self.offset, None, self.refine)
        lo = subs.amin(dim=-1).clamp(max=0)
        return self._integer_params(subs, (subs.amax(dim=-1) - lo) / self.qmax, -lo, self.refine)

    def search_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored parameters as :meth:`find_params`, for a lower squared rounding error (RTN of the
        outer tensors only: see the module doc on GPTQ). From 4 bits: each sub-block's float grid by
        :func:`~.ggml_blocks.least_squares_grid` (min/max among its candidates), the integer scales
        against the float16 super-scales and ``refine``d; per super-block, whichever of that and
        min/max with ``refine`` rounds with the lower squared error. q2_K and q3_K: min/max with
        ``refine`` alone, since the search's grids clip the extreme weights, which costs more KL than
        their lower squared error gains at 2-3 bits (see :func:`~.ggml_blocks.rtn_quantize_blocks`)."""
        x = x.float()
        subs = x.reshape(*x.shape[:-1], self.n_sub, self.sub)
        if not self.has_min:
            peak = subs.gather(-1, subs.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
            start = self._integer_params(subs, peak / -self.offset, None, True)
            if self.bits <= 3:
                return start
            d, _ = least_squares_grid(subs, -self.offset, self.qmax - self.offset, False, lambda t: t,
                                      (peak / -self.offset, torch.zeros_like(peak)))
            searched = self._integer_params(subs, d, None, True)
        else:
            lo = subs.amin(dim=-1).clamp(max=0)
            start = self._integer_params(subs, (subs.amax(dim=-1) - lo) / self.qmax, -lo, True)
            if self.bits <= 3:
                return start
            d, m = least_squares_grid(subs, 0, self.qmax, True, lambda t: t,
                                      ((subs.amax(dim=-1) - lo) / self.qmax, lo), max_min=0.0)
            searched = self._integer_params(subs, d, -m, True)

        def error(params):
            s, z = self.effective(*params)
            return self._sub_error(subs, s, z).sum(-1, keepdim=True)

        better = error(searched) < error(start)
        return (torch.where(better, searched[0], start[0]), torch.where(better, searched[1], start[1]))

    def _integer_params(self, subs, scale, mins, refine):
        """Stored parameters from each sub-block's float scale (and non-negative minimum, None for
        the types without minima): float16 super-scales, integer scales rounded against them."""
        if not self.has_min:
            top = scale.gather(-1, scale.abs().argmax(dim=-1, keepdim=True))  # [..., 1]
            half = 2 ** (self.scale_bits - 1)  # the largest scale lands on integer -128 (q6_K), -32 (q3_K)
            d = _fp16(top / -half)
            sc = torch.where(d == 0, torch.zeros_like(scale), torch.round(scale / torch.where(d == 0, 1, d)))
            sc = sc.clamp(-half, half - 1)
            if refine:
                sc, _ = self._refine(subs, d, sc, None, torch.zeros_like(sc), (-half, half - 1))
            return torch.cat([d, sc], -1), torch.zeros(*sc.shape[:-1], 1 + self.n_sub, device=subs.device)
        top = 2**self.scale_bits - 1  # 63, 15 for q2_K
        d = _fp16(scale.amax(dim=-1, keepdim=True) / top)
        dmin = _fp16(mins.amax(dim=-1, keepdim=True) / top)
        sc = torch.where(d > 0, torch.round(scale / torch.where(d > 0, d, 1)), 0).clamp(0, top)
        m = torch.where(dmin > 0, torch.round(mins / torch.where(dmin > 0, dmin, 1)), 0).clamp(0, top)
        if refine:
            sc, m = self._refine(subs, d, sc, dmin, m, (0, top))
        return torch.cat([d, sc], -1), torch.cat([dmin, m], -1)

    def _sub_error(self, subs: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Squared error [..., n_sub] of rounding each sub-block onto the grid (s, z) [..., n_sub]."""
        s, z = s.unsqueeze(-1), z.unsqueeze(-1)
        return (self.dequantize(self.quantize(subs, s, z), s, z) - subs).square().sum(-1)

    def _refine(self, subs, d, sc, dmin, m, bounds):
        """Integer scales (and minima) moved by -1, 0 or +1 where the stored grid's error drops."""
        def error(sc_, m_):
            return self._sub_error(subs, d * sc_, m_ if dmin is None else dmin * m_)

        best_sc, best_m, best_err = sc, m, error(sc, m)
        steps = (-1, 0, 1) if dmin is not None else (0,)
        for a in (-1, 0, 1):
            for b in steps:
                if a == 0 and b == 0:
                    continue
                cand_sc = (sc + a).clamp(*bounds)
                cand_m = m if dmin is None else (m + b).clamp(*bounds)
                err = error(cand_sc, cand_m)
                better = err < best_err
                best_sc = torch.where(better, cand_sc, best_sc)
                best_m = torch.where(better, cand_m, best_m)
                best_err = torch.where(better, err, best_err)
        return best_sc, best_m

    def effective(self, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sub-block (scale, zero) [..., n_sub]: ``d * sc_j`` and ``dmin * m_j`` in float32, as ggml computes them."""
        return scale[..., :1] * scale[..., 1:], zero[..., :1] * zero[..., 1:]

    def quantize(self, x: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        safe = torch.where(s == 0, torch.ones_like(s), s)
        q = torch.round((x.float() + z) / safe) + self.offset
        q = torch.where(s == 0, torch.full_like(q, float(self.offset)), q)
        return q.clamp(self.qmin, self.qmax)

    def dequantize(self, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if not self.has_min:
            return s * (q - self.offset)
        return s * q - z

    # ------------------------------------------------------------------ bytes
    def pack(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
        """GGUF bytes of codes [..., in] with stored parameters [..., in / 256, 1 + n_sub]."""
        *lead, in_f = codes.shape
        self.check_in_features(in_f)
        nb = in_f // SUPER
        q = codes.reshape(*lead, nb, SUPER).to(torch.uint8)
        d, sc = scale[..., 0], scale[..., 1:]
        if self.bits == 2:  # scales[16] (sc | m << 4), qs[64], d, dmin
            nibbles = sc.to(torch.uint8) | (zero[..., 1:].to(torch.uint8) << 4)
            parts = [nibbles, _pack_2bit(q), _fp16_bytes(d), _fp16_bytes(zero[..., 0])]
            return torch.cat(parts, -1).reshape(*lead, nb * self.block_bytes)
        if self.bits == 3:  # hmask[32], qs[64], scales[12], d
            parts = [_pack_high_bits(q >> 2), _pack_2bit(q & 3), _pack_q3_scales(sc), _fp16_bytes(d)]
            return torch.cat(parts, -1).reshape(*lead, nb * self.block_bytes)
        if self.bits == 6:
            parts = []
            ql, qh = [], []
            for half in range(2):
                h = q[..., 128 * half: 128 * (half + 1)].reshape(*lead, nb, 4, 32)
                ql.append((h[..., 0, :] & 0xF) | ((h[..., 2, :] & 0xF) << 4))
                ql.append((h[..., 1, :] & 0xF) | ((h[..., 3, :] & 0xF) << 4))
                qh.append((h[..., 0, :] >> 4) | ((h[..., 1, :] >> 4) << 2) | ((h[..., 2, :] >> 4) << 4)
                          | ((h[..., 3, :] >> 4) << 6))
            parts = [*ql, *qh, sc.to(torch.int8).view(torch.uint8), _fp16_bytes(d)]
            return torch.cat(parts, -1).reshape(*lead, nb * self.block_bytes)
        dmin, m = zero[..., 0], zero[..., 1:]
        sc, m = sc.to(torch.uint8), m.to(torch.uint8)
        scales = torch.cat([sc[..., :4] | ((sc[..., 4:] >> 4) << 6), m[..., :4] | ((m[..., 4:] >> 4) << 6),
                            (sc[..., 4:] & 0xF) | ((m[..., 4:] & 0xF) << 4)], -1)
        chunks = q.reshape(*lead, nb, 4, 2, 32)  # 64-value chunks: low nibbles, then high
        qs = ((chunks[..., 0, :] & 0xF) | ((chunks[..., 1, :] & 0xF) << 4)).reshape(*lead, nb, 128)
        parts = [_fp16_bytes(d), _fp16_bytes(dmin), scales]
        if self.bits == 5:
            high = ((q >> 4) & 1).reshape(*lead, nb, 8, 32).to(torch.int32)  # bit b of qh[l]: value 32 b + l
            weights = torch.tensor([1 << b for b in range(8)], dtype=torch.int32, device=q.device)
            parts.append((high * weights[:, None]).sum(-2).to(torch.uint8))
        parts.append(qs)
        return torch.cat(parts, -1).reshape(*lead, nb * self.block_bytes)

    def unpack(self, data: torch.Tensor, in_features: int):
        """(codes float32 [..., in], scale [..., in / 256, 1 + n_sub], zero [...]) of GGUF bytes."""
        *lead, width = data.shape
        nb = in_features // SUPER
        if width != self.row_bytes(in_features):
            raise ValueError(f"{self.name}: {width} bytes per row, expected {self.row_bytes(in_features)}")
        b = data.reshape(*lead, nb, self.block_bytes)
        if self.bits == 2:
            nibbles, d, dmin = b[..., :16], _fp16_from_bytes(b[..., 80:82]), _fp16_from_bytes(b[..., 82:84])
            scale = torch.cat([d.unsqueeze(-1), (nibbles & 0xF).float()], -1)
            zero = torch.cat([dmin.unsqueeze(-1), (nibbles >> 4).float()], -1)
            return _unpack_2bit(b[..., 16:80]).float().reshape(*lead, in_features), scale, zero
        if self.bits == 3:
            q = _unpack_2bit(b[..., 32:96]) | (_unpack_high_bits(b[..., :32]) << 2)
            scale = torch.cat([_fp16_from_bytes(b[..., 108:110]).unsqueeze(-1), _unpack_q3_scales(b[..., 96:108])], -1)
            return q.float().reshape(*lead, in_features), scale, torch.zeros_like(scale)
        if self.bits == 6:
            ql, qh = b[..., :128], b[..., 128:192]
            sc = b[..., 192:208].contiguous().view(torch.int8).float()
            d = _fp16_from_bytes(b[..., 208:210])
            values = []
            for half in range(2):
                lo = ql[..., 64 * half: 64 * half + 64]
                hi = qh[..., 32 * half: 32 * half + 32]
                for k in range(4):
                    low = (lo[..., 32 * (k % 2): 32 * (k % 2) + 32] >> (4 * (k // 2))) & 0xF
                    values.append(low | (((hi >> (2 * k)) & 3) << 4))
            q = torch.cat(values, -1)
            scale = torch.cat([d.unsqueeze(-1), sc], -1)
            return q.float().reshape(*lead, in_features), scale, torch.zeros_like(scale)
        d, dmin = _fp16_from_bytes(b[..., 0:2]), _fp16_from_bytes(b[..., 2:4])
        s = b[..., 4:16]
        sc = torch.cat([s[..., :4] & 63, (s[..., 8:] & 0xF) | ((s[..., :4] >> 6) << 4)], -1)
        m = torch.cat([s[..., 4:8] & 63, (s[..., 8:] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1)
        at = 16
        high = None
        if self.bits == 5:
            qh = b[..., at: at + 32].to(torch.int32)
            shifts = torch.arange(8, dtype=torch.int32, device=data.device)
            high = ((qh.unsqueeze(-2) >> shifts[:, None]) & 1).reshape(*lead, nb, SUPER).to(torch.uint8)
            at += 32
        qs = b[..., at: at + 128].reshape(*lead, nb, 4, 32)
        q = torch.stack([qs & 0xF, qs >> 4], -2).reshape(*lead, nb, SUPER)
        if high is not None:
            q = q | (high << 4)
        scale = torch.cat([d.unsqueeze(-1), sc.float()], -1)
        zero = torch.cat([dmin.unsqueeze(-1), m.float()], -1)
        return q.float().reshape(*lead, in_features), scale, zero


# ---------------------------------------------------------------------- q2_K / q3_K bit planes
# (code i of a super-block: half h = i // 128, plane j = i % 128 // 32, lane l = i % 32)


def _pack_2bit(q: torch.Tensor) -> torch.Tensor:
    """Codes' low two bits uint8 [..., 256] -> qs [..., 64]: bits 2j of qs[32 h + l] hold code 128 h + 32 j + l."""
    planes = (q & 3).reshape(*q.shape[:-1], 2, 4, 32)
    return (planes[..., 0, :] | (planes[..., 1, :] << 2) | (planes[..., 2, :] << 4)
            | (planes[..., 3, :] << 6)).reshape(*q.shape[:-1], 64)


def _unpack_2bit(qs: torch.Tensor) -> torch.Tensor:
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=qs.device)
    planes = (qs.reshape(*qs.shape[:-1], 2, 1, 32) >> shifts[:, None]) & 3
    return planes.reshape(*qs.shape[:-1], SUPER)


def _pack_high_bits(bit: torch.Tensor) -> torch.Tensor:
    """q3_K's hmask [..., 32]: bit i // 32 of hmask[i % 32] is code i's bit 2."""
    bits = (bit & 1).reshape(*bit.shape[:-1], 8, 32).to(torch.int32)
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.int32, device=bit.device)
    return (bits * weights[:, None]).sum(-2).to(torch.uint8)


def _unpack_high_bits(hmask: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=hmask.device)
    return ((hmask.unsqueeze(-2) >> shifts[:, None]) & 1).reshape(*hmask.shape[:-1], SUPER)


def _pack_q3_scales(sc: torch.Tensor) -> torch.Tensor:
    """q3_K's 16 signed 6-bit scales [..., 16] (in [-32, 31]) -> scales[12]: ``sc + 32``'s low nibble in
    byte j (j < 8) or the high nibble of byte j - 8; its top two bits at bits 2 (j // 4) of byte 8 + j % 4."""
    u = (sc + 32).to(torch.uint8)
    low, high = u & 0xF, (u >> 4).reshape(*u.shape[:-1], 4, 4)
    tops = high[..., 0, :] | (high[..., 1, :] << 2) | (high[..., 2, :] << 4) | (high[..., 3, :] << 6)
    return torch.cat([low[..., :8] | (low[..., 8:] << 4), tops], -1)


def _unpack_q3_scales(s: torch.Tensor) -> torch.Tensor:
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=s.device)
    low = torch.cat([s[..., :8] & 0xF, s[..., :8] >> 4], -1)
    high = ((s[..., 8:12].unsqueeze(-2) >> shifts[:, None]) & 3).reshape(*s.shape[:-1], 16)
    return (low | (high << 4)).float() - 32


# ggml's type ids (gguf.GGMLQuantizationType)
Q4_K = KQuantFormat("q4_K", 4, has_min=True, ggml_type=12)
Q5_K = KQuantFormat("q5_K", 5, has_min=True, ggml_type=13)
Q6_K = KQuantFormat("q6_K", 6, has_min=False, ggml_type=14, sub=16, scale_bits=8)
Q2_K = KQuantFormat("q2_K", 2, has_min=True, ggml_type=10, sub=16, scale_bits=4)
Q3_K = KQuantFormat("q3_K", 3, has_min=False, ggml_type=11, sub=16, scale_bits=6)
K_FORMATS = {f.name: f for f in (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)}
FORMATS.update(K_FORMATS)  # block_format() finds them by name: moepress.quantize imports this module

__all__ = ["K_FORMATS", "KQuantFormat", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "SUPER"]

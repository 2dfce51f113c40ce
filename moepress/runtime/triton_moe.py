"""Routed experts on a GPU: one Triton kernel over every expert of a layer, each at its own width.

moepress checkpoints keep per-expert mixed widths (2, 3, 4 and 8 bits, each weight with its own
group size, zero points or none, act-order or none), which no serving engine takes. This module
is the GPU half of the fast runtime (the CPU half is :mod:`moepress.runtime.fast`): at load time
(gpt-fast's ``convert_for_runtime``) a layer's packed experts are repacked, exactly, into one
buffer per projection set in a layout made for GPU loads, and a decode step's routed experts are
computed by three launches whatever the widths:

1. ``gate_up``: for every hit expert, ``h = silu(gate @ x) * (up @ x)`` for the tokens routed to it;
2. ``down``: ``down @ h`` for the same (token, slot) pairs, the K dimension split across programs
   when the output rows alone are too few to keep the GPU's memory system busy (decode, batch 1);
3. ``combine``: ``y[t] = sum_k g[t, k] * part[t, k]``, slots in order (deterministic: no atomics).

Each program of the matmul kernel is one (expert, tile of output rows, K split); it finds the
pairs routed to its expert from ``top_k_index`` itself (no host sync, no sort launched before it;
a program whose expert no token chose exits after reading the routing), reads its matrix's width,
offsets and group size from a metadata table, and branches on the width (uniform per program, so
no divergence). Widths absent from a layer are compiled out (``HAS2``..``HAS8``).

Layout (:func:`pack_codes`), for a matrix [N, K] and the layer's ``unit`` S (a power of two that
divides every group size): the K columns are cut into chunks of ``S * 8 // bits`` columns (``4S``
at 3 bits), zero-padded at the end of the row, and stored chunk-major, ``[n_chunks, N, row_bytes]``,
so a tile of rows of one chunk is one contiguous block of memory:

- 8, 4, 2 bits: ``row_bytes = S``; byte j of a row's chunk holds at bits ``bits * f`` the code of
  chunk column ``f * S + j`` (f < 8 // bits): a shift and a mask give S codes of consecutive
  columns, which meet S consecutive inputs.
- 3 bits: ``row_bytes = 3S/2`` per chunk of ``4S`` columns cut in eight sub-units of ``S/2``:
  two low planes of S/2 bytes (byte j of plane p holds at bits ``2f`` the two low bits of sub-unit
  ``4p + f``, column j) and one high plane of S/2 bytes (bit u: the third bit of sub-unit u).

Scales (fp16) and zero points (uint8) are the stored values, transposed to ``[n_groups, N]`` so a
tile's rows read them contiguously; act-order weights keep their codes in the order that makes
groups contiguous and gather the input through the permutation (as :class:`Int4Matmul` does). A
weight is dequantized in float32 exactly as the reference runtime does, ``scale * (q - zero)``,
rounded to the activation dtype, and multiplied with float32 accumulation (``tl.dot`` for
several rows, a multiply-and-sum for one), so outputs equal the reference's within float rounding.

Runs under ``TRITON_INTERPRET=1`` on CPU tensors (how the tests check it); the fast runtime uses
it on CUDA devices when triton is installed (:func:`prepare_cuda`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

try:  # an optional dependency (extra "gpu"); everything below needs it except the layout code
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

from ..quantize import QuantizedWeight
from ..quantize.packing import unpack_bits
from .kernels import contiguous_groups

WIDTHS = (2, 3, 4, 8)
UNITS = (64, 32, 16)  # candidate units S, largest first (S/2 >= 16 at 3 bits: tl.dot's minimum K)
# metadata table columns, one row per matrix (int64)
BITS, CODE_OFFSET, SCALE_OFFSET, ZERO_OFFSET, GROUP_SIZE, PERM_OFFSET = range(6)
META_COLUMNS = 6


def triton_available() -> bool:
    return triton is not None


def _interpreter_numpy_fix() -> None:
    """Triton 3.6's interpreter turns a scalar (a 1-element array) into a loop bound with
    ``int(array)``, which numpy >= 2.4 refuses (triton-lang/triton#9171, fixed upstream after 3.6);
    give it the element instead. Only under ``TRITON_INTERPRET=1``; compiled kernels are untouched."""
    from triton.runtime import interpreter

    if getattr(interpreter, "_moepress_numpy_fix", False):
        return
    original = interpreter._patch_lang_tensor

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch
    interpreter._moepress_numpy_fix = True


if triton is not None and triton.knobs.runtime.interpret:
    _interpreter_numpy_fix()


# ------------------------------------------------------------------------------------------ layout
def chunk_columns(bits: int, unit: int) -> int:
    """Columns per chunk of a ``bits``-bit matrix in the kernel layout."""
    return 4 * unit if bits == 3 else unit * (8 // bits)


def row_bytes(bits: int, unit: int) -> int:
    """Bytes one row of one chunk takes: ``bits * chunk_columns / 8``."""
    return 3 * unit // 2 if bits == 3 else unit


def pack_codes(codes: torch.Tensor, bits: int, unit: int) -> torch.Tensor:
    """Codes uint8 [N, K] -> the kernel layout uint8 [n_chunks, N, row_bytes] (see the module doc)."""
    n, k = codes.shape
    width = chunk_columns(bits, unit)
    chunks = -(-k // width)
    padded = torch.zeros(n, chunks * width, dtype=torch.uint8, device=codes.device)
    padded[:, :k] = codes
    # [chunks, N, sub-units, sub-unit width]
    if bits == 3:
        sub = padded.view(n, chunks, 8, unit // 2).permute(1, 0, 2, 3).to(torch.int32)
        low, high = sub & 3, (sub >> 2) & 1
        shifts = torch.arange(4, device=codes.device, dtype=torch.int32).view(1, 1, 4, 1) * 2
        planes = [(low[:, :, 4 * p:4 * p + 4] << shifts).sum(2) for p in (0, 1)]
        bit = torch.arange(8, device=codes.device, dtype=torch.int32).view(1, 1, 8, 1)
        planes.append((high << bit).sum(2))
        return torch.cat(planes, dim=-1).to(torch.uint8).contiguous()
    fields = 8 // bits
    sub = padded.view(n, chunks, fields, unit).permute(1, 0, 2, 3).to(torch.int32)
    shifts = torch.arange(fields, device=codes.device, dtype=torch.int32).view(1, 1, fields, 1) * bits
    return (sub << shifts).sum(2).to(torch.uint8).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, unit: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the codes uint8 [N, K]."""
    chunks, n, _ = packed.shape
    p = packed.to(torch.int32)
    if bits == 3:
        half = unit // 2
        shifts = torch.arange(4, device=p.device, dtype=torch.int32).view(1, 1, 4, 1) * 2
        low = torch.cat([(p[:, :, None, k * half:(k + 1) * half] >> shifts) & 3 for k in (0, 1)], dim=2)
        bit = torch.arange(8, device=p.device, dtype=torch.int32).view(1, 1, 8, 1)
        high = (p[:, :, None, 2 * half:] >> bit) & 1
        sub = low | (high << 2)  # [chunks, N, 8, S/2]
    else:
        fields = 8 // bits
        shifts = torch.arange(fields, device=p.device, dtype=torch.int32).view(1, 1, fields, 1) * bits
        sub = (p[:, :, None, :] >> shifts) & (2**bits - 1)  # [chunks, N, fields, S]
    codes = sub.permute(1, 0, 2, 3).reshape(n, -1)
    return codes[:, :in_features].to(torch.uint8)


def choose_unit(weights: list) -> int | None:
    """The largest unit S in :data:`UNITS` that divides every weight's group size (per-channel
    weights take any), S >= 32 when a weight has 3 bits; None if there is none."""
    for unit in UNITS:
        need = unit // 2 if any(w.bits == 3 for w in weights) else unit
        if need < 16:
            continue
        if all(w.group_size is None or w.group_size % (unit // 2 if w.bits == 3 else unit) == 0 for w in weights):
            return unit
    return None


def ineligible(weight) -> str | None:
    """Why the kernel cannot compute ``weight`` (a PackedWeight or QuantizedWeight), or None."""
    if not hasattr(weight, "qweight") or not hasattr(weight, "scales") or type(weight).__name__ not in (
            "PackedWeight", "QuantizedWeight"):
        return f"{type(weight).__name__} is not a packed weight"
    if weight.bits not in WIDTHS:
        return f"{weight.bits}-bit codes"
    if weight.g_idx is not None and contiguous_groups(weight.g_idx, weight.group_size, weight.in_features) is None:
        return "act-order groups that no column order makes contiguous"
    return None


class ExpertMatrices(nn.Module):
    """Matrices of one shape [N, K] (a layer's experts' gate and up projections, or their down
    projections), each at its own width, repacked into one code buffer, one scale buffer, one zero
    buffer and one permutation buffer, with a metadata row per matrix (:data:`META_COLUMNS`).
    Built once at load time; :meth:`matrix` gives back each stored weight exactly."""

    def __init__(self, weights: list, unit: int, device=None):
        super().__init__()
        first = weights[0]
        self.out_features, self.in_features, self.unit = first.out_features, first.in_features, unit
        device = device or first.qweight.device
        codes, scales, zeros, perms, meta = [], [], [], [], []
        offsets = dict(codes=0, scales=0, zeros=0, perms=0)
        for w in weights:
            if (w.out_features, w.in_features) != (self.out_features, self.in_features):
                raise ValueError("ExpertMatrices needs matrices of one shape")
            q = unpack_bits(w.qweight.to(device), w.bits, w.in_features)
            perm = None
            if w.g_idx is not None:
                perm = contiguous_groups(w.g_idx.to(device), w.group_size, w.in_features)
                q = q[:, perm]
            row = [w.bits, offsets["codes"], offsets["scales"], -1, w.group_size or w.in_features, -1]
            packed = pack_codes(q, w.bits, unit).reshape(-1)
            assert packed.numel() % 16 == 0  # row_bytes is a multiple of 16: the kernel relies on it
            codes.append(packed)
            offsets["codes"] += packed.numel()
            scales.append(w.scales.to(device).T.contiguous().reshape(-1))
            offsets["scales"] += scales[-1].numel()
            # the kernel reads one uint8 zero per group: a PackedWeight's stored zeros are packed at the
            # codes' width, so they are unpacked here (an in-memory copy, as the codes are repacked)
            zero_points = w.zero_points() if hasattr(w, "zero_points") else w.zeros
            if zero_points is not None:
                row[ZERO_OFFSET] = offsets["zeros"]
                zeros.append(zero_points.to(device).T.contiguous().reshape(-1))
                offsets["zeros"] += zeros[-1].numel()
            if perm is not None:
                row[PERM_OFFSET] = offsets["perms"]
                perms.append(perm.to(torch.int32))
                offsets["perms"] += perm.numel()
            meta.append(row)
        self.widths = tuple(sorted({w.bits for w in weights}))
        self.group_sizes = [w.group_size for w in weights]  # as stored (None: per channel)
        self.register_buffer("codes", torch.cat(codes))
        self.register_buffer("scales", torch.cat(scales))
        # empty tables still need a valid pointer: one byte / one index
        self.register_buffer("zeros", torch.cat(zeros) if zeros else torch.zeros(1, dtype=torch.uint8, device=device))
        self.register_buffer("perms", torch.cat(perms) if perms else torch.zeros(1, dtype=torch.int32, device=device))
        self.has_zeros, self.has_perm = bool(zeros), bool(perms)
        self.register_buffer("meta", torch.tensor(meta, dtype=torch.int64, device=device))

    def _apply(self, fn, recurse=True):
        """Device moves apply, dtype casts do not: ``model.to(torch.bfloat16)`` must not round the
        stored fp16 scales (as :class:`PackedWeight` guards its buffers)."""
        for name, buf in list(self._buffers.items()):
            self._buffers[name] = buf.to(fn(torch.empty(0, dtype=buf.dtype, device=buf.device)).device)
        return self

    def matrix(self, i: int) -> QuantizedWeight:
        """Matrix ``i`` as a :class:`QuantizedWeight` in its stored format (the repacking undone)."""
        bits, code_off, scale_off, zero_off, group, perm_off = self.meta[i].tolist()
        n, k, unit = self.out_features, self.in_features, self.unit
        chunks = -(-k // chunk_columns(bits, unit))
        size = chunks * n * row_bytes(bits, unit)
        packed = self.codes[code_off:code_off + size].view(chunks, n, row_bytes(bits, unit))
        codes = unpack_codes(packed, bits, unit, k)
        n_groups = -(-k // group)
        scales = self.scales[scale_off:scale_off + n_groups * n].view(n_groups, n).T.contiguous()
        zeros = None if zero_off < 0 else self.zeros[zero_off:zero_off + n_groups * n].view(n_groups, n).T.contiguous()
        g_idx = None
        if perm_off >= 0:
            perm = self.perms[perm_off:perm_off + k].long()
            codes = codes[:, torch.argsort(perm)]
            g_idx = torch.empty(k, dtype=torch.int16, device=codes.device)
            g_idx[perm] = (torch.arange(k, device=codes.device) // group).to(torch.int16)
        return QuantizedWeight.from_codes(codes, scales, zeros, bits, self.group_sizes[i], g_idx)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def matrix_bytes(self, i: int) -> int:
        """Bytes the kernel reads for matrix ``i`` (codes, scales, zeros, permutation)."""
        bits, _, _, zero_off, group, perm_off = self.meta[i].tolist()
        n, k = self.out_features, self.in_features
        n_groups = -(-k // group)
        chunks = -(-k // chunk_columns(bits, self.unit))
        return (chunks * n * row_bytes(bits, self.unit) + 2 * n_groups * n + (n_groups * n if zero_off >= 0 else 0)
                + (4 * k if perm_off >= 0 else 0))

    def extra_repr(self) -> str:
        return f"{len(self.meta)} x [{self.out_features}, {self.in_features}], widths={list(self.widths)}, unit={self.unit}"


# ------------------------------------------------------------------------------------------ kernels
if triton is not None:

    @triton.jit
    def _unit(acc, part, q, col0, x_ptr, x_rows, row_mask, x_stride, K, N, n_offs, n_mask,
              scales_ptr, scale_off, zeros_ptr, zero_off, perm_ptr, perm_off, group_size,
              BITS: tl.constexpr, UNIT: tl.constexpr, BLOCK_M: tl.constexpr, HAS_PERM: tl.constexpr,
              ACT: tl.constexpr, IEEE: tl.constexpr):
        """acc [BLOCK_M, BLOCK_N] += x[rows, col0:col0+UNIT] @ W[n, col0:col0+UNIT].T, W from codes q
        [BLOCK_N, UNIT] of one group (UNIT divides the group size). One row (BLOCK_M == 1): the products
        go into ``part`` [BLOCK_N, UNIT] instead, summed across columns once per matrix (a sum per unit
        would cost a cross-thread reduction each), and W stays float32 (the reference's value before
        it rounds it to the activation dtype)."""
        j = tl.arange(0, UNIT)
        cols = col0 + j
        col_mask = cols < K
        live = col0 < K  # a chunk's zero padding past the last column
        g = col0 // group_size
        s = tl.load(scales_ptr + scale_off + g * N + n_offs, mask=n_mask & live, other=0.0).to(tl.float32)
        asym = zero_off >= 0
        z = tl.load(zeros_ptr + tl.maximum(zero_off, 0) + g * N + n_offs, mask=n_mask & live & asym,
                    other=0).to(tl.float32)
        z = tl.where(asym, z, 1 << (BITS - 1))  # the symmetric grid's implicit zero, (maxq + 1) / 2
        # q as a float without an int-to-float conversion (a quarter-rate instruction, the bottleneck
        # at decode): the bits 0x4B000000 | q are the float 2^23 + q, and (2^23 + q) - (2^23 + z) is
        # q - z exactly (integers below 2^24), so w is the reference's scale * (q - zero) bit for bit
        q_plus = (q.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)
        w = s[:, None] * (q_plus - (z + 8388608.0)[:, None])
        if HAS_PERM:
            permuted = perm_off >= 0
            source = tl.load(perm_ptr + tl.maximum(perm_off, 0) + cols, mask=col_mask & permuted, other=0)
            xcols = tl.where(permuted, source, cols)
        else:
            xcols = cols
        x = tl.load(x_ptr + x_rows[:, None] * x_stride + xcols[None, :],
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        if BLOCK_M == 1:
            part += w * x.to(tl.float32)
        elif IEEE:
            acc = tl.dot(x.to(ACT), tl.trans(w.to(ACT)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x.to(ACT), tl.trans(w.to(ACT)), acc)
        return acc, part

    @triton.jit
    def _width(acc, x_ptr, x_rows, row_mask, x_stride, K, N, n_offs, n_mask, codes_ptr, code_off,
               scales_ptr, scale_off, zeros_ptr, zero_off, perm_ptr, perm_off, group_size, u_lo, u_hi,
               BITS: tl.constexpr, S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_PERM: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr):
        """One matrix of width BITS over split units [u_lo, u_hi) (a unit: 4S columns)."""
        if BITS == 3:
            part = tl.zeros([BLOCK_N, S // 2], dtype=tl.float32)
            j = tl.arange(0, S // 2)
            for c in range(u_lo, tl.minimum(u_hi, tl.cdiv(K, 4 * S))):
                base = codes_ptr + code_off + (c * N + n_offs[:, None]) * (3 * S // 2) + j[None, :]
                low0 = tl.load(base, mask=n_mask[:, None], other=0).to(tl.int32)
                low1 = tl.load(base + S // 2, mask=n_mask[:, None], other=0).to(tl.int32)
                high = tl.load(base + S, mask=n_mask[:, None], other=0).to(tl.int32)
                for u in tl.static_range(8):
                    if u < 4:
                        low = (low0 >> (2 * u)) & 3
                    else:
                        low = (low1 >> (2 * (u - 4))) & 3
                    q = low | (((high >> u) & 1) << 2)
                    acc, part = _unit(acc, part, q, c * (4 * S) + u * (S // 2), x_ptr, x_rows, row_mask, x_stride, K, N,
                                n_offs, n_mask, scales_ptr, scale_off, zeros_ptr, zero_off, perm_ptr, perm_off,
                                group_size, BITS, S // 2, BLOCK_M, HAS_PERM, ACT, IEEE)
        else:
            fields: tl.constexpr = 8 // BITS
            part = tl.zeros([BLOCK_N, S], dtype=tl.float32)
            j = tl.arange(0, S)
            per_unit: tl.constexpr = 4 // fields  # chunks in one split unit of 4S columns
            for c in range(u_lo * per_unit, tl.minimum(u_hi * per_unit, tl.cdiv(K, fields * S))):
                byte = tl.load(codes_ptr + code_off + (c * N + n_offs[:, None]) * S + j[None, :],
                               mask=n_mask[:, None], other=0).to(tl.int32)  # 32-bit shifts: fewer ops
                for f in tl.static_range(fields):
                    if BITS == 8:
                        q = byte
                    else:
                        q = (byte >> (BITS * f)) & ((1 << BITS) - 1)
                    acc, part = _unit(acc, part, q, c * (fields * S) + f * S, x_ptr, x_rows, row_mask, x_stride, K, N,
                                n_offs, n_mask, scales_ptr, scale_off, zeros_ptr, zero_off, perm_ptr, perm_off,
                                group_size, BITS, S, BLOCK_M, HAS_PERM, ACT, IEEE)
        if BLOCK_M == 1:
            acc += tl.sum(part, axis=1)[None, :]
        return acc

    @triton.jit
    def _matrix(mat, meta_ptr, x_ptr, x_rows, row_mask, x_stride, K, N, n_offs, n_mask, codes_ptr,
                scales_ptr, zeros_ptr, perm_ptr, u_lo, u_hi, S: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, HAS2: tl.constexpr, HAS3: tl.constexpr, HAS4: tl.constexpr,
                HAS8: tl.constexpr, HAS_PERM: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr):
        """x[rows] @ W_mat[n_offs].T over split units [u_lo, u_hi), W_mat at the width its metadata says."""
        row = meta_ptr + mat * 6
        bits = tl.load(row + 0)
        # every matrix's codes take a multiple of 16 bytes: saying so (x // 16 * 16 is exact) lets the
        # compiler prove 16-byte alignment and load a tile's rows with vector loads
        code_off = tl.load(row + 1) // 16 * 16
        scale_off = tl.load(row + 2)
        zero_off = tl.load(row + 3)
        group_size = tl.load(row + 4)
        perm_off = tl.load(row + 5)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if HAS4:
            if bits == 4:
                acc = _width(acc, x_ptr, x_rows, row_mask, x_stride, K, N, n_offs, n_mask, codes_ptr, code_off,
                             scales_ptr, scale_off, zeros_ptr, zero_off, perm_ptr, perm_off, group_size, u_lo, u_hi,
                             4, S, BLOCK_M, BLOCK_N, HAS_PERM, ACT, IEEE)
        if HAS3:
            if bits == 3:
                acc = _width(acc, x_ptr, x_rows, row_mask, x_stride, K, N, n_offs, n_mask, codes_ptr, code_off,
                             scales_ptr, scale_off, zeros_ptr, zero_off, perm_ptr, perm_off, group_size, u_lo, u_hi,
                             3, S, BLOCK_M, BLOCK_N, HAS_PERM, ACT, IEEE)
        if HAS2:
            if bits == 2:
                acc = _width(acc, x_ptr, x_rows, row_mask, x_stride, K, N, n_offs, n_mask, codes_ptr, code_off,
                             scales_ptr, scale_off, zeros_ptr, zero_off, perm_ptr, perm_off, group_size, u_lo, u_hi,
                             2, S, BLOCK_M, BLOCK_N, HAS_PERM, ACT, IEEE)
        if HAS8:
            if bits == 8:
                acc = _width(acc, x_ptr, x_rows, row_mask, x_stride, K, N, n_offs, n_mask, codes_ptr, code_off,
                             scales_ptr, scale_off, zeros_ptr, zero_off, perm_ptr, perm_off, group_size, u_lo, u_hi,
                             8, S, BLOCK_M, BLOCK_N, HAS_PERM, ACT, IEEE)
        return acc

    @triton.jit
    def _moe_matmul_kernel(x_ptr, x_stride, out_ptr, out_stride, split_stride, ids_ptr, gates_ptr, P, TOP_K,
                           meta_ptr, codes_ptr, scales_ptr, zeros_ptr, perm_ptr, N, K,
                           S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, P_BLOCK: tl.constexpr,
                           SPLIT_K: tl.constexpr, GATED: tl.constexpr, X_BY_TOKEN: tl.constexpr,
                           HAS2: tl.constexpr, HAS3: tl.constexpr, HAS4: tl.constexpr, HAS8: tl.constexpr,
                           HAS_PERM: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr):
        """Program (expert e, row tile, K split): for every (token, slot) pair p = t * TOP_K + k routed
        to e with a non-zero gate, out[split, p, tile] = W_e x[p's row] (GATED: silu(W_2e x) * W_2e+1 x).
        x's row is the token (X_BY_TOKEN) or the pair."""
        e = tl.program_id(0)
        pid_n = tl.program_id(1)
        split = tl.program_id(2)
        p = tl.arange(0, P_BLOCK)
        ids = tl.load(ids_ptr + p, mask=p < P, other=-1)
        gates = tl.load(gates_ptr + p, mask=p < P, other=0.0)
        match = (ids == e) & (gates != 0)  # a zero gate (dynamic pruning) is not computed
        count = tl.sum(match.to(tl.int32), axis=0)
        rank = tl.cumsum(match.to(tl.int32), axis=0) - 1
        n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n_offs < N
        units = tl.cdiv(K, 4 * S)
        per_split = tl.cdiv(units, SPLIT_K)
        u_lo = split * per_split
        u_hi = tl.minimum(u_lo + per_split, units)
        for m0 in range(0, count, BLOCK_M):  # decode: one pass (a program's pairs fit BLOCK_M)
            m = m0 + tl.arange(0, BLOCK_M)
            pair = tl.sum(tl.where(match[None, :] & (rank[None, :] == m[:, None]), p[None, :], 0), axis=1)
            row_mask = m < count
            if X_BY_TOKEN:
                x_rows = pair // TOP_K
            else:
                x_rows = pair
            if GATED:
                gate = _matrix(2 * e, meta_ptr, x_ptr, x_rows, row_mask, x_stride, K, N, n_offs, n_mask,
                               codes_ptr, scales_ptr, zeros_ptr, perm_ptr, u_lo, u_hi, S, BLOCK_M, BLOCK_N,
                               HAS2, HAS3, HAS4, HAS8, HAS_PERM, ACT, IEEE)
                up = _matrix(2 * e + 1, meta_ptr, x_ptr, x_rows, row_mask, x_stride, K, N, n_offs, n_mask,
                             codes_ptr, scales_ptr, zeros_ptr, perm_ptr, u_lo, u_hi, S, BLOCK_M, BLOCK_N,
                             HAS2, HAS3, HAS4, HAS8, HAS_PERM, ACT, IEEE)
                result = gate * tl.sigmoid(gate) * up
            else:
                result = _matrix(e, meta_ptr, x_ptr, x_rows, row_mask, x_stride, K, N, n_offs, n_mask,
                                 codes_ptr, scales_ptr, zeros_ptr, perm_ptr, u_lo, u_hi, S, BLOCK_M, BLOCK_N,
                                 HAS2, HAS3, HAS4, HAS8, HAS_PERM, ACT, IEEE)
            out = out_ptr + split * split_stride + pair[:, None] * out_stride + n_offs[None, :]
            tl.store(out, result.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _combine_kernel(parts_ptr, gates_ptr, out_ptr, P, N, TOP_K, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
        """out[t] = sum_k g[t, k] * sum_split parts[split, t * TOP_K + k], slots in order; a slot with
        a zero gate (never computed, its part never written) adds nothing."""
        t = tl.program_id(0)
        n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        n_mask = n < N
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k in range(0, TOP_K):
            gate = tl.load(gates_ptr + t * TOP_K + k).to(tl.float32)
            part = tl.zeros([BLOCK], dtype=tl.float32)
            for split in tl.static_range(SPLIT_K):
                part += tl.load(parts_ptr + (split * P + t * TOP_K + k) * N + n, mask=n_mask, other=0.0)
            acc += tl.where(gate != 0, part * gate, 0.0)
        tl.store(out_ptr + t * N + n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


# ------------------------------------------------------------------------------------------ module
@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters (what a GPU benchmark tunes; the defaults suit decode on an H100-class GPU).

    ``split_k=None`` splits the down projection's K dimension until about ``target_programs``
    programs have work (decode at batch 1 has too few output tiles otherwise)."""

    block_n_gate_up: int = 64
    block_n_down: int = 64
    split_k: int | None = None
    target_programs: int = 512
    num_warps: int = 4
    num_stages: int = 2


_ACT = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _is_silu(act_fn) -> bool:
    from transformers.activations import SiLUActivation

    return isinstance(act_fn, (nn.SiLU, SiLUActivation))


class TritonExperts(nn.Module):
    """A layer's routed experts (a :class:`PackedExperts`) repacked for the Triton kernel; the
    same forward signature ``(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K])``."""

    holds_packed_experts = True  # moepress.model.view reads its sizes as for PackedExperts

    def __init__(self, packed, config: KernelConfig | None = None, device=None):
        super().__init__()
        reason = self.ineligible(packed)
        if reason is not None:
            raise ValueError(f"TritonExperts cannot compute these experts: {reason}")
        self.num_experts, self.hidden_size = packed.num_experts, packed.hidden_size
        self.intermediate_size, self.act_fn = packed.intermediate_size, packed.act_fn
        self.config = config or KernelConfig()
        gate_up = [getattr(packed[e], lin) for e in range(self.num_experts) for lin in ("gate_proj", "up_proj")]
        down = [packed[e].down_proj for e in range(self.num_experts)]
        unit = choose_unit(gate_up + down)
        self.gate_up = ExpertMatrices(gate_up, unit, device)
        self.down = ExpertMatrices(down, unit, device)

    @staticmethod
    def ineligible(packed) -> str | None:
        """Why these experts cannot go through the kernel, or None."""
        if triton is None:
            return "triton is not installed (pip install 'moepress[gpu]')"
        if not _is_silu(packed.act_fn):
            return f"activation {type(packed.act_fn).__name__} (the kernel fuses SiLU only)"
        weights = [getattr(packed[e], lin) for e in range(packed.num_experts)
                   for lin in ("gate_proj", "up_proj", "down_proj")]
        for w in weights:
            reason = ineligible(w)
            if reason is not None:
                return reason
        if choose_unit(weights) is None:
            return "group sizes with no common power-of-two unit of at least 16 (32 with 3-bit codes)"
        return None

    def packed_weight(self, expert: int, linear: str) -> QuantizedWeight:
        """The stored weight of ``linear`` of ``expert``, read back from the kernel layout."""
        if linear == "down_proj":
            return self.down.matrix(expert)
        return self.gate_up.matrix(2 * expert + (linear == "up_proj"))

    def _launch(self, matrices: ExpertMatrices, x, out, ids, gates, top_k, block_m, block_n, split_k, gated,
                by_token, dtype):
        """One matmul launch; ``dtype``: the activations' (what tl.dot multiplies in), whatever x's storage."""
        config = self.config
        pairs = ids.numel()
        widths = matrices.widths
        grid = (self.num_experts, triton.cdiv(matrices.out_features, block_n), split_k)
        _moe_matmul_kernel[grid](
            x, x.stride(0), out, out.stride(-2), out.stride(0) if out.dim() == 3 else 0, ids, gates, pairs, top_k,
            matrices.meta, matrices.codes, matrices.scales, matrices.zeros, matrices.perms,
            matrices.out_features, matrices.in_features,
            S=matrices.unit, BLOCK_M=block_m, BLOCK_N=block_n, P_BLOCK=max(16, triton.next_power_of_2(pairs)),
            SPLIT_K=split_k, GATED=gated, X_BY_TOKEN=by_token, HAS2=2 in widths, HAS3=3 in widths,
            HAS4=4 in widths, HAS8=8 in widths, HAS_PERM=matrices.has_perm, ACT=getattr(tl, _ACT[dtype]),
            IEEE=dtype == torch.float32, num_warps=config.num_warps, num_stages=config.num_stages)

    def split_k(self, tokens: int, top_k: int) -> int:
        config = self.config
        units = -(-self.intermediate_size // (4 * self.down.unit))
        if config.split_k is not None:
            return max(1, min(config.split_k, units))
        tiles = -(-self.hidden_size // config.block_n_down) * min(self.num_experts, tokens * top_k)
        return max(1, min(units, -(-config.target_programs // tiles), 16))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if hidden_states.dtype not in _ACT:
            raise ValueError(f"TritonExperts computes float32, bfloat16 or float16 activations (got {hidden_states.dtype})")
        x = hidden_states.contiguous()
        tokens, top_k = top_k_index.shape
        ids = top_k_index.reshape(-1).contiguous()
        gates = top_k_weights.reshape(-1).contiguous()
        block_m = 1 if tokens == 1 else 16
        config = self.config
        # float32 between the launches: no rounding, and the down projection's loads need no conversion
        hidden = torch.empty(tokens * top_k, self.intermediate_size, dtype=torch.float32, device=x.device)
        self._launch(self.gate_up, x, hidden, ids, gates, top_k, block_m, config.block_n_gate_up, 1, True, True, x.dtype)
        split = self.split_k(tokens, top_k)
        parts = torch.empty(split, tokens * top_k, self.hidden_size, dtype=torch.float32, device=x.device)
        self._launch(self.down, hidden, parts, ids, gates, top_k, block_m, config.block_n_down, split, False, False, x.dtype)
        out = torch.empty_like(x)
        block = 256
        _combine_kernel[(tokens, triton.cdiv(self.hidden_size, block))](
            parts, gates, out, tokens * top_k, self.hidden_size, top_k, SPLIT_K=split, BLOCK=block)
        return out

    def nbytes(self) -> int:
        return self.gate_up.nbytes() + self.down.nbytes()

    def linear_bytes(self, expert: int, linear: str) -> int:
        """Bytes ``linear`` of ``expert`` holds in the kernel layout (as FastExperts.linear_bytes)."""
        if linear == "down_proj":
            return self.down.matrix_bytes(expert)
        return self.gate_up.matrix_bytes(2 * expert + (linear == "up_proj"))

    def expert_bytes(self, expert: int) -> int:
        """Bytes the kernel reads for one expert's three projections."""
        return sum(self.linear_bytes(expert, linear) for linear in ("gate_proj", "up_proj", "down_proj"))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}"


def prepare_cuda(model: nn.Module, options=None) -> nn.Module:
    """The fast runtime on a CUDA model: every :class:`PackedExperts` whose weights the kernel takes
    becomes a :class:`TritonExperts`, in place; everything else stays as loaded. Without triton, a
    CUDA device, or with ``options.exact`` (the kernel is not bit-exact), the model is unchanged."""
    from .packed_experts import PackedExperts

    if triton is None or (options is not None and getattr(options, "exact", False)):
        return model
    for name in [name for name, module in model.named_modules() if type(module) is PackedExperts]:
        module = model.get_submodule(name)
        devices = {t.device for t in module.buffers()}
        if len(devices) != 1 or next(iter(devices)).type != "cuda" or TritonExperts.ineligible(module) is not None:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, TritonExperts(module))
    return model


__all__ = ["ExpertMatrices", "KernelConfig", "TritonExperts", "choose_unit", "pack_codes", "prepare_cuda",
           "triton_available", "unpack_codes"]

"""GPTQ (Frantar et al. 2022), batched over a leading expert dimension.

Follows IST-DASLab/gptq `GPTQ.fasterquant` step for step, but every tensor
carries a leading expert dim E so that all experts of a fused MoE layer are
quantized in ONE computation: batched Cholesky (`torch.linalg.cholesky_ex`),
batched matmuls, and per-expert column permutations via `gather`. The only
Python loops are over columns / column blocks, as in the reference.

Notation (per expert): W [out, in] weights, H = sum_x x x^T [in, in] the
Hessian of the layer reconstruction error ||W X - Q X||^2 (any positive
multiple works: dampening is relative). GPTQ quantizes column j, then
spreads its error over the not-yet-quantized columns with the row j of the
upper Cholesky factor U of H^-1 (U^T U = H^-1):
    err_j   = (w_j - q_j) / U_jj
    W[:, k] -= err_j * U_jk        for k > j
which is the Optimal Brain Surgeon update, and accumulates the loss
    sum_j (w_j - q_j)^2 / U_jj^2 / 2.
The update is applied lazily in blocks of `block_size` columns (a rank-B
update `W[:, i2:] -= Err1 @ U[i1:i2, i2:]` after each block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .grid import CLIP_SHRINKS, UniformGrid
from .packed import QuantizedWeight
from .spec import QuantSpec

# How many times a failed Cholesky is retried with 10x the dampening.
MAX_DAMP_RETRIES = 5
# Retry base when the spec asks for damp == 0 (10x of 0 would never help).
_ZERO_DAMP_RETRY_BASE = 1e-3


@dataclass
class GPTQResult:
    """Output of `gptq_quantize`.

    weight:     the packed quantized weight (same lead shape as the input).
    loss:       GPTQ's accumulated loss sum((w - q)^2 / d^2) / 2 per expert,
                shape = lead shape ([E], or [] for a single matrix).
    damp_used:  the dampening *fraction* of mean(diag(H)) that made the
                Cholesky succeed per expert (spec.damp unless retried).
    """

    weight: QuantizedWeight
    loss: torch.Tensor
    damp_used: torch.Tensor


def _upper_cholesky_of_inverse(
    H: torch.Tensor, damp: float, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """U with U^T U = (H + lambda I)^-1 per expert, lambda = damp * mean(diag(H)).

    As in fasterquant: L = chol(H + lambda I); Hinv = cholesky_inverse(L);
    U = chol(Hinv, upper). Experts whose factorization fails (info != 0, a
    singular or indefinite H in float32) are retried alone with 10x the
    dampening, up to MAX_DAMP_RETRIES times; the rest are never refactored.
    """
    E, C, _ = H.shape
    eye = torch.eye(C, dtype=H.dtype, device=H.device)
    # abs(): a legit H has a nonnegative diagonal; a broken one must still get
    # a positive damping scale so that retries can make progress.
    diag_scale = H.diagonal(dim1=-2, dim2=-1).abs().mean(-1)  # [E]
    U = torch.empty_like(H)
    damp_used = torch.full((E,), float("nan"), dtype=torch.float32, device=H.device)
    todo = torch.arange(E, device=H.device)
    frac = damp
    for attempt in range(MAX_DAMP_RETRIES + 1):
        if attempt > 0:
            frac = (damp if damp > 0 else _ZERO_DAMP_RETRY_BASE) * 10**attempt
        Hd = H[todo] + (frac * diag_scale[todo])[:, None, None] * eye
        L, info = torch.linalg.cholesky_ex(Hd)
        # keep the inverse of failed experts well defined (they are discarded)
        L = torch.where((info == 0)[:, None, None], L, eye)
        Uc, info2 = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        ok = (info == 0) & (info2 == 0) & torch.isfinite(Uc).all(dim=-1).all(dim=-1)
        U[todo[ok]] = Uc[ok]
        damp_used[todo[ok]] = frac
        todo = todo[~ok]
        if todo.numel() == 0:
            return U, damp_used
    raise ValueError(
        f"GPTQ: the Hessian of {name} is not positive definite for experts {todo.tolist()} "
        f"even with damp {frac:g}; check their calibration statistics or quantize them with RTN"
    )


def _prepare(weight: torch.Tensor, hessian: torch.Tensor, name: str):
    """Validate shapes and values; float32 copies [E, R, C] / [E, C, C] with fasterquant's fixes for
    experts that saw no token (H = I: plain RTN) and dead inputs (diag(H) == 0: weight zeroed)."""
    single = weight.ndim == 2
    if single:
        weight, hessian = weight.unsqueeze(0), hessian.unsqueeze(0)
    if weight.ndim != 3:
        raise ValueError(f"{name}: weight must be [out, in] or [E, out, in] (got {tuple(weight.shape)})")
    E, R, C = weight.shape
    if tuple(hessian.shape) != (E, C, C):
        raise ValueError(
            f"{name}: Hessian shape {tuple(hessian.shape)} does not match weight {tuple(weight.shape)}; "
            f"expected {(E, C, C) if not single else (C, C)}"
        )
    W = weight.to(torch.float32, copy=True)
    H = hessian.to(torch.float32, copy=True)
    if not torch.isfinite(W).all():
        raise ValueError(f"{name} contains inf or nan; cannot quantize it")
    bad_h = (~torch.isfinite(H)).flatten(1).any(-1)
    if bad_h.any():
        raise ValueError(
            f"the Hessian of {name} contains inf or nan for experts {bad_h.nonzero().flatten().tolist()}; "
            "recollect calibration statistics"
        )
    eye = torch.eye(C, dtype=torch.float32, device=W.device)
    # An expert no calibration token was routed to has H == 0: use H = I,
    # which makes GPTQ's error feedback vanish (U = c*I), i.e. plain RTN.
    empty = (H == 0).flatten(1).all(-1)  # [E]
    H = torch.where(empty[:, None, None], eye, H)
    # fasterquant: dead = diag(H) == 0; H[dead, dead] = 1; W[:, dead] = 0.
    # An input that is always zero carries no information about its weight.
    dead = H.diagonal(dim1=-2, dim2=-1) == 0  # [E, C]
    H = H + torch.diag_embed(dead.to(H.dtype))
    W.masked_fill_(dead[:, None, :], 0.0)
    return W, H, single


@dataclass
class _Grid:
    """Columns [start, start + width) share one (scale, zero) per row, found when GPTQ reaches
    ``start`` from the error-updated weights; ``codebook`` None leaves them unquantized (kept).

    The codebook is the grid's value formulas: ``find_params(x) -> (scale, zero)`` reducing the
    last dim (the parameters stored), ``effective(scale, zero)`` the (scale, zero) [..., n] of each
    of its ``sub``-column pieces (n = 1 and ``sub`` None for a plain grid; a llama.cpp k-quant
    derives eight or sixteen from one super-block's parameters), ``quantize(x, s, z) -> codes`` and
    ``dequantize(codes, s, z)`` with the effective ones; a
    :class:`~moepress.quantize.grid.UniformGrid` or a llama.cpp
    :class:`~moepress.quantize.ggml_blocks.BlockFormat` (whose "zero" is a block's minimum)."""

    start: int
    width: int
    codebook: object | None
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    s_eff: torch.Tensor | None = None  # [E, R, n] effective per piece (preset for static grids)
    z_eff: torch.Tensor | None = None

    def fit(self, src: torch.Tensor, U: torch.Tensor | None = None, window: int = 0) -> None:
        """The grid of ``src`` [E, R, width]: the codebook's, or, for a codebook with ``clip_search``
        and ``U`` (the Cholesky factor's block of these columns), :func:`_search_grid`'s."""
        if U is not None and getattr(self.codebook, "clip_search", False):
            self.scale, self.zero = _search_grid(self.codebook, src, U, window)
        else:
            self.scale, self.zero = self.codebook.find_params(src)
        self.s_eff, self.z_eff = self.codebook.effective(self.scale, self.zero)

    def params_at(self, col: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The effective (scale, zero) [E, R] of column ``col``."""
        sub = getattr(self.codebook, "sub", None)
        k = 0 if sub is None or self.s_eff.shape[-1] == 1 else (col - self.start) // sub
        return self.s_eff[..., k], self.z_eff[..., k]


def _columns_loss(x: torch.Tensor, U: torch.Tensor, codebook, scale: torch.Tensor, zero: torch.Tensor,
                  window: int) -> torch.Tensor:
    """GPTQ's loss sum_j ((w_j - q_j) / U_jj)^2 per row of x [E, R, k] quantized column by column on
    the grid (scale, zero) [E, R], each column's error spread over the columns after it within its
    window of ``window`` columns (the OBS update of the column loop, U [E, k, k] the block of the
    upper Cholesky factor of H^-1 for these columns)."""
    x = x.clone()
    k = x.shape[-1]
    loss = torch.zeros(x.shape[:-1], dtype=torch.float32, device=x.device)
    for c in range(k):
        w = x[:, :, c]
        err = (w - codebook.dequantize(codebook.quantize(w, scale, zero), scale, zero)) / U[:, c, c].unsqueeze(-1)
        loss += err * err
        end = min(k, (c // window + 1) * window)
        if c + 1 < end:
            x[:, :, c + 1 : end] -= err.unsqueeze(-1) * U[:, c, c + 1 : end].unsqueeze(1)
    return loss


def _search_grid(codebook, x: torch.Tensor, U: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipping search inside GPTQ: (scale, zero) [E, R] of the columns x [E, R, k] chosen among
    the min/max grids of x shrunk by each factor of ``CLIP_SHRINKS`` (1 first: min/max itself), per
    row the one with the least GPTQ loss on these columns (:func:`_columns_loss`).

    Scoring a grid by the loss GPTQ will actually incur, rather than by its rounding error weighted
    by diag(H) (``grid.search_params``), matters: GPTQ's error feedback undoes much of a grid's
    rounding error but not its clipping, and on tiny-mixtral's trained layers the diag(H)-weighted
    choice raised the layer's output error at 2 and 3 bits where this one lowers it by 25-45%.

    Static act-order grids are fixed before the column loop from the original weights, which GPTQ
    then moves: scored on those (alone, or on a first pass's values), a search raised the layer
    error by 5-28% at group 32, and fitted when GPTQ first reaches a group (its other columns still
    to move) by 7-45%, so the spec refuses that combination."""
    best_scale = best_zero = best_loss = None
    for shrink in CLIP_SHRINKS:
        scale, zero = codebook.find_params(x * shrink)
        loss = _columns_loss(x, U, codebook, scale, zero, window)
        if best_loss is None:
            best_scale, best_zero, best_loss = scale, zero, loss
            continue
        better = loss < best_loss
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        best_loss = torch.where(better, loss, best_loss)
    return best_scale, best_zero


def _block_ends(grids: list[_Grid], C: int, block_size: int) -> list[int]:
    """Ends of the lazy-update blocks: every ``block_size`` columns, but cut before a grid that
    would straddle the end, so a grid's parameters are computed from fully updated columns."""
    ends, i1 = [], 0
    while i1 < C:
        i2 = min(i1 + block_size, C)
        straddling = next((g for g in grids if g.start < i2 < g.start + g.width), None)
        if straddling is not None and straddling.start > i1:
            i2 = straddling.start
        ends.append(i2)
        i1 = i2
    return ends


def _quantize_columns(W: torch.Tensor, Hinv: torch.Tensor, grids: list[_Grid], block_size: int):
    """GPTQ's column loop over W [E, R, C] (modified in place: kept columns end up error-updated).

    Returns (codes [E, R, C] float32, loss [E]). Each grid's scale/zero are set on it; a grid wider
    than a block (per-channel) takes them from W at its first column, which is up to date there
    (a clipping search then scores it block by block).
    """
    E, R, C = W.shape
    starts = {g.start: g for g in grids}
    codes = torch.zeros(E, R, C, dtype=torch.float32, device=W.device)
    loss = torch.zeros(E, dtype=torch.float32, device=W.device)
    grid = None
    i1 = 0
    for i2 in _block_ends(grids, C, block_size):
        count = i2 - i1
        W1 = W[:, :, i1:i2].clone()
        Err1 = torch.zeros(E, R, count, dtype=torch.float32, device=W.device)
        Hinv1 = Hinv[:, i1:i2, i1:i2]
        for i in range(count):
            col = i1 + i
            if col in starts:
                grid = starts[col]
                if grid.codebook is not None and grid.s_eff is None:  # (static grids come preset)
                    inside = i + grid.width <= count
                    src = W1[:, :, i : i + grid.width] if inside else W[:, :, col : col + grid.width]
                    U = Hinv1[:, i : i + grid.width, i : i + grid.width] if inside else \
                        Hinv[:, col : col + grid.width, col : col + grid.width]
                    grid.fit(src, U, block_size)
            if grid.codebook is None:
                continue  # kept: no error to spread, the column stays as updated so far
            w = W1[:, :, i]  # [E, R]
            d = Hinv1[:, i, i].unsqueeze(-1)  # [E, 1]
            scale, zero = grid.params_at(col)
            q = grid.codebook.quantize(w, scale, zero)
            codes[:, :, col] = q
            err = (w - grid.codebook.dequantize(q, scale, zero)) / d
            loss += err.square().sum(-1) / 2
            # OBS update of the remaining columns of this block
            W1[:, :, i + 1 :] -= err.unsqueeze(-1) * Hinv1[:, i, i + 1 :].unsqueeze(1)
            Err1[:, :, i] = err
        W[:, :, i1:i2] = W1
        # lazy batch update of everything right of the block
        if i2 < C:
            W[:, :, i2:] -= Err1 @ Hinv[:, i1:i2, i2:]
        i1 = i2
    return codes, loss


@dataclass
class GPTQCodes:
    """The codes and grid parameters GPTQ chose, before packing, in the original column order:
    codes [E, R, C], scales and zeros [E, R, G] (float32, as the codebook defines them), g_idx
    [E, C] or None, loss and damp_used [E]; ``single`` when the input had no expert dim."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor | None
    loss: torch.Tensor
    damp_used: torch.Tensor
    single: bool


def gptq_codes(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    codebook,
    group_size: int | None,
    act_order: bool = False,
    static_groups: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    name: str = "weight",
) -> GPTQCodes:
    """GPTQ's algorithm on any grid: ``codebook`` gives the value formulas (see :class:`_Grid`),
    ``group_size`` the columns sharing one (scale, zero) per row (None: per-channel).

    With groups, the effective block size is rounded up to a multiple of the
    group size so a group never straddles a lazy-update block: group params
    are then computed on the fully error-updated columns (fasterquant reads
    the not-yet-block-updated W when a group starts mid-block).
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive (got {block_size})")
    W, H, single = _prepare(weight, hessian, name)
    E, R, C = W.shape
    gs = group_size

    perm = invperm = None
    if act_order:
        # Per-expert permutation by descending diag(H) (fasterquant act_order):
        # H <- H[perm][:, perm], W <- W[:, perm], each expert with its own perm.
        perm = torch.argsort(H.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)  # [E, C]
        W = W.gather(-1, perm[:, None, :].expand(E, R, C))
        H = H.gather(-2, perm[:, :, None].expand(E, C, C)).gather(-1, perm[:, None, :].expand(E, C, C))
        invperm = torch.argsort(perm, dim=-1)

    Hinv, damp_used = _upper_cholesky_of_inverse(H, damp, name)
    del H

    static = act_order and static_groups and gs is not None
    if gs is None:
        # per-channel: one grid per row, from the whole (dead-zeroed) row up front
        grids = [_Grid(0, C, codebook)]
    elif static:
        # static act-order: each original group's grid from the original weights, fixed before any
        # error feedback; permuted column c uses the grid of its original group perm[c] // gs
        original = W.gather(-1, invperm[:, None, :].expand(E, R, C)).reshape(E, R, C // gs, gs)
        static_scale, static_zero = codebook.find_params(original)  # [E, R, G] (or [E, R, G, P])
        s_eff, z_eff = codebook.effective(static_scale, static_zero)  # [E, R, G, n]: n pieces per group
        piece = gs // s_eff.shape[-1]
        s_eff, z_eff = s_eff.reshape(E, R, -1), z_eff.reshape(E, R, -1)
        group_of = perm // piece  # [E, C]
        grids = [_Grid(c, 1, codebook,
                       s_eff=s_eff.gather(-1, group_of[:, c, None, None].expand(E, R, 1)),
                       z_eff=z_eff.gather(-1, group_of[:, c, None, None].expand(E, R, 1)))
                 for c in range(C)]
        block_size = gs * math.ceil(block_size / gs)
    else:
        block_size = gs * math.ceil(block_size / gs)
        grids = [_Grid(start, gs, codebook) for start in range(0, C, gs)]
    codes, loss = _quantize_columns(W, Hinv, grids, block_size)
    if static:
        scales, zeros = static_scale, static_zero
    else:
        scales = torch.stack([g.scale for g in grids], dim=2)  # [E, R, G] (or [E, R, G, P])
        zeros = torch.stack([g.zero for g in grids], dim=2)

    g_idx = None
    if act_order:
        # back to the original column order; groups stay contiguous in the
        # permuted order, so record each original column's group
        codes = codes.gather(-1, invperm[:, None, :].expand(E, R, C))
        if gs is not None and not static:
            g_idx = (torch.arange(C, device=W.device) // gs)[invperm]  # [E, C]
    return GPTQCodes(codes, scales, zeros, g_idx, loss, damp_used, single)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    block_size: int = 128,
    name: str = "weight",
) -> GPTQResult:
    """Quantize weight [E, out, in] (or [out, in]) with GPTQ given H [E, in, in] (or [in, in]).

    Always computes in float32. `spec.method` is not consulted (this *is* the
    GPTQ path); `spec.act_order`, `group_size`, `symmetric`, `damp`, `clip_search` are.
    """
    spec.check_in_features(weight.shape[-1], name)
    grid = UniformGrid(spec.bits, spec.symmetric, spec.clip_search)
    out = gptq_codes(weight, hessian, grid, spec.group_size,
                     act_order=spec.act_order, static_groups=spec.static_groups, damp=spec.damp,
                     block_size=block_size, name=name)
    qw = QuantizedWeight.from_codes(out.codes, out.scales, None if spec.symmetric else out.zeros, bits=spec.bits,
                                    group_size=spec.group_size, g_idx=out.g_idx)
    if out.single:
        return GPTQResult(qw.select(0), out.loss[0], out.damp_used[0])
    return GPTQResult(qw, out.loss, out.damp_used)


def gptq_quantize_segments(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    segments: list[tuple[int, QuantSpec | None]],
    block_size: int = 128,
    name: str = "weight",
) -> tuple[list[QuantizedWeight | torch.Tensor], torch.Tensor]:
    """GPTQ over column segments that each take their own option: ``segments`` lists (width, spec)
    left to right (spec None keeps the segment in float), tiling the input dimension.

    This is how a down projection whose intermediate neurons are split into groups of different bit
    widths is quantized: one GPTQ pass over all columns, so the error of a 2-bit segment is still
    compensated by the columns after it, but each segment is stored as its own matrix [*, out, width]
    (a QuantizedWeight, or the error-updated float columns of a kept segment). Symmetry and
    dampening come from the first quantized spec; act-order is not supported (segments are
    contiguous); each segment's spec says whether its grids are searched (``clip_search``).
    Returns (one weight per segment, GPTQ loss per expert).
    """
    quantized = [s for _, s in segments if s is not None]
    sym = quantized[0].symmetric if quantized else False
    damp = quantized[0].damp if quantized else 0.01
    if any(s.act_order for s in quantized):
        raise ValueError(f"{name}: act-order cannot be combined with per-segment options")
    C = weight.shape[-1]
    if sum(w for w, _ in segments) != C:
        raise ValueError(f"{name}: segments cover {sum(w for w, _ in segments)} columns, the weight has {C}")
    grids, start = [], 0
    for width, spec in segments:
        if spec is not None:
            spec.check_in_features(width, f"{name} (a {width}-column segment)")
        if spec is None or spec.group_size is None:
            grids.append(_Grid(start, width, None if spec is None else UniformGrid(spec.bits, sym, spec.clip_search)))
        else:
            grids.extend(_Grid(s, spec.group_size, UniformGrid(spec.bits, sym, spec.clip_search))
                         for s in range(start, start + width, spec.group_size))
        start += width
    W, H, single = _prepare(weight, hessian, name)
    Hinv, _ = _upper_cholesky_of_inverse(H, damp, name)
    del H
    codes, loss = _quantize_columns(W, Hinv, grids, block_size)
    out, start = [], 0
    for width, spec in segments:
        cols = slice(start, start + width)
        if spec is None:
            piece = W[:, :, cols].clone()
        else:
            mine = [g for g in grids if start <= g.start < start + width]
            scales = torch.stack([g.scale for g in mine], dim=-1)
            zeros = torch.stack([g.zero for g in mine], dim=-1)
            piece = QuantizedWeight.from_codes(codes[:, :, cols], scales, None if sym else zeros,
                                               bits=spec.bits, group_size=spec.group_size)
        out.append((piece[0] if isinstance(piece, torch.Tensor) else piece.select(0)) if single else piece)
        start += width
    return out, (loss[0] if single else loss)


def hessian_weighted_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """trace((W - Q) H (W - Q)^T) per expert: with H = X^T X (inputs as rows) this is
    ||X W^T - X Q^T||_F^2, the layer output error on the calibration inputs.

    Shapes: [E, out, in] x [E, in, in] -> [E], or [out, in] x [in, in] -> [].
    """
    D = weight.float() - dequantized.float()
    return ((D @ hessian.float()) * D).sum(dim=(-1, -2))

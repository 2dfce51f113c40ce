"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot"), batched over a leading expert dimension like `quantize.gptq`.

Follows IST-DASLab/sparsegpt `SparseGPT.fasterprune`: the same column loop as GPTQ over the upper
Cholesky factor U of H^-1 (U^T U = H^-1, d_j = U_jj), where a column's "quantization" is
replaced by pruning (and, jointly, quantizing) it. For column j with target q_j (0 where pruned,
the grid value or the weight itself where kept)
    err_j   = (w_j - q_j) / d_j
    W[:, k] -= err_j * U_jk        for k > j         (the Optimal Brain Surgeon update)
    loss   += sum err_j^2 / 2
with the lazy block updates of GPTQ. The mask is chosen adaptively from the OBS saliency
w^2 / d^2 of the error-updated weights (paper Sec. 3.3, "adaptive mask selection"): for each
block of `block_size` columns when the loop reaches it, for N:M at every m-th column.

Two departures from the reference, both so that the result can be stored as a rectangle
(`sparse.SparseWeight`):
- the reference thresholds a block's saliencies across all rows, so rows end up with different
  counts; here every row prunes its own share of each block, the shares of a row adding up to
  exactly `pattern.pruned_per_row`;
- with a QuantSpec (paper Sec. 3.5, "joint sparsification & quantization") the grid of a group is
  computed at its first column from the error-updated weights, as `quantize.gptq` does with
  act-order off, but over the group's KEPT weights only whenever their mask is already known:
  the block size is rounded up to a multiple of the group size, so for unstructured sparsity the
  mask of a whole group is chosen before its grid. For N:M (whose masks are chosen m columns at a
  time) and per-channel grids wider than a block, the grid covers all weights of the group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..quantize.gptq import _prepare, _upper_cholesky_of_inverse
from ..quantize.grid import dequantize_codes, find_params, quantize_codes
from ..quantize.spec import QuantSpec
from .pattern import check_pattern, kept_per_row, pruned_per_row
from .sparse import SparseWeight


@dataclass
class SparseGPTResult:
    """Output of `sparsegpt_prune`.

    weight:     the pruned (and quantized, with a spec) weight; `weight.dequantize()` is the dense
                reconstruction, exactly the values the column loop decided.
    loss:       the accumulated OBS loss sum((w - q)^2 / d^2) / 2 per expert, shape = lead shape.
                It equals trace((W - W^) H_damped (W - W^)^T) / 2 (up to float error), which is
                why it can be compared across experts and against GPTQ's.
    damp_used:  the dampening fraction of mean(diag(H)) that made the Cholesky succeed per expert.
    """

    weight: SparseWeight
    loss: torch.Tensor
    damp_used: torch.Tensor


@dataclass(frozen=True)
class _Pattern:
    """The validated pattern of one call: unstructured (`pruned` per row) or N:M."""

    pruned: int
    n: int | None = None
    m: int | None = None

    @property
    def structured(self) -> bool:
        return self.m is not None


def _lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the `count` lowest scores along the last dim (True = pruned); topk, so ties
    never change the count."""
    pruned = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if count > 0:
        pruned.scatter_(-1, scores.topk(count, dim=-1, largest=False).indices, True)
    return pruned


def _share(pruned: int, columns: int, end: int) -> int:
    """Weights a row has pruned once the loop passed column `end`: round(pruned * end / columns)
    (half up, in integers). Block shares are differences of these, so they sum to exactly
    `pruned` and each stays within its block's width."""
    return (2 * pruned * end + columns) // (2 * columns)


def _prune_columns(W: torch.Tensor, Hinv: torch.Tensor, pattern: _Pattern, spec: QuantSpec | None, block_size: int):
    """SparseGPT's column loop over W [E, R, C] (modified in place).

    Returns (keep bool [E, R, C], decided float32 [E, R, C] = final value of every weight,
    codes float32 [E, R, C] | None, scales [E, R, G] | None, zeros [E, R, G] | None, loss [E]).
    """
    E, R, C = W.shape
    keep = torch.ones(E, R, C, dtype=torch.bool, device=W.device)
    decided = torch.zeros(E, R, C, dtype=torch.float32, device=W.device)
    codes = torch.zeros_like(decided) if spec is not None else None
    group_width = C if spec is None or spec.group_size is None else spec.group_size
    scales, zeros = [], []
    scale = zero = None
    loss = torch.zeros(E, dtype=torch.float32, device=W.device)
    for i1 in range(0, C, block_size):
        i2 = min(i1 + block_size, C)
        count = i2 - i1
        W1 = W[:, :, i1:i2].clone()
        Hinv1 = Hinv[:, i1:i2, i1:i2]
        d = Hinv1.diagonal(dim1=-2, dim2=-1).unsqueeze(1)  # [E, 1, count]
        Err1 = torch.zeros(E, R, count, dtype=torch.float32, device=W.device)
        if pattern.structured:
            pruned1 = torch.zeros(E, R, count, dtype=torch.bool, device=W.device)
        else:
            share = _share(pattern.pruned, C, i2) - _share(pattern.pruned, C, i1)
            pruned1 = _lowest(W1.square() / d.square(), share)
        for i in range(count):
            col = i1 + i
            if pattern.structured and i % pattern.m == 0:
                m = pattern.m
                pruned1[:, :, i : i + m] = _lowest(W1[:, :, i : i + m].square() / d[:, :, i : i + m].square(), m - pattern.n)
            if spec is not None and col % group_width == 0:
                scale, zero = _group_grid(W, W1, pruned1, i, col, group_width, not pattern.structured, spec)
                scales.append(scale)
                zeros.append(zero)
            w = W1[:, :, i]  # [E, R]
            q = w
            if spec is not None:
                code = quantize_codes(w, scale, zero, spec.bits)
                codes[:, :, col] = code
                q = dequantize_codes(code, scale, zero)
            q = q.masked_fill(pruned1[:, :, i], 0.0)
            decided[:, :, col] = q
            err = (w - q) / d[:, :, i]
            loss += err.square().sum(-1) / 2
            # OBS update of the remaining columns of this block
            W1[:, :, i + 1 :] -= err.unsqueeze(-1) * Hinv1[:, i, i + 1 :].unsqueeze(1)
            Err1[:, :, i] = err
        keep[:, :, i1:i2] = ~pruned1
        # lazy batch update of everything right of the block
        if i2 < C:
            W[:, :, i2:] -= Err1 @ Hinv[:, i1:i2, i2:]
    if spec is None:
        return keep, decided, None, None, None, loss
    return keep, decided, codes, torch.stack(scales, dim=-1), torch.stack(zeros, dim=-1), loss


def _group_grid(W, W1, pruned1, i, col, width, mask_known, spec: QuantSpec):
    """(scale, zero) [E, R] of the group starting at block column i (global column col).

    Taken from the error-updated weights, over the kept ones only when the group lies in the
    current block and its mask is already chosen: pruned weights will be exactly 0, which the grid
    holds anyway, so letting them widen the range would only coarsen the kept ones.
    """
    inside = i + width <= W1.shape[-1]
    src = W1[:, :, i : i + width] if inside else W[:, :, col : col + width]  # (outside: col == 0, W is current)
    if inside and mask_known:
        # zeros never move find_params' range, which always contains 0: this is min/max over the kept
        src = src.masked_fill(pruned1[:, :, i : i + width], 0.0)
    return find_params(src, spec.bits, spec.symmetric)


def _check_args(weight, spec, damp, block_size, sparsity, n, m, name) -> None:
    if weight.ndim not in (2, 3):
        raise ValueError(f"{name}: weight must be [out, in] or [E, out, in] (got {tuple(weight.shape)})")
    check_pattern(sparsity, n, m, weight.shape[-1], name)
    if spec is not None:
        if spec.act_order:
            raise ValueError(f"{name}: SparseGPT prunes columns left to right; use a spec with act-order off")
        spec.check_in_features(weight.shape[-1], name)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"{name}: block_size must be a positive int, e.g. 128 (got {block_size!r})")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp < 0:
        raise ValueError(f"{name}: damp must be a finite fraction >= 0 of the mean Hessian diagonal, e.g. 0.01 (got {damp!r})")


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    spec: QuantSpec | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    name: str = "weight",
) -> SparseGPTResult:
    """Prune weight [E, out, in] (or [out, in]) with SparseGPT given H [E, in, in] (or [in, in]).

    Give `sparsity` (every row drops round(in * sparsity) weights) or `n`, `m` (n kept of every m
    consecutive columns). With `spec`, the kept weights are quantized jointly (its bits,
    group_size and symmetric are used; act-order is refused; `damp` here, not spec.damp, sets the
    dampening, so a prune-only and a joint call are dampened alike). Computes in float32; prune-
    only values are stored in the weight's dtype (exact for float32 weights, rounded once for
    bf16/fp16 ones, as the dense checkpoint would be). The block size is rounded up to a multiple
    of m and of the group size so that neither an N:M group nor a quantization group straddles
    a lazy-update block.
    """
    _check_args(weight, spec, damp, block_size, sparsity, n, m, name)
    W, H, single = _prepare(weight, hessian, name)
    E, R, C = W.shape
    Hinv, damp_used = _upper_cholesky_of_inverse(H, damp, name)
    del H
    group = spec.group_size if spec is not None and spec.group_size is not None else 1
    unit = math.lcm(m or 1, group)
    block_size = unit * math.ceil(block_size / unit)
    pattern = _Pattern(pruned_per_row(C, sparsity, n, m), n, m)
    keep, decided, codes, scales, zeros, loss = _prune_columns(W, Hinv, pattern, spec, block_size)
    k = kept_per_row(C, sparsity, n, m)
    if spec is None:
        values = decided[keep].reshape(E, R, k).to(weight.dtype if weight.is_floating_point() else torch.float32)
        sparse = SparseWeight.from_kept(keep, values=values, name=name)
    else:
        sparse = SparseWeight.from_kept(keep, codes=codes[keep].reshape(E, R, k), scales=scales,
                                        zeros=None if spec.symmetric else zeros, bits=spec.bits,
                                        group_size=spec.group_size, name=name)
    if single:
        return SparseGPTResult(sparse.select(0), loss[0], damp_used[0])
    return SparseGPTResult(sparse, loss, damp_used)

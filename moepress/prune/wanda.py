"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs") and magnitude pruning.

Wanda scores every weight by |W_ij| * ||X_j||_2, its magnitude times the norm of the input it
multiplies over the calibration tokens, and drops the lowest scores of each output row (Sec. 3,
Eq. 1). The norm is why it beats plain magnitude on LLMs: a few input features carry activations
orders of magnitude larger than the rest, and their small weights still move the output. It is
the diagonal-Hessian special case of SparseGPT's criterion and needs no weight update, so it is
the cheap baseline SparseGPT must beat; magnitude (|W| alone) is the baseline Wanda must beat.

Masks are boolean, True = kept, shaped like the weight [..., out, in] (batched over any lead dims,
e.g. all experts of a fused MoE layer at once).
"""

from __future__ import annotations

import torch

from .pattern import check_pattern, kept_per_row


def keep_highest(
    scores: torch.Tensor, *, sparsity: float | None = None, n: int | None = None, m: int | None = None,
    name: str = "weight",
) -> torch.Tensor:
    """Mask keeping, per output row, the highest `scores` [..., out, in] under the pattern.

    Selection is by `topk`, not a threshold, so ties never change the count: every row keeps
    exactly `kept_per_row` weights, and for N:M exactly n of every m consecutive columns.
    """
    if scores.ndim < 2:
        raise ValueError(f"{name} must have shape [..., out, in] (got {tuple(scores.shape)})")
    in_features = scores.shape[-1]
    check_pattern(sparsity, n, m, in_features, name)
    if sparsity is None:
        # [..., out, in/m, m]: the same row-wise choice, inside each group of m columns
        scores = scores.reshape(*scores.shape[:-1], in_features // m, m)
    k = kept_per_row(in_features, sparsity) if sparsity is not None else n
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(-1, scores.topk(k, dim=-1).indices, True)
    return mask.reshape(*mask.shape[:-2], in_features) if sparsity is None else mask


def _finite_weight(weight: torch.Tensor, name: str) -> torch.Tensor:
    w = weight.float()
    if not torch.isfinite(w).all():
        raise ValueError(f"{name} contains inf or nan; cannot prune it")
    return w


def magnitude_mask(
    weight: torch.Tensor, *, sparsity: float | None = None, n: int | None = None, m: int | None = None,
    name: str = "weight",
) -> torch.Tensor:
    """Keep the largest |W| per output row: the calibration-free baseline."""
    return keep_highest(_finite_weight(weight, name).abs(), sparsity=sparsity, n=n, m=m, name=name)


def wanda_mask(
    weight: torch.Tensor, sq_norm: torch.Tensor, *, sparsity: float | None = None, n: int | None = None,
    m: int | None = None, name: str = "weight",
) -> torch.Tensor:
    """Wanda's mask for weight [..., out, in] given sq_norm [..., in], the per-input-column sum of
    squares of the calibration inputs (diag of X^T X, i.e. diag(H) of GPTQ/SparseGPT).

    Any positive multiple of sq_norm gives the same mask (a mean instead of a sum is fine); a
    shared [in] sq_norm is broadcast over the lead dims.
    """
    w = _finite_weight(weight, name)
    lead, in_features = tuple(w.shape[:-2]), w.shape[-1]
    if tuple(sq_norm.shape) not in ((*lead, in_features), (in_features,)):
        raise ValueError(
            f"{name}: sq_norm has shape {tuple(sq_norm.shape)}, expected {(*lead, in_features)} "
            "(one sum of squared inputs per input column)"
        )
    norms = sq_norm.float()
    if not torch.isfinite(norms).all() or (norms < 0).any():
        raise ValueError(f"{name}: sq_norm must be finite and nonnegative (sums of squares); recollect the statistics")
    # An expert no calibration token reached has sq_norm == 0 everywhere: every score would tie at
    # 0 and the mask would be arbitrary. Fall back to magnitude there (as SparseGPT's H = I does).
    empty = (norms == 0).all(dim=-1, keepdim=True)
    norms = torch.where(empty, torch.ones_like(norms), norms)
    scores = w.abs() * norms.sqrt().unsqueeze(-2)
    return keep_highest(scores, sparsity=sparsity, n=n, m=m, name=name)

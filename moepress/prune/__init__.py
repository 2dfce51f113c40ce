"""Weight pruning: patterns, Wanda and magnitude masks, batched (per-expert) SparseGPT, and the
packed sparse storage they produce.

Pure tensor functions with no model knowledge, like `moepress.quantize`: callers hand in weights
[*lead, out, in], input statistics (sq_norm [*lead, in] or Hessians [E, in, in]) and a pattern
(a sparsity, or N:M) and get masks or `SparseWeight`s back.
"""

from .pattern import check_pattern, kept_per_row, pruned_per_row
from .sparse import SparseWeight, pack_mask, sparsify, unpack_mask
from .sparsegpt import SparseGPTResult, sparsegpt_prune
from .wanda import keep_highest, magnitude_mask, wanda_mask

__all__ = [
    "check_pattern",
    "kept_per_row",
    "pruned_per_row",
    "keep_highest",
    "magnitude_mask",
    "wanda_mask",
    "sparsegpt_prune",
    "SparseGPTResult",
    "SparseWeight",
    "sparsify",
    "pack_mask",
    "unpack_mask",
]

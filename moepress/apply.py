"""Apply one treatment to a batch of weights: [E, out, in] (all routed experts of a layer) or [out, in].

The compression pass (:class:`moepress.compress.QuantizeStep`) stores what these functions return,
and the cost table (:mod:`moepress.costs`) measures it, so an option's damage in the table is the
damage of exactly what compression would store. Quantizing goes to ``moepress.quantize`` (GPTQ or
RTN), pruning to ``moepress.prune`` (SparseGPT, jointly with GPTQ when quantized, or a Wanda or
magnitude mask whose kept weights are rounded to nearest).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .quantize import QuantSpec, gptq_quantize, hessian_weighted_error, rtn_quantize
from .treatment import Treatment


def pruning_pattern(treatment: Treatment) -> dict:
    """The pattern keywords of ``moepress.prune`` (``sparsity``, ``n``, ``m``) of a pruned treatment."""
    n, m = treatment.nm or (None, None)
    return {"sparsity": None if treatment.nm else treatment.sparsity, "n": n, "m": m}


def quantize_batch(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, name: str):
    """Quantize [E, out, in] (or [out, in]) weights; returns the packed weight and per-matrix error."""
    weight = weight.detach().float()
    if spec.method == "gptq":
        packed = gptq_quantize(weight, hessian, spec, name=name).weight
    else:
        packed = rtn_quantize(weight, spec, name=name)
    error = hessian_weighted_error(weight, packed.dequantize(torch.float32).to(weight.device), hessian)
    # The packed weight stays on the compute device: the layer runs again there before it moves back.
    return packed.to(weight.device), error.reshape(-1).cpu()


def quantize_blocks_batch(weight: torch.Tensor, hessian: torch.Tensor, treatment: Treatment, name: str):
    """Quantize [E, out, in] (or [out, in]) weights onto ``treatment``'s llama.cpp block format (GPTQ or
    RTN); returns the :class:`~moepress.quantize.ggml_blocks.BlockQuantizedWeight` and per-matrix error."""
    from .quantize.ggml_blocks import block_format, gptq_quantize_blocks, rtn_quantize_blocks

    fmt = block_format(treatment.format)
    weight = weight.detach().float()
    if treatment.method == "gptq":
        packed = gptq_quantize_blocks(weight, hessian, fmt, act_order=treatment.act_order, damp=treatment.damp,
                                      name=name).weight
    else:
        packed = rtn_quantize_blocks(weight, fmt, name=name)
    error = hessian_weighted_error(weight, packed.dequantize(torch.float32).to(weight.device), hessian)
    return packed.to(weight.device), error.reshape(-1).cpu()


def treat_batch(weight: torch.Tensor, hessian: torch.Tensor, treatment: Treatment, name: str):
    """Apply one quantized or pruned ``treatment`` to [E, out, in] (or [out, in]) weights; returns the
    stored weight (packed or sparse) and the per-matrix output error."""
    if treatment.format is not None:
        return quantize_blocks_batch(weight, hessian, treatment, name)
    if not treatment.pruned:
        return quantize_batch(weight, hessian, treatment.spec(), name)
    from .prune.sparse import sparsify
    from .prune.sparsegpt import sparsegpt_prune
    from .prune.wanda import magnitude_mask, wanda_mask

    dtype = weight.dtype
    w = weight.detach().float()
    pattern = pruning_pattern(treatment)
    spec = treatment.spec()  # None: pruned only, the kept weights stay as they are
    if treatment.pruner == "sparsegpt":
        sparse = sparsegpt_prune(w, hessian, **pattern, spec=spec, damp=treatment.damp, name=name).weight
    else:
        if treatment.pruner == "wanda":  # ||X_j||^2 is the Hessian's diagonal (up to the token count)
            mask = wanda_mask(w, hessian.diagonal(dim1=-2, dim2=-1).float(), **pattern)
        else:
            mask = magnitude_mask(w, **pattern)
        sparse = sparsify(w, mask, spec)
    if sparse.values is not None:  # pruned only: the kept weights in the model's own dtype
        sparse = replace(sparse, values=sparse.values.to(dtype))
    error = hessian_weighted_error(w, sparse.dequantize(torch.float32).to(w.device), hessian)
    return sparse.to(w.device), error.reshape(-1).cpu()


__all__ = ["pruning_pattern", "quantize_batch", "quantize_blocks_batch", "treat_batch"]

"""The weight-level check every peer row gets: was each linear really quantized, kept, or lost?

Perplexity alone cannot tell a lost or re-initialized expert on small models, so after a tool's
output is reloaded every compressible linear is read back through the tool's own kernel and
compared with the original weight.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn


def packed_linears(folder: str) -> int:
    """How many quantized linears the saved checkpoint holds (one ``qweight`` each)."""
    import struct

    count = 0
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with open(os.path.join(folder, name), "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                count += sum(k.endswith(".qweight") for k in json.loads(f.read(n)))
    return count


def module_weight(model, path: str) -> torch.Tensor:
    """The [out, in] float weight a (possibly quantized) linear module at ``path`` computes with.

    Any tool's module type works: the identity matrix goes through its own forward (its own
    dequantization kernel), so this is the weight the evaluated model really uses.
    """
    module = model.get_submodule(path)
    if type(module) is nn.Linear:
        return module.weight.detach().float()
    n_in = next(getattr(module, a) for a in ("in_features", "infeatures") if hasattr(module, a))
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    dtype = next((b.dtype for b in module.buffers() if b.is_floating_point()), dtype)
    with torch.no_grad():
        eye = torch.eye(n_in, dtype=dtype)
        return (module(eye) - module(torch.zeros(1, n_in, dtype=dtype))).float().T


def rtn_error(weight: torch.Tensor, bits: int, group_size: int) -> float:
    """Relative error of plain asymmetric min/max round-to-nearest at the same bits and groups."""
    rows = weight.reshape(-1, group_size) if group_size and weight.shape[1] % group_size == 0 else weight
    lo, hi = rows.min(1, keepdim=True).values, rows.max(1, keepdim=True).values
    scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(1e-12)
    zero = torch.round(-lo / scale)
    rtn = (torch.clamp(torch.round(rows / scale) + zero, 0, 2 ** bits - 1) - zero) * scale
    return float((rtn - rows).norm() / rows.norm().clamp_min(1e-12))


def verify_quantized(model, reference, bits: int, group_size: int) -> dict:
    """Check every compressible linear of the evaluated ``model`` against the original ``reference``.

    A weight counts as quantized when no output row holds more than 2**bits values per group
    (2**bits * groups per row: act-order may scatter a group's columns) and it is still near the
    original (relative error < 1: a re-initialized weight is not); as left in float when it equals the
    original up to a 16-bit cast. Anything else raises: the tool lost or replaced that weight.
    Returns ``quantized_fraction`` (of linear parameters), the float units' names and
    ``error_vs_rtn``: the largest ratio of a quantized weight's error to plain RTN's at the same
    bits/groups (GPTQ-type methods land near 1-1.5; a broken kernel or packing shows far above).
    """
    from moepress.model import MoEView

    view, quantized, total, floats, ratio = MoEView(reference), 0, 0, [], 0.0
    for layer in range(view.num_layers):
        pairs = [(u.name, u.module_path, None) for u in view.linear_units(layer)]
        store = view.experts(layer)
        if store is not None:
            pairs += [(store.unit_name(e, lin), store.module_path, (e, lin))
                      for e in range(store.num_experts) for lin in ("gate_proj", "up_proj", "down_proj")]
        for name, path, expert in pairs:
            if expert is None:
                original, got = reference.get_submodule(path).weight.detach().float(), module_weight(model, path)
            else:
                e, lin = expert
                original = store.weight(lin)[e].detach().float()
                fused = getattr(model.get_submodule(path), "gate_up_proj", None)
                if isinstance(fused, nn.Parameter):  # still fused 3-D in the evaluated model
                    inter = fused.shape[1] // 2
                    w = {"gate_proj": fused[e, :inter], "up_proj": fused[e, inter:]}.get(lin)
                    got = (model.get_submodule(path).down_proj[e] if w is None else w).detach().float()
                else:  # unfused into per-expert linears by the tool
                    got = module_weight(model, f"{path}.{e}.{lin}")
            if got.shape != original.shape:
                raise RuntimeError(f"{name}: evaluated weight has shape {tuple(got.shape)}, original {tuple(original.shape)}")
            groups = -(-original.shape[1] // group_size) if group_size else 1
            levels = int((got.sort(dim=1).values.diff(dim=1) != 0).sum(dim=1).max()) + 1
            error = float((got - original).norm() / original.norm().clamp_min(1e-12))
            total += original.numel()
            if levels <= 2 ** bits * groups and error < 1.0:
                quantized += original.numel()
                ratio = max(ratio, error / max(rtn_error(original, bits, group_size), 1e-12))
            elif error < 1e-2:
                floats.append(name)
            else:
                raise RuntimeError(f"{name}: evaluated weight is neither quantized ({levels} values in a row) nor "
                                   f"the original (relative error {error:.2f}): the tool lost or replaced it")
    return {"quantized_fraction": round(quantized / total, 5), "float_units": floats, "error_vs_rtn": round(ratio, 3)}


def record_checks(row: dict, model, reference, bits: int, group_size: int) -> dict:
    """Run :func:`verify_quantized` and put what it found in the row."""
    checks = verify_quantized(model, reference, bits, group_size)
    row["quantized_fraction"] = checks["quantized_fraction"]
    row["weight_error_vs_rtn"] = checks["error_vs_rtn"]
    notes = [row.get("note")]
    if checks["float_units"]:
        notes.append(f"{len(checks['float_units'])} linears left in float, e.g. {checks['float_units'][0]}")
    if checks["error_vs_rtn"] > 2:
        notes.append(f"a weight is {checks['error_vs_rtn']}x further from the original than plain RTN: "
                     "suspect the kernel or packing")
    row["note"] = "; ".join(filter(None, notes)) or None
    return row

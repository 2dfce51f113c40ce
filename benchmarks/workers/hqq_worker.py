"""Quality-benchmark worker for HQQ (Half-Quadratic Quantization, the `hqq` package by Mobius Labs).

HQQ is calibration-free: it fits each weight's zero/scale by a half-quadratic proximal solver, with
no data and no Hessian (so --calib/--calib-samples are unused, and --method is ignored: HQQ has one
algorithm). Settings are HQQ's defaults (``BaseQuantizeConfig``: asymmetric, optimize=True, axis=1,
round_zero only at 4 bits, scale/zero kept in the float16 compute dtype); group size 0 becomes
``group_size=None``, i.e. one scale/zero per output row.

Experts: HQQ's model patcher (``AutoHQQHFModel.quantize_model``; transformers 5's own ``HqqConfig``
path raises NotImplementedError) replaces ``nn.Linear`` modules only. transformers 5.x stores MoE experts as fused
3-D parameters (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I]), which that rule
silently skips, and HQQ's hand-written MixtralHQQ patch names the transformers 4.x layout
(``block_sparse_moe.experts[k].w1``) that no longer exists. So this worker quantizes every expert
slice itself with HQQ's own ``HQQLinear`` (same config, same solver, same packed format) and says so
in ``row["note"]``.

Saved format: one safetensors file in HQQ's encoded ``HQQLinear`` state-dict layout (what
``AutoHQQHFModel.save_to_safetensors`` / transformers' HQQ serialization write: packed ``W_q`` plus
``scale``/``zero`` and meta-data entries), with expert slices under ``<experts>.<proj>.<e>.``. It is
reloaded from disk into a float32 model for evaluation: ``HQQLinear`` modules for the linears,
dequantized HQQ slices for the fused experts.
"""

from __future__ import annotations

import json
import os
import time

import torch
from torch import nn

from benchmarks.workers.common import (
    eval_windows,
    evaluate_row,
    linear_params,
    load_reference,
    run,
)

COMPUTE = torch.float16  # HQQ's default compute dtype: scale and zero are stored in it


def fused_experts(model):
    """(module name, parameter name, module) for every 3-D expert weight the nn.Linear rule misses."""
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if param.ndim == 3:
                if getattr(module, "is_transposed", False):
                    raise NotImplementedError(f"{name}.{pname}: transposed expert layout is not handled")
                yield name, pname, module


def is_router(tag: str) -> bool:
    return tag.split(".")[-1] in ("gate", "router", "shared_expert_gate")


def quantize_slice(weight: torch.Tensor, quant_config: dict):
    from hqq.core.quantize import HQQLinear

    """One expert's [out, in] slice through HQQLinear, exactly as HQQ's patcher treats an nn.Linear."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    linear.weight.data.copy_(weight)
    return HQQLinear(linear, quant_config, compute_dtype=COMPUTE, device="cpu")


def to_float32(layer):
    """An HQQLinear reloaded from disk, set to dequantize and multiply in float32 (same stored values)."""
    layer.compute_dtype = torch.float32
    layer.meta["compute_dtype"] = torch.float32
    for key in ("scale", "zero"):
        layer.meta[key] = layer.meta[key].float()
    return layer


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


def save(model, expert_states: dict, out: str, config, tokenizer) -> None:
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if k not in expert_states["skip"]}
    state.update(expert_states["tensors"])
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, os.path.join(out, "model.safetensors"))
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def reload(out: str):
    """Rebuild a float32 model from the saved folder alone."""
    from hqq.core.quantize import HQQLinear, Quantizer
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(out)
    config.quantization_config = None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = load_file(os.path.join(out, "model.safetensors"))
    prefixes = sorted({k[: -len("W_q")] for k in state if k.endswith(".W_q")})
    layers = {p: {k[len(p):]: state.pop(k) for k in [k for k in state if k.startswith(p)]} for p in prefixes}
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    params = dict(model.named_parameters())
    filled = set()
    for prefix, layer_state in layers.items():
        layer = HQQLinear(None, None, compute_dtype=torch.float32, device="cpu")
        layer.load_state_dict(layer_state)
        layer = to_float32(layer)
        owner, _, last = prefix[:-1].rpartition(".")
        if owner in params:  # an expert slice: <experts>.<proj>.<e>
            with torch.no_grad():
                params[owner][int(last)].copy_(Quantizer.dequantize(layer.W_q, layer.meta))
            filled.add(owner)
        else:  # an nn.Linear becomes the HQQLinear it was saved as
            setattr(model.get_submodule(owner), last, layer)
            filled.update((prefix + "weight", prefix + "bias"))  # HQQLinear holds the bias too
    if unexpected or set(missing) - filled:
        raise RuntimeError(f"reload: unexpected {unexpected[:3]}, missing {sorted(set(missing) - filled)[:3]}")
    return model


def main(args, row):
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from hqq.models.base import get_linear_tags_from_model
    from hqq.models.hf.base import AutoHQQHFModel
    from transformers import AutoModelForCausalLM

    reference, tokenizer = load_reference(args.model)
    windows = eval_windows(tokenizer, args.eval, args.seq_len, args.eval_samples)
    params = linear_params(reference)
    quant_config = BaseQuantizeConfig(nbits=args.bits, group_size=args.group_size or None, axis=1)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, use_safetensors=True).eval()

    started = time.time()
    experts = {"skip": set(), "tensors": {}}
    slices = 0
    with torch.no_grad():
        for name, pname, module in list(fused_experts(model)):
            weight = getattr(module, pname)
            for e in range(weight.shape[0]):
                layer = quantize_slice(weight[e], quant_config)
                for k, v in layer.state_dict().items():
                    if v is not None:
                        experts["tensors"][f"{name}.{pname}.{e}.{k}"] = v
                slices += 1
            experts["skip"].add(f"{name}.{pname}")
            module.register_parameter(pname, nn.Parameter(torch.empty(0), requires_grad=False))  # bytes live above
        # One config per linear tag; routers (Qwen2-MoE's nn.Linear shared_expert_gate) stay float, as in
        # every row of this benchmark (a tag missing from the dict is left unquantized by HQQ).
        tags = get_linear_tags_from_model(model, ignore=["lm_head"])
        AutoHQQHFModel.quantize_model(model, quant_config={t: quant_config for t in tags if not is_router(t)},
                                      compute_dtype=COMPUTE, device="cpu")
    seconds = time.time() - started
    linears = sum(isinstance(m, HQQLinear) for m in model.modules())

    out = os.path.join(args.workdir, "hqq")
    save(model, experts, out, reference.config, tokenizer)
    with open(os.path.join(out, "hqq_config.json"), "w") as f:
        json.dump({"weight_quant_params": quant_config["weight_quant_params"], "compute_dtype": str(COMPUTE)}, f)
    del model
    import hqq

    row.update(tool="hqq", method="hqq", compress_seconds=round(seconds, 2),
               tool_version=getattr(hqq, "__version__", None) or _version("hqq"),
               note=(f"HQQ's patcher quantized {linears} nn.Linear modules; it skips transformers 5.x fused 3-D "
                     f"experts, so the worker quantized {slices} expert slices with HQQLinear itself "
                     f"(same config); calibration-free, method ignored"))
    model = reload(out)
    row = evaluate_row(model, reference, windows, out, params, row)
    return record_checks(row, model, reference, args.bits, args.group_size)


def _version(name: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(name)


if __name__ == "__main__":
    run(main)

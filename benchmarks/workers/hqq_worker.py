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
from benchmarks.workers.weight_check import record_checks

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

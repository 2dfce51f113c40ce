"""Quality-benchmark worker for llm-compressor (vLLM project): ``oneshot`` with a ``GPTQModifier``.

llm-compressor quantizes the ``nn.Linear`` modules its recipe targets with GPTQ and saves a
compressed-tensors checkpoint (packed int weights, scales, zero points) that vLLM serves. Here:
asymmetric int weights at ``--bits``, group strategy (``--group-size``) or channel strategy (0),
llm-compressor's GPTQ defaults otherwise (static act-order, 1% dampening, block 128); lm_head and
the routers stay in 16 bits, as in moepress.

Experts: transformers 5 stores routed experts as fused 3-D parameters (``experts.gate_up_proj``,
``experts.down_proj``), which a "Linear" target would silently skip. llm-compressor >= 0.14
linearizes them: loading under ``llmcompressor.utils.load_context`` replaces each fused experts
module by ``LinearExperts2D`` (one gate/up/down ``nn.Linear`` per expert), so GPTQ quantizes every
expert, and calibration sends every token through every expert (``moe_calibrate_all_experts``).
The checkpoint keeps per-expert 2-D tensors; reloading it under the same context decompresses
them into the same per-expert modules. llm-compressor ships no 2-D layout for Mixtral (it would
reload with random experts), so this worker declares Mixtral's ``w1/w2/w3`` layout with the tool's
own ``patch_moe_mappings``. Every reloaded linear weight is checked: quantized (at most 2**bits
levels per group), or left as the original (counted in ``note``: e.g. experts a future layout
leaves fused and unquantized), or else the row fails (e.g. experts re-initialised on reload).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time

import torch

from benchmarks.workers.common import (
    calib_windows,
    eval_windows,
    evaluate_row,
    linear_params,
    load_reference,
    run,
)

# Routers and the shared-expert gate stay unquantized; full-name regexes (re.match: anchor the end,
# else "re:.*mlp.gate" would also hit gate_proj).
IGNORE = ["lm_head", r"re:.*mlp\.gate$", r"re:.*block_sparse_moe\.gate$", r"re:.*shared_expert_gate$"]
UNQUANTIZED = ("embed_tokens", "lm_head", "norm", ".gate.", "shared_expert_gate")
WEIGHT_LEAVES = ("weight", "gate_up_proj", "up_proj", "down_proj")


def moe_layout(model_type: str):
    """Declare a per-expert 2-D checkpoint layout llm-compressor has no mapping for (Mixtral)."""
    if model_type != "mixtral":
        return contextlib.nullcontext()
    from llmcompressor.modeling import patch_moe_mappings
    from transformers.core_model_loading import WeightRenaming

    names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    renames = [WeightRenaming(rf"\.experts\.(\d+)\.{old}\.", rf".experts.\1.{new}.") for old, new in names.items()]
    return patch_moe_mappings("mixtral", renames, remove_targets=[".experts.gate_up_proj", ".experts.down_proj"])


@contextlib.contextmanager
def hidden_module_aliases():
    """Hide transformers' legacy module aliases while llm-compressor loads a linearized MoE.

    Loading experts as per-expert nn.Linear goes through transformers 5.17's ``apply_patches``,
    which calls ``dir()`` on every loaded ``transformers.*`` module; on the alias modules kept for
    old image-processor paths that imports torchvision, which a CPU-only venv cannot have (PyPI's
    torchvision needs a CUDA torch), and loading fails with "No module named 'torchvision'".
    """
    aliases = {name: m for name, m in list(sys.modules.items()) if name.startswith("transformers.")
               and getattr(m, "__file__", "") is None and (m.__doc__ or "").startswith("Alias module")}
    for name in aliases:
        del sys.modules[name]
    try:
        yield
    finally:
        sys.modules.update(aliases)


def oneshot_in_memory(args, modifier):
    """llm-compressor's ``oneshot`` with ``modifier`` on ``args.model`` (fused experts linearized), on
    moepress's calibration windows; returns (the compressed model in memory, the reference, the
    evaluation windows, compress seconds). For the trimming peers, which score the model in memory."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.utils import load_context
    from transformers import AutoConfig, AutoModelForCausalLM

    reference, tokenizer = load_reference(args.model)
    windows = eval_windows(tokenizer, args.eval, args.seq_len, args.eval_samples)
    tokens = calib_windows(tokenizer, args.calib, args.seq_len, args.calib_samples, seed=args.calib_seed)
    calib = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    with moe_layout(AutoConfig.from_pretrained(args.model).model_type), hidden_module_aliases():
        with load_context():
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, use_safetensors=True)
        started = time.time()
        oneshot(model=model, dataset=calib, recipe=modifier, tokenizer=tokenizer, num_calibration_samples=len(tokens),
                max_seq_length=args.seq_len, shuffle_calibration_samples=False)
        seconds = time.time() - started
    return model.eval(), reference, windows, seconds


def recipe(bits: int, group_size: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier

    # scale_dtype: scales rounded to float16 during GPTQ (moepress stores float16 scales too)
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=False, scale_dtype=torch.float16,
                               strategy="group" if group_size else "channel", group_size=group_size or None)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)  # W3A16/W2A16 asym are no presets
    return GPTQModifier(config_groups={"group_0": scheme}, ignore=IGNORE)


def levels_per_group(w: torch.Tensor, group_size: int) -> int:
    """Most distinct values in one quantization group (a row of the input dim, or a group of it)."""
    rows = w.detach().reshape(-1, w.shape[-1])
    g = group_size or rows.shape[1]
    full = rows.shape[1] // g * g
    groups = [rows[:, :full].reshape(-1, g)] + ([rows[:, full:]] if full < rows.shape[1] else [])
    return max(int(((s[:, 1:] != s[:, :-1]).sum(dim=1) + 1).max()) for s in (x.sort(dim=1).values for x in groups))


def check_quantized(model, reference, bits: int, group_size: int) -> tuple[int, list[str]]:
    """(quantized linear parameters, names of linear weights left as in the reference); raises on a
    weight that is neither (e.g. an expert re-initialised because the reload missed its tensors)."""
    ref = dict(reference.named_parameters())
    quantized, kept = 0, []
    for name, w in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]  # weights and fused 3-D experts, not the kept scales/zero points
        if w.dim() < 2 or leaf not in WEIGHT_LEAVES or any(m in name for m in UNQUANTIZED):
            continue
        if levels_per_group(w, group_size) <= 2**bits:
            quantized += w.numel()
        elif name in ref and torch.equal(w.detach(), ref[name].detach()):
            kept.append(name)
        else:
            raise RuntimeError(f"reloaded {name} {tuple(w.shape)} is neither quantized nor the original weight")
    return quantized, kept


def float32_scale_bytes(folder: str) -> int:
    """Bytes of float32 ``*weight_scale`` tensors in the checkpoint (a float32 model keeps float32 scales)."""
    from safetensors import safe_open

    total = 0
    for name in (n for n in os.listdir(folder) if n.endswith(".safetensors")):
        with safe_open(os.path.join(folder, name), "pt") as f:
            for key in f.keys():
                if key.endswith("weight_scale") and f.get_slice(key).get_dtype() == "F32":
                    total += 4 * math.prod(f.get_slice(key).get_shape())
    return total


def main(args, row):
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.utils import load_context
    from transformers import AutoConfig, AutoModelForCausalLM, CompressedTensorsConfig

    reference, tokenizer = load_reference(args.model)
    windows = eval_windows(tokenizer, args.eval, args.seq_len, args.eval_samples)
    tokens = calib_windows(tokenizer, args.calib, args.seq_len, args.calib_samples, seed=args.calib_seed)
    calib = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    layout = moe_layout(AutoConfig.from_pretrained(args.model).model_type)
    out = os.path.join(args.workdir, "out")
    # (the reference is loaded first: load_context leaves its 2-D conversion mapping registered, and a
    # later plain from_pretrained of the same architecture would then miss the fused experts)

    with layout, hidden_module_aliases():
        with load_context():  # fused 3-D experts -> per-expert nn.Linear
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, use_safetensors=True)
        started = time.time()
        oneshot(model=model, dataset=calib, recipe=recipe(args.bits, args.group_size), tokenizer=tokenizer,
                num_calibration_samples=len(tokens), max_seq_length=args.seq_len, shuffle_calibration_samples=False)
        seconds = time.time() - started
        model.save_pretrained(out, save_compressed=True)
        tokenizer.save_pretrained(out)
        del model
        with load_context():  # per-expert modules again; compressed-tensors decompresses on load
            compressed = AutoModelForCausalLM.from_pretrained(
                out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()

    quantized, kept = check_quantized(compressed, reference, args.bits, args.group_size)
    params = linear_params(reference)
    row.update(tool="llmcompressor", method="gptq", compress_seconds=round(seconds, 2),
               quantized_fraction=round(quantized / params, 4))
    evaluate_row(compressed, reference, windows, out, params, row)
    # Scales hold float16 values (scale_dtype) but this float32 model writes them as float32; a
    # bf16/fp16 model (and moepress) stores 16 bits. Report both, the harness figure unchanged.
    row["bits_per_param_fp16_scales"] = round(row["bits_per_param"] - 4 * float32_scale_bytes(out) / params, 4)
    row["note"] = ("experts linearized to per-expert nn.Linear (LinearExperts2D) and GPTQ-quantized; "
                   "scales saved as float32 by this float32 model, see bits_per_param_fp16_scales")
    if kept:
        row["note"] += f"; {len(kept)} linear weights left in 16 bits (e.g. {kept[0]})"
    return row


if __name__ == "__main__":
    run(main)

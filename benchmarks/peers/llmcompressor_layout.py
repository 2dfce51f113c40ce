"""Record llm-compressor's own compressed-tensors export of tiny MoE models, so CI can check ours against it.

``moepress export --format compressed-tensors`` must write what vLLM loads, and the closest thing to
vLLM's own word on that here is llm-compressor's export of the same scheme (vLLM cannot serve int4
MoE on this CPU: issue 12). This script quantizes tiny random models with llm-compressor's
``QuantizationModifier`` (round to nearest: the layout does not depend on the algorithm), saves
them with ``save_compressed=True`` (``pack-quantized``) and writes, per model and scheme, every
tensor's name, dtype and shape and the ``quantization_config`` of config.json to
``tests/data/llmcompressor_layout.json``. CI has no llm-compressor; ``tests/test_compressed_tensors_export.py``
reads the JSON.

Run in llm-compressor's environment (``bash benchmarks/peers/setup_llmcompressor.sh``)::

    OMP_NUM_THREADS=1 PYTHONPATH=. .venvs/llmcompressor/bin/python benchmarks/peers/llmcompressor_layout.py

Mixtral: llm-compressor 0.14 has no per-expert 2-D layout for it, so its own ``patch_moe_mappings``
declares the hub's ``w1/w2/w3`` names (``benchmarks.workers.llmcompressor_worker.moe_layout``);
without it the checkpoint gets hybrid ``experts.N.gate_proj`` keys that neither transformers nor
vLLM's Mixtral loader read. Qwen3-MoE uses llm-compressor's built-in layout, unpatched.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile

import torch

# The tiny models: two decoder layers, inputs of 256 so that group 128 makes two groups per row.
MODELS = {
    "mixtral": dict(hidden_size=256, intermediate_size=256, num_hidden_layers=2),
    "qwen3_moe": dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=256, num_hidden_layers=2),
}
SCHEMES = ("W4A16", "W4A16_ASYM", "W8A16")
# Routers stay in 16 bits (full-name regexes: compressed-tensors' re.match would let ".*mlp.gate"
# hit gate_proj too); lm_head is llm-compressor's usual ignore.
IGNORE = ["lm_head", r"re:.*mlp\.gate$", r"re:.*block_sparse_moe\.gate$"]
DTYPE = torch.bfloat16
OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "data", "llmcompressor_layout.json")


def export(model_type: str, scheme: str, folder: str) -> dict:
    """llm-compressor's export of the tiny ``model_type`` at ``scheme``: tensors and quantization_config."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.utils import load_context
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from benchmarks.workers.llmcompressor_worker import hidden_module_aliases, moe_layout
    from moepress.model.tiny import build_tiny_model

    source = os.path.join(folder, f"{model_type}-source")
    if not os.path.isdir(source):
        build_tiny_model(model_type, **MODELS[model_type]).to(DTYPE).save_pretrained(source)
    out = os.path.join(folder, f"{model_type}-{scheme}")
    with moe_layout(model_type), hidden_module_aliases():
        with load_context():  # fused 3-D experts -> one nn.Linear per expert, so "Linear" reaches them
            model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPE, use_safetensors=True)
        oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=scheme, ignore=IGNORE))
        model.save_pretrained(out, save_compressed=True)
    tensors = {}
    for name in sorted(n for n in os.listdir(out) if n.endswith(".safetensors")):
        with safe_open(os.path.join(out, name), "pt") as f:
            for key in f.keys():
                part = f.get_slice(key)
                tensors[key] = [part.get_dtype(), list(part.get_shape())]
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    return {"tensors": dict(sorted(tensors.items())), "quantization_config": config["quantization_config"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=OUT, help="the JSON to write (default tests/data/llmcompressor_layout.json)")
    parser.add_argument("--work", default=None, help="folder for the tiny models and exports (default: a temp folder)")
    args = parser.parse_args()
    import compressed_tensors
    import llmcompressor
    import transformers

    record = {
        "about": "llm-compressor's save_compressed=True export of tiny random models (benchmarks/peers/llmcompressor_layout.py); "
                 "tensor name -> [safetensors dtype, shape], and config.json's quantization_config",
        "versions": {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                     "transformers": transformers.__version__, "torch": torch.__version__},
        "dtype": str(DTYPE).removeprefix("torch."),
        "ignore": IGNORE,
        "models": {model_type: {"config": overrides, "schemes": {}} for model_type, overrides in MODELS.items()},
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.work or tmp
        for model_type in MODELS:
            for scheme in SCHEMES:
                print(f"{model_type} {scheme}", file=sys.stderr)
                record["models"][model_type]["schemes"][scheme] = export(model_type, scheme, folder)
    part = f"{args.out}.tmp"
    text = json.dumps(record, indent=1)
    # one line per tensor: innermost lists ([dtype, [shape]]) written on one line
    text = re.sub(r"\[\s*([^\[\]{}]*?)\s*\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    text = re.sub(r"\[\s*(\"[A-Z0-9]+\",)\s*(\[[^\[\]]*\])\s*\]", r"[\1 \2]", text)
    with open(part, "w") as f:
        f.write(text + "\n")
    os.replace(part, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

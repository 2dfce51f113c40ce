"""Pruning peer worker: llm-compressor's ``SparseGPTModifier`` and ``WandaPruningModifier`` on the
routed experts (unstructured or N:M), no quantization, scored in memory against the uncompressed
model on the same windows as moepress's rows.

    .venvs/llmcompressor/bin/python -m benchmarks.workers.prune_worker --model zoo/models/tiny-mixtral \
        --pruner sparsegpt --pattern 2:4 --workdir /tmp/w
"""

from __future__ import annotations

import time

import torch

from benchmarks.workers.common import calib_windows, eval_windows, evaluate_row, linear_params, load_reference, run
from benchmarks.workers.llmcompressor_worker import hidden_module_aliases, moe_layout

EXPERT_LINEARS = r"re:.*experts\.\d+\.(gate_proj|up_proj|down_proj)$"


def parse():
    from benchmarks.workers.common import worker_args

    def extra(p):
        p.add_argument("--pruner", choices=("sparsegpt", "wanda"), required=True)
        p.add_argument("--pattern", required=True, help="50%% (unstructured) or N:M")

    return worker_args(extra)


def modifier(pruner: str, pattern: str):
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    if ":" in pattern:
        n, m = (int(v) for v in pattern.split(":"))
        sparsity, structure = 1 - n / m, pattern
    else:
        sparsity, structure = float(pattern.rstrip("%")) / 100, "0:0"
    cls = SparseGPTModifier if pruner == "sparsegpt" else WandaPruningModifier
    return cls(sparsity=sparsity, mask_structure=structure, targets=[EXPERT_LINEARS])


def main(args, row):
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.utils import load_context
    from transformers import AutoConfig, AutoModelForCausalLM

    reference, tokenizer = load_reference(args.model)
    windows = eval_windows(tokenizer, args.eval, args.seq_len, args.eval_samples)
    tokens = calib_windows(tokenizer, args.calib, args.seq_len, args.calib_samples)
    calib = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    with moe_layout(AutoConfig.from_pretrained(args.model).model_type), hidden_module_aliases():
        with load_context():
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, use_safetensors=True)
        started = time.time()
        oneshot(model=model, dataset=calib, recipe=modifier(args.pruner, args.pattern), tokenizer=tokenizer,
                num_calibration_samples=len(tokens), max_seq_length=args.seq_len, shuffle_calibration_samples=False)
        seconds = time.time() - started
    model.eval()
    zeros = total = 0
    for name, param in model.named_parameters():
        if ".experts." in name and param.dim() == 2:
            zeros += int((param == 0).sum())
            total += param.numel()
    row.update(tool="llmcompressor", method=args.pruner, pattern=args.pattern, compress_seconds=round(seconds, 2),
               expert_sparsity=round(zeros / max(total, 1), 4))
    return evaluate_row(model, reference, windows, None, linear_params(reference), row)


if __name__ == "__main__":
    run(main, parse)

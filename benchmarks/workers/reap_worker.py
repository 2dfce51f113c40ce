"""Expert-drop peer worker: llm-compressor's ``REAPPruningModifier`` (REAP, arXiv 2510.13999).

    .venvs/llmcompressor/bin/python -m benchmarks.workers.reap_worker --model zoo/models/tiny-mixtral \
        --drop 0.25 --workdir /tmp/w

``oneshot`` removes the lowest-saliency experts of every MoE layer (S_j = mean over routed tokens of
g_j ||f_j||) on the same calibration windows moepress uses; the pruned model is scored in memory
against the uncompressed one on the same evaluation windows (no quantization: an expert drop alone).
"""

from __future__ import annotations

import time

import torch

from benchmarks.workers.common import calib_windows, eval_windows, evaluate_row, linear_params, load_reference, run
from benchmarks.workers.llmcompressor_worker import hidden_module_aliases, moe_layout


def parse():
    from benchmarks.workers.common import worker_args

    return worker_args(lambda p: p.add_argument("--drop", type=float, default=0.25,
                                                help="share of each MoE layer's experts to remove"))


def main(args, row):
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.reap import REAPPruningModifier
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
        oneshot(model=model, dataset=calib, recipe=REAPPruningModifier(sparsity=args.drop), tokenizer=tokenizer,
                num_calibration_samples=len(tokens), max_seq_length=args.seq_len, shuffle_calibration_samples=False)
        seconds = time.time() - started
    model.eval()
    row.update(tool="llmcompressor", method="reap", drop=args.drop, compress_seconds=round(seconds, 2))
    return evaluate_row(model, reference, windows, None, linear_params(reference), row)


if __name__ == "__main__":
    run(main, parse)

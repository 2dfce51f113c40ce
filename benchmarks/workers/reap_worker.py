"""Expert-drop peer worker: llm-compressor's ``REAPPruningModifier`` (REAP, arXiv 2510.13999).

    .venvs/llmcompressor/bin/python -m benchmarks.workers.reap_worker --model zoo/models/tiny-mixtral \
        --drop 0.25 --workdir /tmp/w

``oneshot`` removes the lowest-saliency experts of every MoE layer (S_j = mean over routed tokens of
g_j ||f_j||) on the same calibration windows moepress uses; the pruned model is scored in memory
against the uncompressed one on the same evaluation windows (no quantization: an expert drop alone).
"""

from __future__ import annotations

from benchmarks.workers.common import evaluate_row, linear_params, run
from benchmarks.workers.llmcompressor_worker import oneshot_in_memory


def parse():
    from benchmarks.workers.common import worker_args

    return worker_args(lambda p: p.add_argument("--drop", type=float, default=0.25,
                                                help="share of each MoE layer's experts to remove"))


def main(args, row):
    from llmcompressor.modifiers.pruning.reap import REAPPruningModifier

    model, reference, windows, seconds = oneshot_in_memory(args, REAPPruningModifier(sparsity=args.drop))
    row.update(tool="llmcompressor", method="reap", drop=args.drop, compress_seconds=round(seconds, 2))
    return evaluate_row(model, reference, windows, None, linear_params(reference), row)


if __name__ == "__main__":
    run(main, parse)

"""Pruning peer worker: llm-compressor's ``SparseGPTModifier`` and ``WandaPruningModifier`` on the
routed experts (unstructured or N:M), no quantization, scored in memory against the uncompressed
model on the same windows as moepress's rows.

    .venvs/llmcompressor/bin/python -m benchmarks.workers.prune_worker --model zoo/models/tiny-mixtral \
        --pruner sparsegpt --pattern 2:4 --workdir /tmp/w
"""

from __future__ import annotations

from benchmarks.workers.common import evaluate_row, linear_params, run
from benchmarks.workers.llmcompressor_worker import oneshot_in_memory

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
    model, reference, windows, seconds = oneshot_in_memory(args, modifier(args.pruner, args.pattern))
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

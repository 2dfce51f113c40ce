"""Quality-benchmark worker for GPTQModel (ModelCloud's `gptqmodel`, the successor of AutoGPTQ).

GPTQModel runs GPTQ (Hessian-based error-compensating rounding, layer by layer on the outputs of the
already-quantized layers before it) on calibration token windows: here the SAME windows moepress
calibrates on. Settings: ``QuantizeConfig(bits, group_size, sym=False)`` (group size 0 -> -1,
GPTQ's per-channel); everything else at GPTQModel's defaults (damping, GAR group-aware act-order,
format GPTQ). Per-channel turns GAR off: GPTQModel refuses ``act_group_aware`` with group_size -1.
--method is ignored (GPTQ is the algorithm this worker runs).

Experts: GPTQModel's MoE model definitions (``MixtralQModel``, ``DeepSeekV3QModel``, ...) name
per-expert ``gate_proj``/``up_proj``/``down_proj`` linears; on transformers 5.x it runs ModelCloud's
``defuser`` at load, which splits the fused 3-D experts (``experts.gate_up_proj`` [E, 2I, H],
``experts.down_proj`` [E, H, I]) into per-expert ``nn.Linear`` layers, so every expert is GPTQ'd.
The worker counts the packed linears in the checkpoint and checks every linear weight of the reloaded
model (``record_checks``: quantized, left in float, or lost).

Saved format: GPTQModel's ``save`` (GPTQ v1 packing: int32 qweight/qzeros, fp16 scales, g_idx),
reloaded from disk with ``GPTQModel.load(..., device="cpu", backend=BACKEND.TORCH)`` (its reference
torch kernel; the auto-selected TorchFusedLinear gives wrong weights here, see PEERS.md) and evaluated
in float32.
"""

from __future__ import annotations

import os
import re
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
from benchmarks.workers.weight_check import packed_linears, record_checks


def unpackable(reference, bits: int) -> list[str]:
    """Linears GPTQ's 3-bit format cannot pack: its zero-point packing needs out_features % 32 == 0.

    (GPTQModel hits an IndexError in a worker thread there and os._exit(1)s the whole process.)
    Real checkpoints' dimensions are multiples of 32; the tiny test models' MLA
    ``kv_a_proj_with_mqa`` (kv_lora_rank + rope dim = 144) is not.
    """
    if bits != 3:
        return []
    names = [n for n, m in reference.named_modules()
             if isinstance(m, torch.nn.Linear) and n != "lm_head" and m.out_features % 32]
    for n, m in reference.named_modules():  # fused experts: gate/up give I outputs, down gives H
        gate_up, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
        if isinstance(gate_up, torch.nn.Parameter) and (gate_up.shape[1] // 2 % 32 or down.shape[1] % 32):
            names.append(n)  # every expert below it
    return names


def main(args, row):
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import gptqmodel
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    reference, tokenizer = load_reference(args.model)
    windows = eval_windows(tokenizer, args.eval, args.seq_len, args.eval_samples)
    params = linear_params(reference)
    tokens = calib_windows(tokenizer, args.calib, args.seq_len, args.calib_samples, seed=args.calib_seed)
    calibration = [{"input_ids": t.tolist(), "attention_mask": [1] * t.numel()} for t in tokens]
    extra = {}
    skipped = unpackable(reference, args.bits)
    if skipped:
        extra["dynamic"] = {f"-:{re.escape(name)}.*": {} for name in skipped}
    if not args.group_size:  # GAR (group-aware act-order, on by default) refuses group_size=-1
        extra["act_group_aware"] = False
    config = QuantizeConfig(bits=args.bits, group_size=args.group_size or -1, sym=False, **extra)
    out = os.path.join(args.workdir, "gptqmodel")

    started = time.time()
    model = GPTQModel.load(args.model, config, device="cpu", dtype=torch.float32)
    loaded = time.time()
    model.quantize(calibration, batch_size=1, tokenizer=tokenizer)
    seconds = time.time() - loaded
    model.save(out)
    del model

    # BACKEND.TORCH: GPTQModel's auto choice on CPU at 4 bits, TorchFusedLinear, computes wrong weights
    # for these asymmetric checkpoints (PEERS.md); TorchLinear dequantizes what is stored. float16: the
    # default bfloat16 would round the stored fp16 scales; TorchLinear refuses float32.
    quantized = GPTQModel.load(out, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    torch.nn.Module.to(quantized.model, torch.float32)
    row.update(tool="gptqmodel", method="gptq", compress_seconds=round(seconds, 2),
               load_seconds=round(loaded - started, 2), tool_version=gptqmodel.__version__)
    row = evaluate_row(quantized.model, reference, windows, out, params, row)
    row["note"] = f"{packed_linears(out)} packed linears in the checkpoint (fused experts split by defuser)"
    if skipped:
        row["note"] += (f"; {len(skipped)} excluded via dynamic (GPTQ 3-bit packing needs out_features % 32 == 0), "
                        f"e.g. {skipped[0]}")
    if not args.group_size:
        row["note"] += "; per-channel: act_group_aware=False (GPTQModel's default GAR requires group_size > 0)"
    return record_checks(row, quantized.model, reference, args.bits, args.group_size)


if __name__ == "__main__":
    run(main)

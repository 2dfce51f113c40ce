"""Quality-benchmark worker for AutoRound (Intel's `auto-round`: SignRound weight rounding).

AutoRound tunes each transformer block's rounding offsets and min/max clipping with signed
gradient descent on the block's own output (``iters=200`` steps of SignRound by default), on
calibration token windows: here the SAME windows moepress calibrates on. Settings: ``bits``,
``group_size`` (0 -> -1, AutoRound's per-channel) and ``sym=False`` (asymmetric, as every row of
this benchmark); everything else at AutoRound's defaults. --method is ignored (one algorithm).

Experts: on transformers >= 5 AutoRound unfuses the fused 3-D experts (``experts.gate_up_proj``
[E, 2I, H], ``experts.down_proj`` [E, H, I]) into per-expert ``nn.Linear`` layers through
transformers' ``linear_loop`` experts interface before tuning (its own MoE support, on by default),
so the experts are tuned and packed like every other linear. The worker counts the packed linears in the
checkpoint, and checks every linear weight of the reloaded model (``record_checks``).

Saved format: ``format="auto_round"`` (AutoRound's packed int32 qweight/qzeros + fp16 scales),
reloaded from disk with ``transformers.AutoModelForCausalLM.from_pretrained`` (AutoRound's own
``auto_round:torch`` QuantLinear). That backend forces the model to float16 on CPU; the worker casts
it back to float32 (stored fp16 scales convert exactly) so every row is evaluated in float32.
"""

from __future__ import annotations

import os
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


def main(args, row):
    import auto_round
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM

    reference, tokenizer = load_reference(args.model)
    windows = eval_windows(tokenizer, args.eval, args.seq_len, args.eval_samples)
    params = linear_params(reference)
    tokens = calib_windows(tokenizer, args.calib, args.seq_len, args.calib_samples, seed=args.calib_seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, use_safetensors=True).eval()
    out = os.path.join(args.workdir, "autoround")

    started = time.time()
    rounder = AutoRound(model, tokenizer, bits=args.bits, group_size=args.group_size or -1, sym=False, iters=args.iters,
                        dataset=[tokens[i:i + 1] for i in range(tokens.shape[0])],
                        nsamples=tokens.shape[0], seqlen=args.seq_len, device_map="cpu")
    _, folders = rounder.quantize_and_save(out, format="auto_round")  # packs and writes as it goes
    seconds = time.time() - started
    out = folders[0] if isinstance(folders, (list, tuple)) else folders
    del model, rounder

    quantized = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    # AutoRound's CPU kernel forces float16; evaluate in float32 like every row (fp16 scales cast exactly).
    torch.nn.Module.to(quantized, torch.float32)
    row.update(tool="autoround", method="autoround", compress_seconds=round(seconds, 2), iters=args.iters,
               tool_version=auto_round.__version__)
    row = evaluate_row(quantized, reference, windows, out, params, row)
    packed = packed_linears(out)
    row["note"] = f"{packed} packed linears in the checkpoint (fused experts unfused to per-expert nn.Linear by AutoRound)"
    return record_checks(row, quantized, reference, args.bits, args.group_size)


if __name__ == "__main__":
    run(main)

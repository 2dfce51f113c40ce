"""What every quality-benchmark worker shares: the evaluation windows, the metrics, measured bytes.

A worker runs in its own process (a peer tool may live in its own virtual environment), compresses
one model with one tool and option, evaluates it against the uncompressed reference on the same
windows as every other row, and prints one JSON row. Peak memory is the worker's own maximum RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import traceback

import torch

# Tensors that no tool quantizes in these benchmarks: counted apart so bits/param compare linear weights.
NON_LINEAR_MARKERS = ("embed_tokens", "lm_head", "norm", ".gate.weight", ".router.", "e_score_correction_bias",
                      "shared_expert_gate", "rotary")


def worker_args(extra=None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--bits", type=int, default=16)
    p.add_argument("--group-size", type=int, default=128, help="0 = per-channel")
    p.add_argument("--method", default="gptq")
    p.add_argument("--calib", default="builtin:calib")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seed", type=int, default=0, help="which calibration windows (every tool the same)")
    p.add_argument("--eval", default="builtin:eval")
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--workdir", required=True)
    p.add_argument("--iters", type=int, default=200, help="AutoRound only: SignRound steps per block")
    p.add_argument("--act-order", default="static", choices=("off", "static", "dynamic"),
                   help="moepress GPTQ only: column order (the default is moepress's own)")
    if extra:
        extra(p)
    return p.parse_args()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def eval_windows(tokenizer, text: str, seq_len: int, samples: int, seed: int = 0) -> torch.Tensor:
    """The evaluation windows: ``samples`` non-overlapping windows chosen with ``seed`` across the
    whole text (the same windows as ``moepress eval`` and the zoo's cards)."""
    from moepress.data import load_text, token_windows

    return token_windows(load_text(text, what="evaluation"), tokenizer, seq_len, samples, seed=seed, what="evaluation")


def calib_windows(tokenizer, text: str, seq_len: int, samples: int, seed: int = 0) -> torch.Tensor:
    from moepress.data import load_text, token_windows

    return token_windows(load_text(text), tokenizer, seq_len, samples, seed=seed, what="calibration")


def load_reference(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).eval()
    return model, AutoTokenizer.from_pretrained(path)


def linear_params(reference) -> int:
    """Parameters of the compressible linear weights (attention, experts, shared, dense MLP)."""
    from moepress.model import MoEView

    return sum(o * i for o, i in MoEView(reference).unit_shapes().values())


def checkpoint_tensor_bytes(folder: str) -> tuple[int, int]:
    """(all tensor bytes, bytes of tensors that are not linear weights) read from safetensors headers."""
    import struct

    total = other = 0
    for name in os.listdir(folder):
        if not name.endswith(".safetensors"):
            continue
        with open(os.path.join(folder, name), "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for key, info in header.items():
            if key == "__metadata__":
                continue
            size = info["data_offsets"][1] - info["data_offsets"][0]
            total += size
            if any(m in key for m in NON_LINEAR_MARKERS):
                other += size
    return total, other


def evaluate_row(model, reference, windows, folder: str | None, params: int, row: dict) -> dict:
    """Fill ``row`` with quality (against ``reference``) and measured bytes (from ``folder``'s files)."""
    from moepress.evaluate import compare_to_reference

    result = compare_to_reference(model, reference, windows, batch_size=8, progress=False)
    row.update(
        perplexity=round(result.perplexity, 4),
        reference_perplexity=round(result.reference_perplexity, 4),
        kl_divergence=round(result.kl_divergence, 6),
        top1_agreement=round(result.top1_agreement, 5),
        eval_tokens=result.tokens,
    )
    if folder is not None:
        total, other = checkpoint_tensor_bytes(folder)
        row.update(checkpoint_bytes=total, linear_bytes=total - other,
                   bits_per_param=round(8 * (total - other) / params, 4))
    return row


def run(main, parse=worker_args) -> None:
    """Run ``main(args, row) -> row`` and print the row as the last line of stdout, failures included."""
    row: dict = {}
    try:
        args = parse()
        row = {"model": os.path.basename(os.path.normpath(args.model)), "bits": args.bits,
               "group_size": args.group_size or None, "status": "ok"}
        started = time.time()
        row = main(args, row)
        row.setdefault("wall_seconds", round(time.time() - started, 2))
    except Exception as exc:  # a failing tool still gets a row that says how it failed
        row.update(status="failed", error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
        traceback.print_exc(file=sys.stderr)
    row["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(row))

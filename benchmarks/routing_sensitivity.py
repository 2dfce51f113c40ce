#!/usr/bin/env python3
"""How much of a quantized MoE's damage comes from routing flips? Dense SmolLM2-135M against its
MoEfied version (zoo model ``moefied-smollm2``), the same round-to-nearest weights on both.

    python benchmarks/routing_sensitivity.py

The MoE's experts are exactly the dense FFN's neurons (all experts on, the two models agree to
1e-4), so the same RTN perturbation of attention and FFN weights hits both models alike. Any extra
KL divergence the MoE shows comes from top-k routing: a small change of the router's input moves a
token to another expert. Rows: RTN of attention only, of the FFN/experts only, and of everything,
at 8 and 4 bits (group 64: 576 is not a multiple of 128), on the evaluation windows of the quality
benchmark. Needs the zoo extra (``gguf``, ``accelerate``) to read the dense model from its GGUF.
Writes ``benchmarks/results/routing-sensitivity-<date>.json``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "zoo"))

from moepress.data import load_text, token_windows  # noqa: E402
from moepress.evaluate.metrics import compare_to_reference  # noqa: E402
from moepress.loading import load_model, load_tokenizer  # noqa: E402
from moepress.model import MoEView  # noqa: E402
from moepress.quantize import QuantSpec, rtn_quantize  # noqa: E402

SETTINGS = [("attention", 8), ("ffn", 8), ("all", 8), ("attention", 4), ("ffn", 4), ("all", 4)]


def fake_rtn(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    return rtn_quantize(weight, QuantSpec(bits, group_size, method="rtn")).dequantize(torch.float32).to(weight.dtype)


@torch.no_grad()
def perturb_dense(model, part: str, bits: int, group_size: int):
    out = copy.deepcopy(model)
    for name, module in out.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            if (part in ("attention", "all") and "self_attn" in name) or (part in ("ffn", "all") and ".mlp." in name):
                module.weight.copy_(fake_rtn(module.weight, bits, group_size))
    return out


@torch.no_grad()
def perturb_moe(model, part: str, bits: int, group_size: int):
    out = copy.deepcopy(model)
    view = MoEView(out)
    for layer in range(view.num_layers):
        if part in ("attention", "all"):
            for unit in view.attention_units(layer):
                linear = out.get_submodule(unit.module_path)
                linear.weight.copy_(fake_rtn(linear.weight, bits, group_size))
        if part in ("ffn", "all"):
            experts = view.experts(layer).module  # fused: gate_up_proj [E, 2I, H], down_proj [E, H, I]
            for param in (experts.gate_up_proj, experts.down_proj):
                param.copy_(fake_rtn(param.data, bits, group_size))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moe", default=os.path.join(ROOT, "zoo", "models", "moefied-smollm2"))
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not os.path.isdir(args.moe):
        raise SystemExit(f"{args.moe} not found; build it with: python zoo/moefied_smollm2.py")
    from moefied_smollm2 import ensure_gguf, load_source

    dense, _ = load_source(ensure_gguf())
    moe = load_model(args.moe, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(args.moe)
    windows = token_windows(load_text("builtin:eval"), tokenizer, args.seq_len, args.samples, seed=0)
    rows = []
    for part, bits in SETTINGS:
        for label, model, perturb in (("dense", dense, perturb_dense), ("moefied", moe, perturb_moe)):
            started = time.time()
            result = compare_to_reference(perturb(model, part, bits, args.group_size), model, windows,
                                          batch_size=4, progress=False)
            rows.append({"model": label, "quantized": part, "bits": bits, "group_size": args.group_size,
                         "kl": result.kl_divergence, "top1": result.top1_agreement,
                         "perplexity": result.perplexity, "reference_perplexity": result.reference_perplexity,
                         "seconds": round(time.time() - started, 1)})
            print(f"{label:8s} RTN {bits}-bit {part:9s}: KL {result.kl_divergence:.4f} top-1 "
                  f"{result.top1_agreement:.3f} ppl {result.reference_perplexity:.2f} -> {result.perplexity:.2f}",
                  flush=True)
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"routing-sensitivity-{date}.json")
    payload = {"date": date, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                         "torch": torch.__version__},
               "settings": vars(args), "windows": list(windows.shape), "rows": rows}
    with open(out + ".tmp", "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(out + ".tmp", out)
    print("\n| quantized (RTN, group %d) | bits | dense KL | MoE KL | MoE / dense | dense top-1 | MoE top-1 |"
          % args.group_size)
    print("|---|---|---|---|---|---|---|")
    for part, bits in SETTINGS:
        d, m = [next(r for r in rows if r["model"] == k and r["quantized"] == part and r["bits"] == bits)
                for k in ("dense", "moefied")]
        print(f"| {part} | {bits} | {d['kl']:.4f} | {m['kl']:.4f} | {m['kl'] / max(d['kl'], 1e-12):.1f}x | "
              f"{d['top1']:.3f} | {m['top1']:.3f} |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

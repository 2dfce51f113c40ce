"""Refinement after GPTQ (``--refine STEPS``, ``--refine-params``): KL and compress time against the step count.

    OMP_NUM_THREADS=1 python benchmarks/refine.py --models zoo/models/tiny-mixtral zoo/models/tiny-deepseek \\
        --bits 2 3 --steps 0 16 32 64 128 [--refine-params scales rounding] [--refine-from gptq rtn]

Every row compresses the model in memory exactly as the quality benchmark's moepress worker does (the
same calibration and evaluation windows: builtin:calib and the held-out builtin:eval), with
``refine=STEPS``, and scores it against the uncompressed model (KL, top-1, perplexity). The default
step count is the point past which doubling the steps buys less than 2% KL. Writes
benchmarks/results/refine-<date>.json (rewritten after every row) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--bits", nargs="+", type=int, default=[2, 3])
    p.add_argument("--group-size", type=int, default=128, help="0 = per-channel")
    p.add_argument("--steps", nargs="+", type=int, default=[0, 25, 50, 100, 200])
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="calibration windows' seed")
    p.add_argument("--refine-params", nargs="+", default=["scales"], choices=("scales", "rounding"),
                   help="what refinement learns (rows for each; 0 steps is run once)")
    p.add_argument("--refine-from", nargs="+", default=["gptq"], choices=("gptq", "rtn"),
                   help="SignRound's start (rows for each with --refine-params rounding)")
    p.add_argument("--expert-hessian", default="g2", choices=("plain", "g", "g2"),
                   help="the routed experts' Hessian weighting (compress's --expert-hessian; default g2)")
    p.add_argument("--frozen-routing", action="store_true", help="refine with the unquantized layer's routing")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch

    import moepress
    from benchmarks.workers.common import calib_windows, eval_windows, evaluate_row, linear_params, load_reference
    from moepress.compress import CompressConfig, CompressResult, quantize_model
    from moepress.export import save_compressed

    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"refine-{date}.json")
    rows: list[dict] = []

    def save():
        payload = {"date": date, "settings": vars(args), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                   "rows": rows}
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out + ".tmp", "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(out + ".tmp", out)

    for model_dir in args.models:
        reference, tokenizer = load_reference(model_dir)
        windows = eval_windows(tokenizer, "builtin:eval", args.seq_len, args.eval_samples)
        tokens = calib_windows(tokenizer, "builtin:calib", args.seq_len, args.calib_samples, seed=args.seed)
        params = linear_params(reference)
        for bits in args.bits:
            ways = [(learn, start) for learn in args.refine_params
                    for start in (args.refine_from if learn == "rounding" else ["gptq"])]
            runs = [(steps, learn, start) for learn, start in ways for steps in args.steps if steps or (learn, start) == ways[0]]
            for steps, learn, start in runs:
                config = CompressConfig(bits=bits, group_size=args.group_size or None, calib_samples=args.calib_samples,
                                        seq_len=args.seq_len, seed=args.seed, refine=steps, refine_from=start,
                                        refine_params=learn, refine_frozen_routing=args.frozen_routing,
                                        expert_hessian=args.expert_hessian)
                model = moepress.load(model_dir)
                started = time.time()
                units, errors, profile = quantize_model(model, tokens, config, progress=False)
                seconds = time.time() - started
                layer_errors = {k.split(".")[1]: [float(x) for x in v]
                                for k, v in profile.tensors.items() if k.endswith(".refine.output_error")}
                row = {"model": os.path.basename(os.path.normpath(model_dir)), "bits": bits,
                       "group_size": args.group_size or None, "refine": steps, "refine_params": learn, "refine_from": start,
                       "frozen_routing": args.frozen_routing, "seed": args.seed,
                       "expert_hessian": getattr(config, "expert_hessian", "plain"),
                       "clip_search": getattr(config, "clip_search", False),
                       "compress_seconds": round(seconds, 2), "layer_output_error": layer_errors}
                with tempfile.TemporaryDirectory(prefix="moepress-refine-") as work:
                    folder = os.path.join(work, "out")
                    save_compressed(CompressResult(model, tokenizer, config, units, errors, profile, seconds,
                                                   tokens.numel()), folder, overwrite=True)
                    evaluate_row(moepress.load(folder, dtype=torch.float32), reference, windows, folder, params, row)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                save()
    print("| model | bits | refine | learns | from | KL | top-1 | ppl | bits/param | compress s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['bits']} | {r['refine']} | {r['refine_params']} | {r['refine_from']} | "
              f"{r['kl_divergence']:.4f} | {r['top1_agreement']:.3f} | "
              f"{r['perplexity']:.2f} | {r['bits_per_param']:.3f} | {r['compress_seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

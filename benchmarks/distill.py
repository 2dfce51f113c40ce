"""What ``moepress distill`` buys after ``moepress compress``'s defaults, and what it costs.

    OMP_NUM_THREADS=1 python benchmarks/distill.py --models zoo/models/tiny-mixtral zoo/models/tiny-deepseek

For every model and ``--bits``: ``compress`` as the command does by default (GPTQ, g2 Hessians,
``--refine 32``; ``--target llamacpp`` with ``--targets llamacpp``), then ``distill`` of that checkpoint
for each ``--passes`` (passes over the windows it trains on, 8 windows a step; default: distill's
own, ``DEFAULT_PASSES``). Every checkpoint is
saved and scored through ``moepress.load`` on the quality benchmark's windows and metrics
(benchmarks/workers/common.py), so what is scored is what the files hold. The compression and
distillation times are taken in the same process, one after the other.

Writes benchmarks/results/distill-<date>.json (rewritten after every row) and prints a markdown table.
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
    p.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4])
    p.add_argument("--targets", nargs="+", default=["moepress"], choices=("moepress", "llamacpp"),
                   help="moepress's grids (group 128) and/or --target llamacpp's block formats")
    p.add_argument("--passes", nargs="+", type=int, default=None,
                   help="distill's passes over the windows it trains on (default: distill's own, DEFAULT_PASSES)")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch

    import moepress
    from benchmarks.workers.common import eval_windows, evaluate_row, linear_params, load_reference
    from moepress.distill import DEFAULT_PASSES, distill_checkpoint, validation_windows
    from moepress.refine import REFINE_STEPS

    args.passes = args.passes or [DEFAULT_PASSES]

    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"distill-{date}.json")
    payload = {"date": date, "command": " ".join([sys.executable, *sys.argv]),
               "settings": {k: v for k, v in vars(args).items() if k != "out"},
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "rows": []}
    work = tempfile.mkdtemp(prefix="moepress-distill-")

    def save():
        with open(out + ".tmp", "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(out + ".tmp", out)

    def score(folder, reference, windows) -> dict:
        row: dict = {}
        evaluate_row(moepress.load(folder, dtype=torch.float32), reference, windows, folder, linear_params(reference),
                     row)
        return {k: row.get(k) for k in ("kl_divergence", "top1_agreement", "perplexity", "bits_per_param")}

    for model_dir in args.models:
        name = os.path.basename(os.path.normpath(model_dir))
        reference, tokenizer = load_reference(model_dir)
        windows = eval_windows(tokenizer, "builtin:eval", args.seq_len, args.eval_samples)
        for target in args.targets:
            for bits in args.bits:
                ckpt = os.path.join(work, f"{name}-{target}-{bits}")
                started = time.time()
                options = {"target": "llamacpp"} if target == "llamacpp" else {"group_size": 128}
                moepress.compress(model_dir, bits=bits, calib_samples=args.calib_samples, seq_len=args.seq_len,
                                  refine=REFINE_STEPS, out=ckpt, progress=False, **options)
                compress_s = time.time() - started
                with open(os.path.join(ckpt, "moepress.json")) as f:
                    units = json.load(f)["units"]
                types = sorted({unit.get("format") or unit.get("label") or f"{unit.get('bits')}b" for unit in units.values()})
                base = {"model": name, "target": target, "bits": bits, "refine": REFINE_STEPS, "unit_types": types,
                        "compress_seconds": round(compress_s, 1)}
                first = {**base, "distill_passes": 0, **score(ckpt, reference, windows)}
                payload["rows"].append(first)
                save()
                for passes in args.passes:
                    dist = ckpt + f"-d{passes}"
                    trained = args.calib_samples - validation_windows(args.calib_samples)  # (the rest checks)
                    steps = passes * -(-trained // 8)
                    started = time.time()
                    done = distill_checkpoint(ckpt, dist, steps=steps, progress=False)
                    row = {**base, "distill_passes": passes, "distill_steps": steps,
                           "distill_seconds": round(time.time() - started, 1), "validation_kl": done["validation_kl"],
                           "kept": done["kept"], **score(dist, reference, windows)}
                    row["kl_ratio"] = round(row["kl_divergence"] / first["kl_divergence"], 4)
                    payload["rows"].append(row)
                    save()
                    print(f"{name} {target} {bits}b passes {passes}: KL {first['kl_divergence']:.6f} -> "
                          f"{row['kl_divergence']:.6f} ({row['kl_ratio']:.3f}x), compress {compress_s:.0f} s, "
                          f"distill {row['distill_seconds']:.0f} s", flush=True)
    print("\n| model | target | bits | compress KL | distill passes | distilled KL | ratio | compress s | distill s |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = payload["rows"]
    for row in rows:
        if row["distill_passes"]:
            first = next(r for r in rows if r["distill_passes"] == 0 and all(
                r[k] == row[k] for k in ("model", "target", "bits")))
            print(f"| {row['model']} | {row['target']} | {row['bits']} | {first['kl_divergence']:.6f} | "
                  f"{row['distill_passes']} | {row['kl_divergence']:.6f} | {row['kl_ratio']:.3f}x | "
                  f"{row['compress_seconds']:.0f} | {row['distill_seconds']:.0f} |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Expert drop side by side with llm-compressor's REAP: the same share of experts removed from every
MoE layer, no quantization, the same calibration and evaluation windows.

    bash benchmarks/peers/setup_llmcompressor.sh          # once: .venvs/llmcompressor
    python benchmarks/expert_drop.py --models zoo/models/tiny-mixtral zoo/models/tiny-deepseek

moepress rows (one per criterion: frequency, mass, router, reap) run in this process through
``moepress.compress(..., bits=16, drop_experts=...)``; the peer row runs
``benchmarks/workers/reap_worker.py`` in llm-compressor's virtual environment. Every row is scored by
``benchmarks.workers.common.evaluate_row`` against the uncompressed model. Writes
benchmarks/results/expert-drop-<date>.json and prints a markdown table with each criterion's KL
over llm-compressor REAP's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import moepress  # noqa: E402
from benchmarks.workers.common import eval_windows, evaluate_row, linear_params, load_reference  # noqa: E402
from moepress.trim.importance import CRITERIA  # noqa: E402


def moepress_row(model_dir: str, criterion: str, args, workdir: str) -> dict:
    reference, tokenizer = load_reference(model_dir)
    windows = eval_windows(tokenizer, "builtin:eval", args.seq_len, args.eval_samples)
    out = os.path.join(workdir, f"moepress-{criterion}")
    moepress.compress(model_dir, out=out, overwrite=True, bits=16, drop_experts=f"{round(args.drop * 100)}%",
                      drop_criterion=criterion, calib="builtin:calib", calib_samples=args.calib_samples,
                      seq_len=args.seq_len, progress=False)
    row = {"model": os.path.basename(os.path.normpath(model_dir)), "tool": "moepress", "method": criterion,
           "drop": args.drop, "status": "ok"}
    return evaluate_row(moepress.load(out, dtype=torch.float32), reference, windows, None, linear_params(reference),
                        row)


def reap_row(model_dir: str, args, workdir: str) -> dict:
    python = os.environ.get("MOEPRESS_LLMCOMPRESSOR_PYTHON") or os.path.join(ROOT, ".venvs", "llmcompressor", "bin",
                                                                            "python")
    name = os.path.basename(os.path.normpath(model_dir))
    if not os.path.exists(python):
        return {"model": name, "tool": "llmcompressor", "method": "reap", "status": "failed",
                "error": "not installed: run bash benchmarks/peers/setup_llmcompressor.sh"}
    cmd = [python, "-m", "benchmarks.workers.reap_worker", "--model", model_dir, "--drop", str(args.drop),
           "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len),
           "--eval-samples", str(args.eval_samples), "--workdir", workdir]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": name, "tool": "llmcompressor", "method": "reap", "status": "failed", "error": tail[:300]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["zoo/models/tiny-mixtral", "zoo/models/tiny-deepseek"])
    p.add_argument("--drop", type=float, default=0.25)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"expert-drop-{date}.json")
    rows = []
    with tempfile.TemporaryDirectory(prefix="moepress-expert-drop-") as workdir:
        for model_dir in args.models:
            rows.append(reap_row(model_dir, args, workdir))
            for criterion in CRITERIA:
                rows.append(moepress_row(model_dir, criterion, args, workdir))
            with open(out + ".tmp", "w") as f:
                json.dump({"date": date, "command": " ".join([sys.executable, *sys.argv]), "settings": vars(args),
                           "rows": rows}, f, indent=1)
            os.replace(out + ".tmp", out)
    print("| model | tool | criterion | KL | top-1 | perplexity (reference) | KL / llm-compressor REAP |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("status") != "ok":
            print(f"| {r['model']} | {r['tool']} | {r['method']} | failed: {r.get('error', '')[:80]} | | | |")
            continue
        peer = next((x for x in rows if x["model"] == r["model"] and x["tool"] == "llmcompressor"
                     and x.get("status") == "ok"), None)
        ratio = f"{r['kl_divergence'] / peer['kl_divergence']:.2f}" if peer else "n/a"
        print(f"| {r['model']} | {r['tool']} | {r['method']} | {r['kl_divergence']:.4f} | {r['top1_agreement']:.3f} | "
              f"{r['perplexity']:.2f} ({r['reference_perplexity']:.2f}) | {ratio} |")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Trimming side by side with llm-compressor's modifiers, nothing quantized, on the same calibration
and evaluation windows:

* expert drop: the same share of experts removed from every MoE layer by each moepress criterion
  (frequency, mass, router, reap, kl) and by llm-compressor's ``REAPPruningModifier``;
* pruning of the routed experts at 50% and 2:4 by moepress's SparseGPT, Wanda and magnitude and by
  llm-compressor's ``SparseGPTModifier`` and ``WandaPruningModifier``.

    bash benchmarks/peers/setup_llmcompressor.sh          # once: .venvs/llmcompressor
    python benchmarks/trim_peers.py --models zoo/models/tiny-mixtral zoo/models/tiny-deepseek [--parts drop]

moepress rows run in this process through ``moepress.compress(..., bits=16, ...)``; the peer rows run
``benchmarks/workers/reap_worker.py`` / ``prune_worker.py`` in llm-compressor's virtual environment.
Every row is scored by ``benchmarks.workers.common.evaluate_row`` against the uncompressed model.
Writes benchmarks/results/trim-peers-<date>.json and prints a markdown table with each row's KL over
the peer's (REAP for drops, llm-compressor's same pruner and pattern for pruning).
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
from moepress.trim.importance import DROP_CRITERIA  # noqa: E402


def moepress_row(model_dir: str, method: str, options: dict, args, workdir: str) -> dict:
    reference, tokenizer = load_reference(model_dir)
    windows = eval_windows(tokenizer, "builtin:eval", args.seq_len, args.eval_samples)
    out = os.path.join(workdir, "moepress")
    moepress.compress(model_dir, out=out, overwrite=True, bits=16, calib="builtin:calib",
                      calib_samples=args.calib_samples, seq_len=args.seq_len, progress=False, **options)
    row = {"model": os.path.basename(os.path.normpath(model_dir)), "tool": "moepress", "method": method,
           "status": "ok", **{k: v for k, v in options.items()}}
    return evaluate_row(moepress.load(out, dtype=torch.float32), reference, windows, None, linear_params(reference),
                        row)


def peer_row(module: str, model_dir: str, method: str, extra: list[str], args, workdir: str) -> dict:
    python = os.environ.get("MOEPRESS_LLMCOMPRESSOR_PYTHON") or os.path.join(ROOT, ".venvs", "llmcompressor", "bin",
                                                                            "python")
    name = os.path.basename(os.path.normpath(model_dir))
    if not os.path.exists(python):
        return {"model": name, "tool": "llmcompressor", "method": method, "status": "failed",
                "error": "not installed: run bash benchmarks/peers/setup_llmcompressor.sh"}
    cmd = [python, "-m", module, "--model", model_dir, *extra, "--calib-samples", str(args.calib_samples),
           "--seq-len", str(args.seq_len), "--eval-samples", str(args.eval_samples), "--workdir", workdir]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": name, "tool": "llmcompressor", "method": method, "status": "failed", "error": tail[:300]}


def rows_for(model_dir: str, args, workdir: str):
    """(row, key of the peer row it is compared with) for one model."""
    drop = f"{round(args.drop * 100)}%"
    if "drop" not in args.parts:
        yield from _prune_rows(model_dir, args, workdir)
        return
    peer = peer_row("benchmarks.workers.reap_worker", model_dir, "reap", ["--drop", str(args.drop)], args, workdir)
    peer["compare"] = f"drop {drop}"
    yield peer
    for criterion in DROP_CRITERIA:
        row = moepress_row(model_dir, criterion, {"drop_experts": drop, "drop_criterion": criterion}, args, workdir)
        row["compare"] = f"drop {drop}"
        yield row
    if "prune" in args.parts:
        yield from _prune_rows(model_dir, args, workdir)


def _prune_rows(model_dir: str, args, workdir: str):
    for pattern in ("50%", "2:4"):
        for pruner in ("sparsegpt", "wanda"):
            peer = peer_row("benchmarks.workers.prune_worker", model_dir, pruner,
                            ["--pruner", pruner, "--pattern", pattern], args, workdir)
            peer["compare"] = f"{pattern} {pruner}"
            yield peer
        for pruner in ("sparsegpt", "wanda", "magnitude"):
            row = moepress_row(model_dir, pruner, {"prune": pattern, "pruner": pruner}, args, workdir)
            row["compare"] = f"{pattern} {pruner if pruner != 'magnitude' else 'wanda'}"
            yield row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["zoo/models/tiny-mixtral", "zoo/models/tiny-deepseek"])
    p.add_argument("--drop", type=float, default=0.25)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--parts", default="drop,prune", help="which comparisons: drop, prune or both (default)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"trim-peers-{date}.json")
    rows = []
    with tempfile.TemporaryDirectory(prefix="moepress-trim-peers-") as workdir:
        for model_dir in args.models:
            for row in rows_for(model_dir, args, workdir):
                rows.append(row)
                with open(out + ".tmp", "w") as f:
                    json.dump({"date": date, "command": " ".join([sys.executable, *sys.argv]),
                               "settings": vars(args), "rows": rows}, f, indent=1)
                os.replace(out + ".tmp", out)
    print("| model | compared as | tool | method | KL | top-1 | perplexity (reference) | KL / llm-compressor's |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("status") != "ok":
            print(f"| {r['model']} | {r['compare']} | {r['tool']} | {r['method']} | failed: {r.get('error', '')[:80]} "
                  "| | | |")
            continue
        peer = next((x for x in rows if x["model"] == r["model"] and x["tool"] == "llmcompressor"
                     and x["compare"] == r["compare"] and x.get("status") == "ok"), None)
        ratio = f"{r['kl_divergence'] / peer['kl_divergence']:.2f}" if peer else "n/a"
        print(f"| {r['model']} | {r['compare']} | {r['tool']} | {r['method']} | {r['kl_divergence']:.4f} | "
              f"{r['top1_agreement']:.3f} | {r['perplexity']:.2f} ({r['reference_perplexity']:.2f}) | {ratio} |")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Online dynamic pruning against its threshold: quality, expert compute left and decoding speed.

    python benchmarks/odp.py --reference zoo/models/tiny-mixtral --model OUT_4BIT

The compressed model ``--model`` is loaded once per setting with ``moepress.load(...,
dynamic_pruning=...)`` and scored on the same evaluation windows against the uncompressed
``--reference`` (KL, top-1, perplexity); the pruner's counters give the share of routed expert
computations left (activated routed-expert parameters per token relative to none skipped);
greedy decoding tokens/s at batch 1 is measured side by side with the unpruned model (threshold 0)
in the same run, as a ratio. Writes benchmarks/results/odp-<date>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import moepress  # noqa: E402
from benchmarks.speed import decode_seconds  # noqa: E402
from moepress.loading import load_tokenizer  # noqa: E402
from moepress.trim.dynamic import DynamicPruning, dynamic_pruning_stats  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True)
    p.add_argument("--model", required=True, help="a moepress checkpoint")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0])
    p.add_argument("--keep-important", type=float, nargs="+", default=[0.0, 0.1])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    settings = [DynamicPruning(t, k) for k in args.keep_important for t in args.thresholds
                if not (t == 0 and k > 0)]
    models = {s: moepress.load(args.model, dynamic_pruning=s) for s in settings}
    rows = []
    for s, model in models.items():
        report = moepress.evaluate(model, tokenizer=tokenizer, reference=args.reference, text="builtin:eval",
                                   seq_len=args.seq_len, samples=args.eval_samples, progress=False)
        stats = dynamic_pruning_stats(model)
        rows.append({"threshold": s.threshold, "keep_important": s.keep_important, "kl": report.kl_divergence,
                     "top1": report.top1_agreement, "perplexity": report.perplexity,
                     "reference_perplexity": report.reference_perplexity,
                     "expert_compute_left": round(stats["expert_compute_left"], 4)})
    prompts = torch.randint(1, tokenizer.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    times = {s: [] for s in settings}
    for s in settings:
        decode_seconds(models[s], prompts, 2)
    for _ in range(args.repeats):
        for s in settings:
            times[s].append(decode_seconds(models[s], prompts, args.new_tokens))
    base = statistics.median(times[settings[0]])
    for row, s in zip(rows, settings):
        row["tokens_per_second"] = round(args.new_tokens / statistics.median(times[s]), 1)
        row["speed_vs_unpruned"] = round(base / statistics.median(times[s]), 3)
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"odp-{date}.json")
    payload = {"date": date, "command": " ".join([sys.executable, *sys.argv]),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg()},
               "settings": vars(args), "rows": rows}
    with open(out + ".tmp", "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(out + ".tmp", out)
    print("| threshold | keep important | KL | top-1 | ppl (ref) | expert compute left | tokens/s (batch 1) | vs unpruned |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threshold']} | {r['keep_important']} | {r['kl']:.4f} | {r['top1']:.3f} | {r['perplexity']:.2f} "
              f"({r['reference_perplexity']:.2f}) | {r['expert_compute_left']:.3f} | {r['tokens_per_second']} | "
              f"{r['speed_vs_unpruned']:.2f}x |")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

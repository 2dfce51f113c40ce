#!/usr/bin/env python3
"""The speed harness: greedy decoding tokens/s of models side by side, in one run, as ratios.

    python benchmarks/speed.py --reference zoo/models/tiny-mixtral --models OUT1 OUT2 --threads 1

Every model (the uncompressed reference first, then each moepress checkpoint) is loaded with
``moepress.load`` and decodes ``--new-tokens`` tokens greedily with the KV cache from the same
prompts, at batch 1 and at ``--batch`` (default 16), ``--repeats`` times after one warm-up; the
median tokens/s is reported, with the ratio to the reference measured in the same run (these
machines are noisy: compare ratios, not absolute figures). The models are interleaved repeat by
repeat so that a change in machine load hits all of them alike. Writes
benchmarks/results/speed-<date>.json and prints a markdown table. Not run in CI.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import moepress  # noqa: E402


def decode_seconds(model, prompts: torch.Tensor, new_tokens: int) -> float:
    """Wall seconds of greedy decoding ``new_tokens`` after ``prompts`` [B, T] with the KV cache."""
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    seconds = time.perf_counter() - started
    assert out.shape[1] == prompts.shape[1] + new_tokens
    return seconds


def measure(paths: list[str], args) -> list[dict]:
    torch.set_num_threads(args.threads)
    models = {path: moepress.load(path, dtype=torch.bfloat16 if args.bf16 else None).eval() for path in paths}
    vocab = min(m.config.vocab_size for m in models.values())
    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch in (1, args.batch):
        prompts = torch.randint(1, vocab, (batch, args.prompt_tokens), generator=generator)
        times = {path: [] for path in paths}
        for path in paths:  # warm-up
            decode_seconds(models[path], prompts, 2)
        for _ in range(args.repeats):
            for path in paths:
                times[path].append(decode_seconds(models[path], prompts, args.new_tokens))
        base = statistics.median(times[paths[0]])
        for path in paths:
            median = statistics.median(times[path])
            rows.append({"model": path, "batch": batch, "threads": args.threads, "new_tokens": args.new_tokens,
                         "prompt_tokens": args.prompt_tokens, "seconds": [round(t, 4) for t in times[path]],
                         "tokens_per_second": round(batch * args.new_tokens / median, 1),
                         "speed_vs_reference": round(base / median, 3)})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | batch | threads | tokens/s | vs reference |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {os.path.basename(os.path.normpath(r['model']))} | {r['batch']} | {r['threads']} | "
                     f"{r['tokens_per_second']} | {r['speed_vs_reference']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, help="the uncompressed model (a folder)")
    p.add_argument("--models", nargs="+", required=True, help="moepress checkpoints to compare with it")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--batch", type=int, default=16, help="the batched row's batch size (default 16)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bf16", action="store_true", help="load every model in bfloat16 (default: as moepress.load does)")
    p.add_argument("--out", default=None, help="JSON (default benchmarks/results/speed-<date>.json)")
    args = p.parse_args(argv)
    for path in [args.reference, *args.models]:
        if not os.path.isdir(path):
            p.error(f"{path} is not a model folder")
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"speed-{date}.json")
    rows = measure([args.reference, *args.models], args)
    payload = {"date": date, "command": " ".join([sys.executable, *sys.argv]),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "load_average": os.getloadavg()}, "settings": vars(args), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(out + ".tmp", out)
    print(table(rows))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Routing-aware expert Hessians and the clipping search, measured: KL against the uncompressed model.

    OMP_NUM_THREADS=1 python benchmarks/grids.py --models zoo/models/tiny-mixtral zoo/models/tiny-deepseek \\
        --bits 2 3 --seeds 0 1 --settings plain g g2 plain@off plain+clip@off plain@dynamic plain+clip@dynamic

Each setting is ``EXPERT_HESSIAN[+clip][@ACT_ORDER]`` (``--expert-hessian``, ``--clip-search`` and
``--act-order`` of ``moepress compress``; static act-order, the default, when not given). Every row
quantizes the model (GPTQ, ``--group-size``, 128 by default) on calibration windows chosen with its
seed and is scored on the same seeded evaluation windows as the quality benchmark's workers
(benchmarks/workers/common.py): KL(reference || compressed) per token, top-1 agreement, perplexity.
The reference and the windows are loaded once per model; rows run one after another in this
process, each saved and loaded back as the worker does. bits_per_param counts the linear weights'
stored bytes (codes, scales, zeros and dynamic act-order's group index). Writes
benchmarks/results/grids-<date>.json (grids-2026-12-01.json: the first run) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_setting(text: str) -> dict:
    """``HESSIAN[+clip][@ACT_ORDER]``: plain|g|g2, the clipping search, act-order off|static|dynamic."""
    rest, _, act_order = text.partition("@")
    hessian, _, clip = rest.partition("+")
    if hessian not in ("plain", "g", "g2") or clip not in ("", "clip") or act_order not in ("", "off", "static",
                                                                                            "dynamic"):
        raise SystemExit(f"a setting is plain|g|g2, optionally +clip, optionally @off|static|dynamic (got {text!r})")
    return {"expert_hessian": hessian, "clip_search": clip == "clip", "act_order": act_order or "static"}


def bits_per_param(units: dict, shapes: dict) -> float:
    """Stored bits per parameter of the linear weights (codes, scales, zeros, group indices)."""
    stored = sum(units[name].nbytes(*shape) for name, shape in shapes.items())
    return round(8 * stored / sum(o * i for o, i in shapes.values()), 4)


def main(argv=None) -> int:
    import moepress
    from benchmarks.workers.common import calib_windows, eval_windows, load_reference
    from moepress.compress import CompressConfig, CompressResult, quantize_model
    from moepress.export import save_compressed
    from moepress.model import MoEView
    from moepress.evaluate import compare_to_reference

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--bits", nargs="+", type=int, default=[2, 3])
    p.add_argument("--group-size", type=int, default=128, help="0 = per-channel")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="calibration-window seeds")
    p.add_argument("--settings", nargs="+", default=["plain", "g", "g2"])
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    settings = {s: parse_setting(s) for s in args.settings}
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"grids-{datetime.date.today().isoformat()}.json")
    rows = []

    def save():
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out + ".tmp", "w") as f:
            json.dump({"settings": vars(args), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "rows": rows},
                      f, indent=2)
        os.replace(out + ".tmp", out)

    for model_path in args.models:
        name = os.path.basename(os.path.normpath(model_path))
        reference, tokenizer = load_reference(model_path)
        shapes = MoEView(reference).unit_shapes()
        windows = eval_windows(tokenizer, "builtin:eval", args.seq_len, args.eval_samples)
        for seed in args.seeds:
            tokens = calib_windows(tokenizer, "builtin:calib", args.seq_len, args.calib_samples, seed=seed)
            for bits in args.bits:
                for label, setting in settings.items():
                    config = CompressConfig(bits=bits, group_size=args.group_size or None, seq_len=args.seq_len,
                                            calib_samples=args.calib_samples, seed=seed, **setting)
                    model = moepress.load(model_path)  # its own dtype, as the quality benchmark's worker
                    started = time.time()
                    units, errors, profile = quantize_model(model, tokens, config, progress=False)
                    seconds = time.time() - started
                    with tempfile.TemporaryDirectory(prefix="moepress-grids-") as workdir:
                        folder = os.path.join(workdir, "out")
                        save_compressed(CompressResult(model, tokenizer, config, units, errors, profile, seconds,
                                                       tokens.numel()), folder, overwrite=True)
                        compressed = moepress.load(folder, dtype=torch.float32)
                        result = compare_to_reference(compressed, reference, windows, batch_size=8, progress=False)
                    row = {"model": name, "bits": bits, "group_size": args.group_size or None, "seed": seed,
                           "setting": label, **setting, "kl_divergence": round(result.kl_divergence, 6),
                           "top1_agreement": round(result.top1_agreement, 5),
                           "bits_per_param": bits_per_param(units, shapes),
                           "perplexity": round(result.perplexity, 4), "compress_seconds": round(seconds, 2)}
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    save()
    print("| model | bits | seed | setting | KL | top-1 | ppl | time s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['bits']} | {r['seed']} | {r['setting']} | {r['kl_divergence']:.5f} | "
              f"{r['top1_agreement']:.3f} | {r['perplexity']:.3f} | {r['compress_seconds']:.1f} |")
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

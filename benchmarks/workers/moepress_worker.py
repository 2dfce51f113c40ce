"""Quality-benchmark worker for moepress itself (and the uncompressed baseline, --bits 16)."""

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
    worker_args,
)


def _args():
    def extra(p):
        p.add_argument("--refine", type=int, default=0, help="refinement steps per layer (moepress compress's "
                                                             "default: moepress.refine.REFINE_STEPS)")
        p.add_argument("--budget", default=None, help="mixed precision: plan within this budget (e.g. 3bits) with "
                                                      "moepress plan's defaults, then compress (--bits is ignored)")
        p.add_argument("--scope", default="all", choices=("experts", "all"), help="the budget's scope")
    return worker_args(extra)


def main(args, row):
    import moepress
    from moepress.compress import CompressConfig, CompressResult, quantize_model
    from moepress.export import save_compressed

    reference, tokenizer = load_reference(args.model)
    windows = eval_windows(tokenizer, args.eval, args.seq_len, args.eval_samples)
    params = linear_params(reference)
    if args.bits == 16:
        row.update(tool="baseline", method="uncompressed", group_size=None, compress_seconds=0.0)
        return evaluate_row(moepress.load(args.model, dtype=torch.float32), reference, windows, args.model, params, row)
    act_order = getattr(args, "act_order", None) or "static"  # moepress's default
    config = CompressConfig(bits=args.bits, group_size=args.group_size or None, method=args.method,
                            calib_samples=args.calib_samples, seq_len=args.seq_len, calib=args.calib,
                            act_order=act_order, refine=args.refine, seed=args.calib_seed)
    if args.budget:
        return _mixed(args, row, config, reference, tokenizer, windows, params)
    tokens = calib_windows(tokenizer, args.calib, args.seq_len, args.calib_samples, seed=args.calib_seed)
    # Load in the checkpoint's own dtype (as `moepress compress` does): the parts that stay unquantized
    # (embeddings, norms, routers) are saved in it; calibration still computes in float32 on CPU.
    model = moepress.load(args.model)
    started = time.time()
    units, errors, profile = quantize_model(model, tokens, config, progress=False)
    seconds = time.time() - started
    out = os.path.join(args.workdir, "out")
    save_compressed(CompressResult(model, tokenizer, config, units, errors, profile, seconds, tokens.numel()), out, overwrite=True)
    row.update(tool="moepress", method=args.method, compress_seconds=round(seconds, 2),
               act_order=act_order if args.method == "gptq" else "off", refine=args.refine)
    return evaluate_row(moepress.load(out, dtype=torch.float32), reference, windows, out, params, row)


def _mixed(args, row, config, reference, tokenizer, windows, params):
    """A planned mixed-precision row: ``moepress compress --budget`` (plan with the command's defaults,
    then compress; the time includes the plan), on the same calibration windows (config.seed)."""
    import moepress
    from moepress.allocate.command import PlanOptions

    planning = PlanOptions(budget=args.budget, scope=args.scope, group_size=args.group_size or None,
                           calib=args.calib, calib_samples=args.calib_samples, seq_len=args.seq_len,
                           seed=args.calib_seed)
    out = os.path.join(args.workdir, "out")
    started = time.time()
    moepress.compress(args.model, config=config, out=out, budget=args.budget, planning=planning, progress=False)
    seconds = time.time() - started
    import json

    record = json.load(open(os.path.join(out, "moepress.json")))
    os.remove(os.path.join(out, "costs.safetensors"))  # the plan's cost table, saved beside the model: not the model's bytes
    plan = record.get("plan") or {}
    row.update(tool="moepress", method="gptq", budget=args.budget, scope=args.scope,
               strategy=plan.get("strategy"), estimator=plan.get("estimator"), compress_seconds=round(seconds, 2),
               act_order=config.act_order, refine=args.refine)
    return evaluate_row(moepress.load(out, dtype=torch.float32), reference, windows, out, params, row)


if __name__ == "__main__":
    run(main, _args)

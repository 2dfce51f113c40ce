"""Weight and activation quantization (``compress --activations int8``): which units tolerate int8 inputs.

    OMP_NUM_THREADS=1 python benchmarks/activations.py --models zoo/models/tiny-mixtral zoo/models/tiny-deepseek

Li et al. (arXiv 2406.08155, "Examining Post-Training Quantization for Mixture-of-Experts") benchmark
weight-and-activation quantization on MoE models and ask which structures need the bits. Rows per model:

* W16A16: the model itself (KL 0; the perplexity baseline);
* W8A16, W8A8 (8-bit weights per channel, compressed-tensors' W8A8 weights) and W4A16, W4A8 (4-bit,
  group 128): moepress GPTQ with and without ``--activations int8``; each is saved and scored through
  ``moepress.load`` of its checkpoint, so the metadata's round trip is in every A8 figure;
* W8A8/W4A8 with GPTQ's Hessians gathered from the int8-rounded inputs (``activations_hessian``;
  the routed down projection's from float ``act(gate) * up``);
* W8A8/W4A8 "A8 at run time only": the W*A16 model with int8 activations switched on after
  compression, which tells what calibrating each layer on the W+A-quantized layers before it buys;
* W16A8 on one unit class at a time (attention projections, routed experts' gate/up/down, shared
  experts, dense MLP where the model has them), then within each class on the output projection
  alone (o_proj, down_proj: inputs from attention or from ``act(gate) * up``) and on the others alone
  (q/k/v..., gate/up: the normed hidden state), and on all of them: float weights, int8 inputs there
  only (the router always keeps float inputs). These rows do not depend on calibration.

The compressed rows are repeated for every ``--seeds`` calibration seed (the differences between
calibration variants are small next to the seed-to-seed spread).

Every row uses the quality benchmark's windows and metrics (benchmarks/workers/common.py: calib_windows,
eval_windows, evaluate_row), as benchmarks/refine.py does. Writes benchmarks/results/activations-<date>.json
(rewritten after every row) and prints a markdown table.
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

# unit class -> what its canonical names contain (moepress.model.view)
UNIT_CLASSES = {"attention": ".attn.", "routed experts": ".experts.", "shared experts": ".shared.",
                "dense MLP": ".mlp."}
# a class's output projection (its input: attention's output, or act(gate) * up), apart from the others
OUTPUT_PROJECTIONS = (".o_proj", ".down_proj")
# scheme -> (weight bits, group size, activations, GPTQ's Hessians from the int8-rounded inputs)
SCHEMES = {"W8A16": (8, None, None, False), "W8A8": (8, None, "int8", False), "W8A8-hessian": (8, None, "int8", True),
           "W4A16": (4, 128, None, False), "W4A8": (4, 128, "int8", False), "W4A8-hessian": (4, 128, "int8", True)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="calibration windows' seeds")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch

    import moepress
    from benchmarks.workers.common import calib_windows, eval_windows, evaluate_row, linear_params, load_reference
    from moepress.compress import CompressConfig, CompressResult, quantize_model
    from moepress.export import save_compressed
    from moepress.model import MoEView
    from moepress.runtime.install import apply_activations, quantized_units

    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"activations-{date}.json")
    rows: list[dict] = []

    def save():
        payload = {"date": date, "settings": vars(args), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                   "torch_threads": torch.get_num_threads(), "rows": rows}
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out + ".tmp", "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(out + ".tmp", out)

    def record(row):
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        save()

    for model_dir in args.models:
        name = os.path.basename(os.path.normpath(model_dir))
        reference, tokenizer = load_reference(model_dir)
        windows = eval_windows(tokenizer, "builtin:eval", args.seq_len, args.eval_samples)
        params = linear_params(reference)
        present = {cls for cls, marker in UNIT_CLASSES.items()
                   if any(marker in unit for unit in MoEView(reference).unit_shapes())}

        def float_row(label: str, select, units: str) -> None:
            model, _ = load_reference(model_dir)
            count = apply_activations(model, "int8", select) if select is not None else 0
            row = {"model": name, "scheme": label, "int8_inputs": units, "units_with_int8_inputs": count,
                   "weight_bits": 16, "group_size": None}
            record(evaluate_row(model, reference, windows, None, params, row))

        float_row("W16A16", None, "none")
        for cls in UNIT_CLASSES:
            if cls in present:
                marker = UNIT_CLASSES[cls]
                float_row("W16A8", lambda unit, m=marker: m in unit, cls)
                float_row("W16A8", lambda unit, m=marker: m in unit and unit.endswith(OUTPUT_PROJECTIONS),
                          f"{cls}: o_proj/down_proj")
                float_row("W16A8", lambda unit, m=marker: m in unit and not unit.endswith(OUTPUT_PROJECTIONS),
                          f"{cls}: the others")
        float_row("W16A8", lambda unit: True, "all units")

        calibration = {seed: calib_windows(tokenizer, "builtin:calib", args.seq_len, args.calib_samples, seed=seed)
                       for seed in args.seeds}
        for seed, scheme in [(seed, scheme) for seed in args.seeds for scheme in args.schemes]:
            tokens = calibration[seed]
            bits, group_size, activations, hessian = SCHEMES[scheme]
            config = CompressConfig(bits=bits, group_size=group_size, calib_samples=args.calib_samples,
                                    seq_len=args.seq_len, seed=seed, activations=activations,
                                    activations_hessian=hessian)
            model = moepress.load(model_dir)
            started = time.time()
            units, errors, profile = quantize_model(model, tokens, config, progress=False)
            seconds = time.time() - started
            row = {"model": name, "scheme": scheme.split("-")[0], "seed": seed,
                   "int8_inputs": "all quantized units" if activations else "none", "hessian_from_int8_inputs": hessian,
                   "weight_bits": bits, "group_size": group_size, "activations": activations,
                   "calibrated_with_int8_inputs": bool(activations), "expert_hessian": config.expert_hessian,
                   "compress_seconds": round(seconds, 2)}
            with tempfile.TemporaryDirectory(prefix="moepress-activations-") as work:
                folder = os.path.join(work, "out")
                save_compressed(CompressResult(model, tokenizer, config, units, errors, profile, seconds,
                                               tokens.numel()), folder, overwrite=True)
                loaded = moepress.load(folder, dtype=torch.float32)
                record(evaluate_row(loaded, reference, windows, folder, params, row))
                if activations is None:  # the same weights, int8 inputs switched on after compression
                    row = {**row, "scheme": scheme.replace("A16", "A8"), "int8_inputs": "all quantized units",
                           "activations": "int8", "calibrated_with_int8_inputs": False}
                    row["units_with_int8_inputs"] = apply_activations(loaded, "int8", quantized_units(units))
                    record(evaluate_row(loaded, reference, windows, folder, params, row))

    print("| model | scheme | int8 inputs | calibrated on int8 inputs | seed | KL | top-1 | ppl | bits/param |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        calibrated = "" if r["weight_bits"] == 16 or not r.get("activations") else \
            ("no (A8 at run time only)" if not r["calibrated_with_int8_inputs"] else
             "yes, Hessians too" if r.get("hessian_from_int8_inputs") else "yes")
        bpp = f"{r['bits_per_param']:.3f}" if "bits_per_param" in r else "16"
        print(f"| {r['model']} | {r['scheme']} | {r['int8_inputs']} | {calibrated} | {r.get('seed', '')} | "
              f"{r['kl_divergence']:.6f} | "
              f"{r['top1_agreement']:.4f} | {r['perplexity']:.3f} | {bpp} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

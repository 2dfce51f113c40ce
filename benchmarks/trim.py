#!/usr/bin/env python3
"""The trimming benchmark: pruning and expert drop on the zoo's trained models, side by side.

    python benchmarks/trim.py --models zoo/models/tiny-mixtral zoo/models/tiny-deepseek

For every model, one row per recipe, all evaluated on the same evaluation windows against the same
uncompressed model (KL divergence, top-1 agreement, perplexity), with the linear weights' measured
bytes (bits per parameter) and the active linear parameters per token:

* ``4b``: uniform 4-bit GPTQ, the reference point of every row below;
* ``drop25-<criterion>+4b``: 25% of every MoE layer's experts dropped by each criterion, then 4-bit
  (He et al.'s "Expert Drop + 4-bit");
* ``top1+4b``: every token routed to its single best expert (top-k reduction), then 4-bit;
* ``block1+4b`` / ``layer1+4b``: the most redundant decoder layer / MoE sublayer dropped, then 4-bit
  (He et al.'s "Block Drop + 4-bit" and "Layer Drop + 4-bit");
* ``<pattern>-<pruner>+4b``: the routed experts pruned 2:4 (and 50%) by SparseGPT, Wanda and magnitude
  and quantized to 4 bits in the same pass;
* ``<pattern>-<pruner>``: pruned only (the kept weights in bf16).

Active parameters per token count attention, shared experts, dense MLPs and top-k routed experts
(their non-zero weights when pruned); embeddings and the head are not counted. Rows are written to
benchmarks/results/trim-<date>.json as they finish, and a rerun with the same --out skips the rows it
already has; a Pareto plot per model (KL against bytes and against active parameters) is drawn
beside the JSON. With ``--bits 3`` the table also has the joint optimizer's rows:

* ``joint@3bits,active0.8``: ``compress --budget 3bits --scope all --active 0.8 --prune-options
  50%+4b,2:4+4b,50%+3b,50%+2b``: bits, pruning, expert drops, top-k and layer/block drops chosen
  together at the bytes of uniform 3-bit and 80% of the active parameters (the issue's target: KL at
  most uniform 3-bit's);
* ``joint@3bits,active0.8,no-prune``: the same with removals only;
* ``ilp@3bits``: the quantization-only ILP (kl_scaled) at the same bytes, all active parameters.

Peer rows (llm-compressor's REAP, Wanda and SparseGPT modifiers) are in benchmarks/trim_peers.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import moepress  # noqa: E402
from moepress.evaluate import active_params  # noqa: E402

CRITERIA = ("frequency", "mass", "router", "reap", "kl")


JOINT_PRUNE_OPTIONS = "50%+4b,2:4+4b,50%+3b,50%+2b"


def recipes(bits: int, prune_options: str = JOINT_PRUNE_OPTIONS, trim: str = "experts,top_k,moe_layers,blocks",
            fitness_samples: int = 8) -> dict[str, dict]:
    """Recipe name -> compress options (``budget`` and ``planning``: planned, then compressed)."""
    out = {f"{bits}b": {}}
    # The joint optimizer at the bytes of uniform <bits>-bit over every linear and 80% of the active
    # parameters; with removals only; and the quantization-only ILP at the same bytes (kl_scaled).
    joint = {"scope": "all", "active": 0.8, "trim": trim, "fitness_samples": fitness_samples}
    out[f"joint@{bits}bits,active0.8"] = {"budget": f"{bits}bits", "planning": {**joint, "prune_options": prune_options}}
    out[f"joint@{bits}bits,active0.8,no-prune"] = {"budget": f"{bits}bits", "planning": joint}
    out[f"ilp@{bits}bits"] = {"budget": f"{bits}bits", "planning": {"scope": "all", "estimator": "kl_scaled",
                                                                      "fitness_samples": fitness_samples}}
    for criterion in CRITERIA:
        out[f"drop25-{criterion}+{bits}b"] = {"drop_experts": "25%", "drop_criterion": criterion}
    out[f"top1+{bits}b"] = {"top_k": 1}
    out[f"block1+{bits}b"] = {"drop_blocks": 1}
    out[f"layer1+{bits}b"] = {"drop_moe_layers": 1}
    for pattern in ("2:4", "50%"):
        for pruner in ("sparsegpt", "wanda", "magnitude"):
            out[f"{pattern}-{pruner}+{bits}b"] = {"prune": pattern, "pruner": pruner}
            out[f"{pattern}-{pruner}"] = {"prune": pattern, "pruner": pruner, "bits": 16}
    return out


def run_row(model_dir: str, name: str, options: dict, args, workdir: str) -> dict:
    out = os.path.join(workdir, re.sub(r"[^A-Za-z0-9.+@-]", "-", name))
    started = time.time()
    if "budget" in options:
        settings = {**options, "planning": {**options["planning"], "calib_samples": args.calib_samples,
                                            "seq_len": args.seq_len, "group_size": args.group_size}}
        moepress.compress(model_dir, out=out, overwrite=True, calib="builtin:calib", calib_samples=args.calib_samples,
                          seq_len=args.seq_len, progress=False, group_size=args.group_size, **settings)
        plan = json.load(open(os.path.join(out, "moepress.json"))).get("plan") or {}
    else:
        settings = {"bits": args.bits, "group_size": args.group_size, **options}
        moepress.compress(model_dir, out=out, overwrite=True, calib="builtin:calib", calib_samples=args.calib_samples,
                          seq_len=args.seq_len, progress=False, **settings)
        plan = {}
    seconds = time.time() - started
    report = moepress.evaluate(out, reference=model_dir, text="builtin:eval", seq_len=args.seq_len,
                               samples=args.eval_samples, progress=False)
    counted = active_params(moepress.load(out))
    active, total = counted["active"], counted["total"]
    fp = report.footprint
    return {"model": os.path.basename(os.path.normpath(model_dir)), "recipe": name, "settings": settings,
            "kl": report.kl_divergence, "top1": report.top1_agreement, "perplexity": report.perplexity,
            "reference_perplexity": report.reference_perplexity, "linear_bytes": fp["linear_bytes"],
            "bits_per_param": fp["bits_per_param"],
            # the budget's measure: the checkpoint's linear bytes over the ORIGINAL model's linear parameters
            "bits_per_original_param": round(8 * fp["linear_bytes"] / report.reference_footprint["linear_params"], 4),
            "active_params": active, "linear_params": total,
            "compress_seconds": round(seconds, 1), "status": "ok",
            **({"plan": {"totals": plan.get("totals"), "trim": plan.get("trim"),
                         "rounds": (plan.get("info") or {}).get("rounds")}} if plan else {})}


def table(rows: list[dict]) -> str:
    lines = ["| model | recipe | KL | top-1 | ppl (ref) | bits per original param | active params | KL / 4b |",
             "|---|---|---|---|---|---|---|---|"]
    base = {r["model"]: r["kl"] for r in rows if re.fullmatch(r"\d+b", r["recipe"]) and r.get("status") == "ok"}
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['model']} | {r['recipe']} | failed: {r.get('error', '')[:80]} |||||||")
            continue
        ratio = r["kl"] / base[r["model"]] if base.get(r["model"]) else float("nan")
        lines.append(f"| {r['model']} | {r['recipe']} | {r['kl']:.4f} | {r['top1']:.3f} | {r['perplexity']:.2f} "
                     f"({r['reference_perplexity']:.2f}) | {r['bits_per_original_param']:.3f} | {r['active_params']:,} | "
                     f"{ratio:.2f} |")
    return "\n".join(lines)


def pareto_plots(rows: list[dict], prefix: str) -> list[str]:
    """Per model: KL (log scale) against bytes (bits per original parameter) and against active
    parameters, every recipe a labelled point; the joint plans stand out. Returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for model in sorted({r["model"] for r in rows if r.get("status") == "ok"}):
        ok = [r for r in rows if r["model"] == model and r.get("status") == "ok" and r["kl"] > 0]
        fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
        for ax, key, label in ((axes[0], "bits_per_original_param", "bits per original linear parameter"),
                               (axes[1], "active_params", "active linear parameters per token")):
            for r in ok:
                joint = r["recipe"].startswith(("joint", "ilp"))
                ax.scatter(r[key], r["kl"], c="tab:red" if joint else "tab:blue", s=30 if joint else 14)
                ax.annotate(r["recipe"], (r[key], r["kl"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("KL divergence from the original (nats per token)")
            ax.grid(alpha=0.3)
        fig.suptitle(f"{model}: quality against bytes and active parameters (red: planned by the ILPs)")
        fig.tight_layout()
        path = f"{prefix}-{model}.png"
        fig.savefig(path, dpi=130)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["zoo/models/tiny-mixtral", "zoo/models/tiny-deepseek"])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--only", nargs="*", default=None, help="recipe names to run (default all)")
    p.add_argument("--joint-prune-options", default=JOINT_PRUNE_OPTIONS, help="the joint rows' --prune-options")
    p.add_argument("--joint-trim", default="experts,top_k,moe_layers,blocks", help="the joint rows' --trim")
    p.add_argument("--fitness-samples", type=int, default=8, help="held-out windows the planners measure KL on")
    p.add_argument("--out", default=None, help="JSON (default benchmarks/results/trim-<date>.json)")
    args = p.parse_args(argv)
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"trim-{date}.json")
    payload = {"date": date, "command": " ".join([sys.executable, *sys.argv]),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "torch_threads": torch.get_num_threads()},
               "settings": vars(args), "rows": []}
    if os.path.exists(out):
        payload["rows"] = json.load(open(out)).get("rows", [])
    done = {(r["model"], r["recipe"]) for r in payload["rows"] if r.get("status") == "ok"}
    with tempfile.TemporaryDirectory(prefix="moepress-trim-") as workdir:
        for model_dir in args.models:
            for name, options in recipes(args.bits, args.joint_prune_options, args.joint_trim,
                                         args.fitness_samples).items():
                model = os.path.basename(os.path.normpath(model_dir))
                if (model, name) in done or (args.only and name not in args.only):
                    continue
                print(f"[trim] {model} {name}", file=sys.stderr, flush=True)
                try:
                    row = run_row(model_dir, name, options, args, workdir)
                except Exception as exc:  # a failed recipe is a row saying how, not a lost benchmark
                    row = {"model": model, "recipe": name, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
                row["run"] = {k: v for k, v in vars(args).items() if k not in ("models", "only", "out")}
                payload["rows"] = [r for r in payload["rows"] if (r["model"], r["recipe"]) != (model, name)] + [row]
                with open(out + ".tmp", "w") as f:
                    json.dump(payload, f, indent=1)
                os.replace(out + ".tmp", out)
    print(table(payload["rows"]))
    print(f"wrote {out}", file=sys.stderr)
    for path in pareto_plots(payload["rows"], out[:-len(".json")] if out.endswith(".json") else out):
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

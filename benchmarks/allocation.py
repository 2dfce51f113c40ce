#!/usr/bin/env python3
"""The allocation benchmark: every strategy and damage estimator against uniform, at the same bytes.

    python benchmarks/allocation.py --models zoo/models/tiny-mixtral zoo/models/tiny-deepseek

Per model: one cost table (options 2/3/4/8/16 bits, group 128 or --group-size) from 128 x 256 calibration tokens,
keeping every unit's GPTQ-quantized variant. Then, at budgets of 2.25, 2.5, 3.0 and 3.5 average
bits over the routed experts (attention, shared experts and dense MLPs at 4 bits), a plan per
strategy: uniform (at fractional budgets a random 2/3-bit split at the same bytes, 3 seeds averaged),
greedy, the heuristic of Li et al. with all rules and with each expert rule alone, the ILP with each
estimator (expert granularity; also per neuron group of --channel-group neurons, per linear and per
layer with the routed estimator), and the evolutionary search seeded with the ILP (fitness: KL on 8
held-out calibration windows). With the budget over all linear weights instead (scope "all", no unit
pinned at 4 bits): uniform, the heuristic with the attention rule alone, the shared-expert rule
alone and all rules, and the ILP (with gptq_routed and with kl_scaled damage). And the ILP over all
linears given exactly the bytes of the experts-scope uniform plan (attention at 4 bits included),
compared with that uniform plan.

``kl_scaled`` is gptq_routed damage rescaled per (layer, kind) and option by the KL that block adds
at 2, 3 and 4 bits to a model whose other units are at 4 bits, measured on the same 8 held-out
calibration windows as evolution's fitness.

Every plan is scored on the evaluation split (64 x 256 tokens, seed 0, as the quality benchmark):
KL divergence and top-1 agreement against the uncompressed model and perplexity, by swapping the
cached quantized variants into a float copy of the model (each unit quantized on the uncompressed
model's inputs). The headline plans (uniform and the best plan per budget) are then compressed
for real, through ``moepress.compress(plan=...)`` (sequential GPTQ, packed checkpoint), and scored
again, so the table also shows what the fast scoring misses.

Ablations: each heuristic rule alone; evolution's population and generations; plans made from one
calibration domain (KJV only / Austen only) scored on each domain's evaluation text. A synthetic
Mixtral-8x7B-sized table (32 layers x 8 experts x 3 linears x 5 options) times the ILP.

Writes benchmarks/results/allocation-<date>.json, a markdown table (.md) and a Pareto plot
(bytes vs KL) per model (.png).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from moepress.allocate import Budget, add_kl_scaled, allocate  # noqa: E402
from moepress.allocate.evolution import PlanEvaluator  # noqa: E402
from moepress.costs import build_cost_table, synthetic_table  # noqa: E402
from moepress.treatment import Treatment  # noqa: E402
from moepress.errors import MoepressError  # noqa: E402

BUDGETS = (2.25, 2.5, 3.0, 3.5)
EXPERT_RULES = ("frequency", "outlier", "block", "first_k")


def log(msg: str) -> None:
    print(f"[allocation {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def domain_text(split: str, source: str) -> str:
    """The part of a shipped split that comes from one source (manifest document offsets)."""
    from moepress.data import load_text
    from moepress.data.corpus import builtin_manifest

    text = load_text(f"builtin:{split}")
    documents = builtin_manifest()["splits"][split]["documents"]
    return "\n\n".join(text[d["start"]:d["start"] + d["chars"]] for d in documents if d["source"] == source)


def windows(tokenizer, text: str, seq_len: int, samples: int, seed: int) -> torch.Tensor:
    """Token windows of a ``builtin:`` split or of raw text (a calibration domain)."""
    from moepress.data import load_text, token_windows

    return token_windows(load_text(text) if text.startswith("builtin:") else text, tokenizer, seq_len, samples, seed=seed)


def row_options(table, plan) -> list:
    """Table option index per row (a tuple of them for an expert row split into neuron groups)."""
    resolved = plan.resolve(table.rows)
    return [tuple(table.option_index(o) for o in opt) if isinstance(opt, tuple) else table.option_index(opt)
            for opt in (resolved[r.name] for r in table.rows)]


def score(evaluator, table, plan) -> dict:
    m = evaluator.metrics(row_options(table, plan))
    return {"kl": m["kl"], "top1": m["top1"], "perplexity": m["perplexity"]}


def plan_row(model_name, label, strategy, budget, plan, metrics, extra=None) -> dict:
    t = plan.totals
    return {"model": model_name, "label": label, "strategy": strategy, "budget_bits": budget,
            "scope": (plan.budget or {}).get("scope", "experts"),
            "estimator": plan.estimator, "granularity": plan.granularity,
            "expert_bytes": t["bytes_by_kind"].get("expert"), "linear_bytes": t["bytes"],
            "expert_bits": t["average_bits"].get("expert"), "all_bits": t["average_bits"]["all"],
            "planning_seconds": plan.info.get("planning_seconds"), **metrics, **(extra or {})}


def run_model(model_dir: str, args) -> tuple[list[dict], dict]:
    import moepress
    from moepress.loading import load_tokenizer

    name = os.path.basename(os.path.normpath(model_dir))
    tokenizer = load_tokenizer(model_dir)
    model = moepress.load(model_dir, dtype=torch.float32)
    calib = windows(tokenizer, "builtin:calib", args.seq_len, args.calib_samples, seed=0)
    held_out = windows(tokenizer, "builtin:calib", args.seq_len, args.fitness_samples, seed=1)
    eval_tokens = windows(tokenizer, "builtin:eval", args.seq_len, args.eval_samples, seed=0)

    log(f"{name}: cost table on {calib.numel():,} calibration tokens")
    started = time.time()
    gs = args.group_size
    table = build_cost_table(model, calib, [Treatment.parse(b, gs) for b in (2, 3, 4, 8, 16)], keep_variants=True,
                             progress=False)
    table_seconds = time.time() - started
    fitness = PlanEvaluator(model, table, held_out)
    test = PlanEvaluator(model, table, eval_tokens)
    # kl_scaled: the table's damage weighed per (layer, kind) by KL measured on the held-out windows.
    sensitivity = add_kl_scaled(table, fitness, progress=True)
    if args.sensitivity_alone:  # ablation: the same, each block measured in the otherwise original model
        add_kl_scaled(table, fitness, name="kl_scaled_alone", background=None)
    log(f"{name}: layer sensitivity, {sensitivity['evaluations']} evaluations in {sensitivity['seconds']} s")
    rows: list[dict] = []

    def add(label, strategy, bits, plan, extra=None):
        row = plan_row(name, label, strategy, bits, plan, score(test, table, plan), extra)
        rows.append(row)
        log(f"{name} {bits} bits {label}: KL {row['kl']:.5f} top1 {row['top1']:.4f} ppl {row['perplexity']:.2f} "
            f"experts {row['expert_bits']} bits/param")
        return plan

    def allocate(table_, budget, strategy, **kw):  # the benchmark's options: group size and the others' option
        from moepress.allocate import allocate as allocate_

        kw.setdefault("others", args.others)
        return allocate_(table_, budget, strategy, group_size=gs, **kw)

    plans = {}
    for bits in args.budgets:
        budget = Budget.parse(f"{bits}bits")
        seeds = (0, 1, 2) if bits != int(bits) else (0,)
        uniform_rows = []
        for seed in seeds:
            plan = allocate(table, budget, "uniform", others=args.others, seed=seed)
            uniform_rows.append(score(test, table, plan))
        mean = {k: float(np.mean([r[k] for r in uniform_rows])) for k in uniform_rows[0]}
        plans[(bits, "uniform")] = allocate(table, budget, "uniform", others=args.others, seed=0)
        add("uniform" + (" (random 2/3 split, 3 seeds)" if len(seeds) > 1 else ""), "uniform", bits,
            plans[(bits, "uniform")], {**mean, "seeds": len(seeds),
                                       "kl_seeds": [r["kl"] for r in uniform_rows]})
        plans[(bits, "greedy")] = add("greedy (gptq_routed)", "greedy", bits, allocate(table, budget, "greedy", others=args.others))
        plans[(bits, "heuristic")] = add("heuristic (all rules)", "heuristic", bits, allocate(table, budget, "heuristic", others=args.others))
        for rule in EXPERT_RULES:
            add(f"heuristic: {rule} only", "heuristic", bits, allocate(table, budget, "heuristic", others=args.others, rules=(rule,)),
                {"ablation": "rule"})
        for estimator in ("gptq", "gptq_routed", "hawq", "kl_scaled"):
            plans[(bits, f"ilp-{estimator}")] = add(f"ilp ({estimator})", "ilp", bits,
                                                   allocate(table, budget, "ilp", others=args.others, estimator=estimator))
        if args.sensitivity_alone:
            add("ilp (kl_scaled_alone)", "ilp", bits, allocate(table, budget, "ilp", estimator="kl_scaled_alone"),
                {"ablation": "sensitivity"})
        try:
            plans[(bits, "ilp-channel")] = add(_label_of("ilp-channel").format(c=args.channel_group), "ilp", bits,
                                               allocate(table, budget, "ilp", granularity="channel",
                                                        channel_group=args.channel_group))
        except MoepressError as exc:
            log(f"channel ILP at {bits} bits: {exc}")
        add("ilp (gptq_routed, per linear)", "ilp", bits,
            allocate(table, budget, "ilp", others=args.others, granularity="linear"), {"ablation": "granularity"})
        try:
            add("ilp (gptq_routed, per layer)", "ilp", bits, allocate(table, budget, "ilp", others=args.others, per_layer=True),
                {"ablation": "per_layer"})
        except MoepressError as exc:
            log(f"per-layer ILP at {bits} bits: {exc}")
        # The same bytes as this budget's uniform plan (experts at the budget, the others at 4 bits),
        # spent by the ILP over every linear: what a user who only cares about total bytes would do.
        same_bytes = Budget(bytes=plans[(bits, "uniform")].totals["bytes"], scope="all")
        plans[(bits, "ilp-kl_scaled-same-bytes")] = add(
            _label_of("ilp-kl_scaled-same-bytes"), "ilp", bits,
            allocate(table, same_bytes, "ilp", options=[o for o in table.options if not o.keep], estimator="kl_scaled"),
            {"compare_scope": "experts"})
        if not args.skip_evolution:
            evo = allocate(table, budget, "evolution", evolution={"evaluate": fitness, "population": args.population,
                                                                  "generations": args.generations})
            plans[(bits, "evolution")] = add("evolution (seeded with ilp gptq_routed)", "evolution", bits, evo,
                                             {k: evo.info[k] for k in ("seed_fitness_kl", "best_fitness_kl",
                                                                       "evaluations", "search_seconds")})

        # The budget over every linear weight: do the attention and shared-expert rules pay?
        if not args.skip_scope_all:
            everything = Budget.parse(f"{bits}bits", scope="all")
            quantized = [o for o in table.options if not o.keep]
            seeds_all = (0, 1, 2) if bits != int(bits) else (0,)
            uniform_all = [score(test, table, allocate(table, everything, "uniform", seed=seed, options=quantized))
                           for seed in seeds_all]
            mean = {k: float(np.mean([r[k] for r in uniform_all])) for k in uniform_all[0]}
            add("uniform over all linears" + (" (random 2/3 split, 3 seeds)" if len(seeds_all) > 1 else ""), "uniform",
                bits, allocate(table, everything, "uniform", options=quantized), {**mean, "ablation": "scope_all"})
            has_shared = any(r.kind in ("shared", "dense_mlp") for r in table.rows)
            for label, rules in (("attention only", ("attention",)), ("shared only", ("shared",)),
                                 ("all rules", None)):
                if rules == ("shared",) and not has_shared:
                    continue  # no shared expert or dense MLP: the rule ranks nothing
                kw = {} if rules is None else {"rules": rules}
                add(f"heuristic over all linears: {label}", "heuristic", bits,
                    allocate(table, everything, "heuristic", options=quantized, **kw), {"ablation": "scope_all"})
            for estimator in ("gptq_routed", "kl_scaled") + (("kl_scaled_alone",) if args.sensitivity_alone else ()):
                add(f"ilp ({estimator}) over all linears", "ilp", bits,
                    allocate(table, everything, "ilp", options=quantized, estimator=estimator), {"ablation": "scope_all"})

    # Evolution's population and generations, at 2.5 bits.
    budget = Budget.parse("2.5bits")
    for population, generations in ([] if args.skip_evolution else args.evolution_grid):
        evo = allocate(table, budget, "evolution", others=args.others, seed=1,
                       evolution={"evaluate": fitness, "population": population, "generations": generations})
        add(f"evolution p{population} g{generations}", "evolution", 2.5, evo,
            {"ablation": "evolution", "population": population, "generations": generations,
             **{k: evo.info[k] for k in ("seed_fitness_kl", "best_fitness_kl", "evaluations", "search_seconds")}})

    # The headline plans, compressed for real.
    if not args.skip_real:
        for bits in args.real_budgets or args.budgets:
            budget_rows = [r for r in rows if r["budget_bits"] == bits and "ablation" not in r]
            best = min((r for r in budget_rows if r["strategy"] != "uniform"), key=lambda r: r["kl"])
            key = next(k for k in plans if k[0] == bits and plans[k] is not None
                       and _label_of(k[1]).format(c=args.channel_group) == best["label"])
            for label, plan in (("uniform", plans[(bits, "uniform")]), (best["label"], plans[key])):
                log(f"{name} {bits} bits: compressing for real with {label}")
                started = time.time()
                result = moepress.compress(model_dir, plan=plan, calib="builtin:calib", calib_samples=args.calib_samples,
                                           seq_len=args.seq_len, progress=False)
                metrics = test.score(result.model.float().eval())
                rows.append({**plan_row(name, label + " [real compress]", plan.strategy, bits, plan, metrics),
                             "real": True, "compress_seconds": round(time.time() - started, 1),
                             "compare_scope": "experts"})
                log(f"  real: KL {metrics['kl']:.5f} top1 {metrics['top1']:.4f} ppl {metrics['perplexity']:.2f}")

    # Calibration domain: plans from KJV-only and Austen-only tables, scored on each domain's eval text.
    if not args.skip_domains:
        domain_eval = {src: windows(tokenizer, domain_text("eval", src), args.seq_len, args.eval_samples // 2, 0)
                       for src in ("kjv", "austen")}
        domain_test = {src: PlanEvaluator(model, table, toks) for src, toks in domain_eval.items()}
        for src in ("kjv", "austen"):
            toks = windows(tokenizer, domain_text("calib", src), args.seq_len, args.calib_samples // 2, 0)
            log(f"{name}: cost table on {src} calibration only")
            domain_table = build_cost_table(model, toks, table.options, progress=False)
            plan = allocate(domain_table, Budget.parse("2.5bits"), "ilp", others=args.others)
            for target, evaluator in domain_test.items():
                m = evaluator.metrics(row_options(table, plan))
                rows.append({**plan_row(name, f"ilp planned on {src}, scored on {target}", "ilp", 2.5, plan, m),
                             "ablation": "domain", "plan_domain": src, "eval_domain": target})
        for target, evaluator in domain_test.items():
            m = evaluator.metrics(row_options(table, plans[(2.5, "ilp-gptq_routed")]))
            rows.append({**plan_row(name, f"ilp planned on all, scored on {target}", "ilp", 2.5,
                                    plans[(2.5, "ilp-gptq_routed")], m),
                         "ablation": "domain", "plan_domain": "all", "eval_domain": target})
            m = evaluator.metrics(row_options(table, plans[(2.5, "uniform")]))
            rows.append({**plan_row(name, f"uniform split, scored on {target}", "uniform", 2.5,
                                    plans[(2.5, "uniform")], m),
                         "ablation": "domain", "plan_domain": "-", "eval_domain": target})
    info = {"table_seconds": round(table_seconds, 1), "calibration_tokens": int(calib.numel()),
            "units": len(table.rows), "fitness_evaluations": fitness.evaluations,
            "sensitivity_seconds": sensitivity["seconds"], "sensitivity_blocks": sensitivity["blocks"]}
    return rows, info


def _label_of(key: str) -> str:
    return {"uniform": "uniform", "greedy": "greedy (gptq_routed)", "heuristic": "heuristic (all rules)",
            "evolution": "evolution (seeded with ilp gptq_routed)",
            "ilp-gptq": "ilp (gptq)", "ilp-gptq_routed": "ilp (gptq_routed)", "ilp-hawq": "ilp (hawq)",
            "ilp-kl_scaled": "ilp (kl_scaled)",
            "ilp-kl_scaled-same-bytes": "ilp (kl_scaled) over all linears, at uniform's bytes",
            "ilp-channel": "ilp (gptq_routed, per {c} neurons)"}.get(key, key)


def synthetic_ilp_timing() -> list[dict]:
    out = []
    table = synthetic_table(layers=32, experts=8, hidden=4096, intermediate=14336, seed=0, neurons=True)
    for granularity, channel_group in (("expert", None), ("linear", None), ("channel", 512), ("channel", 128)):
        started = time.time()
        plan = allocate(table, Budget.parse("2.5bits"), "ilp", granularity=granularity, channel_group=channel_group)
        seconds = time.time() - started
        label = granularity if channel_group is None else f"channel ({channel_group} neurons)"
        out.append({"table": "synthetic Mixtral-8x7B (32 layers x 8 experts x 3 linears x 5 options)",
                    "granularity": label, "units": len(plan.units), "seconds": round(seconds, 3),
                    "within_budget": plan.totals["budget_scope_bytes"] <= plan.budget["bytes"]})
        log(f"synthetic Mixtral-8x7B ILP ({label}): {seconds:.2f} s")
    return out


def markdown(rows: list[dict]) -> str:
    head = "| model | budget | plan | experts bits/param | all bits/param | KL | KL / uniform | top-1 | ppl | plan s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    def key(r):  # the uniform plan a row is compared with: same model, budget and scope
        return r["model"], r["budget_bits"], r.get("compare_scope") or r.get("scope", "experts")

    uniform = {key(r): r["kl"] for r in rows if r["label"].startswith("uniform") and r.get("ablation") in (None, "scope_all")
               and not r.get("real")}
    uniform_real = {key(r): r["kl"] for r in rows if r.get("real") and r["strategy"] == "uniform"}
    for r in rows:
        if r.get("ablation") == "domain":
            continue
        base = (uniform_real if r.get("real") else uniform).get(key(r))
        ratio = f"{r['kl'] / base:.2f}" if base else ""
        lines.append(f"| {r['model']} | {r['budget_bits']} | {r['label']} | {r['expert_bits']} | {r['all_bits']} | "
                     f"{r['kl']:.5f} | {ratio} | "
                     f"{r['top1']:.4f} | {r['perplexity']:.2f} | {r.get('planning_seconds') or ''} |")
    domain = [r for r in rows if r.get("ablation") == "domain"]
    if domain:
        lines += ["", "| model | plan (2.5 bits) | scored on | KL | top-1 |", "|---|---|---|---|---|"]
        for r in domain:
            lines.append(f"| {r['model']} | {r['label'].split(',')[0]} | {r['eval_domain']} | {r['kl']:.5f} | {r['top1']:.4f} |")
    return "\n".join(lines)


def pareto_plot(rows: list[dict], model: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    mine = [r for r in rows if r["model"] == model and r.get("ablation") not in ("domain", "scope_all")
            and not r.get("real")]
    styles = {"uniform": ("k", "o"), "greedy": ("tab:gray", "v"), "heuristic": ("tab:orange", "s"),
              "ilp": ("tab:blue", "D"), "evolution": ("tab:green", "*")}
    for strategy, (color, marker) in styles.items():
        pts = [r for r in mine if r["strategy"] == strategy]
        if pts:
            ax.scatter([r["expert_bytes"] / 1e6 for r in pts], [r["kl"] for r in pts], c=color, marker=marker,
                       label=strategy, s=36, alpha=0.8)
    real = [r for r in rows if r["model"] == model and r.get("real")]
    if real:
        ax.scatter([r["expert_bytes"] / 1e6 for r in real], [r["kl"] for r in real], facecolors="none",
                   edgecolors="red", s=90, label="compressed for real")
    ax.set_yscale("log")
    ax.set_xlabel("routed-expert bytes (MB, scales and zeros included)")
    ax.set_ylabel("KL divergence to bf16 (nats/token, eval split)")
    ax.set_title(f"{model}: bytes vs KL per allocation strategy", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--fitness-samples", type=int, default=8)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--generations", type=int, default=10)
    p.add_argument("--evolution-grid", type=lambda s: [tuple(map(int, x.split("x"))) for x in s.split(",")],
                   default=[(8, 5), (16, 10), (32, 20)], help="population x generations pairs, e.g. 8x5,16x10")
    p.add_argument("--others", default="4b",
                   help="option of attention, shared experts and dense MLPs (default 4b; 16b isolates the experts)")
    p.add_argument("--group-size", type=lambda v: None if int(v) == 0 else int(v), default=128,
                   help="group size of every option (default 128; 64 for hidden sizes like 576; 0 = per-channel)")
    p.add_argument("--channel-group", type=int, default=None,
                   help="neurons per unit of the channel-granularity ILP (default: the group size)")
    p.add_argument("--budgets", type=lambda s: [float(x) for x in s.split(",")], default=list(BUDGETS),
                   help="comma-separated average bits over the experts (default 2.25,2.5,3,3.5)")
    p.add_argument("--skip-evolution", action="store_true", help="no evolutionary search (slow on large models)")
    p.add_argument("--real-budgets", type=lambda s: [float(x) for x in s.split(",")], default=None,
                   help="compress for real only at these budgets (default: every budget)")
    p.add_argument("--skip-scope-all", action="store_true", help="skip the budget-over-all-linears block")
    p.add_argument("--skip-real", action="store_true", help="do not compress the headline plans for real")
    p.add_argument("--skip-domains", action="store_true", help="skip the calibration-domain ablation")
    p.add_argument("--sensitivity-alone", action="store_true",
                   help="ablation: also kl_scaled measured in the otherwise original model (background None)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.others = Treatment.parse(args.others, args.group_size)
    args.channel_group = args.channel_group or args.group_size or 32

    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"allocation-{date}.json")
    rows, info = [], {}
    timing = synthetic_ilp_timing()
    for model_dir in args.models:
        model_rows_, model_info = run_model(model_dir, args)
        rows += model_rows_
        info[os.path.basename(os.path.normpath(model_dir))] = model_info
        payload = {"date": date, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                             "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                                             "torch_threads": torch.get_num_threads()},
                   "settings": {k: (str(v) if isinstance(v, Treatment) else v) for k, v in vars(args).items()}, "ilp_timing": timing, "models": info, "rows": rows}
        with open(out + ".tmp", "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(out + ".tmp", out)
    table = markdown(rows)
    with open(out.replace(".json", ".md"), "w") as f:
        f.write(table + "\n")
    for model in info:
        pareto_plot(rows, model, out.replace(".json", f"-{model}.png"))
    print(table)
    print("\nILP on a synthetic Mixtral-8x7B table: " + ", ".join(f"{t['granularity']} {t['seconds']} s" for t in timing))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``moepress plan``: model -> calibration -> cost table -> allocation -> plan file (and picture)."""

from __future__ import annotations

import os
import sys

from ..errors import MoepressError


def make_plan(args) -> None:
    import torch

    from ..costs import CostTable, Option, build_cost_table, model_rows
    from ..data import load_text, token_windows
    from ..loading import load_model, load_tokenizer
    from ..model import MoEView
    from . import RULES, Budget, allocate

    budget = Budget.parse(args.budget, scope=args.scope)
    bits = [int(b) for b in str(args.options).replace(" ", "").split(",") if b]
    options = [Option.parse(b, args.group_size) for b in bits]
    others = Option.parse(args.others, args.group_size)
    rules = tuple(r for r in args.rules.split(",") if r)
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise MoepressError(f"unknown heuristic rule(s) {unknown}; choose from {', '.join(RULES)}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise MoepressError(f"cannot write the plan: folder {out_dir} does not exist")

    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    model = load_model(args.model, trust_remote_code=args.trust_remote_code)
    rows = model_rows(MoEView(model))
    if budget.bytes is not None:  # refuse before the long calibration pass; bytes need no calibration
        from ..costs import option_bytes

        keep = next(model.parameters()).element_size()
        smallest = sum(min(option_bytes(o, r.out_features, r.in_features, symmetric=args.symmetric,
                                        keep_element_size=keep) for o in options)
                       for r in rows if r.kind in budget.kinds)
        if smallest > budget.bytes:
            raise MoepressError(f"budget of {budget.bytes:,} bytes is below the smallest option: the {budget.scope} "
                                f"take at least {smallest:,} bytes; raise the budget")
    if args.channel_group is None:
        args.channel_group = args.group_size or 32
    if args.granularity == "channel":  # refuse a width the options cannot tile before calibrating
        from ..costs import check_channel_group

        gate = next((r for r in rows if r.kind == "expert" and r.linear == "gate_proj"), None)
        if gate is None:
            raise MoepressError("channel granularity needs routed experts; this model has none")
        check_channel_group(options, gate.out_features, gate.in_features, args.channel_group)
    evolving = args.strategy == "evolution"
    scaling = args.estimator == "kl_scaled"
    table = None
    if args.table and os.path.exists(args.table) and not evolving:
        table = CostTable.load(args.table)
        if [r.name for r in table.rows] != [r.name for r in rows]:
            raise MoepressError(f"cost table {args.table} was built for another model; delete it or pick another path")
        if scaling and "kl_scaled" not in table.damage:
            print(f"cost table: {args.table} has no kl_scaled damage yet; rebuilding it to measure it", file=sys.stderr)
            table = None
        else:
            print(f"cost table: read {args.table}", file=sys.stderr)
    fresh = table is None  # built (or measured) here: saved to --table once complete
    if table is None:
        text = load_text(args.calib)
        tokens = token_windows(text, tokenizer, args.seq_len, args.calib_samples, seed=args.seed, what="calibration")
        all_options = sorted(set(options) | {others})
        table = build_cost_table(model, tokens, all_options, symmetric=args.symmetric, damp=args.damp,
                                 device=args.device, batch_size=args.batch_size, progress=not args.quiet,
                                 keep_variants=evolving or scaling)
        table.meta["calibration"] = {"source": args.calib, "samples": args.calib_samples, "seq_len": args.seq_len,
                                     "seed": args.seed}
    evaluator = None
    if table.variants:
        from .evolution import PlanEvaluator

        # Held-out calibration windows: drawn from the same text with another seed.
        held_out = token_windows(load_text(args.calib), tokenizer, args.seq_len, args.fitness_samples,
                                 seed=args.seed + 1, what="held-out calibration")
        with torch.no_grad():
            evaluator = PlanEvaluator(model, table, held_out, batch_size=args.batch_size)
    if scaling and "kl_scaled" not in table.damage:
        from .sensitivity import add_kl_scaled

        with torch.no_grad():
            info = add_kl_scaled(table, evaluator, progress=not args.quiet)
        print(f"layer sensitivity: {info['evaluations']} evaluations ({', '.join(info['probes'])} per layer and kind) "
              f"on {info['windows']} held-out windows in {info['seconds']} s", file=sys.stderr)
    if args.table and fresh:
        table.save(args.table)
        print(f"cost table: saved {args.table} ({table.meta['seconds']} s)", file=sys.stderr)

    evolution = None
    if evolving:
        evolution = {"evaluate": evaluator, "population": args.population, "generations": args.generations}
    plan = allocate(table, budget, args.strategy, estimator=args.estimator, granularity=args.granularity,
                    channel_group=args.channel_group, options=options, others=others, group_size=args.group_size, rules=rules, first_k=args.first_k,
                    per_layer=args.per_layer, seed=args.seed, evolution=evolution)
    plan.info["model"] = args.model
    plan.save(args.out)
    totals = plan.totals
    avg = ", ".join(f"{k} {v}" for k, v in totals["average_bits"].items())
    print(f"plan: {args.strategy} ({args.estimator}, {args.granularity}) within {budget}: "
          f"{totals['budget_scope_bytes']:,} of {plan.budget['bytes']:,} budget bytes; all linears "
          f"{totals['bytes']:,} bytes; bits/param: {avg}")
    if evolving:
        info = plan.info
        print(f"evolution: KL {info['seed_fitness_kl']:.5f} (ILP seed) -> {info['best_fitness_kl']:.5f} "
              f"({100 * info['gain_over_seed']:.1f}% lower) in {info['evaluations']} evaluations, "
              f"{info['search_seconds']} s")
    print(f"wrote {args.out}")
    if args.plot:
        from .plot import plot_plan

        plot_plan(plan, rows, args.plot)
        print(f"wrote {args.plot}")

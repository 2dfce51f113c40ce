"""Planning a model: model -> calibration -> cost table -> allocation -> plan (``moepress plan``, and
the first pass of ``moepress compress --budget``).

:func:`plan_model` is the public function; :class:`PlanOptions` says what it does (the command's
flags, one field each). The cost table is built by streaming the model one decoder layer at a time,
except for the strategies that score whole plans end to end (``evolution``) or measure a layer's KL
(``--estimator kl_scaled``): they keep the model and its quantized variants in memory, say so, and
refuse in one line when that does not fit.

The default estimator, ``auto``, is kl_scaled where the model fits in memory: at the bytes of uniform
3-bit over all linears, gptq_routed's plan lost to uniform on a trained Qwen3-MoE (KL 1.06x uniform)
where kl_scaled's won (0.82x), and on the zoo kl_scaled was as good or better. A model that does not
fit falls back to gptq_routed (streamed), and the plan says so.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from ..errors import MoepressError
from ..treatment import Treatment
from .budget import Budget


@dataclass
class PlanOptions:
    """What :func:`plan_model` does; the defaults are ``moepress plan``'s."""

    budget: str = "3bits"
    scope: str = "experts"
    strategy: str = "ilp"
    estimator: str = "auto"  # kl_scaled when the model fits in memory (and the plan can use it), else gptq_routed
    granularity: str = "expert"
    channel_group: int | None = None
    options: str = "2,3,4,8,16"
    prune_options: str = ""  # pruned options units may take too: "2:4+4b,50%+4b" (treatment labels)
    group_size: int | None = 128
    others: str = "4b"
    rules: str = "attention,shared,first_k,frequency,outlier,block"
    first_k: int = 1
    per_layer: bool = False
    population: int = 16
    generations: int = 10
    fitness_samples: int = 8
    symmetric: bool = False
    damp: float = 0.01
    calib: str = "builtin:calib"
    calib_samples: int = 128
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0
    device: str | None = None
    table: str | None = None  # cost table cache (safetensors)
    active: float | None = None  # active-parameter budget, a share of the original's: the joint ILP
    trim: str = "experts,top_k,moe_layers,blocks"  # removals the joint ILP may choose
    drop_criterion: str = "reap"  # the order an expert-drop candidate removes experts in
    rounds: int = 2  # joint ILP: correction rounds by measurement
    target: str | None = None  # an engine (llamacpp, vllm): its types, tied units and refusals constrain the plan
    project: bool = False  # a plan the target cannot express is turned into the nearest one it can (allocate.project)

    @classmethod
    def from_args(cls, args) -> "PlanOptions":
        from dataclasses import fields

        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def plan_model(model: str, options: PlanOptions | None = None, *, progress: bool = True,
               trust_remote_code: bool = False, work=None, source=None, **overrides):
    """A :class:`~moepress.allocate.Plan` for ``model`` (a folder or hub id) within ``options.budget``.

    ``work`` (a :class:`~moepress.pipeline.resume.WorkFolder`) makes the cost-table pass resumable;
    ``source``, the model already opened (``moepress.pipeline.source``), is read instead of opening it again.
    Returns ``(plan, table)``."""
    import torch

    from ..costs import CostTable, build_cost_table, model_rows
    from ..data import load_text, token_windows
    from ..loading import load_tokenizer
    from ..model import MoEView
    from ..pipeline.source import open_source
    from . import RULES, allocate

    args = options or PlanOptions()
    for key, value in overrides.items():
        setattr(args, key, value)
    budget = Budget.parse(args.budget, scope=args.scope)
    joint = args.active is not None
    if joint:
        _check_joint(args)
    auto_estimator = args.estimator == "auto"
    if args.project and args.target is None:
        raise MoepressError("--project turns a plan into one a target can express; give --target")
    rules = None if args.project else _check_target(args)  # --project: plan freely, then project (below)
    labels = [b for b in str(args.options).replace(" ", "").split(",") if b]
    # The options the table measures, with the settings it is built with (GPTQ, static act-order).
    settings = {"symmetric": args.symmetric, "damp": args.damp, "act_order": "static", "method": "gptq"}
    option_list = [Treatment.parse(int(b) if b.isdigit() else b, args.group_size, settings) for b in labels]
    option_list += parse_prune_options(args.prune_options, args.group_size, settings)
    others = Treatment.parse(args.others, args.group_size, settings)
    heuristic_rules = tuple(r for r in args.rules.split(",") if r)
    unknown = [r for r in heuristic_rules if r not in RULES]
    if unknown:
        raise MoepressError(f"unknown heuristic rule(s) {unknown}; choose from {', '.join(RULES)}")

    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    source = open_source(source or model, trust_remote_code=trust_remote_code)
    view = MoEView(source.model)
    rows = model_rows(view)
    keep = next(source.model.parameters()).element_size()

    def fits(row, option) -> bool:  # under a target, a cell the engine cannot store is never measured nor chosen
        return rules is None or rules.refusal(row.name, option, row.in_features) is None

    if auto_estimator:
        args.estimator = _default_estimator(source, args)
    _check_others(rules, rows, budget, others)
    for row in rows:  # an option that cannot store a unit (2:3 of 128 inputs) is refused before calibrating
        for option in option_list:
            if fits(row, option):
                option.check_shape(row.out_features, row.in_features, row.name)
    if budget.bytes is not None:  # refuse before the long calibration pass; bytes need no calibration
        smallest = sum(min(o.nbytes(r.out_features, r.in_features, keep) for o in option_list
                           if fits(r, o)) for r in rows if r.kind in budget.kinds)
        if smallest > budget.bytes:
            raise MoepressError(f"budget of {budget.bytes:,} bytes is below the smallest option: the {budget.scope} "
                                f"take at least {smallest:,} bytes; raise the budget")
    if args.channel_group is None:
        args.channel_group = args.group_size or 32
    if args.granularity == "channel":  # refuse a width the options cannot tile before calibrating
        from ..costs import check_channel_group

        if any(o.pruned for o in option_list):  # a split's neuron groups are quantized, never pruned
            raise MoepressError("--prune-options work at expert or linear granularity, not channel")
        gate = next((r for r in rows if r.kind == "expert" and r.linear == "gate_proj"), None)
        if gate is None:
            raise MoepressError("channel granularity needs routed experts; this model has none")
        check_channel_group(option_list, gate.out_features, gate.in_features, args.channel_group)
    evolving = args.strategy == "evolution"
    scaling = args.estimator == "kl_scaled"  # (--active sets it: the joint ILP's damage is in KL)
    in_memory = evolving or scaling
    table = None
    if args.table and os.path.exists(args.table) and not (evolving or joint):  # these need the variants too
        table = CostTable.load(args.table)
        if [r.name for r in table.rows] != [r.name for r in rows]:
            raise MoepressError(f"cost table {args.table} was built for another model; delete it or pick another path")
        if scaling and "kl_scaled" not in table.damage:
            print(f"cost table: {args.table} has no kl_scaled damage yet; rebuilding it to measure it", file=sys.stderr)
            table = None
        else:
            print(f"cost table: read {args.table}", file=sys.stderr)
    fresh = table is None  # built (or measured) here: saved to --table once complete
    resident = None
    if table is None or in_memory:
        if in_memory:
            resident = _load_resident(model, source, trust_remote_code, args.strategy,
                                      "kl_scaled (--active)" if joint else args.estimator)
        text = load_text(args.calib)
        tokens = token_windows(text, tokenizer, args.seq_len, args.calib_samples, seed=args.seed, what="calibration")
    if table is None:
        all_options = sorted(set(option_list) | {others}, key=Treatment.sort_key)
        table = build_cost_table(resident if resident is not None else source, tokens, all_options,
                                 symmetric=args.symmetric, damp=args.damp, device=args.device,
                                 batch_size=args.batch_size, progress=progress, keep_variants=in_memory,
                                 work=None if in_memory else work, trust_remote_code=trust_remote_code,
                                 fits=fits)
        table.meta["calibration"] = {"source": args.calib, "samples": args.calib_samples, "seq_len": args.seq_len,
                                     "seed": args.seed}
    evaluator = None
    if table.variants:
        from .evolution import PlanEvaluator

        # Held-out calibration windows: drawn from the same text with another seed.
        held_out = token_windows(load_text(args.calib), tokenizer, args.seq_len, args.fitness_samples,
                                 seed=args.seed + 1, what="held-out calibration")
        with torch.no_grad():
            evaluator = PlanEvaluator(resident, table, held_out, batch_size=args.batch_size, copy=False)
    if scaling and "kl_scaled" not in table.damage:
        from .sensitivity import add_kl_scaled

        with torch.no_grad():
            info = add_kl_scaled(table, evaluator, progress=progress)
        print(f"layer sensitivity: {info['evaluations']} evaluations ({', '.join(info['probes'])} per layer and kind) "
              f"on {info['windows']} held-out windows in {info['seconds']} s", file=sys.stderr)
    if args.table and fresh:
        table.save(args.table)
        print(f"cost table: saved {args.table} ({table.meta['seconds']} s)", file=sys.stderr)

    if joint:
        from .joint import allocate_joint
        from .trim_costs import measure_trim_costs

        with torch.no_grad():
            costs = measure_trim_costs(evaluator, table, tokens, estimator=args.estimator, trims=_trims(args.trim),
                                       criterion=args.drop_criterion, progress=progress)
        print(f"removal costs: {costs.info['evaluations']} evaluations on {costs.info['windows']} held-out windows "
              f"in {costs.info['seconds']} s", file=sys.stderr)
        with torch.no_grad():
            plan = allocate_joint(table, budget, costs, evaluator, active=args.active, options=option_list,
                                  others=others, estimator=args.estimator, granularity=args.granularity,
                                  group_size=args.group_size, rounds=args.rounds, progress=progress)
        plan.info["model"] = model
        return plan, table

    evolution = None
    if evolving:
        evolution = {"evaluate": evaluator, "population": args.population, "generations": args.generations}
    plan = allocate(table, budget, args.strategy, estimator=args.estimator, granularity=args.granularity,
                    channel_group=args.channel_group, options=option_list, others=others,
                    group_size=args.group_size, rules=heuristic_rules, first_k=args.first_k,
                    per_layer=args.per_layer, seed=args.seed, evolution=evolution,
                    target=None if rules is None else args.target,
                    tied=rules.tied_units(view) if rules is not None else None)
    plan.info["model"] = model
    if args.project:
        plan = project_onto(plan, rows, args.target, view)
    return plan, table


def project_onto(plan, rows, target: str, view):
    """``plan`` projected onto ``target`` (:func:`moepress.allocate.project.project`), its changes
    printed one per line."""
    from ..export.targets import target_rules
    from .project import project

    projected, changes = project(plan, rows, target, target_rules(target).tied_units(view))
    print(f"--project onto {target}: {len(changes)} group(s) changed" + "".join(f"\n  {c}" for c in changes),
          file=sys.stderr)
    return projected


def check_target_options(options: "PlanOptions", source) -> None:
    """What ``plan_model`` would refuse under ``options.target`` for the model ``source`` (opened),
    checked without any work: ``compress --budget`` asks before it opens its costs folder."""
    from ..costs import model_rows
    from ..model import MoEView

    if options.target is None or options.project:
        return
    rules = _check_target(options)
    settings = {"symmetric": options.symmetric, "damp": options.damp, "act_order": "static", "method": "gptq"}
    others = Treatment.parse(options.others, options.group_size, settings)
    _check_others(rules, model_rows(MoEView(source.model)), Budget.parse(options.budget, scope=options.scope), others)


def _check_others(rules, rows, budget, others) -> None:
    """The units outside the budget's scope take ``others``: under a target, one it holds for each."""
    for row in rows if rules is not None else ():
        why = rules.refusal(row.name, others, row.in_features) if row.kind not in budget.kinds else None
        if why is not None:
            raise MoepressError(f"--others {others}: {why}; give --others a type the target stores, or --scope all")


def _check_target(args):
    """The rules module of ``args.target`` (None without one), with the options and granularity it
    plans with: its own types by default (``PLAN_OPTIONS``), per linear (its tied units then join
    what must share a treatment); what does not combine with a target is refused before any work."""
    if args.target is None:
        return None
    from ..export.targets import target_rules

    rules = target_rules(args.target)
    if args.strategy not in ("ilp", "greedy"):
        raise MoepressError(f"--target plans with --strategy ilp or greedy (got {args.strategy})")
    for bad, what in ((args.active is not None, "--active"), (args.granularity == "channel", "--granularity channel"),
                      (args.estimator == "kl_scaled", "--estimator kl_scaled"), (bool(args.prune_options),
                                                                                 "--prune-options")):
        if bad:
            raise MoepressError(f"{what} does not combine with --target yet; plan without it, or give a plan "
                                "with --project")
    if args.options == PlanOptions.options and getattr(rules, "PLAN_OPTIONS", None):
        args.options = rules.PLAN_OPTIONS
    for key, value in getattr(rules, "PLAN_SETTINGS", {}).items():  # what every option must be (vLLM: symmetric)
        setattr(args, key, value)
    if args.granularity == "expert":
        args.granularity = "linear"
    return rules


def _check_joint(args) -> None:
    """``--active`` plans with the joint ILP on KL-scaled damage; what does not combine is refused
    before any work."""
    if not 0 < args.active <= 1:
        raise MoepressError(f"--active is a share of the original model's active parameters, in (0, 1] "
                            f"(got {args.active:g})")
    if args.strategy != "ilp":
        raise MoepressError(f"--active plans with the joint ILP; it does not combine with --strategy {args.strategy}")
    if args.granularity == "channel":
        raise MoepressError("--active plans whole experts or linears, not channel groups; use --granularity expert or linear")
    if args.per_layer:
        raise MoepressError("--active plans one global program; it does not combine with --per-layer")
    if args.rounds < 0:
        raise MoepressError(f"--rounds must be 0 or more (got {args.rounds})")
    _trims(args.trim)
    args.estimator = "kl_scaled"  # removals are priced in KL: the units' damage must be too


def _trims(text: str) -> tuple[str, ...]:
    from .trim_costs import TRIMS

    trims = tuple(t.strip() for t in str(text).split(",") if t.strip())
    unknown = [t for t in trims if t not in TRIMS]
    if unknown:
        raise MoepressError(f"--trim: unknown removal {unknown[0]!r}; choose from {', '.join(TRIMS)}")
    return trims


def parse_prune_options(text: str, group_size: int | None, settings: dict) -> list[Treatment]:
    """``--prune-options``: comma-separated labels of pruned treatments (``2:4+4b,50%+4b,2:4``), at
    ``group_size`` when a label has bits and no ``-g``, with ``settings`` and SparseGPT as the pruner."""
    options = []
    for label in (part.strip() for part in str(text or "").split(",")):
        if not label:
            continue
        try:
            option = Treatment.parse(label, group_size, {**settings, "pruner": "sparsegpt"})
        except MoepressError as exc:
            raise MoepressError(f"--prune-options: {exc}") from None
        if not option.pruned:
            raise MoepressError(f"--prune-options: {label!r} prunes nothing; write e.g. 2:4+4b or 50%+4b "
                                "(plain bit widths go in --options)")
        options.append(option)
    return options


def _resident_bytes(source) -> int:
    """What scoring on the whole model in memory takes: a float32 copy plus the packed variants of every
    option (about 1.1x the bf16 bytes)."""
    params = sum(p.numel() for p in source.model.parameters())
    return params * 4 + int(params * 2 * 1.1)


def _default_estimator(source, args) -> str:
    """``--estimator auto``: kl_scaled where the plan can use it and the model fits in memory, else
    gptq_routed (streamed), saying why."""
    if args.strategy in ("uniform", "heuristic") or args.target is not None:
        return "gptq_routed"  # (uniform/heuristic plans do not read the damage; targets plan on it streamed)
    from ..pipeline.memory import memory_available

    needed, available = _resident_bytes(source), memory_available()
    if available is not None and needed > available:
        print(f"plan: estimating with gptq_routed, streamed: kl_scaled (the default where it fits) keeps the model in "
              f"memory (about {needed / 1e9:.1f} GB) and {available / 1e9:.1f} GB are available", file=sys.stderr)
        return "gptq_routed"
    return "kl_scaled"


def _load_resident(model: str, source, trust_remote_code: bool, strategy: str, estimator: str):
    """The whole model in memory, for scoring plans end to end; refused in one line when it cannot fit."""
    from ..loading import load_model

    needed = _resident_bytes(source)
    from ..pipeline.memory import memory_available

    available = memory_available()
    why = "--strategy evolution" if strategy == "evolution" else f"--estimator {estimator}"
    if available is not None and needed > available:
        raise MoepressError(f"{why} scores plans on the whole model in memory (about {needed / 1e9:.1f} GB with "
                            f"its quantized variants) but {available / 1e9:.1f} GB are available; use another "
                            "strategy or estimator (they stream the model one layer at a time)")
    print(f"plan: {why} keeps the model in memory (about {needed / 1e9:.1f} GB with its quantized variants)",
          file=sys.stderr)
    return load_model(model, trust_remote_code=trust_remote_code)


def summary(plan, budget_text: str) -> str:
    totals = plan.totals
    avg = ", ".join(f"{k} {v}" for k, v in totals["average_bits"].items())
    lines = [f"plan: {plan.strategy} ({plan.estimator}, {plan.granularity}) within {budget_text}: "
             f"{totals['budget_scope_bytes']:,} of {plan.budget['bytes']:,} budget bytes; all linears "
             f"{totals['bytes']:,} bytes; bits/param: {avg}"]
    if plan.strategy == "joint":
        removals = plan.info["rounds"][-1]["removals"] if plan.info.get("rounds") else []
        best = min(plan.info["rounds"], key=lambda r: r["measured_kl"]) if plan.info.get("rounds") else {}
        lines.append(f"joint: active parameters {totals.get('active_share', float('nan')):.3f} of the original's "
                     f"(budget {plan.budget.get('active', 1):g}); KL predicted {totals['predicted_damage']['value']:.5f}, "
                     f"measured {totals['measured_kl']:.5f} on held-out windows; removals: "
                     f"{', '.join(best.get('removals', removals)) or 'none'}")
    if plan.strategy == "evolution":
        info = plan.info
        lines.append(f"evolution: KL {info['seed_fitness_kl']:.5f} (ILP seed) -> {info['best_fitness_kl']:.5f} "
                     f"({100 * info['gain_over_seed']:.1f}% lower) in {info['evaluations']} evaluations, "
                     f"{info['search_seconds']} s")
    return "\n".join(lines)


def make_plan(args) -> None:
    """``moepress plan``: every output path is checked before the cost-table pass."""
    from ..costs import model_rows
    from ..model import MoEView
    from . import Budget

    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise MoepressError(f"cannot write the plan: folder {out_dir} does not exist")
    for path, what in ((args.out, "the plan"), (args.table, "the cost table"), (args.plot, "the plot")):
        if path:
            _check_writable(path, what)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise MoepressError("--plot needs matplotlib: pip install 'moepress[plot]'") from None
    options = PlanOptions.from_args(args)
    plan, _table = plan_model(args.model, options, progress=not args.quiet, trust_remote_code=args.trust_remote_code)
    plan.save(args.out)
    print(summary(plan, str(Budget.parse(args.budget, scope=args.scope))))
    print(f"wrote {args.out}")
    if args.plot:
        from .plot import plot_plan

        from ..pipeline.source import open_source

        rows = model_rows(MoEView(open_source(args.model, trust_remote_code=args.trust_remote_code).model))
        plot_plan(plan, rows, args.plot)
        print(f"wrote {args.plot}")


def _check_writable(path: str, what: str) -> None:
    from ..preflight import check_writable_file

    check_writable_file(path, what)

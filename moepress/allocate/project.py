"""Projection: a plan an engine cannot express, turned into the nearest one it can (``--project``).

A moepress plan may give every expert its own width, or use moepress's own grids (``3b-g128``); a
GGUF holds one llama.cpp type per projection of a layer's experts. :func:`project` walks the
target's groups of units that must share one treatment (its ``tied_units``; every other unit is a
group of its own) and, for each group the target cannot hold as planned, puts the whole group in
the target's type (``PLAN_OPTIONS``) whose bytes are closest to the group's planned bytes without
exceeding them (the largest type that fits the bytes the plan gave the group; the smallest type the
target holds when none does). A group whose plan the target holds already is left as it is. So the
projected plan never spends more than the plan did, group by group, except where even the target's
smallest type is larger; each change is reported.

Bytes, not damage: a plan carries no cost table, and the type nearest in bytes is the one the plan's
budget paid for. (With a cost table, ``plan --target`` allocates in the target's types directly.)
"""

from __future__ import annotations

from dataclasses import replace

from ..errors import MoepressError
from ..treatment import Treatment


def project(plan, rows, target: str, tied: list[tuple[str, ...]], keep_element_size: int | None = None):
    """``plan`` (a :class:`~moepress.allocate.Plan`) onto ``target`` for a model of ``rows`` (its
    :func:`~moepress.costs.model_rows`) with the target's ``tied`` units. Returns the projected plan
    (one treatment per linear, the trim kept) and the changes, one line per group."""
    from ..export.targets import target_rules

    rules = target_rules(target)
    if not getattr(rules, "PLAN_OPTIONS", None):
        raise MoepressError(f"--project needs the types --target {target} holds (its PLAN_OPTIONS); write the plan in "
                            "them instead")
    keep = int(plan.info.get("keep_element_size", 2)) if keep_element_size is None else keep_element_size
    settings = {**plan.settings, **getattr(rules, "PLAN_SETTINGS", {})}  # what every option must be (vLLM: symmetric)
    types = [Treatment.parse(int(t) if t.isdigit() else t, settings=settings)
             for t in rules.PLAN_OPTIONS.split(",")]
    resolved = plan.resolve(rows)
    by_name = {r.name: r for r in rows if r.name in resolved}
    grouped, seen = [], set()
    for names in tied:
        names = tuple(n for n in names if n in by_name)
        if names:
            grouped.append(names)
            seen.update(names)
    grouped += [(name,) for name in by_name if name not in seen]

    units, changes = {}, []
    for names in grouped:
        planned = [resolved[n] for n in names]
        members = [by_name[n] for n in names]
        held = len(set(planned)) == 1 and all(
            rules.refusal(r.name, t, r.in_features) is None for r, t in zip(members, planned))
        if held:
            units.update(zip(names, planned))
            continue
        budget = sum(_nbytes(t, r, keep) for t, r in zip(planned, members))
        fitting = [t for t in types if all(rules.refusal(r.name, t, r.in_features) is None for r in members)]
        if not fitting:
            raise MoepressError(f"--project: no type of --target {target} holds {names[0]}")
        cost = {t: sum(_nbytes(t, r, keep) for r in members) for t in fitting}
        under = [t for t in fitting if cost[t] <= budget]
        chosen = max(under, key=lambda t: (cost[t], t.bits)) if under else min(fitting, key=lambda t: cost[t])
        units.update({n: chosen for n in names})
        was = sorted({t.label for t in planned})
        what = names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} tied"
        changes.append(f"{what}: {'/'.join(was)} ({budget:,} bytes) -> {chosen.label} ({cost[chosen]:,} bytes)"
                       + ("" if under else ", over the plan: no type of the target is smaller"))
    projected = replace(plan, units=units, info={**plan.info, "projected": {"target": target, "changes": changes}})
    projected.totals = projected.accounting(rows, keep)
    if plan.budget:  # the budget's scope, as the planners report it
        from .budget import SCOPES

        kinds = SCOPES[plan.budget.get("scope", "experts")]
        projected.totals["budget_scope_bytes"] = sum(b for k, b in projected.totals["bytes_by_kind"].items()
                                                     if k in kinds)
    return projected, changes


def _nbytes(treatment: Treatment, row, keep: int) -> int:
    return treatment.nbytes(row.out_features, row.in_features, keep)


__all__ = ["project"]

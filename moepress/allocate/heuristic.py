"""The structure-aware rules of Li et al. (000), each usable alone, as a priority over units.

A rule scores every unit; the scores of the enabled rules are rank-normalised to [0, 1] and summed
into one priority. The plan starts from the largest uniform option that fits the budget and moves
units to their next larger option in priority order while the budget allows. So "attention" alone
means: attention gets the spare bytes first; "frequency" alone: the most routed experts do.
"""

from __future__ import annotations

import numpy as np

from ..costs import CostTable, Groups
from ..errors import MoepressError

RULES = ("attention", "shared", "first_k", "frequency", "outlier", "block")


def _per_group(table: CostTable, groups: Groups, stat: str, reduce=np.max) -> np.ndarray:
    values = table.stats[stat]
    return np.array([reduce(values[rows]) for rows in groups.rows], dtype=float)


def rule_scores(table: CostTable, groups: Groups, rule: str, first_k: int = 1) -> np.ndarray:
    """Higher = more important = more bits, for one rule."""
    kinds = np.array(groups.kinds)
    if rule == "attention":
        return (kinds == "attn").astype(float)
    if rule == "shared":
        return np.isin(kinds, ("shared", "dense_mlp")).astype(float)
    if rule == "first_k":
        moe_layers = sorted({table.rows[r[0]].layer for r in groups.rows if table.rows[r[0]].kind == "expert"})
        first = set(moe_layers[:first_k])
        return np.array([float(layer in first) for layer in groups.layers])
    if rule == "frequency":
        return _per_group(table, groups, "tokens_fraction")
    if rule == "outlier":
        return _per_group(table, groups, "outlier")
    if rule == "block":
        return table.stats["block_score"][groups.layers]
    raise MoepressError(f"unknown heuristic rule {rule!r}; choose from {', '.join(RULES)}")


def _rank01(scores: np.ndarray) -> np.ndarray:
    if len(scores) < 2 or np.ptp(scores) == 0:
        return np.zeros_like(scores)
    ranks = np.argsort(np.argsort(scores, kind="stable"), kind="stable").astype(float)
    return ranks / (len(scores) - 1)


def priority(table: CostTable, groups: Groups, rules, first_k: int = 1) -> np.ndarray:
    if not rules:
        raise MoepressError(f"the heuristic needs at least one rule: {', '.join(RULES)}")
    return sum(_rank01(rule_scores(table, groups, r, first_k)) for r in rules)

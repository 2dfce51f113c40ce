"""Rescale the table's damage by what each layer's error costs the model's output (estimator ``kl_scaled``).

The table's estimators measure each unit's *local* error: the squared error of its layer's output.
The allocators add those errors up as if a unit of error cost the model the same wherever it
occurs. It does not: an error in an early layer passes through every later layer (and in an MoE can
move tokens to other experts), an attention projection's error reaches the residual stream through
other paths than an expert's, and the per-layer activation scales differ. On our models this is
why the global ILP can lose to uniform (moefied-smollm2 at 3 bits) and why a budget over every
linear sometimes buys attention bits the model did not need (tiny-mixtral at 3.5 bits).

The fix measures the exchange rate per *block* (the units of one kind in one layer: a layer's
attention projections, its routed experts, its shared expert or dense MLP) and option, in the model
as it will be used: every unit at a background option (4 bits by default), the block in turn
unquantized and at each probed option (2, 3 and 4 bits by default). The KL divergence it adds (KL
with the block at the option minus KL with the block unquantized, from the original model's
output, on held-out windows) is the block's damage at that option. The evaluations re-use the
quantized variants the table kept, so nothing is quantized again. The block's damage in that
option's column is then the table's, scaled by ``measured KL / predicted damage``: the ranking
*within* a block (which expert, which linear) still comes from the table, the weight of a block
against the others, at each precision, from the model's output. Per option, because the output
does not respond linearly to local error (at 2 bits an MoE's tokens start to change experts). The
result is in nats per token, so a plan's predicted damage reads as a KL estimate.

Why in a quantized background: errors of different blocks are not additive. Measured alone, in the
otherwise original model (``background=None``), several of tiny-mixtral's blocks add almost no KL
at 2 bits, the ILP starves them, and the plan's real KL comes out 5x its prediction and worse than
uniform (budget over all linears, 3 and 3.5 bits). Measured on top of a 4-bit model, the same ILP
gets 0.38x and 0.57x uniform's KL there. Cost: three evaluations per block (unquantized, 2, 3 bits;
the 4-bit one is the background itself), seconds on the zoo's tiny models, minutes on a
135M-parameter model on a CPU.

Pruned options (``2:4``, ``2:4+4b-g128``) are probes of their own, one evaluation each per block:
removing weights moves the output differently from rounding them, so a quantized option never takes
a pruned option's exchange rate, nor the reverse.
"""

from __future__ import annotations

import time

import numpy as np

from ..costs import CostTable
from ..errors import MoepressError

ORIGINAL = -1  # PlanEvaluator's option index for "the unit's own weights": no variant is installed


def blocks(table: CostTable) -> dict[tuple[int, str], list[int]]:
    """Table rows by (layer, kind), in model order."""
    out: dict[tuple[int, str], list[int]] = {}
    for i, row in enumerate(table.rows):
        out.setdefault((row.layer, row.kind), []).append(i)
    return out


def _index(table: CostTable, option) -> int:
    """Table column of ``option``, given as a label ("3b-g128") or a :class:`~moepress.treatment.Treatment`."""
    return table.option_index(option)


def probe_option_indices(table: CostTable, probes=None) -> list[int]:
    """The options measured end to end: ``probes`` (option labels or treatments), by default every
    quantized option below 8 bits (at 8 bits the KL is too small to be worth an evaluation) and
    every pruned option, in column order."""
    quantized = [i for i, o in enumerate(table.options) if not o.keep and not o.pruned]
    pruned = [i for i, o in enumerate(table.options) if o.pruned]
    if not quantized and not pruned:
        raise MoepressError("the cost table has no quantized option to measure layer sensitivity with")
    if probes is None:
        chosen = ([i for i in quantized if table.options[i].bits < 8]
                  or [min(quantized, key=lambda i: table.options[i].bits)]) if quantized else []
        chosen = sorted(chosen + pruned)
    else:
        chosen = sorted({_index(table, p) for p in probes})
        if any(table.options[i].keep for i in chosen):
            raise MoepressError("a 16-bit (keep) option has no error to measure; probe quantized options only")
    return chosen


def background_option_index(table: CostTable, background) -> int | None:
    """The option every other unit takes while a block is measured: "auto" (4 bits, else the widest
    quantized option below 8), an option (label or treatment), or None for the original model."""
    if background is None:
        return None
    if background != "auto":
        return _index(table, background)
    quantized = [i for i, o in enumerate(table.options) if not o.keep and not o.pruned and o.bits < 8]
    if not quantized:
        return None
    four = [i for i in quantized if table.options[i].bits == 4]
    return four[0] if four else max(quantized, key=lambda i: table.options[i].bits)


def add_kl_scaled(table: CostTable, evaluate, base: str = "gptq_routed", name: str = "kl_scaled",
                  probes=None, background="auto", progress: bool = False) -> dict:
    """Add estimator ``name`` to ``table``: ``base`` damage rescaled per (layer, kind) block and
    option so that the block's damage at each probed option equals the KL divergence it adds,
    measured with ``evaluate`` (a :class:`PlanEvaluator` on held-out windows) in a model whose other
    units are at ``background`` (see :func:`background_option_index`): KL(block at the option) -
    KL(block unquantized). An option not probed takes the factor of the probed option of its own kind
    (pruned or not) nearest in bits (then in sparsity); with none of its kind, the median factor of
    its kind, else of all. Returns what was measured, also kept in ``table.meta[name]``; the new
    estimator is saved with the table."""
    if base not in table.damage:
        raise MoepressError(f"unknown damage estimator {base!r}; choose one of {', '.join(table.damage)}")
    started = time.time()
    probed = probe_option_indices(table, probes)
    original = np.full(len(table.rows), ORIGINAL)
    # The model the block's effect is measured in: its own weights, or every unit at ``background``.
    context_option = background_option_index(table, background)
    context = original if context_option is None else np.full(len(table.rows), context_option)
    groups = blocks(table)
    work = [(key, o) for key in groups for o in ([ORIGINAL] if context_option is not None else []) + probed
            if o != context_option]  # a block at the background option is the background itself
    iterator = work
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(work, desc="layer sensitivity", unit="eval")
    kl_of: dict[tuple, float] = {}
    if context_option in probed:
        context_kl = float(evaluate.metrics(context)["kl"])
        kl_of.update({(key, context_option): context_kl for key in groups})
    for key, o in iterator:
        candidate = context.copy()
        candidate[groups[key]] = o
        kl_of[(key, o)] = float(evaluate.metrics(candidate)["kl"])
    evaluate.install(original)
    measured: dict[tuple, tuple[float, float]] = {}  # ((layer, kind), option) -> (KL it adds, predicted)
    for key, o in kl_of:
        if o != ORIGINAL:
            added = kl_of[(key, o)] - (kl_of[(key, ORIGINAL)] if context_option is not None else 0.0)
            measured[(key, o)] = (added, float(table.damage[base][groups[key], o].sum()))

    def ratio(kl, predicted):
        return kl / predicted if predicted > 0 and kl > 0 else None

    def median(entries):
        ratios = [r for r in (ratio(*v) for _, v in entries) if r is not None]
        return float(np.median(ratios)) if ratios else None

    fallback = median(measured.items()) or 1.0
    options = table.options
    fallback_of = {kind: median((k, v) for k, v in measured.items() if options[k[1]].pruned == kind) or fallback
                   for kind in (False, True)}
    nearest = [_nearest_probe(table, probed, o) for o in range(len(options))]
    scale = np.ones_like(table.damage[base])
    for key, rows in groups.items():
        for o in range(len(options)):
            factor = None if nearest[o] is None else ratio(*measured[(key, nearest[o])])
            scale[rows, o] = fallback_of[options[o].pruned] if factor is None else factor
    table.damage[name] = table.damage[base] * scale
    if base in table.neuron and len(table.neuron_rows):
        table.neuron[name] = (table.neuron[base] * scale[table.neuron_rows][:, :, None]).astype(np.float32)
    info = {
        "base": base,
        "probes": [table.options[o].label for o in probed],
        "background": None if context_option is None else table.options[context_option].label,
        "windows": int(len(evaluate.tokens)),
        "evaluations": len(work) + (context_option in probed),
        "seconds": round(time.time() - started, 1),
        "blocks": [{"layer": layer, "kind": kind, "option": table.options[o].label, "kl": kl, "predicted": predicted,
                    "scale": ratio(kl, predicted) or fallback}
                   for ((layer, kind), o), (kl, predicted) in measured.items()],
    }
    table.meta[name] = info
    return info


def _nearest_probe(table: CostTable, probed: list[int], o: int) -> int | None:
    """The probed option whose factor option ``o`` takes: of its own kind (pruned or not), nearest
    in bits, then in sparsity (the first in column order on a tie); None when no probe is of its kind."""
    option = table.options[o]
    same = [p for p in probed if table.options[p].pruned == option.pruned]
    if not same:
        return None
    return min(same, key=lambda p: (abs(table.options[p].bits - option.bits),
                                    abs(table.options[p].sparsity - option.sparsity)))


__all__ = ["add_kl_scaled", "background_option_index", "blocks", "probe_option_indices"]

"""Rescale the table's damage by what each layer's error costs the model's output (estimator ``kl_scaled``).

The table's estimators measure each unit's *local* error: the squared error of its layer's output.
The allocators add those errors up as if a unit of error cost the model the same wherever it
occurs. It does not: an error in an early layer passes through every later layer (and in an MoE can
move tokens to other experts), an attention projection's error reaches the residual stream through
other paths than an expert's, and the per-layer activation scales differ. On our models this is
why the global ILP can lose to uniform (moefied-smollm2 at 3 bits) and why a budget over every
linear sometimes buys attention bits the model did not need (tiny-mixtral at 3.5 bits).

The fix measures the exchange rate per *block* (the units of one kind in one layer: a layer's
attention projections, its routed experts, its shared expert or dense MLP) and option. Each block
in turn takes a probed option (by default 2, 3 and 4 bits) while the rest of the model keeps its
original weights, and the KL divergence of the model's output from the original's is measured on
held-out windows, re-using the quantized variants the table kept, so nothing is quantized again.
The block's damage in that option's column is then scaled by ``measured KL / predicted damage``:
the ranking *within* a block (which expert, which linear) still comes from the table, the weight
of a block against the others, at each precision, from the model's output. Per option, because
the output does not respond linearly to local error (at 2 bits an MoE's tokens start to change
experts). The result is in nats per token, so a plan's predicted damage reads as a KL estimate.
Cost: one evaluation per block and probed option, seconds on the zoo's tiny models, minutes on a
135M-parameter model on a CPU.
"""

from __future__ import annotations

import time

import numpy as np

from ..costs import CostTable, Option
from ..errors import MoepressError

ORIGINAL = -1  # PlanEvaluator's option index for "the unit's own weights": no variant is installed


def blocks(table: CostTable) -> dict[tuple[int, str], list[int]]:
    """Table rows by (layer, kind), in model order."""
    out: dict[tuple[int, str], list[int]] = {}
    for i, row in enumerate(table.rows):
        out.setdefault((row.layer, row.kind), []).append(i)
    return out


def probe_option_indices(table: CostTable, probes=None) -> list[int]:
    """The options measured end to end: ``probes`` (option labels or Options), by default every
    quantized option below 8 bits (at 8 bits the KL is too small to be worth an evaluation)."""
    quantized = [i for i, o in enumerate(table.options) if not o.keep]
    if not quantized:
        raise MoepressError("the cost table has no quantized option to measure layer sensitivity with")
    if probes is None:
        chosen = [i for i in quantized if table.options[i].bits < 8] or [min(quantized, key=lambda i: table.options[i].bits)]
    else:
        chosen = sorted({table.option_index(Option.parse(p) if isinstance(p, str) else p) for p in probes})
        if any(table.options[i].keep for i in chosen):
            raise MoepressError("a 16-bit (keep) option has no error to measure; probe quantized options only")
    return chosen


def add_kl_scaled(table: CostTable, evaluate, base: str = "gptq_routed", name: str = "kl_scaled",
                  probes=None, progress: bool = False) -> dict:
    """Add estimator ``name`` to ``table``: ``base`` damage rescaled per (layer, kind) block and
    option so that the block's damage at each probed option equals the KL divergence measured with
    ``evaluate`` (a :class:`PlanEvaluator` on held-out windows); an option not probed takes the
    factor of the probed option nearest in bits. Returns what was measured, also kept in
    ``table.meta[name]``; the new estimator is saved with the table."""
    if base not in table.damage:
        raise MoepressError(f"unknown damage estimator {base!r}; choose one of {', '.join(table.damage)}")
    started = time.time()
    probed = probe_option_indices(table, probes)
    original = np.full(len(table.rows), ORIGINAL)
    evaluate.install(original)
    groups = blocks(table)
    work = [(key, o) for key in groups for o in probed]
    iterator = work
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(work, desc="layer sensitivity", unit="eval")
    measured: dict[tuple, tuple[float, float]] = {}  # ((layer, kind), option) -> (KL, predicted)
    for key, o in iterator:
        candidate = original.copy()
        candidate[groups[key]] = o
        kl = float(evaluate.metrics(candidate)["kl"])
        measured[(key, o)] = (kl, float(table.damage[base][groups[key], o].sum()))
    evaluate.install(original)

    def ratio(kl, predicted):
        return kl / predicted if predicted > 0 and kl > 0 else None

    ratios = [r for r in (ratio(*v) for v in measured.values()) if r is not None]
    fallback = float(np.median(ratios)) if ratios else 1.0
    bits = np.array([o.bits for o in table.options])
    nearest = [probed[int(np.argmin(np.abs(bits[probed] - bits[o])))] for o in range(len(table.options))]
    scale = np.ones_like(table.damage[base])
    for key, rows in groups.items():
        for o in range(len(table.options)):
            factor = ratio(*measured[(key, nearest[o])])
            scale[rows, o] = fallback if factor is None else factor
    table.damage[name] = table.damage[base] * scale
    if base in table.neuron and len(table.neuron_rows):
        table.neuron[name] = (table.neuron[base] * scale[table.neuron_rows][:, :, None]).astype(np.float32)
    info = {
        "base": base,
        "probes": [table.options[o].label for o in probed],
        "windows": int(len(evaluate.tokens)),
        "evaluations": len(work),
        "seconds": round(time.time() - started, 1),
        "blocks": [{"layer": layer, "kind": kind, "option": table.options[o].label, "kl": kl, "predicted": predicted,
                    "scale": ratio(kl, predicted) or fallback}
                   for ((layer, kind), o), (kl, predicted) in measured.items()],
    }
    table.meta[name] = info
    return info


__all__ = ["add_kl_scaled", "blocks", "probe_option_indices"]

"""A picture of a plan: layers (rows) x experts (columns) coloured by bits, with the non-expert
units of each layer (attention, shared expert, dense MLP) in columns of their own on the left."""

from __future__ import annotations

import os

import numpy as np

from ..costs import Row
from ..errors import MoepressError


def plan_grid(plan, rows: list[Row]) -> tuple[np.ndarray, list[str]]:
    """[layers, columns] of parameter-weighted average bits (NaN where a layer has no such unit)."""
    resolved = plan.resolve(rows)
    layers = max(r.layer for r in rows) + 1
    experts = max((r.expert for r in rows if r.kind == "expert"), default=-1) + 1
    side = [k for k in ("attn", "shared", "dense_mlp") if any(r.kind == k for r in rows)]
    columns = side + [f"e{e}" for e in range(experts)]
    bits = np.zeros((layers, len(columns)))
    params = np.zeros((layers, len(columns)))
    for row in rows:
        col = side.index(row.kind) if row.kind != "expert" else len(side) + row.expert
        option = resolved[row.name]
        pieces = option if isinstance(option, tuple) else (option,)  # neuron groups share the row equally
        bits[row.layer, col] += sum(o.bits for o in pieces) / len(pieces) * row.params
        params[row.layer, col] += row.params
    with np.errstate(invalid="ignore"):
        return np.where(params > 0, bits / np.maximum(params, 1), np.nan), columns


def plot_plan(plan, rows: list[Row], path: str, title: str | None = None) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MoepressError("drawing a plan needs matplotlib: pip install 'moepress[plot]'") from None
    from matplotlib.colors import BoundaryNorm, ListedColormap

    grid, columns = plan_grid(plan, rows)
    # One distinct colour per bit width (averages of mixed linears fall between them).
    levels = [2, 3, 4, 8, 16]
    cmap = ListedColormap(["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"])
    norm = BoundaryNorm([1.5, 2.5, 3.5, 6, 12, 17], cmap.N)
    fig, ax = plt.subplots(figsize=(max(4.5, 0.35 * len(columns) + 2.5), max(2.8, 0.3 * grid.shape[0] + 1.8)))
    image = ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    if grid.size <= 400:
        for (i, j), value in np.ndenumerate(grid):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=6,
                        color="white" if value < 6 else "black")
    ax.set_xticks(range(len(columns)), columns, rotation=90 if len(columns) > 24 else 0, fontsize=7)
    ax.set_yticks(range(grid.shape[0]), [str(i) for i in range(grid.shape[0])], fontsize=7)
    ax.set_xlabel("unit (e = routed expert)", fontsize=8)
    ax.set_ylabel("layer", fontsize=8)
    totals = plan.totals.get("average_bits", {})
    ax.set_title(title or f"{plan.strategy} ({plan.estimator}): experts {totals.get('expert', '?')} bits/param "
                 "(scales included)", fontsize=8)
    bar = fig.colorbar(image, ax=ax, ticks=levels)
    bar.set_label("bits (16 = kept)", fontsize=8)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path

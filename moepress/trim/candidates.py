"""What one MoE layer may become (:class:`MoEChoice`), and a model with such changes made for a
measurement and undone after it (:func:`trimmed`): the candidates the joint optimizer prices and
the ``kl`` drop criterion searches over. The surgery itself is :mod:`.expert_drop`, :mod:`.top_k` and
:mod:`.layer_drop`; this module only applies it to copies and puts the originals back."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..costs import Row
from ..model.view import MoEView
from ..runtime.install import swap_module


@dataclass(frozen=True)
class MoEChoice:
    """What one MoE layer may become: each token routed to ``top_k`` of the experts left once
    ``dropped`` (original indices) are removed, or, with ``removed``, no MoE sublayer at all."""

    top_k: int
    dropped: tuple[int, ...] = ()
    removed: bool = False

    def label(self) -> str:
        if self.removed:
            return "MoE dropped"
        return f"top-{self.top_k}" + (f", -{len(self.dropped)} experts" if self.dropped else "")

    def removes(self, row: Row) -> bool:
        """Whether ``row`` (a linear of this layer) is gone under this choice."""
        if self.removed:
            return row.kind in ("expert", "shared")
        return row.kind == "expert" and row.expert in self.dropped



@contextmanager
def trimmed(model, moe: dict[int, MoEChoice] | None = None, blocks=()):
    """``model`` with ``moe`` choices made and ``blocks`` dropped, undone on exit: the modules
    changed are swapped for changed copies (or stand-ins) and put back, so the caller's weights,
    and any views into them, are untouched."""
    from ..trim.expert_drop import drop_experts
    from ..trim.layer_drop import drop_block, drop_moe_layer
    from ..trim.top_k import set_top_k, top_k_of_layer

    view = MoEView(model)
    saved: list[tuple[str, torch.nn.Module]] = []
    try:
        for layer in blocks:
            path = view.layer_path(layer)
            saved.append((path, model.get_submodule(path)))
            drop_block(model, layer)
        for layer, choice in (moe or {}).items():
            if layer in blocks:
                continue
            path = f"{view.layer_path(layer)}.{view.spec.moe_block}"
            original = model.get_submodule(path)
            if choice.removed:
                saved.append((path, original))
                drop_moe_layer(model, layer)
                continue
            if not choice.dropped and choice.top_k == top_k_of_layer(model, layer):
                continue
            saved.append((path, original))
            swap_module(model, path, copy.deepcopy(original))
            set_top_k(model, layer, choice.top_k)  # first: a drop may leave fewer experts than the old top-k
            if choice.dropped:
                E = view.experts(layer).num_experts
                drop_experts(model, layer, [e for e in range(E) if e not in choice.dropped])
        yield model
    finally:
        for path, module in reversed(saved):
            swap_module(model, path, module)


__all__ = ["MoEChoice", "trimmed"]

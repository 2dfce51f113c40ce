"""Top-k reduction: route each token of an MoE layer to fewer experts (a treatment of its own).

Every supported router takes its ``top_k`` best experts per token with ``torch.topk(..., self.top_k)``
and then weights them by its own rule (renormalised over the chosen ones where the architecture
does, ``norm_topk_prob`` as configured), so reducing the count is setting that attribute on the
layer's router (and on the MoE block, which some architectures also read); the config, shared by
all layers, is left as it is and the checkpoint records the per-layer counts. Fewer experts per
token is fewer active parameters: the compute of a token's routed experts falls by k'/k.
"""

from __future__ import annotations

from torch import nn

from ..errors import MoepressError
from ..model.view import MoEView


def set_top_k(model: nn.Module, layer: int, top_k: int) -> None:
    """Route every token of MoE layer ``layer`` to ``top_k`` experts (at most its current count)."""
    check_top_k(model, layer, top_k)
    # (group-limited routing takes its top-k inside the groups it chose: fewer experts always fit)
    for module in _holders(MoEView(model), layer):
        module.top_k = top_k


def check_top_k(model: nn.Module, layer: int, top_k: int) -> None:
    """One line naming the layer when ``top_k`` is not a reduction its router can make."""
    view = MoEView(model)
    store = view.experts(layer) if 0 <= layer < view.num_layers else None
    if store is None:
        raise MoepressError(f"layers.{layer}: not an MoE layer; top-k applies to MoE layers only")
    if view.spec.fixed_top_k:
        raise MoepressError(f"layers.{layer}: the {view.model_type} router always routes to a fixed number of experts; "
                            "its top-k cannot be changed")
    current = top_k_of_layer(model, layer)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= current:
        raise MoepressError(f"layers.{layer}: top-k must be a whole number from 1 to its current {current} "
                            f"(got {top_k!r})")


def top_k_of_layer(model: nn.Module, layer: int) -> int:
    """The experts layer ``layer`` routes each token to, as its modules hold it."""
    view = MoEView(model)
    for module in _holders(view, layer):
        return int(module.top_k)
    return int(model.config.num_experts_per_tok)


def top_k_counts(model: nn.Module) -> dict[int, int]:
    """MoE layer -> its top-k, for every MoE layer."""
    view = MoEView(model)
    return {layer: top_k_of_layer(model, layer) for layer in range(view.num_layers) if view.experts(layer) is not None}


def restore_top_k(model: nn.Module, counts: dict) -> None:
    """Apply per-layer top-k counts read back from a checkpoint (layer keys may be strings)."""
    for layer, top_k in counts.items():
        set_top_k(model, int(layer), int(top_k))


def _holders(view: MoEView, layer: int) -> list[nn.Module]:
    """The layer's router and MoE block, where they hold a ``top_k`` the forward reads."""
    block = view.moe_block(layer)
    return [m for m in (view.router(layer), block) if m is not None and isinstance(getattr(m, "top_k", None), int)]

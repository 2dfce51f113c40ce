"""The names a model's weights have on the hub (what ``save_pretrained`` writes), from its in-memory names.

Shared by the compressed-tensors export (which writes hub names) and the vLLM target's checks (which
refuse a model whose hub layout stores its experts fused), so that neither imports the other.
"""

from __future__ import annotations

import torch

from ..errors import MoepressError
from ..model.view import EXPERT_LINEARS, MoEView


def hub_names(model, view: MoEView) -> tuple[dict[str, str], dict[tuple[str, int, str], str]]:
    """(in-memory parameter name -> hub name, (experts module, expert, linear) -> hub module name).

    transformers 5 fuses a layer's experts into 3-D parameters in memory and splits them back on
    ``save_pretrained`` (``revert_weight_conversion``). Asking it with stand-in tensors whose values
    say where each slice came from gives the hub names without knowing any architecture here.
    """
    from transformers.core_model_loading import revert_weight_conversion

    fused = {}
    for layer in range(view.num_layers):
        store = view.experts(layer)
        if store is not None and store.layout == "fused":
            fused[f"{store.module_path}.gate_up_proj"] = (store, (0, 1))
            fused[f"{store.module_path}.down_proj"] = (store, (2,))
    # a stand-in's value: parameter index * tag + expert * 4 + projection (integers, exact in float64)
    tag = 4 * (max((store.num_experts for store, _ in fused.values()), default=0) + 1)
    names = list(model.state_dict())
    stand_ins = {}
    for i, name in enumerate(names):
        if name in fused:
            store, parts = fused[name]
            stand_ins[name] = torch.tensor([[[i * tag + e * 4 + p] for p in parts] for e in range(store.num_experts)],
                                           dtype=torch.float64)
        else:
            stand_ins[name] = torch.tensor([float(i * tag)], dtype=torch.float64)
    params, experts = {}, {}
    for hub, tensor in revert_weight_conversion(model, stand_ins).items():
        if tensor.numel() != 1:
            raise MoepressError(f"{hub}: the hub layout stores this model's experts fused ({tuple(tensor.shape)}), "
                                "not one linear per expert; compressed-tensors' per-expert layout cannot be written")
        index, rest = divmod(int(tensor.item()), tag)
        name = names[index]
        if name in fused:
            expert, part = divmod(rest, 4)
            experts[(fused[name][0].module_path, expert, EXPERT_LINEARS[part])] = hub.removesuffix(".weight")
        else:
            params[name] = hub
    return params, experts


__all__ = ["hub_names"]

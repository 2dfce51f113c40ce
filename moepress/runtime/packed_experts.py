"""The routed experts of one MoE layer, computed from packed weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quantize import QuantizedWeight
from .kept_weight import KeptWeight
from .packed_weight import PackedWeight
from .sparse_weight import SparsePackedWeight
from .split_weight import SplitWeight

EXPERT_LINEARS = ("gate_proj", "up_proj", "down_proj")


class PackedExpert(nn.Module):
    """One expert's gate, up and down projections, each its own :class:`PackedWeight`."""

    def __init__(self, gate_proj: PackedWeight, up_proj: PackedWeight, down_proj: PackedWeight):
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj


class PackedExperts(nn.ModuleList):

    """Replaces transformers' fused ``*Experts`` module, with the same forward signature.

    It is a list of :class:`PackedExpert`, so its state dict reads ``experts.{e}.gate_proj.qweight``:
    the same keys a per-expert-``nn.Linear`` model gets when its linears are packed, so a checkpoint
    loads into either layout. Experts may carry different bit widths (mixed precision per expert and
    per linear), and a linear may be a :class:`SplitWeight` (per neuron group). The forward follows transformers' eager expert loop: tokens are grouped by expert
    and only the experts a batch hits are dequantized.
    """

    holds_packed_experts = True  # what moepress.model.view recognises, without importing this module

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        act_fn: nn.Module,
        packed: dict[str, list[QuantizedWeight | PackedWeight | KeptWeight | SplitWeight | torch.Tensor]],
    ):
        for linear in EXPERT_LINEARS:
            if len(packed[linear]) != num_experts:
                raise ValueError(f"{linear}: expected {num_experts} packed experts, got {len(packed[linear])}")

        def module(w):
            from ..prune.sparse import SparseWeight

            if isinstance(w, (PackedWeight, KeptWeight, SplitWeight, SparsePackedWeight)):
                return w
            if isinstance(w, SparseWeight):
                return SparsePackedWeight(w)
            return KeptWeight(w) if isinstance(w, torch.Tensor) else PackedWeight(w)

        super().__init__(
            PackedExpert(*(module(packed[linear][e]) for linear in EXPERT_LINEARS)) for e in range(num_experts)
        )
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.act_fn = act_fn

    def packed_weight(self, expert: int, linear: str) -> PackedWeight | KeptWeight | SplitWeight:
        return getattr(self[expert], linear)

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        weights = self[expert]
        gate = F.linear(x, weights.gate_proj.dequantize(x.dtype))
        up = F.linear(x, weights.up_proj.dequantize(x.dtype))
        return F.linear(self.act_fn(gate) * up, weights.down_proj.dequantize(x.dtype))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        output = torch.zeros_like(hidden_states)
        # expert_mask[e, k, t] is 1 when token t chose expert e in its k-th slot, with a weight: a slot
        # whose weight is 0 (one dynamic pruning skipped, moepress.trim.dynamic) adds nothing and is
        # not computed.
        expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
        expert_mask = expert_mask * (top_k_weights != 0).T.unsqueeze(0)
        hit = torch.nonzero(expert_mask.sum(dim=(1, 2)) > 0).flatten().tolist()
        for expert in hit:
            slot, token = torch.where(expert_mask[expert])
            out = self.expert_forward(expert, hidden_states[token])
            out = out * top_k_weights[token, slot, None]
            output.index_add_(0, token, out.to(output.dtype))
        return output

    def extra_repr(self) -> str:
        bits = sorted({self.packed_weight(e, lin).bits for e in range(len(self)) for lin in EXPERT_LINEARS})
        return f"num_experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, bits={bits}"

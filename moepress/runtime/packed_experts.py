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

    With :meth:`set_activations` (``compress --activations int8``) the chosen linears' inputs are
    fake-quantized per token (:func:`moepress.quantize.activations.fake_quantize`): gate's and up's
    input is the token's hidden state, down's is ``act(gate) * up``, which only this module sees.
    The setting is not in the state dict; the checkpoint's metadata restores it on load.
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
        self.activations: str | None = None  # the scheme of the quantized inputs, if any
        self.quantized_inputs: frozenset[tuple[int, str]] = frozenset()  # (expert, linear) it applies to

    def set_activations(self, scheme: str | None, linears) -> None:
        """Quantize the inputs of ``linears`` ((expert, linear) pairs) with ``scheme`` (None: none)."""
        from ..quantize.activations import check_scheme

        check_scheme(scheme)
        self.activations = scheme
        self.quantized_inputs = frozenset(linears) if scheme is not None else frozenset()

    def input_of(self, expert: int, linear: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``linear`` of ``expert`` takes it: fake-quantized where activations apply."""
        if (expert, linear) not in self.quantized_inputs:
            return x
        from ..quantize.activations import fake_quantize

        return fake_quantize(x, self.activations)

    def packed_weight(self, expert: int, linear: str) -> PackedWeight | KeptWeight | SplitWeight:
        return getattr(self[expert], linear)

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        weights = self[expert]
        gate = F.linear(self.input_of(expert, "gate_proj", x), weights.gate_proj.dequantize(x.dtype))
        up = F.linear(self.input_of(expert, "up_proj", x), weights.up_proj.dequantize(x.dtype))
        hidden = self.act_fn(gate) * up
        return F.linear(self.input_of(expert, "down_proj", hidden), weights.down_proj.dequantize(x.dtype))

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
        acts = f", activations={self.activations}" if self.activations else ""
        return (f"num_experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"bits={bits}{acts}")

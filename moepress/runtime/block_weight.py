"""Weights held in llama.cpp's block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), computed from the GGUF bytes.

A ``compress --target llamacpp`` checkpoint stores each quantized linear as the exact bytes of a
GGUF tensor row (:class:`~moepress.quantize.ggml_blocks.BlockQuantizedWeight`), one buffer
``blocks``; these modules dequantize those bytes with llama.cpp's formulas on every call, so
moepress's own model computes with the values ``moepress export --format gguf`` writes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quantize import QuantizedWeight
from ..quantize.ggml_blocks import BlockQuantizedWeight, block_format
from ..treatment import Treatment
from .kept_weight import KeptWeight
from .packed_experts import EXPERT_LINEARS, PackedExpert, PackedExperts
from .packed_weight import PackedWeight


class BlockWeight(nn.Module):
    """One weight in a llama.cpp block format, as a buffer ``blocks`` (uint8 [out, in / 32 * block bytes]).

    It answers what the runtime asks of a weight module (``dequantize``, ``nbytes``, ``validate``,
    the shape attributes, ``bits``), as :class:`~moepress.runtime.packed_weight.PackedWeight` does,
    with its own storage: not ``qweight``/``scales`` but the GGUF bytes, which dtype casts leave
    alone (uint8). ``format`` names the block format (``"q4_1"``).
    """

    def __init__(self, quantized: BlockQuantizedWeight):
        super().__init__()
        self.format = quantized.format.name
        self.bits, self.group_size = quantized.format.bits, quantized.format.block
        self.in_features, self.out_features = quantized.in_features, quantized.out_features
        self.register_buffer("blocks", quantized.blocks)

    @classmethod
    def empty(cls, treatment: Treatment, out_features: int, in_features: int) -> "BlockWeight":
        """Zero bytes of the shape ``treatment`` (a format treatment) of an [out, in] weight implies."""
        fmt = block_format(treatment.format)
        blocks = torch.zeros(out_features, fmt.row_bytes(in_features), dtype=torch.uint8)
        return cls(BlockQuantizedWeight(blocks, fmt, in_features, out_features))

    def quantized(self) -> BlockQuantizedWeight:
        return BlockQuantizedWeight(self.blocks, block_format(self.format), self.in_features, self.out_features)

    def validate(self, name: str) -> None:
        weight = self.quantized()
        BlockQuantizedWeight.from_tensors(weight.tensors(), weight.meta(), name=name)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized().dequantize(dtype)

    def nbytes(self) -> int:
        return self.blocks.numel()

    def extra_repr(self) -> str:
        return f"{self.out_features}x{self.in_features}, {self.format}"


class BlockLinear(BlockWeight):
    """A drop-in for ``nn.Linear`` whose weight is a :class:`BlockWeight` (state dict: ``blocks``, ``bias``)."""

    replaces_linear = True  # a unit moepress.model.view treats as a linear, without importing this module

    def __init__(self, quantized: BlockQuantizedWeight | BlockWeight, bias: torch.Tensor | None = None):
        super().__init__(quantized.quantized() if isinstance(quantized, BlockWeight) else quantized)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bias={self.bias is not None}"


class BlockEmbedding(BlockWeight):
    """A drop-in for ``nn.Embedding`` whose table is a :class:`BlockWeight` (state dict: ``blocks``):
    the rows of the given ids are dequantized, as llama.cpp's ``get_rows`` reads a quantized
    ``token_embd``. ``dtype`` is the dtype of the vectors it returns (the model's)."""

    def __init__(self, quantized: BlockQuantizedWeight, dtype: torch.dtype = torch.float32):
        super().__init__(quantized)
        self.num_embeddings, self.embedding_dim = self.out_features, self.in_features
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = BlockQuantizedWeight(self.blocks[ids.reshape(-1)], block_format(self.format), self.in_features,
                                    ids.numel())
        return rows.dequantize(self.dtype).reshape(*ids.shape, self.in_features)


class TiedBlockHead(nn.Module):
    """The output head of a model whose head is its token embeddings (tied): the
    :class:`BlockEmbedding`'s bytes used as a linear, held and stored once, under the embeddings
    (as a GGUF without ``output`` makes llama.cpp read ``token_embd`` for the head)."""

    def __init__(self, embedding: BlockEmbedding):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # not a child module: no second copy in the state dict
        self.in_features, self.out_features = embedding.in_features, embedding.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.embedding.dequantize(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.out_features}x{self.in_features}, the token embeddings' {self.embedding.format}"


class BlockExperts(PackedExperts):
    """A layer's routed experts when some of their weights are :class:`BlockWeight`: the expert
    loop of :class:`PackedExperts` (same forward, same state-dict keys
    ``experts.{e}.gate_proj.blocks``), holding any weight module."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act_fn: nn.Module,
                 packed: dict[str, list]):
        for linear in EXPERT_LINEARS:
            if len(packed[linear]) != num_experts:
                raise ValueError(f"{linear}: expected {num_experts} packed experts, got {len(packed[linear])}")
        nn.ModuleList.__init__(self, (PackedExpert(*(_module(packed[linear][e]) for linear in EXPERT_LINEARS))
                                      for e in range(num_experts)))
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.act_fn = act_fn
        self.set_activations(None, ())  # llama.cpp's formats are weight-only (--activations is refused with them)


def holds_blocks(packed: dict[str, list]) -> bool:
    """Whether a layer's ``packed[linear][expert]`` weights include llama.cpp block weights."""
    return any(isinstance(w, (BlockQuantizedWeight, BlockWeight)) for weights in packed.values() for w in weights)


def _module(weight) -> nn.Module:
    if isinstance(weight, BlockQuantizedWeight):
        return BlockWeight(weight)
    if isinstance(weight, QuantizedWeight):
        return PackedWeight(weight)
    if isinstance(weight, torch.Tensor):
        return KeptWeight(weight)
    return weight


__all__ = ["BlockEmbedding", "BlockExperts", "BlockLinear", "BlockWeight", "TiedBlockHead", "holds_blocks"]

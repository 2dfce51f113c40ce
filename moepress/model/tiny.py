"""Tiny random MoE models of every supported architecture, built from configs.

They exist so tests (and users trying moepress without a GPU) can run the whole pipeline in
seconds. Random weights say nothing about quality: quality claims are measured on the trained zoo.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.activations import ACT2FN

_COMMON = dict(
    hidden_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    # id 0 is <|endoftext|> in the byte-level BPE of moepress.data.tokenizer.
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)
# Every input dimension is a multiple of 128, so every group size (32, 64, 128) divides it.
TINY_CONFIGS: dict[str, dict] = {
    "mixtral": dict(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        intermediate_size=128, moe_intermediate_size=128, shared_expert_intermediate_size=128,
        num_experts=8, num_experts_per_tok=2, mlp_only_layers=[0], decoder_sparse_step=1,
    ),
    "qwen3_moe": dict(
        intermediate_size=128, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
        head_dim=32, mlp_only_layers=[0],
    ),
    "olmoe": dict(intermediate_size=128, num_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(
        num_key_value_heads=4, intermediate_size=128, moe_intermediate_size=128, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=None,
        kv_lora_rank=128, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, n_group=2, topk_group=1,
        topk_method="group_limited_greedy",
    ),
    "deepseek_v3": dict(
        num_key_value_heads=4, intermediate_size=128, moe_intermediate_size=128, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=128,
        kv_lora_rank=128, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, n_group=2, topk_group=1,
    ),
    "granitemoe": dict(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2),
    "phimoe": dict(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2),
}


def tiny_config(model_type: str, vocab_size: int = 512, **overrides):
    kwargs = {**_COMMON, **TINY_CONFIGS[model_type], "vocab_size": vocab_size, **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def build_tiny_model(model_type: str, vocab_size: int = 512, seed: int = 0, **overrides) -> nn.Module:
    """A tiny random causal LM of ``model_type`` in float32, with non-trivial router state."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, vocab_size, **overrides))
    model.eval()
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # DeepSeek-V3: make the bias matter
            buf.copy_(torch.randn_like(buf) * 0.1)
    return model


class ExpertMLP(nn.Module):
    """One expert as three ``nn.Linear`` (the layout hub checkpoints and older code use)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LinearExperts(nn.ModuleList):
    """Experts stored one ``nn.Linear`` per expert, with the fused module's forward signature."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        output = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            if token.numel():
                out = expert(hidden_states[token]) * top_k_weights[token, slot, None]
                output.index_add_(0, token, out.to(output.dtype))
        return output


def unfuse_experts(model: nn.Module) -> nn.Module:
    """Rewrite every fused experts module of ``model`` as :class:`LinearExperts`, same weights."""
    for name, module in list(model.named_modules()):
        if hasattr(module, "gate_up_proj") and isinstance(getattr(module, "gate_up_proj"), nn.Parameter):
            num_experts, two_inter, hidden = module.gate_up_proj.shape
            inter = two_inter // 2
            act = model.config.hidden_act
            experts = LinearExperts(ExpertMLP(hidden, inter, act) for _ in range(num_experts))
            with torch.no_grad():
                for e, expert in enumerate(experts):
                    expert.gate_proj.weight.copy_(module.gate_up_proj[e, :inter])
                    expert.up_proj.weight.copy_(module.gate_up_proj[e, inter:])
                    expert.down_proj.weight.copy_(module.down_proj[e])
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, experts)
    return model

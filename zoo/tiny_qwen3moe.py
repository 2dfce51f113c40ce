#!/usr/bin/env python3
"""Zoo model ``tiny-qwen3moe``: a tiny Qwen3-MoE trained on moepress's English train split,
with every row a multiple of 256 so llama.cpp's k-quants (Q2_K..Q6_K, super-blocks of 256) apply.

The other tiny models have hidden size 128, where ``llama-quantize`` falls back from k-quants to
Q5_0/Q5_1; this one exists so the GGUF benchmark (``benchmarks/gguf_vs_llamacpp.py``) can compare moepress with
llama.cpp's Q4_K_M, Q3_K_M and Q2_K as they are meant to run.

4 layers, hidden 256, 4 query / 2 key-value heads of head dim 64 (Qwen3's per-head q/k RMSNorm),
every layer MoE (llama.cpp's ``qwen3moe`` has no dense layers; ``mlp_only_layers=[]``) with 8
experts top-2 of intermediate size 256 (SwiGLU), top-k weights renormalized (``norm_topk_prob``, as
the released Qwen3-MoE models), no shared expert, vocabulary 4096 (byte-level BPE), untied
embeddings. Every linear's input dimension (and every expert's and router's) is 256. Softmax router
trained with the Switch-style load-balancing loss of ``tiny-mixtral`` (coefficient 0.01); the same
data, tokenizer, optimizer and schedule as the other tiny models.

    python zoo/tiny_qwen3moe.py --threads 1   # writes zoo/models/tiny-qwen3moe/
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import TrainConfig, ZooModel, build_variant  # noqa: E402

MODEL = ZooModel(
    name="tiny-qwen3moe",
    description="tiny Qwen3-MoE (hidden 256, every layer MoE, 8 experts top-2 of 256) trained on "
                "KJV + Austen + Shakespeare; rows multiples of 256 for llama.cpp's k-quants",
    model_type="qwen3_moe",
    config=dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=256,  # unused: no dense layer (mlp_only_layers is empty)
        moe_intermediate_size=256,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        mlp_only_layers=[],
        decoder_sparse_step=1,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    ),
    train=TrainConfig(steps=400, batch_size=8, lr=3e-3, warmup_steps=40, score="softmax",
                      aux_coef=0.01, bias_gamma=0.0, seed=0),
)

if __name__ == "__main__":
    build_variant({"tiny": MODEL})

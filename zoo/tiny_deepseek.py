#!/usr/bin/env python3
"""Zoo model ``tiny-deepseek``: a tiny DeepSeek-V3-style MoE trained on moepress's English train split.

4 layers, hidden 128; layer 0 is dense (``first_k_dense_replace=1``, SwiGLU 512), layers
1-3 are MoE with 16 routed experts (intermediate 128) of which each token uses 4, plus 1
shared expert (intermediate 128).  Routing is DeepSeek-V3's: sigmoid affinities, node-
limited top-k (``n_group=4`` groups of 4 experts, ``topk_group=2``: each token picks its 4
experts inside its 2 best groups), top-k weights normalized (``routed_scaling_factor=1``:
tiny model).  Attention is Multi-head Latent Attention with ``q_lora_rank=128`` and
``kv_lora_rank=128`` (4 heads, nope/rope/v head dims 32/16/32).  Every linear's input
dimension is 128 or 512, so group size 128 divides all of them.

Balance: DeepSeek-V3's auxiliary-loss-free update of ``e_score_correction_bias`` (after
every step, +gamma for experts below the batch's mean load, -gamma above; transformers
does not train that buffer) plus a small complementary sequence-wise balance loss.

    python zoo/tiny_deepseek.py               # writes zoo/models/tiny-deepseek/
    python zoo/tiny_deepseek.py --threads 1   # on a busy machine
    python zoo/tiny_deepseek.py --variant micro   # micro-deepseek: 1 dense + 1 MoE layer, 200 steps, for CI
"""

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import TrainConfig, ZooModel, build_variant  # noqa: E402

MODEL = ZooModel(
    name="tiny-deepseek",
    description="tiny DeepSeek-V3-style MoE (MLA, 1 dense + 3 MoE layers, 16 routed experts top-4 "
                "+ 1 shared) trained on KJV + Austen + Shakespeare",
    model_type="deepseek_v3",
    config=dict(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=512,
        moe_intermediate_size=128,
        first_k_dense_replace=1,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        q_lora_rank=128,
        kv_lora_rank=128,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    ),
    train=TrainConfig(steps=400, batch_size=8, lr=3e-3, warmup_steps=40, score="sigmoid",
                      aux_coef=1e-3, bias_gamma=1e-3, seed=0),
)

# The CI variant: same architecture and recipe, 1 dense + 1 MoE layer and 200 steps (under 2 CPU minutes).
MICRO = ZooModel(
    name="micro-deepseek",
    description="micro DeepSeek-V3-style MoE (1 dense + 1 MoE layer, 16 routed experts top-4 + 1 shared) for CI",
    model_type="deepseek_v3",
    config={**MODEL.config, "num_hidden_layers": 2},
    train=replace(MODEL.train, steps=200, warmup_steps=20),
)

if __name__ == "__main__":
    build_variant({"tiny": MODEL, "micro": MICRO})

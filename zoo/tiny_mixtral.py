#!/usr/bin/env python3
"""Zoo model ``tiny-mixtral``: a tiny Mixtral-style MoE trained on moepress's English train split.

4 layers, hidden 128, 4 query / 2 key-value heads (head dim 32), 8 experts top-2 with
intermediate size 256 (SwiGLU), vocabulary 4096 (byte-level BPE), untied embeddings.
Every linear's input dimension is 128 or 256, so group size 128 divides all of them.
Softmax router trained with a Switch-style load-balancing loss (coefficient 0.01).

    python zoo/tiny_mixtral.py               # writes zoo/models/tiny-mixtral/
    python zoo/tiny_mixtral.py --threads 1   # on a busy machine
    python zoo/tiny_mixtral.py --variant micro   # micro-mixtral: 2 layers, 200 steps, for CI
"""

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import TrainConfig, ZooModel, build_variant  # noqa: E402

MODEL = ZooModel(
    name="tiny-mixtral",
    description="tiny Mixtral-style MoE (8 experts, top-2) trained on KJV + Austen + Shakespeare",
    model_type="mixtral",
    config=dict(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    ),
    train=TrainConfig(steps=400, batch_size=8, lr=3e-3, warmup_steps=40, score="softmax",
                      aux_coef=0.01, bias_gamma=0.0, seed=0),
)

# The CI variant: same architecture and training recipe, 2 layers and 200 steps (under 2 CPU minutes).
MICRO = ZooModel(
    name="micro-mixtral",
    description="micro Mixtral-style MoE (2 layers, 8 experts, top-2) for CI, trained on KJV + Austen + Shakespeare",
    model_type="mixtral",
    config={**MODEL.config, "num_hidden_layers": 2},
    train=replace(MODEL.train, steps=200, warmup_steps=20),
)

if __name__ == "__main__":
    build_variant({"tiny": MODEL, "micro": MICRO})

"""The committed zoo models (zoo/models/*/) load cleanly and still score what their cards say.

For every model directory with a ``card.json``: ``AutoModelForCausalLM.from_pretrained``
reports no missing, unexpected or mismatched keys, and the evaluation perplexity on the
card's evaluation windows (recomputed here, float32 compute, independently of
zoo/common.py) is not more than 5% above the card's figure.  Skipped when no model is
built.  A few seconds per model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

MODELS_DIR = Path(__file__).resolve().parent.parent / "zoo" / "models"
MODEL_DIRS = sorted(
    p for p in (MODELS_DIR.glob("*") if MODELS_DIR.is_dir() else [])
    if not p.name.startswith(".") and (p / "card.json").is_file()
)
TOLERANCE = 1.05
_WINDOWS: dict = {}  # (tokenizer.json sha256, eval spec) -> windows: zoo models share one tokenizer


def _eval_windows(model_dir, tok, spec):
    import hashlib

    from moepress.data.corpus import load_text, token_windows

    key = (hashlib.sha256((model_dir / "tokenizer.json").read_bytes()).hexdigest(),
           spec["text"], spec["seq_len"], spec["num_windows"], spec["seed"])
    if key not in _WINDOWS:
        _WINDOWS[key] = token_windows(load_text(spec["text"]), tok, spec["seq_len"], spec["num_windows"],
                                      seed=spec["seed"])
    return _WINDOWS[key]


@pytest.mark.skipif(not MODEL_DIRS, reason="no zoo model built (run zoo/tiny_*.py)")
@pytest.mark.parametrize("model_dir", MODEL_DIRS, ids=[p.name for p in MODEL_DIRS])
def test_zoo_model_loads_and_matches_card(model_dir):
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    card = json.loads((model_dir / "card.json").read_text(encoding="utf-8"))
    # transformers' eager experts (a loop over the experts): on the CPU a quarter faster than its
    # default grouped_mm path, which moefied-smollm2's 30 layers x 64 windows make most of this test
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True, dtype=torch.float32,
                                                       experts_implementation="eager")
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(key), f"{model_dir.name}: {key}: {info[key]}"
    assert model.config.model_type == card["architecture"]["model_type"]
    assert sum(p.numel() for p in model.parameters()) == card["params"]["total"]

    tok = AutoTokenizer.from_pretrained(model_dir)
    spec = card["eval"]
    windows = _eval_windows(model_dir, tok, spec)
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), 16):
            x = windows[i:i + 16]
            logits = model(input_ids=x).logits.float()
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
            n += x[:, 1:].numel()
    ppl = math.exp(total / n)
    assert ppl <= spec["perplexity"] * TOLERANCE, (
        f"{model_dir.name}: eval perplexity {ppl:.3f} regressed past the card's {spec['perplexity']:.3f} (+5%)")
    # A trained model, not a random one: far better than the unigram baseline of its card.
    assert ppl < 0.5 * spec["unigram_perplexity"], (ppl, spec["unigram_perplexity"])

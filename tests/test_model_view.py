"""The model view: canonical unit names, both expert layouts, the registry's errors."""

from __future__ import annotations

import pytest
import torch

from moepress.compress import CompressConfig, quantize_model
from moepress.errors import MoepressError
from moepress.model import ARCHITECTURES, EXPERT_LINEARS, MoEView
from moepress.model.tiny import build_tiny_model, unfuse_experts


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_units_have_canonical_names(arch):
    model = build_tiny_model(arch)
    view = MoEView(model)
    names = list(view.unit_shapes())
    cfg = model.config
    assert all(n.split(".")[0] == "layers" and n.split(".")[2] in ("attn", "experts", "shared", "mlp") for n in names)
    # Routed experts: every expert has gate/up/down with [out, in] shapes independent of storage.
    moe_layers = [l for l in range(view.num_layers) if view.is_moe_layer(l)]
    assert moe_layers
    store = view.experts(moe_layers[0])
    assert store.layout == "fused"
    for e in range(store.num_experts):
        for lin in EXPERT_LINEARS:
            assert f"layers.{moe_layers[0]}.experts.{e}.{lin}" in names
    assert store.weight("gate_proj").shape == (store.num_experts, store.intermediate_size, cfg.hidden_size)
    assert store.weight("down_proj").shape == (store.num_experts, cfg.hidden_size, store.intermediate_size)
    # Attention units are the projections the architecture has (latent attention for DeepSeek).
    attn = {n.split(".")[-1] for n in names if n.startswith("layers.0.attn.")}
    if arch.startswith("deepseek"):
        assert {"kv_a_proj_with_mqa", "kv_b_proj", "o_proj"} <= attn
        assert ("q_a_proj" in attn and "q_b_proj" in attn) == (cfg.q_lora_rank is not None)
    else:
        assert attn == {"q_proj", "k_proj", "v_proj", "o_proj"}
    # Dense first layers and shared experts.
    if arch in ("deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe"):
        assert not view.is_moe_layer(0) and "layers.0.mlp.down_proj" in names
    if arch in ("deepseek_v2", "deepseek_v3", "qwen2_moe"):
        assert f"layers.{moe_layers[0]}.shared.up_proj" in names


def test_unknown_architecture_is_one_clear_line():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(MoepressError) as info:
        MoEView(model)
    message = str(info.value)
    assert "'llama'" in message and "mixtral" in message and "registry.py" in message and "\n" not in message


def test_per_expert_linear_layout_matches_fused():
    """A model whose experts are one nn.Linear each is seen, and quantized, exactly like the fused one."""
    fused = build_tiny_model("mixtral")
    split = unfuse_experts(build_tiny_model("mixtral"))
    ids = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(split(ids).logits, fused(ids).logits)
    view_f, view_s = MoEView(fused), MoEView(split)
    assert view_s.experts(0).layout == "per_expert"
    assert list(view_f.unit_shapes().items()) == list(view_s.unit_shapes().items())
    for lin in EXPERT_LINEARS:
        assert torch.equal(view_f.experts(1).weight(lin), view_s.experts(1).weight(lin))

    tokens = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))
    config = CompressConfig(bits=3, group_size=64, calib_samples=8, seq_len=64)
    units_f, err_f, _ = quantize_model(fused, tokens, config, progress=False)
    units_s, err_s, _ = quantize_model(split, tokens, config, progress=False)
    assert units_s == units_f
    for name in err_f:
        assert err_s[name] == pytest.approx(err_f[name], rel=1e-3, abs=1e-6), name
    with torch.no_grad():
        torch.testing.assert_close(split(ids).logits, fused(ids).logits, rtol=1e-4, atol=1e-4)


def test_per_expert_checkpoint_loads_into_the_fused_architecture(tmp_path, tokenizer):
    """Packed state-dict keys do not depend on the expert layout (experts.{e}.gate_proj.qweight)."""
    import moepress
    from moepress.compress import CompressResult
    from moepress.export import save_compressed

    split = unfuse_experts(build_tiny_model("mixtral", vocab_size=len(tokenizer)))
    tokens = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))
    config = CompressConfig(bits=4, group_size=128, calib_samples=8, seq_len=64)
    units, errors, profile = quantize_model(split, tokens, config, progress=False)
    save_compressed(CompressResult(split, tokenizer, config, units, errors, profile, 0.0, tokens.numel()),
                    str(tmp_path / "q"))
    fused = moepress.load(str(tmp_path / "q"))
    assert MoEView(fused).experts(0).layout == "packed"
    ids = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, split(ids).logits, rtol=1e-5, atol=1e-5)

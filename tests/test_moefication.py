"""MoEfication (zoo/moefication.py) on a tiny random Llama model: balanced clusters, exact
expert split, and a Mixtral conversion that reproduces the dense model.  No download; a
few seconds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "zoo"))
import moefication as mf  # noqa: E402

H, I, E = 64, 256, 4  # hidden, intermediate, experts -> 64 neurons per expert


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=H, intermediate_size=I, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                      rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a mix-up of norm weights would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _mlp(model, layer=0):
    mlp = model.model.layers[layer].mlp
    return mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach()


def _groups(model, layer=0, features="weight"):
    g, u, _ = _mlp(model, layer)
    if features == "weight":
        feats = mf.weight_features(g, u)
    else:
        x = torch.randn(300, H)
        acts = torch.nn.functional.silu(x @ g.T) * (x @ u.T)
        feats = (mf.coactivation_features(acts) if features == "coact"
                 else mf.contribution_features(acts, _mlp(model, layer)[2]))
    return mf.groups_from_labels(mf.balanced_kmeans(feats, E, seed=layer), E)


@pytest.mark.parametrize("features", ["weight", "coact", "contrib"])
def test_clusters_are_balanced_partition(llama, features):
    groups = _groups(llama, 0, features)
    assert groups.shape == (E, I // E)
    flat = groups.flatten()
    assert torch.equal(torch.sort(flat).values, torch.arange(I))  # every neuron exactly once
    mf.check_partition(groups, I)


def test_balanced_assign_sizes_and_errors():
    sim = torch.randn(12, 3)
    labels = mf.balanced_assign(sim, 4)
    assert torch.bincount(labels, minlength=3).tolist() == [4, 4, 4]
    with pytest.raises(ValueError):
        mf.balanced_assign(torch.randn(10, 3), 4)
    with pytest.raises(ValueError):
        mf.balanced_kmeans(torch.randn(10, 5), 3)
    with pytest.raises(ValueError):
        mf.check_partition(torch.tensor([[0, 1], [1, 2]]), 4)


def test_experts_sum_to_dense_ffn(llama):
    g, u, d = _mlp(llama)
    groups = _groups(llama)
    gate_up, down = mf.split_ffn(g, u, d, groups)
    assert gate_up.shape == (E, 2 * (I // E), H) and down.shape == (E, H, I // E)
    # gate rows first, then up rows, as MixtralExperts.forward's chunk(2) expects
    assert torch.equal(gate_up[1, : I // E], g[groups[1]]) and torch.equal(gate_up[1, I // E:], u[groups[1]])
    x = torch.randn(50, H)
    outs = mf.expert_outputs(x, gate_up, down)
    dense = mf.dense_ffn(x, g, u, d)
    torch.testing.assert_close(outs.sum(1), dense, rtol=1e-5, atol=1e-5)


def test_mixtral_block_matches_combination(llama):
    """The real MixtralSparseMoeBlock (every expert selected, each weight 1 after the
    down_proj x E scaling) equals the dense MLP, and with a random router equals
    moe_combine of the unscaled expert outputs."""
    g, u, d = _mlp(llama)
    groups = _groups(llama)
    for top_k in (E, 2):
        moe = mf.llama_to_mixtral(llama, [groups, groups], top_k, down_scale=float(top_k))
        block = moe.model.layers[0].mlp
        x = torch.randn(2, 7, H)
        gate_up, down = mf.split_ffn(g, u, d, groups)
        outs = mf.expert_outputs(x.reshape(-1, H), gate_up, down)
        with torch.no_grad():
            if top_k == E:  # zero router: uniform weights 1/E, times E = plain sum = dense MLP
                torch.testing.assert_close(block(x), llama.model.layers[0].mlp(x), rtol=1e-5, atol=1e-5)
            router = torch.randn(E, H)
            block.gate.weight.copy_(router)
            want, _ = mf.moe_combine(x.reshape(-1, H) @ router.T, outs, top_k, float(top_k))
            torch.testing.assert_close(block(x).reshape(-1, H), want, rtol=1e-5, atol=1e-5)
        # the Gram-matrix error equals the direct one
        logits = x.reshape(-1, H) @ router.T
        direct = mf.relative_error(want, outs.sum(1))
        assert abs(float(mf.combine_error(logits, mf.output_gram(outs), top_k, float(top_k))) - direct) < 1e-4 * max(direct, 1)


def test_mixtral_conversion_reproduces_dense_model(llama):
    groups = [_groups(llama, l) for l in range(2)]
    moe = mf.llama_to_mixtral(llama, groups, E, down_scale=float(E))
    cfg = moe.config
    assert cfg.model_type == "mixtral" and cfg.num_local_experts == E and cfg.num_experts_per_tok == E
    assert cfg.intermediate_size == I // E and cfg.head_dim == 16 and cfg.tie_word_embeddings
    assert cfg.rope_parameters["rope_theta"] == 10000.0 and cfg.rms_norm_eps == 1e-5
    assert moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids=ids).logits, llama(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_router_fit_beats_random(llama):
    g, u, d = _mlp(llama)
    groups = _groups(llama)
    gate_up, down = mf.split_ffn(g, u, d, groups)
    x = torch.randn(400, H)
    outs = mf.expert_outputs(x, gate_up, down)
    gram = mf.output_gram(outs)
    r0 = mf.router_lstsq_init(x, mf.expert_importance(outs))
    t = mf.best_temperature(x, gram, r0, 2, 2.0)
    fitted = float(mf.combine_error(x @ (t * r0).T, gram, 2, 2.0))
    rand = float(mf.combine_error(x @ torch.randn(E, H).T, gram, 2, 2.0))
    assert fitted < rand
    r1, losses = mf.train_router(x, gram, t * r0, 2, scale=2.0, steps=5, batch=10_000)
    assert len(losses) == 5 and r1.shape == (E, H)

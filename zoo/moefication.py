"""MoEfication: turn a dense Llama-architecture model into a transformers Mixtral MoE.

Pure functions used by ``zoo/moefied_smollm2.py`` and tested by ``tests/test_moefication.py``.

A dense SwiGLU FFN ``y = W_down (silu(W_gate x) * (W_up x))`` is a sum over its ``I``
intermediate neurons, so splitting the neurons into ``E`` disjoint groups of ``I / E``
gives ``E`` experts whose outputs *sum* exactly to the dense output
(:func:`expert_outputs`, :func:`split_ffn`).  The groups come from a balanced clustering
of the neurons (:func:`balanced_kmeans`: spherical k-means whose assignment step is a
linear assignment problem, so every cluster has exactly ``I / E`` neurons), on either the
neurons' weights (:func:`weight_features`) or their activation patterns on calibration
tokens (:func:`coactivation_features`, :func:`contribution_features`).

transformers' Mixtral (5.x) stores the experts of a layer fused:
``mlp.experts.gate_up_proj`` ``[E, 2 * I_e, H]`` (rows ``[:I_e]`` are the gate
projection, ``[I_e:]`` the up projection: ``forward`` does ``linear(x, gate_up).chunk(2)``)
and ``mlp.experts.down_proj`` ``[E, H, I_e]``; the router ``mlp.gate.weight`` is
``[E, H]`` (no bias).  Mixtral weights the top-k experts' outputs by their softmax
probabilities *renormalized to sum to 1*, while the dense FFN is a plain sum; so the
converted experts' ``down_proj`` is multiplied by ``down_scale`` (``top_k`` by default in
the zoo script): with equal router logits on the selected experts the MoE output is then
exactly the sum of the selected experts.  With ``top_k = E`` and a zero router, the
Mixtral model equals the dense model (up to float rounding).

Router fitting (:func:`router_lstsq_init`, :func:`train_router`) works on per-layer
tensors (FFN inputs and each expert's output), so it needs no model forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------- clustering


def weight_features(gate_w: torch.Tensor, up_w: torch.Tensor) -> torch.Tensor:
    """One feature vector per intermediate neuron: its gate and up rows, each L2-normalized,
    concatenated (``[I, 2H]``)."""
    return torch.cat([F.normalize(gate_w.float(), dim=1), F.normalize(up_w.float(), dim=1)], dim=1)


def coactivation_features(acts: torch.Tensor) -> torch.Tensor:
    """One feature vector per neuron from its activations ``acts`` ``[tokens, I]`` (the
    SwiGLU product ``silu(gate x) * (up x)``): the neuron's absolute activation over the
    tokens, scaled to unit RMS per neuron (``[I, tokens]``).  Neurons that are large on
    the same tokens end up close, so a token needs few clusters."""
    a = acts.float().abs().T
    return a / a.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12)


def contribution_features(acts: torch.Tensor, down_w: torch.Tensor) -> torch.Tensor:
    """One feature vector per neuron: the size of its contribution to the FFN output on each
    calibration token, ``|acts[t, i]| * |down_w[:, i]|`` (``[I, tokens]``).  Balanced k-means
    on these (centered, then normalized) groups neurons that contribute on the same tokens;
    on SmolLM2-135M it left 3-28% less output energy outside the top-6 experts than
    :func:`coactivation_features`."""
    return (acts.float().abs() * down_w.float().norm(dim=0)).T


def balanced_assign(sim: torch.Tensor, size: int) -> torch.Tensor:
    """Assign each row of ``sim`` ``[n, k]`` (similarity of item i to cluster c) to a
    cluster, exactly ``size`` items per cluster (``n == k * size``), maximizing the total
    similarity (scipy's ``linear_sum_assignment`` on the clusters repeated ``size`` times)."""
    from scipy.optimize import linear_sum_assignment

    n, k = sim.shape
    if n != k * size:
        raise ValueError(f"{n} items cannot fill {k} clusters of {size}")
    cost = -sim.double().repeat_interleave(size, dim=1).numpy()
    rows, cols = linear_sum_assignment(cost)
    labels = torch.empty(n, dtype=torch.long)
    labels[torch.from_numpy(rows)] = torch.from_numpy(cols // size).long()
    return labels


def balanced_kmeans(features: torch.Tensor, n_clusters: int, *, iters: int = 20, seed: int = 0,
                    center: bool = True) -> torch.Tensor:
    """Balanced spherical k-means: cluster labels ``[n]`` with exactly ``n / n_clusters``
    items per cluster.  Features are (optionally) centered and L2-normalized; centroids are
    initialized by k-means++ (seeded), the assignment step is :func:`balanced_assign` on the
    cosine similarity; stops when the assignment no longer changes."""
    n = features.shape[0]
    if n % n_clusters:
        raise ValueError(f"{n} neurons do not split into {n_clusters} equal clusters")
    size = n // n_clusters
    x = features.float()
    if center:
        x = x - x.mean(0, keepdim=True)
    x = F.normalize(x, dim=1)
    gen = torch.Generator().manual_seed(seed)
    # k-means++ on cosine distance
    first = int(torch.randint(n, (1,), generator=gen))
    cent = [x[first]]
    dist = (1 - x @ x[first]).clamp_min(0)
    for _ in range(1, n_clusters):
        p = dist / dist.sum() if float(dist.sum()) > 0 else torch.full((n,), 1.0 / n)
        nxt = int(torch.multinomial(p, 1, generator=gen))
        cent.append(x[nxt])
        dist = torch.minimum(dist, (1 - x @ x[nxt]).clamp_min(0))
    c = torch.stack(cent)
    labels = None
    for _ in range(iters):
        new = balanced_assign(x @ c.T, size)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        c = F.normalize(torch.stack([x[labels == j].mean(0) for j in range(n_clusters)]), dim=1)
    return labels


def groups_from_labels(labels: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """``[n_clusters, size]`` neuron indices of each cluster (ascending); checks that every
    cluster has the same size."""
    groups = [torch.nonzero(labels == j).flatten() for j in range(n_clusters)]
    sizes = {len(g) for g in groups}
    if len(sizes) != 1:
        raise ValueError(f"unbalanced clusters: sizes {sorted(len(g) for g in groups)}")
    return torch.stack(groups)


def check_partition(groups: torch.Tensor, n: int) -> None:
    """Every neuron ``0..n-1`` in exactly one group, all groups the same size."""
    flat = groups.flatten()
    if flat.numel() != n or not torch.equal(torch.sort(flat).values, torch.arange(n)):
        raise ValueError("groups are not a partition of the neurons")


# ------------------------------------------------------------------------ experts


def split_ffn(gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor, groups: torch.Tensor,
              down_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a dense SwiGLU FFN (``gate_w``/``up_w`` ``[I, H]``, ``down_w`` ``[H, I]``) into
    Mixtral's fused expert tensors ``gate_up_proj`` ``[E, 2m, H]`` (gate rows first) and
    ``down_proj`` ``[E, H, m]`` (times ``down_scale``), expert ``e`` holding neurons
    ``groups[e]``."""
    check_partition(groups, gate_w.shape[0])
    gate_up = torch.cat([gate_w[groups], up_w[groups]], dim=1)             # [E, 2m, H]
    down = down_w[:, groups].permute(1, 0, 2).contiguous() * down_scale     # [E, H, m]
    return gate_up.contiguous(), down


def expert_outputs(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act=F.silu) -> torch.Tensor:
    """Every expert's output on every token, unweighted: ``[N, E, H]`` for ``x`` ``[N, H]``."""
    m = gate_up.shape[1] // 2
    h = torch.einsum("nh,eih->nei", x, gate_up)
    inter = act(h[..., :m]) * h[..., m:]
    return torch.einsum("nei,ehi->neh", inter, down)


def dense_ffn(x: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor,
              act=F.silu) -> torch.Tensor:
    return F.linear(act(F.linear(x, gate_w)) * F.linear(x, up_w), down_w)


# ------------------------------------------------------------------- conversion


def mixtral_config_from_llama(llama_cfg, num_experts: int, top_k: int, **overrides):
    """A :class:`transformers.MixtralConfig` with the attention, norms, RoPE, vocabulary and
    embeddings of ``llama_cfg`` and ``num_experts`` experts of ``intermediate_size /
    num_experts`` neurons, ``top_k`` per token.  Refuses Llama features Mixtral lacks
    (attention/MLP biases, non-SiLU activation)."""
    from transformers import MixtralConfig

    if getattr(llama_cfg, "attention_bias", False) or getattr(llama_cfg, "mlp_bias", False):
        raise ValueError("Mixtral has no attention/MLP biases")
    if llama_cfg.hidden_act != "silu":
        raise ValueError(f"Mixtral experts use silu, source uses {llama_cfg.hidden_act}")
    if llama_cfg.intermediate_size % num_experts:
        raise ValueError(f"intermediate size {llama_cfg.intermediate_size} not divisible by {num_experts}")
    rope = getattr(llama_cfg, "rope_parameters", None)
    if rope is None:
        rope = {"rope_type": "default", "rope_theta": getattr(llama_cfg, "rope_theta", 10000.0)}
    head_dim = getattr(llama_cfg, "head_dim", None) or llama_cfg.hidden_size // llama_cfg.num_attention_heads
    kw: dict[str, Any] = dict(
        vocab_size=llama_cfg.vocab_size,
        hidden_size=llama_cfg.hidden_size,
        intermediate_size=llama_cfg.intermediate_size // num_experts,
        num_hidden_layers=llama_cfg.num_hidden_layers,
        num_attention_heads=llama_cfg.num_attention_heads,
        num_key_value_heads=llama_cfg.num_key_value_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=llama_cfg.max_position_embeddings,
        initializer_range=llama_cfg.initializer_range,
        rms_norm_eps=llama_cfg.rms_norm_eps,
        use_cache=True,
        pad_token_id=llama_cfg.pad_token_id,
        bos_token_id=llama_cfg.bos_token_id,
        eos_token_id=llama_cfg.eos_token_id,
        tie_word_embeddings=llama_cfg.tie_word_embeddings,
        sliding_window=None,
        attention_dropout=llama_cfg.attention_dropout,
        num_experts_per_tok=top_k,
        num_local_experts=num_experts,
        router_jitter_noise=0.0,
        rope_parameters=dict(rope),
    )
    kw.update(overrides)
    return MixtralConfig(**kw)


def llama_to_mixtral(llama, groups: Sequence[torch.Tensor], top_k: int, *,
                     routers: Sequence[torch.Tensor] | None = None, down_scale: float = 1.0):
    """A float32 ``MixtralForCausalLM`` with ``llama``'s embeddings, attention, norms and
    head, and layer ``l``'s FFN split into experts ``groups[l]`` (``[E, m]`` neuron
    indices), ``down_proj`` times ``down_scale``; routers from ``routers[l]`` ``[E, H]``
    (zeros if not given)."""
    from transformers import MixtralForCausalLM

    n_exp = groups[0].shape[0]
    cfg = mixtral_config_from_llama(llama.config, n_exp, top_k)
    moe = MixtralForCausalLM(cfg).float()
    src = llama.model
    dst = moe.model
    with torch.no_grad():
        dst.embed_tokens.weight.copy_(src.embed_tokens.weight)
        dst.norm.weight.copy_(src.norm.weight)
        if not cfg.tie_word_embeddings:
            moe.lm_head.weight.copy_(llama.lm_head.weight)
        for l, (sl, dl) in enumerate(zip(src.layers, dst.layers)):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(dl.self_attn, name).weight.copy_(getattr(sl.self_attn, name).weight)
            dl.input_layernorm.weight.copy_(sl.input_layernorm.weight)
            dl.post_attention_layernorm.weight.copy_(sl.post_attention_layernorm.weight)
            gate_up, down = split_ffn(sl.mlp.gate_proj.weight, sl.mlp.up_proj.weight, sl.mlp.down_proj.weight,
                                      groups[l], down_scale)
            dl.mlp.experts.gate_up_proj.copy_(gate_up)
            dl.mlp.experts.down_proj.copy_(down)
            dl.mlp.gate.weight.copy_(routers[l] if routers is not None else torch.zeros_like(dl.mlp.gate.weight))
    if cfg.tie_word_embeddings and moe.lm_head.weight.data_ptr() != dst.embed_tokens.weight.data_ptr():
        raise RuntimeError("tied lm_head does not share the embedding")
    moe.eval()
    return moe


# ---------------------------------------------------------------------- routing


def moe_combine(logits: torch.Tensor, outs: torch.Tensor, top_k: int, scale: float = 1.0):
    """What a Mixtral block computes from router ``logits`` ``[N, E]`` and unweighted expert
    outputs ``outs`` ``[N, E, H]`` (``down_proj`` not yet scaled): softmax, top-k,
    renormalize, weighted sum times ``scale``.  Returns (output ``[N, H]``, indices)."""
    probs = logits.float().softmax(-1)
    w, idx = probs.topk(top_k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    sel = outs.gather(1, idx[..., None].expand(-1, -1, outs.shape[-1]))
    return scale * (w[..., None] * sel).sum(1), idx


def expert_importance(outs: torch.Tensor) -> torch.Tensor:
    """Per token and expert, the L2 norm of the expert's output ``[N, E]``."""
    return outs.norm(dim=-1)


def router_lstsq_init(x: torch.Tensor, target: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """Router ``[E, H]`` by ridge least squares ``x @ W.T ~ target`` (``target`` ``[N, E]``,
    standardized per token so only the ranking of the experts matters)."""
    t = target.float()
    t = (t - t.mean(1, keepdim=True)) / t.std(1, keepdim=True).clamp_min(1e-6)
    xf = x.float()
    gram = xf.T @ xf
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0])
    return torch.linalg.solve(gram, xf.T @ t).T.contiguous()


def relative_error(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float((pred - target).pow(2).sum() / target.pow(2).sum())


def output_gram(outs: torch.Tensor) -> torch.Tensor:
    """Per token, the Gram matrix of the experts' outputs ``[N, E, E]``: all that the
    squared error of any weighted combination against the dense output (their sum) needs,
    so routers train without touching the ``[N, E, H]`` outputs again."""
    return torch.einsum("neh,nfh->nef", outs.double(), outs.double()).float()


def _sparse_weights(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Mixtral's routing weights as a dense ``[N, E]`` matrix (zero for unselected experts)."""
    probs = logits.float().softmax(-1)
    w, idx = probs.topk(top_k, dim=-1)
    return torch.zeros_like(probs).scatter(1, idx, w / w.sum(-1, keepdim=True))


def combine_error(logits: torch.Tensor, gram: torch.Tensor, top_k: int, scale: float, *,
                  per_token: bool = False):
    """Squared error ``|scale * sum_e w_e o_e - sum_e o_e|^2`` of the Mixtral combination,
    from the Gram matrices (:func:`output_gram`): summed over tokens and divided by the
    dense output's energy (relative error), or per token.  Differentiable in ``logits``."""
    w = _sparse_weights(logits, top_k)
    gw = torch.einsum("nef,nf->ne", gram, w)
    b = gram.sum(-1)
    c = b.sum(-1)
    err = scale * scale * (w * gw).sum(-1) - 2 * scale * (w * b).sum(-1) + c
    return err if per_token else err.sum() / c.sum()


def best_scale(logits: torch.Tensor, gram: torch.Tensor, top_k: int) -> float:
    """The multiplier of the combined output (i.e. of every ``down_proj``) with the least
    squared error for the routing given by ``logits`` (for uniform weights it is about
    ``top_k``)."""
    w = _sparse_weights(logits, top_k)
    return float((w * gram.sum(-1)).sum() / (w * torch.einsum("nef,nf->ne", gram, w)).sum())


def best_temperature(x: torch.Tensor, gram: torch.Tensor, router: torch.Tensor, top_k: int, scale: float,
                     grid: Sequence[float] = tuple(2.0 ** -i for i in range(0, 16))) -> float:
    """The multiplier of the router logits with the least error on ``x`` (it does not
    change which experts are selected, only how evenly the selected ones are weighted)."""
    logits = x @ router.T
    errs = [float(combine_error(t * logits, gram, top_k, scale)) for t in grid]
    return grid[min(range(len(grid)), key=errs.__getitem__)]


def train_router(x: torch.Tensor, gram: torch.Tensor, router: torch.Tensor, top_k: int, *,
                 scale: float, steps: int = 200, lr: float = 1e-2, batch: int = 4096,
                 seed: int = 0) -> tuple[torch.Tensor, list[float]]:
    """Adam on the router only, minimizing :func:`combine_error` (the relative squared error
    of the Mixtral combination against the dense FFN output) on minibatches of ``x``.
    ``lr`` is relative to the router's RMS (the router may be scaled by a small
    temperature).  Only the selected experts' logits get a gradient.  Returns the router
    and the loss per step."""
    gen = torch.Generator().manual_seed(seed)
    w = router.detach().clone().float().requires_grad_(True)
    rms = float(w.detach().pow(2).mean().sqrt()) or 1.0
    opt = torch.optim.Adam([w], lr=lr * rms)
    losses = []
    n = x.shape[0]
    for _ in range(steps):
        i = torch.randperm(n, generator=gen)[:batch] if batch < n else slice(None)
        loss = combine_error(x[i] @ w.T, gram[i], top_k, scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return w.detach(), losses

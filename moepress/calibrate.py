"""Layer-by-layer calibration: run tokens through the decoder one layer at a time and record statistics.

Only the layer being worked on sits on the compute device; the hidden states between layers live
on the CPU. Statistics come from forward hooks, never from architecture-specific code:

- every ``nn.Linear`` unit: the input Gram matrix X^T X (GPTQ's Hessian, up to a factor) and the
  per-input-channel squared norms;
- every routed-expert layer, from a pre-hook on the experts module (whose forward receives
  ``hidden_states, top_k_index, top_k_weights`` in every transformers 5.x MoE): tokens routed to
  each expert, routing-weight mass, and per expert the Gram matrices of the gate/up input and of
  the down-projection input act(x W_g^T) * (x W_u^T).

An expert's output reaches the layer's output multiplied by the token's routing weight g, so the
error its quantization adds to the layer's output on that token is g^2 ||(W - Q) x||^2. With
``token_weighting="g2"`` each routed token enters the expert's Gram matrices with weight g^2, and
GPTQ then minimises the expert's share of the layer's error; ``"g"`` weights by g (MoEQuant's
affinity-guided quantization, Hu et al. 2025, arXiv 2505.03804, eq. 8); ``"plain"`` counts every
routed token once (GPTQ as for a dense layer).

Experts that receive fewer than ``min_expert_tokens`` tokens are calibrated anyway when
``rare_experts="all_tokens"``: their statistics are taken over every calibration token as if all
were routed to them, while the layer's output keeps the real routing (the hook only observes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file

from .errors import MoepressError
from .model.view import EXPERT_LINEARS, ExpertStore, LinearUnit, MoEView
from .pipeline.runner import LayerLoop, LayerwiseRunner


# How a routed token's contribution to its expert's Hessians is weighted (see the module docstring).
TOKEN_WEIGHTINGS = ("plain", "g", "g2")


def check_token_weighting(name: str) -> None:
    if name not in TOKEN_WEIGHTINGS:
        raise MoepressError(f"expert-hessian must be one of {', '.join(TOKEN_WEIGHTINGS)} (got {name!r})")


class LinearInputStats:
    """Accumulates X^T X and per-channel squared norms of one linear's input."""

    def __init__(self, in_features: int, device: torch.device):
        self.gram = torch.zeros(in_features, in_features, device=device)
        self.sq_norm = torch.zeros(in_features, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.gram.addmm_(x.T, x)
        self.sq_norm += (x * x).sum(0)
        self.count += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """X^T X / n: the GPTQ Hessian up to the constant factor 2, which GPTQ does not need."""
        return self.gram / max(self.count, 1)

    def hook(self):
        def fn(_module, args):
            self.add(args[0])

        return fn


@dataclass
class ExpertInputStats:
    """Per-expert routing counts and input statistics of one MoE layer."""

    store: ExpertStore
    device: torch.device
    rare: set[int] = field(default_factory=set)  # experts calibrated on all tokens
    with_grams: bool = True
    # The experts whose Gram matrices are gathered (``--expert-chunk``: a layer's Hessians need not all
    # be held at once; float32 [E, H, H] + [E, I, I] is 7 GB for one Mixtral-8x7B layer). None: all.
    chunk: range | None = None
    # "plain", "g" or "g2": each routed token's weight in its expert's Gram matrices (module docstring).
    # Rare experts (calibrated on all tokens) stay unweighted: most of their tokens have g = 0.
    token_weighting: str = "plain"

    def __post_init__(self):
        check_token_weighting(self.token_weighting)
        E, H, I = self.store.num_experts, self.store.hidden_size, self.store.intermediate_size
        dev = self.device
        self.chunk = range(E) if self.chunk is None else self.chunk
        C = len(self.chunk)
        self.tokens = torch.zeros(E, dtype=torch.long, device=dev)
        self.routing_mass = torch.zeros(E, dtype=torch.float64, device=dev)
        self.in_sq_norm = torch.zeros(E, H, device=dev)
        self.mid_sq_norm = torch.zeros(E, I, device=dev)
        self.all_count = 0
        # The total token weight behind each expert's Gram matrices (its token count when plain):
        # the Hessians are weighted means, so equal routing weights give exactly the plain ones.
        self.hessian_mass = torch.zeros(E, dtype=torch.float64, device=dev)
        if self.with_grams:
            self.in_gram = torch.zeros(C, H, H, device=dev)
            self.mid_gram = torch.zeros(C, I, I, device=dev)
        self._weights = None

    def _expert_weights(self):
        # Views of the stored weights (fused layout) are kept as they are; each expert's slice is
        # cast to float32 only when used, so no float copy of all experts is ever held.
        if self._weights is None:
            self._weights = {lin: self.store.weight(lin).detach() for lin in ("gate_proj", "up_proj")}
        return self._weights

    def _intermediate(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """The down projection's input for ``x`` routed to ``expert``: act(x W_g^T) * (x W_u^T)."""
        w = self._expert_weights()
        gate, up = w["gate_proj"][expert].float(), w["up_proj"][expert].float()
        return self.store.act_fn(x @ gate.T) * (x @ up.T)

    @torch.no_grad()
    def add(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        x = hidden.reshape(-1, hidden.shape[-1]).float()
        E = self.store.num_experts
        flat_index = top_k_index.reshape(-1)
        self.tokens += torch.bincount(flat_index, minlength=E)[:E]
        self.routing_mass += torch.zeros(E, dtype=torch.float64, device=x.device).index_add_(
            0, flat_index, top_k_weights.reshape(-1).double()
        )
        self.all_count += x.shape[0]
        if not self.with_grams:
            return
        first = self.chunk.start
        for expert in self.chunk:
            weight = None
            if expert in self.rare:
                xe = x
            else:
                chosen = top_k_index == expert  # [T, k]
                token = chosen.any(dim=-1).nonzero().flatten()
                if token.numel() == 0:
                    continue
                xe = x[token]
                if self.token_weighting != "plain":
                    g = (top_k_weights.float() * chosen).sum(-1)[token]
                    weight = g if self.token_weighting == "g" else g * g
            mid = self._intermediate(expert, xe)
            self.in_sq_norm[expert] += (xe * xe).sum(0)
            self.mid_sq_norm[expert] += (mid * mid).sum(0)
            if weight is None:
                self.hessian_mass[expert] += xe.shape[0]
            else:  # sum_t w_t x_t x_t^T as the Gram matrix of sqrt(w_t) x_t: symmetric by construction
                self.hessian_mass[expert] += weight.double().sum()
                root = weight.sqrt().unsqueeze(-1)
                xe, mid = xe * root, mid * root
            self.in_gram[expert - first].addmm_(xe.T, xe)
            self.mid_gram[expert - first].addmm_(mid.T, mid)

    def hook(self):
        def fn(_module, args, kwargs):
            names = ("hidden_states", "top_k_index", "top_k_weights")
            values = list(args) + [kwargs[n] for n in names[len(args):]]
            self.add(*values[:3])

        return fn

    def samples(self) -> torch.Tensor:
        """Tokens each expert's statistics were gathered over (all tokens for the rare ones)."""
        counts = self.tokens.clone()
        for expert in self.rare:
            counts[expert] = self.all_count
        return counts

    def hessians(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate/up input Hessian [C, H, H], down input Hessian [C, I, I]) of the chunk's experts
        (all E by default), each X^T X / n (weighted: sum_t w_t x_t x_t^T / sum_t w_t). The Gram matrices are normalised in place (a Mixtral-8x7B
        layer's are 7 GB: no second copy), so no sample may be added afterwards."""
        if not getattr(self, "_normalised", False):
            mass = self.hessian_mass[self.chunk.start:self.chunk.stop]
            # An expert whose tokens all had weight 0 keeps H == 0 (GPTQ then rounds to nearest).
            n = torch.where(mass > 0, mass, torch.ones_like(mass)).float()[:, None, None]
            self.in_gram.div_(n)
            self.mid_gram.div_(n)
            self._normalised = True
        return self.in_gram, self.mid_gram

    def add_norms_of(self, other: "ExpertInputStats") -> None:
        """Take over another chunk's per-channel norms (each chunk fills only its own experts' rows)."""
        rows = slice(other.chunk.start, other.chunk.stop)
        self.in_sq_norm[rows] = other.in_sq_norm[rows]
        self.mid_sq_norm[rows] = other.mid_sq_norm[rows]


def count_routing(view: MoEView, layer: int, runner: LayerwiseRunner) -> torch.Tensor | None:
    """Tokens routed to each expert of ``layer`` (one pass, no Gram matrices)."""
    store = view.experts(layer)
    if store is None:
        return None
    stats = ExpertInputStats(store, runner.device, with_grams=False)
    handle = store.module.register_forward_pre_hook(stats.hook(), with_kwargs=True)
    try:
        runner.run_layer(layer, update=False)
    finally:
        handle.remove()
    return stats.tokens.cpu()


class Profile:
    """Calibration statistics of a model, saved as one safetensors file (no pickle).

    Tensors are keyed by canonical names: ``layers.{l}.experts.tokens`` [E],
    ``layers.{l}.experts.routing_mass`` [E], ``layers.{l}.experts.{linear}.channel_norm`` [E, in],
    ``{unit}.channel_norm`` [in] for linear units, and ``{unit}.gptq_loss`` where quantization ran.
    ``meta`` holds JSON-able facts (model type, tokens, sequence length, source, threshold).
    """

    def __init__(self, meta: dict | None = None, tensors: dict[str, torch.Tensor] | None = None):
        self.meta = dict(meta or {})
        self.tensors = dict(tensors or {})

    @classmethod
    def start(cls, model_type: str, tokens: torch.Tensor, min_expert_tokens: int, rare_experts: str) -> "Profile":
        """An empty profile describing a calibration run on ``tokens`` [samples, seq_len]."""
        meta = {
            "model_type": model_type,
            "tokens": int(tokens.numel()),
            "samples": int(tokens.shape[0]),
            "seq_len": int(tokens.shape[1]),
            "min_expert_tokens": min_expert_tokens,
            "rare_experts": rare_experts,
        }
        return cls(meta)

    def record_linear(self, unit: LinearUnit, stats: LinearInputStats) -> None:
        self.tensors[f"{unit.name}.channel_norm"] = stats.sq_norm.sqrt().cpu()

    def record_experts(self, layer: int, stats: ExpertInputStats) -> None:
        prefix = f"layers.{layer}.experts"
        self.tensors[f"{prefix}.tokens"] = stats.tokens.cpu()
        self.tensors[f"{prefix}.routing_mass"] = stats.routing_mass.float().cpu()
        self.tensors[f"{prefix}.calibration_samples"] = stats.samples().cpu()
        for linear in ("gate_proj", "up_proj"):
            self.tensors[f"{prefix}.{linear}.channel_norm"] = stats.in_sq_norm.sqrt().cpu()
        self.tensors[f"{prefix}.down_proj.channel_norm"] = stats.mid_sq_norm.sqrt().cpu()

    def moe_layers(self) -> list[int]:
        return sorted(int(k.split(".")[1]) for k in self.tensors if k.endswith(".experts.tokens"))

    def tokens_per_expert(self, layer: int) -> torch.Tensor:
        return self.tensors[f"layers.{layer}.experts.tokens"]

    def routing_mass(self, layer: int) -> torch.Tensor:
        return self.tensors[f"layers.{layer}.experts.routing_mass"]

    def coverage_table(self) -> str:
        """Per MoE layer: experts below the token threshold, as a plain-text table."""
        threshold = self.meta.get("min_expert_tokens", 0)
        rows = [f"{'layer':>5}  {'experts':>7}  {'min tokens':>10}  {'max tokens':>10}  below {threshold} tokens"]
        for layer in self.moe_layers():
            tokens = self.tokens_per_expert(layer)
            below = [str(e) for e in (tokens < threshold).nonzero().flatten().tolist()]
            rows.append(
                f"{layer:>5}  {len(tokens):>7}  {int(tokens.min()):>10}  {int(tokens.max()):>10}  "
                + (", ".join(below) if below else "-")
            )
        return "\n".join(rows)

    def save(self, path: str) -> None:
        import json
        import os

        tmp = f"{path}.tmp"
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, tmp, metadata={"moepress_profile": json.dumps(self.meta)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "Profile":
        import json

        from safetensors import safe_open

        try:
            with safe_open(path, "pt") as f:
                meta = json.loads((f.metadata() or {}).get("moepress_profile", "{}"))
            tensors = load_file(path)
        except FileNotFoundError:
            raise MoepressError(f"profile not found: {path}") from None
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise MoepressError(f"cannot read profile {path}: {exc}; recompute it") from None
        return cls(meta, tensors)


def calibrate(
    model,
    tokens: torch.Tensor,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 8,
    min_expert_tokens: int = 16,
    rare_experts: str = "all_tokens",
    progress: bool = True,
    trust_remote_code: bool = False,
) -> Profile:
    """Calibration statistics of an uncompressed model, layer by layer, as a :class:`Profile`.

    ``model`` is a model in memory, or a folder / hub id whose layers are then read from the shards
    one at a time (memory: one decoder layer, not the model)."""
    from .pipeline.source import open_source

    source = open_source(model, trust_remote_code=trust_remote_code)
    view = MoEView(source.model)
    loop = LayerLoop(source, tokens, device=device, batch_size=batch_size, keep_layers=False, progress=progress,
                     desc="calibrate")
    started = time.time()

    def step(layer: int, runner: LayerwiseRunner):
        stats, handles = collect_layer_stats(view, layer, runner, min_expert_tokens, rare_experts)
        try:
            runner.run_layer(layer, update=True)
        finally:
            for h in handles:
                h.remove()
        part = Profile()
        for unit, s in stats["linear"].items():
            part.record_linear(unit, s)
        if stats["experts"] is not None:
            part.record_experts(layer, stats["experts"])
        return {}, part.tensors

    profile = Profile.start(view.model_type, tokens, min_expert_tokens, rare_experts)
    for _record, tensors in loop.run(step):
        profile.tensors.update(tensors)
    profile.meta["seconds"] = round(time.time() - started, 3)
    return profile


def collect_layer_stats(view, layer, runner, min_expert_tokens, rare_experts, units=None, experts=True,
                        experts_chunk: range | None = None, token_weighting: str = "plain"):
    """Attach statistics hooks to ``layer``'s linear ``units`` (default: all) and its experts.

    Returns the stats objects and hook handles; the caller runs the layer, then removes the handles.
    The rare-expert set is decided from one cheap routing pass before the Gram matrices are formed.
    """
    if rare_experts not in ("all_tokens", "routed_only"):
        raise MoepressError(f"rare_experts must be 'all_tokens' or 'routed_only' (got {rare_experts!r})")
    units = view.linear_units(layer) if units is None else units
    linear_stats, handles = {}, []
    for unit in units:
        s = LinearInputStats(unit.in_features, runner.device)
        handles.append(view.model.get_submodule(unit.module_path).register_forward_pre_hook(s.hook()))
        linear_stats[unit] = s
    expert_stats = None
    store = view.experts(layer) if experts else None
    if store is not None:
        rare: set[int] = set()
        if rare_experts == "all_tokens" and min_expert_tokens > 0:
            counts = count_routing(view, layer, runner)
            rare = set((counts < min_expert_tokens).nonzero().flatten().tolist())
        expert_stats = ExpertInputStats(store, runner.device, rare=rare, chunk=experts_chunk,
                                        token_weighting=token_weighting)
        handles.append(store.module.register_forward_pre_hook(expert_stats.hook(), with_kwargs=True))
    return {"linear": linear_stats, "experts": expert_stats}, handles


__all__ = [
    "EXPERT_LINEARS",
    "ExpertInputStats",
    "LayerwiseRunner",
    "LinearInputStats",
    "Profile",
    "TOKEN_WEIGHTINGS",
    "calibrate",
    "collect_layer_stats",
    "count_routing",
]

"""Online dynamic pruning (MC-MoE's ODP): at inference, tokens judged unimportant skip their
secondary experts whose routing weight is small next to their top expert's.

For every token of every MoE layer with routing weights w_1 >= ... >= w_k over its chosen experts,
expert j > 1 is skipped when w_j < ``threshold`` x w_1, unless the token is judged important. The
remaining weights are renormalised to the sum the router gave them when the router normalises its
top-k weights (Mixtral, Qwen with ``norm_topk_prob``); otherwise they are kept as they are, so the
skipped experts' contributions are simply missing. ``threshold`` 0 skips nothing: the model is
exactly the unpruned one.

Importance must be causal: MC-MoE ranks tokens by the attention they receive, which at decode time
does not exist yet for the token being generated (and SDPA does not expose attention weights). The
proxy here is the norm of the token's hidden state entering the decoder layer: the tokens that
draw the most attention (the first token, delimiters: "attention sinks") are the ones with massive
residual-stream activations. In a forward call of T tokens the ``keep_important`` share of them
(rounded) with the largest norms keep all their experts; a single decoded token is kept whole when
its norm reaches the smallest norm kept in that layer's last multi-token call (the prompt).

The skipped slots get routing weight 0. moepress's packed experts do not compute zero-weight slots,
so a packed model really skips those experts' compute; transformers' own expert modules still
compute them (no speed-up there, the quality effect is the same).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import MoepressError
from ..model.view import MoEView


@dataclass(frozen=True)
class DynamicPruning:
    """ODP's two knobs: ``threshold`` in [0, 1] (a secondary expert is skipped below threshold x the
    top weight) and ``keep_important`` in [0, 1] (the share of tokens that keep all experts)."""

    threshold: float
    keep_important: float = 0.0

    def __post_init__(self):
        for name in ("threshold", "keep_important"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise MoepressError(f"dynamic pruning: {name} must be a number in [0, 1] (got {value!r})")
            object.__setattr__(self, name, float(value))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def parse(cls, value) -> "DynamicPruning | None":
        """A ``DynamicPruning``, a dict of its fields, ``"0.3"`` or ``"0.3,0.1"`` (threshold,
        keep_important), or None."""
        if value is None or isinstance(value, DynamicPruning):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"threshold", "keep_important"})
            if unknown:
                raise MoepressError(f"dynamic pruning: unknown field(s) {unknown}")
            return cls(**value)
        try:
            parts = [float(p) for p in str(value).split(",")]
        except ValueError:
            parts = []
        if len(parts) not in (1, 2):
            raise MoepressError(f"dynamic pruning takes THRESHOLD or THRESHOLD,KEEP_IMPORTANT, e.g. 0.3,0.1 "
                                f"(got {value!r})")
        return cls(*parts)


class _LayerPruner:
    """The hooks of one MoE layer: the decoder layer's input norms, then the router's output."""

    def __init__(self, settings: DynamicPruning):
        self.settings = settings
        self.norms: torch.Tensor | None = None
        self.cutoff: float | None = None  # smallest norm kept in the last multi-token call
        self.slots = 0  # secondary expert slots seen, and skipped
        self.skipped = 0
        self.tokens = 0
        self.chosen = 0  # expert slots routed, before pruning

    def layer_input(self, _module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.norms = hidden.detach().float().reshape(-1, hidden.shape[-1]).norm(dim=-1)

    def router_output(self, _module, _args, output):
        logits, weights, index = output[0], output[1], output[2]
        if weights.shape != index.shape or weights.shape[-1] < 2:
            return None  # dense scores, or one expert per token: nothing to skip
        w = weights.reshape(-1, weights.shape[-1])
        self.tokens += w.shape[0]
        self.chosen += w.numel()
        keep = self._important(w.shape[0], w.device)
        top = w.max(dim=-1, keepdim=True).values
        skip = (w < self.settings.threshold * top) & ~keep[:, None]
        skip &= w < top  # the top expert itself always stays
        self.slots += w.shape[0] * (w.shape[1] - 1)
        self.skipped += int(skip.sum())
        if not bool(skip.any()):
            return None
        total = w.sum(dim=-1, keepdim=True)
        pruned = w.masked_fill(skip, 0)
        normalised = bool(torch.allclose(total, torch.ones_like(total), atol=1e-3))
        if normalised:  # the router normalises its top-k weights: so do the ones left
            pruned = pruned / pruned.sum(dim=-1, keepdim=True) * total
        return (logits, pruned.reshape(weights.shape).to(weights.dtype), index, *output[3:])

    def _important(self, tokens: int, device) -> torch.Tensor:
        keep = torch.zeros(tokens, dtype=torch.bool, device=device)
        share = self.settings.keep_important
        norms = self.norms
        if share <= 0 or norms is None or norms.numel() != tokens:
            return keep
        if tokens > 1:
            count = round(share * tokens)
            if count:
                chosen = torch.topk(norms, count).indices
                keep[chosen.to(device)] = True
                self.cutoff = float(norms[chosen].min())
        elif self.cutoff is not None:
            keep[0] = bool(norms[0] >= self.cutoff)
        return keep


def install_dynamic_pruning(model: nn.Module, settings) -> list:
    """Hook ODP into every MoE layer of ``model`` (replacing any earlier installation); ``settings``
    is a :class:`DynamicPruning` or what :meth:`DynamicPruning.parse` reads, None removes it.
    Returns the layers' pruners (their ``skipped``/``slots`` counters measure the saving)."""
    remove_dynamic_pruning(model)
    settings = DynamicPruning.parse(settings)
    if settings is None:
        return []
    view = MoEView(model)
    pruners, handles = [], []
    for layer in range(view.num_layers):
        router = view.router(layer) if view.experts(layer) is not None else None
        if router is None:
            continue
        pruner = _LayerPruner(settings)
        handles.append(view.layers[layer].register_forward_pre_hook(pruner.layer_input, with_kwargs=True))
        handles.append(router.register_forward_hook(pruner.router_output))
        pruners.append(pruner)
    model._moepress_dynamic_pruning = (settings, pruners, handles)
    return pruners


def remove_dynamic_pruning(model: nn.Module) -> None:
    installed = getattr(model, "_moepress_dynamic_pruning", None)
    if installed is not None:
        for handle in installed[2]:
            handle.remove()
        del model._moepress_dynamic_pruning


def dynamic_pruning_stats(model: nn.Module) -> dict:
    """What ODP skipped since it was installed: expert slots routed, skipped, and the share of routed
    expert computations left (the activated expert parameters per token, relative to none skipped)."""
    installed = getattr(model, "_moepress_dynamic_pruning", None)
    if installed is None:
        return {"installed": False}
    settings, pruners, _ = installed
    chosen = sum(p.chosen for p in pruners)
    skipped = sum(p.skipped for p in pruners)
    return {"installed": True, **settings.to_dict(), "expert_slots": chosen, "skipped": skipped,
            "expert_compute_left": 1.0 - skipped / chosen if chosen else 1.0}

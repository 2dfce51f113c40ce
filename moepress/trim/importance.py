"""How much each routed expert of a layer matters, measured on calibration tokens: the scores an
expert drop ranks by.

With T calibration tokens, router logits z_t, the experts chosen for token t (its top-k set K_t)
and their routing weights g_e(t) (what the layer multiplies expert outputs by), and E_e(x) the
output of expert e:

* ``frequency`` (MC-MoE's activation frequency): f_e = |{t : e in K_t}| / T.
* ``mass`` (MC-MoE's frequency x routing weight): m_e = sum_{t : e in K_t} g_e(t) / T.
* ``router`` (He et al.'s expert drop, as their released code computes it for Mixtral): the mean
  over all tokens of the router's probability over *all* experts, p_e = sum_t softmax(z_t)_e / T,
  chosen or not. For a sigmoid router (DeepSeek-V3) their code sums the chosen weights instead,
  which is ``mass``; moepress does the same there.
* ``reap`` (REAP, arXiv 2510.13999; llm-compressor's ``REAPPruningModifier``): the mean over the
  tokens routed to e of g_e(t) ||E_e(x_t)||_2. An expert that is chosen often but adds little to
  the output scores low.

Lower is less important. The scores are collected with one hook on the router (its input, and its
output: logits, routing weights, chosen experts), so they work for every supported architecture
and both expert layouts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import MoepressError
from ..model.view import ExpertStore

CRITERIA = ("frequency", "mass", "router", "reap")  # scores from one pass (ExpertImportance)
DROP_CRITERIA = CRITERIA + ("kl",)  # and the measured one (moepress.trim.kl_drop)


class ExpertImportance:
    """Accumulates every criterion's per-expert sums over calibration batches of one MoE layer."""

    def __init__(self, store: ExpertStore, sigmoid_router: bool = False):
        self.store = store
        self.sigmoid_router = sigmoid_router
        E = store.num_experts
        self.tokens = 0
        self.chosen = torch.zeros(E, dtype=torch.float64)
        self.mass = torch.zeros(E, dtype=torch.float64)
        self.probability = torch.zeros(E, dtype=torch.float64)
        self.reap = torch.zeros(E, dtype=torch.float64)
        # the experts' weights in float32, once: REAP runs every expert on its routed tokens
        self._weights = {linear: store.weight(linear).detach().float() for linear in ("gate_proj", "up_proj",
                                                                                   "down_proj")}

    def hook(self, _module, args, output) -> None:
        """A forward hook for the layer's router: its input hidden states and (logits, routing
        weights, chosen experts)."""
        hidden = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        logits, weights, index = (t.detach() for t in output[:3])
        self.add(hidden, logits.reshape(hidden.shape[0], -1).float(), weights.reshape(hidden.shape[0], -1).float(),
                 index.reshape(hidden.shape[0], -1))

    def add(self, hidden: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> None:
        """One batch: hidden [T, H], logits [T, E], routing weights and chosen experts [T, k]."""
        E = self.store.num_experts
        self.tokens += hidden.shape[0]
        if weights.shape != index.shape:  # a router that returns dense scores [T, E]
            weights = weights.gather(1, index)
        self.chosen += torch.bincount(index.reshape(-1), minlength=E).double().cpu()
        self.mass += torch.zeros(E, dtype=torch.float64).index_add_(0, index.reshape(-1).cpu(),
                                                                    weights.reshape(-1).double().cpu())
        if not self.sigmoid_router:
            self.probability += F.softmax(logits, dim=-1).double().sum(0).cpu()
        act = self.store.act_fn
        w = self._weights
        for e in torch.unique(index).tolist():
            token, slot = torch.where(index == e)
            x = hidden[token]
            out = F.linear(act(F.linear(x, w["gate_proj"][e])) * F.linear(x, w["up_proj"][e]), w["down_proj"][e])
            self.reap[e] += float((weights[token, slot] * out.norm(dim=-1)).double().sum())

    def scores(self, criterion: str) -> torch.Tensor:
        """[E] scores of ``criterion`` (see the module docstring); higher matters more."""
        if criterion not in CRITERIA:
            raise MoepressError(f"unknown expert-drop criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
        if self.tokens == 0:
            raise MoepressError(f"layers.{self.store.layer}: no calibration token reached the router")
        if criterion == "frequency":
            return self.chosen / self.tokens
        if criterion == "mass" or (criterion == "router" and self.sigmoid_router):
            return self.mass / self.tokens
        if criterion == "router":
            return self.probability / self.tokens
        return self.reap / self.chosen.clamp(min=1)  # mean over routed tokens; never routed: 0

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every criterion's scores, for the profile (``{prefix}.importance.{criterion}``)."""
        return {f"{prefix}.importance.{c}": self.scores(c).float() for c in CRITERIA}


def least_important(scores: torch.Tensor, drop: int, groups: int | None = None) -> list[int]:
    """The ``drop`` experts with the lowest scores (ties: the higher index), or with group-limited
    routing over ``groups`` equal consecutive groups, the lowest ``drop / groups`` of each group,
    so that every group keeps as many experts (as the router's grouping needs)."""
    E = scores.shape[0]
    if groups:
        if drop % groups:
            raise MoepressError(f"dropping {drop} experts does not split evenly over the router's {groups} groups; "
                                f"drop a multiple of {groups}")
        size, per = E // groups, drop // groups
        return sorted(g * size + int(i) for g in range(groups)
                      for i in _lowest(scores[g * size:(g + 1) * size], per))
    return sorted(int(i) for i in _lowest(scores, drop))


def _lowest(scores: torch.Tensor, n: int) -> list[int]:
    # a stable order: by score, then by index descending, so ties drop the later expert
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), -i))
    return order[:n]


def expert_scores(model, tokens: torch.Tensor, criterion: str = "reap", batch_size: int = 8) -> dict[int, torch.Tensor]:
    """Every MoE layer's expert importance (``criterion``, moepress.trim.importance) on ``tokens``,
    from one forward pass of ``model`` as it is."""
    from ..model.view import MoEView

    view = MoEView(model)
    found, handles = {}, []
    for layer in range(view.num_layers):
        store = view.experts(layer)
        if store is None:
            continue
        router = view.router(layer)
        found[layer] = ExpertImportance(store, sigmoid_router=getattr(router, "e_score_correction_bias", None) is not None)
        handles.append(router.register_forward_hook(found[layer].hook))
    try:
        with torch.no_grad():
            for i in range(0, len(tokens), batch_size):
                model(input_ids=tokens[i:i + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {layer: imp.scores(criterion) for layer, imp in found.items()}

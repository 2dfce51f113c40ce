"""A trimming decided up front: which structure of an MoE model goes, as data.

:class:`Trimming` says which routed experts each MoE layer loses, which layers route each token to
fewer experts, which decoder layers (blocks) and which MoE sublayers are dropped. A plan carries one
(its ``trim:`` section, :mod:`moepress.allocate.plan`) and ``compress --plan`` applies it in the
compression pass; ``--top-k``, ``--drop-blocks`` and ``--drop-moe-layers`` become one too, once their
choice is made. Expert indices are always those of the original model: :func:`~.expert_drop.drop_experts`
renumbers the kept experts 0..n-1, and :meth:`Trimming.kept_experts` gives the original index of
every new one.

It also answers, from the cost table alone, what the trimmed model will be: which rows it no longer
holds (:meth:`Trimming.removes`) and how many parameters a token passes through
(:meth:`Trimming.active_params`, what :func:`moepress.evaluate.active_params` measures on the
compressed model).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from fractions import Fraction

from ..errors import MoepressError

ENTRIES = ("dropped_blocks", "dropped_moe_layers", "top_k", "dropped_experts")


@dataclass(frozen=True)
class Trimming:
    """What a trim removes. Layers and experts are original indices; lists are kept sorted."""

    dropped_experts: dict[int, tuple[int, ...]] = field(default_factory=dict)  # layer -> experts removed
    top_k: dict[int, int] = field(default_factory=dict)  # layer -> the reduced top-k
    dropped_blocks: tuple[int, ...] = ()  # whole decoder layers
    dropped_moe_layers: tuple[int, ...] = ()  # MoE sublayers (router, routed and shared experts); attention kept

    def __post_init__(self):
        # One canonical form, so equal trims compare (and hash into resume settings) equal.
        set_ = object.__setattr__
        set_(self, "dropped_experts", {int(layer): tuple(sorted(int(e) for e in experts))
                                       for layer, experts in sorted(self.dropped_experts.items()) if experts})
        set_(self, "top_k", {int(layer): int(k) for layer, k in sorted(self.top_k.items())})
        set_(self, "dropped_blocks", tuple(sorted(int(b) for b in self.dropped_blocks)))
        set_(self, "dropped_moe_layers", tuple(sorted(int(m) for m in self.dropped_moe_layers)))

    @property
    def empty(self) -> bool:
        return not (self.dropped_experts or self.top_k or self.dropped_blocks or self.dropped_moe_layers)

    # ------------------------------------------------------------- the cost table's view
    def removal(self, row) -> str | None:
        """What removes a cost-table row's linear (``moepress.costs.Row``), in words, or None when it stays."""
        if row.layer in self.dropped_blocks:
            return f"drops block layers.{row.layer}"
        if row.layer in self.dropped_moe_layers and row.kind in ("expert", "shared"):
            return f"drops the MoE sublayer of layers.{row.layer}"
        if row.kind == "expert" and row.expert in self.dropped_experts.get(row.layer, ()):
            return f"drops layers.{row.layer}.experts.{row.expert}"
        return None

    def removes(self, row) -> bool:
        """Whether the trimmed model no longer holds ``row``'s linear."""
        return self.removal(row) is not None

    def kept_experts(self, layer: int, num_experts: int) -> list[int]:
        """The original indices of the experts layer ``layer`` keeps, in order: the new expert j is
        the original ``kept_experts(...)[j]``."""
        dropped = set(self.dropped_experts.get(layer, ()))
        return [e for e in range(num_experts) if e not in dropped]

    def active_params(self, rows, treatments: dict | None, base_top_k: dict | int) -> int:
        """Linear parameters one token passes through in the trimmed model, from the cost table's
        ``rows`` (the original model's): attention, shared experts and dense MLPs whole; in an MoE
        layer, its top-k (reduced or ``base_top_k``, the original's) over its experts left, times its
        experts' weights; a pruned linear counts the weights it keeps (``treatments``: row name ->
        Treatment; a row without one counts whole); removed rows count nothing. The same count
        :func:`moepress.evaluate.active_params` measures on the compressed model."""
        treatments = treatments or {}
        experts: dict[int, set[int]] = {}
        for row in rows:
            if row.kind == "expert":
                experts.setdefault(row.layer, set()).add(row.expert)
        shares: dict[int, Fraction] = {}
        for layer, present in experts.items():
            left = len(present - set(self.dropped_experts.get(layer, ())))
            shares[layer] = Fraction(self.top_k.get(layer, _base_top_k(base_top_k, layer)), max(left, 1))
        active = Fraction(0)
        for row in rows:
            if self.removes(row):
                continue
            kept = kept_weights(treatments.get(row.name), row.out_features, row.in_features)
            active += kept * shares[row.layer] if row.kind == "expert" else kept
        return round(active)

    # ------------------------------------------------------------- the model's view
    def check(self, model) -> None:
        """One line naming ``layers.L`` when ``model`` cannot be trimmed so; checked before any work,
        with the checks the surgery itself makes (nothing changes)."""
        from ..model.view import MoEView
        from .expert_drop import check_drop
        from .layer_drop import _check_layer, check_block_drop, check_moe_drop
        from .top_k import check_top_k

        view = MoEView(model)
        for layer in sorted({*self.dropped_blocks, *self.dropped_moe_layers, *self.top_k, *self.dropped_experts}):
            _check_layer(view, layer)  # "layers.7: no such layer; ..." before what a layer 7 would need
        for layer in self.dropped_blocks:
            check_block_drop(view, layer)
            also = [what for what, layers in (("drops its MoE sublayer", self.dropped_moe_layers),
                                              ("reduces its top-k", self.top_k),
                                              ("drops some of its experts", self.dropped_experts)) if layer in layers]
            if also:
                raise MoepressError(f"layers.{layer}: the trim drops the whole block and also {also[0]}; "
                                    "remove one of them")
        for layer in self.dropped_moe_layers:
            check_moe_drop(view, layer)
            also = [what for what, layers in (("reduces its top-k", self.top_k),
                                              ("drops some of its experts", self.dropped_experts)) if layer in layers]
            if also:
                raise MoepressError(f"layers.{layer}: the trim drops the MoE sublayer and also {also[0]}; "
                                    "remove one of them")
        for layer, top_k in self.top_k.items():
            check_top_k(model, layer, top_k)
        for layer, dropped in self.dropped_experts.items():
            store = view.experts(layer) if 0 <= layer < view.num_layers else None
            num_experts = 0 if store is None else store.num_experts
            unknown = [e for e in dropped if not 0 <= e < num_experts]
            if store is not None and unknown:
                raise MoepressError(f"layers.{layer}: unknown experts {unknown}; the layer has experts "
                                    f"0..{num_experts - 1}")
            # (no such layer, not an MoE layer, too few left, unequal router groups: the surgery's own words)
            check_drop(model, layer, self.kept_experts(layer, num_experts), top_k=self.top_k.get(layer))

    # ------------------------------------------------------------- files
    def to_dict(self) -> dict:
        """Plain data for a plan file; empty entries are left out."""
        data = {
            "dropped_blocks": list(self.dropped_blocks),
            "dropped_moe_layers": list(self.dropped_moe_layers),
            "top_k": dict(self.top_k),
            "dropped_experts": {layer: list(experts) for layer, experts in self.dropped_experts.items()},
        }
        return {k: v for k, v in data.items() if v}

    @classmethod
    def from_dict(cls, data, where: str = "plan") -> Trimming:
        """Inverse of :meth:`to_dict` (layer keys may be strings, as JSON writes them); one-line errors
        name ``where`` and the entry."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise MoepressError(f"{where}: trim must be a mapping of {', '.join(ENTRIES)} (got {data!r})")
        unknown = [k for k in data if k not in ENTRIES]
        if unknown:
            raise MoepressError(f"{where}: trim.{unknown[0]} is not a trim entry; use {', '.join(ENTRIES)}")

        def layer_list(entry: str) -> tuple[int, ...]:
            value = data.get(entry) or []
            if not isinstance(value, list):
                raise MoepressError(f"{where}: trim.{entry} must be a list of layer indices (got {value!r})")
            return _indices(value, f"{where}: trim.{entry}", "layer")

        def layer_map(entry: str) -> dict:
            value = data.get(entry) or {}
            if not isinstance(value, dict):
                raise MoepressError(f"{where}: trim.{entry} must be a mapping of layer index to "
                                    f"{'top-k' if entry == 'top_k' else 'a list of expert indices'} (got {value!r})")
            return {_index(layer, f"{where}: trim.{entry}.{layer}", "a layer index"): v for layer, v in value.items()}

        top_k = {}
        for layer, k in layer_map("top_k").items():
            top_k[layer] = _index(k, f"{where}: trim.top_k.{layer}", "a whole number of experts")
        dropped_experts = {}
        for layer, experts in layer_map("dropped_experts").items():
            if not isinstance(experts, list):
                raise MoepressError(f"{where}: trim.dropped_experts.{layer} must be a list of expert indices "
                                    f"(got {experts!r})")
            dropped_experts[layer] = _indices(experts, f"{where}: trim.dropped_experts.{layer}", "expert")
        return cls(dropped_experts=dropped_experts, top_k=top_k, dropped_blocks=layer_list("dropped_blocks"),
                   dropped_moe_layers=layer_list("dropped_moe_layers"))


def kept_weights(treatment, out_features: int, in_features: int) -> int:
    """Weights a linear [out, in] keeps under ``treatment`` (all of them when it prunes nothing, or None)."""
    if treatment is None:
        return out_features * in_features
    if treatment.kind == "split":
        return sum(kept_weights(piece, o, i) for piece, (o, i) in
                   zip(treatment.pieces, treatment.piece_shapes(out_features, in_features)))
    return treatment.kept_per_row(in_features) * out_features


def _base_top_k(base_top_k, layer: int) -> int:
    if not isinstance(base_top_k, dict):
        return int(base_top_k)
    for key in (layer, str(layer)):
        if key in base_top_k:
            return int(base_top_k[key])
    raise MoepressError(f"layers.{layer}: active parameters need the original top-k of this MoE layer; "
                        "give it in base_top_k")


def _index(value, where: str, what: str) -> int:
    """A whole number >= 0 (an int, or its digits as a string: JSON's mapping keys)."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    try:
        if isinstance(value, bool):
            raise TypeError
        index = operator.index(value)
    except TypeError:
        raise MoepressError(f"{where} must be {what} (got {value!r})") from None
    if index < 0:
        raise MoepressError(f"{where} must be {what} (got {value!r})")
    return index


def _indices(values: list, where: str, what: str) -> tuple[int, ...]:
    indices = [_index(v, where, f"a list of {what} indices") for v in values]
    twice = sorted({i for i in indices if indices.count(i) > 1})
    if twice:
        raise MoepressError(f"{where} lists {what} {twice[0]} more than once")
    return tuple(indices)


__all__ = ["Trimming", "kept_weights"]

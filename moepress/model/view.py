"""A storage-independent view of a Hugging Face MoE model.

The view turns a model into *units* with canonical names that do not depend on how the checkpoint
stores them:

- ``layers.{l}.attn.{proj}``: an attention projection (``q_proj``, ``kv_a_proj_with_mqa``, ...);
- ``layers.{l}.experts.{e}.{gate_proj|up_proj|down_proj}``: one linear of one routed expert;
- ``layers.{l}.shared.{gate_proj|up_proj|down_proj}``: a shared expert's linear;
- ``layers.{l}.mlp.{gate_proj|up_proj|down_proj}``: a dense layer's MLP linear.

Routed experts come in two layouts. transformers 5.x fuses them into 3-D parameters
(``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj`` [E, H, I]); older and custom code
keeps one ``nn.Linear`` per expert. :class:`ExpertStore` hides the difference: it hands out
[E, out, in] weights for either layout and installs packed weights back in the matching way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MoepressError
from .registry import ArchSpec, arch_spec

EXPERT_LINEARS = ("gate_proj", "up_proj", "down_proj")


def get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    """``root.get_submodule(path)`` that returns None instead of raising when a part is absent."""
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and name.isdigit():
        parent[int(name)] = module
    else:
        setattr(parent, name, module)


@dataclass(frozen=True)
class LinearUnit:
    """One ``nn.Linear`` (or its packed replacement) that is compressed as a whole."""

    name: str  # canonical, e.g. layers.3.attn.q_proj
    kind: str  # "attn" | "shared" | "dense_mlp"
    layer: int
    module_path: str  # where it lives in the model, e.g. model.layers.3.self_attn.q_proj
    in_features: int
    out_features: int


class ExpertStore:
    """The routed experts of one MoE layer, in either storage layout.

    ``weight(linear)`` returns [E, out, in] for ``gate_proj`` / ``up_proj`` ([E, I, H]) and
    ``down_proj`` ([E, H, I]). Packed replacements are installed by ``moepress.runtime.install``
    (this module knows nothing of them but two class flags: ``holds_packed_experts`` on a layer's
    packed experts, ``replaces_linear`` on a packed stand-in for ``nn.Linear``).
    """

    def __init__(self, model: nn.Module, layer: int, module_path: str, spec: ArchSpec):
        self.model = model
        self.layer = layer
        self.module_path = module_path
        self.spec = spec
        module = model.get_submodule(module_path)
        if getattr(module, "holds_packed_experts", False):  # already packed by moepress (runtime/)
            self.layout = "packed"
            self.num_experts = module.num_experts
            self.hidden_size = module.hidden_size
            self.intermediate_size = module.intermediate_size
        elif isinstance(module, nn.ModuleList):
            self.layout = "per_expert"
            first = module[0]
            gate = getattr(first, spec.per_expert_linears[0])
            self.num_experts = len(module)
            self.hidden_size = gate.in_features
            self.intermediate_size = gate.out_features
        elif hasattr(module, "gate_up_proj") and hasattr(module, "down_proj"):
            self.layout = "fused"
            gate_up = module.gate_up_proj
            self.num_experts = gate_up.shape[0]
            self.intermediate_size = gate_up.shape[1] // 2
            self.hidden_size = gate_up.shape[2]
        else:
            raise MoepressError(
                f"layers.{layer}: experts at {module_path} are neither fused 3-D tensors nor a list of "
                "per-expert linears; add the layout to moepress/model/view.py"
            )

    @property
    def module(self) -> nn.Module:
        return self.model.get_submodule(self.module_path)

    @property
    def act_fn(self):
        module = self.module
        if self.layout == "per_expert":
            return module[0].act_fn
        return module.act_fn

    def unit_name(self, expert: int, linear: str) -> str:
        return f"layers.{self.layer}.experts.{expert}.{linear}"

    def unit_names(self) -> list[str]:
        return [self.unit_name(e, lin) for e in range(self.num_experts) for lin in EXPERT_LINEARS]

    def shape(self, linear: str) -> tuple[int, int]:
        """(out_features, in_features) of one expert's ``linear``."""
        if linear == "down_proj":
            return self.hidden_size, self.intermediate_size
        return self.intermediate_size, self.hidden_size

    def per_expert_linear_path(self, expert: int, linear: str) -> str:
        stored = self.spec.per_expert_linears[EXPERT_LINEARS.index(linear)]
        return f"{self.module_path}.{expert}.{stored}"

    def weight(self, linear: str) -> torch.Tensor:
        """The float weights of ``linear`` for all experts, [E, out, in] (a view where possible)."""
        module = self.module
        if self.layout == "fused":
            inter = self.intermediate_size
            if linear == "gate_proj":
                return module.gate_up_proj[:, :inter]
            if linear == "up_proj":
                return module.gate_up_proj[:, inter:]
            return module.down_proj
        if self.layout == "per_expert":
            stored = self.spec.per_expert_linears[EXPERT_LINEARS.index(linear)]
            return torch.stack([getattr(expert, stored).weight for expert in module])
        return torch.stack([module.packed_weight(e, linear).dequantize() for e in range(self.num_experts)])


class MoEView:
    """The units of a supported MoE model, addressed by canonical names."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.model_type = getattr(model.config, "model_type", type(model).__name__)
        self.spec = arch_spec(self.model_type)
        layers = get_submodule(model, self.spec.layers)
        if layers is None:
            raise MoepressError(
                f"{self.model_type}: no decoder layers at '{self.spec.layers}'; is this a causal LM "
                "(AutoModelForCausalLM)?"
            )
        self.layers: nn.ModuleList = layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_path(self, layer: int) -> str:
        return f"{self.spec.layers}.{layer}"

    def _block_path(self, layer: int) -> str:
        return f"{self.layer_path(layer)}.{self.spec.moe_block}"

    def is_moe_layer(self, layer: int) -> bool:
        return get_submodule(self.model, f"{self._block_path(layer)}.{self.spec.experts}") is not None

    def experts(self, layer: int) -> ExpertStore | None:
        if not self.is_moe_layer(layer):
            return None
        return ExpertStore(self.model, layer, f"{self._block_path(layer)}.{self.spec.experts}", self.spec)

    def moe_block(self, layer: int) -> nn.Module | None:
        """The module holding layer ``layer``'s router and experts (or its dense MLP)."""
        return get_submodule(self.model, self._block_path(layer))

    def router(self, layer: int) -> nn.Module | None:
        return get_submodule(self.model, f"{self._block_path(layer)}.{self.spec.router}")

    def _linear_units(self, layer: int, kind: str, prefix: str, module_base: str, names) -> list[LinearUnit]:
        units = []
        for name in names:
            module = get_submodule(self.model, f"{module_base}.{name}")
            if isinstance(module, nn.Linear) or getattr(module, "replaces_linear", False):
                units.append(
                    LinearUnit(
                        name=f"layers.{layer}.{prefix}.{name}",
                        kind=kind,
                        layer=layer,
                        module_path=f"{module_base}.{name}",
                        in_features=module.in_features,
                        out_features=module.out_features,
                    )
                )
        return units

    def attention_units(self, layer: int) -> list[LinearUnit]:
        base = f"{self.layer_path(layer)}.{self.spec.attention}"
        return self._linear_units(layer, "attn", "attn", base, self.spec.attention_linears)

    def mlp_units(self, layer: int) -> list[LinearUnit]:
        """Shared-expert linears of an MoE layer, or the MLP linears of a dense layer."""
        if self.is_moe_layer(layer):
            if self.spec.shared_expert is None:
                return []
            base = f"{self._block_path(layer)}.{self.spec.shared_expert}"
            return self._linear_units(layer, "shared", "shared", base, self.spec.mlp_linears)
        return self._linear_units(layer, "dense_mlp", "mlp", self._block_path(layer), self.spec.mlp_linears)

    def linear_units(self, layer: int) -> list[LinearUnit]:
        return self.attention_units(layer) + self.mlp_units(layer)

    def unit_shapes(self) -> dict[str, tuple[int, int]]:
        """Every compressible unit's canonical name and (out_features, in_features), in model order."""
        shapes: dict[str, tuple[int, int]] = {}
        for layer in range(self.num_layers):
            for unit in self.attention_units(layer):
                shapes[unit.name] = (unit.out_features, unit.in_features)
            store = self.experts(layer)
            if store is not None:
                for e in range(store.num_experts):
                    for linear in EXPERT_LINEARS:
                        shapes[store.unit_name(e, linear)] = store.shape(linear)
            for unit in self.mlp_units(layer):
                shapes[unit.name] = (unit.out_features, unit.in_features)
        return shapes

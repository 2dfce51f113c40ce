"""Where each supported architecture keeps its parts.

This is the only module in moepress that knows architecture names. Every other module speaks of
layers, attention projections, routers, routed experts, shared experts and dense MLPs, reached
through :class:`~moepress.model.view.MoEView`.

Adding an architecture is adding one :class:`ArchSpec` to ``ARCHITECTURES`` (keyed by the
``model_type`` of its transformers config) and a tiny config to ``moepress.model.tiny``; the
end-to-end test then covers it. Attribute names absent from a given layer are simply skipped, so
one entry covers variants (DeepSeek-V2 with or without ``q_lora_rank``, dense first layers).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MoepressError

STANDARD_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
# DeepSeek's multi-head latent attention: low-rank q (q_a -> norm -> q_b, or a plain q_proj when
# q_lora_rank is None) and a joint low-rank kv (kv_a_proj_with_mqa -> norm -> kv_b_proj). Each
# linear is its own unit; the norms between them stay in 16 bits.
LATENT_ATTENTION = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ArchSpec:
    """Attribute paths of one architecture, relative to its decoder layer.

    ``moe_block`` holds the router (``router``), the routed experts (``experts``) and, where the
    architecture has one, a shared expert (``shared_expert``) with its 16-bit gate
    (``shared_expert_gate``). In a dense layer (DeepSeek's ``first_k_dense_replace``, Qwen-MoE's
    ``mlp_only_layers``) the same attribute holds a plain MLP with ``mlp_linears``.
    """

    layers: str = "model.layers"
    attention: str = "self_attn"
    attention_linears: tuple[str, ...] = STANDARD_ATTENTION
    moe_block: str = "mlp"
    router: str = "gate"
    experts: str = "experts"
    shared_expert: str | None = None
    shared_expert_gate: str | None = None
    mlp_linears: tuple[str, ...] = MLP_LINEARS
    # Names of (gate, up, down) inside one expert when experts are stored as one nn.Linear each.
    per_expert_linears: tuple[str, str, str] = MLP_LINEARS
    # The router picks a fixed number of experts whatever its ``top_k`` says (PhiMoE's sparsemixer
    # always takes two), so the top-k cannot be reduced.
    fixed_top_k: bool = False


ARCHITECTURES: dict[str, ArchSpec] = {
    "mixtral": ArchSpec(),
    "qwen2_moe": ArchSpec(shared_expert="shared_expert", shared_expert_gate="shared_expert_gate"),
    "qwen3_moe": ArchSpec(),
    "olmoe": ArchSpec(),
    "deepseek_v2": ArchSpec(attention_linears=LATENT_ATTENTION, shared_expert="shared_experts"),
    "deepseek_v3": ArchSpec(attention_linears=LATENT_ATTENTION, shared_expert="shared_experts"),
    "granitemoe": ArchSpec(moe_block="block_sparse_moe", router="router"),
    "phimoe": ArchSpec(router="router", fixed_top_k=True),
}


def arch_spec(model_type: str) -> ArchSpec:
    """The spec for ``model_type``, or a one-line error naming what is supported and how to add more."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise MoepressError(
            f"unsupported architecture '{model_type}': moepress supports {supported}; "
            "to add one, add an ArchSpec entry to moepress/model/registry.py"
        ) from None

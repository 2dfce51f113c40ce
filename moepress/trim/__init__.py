"""Expert trimming: remove structured parts of an MoE model (whole routed experts, for now), and
the importance scores that choose them."""

from .expert_drop import drop_experts, expert_counts, restore_expert_counts, router_groups, top_k_of
from .importance import CRITERIA, ExpertImportance, least_important

__all__ = ["CRITERIA", "ExpertImportance", "drop_experts", "expert_counts", "least_important", "restore_expert_counts",
           "router_groups", "top_k_of"]

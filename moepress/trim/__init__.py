"""Expert trimming: remove structured parts of an MoE model (whole routed experts), route tokens to
fewer experts (top-k), and the importance scores that choose what to drop."""

from .dynamic import DynamicPruning, dynamic_pruning_stats, install_dynamic_pruning
from .expert_drop import drop_experts, expert_counts, restore_expert_counts, router_groups
from .importance import CRITERIA, ExpertImportance, least_important
from .top_k import restore_top_k, set_top_k, top_k_counts, top_k_of_layer
from .trimming import Trimming

__all__ = ["CRITERIA", "DynamicPruning", "ExpertImportance", "drop_experts", "dynamic_pruning_stats",
           "install_dynamic_pruning", "expert_counts", "least_important", "restore_expert_counts",
           "restore_top_k", "router_groups", "set_top_k", "top_k_counts", "top_k_of_layer", "Trimming"]

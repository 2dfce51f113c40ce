"""How a checkpoint is seen: the architecture registry and the storage-independent unit view."""

from .registry import ARCHITECTURES, ArchSpec, arch_spec
from .view import EXPERT_LINEARS, ExpertStore, LinearUnit, MoEView

__all__ = ["ARCHITECTURES", "ArchSpec", "arch_spec", "EXPERT_LINEARS", "ExpertStore", "LinearUnit", "MoEView"]

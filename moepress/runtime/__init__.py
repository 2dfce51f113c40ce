"""Runtime modules that compute from packed low-bit weights."""

from .packed_experts import PackedExperts
from .packed_linear import PackedLinear
from .packed_weight import PackedWeight
from .split_weight import SplitLinear, SplitWeight

__all__ = ["PackedExperts", "PackedLinear", "PackedWeight", "SplitLinear", "SplitWeight"]
from .skeleton import install_packed_skeleton, validate_packed  # noqa: E402

__all__ += ["install_packed_skeleton", "validate_packed"]

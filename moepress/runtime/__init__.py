"""Runtime modules that compute from packed low-bit weights."""

from .packed_experts import PackedExperts
from .packed_linear import PackedLinear
from .packed_weight import PackedWeight
from .sparse_weight import SparseLinear, SparsePackedWeight
from .split_weight import SplitLinear, SplitWeight

__all__ = ["PackedExperts", "PackedLinear", "PackedWeight", "SparseLinear", "SparsePackedWeight", "SplitLinear",
           "SplitWeight"]
from .install import install_experts, install_linear, install_skeleton  # noqa: E402
from .skeleton import validate_packed  # noqa: E402

__all__ += ["install_experts", "install_linear", "install_skeleton", "validate_packed"]

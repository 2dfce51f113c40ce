"""What to quantize to: bit width, grouping, grid shape and algorithm.

`QuantSpec` is the one value that travels from the command line / config to
the quantizers and into the checkpoint metadata, so it validates itself on
construction: a bad value must fail at parse time with a one-line message
that says what to do, not deep inside a Cholesky an hour into calibration.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

ALLOWED_BITS = (2, 3, 4, 8)
KEEP_BITS = 16  # the width of a unit kept as it is (plans write it "16b")
ACT_ORDER_MODES = ("off", "static", "dynamic")
ALLOWED_GROUP_SIZES = (32, 64, 128)
ALLOWED_METHODS = ("gptq", "rtn")
# Group sizes that mean "one group per output row" (per-channel). -1 is the
# GPTQ reference convention, 0 the command-line one (--group-size 0).
_PER_CHANNEL_ALIASES = (None, -1, 0)


@dataclass(frozen=True)
class QuantSpec:
    """A weight quantization recipe.

    bits:        code width; every weight costs exactly `bits` bits when packed.
    group_size:  input columns sharing one (scale, zero); None = per-channel
                 (one group per output row). -1 and 0 are accepted as None.
    symmetric:   absmax grid with an implicit zero point (maxq+1)/2, no stored
                 zeros; otherwise min/max grid with a stored zero (packed at `bits` bits).
    act_order:   GPTQ only: quantize columns in descending diag(H) order, so
                 the most activated inputs are quantized first while there is
                 the most freedom left to compensate (Frantar et al. 2022).
    static_groups: GPTQ act_order only: every group's (scale, zero) is fixed up front from the
                 original weights, groups in the original column order (llm-compressor's and
                 GPTQModel's "static" act-order). No group index is stored, so the checkpoint
                 costs what plain GPTQ costs; without it (dynamic act-order) groups are contiguous
                 in the permuted order and an int16 g_idx per input column says where each went.
    damp:        GPTQ only: lambda = damp * mean(diag(H)) added to diag(H).
    method:      "gptq" (second-order error feedback) or "rtn" (round to nearest).
    clip_search: each group's (scale, zero) from a search over shrunk min/max ranges instead of
                 min/max: GPTQ keeps the one with the least GPTQ loss on the group's columns
                 (`gptq._search_grid`; not with static act-order), RTN the least squared rounding
                 error (`grid.search_params`). The stored format is the same.
    """

    bits: int
    group_size: int | None = None
    symmetric: bool = False
    act_order: bool = False
    damp: float = 0.01
    method: str = "gptq"
    static_groups: bool = False
    clip_search: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in ALLOWED_BITS:
            raise ValueError(f"bits must be one of 2, 3, 4, 8 (got {self.bits!r})")
        gs = self.group_size
        if isinstance(gs, bool) or (gs is not None and not isinstance(gs, int)):
            raise ValueError(f"group size must be 32, 64, 128 or 0 for per-channel (got {gs!r})")
        if gs in _PER_CHANNEL_ALIASES:
            object.__setattr__(self, "group_size", None)
        elif gs not in ALLOWED_GROUP_SIZES:
            raise ValueError(f"group size must be 32, 64, 128 or 0 for per-channel (got {gs})")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be true or false (got {self.symmetric!r})")
        if not isinstance(self.act_order, bool):
            raise ValueError(f"act_order must be true or false (got {self.act_order!r})")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not math.isfinite(self.damp) or self.damp < 0:
            raise ValueError(
                f"damp must be a finite fraction >= 0 of the mean Hessian diagonal, e.g. 0.01 (got {self.damp!r})"
            )
        object.__setattr__(self, "damp", float(self.damp))
        if self.method not in ALLOWED_METHODS:
            raise ValueError(f"method must be 'gptq' or 'rtn' (got {self.method!r})")
        if not isinstance(self.static_groups, bool):
            raise ValueError(f"static_groups must be true or false (got {self.static_groups!r})")
        if not isinstance(self.clip_search, bool):
            raise ValueError(f"clip_search must be true or false (got {self.clip_search!r})")
        if self.static_groups and not self.act_order:
            object.__setattr__(self, "static_groups", False)  # only meaningful with act_order
        if self.clip_search and self.static_groups and self.group_size is not None and self.method == "gptq":
            raise ValueError("the clipping search chooses a group's grid when GPTQ reaches it, and static act-order "
                             "fixes every grid before; use act-order off (the same bytes) or dynamic with it")
        if self.method == "rtn" and self.act_order:
            raise ValueError("act_order needs a Hessian and only applies to method 'gptq'; drop act_order or use gptq")

    @property
    def stores_group_index(self) -> bool:
        """Whether packed weights carry a g_idx: dynamic act-order with groups."""
        return self.act_order and not self.static_groups and self.group_size is not None

    @staticmethod
    def act_order_mode(mode) -> str:
        """The one normal form of an act-order setting: "off", "static" or "dynamic" (True means
        dynamic and False or None off, as older plans and the Python API wrote them)."""
        if mode is True:
            return "dynamic"
        if mode is False or mode is None:
            return "off"
        if mode in ACT_ORDER_MODES:
            return mode
        raise ValueError(f"act-order must be off, static or dynamic (got {mode!r})")

    @classmethod
    def act_order_flags(cls, mode) -> tuple[bool, bool]:
        """(act_order, static_groups) of an act-order mode: "off", "static", "dynamic" (True means
        dynamic, False off), with a one-line error for anything else."""
        mode = cls.act_order_mode(mode)
        return mode != "off", mode == "static"

    @property
    def maxq(self) -> int:
        """Largest code: codes live in [0, 2**bits - 1]."""
        return 2**self.bits - 1

    def check_in_features(self, in_features: int, unit_name: str = "weight") -> None:
        """Raise if this spec cannot tile an input dimension of `in_features`.

        Groups must tile the input dimension exactly: a ragged last group would
        need its own bookkeeping in every kernel and checkpoint reader.
        """
        if in_features <= 0:
            raise ValueError(f"{unit_name} has an empty input dimension ({in_features}); nothing to quantize")
        if self.group_size is not None and in_features % self.group_size != 0:
            raise ValueError(
                f"group size {self.group_size} does not divide the input dimension {in_features} of {unit_name}; "
                "use a group size that divides it or per-channel (--group-size 0)"
            )

    def n_groups(self, in_features: int) -> int:
        """Number of (scale, zero) groups per output row."""
        return 1 if self.group_size is None else math.ceil(in_features / self.group_size)

    def to_dict(self) -> dict:
        """Plain JSON-able dict (group_size None stays None/null)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        """Inverse of `to_dict`; unknown keys are an error (they mean a newer or corrupt file)."""
        if not isinstance(d, dict):
            raise ValueError(f"quantization spec must be a mapping (got {type(d).__name__})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown quantization spec keys {unknown}; expected a subset of {sorted(known)}")
        if "bits" not in d:
            raise ValueError("quantization spec is missing 'bits'")
        return cls(**d)

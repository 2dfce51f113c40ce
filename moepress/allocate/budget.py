"""Budgets: how many bytes a plan may spend, and over which units.

``--budget 2.5bits`` means: the bytes that 2.5-bit codes would take over the budget's scope, with
the plan's group size, scales and zeros included. An integer ``N bits`` is exactly the bytes of
uniform N-bit quantization; a fractional one interpolates linearly between the two neighbouring
uniform options (2.5 bits = half the parameters at 2 bits, half at 3, in bytes). So "3bits" is
always reachable by uniform 3-bit and the strategies compete at the same bytes.

``--budget 11GB`` (or MB, KB, B; powers of 1000; GiB/MiB powers of 1024) is a byte count over the
scope. Scope ``experts`` (default) budgets the routed experts only; the other linears take a fixed
option (attention, shared experts and dense MLPs at 4 bits unless told otherwise). Scope ``all``
budgets every linear weight of the model together, so a strategy may trade attention bits for
expert bits.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..costs import CostTable
from ..errors import MoepressError

SCOPES = {"experts": ("expert",), "all": ("attn", "expert", "shared", "dense_mlp")}
_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class Budget:
    """``bits`` (average code bits) or ``bytes``, over ``scope`` ("experts" or "all")."""

    bits: float | None = None
    bytes: int | None = None
    scope: str = "experts"

    def __post_init__(self):
        if (self.bits is None) == (self.bytes is None):
            raise MoepressError("a budget is either bits (e.g. 2.5bits) or bytes (e.g. 11GB)")
        if self.scope not in SCOPES:
            raise MoepressError(f"budget scope must be one of {', '.join(SCOPES)} (got {self.scope!r})")

    @classmethod
    def parse(cls, text: str, scope: str = "experts") -> "Budget":
        t = str(text).strip().lower().replace(" ", "")
        m = re.fullmatch(r"(\d+(?:\.\d+)?)(bits?|b|kb|mb|gb|tb|kib|mib|gib|tib)", t)
        if not m:
            raise MoepressError(f"cannot read budget {text!r}; write e.g. 2.5bits, 3bits or 11GB")
        value, unit = float(m.group(1)), m.group(2)
        if unit.startswith("bit"):
            return cls(bits=value, scope=scope)
        return cls(bytes=int(value * _UNITS[unit]), scope=scope)

    @property
    def kinds(self) -> tuple[str, ...]:
        return SCOPES[self.scope]

    def __str__(self) -> str:
        amount = f"{self.bits:g}bits" if self.bits is not None else f"{self.bytes}B"
        return f"{amount} over {self.scope}"

    def to_bytes(self, table: CostTable, group_size: int | None = 128) -> int:
        """The byte budget this means on ``table``'s units in scope."""
        if self.bytes is not None:
            return self.bytes
        low, high = math.floor(self.bits), math.ceil(self.bits)
        # A bits budget is the bytes of uniform quantization (or keep): pruned options have bits too,
        # but "3bits" never means "2:4+3b".
        bits_available = sorted({o.bits for o in table.options if not o.pruned})
        if not bits_available:
            raise MoepressError("a budget in bits needs a quantized or 16-bit option in the cost table; "
                                "give the budget in bytes (e.g. 11GB)")
        if self.bits < bits_available[0]:
            raise MoepressError(f"budget of {self.bits:g} bits is below the smallest option "
                                f"({bits_available[0]} bits); raise the budget")
        for b in {low, high}:
            if table.column(b, group_size) is None:
                raise MoepressError(
                    f"budget {self.bits:g} bits needs the {table.parse(b, group_size)} option in the cost table "
                    f"(it has {', '.join(map(str, table.options))}); bits available: {bits_available}")
        low_bytes = table.uniform_bytes(table.column(low, group_size), self.kinds)
        if low == high:
            return low_bytes
        high_bytes = table.uniform_bytes(table.column(high, group_size), self.kinds)
        return int(round(low_bytes + (self.bits - low) * (high_bytes - low_bytes)))

"""What happens to one unit, from the plan to the runtime: one typed value, :class:`Treatment`.

A unit (an attention projection, one linear of a routed expert, a shared-expert or dense-MLP
linear) is kept as it is, quantized, pruned (and maybe quantized), or split along its intermediate
neurons into pieces with their own treatments (channel-level plans). The same value is

* parsed and validated once, at the edge: a plan label (``3b-g128``, ``4b-ch``, ``16b``) or a
  plan's mapping entry, ``compress --bits`` (:meth:`CompressConfig.treatment`), a unit-map entry
  of a checkpoint (:meth:`Treatment.from_unit_map`);
* a column of the cost table (every option a unit may take), carried by the plan;
* what the compression step quantizes with (:meth:`spec`, the quantizer's algorithm parameters);
* written into the checkpoint's unit map (:meth:`to_unit_map`) and read back by the loader, which
  builds each packed module from it (:func:`moepress.runtime.install.empty_weight`).

New kinds of treatment (target formats, say) are new ``kind`` values with their own fields;
everything that passes treatments along does not change. Removing structure (experts, MoE
sublayers, blocks, top-k) is not a unit's treatment but a layer's: ``moepress.trim``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, replace

from .errors import MoepressError
from .quantize.packing import packed_width
from .quantize.spec import ACT_ORDER_MODES, ALLOWED_BITS, KEEP_BITS, QuantSpec

KINDS = ("keep", "quantize", "prune", "split")
PRUNERS = ("sparsegpt", "wanda", "magnitude")
# The settings a plan or a compression shares between its units (a unit may still differ).
SETTINGS = ("symmetric", "act_order", "method", "damp", "pruner", "clip_search")
DEFAULT_SETTINGS = {"symmetric": False, "act_order": "static", "method": "gptq", "damp": 0.01, "pruner": "sparsegpt",
                    "clip_search": False}


@dataclass(frozen=True)
class Treatment:
    """One unit's treatment.

    kind:       "keep" (stored as it is, at the model's own dtype), "quantize", "prune" (weights
                removed, the rest kept at the model's dtype), or "split" (an expert linear whose
                intermediate neurons are split into equal groups: rows of gate/up, ``axis`` 0, or
                columns of down, ``axis`` 1; ``pieces`` in neuron order). A quantized unit with a
                ``sparsity`` is pruned and quantized ("50% sparse and 4-bit").
    bits:       code width (2, 3, 4, 8); 16 for keep and prune. For a split, the widest piece (16
                if a piece is kept): a display value, the pieces carry the truth.
    group_size: input columns sharing one (scale, zero); None = per-channel.
    symmetric:  absmax grid without stored zero points.
    act_order:  "off", "static" (groups fixed in the original column order: no group index
                stored) or "dynamic" (an int16 group index per input column); "off" for RTN.
    method:     "gptq" or "rtn".
    damp:       GPTQ's (and SparseGPT's) dampening, a fraction of the mean Hessian diagonal.
    sparsity:   the fraction of each output row's weights removed (0: none). Unstructured
                pruning removes exactly ``round(in * sparsity)`` weights of every row.
    nm:         (n, m) for semi-structured N:M pruning (n kept of every m consecutive inputs;
                ``sparsity`` is then 1 - n/m), or None.
    pruner:     "sparsegpt" (OBS pruning with the layer's Hessian; joint with GPTQ when
                quantized), "wanda" (|W| x ||X||, per row) or "magnitude" (|W|). Wanda and
                magnitude masks quantize the kept weights by round-to-nearest (method "rtn"),
                SparseGPT by its own error feedback (method "gptq"); pruned units have no
                act-order.
    format:     a llama.cpp block format ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_K", "q3_K",
                "q4_K", "q5_K", "q6_K": :mod:`moepress.quantize.ggml_blocks`) instead of moepress's own grid, or
                None. It fixes ``bits``, ``group_size`` (its block: 32, 256 for the k-quants) and
                ``symmetric`` (no stored minimum); act-order is off or static, and nothing is
                pruned. Its label is the format's name.
    clip_search: each group's range searched for the least diag(H)-weighted rounding error instead
                of min/max (:func:`moepress.quantize.grid.search_params`); same stored format. Only
                for moepress's own unpruned grids (a block format has its own parameter search).

    Construct with :meth:`keep_unit` (or use ``KEEP``), :meth:`quantize`, :meth:`prune`,
    :meth:`split` or :meth:`parse`; a bad value raises a one-line :class:`MoepressError`.
    """

    kind: str = "quantize"
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    act_order: str = "static"
    method: str = "gptq"
    damp: float = 0.01
    pieces: tuple = field(default=())
    axis: int | None = None
    sparsity: float = 0.0
    nm: tuple | None = None
    pruner: str = "sparsegpt"
    format: str | None = None
    clip_search: bool = False

    def __post_init__(self):
        set_ = object.__setattr__
        if self.kind not in KINDS:
            raise MoepressError(f"unknown treatment {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.kind == "keep":
            for f in fields(self):  # a kept unit has no other properties: one value for all of them
                if f.name not in ("kind", "bits"):
                    set_(self, f.name, f.default)
            set_(self, "bits", KEEP_BITS)
            set_(self, "group_size", None)
            return
        if self.kind == "split":
            self._check_split()
            return
        if self.pieces or self.axis is not None:
            raise MoepressError("only a split treatment has pieces and an axis")
        if not isinstance(self.clip_search, bool):
            raise MoepressError(f"clip_search must be true or false (got {self.clip_search!r})")
        if self.format is not None or self.kind == "prune" or self.pruned:
            set_(self, "clip_search", False)  # block formats search their own way; pruners use min/max
        if self.format is not None:
            self._check_format()
            return
        self._check_pruning()
        if self.kind == "prune":  # the kept weights stay as they are: no grid, no quantizer
            for name in ("symmetric", "method"):
                set_(self, name, {f.name: f.default for f in fields(self)}[name])
            set_(self, "bits", KEEP_BITS)
            set_(self, "group_size", None)
            set_(self, "act_order", "off")
            try:
                set_(self, "damp", QuantSpec(bits=4, damp=self.damp).damp)
            except ValueError as exc:
                raise MoepressError(f"treatment {self.label}: {exc}") from None
            return
        if self.pruned:  # SparseGPT quantizes with its own error feedback, Wanda/magnitude masks by RTN
            set_(self, "method", "gptq" if self.pruner == "sparsegpt" else "rtn")
            set_(self, "act_order", "off")
        try:
            mode = QuantSpec.act_order_mode(self.act_order)
            if self.method == "rtn":
                mode = "off"  # round-to-nearest has no Hessian to order columns by
            set_(self, "act_order", mode)
            spec = self.spec()
        except ValueError as exc:
            raise MoepressError(f"treatment {self.label}: {exc}") from None
        set_(self, "group_size", spec.group_size)
        set_(self, "damp", spec.damp)

    def _check_format(self):
        """A llama.cpp block format: its own bits, blocks of 32, its grid; GPTQ or RTN, act-order off
        or static (dynamic act-order scatters a block's columns, which GGUF cannot store)."""
        from .quantize.ggml_blocks import block_format

        set_ = object.__setattr__
        try:
            fmt = block_format(self.format)
        except ValueError as exc:
            raise MoepressError(str(exc)) from None
        if self.kind != "quantize" or self.pruned:
            raise MoepressError(f"{fmt.name} is a quantized treatment of a whole unit; it cannot be pruned")
        if self.bits != fmt.bits:
            raise MoepressError(f"{fmt.name} stores {fmt.bits}-bit codes (got bits {self.bits!r})")
        if self.method not in ("gptq", "rtn"):
            raise MoepressError(f"treatment {fmt.name}: method must be 'gptq' or 'rtn' (got {self.method!r})")
        try:
            mode = "off" if self.method == "rtn" else QuantSpec.act_order_mode(self.act_order)
            set_(self, "damp", QuantSpec(bits=4, damp=self.damp).damp)
        except ValueError as exc:
            raise MoepressError(f"treatment {fmt.name}: {exc}") from None
        if mode == "dynamic":
            raise MoepressError(f"treatment {fmt.name}: llama.cpp's blocks are 32 consecutive inputs, so act-order "
                                "must be off or static (dynamic act-order scatters them)")
        set_(self, "format", fmt.name)
        set_(self, "act_order", mode)
        set_(self, "group_size", fmt.block)
        set_(self, "symmetric", not fmt.has_min)

    def _check_pruning(self):
        """Normalise and check sparsity, N:M and pruner (a unit without pruning has none of them)."""
        set_ = object.__setattr__
        if self.nm is not None:
            nm = tuple(self.nm)
            if len(nm) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in nm) \
                    or not 0 < nm[0] < nm[1]:
                raise MoepressError(f"N:M pruning needs whole numbers 0 < N < M, e.g. 2:4 (got {self.nm!r})")
            set_(self, "nm", nm)
            set_(self, "sparsity", 1.0 - nm[0] / nm[1])
        sparsity = self.sparsity
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
            raise MoepressError(f"sparsity must be a fraction in [0, 1), e.g. 0.5 (got {sparsity!r})")
        set_(self, "sparsity", float(sparsity))
        if self.kind == "prune" and sparsity == 0:
            raise MoepressError("a prune treatment needs a sparsity above 0 or an N:M pattern, e.g. 50% or 2:4")
        if self.pruner not in PRUNERS:
            raise MoepressError(f"pruner must be one of {', '.join(PRUNERS)} (got {self.pruner!r})")
        if not self.pruned:
            set_(self, "pruner", "sparsegpt")

    def _check_split(self):
        set_ = object.__setattr__
        pieces = tuple(self.pieces)
        if len(pieces) < 2:
            raise MoepressError("a split treatment needs at least two pieces")
        if self.axis not in (0, 1):
            raise MoepressError(f"a split's axis must be 0 (rows of gate/up) or 1 (columns of down), got {self.axis!r}")
        if any(not isinstance(p, Treatment) or p.kind not in ("keep", "quantize") or p.pruned for p in pieces):
            raise MoepressError("the pieces of a split are kept or quantized (unpruned) treatments")
        if any(p.format is not None for p in pieces):
            raise MoepressError("the pieces of a split use moepress's own grids, not llama.cpp block formats")
        # Pieces never store a group index (a g_idx per piece would need its own bookkeeping in every
        # kernel): see as_piece.
        pieces = tuple(p.as_piece() for p in pieces)
        quantized = [p for p in pieces if not p.keep]
        if not quantized:
            raise MoepressError("a split whose pieces are all kept is a kept unit; write 16b")
        if len({p.method for p in quantized}) > 1:
            raise MoepressError("the quantized pieces of a split share one method (gptq or rtn)")
        set_(self, "pieces", pieces)
        defaults = {f.name: f.default for f in fields(self)}
        for name in ("group_size", "symmetric", "act_order", "damp", "clip_search"):
            set_(self, name, defaults[name])
        set_(self, "method", quantized[0].method)
        set_(self, "bits", KEEP_BITS if len(quantized) < len(pieces) else max(p.bits for p in quantized))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def keep_unit(cls) -> "Treatment":
        return cls(kind="keep")

    @classmethod
    def quantize(cls, bits: int, group_size: int | None = 128, format: str | None = None,
                 **settings) -> "Treatment":
        """Quantized at ``bits`` with ``group_size``, or, with ``format`` ("q4_1"), onto that llama.cpp
        block format (which fixes the group size to 32)."""
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise MoepressError(f"unknown quantization setting(s) {unknown}; expected {', '.join(SETTINGS)}")
        return cls(kind="quantize", bits=bits, group_size=group_size, format=format, **settings)

    @classmethod
    def block_format(cls, format: str, **settings) -> "Treatment":
        """Quantized onto the llama.cpp block format ``format`` ("q4_0", ...), its bits implied."""
        from .quantize.ggml_blocks import block_format

        try:
            bits = block_format(format).bits
        except ValueError as exc:
            raise MoepressError(str(exc)) from None
        return cls.quantize(bits, 32, format=format, **settings)

    @classmethod
    def prune(cls, sparsity: float = 0.0, nm: tuple | None = None, *, bits: int | None = None,
              group_size: int | None = 128, **settings) -> "Treatment":
        """Pruned at ``sparsity`` (or N:M ``nm``), the rest kept, or quantized at ``bits``."""
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise MoepressError(f"unknown pruning setting(s) {unknown}; expected {', '.join(SETTINGS)}")
        if bits is None or bits == KEEP_BITS:
            return cls(kind="prune", sparsity=sparsity, nm=nm, **settings)
        return cls(kind="quantize", bits=bits, group_size=group_size, sparsity=sparsity, nm=nm, **settings)

    @classmethod
    def split(cls, pieces, axis: int) -> "Treatment":
        return cls(kind="split", pieces=tuple(pieces), axis=axis)

    @classmethod
    def parse(cls, value, default_group: int | None = 128, settings: dict | None = None) -> "Treatment":
        """A plan's entry: a label (``"3b-g128"``, ``"4b-ch"``, ``"16b"``, ``"3b"`` or ``3`` at
        ``default_group``) with the shared ``settings``, or a mapping of a treatment's fields
        (``{bits: 4, group_size: 128, method: rtn}``) over those settings."""
        settings = {**DEFAULT_SETTINGS, **(settings or {})}
        settings = {k: v for k, v in settings.items() if k in SETTINGS}
        if isinstance(value, Treatment):
            return value
        if isinstance(value, dict):
            return cls.from_unit_map({"group_size": default_group, **settings, **value})
        if isinstance(value, bool):
            raise MoepressError(f"cannot read treatment {value!r}; {_LABELS}")
        if isinstance(value, str) and _FORMAT_LABEL.fullmatch(value.strip()):
            return cls.block_format(value.strip().lower(), **{k: v for k, v in settings.items() if k != "pruner"})
        if isinstance(value, int):
            bits, group, pruning = value, default_group, None
        else:
            m = _LABEL.fullmatch(str(value))
            if not m:
                raise MoepressError(f"cannot read treatment {value!r}; {_LABELS}")
            pruning = None
            if m.group("percent"):
                pruning = {"sparsity": float(m.group("percent")) / 100}
            elif m.group("n"):
                pruning = {"nm": (int(m.group("n")), int(m.group("m")))}
            if m.group("bits") is None:
                if pruning is None:
                    raise MoepressError(f"cannot read treatment {value!r}; {_LABELS}")
                return cls.prune(**pruning, **settings)
            bits = int(m.group("bits"))
            group = int(m.group("group")) if m.group("group") else (None if m.group("ch") else default_group)
        if bits == KEEP_BITS:
            return cls.keep_unit() if pruning is None else cls.prune(**pruning, **settings)
        if bits not in ALLOWED_BITS:
            raise MoepressError(f"treatment {value!r}: bits must be 2, 3, 4, 8 or 16 (keep)")
        if pruning is not None:
            return cls.prune(**pruning, bits=bits, group_size=group, **settings)
        return cls.quantize(bits, group, **settings)

    # ------------------------------------------------------------------ properties
    @property
    def keep(self) -> bool:
        return self.kind == "keep"

    @property
    def pruned(self) -> bool:
        return self.sparsity > 0 or self.nm is not None

    def kept_per_row(self, in_features: int) -> int:
        """Weights each output row keeps (all of them when not pruned)."""
        if not self.pruned:
            return in_features
        from .prune.pattern import kept_per_row

        n, m = self.nm or (None, None)
        return kept_per_row(in_features, None if self.nm else self.sparsity, n, m)

    @property
    def label(self) -> str:
        """The short name plans and tables use: ``3b-g128``, ``4b-ch``, ``16b`` (a split: its
        pieces' labels joined by ``/``). The shared settings are not part of it."""
        if self.kind == "keep":
            return "16b"
        if self.kind == "split":
            return "/".join(p.label for p in self.pieces)
        if self.format is not None:
            return self.format
        pruning = "" if not self.pruned else (f"{self.nm[0]}:{self.nm[1]}" if self.nm else f"{self.sparsity * 100:g}%")
        if self.kind == "prune":
            return pruning
        grid = f"{self.bits}b-" + ("ch" if self.group_size is None else f"g{self.group_size}")
        return f"{pruning}+{grid}" if pruning else grid

    def __str__(self) -> str:
        return self.label

    @property
    def settings(self) -> dict:
        return {name: getattr(self, name) for name in SETTINGS}

    def with_settings(self, **settings) -> "Treatment":
        """The same grid (bits, group size) with other shared settings; keep stays keep."""
        if self.kind == "keep":
            return self
        if self.kind == "split":
            return Treatment.split([p.with_settings(**settings) for p in self.pieces], self.axis)
        return replace(self, **{k: v for k, v in settings.items() if k in SETTINGS})

    @property
    def stores_group_index(self) -> bool:
        """Whether the packed weight carries an int16 g_idx: dynamic act-order with groups."""
        return self.kind == "quantize" and self.act_order == "dynamic" and self.group_size is not None

    def as_piece(self) -> "Treatment":
        """This treatment as one piece of a split stores it: without a group index (dynamic
        act-order with groups becomes plain GPTQ; static and per-channel act-order stay)."""
        return replace(self, act_order="off") if self.stores_group_index else self

    def sort_key(self) -> tuple:
        """Narrow to wide, per-channel before grouped at one width, more pruned before less at one
        grid (the cost table's column order: ``2:4+4b-g128`` before ``4b-g128``, ``2:4`` before ``16b``)."""
        return (self.bits, 0 if self.group_size is None else self.group_size, 1.0 - self.sparsity, self.label)

    def spec(self) -> QuantSpec | None:
        """The quantizer's parameters (None for keep; a split's pieces each have their own)."""
        if self.kind in ("keep", "prune"):
            return None
        if self.kind == "split":
            raise ValueError("a split treatment is quantized piece by piece")
        if self.format is not None:
            raise ValueError(f"{self.format} is a llama.cpp block format, quantized by moepress.quantize.ggml_blocks")
        ordered, static = QuantSpec.act_order_flags(self.act_order)
        return QuantSpec(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric, act_order=ordered,
                         damp=self.damp, method=self.method, static_groups=static, clip_search=self.clip_search)

    def piece_shapes(self, out_features: int, in_features: int) -> list[tuple[int, int]]:
        """[out, in] of every piece of a split of an [out, in] weight (equal neuron groups)."""
        n = len(self.pieces)
        if self.axis == 0:
            return [(out_features // n, in_features)] * n
        return [(out_features, in_features // n)] * n

    def check_shape(self, out_features: int, in_features: int, name: str) -> None:
        """One line naming ``name`` when this treatment cannot store an [out, in] weight."""
        if self.kind == "keep":
            return
        if self.pruned:
            try:
                from .prune.pattern import check_pattern

                n, m = self.nm or (None, None)
                check_pattern(None if self.nm else self.sparsity, n, m, in_features, name)
            except ValueError as exc:
                raise MoepressError(f"treatment {self.label} for {name}: {exc}") from None
            if self.kind == "prune":
                return
        if self.kind == "split":
            n, along = len(self.pieces), (out_features if self.axis == 0 else in_features)
            if along % n:
                raise MoepressError(f"{name}: {n} neuron groups do not divide its {along} neurons")
            for piece, shape in zip(self.pieces, self.piece_shapes(out_features, in_features)):
                piece.check_shape(*shape, name)
            return
        if self.format is not None:
            from .quantize.ggml_blocks import block_format

            try:
                block_format(self.format).check_in_features(in_features, name)
            except ValueError as exc:
                raise MoepressError(f"treatment {self.label} for {name}: {exc}") from None
            return
        try:
            self.spec().check_in_features(in_features, name)
        except ValueError as exc:
            raise MoepressError(f"treatment {self.label} for {name}: {exc}") from None

    def nbytes(self, out_features: int, in_features: int, keep_element_size: int = 2) -> int:
        """Exact bytes of one [out, in] weight stored with this treatment, as moepress packs it:
        codes packed 8 per ``bits`` bytes, fp16 scales, zeros at ``bits`` bits (asymmetric; the
        matrix's out*groups zeros packed as one run, see :mod:`moepress.quantize.packed`), an int16
        g_idx (dynamic act-order); a kept weight costs ``keep_element_size`` bytes per parameter."""
        if self.kind == "keep":
            return out_features * in_features * keep_element_size
        if self.kind == "split":
            return sum(p.nbytes(*shape, keep_element_size)
                       for p, shape in zip(self.pieces, self.piece_shapes(out_features, in_features)))
        if self.format is not None:  # llama.cpp's blocks: fp16 d (and m) and the codes of 32 weights
            from .quantize.ggml_blocks import block_format

            return block_format(self.format).nbytes(out_features, in_features)
        kept = self.kept_per_row(in_features)
        # A pruned weight stores a 1-bit keep-mask per weight and only the kept values of each row.
        mask = out_features * packed_width(in_features, 1) if self.pruned else 0
        if self.kind == "prune":
            return mask + out_features * kept * keep_element_size
        groups = 1 if self.group_size is None else math.ceil(in_features / self.group_size)
        total = mask + out_features * packed_width(kept, self.bits) + out_features * groups * 2
        if not self.symmetric:
            total += packed_width(out_features * groups, self.bits)
        if self.stores_group_index:
            total += in_features * 2
        return total

    # ------------------------------------------------------------------ the unit map
    def to_unit_map(self) -> dict:
        """The checkpoint's unit-map entry (JSON); :meth:`from_unit_map` reads it back equal."""
        if self.kind == "keep":
            return {"kind": "keep", "bits": KEEP_BITS}
        if self.kind == "split":
            return {"kind": "split", "bits": self.bits, "axis": self.axis,
                    "pieces": [p.to_unit_map() for p in self.pieces]}
        pruning = {} if not self.pruned else {"sparsity": self.sparsity, "nm": list(self.nm) if self.nm else None,
                                              "pruner": self.pruner}
        if self.kind == "prune":
            return {"kind": "prune", "bits": KEEP_BITS, **pruning, "damp": self.damp}
        block = {} if self.format is None else {"format": self.format}
        search = {"clip_search": True} if self.clip_search else {}  # written only when on: older maps read alike
        return {"kind": "quantize", **block, "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric, "act_order": self.act_order, "method": self.method, "damp": self.damp,
                **search, **pruning}

    @classmethod
    def from_unit_map(cls, entry: dict, unit: str = "unit") -> "Treatment":
        """A unit-map entry of any moepress checkpoint: this version's (``kind``), or format 1's and
        early format 2's (no ``kind``; ``method: keep`` or bits 16 for a kept unit; ``act_order`` a
        bool saying whether a g_idx is stored, so static act-order reads back as "off", which is
        stored the same way; ``pieces`` of ``{bits, group_size, width}`` sharing the entry's
        ``symmetric``). One line naming ``unit`` when an entry is malformed."""
        if not isinstance(entry, dict):
            raise MoepressError(f"{unit}: a unit-map entry must be a mapping (got {type(entry).__name__})")
        kind = entry.get("kind")
        if kind is None:  # older entries, and plan mappings that leave the kind to be read off
            pruning = bool(entry.get("sparsity") or entry.get("nm"))
            unquantized = entry.get("method") == "keep" or entry.get("bits", KEEP_BITS if pruning else None) == KEEP_BITS
            kind = "split" if entry.get("pieces") else (
                ("prune" if pruning else "keep") if unquantized else "quantize")
        known = {f.name for f in fields(cls)} | {"error", "width"}
        unknown = sorted(set(entry) - known)
        if unknown:
            raise MoepressError(f"{unit}: unknown unit-map field(s) {unknown} (written by a newer moepress?)")
        try:
            if kind == "keep":
                return cls.keep_unit()
            if kind == "split":
                pieces = entry.get("pieces")
                if not isinstance(pieces, list) or "axis" not in entry:
                    raise MoepressError("a split needs 'pieces' (a list) and 'axis'")
                widths = {p.get("width") for p in pieces if isinstance(p, dict)} - {None}
                if len(widths) > 1:
                    raise MoepressError(f"its pieces have different widths {sorted(widths)}; moepress splits "
                                        "neurons into equal groups")
                inherited = {"symmetric": entry.get("symmetric", False), "method": entry.get("method", "gptq"),
                             "act_order": False}
                return cls.split([cls.from_unit_map({**inherited, **p}, unit) if isinstance(p, dict) else p
                                  for p in pieces], entry["axis"])
            pruning = {k: entry[k] for k in ("sparsity", "pruner") if k in entry}
            if entry.get("nm") is not None:
                pruning["nm"] = tuple(entry["nm"]) if isinstance(entry["nm"], list) else entry["nm"]
            if kind == "prune":
                return cls.prune(**pruning, damp=entry.get("damp", 0.01))
            if kind != "quantize":
                raise MoepressError(f"unknown treatment {kind!r}")
            for key in ("bits", "group_size", "symmetric", "act_order"):
                if key not in entry:
                    raise MoepressError(f"{key!r} is missing")
            act = entry["act_order"]
            act = "dynamic" if act is True else "off" if act is False else act
            if act not in ACT_ORDER_MODES:
                raise MoepressError(f"act_order must be off, static or dynamic (got {act!r})")
            if pruning.get("sparsity") or pruning.get("nm"):
                return cls.prune(**pruning, bits=entry["bits"], group_size=entry["group_size"],
                                 symmetric=entry["symmetric"], damp=entry.get("damp", 0.01))
            return cls.quantize(entry["bits"], entry["group_size"], symmetric=entry["symmetric"], act_order=act,
                                method=entry.get("method", "gptq"), damp=entry.get("damp", 0.01),
                                format=entry.get("format"), clip_search=entry.get("clip_search", False))
        except MoepressError as exc:
            raise MoepressError(f"{unit}: {exc}") from None


_LABELS = ("write e.g. 3b-g128, 4b-ch, 16b (keep), 50% or 2:4 (pruned), 2:4+4b-g128 (pruned and quantized), "
           "q4_1 (a llama.cpp block format)")
_FORMAT_LABEL = re.compile(r"[qQ]\d_(?:[01]|[kK])")
_LABEL = re.compile(r"\s*(?:(?:(?P<percent>\d+(?:\.\d+)?)\s*%|(?P<n>\d+)\s*:\s*(?P<m>\d+))\s*(?:\+\s*|$))?"
                    r"(?:(?P<bits>\d+)\s*b(?:its?)?\s*(?:-\s*(?:g(?P<group>\d+)|(?P<ch>ch|channel)))?)?\s*")

KEEP = Treatment.keep_unit()
# The options a cost table measures by default: 2, 3, 4 and 8 bits at group 128, and keep.
DEFAULT_OPTIONS = tuple(Treatment.quantize(b) for b in (2, 3, 4, 8)) + (KEEP,)

__all__ = ["DEFAULT_OPTIONS", "DEFAULT_SETTINGS", "KEEP", "KINDS", "SETTINGS", "Treatment"]

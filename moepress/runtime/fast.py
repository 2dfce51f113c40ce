"""The fast CPU runtime: a loaded checkpoint's packed modules converted, once, for their kernels.

The reference runtime (:class:`PackedLinear`, :class:`PackedExperts`) keeps the stored format in
memory and dequantizes every weight on every call: honest about bytes, slow. :func:`prepare` is
gpt-fast's ``convert_for_runtime`` step: after loading, each packed weight is re-laid out for the
fastest kernel this torch offers for its format (:func:`moepress.runtime.kernels.build_matmul`) and
its module replaced by :class:`FastLinear` / :class:`FastExperts`. No weight is cached in a float
dtype: what stays resident is the codes (4-bit codes in torch's int4 layout, 8-bit per-channel as
int8, others at their stored width as bit planes; 2/3-bit codes of the always-active linears as 4-bit
ones, see :class:`FastOptions`) and their group scales.

    model = moepress.load("out")                               # runtime="fast" is the default
    model = moepress.load("out", runtime="reference")          # dequantize per call
    model = moepress.load("out", runtime=FastOptions(widen="all"))  # 2/3-bit experts as 4-bit codes

Numerics: in a bf16/fp16 model the int4 and int8 kernels take their scales (and the int4 kernel its
float zero ``scale * (8 - zero)``) in the activation dtype, so those round to bf16; the outputs
differ from the reference runtime's by about what bf16 rounding of the weights does anyway (the
tests bound it by the reference's own bf16-vs-float32 difference). Everything else (float32 models,
the dequantize kernel, kept and split weights) computes the reference's weights bit for bit.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MoepressError
from ..quantize.activations import carry_input_quantization, fake_quantize
from .kernels import Int4Matmul, Matmul, ReferenceMatmul, build_fused, build_matmul, join_nibbles
from .packed_experts import EXPERT_LINEARS, PackedExperts
from .packed_linear import PackedLinear
from .split_weight import SplitLinear

RUNTIMES = ("fast", "reference")
WIDEN = ("none", "dense", "all")


@dataclass(frozen=True)
class FastOptions:
    """What :func:`prepare` may do.

    ``widen``: which 2- and 3-bit weights are held as 4-bit codes (the same values) for the int4
    kernel instead of at their width as nibble planes the kernel's layout is rebuilt from on every
    call (a few byte ops: at small sizes about as slow as the kernel itself). ``"dense"`` (default):
    the linears every token passes through (attention, shared experts, dense MLPs), a few percent
    of a MoE's bytes, so the routed experts, nearly all of them, stay at 2 or 3 bits per weight;
    ``"all"``: the routed experts too (their code bytes grow 2x at 2 bits and 1.33x at 3, still a
    quarter of bf16 or less); ``"none"``: nothing. ``True``/``False`` mean ``"all"``/``"none"``.

    ``exact``: only the kernels that compute the reference runtime's results bit for bit (the
    dequantize kernel for every quantized weight, also in bf16/fp16, where the int4/int8 kernels
    round their scales to the activation dtype); slower than the default, faster than the reference.
    """

    widen: str | bool = "dense"
    exact: bool = False

    def __post_init__(self):
        if isinstance(self.widen, bool):
            object.__setattr__(self, "widen", "all" if self.widen else "none")
        if self.widen not in WIDEN:
            raise MoepressError(f"widen must be one of {', '.join(WIDEN)} (got {self.widen!r})")

    def widens(self, routed_expert: bool) -> bool:
        return self.widen == "all" or (self.widen == "dense" and not routed_expert)

    @classmethod
    def of(cls, runtime) -> "FastOptions | None":
        """The options ``moepress.load(runtime=...)`` means: None for the reference runtime."""
        if isinstance(runtime, cls):
            return runtime
        if runtime == "reference":
            return None
        if runtime == "fast":
            return cls()
        raise MoepressError(f"runtime must be one of {', '.join(RUNTIMES)} or a FastOptions (got {runtime!r})")


class FastLinear(nn.Module):
    """A drop-in for ``nn.Linear`` computing through one :class:`~moepress.runtime.kernels.Matmul`."""

    replaces_linear = True  # moepress.model.view treats it as a linear unit

    def __init__(self, matmul: Matmul, bias: torch.Tensor | None = None, bits: int | None = None,
                 group_size: int | None = None):
        super().__init__()
        self.matmul = matmul
        self.in_features, self.out_features = matmul.in_features, matmul.out_features
        self.bits, self.group_size = bits, group_size  # the stored format's, for displays and checks
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul.forward(x, self.bias)

    def extra_repr(self) -> str:
        return f"{self.out_features}x{self.in_features}, kernel={self.matmul.kind}, bias={self.bias is not None}"


class FastExpert(nn.Module):
    """One expert's kernels: ``gate_up`` (gate and up projections in one kernel, when they share
    a format that reaches the int4/int8 kernels) or ``gate_proj`` and ``up_proj``; ``down_proj``."""

    def __init__(self, gate_proj, up_proj, down_proj, dtype: torch.dtype, options: FastOptions,
                 activations: dict[str, str | None] | None = None):
        super().__init__()
        widen, exact = options.widens(routed_expert=True), options.exact
        # linear -> the scheme its input is fake-quantized with (compress --activations), or None
        self.activations = activations or dict.fromkeys(EXPERT_LINEARS)
        fusable = self.activations["gate_proj"] == self.activations["up_proj"]
        self.gate_up = build_fused([gate_proj, up_proj], dtype, widen, exact) if fusable else None
        if self.gate_up is None:
            self.gate_proj = build_matmul(gate_proj, dtype, widen, exact)
            self.up_proj = build_matmul(up_proj, dtype, widen, exact)
        self.down_proj = build_matmul(down_proj, dtype, widen, exact)
        self.intermediate = gate_proj.out_features

    def forward(self, x: torch.Tensor, act_fn, gate_up_weight=None, down_weight=None) -> torch.Tensor:
        """The expert on rows ``x``; ``*_weight``: kernel layouts a :class:`PlaneGroup` rebuilt."""
        acts = self.activations
        if self.gate_up is not None:
            x = fake_quantize(x, acts["gate_proj"])
            gate_up = self.gate_up.forward(x, weight=gate_up_weight) if gate_up_weight is not None \
                else self.gate_up.forward(x)
            hidden = act_fn(gate_up[:, : self.intermediate]) * gate_up[:, self.intermediate:]
        else:
            hidden = act_fn(self.gate_proj.forward(fake_quantize(x, acts["gate_proj"]))) * \
                self.up_proj.forward(fake_quantize(x, acts["up_proj"]))
        hidden = fake_quantize(hidden, acts["down_proj"])
        if down_weight is not None:
            return self.down_proj.forward(hidden, weight=down_weight)
        return self.down_proj.forward(hidden)

    def kernels(self) -> list[Matmul]:
        return [m for m in (self.gate_up, getattr(self, "gate_proj", None), getattr(self, "up_proj", None),
                            self.down_proj) if m is not None]


class PlaneGroup:
    """The experts of a layer whose ``slot`` kernel (``gate_up`` or ``down_proj``) holds 2- or 3-bit
    nibble planes of one shape: their planes live in one stacked tensor (each kernel's buffers are
    views of it, no copy), so the kernel layouts of all hit experts are rebuilt by one set of
    byte ops instead of one set per expert, in chunks of at most ``REBUILD_BYTES``."""

    REBUILD_BYTES = 64 << 20  # transient kernel-layout bytes per chunk (a bound on peak memory)

    def __init__(self, slot: str, experts: list[int], kernels: list[Int4Matmul]):
        self.slot, self.experts = slot, experts
        self.position = {e: i for i, e in enumerate(experts)}
        first = kernels[0]
        self.bits, self.packed_shape = first.bits, first.packed_shape
        self.low = torch.stack([k.low for k in kernels])
        self.high = torch.stack([k.high for k in kernels]) if first.high is not None else None
        for i, k in enumerate(kernels):
            k.low = self.low[i]
            if self.high is not None:
                k.high = self.high[i]
        self.chunk = max(1, self.REBUILD_BYTES // (2 * self.low.shape[-1]))

    @staticmethod
    def key(kernel) -> tuple | None:
        if not isinstance(kernel, Int4Matmul) or kernel.bits == 4:
            return None
        return kernel.bits, kernel.packed_shape

    def rebuild(self, hit: list[int], into: dict) -> None:
        """Put the rebuilt kernel layout of every hit member into ``into[(expert, slot)]``."""
        members = [e for e in hit if e in self.position]
        if len(members) < 2:  # one expert rebuilds its own as cheaply
            return
        for start in range(0, len(members), self.chunk):
            chunk = members[start:start + self.chunk]
            if len(chunk) == len(self.experts):
                low, high = self.low, self.high
            else:
                index = torch.tensor([self.position[e] for e in chunk])
                low = self.low.index_select(0, index)
                high = None if self.high is None else self.high.index_select(0, index)
            joined = join_nibbles(low, high, self.bits).view(len(chunk), *self.packed_shape)
            for i, expert in enumerate(chunk):
                into[(expert, self.slot)] = joined[i]


class FastExperts(nn.ModuleList):
    """:class:`PackedExperts` with every expert's linears as kernels; the same forward signature
    and the same arithmetic (each expert's rows in the reference's order, added to the output in
    increasing expert order), so a float32 model's logits equal the reference's. The routed rows
    are gathered once and scattered back once per layer, not per expert."""

    holds_packed_experts = True  # moepress.model.view reads its sizes as for PackedExperts

    def __init__(self, packed: PackedExperts, dtype: torch.dtype, options: FastOptions):
        super().__init__(
            FastExpert(*(packed.packed_weight(e, lin) for lin in EXPERT_LINEARS), dtype, options,
                       {lin: packed.activations if (e, lin) in packed.quantized_inputs else None
                        for lin in EXPERT_LINEARS})
            for e in range(packed.num_experts)
        )
        self.activations = packed.activations  # (compress --activations: each expert applies it)
        self.num_experts = packed.num_experts
        self.hidden_size = packed.hidden_size
        self.intermediate_size = packed.intermediate_size
        self.act_fn = packed.act_fn
        self.plane_groups = []
        for slot in ("gate_up", "down_proj"):
            by_key: dict[tuple, list[int]] = {}
            for e in range(self.num_experts):
                key = PlaneGroup.key(getattr(self[e], slot, None))
                if key is not None:
                    by_key.setdefault(key, []).append(e)
            self.plane_groups += [PlaneGroup(slot, members, [getattr(self[e], slot) for e in members])
                                  for members in by_key.values() if len(members) > 1]

    def set_activations(self, scheme: str | None, linears) -> None:
        """As :meth:`PackedExperts.set_activations`: quantize the inputs of ``linears`` ((expert,
        linear) pairs) with ``scheme``. A fused gate/up kernel takes one input, so its two halves
        must agree."""
        chosen = set(linears) if scheme is not None else set()
        for e in range(self.num_experts):
            acts = {lin: scheme if (e, lin) in chosen else None for lin in EXPERT_LINEARS}
            if self[e].gate_up is not None and acts["gate_proj"] != acts["up_proj"]:
                raise MoepressError(f"expert {e}: gate and up share one fast kernel, so their inputs are quantized "
                                    "alike; load with runtime='reference' to quantize one of them only")
            self[e].activations = acts
        self.activations = scheme if chosen else None

    def packed_weight(self, expert: int, linear: str) -> nn.Module:
        """The kernel computing ``linear`` of ``expert`` (gate and up share one when fused), or the
        stored weight itself where the reference path computes it (pruned weights)."""
        weights = self[expert]
        if linear in ("gate_proj", "up_proj") and weights.gate_up is not None:
            return weights.gate_up
        kernel = getattr(weights, linear)
        return kernel.source if isinstance(kernel, ReferenceMatmul) else kernel

    def linear_bytes(self, expert: int, linear: str) -> int:
        """Bytes ``linear`` of ``expert`` holds (a fused gate/up kernel holds both halves alike)."""
        kernel = self.packed_weight(expert, linear)
        share = 2 if kernel is self[expert].gate_up else 1
        return kernel.nbytes() // share  # (a stored weight's nbytes() is its buffers', as a kernel's)

    def _rebuilt(self, hit: list[int]) -> dict:
        rebuilt: dict = {}
        for group in self.plane_groups:
            group.rebuild(hit, rebuilt)
        return rebuilt

    def _expert(self, expert: int, x: torch.Tensor, rebuilt: dict) -> torch.Tensor:
        return self[expert].forward(x, self.act_fn, rebuilt.get((expert, "gate_up")),
                                    rebuilt.get((expert, "down_proj")))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        tokens = top_k_index.shape[0]
        # (slot, token) pairs in slot-major order, grouped by expert: the rows each expert computes,
        # in the order the reference's expert mask gives them. A zero-weight slot (dynamic pruning)
        # gets the sentinel expert num_experts and is not computed.
        experts = top_k_index.T.reshape(-1)
        weights = top_k_weights.T.reshape(-1)
        experts = torch.where(weights != 0, experts, self.num_experts)
        if tokens == 1:  # decoding one sequence: every hit expert sees the one token
            output = torch.zeros_like(hidden_states)
            order = sorted((e, k) for k, e in enumerate(experts.tolist()) if e < self.num_experts)
            rebuilt = self._rebuilt([e for e, _ in order]) if self.plane_groups else {}
            for expert, slot in order:
                out = self._expert(expert, hidden_states, rebuilt) * weights[slot]
                output += out.to(output.dtype)
            return output
        counts = torch.bincount(experts, minlength=self.num_experts + 1).tolist()
        pairs = torch.argsort(experts, stable=True)[: tokens * top_k_index.shape[1] - counts[-1]]
        token = pairs % tokens
        rows = hidden_states[token]
        hit = [e for e in range(self.num_experts) if counts[e]]
        rebuilt = self._rebuilt(hit) if self.plane_groups else {}
        outs, start = [], 0
        for expert in hit:
            outs.append(self._expert(expert, rows[start:start + counts[expert]], rebuilt))
            start += counts[expert]
        output = torch.zeros_like(hidden_states)
        if outs:
            out = torch.cat(outs) * weights[pairs, None]
            output.index_add_(0, token, out.to(output.dtype))
        return output

    def extra_repr(self) -> str:
        kinds = Counter(k.kind for e in range(self.num_experts) for k in self[e].kernels())
        return f"num_experts={self.num_experts}, kernels={dict(kinds)}"


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _known(weight) -> bool:
    """A weight whose format the kernels know; others (llama.cpp block formats) keep their own
    module and its reference path."""
    from .kept_weight import KeptWeight
    from .packed_weight import PackedWeight
    from .sparse_weight import SparsePackedWeight
    from .split_weight import SplitWeight

    if isinstance(weight, SplitWeight):
        return all(_known(p) for p in weight.pieces)
    return type(weight) in (PackedWeight, PackedLinear, KeptWeight, SparsePackedWeight)


def _on_cpu(module: nn.Module) -> bool:
    return all(t.device.type == "cpu" for t in list(module.buffers()) + list(module.parameters()))


def prepare(model: nn.Module, options: FastOptions | None = None) -> nn.Module:
    """Convert ``model``'s packed modules (a loaded moepress checkpoint) for the fast CPU kernels,
    in place, once; returns ``model``. Activations are taken in the model's float dtype (bf16 or
    fp16 reach the int4/int8 kernels; float32 the exact dequantize kernel). A model on a CUDA device
    gets the Triton kernel for its routed experts where triton is installed
    (:func:`moepress.runtime.triton_moe.prepare_cuda`), everything else as loaded; a model already
    prepared is left as it is. Pruned (sparse) linears keep the reference runtime."""
    options = options or FastOptions()
    if not _on_cpu(model):
        from .triton_moe import prepare_cuda, triton_available

        if triton_available() and not options.exact and any(
                type(m) is PackedExperts and m.activations for m in model.modules()):
            raise MoepressError("the Triton experts kernel does not quantize activations, and this checkpoint's "
                                "experts take int8 ones (compress --activations); load it with runtime='reference'")

        return prepare_cuda(model, options)
    dtype = _float_dtype(model)
    routed = _routed_expert_linears(model)
    swapped: list[str] = []
    for name in [name for name, _ in model.named_modules()]:
        if any(name.startswith(done + ".") for done in swapped):
            continue
        module = model.get_submodule(name)
        if type(module) is PackedExperts and all(_known(module.packed_weight(e, lin))
                                                 for e in range(module.num_experts) for lin in EXPERT_LINEARS):
            fast = FastExperts(module, dtype, options)
        elif type(module) in (PackedLinear, SplitLinear) and _known(module):
            kernel = build_matmul(module, dtype, options.widens(name in routed), options.exact)
            fast = FastLinear(kernel, module.bias, module.bits, getattr(module, "group_size", None))
            carry_input_quantization(module, fast)  # (compress --activations: the same hook on the kernel)
        else:
            continue
        parent, _, child = name.rpartition(".")  # swapped at once: the stored form is freed as we go
        setattr(model.get_submodule(parent) if parent else model, child, fast)
        swapped.append(name)
    return model


def _routed_expert_linears(model: nn.Module) -> set[str]:
    """Module paths of routed experts stored as one linear each (the per-expert layout); the fused
    layout's are inside PackedExperts. Empty for a model moepress's view does not know."""
    from ..model.view import MoEView

    try:
        view = MoEView(model)
    except MoepressError:
        return set()
    paths = set()
    for layer in range(view.num_layers):
        store = view.experts(layer)
        if store is not None and store.layout == "per_expert":
            paths.update(store.per_expert_linear_path(e, lin) for e in range(store.num_experts) for lin in EXPERT_LINEARS)
    return paths


def kernel_counts(model: nn.Module) -> Counter:
    """How many weights each kernel computes: ``int4``, ``int8``, ``dequant``, ``dense``,
    ``reference`` (a split weight counts its pieces; a pruned linear, which keeps the reference
    runtime, counts as ``reference``), and ``unprepared`` for packed modules :func:`prepare` has
    not converted."""
    from .sparse_weight import SparseLinear

    counts: Counter = Counter()
    for module in model.modules():
        if isinstance(module, Matmul) and not hasattr(module, "pieces"):
            counts[module.kind] += 1
        elif isinstance(module, SparseLinear):
            counts["reference"] += 1
        elif isinstance(module, (PackedLinear, SplitLinear, PackedExperts)):
            counts["unprepared"] += 1
    return counts


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds, each tensor counted once (views into a
    shared stack count their own extent): what prepare's memory promise is measured with."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = (tensor.data_ptr(), tensor.numel(), tensor.element_size())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


__all__ = ["FastExpert", "FastExperts", "FastLinear", "FastOptions", "PlaneGroup", "RUNTIMES", "kernel_counts", "prepare",
           "resident_bytes"]

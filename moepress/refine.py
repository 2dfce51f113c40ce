"""A GPTQ solution refined on the decoder layer's output (``--refine STEPS``, ``--refine-params``).

GPTQ minimises each linear's own output error; the layer's output is what the next layer sees. After a
layer's units are quantized, :func:`begin`/:meth:`LayerRefinement.finish` learn, on
``||layer_q(x) - layer(x)||^2`` (:mod:`moepress.quantize.signround`), either every group's scale with
GPTQ's codes held (``scales``, the default: Adam, smooth in the scales) or, as SignRound (arXiv
2309.05516), every weight's rounding offset and the groups' scale/zero corrections by signed gradient
descent (``rounding``), where ``x`` are the layer's calibration inputs (the
outputs of the already-compressed layers before it, as auto-round does) and ``layer(x)`` the unquantized
layer's output on those same inputs, recorded before anything of the layer is quantized.

- The layer's output already carries the routing weights (each expert's output is scaled by its
  weight inside the MoE block), so the experts' errors are not weighted again.
- Routing is **not frozen**: the quantized layer routes its own (quantized-attention) hidden states at
  every step, as it will at inference and as auto-round does; gradients reach the attention through
  the routing weights too. ``freeze_routing=True`` (``CompressConfig.refine_frozen_routing``) feeds the
  unquantized layer's expert choices and weights to the experts instead; on tiny random models it
  reached the same held-out layer error (within 3%), so the simpler, inference-faithful way is the default.
- With ``scales`` the layer's error falls from the first step (the codes do not move); with
  ``rounding`` from GPTQ's codes it rose first and on the zoo never ended below GPTQ's (below).
- The start (``init``, ``rounding`` only): GPTQ's codes (default), or nearest rounding on the weights' own min/max grid
  (``--refine-from rtn``, auto-round's start). From GPTQ's codes the straight-through sign steps first
  undo GPTQ's error compensation (the loss rises, then falls back), and on the trained zoo no layer ended
  below GPTQ within 200 steps; from nearest rounding one of tiny-mixtral's four layers did at 200 steps.
- The experts are refined batched: each linear's experts of one format are one
  :class:`~moepress.quantize.signround.SignRoundWeight` [C, out, in], ``expert_chunk`` experts at a time
  (``--expert-chunk``): the dense units (attention, shared experts) with the first chunk, then each
  further chunk with the rest held at their current codes, ``steps`` steps each.
- The stored format does not change: codes stay on their grid, groups and g_idx as GPTQ stored them.
  Units that are not plain packed weights (kept, pruned, split into neuron groups) are held fixed.
- llama.cpp's block formats (``--target llamacpp``) refine the same way with ``scales``: their float16
  values (``d``, and ``m`` or ``dmin`` where the format has one) are learned with GPTQ's codes and the
  k-quants' integer sub-block scales held (:class:`~moepress.quantize.block_scales.BlockScalesWeight`),
  so the GGUF bytes llama.cpp reads are exactly what was optimised.
- Each pass keeps its result only if the layer's output error over all calibration windows went down;
  otherwise GPTQ's codes stay, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .model.view import EXPERT_LINEARS, MoEView
from .pipeline.runner import LayerwiseRunner, _to_device
from .quantize import QuantizedWeight
from .quantize.block_scales import BlockScalesWeight
from .quantize.ggml_blocks import BlockQuantizedWeight
from .quantize.signround import LEARN, SignRoundWeight


def _layer_output(runner: LayerwiseRunner, module: nn.Module, batch: int) -> torch.Tensor:
    """Decoder layer ``module``'s output for calibration batch ``batch`` (grad as the caller enables it)."""
    kwargs = _to_device(runner.layer_kwargs[batch], runner.device, runner.dtype)
    out = module(_to_device(runner.hidden[batch], runner.device, runner.dtype), **kwargs)
    return out[0] if isinstance(out, tuple) else out


def stack_quantized(weights: list) -> QuantizedWeight | BlockQuantizedWeight:
    """Single-matrix quantized weights of one format as one [n, out, in] weight."""
    first = weights[0]
    if isinstance(first, BlockQuantizedWeight):
        return BlockQuantizedWeight(torch.stack([w.blocks for w in weights]), first.format, first.in_features,
                                    first.out_features)

    def stack(name):
        return None if getattr(first, name) is None else torch.stack([getattr(w, name) for w in weights])

    return QuantizedWeight(stack("qweight"), stack("scales"), stack("zeros"), stack("g_idx"), first.bits,
                           first.group_size, first.in_features, first.out_features)


def experts_by_format(experts_module, linear: str, experts) -> dict[tuple, list[int]]:
    """The refinable ``experts`` of a packed experts module's ``linear``, grouped by storage format (one
    batched learnable per group): plain packed weights by (bits, group, symmetry, g_idx), llama.cpp
    block weights by type. Kept, split or pruned experts are left out: they are held fixed."""
    from .runtime.block_weight import BlockWeight
    from .runtime.packed_weight import PackedWeight

    groups: dict[tuple, list[int]] = {}
    for e in experts:
        w = experts_module.packed_weight(e, linear)
        if type(w) is PackedWeight:
            groups.setdefault((w.bits, w.group_size, w.zeros is None, w.g_idx is not None), []).append(e)
        elif type(w) is BlockWeight:  # (--target llamacpp)
            groups.setdefault((w.format,), []).append(e)
    return groups


def refinable(original: torch.Tensor | None, start, init: str, learn: str):
    """The learnable form of one quantized weight: moepress's grids (:class:`SignRoundWeight`), or a
    llama.cpp block format's float16 values with its codes held (:class:`BlockScalesWeight`).
    ``original`` (the unquantized weight) may be None where only the scales are learned (distill)."""
    if isinstance(start, BlockQuantizedWeight):
        return BlockScalesWeight(start if original is None else start.to(original.device))
    return SignRoundWeight(original, start, init, learn)


class RefinedLinear(nn.Module):
    """Stands in for a packed linear during refinement: its weight is the current differentiable one."""

    def __init__(self, current: dict, key, bias: torch.Tensor | None):
        super().__init__()
        self.current, self.key, self.bias = current, key, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.current[self.key].to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class RefinedExperts(nn.Module):
    """Stands in for a layer's packed experts: transformers' expert loop (the forward of
    :class:`~moepress.runtime.packed_experts.PackedExperts`) on each expert's current weights."""

    def __init__(self, weight_of, num_experts: int, act_fn):
        super().__init__()
        self.weight_of, self.num_experts, self.act_fn = weight_of, num_experts, act_fn

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        output = torch.zeros_like(hidden_states)
        expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
        expert_mask = expert_mask * (top_k_weights != 0).T.unsqueeze(0)
        for expert in torch.nonzero(expert_mask.sum(dim=(1, 2)) > 0).flatten().tolist():
            slot, token = torch.where(expert_mask[expert])
            x = hidden_states[token]
            gate = F.linear(x, self.weight_of(expert, "gate_proj"))
            up = F.linear(x, self.weight_of(expert, "up_proj"))
            out = F.linear(self.act_fn(gate) * up, self.weight_of(expert, "down_proj"))
            output = output.index_add(0, token, (out * top_k_weights[token, slot, None]).to(output.dtype))
        return output


@dataclass
class LayerRefinement:
    """What :func:`begin` recorded of a layer before it was quantized; :meth:`finish` refines it."""

    view: MoEView
    layer: int
    runner: LayerwiseRunner
    steps: int
    expert_chunk: int | None
    freeze_routing: bool
    init: str  # "gptq": start from GPTQ's codes; "rtn": from nearest rounding (auto-round's start)
    learn: str  # "scales": the groups' scales with the codes held; "rounding": SignRound
    originals: dict[str, torch.Tensor]  # module path -> float weight of every nn.Linear of the layer
    expert_originals: dict[str, torch.Tensor] | None  # fused experts: linear -> [E, out, in]
    targets: list[torch.Tensor]  # the unquantized layer's output per calibration batch (CPU)
    routing: list[tuple[torch.Tensor, torch.Tensor]] | None  # with freeze_routing: (index, weights) per batch
    errors: list[float] = field(default_factory=list)

    def recording_hooks(self) -> list:
        """Hooks that record, on each forward of the (still unquantized) layer, its output as a target
        (and with frozen routing the experts' choices); the caller removes them after one pass."""
        def keep(_module, _args, out):
            self.targets.append((out[0] if isinstance(out, tuple) else out).detach().to("cpu"))

        handles = [self.view.layers[self.layer].register_forward_hook(keep)]
        if self.routing is not None:
            def grab(_module, args, kwargs):
                names = ("hidden_states", "top_k_index", "top_k_weights")
                values = list(args) + [kwargs[n] for n in names[len(args):]]
                self.routing.append((values[1].detach().cpu(), values[2].detach().cpu()))

            handles.append(self.view.experts(self.layer).module.register_forward_pre_hook(grab, with_kwargs=True))
        return handles

    def _errors(self, module: nn.Module, batch_hook=None) -> list[float]:
        """Mean squared difference from the unquantized layer's output, per calibration batch."""
        errors = []
        with torch.no_grad():
            for i, target in enumerate(self.targets):
                if batch_hook is not None:
                    batch_hook(i)
                diff = _layer_output(self.runner, module, i).float() - target.to(self.runner.device).float()
                errors.append(float(diff.square().mean()))
        return errors

    def _error(self, module: nn.Module, batch_hook=None) -> float:
        """Mean squared difference from the unquantized layer's output over all calibration windows."""
        sizes = [t.numel() for t in self.targets]
        errors = self._errors(module, batch_hook)
        return sum(e * n for e, n in zip(errors, sizes)) / max(sum(sizes), 1)

    def finish(self) -> dict[str, torch.Tensor]:
        """Refine the quantized layer in place (its packed modules are reinstalled) and return the
        profile tensor ``layers.{l}.refine.output_error``: [before, after] mean squared output error."""
        from .runtime.block_weight import BlockLinear
        from .runtime.install import install_experts, install_linear, swap_module
        from .runtime.packed_linear import PackedLinear
        from .runtime.packed_weight import PackedWeight

        if len(self.targets) != len(self.runner.hidden):
            raise RuntimeError(f"refinement of layer {self.layer} recorded {len(self.targets)} outputs for "
                               f"{len(self.runner.hidden)} calibration batches")

        model, layer_module = self.view.model, self.view.layers[self.layer]
        prefix = self.view.layer_path(self.layer) + "."
        current: dict = {}
        linears: dict[str, tuple[SignRoundWeight | BlockScalesWeight, torch.Tensor | None]] = {}
        for path, module in layer_module.named_modules():
            full = prefix + path
            if isinstance(module, (PackedLinear, BlockLinear)) and full in self.originals:
                linears[full] = (refinable(self.originals[full].to(self.runner.device), module.quantized(), self.init,
                                            self.learn),
                                 module.bias)
        store = self.view.experts(self.layer)
        packed_experts = store is not None and store.layout == "packed" and self.expert_originals is not None
        packed_module = store.module if packed_experts else None  # (swapped out while refining)
        fixed: dict[tuple[int, str], torch.Tensor] = {}
        chunk_weights: dict[tuple[int, str], tuple[object, int]] = {}  # (expert, linear) -> (group key, row)
        if packed_experts:
            for linear in EXPERT_LINEARS:
                for e in range(store.num_experts):
                    fixed[e, linear] = packed_module.packed_weight(e, linear).dequantize(torch.float32)
        flags = {p: p.requires_grad for p in layer_module.parameters()}
        for p in flags:
            p.requires_grad_(False)
        swapped: dict[str, nn.Module] = {}
        batch = [0]
        hooks = []
        try:
            for path, (srw, bias) in linears.items():
                swapped[path] = swap_module(model, path, RefinedLinear(current, path, bias))
            if packed_experts:
                def weight_of(e, linear):
                    where = chunk_weights.get((e, linear))
                    return fixed[e, linear] if where is None else current[where[0]][where[1]]

                swapped[store.module_path] = swap_module(
                    model, store.module_path, RefinedExperts(weight_of, store.num_experts, store.act_fn))
                if self.freeze_routing:
                    def frozen(_module, args, kwargs):
                        hidden = args[0] if args else kwargs.pop("hidden_states")
                        kwargs.pop("top_k_index", None)
                        kwargs.pop("top_k_weights", None)
                        index, weights = (t.to(self.runner.device) for t in self.routing[batch[0]])
                        return (hidden, index, weights.to(hidden.dtype)), kwargs

                    hooks.append(model.get_submodule(store.module_path).register_forward_pre_hook(frozen, with_kwargs=True))
            chunks = self._chunks(store.num_experts if packed_experts else 0)
            experts_refined: dict[object, SignRoundWeight | BlockScalesWeight] = {}
            for n, chunk in enumerate(chunks):
                weights = {path: srw for path, (srw, _) in linears.items()} if n == 0 else {}
                if packed_experts:
                    chunk_weights.clear()
                    weights.update(self._expert_weights(packed_module, chunk, chunk_weights))
                    experts_refined.update({key: w for key, w in weights.items() if not isinstance(key, str)})
                self._refine_pass(layer_module, weights, current, batch)
                if packed_experts:  # the chunk's experts now stay at their refined codes
                    with torch.no_grad():
                        for (e, linear), (key, row) in chunk_weights.items():
                            fixed[e, linear] = current[key][row].detach()
                        for key in {key for key, _ in chunk_weights.values()}:
                            del current[key]
                    chunk_weights.clear()
        finally:
            for handle in hooks:
                handle.remove()
            for path, module in swapped.items():
                swap_module(model, path, module)
            for p, flag in flags.items():
                p.requires_grad_(flag)
        for path, (srw, bias) in linears.items():
            install_linear(model, path, srw.quantized(), bias)
        if packed_experts:
            packed = {linear: [packed_module.packed_weight(e, linear) for e in range(store.num_experts)]
                      for linear in EXPERT_LINEARS}
            for (linear, _, experts), srw in experts_refined.items():
                refined = srw.quantized()
                for row, e in enumerate(experts):  # (a block format's weight: BlockExperts wraps it)
                    one = refined.select(row)
                    packed[linear][e] = one if isinstance(one, BlockQuantizedWeight) else PackedWeight(one)
            install_experts(store, packed)
        before, after = self.errors[0], self.errors[-1]
        return {f"layers.{self.layer}.refine.output_error": torch.tensor([before, after], dtype=torch.float64)}

    def _chunks(self, num_experts: int) -> list[range]:
        if num_experts == 0:
            return [range(0)]
        size = self.expert_chunk or num_experts
        return [range(s, min(num_experts, s + size)) for s in range(0, num_experts, size)]

    def _expert_weights(self, experts_module, chunk: range, chunk_weights: dict) -> dict:
        """One SignRoundWeight per (linear, format) over the chunk's plain packed experts."""
        out = {}
        for linear in EXPERT_LINEARS:
            for fmt, experts in experts_by_format(experts_module, linear, chunk).items():
                key = (linear, fmt, tuple(experts))
                start = stack_quantized([experts_module.packed_weight(e, linear).quantized() for e in experts])
                original = self.expert_originals[linear][list(experts)].to(self.runner.device)
                out[key] = refinable(original, start.to(self.runner.device), self.init, self.learn)
                for row, e in enumerate(experts):
                    chunk_weights[e, linear] = (key, row)
        return out

    def _refine_pass(self, layer_module: nn.Module, weights: dict, current: dict, batch: list) -> None:
        """``steps`` signed-gradient steps on ``weights``, one calibration batch each, cycling; the pass's
        result is kept only if the output error over every window went down."""

        def refresh(grad: bool):
            with torch.set_grad_enabled(grad):
                for key, srw in weights.items():
                    current[key] = srw.dequantize()

        def set_batch(i):
            batch[0] = i

        sizes = [t.numel() for t in self.targets]

        def error_of(batches):
            return sum(e * n for e, n in zip(batches, sizes)) / max(sum(sizes), 1)

        for srw in weights.values():  # the baseline: the layer as GPTQ left it
            srw.keep_given = True
        refresh(False)
        given_batches = self._errors(layer_module, set_batch)
        given_error = error_of(given_batches)
        if not self.errors:
            self.errors.append(given_error)
        if not weights:
            self.errors.append(given_error)
            return
        for srw in weights.values():
            srw.keep_given = False
        refresh(False)
        start_batches = given_batches if self.init == "gptq" else self._errors(layer_module, set_batch)
        # As auto-round, keep the best state seen; each step's loss (before its update) is compared as
        # a share of its batch's loss at the start, so that batches of different difficulty compare.
        best, best_ratio = {key: srw.state() for key, srw in weights.items()}, 1.0
        n = len(self.targets)
        for step in range(self.steps):
            i = step % n
            batch[0] = i
            refresh(True)
            with torch.enable_grad():
                out = _layer_output(self.runner, layer_module, i).float()
                loss = F.mse_loss(out, self.targets[i].to(out.device).float())
                loss.backward()
            ratio = loss.item() / max(start_batches[i], 1e-30)
            if ratio < best_ratio:
                best, best_ratio = {key: srw.state() for key, srw in weights.items()}, ratio
            for srw in weights.values():
                srw.refine_step(step, self.steps)
        for key, srw in weights.items():
            srw.restore(best[key])
        refresh(False)
        end_error = self._error(layer_module, set_batch)
        if end_error >= given_error:  # no better than GPTQ on the calibration windows: its codes stay
            for srw in weights.values():
                srw.keep_given = True
            refresh(False)
            end_error = given_error
        for key in weights:
            current[key] = current[key].detach()
        self.errors.append(end_error)


REFINE_STEPS = 32  # ``moepress compress``'s default --refine (benchmarks/refine.py; the library's CompressConfig: 0)


def default_steps(config, plan=None, joint: bool = False) -> int:
    """``moepress compress``'s --refine when not given: :data:`REFINE_STEPS`, or 0 where refinement does
    not apply yet (trims, a plan that trims, the joint plan's removals), so that the default never
    turns into a refusal."""
    trims = (config.drop_experts is not None or config.top_k is not None or config.drop_blocks
             or config.drop_moe_layers or joint or (plan is not None and not plan.trim.empty))
    return 0 if (config.bits or 0) >= 16 or trims else REFINE_STEPS


def check_config(config) -> None:
    """Refuse what refinement cannot do yet, before any work (a :class:`~moepress.compress.CompressConfig`)."""
    from .errors import MoepressError

    steps = config.refine
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise MoepressError(f"--refine takes a number of steps >= 0, e.g. 50 (0: off; got {steps!r})")
    if config.refine_from not in ("gptq", "rtn"):
        raise MoepressError(f"refine-from must be 'gptq' or 'rtn' (got {config.refine_from!r})")
    if config.refine_params not in LEARN:
        raise MoepressError(f"refine-params must be one of {', '.join(LEARN)} (got {config.refine_params!r})")
    if not steps:
        return
    if config.refine_from == "rtn" and config.refine_params != "rounding":
        raise MoepressError("--refine-from rtn re-learns the rounding: add --refine-params rounding")
    if config.refine_from == "rtn" and config.act_order == "dynamic":
        raise MoepressError("refining from nearest rounding needs groups in storage order; use --act-order static or off")
    if config.target == "llamacpp" and (config.refine_params != "scales" or config.refine_from != "gptq"):
        raise MoepressError("llama.cpp's block formats refine their float16 scales with GPTQ's codes held: use "
                            "--refine-params scales (the default) with --target llamacpp")
    if config.drop_experts is not None or config.top_k is not None or config.drop_blocks or config.drop_moe_layers:
        raise MoepressError("--refine does not combine with --drop-experts, --top-k, --drop-blocks or "
                            "--drop-moe-layers yet; trim first, then compress the trimmed model with --refine")


@torch.no_grad()
def begin(view: MoEView, layer: int, runner: LayerwiseRunner, steps: int, expert_chunk: int | None = None,
          freeze_routing: bool = False, init: str = "gptq", learn: str = "scales",
          defer: bool = False) -> LayerRefinement:
    """Record what refinement needs before layer ``layer`` (on the device, unquantized) is touched: the
    float weights of its linears and experts (references: the layer holds them anyway) and its output
    on the current calibration inputs. With ``defer`` the outputs are not computed here: the caller
    registers :meth:`LayerRefinement.recording_hooks` on a pass of the unquantized layer it runs anyway
    (compression's attention statistics pass), which saves a pass over the windows."""
    module = view.layers[layer]
    prefix = view.layer_path(layer) + "."
    originals = {prefix + path: m.weight for path, m in module.named_modules() if isinstance(m, nn.Linear)}
    store = view.experts(layer)
    expert_originals = None
    if store is not None and store.layout == "fused":
        expert_originals = {linear: store.weight(linear) for linear in EXPERT_LINEARS}
    routing: list | None = [] if freeze_routing and store is not None else None
    refinement = LayerRefinement(view, layer, runner, steps, expert_chunk, freeze_routing and store is not None, init,
                                 learn, originals, expert_originals, [], routing)
    if not defer:
        handles = refinement.recording_hooks()
        try:
            for i in range(len(runner.hidden)):
                _layer_output(runner, module, i)
        finally:
            for handle in handles:
                handle.remove()
    return refinement


__all__ = ["REFINE_STEPS", "LayerRefinement", "RefinedExperts", "RefinedLinear", "begin", "check_config", "default_steps",
           "experts_by_format", "refinable", "stack_quantized"]

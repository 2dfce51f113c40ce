"""The main job: calibrate layer by layer and quantize every unit into packed weights.

Each decoder layer is handled in three passes over the calibration tokens, with only that layer on
the compute device:

1. attention: record the inputs of the attention projections, quantize them, install packed
   linears;
2. MLP: with the quantized attention in place, record routing and per-expert inputs (and those of
   the shared expert or dense MLP), quantize all routed experts of the layer in one batched GPTQ
   call per linear shape, install packed experts;
3. output: run the now fully quantized layer to produce the next layer's inputs.

So every layer is calibrated on the outputs of the already-quantized layers before it, as in GPTQ.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from .calibrate import LayerwiseRunner, Profile, collect_layer_stats, resolve_device
from .errors import MoepressError
from .model.view import EXPERT_LINEARS, ExpertStore, MoEView, set_submodule
from .quantize import QuantSpec, gptq_quantize, hessian_weighted_error, rtn_quantize
from .runtime import PackedLinear


@dataclass
class CompressConfig:
    """What ``compress`` does. Validated once, here, with messages that say what to do."""

    bits: int = 4
    group_size: int | None = 128
    method: str = "gptq"
    symmetric: bool = False
    act_order: str = "static"  # "off" | "static" | "dynamic" (True/False accepted: dynamic/off)
    damp: float = 0.01
    calib: str = "builtin:calib"
    calib_samples: int = 128
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0
    device: str | None = None
    min_expert_tokens: int = 16
    rare_experts: str = "all_tokens"
    quantize_attention: bool = True
    quantize_mlp: bool = True  # shared experts and dense MLP layers

    def __post_init__(self):
        if isinstance(self.act_order, bool):
            self.act_order = "dynamic" if self.act_order else "off"
        try:
            self.quant_spec()
        except ValueError as exc:
            raise MoepressError(str(exc)) from None
        for name in ("calib_samples", "seq_len", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise MoepressError(f"{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.rare_experts not in ("all_tokens", "routed_only"):
            raise MoepressError(f"rare-experts must be 'all_tokens' or 'routed_only' (got {self.rare_experts!r})")

    def quant_spec(self) -> QuantSpec:
        act_order, static = QuantSpec.act_order_flags(self.act_order)
        gptq = self.method == "gptq"  # act-order needs a Hessian: round-to-nearest ignores it
        return QuantSpec(
            bits=self.bits,
            group_size=self.group_size,
            symmetric=self.symmetric,
            act_order=act_order and gptq,
            damp=self.damp,
            method=self.method,
            static_groups=static and gptq,
        )


@dataclass
class UnitRecord:
    """What happened to one unit: its option and its measured output error on calibration inputs."""

    bits: int
    group_size: int | None
    symmetric: bool
    act_order: bool  # whether the packed weight stores a g_idx (dynamic act-order with groups)
    method: str
    error: float  # trace((W-Q) H (W-Q)^T) with H = X^T X / n: mean squared output error per token
    # An expert linear split along its intermediate neurons (channel-level plans): each piece's
    # bits/group_size/width, rows of gate/up (axis 0) or columns of down (axis 1); ``bits`` is the widest.
    pieces: list | None = None
    axis: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.pieces is None:
            del d["pieces"], d["axis"]
        return d


@dataclass
class CompressResult:
    model: nn.Module
    tokenizer: object
    config: CompressConfig
    units: dict[str, UnitRecord]
    profile: Profile
    seconds: float
    calibration_tokens: int
    source: str = ""
    saved_to: str | None = None
    plan: object | None = None  # the moepress.allocate.Plan applied, if any

    def record(self) -> dict:
        """The facts written to ``moepress.json``."""
        from . import __version__

        return {
            "format_version": 1,
            "moepress_version": __version__,
            "source_model": self.source,
            "method": self.config.method,
            "bits": None if self.plan is not None else self.config.bits,
            "group_size": None if self.plan is not None else self.config.group_size,
            "plan": None if self.plan is None else {k: v for k, v in self.plan.to_dict().items() if k != "units"},
            "symmetric": self.config.symmetric,
            "act_order": self.config.act_order if self.config.method == "gptq" else "off",
            "damp": self.config.damp,
            "calibration": {
                "source": self.config.calib,
                "samples": self.config.calib_samples,
                "seq_len": self.config.seq_len,
                "tokens": self.calibration_tokens,
                "seed": self.config.seed,
                "min_expert_tokens": self.config.min_expert_tokens,
                "rare_experts": self.config.rare_experts,
            },
            "seconds": round(self.seconds, 2),
            "units": {name: rec.to_dict() for name, rec in self.units.items()},
        }


def quantize_batch(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, name: str):
    """Quantize [E, out, in] (or [out, in]) weights; returns the packed weight and per-matrix error."""
    weight = weight.detach().float()
    if spec.method == "gptq":
        packed = gptq_quantize(weight, hessian, spec, name=name).weight
    else:
        packed = rtn_quantize(weight, spec, name=name)
    error = hessian_weighted_error(weight, packed.dequantize(torch.float32).to(weight.device), hessian)
    # The packed weight stays on the compute device: the layer runs again there before it moves back.
    return packed.to(weight.device), error.reshape(-1).cpu()


class UnitSpecs:
    """Which :class:`QuantSpec` each unit gets: one for all (``--bits``), or a plan's per-unit
    options (None = keep the unit in 16 bits; a list = one spec or None per neuron group of a split
    expert linear). Method, symmetry, act-order and damping are shared."""

    def __init__(self, config: CompressConfig, options: dict | None = None):
        self.default = config.quant_spec()
        self.options = options

    def __call__(self, name: str) -> QuantSpec | None:
        if self.options is None:
            return self.default
        option = self.options[name]
        if isinstance(option, tuple):  # neuron-group pieces never store a g_idx: dynamic act-order is dropped
            specs = [self._spec(o) for o in option]
            return [replace(s, act_order=False) if s is not None and s.stores_group_index else s for s in specs]
        return self._spec(option)

    def _spec(self, option) -> QuantSpec | None:
        if option.keep:
            return None
        d = self.default
        return QuantSpec(bits=option.bits, group_size=option.group_size, symmetric=d.symmetric,
                         act_order=d.act_order, damp=d.damp, method=d.method, static_groups=d.static_groups)


def _keep_record(spec: QuantSpec) -> "UnitRecord":
    return UnitRecord(bits=16, group_size=None, symmetric=spec.symmetric, act_order=False, method="keep", error=0.0)


def _check_group_size(view: MoEView, spec: QuantSpec, config: CompressConfig) -> None:
    for name, (_out, in_features) in view.unit_shapes().items():
        if ".attn." in name and not config.quantize_attention:
            continue
        try:
            spec.check_in_features(in_features, name)
        except ValueError as exc:
            raise MoepressError(str(exc)) from None


def _quantize_linear_units(model, units, stats, specs: UnitSpecs, records) -> None:
    for unit in units:
        spec = specs(unit.name)
        if spec is None:
            records[unit.name] = _keep_record(specs.default)
            continue
        s = stats[unit]
        module = model.get_submodule(unit.module_path)
        packed, error = quantize_batch(module.weight, s.hessian(), spec, unit.name)
        set_submodule(model, unit.module_path, PackedLinear(packed, module.bias))
        records[unit.name] = UnitRecord(**_option(spec), error=float(error[0]))


def _option(spec: QuantSpec) -> dict:
    return dict(
        bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric, act_order=spec.stores_group_index,
        method=spec.method
    )


def _quantize_experts(store: ExpertStore, stats, specs: UnitSpecs, records) -> None:
    """All routed experts of a layer, batched: every (expert, linear) pair with the same option is
    one batched GPTQ call. Gate and up share their input, so they batch together (with the same
    Hessians); down has its own. With one option for all, that is two calls per layer."""
    E = store.num_experts
    in_hessian, mid_hessian = stats.hessians()
    name = f"layers.{store.layer}.experts"
    packed: dict[str, list] = {linear: [None] * E for linear in EXPERT_LINEARS}
    weights = {linear: store.weight(linear) for linear in EXPERT_LINEARS}
    for linears, hessian in ((("gate_proj", "up_proj"), in_hessian), (("down_proj",), mid_hessian)):
        batches: dict[QuantSpec | None, list[tuple[str, int]]] = {}
        splits: list[tuple[str, int, list]] = []
        for linear in linears:
            for e in range(E):
                spec = specs(store.unit_name(e, linear))
                if isinstance(spec, list):
                    splits.append((linear, e, spec))
                else:
                    batches.setdefault(spec, []).append((linear, e))
        if splits:
            _quantize_splits(store, weights, hessian, splits, specs.default, packed, records)
        for spec, members in batches.items():
            if spec is None:  # kept in 16 bits
                for linear, e in members:
                    packed[linear][e] = weights[linear][e].detach().clone()
                    records[store.unit_name(e, linear)] = _keep_record(specs.default)
                continue
            w = torch.stack([weights[linear][e] for linear, e in members])
            h = torch.stack([hessian[e] for _, e in members])
            q, err = quantize_batch(w, h, spec, f"{name}.{'_'.join(linears)}")
            for i, (linear, e) in enumerate(members):
                packed[linear][e] = q.select(i)
                records[store.unit_name(e, linear)] = UnitRecord(**_option(spec), error=float(err[i]))
    if all(isinstance(w, torch.Tensor) for linear in EXPERT_LINEARS for w in packed[linear]):
        return  # every expert kept: the layer stays as it is
    store.install_packed(packed)


def _quantize_splits(store: ExpertStore, weights, hessian, splits, default: QuantSpec, packed, records) -> None:
    """Expert linears whose intermediate neurons are split into equal groups with their own specs.

    Gate and up are split by rows, which GPTQ treats independently: every (linear, expert, group)
    row block with the same spec is one batched call on its expert's Hessian, exactly what quantizing
    the whole matrix would give those rows. Down is split by columns: one GPTQ pass per expert over
    all its columns (``gptq_quantize_segments``) so later groups still absorb earlier groups' error.
    """
    from .quantize import gptq_quantize_segments
    from .runtime import SplitWeight

    pieces: dict[tuple[str, int], list] = {}
    row_batches: dict[QuantSpec | None, list[tuple[str, int, int, int]]] = {}
    for linear, e, piece_specs in splits:
        n = len(piece_specs)
        width = store.intermediate_size // n
        pieces[linear, e] = [None] * n
        if linear == "down_proj":
            w = weights[linear][e].detach().float()
            if default.method == "gptq":  # segments are contiguous: no act-order across them
                segments = [(width, s and replace(s, act_order=False, static_groups=False)) for s in piece_specs]
                got, _ = gptq_quantize_segments(w, hessian[e], segments, name=store.unit_name(e, linear))
            else:
                got = [w[:, k * width:(k + 1) * width].clone() if s is None else
                       rtn_quantize(w[:, k * width:(k + 1) * width], s, name=store.unit_name(e, linear))
                       for k, s in enumerate(piece_specs)]
            dtype = weights[linear][e].dtype
            pieces[linear, e] = [p.to(dtype) if isinstance(p, torch.Tensor) else p for p in got]
        else:
            for k, s in enumerate(piece_specs):
                row_batches.setdefault(s, []).append((linear, e, k, width))
    for spec, members in row_batches.items():
        rows = [weights[linear][e][k * width:(k + 1) * width] for linear, e, k, width in members]
        if spec is None:
            for (linear, e, k, _), w in zip(members, rows):
                pieces[linear, e][k] = w.detach().clone()
            continue
        q, _ = quantize_batch(torch.stack(rows), torch.stack([hessian[e] for _, e, _, _ in members]), spec,
                              f"layers.{store.layer}.experts (neuron groups)")
        for i, (linear, e, k, _) in enumerate(members):
            pieces[linear, e][k] = q.select(i)
    for linear, e, piece_specs in splits:
        axis = 1 if linear == "down_proj" else 0
        weight = SplitWeight(pieces[linear, e], axis)
        packed[linear][e] = weight
        w = weights[linear][e].detach().float()
        error = hessian_weighted_error(w, weight.dequantize(torch.float32).to(w.device), hessian[e])
        width = store.intermediate_size // len(piece_specs)
        quantized = [s for s in piece_specs if s is not None]  # resolve() never splits into all-kept pieces
        records[store.unit_name(e, linear)] = UnitRecord(
            bits=16 if len(quantized) < len(piece_specs) else max(s.bits for s in quantized),
            group_size=quantized[0].group_size, symmetric=default.symmetric, act_order=False, method=default.method,
            error=float(error), axis=axis,
            pieces=[{"bits": 16 if s is None else s.bits, "group_size": None if s is None else s.group_size,
                     "width": width} for s in piece_specs],
        )


def quantize_model(
    model: nn.Module,
    tokens: torch.Tensor,
    config: CompressConfig,
    progress: bool = True,
    unit_options: dict | None = None,
) -> tuple[dict[str, UnitRecord], Profile]:
    """Quantize ``model`` in place, layer by layer, on calibration ``tokens`` [N, seq_len].

    ``unit_options`` (a resolved plan: every linear's canonical name -> :class:`~moepress.costs.Option`)
    replaces ``config``'s single bits/group size; method, symmetry and damping still come from ``config``.
    """
    from tqdm.auto import tqdm

    view = MoEView(model)
    specs = UnitSpecs(config, unit_options)
    if unit_options is None:
        _check_group_size(view, specs.default, config)
    device = resolve_device(config.device)
    runner = LayerwiseRunner(model, view, tokens, device, config.batch_size)
    runner.capture_inputs()
    profile = Profile.start(view.model_type, tokens, config.min_expert_tokens, config.rare_experts)
    records: dict[str, UnitRecord] = {}
    bar = tqdm(range(view.num_layers), desc="quantize", unit="layer", disable=not progress)
    experts_done = 0
    for layer in bar:
        runner.load_layer(layer)
        if config.quantize_attention:
            attention = view.attention_units(layer)
            stats, handles = collect_layer_stats(view, layer, runner, 0, "routed_only", units=attention, experts=False)
            _run_and_unhook(runner, layer, handles)
            _quantize_linear_units(model, attention, stats["linear"], specs, records)
            for unit in attention:
                profile.record_linear(unit, stats["linear"][unit])
        mlp_units = view.mlp_units(layer) if config.quantize_mlp else []
        stats, handles = collect_layer_stats(
            view, layer, runner, config.min_expert_tokens, config.rare_experts, units=mlp_units
        )
        _run_and_unhook(runner, layer, handles)
        if stats["experts"] is not None:
            _quantize_experts(stats["experts"].store, stats["experts"], specs, records)
            profile.record_experts(layer, stats["experts"])
            experts_done += stats["experts"].store.num_experts
        _quantize_linear_units(model, mlp_units, stats["linear"], specs, records)
        for unit in mlp_units:
            profile.record_linear(unit, stats["linear"][unit])
        runner.run_layer(layer, update=True)
        runner.unload_layer(layer)
        bar.set_postfix(experts=experts_done, tokens=runner.num_tokens)
    return records, profile


def _run_and_unhook(runner: LayerwiseRunner, layer: int, handles) -> None:
    try:
        runner.run_layer(layer, update=False)
    finally:
        for handle in handles:
            handle.remove()


def compress(
    model: str | nn.Module,
    tokenizer=None,
    config: CompressConfig | None = None,
    *,
    out: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
    plan=None,
    **options,
) -> CompressResult:
    """Quantize an MoE model with GPTQ (or RTN) into packed weights; optionally save it to ``out``.

    ``model`` is a local directory, a hub id, or an already loaded transformers model (then pass its
    ``tokenizer``). ``options`` are :class:`CompressConfig` fields (``bits=3, group_size=128, ...``).
    ``plan`` (a :class:`~moepress.allocate.Plan` or the path of a plan file) gives every unit its own
    option instead of one ``bits``/``group_size``; its quantization settings (method, symmetric,
    act-order, damping) then apply.
    """
    from .data import load_text, token_windows
    from .loading import load_model, load_tokenizer

    if plan is not None:
        from .allocate import load_plan

        plan = load_plan(plan) if isinstance(plan, str) else plan
        options = {**options, **{k: v for k, v in plan.quantization.items()
                                 if k in ("method", "symmetric", "act_order", "damp")}}
    config = config or CompressConfig(**options)
    if plan is not None and not (config.quantize_attention and config.quantize_mlp):
        raise MoepressError("a plan gives every unit its option, so --keep-attention does not combine with --plan; "
                            "write 16b for the attention units in the plan instead")
    if out is not None:
        from .export.checkpoint import check_output_dir

        check_output_dir(out, overwrite)
    source = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
    if isinstance(model, str):
        tokenizer = tokenizer or load_tokenizer(model, trust_remote_code=trust_remote_code)
        model = load_model(model, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise MoepressError("compress needs a tokenizer with an in-memory model: compress(model, tokenizer, ...)")
    # Fail on an unsupported architecture, a group size or a plan that does not fit before any long work.
    unit_options = None
    if plan is not None:
        from .costs import model_rows

        unit_options = plan.resolve(model_rows(MoEView(model)))
    else:
        _check_group_size(MoEView(model), config.quant_spec(), config)
    text = load_text(config.calib)
    tokens = token_windows(
        text, tokenizer, config.seq_len, config.calib_samples, seed=config.seed, what="calibration"
    )
    started = time.time()
    records, profile = quantize_model(model, tokens, config, progress=progress, unit_options=unit_options)
    result = CompressResult(
        model=model,
        tokenizer=tokenizer,
        config=config,
        units=records,
        profile=profile,
        seconds=time.time() - started,
        calibration_tokens=int(tokens.numel()),
        source=str(source),
        plan=plan,
    )
    if out is not None:
        from .export.checkpoint import save_compressed

        save_compressed(result, out, overwrite=overwrite)
        result.saved_to = out
    return result

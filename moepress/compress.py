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
from dataclasses import asdict, dataclass

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
    act_order: bool = False
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
        return QuantSpec(
            bits=self.bits,
            group_size=self.group_size,
            symmetric=self.symmetric,
            act_order=self.act_order,
            damp=self.damp,
            method=self.method,
        )


@dataclass
class UnitRecord:
    """What happened to one unit: its option and its measured output error on calibration inputs."""

    bits: int
    group_size: int | None
    symmetric: bool
    act_order: bool
    method: str
    error: float  # trace((W-Q) H (W-Q)^T) with H = X^T X / n: mean squared output error per token


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

    def record(self) -> dict:
        """The facts written to ``moepress.json``."""
        from . import __version__

        return {
            "format_version": 1,
            "moepress_version": __version__,
            "source_model": self.source,
            "method": self.config.method,
            "bits": self.config.bits,
            "group_size": self.config.group_size,
            "symmetric": self.config.symmetric,
            "act_order": self.config.act_order,
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
            "units": {name: asdict(rec) for name, rec in self.units.items()},
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


def _check_group_size(view: MoEView, spec: QuantSpec, config: CompressConfig) -> None:
    for name, (_out, in_features) in view.unit_shapes().items():
        if ".attn." in name and not config.quantize_attention:
            continue
        try:
            spec.check_in_features(in_features, name)
        except ValueError as exc:
            raise MoepressError(str(exc)) from None


def _quantize_linear_units(model, units, stats, spec, records) -> None:
    for unit in units:
        s = stats[unit]
        module = model.get_submodule(unit.module_path)
        packed, error = quantize_batch(module.weight, s.hessian(), spec, unit.name)
        set_submodule(model, unit.module_path, PackedLinear(packed, module.bias))
        records[unit.name] = UnitRecord(**_option(spec), error=float(error[0]))


def _option(spec: QuantSpec) -> dict:
    return dict(
        bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric, act_order=spec.act_order, method=spec.method
    )


def _quantize_experts(store: ExpertStore, stats, spec, records) -> None:
    """All routed experts of a layer at once: gate and up share their input, so they are stacked
    as 2E independent matrices with the same Hessians; down is one [E, H, I] batch."""
    E = store.num_experts
    in_hessian, mid_hessian = stats.hessians()
    gate_up = torch.cat([store.weight("gate_proj"), store.weight("up_proj")])
    name = f"layers.{store.layer}.experts"
    packed_gu, error_gu = quantize_batch(gate_up, torch.cat([in_hessian, in_hessian]), spec, f"{name}.gate_up")
    packed_down, error_down = quantize_batch(store.weight("down_proj"), mid_hessian, spec, f"{name}.down_proj")
    packed = {
        "gate_proj": [packed_gu.select(e) for e in range(E)],
        "up_proj": [packed_gu.select(E + e) for e in range(E)],
        "down_proj": [packed_down.select(e) for e in range(E)],
    }
    errors = {"gate_proj": error_gu[:E], "up_proj": error_gu[E:], "down_proj": error_down}
    store.install_packed(packed)
    for e in range(E):
        for linear in EXPERT_LINEARS:
            records[store.unit_name(e, linear)] = UnitRecord(**_option(spec), error=float(errors[linear][e]))


def quantize_model(
    model: nn.Module,
    tokens: torch.Tensor,
    config: CompressConfig,
    progress: bool = True,
) -> tuple[dict[str, UnitRecord], Profile]:
    """Quantize ``model`` in place, layer by layer, on calibration ``tokens`` [N, seq_len]."""
    from tqdm.auto import tqdm

    view = MoEView(model)
    spec = config.quant_spec()
    _check_group_size(view, spec, config)
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
            _quantize_linear_units(model, attention, stats["linear"], spec, records)
            for unit in attention:
                profile.record_linear(unit, stats["linear"][unit])
        mlp_units = view.mlp_units(layer) if config.quantize_mlp else []
        stats, handles = collect_layer_stats(
            view, layer, runner, config.min_expert_tokens, config.rare_experts, units=mlp_units
        )
        _run_and_unhook(runner, layer, handles)
        if stats["experts"] is not None:
            _quantize_experts(stats["experts"].store, stats["experts"], spec, records)
            profile.record_experts(layer, stats["experts"])
            experts_done += stats["experts"].store.num_experts
        _quantize_linear_units(model, mlp_units, stats["linear"], spec, records)
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
    **options,
) -> CompressResult:
    """Quantize an MoE model with GPTQ (or RTN) into packed weights; optionally save it to ``out``.

    ``model`` is a local directory, a hub id, or an already loaded transformers model (then pass its
    ``tokenizer``). ``options`` are :class:`CompressConfig` fields (``bits=3, group_size=128, ...``).
    """
    from .data import load_text, token_windows
    from .loading import load_model, load_tokenizer

    config = config or CompressConfig(**options)
    if out is not None:
        from .export.checkpoint import check_output_dir

        check_output_dir(out, overwrite)
    source = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
    if isinstance(model, str):
        tokenizer = tokenizer or load_tokenizer(model, trust_remote_code=trust_remote_code)
        model = load_model(model, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise MoepressError("compress needs a tokenizer with an in-memory model: compress(model, tokenizer, ...)")
    # Fail on an unsupported architecture or a group size that does not fit before any long work.
    _check_group_size(MoEView(model), config.quant_spec(), config)
    text = load_text(config.calib)
    tokens = token_windows(
        text, tokenizer, config.seq_len, config.calib_samples, seed=config.seed, what="calibration"
    )
    started = time.time()
    records, profile = quantize_model(model, tokens, config, progress=progress)
    result = CompressResult(
        model=model,
        tokenizer=tokenizer,
        config=config,
        units=records,
        profile=profile,
        seconds=time.time() - started,
        calibration_tokens=int(tokens.numel()),
        source=str(source),
    )
    if out is not None:
        from .export.checkpoint import save_compressed

        save_compressed(result, out, overwrite=overwrite)
        result.saved_to = out
    return result

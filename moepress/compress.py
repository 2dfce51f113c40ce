"""The main job: calibrate layer by layer and quantize every unit into packed weights.

:func:`compress` reads the source one decoder layer at a time (``moepress.pipeline``), hands each
layer to :class:`QuantizeStep` and writes it to its output shard before the next one is read, so
every layer is calibrated on the outputs of the already-quantized layers before it (as in GPTQ) and
memory is one layer, not the model. A killed run resumes after its last finished layer.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .apply import quantize_batch, treat_batch
from .calibrate import Profile, check_token_weighting, collect_layer_stats
from .errors import MoepressError
from .export.checkpoint import check_output_dir
from .export.format import FORMAT_VERSION
from .model.view import EXPERT_LINEARS, ExpertStore, MoEView
from .pipeline import distributed
from .pipeline.faults import fault_point
from .pipeline.runner import LayerLoop, LayerwiseRunner, model_dtype, resolve_device
from .pipeline.source import ResidentModel
from .quantize import QuantSpec, hessian_weighted_error, rtn_quantize
from .runtime.install import install_experts, install_linear
from .treatment import KEEP, Treatment
from .trim.dynamic import DynamicPruning
from .trim.steps import check_trimming, choose_layer_drops, drop_experts_step, flag_trimming
from .trim.trimming import Trimming


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
    prune: str | None = None  # "50%" or "2:4": prune every routed expert linear (He et al.'s expert slimming)
    pruner: str = "sparsegpt"  # sparsegpt | wanda | magnitude
    prune_scope: str = "experts"  # experts | all (every unit --bits applies to)
    top_k: int | None = None  # route each token of every MoE layer to this many experts (a reduction)
    dynamic_pruning: str | None = None  # "0.3" or "0.3,0.1": ODP settings stored for the loaders
    drop_blocks: int = 0  # decoder layers removed, most similar input/output first (He et al.'s Block Drop)
    drop_moe_layers: int = 0  # MoE sublayers removed, attention kept (He et al.'s Layer Drop)
    drop_experts: str | None = None  # "25%" or "2": routed experts removed from every MoE layer
    drop_criterion: str = "reap"  # frequency | mass | router | reap (moepress.trim.importance)
    expert_chunk: int | None = None  # experts whose Hessians are held at once (None: all of a layer)
    offload_activations: bool = False  # calibration activations in memory-mapped files beside --out
    target: str | None = None  # "llamacpp" or "vllm": that engine's formats and rules (moepress.export.targets)
    ggml_type: str | None = None  # with target llamacpp: the type instead of --bits' default (q4_0, q5_0, ...)
    # Each routed token's weight in its expert's Hessians: plain (1), g or g2 (its routing weight, squared;
    # the default: lower KL than plain on both tiny zoo models at 2 and 3 bits, benchmarks/grids.py).
    expert_hessian: str = "g2"
    clip_search: bool = False  # each group's range searched for the least GPTQ loss instead of min/max
    refine: int = 0  # SignRound steps on each layer's output after GPTQ (moepress.refine); 0: off
    refine_from: str = "gptq"  # the refinement's start: GPTQ's codes, or "rtn" (auto-round's start)
    refine_params: str = "scales"  # what refinement learns: "scales" (codes held) or "rounding" (SignRound)
    refine_frozen_routing: bool = False  # refine with the unquantized layer's expert choices and weights
    # "int8": every quantized unit's input rows fake-quantized per token (W8A8/W4A8, moepress.quantize.activations)
    activations: str | None = None
    # GPTQ's Hessians from the int8-rounded inputs too (routed down: float). Off: within the calibration
    # seeds' spread on the zoo (KL 0.86-1.03x, mean 0.98x; benchmarks/results/activations-2026-12-01.json)
    activations_hessian: bool = False

    def __post_init__(self):
        try:
            self.act_order = QuantSpec.act_order_mode(self.act_order)
        except ValueError as exc:
            raise MoepressError(str(exc)) from None
        if self.prune_scope not in ("experts", "all"):
            raise MoepressError(f"prune-scope must be 'experts' or 'all' (got {self.prune_scope!r})")
        from .export import targets

        targets.check_config(self)  # an unknown target, or flags it cannot express, fail here
        if self.target == "vllm":
            self.symmetric = True  # vLLM's MoE kernels read no zero points (moepress.export.vllm_target)
        check_token_weighting(self.expert_hessian)
        if self.clip_search and self.treatment().format is not None:
            raise MoepressError("--clip-search searches moepress's own grids; a llama.cpp block format chooses its "
                                "parameters its own way (drop --clip-search)")
        self.treatment()  # a bad bit width, group size or damping fails here, in one line
        from .refine import check_config as check_refine

        check_refine(self)
        self._check_activations()
        self.pruned_treatment()
        self._drop_amount()
        DynamicPruning.parse(self.dynamic_pruning)  # a bad value fails here, before any work
        for name in ("drop_blocks", "drop_moe_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise MoepressError(f"{name.replace('_', '-')} must be a count >= 0 (got {value!r})")
        from .trim.importance import DROP_CRITERIA

        if self.drop_criterion not in DROP_CRITERIA:
            raise MoepressError(f"drop-criterion must be one of {', '.join(DROP_CRITERIA)} (got {self.drop_criterion!r})")
        for name in ("calib_samples", "seq_len", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise MoepressError(f"{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.expert_chunk is not None and int(self.expert_chunk) < 1:
            raise MoepressError(f"expert-chunk must be at least 1 (got {self.expert_chunk})")
        if self.rare_experts not in ("all_tokens", "routed_only"):
            raise MoepressError(f"rare-experts must be 'all_tokens' or 'routed_only' (got {self.rare_experts!r})")

    def _check_activations(self) -> None:
        """``activations`` is a scheme moepress applies, with weights and an engine that can say it."""
        from .quantize.activations import check_scheme

        check_scheme(self.activations)
        if self.activations is None:
            return
        if self.target == "llamacpp":
            raise MoepressError("--target llamacpp: --activations: a GGUF stores weight types only (llama.cpp "
                                "picks its own activation types); drop --activations")
        if self.target == "vllm":
            raise MoepressError("--target vllm: --activations: the compressed-tensors export writes weight-only "
                                "schemes (W4A16/W8A16), not W8A8/W4A8's dynamic per-token input_activations; drop "
                                "--activations or serve with moepress's runtime")
        if self.bits == KEEP.bits and self.prune is None:
            raise MoepressError("--activations quantizes the inputs of quantized units, and --bits 16 quantizes none; "
                                "give --bits 8 (W8A8) or 4 (W4A8)")

    def treatment(self) -> Treatment:
        """The one treatment every unit gets without a plan (``--bits``, ``--group-size``, ...);
        ``bits`` 16 keeps the units (with ``--prune``: pruned, the rest kept)."""
        if self.bits == KEEP.bits and self.ggml_type is None:
            return KEEP
        if self.target == "llamacpp":
            from .export.llamacpp_target import block_type

            return Treatment.block_format(block_type(self.bits, self.ggml_type), method=self.method,
                                          act_order=self.act_order, damp=self.damp)
        return Treatment.quantize(self.bits, self.group_size, symmetric=self.symmetric, act_order=self.act_order,
                                  method=self.method, damp=self.damp, clip_search=self.clip_search)

    def pruned_treatment(self) -> Treatment | None:
        """The treatment of the units ``--prune`` applies to: pruned, and quantized at ``bits``."""
        if self.prune is None:
            return None
        pruning = Treatment.parse(self.prune, settings={"pruner": self.pruner, "damp": self.damp})
        if pruning.kind != "prune":
            raise MoepressError(f"--prune takes a sparsity or an N:M pattern, e.g. 50% or 2:4 (got {self.prune!r})")
        return Treatment.prune(pruning.sparsity, pruning.nm, bits=self.bits, group_size=self.group_size,
                               symmetric=self.symmetric, damp=self.damp, pruner=self.pruner)

    def _drop_amount(self) -> tuple[str, float] | None:
        """``drop_experts`` read: ("share", 0.25) for "25%", ("count", 2) for "2", or None."""
        if self.drop_experts is None:
            return None
        text = str(self.drop_experts).strip()
        try:
            if text.endswith("%"):
                share = float(text[:-1]) / 100
                if 0 < share < 1:
                    return "share", share
            elif int(text) >= 1:
                return "count", int(text)
        except ValueError:
            pass
        raise MoepressError(f"--drop-experts takes a share of each layer's experts (25%) or a count (2), "
                            f"got {self.drop_experts!r}")

    def experts_to_drop(self, num_experts: int) -> int:
        """How many of a layer's ``num_experts`` routed experts ``drop_experts`` removes."""
        amount = self._drop_amount()
        if amount is None:
            return 0
        kind, value = amount
        return max(1, round(num_experts * value)) if kind == "share" else int(value)

    def prunes(self, name: str) -> bool:
        """Whether ``--prune`` applies to unit ``name`` (``--prune-scope``)."""
        return self.prune is not None and (self.prune_scope == "all" or ".experts." in name)


@dataclass
class CompressResult:
    """What a compression did. ``model`` is the compressed model: the one held in memory, or, for a
    model streamed from its folder into ``saved_to``, loaded from the checkpoint on first use."""

    _model: nn.Module | None
    tokenizer: object
    config: CompressConfig
    units: dict[str, Treatment]  # what each unit got
    errors: dict[str, float]  # trace((W-Q) H (W-Q)^T), H = X^T X / n: mean squared output error per token
    profile: Profile
    seconds: float
    calibration_tokens: int
    source: str = ""
    saved_to: str | None = None
    plan: object | None = None  # the moepress.allocate.Plan applied, if any
    layer_seconds: list = field(default_factory=list)
    resumed_after_layer: int = 0
    structure: nn.Module | None = None  # the compressed module tree, its streamed layers on ``meta``

    def experts_kept(self) -> dict[int, list[int]]:
        """MoE layer -> the original indices of the experts an expert drop kept (in their new order)."""
        return {int(k.split(".")[1]): [int(i) for i in v.tolist()] for k, v in self.profile.tensors.items()
                if k.endswith(".experts.kept")}

    def dropped(self, part: str) -> list[int]:
        """The decoder layers (``part`` "block") or MoE sublayers ("moe") a layer or block drop removed."""
        return sorted(int(k.split(".")[1]) for k in self.profile.tensors if k.endswith(f".dropped_{part}"))

    def top_k_counts(self) -> dict[int, int]:
        """MoE layer -> the top-k a top-k reduction set."""
        return {int(k.split(".")[1]): int(v[0]) for k, v in self.profile.tensors.items() if k.endswith(".experts.top_k")}

    def footprint(self):
        """Linear weight bytes from the tensors' shapes and dtypes, without loading a streamed model."""
        from .evaluate import measure_footprint

        return measure_footprint(self._model if self._model is not None else self.structure)

    @property
    def model(self) -> nn.Module:
        if self._model is None and self.saved_to is not None:
            from .loading import load_model

            self._model = load_model(self.saved_to)
        return self._model

    def record(self) -> dict:
        """The facts written to ``moepress.json``."""
        from . import __version__

        return {
            "format_version": FORMAT_VERSION,
            "moepress_version": __version__,
            "source_model": self.source,
            "method": self.config.method,
            "target": self.config.target,
            "bits": None if self.plan is not None else self.config.bits,
            "group_size": None if self.plan is not None else
            self.config.treatment().group_size if self.config.target else self.config.group_size,
            "plan": None if self.plan is None else {k: v for k, v in self.plan.to_dict().items() if k != "units"},
            "symmetric": self.config.symmetric,
            "act_order": self.config.act_order if self.config.method == "gptq" else "off",
            "damp": self.config.damp,
            "refine": None if not self.config.refine else {"steps": self.config.refine, "from": self.config.refine_from,
                                                           "params": self.config.refine_params,
                                                           "frozen_routing": self.config.refine_frozen_routing},
            "clip_search": self.config.clip_search,
            "activations": self.config.activations,  # int8: per-token dynamic inputs of every quantized unit
            "prune": None if self.config.prune is None else {"pattern": self.config.prune, "pruner": self.config.pruner,
                                                             "scope": self.config.prune_scope},
            "drop_experts": None if self.config.drop_experts is None else {
                "amount": self.config.drop_experts, "criterion": self.config.drop_criterion},
            "experts_kept": {str(layer): kept for layer, kept in self.experts_kept().items()},
            "top_k": {str(layer): k for layer, k in self.top_k_counts().items()},
            "dropped_blocks": self.dropped("block"),
            "dropped_moe_layers": self.dropped("moe"),
            "dynamic_pruning": None if self.config.dynamic_pruning is None else
            DynamicPruning.parse(self.config.dynamic_pruning).to_dict(),
            "calibration": {
                "source": self.config.calib,
                "samples": self.config.calib_samples,
                "seq_len": self.config.seq_len,
                "tokens": self.calibration_tokens,
                "seed": self.config.seed,
                "min_expert_tokens": self.config.min_expert_tokens,
                "rare_experts": self.config.rare_experts,
                "expert_hessian": self.config.expert_hessian,
            },
            "seconds": round(self.seconds, 2),
            "layer_seconds": self.layer_seconds,
            "resumed_after_layer": self.resumed_after_layer,
            "units": unit_records(self.units, self.errors),
        }


def unit_records(units: dict[str, Treatment], errors: dict[str, float]) -> dict:
    """The unit map of ``moepress.json``: every unit's treatment and its measured output error."""
    return {name: {**treatment.to_unit_map(), "error": errors[name]} for name, treatment in units.items()}


def read_unit_records(records: dict) -> tuple[dict[str, Treatment], dict[str, float]]:
    """Inverse of :func:`unit_records`."""
    units = {name: Treatment.from_unit_map(rec, name) for name, rec in records.items()}
    return units, {name: float(rec.get("error", 0.0)) for name, rec in records.items()}


def unit_treatments(config: CompressConfig, resolved: dict[str, Treatment] | None):
    """Name -> treatment: a resolved plan's, or ``config``'s (``--bits``, ``--prune``) for every unit."""
    if resolved is not None:
        return resolved.__getitem__
    uniform, pruned = config.treatment(), config.pruned_treatment()  # built once, not per unit

    def treatment_of(name: str) -> Treatment:
        return pruned if config.prunes(name) else uniform

    return treatment_of


def _check_shapes(view: MoEView, config: CompressConfig) -> None:
    """Every unit's treatment (``--bits``, ``--prune``) fits its shape, checked before any work."""
    treatment_of = unit_treatments(config, None)
    for name, (out_features, in_features) in view.unit_shapes().items():
        if ".attn." in name and not config.quantize_attention:
            continue
        treatment_of(name).check_shape(out_features, in_features, name)


def _quantize_linear_units(model, units, stats, treatment_of, records, device: torch.device) -> None:
    """Quantize ``units`` (attention, shared-expert or dense-MLP linears) and install packed linears.
    Under torchrun each rank quantizes its share and every rank installs all of them. ``records``
    gets (treatment, error) per unit."""
    done: dict[str, tuple] = {}  # name -> (packed weight, or None: kept; (treatment, error))
    for unit in distributed.shard(units):
        treatment = treatment_of(unit.name)
        if treatment.keep:
            done[unit.name] = (None, (KEEP, 0.0))
            continue
        module = model.get_submodule(unit.module_path)
        packed, error = treat_batch(module.weight, stats[unit].hessian(), treatment, unit.name)
        done[unit.name] = (packed, (treatment, float(error[0])))
    done = distributed.share(done, device)
    for unit in units:
        packed, records[unit.name] = done[unit.name]
        if packed is not None:
            module = model.get_submodule(unit.module_path)
            install_linear(model, unit.module_path, packed, module.bias)


class _ByExpert:
    """A chunk's [C, ...] Hessians indexed by expert number."""

    def __init__(self, tensor: torch.Tensor, first: int):
        self.tensor, self.first = tensor, first

    def __getitem__(self, expert: int) -> torch.Tensor:
        return self.tensor[expert - self.first]


def _quantize_experts(store: ExpertStore, stats, treatment_of, records, packed: dict) -> None:
    """The routed experts of ``stats.chunk``, batched: the experts of one linear with the same treatment
    are one batched GPTQ call (gate and up share their Hessians, which are passed as they are, not
    stacked into copies: a Mixtral-8x7B layer's down Hessians alone are 6.6 GB). With one treatment
    for all, that is three calls per chunk. The
    results go into ``packed[linear][expert]``; the caller installs them once every chunk is done."""
    in_hessian, mid_hessian = (_ByExpert(h, stats.chunk.start) for h in stats.hessians())
    name = f"layers.{store.layer}.experts"
    weights = {linear: store.weight(linear) for linear in EXPERT_LINEARS}
    for linear in EXPERT_LINEARS:
        hessian = mid_hessian if linear == "down_proj" else in_hessian
        batches: dict[Treatment, list[int]] = {}
        splits: list[tuple[str, int, Treatment]] = []
        for e in stats.chunk:
            treatment = treatment_of(store.unit_name(e, linear))
            if treatment.kind == "split":
                splits.append((linear, e, treatment))
            else:
                batches.setdefault(treatment, []).append(e)
        if splits:
            _quantize_splits(store, weights, hessian, splits, packed, records)
        for treatment, experts in batches.items():
            if treatment.keep:  # kept in 16 bits
                for e in experts:
                    packed[linear][e] = weights[linear][e].detach().clone()
                    records[store.unit_name(e, linear)] = (KEEP, 0.0)
                continue
            if experts == list(stats.chunk):  # the whole chunk: its tensors as they are, no stacked copies
                w = weights[linear][stats.chunk.start:stats.chunk.stop]
                h = hessian.tensor
            else:
                w = torch.stack([weights[linear][e] for e in experts])
                h = torch.stack([hessian[e] for e in experts])
            q, err = treat_batch(w, h, treatment, f"{name}.{linear}")
            for i, e in enumerate(experts):
                packed[linear][e] = q.select(i)
                records[store.unit_name(e, linear)] = (treatment, float(err[i]))


def _quantize_splits(store: ExpertStore, weights, hessian, splits, packed, records) -> None:
    """Expert linears whose intermediate neurons are split into equal groups with their own treatments.

    Gate and up are split by rows, which GPTQ treats independently: every (linear, expert, group)
    row block with the same treatment is one batched call on its expert's Hessian, exactly what
    quantizing the whole matrix would give those rows. Down is split by columns: one GPTQ pass per
    expert over all its columns (``gptq_quantize_segments``) so later groups still absorb earlier
    groups' error.
    """
    from .quantize import gptq_quantize_segments
    from .runtime import SplitWeight

    pieces: dict[tuple[str, int], list] = {}
    row_batches: dict[Treatment, list[tuple[str, int, int, int]]] = {}
    for linear, e, split in splits:
        n = len(split.pieces)
        width = store.intermediate_size // n
        pieces[linear, e] = [None] * n
        if linear == "down_proj":
            w = weights[linear][e].detach().float()
            if split.method == "gptq":  # segments are contiguous: no act-order across them
                segments = [(width, p.with_settings(act_order="off").spec()) for p in split.pieces]
                got, _ = gptq_quantize_segments(w, hessian[e], segments, name=store.unit_name(e, linear))
            else:
                got = [w[:, k * width:(k + 1) * width].clone() if p.keep else
                       rtn_quantize(w[:, k * width:(k + 1) * width], p.spec(), name=store.unit_name(e, linear))
                       for k, p in enumerate(split.pieces)]
            dtype = weights[linear][e].dtype
            pieces[linear, e] = [p.to(dtype) if isinstance(p, torch.Tensor) else p for p in got]
        else:
            for k, piece in enumerate(split.pieces):
                row_batches.setdefault(piece, []).append((linear, e, k, width))
    for piece, members in row_batches.items():
        rows = [weights[linear][e][k * width:(k + 1) * width] for linear, e, k, width in members]
        if piece.keep:
            for (linear, e, k, _), w in zip(members, rows):
                pieces[linear, e][k] = w.detach().clone()
            continue
        q, _ = quantize_batch(torch.stack(rows), torch.stack([hessian[e] for _, e, _, _ in members]), piece.spec(),
                              f"layers.{store.layer}.experts (neuron groups)")
        for i, (linear, e, k, _) in enumerate(members):
            pieces[linear, e][k] = q.select(i)
    for linear, e, split in splits:
        weight = SplitWeight(pieces[linear, e], split.axis)
        packed[linear][e] = weight
        w = weights[linear][e].detach().float()
        error = hessian_weighted_error(w, weight.dequantize(torch.float32).to(w.device), hessian[e])
        records[store.unit_name(e, linear)] = (split, float(error))


class QuantizeStep:
    """The compression of one decoder layer, in three passes over the calibration tokens:

    1. attention: record the inputs of the attention projections, quantize them, install packed linears;
    2. MLP: with the quantized attention in place, record routing and per-expert inputs (and those of
       the shared expert or dense MLP), quantize the routed experts (one batched GPTQ call per option,
       ``expert_chunk`` experts' Hessians at a time), install packed experts;
    3. output: run the now fully quantized layer to produce the next layer's inputs.

    Returns the layer's unit records (JSON) and its calibration statistics (profile tensors).

    ``trimming`` (a :class:`~moepress.trim.trimming.Trimming`: a plan's, or what the flags decided
    before the pass; default: ``config``'s ``--top-k``) drops the layer's block, or its MoE sublayer
    after the attention, sets its top-k and drops its experts before they are calibrated; without a
    planned expert drop, ``--drop-experts`` chooses one on the layer's inputs. After an expert drop
    the units are looked up by their original names (``treatment_of`` speaks of the source model)
    and recorded by the saved ones.
    """

    def __init__(self, view: MoEView, config: CompressConfig, treatment_of, trimming: Trimming | None = None):
        self.view = view
        self.config = config
        self.treatment_of = treatment_of  # canonical unit name (of the source model) -> Treatment
        self.trimming = flag_trimming(view, config) if trimming is None else trimming

    def __call__(self, layer: int, runner: LayerwiseRunner):
        config, view, treatment_of, trim = self.config, self.view, self.treatment_of, self.trimming
        records: dict[str, tuple[Treatment, float]] = {}
        part = Profile()
        fault_point("mid_layer", layer)
        if layer in trim.dropped_blocks:  # the whole decoder layer goes: its input passes through
            from .trim.layer_drop import drop_block

            drop_block(view.model, layer)
            runner.run_layer(layer, update=True)
            return {}, {f"layers.{layer}.dropped_block": torch.ones(1)}
        refinement = None
        # Refinement's targets, the unquantized layer's outputs, come from the attention statistics pass
        # (the same forward of the same layer) unless that pass rounds its inputs (--activations) or is not run.
        record_in_pass = config.quantize_attention and config.activations is None
        if config.refine:  # the unquantized layer's outputs, before any unit of it is quantized
            from .refine import begin

            refinement = begin(view, layer, runner, config.refine, config.expert_chunk, config.refine_frozen_routing,
                               config.refine_from, config.refine_params, defer=record_in_pass)
        if config.quantize_attention:
            attention = view.attention_units(layer)
            rounded = _round_calibration_inputs(view, attention, None, treatment_of, config)
            stats, handles = collect_layer_stats(view, layer, runner, 0, "routed_only", units=attention, experts=False)
            handles += rounded
            if refinement is not None and record_in_pass:
                handles += refinement.recording_hooks()
            _run_and_unhook(runner, layer, handles)
            _quantize_linear_units(view.model, attention, stats["linear"], treatment_of, records, runner.device)
            for unit in attention:
                part.record_linear(unit, stats["linear"][unit])
            _quantize_inputs(view, layer, records, config)  # the MLP's calibration sees W+A-quantized attention
        if layer in trim.dropped_moe_layers:
            from .trim.layer_drop import drop_moe_layer

            drop_moe_layer(view.model, layer)
            part.tensors[f"layers.{layer}.dropped_moe"] = torch.ones(1)
        if layer in trim.top_k:
            from .trim.top_k import set_top_k

            set_top_k(view.model, layer, trim.top_k[layer])
            part.tensors[f"layers.{layer}.experts.top_k"] = torch.tensor([trim.top_k[layer]], dtype=torch.int64)
        if layer in trim.dropped_experts:
            from .trim.expert_drop import drop_experts

            keep = trim.kept_experts(layer, view.experts(layer).num_experts)
            drop_experts(view.model, layer, keep)
            part.tensors[f"layers.{layer}.experts.kept"] = torch.tensor(keep, dtype=torch.int64)
        elif config.drop_experts is not None and view.experts(layer) is not None:
            part.tensors.update(drop_experts_step(view, layer, runner, config))
        if f"layers.{layer}.experts.kept" in part.tensors:  # saved expert j is the source's kept[j]
            treatment_of = _renumbered(treatment_of, layer, part.tensors[f"layers.{layer}.experts.kept"].tolist())
        mlp_units = view.mlp_units(layer) if config.quantize_mlp else []
        store = view.experts(layer)
        chunks = _expert_chunks(store, config.expert_chunk)
        rounded = _round_calibration_inputs(view, mlp_units, store, treatment_of, config)
        stats, handles = collect_layer_stats(view, layer, runner, config.min_expert_tokens, config.rare_experts,
                                             units=mlp_units, experts_chunk=chunks[0] if chunks else None,
                                             token_weighting=config.expert_hessian)
        handles += rounded
        captured: list = []
        if len(chunks) > 1:  # the experts' inputs, kept for the chunks after the first
            handles.append(store.module.register_forward_pre_hook(_capture_expert_inputs(captured), with_kwargs=True))
        _run_and_unhook(runner, layer, handles)
        if stats["experts"] is not None:
            _quantize_routed_experts(store, stats["experts"], captured, chunks, treatment_of, records, runner.device)
            part.record_experts(layer, stats["experts"])
        _quantize_linear_units(view.model, mlp_units, stats["linear"], treatment_of, records, runner.device)
        for unit in mlp_units:
            part.record_linear(unit, stats["linear"][unit])
        if refinement is not None:
            part.tensors.update(refinement.finish())
        _quantize_inputs(view, layer, records, config)  # (after refinement, which reinstalls the packed modules)
        runner.run_layer(layer, update=True)
        units = {name: treatment for name, (treatment, _) in records.items()}
        return unit_records(units, {name: error for name, (_, error) in records.items()}), part.tensors


def _quantize_inputs(view: MoEView, layer: int, records: dict, config: CompressConfig) -> None:
    """``--activations``: the inputs of layer ``layer``'s quantized units so far, quantized per token
    (the next layers are calibrated on what the W+A-quantized model computes)."""
    if config.activations is None:
        return
    from .runtime.install import apply_activations

    quantized = {name for name, (treatment, _) in records.items() if not treatment.keep}
    apply_activations(view.model, config.activations, quantized.__contains__, layers=range(layer, layer + 1))


def _round_calibration_inputs(view: MoEView, units, store: ExpertStore | None, treatment_of,
                              config: CompressConfig) -> list:
    """``--activations`` with ``activations_hessian``: the float inputs of the ``units`` (and of the
    routed experts in ``store``) about to be quantized are int8-rounded while their Hessians are
    gathered, so GPTQ minimises the error on the inputs the runtime will give them. The hooks come
    before the statistics' own; the linears' go with the float modules quantization replaces, the
    experts' handle is returned for the caller to remove. (The routed down projection's Hessian is
    still formed from the float ``act(gate) * up`` the statistics compute.)"""
    if config.activations is None or not config.activations_hessian:
        return []
    from .quantize.activations import fake_quantize, quantize_linear_inputs

    scheme = config.activations
    for unit in units:
        if not treatment_of(unit.name).keep:
            quantize_linear_inputs(view.model.get_submodule(unit.module_path), scheme)
    if store is None or store.layout == "per_expert" or all(treatment_of(n).keep for n in store.unit_names()):
        return []

    def hook(_module, args, kwargs):
        if args:
            return (fake_quantize(args[0], scheme), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fake_quantize(kwargs["hidden_states"], scheme)}

    return [store.module.register_forward_pre_hook(hook, with_kwargs=True)]


def _renumbered(treatment_of, layer: int, kept: list[int]):
    """``treatment_of`` for layer ``layer`` after an expert drop: the saved expert j's units are the
    source's expert ``kept[j]``'s."""
    prefix = f"layers.{layer}.experts."

    def lookup(name: str) -> Treatment:
        if name.startswith(prefix):
            expert, _, rest = name[len(prefix):].partition(".")
            name = f"{prefix}{kept[int(expert)]}.{rest}"
        return treatment_of(name)

    return lookup


def _capture_expert_inputs(captured: list):
    names = ("hidden_states", "top_k_index", "top_k_weights")

    def fn(_module, args, kwargs):
        values = list(args) + [kwargs[n] for n in names[len(args):]]
        captured.append(tuple(v.detach() for v in values[:3]))

    return fn


def _expert_chunks(store: ExpertStore | None, chunk: int | None) -> list[range]:
    """The experts this rank quantizes (all of the layer's on one process, a contiguous share of
    them under torchrun), ``chunk`` at a time (``--expert-chunk``; default: all at once). A rank
    left without experts (more ranks than experts) gets one empty chunk."""
    if store is None:
        return []
    owned = distributed.shard_range(store.num_experts)
    size = chunk or len(owned) or 1
    return [range(start, min(owned.stop, start + size)) for start in range(owned.start, owned.stop, size)] or [owned]


def _quantize_routed_experts(store: ExpertStore, first, captured: list, chunks: list[range], treatment_of,
                             records, device: torch.device) -> None:
    """Quantize this rank's experts chunk by chunk, then install the whole layer's packed experts.

    The first chunk's statistics (``first``) came from the layer's pass; each further chunk gathers
    its experts' Gram matrices from the captured expert inputs (the same tensors the pass saw, in
    the same order), is quantized, and its Hessians are freed before the next. Under torchrun every
    rank's packed experts, records and channel norms are then shared, so every rank installs (and
    profiles) the same complete layer.
    """
    from .calibrate import ExpertInputStats

    packed = {linear: [None] * store.num_experts for linear in EXPERT_LINEARS}
    owned_records: dict[str, tuple[Treatment, float]] = {}
    _quantize_experts(store, first, treatment_of, owned_records, packed)
    for experts in chunks[1:]:
        stats = ExpertInputStats(store, first.device, rare=first.rare, chunk=experts, token_weighting=first.token_weighting)
        for hidden, index, weights in captured:
            stats.add(hidden, index, weights)
        _quantize_experts(store, stats, treatment_of, owned_records, packed)
        first.add_norms_of(stats)
        del stats
    if distributed.world_size() > 1:
        owned_records = _share_experts(store, first, chunks, packed, owned_records, device)
    records.update(owned_records)
    install_experts(store, packed)


def _share_experts(store: ExpertStore, stats, chunks: list[range], packed: dict, owned_records: dict,
                   device: torch.device) -> dict:
    """Fill ``packed`` and the channel norms of ``stats`` with every rank's experts; returns every
    expert's records, in expert order."""
    def names(e):
        return [store.unit_name(e, linear) for linear in EXPERT_LINEARS]

    owned = {e: ({linear: packed[linear][e] for linear in EXPERT_LINEARS}, stats.in_sq_norm[e], stats.mid_sq_norm[e],
                 {name: owned_records[name] for name in names(e)})
             for chunk in chunks for e in chunk}
    every = distributed.share(owned, device)
    records = {}
    for e in range(store.num_experts):
        weights, in_norm, mid_norm, expert_records = every[e]
        stats.in_sq_norm[e], stats.mid_sq_norm[e] = in_norm, mid_norm
        for linear in EXPERT_LINEARS:
            packed[linear][e] = weights[linear]
        records.update(expert_records)
    return records


def _records_and_profile(results, view: MoEView, tokens, config: CompressConfig):
    """Every unit's treatment and error, and the profile, from the layers' results (JSON records)."""
    units, errors = {}, {}
    profile = Profile.start(view.model_type, tokens, config.min_expert_tokens, config.rare_experts)
    for layer_records, tensors in results:
        layer_units, layer_errors = read_unit_records(layer_records)
        units.update(layer_units)
        errors.update(layer_errors)
        profile.tensors.update(tensors)
    return units, errors, profile


def quantize_model(
    model: nn.Module,
    tokens: torch.Tensor,
    config: CompressConfig,
    progress: bool = True,
    treatments: dict[str, Treatment] | None = None,
) -> tuple[dict[str, Treatment], dict[str, float], Profile]:
    """Quantize a model held in memory in place, layer by layer, on calibration ``tokens`` [N, seq_len].

    ``treatments`` (a resolved plan: every linear's canonical name -> its
    :class:`~moepress.treatment.Treatment`) replaces ``config``'s one treatment for all units.
    Returns every unit's treatment, its measured output error, and the calibration profile.
    (:func:`compress` streams a model from its folder instead; both run the same :class:`QuantizeStep`.)
    """
    view = MoEView(model)
    if treatments is None:
        _check_shapes(view, config)
    loop = LayerLoop(ResidentModel(model), tokens, device=config.device, batch_size=config.batch_size,
                     progress=progress, desc="quantize")
    results = loop.run(QuantizeStep(view, config, unit_treatments(config, treatments)))
    return _records_and_profile(results, view, tokens, config)


def _run_and_unhook(runner: LayerwiseRunner, layer: int, handles) -> None:
    try:
        runner.run_layer(layer, update=False)
    finally:
        for handle in handles:
            handle.remove()


def _settings(config: CompressConfig, plan, tokens: torch.Tensor) -> dict:
    """Everything that changes the output tensors (a resumed run must match them all)."""
    from . import __version__
    from .pipeline.resume import tokens_hash

    settings = {k: v for k, v in asdict(config).items() if k not in ("device",)}
    settings["device"] = str(resolve_device(config.device).type)
    settings["plan"] = None if plan is None else plan.to_dict()["units"]
    if plan is not None and not plan.trim.empty:
        settings["trim"] = plan.trim.to_dict()
    settings["tokens"] = tokens_hash(tokens)
    settings["moepress_version"] = __version__
    settings["format_version"] = FORMAT_VERSION
    return settings


def compress(
    model: str | nn.Module,
    tokenizer=None,
    config: CompressConfig | None = None,
    *,
    out: str | None = None,
    overwrite: bool = False,
    restart: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
    plan=None,
    budget: str | None = None,
    planning=None,
    project: bool = False,
    **options,
) -> CompressResult:
    """Quantize an MoE model with GPTQ (or RTN) into packed weights; optionally save it to ``out``.

    ``model`` is a local directory or a hub id, read one decoder layer at a time from its safetensors
    shards (memory: about one layer, not the model), or an already loaded transformers model (then pass
    its ``tokenizer``). ``options`` are :class:`CompressConfig` fields (``bits=3, group_size=128, ...``).
    ``plan`` (a :class:`~moepress.allocate.Plan` or the path of a plan file) gives every unit its own
    option instead of one ``bits``/``group_size``; its quantization settings (method, symmetric,
    act-order, damping) then apply, and its ``trim`` (blocks, MoE sublayers and experts dropped,
    top-k reduced: :class:`~moepress.trim.trimming.Trimming`) is done in the same pass.

    With ``out``, every finished layer is kept in a working folder beside ``out`` and the folder is
    renamed into ``out`` when complete; the same call after a crash or ``kill -9`` resumes after the
    last finished layer and writes the same tensors (``restart=True`` discards the partial run).

    ``budget`` (``"2.5bits"``, ``"11GB"``) plans and compresses in one call: the cost-table pass
    (resumable too), an allocation with ``planning`` (a :class:`~moepress.allocate.command.PlanOptions`
    or a dict of its fields: strategy, scope, estimator, granularity, ...), then the compression;
    the plan and the cost table are saved in ``out`` (``plan.yaml``, ``costs.safetensors``).

    Under ``torchrun --nproc-per-node N`` every rank runs this same call: each quantizes its share
    of every layer's units (mainly the routed experts), all install the whole packed layer, and
    rank 0 alone writes ``out`` and shows progress (:mod:`moepress.pipeline.distributed`); the
    tensors are those of one process.
    """
    from .data import load_text, token_windows
    from .loading import load_tokenizer
    from .pipeline.source import open_source

    # Under torchrun the ranks form one group; each quantizes its share of every layer's units, and
    # rank 0 alone writes and prints (moepress.pipeline.distributed).
    device = distributed.init_from_env(config.device if config is not None else options.get("device"))
    main = distributed.is_main()
    progress = progress and main
    if budget is not None and distributed.world_size() > 1:
        raise MoepressError("compress --budget does not run under torchrun yet: make the plan first "
                            "(moepress plan ... -o plan.yaml), then torchrun ... compress --plan plan.yaml")
    if budget is not None and plan is not None:
        raise MoepressError("--budget makes a plan, so it does not combine with --plan; give one of them")
    if budget is not None and (options.get("target") or getattr(config, "target", None)):
        from .allocate.command import PlanOptions  # the plan in the target's types, ties and refusals

        planning = planning if isinstance(planning, PlanOptions) else PlanOptions(**(planning or {}))
        planning.target = options.get("target") or config.target
        planning.project = planning.project or project
    costs_work = None
    if budget is not None:
        if not isinstance(model, str):
            raise MoepressError("compress with a budget streams the model: give its folder or hub id")
        if out is not None:
            check_output_dir(out, overwrite)
        plan, costs_work, opened = _plan_for_budget(model, budget, planning, out, restart, progress,
                                                    trust_remote_code)
    if plan is not None:
        from .allocate import load_plan

        plan = load_plan(plan) if isinstance(plan, str) else plan
        options = {**options, **{k: v for k, v in plan.quantization.items()
                                 if k in ("method", "symmetric", "act_order", "damp")}}
    config = config or CompressConfig(**options)
    if plan is not None and (config.drop_experts is not None or config.top_k is not None or config.drop_blocks
                             or config.drop_moe_layers):
        raise MoepressError("--drop-experts, --drop-blocks, --drop-moe-layers and --top-k do not combine with --plan "
                            "or --budget; write the trimming in the plan's trim: section instead (dropped_experts, "
                            "top_k, dropped_blocks, dropped_moe_layers)")
    if plan is not None and config.refine and not plan.trim.empty:
        raise MoepressError("--refine does not combine with a plan's trim: section yet; trim first, then compress "
                            "the trimmed model with --refine")
    if plan is not None and config.prune is not None:
        raise MoepressError("a plan gives every unit its treatment, so --prune does not combine with --plan or "
                            "--budget; write pruned treatments in the plan instead (e.g. 2:4+4b-g128)")
    if plan is not None and not (config.quantize_attention and config.quantize_mlp):
        raise MoepressError("a plan gives every unit its option, so --keep-attention does not combine with --plan; "
                            "write 16b for the attention units in the plan instead")
    if out is not None:
        check_output_dir(out, overwrite)
    source_name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
    if isinstance(model, str):
        tokenizer = tokenizer or load_tokenizer(model, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise MoepressError("compress needs a tokenizer with an in-memory model: compress(model, tokenizer, ...)")
    source = open_source(opened if budget is not None else model, trust_remote_code=trust_remote_code)
    view = MoEView(source.model)
    # Fail on an unsupported architecture, a group size or a plan that does not fit before any long work.
    treatments = None
    if plan is not None:
        from .costs import model_rows

        plan.trim.check(view.model)
        if project:  # --project: the nearest plan the target can express (moepress.allocate.project)
            from .allocate.command import project_onto

            if config.target is None:
                raise MoepressError("--project turns a plan into one a target can express; give --target")
            if budget is None:  # (a budget's plan was projected when it was made)
                plan = project_onto(plan, model_rows(view), config.target, view)
        treatments = plan.resolve(model_rows(view))
    else:
        _check_shapes(view, config)
    check_trimming(view, config)
    if config.target is not None:  # what the engine cannot hold is refused here, before any work
        from .export.targets import target_rules

        rules = target_rules(config.target)
        if plan is None:  # --bits: the engine's own type for each unit
            treatments = rules.resolve(view, config)
        trim = plan.trim if plan is not None else None
        rules.check_trimming(view, trim, config)
        rules.check_units(view, unit_treatments(config, treatments), trim)
    text = load_text(config.calib)
    tokens = token_windows(
        text, tokenizer, config.seq_len, config.calib_samples, seed=config.seed, what="calibration"
    )
    work = None
    if out is not None:
        check_free_space_for(out, source, view, config)
        if source.streamed and progress and main:
            _report_memory(source, config)
        # A model held in memory cannot be fingerprinted, and it was changed in place by the run that
        # died: its runs always start afresh.
        work = _open_work_folder(out, _settings(config, plan, tokens), source.fingerprint(), view.num_layers,
                                 restart=restart or not source.streamed, device=device)
    started = time.time()
    loop = LayerLoop(source, tokens, device=device, batch_size=config.batch_size, work=work,
                     write_layers=out is not None and main, keep_layers=out is None or not source.streamed,
                     offload_activations=config.offload_activations, progress=progress, desc="quantize")
    if work is not None and work.finished:  # killed while renaming the finished folder: only that is left
        work.finish(overwrite)
        distributed.finish()  # (the other ranks read the record once rank 0 has moved it into OUT)
        return _result_of_saved(out, tokenizer, config, plan, tokens, view)
    trimming = plan.trim if plan is not None else \
        flag_trimming(view, config, *choose_layer_drops(source, view, tokens, config, device, progress))
    if plan is None and config.drop_experts is not None and config.drop_criterion == "kl":
        from .trim.steps import choose_kl_drops

        trimming = choose_kl_drops(source, view, tokens, config, trimming, progress, trust_remote_code)
    results = loop.run(QuantizeStep(view, config, unit_treatments(config, treatments), trimming))
    distributed.barrier()  # every rank is past its last layer before rank 0 completes (and renames) the folder
    units, errors, profile = _records_and_profile(results, view, tokens, config)
    result = CompressResult(
        _model=None if (source.streamed and out is not None) else source.model,
        tokenizer=tokenizer,
        config=config,
        units=units,
        errors=errors,
        profile=profile,
        seconds=time.time() - started,
        calibration_tokens=int(tokens.numel()),
        source=str(source_name),
        plan=plan,
        layer_seconds=loop.layer_seconds,
        resumed_after_layer=loop.resumed_after,
        structure=source.model,
    )
    if out is None:
        if source.streamed:
            source.load_outer()  # the whole (packed) model stays in memory: the caller asked for it
        distributed.finish()
        return result
    from .export.checkpoint import write_checkpoint

    if costs_work is not None:  # the plan and the cost table it was chosen from go into OUT too
        import shutil

        for name in (PLAN_FILE, COSTS_FILE):
            shutil.copyfile(os.path.join(costs_work.path, name), os.path.join(work.path, name))
    if main:
        write_checkpoint(work, result, source, overwrite=overwrite)
    if costs_work is not None:
        costs_work.discard()
    distributed.finish()  # the other ranks return once the checkpoint is complete
    result.saved_to = out
    return result


def _open_work_folder(out: str, settings: dict, fingerprint: dict, num_layers: int, *, restart: bool,
                      device: torch.device):
    """The run's working folder. Under torchrun rank 0 opens it (creates, resumes or refuses it) and
    tells the other ranks where the run is, so that every rank resumes after the same layer."""
    from .pipeline.resume import WorkFolder, WorkFolderReader

    if distributed.world_size() == 1:
        return WorkFolder(out, settings, fingerprint, num_layers, restart=restart)
    work, failure = None, None
    if distributed.is_main():
        try:
            work = WorkFolder(out, settings, fingerprint, num_layers, restart=restart)
        except Exception as exc:  # every rank must hear of it, or the others wait for rank 0 forever
            failure = exc
    message, state = distributed.from_main(
        (None if failure is None else str(failure) or type(failure).__name__, work and work.state()), device)
    if failure is not None:
        raise failure
    if message is not None:
        raise MoepressError(message)
    return work if work is not None else WorkFolderReader(out, settings, fingerprint, num_layers, state)


PLAN_FILE = "plan.yaml"
COSTS_FILE = "costs.safetensors"


def _plan_for_budget(model: str, budget: str, planning, out: str | None, restart: bool, progress: bool,
                     trust_remote_code: bool):
    """The cost-table pass and the allocation of ``compress --budget``; with ``out``, the pass keeps
    its finished layers in ``.OUT.moepress-costs`` (resumable) and the finished table and plan there
    until the compression is complete. Returns the plan, the costs folder (or None) and the opened
    source, which the compression pass then reads again (its layers are all released)."""
    import shutil
    from dataclasses import asdict as as_dict

    from . import __version__
    from .allocate.command import PlanOptions, check_target_options, plan_model, summary
    from .pipeline.resume import WorkFolder
    from .pipeline.source import StreamedModel

    options = planning if isinstance(planning, PlanOptions) else PlanOptions(**(planning or {}))
    options.budget = budget
    source = StreamedModel(model, trust_remote_code=trust_remote_code)
    check_target_options(options, source)  # (a refusal leaves no costs folder behind)
    if out is None:
        plan, _ = plan_model(model, options, progress=progress, trust_remote_code=trust_remote_code, source=source)
        return plan, None, source
    settings = {**as_dict(options), "table": None, "moepress_version": __version__}
    work = WorkFolder(out, settings, source.fingerprint(), MoEView(source.model).num_layers, restart=restart,
                      kind="costs")
    cache = options.table  # --table: a cost table to reuse (or to keep a copy of)
    options.table = os.path.join(work.path, COSTS_FILE)
    if cache and os.path.isfile(cache) and not os.path.isfile(options.table):
        shutil.copyfile(cache, options.table)
    plan_file = os.path.join(work.path, PLAN_FILE)
    plan, _ = plan_model(model, options, progress=progress, trust_remote_code=trust_remote_code, work=work,
                         source=source)
    plan.save(plan_file)
    if cache and not os.path.isfile(cache):
        shutil.copyfile(options.table, cache)
    if progress:
        import sys

        print(summary(plan, budget), file=sys.stderr)
    return plan, work, source


def _result_of_saved(out: str, tokenizer, config: CompressConfig, plan, tokens, view: MoEView) -> CompressResult:
    """The result of a run whose checkpoint was complete before the kill (its statistics are not kept)."""
    from .export.record import read_record

    record = read_record(out)
    units, errors = read_unit_records(record["units"])
    profile = Profile.start(view.model_type, tokens, config.min_expert_tokens, config.rare_experts)
    return CompressResult(_model=None, tokenizer=tokenizer, config=config, units=units, errors=errors, profile=profile,
                          seconds=float(record.get("seconds", 0.0)), calibration_tokens=int(tokens.numel()),
                          source=record.get("source_model", ""), saved_to=out, plan=plan,
                          layer_seconds=record.get("layer_seconds", []),
                          resumed_after_layer=view.num_layers, structure=view.model)


def _report_memory(source, config: CompressConfig) -> None:
    """Say what the run will hold (moepress.pipeline.memory), and what to do when that exceeds the
    memory available."""
    import sys

    from .pipeline.memory import estimate, memory_available

    est = estimate(source, calib_samples=config.calib_samples, seq_len=config.seq_len, method=config.method,
                   batch_size=config.batch_size, expert_chunk=config.expert_chunk,
                   offload_activations=config.offload_activations, refine=config.refine)
    print(f"memory: one decoder layer at a time, {est.describe()}", file=sys.stderr)
    available = memory_available()
    if available is not None and est.peak > available:
        print(f"moepress: warning: that is more than the {available / 1e9:.2f} GB available; lower --expert-chunk "
              "(Hessians and quantizer scale with it) or --calib-samples, or pass --offload-activations",
              file=sys.stderr)


def check_free_space_for(out: str, source, view: MoEView, config: CompressConfig) -> None:
    """The output takes about (bits + 1) / 16 of the linear weights' 16-bit bytes plus the rest at 16
    bits; refuse before the run when the disk cannot hold it (with a 10% margin)."""
    from .costs import model_rows

    element = torch.empty(0, dtype=model_dtype(source.model)).element_size()
    linear_params = sum(r.params for r in model_rows(view))
    all_params = sum(p.numel() for p in source.model.parameters())
    bits = 16 if config.bits is None else config.bits
    expected = int(linear_params * (bits + 1) / 8 + (all_params - linear_params) * element)
    from .preflight import check_free_space

    check_free_space(os.path.dirname(os.path.abspath(out)), int(expected * 1.1), f"the checkpoint {out}")

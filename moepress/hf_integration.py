"""A transformers quantizer, so ``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` loads moepress checkpoints.

``import moepress`` registers ``quant_method="moepress"``. transformers then builds the model
skeleton, calls :meth:`MoepressHfQuantizer._process_model_before_weight_loading` (which swaps every
quantized unit for an empty packed module, from the unit map in ``config.json``) and loads the
packed tensors from the safetensors shards into those modules, as it does for GPTQ checkpoints.

Loading never guesses. Before any weight is read, the shards' headers are checked against the
skeleton: every tensor the unit map implies must be stored, with its shape and dtype, and no other
(a missing tensor would otherwise be randomly initialised, and zero points stored for a unit the
edited config calls symmetric silently ignored). A format version this moepress does not know is
refused before anything else.
"""

from __future__ import annotations

import os

from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .errors import MoepressError

_REGISTERED = False


class MoepressConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a moepress checkpoint."""

    def __init__(self, units: dict | None = None, bits: int | None = None, group_size: int | None = None,
                 format_version: int = 1, expert_counts: dict | None = None, experts_kept: dict | None = None,
                 top_k: dict | None = None, dropped_blocks: list | None = None,
                 dropped_moe_layers: list | None = None, dynamic_pruning: dict | None = None,
                 embeddings: dict | None = None, activations: str | None = None, **kwargs):
        self.quant_method = "moepress"
        self.units = units or {}
        self.bits = bits
        self.group_size = group_size
        self.format_version = format_version
        self.expert_counts = expert_counts or {}  # MoE layer -> experts left by an expert drop
        self.experts_kept = experts_kept or {}
        self.top_k = top_k or {}  # MoE layer -> experts per token after a top-k reduction
        self.dropped_blocks = dropped_blocks or []  # decoder layers a block drop removed
        self.dropped_moe_layers = dropped_moe_layers or []  # MoE sublayers a layer drop removed
        self.dynamic_pruning = dynamic_pruning  # ODP settings the loaders install (moepress.trim.dynamic)
        self.embeddings = embeddings or {}  # token_embd/output -> llama.cpp type (moepress.export.llamacpp_target)
        self.activations = activations  # "int8": quantized units' inputs per token (moepress.quantize.activations)

    def to_dict(self) -> dict:
        return {
            "quant_method": "moepress",
            "format_version": self.format_version,
            "bits": self.bits,
            "group_size": self.group_size,
            "units": self.units,
            **({"expert_counts": self.expert_counts, "experts_kept": self.experts_kept} if self.expert_counts else {}),
            **({"top_k": self.top_k} if self.top_k else {}),
            **({"dropped_blocks": self.dropped_blocks} if self.dropped_blocks else {}),
            **({"dropped_moe_layers": self.dropped_moe_layers} if self.dropped_moe_layers else {}),
            **({"dynamic_pruning": self.dynamic_pruning} if self.dynamic_pruning else {}),
            **({"embeddings": self.embeddings} if self.embeddings else {}),
            **({"activations": self.activations} if self.activations else {}),
        }


class MoepressHfQuantizer(HfQuantizer):
    """Loads pre-quantized moepress checkpoints (quantizing happens in ``moepress compress``)."""

    requires_calibration = True

    def validate_environment(self, *args, **kwargs):
        return None

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from .runtime.install import install_skeleton
        from .runtime.skeleton import check_stored_tensors, expect_stored_zeros

        files = [str(f) for f in checkpoint_files or () if str(f).endswith(".safetensors")]
        name = getattr(model.config, "_name_or_path", "") or (os.path.dirname(files[0]) if files else "")
        qc = self.quantization_config
        check_format_version(qc.format_version, name)
        if qc.dropped_blocks or qc.dropped_moe_layers:  # removed parts: stand-ins without weights
            from .trim.layer_drop import restore_dropped

            restore_dropped(model, qc.dropped_blocks, qc.dropped_moe_layers)
        if qc.top_k:  # before the expert drops: a drop may keep fewer experts than the original top-k
            from .trim.top_k import restore_top_k

            restore_top_k(model, qc.top_k)
        if qc.expert_counts:  # layers an expert drop shrank, before the packed swap
            from .trim.expert_drop import restore_expert_counts

            restore_expert_counts(model, qc.expert_counts)
        from .quantize.activations import check_scheme

        check_scheme(qc.activations, f"moepress checkpoint {name}: config.json's quantization_config.activations")
        install_skeleton(model, read_unit_map(qc.units, name), activations=qc.activations)
        if qc.embeddings:  # token embeddings and head in llama.cpp block types
            from .export.llamacpp_target import install_outer

            install_outer(model, qc.embeddings)
        expect_stored_zeros(model, qc.format_version)  # formats 1 and 2: one uint8 zero point per group
        if files:  # (a state dict handed to from_pretrained has no files to check first)
            check_stored_tensors(model, stored_tensors(files, name), name)

    def _process_model_after_weight_loading(self, model, **kwargs):
        from .runtime import validate_packed

        validate_packed(model)
        if self.quantization_config.dynamic_pruning:
            from .trim.dynamic import install_dynamic_pruning

            install_dynamic_pruning(model, self.quantization_config.dynamic_pruning)
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    def is_serializable(self, safe_serialization=None):
        return False  # save with moepress (compress --out), which writes the unit map too

    @property
    def is_trainable(self) -> bool:
        return False


def check_format_version(version, checkpoint: str = "the checkpoint") -> None:
    """Refuse a checkpoint format this moepress cannot read (written by a newer moepress)."""
    from .export.format import KNOWN_FORMAT_VERSIONS

    if isinstance(version, bool) or version not in KNOWN_FORMAT_VERSIONS:
        known = " and ".join(str(v) for v in KNOWN_FORMAT_VERSIONS)
        raise MoepressError(f"{checkpoint or 'the checkpoint'} has moepress format version {version!r}; this "
                            f"moepress ({_version()}) reads versions {known}: upgrade moepress (pip install -U moepress)")


def read_unit_map(units, checkpoint: str) -> dict:
    """config.json's unit map as :class:`~moepress.treatment.Treatment` values, or one line naming
    the first malformed entry."""
    from .treatment import Treatment

    if not isinstance(units, dict):
        raise MoepressError(f"moepress checkpoint {checkpoint}: config.json's quantization_config has no unit map; "
                            "restore config.json or re-create the checkpoint with moepress compress")
    try:
        return {unit: Treatment.from_unit_map(entry, f"unit {unit} of config.json's unit map")
                for unit, entry in units.items()}
    except MoepressError as exc:
        raise MoepressError(f"moepress checkpoint {checkpoint}: {exc}; restore config.json or re-create the "
                            "checkpoint with moepress compress") from None


def _version() -> str:
    from . import __version__

    return __version__


def stored_tensors(files: list[str], name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, safetensors dtype such as ``"U8"``) of every tensor in ``files``, read from
    their headers only (no tensor data is touched)."""
    from safetensors import safe_open

    stored = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    tensor = f.get_slice(key)
                    stored[key] = (tuple(tensor.get_shape()), tensor.get_dtype())
        except Exception as exc:  # safetensors' SafetensorError is not an OSError
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise MoepressError(f"cannot read the weights of {name} ({os.path.basename(file)}: {reason}); the "
                                "checkpoint looks corrupt or truncated: re-download or re-create it") from None
    return stored


def register() -> None:
    """Register the config and quantizer with transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    if "moepress" not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config("moepress")(MoepressConfig)
    if "moepress" not in AUTO_QUANTIZER_MAPPING:
        register_quantizer("moepress")(MoepressHfQuantizer)
    _REGISTERED = True

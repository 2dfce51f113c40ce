"""A transformers quantizer, so ``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` loads moepress checkpoints.

``import moepress`` registers ``quant_method="moepress"``. transformers then builds the model
skeleton, calls :meth:`MoepressHfQuantizer._process_model_before_weight_loading` (which swaps every
quantized unit for an empty packed module, from the unit map in ``config.json``) and loads the
packed tensors from the safetensors shards into those modules, as it does for GPTQ checkpoints.
"""

from __future__ import annotations

from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

_REGISTERED = False


class MoepressConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a moepress checkpoint."""

    def __init__(self, units: dict | None = None, bits: int | None = None, group_size: int | None = None,
                 format_version: int = 1, **kwargs):
        self.quant_method = "moepress"
        self.units = units or {}
        self.bits = bits
        self.group_size = group_size
        self.format_version = format_version

    def to_dict(self) -> dict:
        return {
            "quant_method": "moepress",
            "format_version": self.format_version,
            "bits": self.bits,
            "group_size": self.group_size,
            "units": self.units,
        }


class MoepressHfQuantizer(HfQuantizer):
    """Loads pre-quantized moepress checkpoints (quantizing happens in ``moepress compress``)."""

    requires_calibration = True

    def validate_environment(self, *args, **kwargs):
        return None

    def _process_model_before_weight_loading(self, model, **kwargs):
        from .runtime import install_packed_skeleton

        install_packed_skeleton(model, self.quantization_config.units)

    def _process_model_after_weight_loading(self, model, **kwargs):
        from .runtime import validate_packed

        validate_packed(model)
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    def is_serializable(self, safe_serialization=None):
        return False  # save with moepress (compress --out), which writes the unit map too

    @property
    def is_trainable(self) -> bool:
        return False


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

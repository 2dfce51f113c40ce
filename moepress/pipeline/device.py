"""Where and in which dtype a decoder layer computes (shared by the layer loop and the process group)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MoepressError


def compute_dtype(device: torch.device, model_dtype: torch.dtype) -> torch.dtype | None:
    """float32 on the CPU, whose bf16/fp16 matmuls are many times slower; the model's own on GPUs.

    Calibration statistics and GPTQ are computed in float32 either way; this only sets the dtype
    the decoder layers run in while being calibrated (the layer returns to its dtype afterwards).
    """
    return torch.float32 if device.type == "cpu" and model_dtype in (torch.bfloat16, torch.float16) else None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` picks CUDA when present, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MoepressError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return device


def model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


__all__ = ["compute_dtype", "model_dtype", "resolve_device"]

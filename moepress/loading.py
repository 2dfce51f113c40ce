"""Loading models and tokenizers with errors a user can act on.

Only safetensors are read (``use_safetensors=True``): a pickle checkpoint could run code.
``trust_remote_code`` stays off unless the caller asks for it.
"""

from __future__ import annotations

import os

import torch

from .errors import MoepressError


def _looks_like_path(name: str) -> bool:
    """Hub ids look like ``org/name``; anything absolute, relative-dotted or deeper is a path."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1


def check_model_source(name: str) -> None:
    """A local path must exist; anything else is treated as a hub id."""
    if os.path.exists(name):
        if os.path.isdir(name) and not os.path.exists(os.path.join(name, "config.json")):
            raise MoepressError(f"{name} has no config.json: give a Hugging Face model folder or hub id")
        return
    if _looks_like_path(name):
        raise MoepressError(f"model path does not exist: {name}")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_model(name: str, *, dtype: torch.dtype | str | None = "auto", device: str | None = None, trust_remote_code: bool = False):
    """``AutoModelForCausalLM.from_pretrained`` of a local folder or hub id, safetensors only.

    A moepress checkpoint loads through the registered transformers quantizer, so this also
    loads compressed models.
    """
    from transformers import AutoModelForCausalLM

    from . import hf_integration

    hf_integration.register()
    check_model_source(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except MoepressError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, EnvironmentError) as exc:
        message = _one_line(exc)
        if "safetensors" in message.lower() or "header" in message.lower() or "incomplete" in message.lower():
            raise MoepressError(f"cannot read the weights of {name} ({message}); the checkpoint looks corrupt or truncated: re-download or re-create it") from None
        raise MoepressError(f"cannot load model {name}: {message}") from None
    except Exception as exc:  # safetensors' SafetensorError is not an OSError
        raise MoepressError(f"cannot load model {name}: {_one_line(exc)}; the checkpoint may be corrupt or truncated") from None
    model.eval()
    if device is not None:
        model.to(device)
    return model


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_model_source(name)
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise MoepressError(f"cannot load the tokenizer of {name}: {_one_line(exc)}") from None

"""Loading models and tokenizers with errors a user can act on.

Only safetensors are read (``use_safetensors=True``): a pickle checkpoint could run code.
``trust_remote_code`` stays off unless the caller asks for it.

Loading never guesses: a tensor the model needs that the checkpoint lacks, or stores in another
shape, is an error naming it (transformers would initialise it randomly and carry on); a tensor the
model does not use (DeepSeek-V3's multi-token-prediction layer) is a one-line warning, and an error
in a moepress checkpoint, which holds exactly what its unit map implies. A name that is neither a
local folder nor reachable on the hub fails at once instead of after a minute of retries.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
import threading
from contextlib import contextmanager
from urllib.parse import urlparse

import torch

from .errors import MoepressError

PROBE_SECONDS = 2.0  # how long the hub may take to accept a connection before it counts as unreachable
_probed: dict[tuple[str, int], str | None] = {}


def _looks_like_path(name: str) -> bool:
    """Hub ids look like ``org/name``; anything absolute, relative-dotted or deeper is a path."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached now ("HF_HUB_OFFLINE is set", "no connection to
    huggingface.co:443: timed out"), or None when it accepts a connection within ``PROBE_SECONDS``.
    The probe connects to the endpoint (``HF_ENDPOINT``), or to the proxy when ``HTTPS_PROXY`` is
    set, once per process and address."""
    from huggingface_hub import constants

    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _env_true(flag):
            return f"{flag} is set"
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    scheme = "HTTPS" if url.scheme == "https" else "HTTP"
    proxy = os.environ.get(f"{scheme}_PROXY") or os.environ.get(f"{scheme.lower()}_proxy")
    target = (urlparse(proxy if "://" in proxy else f"http://{proxy}")) if proxy else url
    host, port = target.hostname or "huggingface.co", target.port or (443 if target.scheme == "https" else 80)
    if (host, port) not in _probed:
        failure: list[str] = ["timed out"]

        def connect():  # in a thread: name resolution has no timeout of its own
            try:
                socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
                failure.clear()
            except OSError as exc:
                failure[0] = exc.strerror or str(exc) or type(exc).__name__

        probe = threading.Thread(target=connect, daemon=True)
        probe.start()
        probe.join(PROBE_SECONDS + 0.5)
        _probed[(host, port)] = f"no connection to {host}:{port}: {failure[0]}" if failure else None
    return _probed[(host, port)]


def _in_hub_cache(name: str) -> bool:
    """Whether hub id ``name`` has a config.json in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # not a valid repo id
        return False


def hub_kwargs(name: str) -> dict:
    """``local_files_only`` for a hub id while the hub is unreachable: its cached copy loads at once."""
    if os.path.exists(name) or hub_unreachable() is None:
        return {}
    return {"local_files_only": True}


def check_model_source(name: str) -> None:
    """A local path must exist; anything else is a hub id, which must be cached or reachable."""
    if os.path.exists(name):
        if os.path.isdir(name) and not os.path.exists(os.path.join(name, "config.json")):
            raise MoepressError(f"{name} has no config.json: give a Hugging Face model folder or hub id")
        return
    if _looks_like_path(name):
        raise MoepressError(f"model path does not exist: {name}")
    why = hub_unreachable()
    if why is not None and not _in_hub_cache(name):
        local = name if name.startswith(".") else os.path.join(".", name)
        raise MoepressError(f"no local folder {local} ({os.path.abspath(name)}), {name} is not in the Hugging Face "
                            f"cache, and the hub is unreachable ({why}); check the name, or download the model while online")


def refuse_compressed_source(path: str) -> None:
    """Refuse a moepress checkpoint as the model to compress (or plan for): its weights are already
    packed. ``path`` is a local folder or a hub id (checked when its config is cached); anything
    without a readable config passes, for loading to report."""
    if os.path.isdir(path):
        config_file = os.path.join(path, "config.json")
    else:
        from huggingface_hub import try_to_load_from_cache

        try:
            config_file = try_to_load_from_cache(path, "config.json")
        except Exception:
            return
    if not isinstance(config_file, str) or not os.path.isfile(config_file):
        return  # no config here: loading says what is wrong
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(quantization, dict) and quantization.get("quant_method") == "moepress":
        source = ""
        record_file = os.path.join(os.path.dirname(config_file), "moepress.json")
        try:
            with open(record_file, encoding="utf-8") as f:
                source = json.load(f).get("source_model") or ""
        except (OSError, ValueError, AttributeError):
            pass
        of = f" (of {source})" if source else ""
        raise MoepressError(f"{path} is already a moepress checkpoint{of}; compress its source model instead")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class _LoadReport(logging.Filter):
    """Holds back transformers' multi-line load report (:func:`_check_loading_info` says it in one
    line), keeping its text: a failed expert merge is only named there."""

    def __init__(self):
        super().__init__()
        self.text = ""

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" not in str(record.msg):
            return True
        self.text = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())
        return False

    def failed_conversion(self) -> str | None:
        """The first tensor the report marks CONVERSION (stored tensors that could not be merged)."""
        match = re.search(r"^(\S+)\s*\|\s*CONVERSION", self.text, re.MULTILINE)
        return match.group(1) if match else None


@contextmanager
def _held_load_report():
    logger = logging.getLogger("transformers.modeling_utils")
    report = _LoadReport()
    logger.addFilter(report)
    try:
        yield report
    finally:
        logger.removeFilter(report)


def _stored_names(name: str) -> list[str]:
    """Tensor names in a local folder's safetensors (from the index or the header; no data read)."""
    index = os.path.join(name, "model.safetensors.index.json")
    try:
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                return list(json.load(f)["weight_map"])
        from safetensors import safe_open

        with safe_open(os.path.join(name, "model.safetensors"), framework="pt") as f:
            return list(f.keys())
    except Exception:
        return []


def _check_loading_info(model, name: str, info: dict) -> None:
    """Raise for a missing or mismatched tensor; warn in one line about unused ones (an error in a
    moepress checkpoint). Tied weights (the head tied to the embeddings) are not missing."""
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        key, stored, wanted = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise MoepressError(f"{name}: tensor {key}{more} is stored as {list(stored)} but the config implies "
                            f"{list(wanted)}; the weights and config.json disagree: re-download or re-create the model")
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MoepressError(f"{name} lacks tensor {missing[0]}{more}, which the model needs; the checkpoint is "
                            "incomplete or was made for another config: re-download or re-create it")
    unexpected = sorted(info.get("unexpected_keys") or ())
    quantization = getattr(model.config, "quantization_config", None)
    if unexpected and getattr(quantization, "quant_method", None) == "moepress":
        raise MoepressError(f"moepress checkpoint {name} stores tensor {unexpected[0]} that its unit map does not "
                            "imply; the checkpoint is corrupt: re-create it with moepress compress")
    # transformers drops some unused tensors from the report by design (DeepSeek-V3's layer 61): count them too.
    patterns = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    if patterns and os.path.isdir(name):
        unexpected += sorted(k for k in _stored_names(name) if any(re.search(p, k) for p in patterns))
    if unexpected:
        print(f"moepress: warning: {name} holds {len(unexpected)} tensor(s) the model does not use (e.g. "
              f"{unexpected[0]}); they are ignored", file=sys.stderr)


def load_model(name: str, *, dtype: torch.dtype | str | None = "auto", device: str | None = None,
               trust_remote_code: bool = False, for_compression: bool = False):
    """``AutoModelForCausalLM.from_pretrained`` of a local folder or hub id, safetensors only.

    A moepress checkpoint loads through the registered transformers quantizer, so this also
    loads compressed models; ``for_compression=True`` refuses one (see :func:`refuse_compressed_source`).
    Every tensor the model needs must be in the checkpoint in its shape (an error names the first
    that is not); tensors it does not use are a one-line warning.
    """
    from transformers import AutoModelForCausalLM

    from . import hf_integration

    hf_integration.register()
    check_model_source(name)
    if for_compression:
        refuse_compressed_source(name)
    try:
        with _held_load_report() as report:
            model, info = AutoModelForCausalLM.from_pretrained(
                name, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
                output_loading_info=True, ignore_mismatched_sizes=True, **hub_kwargs(name),
            )
    except MoepressError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, EnvironmentError) as exc:
        message = _one_line(exc)
        merged = report.failed_conversion()
        if merged is not None:
            raise MoepressError(f"{name}: the stored tensors that make up {merged} do not fit together (one is "
                                "missing or has another shape); the checkpoint is incomplete or was made for another "
                                "config: re-download or re-create it") from None
        if "safetensors" in message.lower() or "header" in message.lower() or "incomplete" in message.lower():
            raise MoepressError(f"cannot read the weights of {name} ({message}); the checkpoint looks corrupt or truncated: re-download or re-create it") from None
        raise MoepressError(f"cannot load model {name}: {message}") from None
    except Exception as exc:  # safetensors' SafetensorError is not an OSError
        raise MoepressError(f"cannot load model {name}: {_one_line(exc)}; the checkpoint may be corrupt or truncated") from None
    _check_loading_info(model, name, info)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_model_source(name)
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, **hub_kwargs(name))
    except Exception as exc:
        raise MoepressError(f"cannot load the tokenizer of {name}: {_one_line(exc)}") from None

"""moepress's own checkpoint: config, tokenizer, safetensors shards of packed weights, moepress.json.

Layout of ``OUT_DIR``::

    config.json                  the model config, with quantization_config.quant_method = "moepress"
    generation_config.json       when the model has one
    tokenizer files
    model.safetensors            or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    moepress.json                what was done: method, bits, group size, calibration, version, units

The unit map (every quantized unit's bits, group size, symmetry, act order) is in both
``moepress.json`` and ``config.json``, so ``AutoModelForCausalLM.from_pretrained`` (through the
quantizer registered by ``import moepress``) can rebuild the packed modules before loading weights.

Everything is written to a temporary folder beside ``OUT_DIR`` and renamed only when complete, so
an interrupted save never leaves a half-written checkpoint. No pickle is written or read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import save_file

from ..errors import MoepressError

MOEPRESS_JSON = "moepress.json"
SHARD_BYTES = 2 * 1024**3


def check_output_dir(out: str, overwrite: bool) -> None:
    """Refuse an existing output folder unless ``overwrite``; checked before any long work starts."""
    if os.path.exists(out) and not overwrite:
        raise MoepressError(f"output folder {out} already exists; choose another --out or pass --overwrite")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise MoepressError(f"cannot write {out}: its parent folder {parent} does not exist")


def _unique_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors stored once (safetensors refuses shared storage)."""
    seen: dict[tuple, str] = {}
    state = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            continue
        seen[key] = name
        state[name] = tensor.detach().contiguous().cpu()
    return state


def _write_shards(state: dict[str, torch.Tensor], folder: str, shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, "model.safetensors"), metadata=metadata)
        return
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, filename), metadata=metadata)
        for name, tensor in shard.items():
            weight_map[name] = filename
            total += tensor.numel() * tensor.element_size()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def save_compressed(result, out: str, overwrite: bool = False, shard_bytes: int = SHARD_BYTES) -> str:
    """Write a :class:`~moepress.compress.CompressResult` to ``out`` atomically."""
    check_output_dir(out, overwrite)
    model, tokenizer = result.model, result.tokenizer
    record = result.record()
    out = os.path.abspath(out)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    try:
        config = model.config
        config.quantization_config = quantization_config_dict(record)
        config.save_pretrained(tmp)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _write_shards(_unique_state_dict(model), tmp, shard_bytes)
        with open(os.path.join(tmp, MOEPRESS_JSON), "w") as f:
            json.dump(record, f, indent=2)
        if os.path.exists(out):
            old = f"{tmp}.old"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def quantization_config_dict(record: dict) -> dict:
    """The ``quantization_config`` entry of config.json: enough to rebuild the packed modules."""
    keys = ("bits", "group_size", "symmetric", "act_order", "method", "pieces", "axis")
    units = {name: {k: unit[k] for k in keys if k in unit} for name, unit in record["units"].items()}
    return {
        "quant_method": "moepress",
        "format_version": record["format_version"],
        "bits": record["bits"],
        "group_size": record["group_size"],
        "units": units,
    }


def read_record(path: str) -> dict:
    """``moepress.json`` of a checkpoint folder, or a one-line error."""
    file = os.path.join(path, MOEPRESS_JSON)
    if not os.path.exists(file):
        raise MoepressError(f"{path} is not a moepress checkpoint (no {MOEPRESS_JSON}); compress a model first")
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise MoepressError(f"{file} is not valid JSON ({exc}); the checkpoint is corrupt") from None

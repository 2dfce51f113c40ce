"""moepress's own checkpoint: config, tokenizer, safetensors shards of packed weights, moepress.json.

Layout of ``OUT_DIR``::

    config.json                  the model config, with quantization_config.quant_method = "moepress"
    generation_config.json       when the model has one
    tokenizer files
    model-00001-of-0000N.safetensors   the embeddings, final norm and head
    model-0000L-of-0000N.safetensors   decoder layer L-2, one shard per layer (written as it finishes)
    model.safetensors.index.json
    moepress.json                what was done: method, bits, group size, calibration, version, units,
                                 seconds per layer

The unit map (every unit's treatment: kind, bits, group size, symmetry, act-order, method) is in both
``moepress.json`` and ``config.json``, so ``AutoModelForCausalLM.from_pretrained`` (through the
quantizer registered by ``import moepress``) can rebuild the packed modules before loading weights.

Everything is written to a working folder beside ``OUT_DIR`` (``moepress.pipeline.resume``) and
renamed only when complete, so an interrupted run never leaves a half-written checkpoint, and the
same command resumes it. No pickle is written or read.
"""

from __future__ import annotations

import json
import os
import torch

from ..errors import MoepressError
from ..model.registry import arch_spec

from .record import MOEPRESS_JSON


def check_output_dir(out: str, overwrite: bool) -> None:
    """Refuse an existing output folder unless ``overwrite``, or one that cannot be written; checked
    before any long work starts (an unwritable output must not cost an hour of compute)."""
    from ..preflight import check_writable_dir

    if os.path.exists(out) and not overwrite:
        raise MoepressError(f"output folder {out} already exists; choose another --out or pass --overwrite")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise MoepressError(f"cannot write {out}: its parent folder {parent} does not exist")
    check_writable_dir(out, "the output folder")


def _unique_state_dict(model, skip_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors stored once (safetensors refuses shared storage), without
    the tensors under ``skip_prefix`` (the decoder layers, when they are written layer by layer)."""
    seen: dict[tuple, str] = {}
    state = {}
    for name, tensor in model.state_dict().items():
        if skip_prefix is not None and name.startswith(skip_prefix):
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            continue
        seen[key] = name
        state[name] = tensor.detach().contiguous().cpu()
    return state


def read_tensors(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, across its shards (for inspection and tests; a large
    model's folder is better read shard by shard)."""
    from safetensors.torch import load_file

    from ..pipeline.source import safetensors_files

    tensors: dict[str, torch.Tensor] = {}
    for file in safetensors_files(folder):
        tensors.update(load_file(file))
    return tensors


def save_compressed(result, out: str, overwrite: bool = False) -> str:
    """Write a :class:`~moepress.compress.CompressResult` whose model is held in memory to ``out``,
    atomically, in the same layout a streamed run writes (one shard per decoder layer)."""
    from ..model.view import MoEView
    from ..pipeline.resume import WorkFolder
    from ..pipeline.source import ResidentModel

    check_output_dir(out, overwrite)
    model = result.model
    view = MoEView(model)
    work = WorkFolder(out, {"save_compressed": True}, {"in_memory": True}, view.num_layers, restart=True)
    try:
        state = _unique_state_dict(model)
        for layer in range(view.num_layers):
            prefix = f"{view.spec.layers}.{layer}."
            work.finish_layer(layer, {k: v for k, v in state.items() if k.startswith(prefix)}, {}, {}, [])
        write_checkpoint(work, result, ResidentModel(model), overwrite=overwrite)
    except BaseException:
        work.discard()
        raise
    return os.path.abspath(out)


def write_checkpoint(work, result, source, overwrite: bool = False) -> str:
    """Complete a run's working folder (its layer shards already written): the embeddings and head
    shard, the index, config with the unit map, generation config, tokenizer and ``moepress.json``;
    then rename it into ``OUT``."""
    record = result.record()
    model = source.model
    layers_prefix = arch_spec(model.config.model_type).layers + "."
    source.load_outer()
    try:
        if result.config.target == "llamacpp":  # a llama-quantize mix's embeddings and head types (llamacpp_target)
            from .llamacpp_target import quantize_outer

            record.update(quantize_outer(model, result.config))
        outer = {k: v for k, v in _unique_state_dict(model, skip_prefix=layers_prefix).items()}
        work.write_outer(outer)
    finally:
        if source.streamed:
            source.release_outer()
    work.write_index()
    folder = work.path
    config = model.config
    config.quantization_config = quantization_config_dict(record)
    config.save_pretrained(folder)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    if result.tokenizer is not None:
        result.tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, MOEPRESS_JSON), "w") as f:
        json.dump(record, f, indent=2)
    return work.finish(overwrite)


def quantization_config_dict(record: dict) -> dict:
    """The ``quantization_config`` entry of config.json: enough to rebuild the packed modules (every
    unit's treatment, as :meth:`~moepress.treatment.Treatment.to_unit_map` writes it)."""
    units = {name: {k: v for k, v in unit.items() if k != "error"} for name, unit in record["units"].items()}
    kept = record.get("experts_kept") or {}
    return {
        "quant_method": "moepress",
        "format_version": record["format_version"],
        "bits": record["bits"],
        "group_size": record["group_size"],
        "units": units,
        # MoE layers an expert drop shrank: experts left, and their indices in the source model
        **({"expert_counts": {layer: len(k) for layer, k in kept.items()}, "experts_kept": kept} if kept else {}),
        **({"top_k": record["top_k"]} if record.get("top_k") else {}),  # layers routed to fewer experts
        **({k: record[k] for k in ("dropped_blocks", "dropped_moe_layers", "dynamic_pruning") if record.get(k)}),
        **({"embeddings": record["embeddings"]} if record.get("embeddings") else {}),  # in llama.cpp types
        # compress --activations: every quantized unit's inputs quantized per token (moepress.quantize.activations)
        **({"activations": record["activations"]} if record.get("activations") else {}),
    }

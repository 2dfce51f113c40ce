"""Where a layer's weights come from: a model already in memory, or safetensors shards read one layer at a time.

A user with Mixtral-8x7B (94 GB in bf16) on a machine with less memory than that cannot load the
model whole. :class:`StreamedModel` builds the model's module tree on the ``meta`` device (no
memory), then materialises only what the current step needs: the embeddings to capture the first
layer's inputs, one decoder layer at a time, the final norm and head at the end. The tensors come
from the memory-mapped shards in whatever layout the checkpoint stores (one tensor per expert,
``experts.N.w1``, fused ``gate_up_proj``, GraniteMoE's ``input_linear``), mapped to the in-memory
layout by transformers' own conversion mapping (the same renamings and expert merges
``from_pretrained`` applies), so moepress keeps no table of checkpoint names of its own.

Loading never guesses: before any work, every tensor the model needs must be found in the shards
(a missing one is an error naming it, never a randomly initialised weight); a tensor the model does
not use (DeepSeek-V3's multi-token-prediction layer) is a one-line warning. A tensor whose shape
disagrees with the config is an error naming it.

:class:`ResidentModel` is the same interface over a model already in memory (the Python API's
``compress(model, tokenizer)``, evolution's evaluator): loading and releasing do nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import MoepressError
from ..model.registry import arch_spec


class ResidentModel:
    """A model held whole in memory: every layer is always loaded."""

    streamed = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""

    def load_outer(self) -> None:
        pass

    def release_outer(self) -> None:
        pass

    def load_layer(self, layer: int) -> None:
        pass

    def release_layer(self, layer: int) -> None:
        pass

    def fingerprint(self) -> dict:
        return {"in_memory": type(self.model).__name__}


def safetensors_files(folder: str) -> list[str]:
    """The safetensors shards of a model folder (from its index, else ``model.safetensors``, else all)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise MoepressError(f"cannot read {index} ({exc}); the checkpoint index is corrupt") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise MoepressError(f"{folder}: shard {missing[0]} named in model.safetensors.index.json is missing; "
                                "re-download the model")
        return [os.path.join(folder, f) for f in files]
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    found = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if found:
        return [os.path.join(folder, f) for f in found]
    raise MoepressError(f"{folder} has no safetensors weights (model.safetensors or an index); moepress reads "
                        "safetensors only (pickle checkpoints could run code): convert the model first")


def resolve_model_folder(name: str) -> str:
    """A local folder as it is; a hub id through the local cache or a download (config, weights, tokenizer)."""
    from ..loading import check_model_source, hub_kwargs

    check_model_source(name)  # a missing local path, or an unreachable hub, fails here at once
    if os.path.isdir(name):
        return name
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"],
                                 **hub_kwargs(name))
    except Exception as exc:  # offline, gated, unknown id: all one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MoepressError(f"cannot fetch model {name}: {first}") from None


@contextmanager
def quiet_transformers():
    """transformers' per-call 'Loading weights' bar would print once per layer."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _read_header(path: str) -> bytes:
    """The JSON header of a safetensors file (8-byte little-endian length, then the header)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise MoepressError(f"{path} is truncated (no safetensors header); re-download or re-create it")
        n = int.from_bytes(head, "little")
        if n > 100 * 1024**2:
            raise MoepressError(f"{path} is not a safetensors file (header of {n} bytes); re-download it")
        return f.read(n)


class StreamedModel:
    """A model whose weights stay in the shards until a step needs them.

    ``model`` is the full module tree with every parameter on the ``meta`` device (non-persistent
    buffers such as rotary tables are computed for real, by transformers' own initialisation).
    ``load_layer(l)`` materialises decoder layer ``l`` on the CPU in the checkpoint's dtype;
    ``release_layer(l)`` returns it to ``meta``, freeing it (its packed replacement included).
    """

    streamed = True

    def __init__(self, name: str, *, dtype="auto", trust_remote_code: bool = False):
        from safetensors import safe_open
        from transformers import AutoConfig, AutoModelForCausalLM

        self.name = name
        self.path = resolve_model_folder(name)
        try:
            self.config = AutoConfig.from_pretrained(self.path, trust_remote_code=trust_remote_code)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise MoepressError(f"cannot read the config of {name}: {first}") from None
        quantized = getattr(self.config, "quantization_config", None)
        if quantized:
            method = quantized.get("quant_method") if isinstance(quantized, dict) else getattr(quantized, "quant_method", "?")
            what = "a moepress checkpoint" if method == "moepress" else f"already quantized ({method})"
            raise MoepressError(f"{name} is {what}; compress or calibrate its original (unquantized) model instead")
        self.spec = arch_spec(getattr(self.config, "model_type", ""))
        if dtype == "auto":
            dtype = getattr(self.config, "dtype", None) or torch.float32
            dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.dtype = dtype
        self.files = safetensors_files(self.path)
        self._handles = {}
        try:
            for file in self.files:
                self._handles[file] = safe_open(file, framework="pt", device="cpu")
        except Exception as exc:  # SafetensorError is not an OSError
            raise MoepressError(f"cannot read the weights of {name} ({str(exc).splitlines()[0] if str(exc) else exc}); "
                                "the checkpoint looks corrupt or truncated: re-download or re-create it") from None
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype,
                                                          trust_remote_code=trust_remote_code)
        # Non-persistent buffers (rotary inv_freq) are not in any checkpoint: transformers computes them
        # after loading, and so do we, the same way (parameters stay on meta, so this costs nothing).
        self.model._move_missing_keys_from_meta_to_device(set(), None, None, None)
        self.model.initialize_weights()
        self.model.eval()
        self.model.config._name_or_path = name
        if os.path.isfile(os.path.join(self.path, "generation_config.json")):
            from transformers import GenerationConfig

            self.model.generation_config = GenerationConfig.from_pretrained(self.path)
        self._plan_keys()

    # ------------------------------------------------------------ key plan
    def _plan_keys(self) -> None:
        """Map every checkpoint key to the model key it loads into, grouped by decoder layer."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self.mapping = get_model_conversion_mapping(self.model)
        renamings = [m for m in self.mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in self.mapping if isinstance(m, WeightConverter)]
        expected = self.model.state_dict()
        self.expected_shapes = {k: tuple(v.shape) for k, v in expected.items()}
        tied = set(getattr(self.model, "all_tied_weights_keys", {}) or {})
        layer_re = re.compile(rf"^{re.escape(self.spec.layers)}\.(\d+)\.")
        self.groups: dict[int | None, dict[str, str]] = {}  # layer (None: outside the layers) -> {ckpt key: file}
        self.extra: list[str] = []
        provided: set[str] = set()
        for file, handle in self._handles.items():
            for key in handle.keys():
                target, _ = rename_source_key(key, renamings, converters, self.model.base_model_prefix, expected)
                if target not in expected:
                    self.extra.append(key)
                    continue
                provided.add(target)
                m = layer_re.match(target)
                self.groups.setdefault(int(m.group(1)) if m else None, {})[key] = file
        missing = [k for k in expected if k not in provided and k not in tied]
        if missing:
            raise MoepressError(f"{self.name} has no tensor for {missing[0]}" +
                                (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") +
                                ": the checkpoint is incomplete or belongs to another config; re-download it")
        if self.extra:
            print(f"moepress: warning: {self.name} holds {len(self.extra)} tensor(s) the model does not use "
                  f"(e.g. {sorted(self.extra)[0]}); they are ignored", file=sys.stderr)

    # ------------------------------------------------------------ loading
    def _load(self, keys: dict[str, str], what: str) -> None:
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        if not keys:
            return
        state = {key: self._handles[file].get_slice(key) for key, file in keys.items()}
        config = LoadStateDictConfig(dtype=self.dtype, weight_mapping=self.mapping, device_map={"": "cpu"})
        try:
            with quiet_transformers():
                info, _ = convert_and_load_state_dict_in_model(self.model, state, config)
        except MoepressError:
            raise
        except Exception as exc:
            raise MoepressError(f"cannot load {what} of {self.name}: {str(exc).splitlines()[0] if str(exc) else exc}; "
                                "the checkpoint looks corrupt") from None
        if info.mismatched_keys:
            key, got, want = sorted(info.mismatched_keys, key=str)[0]
            raise MoepressError(f"{self.name}: tensor {key} has shape {tuple(got)} but the config implies "
                                f"{tuple(want)}; the checkpoint does not match its config.json")
        if info.conversion_errors:
            key, message = next(iter(info.conversion_errors.items()))
            raise MoepressError(f"{self.name}: cannot assemble {key} from the checkpoint ({str(message).splitlines()[0]}); "
                                "an expert's tensor is probably missing")

    def _check_materialised(self, module: nn.Module, prefix: str) -> None:
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if tensor.device.type == "meta":
                raise MoepressError(f"{self.name}: no tensor was loaded for {prefix}{name}; the checkpoint is incomplete")

    def load_outer(self) -> None:
        """The embeddings, final norm and head (everything outside the decoder layers)."""
        self._load(self.groups.get(None, {}), "the embeddings and head")
        if getattr(self.model, "all_tied_weights_keys", None):
            self.model.tie_weights()
        for name, module in self._outer_modules():
            self._check_materialised(module, f"{name}.")

    def release_outer(self) -> None:
        """Return the embeddings, norm and head to ``meta``; modules without parameters (rotary
        tables) keep their computed buffers."""
        for _name, module in self._outer_modules():
            if any(True for _ in module.parameters()):
                module.to("meta")

    def _outer_modules(self) -> list[tuple[str, nn.Module]]:
        """(path, module) of everything outside the decoder layers: the base model's other children
        (embeddings, final norm, rotary table) and the top model's (the head)."""
        base_path = self.spec.layers.rpartition(".")[0]
        base = self.model.get_submodule(base_path) if base_path else self.model
        layers = self.model.get_submodule(self.spec.layers)
        outer = [(f"{base_path}.{n}" if base_path else n, c) for n, c in base.named_children() if c is not layers]
        if base is not self.model:
            outer += [(n, c) for n, c in self.model.named_children() if c is not base]
        return outer

    def load_layer(self, layer: int) -> None:
        self._load(self.groups.get(layer, {}), f"layer {layer}")
        prefix = f"{self.spec.layers}.{layer}."
        self._check_materialised(self.model.get_submodule(prefix[:-1]), prefix)

    def release_layer(self, layer: int) -> None:
        self.model.get_submodule(f"{self.spec.layers}.{layer}").to("meta")

    def fingerprint(self) -> dict:
        """A cheap identity of the source: each shard's name, size, mtime and a hash of its header
        (tensor names, dtypes, shapes and offsets), not a hash of the weights (94 GB for Mixtral)."""
        shards = []
        for file in self.files:
            st = os.stat(file)
            shards.append({"file": os.path.basename(file), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                           "header_sha256": hashlib.sha256(_read_header(file)).hexdigest()})
        config = os.path.join(self.path, "config.json")
        with open(config, "rb") as f:
            config_hash = hashlib.sha256(f.read()).hexdigest()
        return {"path": os.path.abspath(self.path), "config_sha256": config_hash, "shards": shards}


def open_source(model, *, trust_remote_code: bool = False):
    """A :class:`ResidentModel` for a module, a :class:`StreamedModel` for a path or hub id; a
    source already opened is returned as it is (its layers are all released between passes)."""
    if isinstance(model, (ResidentModel, StreamedModel)):
        return model
    if isinstance(model, nn.Module):
        return ResidentModel(model)
    return StreamedModel(model, trust_remote_code=trust_remote_code)


__all__ = ["ResidentModel", "StreamedModel", "open_source", "resolve_model_folder", "safetensors_files"]

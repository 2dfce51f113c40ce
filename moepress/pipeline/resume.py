"""The working folder of a run: written layer by layer, renamed into ``OUT`` when complete, resumed after a kill.

One folder beside ``OUT`` (``.OUT.moepress-partial``) holds everything a run has finished so far:

    state.json                         settings hash, source fingerprint, layers done, where the inputs are
    model-000LL-of-000NN.safetensors   the finished layers' tensors (shard 1 is the embeddings and head)
    layer-000LL.json                   what the step recorded for that layer (units, errors)
    layer-000LL.safetensors            the statistics it kept (profile tensors)
    hidden-000LL.safetensors           the inputs of the next layer (the outputs of layer LL-1)

Every file is written under a temporary name and renamed, and ``state.json`` is replaced only after
the layer's files are complete, so a ``kill -9`` at any moment leaves the folder at the last finished
layer. The same command then resumes there, and since the next layer's inputs are stored exactly
(float32 as computed), it produces the same tensors bit for bit as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from ..errors import MoepressError
from .faults import fault_point

STATE = "state.json"
_UMASK = os.umask(0)
os.umask(_UMASK)
STATE_VERSION = 1


def settings_hash(settings: dict) -> str:
    """A stable hash of everything that changes a run's output."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tokens_hash(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.contiguous().numpy().tobytes()).hexdigest()[:16]


def work_folder_for(out: str, kind: str = "partial") -> str:
    out = os.path.abspath(out)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.moepress-{kind}")


def shard_name(index: int, total: int) -> str:
    return f"model-{index:05d}-of-{total:05d}.safetensors"


def _atomic_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tmp = f"{path}.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.chmod(tmp, 0o666 & ~_UMASK)  # safetensors creates its files private; a checkpoint is shared as usual
    os.replace(tmp, path)


class WorkFolder:
    """The resumable state of one run; see the module docstring for the layout."""

    def __init__(self, out: str, settings: dict, fingerprint: dict, num_layers: int, *, restart: bool = False,
                 kind: str = "partial"):
        self.out = os.path.abspath(out)
        self.path = work_folder_for(out, kind)
        self.settings = settings
        self.key = settings_hash(settings)
        self.fingerprint = fingerprint
        self.num_layers = num_layers
        self.num_shards = num_layers + 1
        self.layers_done = 0
        self.hidden_file: str | None = None
        self.finished = False  # every layer and file written; only the rename into OUT is left
        self._open(restart)

    # ------------------------------------------------------------ opening
    def _open(self, restart: bool) -> None:
        _remove_stale_temporaries(self.out)
        state_file = os.path.join(self.path, STATE)
        if os.path.isdir(self.path) and restart:
            shutil.rmtree(self.path)
        if os.path.isdir(self.path) and os.path.isfile(state_file):
            try:
                with open(state_file) as f:
                    state = json.load(f)
            except (OSError, ValueError):
                state = None
            if state is None or state.get("version") != STATE_VERSION:
                raise MoepressError(f"the partial run in {self.path} is unreadable; pass --restart to discard it")
            if state.get("settings_hash") != self.key:
                raise MoepressError(f"{self.path} holds a partial run with other settings (or calibration text); "
                                    "run the same command to resume it, or pass --restart to discard it")
            if state.get("fingerprint") != self.fingerprint:
                raise MoepressError(f"{self.path} holds a partial run of a source model that has changed since; "
                                    "pass --restart to discard it")
            self.layers_done = int(state["layers_done"])
            self.hidden_file = state.get("hidden")
            self.finished = bool(state.get("finished"))
            return
        if os.path.isdir(self.path):  # created but killed before its first state: nothing to keep
            shutil.rmtree(self.path)
        os.makedirs(self.path)
        self._write_state()

    def _write_state(self) -> None:
        _atomic_json(os.path.join(self.path, STATE), {
            "version": STATE_VERSION, "settings_hash": self.key, "settings": self.settings,
            "fingerprint": self.fingerprint, "layers_done": self.layers_done, "num_layers": self.num_layers,
            "hidden": self.hidden_file, "finished": self.finished,
        })

    def state(self) -> dict:
        """Where the run is, for the other ranks' :class:`WorkFolderReader`."""
        return {"settings_hash": self.key, "layers_done": self.layers_done, "hidden": self.hidden_file,
                "finished": self.finished}

    @property
    def resuming(self) -> bool:
        return self.layers_done > 0

    # ------------------------------------------------------------ layers
    def layer_shard(self, layer: int) -> str:
        return shard_name(layer + 2, self.num_shards)

    def outer_shard(self) -> str:
        return shard_name(1, self.num_shards)

    def finish_layer(self, layer: int, shard: dict[str, torch.Tensor] | None, record: dict,
                     tensors: dict[str, torch.Tensor], hidden: list[torch.Tensor]) -> None:
        """Persist layer ``layer``: its shard, record, statistics and the next layer's inputs; then
        (and only then) move the state past it."""
        if shard is not None:
            _atomic_safetensors(os.path.join(self.path, self.layer_shard(layer)), shard, {"format": "pt"})
        fault_point("layer_shard_written", layer)
        _atomic_json(os.path.join(self.path, f"layer-{layer:05d}.json"), record)
        _atomic_safetensors(os.path.join(self.path, f"layer-{layer:05d}.safetensors"), tensors)
        hidden_file = f"hidden-{layer + 1:05d}.safetensors"
        if layer + 1 < self.num_layers:
            _atomic_safetensors(os.path.join(self.path, hidden_file), {f"batch.{i}": h for i, h in enumerate(hidden)})
        fault_point("layer_files_written", layer)
        previous = self.hidden_file
        self.layers_done, self.hidden_file = layer + 1, (hidden_file if layer + 1 < self.num_layers else None)
        self._write_state()
        if previous and previous != self.hidden_file:
            try:
                os.remove(os.path.join(self.path, previous))
            except FileNotFoundError:
                pass
        fault_point("layer_committed", layer)

    def load_hidden(self) -> list[torch.Tensor]:
        tensors = load_file(os.path.join(self.path, self.hidden_file))
        return [tensors[f"batch.{i}"] for i in range(len(tensors))]

    def layer_results(self) -> list[tuple[dict, dict[str, torch.Tensor]]]:
        results = []
        for layer in range(self.layers_done):
            with open(os.path.join(self.path, f"layer-{layer:05d}.json")) as f:
                record = json.load(f)
            results.append((record, load_file(os.path.join(self.path, f"layer-{layer:05d}.safetensors"))))
        return results

    # ------------------------------------------------------------ completion
    def write_outer(self, tensors: dict[str, torch.Tensor]) -> None:
        _atomic_safetensors(os.path.join(self.path, self.outer_shard()), tensors, {"format": "pt"})

    def write_index(self) -> None:
        from safetensors import safe_open

        weight_map, total = {}, 0
        for index in range(1, self.num_shards + 1):
            name = shard_name(index, self.num_shards)
            file = os.path.join(self.path, name)
            if not os.path.exists(file):
                continue
            with safe_open(file, "pt") as f:
                for key in f.keys():
                    weight_map[key] = name
                    sl = f.get_slice(key)
                    total += _nbytes(sl.get_shape(), sl.get_dtype())
        _atomic_json(os.path.join(self.path, "model.safetensors.index.json"),
                     {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})

    def finish(self, overwrite: bool) -> str:
        """Mark the run complete, remove the resume files and rename the folder into ``OUT``
        (replacing it with ``overwrite``). A kill at any point here is completed by the next run."""
        self.finished = True
        self._write_state()
        for name in os.listdir(self.path):
            if name.startswith(("layer-", "hidden-")) or name.endswith(".tmp"):
                os.remove(os.path.join(self.path, name))
            elif name.startswith("activations"):  # --offload-activations (one folder per rank under torchrun)
                shutil.rmtree(os.path.join(self.path, name), ignore_errors=True)
        fault_point("finish", -1)
        if os.path.exists(self.out):
            if not overwrite:
                raise MoepressError(f"output folder {self.out} already exists; pass --overwrite to replace it")
            old = work_folder_for(self.out, "old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.out, old)
            os.replace(self.path, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.path, self.out)
        os.remove(os.path.join(self.out, STATE))
        return self.out

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class WorkFolderReader(WorkFolder):
    """The working folder as the ranks other than 0 see it under torchrun: ``state`` (rank 0's
    :meth:`WorkFolder.state`, after it opened, resumed or restarted the run) says where the run is;
    a resumed run's finished layers and hidden states are read from the folder (so the ranks must
    share its file system), and nothing is ever written: rank 0 alone keeps the folder."""

    def __init__(self, out: str, settings: dict, fingerprint: dict, num_layers: int, state: dict):
        self._state = state
        super().__init__(out, settings, fingerprint, num_layers)

    def _open(self, restart: bool) -> None:
        if self._state["settings_hash"] != self.key:
            raise MoepressError("the ranks disagree on the run's settings (or calibration text); start them all "
                                "with the same command")
        self.layers_done = int(self._state["layers_done"])
        self.hidden_file = self._state["hidden"]
        self.finished = bool(self._state["finished"])

    def finish_layer(self, layer, shard, record, tensors, hidden) -> None:
        pass

    def write_outer(self, tensors) -> None:
        pass

    def write_index(self) -> None:
        pass

    def finish(self, overwrite: bool) -> str:
        return self.out

    def discard(self) -> None:
        pass


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def _nbytes(shape, dtype: str) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * _DTYPE_BYTES.get(dtype, 1)


def _remove_stale_temporaries(out: str) -> None:
    """Folders the atomic save of moepress before 0.2 left behind when killed (``.OUT.tmp-*``),
    and the ``.old`` of an interrupted replacement: nothing in them can be reused."""
    parent, base = os.path.dirname(out), os.path.basename(out)
    if not os.path.isdir(parent):
        return
    for name in os.listdir(parent):
        if name.startswith(f".{base}.tmp-") or name == f".{base}.moepress-old":
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


__all__ = ["WorkFolder", "WorkFolderReader", "settings_hash", "shard_name", "tokens_hash", "work_folder_for"]

"""The one layer loop: calibration, the cost table and compression all go through :class:`LayerLoop`.

For every decoder layer, in order, the loop

1. materialises the layer from its source (a resident model: nothing to do; streamed shards: only
   this layer's tensors are read) and puts it on the compute device in the compute dtype;
2. hands it to a *step* (``step(layer, runner) -> (record, tensors)``), which attaches its hooks, runs
   the calibration activations through it (as often as it needs) and ends by running it once with
   ``update=True``, so the layer's outputs become the next layer's inputs;
3. writes the layer's tensors to its output shard (when there is an output), with the step's record
   and statistics and the next layer's inputs, into the run's :class:`~.resume.WorkFolder`;
4. frees it (streamed) or returns it to the CPU in the model's dtype (resident).

Memory is therefore one decoder layer (in the compute dtype) plus what the step holds (Hessians of one
expert chunk) plus the activations, whatever the depth of the model. A run killed at any point
resumes after its last finished layer.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn

from ..errors import MoepressError
from ..model.view import MoEView
from . import distributed
from .activations import ActivationList
from .device import compute_dtype, model_dtype, resolve_device
from .faults import fault_point


class _StopForward(Exception):
    """Raised by the hook on the first decoder layer once its inputs are captured."""


def _to_device(value: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Move tensors (in nested tuples/lists/dicts) to ``device``, floating ones also to ``dtype``."""
    if isinstance(value, torch.Tensor):
        if dtype is not None and value.is_floating_point():
            return value.to(device, dtype)
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device, dtype) for k, v in value.items()}
    return value


class LayerwiseRunner:
    """Holds the calibration hidden states between layers and runs one decoder layer at a time."""

    def __init__(self, model: nn.Module, view: MoEView, tokens: torch.Tensor, device: torch.device,
                 batch_size: int = 8, offload_folder: str | None = None):
        self.model = model
        self.view = view
        self.device = device
        self.model_dtype = model_dtype(model)
        self.dtype = compute_dtype(device, self.model_dtype)  # None: run layers in their own dtype
        self.tokens = tokens
        self.batch_size = batch_size
        self.hidden = ActivationList(offload_folder)
        self.layer_kwargs: list[dict] = []
        self.advanced = -1  # the last layer whose outputs replaced the hidden states

    def _non_layer_modules(self) -> list[nn.Module]:
        """The model's modules outside the decoder layers (embeddings, rotary tables, final norm)."""
        layers = self.view.layers
        base_path = self.view.spec.layers.rpartition(".")[0]
        base = self.model.get_submodule(base_path) if base_path else self.model
        return [child for child in base.children() if child is not layers]

    @torch.no_grad()
    def capture_inputs(self) -> None:
        """Run the embeddings and record what the first decoder layer receives, batch by batch."""
        captured: dict[str, Any] = {}

        def grab(_module, args, kwargs):
            captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
            captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            raise _StopForward

        others = self._non_layer_modules()
        for module in others:
            module.to(self.device)
        handle = self.view.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for start in range(0, len(self.tokens), self.batch_size):
                batch = self.tokens[start : start + self.batch_size].to(self.device)
                try:
                    self.model(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
                self.hidden.append(captured["hidden"].to("cpu"))
                kwargs = dict(captured["kwargs"])
                kwargs["use_cache"] = False
                kwargs.pop("past_key_values", None)
                self.layer_kwargs.append(_to_device(kwargs, torch.device("cpu")))
        finally:
            handle.remove()
            for module in others:
                module.to("cpu")

    @torch.no_grad()
    def run_layer(self, layer: int, update: bool) -> None:
        """Run every batch through decoder layer ``layer`` (already on the device).

        With ``update`` the outputs replace the stored hidden states, becoming the next layer's
        inputs; without it the pass only feeds the statistics hooks.
        """
        module = self.view.layers[layer]
        for i in range(len(self.hidden)):
            kwargs = _to_device(self.layer_kwargs[i], self.device, self.dtype)
            out = module(_to_device(self.hidden[i], self.device, self.dtype), **kwargs)
            if isinstance(out, tuple):
                out = out[0]
            if update:
                self.hidden[i] = out.to("cpu")
        if update:
            self.advanced = layer

    def load_layer(self, layer: int) -> nn.Module:
        """Put decoder layer ``layer`` on the compute device (in the compute dtype)."""
        return self.view.layers[layer].to(self.device, self.dtype)

    def unload_layer(self, layer: int) -> nn.Module:
        """Return decoder layer ``layer`` to the CPU in the model's dtype (packed buffers keep theirs)."""
        return self.view.layers[layer].to("cpu", self.model_dtype)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())


def _return_freed_memory() -> None:
    """Hand the freed layer back to the operating system. glibc keeps freed blocks in its arenas,
    so without this the resident memory of a streamed run creeps up layer after layer although
    nothing is held (fragmentation), and the next layer's peak starts higher."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


Step = Callable[[int, LayerwiseRunner], "tuple[dict, dict[str, torch.Tensor]]"]


class LayerLoop:
    """Runs a step over every decoder layer of a source (see the module docstring).

    ``work`` (a :class:`~.resume.WorkFolder`) makes the run resumable and, with ``write_layers``,
    collects every finished layer's tensors as an output shard. Without it the loop runs in memory.
    """

    def __init__(self, source, tokens: torch.Tensor, *, device=None, batch_size: int = 8, work=None,
                 write_layers: bool = False, keep_layers: bool = True, offload_activations: bool = False,
                 progress: bool = True, desc: str = "layers"):
        import os

        self.source = source
        self.model = source.model
        self.view = MoEView(self.model)
        self.device = resolve_device(device)
        self.work = work
        self.write_layers = write_layers
        # A streamed layer is freed after it is written; without an output it must stay (packed) in memory.
        self.keep_layers = keep_layers
        self.progress = progress
        self.desc = desc
        offload = None
        if offload_activations:
            if work is None:
                raise MoepressError("--offload-activations needs an output folder (--out) to keep them beside")
            # Each rank keeps its own copy (under torchrun the ranks' hidden states are identical but
            # each overwrites its own as it goes); the folder's finish() removes them.
            rank = distributed.rank()
            offload = os.path.join(work.path, "activations" if rank == 0 else f"activations-rank{rank}")
        self.runner = LayerwiseRunner(self.model, self.view, tokens, self.device, batch_size, offload)
        self.layer_seconds: list[float] = []
        self.resumed_after = 0

    def _capture(self) -> None:
        self.source.load_outer()
        try:
            self.runner.capture_inputs()
        finally:
            self.source.release_outer()

    def run(self, step: Step) -> list[tuple[dict, dict[str, torch.Tensor]]]:
        """``step``'s (record, tensors) for every layer, in order (read back for resumed layers)."""
        from tqdm.auto import tqdm

        n = self.view.num_layers
        self._capture()  # also on resume: the per-batch masks and rotary tables come from it
        results: list[tuple[dict, dict[str, torch.Tensor]]] = []
        start = 0
        if self.work is not None and self.work.resuming:
            start = self.work.layers_done
            results = self.work.layer_results()
            if start < n:
                self.runner.hidden.replace_all(self.work.load_hidden())
            self.resumed_after = start
            if self.progress:
                import sys

                print(f"{self.desc}: resuming after layer {start} of {n} ({self.work.path})", file=sys.stderr)
        distributed.barrier()  # under torchrun rank 0 removes the read hidden states after its next layer
        bar = tqdm(range(start, n), desc=self.desc, unit="layer", disable=not self.progress, initial=start, total=n)
        for layer in bar:
            started = time.time()
            self.source.load_layer(layer)
            self.runner.load_layer(layer)
            record, tensors = step(layer, self.runner)
            if self.runner.advanced != layer:
                raise RuntimeError(f"step did not advance the hidden states past layer {layer}")
            self.runner.unload_layer(layer)
            shard = None
            if self.write_layers:
                prefix = f"{self.view.spec.layers}.{layer}."
                shard = {prefix + k: v for k, v in self.view.layers[layer].state_dict().items()}
            if self.work is not None:
                self.work.finish_layer(layer, shard, record, tensors, list(self.runner.hidden))
            del shard
            if self.source.streamed and not self.keep_layers:
                self.source.release_layer(layer)
                _return_freed_memory()
            results.append((record, tensors))
            self.layer_seconds.append(round(time.time() - started, 3))
            fault_point("layer_done", layer)
        return results


__all__ = ["LayerLoop", "LayerwiseRunner", "compute_dtype", "resolve_device"]

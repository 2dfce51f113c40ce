"""The calibration activations between decoder layers: in memory, or in memory-mapped files.

The hidden states of the calibration tokens ([tokens, hidden] floats: 128 x 512 tokens of a
4096-wide model are 1 GB in float32) live between layers. When they do not fit beside a layer,
``--offload-activations`` keeps each batch in a memory-mapped file instead: the operating system
pages it in when the batch is used and out when memory is short, and it is not the process's
anonymous memory.
"""

from __future__ import annotations

import os

import numpy as np
import torch

# numpy has no bfloat16: such batches are stored as their 16-bit patterns and viewed back.
_STORAGE = {torch.bfloat16: (torch.int16, np.int16), torch.float16: (torch.float16, np.float16),
            torch.float32: (torch.float32, np.float32)}


class ActivationList:
    """A list of hidden-state batches; with ``folder``, each batch is a memory-mapped file there."""

    def __init__(self, folder: str | None = None):
        self.folder = folder
        self._items: list[torch.Tensor] = []
        self._paths: dict[int, str] = {}
        self._writes = 0
        if folder is not None:
            os.makedirs(folder, exist_ok=True)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return iter(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._items[i]

    def _mapped(self, i: int, tensor: torch.Tensor) -> torch.Tensor:
        view_dtype, np_dtype = _STORAGE[tensor.dtype]
        self._writes += 1
        path = os.path.join(self.folder, f"batch-{i}.{self._writes}.bin")
        mm = np.memmap(path, dtype=np_dtype, mode="w+", shape=tuple(tensor.shape))
        mm[...] = tensor.detach().cpu().contiguous().view(view_dtype).numpy()
        mm.flush()
        old = self._paths.get(i)
        if old is not None:
            os.remove(old)  # a mapping of it that is still in use stays valid until dropped
        self._paths[i] = path
        return torch.from_numpy(mm).view(tensor.dtype)

    def append(self, tensor: torch.Tensor) -> None:
        self._items.append(tensor if self.folder is None else self._mapped(len(self._items), tensor))

    def __setitem__(self, i: int, tensor: torch.Tensor) -> None:
        self._items[i] = tensor if self.folder is None else self._mapped(i, tensor)

    def replace_all(self, tensors: list[torch.Tensor]) -> None:
        for i, t in enumerate(tensors):
            if i < len(self._items):
                self[i] = t
            else:
                self.append(t)
        del self._items[len(tensors):]


__all__ = ["ActivationList"]

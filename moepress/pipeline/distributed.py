"""Compression on several processes (``torchrun --nproc-per-node N -m moepress.cli compress ...``).

The routed experts of a layer are independent units of work, and on a large MoE model they are
nearly all of it (Mixtral: 8 experts x 3 linears per layer against 4 attention projections;
DeepSeek-V3: 256 x 3). So every rank runs the whole layer loop (the calibration passes are cheap
next to GPTQ, and every rank needs the packed layer to compute the next layer's inputs), but each
quantizes only its own contiguous share of the layer's units (and gathers the Hessians of only its
own routed experts); :func:`share` then gives every rank the other ranks' results, so all install
the same packed layer. Rank 0 alone writes the working folder, the checkpoint, and prints.

The ranks are found from the environment torchrun sets (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``): backend ``gloo`` on the CPU, ``nccl`` on GPUs, where rank ``r``
of a host uses ``cuda:LOCAL_RANK``. Without them (or with one process) every function here is the
single-process identity and costs nothing.
"""

from __future__ import annotations

import io
import os
import pickle
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..errors import MoepressError


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    """Whether this process writes files and prints: rank 0, or the only process. Also after the
    group is destroyed (torchrun's ``RANK``), so that a command's last lines are printed once."""
    if world_size() > 1:
        return rank() == 0
    return int(os.environ.get("WORLD_SIZE", "1")) <= 1 or int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


_created_group = False  # whether init_from_env made the group (and finish() should destroy it)

# A rank waits at a collective while another finishes its share or rank 0 writes a layer's shard
# and hidden states; generous, since torchrun ends every rank anyway when one of them dies.
TIMEOUT = timedelta(hours=1)


def init_from_env(device=None) -> torch.device:
    """Join the process group torchrun describes in the environment (when ``WORLD_SIZE`` > 1 and no
    group is initialised yet) and return this rank's compute device: ``device`` resolved as
    :func:`~.device.resolve_device` does, with CUDA pinned to ``cuda:LOCAL_RANK`` when there are
    several ranks. A group the caller initialised is used as it is (and ``device`` too)."""
    global _created_group
    from .device import resolve_device

    device = resolve_device(device)
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.index is not None and device.index != local:
            raise MoepressError(f"under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda, not {device}")
        if local >= torch.cuda.device_count():
            raise MoepressError(f"rank with LOCAL_RANK={local} has no GPU (this host has "
                                f"{torch.cuda.device_count()}); start at most that many processes per node")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    _created_group = True
    return device


def finish() -> None:
    """The end of a command: every rank waits for the others (rank 0 may still be writing), then
    the group :func:`init_from_env` created is destroyed (one the caller made stays)."""
    global _created_group
    barrier()
    if _created_group:
        dist.destroy_process_group()
        _created_group = False


def shard_range(n: int) -> range:
    """The contiguous block of ``range(n)`` this rank owns: the first ``n % world`` ranks take one
    more. Contiguous, so a rank's experts are one range for the per-chunk statistics."""
    size, extra = divmod(n, world_size())
    r = rank()
    start = r * size + min(r, extra)
    return range(start, start + size + (1 if r < extra else 0))


def shard(items: Sequence) -> Sequence:
    """The items this rank owns (a contiguous block, the same split on every rank)."""
    owned = shard_range(len(items))
    return items[owned.start:owned.stop]


def share(owned: dict, device: torch.device) -> dict:
    """Every rank's ``owned`` results merged into one dict, on every rank (keys must not overlap).

    The values may hold tensors anywhere inside (packed weights, kept weights, split-weight modules,
    norm rows); those received land on ``device``. One process: ``owned`` itself.
    """
    if world_size() == 1:
        return owned
    merged: dict = {}
    for owner in range(world_size()):
        merged.update(_broadcast(owned if rank() == owner else None, owner, device))
    return merged


def from_main(value: Any, device: torch.device) -> Any:
    """Rank 0's ``value`` on every rank."""
    return value if world_size() == 1 else _broadcast(value if is_main() else None, 0, device)


# ------------------------------------------------------------------ transport
# Objects travel as a pickle whose tensors are left out (``persistent_id``) and sent as one raw
# byte buffer, so packed weights cross as bytes (GPU to GPU on NCCL) instead of being pickled. The
# pickle goes only between this command's own ranks: nothing is read from a checkpoint this way.

class _Pickler(pickle.Pickler):
    def __init__(self, file, tensors: list):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors = tensors
        self.index: dict[int, int] = {}

    def persistent_id(self, obj):
        if not isinstance(obj, torch.Tensor):
            return None
        if id(obj) not in self.index:
            self.index[id(obj)] = len(self.tensors)
            self.tensors.append(obj)
        return ("tensor", self.index[id(obj)], isinstance(obj, nn.Parameter), obj.requires_grad)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, tensors: list):
        super().__init__(file)
        self.tensors = tensors

    def persistent_load(self, pid):
        _, index, parameter, requires_grad = pid
        tensor = self.tensors[index]
        return nn.Parameter(tensor, requires_grad=requires_grad) if parameter else tensor


def _wire_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def _broadcast(obj: Any, owner: int, device: torch.device) -> Any:
    """``obj`` of rank ``owner``, on every rank (the owner gets its own object back)."""
    wire = _wire_device(device)
    if rank() == owner:
        tensors: list[torch.Tensor] = []
        file = io.BytesIO()
        _Pickler(file, tensors).dump(obj)
        layout = [(t.dtype, tuple(t.shape)) for t in tensors]
        dist.broadcast_object_list([file.getvalue(), layout], src=owner, device=wire)
        if tensors:
            dist.broadcast(torch.cat([_bytes_of(t).to(wire) for t in tensors]), src=owner)
        return obj
    message = [None, None]
    dist.broadcast_object_list(message, src=owner, device=wire)
    payload, layout = message
    sizes = [torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size() for dtype, shape in layout]
    tensors = []
    if layout:
        buffer = torch.empty(sum(sizes), dtype=torch.uint8, device=wire)
        dist.broadcast(buffer, src=owner)
        offset = 0
        for (dtype, shape), size in zip(layout, sizes):
            # A clone of its own: aligned for the dtype view, and no storage shared with the other
            # tensors (safetensors refuses to save tensors that share memory).
            piece = buffer[offset:offset + size].clone().view(dtype).reshape(shape)
            tensors.append(piece.to(device))
            offset += size
        del buffer
    return _Unpickler(io.BytesIO(payload), tensors).load()


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


__all__ = ["barrier", "finish", "from_main", "init_from_env", "is_main", "rank", "shard", "shard_range", "share",
           "world_size"]

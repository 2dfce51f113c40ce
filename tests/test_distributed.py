"""Compression on several processes (``torchrun``): each rank quantizes its share of every layer's
units, and the checkpoint is the one a single process writes, bit for bit.

The ranks run on the CPU with gloo here; on GPUs the same code runs with NCCL.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn

import moepress
from moepress.treatment import Treatment
from moepress.pipeline import distributed
from moepress.pipeline.resume import work_folder_for
from moepress.quantize import QuantSpec, rtn_quantize
from moepress.runtime import SplitWeight

from .helpers import interrupt, same_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(bits=3, group_size=32, calib_samples=8, seq_len=64, batch_size=4)


def _cli(source: str, calib: str, out: str, *extra: str) -> list[str]:
    # --refine 0: the library's references do not refine (the command does by default)
    args = ["compress", "--model", source, "--calib", calib, "--out", out, "--device", "cpu", "--quiet", "--refine", "0"]
    for key, value in SMALL.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args + list(extra)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    """The command on ``nproc`` processes (torchrun). One thread per process, as the one-process
    reference runs: the comparison is of the work split, not of BLAS threading."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOEPRESS_FAULT")}
    env["OMP_NUM_THREADS"] = "1"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-port", str(_free_port()), "-m", "moepress.cli"]
    done = subprocess.run(launcher + args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, calib_file, tmp_path_factory):
    """The reference: the same command on one process, this one (on one thread, as each rank runs)."""
    from moepress.cli import main

    source = tiny_model_dir("qwen3_moe")
    out = str(tmp_path_factory.mktemp("one") / "out")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_cli(source, calib_file, out)) == 0
    finally:
        torch.set_num_threads(threads)
    return source, out


def test_two_processes_write_the_same_checkpoint_as_one(one_process, calib_file, tmp_path):
    source, reference = one_process
    out = str(tmp_path / "out")
    _run(_cli(source, calib_file, out), nproc=2)
    same_checkpoint(out, reference)
    assert os.listdir(tmp_path) == ["out"]  # no working folder left, nothing else beside OUT
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference))


def test_a_run_killed_on_one_process_resumes_on_two(one_process, calib_file, tmp_path, monkeypatch):
    """Rank 0 opens the partial run and rank 1 follows the state it reads; neither the split (4
    experts per rank, in chunks of 3 and 1) nor the resume changes the tensors."""
    source, reference = one_process
    out = str(tmp_path / "out")
    interrupt(monkeypatch, "layer_committed:0", lambda: moepress.compress(
        source, calib=calib_file, out=out, device="cpu", expert_chunk=3, progress=False, **SMALL))
    _run(_cli(source, calib_file, out, "--expert-chunk", "3"), nproc=2)
    same_checkpoint(out, reference)
    assert json.load(open(os.path.join(out, "moepress.json")))["resumed_after_layer"] == 1
    assert not os.path.exists(work_folder_for(out))


def test_shards_are_contiguous_balanced_and_cover_everything(monkeypatch):
    for world, n in ((1, 8), (2, 8), (3, 8), (5, 4), (8, 256)):
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        owned = []
        for r in range(world):
            monkeypatch.setattr(distributed, "rank", lambda: r)
            owned.append(distributed.shard_range(n))
            assert list(distributed.shard(list(range(n)))) == list(owned[-1])
        assert [e for block in owned for e in block] == list(range(n))
        assert max(map(len, owned)) - min(map(len, owned)) <= 1


def _exchange(rank: int, world: int, init_file: str, folder: str) -> None:
    """One rank of test_share_gives_every_rank_every_object: share, then save what it got."""
    from safetensors.torch import save_file

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(rank)
    packed = rtn_quantize(torch.randn(2, 8, 64), QuantSpec(bits=3, group_size=32))
    split = SplitWeight([rtn_quantize(torch.randn(8, 32), QuantSpec(bits=2, group_size=32)), torch.randn(8, 32)], axis=1)
    owned = {rank: {"packed": packed.select(1), "split": split, "norm": torch.randn(64)[::2],
                    "record": (Treatment.quantize(3, 32, method="rtn"), 0.5 + rank)}}
    every = distributed.share(owned, torch.device("cpu"))
    assert sorted(every) == list(range(world))
    received = []
    flat = {}
    for owner, got in every.items():
        assert isinstance(got["split"], SplitWeight) and got["record"] == (Treatment.quantize(3, 32, method="rtn"), 0.5 + owner)
        piece = got["split"].pieces[1].weight
        assert isinstance(piece, nn.Parameter) and not piece.requires_grad
        tensors = {**{f"packed.{k}": v for k, v in got["packed"].tensors().items()},
                   **{f"split.{k}": v for k, v in got["split"].state_dict().items()}, "norm": got["norm"]}
        if owner != rank:
            received += list(tensors.values())
        flat.update({f"{owner}.{k}": v.clone() for k, v in tensors.items()})
    # What arrives owns its memory (safetensors refuses tensors that share it).
    assert len({t.untyped_storage().data_ptr() for t in received}) == len(received)
    save_file(flat, os.path.join(folder, f"rank{rank}.safetensors"))
    torch.distributed.destroy_process_group()


def test_share_gives_every_rank_every_object(tmp_path):
    """Packed weights, split weights with a kept (Parameter) piece, strided norm rows and records all
    arrive whole and equal on every rank."""
    from safetensors.torch import load_file

    world = 2
    torch.multiprocessing.spawn(_exchange, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    got = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(world)]
    assert sorted(got[0]) == sorted(got[1]) and any(k.startswith("1.split.") for k in got[0])
    for key in got[0]:
        assert torch.equal(got[0][key], got[1][key]), key

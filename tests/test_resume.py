"""A compress run killed at any point resumes after its last finished layer and writes the same tensors.

Kill points come from ``moepress.pipeline.faults`` (``MOEPRESS_FAULT=POINT:LAYER``): in-process runs
raise there; subprocess runs die by a real ``SIGKILL`` (nothing flushed, no ``finally``), once at a
fault point and once from outside, at whatever moment the run has reached, and the same command
resumes them in the test's process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import moepress
from moepress.cli import main
from moepress.errors import MoepressError
from moepress.pipeline.resume import work_folder_for

from .helpers import interrupt, same_checkpoint

SMALL = dict(bits=3, group_size=32, calib_samples=8, seq_len=64, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, calib_file, tmp_path_factory):
    """The reference: the same compression, never interrupted."""
    source = tiny_model_dir("qwen3_moe")
    out = str(tmp_path_factory.mktemp("reference") / "out")
    moepress.compress(source, calib=calib_file, out=out, **SMALL)
    return source, out


@pytest.mark.parametrize("point", ["mid_layer:1", "layer_shard_written:1", "layer_files_written:0",
                                   "layer_committed:1", "layer_done:2", "finish:-1"])
def test_resume_after_injected_fault_gives_the_same_tensors(point, uninterrupted, calib_file, tmp_path, monkeypatch):
    source, reference = uninterrupted
    out = str(tmp_path / "out")
    interrupt(monkeypatch, point, lambda: moepress.compress(source, calib=calib_file, out=out, **SMALL))
    assert not os.path.exists(out)  # nothing half-written in OUT
    assert os.path.isdir(work_folder_for(out))
    result = moepress.compress(source, calib=calib_file, out=out, **SMALL)
    layer = int(point.split(":")[1])
    finished = {"mid_layer": layer, "layer_shard_written": layer, "layer_files_written": layer,
                "layer_committed": layer + 1, "layer_done": layer + 1, "finish": 3}[point.split(":")[0]]
    if point != "finish:-1":
        assert result.resumed_after_layer == finished
    same_checkpoint(out, reference)
    assert not os.path.exists(work_folder_for(out))


def test_changed_settings_are_refused_until_restart(uninterrupted, calib_file, tmp_path, monkeypatch, capsys):
    source, reference = uninterrupted
    out = str(tmp_path / "out")
    interrupt(monkeypatch, "layer_committed:0", lambda: moepress.compress(source, calib=calib_file, out=out, **SMALL))
    args = ["compress", "--model", source, "--calib", calib_file, "--out", out, "--calib-samples", "8",
            "--seq-len", "64", "--batch-size", "4", "--group-size", "32", "--refine", "0", "--quiet"]
    assert main([*args, "--bits", "4"]) == 2
    err = capsys.readouterr().err
    assert "--restart" in err and "other settings" in err and "Traceback" not in err
    assert main([*args, "--bits", "3", "--restart"]) == 0
    same_checkpoint(out, reference)


def test_changed_source_is_refused(tiny_model_dir, calib_file, tmp_path, monkeypatch):
    import shutil

    source = str(tmp_path / "source")
    shutil.copytree(tiny_model_dir("qwen3_moe"), source)
    out = str(tmp_path / "out")
    interrupt(monkeypatch, "layer_committed:0", lambda: moepress.compress(source, calib=calib_file, out=out, **SMALL))
    weights = os.path.join(source, "model.safetensors")
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(MoepressError, match="source model that has changed.*--restart"):
        moepress.compress(source, calib=calib_file, out=out, **SMALL)


def _args(source: str, calib: str, out: str) -> list[str]:
    return ["compress", "--model", source, "--calib", calib, "--out", out, "--bits", "3", "--group-size", "32",
            "--calib-samples", "8", "--seq-len", "64", "--batch-size", "4",
            "--refine", "0", "--quiet"]  # (the library reference does not refine; the command does by default)


def _cli(source: str, calib: str, out: str) -> list[str]:
    return [sys.executable, "-m", "moepress.cli", *_args(source, calib, out)]


def test_real_kill_at_a_fault_point_then_resume(uninterrupted, calib_file, tmp_path):
    source, reference = uninterrupted
    out = str(tmp_path / "out")
    env = {**os.environ, "MOEPRESS_FAULT": "layer_shard_written:1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    died = subprocess.run(_cli(source, calib_file, out), env=env, capture_output=True, text=True)
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert main(_args(source, calib_file, out)) == 0  # the resumed run: the same command, in this process
    assert json.load(open(os.path.join(out, "moepress.json")))["resumed_after_layer"] == 1
    same_checkpoint(out, reference)


def test_kill_9_from_outside_then_resume(uninterrupted, calib_file, tmp_path):
    """SIGKILL from another process once the run has finished its first layer (whatever it is doing)."""
    source, reference = uninterrupted
    out = str(tmp_path / "out")
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    state = os.path.join(work_folder_for(out), "state.json")
    proc = subprocess.Popen(_cli(source, calib_file, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.load(open(state))["layers_done"] >= 1:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert main(_args(source, calib_file, out)) == 0  # the resumed run: the same command, in this process
    same_checkpoint(out, reference)


def test_expert_chunks_give_the_same_tensors(uninterrupted, calib_file, tmp_path):
    """--expert-chunk holds 3 of the 8 experts' Hessians at a time; the Gram matrices are summed in
    the same order, and GPTQ's batched calls over fewer experts round the same on this BLAS."""
    source, reference = uninterrupted
    out = str(tmp_path / "out")
    moepress.compress(source, calib=calib_file, out=out, expert_chunk=3, **SMALL)
    same_checkpoint(out, reference)


def test_offloaded_activations_give_the_same_tensors(uninterrupted, calib_file, tmp_path):
    source, reference = uninterrupted
    out = str(tmp_path / "out")
    moepress.compress(source, calib=calib_file, out=out, offload_activations=True, **SMALL)
    same_checkpoint(out, reference)
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference))  # the memory-mapped batches are gone

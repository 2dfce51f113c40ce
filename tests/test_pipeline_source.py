"""Streaming a source model: what is read, and what is refused before any work."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import moepress
from moepress.cli import main
from moepress.errors import MoepressError
from moepress.pipeline.source import StreamedModel

SMALL = dict(bits=3, group_size=32, calib_samples=4, seq_len=64, batch_size=4, progress=False)


def _rewrite(folder, edit):
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_source_tensor_is_refused_before_any_work(tiny_model_dir, calib_file, tmp_path, capsys):
    source = str(tmp_path / "src")
    shutil.copytree(tiny_model_dir("mixtral"), source)
    _rewrite(source, lambda t: t.pop("model.layers.1.self_attn.q_proj.weight"))
    out = str(tmp_path / "out")
    assert main(["compress", "--model", source, "--calib", calib_file, "--out", out, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "model.layers.1.self_attn.q_proj.weight" in err and "Traceback" not in err
    assert not os.path.exists(out) and not any(n.startswith(".out") for n in os.listdir(tmp_path))


def test_missing_expert_tensor_is_refused(tiny_model_dir, tmp_path):
    source = str(tmp_path / "src")
    shutil.copytree(tiny_model_dir("qwen3_moe"), source)
    _rewrite(source, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(MoepressError, match="layers.1.mlp.experts"):
        model = StreamedModel(source)
        model.load_layer(1)


def test_wrong_shape_is_refused_naming_the_tensor(tiny_model_dir, tmp_path):
    source = str(tmp_path / "src")
    shutil.copytree(tiny_model_dir("mixtral"), source)
    _rewrite(source, lambda t: t.update({"model.layers.0.self_attn.o_proj.weight": torch.zeros(128, 64)}))
    model = StreamedModel(source)
    with pytest.raises(MoepressError, match=r"model.layers.0.self_attn.o_proj.weight has shape \(128, 64\)"):
        model.load_layer(0)


def test_extra_source_tensor_is_a_warning(tiny_model_dir, tmp_path, capsys):
    source = str(tmp_path / "src")
    shutil.copytree(tiny_model_dir("deepseek_v3"), source)
    _rewrite(source, lambda t: t.update({"model.layers.3.eh_proj.weight": torch.zeros(4, 4)}))  # an MTP layer
    StreamedModel(source)
    err = capsys.readouterr().err
    assert "warning" in err and "model.layers.3.eh_proj.weight" in err


def test_streamed_layers_are_freed(tiny_model_dir):
    model = StreamedModel(tiny_model_dir("qwen3_moe"))
    assert all(p.device.type == "meta" for p in model.model.parameters())
    model.load_layer(1)
    layer = model.model.model.layers[1]
    assert all(p.device.type == "cpu" for p in layer.parameters())
    assert all(p.device.type == "meta" for p in model.model.model.layers[2].parameters())
    model.release_layer(1)
    assert all(p.device.type == "meta" for p in layer.parameters())
    assert model.model.model.rotary_emb.inv_freq.device.type == "cpu"  # computed, not loaded


def test_compressing_a_compressed_checkpoint_is_refused(tiny_model_dir, calib_file, tmp_path):
    out = str(tmp_path / "q")
    moepress.compress(tiny_model_dir("mixtral"), calib=calib_file, out=out, **SMALL)
    with pytest.raises(MoepressError, match="is a moepress checkpoint; compress or calibrate its original"):
        moepress.compress(out, calib=calib_file, out=str(tmp_path / "qq"), **SMALL)


def test_stale_temporary_folders_of_killed_saves_are_removed(tiny_model_dir, calib_file, tmp_path):
    """Before 0.2 a kill during the save left a hidden .OUT.tmp-* folder that no run removed."""
    stale = tmp_path / ".out.tmp-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    moepress.compress(tiny_model_dir("mixtral"), calib=calib_file, out=str(tmp_path / "out"), **SMALL)
    assert not stale.exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_calibrate_streams_the_same_profile_as_in_memory(tiny_model_dir, calib_file):
    from moepress.data import load_text, token_windows
    from moepress.loading import load_model, load_tokenizer

    source = tiny_model_dir("deepseek_v3")
    tokenizer = load_tokenizer(source)
    tokens = token_windows(load_text(calib_file), tokenizer, 64, 4, seed=0)
    streamed = moepress.calibrate(source, tokens, progress=False)
    resident = moepress.calibrate(load_model(source), tokens, progress=False)
    assert sorted(streamed.tensors) == sorted(resident.tensors)
    for k in streamed.tensors:
        assert torch.equal(streamed.tensors[k], resident.tensors[k]), k

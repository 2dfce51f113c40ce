"""Bad input gets one clear line (exit code 2), never a traceback, and nothing half-written."""

from __future__ import annotations

import os
import shutil

import pytest

from moepress.cli import main
from moepress.model.tiny import build_tiny_model

from .helpers import run_cli


@pytest.fixture
def compress_args(tiny_model_dir, calib_file, tmp_path):
    out = str(tmp_path / "out")
    return out, ["compress", "--model", tiny_model_dir("mixtral"), "--calib", calib_file, "--out", out,
                 "--calib-samples", "4", "--seq-len", "64", "--quiet"]


def test_unknown_architecture(tmp_path, capsys, tokenizer, calib_file):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    out = tmp_path / "out"
    line = run_cli(capsys, "compress", "--model", str(path), "--calib", calib_file, "--out", str(out), "--quiet")
    assert "unsupported architecture 'llama'" in line and "deepseek_v3" in line and "registry.py" in line
    assert not out.exists()


def test_model_path_that_does_not_exist(tmp_path, capsys, calib_file):
    line = run_cli(capsys, "compress", "--model", str(tmp_path / "nope"), "--calib", calib_file, "--out", str(tmp_path / "o"))
    assert "model path does not exist" in line
    assert not (tmp_path / "o").exists()


def test_truncated_safetensors(tmp_path, capsys, tiny_model_dir, calib_file):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir("mixtral"), broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    line = run_cli(capsys, "compress", "--model", str(broken), "--calib", calib_file, "--out", str(tmp_path / "o"))
    assert "corrupt" in line or "truncated" in line
    assert not (tmp_path / "o").exists()


def test_truncated_compressed_checkpoint(tmp_path, capsys, compress_args):
    out, args = compress_args
    assert main(args) == 0
    weights = os.path.join(out, "model-00002-of-00004.safetensors")  # decoder layer 0
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) - 1000])
    line = run_cli(capsys, "eval", "--model", out, "--quiet")
    assert "corrupt" in line or "truncated" in line


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--bits", "5"], "bits must be one of 2, 3, 4, 8"),
        (["--group-size", "48"], "group size must be 32, 64, 128 or 0"),
        (["--calib-samples", "0"], "calib-samples must be at least 1"),
    ],
)
def test_bad_options(capsys, compress_args, flags, expected):
    out, args = compress_args
    line = run_cli(capsys, *args, *flags)
    assert expected in line
    assert not os.path.exists(out)


def test_group_size_that_does_not_divide(tmp_path, capsys, tokenizer, calib_file):
    path = tmp_path / "odd"
    model = build_tiny_model("mixtral", vocab_size=len(tokenizer), hidden_size=96)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    line = run_cli(capsys, "compress", "--model", str(path), "--calib", calib_file, "--out", str(tmp_path / "o"),
                   "--group-size", "128", "--quiet")
    assert "group size 128 does not divide the input dimension 96 of layers.0.attn.q_proj" in line


def test_empty_and_short_calibration_files(tmp_path, capsys, compress_args):
    out, args = compress_args
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    calib_index = args.index("--calib") + 1
    args_empty = args[:calib_index] + [str(empty)] + args[calib_index + 1 :]
    assert "empty" in run_cli(capsys, *args_empty)
    short = tmp_path / "short.txt"
    short.write_text("In the beginning God created the heaven and the earth.\n")
    args_short = args[:calib_index] + [str(short)] + args[calib_index + 1 :]
    line = run_cli(capsys, *args_short)
    assert "calibration text has" in line and "--calib-samples" in line
    missing = args[:calib_index] + [str(tmp_path / "missing.txt")] + args[calib_index + 1 :]
    assert "not found" in run_cli(capsys, *missing)
    assert not os.path.exists(out)


def test_existing_output_folder_is_refused_unless_overwrite(capsys, compress_args):
    out, args = compress_args
    os.makedirs(out)
    marker = os.path.join(out, "keep.txt")
    open(marker, "w").write("mine")
    line = run_cli(capsys, *args)
    assert "already exists" in line and "--overwrite" in line
    assert os.path.exists(marker)
    assert main(args + ["--overwrite"]) == 0
    assert os.path.exists(os.path.join(out, "moepress.json")) and not os.path.exists(marker)
    leftovers = [f for f in os.listdir(os.path.dirname(out)) if ".tmp-" in f]
    assert leftovers == []

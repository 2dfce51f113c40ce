"""Loading never guesses: a tensor that is missing or disagrees with the metadata is an error naming
it, never a randomly initialised weight, on every loading path; a name that is neither a local folder
nor reachable on the hub fails at once."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import moepress
from moepress.errors import MoepressError
from moepress.loading import load_model

from .helpers import legacy_copy, run_cli

SMALL = dict(calib_samples=4, seq_len=64, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model_dir, calib_file):
    """A moepress checkpoint of the tiny Mixtral (3 bits, group 128, asymmetric: zero points stored)."""
    out = str(tmp_path_factory.mktemp("ckpt") / "out")
    moepress.compress(tiny_model_dir("mixtral"), bits=3, group_size=128, calib=calib_file, out=out, **SMALL)
    return out


def broken_copy(src: str, dst, drop=(), add=None, replace=None, edit_config=None) -> str:
    """Copy a model folder, then drop, add or replace tensors in its shards (keeping the index, if
    any, consistent with them) and edit its config.json."""
    dst = str(dst)
    shutil.copytree(src, dst)
    files = sorted(glob.glob(os.path.join(dst, "*.safetensors")))
    index_file = os.path.join(dst, "model.safetensors.index.json")
    index = json.load(open(index_file)) if os.path.exists(index_file) else None
    found = set()
    for i, file in enumerate(files):
        state = load_file(file)
        for key in drop:
            if state.pop(key, None) is not None:
                found.add(key)
                if index:
                    index["weight_map"].pop(key, None)
        for key, tensor in (replace or {}).items():
            if key in state:
                state[key] = tensor
                found.add(key)
        if i == 0:
            state.update(add or {})
            if index:
                index["weight_map"].update({k: os.path.basename(file) for k in add or {}})
        save_file(state, file, metadata={"format": "pt"})
    assert found == set(drop) | set(replace or {}), "a tensor to drop or replace is not in the checkpoint"
    if index:
        json.dump(index, open(index_file, "w"))
    if edit_config is not None:
        config_file = os.path.join(dst, "config.json")
        config = json.load(open(config_file))
        edit_config(config)
        json.dump(config, open(config_file, "w"))
    return dst


def assert_refused_everywhere(path: str, capsys, expected: str, calib_file: str) -> None:
    """moepress.load, from_pretrained after ``import moepress`` and ``moepress eval`` all refuse ``path``
    with one line containing ``expected``."""
    with pytest.raises(MoepressError, match=re.escape(expected)) as info:
        moepress.load(path)
    assert "\n" not in str(info.value)
    with pytest.raises(MoepressError, match=re.escape(expected)):
        AutoModelForCausalLM.from_pretrained(path)
    capsys.readouterr()
    line = run_cli(capsys, "eval", "--model", path, "--text", calib_file, "--samples", "2", "--seq-len", "32", "--quiet")
    assert expected in line, line


# ----------------------------------------------------------------- moepress checkpoints

@pytest.mark.parametrize("tensor", [
    "model.layers.0.self_attn.q_proj.qweight",       # a packed code tensor
    "model.layers.1.mlp.experts.2.down_proj.scales",  # a routed expert's scales
    "model.layers.0.input_layernorm.weight",          # a norm (kept in 16 bits)
    "model.layers.2.mlp.gate.weight",                 # a router
])
def test_missing_tensor_in_checkpoint_is_named(checkpoint, tmp_path, capsys, calib_file, tensor):
    path = broken_copy(checkpoint, tmp_path / "broken", drop=[tensor])
    assert_refused_everywhere(path, capsys, f"{tensor} is missing", calib_file)


def test_extra_tensor_in_checkpoint_is_named(checkpoint, tmp_path, capsys, calib_file):
    path = broken_copy(checkpoint, tmp_path / "broken", add={"model.layers.0.mlp.extra.weight": torch.zeros(4, 4)})
    assert_refused_everywhere(path, capsys, "model.layers.0.mlp.extra.weight is stored", calib_file)


@pytest.mark.parametrize("tensor, replacement", [
    ("model.layers.0.input_layernorm.weight", torch.ones(64)),
    ("model.layers.1.self_attn.o_proj.qweight", torch.zeros(128, 64, dtype=torch.uint8)),
    ("model.layers.1.self_attn.o_proj.qweight", torch.zeros(128, 48, dtype=torch.int32)),
])
def test_shape_or_dtype_disagreement_is_named(checkpoint, tmp_path, capsys, calib_file, tensor, replacement):
    path = broken_copy(checkpoint, tmp_path / "broken", replace={tensor: replacement})
    assert_refused_everywhere(path, capsys, f"{tensor} is stored as", calib_file)


def _edit_unit(key, value, unit="layers.1.attn.k_proj"):
    def edit(config):
        config["quantization_config"]["units"][unit][key] = value
    return edit


@pytest.mark.parametrize("key, value, expected", [
    ("symmetric", True, "model.layers.1.self_attn.k_proj.zeros is stored"),   # the stored zeros would be ignored
    ("act_order", True, "model.layers.1.self_attn.k_proj.g_idx is missing"),
    ("bits", 4, "model.layers.1.self_attn.k_proj.qweight is stored as [64, 48] U8"),
    ("group_size", 64, "model.layers.1.self_attn.k_proj.scales is stored as [64, 1] F16"),
])
def test_unit_map_that_disagrees_with_the_tensors_is_refused(checkpoint, tmp_path, capsys, calib_file, key, value,
                                                            expected):
    path = broken_copy(checkpoint, tmp_path / "edited", edit_config=_edit_unit(key, value))
    assert_refused_everywhere(path, capsys, expected, calib_file)


def test_symmetric_edit_of_every_unit_says_why(checkpoint, tmp_path):
    def all_symmetric(config):
        for option in config["quantization_config"]["units"].values():
            option["symmetric"] = True
    path = broken_copy(checkpoint, tmp_path / "edited", edit_config=all_symmetric)
    with pytest.raises(MoepressError, match="zero points are stored but the unit map says the unit is symmetric"):
        moepress.load(path)


def test_unit_map_entry_without_bits_is_one_line(checkpoint, tmp_path, capsys, calib_file):
    def drop_bits(config):
        del config["quantization_config"]["units"]["layers.0.attn.q_proj"]["bits"]
    path = broken_copy(checkpoint, tmp_path / "edited", edit_config=drop_bits)
    assert_refused_everywhere(path, capsys, "unit layers.0.attn.q_proj of config.json's unit map: 'bits' is missing", calib_file)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_known_format_versions_load(checkpoint, tmp_path, version):
    def set_version(config):
        config["quantization_config"]["format_version"] = version
    # formats 1 and 2 stored one uint8 zero point per group
    path = (broken_copy(checkpoint, tmp_path / f"v{version}", edit_config=set_version) if version >= 3
            else legacy_copy(checkpoint, str(tmp_path / f"v{version}"), version=version))
    assert moepress.load(path) is not None


def test_unknown_format_version_is_refused(checkpoint, tmp_path, capsys, calib_file):
    def set_version(config):
        config["quantization_config"]["format_version"] = 4
    path = broken_copy(checkpoint, tmp_path / "v4", edit_config=set_version)
    assert_refused_everywhere(path, capsys, "has moepress format version 4", calib_file)
    from moepress.export.format import KNOWN_FORMAT_VERSIONS

    line = run_cli(capsys, "eval", "--model", path, "--quiet")
    assert f"reads versions {' and '.join(map(str, KNOWN_FORMAT_VERSIONS))}" in line and "upgrade moepress" in line


def test_tied_head_is_not_missing(tiny_model_dir, calib_file, tmp_path, tokenizer):
    """A head tied to the embeddings is stored once; both loading paths accept that."""
    from moepress.model.tiny import build_tiny_model

    source = tmp_path / "tied"
    model = build_tiny_model("qwen3_moe", vocab_size=len(tokenizer), tie_word_embeddings=True)
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    out = str(tmp_path / "out")
    result = moepress.compress(str(source), bits=4, group_size=128, method="rtn", calib=calib_file, out=out, **SMALL)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = result.model(ids).logits
        assert torch.equal(moepress.load(out)(ids).logits, expected)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out)(ids).logits, expected)


# ----------------------------------------------------------------- source (uncompressed) models

def test_missing_tensor_in_source_model_is_named(tiny_model_dir, tmp_path, capsys, calib_file):
    tensor = "model.layers.1.self_attn.q_proj.weight"
    path = broken_copy(tiny_model_dir("mixtral"), tmp_path / "src", drop=[tensor])
    with pytest.raises(MoepressError, match=tensor.replace(".", r"\.")):
        moepress.load(path)
    line = run_cli(capsys, "eval", "--model", path, "--text", calib_file, "--samples", "2", "--seq-len", "32", "--quiet")
    assert tensor in line


def test_missing_expert_of_a_merged_source_tensor_is_an_error(tiny_model_dir, tmp_path):
    """Mixtral stores one tensor per expert that loading merges: a missing one is an error, not noise."""
    path = broken_copy(tiny_model_dir("mixtral"), tmp_path / "src",
                       drop=["model.layers.0.block_sparse_moe.experts.1.w1.weight"])
    with pytest.raises(MoepressError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj"):
        load_model(path)


def test_source_shape_disagreement_is_named(tiny_model_dir, tmp_path):
    tensor = "model.layers.0.post_attention_layernorm.weight"
    path = broken_copy(tiny_model_dir("qwen3_moe"), tmp_path / "src", replace={tensor: torch.ones(32)})
    with pytest.raises(MoepressError, match=rf"{tensor.replace('.', '[.]')} is stored as \[32\]"):
        load_model(path)


@pytest.mark.parametrize("arch, extra", [
    ("mixtral", "model.layers.0.self_attn.unused.weight"),
    ("deepseek_v3", "model.layers.61.eh_proj.weight"),  # a multi-token-prediction layer transformers drops
])
def test_extra_tensor_in_source_model_is_one_warning(tiny_model_dir, tmp_path, capfd, arch, extra):
    path = broken_copy(tiny_model_dir(arch), tmp_path / "src", add={extra: torch.zeros(8, 8)})
    capfd.readouterr()
    assert load_model(path) is not None
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("moepress: warning:")]
    assert len(warnings) == 1 and extra in warnings[0], err
    assert "LOAD REPORT" not in err and "UNEXPECTED" not in err, err


def test_tied_source_head_is_not_missing(tmp_path, tokenizer, capfd):
    from moepress.model.tiny import build_tiny_model

    path = tmp_path / "tied"
    build_tiny_model("qwen3_moe", vocab_size=len(tokenizer), tie_word_embeddings=True).save_pretrained(path)
    capfd.readouterr()
    model = load_model(str(path))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "moepress:" not in capfd.readouterr().err


# ----------------------------------------------------------------- names that are not folders

def _timed_eval(capsys, name):
    started = time.time()
    line = run_cli(capsys, "eval", "--model", name, "--quiet")
    return line, time.time() - started


@pytest.mark.parametrize("name", ["tiny-mixtrall", "org/doesnotexist"])
def test_mistyped_name_with_hub_offline_fails_at_once(capsys, monkeypatch, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line, seconds = _timed_eval(capsys, name)
    assert seconds < 10, seconds
    assert f"no local folder ./{name}" in line and "unreachable" in line and "HF_HUB_OFFLINE" in line, line


def test_mistyped_name_with_hub_unreachable_fails_at_once(capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    for proxy in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    line, seconds = _timed_eval(capsys, "tiny-mixtrall")
    assert seconds < 10, seconds
    assert "no local folder ./tiny-mixtrall" in line and "no connection to 127.0.0.1:9" in line, line


def test_mistyped_name_fails_fast_as_the_machine_is(capsys, monkeypatch):
    """No patching: offline (as in this sandbox) the probe fails; online the hub answers 'not found'."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    line, seconds = _timed_eval(capsys, "tiny-mixtrall")
    assert seconds < 10, seconds
    assert "tiny-mixtrall" in line


def test_hub_id_in_the_local_cache_loads_while_offline(tmp_path, tiny_model_dir, calib_file):
    """A cached hub id still loads when the hub is unreachable (from the cache, without retries)."""
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "0123456789abcdef"
    shutil.copytree(tiny_model_dir("mixtral"), snapshot)
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("0123456789abcdef")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_ENDPOINT="http://127.0.0.1:9", PYTHONPATH=os.path.dirname(os.path.dirname(moepress.__file__)))
    started = time.time()
    run = subprocess.run([sys.executable, "-m", "moepress.cli", "eval", "--model", "org/tiny", "--text", calib_file,
                          "--samples", "2", "--seq-len", "32", "--quiet"], env=env, capture_output=True, text=True,
                         cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert "perplexity" in run.stdout
    assert time.time() - started < 60


# ----------------------------------------------------------------- compressing a checkpoint again

def test_refuse_compressed_source(checkpoint, tiny_model_dir):
    from moepress.loading import refuse_compressed_source

    with pytest.raises(MoepressError, match="is already a moepress checkpoint") as info:
        refuse_compressed_source(checkpoint)
    assert str(info.value).endswith("compress its source model instead") and checkpoint in str(info.value)
    refuse_compressed_source(tiny_model_dir("mixtral"))  # a source model passes
    with pytest.raises(MoepressError, match="is already a moepress checkpoint"):
        load_model(checkpoint, for_compression=True)
    assert load_model(checkpoint) is not None  # loading it to evaluate is fine

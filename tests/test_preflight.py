"""Bad input is refused in one line before the work starts: unwritable outputs (an hour of
calibration must not end in 'permission denied'), binary plan files, a reference with another
vocabulary."""

from __future__ import annotations

import importlib
import os
import tempfile

import pytest

from moepress.errors import MoepressError
from moepress.model.tiny import build_tiny_model

from .helpers import run_cli


def _refuses_new_files(folder: str) -> bool:
    try:
        fd, path = tempfile.mkstemp(dir=folder)
    except OSError:
        return True
    os.close(fd)
    os.remove(path)
    return False


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder that refuses new files: a read-only folder, or for root (whom modes do not stop) /sys
    or /proc."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    candidates = [str(folder), "/sys", "/proc"]
    try:
        usable = next(c for c in candidates if os.path.isdir(c) and _refuses_new_files(c))
    except StopIteration:
        pytest.skip("no folder here refuses new files")
    yield usable
    folder.chmod(0o755)


@pytest.fixture
def no_work(monkeypatch):
    """Any model loading, calibration or evaluation fails the test: the refusal must come first."""
    def started(*args, **kwargs):
        raise AssertionError("the work started before the bad input was refused")

    loading = importlib.import_module("moepress.loading")
    monkeypatch.setattr(loading, "load_model", started)
    monkeypatch.setattr(loading, "load_tokenizer", started)
    monkeypatch.setattr(importlib.import_module("moepress.costs"), "build_cost_table", started)
    monkeypatch.setattr(importlib.import_module("moepress.evaluate"), "evaluate", started)


# ----------------------------------------------------------------- the helpers

def test_check_writable_file(tmp_path, unwritable_dir):
    from moepress.preflight import check_writable_file

    check_writable_file(str(tmp_path / "plan.yaml"), "the plan")
    assert os.listdir(tmp_path) == ["readonly"]  # the probe file is gone
    with pytest.raises(MoepressError, match=r"cannot write the plan .*missing/plan.yaml: folder .* does not exist"):
        check_writable_file(str(tmp_path / "missing" / "plan.yaml"), "the plan")
    with pytest.raises(MoepressError, match="it is a folder"):
        check_writable_file(str(tmp_path), "the plan")
    (tmp_path / "file").write_text("x")
    with pytest.raises(MoepressError, match="is a file, not a folder"):
        check_writable_file(str(tmp_path / "file" / "plan.yaml"), "the plan")
    with pytest.raises(MoepressError, match="cannot create files in"):
        check_writable_file(os.path.join(unwritable_dir, "plan.yaml"), "the plan")


def test_check_writable_dir(tmp_path, unwritable_dir):
    from moepress.preflight import check_writable_dir

    check_writable_dir(str(tmp_path / "out"), "the checkpoint")
    check_writable_dir(str(tmp_path), "the checkpoint")  # an existing folder (replacing it is the caller's call)
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(MoepressError, match="it is a file, not a folder"):
        check_writable_dir(str(tmp_path / "file"), "the checkpoint")
    with pytest.raises(MoepressError, match="does not exist"):
        check_writable_dir(str(tmp_path / "a" / "b"), "the checkpoint")
    with pytest.raises(MoepressError, match="cannot create files in"):
        check_writable_dir(os.path.join(unwritable_dir, "out"), "the checkpoint")


def test_check_free_space(tmp_path):
    from moepress.preflight import check_free_space

    check_free_space(str(tmp_path / "not" / "yet"), 1, "the checkpoint")  # the nearest existing parent counts
    with pytest.raises(MoepressError, match=r"not enough disk space for the checkpoint in .*: it needs about "
                                            r"1,024\.0 TiB, .* is free"):
        check_free_space(str(tmp_path), 1024**5, "the checkpoint")


# ----------------------------------------------------------------- moepress plan and moepress eval

def _plan_args(tiny_model_dir, out):
    return ["plan", "--model", tiny_model_dir("mixtral"), "--budget", "3bits", "-o", out, "--calib-samples", "2",
            "--seq-len", "32", "--quiet"]


def test_plan_output_in_missing_folder_is_refused_first(capsys, tiny_model_dir, tmp_path, no_work):
    line = run_cli(capsys, *_plan_args(tiny_model_dir, str(tmp_path / "missing" / "plan.yaml")))
    assert "cannot write the plan" in line and "does not exist" in line


def test_plan_output_in_unwritable_folder_is_refused_first(capsys, tiny_model_dir, unwritable_dir, no_work):
    line = run_cli(capsys, *_plan_args(tiny_model_dir, os.path.join(unwritable_dir, "plan.yaml")))
    assert "cannot write the plan" in line and "cannot create files in" in line


def test_plan_table_and_plot_unwritable_are_refused_first(capsys, tiny_model_dir, tmp_path, unwritable_dir, no_work):
    args = _plan_args(tiny_model_dir, str(tmp_path / "plan.yaml"))
    line = run_cli(capsys, *args, "--table", os.path.join(unwritable_dir, "table.safetensors"))
    assert "cannot write the cost table" in line
    line = run_cli(capsys, *args, "--plot", str(tmp_path / "missing" / "plan.png"))
    assert "cannot write the plot" in line and "does not exist" in line
    line = run_cli(capsys, *args, "--plot", os.path.join(unwritable_dir, "plan.png"))
    assert "cannot write the plot" in line


def test_eval_json_unwritable_is_refused_first(capsys, tiny_model_dir, tmp_path, unwritable_dir, no_work):
    for target in (os.path.join(unwritable_dir, "report.json"), str(tmp_path / "missing" / "report.json")):
        line = run_cli(capsys, "eval", "--model", tiny_model_dir("mixtral"), "--json", target, "--quiet")
        assert "cannot write the report (--json)" in line


# ----------------------------------------------------------------- plan files that are not text

@pytest.mark.parametrize("content", [
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)),  # a picture
    os.urandom(4096) + b"\xff\xfe",                              # random bytes (never valid UTF-8 here)
    b"units:\n  layers.0.attn.q_proj: 4b\x00\x00\x00",            # text with NUL bytes
])
def test_binary_plan_file_is_one_line(tmp_path, capsys, tiny_model_dir, calib_file, content):
    from moepress.allocate import load_plan

    path = tmp_path / "plan.yaml"
    path.write_bytes(content)
    with pytest.raises(MoepressError, match="is not a text plan file; make one with moepress plan"):
        load_plan(str(path))
    line = run_cli(capsys, "compress", "--model", tiny_model_dir("mixtral"), "--plan", str(path), "--calib", calib_file,
                   "--out", str(tmp_path / "out"), "--quiet")
    assert "is not a text plan file" in line
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------- eval against a reference

def test_reference_with_another_vocabulary_is_refused_first(capsys, tiny_model_dir, tmp_path, tokenizer, monkeypatch):
    reference = tmp_path / "reference"
    build_tiny_model("mixtral", vocab_size=640).save_pretrained(reference)
    tokenizer.save_pretrained(reference)
    loading = importlib.import_module("moepress.loading")

    def started(*args, **kwargs):
        raise AssertionError("a model was loaded before the vocabularies were compared")

    monkeypatch.setattr(loading, "load_model", started)
    line = run_cli(capsys, "eval", "--model", tiny_model_dir("mixtral"), "--reference", str(reference), "--quiet")
    assert "vocabulary of 640 tokens" in line and "has 512" in line

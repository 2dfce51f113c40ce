"""``moepress compress --budget``: plan and compress in one command, resumable in both passes."""

from __future__ import annotations

import os

import pytest

from moepress.cli import main
from moepress.pipeline.resume import work_folder_for

from .helpers import interrupt, same_checkpoint

COMMON = ["--calib-samples", "8", "--seq-len", "64", "--batch-size", "4", "--group-size", "32", "--quiet"]
BUDGET = ["--budget", "2.5bits", "--strategy", "ilp"]


@pytest.fixture(scope="module")
def one_step(tiny_model_dir, calib_file, tmp_path_factory):
    """``compress --budget 2.5bits --strategy ilp`` uninterrupted: (the source, its checkpoint), which
    the plan-then-compress test and every resumed run are compared with. (The refinement steps the
    conftest gives the CLI tests are set here too: a module's fixture runs before theirs.)"""
    import moepress.refine

    source = tiny_model_dir("qwen3_moe")
    out = str(tmp_path_factory.mktemp("budget") / "one")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(moepress.refine, "REFINE_STEPS", 2)
        assert main(["compress", "--model", source, "--calib", calib_file, *BUDGET, "--out", out, *COMMON]) == 0
    return source, out


def test_budget_equals_plan_then_compress(one_step, calib_file, tmp_path):
    source, one = one_step
    plan = str(tmp_path / "plan.yaml")
    assert main(["plan", "--model", source, "--calib", calib_file, *BUDGET, "-o", plan, *COMMON]) == 0
    two_steps = str(tmp_path / "two")
    assert main(["compress", "--model", source, "--calib", calib_file, "--plan", plan, "--out", two_steps,
                 *COMMON]) == 0
    same_checkpoint(one, two_steps)
    assert {"plan.yaml", "costs.safetensors"} <= set(os.listdir(one))
    assert open(os.path.join(one, "plan.yaml")).read().split("units:")[1] == open(plan).read().split("units:")[1]
    assert not os.path.exists(work_folder_for(one, "costs"))


@pytest.mark.parametrize("extra, word", [(["--bits", "3"], "--bits"), (["--plan", "p.yaml"], "--plan")])
def test_budget_refuses_bits_and_plan(extra, word, tiny_model_dir, calib_file, tmp_path, capsys):
    out = str(tmp_path / "out")
    code = main(["compress", "--model", tiny_model_dir("qwen3_moe"), "--calib", calib_file, "--budget", "3bits",
                 "--out", out, *extra, *COMMON])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = [l for l in err.splitlines() if l.startswith("moepress: error:")]
    assert len(line) == 1 and "--budget" in line[0] and word in line[0]
    assert not os.path.exists(out)


@pytest.mark.parametrize("point", ["layer_committed:1", "layer_shard_written:2"])
def test_budget_resumes_in_either_pass(point, one_step, calib_file, tmp_path, monkeypatch):
    """layer_committed:1 fires in the cost-table pass (the first to commit a layer); layer_shard_written
    fires only in the compression pass, after the plan was made."""
    source, reference = one_step
    args = ["compress", "--model", source, "--calib", calib_file, *BUDGET, *COMMON]
    out = str(tmp_path / "out")
    interrupt(monkeypatch, point, lambda: main([*args, "--out", out]))
    assert os.path.isdir(work_folder_for(out, "costs"))
    assert main([*args, "--out", out]) == 0
    same_checkpoint(out, reference)

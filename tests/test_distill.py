"""End-to-end refinement of a checkpoint's scales on the unquantized model's outputs (moepress.distill, ``moepress distill``)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moepress.distill
from moepress.cli import main
from moepress.distill import distill_checkpoint
from moepress.errors import MoepressError

ZOO_MIXTRAL = Path(__file__).resolve().parents[1] / "zoo" / "models" / "tiny-mixtral"


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def _validation_kl(checkpoint, reference, done) -> float:
    """KL(reference || checkpoint) on the windows distill held out, computed afresh from the files."""
    import torch.nn.functional as F

    from moepress.data import load_text, token_windows
    from moepress.loading import load_model, load_tokenizer

    tokens = token_windows(load_text(done["calib"]), load_tokenizer(str(checkpoint)), done["seq_len"],
                           done["windows"] + done["validation_windows"], seed=done["seed"], what="calibration")
    tokens = tokens[done["windows"]:]
    student = load_model(str(checkpoint), dtype=torch.float32).eval()
    teacher = load_model(str(reference), dtype=torch.float32).eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(tokens), done["batch_size"]):
            batch = tokens[i:i + done["batch_size"]]
            want = F.log_softmax(teacher(input_ids=batch).logits.float(), -1)
            got = F.log_softmax(student(input_ids=batch).logits.float(), -1)
            total += float(F.kl_div(got, want, log_target=True, reduction="none").sum(-1).mean()) * len(batch)
    return total / len(tokens)


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, calib_file, tmp_path_factory):
    import moepress

    source = tiny_model_dir("mixtral")
    out = str(tmp_path_factory.mktemp("distill") / "c3")
    moepress.compress(source, bits=3, group_size=64, calib=calib_file, calib_samples=8, seq_len=32, out=out,
                      progress=False)
    return source, out


def test_only_scales_change_and_the_files_hold_what_was_optimised(checkpoint, tmp_path):
    """The codes, zero points and every other tensor are the checkpoint's; only float16 scales change,
    the KL on the held-out windows fell, and the written checkpoint scores exactly the recorded KL."""
    source, ckpt = checkpoint
    out = tmp_path / "d"
    done = distill_checkpoint(ckpt, str(out), steps=6, batch_size=4, progress=False)
    assert done["windows"] == 6 and done["validation_windows"] == 2  # (of the checkpoint's 8)
    assert done["kept"] and done["validation_kl"][1] < done["validation_kl"][0]
    before, after = _tensors(ckpt), _tensors(out)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(".scales") for k in changed)
    assert all(after[k].dtype == before[k].dtype for k in changed)
    record = json.load(open(out / "moepress.json"))
    assert record["distill"]["tensors_changed"] == len(changed) and record["units"] == json.load(
        open(Path(ckpt) / "moepress.json"))["units"]
    assert _validation_kl(out, source, done) == pytest.approx(done["validation_kl"][1], rel=1e-4)


def test_a_run_that_does_not_lower_the_kl_changes_nothing(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(moepress.distill, "DISTILL_LR_SCALE", 50.0)  # steps far too large: the KL rises
    _, ckpt = checkpoint
    out = tmp_path / "d"
    done = distill_checkpoint(ckpt, str(out), steps=4, batch_size=4, progress=False)
    assert not done["kept"] and done["validation_kl"][1] >= done["validation_kl"][0]
    before, after = _tensors(ckpt), _tensors(out)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_input_is_refused_before_any_work(checkpoint, tiny_model_dir, tmp_path, capsys):
    _, ckpt = checkpoint
    with pytest.raises(MoepressError, match="other than the checkpoint"):
        distill_checkpoint(ckpt, ckpt, progress=False)
    with pytest.raises(MoepressError, match="not a moepress checkpoint"):
        distill_checkpoint(tiny_model_dir("mixtral"), str(tmp_path / "x"), progress=False)
    with pytest.raises(MoepressError, match="--steps"):
        distill_checkpoint(ckpt, str(tmp_path / "x"), steps=0, progress=False)
    w8a8 = tmp_path / "w8a8"
    import shutil

    shutil.copytree(ckpt, w8a8)
    record = json.load(open(w8a8 / "moepress.json"))
    json.dump({**record, "activations": "int8"}, open(w8a8 / "moepress.json", "w"))
    with pytest.raises(MoepressError, match="--activations"):
        distill_checkpoint(str(w8a8), str(tmp_path / "x"), progress=False)
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "f").write_text("x")
    assert main(["distill", "--model", ckpt, "--out", str(tmp_path / "exists"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err
    assert not (tmp_path / "x").exists()


def test_distill_lowers_the_held_out_kl_of_a_trained_model(tmp_path):
    """On the trained tiny-mixtral at 2 bits, GPTQ then distill: the KL to the unquantized model on held-out
    windows falls (the layer-wise refinement off, so that what is measured is distill's)."""
    import torch.nn.functional as F

    import moepress
    from moepress.data import load_text, token_windows
    from moepress.loading import load_model, load_tokenizer

    if not (ZOO_MIXTRAL / "model.safetensors").exists():
        pytest.skip("zoo/models/tiny-mixtral is not built (run zoo/tiny_mixtral.py)")
    ckpt, out = str(tmp_path / "c"), str(tmp_path / "d")
    moepress.compress(str(ZOO_MIXTRAL), bits=2, calib_samples=16, seq_len=128, out=ckpt, progress=False)
    distill_checkpoint(ckpt, out, steps=8, progress=False)
    held_out = token_windows(load_text("builtin:eval", what="evaluation"), load_tokenizer(ckpt), 64, 32, seed=0,
                             what="evaluation")
    teacher = load_model(str(ZOO_MIXTRAL), dtype=torch.float32).eval()
    kl = {}
    with torch.no_grad():
        want = F.log_softmax(teacher(input_ids=held_out).logits.float(), -1)
        for name, folder in (("gptq", ckpt), ("distilled", out)):
            got = F.log_softmax(load_model(folder, dtype=torch.float32)(input_ids=held_out).logits.float(), -1)
            kl[name] = float(F.kl_div(got, want, log_target=True, reduction="none").sum(-1).mean())
    assert kl["distilled"] < 0.97 * kl["gptq"], kl


@pytest.mark.parametrize("target", [None, "llamacpp"])
def test_the_tuned_values_are_written_where_the_model_reads_them(target, tiny_model_dir, calib_file, tmp_path):
    """Whatever the learned values, writing them back leaves every stored module computing exactly the
    learnable's weight: moepress's grids (float16 scales) and llama.cpp's blocks (GGUF bytes)."""
    import moepress
    from moepress.loading import load_model
    from moepress.quantize.block_scales import BlockScalesWeight
    from moepress.quantize.signround import SignRoundWeight

    ckpt = str(tmp_path / "c")
    moepress.compress(tiny_model_dir("mixtral"), bits=4, calib=calib_file, calib_samples=4, seq_len=32, out=ckpt,
                      progress=False, **({"target": target} if target else {}))
    student = load_model(ckpt, dtype=torch.float32)
    _, learnables, _ = moepress.distill._learnables(student)
    kind = BlockScalesWeight if target else SignRoundWeight
    assert learnables and all(isinstance(learnable, kind) for learnable, _ in learnables.values())
    assert any(len(modules) > 1 for _, modules in learnables.values())  # the experts, stacked
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for learnable, _ in learnables.values():
            for p in learnable.params:
                p.mul_(1 + 0.1 * torch.rand(p.shape, generator=g))
    moepress.distill._write_back(learnables)
    for learnable, modules in learnables.values():
        want = learnable.dequantize().detach()
        for row, module in enumerate(modules):
            assert torch.equal(module.dequantize(torch.float32), want[row] if len(modules) > 1 or want.ndim == 3
                               else want)

"""Assertions several test modules share."""

from __future__ import annotations

import json
import os

import pytest
import torch

from moepress.cli import main
from moepress.export.checkpoint import read_tensors
from moepress.pipeline.faults import InjectedFault


def run_cli(capsys, *argv) -> str:
    """Run the CLI expecting a refusal: exit code 2, exactly one error line, no traceback."""
    code = main(list(argv))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("moepress: error:")]
    assert code == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def same_checkpoint(a: str, b: str) -> None:
    """Two checkpoint folders hold the same tensors (names, dtypes, bytes) and the same unit map."""
    ta, tb = read_tensors(a), read_tensors(b)
    assert sorted(ta) == sorted(tb)
    differing = [k for k in ta if not (ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]))]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"
    ua = json.load(open(os.path.join(a, "moepress.json")))["units"]
    ub = json.load(open(os.path.join(b, "moepress.json")))["units"]
    assert ua == ub


def loads_the_same(result, out: str, loaded=None) -> None:
    """The checkpoint at ``out`` gives the compressed model's logits: exactly through ``moepress.load``
    (or the model already ``loaded`` from it), within float tolerance through ``from_pretrained``."""
    import moepress
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = result.model(ids).logits
        assert torch.equal((loaded if loaded is not None else moepress.load(out))(ids).logits, expected)
        hf = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    torch.testing.assert_close(hf.float(), expected.float(), rtol=1e-3, atol=1e-3)


def interrupt(monkeypatch, point: str, run) -> None:
    """Run ``run()`` with a fault injected (raised) at ``point`` ("POINT:LAYER"); it must stop there."""
    monkeypatch.setenv("MOEPRESS_FAULT", point)
    monkeypatch.setenv("MOEPRESS_FAULT_MODE", "raise")
    with pytest.raises(InjectedFault):
        run()
    monkeypatch.delenv("MOEPRESS_FAULT")


def legacy_copy(src: str, dst: str, version: int = 2) -> str:
    """``src`` rewritten as moepress format ``version`` (1 or 2) stored it: every zeros tensor one
    uint8 per group [out, n_groups], and the version in config.json and moepress.json."""
    import glob
    import shutil

    from safetensors.torch import load_file, save_file

    from moepress.quantize.packing import unpack_matrix

    shutil.copytree(src, dst)
    for file in sorted(glob.glob(os.path.join(dst, "*.safetensors"))):
        state = load_file(file)
        for key in [k for k in state if k.endswith(".zeros")]:
            out_f, n_groups = state[key.removesuffix("zeros") + "scales"].shape
            bits = state[key].shape[-1] // -(-out_f * n_groups // 8)  # ceil(out*groups/8)*bits bytes
            state[key] = unpack_matrix(state[key], bits, out_f, n_groups)
        save_file(state, file, metadata={"format": "pt"})
    for name in ("config.json", "moepress.json"):
        path = os.path.join(dst, name)
        data = json.load(open(path))
        (data["quantization_config"] if name == "config.json" else data)["format_version"] = version
        json.dump(data, open(path, "w"))
    return dst

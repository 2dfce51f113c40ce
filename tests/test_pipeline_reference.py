"""The streaming pipeline writes the same tensors as the whole-model code it replaced.

``tests/data/reference_tensors.json`` holds what commit 671c7c4 (the last one that loaded the whole
model before compressing) wrote for tiny models of all 8 architectures, stored on disk in the hub
layout (one tensor per expert, GraniteMoE's ``input_linear``) and in the fused in-memory layout
(``experts.gate_up_proj``). Every case is compressed again here, streamed from its shards, and every
tensor of the checkpoint must have the same dtype, shape and bytes, and every unit the same treatment.
The hashes were taken with one torch thread (a few GPTQ codes flip with the thread count), so this
test pins one thread too. Zero points are compared in the layout the reference stored (format 2: one
uint8 per group); format 3 packs them at the codes' width, losslessly (tests/test_packed_zeros.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

import moepress
from moepress.model.tiny import build_tiny_model
from moepress.quantize import QuantSpec
from moepress.treatment import Treatment

DATA = Path(__file__).parent / "data"
REFERENCE = json.loads((DATA / "reference_tensors.json").read_text())
_spec = importlib.util.spec_from_file_location("record_reference", DATA / "record_reference.py")
record = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(record)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(REFERENCE["torch_num_threads"])
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, tokenizer):
    cache: dict[str, dict[str, str]] = {}

    def make(arch: str) -> dict[str, str]:
        if arch not in cache:
            model = build_tiny_model(arch, vocab_size=len(tokenizer))
            cache[arch] = record.save_layouts(model, tokenizer, tmp_path_factory.mktemp(arch), arch)
        return cache[arch]

    return make


def compress_case(name: str, case: dict, layouts, calib_file: str, out: str, **extra):
    source = layouts(case["arch"])[case["layout"]]
    # The reference predates routing-weighted expert Hessians (--expert-hessian, g2 by default now).
    kwargs = {"expert_hessian": "plain", **case["compress_kwargs"], "calib": calib_file, **extra}
    return moepress.compress(source, out=out, **kwargs)


def assert_same_as_reference(case: dict, out: str) -> None:
    from .helpers import legacy_copy

    got = record.checkpoint_tensors(legacy_copy(out, out + "-format2"))
    want = case["tensors"]
    assert sorted(got) == sorted(want), f"tensor names differ: {sorted(set(got) ^ set(want))[:5]}"
    differing = [k for k in want if got[k] != want[k]]
    assert not differing, f"{len(differing)} tensor(s) differ from the reference, e.g. {differing[:3]}"
    # The reference's unit maps are format 1's: they say whether a unit stores a group index, not
    # whether its act-order was static or off (stored alike), so treatments are compared in that form.
    units = json.loads(Path(out, "moepress.json").read_text())["units"]
    config = json.loads(Path(out, "config.json").read_text())["quantization_config"]
    assert {k: {f: v for f, v in u.items() if f != "error"} for k, u in units.items()} == config["units"]
    for recorded in (case["units"], case["quantization_config"]["units"]):
        assert {k: _stored_form(Treatment.from_unit_map(u)) for k, u in config["units"].items()} == \
            {k: _stored_form(Treatment.from_unit_map(u)) for k, u in recorded.items()}
    mode = QuantSpec.act_order_mode(case["compress_kwargs"].get("act_order", "static"))
    for name, entry in config["units"].items():
        if entry["kind"] == "quantize" and entry["method"] == "gptq":
            assert entry["act_order"] == mode, name


def _stored_form(treatment: Treatment) -> Treatment:
    return treatment.with_settings(act_order="dynamic" if treatment.stores_group_index else "off")


@pytest.mark.parametrize("name", sorted(REFERENCE["cases"]))
def test_streamed_compress_matches_reference(name, layouts, calib_file, tmp_path, one_thread):
    case = REFERENCE["cases"][name]
    out = str(tmp_path / "out")
    compress_case(name, case, layouts, calib_file, out)
    assert_same_as_reference(case, out)
    assert not any(n.startswith(".out.moepress") for n in os.listdir(tmp_path)), "working folder left behind"

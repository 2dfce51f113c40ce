"""The ``kl`` expert-drop criterion: experts chosen by the KL divergence their drop adds, measured."""

from __future__ import annotations

import pytest
import torch

import moepress
from moepress.data import load_text, token_windows
from moepress.evaluate.held_out import HeldOutKL
from moepress.model import MoEView
from moepress.model.tiny import build_tiny_model
from moepress.trim.candidates import MoEChoice, trimmed
from moepress.trim.expert_drop import router_groups
from moepress.trim.kl_drop import kl_drop_choice

SMALL = dict(calib_samples=8, seq_len=64, batch_size=4, group_size=32)


def _tokens(tokenizer, n=4):
    return token_windows(load_text("builtin:calib")[:40_000], tokenizer, 64, n, seed=0, what="calibration")


def test_one_drop_is_the_expert_whose_removal_adds_the_least_kl(tokenizer):
    model = build_tiny_model("mixtral", vocab_size=len(tokenizer)).eval()
    tokens = _tokens(tokenizer)
    chosen = kl_drop_choice(model, tokens, {1: 1})
    scorer = HeldOutKL(model, tokens)
    with torch.no_grad():
        kl = []
        for e in range(MoEView(model).experts(1).num_experts):
            with trimmed(model, {1: MoEChoice(top_k=2, dropped=(e,))}):
                kl.append(scorer.score(model)["kl"])
    assert chosen == {1: (min(range(len(kl)), key=kl.__getitem__),)}
    assert len(set(round(k, 8) for k in kl)) > 1  # the experts really differ, so the choice means something


def test_grouped_routers_give_up_as_many_experts_in_every_group(tokenizer):
    model = build_tiny_model("deepseek_v3", vocab_size=len(tokenizer)).eval()
    chosen = kl_drop_choice(model, _tokens(tokenizer), {1: 2, 2: 2})
    for layer, dropped in chosen.items():
        E, groups = MoEView(model).experts(layer).num_experts, router_groups(model, layer)
        assert sorted(e // (E // groups) for e in dropped) == list(range(groups))


def test_compress_drops_the_experts_the_kl_criterion_chose(tiny_model_dir, calib_file, tmp_path, tokenizer):
    source = tiny_model_dir("mixtral")
    out = str(tmp_path / "out")
    result = moepress.compress(source, bits=4, drop_experts="1", drop_criterion="kl", calib=calib_file, out=out,
                               progress=False, **SMALL)
    original = moepress.load(source).float()
    calib = token_windows(load_text(calib_file), moepress.loading.load_tokenizer(source), 64, 8, seed=0,
                          what="calibration")
    view = MoEView(original)
    layers = [layer for layer in range(view.num_layers) if view.experts(layer) is not None]
    expected = kl_drop_choice(original, calib, {layer: 1 for layer in layers}, batch_size=4)
    kept = result.experts_kept()
    for layer in layers:
        assert set(range(view.experts(layer).num_experts)) - set(kept[layer]) == set(expected[layer])


def test_the_kl_criterion_refuses_an_uneven_grouped_drop(tokenizer):
    from moepress.errors import MoepressError

    model = build_tiny_model("deepseek_v3", vocab_size=len(tokenizer)).eval()
    with pytest.raises(MoepressError, match="layers.1: its router picks experts in 2 groups"):
        kl_drop_choice(model, _tokens(tokenizer, 2), {1: 1})

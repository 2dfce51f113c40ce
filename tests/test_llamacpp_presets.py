"""llama-quantize's mixes (``--ggml-type q4_K_M``): moepress gives every tensor the type llama-quantize
gives it, checked against llama-quantize's own files (skipped when llama.cpp is not built)."""

from __future__ import annotations

import importlib.util
import subprocess

import numpy as np
import pytest

from moepress.errors import MoepressError
from moepress.export import llamacpp_tools
from moepress.export.llamacpp_presets import FILE_TYPES, Hparams, TensorInfo, file_type, tensor_types
from moepress.model.view import MoEView


def _mixtral_8x7b_shape() -> tuple[Hparams, list[TensorInfo]]:
    """Mixtral-8x7B's GGUF as llama-quantize sees it: 32 layers, 8 experts, GQA 4, rows of 4096/14336."""
    tensors = [TensorInfo("token_embd.weight", 4096), TensorInfo("output.weight", 4096)]
    for i in range(32):
        tensors += [TensorInfo(f"blk.{i}.attn_{p}.weight", 4096) for p in ("q", "k", "v", "output")]
        tensors += [TensorInfo(f"blk.{i}.ffn_{p}_exps.weight", 14336 if p == "down" else 4096, 3)
                    for p in ("gate", "up", "down")]
        tensors += [TensorInfo(f"blk.{i}.attn_norm.weight", 4096, 1), TensorInfo(f"blk.{i}.ffn_gate_inp.weight", 4096)]
    return Hparams("llama", 32, 32, 8, 8), tensors


def test_q4_K_M_on_mixtral_8x7b():
    """The published Q4_K_M of Mixtral-8x7B: attn_v/attn_k Q8_0 and attn_output Q5_K (8 experts),
    ffn_down Q6_K in the first and last four layers and every third between, the head Q6_K."""
    hparams, tensors = _mixtral_8x7b_shape()
    types = tensor_types(hparams, tensors, "Q4_K_M")
    more_bits = {i for i in range(32) if i < 4 or i >= 28 or (i - 4) % 3 == 2}
    assert more_bits == {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
    for i in range(32):
        assert types[f"blk.{i}.ffn_down_exps.weight"] == ("q6_K" if i in more_bits else "q4_K")
        assert types[f"blk.{i}.attn_v.weight"] == types[f"blk.{i}.attn_k.weight"] == "q8_0"
        assert types[f"blk.{i}.attn_output.weight"] == "q5_K"
        assert types[f"blk.{i}.attn_q.weight"] == types[f"blk.{i}.ffn_gate_exps.weight"] == "q4_K"
    assert types["output.weight"] == "q6_K" and types["token_embd.weight"] == "q4_K"
    assert "blk.0.attn_norm.weight" not in types and "blk.0.ffn_gate_inp.weight" not in types  # copied as they are


def test_position_rules_fallbacks_and_tied_heads():
    """Without 8 experts attn_v follows its position (Q3_K_M: the first two Q5_K); rows that a
    k-quant's 256-blocks do not divide fall back as llama.cpp does; a tied table is the head."""
    hparams = Hparams("qwen3moe", 16, 4, 2, 4)
    tensors = [TensorInfo("token_embd.weight", 576)] + [TensorInfo(f"blk.{i}.{n}.weight", w)
                                                         for i in range(16) for n, w in
                                                         (("attn_v", 512), ("ffn_down_exps", 768), ("attn_q", 576))]
    types = tensor_types(hparams, tensors, "q3_K_M")
    assert [types[f"blk.{i}.attn_v.weight"] for i in range(4)] == ["q5_K", "q5_K", "q4_K", "q4_K"]
    assert types["blk.0.ffn_down_exps.weight"] == "q5_K" and types["blk.1.ffn_down_exps.weight"] == "q4_K"  # n/16
    assert types["blk.3.attn_q.weight"] == "q4_0"  # q3_K on 576 inputs -> llama.cpp's Q4_0
    assert types["token_embd.weight"] == "q8_0"  # tied (no output.weight): the head's rule, 576 % 256 -> Q8_0
    assert tensor_types(hparams, tensors, "q6_K")["blk.3.attn_q.weight"] == "q8_0"
    assert tensor_types(hparams, tensors, "q4_K_S")["blk.3.attn_q.weight"] == "q5_0"
    assert tensor_types(hparams, [TensorInfo("blk.0.attn_q.weight", 48)], "q4_0")["blk.0.attn_q.weight"] == "f16"
    assert file_type("Q4_K_M") == "q4_K_M"
    with pytest.raises(MoepressError, match="unknown llama-quantize file type 'q4_K_X'"):
        file_type("q4_K_X")


def _llamacpp_missing() -> str | None:
    reason = llamacpp_tools.missing("convert", "llama-quantize")
    if reason is None and importlib.util.find_spec("sentencepiece") is None:
        reason = "llama.cpp's converter imports sentencepiece: pip install sentencepiece"
    if reason is None and importlib.util.find_spec("gguf") is None:
        reason = "the gguf package is an optional extra: pip install moepress[gguf]"
    return reason


# tiny models llama.cpp's converter takes; 256-wide rows so the k-quants apply: Mixtral with 4 experts
# (attn_v's position rules), Qwen2-MoE with 8 (the 8-expert rules, shared experts), DeepSeek-V3 (MLA's
# attn_k_b/attn_v_b, fallbacks on 32- and 128-wide rows). (A 16-layer 128-wide Mixtral with 8
# experts, Qwen3-MoE and OLMoE were checked the same way by hand: the converter's start is most of
# this test's time.)
WIDE = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=8)
MODELS = {
    "mixtral": dict(WIDE),
    "qwen2_moe": dict(WIDE, moe_intermediate_size=256, shared_expert_intermediate_size=256, mlp_only_layers=[]),
    "deepseek_v3": dict(WIDE, moe_intermediate_size=256, kv_lora_rank=256, q_lora_rank=256),
}


# the Mixtral of test_a_mix_gguf_has_llama_quantizes_types_and_size, untied and tied
MIX_SOURCES = {tied: dict(hidden_size=256, intermediate_size=256, num_hidden_layers=2, tie_word_embeddings=tied)
               for tied in (False, True)}


@pytest.fixture(scope="module")
def converted(tokenizer, tmp_path_factory):
    """{name: (the tiny model, its folder, llama.cpp's converter's f16 GGUF of it)} for MODELS and
    MIX_SOURCES (named "mixtral-tied"/"mixtral-untied"): the converter runs once, on all of them (its
    start is most of a tiny model's conversion)."""
    from moepress.model.tiny import build_tiny_model

    from .gguf_helpers import convert_references

    root = tmp_path_factory.mktemp("presets")
    wanted = {**MODELS, **{f"mixtral-{'tied' if tied else 'untied'}": overrides
                           for tied, overrides in MIX_SOURCES.items()}}
    found = {}
    for name, overrides in wanted.items():
        source = root / name
        built = build_tiny_model(name.split("-")[0], vocab_size=len(tokenizer), **overrides)
        built.save_pretrained(source)
        tokenizer.save_pretrained(source)
        found[name] = (built, source, str(root / f"{name}-f16.gguf"))
    convert_references([(source, f16, "f16") for _, source, f16 in found.values()])
    return found


@pytest.mark.skipif(_llamacpp_missing() is not None, reason=str(_llamacpp_missing()))
@pytest.mark.parametrize("model", list(MODELS))
def test_types_equal_llama_quantizes(model, converted, tmp_path):
    """For every mix (Q2_K_S aside: llama-quantize refuses it without an importance matrix), the
    types moepress derives from the model equal those of ``llama-quantize f16.gguf out.gguf MIX``,
    tensor by tensor, and moepress leaves out exactly the tensors llama-quantize does not quantize."""
    import gguf

    from moepress.export.llamacpp_target import preset_types

    built, _, f16 = converted[model]
    view = MoEView(built)
    for mix in FILE_TYPES:
        if mix == "q2_K_S":
            continue
        out = tmp_path / f"{mix}.gguf"
        done = subprocess.run([str(llamacpp_tools.tool("llama-quantize")), f16, str(out), mix.upper(), "1"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-1000:]
        theirs = {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(str(out)).tensors
                  if t.tensor_type != gguf.GGMLQuantizationType.F32}
        ours = {name: t.lower() for name, t in preset_types(view, mix).items()}
        assert ours == theirs, (mix, {k: (ours.get(k), theirs.get(k)) for k in set(ours) | set(theirs)
                                      if ours.get(k) != theirs.get(k)})
        out.unlink()


@pytest.mark.skipif(_llamacpp_missing() is not None, reason=str(_llamacpp_missing()))
@pytest.mark.parametrize("tied", [False, True])
def test_a_mix_gguf_has_llama_quantizes_types_and_size(tied, converted, tokenizer, calib_file, tmp_path):
    """compress --ggml-type q4_K_M, then export: every tensor of the GGUF, token_embd and output
    included, has the type of llama-quantize's Q4_K_M of the same model, and the two files have the
    same size (only the rounding differs). moepress's model computes with the GGUF's bytes: its
    embedding and head hold them (a tied head reads the embeddings' table: the GGUF has no output,
    and its token_embd takes the head's Q6_K), and the fast runtime's logits are the same."""
    import os

    import gguf
    import torch

    import moepress
    from moepress.export.gguf import export_gguf
    from moepress.loading import load_model
    from moepress.runtime.block_weight import BlockEmbedding, BlockLinear, TiedBlockHead

    _, source, f16 = converted[f"mixtral-{'tied' if tied else 'untied'}"]
    out = str(tmp_path / "q4km")
    moepress.compress(str(source), target="llamacpp", ggml_type="q4_K_M", calib=calib_file, calib_samples=4,
                      seq_len=64, out=out, progress=False)
    ours = export_gguf(out, str(tmp_path / "ours.gguf"))
    theirs = str(tmp_path / "theirs.gguf")
    done = subprocess.run([str(llamacpp_tools.tool("llama-quantize")), f16, theirs, "Q4_K_M", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1000:]
    read = {path: {t.name: t for t in gguf.GGUFReader(path).tensors} for path in (ours, theirs)}
    assert {n: t.tensor_type for n, t in read[ours].items()} == {n: t.tensor_type for n, t in read[theirs].items()}
    embd_type = gguf.GGMLQuantizationType.Q6_K if tied else gguf.GGMLQuantizationType.Q4_K
    assert read[ours]["token_embd.weight"].tensor_type == embd_type
    assert ("output.weight" in read[ours]) != tied
    if not tied:
        assert read[ours]["output.weight"].tensor_type == gguf.GGMLQuantizationType.Q6_K
    assert os.path.getsize(ours) == os.path.getsize(theirs)
    file_type = gguf.GGUFReader(ours).fields["general.file_type"].contents()
    assert file_type == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)

    model = load_model(out)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, BlockEmbedding) and isinstance(head, TiedBlockHead if tied else BlockLinear)
    for module, name in ((embedding, "token_embd.weight"), (None if tied else head, "output.weight")):
        if module is not None:
            data = np.asarray(read[ours][name].data)
            assert np.array_equal(module.blocks.numpy(), data.reshape(module.blocks.shape))
    values = torch.from_numpy(gguf.dequantize(read[ours]["token_embd.weight"].data, embd_type))
    ids = torch.tensor([[5, 17, 3, 200]])
    assert torch.equal(embedding(ids)[0], values.reshape(len(tokenizer), 256)[ids[0]].to(embedding(ids).dtype))
    if tied:
        hidden = torch.randn(3, 256)
        assert torch.allclose(head(hidden), hidden @ values.reshape(len(tokenizer), 256).T, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(moepress.load(out)(ids).logits, model(ids).logits, atol=1e-4)

"""GGUF export of the architectures beyond Mixtral and OLMoE that llama.cpp runs: DeepSeek-V3 and
V2 (latent attention, leading dense blocks, shared experts, expert groups), Qwen3-MoE, Qwen2-MoE
(shared expert with its sigmoid gate) and GraniteMoE (its multipliers). For each, on a tiny model: the metadata, tensor
names and shapes of llama.cpp's own ``convert_hf_to_gguf.py`` (the keys where the export writes
what transformers computes instead named), a 16-bit export equal to the converter's f16 file
tensor by tensor, the checkpoint's block bytes written unchanged, and llama-perplexity equal to
moepress's own perplexity. Tools that are not built are skipped, saying how to build them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import moepress
from moepress.errors import MoepressError
from moepress.export import llamacpp_tools
from moepress.export.gguf import architecture, export_gguf

from .gguf_helpers import converter_missing, convert_references, llamacpp_protocol_ppl, metadata, tensors

gguf = pytest.importorskip("gguf", reason="the gguf package is an optional extra: pip install moepress[gguf]")

ZOO_DEEPSEEK = os.path.join(os.path.dirname(__file__), "..", "zoo", "models", "tiny-deepseek")
# moepress.model.tiny's configs, changed where llama.cpp would compute something else than transformers
TINY = {
    # q LoRA, 2 expert groups (1 used), sigmoid router with its selection bias, dense layer 0, shared expert
    "deepseek_v3": {},
    # plain q_proj (V2-Lite), softmax greedy router, 2 expert groups that greedy routing ignores
    "deepseek_v2": {"topk_method": "greedy"},
    "qwen3_moe": {"mlp_only_layers": [], "norm_topk_prob": True},
    "qwen2_moe": {"mlp_only_layers": []},
    # Granite's four multipliers at sizes like the real model's (the tiny config's are all 1)
    "granitemoe": {"embedding_multiplier": 12.0, "attention_multiplier": 0.03, "residual_multiplier": 0.22,
                   "logits_scaling": 6.0},
    # yarn rope scaling (the converter's keys, and DeepSeek's yarn_log_multiplier)
    "deepseek_v3-yarn": {"rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}},
    # every row a multiple of 256 but o_proj's: the k-quants, and kv_b's split from Q4_K
    "deepseek_v3-wide": {"hidden_size": 256, "q_lora_rank": 256, "kv_lora_rank": 256, "intermediate_size": 256,
                         "moe_intermediate_size": 256, "num_hidden_layers": 2},
}
ARCHS = ["deepseek_v3", "deepseek_v2", "qwen3_moe", "qwen2_moe", "granitemoe"]
# Keys on which the export deliberately differs from the converter: it writes what transformers
# computes, where the converter's file would run differently in llama.cpp (or not load).
DIFFER = {
    # transformers' DeepseekV3Config keeps no scoring_func, so the converter writes none and llama.cpp
    # scores the router with softmax; V3's is sigmoid (on the trained tiny-deepseek: 3.4% perplexity)
    "deepseek_v3": {"deepseek2.expert_gating_func"},
    # llama.cpp's loader requires q_lora_rank but for V2-Lite's own layer count (0: no q LoRA); greedy
    # routing ignores expert groups, which the converter writes and llama.cpp would apply
    "deepseek_v2": {"deepseek2.attention.q_lora_rank", "deepseek2.expert_group_count",
                    "deepseek2.expert_group_used_count"},
}
SMALL = {"calib_samples": 4, "seq_len": 64}








@pytest.fixture(scope="module")
def sources(tokenizer, tmp_path_factory):
    """{name: (the float model of TINY[name] saved, the converter's f16 GGUF of it or None)}: llama.cpp's
    converter runs once, on all of them (its start is most of a tiny model's conversion)."""
    from moepress.model.tiny import build_tiny_model

    found = {}
    for name, overrides in TINY.items():
        source = tmp_path_factory.mktemp(f"gguf-{name}") / "source"
        build_tiny_model(name.split("-")[0], vocab_size=len(tokenizer), **overrides).save_pretrained(source)
        tokenizer.save_pretrained(source)
        found[name] = (str(source), None if converter_missing() else str(source.parent / "reference-f16.gguf"))
    if not converter_missing():
        convert_references([(source, reference, "f16") for source, reference in found.values()])
    return found


@pytest.fixture(scope="module")
def tiny(sources, calib_file):
    """``tiny(name)``: (source folder, {bits: checkpoint}, {bits: GGUF}, the converter's f16 GGUF or
    None) of TINY[name] compressed for llama.cpp at 4 bits (q4_1, or q4_K on the wide one) and 16
    (kept, but the variants), and exported."""
    cache: dict = {}

    def make(name: str):
        if name not in cache:
            source, reference = sources[name]
            root = Path(source).parent
            out, files = {}, {}
            for bits in (4,) if "-" in name else (4, 16):
                out[bits] = str(root / f"q{bits}")
                moepress.compress(source, target="llamacpp", bits=bits, calib=calib_file, out=out[bits],
                                  progress=False, **SMALL)
                files[bits] = export_gguf(out[bits], str(root / f"q{bits}.gguf"))
            cache[name] = (source, out, files, reference)
        return cache[name]

    return make


@pytest.mark.skipif(converter_missing() is not None, reason=str(converter_missing()))
@pytest.mark.parametrize("arch", ARCHS + ["deepseek_v3-wide", "deepseek_v3-yarn"])
def test_metadata_and_tensors_equal_the_converters(arch, tiny):
    """Against convert_hf_to_gguf.py on the same float model: every key and value equal but
    ``general.file_type`` (ours names the 4-bit type, as llama-quantize would) and the keys of
    DIFFER; the same tensor names and shapes."""
    _, _, files, theirs_path = tiny(arch)
    theirs, ours = metadata(theirs_path), metadata(files[4])
    expected = DIFFER.get(arch.split("-")[0], set())
    assert {k for k in set(ours) ^ set(theirs)} | {k for k in set(ours) & set(theirs) if ours[k] != theirs[k]} \
        == expected | {"general.file_type"}, {k: (ours.get(k), theirs.get(k)) for k in set(ours) | set(theirs)
                                              if ours.get(k) != theirs.get(k)}
    assert ours["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_K_S if arch.endswith("-wide")
                                            else gguf.LlamaFileType.MOSTLY_Q4_1)
    if arch.startswith("deepseek_v3"):
        assert ours["deepseek2.expert_gating_func"] == int(gguf.ExpertGatingFuncType.SIGMOID)
    if arch == "deepseek_v2":
        assert ours["deepseek2.attention.q_lora_rank"] == 0 and "deepseek2.expert_group_count" not in ours
    shapes = {n: list(t.shape) for n, t in tensors(files[4]).items()}
    assert shapes == {n: list(t.shape) for n, t in tensors(theirs_path).items()}


@pytest.mark.skipif(converter_missing() is not None, reason=str(converter_missing()))
@pytest.mark.parametrize("arch", ARCHS)
def test_16_bit_export_is_the_converters_f16_file(arch, tiny):
    """Every unit kept: each tensor has the converter's type and exactly its values (the MLA split
    of kv_b_proj, experts stacked, the router bias, the shared expert's gate included)."""
    _, _, files, reference = tiny(arch)
    theirs = tensors(reference)
    ours = tensors(files[16])
    assert set(ours) == set(theirs)
    for name, t in ours.items():
        assert t.tensor_type == theirs[name].tensor_type, name
        assert np.array_equal(np.asarray(t.data), np.asarray(theirs[name].data)), name


def _stored_blocks(checkpoint: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    folder = Path(checkpoint)
    shards = sorted(folder.glob("*.safetensors"))
    found = {}
    for shard in shards:
        found.update({k: v for k, v in load_file(str(shard)).items() if k.endswith(".blocks")})
    return found


@pytest.mark.parametrize("arch", ARCHS + ["deepseek_v3-wide"])
def test_the_checkpoints_block_bytes_are_written_unchanged(arch, tiny):
    """Every row of every block-format tensor in the file is a row of the checkpoint's blocks,
    and the file holds all of them, but the key rows of DeepSeek's kv_b_proj: llama.cpp wants
    those transposed (attn_k_b), which a block row cannot be, so they are the float32 values
    moepress's model computes with; attn_v_b is kv_b's value rows byte for byte."""
    from moepress.loading import load_model

    _, out, files, _ = tiny(arch)
    stored = _stored_blocks(out[4])
    found = tensors(files[4])
    block_types = {n: t for n, t in found.items() if t.tensor_type.name not in ("F32", "F16")}
    assert block_types
    rows = {bytes(r) for b in stored.values() for r in b.reshape(-1, b.shape[-1]).numpy()}
    written = 0
    for name, t in block_types.items():
        data = np.asarray(t.data)
        data = data.reshape(-1, data.shape[-1])
        assert all(bytes(r) in rows for r in data), name
        written += data.size
    cfg = json.loads((Path(out[4]) / "config.json").read_text())
    if not arch.startswith("deepseek"):
        assert written == sum(b.numel() for b in stored.values())
        return
    n_head, nope, v = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    kv_b = {k: b for k, b in stored.items() if k.endswith("kv_b_proj.blocks")}
    assert written == sum(b.numel() for b in stored.values()) - sum(b.numel() * nope // (nope + v)
                                                                    for b in kv_b.values())
    model = load_model(out[4])  # the stored format as it is (no runtime conversion)
    for layer in range(cfg["num_hidden_layers"]):
        blocks = kv_b[f"model.layers.{layer}.self_attn.kv_b_proj.blocks"].view(n_head, nope + v, -1)
        v_b = np.asarray(found[f"blk.{layer}.attn_v_b.weight"].data)
        assert np.array_equal(v_b.reshape(n_head, v, -1), blocks[:, nope:].numpy())
        weight = model.get_submodule(f"model.layers.{layer}.self_attn.kv_b_proj").dequantize()
        k_b = np.asarray(found[f"blk.{layer}.attn_k_b.weight"].data)
        assert found[f"blk.{layer}.attn_k_b.weight"].tensor_type.name == "F32"
        assert np.array_equal(k_b, weight.view(n_head, nope + v, -1)[:, :nope].transpose(1, 2).numpy())




def _both_perplexities(checkpoint: str, path: str, tmp_path, n_ctx: int, chunks: int) -> tuple[float, float]:
    from transformers import AutoTokenizer

    from moepress.data import load_text

    text = load_text("builtin:eval")[:40_000]
    (tmp_path / "eval.txt").write_text(text)
    theirs = llamacpp_tools.perplexity(path, str(tmp_path / "eval.txt"), n_ctx, chunks)
    ids = AutoTokenizer.from_pretrained(checkpoint)(text, add_special_tokens=False)["input_ids"]
    return theirs, llamacpp_protocol_ppl(moepress.load(checkpoint).eval(), ids, n_ctx, chunks)


@pytest.mark.skipif(llamacpp_tools.missing("llama-perplexity") is not None,
                    reason=str(llamacpp_tools.missing("llama-perplexity")))
@pytest.mark.parametrize("arch", ARCHS + ["deepseek_v3-wide"])
def test_llama_perplexity_equals_moepress_on_tiny_models(arch, tiny, tmp_path):
    """Each random tiny model at 4 bits loads and runs in llama.cpp, with moepress's perplexity
    within 0.5% (measured 0.005-0.02%; llama.cpp multiplies with 8-bit activations)."""
    _, out, files, _ = tiny(arch)
    theirs, ours = _both_perplexities(out[4], files[4], tmp_path, n_ctx=128, chunks=8)
    assert abs(theirs - ours) / ours < 0.005, (theirs, ours)


@pytest.mark.skipif(llamacpp_tools.missing("llama-perplexity") is not None,
                    reason=str(llamacpp_tools.missing("llama-perplexity")))
def test_llama_perplexity_equals_moepress_on_the_trained_tiny_deepseek(tmp_path):
    """The zoo's trained DeepSeek-V3 (its router and attention decide: a random model's near-uniform
    outputs cannot tell softmax from sigmoid scores, or yarn from plain rope) at 4 bits: within 0.5%
    (measured 0.02%; the converter's own f16 file, with llama.cpp's default softmax router, is 3.4%
    off). Then the same checkpoint with yarn rope scaling in its config (x4 from 128 positions,
    scored on 256): within 0.5% too (measured 0.015%; written without the yarn keys, 12% off)."""
    import shutil

    out = str(tmp_path / "q4")
    moepress.compress(ZOO_DEEPSEEK, target="llamacpp", bits=4, calib_samples=16, seq_len=128, out=out, progress=False)
    theirs, ours = _both_perplexities(out, export_gguf(out, str(tmp_path / "q4.gguf")), tmp_path, n_ctx=128,
                                      chunks=10)
    assert abs(theirs - ours) / ours < 0.005, (theirs, ours)
    yarn = tmp_path / "q4-yarn"
    shutil.copytree(out, yarn)
    config = json.loads((yarn / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                                 "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                                 "rope_theta": config["rope_parameters"]["rope_theta"]}
    (yarn / "config.json").write_text(json.dumps(config))
    path = export_gguf(str(yarn), str(tmp_path / "q4-yarn.gguf"))
    assert metadata(path)["deepseek2.rope.scaling.type"] == "yarn"
    theirs, ours = _both_perplexities(str(yarn), path, tmp_path, n_ctx=256, chunks=5)
    assert abs(theirs - ours) / ours < 0.005, (theirs, ours)


@pytest.mark.parametrize("model_type, overrides, why", [
    ("qwen3_moe", {}, "qwen3_moe: layers [0] have a dense MLP; llama.cpp's qwen3moe has an MoE block in every layer"),
    ("qwen2_moe", {"mlp_only_layers": [], "decoder_sparse_step": 2}, "layers [0, 2] have a dense MLP"),
    ("qwen3_moe", {"mlp_only_layers": [], "norm_topk_prob": False},
     "norm_topk_prob=False: llama.cpp's qwen3moe always renormalises the top-k weights"),
    ("qwen2_moe", {"mlp_only_layers": [], "norm_topk_prob": True},
     "llama.cpp's qwen2moe never renormalises the top-k weights"),
    ("deepseek_v2", {}, "topk_method group_limited_greedy with 1 of 2 groups: llama.cpp scores a group by its top "
                        "two experts, DeepSeek-V2 by its best one"),
    ("deepseek_v3", {"rope_interleave": False}, "rope_interleave=false"),
    ("phimoe", {}, "phimoe: llama.cpp's phimoe weights the top two experts by a softmax over all, renormalised"),
    ("qwen3_moe", {"mlp_only_layers": [], "norm_topk_prob": True, "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 16, "long_factor": [1.0] * 16,
        "original_max_position_embeddings": 128}}, "rope type 'longrope'"),
])
def test_what_llamacpp_would_run_differently_is_refused(model_type, overrides, why):
    """From the config alone (before any work): a model llama.cpp would run differently from
    transformers is refused in one line."""
    from moepress.model.tiny import tiny_config

    with pytest.raises(MoepressError, match=re.escape(why)):
        architecture(tiny_config(model_type, **overrides).to_dict())


def test_every_supported_tiny_config_passes():
    from moepress.model.tiny import tiny_config

    for name, overrides in TINY.items():
        assert architecture(tiny_config(name.split("-")[0], **overrides).to_dict()) is not None
